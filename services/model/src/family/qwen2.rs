//! Qwen2 and Qwen2.5: llama's layout plus biases on q, k and v; llama.cpp
//! stores its q and k rows as Hugging Face does (rotary embedding over
//! halves, "neox" style).

use super::Family;
use crate::config::RopeRows;

pub struct Qwen2;

impl Family for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn qkv_bias(&self) -> bool {
        true
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Halves
    }
}
