//! A slower copy of a model that answers exactly as it does: the same GGUF
//! with layers added whose projections are all zero. Such a layer adds
//! nothing to the residual stream (attention over zero values is zero, and
//! so is the MLP of zero gates), so every answer and log-probability stays
//! the same, while each token costs the extra layers' work: a candidate
//! that is really slower per token and otherwise identical, for the
//! latency rule.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Writes `out`: `src` with `extra` idle layers after its own.
pub fn with_idle_layers(src: &Path, out: &Path, extra: usize) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(src)?;
    let content = gguf_file::Content::read(&mut file)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        other => anyhow::bail!("no architecture in {}: {other:?}", src.display()),
    };
    let count_key = format!("{arch}.block_count");
    let layers = content
        .metadata
        .get(&count_key)
        .map(|v| v.to_u32())
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no {count_key}"))? as usize;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        tensors.push((name.clone(), content.tensor(&mut file, name, &Device::Cpu)?));
    }
    let first: Vec<(String, QTensor)> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("blk.0."))
        .map(|(n, _)| Ok((n.clone(), content.tensor(&mut file, n, &Device::Cpu)?)))
        .collect::<anyhow::Result<_>>()?;
    for layer in layers..layers + extra {
        for (name, t) in &first {
            let renamed = name.replacen("blk.0.", &format!("blk.{layer}."), 1);
            let tensor = if name.contains("norm") {
                QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::F32)?
            } else {
                let zeros = Tensor::zeros(t.shape(), DType::F32, &Device::Cpu)?;
                QTensor::quantize(&zeros, GgmlDType::Q8_0)?
            };
            tensors.push((renamed, tensor));
        }
    }
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in metadata.iter_mut() {
        if *k == count_key {
            *v = Value::U32((layers + extra) as u32);
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    gguf_file::write(&mut w, &md, &ts)?;
    Ok(())
}
