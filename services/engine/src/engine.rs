//! The inference thread and the handle the HTTP layer talks to.
//!
//! One thread owns the model and runs requests from a bounded queue; a full
//! queue is refused at once ([`SubmitError::QueueFull`], HTTP 429) rather
//! than letting latency grow without bound. Each request gets its own
//! channel of [`Event`]s; when the receiver is dropped (the client went
//! away) generation stops at the next token.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::sampling::{Sampler, SamplingParams, top_n};
use crate::stop::StopMatcher;
use crate::template::{CHATML, ChatMessage, ChatTemplate};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use crate::{EngineError, Result};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for the engine; one more is answered 429.
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { queue_capacity: 64 }
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
}

/// Running totals since the engine started, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub queued: usize,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub failed: u64,
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
        let model = Llama::load(&mut gguf, &crate::device())?;
        let info = ModelInfo {
            name: name.to_string(),
            context_length: model.config().context_length,
            vocab_size: model.config().vocab,
        };
        let shared = Arc::new(Shared {
            info,
            tokenizer,
            template,
            queued: AtomicUsize::new(0),
            stats: Counters::default(),
        });
        let (tx, rx) = sync_channel(cfg.queue_capacity);
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("flywheel-engine".into())
            .spawn(move || run(model, thread_shared, rx))
            .map_err(|e| EngineError::Load(format!("engine thread: {e}")))?;
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

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.shared.tokenizer.encode(text)
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

fn run(model: Llama, shared: Arc<Shared>, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        let stats = &shared.stats;
        if job.events.is_closed() {
            // The client left while the request was queued.
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match generate(&model, &shared, &job) {
            Ok(End::Finished(_)) => stats.finished.fetch_add(1, Ordering::Relaxed),
            Ok(End::Cancelled) => stats.cancelled.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::error!(error = %e, "generation failed");
                let _ = job.events.send(Event::Error(e.to_string()));
                stats.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Why generation ended, including the client leaving.
enum End {
    Finished(FinishReason),
    Cancelled,
}

fn generate(model: &Llama, shared: &Shared, job: &Job) -> Result<End> {
    let p = &job.req.params;
    let tok = &shared.tokenizer;
    let ctx = model.config().context_length;
    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&job.req.prompt_ids, &mut cache)?
        .to_vec1::<f32>()?;
    let mut sampler = Sampler::new(p.clone());
    let mut decoder = IncrementalDecoder::default();
    let mut stops = StopMatcher::new(p.stop.clone());
    let mut generated = 0usize;
    let send = |ev: Event| job.events.send(ev).is_ok();

    let end = loop {
        if job.events.is_closed() {
            break End::Cancelled;
        }
        let logprobs = p.logprobs.then(|| log_softmax(&logits));
        let next = sampler.sample(&mut logits);
        if tok.stop_ids.contains(&next) {
            break End::Finished(FinishReason::Stop);
        }
        generated += 1;
        shared
            .stats
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        let step = stops.push(&decoder.push(tok, next)?);
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
        if !send(Event::Delta {
            text: step.emit,
            logprobs,
        }) {
            break End::Cancelled;
        }
        if step.stopped {
            break End::Finished(FinishReason::Stop);
        }
        if generated >= p.max_tokens || cache.len() >= ctx {
            break End::Finished(FinishReason::Length);
        }
        logits = model.forward(&[next], &mut cache)?.to_vec1::<f32>()?;
    };
    if let End::Finished(reason) = &end {
        let reason = *reason;
        let rest = stops.flush();
        if !rest.is_empty() {
            send(Event::Delta {
                text: rest,
                logprobs: None,
            });
        }
        send(Event::Done {
            finish_reason: reason,
            prompt_tokens: job.req.prompt_ids.len(),
            completion_tokens: generated,
        });
    }
    Ok(end)
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
        let dir = std::env::temp_dir().join(format!("fw-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = tiny::write_tiny_model(&dir, 1).unwrap();
        EngineHandle::load(
            &path,
            "tiny",
            EngineConfig {
                queue_capacity: queue,
            },
        )
        .unwrap()
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
                // The random model may emit an end token early; if not it stops at 5.
                assert!(completion_tokens <= 5);
                if completion_tokens == 5 {
                    assert_eq!(finish_reason, FinishReason::Length);
                }
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
        let engine = tiny_engine(1);
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
