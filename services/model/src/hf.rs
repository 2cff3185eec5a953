//! Hugging Face folders (`config.json`, `*.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`), converted into one
//! GGUF file laid out as llama.cpp's converter lays out that family, so
//! that everything after import (serving, training, merging, the memory
//! plan) reads one format.
//!
//! The weights keep their type (F32, F16, BF16; the norms and biases become
//! F32, as llama.cpp writes them) and are written one tensor at a time from
//! the memory-mapped safetensors. Llama's q and k rows are permuted as
//! llama.cpp permutes them. The tokenizer is not translated into GGUF's
//! keys: `tokenizer.json` goes into the file whole
//! (`tokenizer.huggingface.json`, a key of the GGUF spec) and is read back
//! through the `tokenizers` crate ([`crate::tokenizer`]). The chat template
//! (from `tokenizer_config.json` or `chat_template.jinja`), the begin and
//! end tokens, and every end token `generation_config.json` lists are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::config::{self, Proj, RopeRows, gather_rows, interleaved_from_halves};
use crate::gguf::{self, TensorSpec};
use crate::{ModelError, Result};

/// The GGUF key holding a Hugging Face `tokenizer.json`, whole.
pub const TOKENIZER_JSON: &str = "tokenizer.huggingface.json";
/// Every token that ends an answer, from `generation_config.json`.
pub const EOS_TOKEN_IDS: &str = "flywheel.eos_token_ids";

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// The GGUF architecture (`llama` for Llama and Mistral folders).
    pub architecture: &'static str,
    pub tensors: usize,
    pub bytes: u64,
}

/// Values per block of the quantized types written here.
const QUANT_BLOCK: usize = 32;

/// Whether `path` is a folder in Hugging Face's layout.
pub fn is_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// The files of a folder the conversion reads: what a hub download fetches.
/// `*.safetensors` and the index are matched by name; the rest are these.
pub const FOLDER_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// The GGUF architecture a folder's `config.json` `model_type` converts to.
fn architecture(model_type: &str) -> Result<&'static str> {
    match model_type {
        "llama" | "mistral" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        "qwen3" => Ok("qwen3"),
        "phi3" => Ok("phi3"),
        "gemma2" => Ok("gemma2"),
        "gemma3_text" => Ok("gemma3"),
        "smollm3" => Ok("smollm3"),
        other => Err(ModelError::Load(format!(
            "model_type `{other}` (config.json) is not supported: Flywheel converts \
             llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text (Gemma 3's text \
             models) and smollm3 folders"
        ))),
    }
}

/// A folder's module names, per layer, with their GGUF short names: the
/// norms, then the projections as [`Proj`] names them (the one table), and
/// in Phi-3 its fused matrices.
fn layer_tensors(arch: &str) -> impl Iterator<Item = (&'static str, &'static str)> {
    let own: &[(&str, &str)] = match arch {
        "phi3" => &[
            ("self_attn.qkv_proj", config::ATTN_QKV),
            ("mlp.gate_up_proj", config::FFN_GATE_UP),
        ],
        // Gemma's four norms: its post_attention_layernorm is the
        // attention output's, not the feed-forward's input's.
        _ if gemma(arch) => &[
            ("post_attention_layernorm", config::POST_ATTN_NORM),
            ("pre_feedforward_layernorm", config::FFN_NORM),
            ("post_feedforward_layernorm", config::POST_FFN_NORM),
        ],
        _ => &[],
    };
    own.iter()
        .copied()
        .chain([
            ("input_layernorm", config::ATTN_NORM),
            ("post_attention_layernorm", config::FFN_NORM),
            ("self_attn.q_norm", config::ATTN_Q_NORM),
            ("self_attn.k_norm", config::ATTN_K_NORM),
        ])
        .chain(Proj::ALL.map(|p| (p.hf_name(), p.gguf_name())))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))
}

fn read_optional_json(path: &Path) -> Result<Option<Json>> {
    match path.is_file() {
        true => read_json(path).map(Some),
        false => Ok(None),
    }
}

/// The hyper-parameters of `config.json`, as GGUF keys, and how its rope
/// is scaled.
struct Hparams {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    keys: Vec<(String, Value)>,
    /// Rope scaling's per-frequency factors, by GGUF tensor name: Llama
    /// 3.1's `rope_freqs.weight`, Phi-3's long and short ones.
    rope_factors: Vec<(&'static str, Vec<f32>)>,
}

fn hparams(config: &Json, arch: &str) -> Result<Hparams> {
    let bad = |what: String| ModelError::Load(format!("config.json: {what}"));
    let int = |k: &str| -> Result<usize> {
        config[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("no whole number `{k}`")))
    };
    // Gemma's gate activation is GELU's tanh approximation; the others'
    // SiLU.
    let (want, kind) = match gemma(arch) {
        true => ("gelu_pytorch_tanh", "a gemma"),
        false => ("silu", "a llama"),
    };
    let act = config["hidden_activation"]
        .as_str()
        .or(config["hidden_act"].as_str())
        .unwrap_or(want);
    if act != want {
        return Err(bad(format!("activation `{act}` ({kind} uses {want})")));
    }
    for k in ["attention_bias", "mlp_bias"] {
        if permuted(arch) && config[k].as_bool() == Some(true) {
            return Err(bad(format!(
                "`{k}` is set: a {arch} without biases is read"
            )));
        }
    }
    let family = crate::family::by_name(arch);
    if let Some(step) = family.and_then(|f| f.no_rope_step()) {
        no_rope_layers(config, int("num_hidden_layers")?, step)?;
    }
    if let Some((pattern, local_theta)) = family.and_then(|f| f.sliding()) {
        sliding_layers(config, int("num_hidden_layers")?, pattern, local_theta)?;
    }
    let (hidden, heads) = (int("hidden_size")?, int("num_attention_heads")?);
    let kv_heads = match config["num_key_value_heads"].as_u64() {
        Some(k) => k as usize,
        None => heads,
    };
    if heads == 0 || !hidden.is_multiple_of(heads) && config["head_dim"].is_null() {
        return Err(bad(format!("{hidden} dimensions over {heads} heads")));
    }
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |d| d as usize);
    // transformers 5 puts rope_theta and the scaling in `rope_parameters`;
    // older files have `rope_theta` and `rope_scaling` at the top.
    let rope = match &config["rope_parameters"] {
        // Per kind of layer (Gemma 3): the global layers' here, the local
        // ones' checked by `gemma3_layers`.
        Json::Object(p) if p.contains_key("full_attention") => p["full_attention"].clone(),
        Json::Object(_) => config["rope_parameters"].clone(),
        _ => {
            let mut r = config["rope_scaling"].clone();
            if !r.is_object() {
                r = serde_json::json!({});
            }
            r["rope_theta"] = config["rope_theta"].clone();
            r
        }
    };
    // transformers' defaults where a config gives no base: Gemma 3's
    // global layers 1,000,000, the others 10,000.
    let theta = rope["rope_theta"].as_f64().unwrap_or(match arch {
        "gemma3" => 1_000_000.0,
        _ => 10_000.0,
    });
    let kind = rope["rope_type"]
        .as_str()
        .or(rope["type"].as_str())
        .unwrap_or("default");
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let partial = rope["partial_rotary_factor"]
        .as_f64()
        .or(config["partial_rotary_factor"].as_f64())
        .unwrap_or(1.0);
    if partial != 1.0 {
        return Err(bad(format!(
            "partial_rotary_factor {partial}: rotary embeddings over part of each head are \
             not supported"
        )));
    }
    let mut scaling_keys = Vec::new();
    let rope_factors = match kind {
        "default" => Vec::new(),
        "linear" => {
            let factor = rope["factor"]
                .as_f64()
                .filter(|f| *f > 0.0)
                .ok_or_else(|| bad("linear rope scaling without a factor".into()))?;
            scaling_keys.push((key("rope.scaling.type"), Value::String("linear".into())));
            scaling_keys.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
            Vec::new()
        }
        "llama3" => vec![(
            crate::family::ROPE_FACTORS,
            llama3_rope_factors(&rope, theta, head_dim)?,
        )],
        "longrope" | "su" if arch == "phi3" => {
            let lr = longrope(config, &rope, head_dim)?;
            scaling_keys.push((key("rope.scaling.original_context_length"), u(lr.original)));
            scaling_keys.push((key("rope.scaling.attn_factor"), Value::F32(lr.attn_factor)));
            vec![
                (crate::family::ROPE_FACTORS_LONG, lr.long),
                (crate::family::ROPE_FACTORS_SHORT, lr.short),
            ]
        }
        other => {
            return Err(bad(format!(
                "rope scaling `{other}` is not supported (none, linear, llama3, and Phi-3's \
                 longrope are)"
            )));
        }
    };
    let mut keys = vec![
        (key("block_count"), u(int("num_hidden_layers")?)),
        (
            key("context_length"),
            u(int("max_position_embeddings").unwrap_or(2048)),
        ),
        (key("embedding_length"), u(hidden)),
        (key("feed_forward_length"), u(int("intermediate_size")?)),
        (key("attention.head_count"), u(heads)),
        (key("attention.head_count_kv"), u(kv_heads)),
        (key("rope.freq_base"), Value::F32(theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
        (key("vocab_size"), u(int("vocab_size")?)),
    ];
    keys.extend(scaling_keys);
    // A sliding window (Mistral v0.1's 4,096 positions), which the loader
    // caps the context at (`attention.sliding_window`, as llama.cpp writes
    // it for the families that have one); Qwen2's configs carry one they
    // do not use.
    if config["use_sliding_window"].as_bool() != Some(false)
        && let Some(window) = config["sliding_window"].as_u64()
    {
        keys.push((key("attention.sliding_window"), u(window as usize)));
    }
    if gemma(arch) {
        for (k, gguf_key) in [
            ("attn_logit_softcapping", "attn_logit_softcapping"),
            ("final_logit_softcapping", "final_logit_softcapping"),
        ] {
            if let Some(cap) = config[k].as_f64() {
                keys.push((key(gguf_key), Value::F32(cap as f32)));
            }
        }
        if let Some(q) = config["query_pre_attn_scalar"].as_f64() {
            keys.push((
                crate::family::QUERY_PRE_ATTN_SCALAR.into(),
                Value::F32(q as f32),
            ));
        }
    }
    if head_dim * heads != hidden {
        keys.push((key("attention.key_length"), u(head_dim)));
        keys.push((key("attention.value_length"), u(head_dim)));
    }
    Ok(Hparams {
        heads,
        kv_heads,
        head_dim,
        keys,
        rope_factors,
    })
}

/// Whether llama.cpp's converter permutes the family's q and k rows for
/// interleaved rotary embeddings (its `LlamaModel` and what derives from
/// it), rather than storing them as Hugging Face does: the family's own
/// [`Family::gguf_rope_rows`](crate::family::Family::gguf_rope_rows).
fn permuted(arch: &str) -> bool {
    crate::family::by_name(arch).is_some_and(|f| f.gguf_rope_rows() == RopeRows::Interleaved)
}

/// Whether the family has Gemma's layer ([`Family::gemma`](crate::family::Family::gemma)).
fn gemma(arch: &str) -> bool {
    crate::family::by_name(arch).is_some_and(|f| f.gemma())
}

/// SmolLM3's layers without a rotary embedding must be the last of every
/// `step` (4), the pattern llama.cpp fixes for the architecture (its files
/// have no key for it): `no_rope_layers` (1 where a layer rotates) and
/// `no_rope_layer_interval` are checked against it.
fn no_rope_layers(config: &Json, layers: usize, step: usize) -> Result<()> {
    let bad = |what: String| ModelError::Load(format!("config.json: {what}"));
    let given_step = config["no_rope_layer_interval"]
        .as_u64()
        .map_or(step, |s| s as usize);
    let pattern: Vec<u64> = (0..layers)
        .map(|i| u64::from(!(i + 1).is_multiple_of(step)))
        .collect();
    let given: Option<Vec<u64>> = config["no_rope_layers"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(u64::MAX)).collect());
    match given {
        Some(list) if list != pattern => Err(bad(format!(
            "no_rope_layers {list:?}: layers without a rotary embedding other than the \
             last of every {step} are not supported (llama.cpp's files cannot say so)"
        ))),
        None if given_step != step => Err(bad(format!(
            "no_rope_layer_interval {given_step}: only the last of every {step} layers \
             without a rotary embedding is supported (llama.cpp's files cannot say otherwise)"
        ))),
        _ => Ok(()),
    }
}

/// The local (sliding-window) and global layers must be the pattern
/// llama.cpp fixes for the architecture (Gemma 2's one local to one global,
/// Gemma 3's five to one: the last of every `pattern` global), the local
/// layers turning by their own rotary base (`local_theta`, Gemma 3's
/// 10,000) without scaling where they have one: its files can record
/// neither.
fn sliding_layers(
    config: &Json,
    layers: usize,
    pattern: usize,
    local_theta: Option<f32>,
) -> Result<()> {
    let bad = |what: String| ModelError::Load(format!("config.json: {what}"));
    // EmbeddingGemma shares the model_type and attends both ways: not a
    // model that generates.
    if config["use_bidirectional_attention"].as_bool() == Some(true) {
        return Err(bad(
            "use_bidirectional_attention is set (an embedding model, such as EmbeddingGemma): \
             Flywheel serves models that generate"
                .into(),
        ));
    }
    let types: Vec<&str> = (0..layers)
        .map(|i| match (i + 1).is_multiple_of(pattern) {
            true => "full_attention",
            false => "sliding_attention",
        })
        .collect();
    if let Some(given) = config["layer_types"].as_array() {
        let given: Vec<&str> = given.iter().map(|t| t.as_str().unwrap_or("?")).collect();
        if given != types {
            return Err(bad(format!(
                "layer_types {given:?}: only {} sliding-window layers to one global, in \
                 that order, are supported (llama.cpp's files cannot say otherwise)",
                pattern - 1
            )));
        }
    } else if let Some(p) = config["sliding_window_pattern"].as_u64()
        && p as usize != pattern
    {
        return Err(bad(format!(
            "sliding_window_pattern {p}: only {pattern} is supported (llama.cpp's files cannot \
             say otherwise)"
        )));
    }
    let Some(want) = local_theta else {
        return Ok(());
    };
    let local = &config["rope_parameters"]["sliding_attention"];
    let (theta, kind) = match local.is_object() {
        true => (
            local["rope_theta"].as_f64(),
            local["rope_type"].as_str().unwrap_or("default"),
        ),
        false => (config["rope_local_base_freq"].as_f64(), "default"),
    };
    if theta.is_some_and(|t| t != f64::from(want)) || kind != "default" {
        return Err(bad(format!(
            "the sliding-window layers' rope (base {theta:?}, {kind}): only a base of {want} \
             without scaling is supported (llama.cpp's files cannot say otherwise)"
        )));
    }
    Ok(())
}

/// Phi-3's longrope, as GGUF keeps it.
struct LongRope {
    long: Vec<f32>,
    short: Vec<f32>,
    original: usize,
    attn_factor: f32,
}

/// Phi-3's longrope from its config: the long and short factors (one per
/// rotary frequency, which it is divided by), the original context, and the
/// attention factor the cosines and sines are scaled by, given or, as
/// transformers computes it, `sqrt(1 + ln(factor) / ln(original))` with
/// `factor` the context over the original one.
fn longrope(config: &Json, rope: &Json, head_dim: usize) -> Result<LongRope> {
    let bad = |what: String| ModelError::Load(format!("config.json: longrope {what}"));
    let factors = |k: &str| -> Result<Vec<f32>> {
        let list = rope[k]
            .as_array()
            .ok_or_else(|| bad(format!("has no `{k}` list")))?;
        let v: Vec<f32> = list
            .iter()
            .filter_map(|x| x.as_f64())
            .map(|x| x as f32)
            .collect();
        if v.len() != head_dim / 2 || v.len() != list.len() {
            return Err(bad(format!(
                "`{k}` holds {} numbers for {} rotary frequencies",
                list.len(),
                head_dim / 2
            )));
        }
        Ok(v)
    };
    let original = rope["original_max_position_embeddings"]
        .as_u64()
        .or(config["original_max_position_embeddings"].as_u64())
        .ok_or_else(|| bad("has no original_max_position_embeddings".into()))?
        as usize;
    let attn_factor = match rope["attention_factor"].as_f64() {
        Some(a) => a,
        None => {
            let factor = rope["factor"].as_f64().unwrap_or_else(|| {
                config["max_position_embeddings"].as_f64().unwrap_or(0.0) / original as f64
            });
            match factor > 1.0 {
                true => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                false => 1.0,
            }
        }
    };
    Ok(LongRope {
        long: factors("long_factor")?,
        short: factors("short_factor")?,
        original,
        attn_factor: attn_factor as f32,
    })
}

/// Llama 3.1's rope scaling as one factor per rotary frequency, which the
/// frequency is divided by: frequencies whose wavelength is short against
/// the original context kept, long ones divided by `factor`, those between
/// blended by wavelength (what llama.cpp's converter stores as
/// `rope_freqs.weight`).
fn llama3_rope_factors(rope: &Json, theta: f64, head_dim: usize) -> Result<Vec<f32>> {
    let get = |k: &str| {
        rope[k].as_f64().ok_or_else(|| {
            ModelError::Load(format!("config.json: llama3 rope scaling has no `{k}`"))
        })
    };
    let factor = get("factor")?;
    let (low, high) = (get("low_freq_factor")?, get("high_freq_factor")?);
    let original = get("original_max_position_embeddings")?;
    let (low_wave, high_wave) = (original / low, original / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wave = 2.0 * std::f64::consts::PI / freq;
            let f = if wave < high_wave {
                1.0
            } else if wave > low_wave {
                factor
            } else {
                let smooth = (original / wave - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect())
}

/// The weight files a folder's `model.safetensors.index.json` names, if it
/// has one (a hub download reads it to know which files to fetch).
pub fn indexed_weights(dir: &Path) -> Result<Option<Vec<String>>> {
    let Some(index) = read_optional_json(&dir.join("model.safetensors.index.json"))? else {
        return Ok(None);
    };
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Load("model.safetensors.index.json has no weight_map".into()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(Json::as_str)
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    Ok(Some(files))
}

/// The safetensors files of a folder: those its index names, or the one
/// `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(files) = indexed_weights(dir)? {
        return Ok(files.iter().map(|f| dir.join(f)).collect());
    }
    let one = dir.join("model.safetensors");
    match one.is_file() {
        true => Ok(vec![one]),
        false => Err(ModelError::Load(format!(
            "{} holds no model.safetensors or model.safetensors.index.json \
             (PyTorch .bin checkpoints are not read)",
            dir.display()
        ))),
    }
}

/// The GGUF name of a folder's tensor, `None` for what a converter leaves
/// out (precomputed rotary frequencies).
fn gguf_name(name: &str, arch: &str) -> Option<Option<String>> {
    if name.ends_with("rotary_emb.inv_freq") {
        return Some(None);
    }
    let global = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(Some(g.into()));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let short = layer_tensors(arch).find(|(m, _)| *m == module)?.1;
    Some(Some(format!("blk.{layer}.{short}.{kind}")))
}

/// A tensor to write: where it comes from and how.
struct Source {
    /// The folder's name for it.
    name: String,
    /// Rows to gather (llama's q and k), by [`interleaved_from_halves`].
    order: Option<Vec<usize>>,
    /// Gemma's norms multiply by `1 + weight`: llama.cpp stores the sum.
    plus_one: bool,
}

/// Converts the Hugging Face folder `dir` into the GGUF file `out`, then
/// reads `out` back as a model is read at load (hyper-parameters, every
/// tensor's size, the tokenizer, the template), so a folder that converts
/// is one that loads.
pub fn convert(dir: &Path, out: &Path) -> Result<Converted> {
    convert_as(dir, out, None)
}

/// [`convert`], the matrices quantized to `quantize` (Q8_0 or Q4_1, the
/// types the serving kernels compute on) where given, as llama.cpp's
/// converter does with `--outtype q8_0`: a smaller file and no
/// quantization at each load. Each row of a matrix splits into blocks of
/// 32; a matrix whose rows do not keeps its type.
pub fn convert_as(dir: &Path, out: &Path, quantize: Option<GgmlDType>) -> Result<Converted> {
    if let Some(q) = quantize
        && !matches!(q, GgmlDType::Q8_0 | GgmlDType::Q4_1)
    {
        return Err(ModelError::Invalid(format!(
            "quantizing to {q:?} (Q8_0 and Q4_1 are what the kernels compute on)"
        )));
    }
    let config = read_json(&dir.join("config.json"))?;
    let model_type = config["model_type"].as_str().unwrap_or_default();
    let arch = architecture(model_type)?;
    let hp = hparams(&config, arch)?;
    let tokenizer_json = std::fs::read_to_string(dir.join("tokenizer.json")).map_err(|e| {
        ModelError::Load(format!(
            "{}: {e} (a folder's tokenizer is read from its tokenizer.json)",
            dir.join("tokenizer.json").display()
        ))
    })?;
    let tokenizer: tokenizers::Tokenizer = tokenizer_json
        .parse()
        .map_err(|e| ModelError::Tokenizer(format!("tokenizer.json: {e}")))?;
    let tokenizer_config =
        read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let generation = read_optional_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ),
    ];
    metadata.extend(hp.keys.iter().cloned());
    metadata.push((TOKENIZER_JSON.into(), Value::String(tokenizer_json)));
    // Begin and end tokens: tokenizer_config.json names them (the end of an
    // assistant's turn for instruct models), generation_config.json gives
    // ids.
    let token_id = |v: &Json| -> Option<u32> {
        let text = v.as_str().or(v["content"].as_str())?;
        tokenizer.token_to_id(text)
    };
    let first_id = |v: &Json| v.as_u64().or(v[0].as_u64()).map(|i| i as u32);
    let bos = token_id(&tokenizer_config["bos_token"])
        .or_else(|| first_id(&generation["bos_token_id"]))
        .or_else(|| first_id(&config["bos_token_id"]));
    let eos = token_id(&tokenizer_config["eos_token"])
        .or_else(|| first_id(&generation["eos_token_id"]))
        .or_else(|| first_id(&config["eos_token_id"]));
    if let Some(id) = bos {
        metadata.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = eos {
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    let stops: Vec<Value> = match &generation["eos_token_id"] {
        Json::Array(ids) => ids.iter().filter_map(first_id).map(Value::U32).collect(),
        one => first_id(one).map(Value::U32).into_iter().collect(),
    };
    if !stops.is_empty() {
        metadata.push((EOS_TOKEN_IDS.into(), Value::Array(stops)));
    }
    if let Some(template) = chat_template(dir, &tokenizer_config)? {
        metadata.push(("tokenizer.chat_template".into(), Value::String(template)));
    }

    let st = map_weights(&weight_files(dir)?)?;
    let mut found: BTreeMap<(usize, usize, String), (TensorSpec, Source)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(target) = gguf_name(&name, arch) else {
            return Err(ModelError::Load(format!(
                "tensor {name} is not one a {model_type} model has"
            )));
        };
        let Some(target) = target else { continue };
        let dims = view.shape().to_vec();
        let dtype = match (quantize, view.dtype(), dims.len()) {
            (_, _, 1) => GgmlDType::F32,
            (Some(q), _, 2) if dims[1] % QUANT_BLOCK == 0 => q,
            (_, safetensors::Dtype::F32, _) => GgmlDType::F32,
            (_, safetensors::Dtype::F16, _) => GgmlDType::F16,
            (_, safetensors::Dtype::BF16, _) => GgmlDType::BF16,
            (_, other, _) => {
                return Err(ModelError::Load(format!(
                    "tensor {name} is {other:?} (F32, F16 and BF16 are read)"
                )));
            }
        };
        let heads = match () {
            _ if !permuted(arch) => None,
            _ if name.contains(".q_proj.") => Some(hp.heads),
            _ if name.contains(".k_proj.") => Some(hp.kv_heads),
            _ => None,
        };
        let order = heads.map(|h| interleaved_from_halves(h, hp.head_dim));
        // Files in layer order, each layer's in the order llama.cpp writes.
        let sort = match target.strip_prefix("blk.") {
            Some(rest) => {
                let (layer, short) = rest.split_once('.').unwrap_or_default();
                let pos = layer_tensors(arch)
                    .position(|(_, s)| short.starts_with(&format!("{s}.")))
                    .unwrap_or(0);
                (1 + layer.parse::<usize>().unwrap_or(0), pos, target.clone())
            }
            None if target == "token_embd.weight" => (0, 0, target.clone()),
            None => (usize::MAX, 0, target.clone()),
        };
        found.insert(
            sort,
            (
                TensorSpec {
                    name: target,
                    dims,
                    dtype,
                },
                Source {
                    plus_one: gemma(arch) && name.ends_with("norm.weight"),
                    name,
                    order,
                },
            ),
        );
    }
    // Transformers ties the output to the embedding only when the config
    // says so; a folder that says not and holds no output is broken.
    if config["tie_word_embeddings"].as_bool() == Some(false)
        && !found.values().any(|(spec, _)| spec.name == "output.weight")
    {
        return Err(ModelError::Load(
            "config.json says tie_word_embeddings is false, and no lm_head.weight is in the \
             weights"
                .into(),
        ));
    }
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut sources: Vec<Option<Source>> = Vec::new();
    for (name, f) in &hp.rope_factors {
        specs.push(TensorSpec {
            name: (*name).into(),
            dims: vec![f.len()],
            dtype: GgmlDType::F32,
        });
        sources.push(None);
    }
    for (_, (spec, source)) in found {
        specs.push(spec);
        sources.push(Some(source));
    }
    let bytes = gguf::write(out, &metadata, &specs, |i| {
        let Some(source) = &sources[i] else {
            let factors = &hp.rope_factors[i].1;
            return Ok(factors.iter().flat_map(|x| x.to_le_bytes()).collect());
        };
        tensor_bytes(&st, source, &specs[i])
    })?;

    // Read back as a load reads it.
    let files = crate::ModelFiles::open(out)?;
    files.config.check_tensors(&files.gguf)?;
    Ok(Converted {
        architecture: arch,
        tensors: specs.len(),
        bytes,
    })
}

/// The safetensors files, memory-mapped: a converter reads each weight
/// once, and an 8B model's 16 GB need not fit in memory beside its copy.
#[allow(unsafe_code)]
fn map_weights(files: &[PathBuf]) -> Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the maps are read only, for the length of one conversion; a
    // file another process changes meanwhile gives wrong bytes (as reading
    // it would), which the check after writing may catch, never unsafety
    // in this process beyond what reading a changing file gives.
    unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| ModelError::Load(format!("safetensors: {e}")))
}

/// The chat template: `tokenizer_config.json`'s `chat_template` (a string,
/// or a list of named templates, of which `default`), else the
/// `chat_template.jinja` file transformers now saves beside it.
fn chat_template(dir: &Path, tokenizer_config: &Json) -> Result<Option<String>> {
    match &tokenizer_config["chat_template"] {
        Json::String(s) => return Ok(Some(s.clone())),
        Json::Array(named) => {
            if let Some(t) = named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                return Ok(Some(t.to_string()));
            }
        }
        _ => {}
    }
    let file = dir.join("chat_template.jinja");
    match file.is_file() {
        true => std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| ModelError::Load(format!("{}: {e}", file.display()))),
        false => Ok(None),
    }
}

/// One tensor's bytes as the GGUF file stores them: vectors as F32, rows
/// gathered where llama's q and k are permuted.
fn tensor_bytes(
    st: &candle_core::safetensors::MmapedSafetensors,
    source: &Source,
    spec: &TensorSpec,
) -> Result<Vec<u8>> {
    let load = |e: candle_core::Error| ModelError::Load(format!("tensor {}: {e}", source.name));
    if matches!(spec.dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1) {
        // Rows put in order first, then each quantized in blocks.
        let mut t = st
            .load(&source.name, &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .map_err(load)?;
        if let Some(order) = &source.order {
            t = gather_rows(&t, order).map_err(load)?;
        }
        let q = candle_core::quantized::QTensor::quantize(&t, spec.dtype).map_err(load)?;
        return Ok(q.data().map_err(load)?.into_owned());
    }
    let view = st.get(&source.name).map_err(load)?;
    let raw = view.data();
    let data: Vec<u8> = match (spec.dtype, view.dtype()) {
        _ if source.plus_one => {
            let t = st
                .load(&source.name, &candle_core::Device::Cpu)
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(load)?;
            t.iter().flat_map(|x| (x + 1.0).to_le_bytes()).collect()
        }
        (GgmlDType::F32, safetensors::Dtype::F32)
        | (GgmlDType::F16, safetensors::Dtype::F16)
        | (GgmlDType::BF16, safetensors::Dtype::BF16) => raw.to_vec(),
        _ => {
            let t = st
                .load(&source.name, &candle_core::Device::Cpu)
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(load)?;
            t.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    let Some(order) = &source.order else {
        return Ok(data);
    };
    let rows = spec.dims[0];
    if order.len() != rows {
        return Err(ModelError::Load(format!(
            "tensor {} has {rows} rows where config.json makes it {}",
            source.name,
            order.len()
        )));
    }
    let row = data.len() / rows;
    Ok(order
        .iter()
        .flat_map(|&r| &data[r * row..(r + 1) * row])
        .copied()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_become_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias", "llama"),
            Some(Some("blk.3.attn_q.bias".into()))
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight", "llama"),
            Some(Some("blk.0.ffn_norm.weight".into()))
        );
        assert_eq!(
            gguf_name("lm_head.weight", "llama"),
            Some(Some("output.weight".into()))
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq", "llama"),
            Some(None)
        );
        // What no family here has is not dropped quietly.
        assert_eq!(
            gguf_name("model.layers.0.mlp.gate_up_proj.weight", "llama"),
            None
        );
        // Phi-3's fused matrices, as llama.cpp names them.
        assert_eq!(
            gguf_name("model.layers.1.mlp.gate_up_proj.weight", "phi3"),
            Some(Some("blk.1.ffn_up.weight".into()))
        );
        assert_eq!(
            gguf_name("model.layers.1.self_attn.qkv_proj.weight", "phi3"),
            Some(Some("blk.1.attn_qkv.weight".into()))
        );
        assert_eq!(gguf_name("model.vision_tower.weight", "llama"), None);
    }

    #[test]
    fn llama3_factors_keep_high_frequencies_and_divide_low_ones() {
        let rope = serde_json::json!({
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        });
        let f = llama3_rope_factors(&rope, 500_000.0, 128).unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        // Between, blended: rising from 1 to 8.
        let between: Vec<f32> = f.iter().copied().filter(|&x| x > 1.0 && x < 8.0).collect();
        assert!(!between.is_empty());
        assert!(between.windows(2).all(|w| w[0] <= w[1]), "{between:?}");
    }

    #[test]
    fn what_would_be_read_wrongly_is_refused_naming_it() {
        let e = architecture("gemma3").unwrap_err().to_string();
        assert!(e.contains("model_type `gemma3`"), "{e}");
        let base = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100,
        });
        assert!(hparams(&base, "llama").is_ok());
        let with = |k: &str, v: Json| {
            let mut c = base.clone();
            c[k] = v;
            hparams(&c, "llama")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(with("hidden_act", "gelu".into()).contains("activation `gelu`"));
        assert!(with("attention_bias", true.into()).contains("attention_bias"));
        let e = with(
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
        assert!(e.contains("rope scaling `yarn`"), "{e}");
        let e = with(
            "rope_parameters",
            serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4}),
        );
        // Longrope is Phi-3's, read there only.
        assert!(e.contains("rope scaling `longrope`"), "{e}");
        let e = with("partial_rotary_factor", 0.75.into());
        assert!(e.contains("partial_rotary_factor 0.75"), "{e}");
    }

    #[test]
    fn gemma3s_local_and_global_layers_are_checked_and_its_scaling_kept() {
        let sliding = |n: usize| -> Vec<Json> {
            (0..n)
                .map(|i| match (i + 1) % 6 {
                    0 => "full_attention".into(),
                    _ => "sliding_attention".into(),
                })
                .collect()
        };
        let mut gemma = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 12,
            "intermediate_size": 128, "vocab_size": 100, "head_dim": 32,
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 1024,
            "query_pre_attn_scalar": 256, "layer_types": sliding(12),
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        });
        let hp = hparams(&gemma, "gemma3").unwrap();
        assert_eq!(key(&hp, "gemma3.rope.freq_base").to_f32().unwrap(), 1e6);
        assert_eq!(
            key(&hp, "gemma3.rope.scaling.type").to_string().unwrap(),
            "linear"
        );
        assert_eq!(
            key(&hp, "gemma3.rope.scaling.factor").to_f32().unwrap(),
            8.0
        );
        assert_eq!(
            key(&hp, "gemma3.attention.sliding_window")
                .to_u32()
                .unwrap(),
            1024
        );
        // Another pattern of local and global layers, or another local
        // rope, cannot be recorded in llama.cpp's files: refused.
        gemma["layer_types"][0] = "full_attention".into();
        let e = hparams(&gemma, "gemma3").err().unwrap().to_string();
        assert!(e.contains("layer_types"), "{e}");
        gemma["layer_types"] = Json::Array(sliding(12));
        gemma["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e5.into();
        let e = hparams(&gemma, "gemma3").err().unwrap().to_string();
        assert!(e.contains("sliding-window layers' rope"), "{e}");
        gemma["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e4.into();
        gemma["use_bidirectional_attention"] = true.into();
        let e = hparams(&gemma, "gemma3").err().unwrap().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        // Older configs: the pattern and the local base at the top.
        let older = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 12,
            "intermediate_size": 128, "vocab_size": 100,
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
            "rope_local_base_freq": 10000.0, "rope_theta": 1e6,
        });
        assert!(hparams(&older, "gemma3").is_ok());
        // No base given: transformers' default for Gemma 3, not llama's.
        let mut bare = older.clone();
        bare.as_object_mut().unwrap().remove("rope_theta");
        let hp = hparams(&bare, "gemma3").unwrap();
        assert_eq!(key(&hp, "gemma3.rope.freq_base").to_f32().unwrap(), 1e6);
        let mut other = older.clone();
        other["sliding_window_pattern"] = 4.into();
        let e = hparams(&other, "gemma3").err().unwrap().to_string();
        assert!(e.contains("sliding_window_pattern 4"), "{e}");
    }

    #[test]
    fn smollm3s_layers_without_rope_must_be_every_fourth() {
        let mut smol = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 8,
            "intermediate_size": 128, "vocab_size": 100,
            "no_rope_layers": [1, 1, 1, 0, 1, 1, 1, 0], "no_rope_layer_interval": 4,
        });
        assert!(hparams(&smol, "smollm3").is_ok());
        smol["no_rope_layers"] = serde_json::json!([1, 1, 0, 1, 1, 0, 1, 1]);
        let e = hparams(&smol, "smollm3").err().unwrap().to_string();
        assert!(e.contains("no_rope_layers [1, 1, 0, 1, 1, 0, 1, 1]"), "{e}");
        // The interval alone (transformers builds the list from it).
        smol["no_rope_layers"] = Json::Null;
        assert!(hparams(&smol, "smollm3").is_ok());
        smol["no_rope_layer_interval"] = 3.into();
        let e = hparams(&smol, "smollm3").err().unwrap().to_string();
        assert!(e.contains("no_rope_layer_interval 3"), "{e}");
        // Its q and k rows are permuted as llama's, and biases refused.
        assert!(permuted("smollm3") && permuted("llama") && !permuted("qwen2"));
        smol["no_rope_layer_interval"] = 4.into();
        smol["attention_bias"] = true.into();
        let e = hparams(&smol, "smollm3").err().unwrap().to_string();
        assert!(e.contains("`attention_bias` is set"), "{e}");
    }

    #[test]
    fn gemma2s_caps_and_query_scaling_are_kept_and_its_activation_checked() {
        let mut gemma = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "head_dim": 32,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
            "sliding_window": 4096, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 144,
        });
        let hp = hparams(&gemma, "gemma2").unwrap();
        let f = |k: &str| key(&hp, k).to_f32().unwrap();
        assert_eq!(f("gemma2.attn_logit_softcapping"), 50.0);
        assert_eq!(f("gemma2.final_logit_softcapping"), 30.0);
        assert_eq!(f(crate::family::QUERY_PRE_ATTN_SCALAR), 144.0);
        assert_eq!(key(&hp, "gemma2.context_length").to_u32().unwrap(), 8192);
        let window = key(&hp, "gemma2.attention.sliding_window");
        assert_eq!(window.to_u32().unwrap(), 4096);
        assert_eq!(
            key(&hp, "gemma2.attention.key_length").to_u32().unwrap(),
            32
        );
        // Gemma's norms are stored as llama.cpp stores them, 1 added.
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight", "gemma2"),
            Some(Some("blk.0.post_attention_norm.weight".into()))
        );
        assert_eq!(
            gguf_name("model.layers.0.pre_feedforward_layernorm.weight", "gemma2"),
            Some(Some("blk.0.ffn_norm.weight".into()))
        );
        gemma["hidden_activation"] = "silu".into();
        let e = hparams(&gemma, "gemma2").err().unwrap().to_string();
        assert!(
            e.contains("activation `silu` (a gemma uses gelu_pytorch_tanh)"),
            "{e}"
        );
    }

    #[test]
    fn phi3s_longrope_becomes_two_factor_tensors_and_an_attention_factor() {
        let mut phi = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 1024,
            "original_max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]},
        });
        let hp = hparams(&phi, "phi3").unwrap();
        let names: Vec<&str> = hp.rope_factors.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["rope_factors_long.weight", "rope_factors_short.weight"]
        );
        assert_eq!(hp.rope_factors[0].1[7], 8.0);
        assert_eq!(hp.rope_factors[1].1[7], 1.5);
        let orig = key(&hp, "phi3.rope.scaling.original_context_length");
        assert_eq!(orig.to_u32().unwrap(), 64);
        // 1024 / 64 = 16: sqrt(1 + ln 16 / ln 64) = sqrt(1 + 4/6).
        let attn = key(&hp, "phi3.rope.scaling.attn_factor").to_f32().unwrap();
        assert!((attn - (1.0f32 + 4.0 / 6.0).sqrt()).abs() < 1e-6, "{attn}");
        phi["rope_parameters"]["attention_factor"] = 1.25.into();
        let hp = hparams(&phi, "phi3").unwrap();
        let attn = key(&hp, "phi3.rope.scaling.attn_factor").to_f32().unwrap();
        assert_eq!(attn, 1.25);
        phi["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]);
        let e = hparams(&phi, "phi3").err().unwrap().to_string();
        assert!(e.contains("`long_factor` holds 2 numbers for 8"), "{e}");
    }

    /// The value of `key` among a conversion's keys.
    fn key<'a>(hp: &'a Hparams, key: &str) -> &'a Value {
        &hp.keys.iter().find(|(k, _)| k == key).unwrap().1
    }

    #[test]
    fn older_configs_rope_and_sliding_window_are_read() {
        // transformers 4's layout, as Llama 3.1's config.json on the hub.
        let llama31 = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        });
        let hp = hparams(&llama31, "llama").unwrap();
        assert_eq!(key(&hp, "llama.rope.freq_base").to_f32().unwrap(), 500000.0);
        let factors = hp.rope_factors[0].1.clone();
        assert_eq!((factors[0], factors[7]), (1.0, 8.0));
        assert_eq!(key(&hp, "llama.context_length").to_u32().unwrap(), 131072);
        // Mistral v0.1: a window of 4,096 in a context of 32,768.
        let mut mistral = llama31.clone();
        mistral["rope_scaling"] = Json::Null;
        mistral["max_position_embeddings"] = 32768.into();
        mistral["sliding_window"] = 4096.into();
        let hp = hparams(&mistral, "llama").unwrap();
        assert!(hp.rope_factors.is_empty());
        assert_eq!(key(&hp, "llama.context_length").to_u32().unwrap(), 32768);
        let window = "llama.attention.sliding_window";
        assert_eq!(key(&hp, window).to_u32().unwrap(), 4096);
        // Qwen2's configs carry a window they do not use.
        mistral["use_sliding_window"] = false.into();
        let hp = hparams(&mistral, "llama").unwrap();
        assert!(hp.keys.iter().all(|(k, _)| k != window));
    }
}
