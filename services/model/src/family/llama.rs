//! Llama (and the models that share its layout: SmolLM2, Mistral's dense
//! models, ...): no biases, q and k rows permuted by llama.cpp's converter.

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
