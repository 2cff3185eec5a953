//! Qwen3: Qwen2's layout without the biases, with an RMS norm on each head
//! of q and k before the rotary embedding, and a head size of its own
//! (`qwen3.attention.key_length`). Its q and k rows are stored as Hugging
//! Face stores them.

use super::Family;
use crate::config::RopeRows;

pub struct Qwen3;

impl Family for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn qk_norm(&self) -> bool {
        true
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Halves
    }
}
