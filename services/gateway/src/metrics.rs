//! `GET /metrics` in Prometheus' text format: the engine's queue and token
//! counters and whether a model is loaded, each upstream version's calls
//! and costs, what the teams' jobs spent on upstreams, and ([`Meters`],
//! through prometheus-client) histograms of HTTP requests by route and
//! status and of completions by model version.

use std::fmt::Write;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let j = state.journal().stats();
    metric(
        "flywheel_journal_pending_records",
        "gauge",
        "Acknowledged writes not yet in Postgres.",
        j.pending.to_string(),
    );
    metric(
        "flywheel_journal_written_total",
        "counter",
        "Records written to the journal.",
        j.written.to_string(),
    );
    metric(
        "flywheel_journal_stored_total",
        "counter",
        "Records copied from the journal to Postgres.",
        j.stored.to_string(),
    );
    metric(
        "flywheel_journal_flush_failures_total",
        "counter",
        "Failed attempts to write to Postgres.",
        j.flush_failures.to_string(),
    );
    metric(
        "flywheel_journal_set_aside_total",
        "counter",
        "Records Postgres refused for their data, set aside as dead letters by this process.",
        j.set_aside.to_string(),
    );
    metric(
        "flywheel_journal_dead_letters",
        "gauge",
        "Records in the journal's dead-letter folder (`flywheel journal dead-letters`).",
        j.dead_letters.to_string(),
    );
    metric(
        "flywheel_journal_torn_records_total",
        "counter",
        "Last journal lines cut short by a crash, skipped when the journal was opened.",
        j.opened.torn.to_string(),
    );
    metric(
        "flywheel_journal_corrupt_records_total",
        "counter",
        "Damaged journal lines set aside when the journal was opened.",
        j.opened.corrupt.to_string(),
    );
    metric(
        "flywheel_journal_replayed_records_total",
        "counter",
        "Records an earlier run left in the journal, replayed at start.",
        j.opened.replayed.to_string(),
    );
    metric(
        "flywheel_journal_syncs_total",
        "counter",
        "fsync calls that made journal records durable.",
        j.syncs.to_string(),
    );
    metric(
        "flywheel_journal_full",
        "gauge",
        "1 while writes are refused because the journal is full.",
        u8::from(j.full).to_string(),
    );
    metric(
        "flywheel_database_up",
        "gauge",
        "0 while Postgres cannot be reached.",
        u8::from(j.database_ok).to_string(),
    );
    let served = state.served();
    metric(
        "flywheel_model_loaded",
        "gauge",
        "1 when a model is loaded and serving.",
        u8::from(served.is_some()).to_string(),
    );
    let loaded = state.models().loaded();
    metric(
        "flywheel_models_loaded",
        "gauge",
        "Base engines loaded (adapters run on them).",
        loaded.len().to_string(),
    );
    metric(
        "flywheel_model_weight_bytes",
        "gauge",
        "Bytes of model and adapter weights held by the loaded engines.",
        loaded.iter().map(|(_, b)| b).sum::<usize>().to_string(),
    );
    if let Some(engine) = served.as_ref().and_then(|m| m.engine()) {
        let s = engine.stats();
        metric(
            "flywheel_engine_queue_depth",
            "gauge",
            "Requests waiting for the engine.",
            s.queued.to_string(),
        );
        metric(
            "flywheel_engine_running",
            "gauge",
            "Sequences in the engine's running batch.",
            s.running.to_string(),
        );
        metric(
            "flywheel_engine_generated_tokens_total",
            "counter",
            "Tokens generated.",
            s.generated_tokens.to_string(),
        );
        metric(
            "flywheel_engine_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            s.prompt_tokens.to_string(),
        );
        metric(
            "flywheel_engine_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens not read because an earlier request's kept cache began the same way.",
            s.cached_prompt_tokens.to_string(),
        );
        metric(
            "flywheel_engine_draft_tokens_total",
            "counter",
            "Tokens guessed ahead from the prompt and output and checked in one pass (speculative decoding).",
            s.draft_tokens.to_string(),
        );
        metric(
            "flywheel_engine_draft_tokens_accepted_total",
            "counter",
            "Guessed tokens the model wrote as guessed.",
            s.draft_tokens_accepted.to_string(),
        );
        metric(
            "flywheel_engine_held_for_memory_total",
            "counter",
            "Times the next waiting request was held back because the running sequences' keys and values left no room for its own (FLYWHEEL_MEMORY_MB).",
            s.held_for_memory.to_string(),
        );
        metric(
            "flywheel_engine_requests_finished_total",
            "counter",
            "Generations that ran to a stop or length limit.",
            s.finished.to_string(),
        );
        metric(
            "flywheel_engine_requests_cancelled_total",
            "counter",
            "Generations stopped because the client left.",
            s.cancelled.to_string(),
        );
        metric(
            "flywheel_engine_requests_failed_total",
            "counter",
            "Generations that failed inside the engine.",
            s.failed.to_string(),
        );
    }
    info_metrics(&state, &mut out);
    engine_metrics(&state, &mut out);
    upstream_metrics(&state, &mut out);
    refusal_metrics(&state, &mut out);
    job_spend_metrics(&state, &mut out).await;
    state.meters().encode(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// What runs: the build, and the version served by default.
fn info_metrics(state: &AppState, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP flywheel_build_info The running build (its version as a label).\n\
         # TYPE flywheel_build_info gauge\n\
         flywheel_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(m) = state.served() {
        let _ = writeln!(
            out,
            "# HELP flywheel_model_info The model version this gateway serves by default.\n\
             # TYPE flywheel_model_info gauge\n\
             flywheel_model_info{{model=\"{}\",version_id=\"{}\"}} 1",
            crate::meters::escaped(&m.name),
            m.version_id
        );
    }
}

/// What the teams' jobs (distillations, judges) spent on upstream versions,
/// every worker's, from the database: counters since the first. Left out
/// when the database does not answer within half a second, so that a
/// scrape never waits on it.
async fn job_spend_metrics(state: &AppState, out: &mut String) {
    let since = chrono::DateTime::UNIX_EPOCH;
    let read = flywheel_store::upstreams::spent(state.pool(), since);
    let spent = match tokio::time::timeout(std::time::Duration::from_millis(500), read).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upstream job spend left out of /metrics");
            return;
        }
        Err(_) => {
            tracing::debug!("upstream job spend left out of /metrics: the database was slow");
            return;
        }
    };
    if spent.is_empty() {
        return;
    }
    type Spent = flywheel_store::upstreams::Spent;
    let series: [Series<Spent>; 2] = [
        (
            "flywheel_upstream_job_calls_total",
            "counter",
            "Questions a team's jobs (distill, judge) asked an upstream version.",
            |s| s.calls.max(0) as u64,
        ),
        (
            "flywheel_upstream_job_tokens_total",
            "counter",
            "Tokens a team's jobs (distill, judge) spent on an upstream version.",
            |s| s.tokens.max(0) as u64,
        ),
    ];
    let rows: Vec<_> = spent
        .iter()
        .map(|s| {
            let labels = labels(&[
                ("version", &s.version),
                ("team", &s.team),
                ("job", &s.purpose),
            ]);
            (labels, s)
        })
        .collect();
    table(out, &series, &rows);
}

/// Chat requests each team had refused with 429 by its own limits: its
/// rate limits, or its share of the engine's queue.
fn refusal_metrics(state: &AppState, out: &mut String) {
    let refused = state.limiter().refusals();
    if refused.is_empty() {
        return;
    }
    let series: [Series<u64>; 1] = [(
        "flywheel_team_requests_refused_total",
        "counter",
        "Chat requests refused with 429 by the team's own limits (why: requests_per_minute, tokens_per_minute, queue_share).",
        |n| *n,
    )];
    let rows: Vec<_> = refused
        .iter()
        .map(|((team, why), n)| (labels(&[("team", team), ("why", why)]), n))
        .collect();
    table(out, &series, &rows);
}

/// A family of series read off the same rows: name, kind, help, reader.
type Series<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Each series' HELP and TYPE, then a line per row with its labels.
fn table<T>(out: &mut String, series: &[Series<T>], rows: &[(String, &T)]) {
    for (name, kind, help, read) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, row) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {}", read(row));
        }
    }
}

/// `name="value"` pairs, the values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", crate::meters::escaped(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every loaded engine's queue, batch and tokens, labelled with the name of
/// the version it loaded (its base: a team's adapters run on it), the
/// engine serving `default` included; the unlabelled `flywheel_engine_*`
/// series are that one's alone.
fn engine_metrics(state: &AppState, out: &mut String) {
    let routes = state.routes();
    let engines: Vec<(String, flywheel_engine::EngineStats)> = state
        .models()
        .loaded()
        .into_iter()
        .filter_map(|(id, _)| {
            let engine = state.models().get(id)?;
            let name = routes
                .version(id)
                .map_or_else(|| id.to_string(), |v| v.name.clone());
            Some((labels(&[("model", &name)]), engine.stats()))
        })
        .collect();
    if engines.is_empty() {
        return;
    }
    let rows: Vec<_> = engines.iter().map(|(l, s)| (l.clone(), s)).collect();
    let series: [Series<flywheel_engine::EngineStats>; 7] = [
        (
            "flywheel_engines_queue_depth",
            "gauge",
            "Requests waiting, by loaded engine.",
            |s| s.queued as u64,
        ),
        (
            "flywheel_engines_running",
            "gauge",
            "Sequences in the running batch, by loaded engine.",
            |s| s.running,
        ),
        (
            "flywheel_engines_last_batch",
            "gauge",
            "Sequences in the last step, by loaded engine.",
            |s| s.last_batch,
        ),
        (
            "flywheel_engines_generated_tokens_total",
            "counter",
            "Tokens generated, by loaded engine.",
            |s| s.generated_tokens,
        ),
        (
            "flywheel_engines_prompt_tokens_total",
            "counter",
            "Prompt tokens read, by loaded engine.",
            |s| s.prompt_tokens,
        ),
        (
            "flywheel_engines_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from a kept cache instead of read, by loaded engine.",
            |s| s.cached_prompt_tokens,
        ),
        (
            "flywheel_engines_held_for_memory_total",
            "counter",
            "Times the next waiting request was held back because the running sequences' keys and values left no room for its own, by loaded engine.",
            |s| s.held_for_memory,
        ),
    ];
    table(out, &series, &rows);
}

/// One series per upstream version this gateway has called, labelled with
/// the version's name.
fn upstream_metrics(state: &AppState, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let clients = state.upstream_clients();
    if clients.is_empty() {
        return;
    }
    let routes = state.routes();
    let named: Vec<_> = clients
        .iter()
        .map(|(id, c)| {
            let name = routes
                .version(*id)
                .map_or_else(|| id.to_string(), |v| v.name.clone());
            (labels(&[("version", &name)]), &**c)
        })
        .collect();
    let series: [Series<flywheel_upstream::Client>; 7] = [
        (
            "flywheel_upstream_requests_total",
            "counter",
            "Chat requests sent to an upstream.",
            |c| c.counters().requests.load(Relaxed),
        ),
        (
            "flywheel_upstream_attempts_total",
            "counter",
            "HTTP attempts, retries included.",
            |c| c.counters().attempts.load(Relaxed),
        ),
        (
            "flywheel_upstream_failures_total",
            "counter",
            "Attempts and answers the upstream failed (unreachable, timed out, 5xx, broken stream).",
            |c| c.counters().failures.load(Relaxed),
        ),
        (
            "flywheel_upstream_refused_total",
            "counter",
            "Requests refused without calling because the circuit was open.",
            |c| c.counters().refused_open.load(Relaxed),
        ),
        (
            "flywheel_upstream_prompt_tokens_total",
            "counter",
            "Prompt tokens the upstream reported for finished answers.",
            |c| c.counters().prompt_tokens.load(Relaxed),
        ),
        (
            "flywheel_upstream_completion_tokens_total",
            "counter",
            "Completion tokens of finished answers (as reported, else counted).",
            |c| c.counters().completion_tokens.load(Relaxed),
        ),
        (
            "flywheel_upstream_circuit_open",
            "gauge",
            "1 while calls to the upstream are refused.",
            |c| u64::from(c.circuit_open()),
        ),
    ];
    table(out, &series, &named);
    // What each team's use costs.
    let used = state.upstream_use();
    let per_team: [Series<crate::state::UpstreamUse>; 3] = [
        (
            "flywheel_upstream_team_requests_total",
            "counter",
            "Requests a team sent an upstream version.",
            |u| u.requests,
        ),
        (
            "flywheel_upstream_team_prompt_tokens_total",
            "counter",
            "Prompt tokens of a team's requests to an upstream version.",
            |u| u.prompt_tokens,
        ),
        (
            "flywheel_upstream_team_completion_tokens_total",
            "counter",
            "Completion tokens an upstream version gave a team.",
            |u| u.completion_tokens,
        ),
    ];
    let rows: Vec<_> = used
        .iter()
        .map(|((version, team), u)| (labels(&[("version", version), ("team", team)]), u))
        .collect();
    table(out, &per_team, &rows);
}
