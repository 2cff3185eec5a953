//! Reading a GGUF file: hyper-parameters, tokenizer, chat template, weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::{ModelError, Result};

/// A GGUF file opened and parsed, with the weights still on disk.
pub struct GgufFile {
    content: Content,
    file: std::fs::File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let content = Content::read(&mut file)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Ok(Self { content, file })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Load(format!("missing metadata key {key}")))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .to_f32()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key, Value::to_i32)
    }

    pub fn get_f32s(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key, Value::to_f32)
    }

    /// An array's values, each read by `read`.
    fn get_array<T>(
        &self,
        key: &str,
        read: impl Fn(&Value) -> candle_core::Result<T>,
    ) -> Result<Vec<T>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
            .iter()
            .map(read)
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .to_bool()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    /// The Hugging Face repository the file was converted from, where its
    /// metadata names one (llama.cpp's converter writes
    /// `general.source.huggingface.repository`, or a `general.source.url`
    /// on huggingface.co): the base an adapter's PEFT config should name.
    pub fn hub_source(&self) -> Option<String> {
        if let Ok(repo) = self.get_str("general.source.huggingface.repository")
            && repo.split('/').count() == 2
        {
            return Some(repo.to_string());
        }
        let url = self.get_str("general.source.url").ok()?;
        let path = url.strip_prefix("https://huggingface.co/")?;
        let mut parts = path.split('/');
        match (parts.next(), parts.next()) {
            (Some(owner), Some(repo)) if !owner.is_empty() && !repo.is_empty() => {
                Some(format!("{owner}/{repo}"))
            }
            _ => None,
        }
    }

    /// Every tensor's name, in the order the file stores them.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name, info.offset))
            .collect();
        names.sort_by_key(|(_, offset)| *offset);
        names.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// A tensor's dimensions as stored (rows first), if the file has it.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims())
    }

    /// A tensor's type as stored, if the file has it.
    pub fn tensor_dtype(&self, name: &str) -> Option<candle_core::quantized::GgmlDType> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads one tensor as stored (quantized or not), on the CPU.
    pub fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| ModelError::Load(format!("tensor {name}: {e}")))
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
            .map_err(|e| ModelError::Load(format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?)
    }
}
