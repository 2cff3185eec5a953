//! Merging an adapter into its base for serving: a copy of the base GGUF in
//! which each adapted projection becomes `W + B A * alpha / r`, re-quantized
//! to Q8_0 (8-bit blocks keep the adapter's small changes that 4-bit blocks
//! would round away); every other tensor is copied as stored. The serving
//! engine reads Q8_0 and Q4_1 alike. An adapter's q and k rows are in the
//! order the forward pass computes in; a family that stores them otherwise
//! (Qwen2) gets its change in the file's order, and one that fuses
//! projections into one matrix (Phi-3) gets each at its rows there.

use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use flywheel_model::gguf::GgufFile;

use crate::lora::Lora;

/// Writes `out`: `base` with `lora` merged in. `note` goes into the
/// metadata (`flywheel.merged_adapter`) so the file says what it is.
pub fn merge_to_gguf(base: &Path, lora: &Lora, out: &Path, note: &str) -> anyhow::Result<()> {
    let mut gguf = GgufFile::open(base).with_context(|| format!("opening {}", base.display()))?;
    let cfg = flywheel_model::LlamaConfig::from_gguf(&gguf)?;
    let scale = lora.config.scale();
    let names = gguf.tensor_names();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let stored = gguf.qtensor(&name)?;
        // The adapted projections stored in this tensor, each at its rows
        // (several where the family fuses them: Phi-3's `attn_qkv`).
        let pairs: Vec<_> = lora
            .pairs
            .iter()
            .filter_map(|(&(layer, proj), p)| {
                let (tensor, first) = cfg.stored_at(layer, proj);
                (tensor == name).then_some((proj, first, p))
            })
            .collect();
        if pairs.is_empty() {
            tensors.push((name, stored));
            continue;
        }
        let mut w = stored.dequantize(&Device::Cpu)?;
        for (proj, first, p) in pairs {
            let mut delta: Tensor = (p.b.as_tensor().matmul(p.a.as_tensor())? * scale)?;
            if let Some(order) = cfg.row_order(proj) {
                // Row r of the delta belongs in the file's row order[r].
                let back = flywheel_model::config::inverse_order(&order);
                delta = flywheel_model::config::gather_rows(&delta, &back)?;
            }
            let rows = delta.dim(0)?;
            w = w.slice_assign(
                &[first..first + rows, 0..w.dim(1)?],
                &(w.narrow(0, first, rows)? + delta)?,
            )?;
        }
        tensors.push((name, QTensor::quantize(&w, GgmlDType::Q8_0)?));
    }
    let mut metadata: Vec<(String, Value)> = gguf
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.retain(|(k, _)| k != "flywheel.merged_adapter");
    metadata.push((
        "flywheel.merged_adapter".into(),
        Value::String(note.to_string()),
    ));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = out.with_extension("partial");
    let mut w = std::fs::File::create(&tmp)?;
    gguf_file::write(&mut w, &md, &ts)?;
    w.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}
