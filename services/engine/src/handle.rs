//! The engine's public face: [`EngineHandle`] and the types that cross it.
//! A handle loads a model, starts its engine thread ([`crate::scheduler`])
//! and feeds it through a bounded queue; a full queue is refused at once
//! ([`SubmitError::QueueFull`], HTTP 429) rather than letting latency grow
//! without bound. Each request gets its own channel of [`Event`]s; when the
//! receiver is dropped (the client went away) the sequence leaves the batch
//! at the next step.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use flywheel_model::{ChatMessage, ChatTemplate, ModelFiles, TextTokenizer};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::Result;
use crate::cpu::CpuLlama;
use crate::kernels::Simd;
use crate::sampling::SamplingParams;
use crate::scheduler::{Job, spawn};

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
    /// The widest instruction set the CPU kernels may use.
    pub simd: Simd,
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
            simd: Simd::Avx512,
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
    /// Bytes of weights held in memory (and read per step).
    pub weight_bytes: usize,
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

/// What the handle and the engine thread share.
pub(crate) struct Shared {
    pub info: ModelInfo,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub queued: AtomicUsize,
    pub stats: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub steps: AtomicU64,
    pub running: AtomicU64,
    pub last_batch: AtomicU64,
    pub ttft_micros: AtomicU64,
    pub ttft_count: AtomicU64,
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
        let files = ModelFiles::open(path)?;
        let ModelFiles {
            mut gguf,
            config,
            tokenizer,
            template,
            ..
        } = files;
        let mut info = ModelInfo {
            name: name.to_string(),
            context_length: config.context_length,
            vocab_size: config.vocab,
            weight_bytes: 0,
        };
        let (tx, rx) = sync_channel(cfg.queue_capacity);
        let device = flywheel_model::device();
        let shared = |info| {
            Arc::new(Shared {
                info,
                tokenizer,
                template,
                queued: AtomicUsize::new(0),
                stats: Counters::default(),
            })
        };
        let shared = if device.is_cpu() && cfg.backend == Backend::Auto {
            // Our kernels: quantized weights, batched steps.
            let model = CpuLlama::load(&mut gguf, cfg.threads, cfg.simd)?;
            info.weight_bytes = model.weight_bytes();
            let shared = shared(info);
            spawn(model, shared.clone(), cfg, rx)?;
            shared
        } else {
            // A GPU through candle: the reference forward on that device.
            let model = flywheel_model::Llama::load(&mut gguf, &device)?;
            info.weight_bytes = model.weight_bytes();
            let shared = shared(info);
            spawn(model, shared.clone(), cfg, rx)?;
            shared
        };
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
        Ok(self.shared.tokenizer.encode(&text)?)
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
