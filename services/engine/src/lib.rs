//! The inference engine: everything that touches the model.
//!
//! The HTTP layer sees only [`EngineHandle`]: it renders a chat into prompt
//! token ids ([`EngineHandle::prepare_chat`]), submits a [`GenerateRequest`]
//! and reads [`Event`]s back. Candle, the tokenizer and the sampling code
//! stay behind that handle, so the engine's insides can change (batching,
//! new kernels) without the gateway noticing.

pub mod engine;
pub mod fast;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tiny;
pub mod tokenizer;
pub mod train_ops;

pub use engine::{
    Backend, EngineConfig, EngineHandle, EngineStats, Event, FinishReason, GenerateRequest,
    ModelInfo, SubmitError, TokenLogprob, TopLogprob,
};
pub use sampling::SamplingParams;
pub use template::ChatMessage;

/// Errors from loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file: {0}")]
    Load(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The device the engine runs on: the first CUDA GPU when built with the
/// `cuda` feature and one is present, the CPU otherwise.
pub fn device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = candle_core::Device::new_cuda(0) {
        return dev;
    }
    candle_core::Device::Cpu
}
