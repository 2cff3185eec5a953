//! Phi-3 and Phi-3.5: llama's layer with q, k and v stored as one matrix
//! (`attn_qkv`, their rows one after another) and gate and up as one
//! (`ffn_up`, gate's rows first), their rows as Hugging Face stores them
//! (rotary embedding over halves). Phi-3.5's long-context scaling
//! ("longrope") comes as two tensors of per-frequency factors and an
//! attention factor ([`super::Rope`]); a sliding window caps the context
//! served (`phi3.attention.sliding_window`).

use super::Family;
use crate::config::RopeRows;

pub struct Phi3;

impl Family for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn fused(&self) -> bool {
        true
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Halves
    }
}
