//! A model as files and as a forward pass: one transformer (a llama, with
//! q/k/v biases where the family has them) that every supported family maps
//! onto.
//!
//! This crate owns reading a model ([`gguf`]: metadata and weights;
//! [`family`]: one file per architecture, how its files read;
//! [`config`]: hyper-parameters and the one table of projection names;
//! [`hf`]: Hugging Face folders, converted to GGUF at import;
//! [`tokenizer`]; [`template`]; [`ModelFiles::open`] for all of them at once)
//! and the candle forward pass ([`forward::Llama`]), written once over the
//! [`Ops`] trait: [`ops::Inference`] here runs candle's fused kernels, and
//! the trainer brings its own differentiable implementation. The serving
//! engine (`flywheel-engine`) and the trainer (`flywheel-trainer`) both
//! build on it.
//!
//! It knows nothing of serving (queues, batching, sampling), training
//! (gradients, adapters), the database or HTTP.

pub mod config;
pub mod family;
pub mod forward;
pub mod gguf;
pub mod hf;
pub mod ops;
pub mod rng;
pub mod template;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

mod files;

pub use config::{LlamaConfig, Proj};
pub use files::ModelFiles;
pub use forward::{KvCache, Llama};
pub use ops::{Ops, Site};
pub use template::{CHATML, ChatMessage, ChatTemplate};
pub use tokenizer::{IncrementalDecoder, Spelling, TextTokenizer};

/// Errors from reading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The context window a model file declares, if it is a GGUF file of a
/// supported family.
pub fn context_length(path: &std::path::Path) -> Option<i32> {
    let gguf = gguf::GgufFile::open(path).ok()?;
    LlamaConfig::from_gguf(&gguf)
        .ok()
        .map(|c| c.context_length as i32)
}

/// The device models run on: the first CUDA GPU when built with the `cuda`
/// feature and one is present, the CPU otherwise.
pub fn device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = candle_core::Device::new_cuda(0) {
        return dev;
    }
    candle_core::Device::Cpu
}
