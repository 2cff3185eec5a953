//! A llama-architecture transformer on candle tensors, weights from GGUF.
//!
//! Our own forward pass rather than `candle_transformers::quantized_llama`:
//! we need f32 activations for correct answers on SmolLM2, a KV cache that
//! belongs to each sequence rather than to the model, and (next) batched
//! sequences at different positions.
//!
//! Layout notes: GGUF stores q/k projections permuted for *interleaved*
//! rotary embeddings (pairs `(2i, 2i+1)` rotate together), so we use
//! `rope_i`. Weights are `(out, in)`; activations are `(tokens, hidden)`.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::ops;

use crate::Result;
use crate::gguf::GgufFile;
use crate::train_ops;

/// Hyper-parameters of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.n_heads
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// The model's weights; immutable once loaded and shared by all sequences.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Keys and values of one sequence, per layer: `(kv_heads, len, head_dim)`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `x @ w^T` for a `(tokens, in)` activation and an `(out, in)` weight.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// The projections of a layer that an adapter (LoRA) can add to, named as
/// PEFT's `target_modules` name them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Proj {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module's name in Hugging Face llama checkpoints (and PEFT).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
}

/// Something added to a projection's output: a LoRA adapter in training or
/// serving. `x` is the projection's input `(tokens, in)`; the result must be
/// `(tokens, out)`.
pub trait Adapter {
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>>;

    /// `(A, B, scale)` when `layer`'s `proj` delta is exactly
    /// `scale * x A^T B^T` (a LoRA pair without dropout): the training
    /// forward then computes it inside the frozen projection's op.
    fn low_rank(&self, _layer: usize, _proj: Proj) -> Option<(Tensor, Tensor, f64)> {
        None
    }
}

/// How a forward pass runs: fused candle kernels for inference, or ops
/// that all have gradients (candle's fused rms_norm, rope and softmax have
/// none) for training.
#[derive(Clone, Copy)]
struct Pass<'a> {
    adapter: Option<&'a dyn Adapter>,
    differentiable: bool,
}

/// A frozen projection for training: the custom op on the CPU, a plain
/// matmul elsewhere.
fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if train_ops::fused(x) {
        Ok(x.contiguous()?
            .apply_op1(train_ops::FrozenLinear { w: w.clone() })?)
    } else {
        linear(x, w)
    }
}

impl Pass<'_> {
    fn linear(&self, x: &Tensor, w: &Tensor, layer: usize, proj: Proj) -> Result<Tensor> {
        if self.differentiable
            && train_ops::fused(x)
            && let Some((a, b, scale)) = self.adapter.and_then(|a| a.low_rank(layer, proj))
        {
            let op = train_ops::LoraLinear {
                w: w.clone(),
                scale,
            };
            return Ok(x.contiguous()?.apply_op3(&a, &b, op)?);
        }
        let base = if self.differentiable {
            frozen_linear(x, w)?
        } else {
            linear(x, w)?
        };
        match self.adapter {
            Some(a) => match a.delta(layer, proj, x)? {
                Some(d) => Ok((base + d)?),
                None => Ok(base),
            },
            None => Ok(base),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if !self.differentiable {
            return Ok(ops::rms_norm(x, w, eps)?);
        }
        if train_ops::fused(x) {
            let op = train_ops::RmsNorm { w: w.clone(), eps };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
    }

    /// Interleaved rotary embedding on `(1, heads, t, hd)`: pairs
    /// `(2i, 2i+1)` rotate by the position's angle `i`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if !self.differentiable {
            return Ok(candle_nn::rotary_emb::rope_i(x, cos, sin)?);
        }
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

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        if !self.differentiable {
            return Ok(ops::softmax_last_dim(x)?);
        }
        // Softmax does not change when a constant is subtracted, so the
        // max needs no gradient.
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }
}

impl Llama {
    /// Loads every weight from a GGUF file, dequantized to f32.
    pub fn load(gguf: &mut GgufFile, device: &Device) -> Result<Self> {
        let cfg = gguf.llama_config()?;
        let embed = gguf.tensor_f32("token_embd.weight", device)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut t = |name: &str| gguf.tensor_f32(&format!("blk.{i}.{name}.weight"), device);
            layers.push(Layer {
                attn_norm: t("attn_norm")?,
                wq: t("attn_q")?,
                wk: t("attn_k")?,
                wv: t("attn_v")?,
                wo: t("attn_output")?,
                ffn_norm: t("ffn_norm")?,
                w_gate: t("ffn_gate")?,
                w_up: t("ffn_up")?,
                w_down: t("ffn_down")?,
            });
        }
        let norm = gguf.tensor_f32("output_norm.weight", device)?;
        // Small models tie the output projection to the embedding.
        let lm_head = if gguf.has_tensor("output.weight") {
            gguf.tensor_f32("output.weight", device)?
        } else {
            embed.clone()
        };
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.cfg.n_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Runs `tokens` (appended after what `cache` holds) through the model
    /// and returns the logits of the last position as a `(vocab,)` tensor.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let pass = Pass {
            adapter: None,
            differentiable: false,
        };
        let hidden = self.hidden_states(tokens, cache, pass)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        Ok(linear(&last, &self.lm_head)?.squeeze(0)?)
    }

    /// The logits of positions `first..` of `tokens`, `(tokens - first,
    /// vocab)`, with `adapter` added to the projections and every op
    /// differentiable: the training forward. Gradients flow to whatever
    /// variables the adapter holds; the base weights are constants.
    pub fn forward_logits(
        &self,
        tokens: &[u32],
        first: usize,
        adapter: Option<&dyn Adapter>,
    ) -> Result<Tensor> {
        if first >= tokens.len() {
            return Err(crate::EngineError::Invalid(format!(
                "no logits after position {first} of {}",
                tokens.len()
            )));
        }
        let pass = Pass {
            adapter,
            differentiable: true,
        };
        let hidden = self.hidden_states(tokens, &mut self.new_cache(), pass)?;
        // The output projection is the largest matmul; only the positions
        // that are scored need it.
        let hidden = hidden.narrow(0, first, tokens.len() - first)?;
        frozen_linear(&hidden, &self.lm_head)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A base weight as the forward uses it, `(out, in)`.
    pub fn weight(&self, layer: usize, proj: Proj) -> &Tensor {
        let l = &self.layers[layer];
        match proj {
            Proj::Q => &l.wq,
            Proj::K => &l.wk,
            Proj::V => &l.wv,
            Proj::O => &l.wo,
            Proj::Gate => &l.w_gate,
            Proj::Up => &l.w_up,
            Proj::Down => &l.w_down,
        }
    }

    fn hidden_states(&self, tokens: &[u32], cache: &mut KvCache, pass: Pass) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len;
        if t == 0 {
            return Err(crate::EngineError::Invalid("no tokens to run".into()));
        }
        if pos + t > self.cfg.context_length {
            return Err(crate::EngineError::Invalid(format!(
                "{} tokens exceed the context window of {}",
                pos + t,
                self.cfg.context_length
            )));
        }
        if cache.layers.len() != self.cfg.n_layers {
            *cache = self.new_cache();
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = causal_mask(t, pos, self.cfg.n_heads / self.cfg.n_kv_heads, &self.device)?;
        let eps = self.cfg.rms_eps;
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = pass.rms_norm(&x, &layer.attn_norm, eps)?;
            let attn = self.attention(i, layer, &h, &cos, &sin, mask.as_ref(), slot, pass)?;
            x = (x + attn)?;
            let h = pass.rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = pass.linear(&h, &layer.w_gate, i, Proj::Gate)?;
            let up = pass.linear(&h, &layer.w_up, i, Proj::Up)?;
            let act = if pass.differentiable && train_ops::fused(&gate) {
                gate.contiguous()?
                    .apply_op2(&up.contiguous()?, train_ops::SwiGlu)?
            } else {
                (gate.silu()? * up)?
            };
            x = (x + pass.linear(&act, &layer.w_down, i, Proj::Down)?)?;
        }
        cache.len += t;
        pass.rms_norm(&x, &self.norm, eps)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
        pass: Pass,
    ) -> Result<Tensor> {
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim());
        let heads = |w: &Tensor, n: usize, proj: Proj| -> Result<Tensor> {
            // (t, n*hd) -> (1, n, t, hd)
            Ok(pass
                .linear(h, w, i, proj)?
                .reshape((1, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let fused = pass.differentiable && train_ops::fused(h);
        // Training: the head layout and the rotation in one op.
        let split = |w: &Tensor, n: usize, proj: Proj, rope: bool| -> Result<Tensor> {
            let op = train_ops::Heads {
                n,
                hd,
                split: true,
                rope: rope.then(|| (cos.clone(), sin.clone())),
            };
            Ok(pass.linear(h, w, i, proj)?.contiguous()?.apply_op1(op)?)
        };
        let (q, k, v) = if fused {
            (
                split(&layer.wq, nh, Proj::Q, true)?,
                split(&layer.wk, nkv, Proj::K, true)?,
                split(&layer.wv, nkv, Proj::V, false)?,
            )
        } else {
            (
                pass.rope(&heads(&layer.wq, nh, Proj::Q)?, cos, sin)?,
                pass.rope(&heads(&layer.wk, nkv, Proj::K)?, cos, sin)?,
                heads(&layer.wv, nkv, Proj::V)?,
            )
        };
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        // Grouped-query attention without copying keys: query heads that share
        // a kv head are stacked along the row axis, (1, nkv, rep*t, hd).
        let rep = nh / nkv;
        let q = q.reshape((1, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?)?;
        let att = if pass.differentiable && train_ops::fused(&scores) {
            // Scale, mask and softmax in one pass, forward and backward.
            let op = train_ops::CausalSoftmax {
                scale: scale as f32,
                t,
                offset: k.dim(2)? - t,
            };
            scores.apply_op1(op)?
        } else {
            let mut att = (scores * scale)?;
            if let Some(mask) = mask {
                att = att.broadcast_add(mask)?;
            }
            pass.softmax(&att)?
        };
        let out = att.matmul(&v)?; // (1, nkv, rep*t, hd)
        let out = out.reshape((1, nh, t, hd))?;
        let out = if fused {
            let op = train_ops::Heads {
                n: nh,
                hd,
                split: false,
                rope: None,
            };
            out.contiguous()?.apply_op1(op)?
        } else {
            out.transpose(1, 2)?.reshape((t, nh * hd))?
        };
        pass.linear(&out, &layer.wo, i, Proj::O)
    }
}

/// Additive mask for `t` new queries after `pos` cached positions, repeated
/// for the `rep` query heads stacked per kv head: `(rep*t, pos+t)`.
fn causal_mask(t: usize, pos: usize, rep: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let total = pos + t;
    let mut data = Vec::with_capacity(rep * t * total);
    for _ in 0..rep {
        for i in 0..t {
            data.extend((0..total).map(|j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Ok(Some(Tensor::from_vec(data, (rep * t, total), device)?))
}

fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim() / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim() as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let freqs = positions.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Log-softmax of a `(vocab,)` logits tensor, as a vector.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?)
}
