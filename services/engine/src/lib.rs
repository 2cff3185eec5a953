//! The serving engine: everything that runs the model for answers.
//!
//! The HTTP layer sees only [`EngineHandle`]: it renders a chat into prompt
//! token ids ([`EngineHandle::prepare_chat`]), submits a [`GenerateRequest`]
//! and reads [`Event`]s back. Behind it: the scheduler (continuous batching,
//! `scheduler`), the step-model trait (`step`) with our CPU kernels (`cpu`,
//! `kernels/`, one module per instruction set) and candle's forward for GPUs
//! (`candle`), sampling, constrained decoding for `response_format`
//! (`grammar`) and stop strings. Only the handle's types are
//! public. Reading the model (GGUF, tokenizer, template) and the reference
//! forward live in `flywheel-model`.
//!
//! The engine knows nothing of the database, HTTP or training.

mod adapter;
mod candle;
mod cpu;
mod grammar;
mod handle;
mod kernels;
mod memory;
mod prefix;
mod sampling;
mod scheduler;
mod step;
mod stop;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use adapter::{AdapterPair, AdapterWeights};
pub use flywheel_model::ChatMessage;
pub use grammar::Node as JsonShape;
pub use handle::EngineHandle;
pub use kernels::Simd;
pub use memory::{MemoryLimit, MemoryPlan, Size};
pub use sampling::{MIN_TEMPERATURE, SamplingParams};
pub use types::{
    AdapterId, Backend, EngineConfig, EngineStats, Event, FinishReason, GenerateRequest, ModelInfo,
    Quantize, Scheduling, SubmitError, TokenLogprob, TopLogprob,
};

/// Errors from loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] flywheel_model::ModelError),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model file: {0}")]
    Load(String),
    /// The model needs more memory than the engine may take.
    #[error("{0}")]
    DoesNotFit(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
