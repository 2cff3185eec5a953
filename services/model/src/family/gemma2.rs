//! Gemma 2: llama's projections with GELU (tanh approximation) on the
//! gate, embeddings scaled by `sqrt(hidden)`, a norm on the attention's and
//! the feed-forward's outputs before each joins the residual
//! (`post_attention_norm`, `post_ffw_norm`; llama.cpp stores every norm's
//! weight with Gemma's `1 +` already added), soft-capped attention scores
//! and logits (`gemma2.attn_logit_softcapping`,
//! `gemma2.final_logit_softcapping`), and sliding-window attention on every
//! other layer (the first, third, ...: 4,096 of its 8,192 positions), the
//! others attending to the whole context. Its q and k rows are stored as
//! Hugging Face stores them.

use super::{Family, Shape};
use crate::config::RopeRows;

pub struct Gemma2;

impl Family for Gemma2 {
    fn name(&self) -> &'static str {
        "gemma2"
    }

    fn gemma(&self) -> bool {
        true
    }

    fn sliding(&self) -> Option<(usize, Option<f32>)> {
        Some((2, None))
    }

    /// Gemma 2 scales `q . k` by `1 / sqrt(query_pre_attn_scalar)`: the
    /// head size in the 2B and 9B, `hidden / heads` in the 27B (46 layers),
    /// as llama.cpp tells them apart.
    fn attn_scale(&self, s: &Shape) -> Option<f32> {
        Some(super::gemma_query_scale(s, 46))
    }

    fn gguf_rope_rows(&self) -> RopeRows {
        RopeRows::Halves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_scaled_as_each_size_was_trained() {
        let two_b = Shape {
            hidden: 2304,
            heads: 8,
            head_dim: 256,
            layers: 26,
        };
        assert_eq!(Gemma2.attn_scale(&two_b), Some(1.0 / 16.0));
        // The 27B: 4,608 over 32 heads is 144, its heads 128 wide.
        let big = Shape {
            hidden: 4608,
            heads: 32,
            head_dim: 128,
            layers: 46,
        };
        assert_eq!(Gemma2.attn_scale(&big), Some(1.0 / 12.0));
    }
}
