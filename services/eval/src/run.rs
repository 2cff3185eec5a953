//! Running a model as it is served: through its engine (and its adapter,
//! for a candidate served on its base's weights), with the serving sampling
//! code. Generations answer suites and held-out prompts; forced tokens
//! score given answers (held-out loss, preference margins). Requests go to
//! the engine together, so it batches them as it batches traffic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flywheel_engine::{
    AdapterId, ChatMessage, EngineHandle, Event, GenerateRequest, SamplingParams, SubmitError,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::stats::{self, Interval};
use crate::suite::Suite;

/// A model version as it is served.
#[derive(Clone)]
pub struct Served {
    pub engine: EngineHandle,
    pub adapter: Option<AdapterId>,
    /// The answers this version is known to give, and those it gave here.
    pub memo: Option<Arc<Memo>>,
}

/// One remembered answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    pub key: String,
    pub text: String,
    pub tokens: usize,
}

/// A model version's answers to greedy requests, by [`request_key`]: those
/// known before (from the evaluation that scored it as the candidate) and
/// those generated since, for the caller to keep. Greedy decoding on an
/// engine whose output does not depend on the batch gives the same answer to
/// the same request, so the next cycle's champion needs no second run of
/// the suites. Only suite items and held-out answers are remembered; the
/// latency probe always runs.
#[derive(Debug, Default)]
pub struct Memo {
    known: HashMap<String, (String, usize)>,
    fresh: Mutex<Vec<Remembered>>,
}

impl Memo {
    pub fn new(known: impl IntoIterator<Item = Remembered>) -> Self {
        Self {
            known: known
                .into_iter()
                .map(|r| (r.key, (r.text, r.tokens)))
                .collect(),
            fresh: Mutex::default(),
        }
    }

    /// The answers generated since the memo was made.
    pub fn fresh(&self) -> Vec<Remembered> {
        self.fresh.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// The key of a greedy request as the engine sees it: this release of the
/// engine, the prompt's tokens, the length limit and the response format.
pub fn request_key(
    prompt_ids: &[u32],
    max_tokens: usize,
    response_format: Option<&serde_json::Value>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(concat!("flywheel-engine ", env!("CARGO_PKG_VERSION"), "\n"));
    h.update(format!("max_tokens {max_tokens}\n"));
    h.update(response_format.map(|f| f.to_string()).unwrap_or_default());
    h.update("\n");
    for id in prompt_ids {
        h.update(id.to_le_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the engine: {0}")]
    Engine(String),
}

type Result<T, E = RunError> = std::result::Result<T, E>;

/// One generation and its timing.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub tokens: usize,
    pub ttft_ms: f64,
    /// Decode time per generated token after the first.
    pub ms_per_token: f64,
    /// Read from the model's [`Memo`], not generated now (no timings).
    pub remembered: bool,
}

/// Runs a request to its end, waiting for room when the engine's queue is
/// full; returns the text, the forced tokens' log-probabilities, and times.
async fn drive(
    m: &Served,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
) -> Result<(Generation, Vec<f32>)> {
    let req = GenerateRequest {
        prompt_ids,
        params,
        adapter: m.adapter,
        ..Default::default()
    };
    let started = Instant::now();
    let mut rx = loop {
        match m.engine.submit(req.clone()) {
            Ok(rx) => break rx,
            Err(SubmitError::QueueFull | SubmitError::TenantQueueFull) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(RunError::Engine(e.to_string())),
        }
    };
    let (mut text, mut logprobs, mut first, mut tokens) = (String::new(), Vec::new(), None, 0);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta {
                text: t,
                logprobs: lp,
            } => {
                first.get_or_insert_with(|| started.elapsed());
                text.push_str(&t);
                if let Some(lp) = lp {
                    logprobs.push(lp.logprob);
                }
            }
            Event::Done {
                completion_tokens, ..
            } => {
                tokens = completion_tokens;
                break;
            }
            Event::Error(e) | Event::TimedOut(e) => return Err(RunError::Engine(e)),
        }
    }
    let total = started.elapsed();
    let first = first.unwrap_or(total);
    let ms_per_token = if tokens > 1 {
        (total - first).as_secs_f64() * 1000.0 / (tokens - 1) as f64
    } else {
        0.0
    };
    Ok((
        Generation {
            text,
            tokens,
            ttft_ms: first.as_secs_f64() * 1000.0,
            ms_per_token,
            remembered: false,
        },
        logprobs,
    ))
}

fn prompt(m: &Served, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    m.engine
        .prepare_chat(messages)
        .map_err(|e| RunError::Engine(e.to_string()))
}

/// Generates an answer to `messages` as served.
pub async fn generate(
    m: &Served,
    messages: &[ChatMessage],
    max_tokens: usize,
    temperature: f32,
) -> Result<Generation> {
    generate_shaped(m, messages, max_tokens, temperature, None).await
}

/// [`generate`] under a `response_format` (constrained decoding), as a
/// request carrying it is served.
pub async fn generate_shaped(
    m: &Served,
    messages: &[ChatMessage],
    max_tokens: usize,
    temperature: f32,
    json: Option<Arc<flywheel_engine::JsonShape>>,
) -> Result<Generation> {
    generate_ids(m, prompt(m, messages)?, max_tokens, temperature, json).await
}

/// `ids` continued by `m` at `temperature` with seed 0, under `json`.
async fn generate_ids(
    m: &Served,
    ids: Vec<u32>,
    max_tokens: usize,
    temperature: f32,
    json: Option<Arc<flywheel_engine::JsonShape>>,
) -> Result<Generation> {
    let params = SamplingParams {
        temperature,
        max_tokens,
        seed: Some(0),
        json,
        ..Default::default()
    };
    Ok(drive(m, ids, params).await?.0)
}

/// [`generate`] under the item's `response_format`, read from the model's
/// memo when it is greedy and known there, and kept there when generated.
async fn generate_remembered(
    m: &Served,
    messages: &[ChatMessage],
    max_tokens: usize,
    temperature: f32,
    response_format: Option<&serde_json::Value>,
) -> Result<Generation> {
    let ids = prompt(m, messages)?;
    let memo = m.memo.as_ref().filter(|_| temperature == 0.0);
    let key = memo.map(|_| request_key(&ids, max_tokens, response_format));
    if let (Some(memo), Some(key)) = (memo, &key)
        && let Some((text, tokens)) = memo.known.get(key)
    {
        return Ok(Generation {
            text: text.clone(),
            tokens: *tokens,
            ttft_ms: 0.0,
            ms_per_token: 0.0,
            remembered: true,
        });
    }
    let json = match response_format {
        Some(rf) => {
            flywheel_engine::JsonShape::from_response_format(rf).map_err(RunError::Engine)?
        }
        None => None,
    };
    let g = generate_ids(m, ids, max_tokens, temperature, json).await?;
    if let (Some(memo), Some(key)) = (memo, key)
        && let Ok(mut fresh) = memo.fresh.lock()
    {
        fresh.push(Remembered {
            key,
            text: g.text.clone(),
            tokens: g.tokens,
        });
    }
    Ok(g)
}

/// Log-probabilities a model gave during one comparison, by prompt and
/// answer: the same disliked answer is a preference pair's rejected side and
/// a down vote, the same liked answer an SFT item and an up vote, and each
/// is forced through the engine once.
#[derive(Debug, Default)]
struct Scores(Mutex<HashMap<String, (f64, usize)>>);

impl Scores {
    async fn score(
        &self,
        m: &Served,
        messages: &[ChatMessage],
        answer: &str,
    ) -> Result<(f64, usize)> {
        let key = format!(
            "{}\u{0}{answer}",
            serde_json::to_string(messages).unwrap_or_default()
        );
        if let Some(hit) = self.0.lock().ok().and_then(|c| c.get(&key).copied()) {
            return Ok(hit);
        }
        let scored = score(m, messages, answer).await?;
        if let Ok(mut c) = self.0.lock() {
            c.insert(key, scored);
        }
        Ok(scored)
    }
}

/// The log-probability of `answer` (ended as the model ends a turn) after
/// `messages`, and its token count.
pub async fn score(m: &Served, messages: &[ChatMessage], answer: &str) -> Result<(f64, usize)> {
    let forced = m
        .engine
        .answer_ids(answer)
        .map_err(|e| RunError::Engine(e.to_string()))?;
    let n = forced.len();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: n,
        forced,
        ..Default::default()
    };
    let (_, lps) = drive(m, prompt(m, messages)?, params).await?;
    Ok((lps.iter().map(|&l| l as f64).sum(), n))
}

/// Runs `f` over `items` with up to `concurrency` at a time, in order.
async fn each<'a, T, R, F, Fut>(items: &'a [T], concurrency: usize, f: F) -> Result<Vec<R>>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = Result<R>> + Send + 'a,
    R: Send,
{
    // Boxed so the futures' type names no closure (which would make the
    // whole evaluation's future not `Send`, rust-lang/rust#102211).
    type Boxed<'b, R> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<R>> + Send + 'b>>;
    let futures: Vec<Boxed<'a, R>> = items
        .iter()
        .map(|i| Box::pin(f(i)) as Boxed<'a, R>)
        .collect();
    futures::stream::iter(futures)
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// A held-out preference pair: the chosen answer was preferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
}

/// A held-out answer users liked or wrote (a correction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    pub prompt: Vec<ChatMessage>,
    pub answer: String,
}

/// A held-out single vote: an answer its users liked (`up`) or disliked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    pub id: String,
    pub prompt: Vec<ChatMessage>,
    pub answer: String,
    pub up: bool,
}

/// What an evaluation runs both models on.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The team's task suites.
    pub task_suites: Vec<Suite>,
    /// The general retention suite.
    pub retention: Option<Suite>,
    pub pairs: Vec<Pair>,
    /// Held-out corrections: the answers users wrote where the model they
    /// rated was wrong.
    pub corrections: Vec<Answer>,
    /// Held-out answers users liked.
    pub liked: Vec<Answer>,
    /// Held-out single votes, up and down.
    pub votes: Vec<Vote>,
    /// Tokens per held-out answer generation.
    pub answer_max_tokens: usize,
}

/// One metric of one model pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub suite: String,
    pub metric: String,
    pub items: usize,
    pub candidate: f64,
    pub champion: f64,
    pub difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

impl Metric {
    /// The paired metric of `cand` and `champ` (item `i` of both is one
    /// item), with its bootstrap interval.
    pub fn paired(
        suite: &str,
        metric: &str,
        cand: &[f64],
        champ: &[f64],
        stat: impl Fn(&mut dyn Iterator<Item = f64>) -> f64 + Copy,
    ) -> Self {
        let d: Interval = stats::paired(cand, champ, stat);
        Self {
            suite: suite.into(),
            metric: metric.into(),
            items: cand.len(),
            candidate: stat(&mut cand.iter().copied()),
            champion: stat(&mut champ.iter().copied()),
            difference: d.estimate,
            ci_low: d.low,
            ci_high: d.high,
        }
    }
}

/// One example's output by one of the two models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemOutput {
    pub suite: String,
    pub item: String,
    /// `candidate` or `champion`.
    pub model: String,
    pub prompt: serde_json::Value,
    pub output: String,
    pub passed: Option<bool>,
    pub score: Option<f64>,
}

/// Both models' metrics and outputs.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    pub metrics: Vec<Metric>,
    pub items: Vec<ItemOutput>,
}

/// Progress, for long evaluations.
pub type OnProgress = Arc<dyn Fn(&str) + Send + Sync>;

/// A suite's answers, as served.
pub async fn answer_suite(
    m: &Served,
    suite: &Suite,
    concurrency: usize,
) -> Result<Vec<Generation>> {
    each(&suite.items, concurrency, |item| {
        let max = item.max_tokens.unwrap_or(suite.defaults.max_tokens);
        async move {
            generate_remembered(
                m,
                &item.messages,
                max,
                suite.defaults.temperature,
                item.response_format.as_ref(),
            )
            .await
            .map_err(|e| RunError::Engine(format!("item {}: {e}", item.id)))
        }
    })
    .await
}

/// Each pair's margin: log-probability of the chosen answer minus the
/// rejected one's.
async fn margins(
    m: &Served,
    scores: &Scores,
    pairs: &[Pair],
    concurrency: usize,
) -> Result<Vec<f64>> {
    each(pairs, concurrency, |p| async move {
        let (c, _) = scores.score(m, &p.prompt, &p.chosen).await?;
        let (r, _) = scores.score(m, &p.prompt, &p.rejected).await?;
        Ok(c - r)
    })
    .await
}

/// Each vote's answer's mean log-probability per token.
async fn vote_logprobs(
    m: &Served,
    scores: &Scores,
    votes: &[Vote],
    concurrency: usize,
) -> Result<Vec<f64>> {
    each(votes, concurrency, |v| async move {
        let (lp, n) = scores.score(m, &v.prompt, &v.answer).await?;
        Ok(lp / n.max(1) as f64)
    })
    .await
}

/// Each held-out answer's loss (mean negative log-probability per token)
/// and the model's own answer to the same prompt.
async fn answer_heldout(
    m: &Served,
    scores: &Scores,
    answers: &[Answer],
    max_tokens: usize,
    concurrency: usize,
) -> Result<Vec<(f64, Generation)>> {
    each(answers, concurrency, |a| async move {
        let (lp, n) = scores.score(m, &a.prompt, &a.answer).await?;
        let g = generate_remembered(m, &a.prompt, max_tokens, 0.0, None).await?;
        Ok((-lp / n.max(1) as f64, g))
    })
    .await
}

/// Prompts the decode-speed probe runs (the retention suite's first).
pub const SOLO_PROMPTS: usize = 24;
/// Tokens each probe answer runs to, past any end of turn, so every prompt
/// is measured over the same length whatever the model would answer;
/// answers cut shorter (an engine error, a full context) than
/// [`SOLO_MIN_TOKENS`] are not counted.
pub const SOLO_MAX_TOKENS: usize = 48;
pub const SOLO_MIN_TOKENS: usize = 8;

/// The probe's greedy decode of `messages`, [`SOLO_MAX_TOKENS`] long.
async fn probe(m: &Served, messages: &[ChatMessage]) -> Result<Generation> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: SOLO_MAX_TOKENS,
        ignore_eos: true,
        seed: Some(0),
        // The model's own cost per token: guessing ahead would make it
        // depend on how much each model's answer repeats its prompt.
        speculative: false,
        ..Default::default()
    };
    Ok(drive(m, prompt(m, messages)?, params).await?.0)
}

/// Each model's decode time per token with nothing else on the engine: the
/// prompts one at a time, the two models taking turns (which goes first
/// alternates), greedy, each answer run to the same length. In a batched run an item's time per token also
/// counts the other items' prefills that shared its steps, and a model
/// whose answers end sooner starts more of them; alone, what is left is
/// the model's own cost per token (its adapter's included). Paired per
/// prompt: (candidate, champion) in ms per token.
async fn solo_latency(
    candidate: &Served,
    champion: &Served,
    prompts: &[&[ChatMessage]],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut tc, mut th) = (Vec::new(), Vec::new());
    for (i, messages) in prompts.iter().enumerate() {
        let (c, h) = if i % 2 == 0 {
            let c = probe(candidate, messages).await?;
            (c, probe(champion, messages).await?)
        } else {
            let h = probe(champion, messages).await?;
            (probe(candidate, messages).await?, h)
        };
        if c.tokens >= SOLO_MIN_TOKENS && h.tokens >= SOLO_MIN_TOKENS {
            tc.push(c.ms_per_token);
            th.push(h.ms_per_token);
        }
    }
    Ok((tc, th))
}

/// Runs both models over everything in `inputs` and compares them.
pub async fn compare(
    candidate: &Served,
    champion: &Served,
    inputs: &Inputs,
    concurrency: usize,
    progress: OnProgress,
) -> Result<Comparison> {
    let mut out = Comparison::default();
    let mut latency: Vec<(Generation, Generation)> = Vec::new();
    let (sc, sh) = (Scores::default(), Scores::default());
    let suites = inputs.task_suites.iter().chain(inputs.retention.as_ref());
    for suite in suites {
        progress(&format!(
            "suite {} ({} items)",
            suite.name,
            suite.items.len()
        ));
        let t0 = std::time::Instant::now();
        let cand = answer_suite(candidate, suite, concurrency).await?;
        let t1 = t0.elapsed().as_secs_f64();
        let champ = answer_suite(champion, suite, concurrency).await?;
        let t2 = t0.elapsed().as_secs_f64() - t1;
        let generated = |g: &[Generation]| g.iter().filter(|g| !g.remembered).count();
        let (nc, nh) = (generated(&cand), generated(&champ));
        progress(&format!(
            "suite {}: candidate {nc} answers in {t1:.1} s, champion {nh} in {t2:.1} s \
             ({:.0} answers per minute; {} remembered from earlier evaluations)",
            suite.name,
            60.0 * (nc + nh) as f64 / (t1 + t2).max(1e-9),
            2 * suite.items.len() - nc - nh,
        ));
        let pass = |gens: &[Generation]| -> Vec<f64> {
            suite
                .items
                .iter()
                .zip(gens)
                .map(|(item, g)| f64::from(u8::from(item.passes(&g.text))))
                .collect()
        };
        let (pc, ph) = (pass(&cand), pass(&champ));
        out.metrics.push(Metric::paired(
            &suite.name,
            "pass_rate",
            &pc,
            &ph,
            stats::mean,
        ));
        for (who, gens, passed) in [("candidate", &cand, &pc), ("champion", &champ, &ph)] {
            for ((item, g), p) in suite.items.iter().zip(gens.iter()).zip(passed.iter()) {
                out.items.push(ItemOutput {
                    suite: suite.name.clone(),
                    item: item.id.clone(),
                    model: who.into(),
                    prompt: serde_json::to_value(&item.messages).unwrap_or_default(),
                    output: g.text.clone(),
                    passed: Some(*p > 0.5),
                    score: None,
                });
            }
        }
        latency.extend(cand.into_iter().zip(champ));
    }

    if !inputs.pairs.is_empty() {
        progress(&format!(
            "held-out preference pairs ({})",
            inputs.pairs.len()
        ));
        let (mc, mh) = (
            margins(candidate, &sc, &inputs.pairs, concurrency).await?,
            margins(champion, &sh, &inputs.pairs, concurrency).await?,
        );
        let won = |v: &[f64]| {
            v.iter()
                .map(|&m| f64::from(u8::from(m > 0.0)))
                .collect::<Vec<_>>()
        };
        out.metrics.push(Metric::paired(
            "heldout-dpo",
            "preference_accuracy",
            &won(&mc),
            &won(&mh),
            stats::mean,
        ));
        out.metrics.push(Metric::paired(
            "heldout-dpo",
            "reward_margin",
            &mc,
            &mh,
            stats::mean,
        ));
    }

    for (suite, answers) in [
        ("heldout-corrections", &inputs.corrections),
        ("heldout-liked", &inputs.liked),
    ] {
        if answers.is_empty() {
            continue;
        }
        progress(&format!("held-out {suite} ({})", answers.len()));
        let max = inputs.answer_max_tokens.max(1);
        let (rc, rh) = (
            answer_heldout(candidate, &sc, answers, max, concurrency).await?,
            answer_heldout(champion, &sh, answers, max, concurrency).await?,
        );
        heldout_metrics(&mut out, suite, answers, &rc, &rh);
        latency.extend(rc.into_iter().map(|r| r.1).zip(rh.into_iter().map(|r| r.1)));
    }

    if !inputs.votes.is_empty() {
        progress(&format!("held-out votes ({})", inputs.votes.len()));
        let (lc, lh) = (
            vote_logprobs(candidate, &sc, &inputs.votes, concurrency).await?,
            vote_logprobs(champion, &sh, &inputs.votes, concurrency).await?,
        );
        // Whether the candidate moved the answer's probability the way its
        // users voted, relative to the champion; chance is a half.
        let agree: Vec<f64> = inputs
            .votes
            .iter()
            .zip(lc.iter().zip(&lh))
            .map(|(v, (c, h))| {
                let d = c - h;
                if d.abs() < 1e-9 {
                    0.5
                } else {
                    f64::from(u8::from((d > 0.0) == v.up))
                }
            })
            .collect();
        let chance = vec![0.5; agree.len()];
        out.metrics.push(Metric::paired(
            "heldout-kto",
            "vote_agreement",
            &agree,
            &chance,
            stats::mean,
        ));
    }

    // The latency rule's measurement: each model alone on the engine.
    let probe: Vec<&[ChatMessage]> = inputs
        .retention
        .iter()
        .chain(&inputs.task_suites)
        .flat_map(|s| s.items.iter())
        .take(SOLO_PROMPTS)
        .map(|i| i.messages.as_slice())
        .collect();
    if !probe.is_empty() {
        progress(&format!(
            "decode speed, one request at a time ({} prompts)",
            probe.len()
        ));
        let (tc, th) = solo_latency(candidate, champion, &probe).await?;
        if !tc.is_empty() {
            out.metrics.push(Metric::paired(
                "latency",
                "solo_ms_per_token_p50",
                &tc,
                &th,
                stats::quantile(0.5),
            ));
            // The rule's measure: each prompt's candidate time over the
            // champion's, the median over prompts with its interval (the
            // champion's side is 1), so a noisy machine widens the interval
            // instead of deciding.
            let ratios: Vec<f64> = tc
                .iter()
                .zip(&th)
                .map(|(c, h)| if *h > 0.0 { c / h } else { 1.0 })
                .collect();
            out.metrics.push(Metric::paired(
                "latency",
                "solo_time_ratio",
                &ratios,
                &vec![1.0; ratios.len()],
                stats::quantile(0.5),
            ));
        }
    }

    // Latency over every generation, by quantile, paired by item.
    let decoded: Vec<&(Generation, Generation)> = latency
        .iter()
        .filter(|(c, h)| c.tokens > 1 && h.tokens > 1 && !c.remembered && !h.remembered)
        .collect();
    if !decoded.is_empty() {
        let per_token = |f: fn(&(Generation, Generation)) -> f64| {
            decoded.iter().map(|g| f(g)).collect::<Vec<f64>>()
        };
        let (tc, th) = (
            per_token(|g| g.0.ms_per_token),
            per_token(|g| g.1.ms_per_token),
        );
        let (fc, fh) = (per_token(|g| g.0.ttft_ms), per_token(|g| g.1.ttft_ms));
        for (name, q) in [("p50", 0.5), ("p95", 0.95)] {
            out.metrics.push(Metric::paired(
                "latency",
                &format!("ms_per_token_{name}"),
                &tc,
                &th,
                stats::quantile(q),
            ));
            out.metrics.push(Metric::paired(
                "latency",
                &format!("ttft_ms_{name}"),
                &fc,
                &fh,
                stats::quantile(q),
            ));
        }
    }
    Ok(out)
}

/// The metrics of held-out answers (corrections or liked ones) and both
/// models' outputs: loss, exact and contains match of the users' answer.
fn heldout_metrics(
    out: &mut Comparison,
    suite: &str,
    answers: &[Answer],
    rc: &[(f64, Generation)],
    rh: &[(f64, Generation)],
) {
    let loss = |r: &[(f64, Generation)]| r.iter().map(|x| x.0).collect::<Vec<_>>();
    let matches = |r: &[(f64, Generation)], exact: bool| -> Vec<f64> {
        answers
            .iter()
            .zip(r)
            .map(|(a, (_, g))| {
                let (want, got) = (a.answer.trim(), g.text.trim());
                let hit = if exact {
                    got == want
                } else {
                    got.to_lowercase().contains(&want.to_lowercase())
                };
                f64::from(u8::from(hit))
            })
            .collect()
    };
    out.metrics.push(Metric::paired(
        suite,
        "loss",
        &loss(rc),
        &loss(rh),
        stats::mean,
    ));
    for (name, exact) in [("exact_match", true), ("contains_match", false)] {
        out.metrics.push(Metric::paired(
            suite,
            name,
            &matches(rc, exact),
            &matches(rh, exact),
            stats::mean,
        ));
    }
    let contains = (matches(rc, false), matches(rh, false));
    for (who, r, hits) in [
        ("candidate", rc, &contains.0),
        ("champion", rh, &contains.1),
    ] {
        for ((a, (l, g)), hit) in answers.iter().zip(r.iter()).zip(hits) {
            out.items.push(ItemOutput {
                suite: suite.into(),
                item: a.id.clone(),
                model: who.into(),
                prompt: serde_json::to_value(&a.prompt).unwrap_or_default(),
                output: g.text.clone(),
                passed: Some(*hit > 0.5),
                score: Some(*l),
            });
        }
    }
}

/// Workers run evaluations on tokio's threads: the future must stay `Send`.
#[allow(dead_code)]
fn compare_is_send(a: &Served, b: &Served, i: &Inputs, p: OnProgress) {
    fn is_send<T: Send>(_: T) {}
    is_send(compare(a, b, i, 4, p));
}
