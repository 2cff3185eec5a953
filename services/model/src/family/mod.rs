//! Model families: each file says how one architecture's GGUF files map
//! onto the one transformer the forward passes run ([`LlamaConfig`]):
//! which hyper-parameter keys it reads, whether q, k and v carry biases, and
//! how its q and k rows are stored.
//!
//! A family nobody wrote a file for is refused at load, naming its
//! architecture: serving it as another would give wrong answers silently.

mod gemma2;
mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;
mod smollm3;

use crate::config::{LlamaConfig, RopeRows};
use crate::gguf::GgufFile;
use crate::{ModelError, Result};

/// One architecture, as GGUF files of it name and lay it out.
pub trait Family: Sync {
    /// `general.architecture`, also the prefix of its metadata keys.
    fn name(&self) -> &'static str;

    /// Whether the q, k and v projections carry biases
    /// (`blk.N.attn_q.bias`, ...).
    fn qkv_bias(&self) -> bool {
        false
    }

    /// Whether each head of q and k is RMS-normed before the rotary
    /// embedding (`blk.N.attn_q_norm.weight`, ...).
    fn qk_norm(&self) -> bool {
        false
    }

    /// Whether the family stores gate and up as one matrix (`ffn_up`, gate's
    /// rows first) and may store q, k and v as one (`attn_qkv`; files with
    /// them apart are read too, as llama.cpp reads them).
    fn fused(&self) -> bool {
        false
    }

    /// Gemma's layer: GELU (tanh approximation) on the gate, embeddings
    /// scaled by `sqrt(hidden)`, and norms of the attention's and the
    /// feed-forward's outputs before each joins the residual.
    fn gemma(&self) -> bool {
        false
    }

    /// Every this many layers, the last of them attends without a rotary
    /// embedding (SmolLM3's "NoPE" layers: 3, 7, 11, ... counted from 0).
    fn no_rope_step(&self) -> Option<usize> {
        None
    }

    /// Sliding-window attention on all layers but the last of every this
    /// many, those local layers turning by a rotary base of their own where
    /// given (Gemma 2's 2; Gemma 3's 6 and 10,000, which llama.cpp fixes for
    /// the architecture). A family without it (`None`) that records a
    /// window is served up to it ([`read_config`]).
    fn sliding(&self) -> Option<(usize, Option<f32>)> {
        None
    }

    /// What `q . k` is scaled by, where it is not `1 / sqrt(head_dim)`.
    fn attn_scale(&self, _shape: &Shape) -> Option<f32> {
        None
    }

    /// How the q and k rows are stored in GGUF files of this family:
    /// llama.cpp's converter permutes llama's for interleaved rotary
    /// embeddings and stores the others as Hugging Face does.
    fn gguf_rope_rows(&self) -> RopeRows;
}

/// The sizes a family's own rules may depend on.
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
}

/// A layer's vectors beside its matrices, in the order the forward passes
/// compute in ([`LlamaConfig::layer_vectors`]).
pub struct LayerVectors {
    /// q, k and v biases (Qwen2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// The per-head norms of q and k (Qwen3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// The norms of the attention's and the feed-forward's outputs (Gemma 2).
    pub post_norms: Option<[Vec<f32>; 2]>,
}

/// Llama 3.1's rope scaling as llama.cpp stores it: per rotary frequency, a
/// factor it is divided by.
pub const ROPE_FACTORS: &str = "rope_freqs.weight";
/// Phi-3's long-context rope scaling ("longrope"): per rotary frequency, the
/// factor it is divided by when the context served is longer than the
/// original one (long), and when it is not (short).
pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

/// A model's rotary embedding: the frequency of each pair of a head's
/// dimensions, and what the cosines and sines are scaled by.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The frequencies within the original context.
    pub freqs: Vec<f32>,
    /// Longrope's: the frequencies beyond it, and the original context.
    pub long: Option<(Vec<f32>, usize)>,
    /// Longrope's attention factor (`rope.scaling.attn_factor`), else 1.
    pub scale: f32,
}

impl Rope {
    /// The frequencies a model serving `context` positions rotates by: the
    /// long ones where the context is longer than the original, for every
    /// position alike, as llama.cpp chooses (transformers chooses by each
    /// run's length, which a cache that outlives a run cannot follow; the
    /// two agree whenever the context served is the original or less).
    pub fn frequencies(&self, context: usize) -> &[f32] {
        match &self.long {
            Some((long, original)) if context > *original => long,
            _ => &self.freqs,
        }
    }

    /// The cosines and sines of every position below `context` for each
    /// frequency, row-major `(context, freqs)`, times the scale.
    pub fn tables(&self, context: usize) -> (Vec<f32>, Vec<f32>) {
        let freqs = self.frequencies(context);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..context {
            for inv in freqs {
                let a = p as f32 * inv;
                cos.push(a.cos() * self.scale);
                sin.push(a.sin() * self.scale);
            }
        }
        (cos, sin)
    }
}

impl LlamaConfig {
    /// The hyper-parameters of a GGUF file of any supported family.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        read_config(of_gguf(gguf)?, gguf)
    }

    /// A layer's q/k/v biases and q/k norms (in the families that have
    /// them), read and put in the order the forward passes compute in: what
    /// both loaders take from here.
    pub fn layer_vectors(&self, gguf: &mut GgufFile, layer: usize) -> Result<LayerVectors> {
        use crate::config::{self, Proj};
        let mut read = |name: String, order: Option<Vec<usize>>| -> Result<Vec<f32>> {
            let v = gguf
                .tensor_f32(&name, &candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(match order {
                Some(order) => order.iter().map(|&r| v[r]).collect(),
                None => v,
            })
        };
        let qkv_bias = match self.qkv_bias {
            true => {
                let mut bias = |p: Proj| read(config::bias_tensor(layer, p), self.row_order(p));
                Some([bias(Proj::Q)?, bias(Proj::K)?, bias(Proj::V)?])
            }
            false => None,
        };
        let qk_norm = match self.qk_norm {
            true => {
                let mut norm = |n: &str| read(config::block_tensor(layer, n), self.head_order());
                Some([norm(config::ATTN_Q_NORM)?, norm(config::ATTN_K_NORM)?])
            }
            false => None,
        };
        let post_norms = match self.post_norms {
            true => {
                let mut norm = |n: &str| read(config::block_tensor(layer, n), None);
                Some([norm(config::POST_ATTN_NORM)?, norm(config::POST_FFN_NORM)?])
            }
            false => None,
        };
        Ok(LayerVectors {
            qkv_bias,
            qk_norm,
            post_norms,
        })
    }

    /// `layer`'s `proj` as the file stores it (its rows of a fused matrix
    /// where the family fuses it), before any row order is applied.
    pub fn proj_qtensor(
        &self,
        gguf: &mut GgufFile,
        layer: usize,
        proj: crate::config::Proj,
    ) -> Result<candle_core::quantized::QTensor> {
        let (name, first) = self.stored_at(layer, proj);
        gguf.rows(&name, first, self.proj_shape(proj).0)
    }

    /// Checks that the file holds every tensor this configuration reads,
    /// each of the size it says, before anything is loaded: a file whose
    /// tensors disagree with its own metadata is refused here, naming the
    /// tensor, rather than failing in the middle of serving.
    pub fn check_tensors(&self, gguf: &GgufFile) -> Result<()> {
        use crate::config::{self, Proj};
        // The embedding and output rows may outnumber the tokenizer's
        // (vocabularies padded for speed); their width may not differ.
        for name in [config::TOKEN_EMBEDDING, config::OUTPUT] {
            match gguf.tensor_dims(name) {
                Some(&[rows, width]) if rows >= self.vocab && width == self.hidden => {}
                None if name == config::OUTPUT => {}
                other => {
                    return Err(ModelError::Load(format!(
                        "tensor {name} is {other:?} where the file's metadata makes it \
                         [{}, {}]",
                        self.vocab, self.hidden
                    )));
                }
            }
        }
        let mut want: Vec<(String, Vec<usize>)> =
            vec![(config::OUTPUT_NORM.into(), vec![self.hidden])];
        for name in [ROPE_FACTORS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT] {
            if gguf.has_tensor(name) {
                want.push((name.into(), vec![self.head_dim / 2]));
            }
        }
        for i in 0..self.n_layers {
            for (name, (rows, cols)) in self.stored_matrices(i) {
                want.push((name, vec![rows, cols]));
            }
            for n in [config::ATTN_NORM, config::FFN_NORM] {
                want.push((config::block_tensor(i, n), vec![self.hidden]));
            }
            if self.qkv_bias {
                for p in [Proj::Q, Proj::K, Proj::V] {
                    want.push((config::bias_tensor(i, p), vec![self.proj_shape(p).0]));
                }
            }
            if self.qk_norm {
                for n in [config::ATTN_Q_NORM, config::ATTN_K_NORM] {
                    want.push((config::block_tensor(i, n), vec![self.head_dim]));
                }
            }
            if self.post_norms {
                for n in [config::POST_ATTN_NORM, config::POST_FFN_NORM] {
                    want.push((config::block_tensor(i, n), vec![self.hidden]));
                }
            }
        }
        for (name, dims) in want {
            match gguf.tensor_dims(&name) {
                None => return Err(ModelError::Load(format!("the file has no tensor {name}"))),
                Some(got) if got != dims.as_slice() => {
                    return Err(ModelError::Load(format!(
                        "tensor {name} is {got:?} where the file's metadata makes it {dims:?}"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The rotary embedding: per pair of a head's dimensions the frequency
    /// `theta^(-2i / head_dim)`, each divided by the file's rope factor for
    /// it where the file has them ([`ROPE_FACTORS`]; Phi-3's long and short
    /// ones, [`ROPE_FACTORS_LONG`]).
    pub fn rope(&self, gguf: &mut GgufFile) -> Result<Rope> {
        let base = base_frequencies(self.rope_theta, self.head_dim);
        let mut divided = |name: &str| -> Result<Option<Vec<f32>>> {
            if !gguf.has_tensor(name) {
                return Ok(None);
            }
            let factors = gguf
                .tensor_f32(name, &candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != base.len() {
                return Err(ModelError::Load(format!(
                    "{name} holds {} factors for {} rotary frequencies",
                    factors.len(),
                    base.len()
                )));
            }
            Ok(Some(
                base.iter().zip(&factors).map(|(f, k)| f / k).collect(),
            ))
        };
        let freqs = divided(ROPE_FACTORS)?;
        let short = divided(ROPE_FACTORS_SHORT)?;
        let long = divided(ROPE_FACTORS_LONG)?;
        let key = |k: &str| format!("{}.{k}", self.family);
        let long = match (long, short.is_some()) {
            (None, false) => None,
            (Some(long), true) => {
                let original = gguf
                    .get_u32(&key("rope.scaling.original_context_length"))
                    .map_err(|_| {
                        ModelError::Load(format!(
                            "{ROPE_FACTORS_LONG} without {}",
                            key("rope.scaling.original_context_length")
                        ))
                    })?;
                Some((long, original as usize))
            }
            _ => {
                return Err(ModelError::Load(format!(
                    "{ROPE_FACTORS_LONG} and {ROPE_FACTORS_SHORT} come together"
                )));
            }
        };
        let scale = match long {
            Some(_) => gguf
                .get_f32(&key("rope.scaling.attn_factor"))
                .unwrap_or(1.0),
            None => 1.0,
        };
        // Linear scaling (Gemma 3's global layers, some llamas): positions
        // divided by the factor, so every frequency is.
        let linear = match gguf.get_str(&key("rope.scaling.type")) {
            Ok("linear") => gguf
                .get_f32(&key("rope.scaling.factor"))
                .ok()
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
            _ => 1.0,
        };
        let freqs = short.or(freqs).unwrap_or(base);
        Ok(Rope {
            freqs: freqs.iter().map(|f| f / linear).collect(),
            long,
            scale,
        })
    }

    /// The rotary embedding of the sliding-window layers, where they turn
    /// by a base of their own (Gemma 3's local layers: no scaling).
    pub fn local_rope(&self) -> Option<Rope> {
        let theta = self.sliding?.rope_theta?;
        Some(Rope {
            freqs: base_frequencies(theta, self.head_dim),
            long: None,
            scale: 1.0,
        })
    }
}

/// The rotary frequency of each pair of a head's dimensions:
/// `theta^(-2i / head_dim)`.
fn base_frequencies(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// Gemma's `1 / sqrt(query_pre_attn_scalar)` as llama.cpp infers it from
/// the shape: `hidden / heads` in the largest model (told by its
/// `big_layers` layers), the head size in the others.
fn gemma_query_scale(s: &Shape, big_layers: usize) -> f32 {
    let scalar = match s.layers == big_layers {
        true => s.hidden / s.heads,
        false => s.head_dim,
    };
    1.0 / (scalar as f32).sqrt()
}

/// The query scaling a converted Hugging Face folder records where its
/// config gives one (Gemma 2's `query_pre_attn_scalar`): llama.cpp's files
/// have no key for it (llama.cpp derives it from the model's size).
pub const QUERY_PRE_ATTN_SCALAR: &str = "flywheel.query_pre_attn_scalar";

/// Every family Flywheel serves.
pub const FAMILIES: &[&dyn Family] = &[
    &llama::Llama,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
    &phi3::Phi3,
    &gemma2::Gemma2,
    &gemma3::Gemma3,
    &smollm3::SmolLm3,
];

/// The family whose GGUF architecture is `arch`.
pub fn by_name(arch: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == arch)
}

/// The family of a GGUF file, by its `general.architecture`.
pub fn of_gguf(gguf: &GgufFile) -> Result<&'static dyn Family> {
    let arch = gguf.get_str("general.architecture")?;
    by_name(arch).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.name()).collect();
        ModelError::Load(format!(
            "architecture {arch} is not supported (Flywheel serves {})",
            known.join(", ")
        ))
    })
}

/// The `{arch}.*` keys every family here shares (llama.cpp writes the same
/// names under each architecture's prefix).
fn read_config(family: &dyn Family, gguf: &GgufFile) -> Result<LlamaConfig> {
    let arch = family.name();
    let key = |k: &str| format!("{arch}.{k}");
    // Rope scaling changes every rotary frequency; a model that needs a
    // kind we do not apply would be served with the wrong positions, so it
    // is refused. (Llama 3.1's `llama3` scaling comes as a tensor of
    // per-frequency factors, `rope_freqs.weight`, which the loaders apply:
    // [`LlamaConfig::rope`]; so does Phi-3's longrope, whose factors come
    // as two such tensors.)
    let longrope = gguf.has_tensor(ROPE_FACTORS_LONG);
    if let Ok(kind) = gguf.get_str(&key("rope.scaling.type"))
        && kind != "none"
        && kind != "linear"
        && !(longrope && matches!(kind, "longrope" | "su"))
    {
        return Err(ModelError::Load(format!(
            "rope scaling `{kind}` ({}) is not supported",
            key("rope.scaling.type")
        )));
    }
    let hidden = gguf.get_u32(&key("embedding_length"))? as usize;
    let fused_qkv =
        family.fused() && gguf.has_tensor(&crate::config::block_tensor(0, crate::config::ATTN_QKV));
    let n_heads = gguf.get_u32(&key("attention.head_count"))? as usize;
    let n_kv_heads = gguf
        .get_u32(&key("attention.head_count_kv"))
        .unwrap_or(n_heads as u32) as usize;
    let bad = |what: String| Err(ModelError::Load(format!("{arch} metadata: {what}")));
    if hidden == 0 || n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return bad(format!(
            "{n_heads} heads sharing {n_kv_heads} key/value heads over {hidden} dimensions"
        ));
    }
    // A head size of its own where the file gives one (Qwen3's).
    let head_dim = match gguf.get_u32(&key("attention.key_length")) {
        Ok(k) => k as usize,
        Err(_) if hidden.is_multiple_of(n_heads) => hidden / n_heads,
        Err(_) => {
            return bad(format!(
                "{hidden} dimensions do not split into {n_heads} heads"
            ));
        }
    };
    // Rotary embeddings turn pairs of a head's dimensions.
    if head_dim == 0 || head_dim % 2 != 0 {
        return bad(format!(
            "heads of {head_dim} dimensions (an even number is needed)"
        ));
    }
    if let Ok(v) = gguf.get_u32(&key("attention.value_length"))
        && v as usize != head_dim
    {
        return Err(ModelError::Load(format!(
            "values of {v} per head with keys of {head_dim} ({}) are not supported",
            key("attention.value_length")
        )));
    }
    // Rotary embeddings over part of each head (Phi-4-mini's) are not
    // computed here.
    if let Ok(dims) = gguf.get_u32(&key("rope.dimension_count"))
        && dims as usize != head_dim
    {
        return Err(ModelError::Load(format!(
            "rotary embeddings over {dims} of a head's {head_dim} dimensions ({}) are not \
             supported",
            key("rope.dimension_count")
        )));
    }
    // Where the family's layers slide (Gemma 2 and 3), the window is
    // attended as such. Elsewhere a sliding window attends like the full context up
    // to its length: the context served stops there, so every answer is the
    // model's own (Phi-3 mini's 2,047 of 4,096).
    let mut context_length = gguf.get_u32(&key("context_length")).unwrap_or(2048) as usize;
    let mut sliding = None;
    if let Ok(window) = gguf.get_u32(&key("attention.sliding_window"))
        && window > 0
    {
        match family.sliding() {
            Some((pattern, rope_theta)) => {
                // A pattern in the file (as a number; llama.cpp writes
                // per-layer flags for other architectures) replaces the
                // family's; anything else is refused rather than guessed.
                let pattern_key = key("attention.sliding_window_pattern");
                let pattern = match gguf.get_u32(&pattern_key) {
                    Ok(p) if p > 0 => p as usize,
                    Err(_) if !gguf.metadata().contains_key(&pattern_key) => pattern,
                    _ => {
                        return Err(ModelError::Load(format!(
                            "{pattern_key} other than a positive number is not supported"
                        )));
                    }
                };
                sliding = Some(crate::config::Sliding {
                    window: window as usize,
                    pattern,
                    rope_theta,
                });
            }
            None => context_length = context_length.min(window as usize),
        }
    }
    let vocab = match gguf.get_u32(&key("vocab_size")) {
        Ok(v) => v as usize,
        Err(_) => gguf.get_strings("tokenizer.ggml.tokens")?.len(),
    };
    let n_layers = gguf.get_u32(&key("block_count"))? as usize;
    let shape = Shape {
        hidden,
        heads: n_heads,
        head_dim,
        layers: n_layers,
    };
    // A converted folder records what its config says
    // (`flywheel.query_pre_attn_scalar`); else the family's rule.
    let attn_scale = match gguf.get_f32(QUERY_PRE_ATTN_SCALAR) {
        Ok(q) if q > 0.0 => 1.0 / q.sqrt(),
        _ => family
            .attn_scale(&shape)
            .unwrap_or(1.0 / (head_dim as f32).sqrt()),
    };
    let cap = |k: &str| gguf.get_f32(&key(k)).ok().filter(|c| *c > 0.0);
    let gemma = family.gemma();
    Ok(LlamaConfig {
        family: arch,
        hidden,
        intermediate: gguf.get_u32(&key("feed_forward_length"))? as usize,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rope_theta: gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
        rms_eps: gguf
            .get_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        context_length,
        qkv_bias: family.qkv_bias(),
        qk_norm: family.qk_norm(),
        rope_rows: family.gguf_rope_rows(),
        fused_qkv,
        fused_gate_up: family.fused(),
        activation: match gemma {
            true => crate::config::Activation::GeluTanh,
            false => crate::config::Activation::Silu,
        },
        embed_scale: gemma.then(|| (hidden as f32).sqrt()),
        post_norms: gemma,
        attn_scale,
        attn_softcap: cap("attn_logit_softcapping"),
        final_softcap: cap("final_logit_softcapping"),
        no_rope_step: family.no_rope_step(),
        sliding,
    })
}
