//! The inference thread and the handle the HTTP layer talks to.
//!
//! One thread owns the model and runs every admitted request together:
//! each step, sequences that are generating contribute one token each and
//! sequences still reading their prompt contribute a chunk of it, within a
//! token budget, so a long prompt never stalls the others for long
//! (continuous batching with chunked prefill). New requests join between
//! steps; finished or abandoned ones leave and free their cache at once.
//!
//! Requests wait in a bounded queue; a full queue is refused at once
//! ([`SubmitError::QueueFull`], HTTP 429) rather than letting latency grow
//! without bound. Each request gets its own channel of [`Event`]s; when the
//! receiver is dropped (the client went away) the sequence leaves the batch
//! at the next step.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::fast::{BatchItem, FastLlama, StepModel};
use crate::gguf::GgufFile;
use crate::sampling::{Sampler, SamplingParams, top_n};
use crate::stop::StopMatcher;
use crate::template::{CHATML, ChatMessage, ChatTemplate};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use crate::{EngineError, Result};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for the engine; one more is answered 429.
    pub queue_capacity: usize,
    /// Sequences generating at once.
    pub max_batch: usize,
    /// Tokens per step, all sequences together: bounds how long one step
    /// (and so every running stream's next token) can take.
    pub max_batched_tokens: usize,
    /// Kernel threads; 0 means one per core.
    pub threads: usize,
    pub backend: Backend,
}

/// Which forward pass serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Our kernels on the CPU; candle on a GPU when built with `cuda` and one is present.
    #[default]
    Auto,
    /// The candle forward (f32 weights, one sequence at a time), on `device()`.
    Candle,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch: 16,
            max_batched_tokens: 256,
            threads: 0,
            backend: Backend::Auto,
        }
    }
}

/// What the gateway may know about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub context_length: usize,
    pub vocab_size: usize,
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context window reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text released by one generated token (may be empty while a stop
    /// string or a multi-byte character is incomplete) and that token's
    /// log-probabilities when asked for.
    Delta {
        text: String,
        logprobs: Option<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed on this request; nothing more follows.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

struct Job {
    req: GenerateRequest,
    events: UnboundedSender<Event>,
}

struct Shared {
    info: ModelInfo,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    queued: AtomicUsize,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    generated_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    steps: AtomicU64,
    running: AtomicU64,
    last_batch: AtomicU64,
    ttft_micros: AtomicU64,
    ttft_count: AtomicU64,
}

/// Running totals since the engine started, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub queued: usize,
    /// Sequences in the running batch.
    pub running: u64,
    /// Sequences in the last step.
    pub last_batch: u64,
    pub steps: u64,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Sum and count of times from admission to first token.
    pub ttft_micros: u64,
    pub ttft_count: u64,
}

/// Cheap to clone; every clone feeds the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Loads a GGUF model and starts its engine thread.
    pub fn load(path: &Path, name: &str, cfg: EngineConfig) -> Result<Self> {
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let source = gguf.get_str("tokenizer.chat_template").unwrap_or(CHATML);
        let template = ChatTemplate::new(source, tokenizer.bos.clone(), tokenizer.eos.clone())?;
        let llama = gguf.llama_config()?;
        let info = ModelInfo {
            name: name.to_string(),
            context_length: llama.context_length,
            vocab_size: llama.vocab,
        };
        let shared = Arc::new(Shared {
            info,
            tokenizer,
            template,
            queued: AtomicUsize::new(0),
            stats: Counters::default(),
        });
        let (tx, rx) = sync_channel(cfg.queue_capacity);
        let device = crate::device();
        if device.is_cpu() && cfg.backend == Backend::Auto {
            // Our kernels: quantized weights, batched steps.
            spawn(
                FastLlama::load(&mut gguf, cfg.threads)?,
                shared.clone(),
                cfg,
                rx,
            )?;
        } else {
            // A GPU through candle: the reference forward on that device.
            spawn(
                crate::model::Llama::load(&mut gguf, &device)?,
                shared.clone(),
                cfg,
                rx,
            )?;
        }
        tracing::info!(model = name, path = %path.display(), "model loaded");
        Ok(Self { tx, shared })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Requests waiting for the engine, not counting the one running.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            queued: self.queue_depth(),
            running: get(&c.running),
            last_batch: get(&c.last_batch),
            steps: get(&c.steps),
            ttft_micros: get(&c.ttft_micros),
            ttft_count: get(&c.ttft_count),
            generated_tokens: get(&c.generated_tokens),
            prompt_tokens: get(&c.prompt_tokens),
            finished: get(&c.finished),
            cancelled: get(&c.cancelled),
            failed: get(&c.failed),
        }
    }

    /// Prompt token ids for a conversation, rendered with the model's template.
    pub fn prepare_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.shared.template.render(messages)?;
        self.shared.tokenizer.encode(&text)
    }

    /// Queues a request; events arrive on the returned channel.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let (events, rx) = unbounded_channel();
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { req, events }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

fn spawn<M: StepModel>(
    model: M,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    rx: Receiver<Job>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("flywheel-engine".into())
        .spawn(move || Scheduler::new(model, shared, cfg).run(rx))
        .map_err(|e| EngineError::Load(format!("engine thread: {e}")))?;
    Ok(())
}

/// One request in the running batch.
struct Seq<C> {
    job: Job,
    cache: C,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Prompt tokens already run through the model.
    prefilled: usize,
    /// The token to feed next, once the prompt is done.
    next: [u32; 1],
    generated: usize,
    admitted: Instant,
    first_token: bool,
}

/// Why a sequence left the batch.
enum End {
    Finished,
    Cancelled,
}

struct Scheduler<M: StepModel> {
    model: M,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    active: Vec<Seq<M::Cache>>,
}

impl<M: StepModel> Scheduler<M> {
    fn new(model: M, shared: Arc<Shared>, cfg: EngineConfig) -> Self {
        Self {
            model,
            shared,
            cfg,
            active: Vec::new(),
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            // Wait for work when idle; otherwise take what is queued, up to
            // the batch size, without waiting.
            if self.active.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while self.active.len() < self.cfg.max_batch.max(1) {
                match rx.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.active.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            let stats = &self.shared.stats;
            let before = self.active.len();
            self.active.retain(|s| !s.job.events.is_closed());
            stats
                .cancelled
                .fetch_add((before - self.active.len()) as u64, Ordering::Relaxed);
            stats
                .running
                .store(self.active.len() as u64, Ordering::Relaxed);
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    fn admit(&mut self, job: Job) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let n = job.req.prompt_ids.len();
        if n == 0 || n >= self.model.config().context_length {
            let _ = job.events.send(Event::Error(format!(
                "a prompt of {n} tokens does not fit the context window of {}",
                self.model.config().context_length
            )));
            self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.active.push(Seq {
            sampler: Sampler::new(job.req.params.clone()),
            stops: StopMatcher::new(job.req.params.stop.clone()),
            cache: self.model.new_cache(),
            decoder: IncrementalDecoder::default(),
            prefilled: 0,
            next: [0],
            generated: 0,
            admitted: Instant::now(),
            first_token: true,
            job,
        });
    }

    /// Plans and runs one step, then samples for every sequence that got logits.
    fn step(&mut self) {
        let mut budget = self.cfg.max_batched_tokens.max(1);
        // Generating sequences first (one token each), then prompt chunks in
        // arrival order with what is left of the budget.
        let mut take = vec![0usize; self.active.len()];
        for (i, s) in self.active.iter().enumerate() {
            if s.prefilled == s.job.req.prompt_ids.len() && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        for (i, s) in self.active.iter().enumerate() {
            let left = s.job.req.prompt_ids.len() - s.prefilled;
            if left > 0 && budget > 0 {
                take[i] = left.min(budget);
                budget -= take[i];
            }
        }
        let mut items = Vec::new();
        let mut who = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let prompt_len = s.job.req.prompt_ids.len();
            let (tokens, want_logits) = if s.prefilled < prompt_len {
                let end = s.prefilled + take[i];
                (&s.job.req.prompt_ids[s.prefilled..end], end == prompt_len)
            } else {
                (&s.next[..], true)
            };
            items.push(BatchItem {
                cache: &mut s.cache,
                tokens,
                want_logits,
            });
            who.push(i);
        }
        let shared = self.shared.clone();
        let stats = &shared.stats;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.last_batch.store(who.len() as u64, Ordering::Relaxed);
        let result = self.model.step(&mut items);
        drop(items);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails the sequences in it, not the engine.
                tracing::error!(error = %e, "engine step failed");
                for &i in who.iter().rev() {
                    let s = self.active.remove(i);
                    let _ = s.job.events.send(Event::Error(e.to_string()));
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        let mut ended = Vec::new();
        for (&i, logits) in who.iter().zip(logits) {
            let s = &mut self.active[i];
            let prompt_len = s.job.req.prompt_ids.len();
            if s.prefilled < prompt_len {
                s.prefilled += take[i];
                stats
                    .prompt_tokens
                    .fetch_add(take[i] as u64, Ordering::Relaxed);
            }
            let Some(logits) = logits else { continue };
            if let Some(end) = self.emit(i, logits) {
                ended.push((i, end));
            }
        }
        for (i, end) in ended.into_iter().rev() {
            // Dropping the sequence frees its cache.
            self.active.remove(i);
            match end {
                End::Finished => stats.finished.fetch_add(1, Ordering::Relaxed),
                End::Cancelled => stats.cancelled.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// Samples sequence `i`'s next token and streams it; says if it ended.
    fn emit(&mut self, i: usize, mut logits: Vec<f32>) -> Option<End> {
        let tok = &self.shared.tokenizer;
        let stats = &self.shared.stats;
        let ctx = self.model.config().context_length;
        let s = &mut self.active[i];
        let p = &s.job.req.params;
        if s.first_token {
            s.first_token = false;
            stats
                .ttft_micros
                .fetch_add(s.admitted.elapsed().as_micros() as u64, Ordering::Relaxed);
            stats.ttft_count.fetch_add(1, Ordering::Relaxed);
        }
        let logprobs = p.logprobs.then(|| log_softmax(&logits));
        let next = s.sampler.sample(&mut logits);
        let end = if tok.stop_ids.contains(&next) && !p.ignore_eos {
            Some(FinishReason::Stop)
        } else {
            s.generated += 1;
            stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let delta = match s.decoder.push(tok, next) {
                Ok(d) => d,
                Err(e) => {
                    let _ = s.job.events.send(Event::Error(e.to_string()));
                    return Some(End::Cancelled);
                }
            };
            let step = s.stops.push(&delta);
            let logprobs = logprobs.map(|lp| TokenLogprob {
                token: tok.token_text(next),
                logprob: lp[next as usize],
                top: top_n(&lp, p.top_logprobs)
                    .into_iter()
                    .map(|(id, logprob)| TopLogprob {
                        token: tok.token_text(id),
                        logprob,
                    })
                    .collect(),
            });
            let sent = s.job.events.send(Event::Delta {
                text: step.emit,
                logprobs,
            });
            if sent.is_err() {
                return Some(End::Cancelled);
            }
            s.next = [next];
            if step.stopped {
                Some(FinishReason::Stop)
            } else if s.generated >= p.max_tokens || M::cache_len(&s.cache) >= ctx {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        let reason = end?;
        let rest = s.stops.flush();
        if !rest.is_empty() {
            let _ = s.job.events.send(Event::Delta {
                text: rest,
                logprobs: None,
            });
        }
        let _ = s.job.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: s.job.req.prompt_ids.len(),
            completion_tokens: s.generated,
        });
        Some(End::Finished)
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny;

    fn tiny_engine(queue: usize) -> EngineHandle {
        tiny_engine_with(EngineConfig {
            queue_capacity: queue,
            ..Default::default()
        })
    }

    fn tiny_engine_with(cfg: EngineConfig) -> EngineHandle {
        let dir = std::env::temp_dir().join(format!("fw-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = tiny::write_tiny_model(&dir, 1).unwrap();
        EngineHandle::load(&path, "tiny", cfg).unwrap()
    }

    fn collect(mut rx: UnboundedReceiver<Event>) -> (String, Option<Event>) {
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Delta { text: t, .. } => text.push_str(&t),
                other => return (text, Some(other)),
            }
        }
        (text, None)
    }

    fn request(engine: &EngineHandle, params: SamplingParams) -> GenerateRequest {
        let prompt_ids = engine
            .prepare_chat(&[ChatMessage {
                role: "user".into(),
                content: "hello".into(),
            }])
            .unwrap();
        GenerateRequest { prompt_ids, params }
    }

    #[test]
    fn max_tokens_ends_with_length_and_counts_tokens() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 5,
            // The random model may pick an end token; here it must not stop.
            ignore_eos: true,
            ..Default::default()
        };
        let req = request(&engine, params);
        let n_prompt = req.prompt_ids.len();
        let (_, done) = collect(engine.submit(req).unwrap());
        match done {
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                assert_eq!(completion_tokens, 5);
                assert_eq!(finish_reason, FinishReason::Length);
                assert_eq!(prompt_tokens, n_prompt);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn same_seed_gives_same_text() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            max_tokens: 20,
            ..Default::default()
        };
        let a = collect(engine.submit(request(&engine, params.clone())).unwrap());
        let b = collect(engine.submit(request(&engine, params)).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 3,
            logprobs: true,
            top_logprobs: 3,
            ..Default::default()
        };
        let mut rx = engine.submit(request(&engine, params)).unwrap();
        let mut seen = 0;
        while let Some(Event::Delta { logprobs, .. }) = rx.blocking_recv() {
            let lp = logprobs.expect("logprobs asked for");
            assert!(lp.logprob <= 0.0);
            assert_eq!(lp.top.len(), 3);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(lp.top[0].logprob, lp.logprob);
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            seen += 1;
        }
        assert!(seen >= 1);
    }

    #[test]
    fn batched_requests_give_the_same_text_as_alone() {
        // A prompt-chunk budget smaller than the prompts forces chunked
        // prefill next to running decodes.
        let engine = tiny_engine_with(EngineConfig {
            max_batched_tokens: 7,
            ..Default::default()
        });
        let params = |seed| SamplingParams {
            temperature: 0.9,
            seed: Some(seed),
            max_tokens: 30,
            ..Default::default()
        };
        let alone: Vec<_> = (0..6)
            .map(|i| collect(engine.submit(request(&engine, params(i))).unwrap()))
            .collect();
        let receivers: Vec<_> = (0..6)
            .map(|i| engine.submit(request(&engine, params(i))).unwrap())
            .collect();
        let together: Vec<_> = receivers.into_iter().map(collect).collect();
        assert_eq!(alone, together);
        assert!(engine.stats().steps > 0);
    }

    #[test]
    fn candle_backend_serves_the_same_greedy_text() {
        let kernels = tiny_engine(4);
        let candle = tiny_engine_with(EngineConfig {
            backend: Backend::Candle,
            ..Default::default()
        });
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 12,
            ..Default::default()
        };
        let a = collect(kernels.submit(request(&kernels, params.clone())).unwrap());
        let b = collect(candle.submit(request(&candle, params)).unwrap());
        assert!(matches!(b.1, Some(Event::Done { .. })));
        assert_eq!(a, b);
    }

    #[test]
    fn dropping_the_receiver_stops_generation() {
        let engine = tiny_engine(4);
        let long = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            max_tokens: 200,
            ..Default::default()
        };
        let mut rx = engine.submit(request(&engine, long)).unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Delta { .. })));
        drop(rx); // the client went away
        // The engine runs one request at a time, so once this one is done
        // the first has ended.
        let short = SamplingParams {
            temperature: 0.0,
            max_tokens: 1,
            ..Default::default()
        };
        let (_, done) = collect(engine.submit(request(&engine, short)).unwrap());
        assert!(matches!(done, Some(Event::Done { .. })));
        let stats = engine.stats();
        assert_eq!(stats.cancelled, 1);
        assert!(stats.generated_tokens < 200, "{stats:?}");
    }

    #[test]
    fn full_queue_is_refused() {
        // One running, one waiting: everything else is refused.
        let engine = tiny_engine_with(EngineConfig {
            queue_capacity: 1,
            max_batch: 1,
            ..Default::default()
        });
        let params = SamplingParams {
            max_tokens: 200,
            temperature: 1.0,
            ..Default::default()
        };
        let mut receivers = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            match engine.submit(request(&engine, params.clone())) {
                Ok(rx) => receivers.push(rx),
                Err(SubmitError::QueueFull) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "a queue of one accepted 20 requests");
        // Everything accepted still completes.
        for rx in receivers {
            assert!(matches!(collect(rx).1, Some(Event::Done { .. })));
        }
    }
}
