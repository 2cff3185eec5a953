//! Fine-tuning LoRA adapters on llama-architecture models with candle
//! autograd, on the model crate's own forward pass (`Llama::logits`) run
//! with this crate's differentiable ops ([`ops::TrainOps`], the fused CPU
//! ops with written-out backwards): SFT, DPO against the frozen base, KTO on
//! unpaired thumbs. AdamW, the training loop ([`fit`]) shared by every caller,
//! adapters saved and loaded in Hugging Face PEFT layout, merging into GGUF.
//!
//! It knows nothing of the database, HTTP or serving: the job that records a
//! run (`flywheel-jobs`) and `flywheel train` both drive it.

pub mod data;
pub mod lora;
pub mod merge;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod prefix;
pub mod train;

pub use data::{Base, Encoded, Example};
pub use lora::{Lora, LoraConfig};
pub use train::{Control, Objective, Progress, StepLog, TrainConfig, Trainer, fit};

/// Lowers the calling thread's scheduling priority (Linux `nice`, 0-19), so
/// training yields the CPU to serving on a shared machine. Elsewhere a no-op.
/// Returns whether the priority changed.
#[allow(unsafe_code)]
pub fn lower_thread_priority(nice: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        // On Linux `setpriority(PRIO_PROCESS, 0, n)` applies to the calling
        // thread only. SAFETY: a plain syscall wrapper; no pointers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice.clamp(0, 19)) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        false
    }
}
