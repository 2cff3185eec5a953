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
        if mask.masks() {
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
/// `offset + starts[i] ..= offset + i`. With `window`, only the keys fewer
/// than that many positions back of those ([`Causal::sees`]).
#[derive(Debug, Clone, Copy)]
pub struct Causal<'a> {
    pub t: usize,
    pub offset: usize,
    pub starts: Option<&'a [usize]>,
    /// A sliding-window layer's window: a query sees only the keys fewer
    /// than this many positions before its own (Gemma 3's local layers).
    pub window: Option<usize>,
}

impl Causal<'_> {
    /// The keys row `r` (query position `r % t`) sees before any window:
    /// `0..a` and `b..c`, as `(a, b, c)`.
    pub fn keys(&self, r: usize) -> (usize, usize, usize) {
        let i = r % self.t.max(1);
        let start = self.starts.map_or(0, |s| s[i]);
        (self.offset, self.offset + start, self.offset + i + 1)
    }

    /// Whether row `r` sees key `j`: causally, and within the window. A
    /// packed sequence's rows and keys are at the positions they would have
    /// alone; the shared prefix's keys at their own.
    pub fn sees(&self, r: usize, j: usize) -> bool {
        let (a, b, c) = self.keys(r);
        if !(j < a || (b..c).contains(&j)) {
            return false;
        }
        let Some(window) = self.window else {
            return true;
        };
        let start = b - a;
        let query = c - 1 - start;
        let key = if j < a { j } else { j - start };
        query - key < window
    }

    /// Whether anything is masked: several rows, or a window that old
    /// keys may fall out of even for one.
    pub fn masks(&self) -> bool {
        self.t > 1 || self.window.is_some()
    }

    /// The mask as an additive `(rows, offset + t)` tensor (0 or -inf).
    pub fn additive(&self, rows: usize, device: &Device) -> Result<Tensor> {
        let total = self.offset + self.t;
        let mut data = Vec::with_capacity(rows * total);
        for r in 0..rows {
            data.extend((0..total).map(|j| match self.sees(r, j) {
                true => 0.0,
                false => f32::NEG_INFINITY,
            }));
        }
        Ok(Tensor::from_vec(data, (rows, total), device)?)
    }
}

/// Log-softmax of a `(vocab,)` logits tensor, as a vector.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::Causal;

    fn seen(mask: &Causal, r: usize) -> Vec<usize> {
        (0..mask.offset + mask.t)
            .filter(|&j| mask.sees(r, j))
            .collect()
    }

    #[test]
    fn a_window_hides_keys_as_far_back_as_it_is_long() {
        // One sequence, 4 cached keys, 3 new rows at positions 4, 5, 6.
        let plain = Causal {
            t: 3,
            offset: 4,
            starts: None,
            window: None,
        };
        assert_eq!(seen(&plain, 2), [0, 1, 2, 3, 4, 5, 6]);
        let windowed = Causal {
            window: Some(3),
            ..plain
        };
        assert_eq!(seen(&windowed, 0), [2, 3, 4]);
        assert_eq!(seen(&windowed, 2), [4, 5, 6]);
        // One new row: the oldest keys fall out even with nothing to hide
        // causally.
        let step = Causal {
            t: 1,
            offset: 6,
            starts: None,
            window: Some(3),
        };
        assert!(
            step.masks()
                && !Causal {
                    window: None,
                    ..step
                }
                .masks()
        );
        assert_eq!(seen(&step, 0), [4, 5, 6]);
    }

    #[test]
    fn packed_sequences_see_their_window_at_the_positions_they_have_alone() {
        // A prefix of 3 keys (positions 0-2), then two sequences packed:
        // rows 0-1 (positions 3, 4) and rows 2-4 (positions 3, 4, 5),
        // keys 3-4 and 5-7.
        let starts = [0, 0, 2, 2, 2];
        let mask = Causal {
            t: 5,
            offset: 3,
            starts: Some(&starts),
            window: Some(3),
        };
        assert_eq!(seen(&mask, 1), [2, 3, 4]);
        assert_eq!(seen(&mask, 2), [1, 2, 5]);
        assert_eq!(seen(&mask, 4), [5, 6, 7]);
        let plain = Causal {
            window: None,
            ..mask
        };
        assert_eq!(seen(&plain, 4), [0, 1, 2, 5, 6, 7]);
    }
}
