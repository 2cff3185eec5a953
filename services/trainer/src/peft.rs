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
use candle_core::{DType, Device, Tensor, Var};
use flywheel_model::config::{gather_rows, interleaved_from_halves, inverse_order};
use flywheel_model::{Llama, LlamaConfig, Proj};
use serde_json::json;

use crate::lora::{Lora, LoraConfig, LoraPair};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A module of a checkpoint that adapters target: one projection, or in a
/// family that fuses projections into one matrix (Phi-3) the fused matrix,
/// named as PEFT names it.
#[derive(Debug, Clone, PartialEq)]
struct Module {
    /// PEFT's `target_modules` name (`q_proj`, `qkv_proj`).
    name: &'static str,
    /// Its path in a layer (`self_attn.qkv_proj`).
    path: &'static str,
    /// The projections it holds, in the order of its rows.
    projs: Vec<Proj>,
}

/// The modules of `cfg`'s family, in [`Proj::ALL`]'s order.
fn modules(cfg: &LlamaConfig) -> Vec<Module> {
    let mut out: Vec<Module> = Vec::new();
    for p in Proj::ALL {
        let (name, path) = match p {
            Proj::Q | Proj::K | Proj::V if cfg.fused_qkv => ("qkv_proj", "self_attn.qkv_proj"),
            Proj::Gate | Proj::Up if cfg.fused_gate_up => ("gate_up_proj", "mlp.gate_up_proj"),
            _ => {
                let path = p.hf_name();
                (path.rsplit('.').next().unwrap_or(path), path)
            }
        };
        match out.iter_mut().find(|m| m.name == name) {
            Some(m) => m.projs.push(p),
            None => out.push(Module {
                name,
                path,
                projs: vec![p],
            }),
        }
    }
    out
}

fn tensor_name(layer: usize, module: &Module, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{ab}.weight",
        module.path
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

/// Writes `lora` to `dir` in PEFT layout. In a family that fuses
/// projections (Phi-3's `qkv_proj`, `gate_up_proj`), the adapters of a
/// fused module's projections become one of their summed rank: `A` their
/// `A`s stacked, `B` block-diagonal (zero where a projection has none),
/// exactly the sum of their deltas; `rank_pattern` and `alpha_pattern` give
/// it the same scale as the rest.
pub fn save(lora: &Lora, model: &Llama, base_name: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = model.config();
    let c = &lora.config;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut targets: Vec<&'static str> = Vec::new();
    let (mut ranks, mut alphas) = (serde_json::Map::new(), serde_json::Map::new());
    for module in modules(cfg) {
        let members: Vec<Proj> = module
            .projs
            .iter()
            .copied()
            .filter(|p| c.targets.contains(p))
            .collect();
        if members.is_empty() {
            continue;
        }
        targets.push(module.name);
        if module.projs.len() > 1 {
            ranks.insert(module.name.into(), json!(members.len() * c.rank));
            alphas.insert(module.name.into(), json!(members.len() as f64 * c.alpha));
        }
        for layer in 0..cfg.n_layers {
            let (mut a_parts, mut b_blocks) = (Vec::new(), Vec::new());
            let mut col = 0;
            let width: usize = members
                .iter()
                .map(|p| {
                    lora.pairs
                        .get(&(layer, *p))
                        .map_or(0, |x| x.a.as_tensor().dim(0).unwrap_or(0))
                })
                .sum();
            for &proj in &module.projs {
                let rows = cfg.proj_shape(proj).0;
                let Some(p) = lora.pairs.get(&(layer, proj)) else {
                    b_blocks.push(Tensor::zeros((rows, width), DType::F32, &Device::Cpu)?);
                    continue;
                };
                let a = p.a.as_tensor().to_device(&Device::Cpu)?;
                let mut b = p.b.as_tensor().to_device(&Device::Cpu)?;
                if let Some(heads) = cfg.rotated_heads(proj) {
                    b = to_hf_rows(&b, heads)?;
                }
                let r = a.dim(0)?;
                let block = Tensor::zeros((rows, width), DType::F32, &Device::Cpu)?;
                b_blocks.push(block.slice_assign(&[0..rows, col..col + r], &b)?);
                a_parts.push(a);
                col += r;
            }
            if a_parts.is_empty() {
                continue;
            }
            tensors.insert(tensor_name(layer, &module, "A"), Tensor::cat(&a_parts, 0)?);
            tensors.insert(tensor_name(layer, &module, "B"), Tensor::cat(&b_blocks, 0)?);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
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
/// `device`, without the model itself (serving loads adapters this way). A
/// fused module's adapter (Phi-3's `qkv_proj`) is split into one per
/// projection: the same `A`, `B`'s rows of that projection, rank columns
/// where those rows are all zero left out (what [`save`] pads with). A
/// module whose `rank_pattern`/`alpha_pattern` gives it a scale of its own
/// has it folded into its `B`.
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
    let names: Vec<String> = match &cfg["target_modules"] {
        serde_json::Value::Array(_) => serde_json::from_value(cfg["target_modules"].clone())
            .context("target_modules must be a list of names")?,
        other => bail!("target_modules must be a list, not {other}"),
    };
    let family = modules(shape);
    let mut targeted: Vec<Module> = Vec::new();
    for name in &names {
        let Some(m) = family.iter().find(|m| m.name == name) else {
            let known: Vec<&str> = family.iter().map(|m| m.name).collect();
            bail!(
                "target_modules names {name}, not a module of a {} model ({})",
                shape.family,
                known.join(", ")
            );
        };
        targeted.push(m.clone());
    }
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)?;
    let scale = alpha / rank as f64;
    let mut pairs = BTreeMap::new();
    for module in &targeted {
        let m_rank = cfg["rank_pattern"][module.name]
            .as_u64()
            .map_or(rank, |r| r as usize);
        let m_alpha = cfg["alpha_pattern"][module.name].as_f64().unwrap_or(alpha);
        let fold = (m_alpha / m_rank as f64) / scale;
        for layer in 0..shape.n_layers {
            let get = |ab: &str| {
                let name = tensor_name(layer, module, ab);
                tensors
                    .get(&name)
                    .cloned()
                    .with_context(|| format!("{WEIGHTS_FILE} has no {name}"))
            };
            let a = get("A")?;
            let b_all = get("B")?;
            let inp = shape.proj_shape(module.projs[0]).1;
            let out: usize = module.projs.iter().map(|p| shape.proj_shape(*p).0).sum();
            if a.dims2()? != (m_rank, inp) || b_all.dims2()? != (out, m_rank) {
                bail!(
                    "{} of layer {layer}: shapes {:?} and {:?} do not fit a ({out}, {inp}) \
                     projection at rank {m_rank}",
                    module.path,
                    a.dims(),
                    b_all.dims()
                );
            }
            let mut first = 0;
            for &proj in &module.projs {
                let rows = shape.proj_shape(proj).0;
                let mut b = b_all.narrow(0, first, rows)?;
                first += rows;
                let mut a = a.clone();
                if module.projs.len() > 1 {
                    // The rank columns this projection uses.
                    let used: Vec<u32> = b
                        .abs()?
                        .sum(0)?
                        .to_vec1::<f32>()?
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| **s != 0.0)
                        .map(|(c, _)| c as u32)
                        .collect();
                    if used.is_empty() {
                        continue;
                    }
                    let used = Tensor::new(used, device)?;
                    a = a.index_select(&used, 0)?;
                    b = b.index_select(&used, 1)?;
                }
                if fold != 1.0 {
                    b = (b * fold)?;
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
    }
    let mut targets: Vec<Proj> = pairs.keys().map(|&(_, p)| p).collect();
    targets.sort();
    targets.dedup();
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
