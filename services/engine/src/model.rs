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
        let hidden = self.hidden_states(tokens, cache)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        Ok(linear(&last, &self.lm_head)?.squeeze(0)?)
    }

    fn hidden_states(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
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
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps)?;
            let attn = self.attention(layer, &h, &cos, &sin, mask.as_ref(), slot)?;
            x = (x + attn)?;
            let h = ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps)?;
            let gate = linear(&h, &layer.w_gate)?.silu()?;
            let up = linear(&h, &layer.w_up)?;
            x = (x + linear(&(gate * up)?, &layer.w_down)?)?;
        }
        cache.len += t;
        Ok(ops::rms_norm(&x, &self.norm, self.cfg.rms_eps)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim());
        let heads = |w: &Tensor, n: usize| -> Result<Tensor> {
            // (t, n*hd) -> (1, n, t, hd)
            Ok(linear(h, w)?
                .reshape((1, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope_i(&heads(&layer.wq, nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(&layer.wk, nkv)?, cos, sin)?;
        let v = heads(&layer.wv, nkv)?;
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
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att.broadcast_add(mask)?;
        }
        let att = ops::softmax_last_dim(&att)?;
        let out = att.matmul(&v)?; // (1, nkv, rep*t, hd)
        let out = out
            .reshape((1, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((t, nh * hd))?;
        linear(&out, &layer.wo)
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
