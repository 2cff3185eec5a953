//! A llama-architecture transformer on candle tensors, weights from GGUF,
//! written once over [`Ops`]: [`Llama::forward`] serves with the inference
//! ops, [`Llama::logits`] takes any implementation (the trainer's).
//!
//! Our own forward pass rather than `candle_transformers::quantized_llama`:
//! we need f32 activations for correct answers on SmolLM2, and a KV cache
//! that belongs to each sequence rather than to the model.
//!
//! Layout notes: the forward pass computes q and k in the *interleaved*
//! order of rotary embeddings (pairs `(2i, 2i+1)` rotate together), which
//! is how llama GGUF files store them; families stored in Hugging Face's
//! order have their rows permuted at load ([`LlamaConfig::row_order`]).
//! Weights are `(out, in)`; activations are `(tokens, hidden)`.

use candle_core::{Device, Tensor};

use crate::config::{self, Activation, LlamaConfig, Proj};
use crate::family::Rope;
use crate::gguf::GgufFile;
use crate::ops::{Causal, Inference, Ops, Site};
use crate::{ModelError, Result};

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    /// q, k and v biases, in the families that have them.
    bias: Option<[Tensor; 3]>,
    /// The per-head norms of q and k, in the families that have them.
    qk_norm: Option<[Tensor; 2]>,
    /// The norms of the attention's and the feed-forward's outputs (Gemma 2).
    post_norms: Option<[Tensor; 2]>,
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
    rope: Rope,
    cos: Tensor,
    sin: Tensor,
    /// The sliding-window layers' own rotary embedding and tables (Gemma 3).
    local: Option<(Rope, Tensor, Tensor)>,
    device: Device,
}

/// Keys and values of one sequence, per layer: `(kv_heads, len, head_dim)`.
/// A clone shares the tensors (and, in training, their place in the
/// gradient graph): sequences that share a prefix continue from clones of
/// its cache.
#[derive(Default, Clone)]
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

impl Llama {
    /// Loads every weight from a GGUF file, dequantized to f32.
    pub fn load(gguf: &mut GgufFile, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        cfg.check_tensors(gguf)?;
        let embed = gguf.tensor_f32(config::TOKEN_EMBEDDING, device)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        // Rows as the forward pass computes in (see the module's notes).
        let order = |t: Tensor, p: Proj| -> Result<Tensor> {
            match cfg.row_order(p) {
                Some(order) => Ok(config::gather_rows(&t, &order)?),
                None => Ok(t),
            }
        };
        for i in 0..cfg.n_layers {
            let mut proj = |p: Proj| order(cfg.proj_qtensor(gguf, i, p)?.dequantize(device)?, p);
            let (wq, wk, wv, wo) = (
                proj(Proj::Q)?,
                proj(Proj::K)?,
                proj(Proj::V)?,
                proj(Proj::O)?,
            );
            let (w_gate, w_up, w_down) = (proj(Proj::Gate)?, proj(Proj::Up)?, proj(Proj::Down)?);
            // Biases and q/k norms, already in the computed order.
            let vectors = cfg.layer_vectors(gguf, i)?;
            let on_device = |v: &Vec<f32>| Tensor::new(v.as_slice(), device);
            let bias = match &vectors.qkv_bias {
                Some([q, k, v]) => Some([on_device(q)?, on_device(k)?, on_device(v)?]),
                None => None,
            };
            let qk_norm = match &vectors.qk_norm {
                Some([q, k]) => Some([on_device(q)?, on_device(k)?]),
                None => None,
            };
            let post_norms = match &vectors.post_norms {
                Some([a, f]) => Some([on_device(a)?, on_device(f)?]),
                None => None,
            };
            let mut norm = |n: &str| gguf.tensor_f32(&config::block_tensor(i, n), device);
            layers.push(Layer {
                attn_norm: norm(config::ATTN_NORM)?,
                ffn_norm: norm(config::FFN_NORM)?,
                wq,
                wk,
                wv,
                bias,
                qk_norm,
                post_norms,
                wo,
                w_gate,
                w_up,
                w_down,
            });
        }
        let norm = gguf.tensor_f32(config::OUTPUT_NORM, device)?;
        // Small models tie the output projection to the embedding.
        let lm_head = if gguf.has_tensor(config::OUTPUT) {
            gguf.tensor_f32(config::OUTPUT, device)?
        } else {
            embed.clone()
        };
        let rope = cfg.rope(gguf)?;
        let (cos, sin) = rope_tables(&rope, cfg.context_length, device)?;
        let local = match cfg.local_rope() {
            Some(r) => {
                let (cos, sin) = rope_tables(&r, cfg.context_length, device)?;
                Some((r, cos, sin))
            }
            None => None,
        };
        Ok(Self {
            rope,
            local,
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
        let hidden = self.hidden_states(&Inference, tokens, cache)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        let logits = self.capped(Inference.linear(&last, &self.lm_head, Site::Output)?)?;
        Ok(logits.squeeze(0)?)
    }

    /// The logits of positions `first..` of `tokens`, `(tokens - first,
    /// vocab)`, computed with `ops` from an empty cache: the training
    /// forward when `ops` is differentiable.
    pub fn logits(&self, ops: &impl Ops, tokens: &[u32], first: usize) -> Result<Tensor> {
        self.logits_after(ops, &mut self.new_cache(), tokens, first)
    }

    /// Runs `tokens` with `ops` from an empty cache and returns the cache:
    /// a prefix that several sequences share (a product's system prompt),
    /// run once and continued by each with [`Llama::logits_after`] on a
    /// clone. With differentiable `ops` the gradients of every continuation
    /// flow back through the one prefix.
    pub fn prefill(&self, ops: &impl Ops, tokens: &[u32]) -> Result<KvCache> {
        let mut cache = self.new_cache();
        self.hidden_states(ops, tokens, &mut cache)?;
        Ok(cache)
    }

    /// The logits of positions `first..` of `tokens`, which come after what
    /// `cache` holds (positions counted within `tokens`), computed with
    /// `ops`; `cache` grows by `tokens`.
    pub fn logits_after(
        &self,
        ops: &impl Ops,
        cache: &mut KvCache,
        tokens: &[u32],
        first: usize,
    ) -> Result<Tensor> {
        let mut out = self.logits_packed(ops, cache, &[(tokens, first)])?;
        Ok(out.remove(0))
    }

    /// The logits of several sequences that each continue what `cache`
    /// holds (a prefix they share), run as one packed batch: every weight
    /// matrix multiplies all their rows at once, and each sequence attends
    /// to the prefix and to itself only, at the positions it would have
    /// alone. `seqs` holds each sequence's tokens and the first position
    /// whose logits are wanted; one `(tokens - first, vocab)` tensor comes
    /// back per sequence. `cache` is left as it was.
    pub fn logits_packed(
        &self,
        ops: &impl Ops,
        cache: &KvCache,
        seqs: &[(&[u32], usize)],
    ) -> Result<Vec<Tensor>> {
        let mut tokens = Vec::new();
        let mut starts = Vec::new();
        for (seq, first) in seqs {
            if *first >= seq.len() {
                return Err(ModelError::Invalid(format!(
                    "no logits after position {first} of {}",
                    seq.len()
                )));
            }
            let start = tokens.len();
            tokens.extend_from_slice(seq);
            starts.extend(std::iter::repeat_n(start, seq.len()));
        }
        let packed = (seqs.len() > 1).then_some(starts.as_slice());
        let hidden = self.run(ops, &tokens, packed, &mut cache.clone())?;
        // The output projection is the largest matmul; only the positions
        // that are scored need it, all sequences' in one multiply.
        let mut rows = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for (seq, first) in seqs {
            rows.push(hidden.narrow(0, at + first, seq.len() - first)?);
            at += seq.len();
        }
        let logits = ops.linear(&Tensor::cat(&rows, 0)?, &self.lm_head, Site::Output)?;
        let logits = self.capped(logits)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for (seq, first) in seqs {
            out.push(logits.narrow(0, at, seq.len() - first)?);
            at += seq.len() - first;
        }
        Ok(out)
    }
    /// Logits soft-capped where the family caps them (Gemma 2).
    fn capped(&self, logits: Tensor) -> Result<Tensor> {
        match self.cfg.final_softcap {
            Some(cap) => crate::ops::softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Serves at most `n` positions (fewer than the model's context, to
    /// bound the memory its caches may take); more is refused as beyond
    /// the context.
    pub fn limit_context(&mut self, n: usize) -> Result<()> {
        if n < self.cfg.context_length {
            self.cfg.context_length = n;
            // Rebuilt, not cut: longrope's frequencies depend on the
            // context served.
            (self.cos, self.sin) = rope_tables(&self.rope, n, &self.device)?;
            if let Some((rope, cos, sin)) = &mut self.local {
                (*cos, *sin) = rope_tables(rope, n, &self.device)?;
            }
        }
        Ok(())
    }

    /// Bytes of weights held (f32), the tied output projection counted once.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.wq,
                    &l.wk,
                    &l.wv,
                    &l.wo,
                    &l.ffn_norm,
                    &l.w_gate,
                    &l.w_up,
                    &l.w_down,
                ]
                .iter()
                .map(|t| t.elem_count())
                .sum::<usize>()
                    + l.bias
                        .iter()
                        .flatten()
                        .chain(l.qk_norm.iter().flatten())
                        .chain(l.post_norms.iter().flatten())
                        .map(Tensor::elem_count)
                        .sum::<usize>()
            })
            .sum();
        let head = if self.lm_head.id() == self.embed.id() {
            0
        } else {
            self.lm_head.elem_count()
        };
        4 * (layers + self.embed.elem_count() + self.norm.elem_count() + head)
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

    fn hidden_states(&self, ops: &impl Ops, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.run(ops, tokens, None, cache)
    }

    /// The final hidden states of `tokens` after what `cache` holds, which
    /// grows by them. With `starts`, `tokens` are sequences packed one
    /// after another (token `i` belongs to the one starting at
    /// `starts[i]`), each at the positions it would have alone ([`Causal`]).
    fn run(
        &self,
        ops: &impl Ops,
        tokens: &[u32],
        starts: Option<&[usize]>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len;
        if t == 0 {
            return Err(ModelError::Invalid("no tokens to run".into()));
        }
        let positions: Option<Vec<u32>> =
            starts.map(|s| (0..t).map(|i| (pos + i - s[i]) as u32).collect());
        let last = positions
            .as_ref()
            .and_then(|p| p.iter().max())
            .map_or(pos + t, |&p| p as usize + 1);
        if last > self.cfg.context_length {
            return Err(ModelError::Invalid(format!(
                "{last} tokens exceed the context window of {}",
                self.cfg.context_length
            )));
        }
        if cache.layers.len() != self.cfg.n_layers {
            *cache = self.new_cache();
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = self.cfg.embed_scale {
            x = (x * f64::from(scale))?;
        }
        let at = |cos: &Tensor, sin: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok(match &positions {
                None => (cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?),
                Some(p) => {
                    let p = Tensor::new(p.as_slice(), &self.device)?;
                    (cos.index_select(&p, 0)?, sin.index_select(&p, 0)?)
                }
            })
        };
        let (cos, sin) = at(&self.cos, &self.sin)?;
        let local = match &self.local {
            Some((_, cos, sin)) => Some(at(cos, sin)?),
            None => None,
        };
        let rows = Rows {
            cos,
            sin,
            local,
            starts,
        };
        let eps = self.cfg.rms_eps;
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = ops.rms_norm(&x, &layer.attn_norm, eps)?;
            let mut attn = self.attention(ops, i, layer, &h, &rows, slot)?;
            if let Some([post, _]) = &layer.post_norms {
                attn = ops.rms_norm(&attn, post, eps)?;
            }
            x = (x + attn)?;
            let h = ops.rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = ops.linear(&h, &layer.w_gate, Site::Proj(i, Proj::Gate))?;
            let up = ops.linear(&h, &layer.w_up, Site::Proj(i, Proj::Up))?;
            let act = match self.cfg.activation {
                Activation::Silu => ops.swiglu(&gate, &up)?,
                Activation::GeluTanh => ops.geglu(&gate, &up)?,
            };
            let mut down = ops.linear(&act, &layer.w_down, Site::Proj(i, Proj::Down))?;
            if let Some([_, post]) = &layer.post_norms {
                down = ops.rms_norm(&down, post, eps)?;
            }
            x = (x + down)?;
        }
        cache.len += t;
        ops.rms_norm(&x, &self.norm, eps)
    }

    fn attention(
        &self,
        ops: &impl Ops,
        i: usize,
        layer: &Layer,
        h: &Tensor,
        rows: &Rows,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        // A sliding-window layer turns by its own tables where it has them.
        let window = self.cfg.window(i);
        let (cos, sin) = match (&rows.local, window) {
            (Some((cos, sin)), Some(_)) => (cos, sin),
            _ => (&rows.cos, &rows.sin),
        };
        let starts = rows.starts;
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim);
        // `which`: 0, 1, 2 for q, k, v (their biases' and norms' index).
        let heads =
            |w: &Tensor, which: usize, n: usize, proj: Proj, rope: bool| -> Result<Tensor> {
                let mut x = ops.linear(h, w, Site::Proj(i, proj))?;
                if let Some(bias) = &layer.bias {
                    x = x.broadcast_add(&bias[which])?;
                }
                if let (Some(norms), true) = (&layer.qk_norm, which < 2) {
                    // Each head of q or k normed on its own.
                    let rows =
                        ops.rms_norm(&x.reshape((t * n, hd))?, &norms[which], self.cfg.rms_eps)?;
                    x = rows.reshape((t, n * hd))?;
                }
                ops.split_heads(&x, n, hd, rope.then_some((cos, sin)))
            };
        let rotates = self.cfg.rotates(i);
        let q = heads(&layer.wq, 0, nh, Proj::Q, rotates)?;
        let k = heads(&layer.wk, 1, nkv, Proj::K, rotates)?;
        let v = heads(&layer.wv, 2, nkv, Proj::V, false)?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        // Grouped-query attention without copying keys: query heads that share
        // a kv head are stacked along the row axis, (1, nkv, rep*t, hd).
        let rep = nh / nkv;
        let q = q.reshape((1, nkv, rep * t, hd))?;
        let scale = f64::from(self.cfg.attn_scale);
        let scores = q.matmul(&k.t()?)?;
        // A window no key falls out of (fewer keys than it holds) masks
        // nothing: left out, so short sequences keep the fused attention.
        let keys = k.dim(2)?;
        let mask = Causal {
            t,
            offset: keys - t,
            starts,
            window: window.filter(|&w| w < keys),
        };
        let att = ops.attention_weights(&scores, scale, self.cfg.attn_softcap, mask)?;
        let out = att.matmul(&v)?.reshape((1, nh, t, hd))?;
        ops.linear(&ops.merge_heads(&out)?, &layer.wo, Site::Proj(i, Proj::O))
    }
}

/// What the attention of a run's rows needs besides the rows: their rotary
/// tables and, for packed sequences, where each row's sequence starts.
struct Rows<'a> {
    cos: Tensor,
    sin: Tensor,
    /// The sliding-window layers' own tables, where they have them.
    local: Option<(Tensor, Tensor)>,
    starts: Option<&'a [usize]>,
}

/// Cosines and sines of every position's angle for each rotary frequency
/// of a model serving `context` positions, `(context, head_dim / 2)`.
fn rope_tables(rope: &Rope, context: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = rope.tables(context);
    let half = cos.len() / context.max(1);
    Ok((
        Tensor::from_vec(cos, (context, half), device)?,
        Tensor::from_vec(sin, (context, half), device)?,
    ))
}
