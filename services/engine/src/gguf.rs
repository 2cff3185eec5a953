//! Reading a GGUF file: hyper-parameters, tokenizer, chat template, weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::model::LlamaConfig;
use crate::{EngineError, Result};

/// A GGUF file opened and parsed, with the weights still on disk.
pub struct GgufFile {
    content: Content,
    file: std::fs::File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let content = Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        Ok(Self { content, file })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::Load(format!("missing metadata key {key}")))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .to_f32()
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))
    }

    pub fn get_strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))
    }

    pub fn get_i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))?
            .iter()
            .map(|v| v.to_i32())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| EngineError::Load(format!("{key}: {e}")))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads one tensor as stored (quantized or not), on the CPU.
    pub fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| EngineError::Load(format!("tensor {name}: {e}")))
    }

    /// Loads one tensor and dequantizes it to f32.
    ///
    /// SmolLM2's weights are Q4_1; running them through candle's quantized
    /// matmul quantizes the *activations* to 8 bits as well, and at 135M
    /// parameters that is enough to turn "Paris" into nonsense. Dequantized
    /// weights with f32 activations answer correctly.
    pub fn tensor_f32(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.file, name, device)
            .map_err(|e| EngineError::Load(format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?)
    }

    /// The llama hyper-parameters from `llama.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::Load(format!(
                "architecture {arch} is not supported (llama only)"
            )));
        }
        let hidden = self.get_u32("llama.embedding_length")? as usize;
        let n_heads = self.get_u32("llama.attention.head_count")? as usize;
        let n_kv_heads = self
            .get_u32("llama.attention.head_count_kv")
            .unwrap_or(n_heads as u32) as usize;
        let vocab = match self.get_u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => self.get_strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(LlamaConfig {
            hidden,
            intermediate: self.get_u32("llama.feed_forward_length")? as usize,
            n_layers: self.get_u32("llama.block_count")? as usize,
            n_heads,
            n_kv_heads,
            vocab,
            rope_theta: self.get_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: self
                .get_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            context_length: self.get_u32("llama.context_length").unwrap_or(2048) as usize,
        })
    }
}
