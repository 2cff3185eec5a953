//! A llama model's hyper-parameters, and the names of its tensors: the one
//! table that says what a projection is called in GGUF files and in Hugging
//! Face (and PEFT) checkpoints.

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

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

    /// `(out, in)` of a projection's weight.
    pub fn proj_shape(&self, proj: Proj) -> (usize, usize) {
        let kv = self.n_kv_heads * self.head_dim();
        match proj {
            Proj::Q | Proj::O => (self.hidden, self.hidden),
            Proj::K | Proj::V => (kv, self.hidden),
            Proj::Gate | Proj::Up => (self.intermediate, self.hidden),
            Proj::Down => (self.hidden, self.intermediate),
        }
    }

    /// The hyper-parameters in a GGUF file's `llama.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Load(format!(
                "architecture {arch} is not supported (llama only)"
            )));
        }
        // Rope scaling (Llama 3.1's `llama3`, `linear`, `yarn`, ...) changes
        // every rotary frequency; a model that needs it would be served
        // with the wrong positions, so it is refused until it is supported.
        if let Ok(kind) = gguf.get_str("llama.rope.scaling.type")
            && kind != "none"
        {
            return Err(ModelError::Load(format!(
                "rope scaling `{kind}` (llama.rope.scaling.type) is not supported"
            )));
        }
        if gguf.has_tensor("rope_freqs.weight") {
            return Err(ModelError::Load(
                "rope scaling by a `rope_freqs.weight` tensor (Llama 3.1's) is not supported"
                    .into(),
            ));
        }
        let hidden = gguf.get_u32("llama.embedding_length")? as usize;
        let n_heads = gguf.get_u32("llama.attention.head_count")? as usize;
        let n_kv_heads = gguf
            .get_u32("llama.attention.head_count_kv")
            .unwrap_or(n_heads as u32) as usize;
        let vocab = match gguf.get_u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => gguf.get_strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            hidden,
            intermediate: gguf.get_u32("llama.feed_forward_length")? as usize,
            n_layers: gguf.get_u32("llama.block_count")? as usize,
            n_heads,
            n_kv_heads,
            vocab,
            rope_theta: gguf.get_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: gguf
                .get_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            context_length: gguf.get_u32("llama.context_length").unwrap_or(2048) as usize,
        })
    }
}

/// The token embedding (and, in small models, the output projection too).
pub const TOKEN_EMBEDDING: &str = "token_embd.weight";
/// The final norm's weight.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// The output projection, when not tied to the embedding.
pub const OUTPUT: &str = "output.weight";
/// Per-layer norms (short names, see [`block_tensor`]).
pub const ATTN_NORM: &str = "attn_norm";
pub const FFN_NORM: &str = "ffn_norm";

/// The GGUF name of a per-layer tensor: `blk.{layer}.{short}.weight`.
pub fn block_tensor(layer: usize, short: &str) -> String {
    format!("blk.{layer}.{short}.weight")
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

    /// (Hugging Face module, GGUF short name).
    const fn names(self) -> (&'static str, &'static str) {
        match self {
            Proj::Q => ("self_attn.q_proj", "attn_q"),
            Proj::K => ("self_attn.k_proj", "attn_k"),
            Proj::V => ("self_attn.v_proj", "attn_v"),
            Proj::O => ("self_attn.o_proj", "attn_output"),
            Proj::Gate => ("mlp.gate_proj", "ffn_gate"),
            Proj::Up => ("mlp.up_proj", "ffn_up"),
            Proj::Down => ("mlp.down_proj", "ffn_down"),
        }
    }

    /// The module's name in Hugging Face llama checkpoints (and PEFT).
    pub fn hf_name(self) -> &'static str {
        self.names().0
    }

    /// The short name in GGUF files (`attn_q`).
    pub fn gguf_name(self) -> &'static str {
        self.names().1
    }

    /// The GGUF tensor of this projection in `layer`.
    pub fn gguf_tensor(self, layer: usize) -> String {
        block_tensor(layer, self.gguf_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    #[test]
    fn names_agree_with_both_conventions() {
        assert_eq!(Proj::O.gguf_tensor(3), "blk.3.attn_output.weight");
        assert_eq!(Proj::Down.hf_name(), "mlp.down_proj");
        // PEFT's target_modules names are the serde names.
        for p in Proj::ALL {
            let name = serde_json::to_value(p).unwrap();
            assert!(p.hf_name().ends_with(name.as_str().unwrap()), "{p:?}");
        }
    }

    /// What loading `overrides`'s variant of the tiny model says.
    fn load_error(name: &str, overrides: &[(&str, Value)]) -> String {
        use crate::gguf::GgufFile;
        let dir = std::env::temp_dir().join(format!("fw-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = crate::testing::write_tiny_variant(&dir, name, 3, overrides).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        match (
            LlamaConfig::from_gguf(&gguf),
            crate::tokenizer::TextTokenizer::from_gguf(&gguf),
        ) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            (Ok(_), Ok(_)) => "loaded".into(),
        }
    }

    #[test]
    fn what_would_be_served_wrongly_is_refused_at_load_naming_it() {
        let s = |v: &str| Value::String(v.into());
        assert_eq!(load_error("plain", &[]), "loaded");
        assert_eq!(
            load_error("gpt2-pre", &[("tokenizer.ggml.pre", s("gpt-2"))]),
            "loaded"
        );
        let e = load_error("llama-pre", &[("tokenizer.ggml.pre", s("llama-bpe"))]);
        assert!(e.contains("pre-tokenizer `llama-bpe`"), "{e}");
        let e = load_error("qwen-arch", &[("general.architecture", s("qwen2"))]);
        assert!(e.contains("architecture qwen2 is not supported"), "{e}");
        let e = load_error("yarn", &[("llama.rope.scaling.type", s("yarn"))]);
        assert!(e.contains("rope scaling `yarn`"), "{e}");
        assert_eq!(
            load_error("no-scaling", &[("llama.rope.scaling.type", s("none"))]),
            "loaded"
        );
    }
}
