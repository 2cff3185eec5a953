//! Gemma 3: Gemma 2's layer (GELU on the gate, embeddings scaled by
//! `sqrt(hidden)`, norms on each sublayer's output, every norm stored with
//! Gemma's `1 +` added) without soft-caps, with an RMS norm on each head of
//! q and k, and sliding-window attention on five layers of every six
//! (`gemma3.attention.sliding_window` positions; the sixth attends to the
//! whole context). The local layers turn q and k by a rotary base of
//! 10,000, which llama.cpp fixes for the architecture; the global ones by
//! `gemma3.rope.freq_base` and its linear scaling (the 4B and larger).
//! Its q and k rows are stored as Hugging Face stores them.

use super::{Family, Shape};
use crate::config::RopeRows;

pub struct Gemma3;

impl Family for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn gemma(&self) -> bool {
        true
    }

    fn qk_norm(&self) -> bool {
        true
    }

    fn sliding(&self) -> Option<(usize, Option<f32>)> {
        Some((6, Some(10_000.0)))
    }

    /// `1 / sqrt(query_pre_attn_scalar)`: the head size, but
    /// `hidden / heads` in the 27B (62 layers), as llama.cpp tells them
    /// apart.
    fn attn_scale(&self, s: &Shape) -> Option<f32> {
        Some(super::gemma_query_scale(s, 62))
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Halves
    }
}
