//! Fine-tuning LoRA adapters on llama-architecture models with candle
//! autograd, on the engine's own forward pass (`Llama::forward_logits`): SFT,
//! DPO against the frozen base, KTO on unpaired thumbs. Adapters are saved
//! and loaded in Hugging Face PEFT layout.

pub mod data;
pub mod lora;
pub mod merge;
pub mod optim;
pub mod peft;
pub mod train;

pub use data::{Base, Encoded, Example};
pub use lora::{Lora, LoraConfig};
pub use train::{Objective, StepLog, TrainConfig, Trainer};

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
