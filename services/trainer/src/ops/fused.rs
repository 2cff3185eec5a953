//! The training forward's operations, each one pass over memory with its
//! backward written out. Built from candle's element-wise ops, softmax, RMS
//! norm and rotary embedding take 5 to 10 passes forward and more backward,
//! each allocating a new tensor; candle's own fused versions have no
//! backward. CPU and f32 only: other devices use the composed versions.
//!
//! Every op here is checked against the composed formulation and against
//! finite differences (`tests` below, and the trainer's gradient test).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};
use flywheel_model::ops::Causal;
use rayon::prelude::*;

/// The input as a contiguous f32 slice.
fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Whether the fused ops apply to `x`.
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `x @ w^T` for a weight that is not trained: its backward passes the
/// gradient to `x` only. Candle's matmul backward also computes the
/// weight's gradient, a third of all training FLOPs, thrown away here.
pub struct FrozenLinear {
    pub w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, wk) = self.w.dims2()?;
        if k != wk {
            candle_core::bail!("frozen-linear: input has {k} columns, the weight {wk}");
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU");
        };
        // The gemm reads `w` transposed in place: no copy of either side.
        let out = storage.matmul(w, (1, m, n, k), layout, &w_layout.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// Attention weights: `softmax(scale * s + causal mask)` over the last
/// dimension of scores `s` (rows of `kv` keys). Row `r` belongs to query
/// position `r % t` (query heads that share a key head are stacked along
/// the rows, `t` rows each) and sees the keys [`Causal::keys`] gives: keys
/// `0..=offset + r % t`, or with `starts` (sequences packed behind a shared
/// prefix) the prefix and its own sequence.
pub struct CausalSoftmax {
    pub scale: f32,
    pub t: usize,
    pub offset: usize,
    pub starts: Option<Arc<[usize]>>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "train-causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "softmax")?;
        let kv = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let mask = Causal {
            t: self.t,
            offset: self.offset,
            starts: self.starts.as_deref(),
            window: None,
        };
        out.par_chunks_mut(kv)
            .zip(x.par_chunks(kv))
            .enumerate()
            .for_each(|(r, (y, x))| {
                let (a, b, c) = mask.keys(r);
                let (a, b, c) = (a.min(kv), b.min(kv), c.min(kv));
                let seen = || x[..a].iter().zip(0..a).chain(x[b..c].iter().zip(b..c));
                let max = seen().fold(f32::NEG_INFINITY, |m, (&v, _)| m.max(v * self.scale));
                let mut sum = 0f32;
                for (&x, j) in seen() {
                    y[j] = (x * self.scale - max).exp();
                    sum += y[j];
                }
                let inv = 1.0 / sum;
                y[..a].iter_mut().for_each(|y| *y *= inv);
                y[b..c].iter_mut().for_each(|y| *y *= inv);
                // Masked keys keep weight 0.
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = SoftmaxBackward { scale: self.scale };
        Ok(Some(grad.contiguous()?.apply_op2(&y.contiguous()?, back)?))
    }
}

/// The gradient of `softmax(scale * x)` from the output gradient `g` and
/// the output `y`: `scale * y * (g - sum(g * y))`, one pass per row.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "train-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, y) = (
            contiguous(gs, gl, "softmax backward")?,
            contiguous(ys, yl, "softmax backward")?,
        );
        let n = gl.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(n)
            .zip(g.par_chunks(n).zip(y.par_chunks(n)))
            .for_each(|(d, (g, y))| {
                let dot: f32 = g.iter().zip(y).map(|(g, y)| g * y).sum();
                for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
                    *d = self.scale * y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// A frozen projection with a LoRA pair on it, one node in the graph:
/// `y = x W^T + scale * (x A^T) B^T` for input `x (m, in)`, `A (r, in)`,
/// `B (out, r)`. The backward gives `x`, `A` and `B` their gradients (none
/// for `W`); done as separate ops, `x` would feed two branches whose
/// gradients candle sums in extra passes.
pub struct LoraLinear {
    pub w: Tensor,
    pub scale: f64,
}

/// `a @ b^T` on CPU storage (both 2-D and laid out as their layouts say).
fn matmul_t(
    a: &CpuStorage,
    al: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> candle_core::Result<Vec<f32>> {
    let (m, k) = al.shape().dims2()?;
    let (n, bk) = bl.shape().dims2()?;
    if k != bk {
        candle_core::bail!("lora-linear: inner sizes {k} and {bk}");
    }
    match a.matmul(b, (1, m, n, k), al, &bl.transpose(0, 1)?)? {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("lora-linear: f32 only"),
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "train-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let (n, r) = bl.shape().dims2()?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("lora-linear: the weight is not on the CPU");
        };
        let mut y = matmul_t(xs, xl, w, w_layout)?;
        let down = CpuStorage::F32(matmul_t(xs, xl, a_s, al)?);
        let up = matmul_t(&down, &Layout::contiguous((m, r)), bs, bl)?;
        let scale = self.scale as f32;
        y.par_iter_mut()
            .zip(up.par_iter())
            .for_each(|(y, u)| *y += scale * u);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Gradients carry no graph of their own (A and B are variables: a
        // gradient built from them would keep every step's graph alive).
        let (x, a, b, grad) = (&x.detach(), &a.detach(), &b.detach(), &grad.detach());
        let down = x.matmul(&a.t()?)?; // (m, r)
        let g_down = (grad.matmul(b)? * self.scale)?; // (m, r)
        let d_b = (grad.t()?.matmul(&down)? * self.scale)?; // (out, r)
        let d_a = g_down.t()?.matmul(x)?; // (r, in)
        let d_x = (grad.matmul(&self.w)? + g_down.matmul(a)?)?;
        Ok((Some(d_x), Some(d_a), Some(d_b)))
    }
}

/// The MLP's gate: `silu(gate) * up`, element-wise, one node. Its backward
/// gives `up` the gradient `g * silu(gate)` and `gate` the gradient
/// `g * up * silu'(gate)`, with `silu'(z) = s (1 + z (1 - s))`, `s = sigmoid(z)`.
pub struct SwiGlu;

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "train-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (contiguous(gs, gl, "swiglu")?, contiguous(us, ul, "swiglu")?);
        if gl.shape() != ul.shape() {
            candle_core::bail!("swiglu: {:?} against {:?}", gl.shape(), ul.shape());
        }
        let out: Vec<f32> = gate
            .par_iter()
            .zip(up.par_iter())
            .map(|(&z, &u)| z * sigmoid(z) * u)
            .collect();
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up, grad) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
        let (d_gate, d_up) = {
            let (gs, gl) = gate.storage_and_layout();
            let (us, ul) = up.storage_and_layout();
            let (ds, dl) = grad.storage_and_layout();
            let (Storage::Cpu(gs), Storage::Cpu(us), Storage::Cpu(ds)) = (&*gs, &*us, &*ds) else {
                candle_core::bail!("swiglu: CPU tensors only");
            };
            let (z, u, g) = (
                contiguous(gs, gl, "swiglu backward")?,
                contiguous(us, ul, "swiglu backward")?,
                contiguous(ds, dl, "swiglu backward")?,
            );
            let pairs: Vec<(f32, f32)> = z
                .par_iter()
                .zip(u.par_iter().zip(g.par_iter()))
                .map(|(&z, (&u, &g))| {
                    let s = sigmoid(z);
                    (g * u * s * (1.0 + z * (1.0 - s)), g * z * s)
                })
                .collect();
            let (d_gate, d_up): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            (d_gate, d_up)
        };
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(d_up, up.shape(), up.device())?),
        ))
    }
}

/// Between a projection's rows and attention heads, rotating on the way
/// if asked: `split` takes `(t, n*hd)` to `(1, n, t, hd)`, the other way
/// back. With `rope`, pairs `(2i, 2i+1)` at position `p` turn by the angle of
/// `(cos[p, i], sin[p, i])`, llama.cpp's interleaved order. One pass instead of a copy
/// for the transpose plus one for the rotation; the backward is the same
/// op the other way with the opposite angle.
pub struct Heads {
    pub n: usize,
    pub hd: usize,
    pub split: bool,
    pub rope: Option<(Tensor, Tensor)>,
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "train-heads"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "heads")?;
        let (n, hd) = (self.n, self.hd);
        let t = x.len() / (n * hd).max(1);
        let expected: Shape = if self.split {
            (t, n * hd).into()
        } else {
            (1, n, t, hd).into()
        };
        if layout.shape() != &expected {
            candle_core::bail!("heads: {:?}, expected {expected:?}", layout.shape());
        }
        let tables = match &self.rope {
            Some((c, s)) => Some((
                c.flatten_all()?.to_vec1::<f32>()?,
                s.flatten_all()?.to_vec1::<f32>()?,
            )),
            None => None,
        };
        if let Some((c, _)) = &tables
            && c.len() != t * hd / 2
        {
            candle_core::bail!(
                "heads: rope tables of {} for {t} positions of {hd}",
                c.len()
            );
        }
        // Moves one head's row at position p from `src` to `dst`.
        let place = |dst: &mut [f32], src: &[f32], p: usize| match &tables {
            Some((c, s)) => {
                let (c, s) = (&c[p * hd / 2..][..hd / 2], &s[p * hd / 2..][..hd / 2]);
                for i in 0..hd / 2 {
                    let (x0, x1) = (src[2 * i], src[2 * i + 1]);
                    dst[2 * i] = x0 * c[i] - x1 * s[i];
                    dst[2 * i + 1] = x0 * s[i] + x1 * c[i];
                }
            }
            None => dst.copy_from_slice(src),
        };
        let mut out = vec![0f32; x.len()];
        if self.split {
            // out (n, t, hd) <- x (t, n, hd)
            out.par_chunks_mut(t * hd).enumerate().for_each(|(h, dst)| {
                for p in 0..t {
                    place(&mut dst[p * hd..][..hd], &x[(p * n + h) * hd..][..hd], p);
                }
            });
        } else {
            // out (t, n, hd) <- x (n, t, hd)
            out.par_chunks_mut(n * hd).enumerate().for_each(|(p, dst)| {
                for h in 0..n {
                    place(&mut dst[h * hd..][..hd], &x[(h * t + p) * hd..][..hd], p);
                }
            });
        }
        let shape: Shape = if self.split {
            (1, n, t, hd).into()
        } else {
            (t, n * hd).into()
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Heads {
            n: self.n,
            hd: self.hd,
            split: !self.split,
            rope: match &self.rope {
                Some((c, s)) => Some((c.clone(), s.neg()?)),
                None => None,
            },
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// Log-probabilities of the target tokens: for logits `(n, vocab)` and
/// `targets[i]`, `log_softmax(logits[i])[targets[i]]`, shape `(n,)`. The
/// backward, `g_i * (onehot(targets[i]) - softmax(logits[i]))`, is one pass
/// over the logits; the composed version makes a dozen, each the size of
/// the vocabulary times the positions scored.
pub struct TargetLogProbs {
    pub targets: Vec<u32>,
}

impl CustomOp1 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "train-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "target log-probs")?;
        let (n, vocab) = layout.shape().dims2()?;
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!(
                "target log-probs: {} targets for {n} rows of {vocab}",
                self.targets.len()
            );
        }
        let out: Vec<f32> = x
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = TargetLogProbsBackward {
            targets: self.targets.clone(),
        };
        Ok(Some(x.contiguous()?.apply_op2(&grad.contiguous()?, back)?))
    }
}

/// `log(sum(exp(row)))`, summed in f64: a vocabulary is 50k terms.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| (v - max).exp() as f64).sum();
    max + sum.ln() as f32
}

struct TargetLogProbsBackward {
    targets: Vec<u32>,
}

impl CustomOp2 for TargetLogProbsBackward {
    fn name(&self) -> &'static str {
        "train-target-logprobs-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (
            contiguous(xs, xl, "target log-probs backward")?,
            contiguous(gs, gl, "target log-probs backward")?,
        );
        let (_, vocab) = xl.shape().dims2()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .for_each(|((d, row), (&g, &t))| {
                let lse = log_sum_exp(row);
                for (d, &v) in d.iter_mut().zip(row) {
                    *d = -g * (v - lse).exp();
                }
                d[t as usize] += g;
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// RMS norm over the last dimension with a frozen weight:
/// `y = x / sqrt(mean(x^2) + eps) * w`.
pub struct RmsNorm {
    pub w: Tensor,
    pub eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "rms-norm")?;
        let w = self.w.to_vec1::<f32>()?;
        let n = w.len();
        if layout.shape().dims().last() != Some(&n) {
            candle_core::bail!(
                "rms-norm: rows of {:?} against a weight of {n}",
                layout.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(y, x)| {
                let mean = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let inv = 1.0 / (mean + self.eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x * inv * w;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = RmsNormBackward {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(grad.contiguous()?.apply_op2(&x.contiguous()?, back)?))
    }
}

/// The gradient of [`RmsNorm`] from the output gradient `g` and the input
/// `x`: with `r = 1/rms(x)`, `dx = r g w - x r^3 mean(g w x)`, per row.
struct RmsNormBackward {
    w: Tensor,
    eps: f32,
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "train-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, x) = (
            contiguous(gs, gl, "rms-norm backward")?,
            contiguous(xs, xl, "rms-norm backward")?,
        );
        let w = self.w.to_vec1::<f32>()?;
        let n = w.len();
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(n)
            .zip(g.par_chunks(n).zip(x.par_chunks(n)))
            .for_each(|(d, (g, x))| {
                let mean = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let r = 1.0 / (mean + self.eps).sqrt();
                let dot = g
                    .iter()
                    .zip(x)
                    .zip(&w)
                    .map(|((g, x), w)| g * w * x)
                    .sum::<f32>()
                    / n as f32;
                let c = r * r * r * dot;
                for (((d, &g), &x), &w) in d.iter_mut().zip(g).zip(x).zip(&w) {
                    *d = r * g * w - x * c;
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Values and gradients (of a weighted sum, so every output counts
    /// differently) of `fused` and `composed` agree.
    fn same(x: &Tensor, fused: impl Fn(&Tensor) -> Tensor, composed: impl Fn(&Tensor) -> Tensor) {
        same_all(&[x], |v| fused(&v[0]), |v| composed(&v[0]));
    }

    /// [`same`] for an op of several inputs: every input's gradient agrees.
    fn same_all(
        inputs: &[&Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let vars = || -> Vec<Var> {
            inputs
                .iter()
                .map(|x| Var::from_tensor(x).unwrap())
                .collect()
        };
        let (v1, v2) = (vars(), vars());
        let as_tensors =
            |v: &[Var]| -> Vec<Tensor> { v.iter().map(|v| v.as_tensor().clone()).collect() };
        let (y1, y2) = (fused(&as_tensors(&v1)), composed(&as_tensors(&v2)));
        let d = max_diff(&y1, &y2);
        assert!(d < 1e-5, "values differ by {d}");
        let weights = t(&data(y1.elem_count(), 7), y1.dims());
        let backward = |y: Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (backward(y1), backward(y2));
        for (i, (a, b)) in v1.iter().zip(&v2).enumerate() {
            let d = max_diff(
                g1.get(a.as_tensor()).unwrap(),
                g2.get(b.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradients of input {i} differ by {d}");
        }
    }

    #[test]
    fn causal_softmax_matches_the_composed_version() {
        // 2 key heads, 3 query heads each stacked on 4 positions, 6 keys (2 cached).
        // Plainly causal after 2 cached keys; then three sequences of 2, 3
        // and 2 tokens packed behind the same 2 keys.
        let packed: Arc<[usize]> = Arc::from([0, 0, 2, 2, 2, 5, 5].as_slice());
        for (tq, starts) in [(4, None), (7, Some(packed))] {
            let (rep, offset) = (3, 2);
            let kv = offset + tq;
            let x = t(&data(2 * rep * tq * kv, 1), &[1, 2, rep * tq, kv]);
            let mask: Vec<f32> = (0..rep * tq)
                .flat_map(|r| {
                    let (i, starts) = (r % tq, starts.clone());
                    (0..kv).map(move |j| {
                        let start = offset + starts.as_ref().map_or(0, |s| s[i]);
                        if j > offset + i || (offset..start).contains(&j) {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = t(&mask, &[rep * tq, kv]);
            let op = || CausalSoftmax {
                scale: 0.125,
                t: tq,
                offset,
                starts: starts.clone(),
            };
            same(
                &x,
                |x| x.apply_op1(op()).unwrap(),
                |x| {
                    let s = (x * 0.125).unwrap().broadcast_add(&mask).unwrap();
                    let max = s.max_keepdim(candle_core::D::Minus1).unwrap().detach();
                    let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
                    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn rms_norm_matches_the_composed_version() {
        let x = t(&data(5 * 8, 2), &[5, 8]);
        let w = t(&data(8, 3), &[8]);
        let op = || RmsNorm {
            w: w.clone(),
            eps: 1e-5,
        };
        same(
            &x,
            |x| x.apply_op1(op()).unwrap(),
            |x| {
                let inv = (x
                    .sqr()
                    .unwrap()
                    .mean_keepdim(candle_core::D::Minus1)
                    .unwrap()
                    + 1e-5)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .recip()
                    .unwrap();
                x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap()
            },
        );
    }

    /// Interleaved rotary embedding from candle's differentiable ops, on
    /// `(1, h, t, hd)`.
    fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (_, h, tt, hd) = x.dims4().unwrap();
        let pairs = x.reshape((1, h, tt, hd / 2, 2)).unwrap();
        let x0 = pairs.narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
        let x1 = pairs.narrow(4, 1, 1).unwrap().squeeze(4).unwrap();
        let (c, s) = (
            cos.reshape((1, 1, tt, hd / 2)).unwrap(),
            sin.reshape((1, 1, tt, hd / 2)).unwrap(),
        );
        let r0 = (x0.broadcast_mul(&c).unwrap() - x1.broadcast_mul(&s).unwrap()).unwrap();
        let r1 = (x0.broadcast_mul(&s).unwrap() + x1.broadcast_mul(&c).unwrap()).unwrap();
        Tensor::stack(&[r0, r1], 4)
            .unwrap()
            .reshape((1, h, tt, hd))
            .unwrap()
    }

    #[test]
    fn target_log_probs_match_the_composed_version() {
        let x = t(&data(4 * 11, 8), &[4, 11]);
        let targets = vec![3u32, 0, 10, 7];
        let op = || TargetLogProbs {
            targets: targets.clone(),
        };
        same(
            &x,
            |x| x.apply_op1(op()).unwrap(),
            |x| {
                let max = x.max_keepdim(candle_core::D::Minus1).unwrap().detach();
                let s = x.broadcast_sub(&max).unwrap();
                let lz = s
                    .exp()
                    .unwrap()
                    .sum_keepdim(candle_core::D::Minus1)
                    .unwrap()
                    .log()
                    .unwrap();
                let logp = s.broadcast_sub(&lz).unwrap();
                let idx = Tensor::new(targets.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap();
                logp.gather(&idx, 1).unwrap().squeeze(1).unwrap()
            },
        );
        assert!(
            x.apply_op1(TargetLogProbs {
                targets: vec![11, 0, 0, 0]
            })
            .is_err()
        );
    }

    #[test]
    fn lora_linear_matches_the_composed_version() {
        let (m, k, n, r) = (6, 5, 4, 2);
        let x = t(&data(m * k, 9), &[m, k]);
        let w = t(&data(n * k, 10), &[n, k]);
        let a = t(&data(r * k, 11), &[r, k]);
        let b = t(&data(n * r, 12), &[n, r]);
        let op = || LoraLinear {
            w: w.clone(),
            scale: 1.5,
        };
        same_all(
            &[&x, &a, &b],
            |v| v[0].apply_op3(&v[1], &v[2], op()).unwrap(),
            |v| {
                let base = v[0].matmul(&w.t().unwrap()).unwrap();
                let down = v[0].matmul(&v[1].t().unwrap()).unwrap();
                let up = down.matmul(&v[2].t().unwrap()).unwrap();
                (base + (up * 1.5).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn swiglu_matches_the_composed_version() {
        let gate = t(&data(7 * 5, 14), &[7, 5]);
        let up = t(&data(7 * 5, 15), &[7, 5]);
        same_all(
            &[&gate, &up],
            |v| v[0].apply_op2(&v[1], SwiGlu).unwrap(),
            |v| (v[0].silu().unwrap() * &v[1]).unwrap(),
        );
    }

    #[test]
    fn heads_match_the_composed_layout_and_rotation() {
        let (tq, n, hd) = (5, 3, 4);
        let x = t(&data(tq * n * hd, 17), &[tq, n * hd]);
        let angles: Vec<f32> = (0..tq * hd / 2).map(|i| i as f32 * 0.29).collect();
        let cos = t(
            &angles.iter().map(|a| a.cos()).collect::<Vec<_>>(),
            &[tq, hd / 2],
        );
        let sin = t(
            &angles.iter().map(|a| a.sin()).collect::<Vec<_>>(),
            &[tq, hd / 2],
        );
        let split = |rope: bool| Heads {
            n,
            hd,
            split: true,
            rope: rope.then(|| (cos.clone(), sin.clone())),
        };
        let layout = |x: &Tensor| {
            x.reshape((1, tq, n, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        same(&x, |x| x.apply_op1(split(false)).unwrap(), layout);
        same(
            &x,
            |x| x.apply_op1(split(true)).unwrap(),
            |x| composed_rope(&layout(x), &cos, &sin),
        );
        // The rotation is candle's (and llama.cpp's) interleaved one.
        let reference = candle_nn::rotary_emb::rope_i(&layout(&x), &cos, &sin).unwrap();
        assert!(max_diff(&x.apply_op1(split(true)).unwrap(), &reference) < 1e-6);
        // Merging undoes splitting.
        let merge = Heads {
            n,
            hd,
            split: false,
            rope: None,
        };
        let back = x.apply_op1(split(false)).unwrap().apply_op1(merge).unwrap();
        assert_eq!(max_diff(&back, &x), 0.0);
    }

    #[test]
    fn frozen_linear_matches_matmul_and_passes_no_weight_gradient() {
        let x = t(&data(6 * 4, 5), &[6, 4]);
        let w = Var::from_tensor(&t(&data(3 * 4, 6), &[3, 4])).unwrap();
        let op = || FrozenLinear {
            w: w.as_tensor().clone(),
        };
        same(
            &x,
            |x| x.apply_op1(op()).unwrap(),
            |x| x.matmul(&w.as_tensor().t().unwrap()).unwrap(),
        );
        let v = Var::from_tensor(&x).unwrap();
        let grads = v
            .as_tensor()
            .apply_op1(op())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(w.as_tensor()).is_none());
    }
}
