//! The types that cross the engine's handle: configuration, requests, the
//! events a generation streams back, statistics; and what the handle and
//! the engine thread share.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use flywheel_model::{ChatTemplate, TextTokenizer};

use crate::kernels::Simd;
use crate::sampling::SamplingParams;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for the engine; one more is answered 429.
    pub queue_capacity: usize,
    /// Requests one tenant (a team) may have waiting: past it that tenant
    /// is refused while the rest of the queue stays open to the others.
    pub queue_per_tenant: usize,
    /// How a free batch slot is given to a waiting request.
    pub scheduling: Scheduling,
    /// Sequences generating at once.
    pub max_batch: usize,
    /// Tokens per step, all sequences together: bounds how long one step
    /// (and so every running stream's next token) can take.
    pub max_batched_tokens: usize,
    /// How long a step should take while prompts are read (fair
    /// scheduling): the prompt tokens a step carries are cut or grown after
    /// each step to keep near it, so a stream's next token and a short
    /// prompt's first wait about this long beside a long prompt, not the
    /// time of a full-budget step at its length.
    pub step_target: std::time::Duration,
    /// Kernel threads; 0 means one per core.
    pub threads: usize,
    /// The widest instruction set the CPU kernels may use.
    pub simd: Simd,
    pub backend: Backend,
    /// Under a `response_format`, append the bytes the schema forces (keys,
    /// punctuation, the rest of an enum value) in one forward pass rather
    /// than one pass per token. The output is the same either way; off is
    /// the benchmark's baseline.
    pub jump_forward: bool,
    /// Greedy requests guess their next tokens from what came before (the
    /// prompt and the output so far: where the last few tokens appeared
    /// earlier, what followed them there) and check the guess in one
    /// forward pass, keeping what the model would have written anyway:
    /// the same text, fewer passes where the output repeats its input.
    /// Only while the batch is small (a big batch has no time to spare).
    pub speculative: bool,
    /// Bytes of finished requests' caches kept so that a prompt beginning
    /// like an earlier one starts from them ([`crate::prefix`]; 0: off).
    pub prefix_cache_bytes: usize,
    /// Positions served (prompt and answer together); 0: the model's own
    /// context. Longer models' keys and values take memory in proportion.
    pub max_context: usize,
    /// Bytes the engine may take ([`crate::memory`]); `None`: what the
    /// machine has available when it loads.
    pub memory_budget: Option<u64>,
    /// What the CPU kernels do with matrices stored in a type they do not
    /// compute on (F16, BF16, Q4_0, the K-quants): expand them to f32, or
    /// quantize them once at load into a type they do.
    pub quantize: Quantize,
}

/// How matrices of other types are held by the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// Expanded to f32: as exact as the file, 4 bytes a weight.
    #[default]
    Keep,
    /// Quantized to Q8_0 at load: 1.06 bytes a weight.
    Q8_0,
    /// Quantized to Q4_1 at load: 0.63 bytes a weight.
    Q4_1,
}

impl Quantize {
    /// The type matrices are quantized to; `None` for [`Quantize::Keep`].
    pub fn ggml_dtype(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::Keep => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "keep" => Ok(Self::Keep),
            "q8_0" => Ok(Self::Q8_0),
            "q4_1" => Ok(Self::Q4_1),
            other => Err(format!("{other:?} is not keep, q8_0 or q4_1")),
        }
    }
}

/// How the engine picks the next waiting request for a free batch slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// The tenant with the fewest sequences running, then the one served
    /// least recently, then the oldest request.
    #[default]
    Fair,
    /// First come, first served, whoever asks.
    Fifo,
}

impl std::str::FromStr for Scheduling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "fair" => Ok(Self::Fair),
            "fifo" => Ok(Self::Fifo),
            other => Err(format!("{other:?} is not fair or fifo")),
        }
    }
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
            queue_per_tenant: 32,
            scheduling: Scheduling::Fair,
            max_batch: 16,
            max_batched_tokens: 256,
            step_target: std::time::Duration::from_millis(500),
            threads: 0,
            simd: Simd::Avx512,
            backend: Backend::Auto,
            jump_forward: true,
            speculative: true,
            prefix_cache_bytes: 256 << 20,
            max_context: 0,
            memory_budget: None,
            quantize: Quantize::Keep,
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

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// A LoRA adapter added to the base weights for this request only
    /// ([`crate::EngineHandle::add_adapter`]).
    pub adapter: Option<AdapterId>,
    /// Who asks (the gateway: the team). Tenants share the queue and the
    /// batch fairly: each may hold at most `queue_per_tenant` of the queue,
    /// and a free batch slot goes to the waiting tenant with the fewest
    /// sequences running.
    pub tenant: u64,
}

/// An adapter loaded into an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub(crate) u64);

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
    /// The generation ran past its deadline (an upstream's answer took
    /// longer than its version allows); nothing more follows.
    TimedOut(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine queue is full")]
    QueueFull,
    /// The request's tenant holds its whole share of the queue.
    #[error("this tenant's share of the engine queue is full")]
    TenantQueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

impl Shared {
    pub fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the handle and the engine thread share.
pub(crate) struct Shared {
    pub info: ModelInfo,
    pub config: flywheel_model::LlamaConfig,
    /// Whether our CPU kernels serve (they alone apply adapters).
    pub kernels: bool,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Ends the assistant's turn.
    pub eos: u32,
    pub queued: std::sync::Mutex<Waiting>,
    pub stats: Counters,
    /// Adapters requests may name; a sequence keeps its own `Arc` while it
    /// runs, so removing one never disturbs a generation in flight.
    pub adapters: RwLock<HashMap<AdapterId, Arc<crate::adapter::Adapter>>>,
    pub next_adapter: AtomicU64,
    /// Every token's bytes, for constrained decoding (built on first use).
    pub token_bytes: std::sync::OnceLock<Vec<Option<Box<[u8]>>>>,
    /// Keys and values of one token, all layers ([`crate::MemoryPlan`]).
    pub kv_per_token: u64,
    /// Bytes the running sequences' keys and values may take together
    /// (what the memory limit leaves beside the weights, the tables and the
    /// prefix cache); `None`: not bounded.
    pub kv_budget: Option<u64>,
}

/// Requests submitted and not yet admitted to the batch: in all, and per
/// tenant.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    pub total: usize,
    pub by_tenant: HashMap<u64, usize>,
}

impl Waiting {
    /// Counts one more request of `tenant` if the queue and the tenant's
    /// share of it have room.
    pub fn enter(
        &mut self,
        tenant: u64,
        capacity: usize,
        per_tenant: usize,
    ) -> Result<(), SubmitError> {
        if self.total >= capacity {
            return Err(SubmitError::QueueFull);
        }
        let mine = self.by_tenant.entry(tenant).or_default();
        if *mine >= per_tenant.max(1) {
            return Err(SubmitError::TenantQueueFull);
        }
        *mine += 1;
        self.total += 1;
        Ok(())
    }

    /// One request of `tenant` left the queue (admitted, refused or abandoned).
    pub fn leave(&mut self, tenant: u64) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_tenant.get_mut(&tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_tenant.remove(&tenant);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens not read because an earlier request's cache began
    /// the same way.
    pub cached_prompt_tokens: AtomicU64,
    /// Tokens guessed ahead and checked (speculative decoding), and of
    /// them those the model wrote.
    pub draft_tokens: AtomicU64,
    pub draft_tokens_accepted: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub steps: AtomicU64,
    pub running: AtomicU64,
    pub last_batch: AtomicU64,
    /// The most sequences any step has run.
    pub peak_batch: AtomicU64,
    /// Times the next waiting request was held back because the running
    /// sequences' keys and values left no room for its own.
    pub held_for_memory: AtomicU64,
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
    /// The most sequences any step has run.
    pub peak_batch: u64,
    /// Times the next waiting request was held back for memory.
    pub held_for_memory: u64,
    pub steps: u64,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens taken from an earlier request's cache instead of read.
    pub cached_prompt_tokens: u64,
    /// Tokens guessed ahead and checked, and of them those the model wrote.
    pub draft_tokens: u64,
    pub draft_tokens_accepted: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Sum and count of times from admission to first token.
    pub ttft_micros: u64,
    pub ttft_count: u64,
}
