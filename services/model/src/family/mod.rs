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

    /// The hyper-parameters in the file's metadata.
    fn config(&self, gguf: &GgufFile) -> Result<LlamaConfig> {
        read_config(self, gguf)
    }
}

/// Llama 3.1's rope scaling as llama.cpp stores it: per rotary frequency, a
/// factor it is divided by.
pub const ROPE_FACTORS: &str = "rope_freqs.weight";

impl LlamaConfig {
    /// The hyper-parameters of a GGUF file of any supported family.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        of_gguf(gguf)?.config(gguf)
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
fn read_config<F: Family + ?Sized>(family: &F, gguf: &GgufFile) -> Result<LlamaConfig> {
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
    // A head size of its own where the file gives one (Qwen3's).
    let head_dim = match gguf.get_u32(&key("attention.key_length")) {
        Ok(k) => k as usize,
        Err(_) => hidden / n_heads,
    };
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
