//! The serving forward pass on the CPU: our llama on quantized-weight
//! kernels, run over a batch of sequences at different positions.
//!
//! A step takes any mix of sequences and token counts: prompt chunks
//! (prefill) and single tokens (decode). All their rows go through each
//! weight matrix together, so every pass over the weights is shared;
//! attention is per sequence, against that sequence's own KV cache.
//!
//! The candle forward in `flywheel_model` is the reference this one is
//! tested against (and what training differentiates through).

use flywheel_model::config::{self, Activation, LlamaConfig, Proj};
use flywheel_model::family::Rope;
use flywheel_model::gguf::GgufFile;
use rayon::prelude::*;

use crate::adapter::{Adapter, proj_index};
use crate::kernels::{QMatrix, Simd, axpy, dot};
use crate::step::{BatchItem, StepModel};
use crate::types::Quantize;
use crate::{EngineError, Result};

struct Layer {
    attn_norm: Vec<f32>,
    /// `attn_q`, `attn_k`, `attn_v` stacked: one pass for all three.
    wqkv: QMatrix,
    /// Their biases, stacked the same way, in the families that have them.
    bqkv: Option<Vec<f32>>,
    /// The per-head norms of q and k, in the families that have them.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The norms of the attention's and the feed-forward's outputs (Gemma 2).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    /// `ffn_gate` and `ffn_up` stacked.
    w_gate_up: QMatrix,
    w_down: QMatrix,
}

impl Layer {
    /// Bytes of the layer's matrices as held.
    fn matrix_bytes(&self) -> usize {
        self.wqkv.weight_bytes()
            + self.wo.weight_bytes()
            + self.w_gate_up.weight_bytes()
            + self.w_down.weight_bytes()
    }
}

pub struct CpuLlama {
    cfg: LlamaConfig,
    embed: QMatrix,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<QMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// The rotary embedding, whose tables follow the context served.
    rope: Rope,
    /// `[position][head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The sliding-window layers' own rotary embedding and tables (Gemma 3).
    local: Option<(Rope, Vec<f32>, Vec<f32>)>,
    pool: rayon::ThreadPool,
    simd: Simd,
}

/// Keys and values of one sequence: per layer `[position][kv_heads * head_dim]`.
#[derive(Debug, Default)]
pub struct SeqCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

#[allow(clippy::len_without_is_empty)]
impl SeqCache {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Keeps the first `n` positions.
    fn truncate(&mut self, n: usize) {
        if n >= self.len {
            return;
        }
        let row = |l: &Vec<f32>| l.len() / self.len;
        let (k, v) = (
            self.k.iter().map(row).collect::<Vec<_>>(),
            self.v.iter().map(row).collect::<Vec<_>>(),
        );
        for (l, w) in self.k.iter_mut().zip(k) {
            l.truncate(w * n);
        }
        for (l, w) in self.v.iter_mut().zip(v) {
            l.truncate(w * n);
        }
        self.len = n;
    }

    /// A copy of the first `n` positions (`None` past the end).
    fn prefix(&self, n: usize) -> Option<SeqCache> {
        if n > self.len {
            return None;
        }
        let rows = |layers: &[Vec<f32>]| -> Vec<Vec<f32>> {
            layers
                .iter()
                .map(|l| l[..l.len() / self.len.max(1) * n].to_vec())
                .collect()
        };
        Some(SeqCache {
            k: rows(&self.k),
            v: rows(&self.v),
            len: n,
        })
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * w;
    }
}

/// Makes room for `add` more values in a cache that will never hold more
/// than `most`: doubling, as a vector grows, but never past `most`, so a
/// sequence's cache takes at most what the memory plan counts for it.
fn grow_within(cache: &mut Vec<f32>, add: usize, most: usize) {
    let want = cache.len() + add;
    if want > cache.capacity() {
        let target = (cache.capacity() * 2).min(most).max(want);
        cache.reserve_exact(target - cache.len());
    }
}

fn vec_of(gguf: &mut GgufFile, name: &str) -> Result<Vec<f32>> {
    Ok(gguf
        .tensor_f32(name, &candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl StepModel for CpuLlama {
    type Cache = SeqCache;
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn new_cache(&self) -> SeqCache {
        CpuLlama::new_cache(self)
    }
    fn cache_len(cache: &SeqCache) -> usize {
        cache.len()
    }
    fn step(&self, items: &mut [BatchItem<'_, SeqCache>]) -> Result<Vec<Option<Vec<f32>>>> {
        CpuLlama::step(self, items)
    }
    fn cache_prefix(cache: &SeqCache, n: usize) -> Option<SeqCache> {
        cache.prefix(n)
    }
    fn verifies(&self) -> bool {
        true
    }
    fn truncate_cache(cache: &mut SeqCache, n: usize) {
        cache.truncate(n);
    }
    fn cache_bytes(cache: &SeqCache) -> usize {
        let floats: usize = cache.k.iter().chain(&cache.v).map(Vec::capacity).sum();
        floats * std::mem::size_of::<f32>()
    }
}

impl CpuLlama {
    /// Loads the weights in their stored formats; `threads` sizes the pool
    /// the kernels run on (0 = one per core), `simd` caps their instruction set.
    #[cfg(test)]
    pub fn load(gguf: &mut GgufFile, threads: usize, simd: Simd) -> Result<Self> {
        Self::load_as(gguf, threads, simd, Quantize::Keep)
    }

    /// [`load`](Self::load), matrices of types without a kernel quantized
    /// as `quantize` says.
    pub fn load_as(
        gguf: &mut GgufFile,
        threads: usize,
        simd: Simd,
        quantize: Quantize,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        cfg.check_tensors(gguf)?;
        let to = quantize.ggml_dtype();
        let mat = |gguf: &mut GgufFile, name: &str| -> Result<QMatrix> {
            QMatrix::from_qtensor_as(&gguf.qtensor(name)?, to)
        };
        let embed = mat(gguf, config::TOKEN_EMBEDDING)?;
        let lm_head = match gguf.has_tensor(config::OUTPUT) {
            true => Some(mat(gguf, config::OUTPUT)?),
            false => None,
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            // q and k in the interleaved order the rotary code computes in.
            let mut proj = |p: Proj| {
                let m = QMatrix::from_qtensor_as(&cfg.proj_qtensor(gguf, i, p)?, to)?;
                match cfg.row_order(p) {
                    Some(order) => m.permute_rows(&order),
                    None => Ok(m),
                }
            };
            let wqkv = QMatrix::stack(vec![proj(Proj::Q)?, proj(Proj::K)?, proj(Proj::V)?])?;
            let wo = proj(Proj::O)?;
            let w_gate_up = QMatrix::stack(vec![proj(Proj::Gate)?, proj(Proj::Up)?])?;
            let w_down = proj(Proj::Down)?;
            // Biases stacked as the projections are; q/k norms per head.
            let vectors = cfg.layer_vectors(gguf, i)?;
            let bqkv = vectors.qkv_bias.map(|b| b.concat());
            let qk_norm = vectors.qk_norm.map(|[q, k]| (q, k));
            let post_norms = vectors.post_norms.map(|[a, f]| (a, f));
            layers.push(Layer {
                attn_norm: vec_of(gguf, &config::block_tensor(i, config::ATTN_NORM))?,
                wqkv,
                bqkv,
                qk_norm,
                post_norms,
                wo,
                ffn_norm: vec_of(gguf, &config::block_tensor(i, config::FFN_NORM))?,
                w_gate_up,
                w_down,
            });
        }
        let norm = vec_of(gguf, config::OUTPUT_NORM)?;
        let rope = cfg.rope(gguf)?;
        let (cos, sin) = rope.tables(cfg.context_length);
        let local = cfg.local_rope().map(|r| {
            let (cos, sin) = r.tables(cfg.context_length);
            (r, cos, sin)
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("flywheel-kernel-{i}"))
            .build()
            .map_err(|e| EngineError::Load(format!("thread pool: {e}")))?;
        Ok(Self {
            cfg,
            embed,
            lm_head,
            layers,
            norm,
            rope,
            cos,
            sin,
            local,
            pool,
            simd: Simd::detect(simd),
        })
    }

    /// Serves at most `n` positions (fewer than the model's context, to
    /// bound the memory its caches may take).
    pub fn limit_context(&mut self, n: usize) {
        if n < self.cfg.context_length {
            self.cfg.context_length = n;
            // Rebuilt, not cut: longrope's frequencies depend on the
            // context served.
            (self.cos, self.sin) = self.rope.tables(n);
            if let Some((rope, cos, sin)) = &mut self.local {
                (*cos, *sin) = rope.tables(n);
            }
        }
    }

    /// Bytes the model holds: every matrix as the kernels keep it, the
    /// vectors beside them and the rotary tables (what the memory plan
    /// reckons before loading).
    #[cfg(any(test, feature = "testing"))]
    pub fn held_bytes(&self) -> usize {
        let f32s = |v: &[f32]| std::mem::size_of_val(v);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.matrix_bytes()
                    + f32s(&l.attn_norm)
                    + f32s(&l.ffn_norm)
                    + l.bqkv.as_deref().map_or(0, f32s)
                    + l.qk_norm.as_ref().map_or(0, |(q, k)| f32s(q) + f32s(k))
                    + l.post_norms.as_ref().map_or(0, |(a, f)| f32s(a) + f32s(f))
            })
            .sum();
        layers
            + self.embed.weight_bytes()
            + self.lm_head.as_ref().map_or(0, |m| m.weight_bytes())
            + f32s(&self.norm)
            + f32s(&self.cos)
            + f32s(&self.sin)
            + self
                .local
                .as_ref()
                .map_or(0, |(_, cos, sin)| f32s(cos) + f32s(sin))
    }

    /// Bytes of weights read per step (whatever the batch size).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(Layer::matrix_bytes).sum();
        layers + self.lm_head.as_ref().unwrap_or(&self.embed).weight_bytes()
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache {
            k: vec![Vec::new(); self.cfg.n_layers],
            v: vec![Vec::new(); self.cfg.n_layers],
            len: 0,
        }
    }

    /// Runs one step; returns, per item, the logits after its last token
    /// when asked for.
    pub fn step(&self, items: &mut [BatchItem<'_, SeqCache>]) -> Result<Vec<Option<Vec<f32>>>> {
        for it in items.iter() {
            if it.tokens.is_empty() {
                return Err(EngineError::Invalid("an item without tokens".into()));
            }
            if it.cache.len + it.tokens.len() > self.cfg.context_length {
                return Err(EngineError::Invalid(format!(
                    "{} tokens exceed the context window of {}",
                    it.cache.len + it.tokens.len(),
                    self.cfg.context_length
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                return Err(EngineError::Invalid(format!(
                    "token id {bad} is outside the vocabulary"
                )));
            }
        }
        self.pool.install(|| self.step_inner(items))
    }

    fn step_inner(&self, items: &mut [BatchItem<'_, SeqCache>]) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.cfg;
        let (hidden, hd, nh, nkv) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let context = c.context_length;
        let n: usize = items.iter().map(|i| i.tokens.len()).sum();
        // Row r of the step belongs to item `owner[r].0` at position `owner[r].1`.
        let mut owner = Vec::with_capacity(n);
        for (i, it) in items.iter().enumerate() {
            owner.extend((0..it.tokens.len()).map(|j| (i, it.cache.len + j)));
        }

        // Which adapter each row runs with.
        let adapters: Vec<Option<&Adapter>> =
            owner.iter().map(|&(i, _)| items[i].adapter).collect();
        let any_adapter = adapters.iter().any(Option::is_some);
        let lora = |li: usize, proj: Proj, x: &[f32], y: &mut [f32], y_cols: usize, at: usize| {
            if any_adapter {
                self.lora(&adapters, li, proj, x, y, y_cols, at);
            }
        };
        let mut x = vec![0f32; n * hidden];
        for (r, tok) in items.iter().flat_map(|i| i.tokens.iter()).enumerate() {
            self.embed
                .row(*tok as usize, &mut x[r * hidden..(r + 1) * hidden]);
        }
        if let Some(scale) = c.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        // Gemma 2's norm of a sublayer's output before it joins the
        // residual.
        let post_norm = |out: &mut [f32], w: Option<&Vec<f32>>| {
            let Some(w) = w else { return };
            let mut normed = vec![0f32; hidden];
            for row in out.chunks_exact_mut(hidden) {
                rms_norm(row, w, c.rms_eps, &mut normed);
                row.copy_from_slice(&normed);
            }
        };
        let mut h = vec![0f32; n * hidden];
        let mut qkv = vec![0f32; n * qkv_dim];
        let mut att = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * hidden];
        let mut gu = vec![0f32; n * 2 * c.intermediate];
        let mut act = vec![0f32; n * c.intermediate];

        for (li, layer) in self.layers.iter().enumerate() {
            for r in 0..n {
                let s = r * hidden..(r + 1) * hidden;
                rms_norm(&x[s.clone()], &layer.attn_norm, c.rms_eps, &mut h[s]);
            }
            layer.wqkv.matmul(self.simd, &h, n, &mut qkv);
            if let Some(b) = &layer.bqkv {
                for row in qkv.chunks_exact_mut(qkv_dim) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            }
            lora(li, Proj::Q, &h, &mut qkv, qkv_dim, 0);
            lora(li, Proj::K, &h, &mut qkv, qkv_dim, q_dim);
            lora(li, Proj::V, &h, &mut qkv, qkv_dim, q_dim + kv_dim);
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                // Each head of q and k normed on its own.
                let mut normed = vec![0f32; hd];
                for row in qkv.chunks_exact_mut(qkv_dim) {
                    let (q, k) = row[..q_dim + kv_dim].split_at_mut(q_dim);
                    for (heads, w) in [(q, q_norm), (k, k_norm)] {
                        for head in heads.chunks_exact_mut(hd) {
                            rms_norm(head, w, c.rms_eps, &mut normed);
                            head.copy_from_slice(&normed);
                        }
                    }
                }
            }
            let window = c.window(li);
            if c.rotates(li) {
                for (r, &(_, pos)) in owner.iter().enumerate() {
                    let row = &mut qkv[r * qkv_dim..(r + 1) * qkv_dim];
                    self.rope(&mut row[..q_dim + kv_dim], pos, window.is_some());
                }
            }
            // Append the new keys and values to each sequence's cache.
            let mut r = 0;
            for it in items.iter_mut() {
                for _ in 0..it.tokens.len() {
                    let row = &qkv[r * qkv_dim..(r + 1) * qkv_dim];
                    for (cache, part) in [
                        (&mut it.cache.k[li], &row[q_dim..q_dim + kv_dim]),
                        (&mut it.cache.v[li], &row[q_dim + kv_dim..]),
                    ] {
                        grow_within(cache, kv_dim, context * kv_dim);
                        cache.extend_from_slice(part);
                    }
                    r += 1;
                }
            }
            // Attention, one (row, head) at a time, in parallel.
            let caches: Vec<(&[f32], &[f32])> = items
                .iter()
                .map(|it| (it.cache.k[li].as_slice(), it.cache.v[li].as_slice()))
                .collect();
            let (scale, cap) = (c.attn_scale, c.attn_softcap);
            let simd = self.simd;
            // About two tasks per thread: enough to balance, few enough to
            // keep rayon's overhead off the single-stream path.
            let per_task = (n * nh).div_ceil(2 * rayon::current_num_threads()).max(1);
            att.par_chunks_mut(hd)
                .with_min_len(per_task)
                .enumerate()
                .for_each(|(idx, out)| {
                    let (r, head) = (idx / nh, idx % nh);
                    let (item, pos) = owner[r];
                    let (k, v) = caches[item];
                    let kvh = head / (nh / nkv);
                    let q = &qkv[r * qkv_dim + head * hd..r * qkv_dim + (head + 1) * hd];
                    // A sliding-window layer sees the newest `window`
                    // positions, its own included.
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let mut scores: Vec<f32> = (first..=pos)
                        .map(|p| {
                            dot(
                                simd,
                                q,
                                &k[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd],
                            ) * scale
                        })
                        .collect();
                    if let Some(cap) = cap {
                        scores
                            .iter_mut()
                            .for_each(|s| *s = config::softcap(*s, cap));
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    out.fill(0.0);
                    for (p, s) in (first..).zip(&scores) {
                        axpy(
                            out,
                            s / sum,
                            &v[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd],
                        );
                    }
                });
            layer.wo.matmul(self.simd, &att, n, &mut proj);
            lora(li, Proj::O, &att, &mut proj, hidden, 0);
            post_norm(&mut proj, layer.post_norms.as_ref().map(|(a, _)| a));
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

            for r in 0..n {
                let s = r * hidden..(r + 1) * hidden;
                rms_norm(&x[s.clone()], &layer.ffn_norm, c.rms_eps, &mut h[s]);
            }
            layer.w_gate_up.matmul(self.simd, &h, n, &mut gu);
            let f = c.intermediate;
            lora(li, Proj::Gate, &h, &mut gu, 2 * f, 0);
            lora(li, Proj::Up, &h, &mut gu, 2 * f, f);
            for r in 0..n {
                let (g, u) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
                let out = act[r * f..(r + 1) * f].iter_mut().zip(g).zip(u);
                match c.activation {
                    Activation::Silu => out.for_each(|((a, g), u)| *a = g / (1.0 + (-g).exp()) * u),
                    Activation::GeluTanh => {
                        out.for_each(|((a, g), u)| *a = config::gelu_tanh(*g) * u)
                    }
                }
            }
            layer.w_down.matmul(self.simd, &act, n, &mut proj);
            lora(li, Proj::Down, &act, &mut proj, hidden, 0);
            post_norm(&mut proj, layer.post_norms.as_ref().map(|(_, f)| f));
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }

        // Logits only for the rows that need them.
        let mut last = 0;
        let mut rows = Vec::new();
        for it in items.iter_mut() {
            last += it.tokens.len();
            it.cache.len += it.tokens.len();
            if it.want_logits {
                rows.extend(last - 1 - it.verify.min(it.tokens.len() - 1)..last);
            }
        }
        let mut normed = vec![0f32; rows.len() * hidden];
        for (i, &r) in rows.iter().enumerate() {
            rms_norm(
                &x[r * hidden..(r + 1) * hidden],
                &self.norm,
                c.rms_eps,
                &mut normed[i * hidden..(i + 1) * hidden],
            );
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.rows();
        let mut logits = vec![0f32; rows.len() * vocab];
        if !rows.is_empty() {
            head.matmul(self.simd, &normed, rows.len(), &mut logits);
        }
        if let Some(cap) = c.final_softcap {
            logits
                .iter_mut()
                .for_each(|l| *l = config::softcap(*l, cap));
        }
        let mut taken = 0;
        Ok(items
            .iter()
            .map(|it| {
                it.want_logits.then(|| {
                    let n = it.verify.min(it.tokens.len() - 1) + 1;
                    taken += n;
                    logits[(taken - n) * vocab..taken * vocab].to_vec()
                })
            })
            .collect())
    }

    /// Adds each row's adapter delta for `proj` of layer `li`: rows of `x`
    /// (the projection's input) into columns `at..at + out` of `y` (`y_cols`
    /// wide). Rows sharing an adapter go through its two small matrices
    /// together; a row's numbers never depend on the others.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        adapters: &[Option<&Adapter>],
        li: usize,
        proj: Proj,
        x: &[f32],
        y: &mut [f32],
        y_cols: usize,
        at: usize,
    ) {
        let n = adapters.len();
        let x_cols = x.len() / n.max(1);
        let mut done = vec![false; n];
        for first in 0..n {
            let Some(adapter) = adapters[first].filter(|_| !done[first]) else {
                continue;
            };
            let rows: Vec<usize> = (first..n)
                .filter(|&r| adapters[r].is_some_and(|a| std::ptr::eq(a, adapter)))
                .collect();
            rows.iter().for_each(|&r| done[r] = true);
            let Some((a, b)) = &adapter.pairs[li][proj_index(proj)] else {
                continue;
            };
            let m = rows.len();
            let mut xs = Vec::with_capacity(m * x_cols);
            for &r in &rows {
                xs.extend_from_slice(&x[r * x_cols..(r + 1) * x_cols]);
            }
            let mut down = vec![0f32; m * a.rows()];
            a.matmul(self.simd, &xs, m, &mut down);
            let out = b.rows();
            let mut up = vec![0f32; m * out];
            b.matmul(self.simd, &down, m, &mut up);
            for (i, &r) in rows.iter().enumerate() {
                let dst = &mut y[r * y_cols + at..r * y_cols + at + out];
                for (d, u) in dst.iter_mut().zip(&up[i * out..(i + 1) * out]) {
                    *d += adapter.scale * u;
                }
            }
        }
    }

    /// Interleaved rotary embedding of the q and k heads in `row`, by the
    /// sliding-window layers' own tables where `local` and they have them.
    fn rope(&self, row: &mut [f32], pos: usize, local: bool) {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = match (&self.local, local) {
            (Some((_, cos, sin)), true) => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        let (cos, sin) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_exact_mut(self.cfg.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_model::Llama;

    fn tiny() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        flywheel_model::testing::write_tiny_model(&dir, 5).unwrap()
    }

    #[test]
    fn matches_the_candle_reference_forward() {
        let path = tiny();
        let mut g = GgufFile::open(&path).unwrap();
        let fast = CpuLlama::load(&mut g, 2, Simd::Avx512).unwrap();
        let reference = Llama::load(&mut g, &candle_core::Device::Cpu).unwrap();
        let prompt: Vec<u32> = (3..40).collect();
        let mut rc = reference.new_cache();
        let want = reference
            .forward(&prompt, &mut rc)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut fc = fast.new_cache();
        let got = fast
            .step(&mut [BatchItem {
                cache: &mut fc,
                tokens: &prompt,
                want_logits: true,
                verify: 0,
                adapter: None,
            }])
            .unwrap();
        let got = got[0].as_ref().unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "prefill logits differ by {diff}");
        // And one decode step after it.
        let want = reference
            .forward(&[7], &mut rc)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = fast
            .step(&mut [BatchItem {
                cache: &mut fc,
                tokens: &[7],
                want_logits: true,
                verify: 0,
                adapter: None,
            }])
            .unwrap();
        let diff = got[0]
            .as_ref()
            .unwrap()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "decode logits differ by {diff}");
    }

    #[test]
    fn batching_and_chunking_give_identical_logits() {
        let path = tiny();
        let fast = CpuLlama::load(&mut GgufFile::open(&path).unwrap(), 2, Simd::Avx512).unwrap();
        let a: Vec<u32> = (10..50).collect();
        let b: Vec<u32> = (60..75).collect();
        // Alone, whole prompts.
        let alone = |p: &[u32]| {
            let mut c = fast.new_cache();
            fast.step(&mut [BatchItem {
                cache: &mut c,
                tokens: p,
                want_logits: true,
                verify: 0,
                adapter: None,
            }])
            .unwrap()[0]
                .clone()
                .unwrap()
        };
        let (la, lb) = (alone(&a), alone(&b));
        // Together, `a` in two chunks while `b` runs whole beside it.
        let (mut ca, mut cb) = (fast.new_cache(), fast.new_cache());
        let first = fast
            .step(&mut [
                BatchItem {
                    cache: &mut ca,
                    tokens: &a[..25],
                    want_logits: false,
                    verify: 0,
                    adapter: None,
                },
                BatchItem {
                    cache: &mut cb,
                    tokens: &b,
                    want_logits: true,
                    verify: 0,
                    adapter: None,
                },
            ])
            .unwrap();
        assert!(first[0].is_none());
        assert_eq!(first[1].as_ref().unwrap(), &lb);
        let second = fast
            .step(&mut [BatchItem {
                cache: &mut ca,
                tokens: &a[25..],
                want_logits: true,
                verify: 0,
                adapter: None,
            }])
            .unwrap();
        assert_eq!(second[0].as_ref().unwrap(), &la);
    }

    /// A random adapter on every projection of every layer; `b_scale` 0
    /// gives one that changes nothing.
    fn adapter(cfg: &LlamaConfig, b_scale: f32) -> Adapter {
        let mut rng = flywheel_model::rng::Rng::seeded(11);
        let mut random = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * s)
                .collect()
        };
        let rank = 4;
        let mut pairs = Vec::new();
        for layer in 0..cfg.n_layers {
            for proj in Proj::ALL {
                let (out, inp) = cfg.proj_shape(proj);
                pairs.push(crate::adapter::AdapterPair {
                    layer,
                    proj,
                    rank,
                    a: random(rank * inp, 0.3),
                    b: random(out * rank, b_scale),
                });
            }
        }
        Adapter::new(crate::adapter::AdapterWeights { scale: 2.0, pairs }, cfg).unwrap()
    }

    #[test]
    fn adapters_apply_per_sequence_and_batching_changes_nothing() {
        let path = tiny();
        let fast = CpuLlama::load(&mut GgufFile::open(&path).unwrap(), 2, Simd::Avx512).unwrap();
        let (zero, real) = (adapter(&fast.cfg, 0.0), adapter(&fast.cfg, 0.5));
        let prompt: Vec<u32> = (20..45).collect();
        let alone = |a: Option<&Adapter>| {
            let mut c = fast.new_cache();
            fast.step(&mut [BatchItem {
                cache: &mut c,
                tokens: &prompt,
                want_logits: true,
                verify: 0,
                adapter: a,
            }])
            .unwrap()[0]
                .clone()
                .unwrap()
        };
        let (plain, with) = (alone(None), alone(Some(&real)));
        assert_eq!(alone(Some(&zero)), plain, "a zero adapter changes nothing");
        let diff = plain
            .iter()
            .zip(&with)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-2, "the adapter moved the logits by only {diff}");
        // Side by side in one step, each gets what it got alone.
        let (mut c1, mut c2) = (fast.new_cache(), fast.new_cache());
        let both = fast
            .step(&mut [
                BatchItem {
                    cache: &mut c1,
                    tokens: &prompt,
                    want_logits: true,
                    verify: 0,
                    adapter: Some(&real),
                },
                BatchItem {
                    cache: &mut c2,
                    tokens: &prompt,
                    want_logits: true,
                    verify: 0,
                    adapter: None,
                },
            ])
            .unwrap();
        assert_eq!(both[0].as_ref().unwrap(), &with);
        assert_eq!(both[1].as_ref().unwrap(), &plain);
    }
}
