//! The trainer's implementation of the model's [`Ops`]: every operation
//! differentiable, the base weights frozen, and the LoRA adapter applied
//! inside the projections it targets. On the CPU each op is one of the fused
//! ops with a written-out backward in [`fused`]; elsewhere (a GPU) the same
//! maths composed from candle's differentiable ops.

pub mod fused;

use candle_core::{D, Tensor};
use flywheel_model::ops::{Causal, Site};
use flywheel_model::{Ops, Result};

use crate::lora::Lora;

/// Differentiable ops, with `lora` (if any) added to the projections.
#[derive(Clone, Copy, Default)]
pub struct TrainOps<'a> {
    lora: Option<&'a Lora>,
}

impl<'a> TrainOps<'a> {
    pub fn new(lora: Option<&'a Lora>) -> Self {
        Self { lora }
    }
}

/// `x @ w^T` for a weight that is not trained.
fn frozen(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused::fused(x) {
        Ok(x.contiguous()?
            .apply_op1(fused::FrozenLinear { w: w.clone() })?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

impl Ops for TrainOps<'_> {
    fn linear(&self, x: &Tensor, w: &Tensor, site: Site) -> Result<Tensor> {
        let (Site::Proj(layer, proj), Some(lora)) = (site, self.lora) else {
            return frozen(x, w);
        };
        if fused::fused(x)
            && let Some((a, b, scale)) = lora.low_rank(layer, proj)
        {
            let op = fused::LoraLinear {
                w: w.clone(),
                scale,
            };
            return Ok(x.contiguous()?.apply_op3(&a, &b, op)?);
        }
        let base = frozen(x, w)?;
        match lora.delta(layer, proj, x)? {
            Some(d) => Ok((base + d)?),
            None => Ok(base),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if fused::fused(x) {
            let op = fused::RmsNorm { w: w.clone(), eps };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
    }

    fn split_heads(
        &self,
        x: &Tensor,
        n: usize,
        hd: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        if fused::fused(x) {
            // The head layout and the rotation in one op.
            let op = fused::Heads {
                n,
                hd,
                split: true,
                rope: rope.map(|(c, s)| (c.clone(), s.clone())),
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        let (t, _) = x.dims2()?;
        let heads = x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?;
        match rope {
            Some((cos, sin)) => rope_composed(&heads, cos, sin),
            None => Ok(heads),
        }
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (_, n, t, hd) = x.dims4()?;
        if fused::fused(x) {
            let op = fused::Heads {
                n,
                hd,
                split: false,
                rope: None,
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        Ok(x.transpose(1, 2)?.reshape((t, n * hd))?)
    }

    fn attention_weights(
        &self,
        scores: &Tensor,
        scale: f64,
        cap: Option<f32>,
        mask: Causal,
    ) -> Result<Tensor> {
        // The fused op has no soft-cap and no window: capped scores (Gemma
        // 2) and sliding-window layers (Gemma 3) take the composed path.
        if fused::fused(scores) && cap.is_none() && mask.window.is_none() {
            // Scale, mask and softmax in one pass, forward and backward.
            let op = fused::CausalSoftmax {
                scale: scale as f32,
                t: mask.t,
                offset: mask.offset,
                starts: mask.starts.map(Into::into),
            };
            return Ok(scores.apply_op1(op)?);
        }
        let mut att = (scores * scale)?;
        if let Some(cap) = cap {
            att = flywheel_model::ops::softcap(&att, cap)?;
        }
        if mask.masks() {
            att = att.broadcast_add(&mask.additive(scores.dim(2)?, scores.device())?)?;
        }
        // Softmax does not change when a constant is subtracted, so the
        // max needs no gradient.
        let max = att.max_keepdim(D::Minus1)?.detach();
        let e = att.broadcast_sub(&max)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if fused::fused(gate) {
            return Ok(gate
                .contiguous()?
                .apply_op2(&up.contiguous()?, fused::SwiGlu)?);
        }
        Ok((gate.silu()? * up)?)
    }
}

/// Interleaved rotary embedding on `(1, heads, t, hd)` from differentiable
/// ops: pairs `(2i, 2i+1)` rotate by the position's angle `i`.
fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let pairs = x.reshape((b, h, t, hd / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
    let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let (cos, sin) = (
        cos.reshape((1, 1, t, hd / 2))?,
        sin.reshape((1, 1, t, hd / 2))?,
    );
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok(Tensor::stack(&[r0, r1], 4)?.reshape((b, h, t, hd))?)
}
