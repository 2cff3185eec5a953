//! Adapters in Hugging Face PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, so
//! PEFT and vLLM load what we train and we load what they train.
//!
//! Our forward passes compute q and k with their rows permuted for
//! interleaved rotary embeddings (as llama.cpp's converter stores llama's;
//! other families are brought to that order at load); Hugging Face
//! checkpoints are not permuted. `B`'s rows follow the projection's output rows,
//! so they are permuted back on save and forward again on load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor, Var};
use flywheel_model::config::{gather_rows, interleaved_from_halves, inverse_order};
use flywheel_model::{Llama, LlamaConfig, Proj};
use serde_json::json;

use crate::lora::{Lora, LoraConfig, LoraPair};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn tensor_name(layer: usize, proj: Proj, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{ab}.weight",
        proj.hf_name()
    )
}

/// Interleaved row order -> Hugging Face row order, for `(heads * hd, r)`.
fn to_hf_rows(b: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let order = interleaved_from_halves(heads, b.dim(0)? / heads);
    gather_rows(b, &inverse_order(&order))
}

/// Hugging Face row order -> interleaved row order.
fn from_hf_rows(b: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    gather_rows(b, &interleaved_from_halves(heads, b.dim(0)? / heads))
}

/// Writes `lora` to `dir` in PEFT layout.
pub fn save(lora: &Lora, model: &Llama, base_name: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (&(layer, proj), p) in &lora.pairs {
        let mut b = p.b.as_tensor().to_device(&Device::Cpu)?;
        if let Some(heads) = model.config().rotated_heads(proj) {
            b = to_hf_rows(&b, heads)?;
        }
        tensors.insert(
            tensor_name(layer, proj, "A"),
            p.a.as_tensor().to_device(&Device::Cpu)?,
        );
        tensors.insert(tensor_name(layer, proj, "B"), b);
    }
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
    let c = &lora.config;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": c.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "modules_to_save": null,
    });
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

/// Reads a PEFT LoRA adapter for `model` from `dir`.
pub fn load(model: &Llama, dir: &Path) -> anyhow::Result<Lora> {
    load_for(model.config(), model.device(), dir)
}

/// Reads a PEFT LoRA adapter for a model of `cfg`'s shape from `dir`, onto
/// `device`, without the model itself (serving loads adapters this way).
pub fn load_for(shape: &LlamaConfig, device: &Device, dir: &Path) -> anyhow::Result<Lora> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
        .with_context(|| format!("reading {}", dir.join(CONFIG_FILE).display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)?;
    if cfg["peft_type"] != "LORA" {
        bail!("not a LoRA adapter: peft_type is {}", cfg["peft_type"]);
    }
    if cfg["use_rslora"] == true || cfg["use_dora"] == true {
        bail!("rsLoRA and DoRA adapters are not supported");
    }
    let rank = cfg["r"].as_u64().context("adapter_config.json has no r")? as usize;
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(rank as f64);
    let targets: Vec<Proj> = match &cfg["target_modules"] {
        serde_json::Value::Array(_) => serde_json::from_value(cfg["target_modules"].clone())
            .context("target_modules names a module other than the llama projections")?,
        other => bail!("target_modules must be a list, not {other}"),
    };
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)?;
    let mut pairs = BTreeMap::new();
    for layer in 0..shape.n_layers {
        for &proj in &targets {
            let get = |ab: &str| {
                let name = tensor_name(layer, proj, ab);
                tensors
                    .get(&name)
                    .cloned()
                    .with_context(|| format!("{WEIGHTS_FILE} has no {name}"))
            };
            let a = get("A")?;
            let mut b = get("B")?;
            let (out, inp) = shape.proj_shape(proj);
            if a.dims2()? != (rank, inp) || b.dims2()? != (out, rank) {
                bail!(
                    "{} of layer {layer}: shapes {:?} and {:?} do not fit a ({out}, {inp}) projection at rank {rank}",
                    proj.hf_name(),
                    a.dims(),
                    b.dims()
                );
            }
            if let Some(heads) = shape.rotated_heads(proj) {
                b = from_hf_rows(&b, heads)?;
            }
            pairs.insert(
                (layer, proj),
                LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                },
            );
        }
    }
    Ok(Lora {
        config: LoraConfig {
            rank,
            alpha,
            dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
            targets,
            seed: 0,
        },
        pairs,
        training: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_permutation_round_trips_and_matches_llama_cpp() {
        // 2 heads of 8 rows: HF rows [h0: 0..8 | h1: 8..16]; GGUF
        // interleaves each head's halves (a permutation that is not its
        // own inverse, so the two directions cannot be swapped unnoticed).
        let hf = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((16, 1))
            .unwrap();
        let gguf = from_hf_rows(&hf, 2).unwrap();
        assert_eq!(
            gguf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![
                0., 4., 1., 5., 2., 6., 3., 7., 8., 12., 9., 13., 10., 14., 11., 15.
            ]
        );
        let back = to_hf_rows(&gguf, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
