//! The worker's figures for `/metrics` (its own listener, in the binary):
//! each job attempt's duration by kind and outcome, and the tokens its
//! in-process training steps read, through prometheus-client. One registry for the process, as Prometheus' own
//! clients keep a default one.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    /// `curate`, `train` or `evaluate`.
    kind: String,
    /// `succeeded` or `failed` (an attempt; a failed one may be retried).
    outcome: String,
}

struct Meters {
    registry: Registry,
    jobs: Family<JobLabels, Histogram, fn() -> Histogram>,
    training_tokens: Counter,
    training_seconds: Counter<f64>,
    training_speed: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn job_seconds() -> Histogram {
    // 0.1 s to about 14 hours.
    Histogram::new(exponential_buckets(0.1, 2.0, 20))
}

static METERS: LazyLock<Meters> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let jobs = Family::new_with_constructor(job_seconds as fn() -> Histogram);
    registry.register(
        "flywheel_job_duration_seconds",
        "Job attempts by kind and outcome, and how long each took",
        jobs.clone(),
    );
    let training_tokens = Counter::default();
    registry.register(
        "flywheel_training_tokens",
        "Tokens read by training steps run in this worker",
        training_tokens.clone(),
    );
    let training_seconds = Counter::default();
    registry.register(
        "flywheel_training_step_seconds",
        "Time spent in those steps (tokens/s: the rate of one over the rate of the other)",
        training_seconds.clone(),
    );
    let training_speed = Gauge::default();
    registry.register(
        "flywheel_training_tokens_per_second",
        "The last training step's speed, in tokens a second",
        training_speed.clone(),
    );
    Meters {
        registry,
        jobs,
        training_tokens,
        training_seconds,
        training_speed,
    }
});

/// A job attempt that ended.
pub(crate) fn observe_job(kind: &str, succeeded: bool, seconds: f64) {
    let labels = JobLabels {
        kind: kind.to_string(),
        outcome: if succeeded { "succeeded" } else { "failed" }.to_string(),
    };
    METERS.jobs.get_or_create(&labels).observe(seconds);
}

/// A training step that read `tokens` in `seconds`.
pub(crate) fn observe_training_step(tokens: usize, seconds: f64) {
    METERS.training_tokens.inc_by(tokens as u64);
    if seconds > 0.0 {
        METERS.training_seconds.inc_by(seconds);
        METERS.training_speed.set(tokens as f64 / seconds);
    }
}

/// The figures in Prometheus' text format (OpenMetrics' closing `# EOF`
/// left out, so that more can follow).
pub fn encode(out: &mut String) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &METERS.registry).is_ok() {
        out.push_str(text.trim_end().trim_end_matches("# EOF").trim_end());
        out.push('\n');
    }
}
