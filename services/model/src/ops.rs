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
    /// `softmax(scale * scores)` under the causal `mask`, the scaled scores
    /// soft-capped first where `softcap` gives a cap (Gemma 2). Query
    /// heads sharing a key head are stacked along the rows, `t` rows each.
    fn attention_weights(
        &self,
        scores: &Tensor,
        scale: f64,
        softcap: Option<f32>,
        mask: Causal,
    ) -> Result<Tensor>;

    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// `gelu(gate) * up`, GELU's tanh approximation (Gemma), composed of
    /// candle's differentiable ops.
    fn geglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.gelu()? * up)?)
    }
}

/// `cap * tanh(x / cap)` of every element, composed of candle's
/// differentiable ops.
pub fn softcap(x: &Tensor, cap: f32) -> Result<Tensor> {
    let cap = f64::from(cap);
    Ok(((x / cap)?.tanh()? * cap)?)
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
        cap: Option<f32>,
        mask: Causal,
    ) -> Result<Tensor> {
        let mut att = (scores * scale)?;
        if let Some(cap) = cap {
            att = softcap(&att, cap)?;
        }
        if mask.t > 1 {
            let rows = scores.dim(2)?;
            att = att.broadcast_add(&mask.additive(rows, scores.device())?)?;
        }
        Ok(candle_nn::ops::softmax_last_dim(&att)?)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }
}

/// Which keys each of `t` query positions sees, after `offset` keys
/// already in the cache. Plainly, position `i` sees keys `0..=offset + i`.
/// With `starts`, the `t` positions are several sequences packed one after
/// another behind a prefix they share (the `offset` cached keys): position
/// `i` belongs to the sequence that starts at `starts[i]` and sees the
/// prefix and its own sequence up to itself, keys `0..offset` and
/// `offset + starts[i] ..= offset + i`.
#[derive(Debug, Clone, Copy)]
pub struct Causal<'a> {
    pub t: usize,
    pub offset: usize,
    pub starts: Option<&'a [usize]>,
}

impl Causal<'_> {
    /// The keys row `r` (query position `r % t`) sees: `0..a` and `b..c`,
    /// as `(a, b, c)`.
    pub fn keys(&self, r: usize) -> (usize, usize, usize) {
        let i = r % self.t.max(1);
        let start = self.starts.map_or(0, |s| s[i]);
        (self.offset, self.offset + start, self.offset + i + 1)
    }

    /// The mask as an additive `(rows, offset + t)` tensor (0 or -inf).
    pub fn additive(&self, rows: usize, device: &Device) -> Result<Tensor> {
        let total = self.offset + self.t;
        let mut data = Vec::with_capacity(rows * total);
        for r in 0..rows {
            let (a, b, c) = self.keys(r);
            data.extend((0..total).map(|j| {
                if j < a || (b..c).contains(&j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        Ok(Tensor::from_vec(data, (rows, total), device)?)
    }
}

/// Log-softmax of a `(vocab,)` logits tensor, as a vector.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?)
}
