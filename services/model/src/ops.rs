//! The operations the forward pass is written in. [`Inference`] runs them
//! with candle's fused kernels (which have no gradients); the trainer
//! implements the same trait with differentiable ones and its adapters, so
//! the forward pass exists once and carries no mode flags.

use candle_core::{D, Device, Tensor};

use crate::Result;
use crate::config::Proj;

/// Which matrix a [`Ops::linear`] call multiplies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// A layer's projection.
    Proj(usize, Proj),
    /// The output projection (logits).
    Output,
}

/// The operations of a llama forward pass. Shapes: activations are
/// `(tokens, features)`; weights `(out, in)`; heads `(1, heads, tokens,
/// head_dim)`.
pub trait Ops {
    /// `x @ w^T`.
    fn linear(&self, x: &Tensor, w: &Tensor, site: Site) -> Result<Tensor>;

    /// RMS norm of each row, times `w`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor>;

    /// `(t, n * hd)` to `(1, n, t, hd)`, rotated by the interleaved rotary
    /// embedding when `rope` gives its `(t, hd / 2)` cosines and sines.
    fn split_heads(
        &self,
        x: &Tensor,
        n: usize,
        hd: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor>;

    /// `(1, n, t, hd)` back to `(t, n * hd)`.
    fn merge_heads(&self, x: &Tensor) -> Result<Tensor>;

    /// Attention weights from scores `(1, kv_heads, rep * t, keys)`:
    /// `softmax(scale * scores)` under the causal mask. Query heads sharing
    /// a key head are stacked along the rows, `t` rows each; row `r` is the
    /// query at position `offset + r % t` and sees keys `0..=` that.
    fn attention_weights(
        &self,
        scores: &Tensor,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> Result<Tensor>;

    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
}

/// The inference implementation: candle's fused kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inference;

impl Ops for Inference {
    fn linear(&self, x: &Tensor, w: &Tensor, _site: Site) -> Result<Tensor> {
        Ok(x.matmul(&w.t()?)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, eps)?)
    }

    fn split_heads(
        &self,
        x: &Tensor,
        n: usize,
        hd: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let heads = x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?;
        Ok(match rope {
            Some((cos, sin)) => candle_nn::rotary_emb::rope_i(&heads, cos, sin)?,
            None => heads,
        })
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (_, n, t, hd) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((t, n * hd))?)
    }

    fn attention_weights(
        &self,
        scores: &Tensor,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> Result<Tensor> {
        let mut att = (scores * scale)?;
        if t > 1 {
            let rows = scores.dim(2)?;
            att = att.broadcast_add(&causal_mask(rows, t, offset, scores.device())?)?;
        }
        Ok(candle_nn::ops::softmax_last_dim(&att)?)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }
}

/// Additive mask for `rows` query rows (`rows / t` stacked heads of `t`
/// positions after `offset` cached ones): `(rows, offset + t)`.
pub fn causal_mask(rows: usize, t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mut data = Vec::with_capacity(rows * total);
    for r in 0..rows {
        let i = r % t;
        data.extend((0..total).map(|j| {
            if j > offset + i {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        }));
    }
    Ok(Tensor::from_vec(data, (rows, total), device)?)
}

/// Log-softmax of a `(vocab,)` logits tensor, as a vector.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?)
}
