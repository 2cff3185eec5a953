//! Fine-tuning LoRA adapters on llama-architecture models with candle
//! autograd, on the engine's own forward pass (`Llama::forward_logits`): SFT,
//! DPO against the frozen base, KTO on unpaired thumbs. Adapters are saved
//! and loaded in Hugging Face PEFT layout.

pub mod data;
pub mod lora;
pub mod merge;
pub mod peft;
pub mod train;

pub use data::{Base, Encoded, Example};
pub use lora::{Lora, LoraConfig};
pub use train::{Objective, StepLog, TrainConfig, Trainer};
