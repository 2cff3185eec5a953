//! SmolLM3: llama's layout (q and k rows permuted by llama.cpp's converter)
//! and Llama 3's tokenizer, with no rotary embedding in every fourth layer
//! ("NoPE"): those layers attend by content alone. llama.cpp fixes the
//! step at 4 for this architecture and its files carry no key for it;
//! transformers' `no_rope_layers` gives the same pattern by default
//! (`no_rope_layer_interval` 4), and a folder with any other is refused at
//! conversion.

use super::Family;
use crate::config::RopeRows;

pub struct SmolLm3;

impl Family for SmolLm3 {
    fn name(&self) -> &'static str {
        "smollm3"
    }

    fn no_rope_step(&self) -> Option<usize> {
        Some(4)
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Interleaved
    }
}
