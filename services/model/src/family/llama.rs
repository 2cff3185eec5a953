//! Llama (and the models llama.cpp converts as `llama`: SmolLM2, Llama 3,
//! ...): no biases, q and k rows permuted by llama.cpp's converter. Which
//! of them load also depends on their tokenizer (the `tokenizer` module's
//! mapped pre-tokenizers).

use super::Family;
use crate::config::RopeRows;

pub struct Llama;

impl Family for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Interleaved
    }
}
