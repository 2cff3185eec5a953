//! Model families: each file says how one architecture's GGUF files map
//! onto the one transformer the forward passes run ([`LlamaConfig`]):
//! which hyper-parameter keys it reads, whether q, k and v carry biases, and
//! how its q and k rows are stored.
//!
//! A family nobody wrote a file for is refused at load, naming its
//! architecture: serving it as another would give wrong answers silently.

mod llama;
mod qwen2;
mod qwen3;

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

    /// How the q and k rows are stored in GGUF files of this family:
    /// llama.cpp's converter permutes llama's for interleaved rotary
    /// embeddings and stores the others as Hugging Face does.
    fn gguf_rope_rows(&self) -> RopeRows;
}

/// A layer's vectors beside its matrices, in the order the forward passes
/// compute in ([`LlamaConfig::layer_vectors`]).
pub struct LayerVectors {
    /// q, k and v biases (Qwen2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// The per-head norms of q and k (Qwen3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
}

/// Llama 3.1's rope scaling as llama.cpp stores it: per rotary frequency, a
/// factor it is divided by.
pub const ROPE_FACTORS: &str = "rope_freqs.weight";

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
        Ok(LayerVectors { qkv_bias, qk_norm })
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
        if gguf.has_tensor(ROPE_FACTORS) {
            want.push((ROPE_FACTORS.into(), vec![self.head_dim / 2]));
        }
        for i in 0..self.n_layers {
            for p in Proj::ALL {
                let (out, inp) = self.proj_shape(p);
                want.push((p.gguf_tensor(i), vec![out, inp]));
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

    /// The rotary frequencies, one per pair of a head's dimensions:
    /// `theta^(-2i / head_dim)`, each divided by the file's rope factor for
    /// it where the file has them ([`ROPE_FACTORS`]).
    pub fn rope_frequencies(&self, gguf: &mut GgufFile) -> Result<Vec<f32>> {
        let hd = self.head_dim;
        let mut freqs: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / hd as f32))
            .collect();
        if gguf.has_tensor(ROPE_FACTORS) {
            let factors = gguf
                .tensor_f32(ROPE_FACTORS, &candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != freqs.len() {
                return Err(ModelError::Load(format!(
                    "{ROPE_FACTORS} holds {} factors for {} rotary frequencies",
                    factors.len(),
                    freqs.len()
                )));
            }
            freqs.iter_mut().zip(&factors).for_each(|(f, k)| *f /= k);
        }
        Ok(freqs)
    }
}

/// Every family Flywheel serves.
pub const FAMILIES: &[&dyn Family] = &[&llama::Llama, &qwen2::Qwen2, &qwen3::Qwen3];

/// The family of a GGUF file, by its `general.architecture`.
pub fn of_gguf(gguf: &GgufFile) -> Result<&'static dyn Family> {
    let arch = gguf.get_str("general.architecture")?;
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.name() == arch)
        .ok_or_else(|| {
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
    // [`LlamaConfig::rope_frequencies`].)
    if let Ok(kind) = gguf.get_str(&key("rope.scaling.type"))
        && kind != "none"
    {
        return Err(ModelError::Load(format!(
            "rope scaling `{kind}` ({}) is not supported",
            key("rope.scaling.type")
        )));
    }
    let hidden = gguf.get_u32(&key("embedding_length"))? as usize;
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
    let vocab = match gguf.get_u32(&key("vocab_size")) {
        Ok(v) => v as usize,
        Err(_) => gguf.get_strings("tokenizer.ggml.tokens")?.len(),
    };
    Ok(LlamaConfig {
        family: arch,
        hidden,
        intermediate: gguf.get_u32(&key("feed_forward_length"))? as usize,
        n_layers: gguf.get_u32(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rope_theta: gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
        rms_eps: gguf
            .get_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        context_length: gguf.get_u32(&key("context_length")).unwrap_or(2048) as usize,
        qkv_bias: family.qkv_bias(),
        qk_norm: family.qk_norm(),
        rope_rows: family.gguf_rope_rows(),
    })
}
