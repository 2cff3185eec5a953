//! A tiny llama with random weights, written as a real GGUF file: test
//! support (the `testing` feature), never used in serving.
//!
//! Tests of mechanics (queueing, streaming, cancellation, errors) run on it
//! in milliseconds; everything it exercises also runs on the real model in
//! the end-to-end tests. Its tokenizer is byte-level BPE with no merges: one
//! token per byte, plus ChatML's special tokens.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::config::{self, Proj};
use crate::rng::Rng;
use crate::template::CHATML;
use crate::{ModelError, Result};

pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const TINY_CONTEXT: u32 = 256;

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Writes `tiny-<seed>.gguf` into `dir` (if not already there) and returns its path.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<PathBuf> {
    write_tiny_variant(dir, &format!("tiny-{seed}"), seed, &[])
}

/// Writes `<name>.gguf`: the tiny model with the metadata keys of
/// `overrides` set (added, or replacing the tiny model's own): a model
/// Flywheel must refuse, for the tests that it does.
pub fn write_tiny_variant(
    dir: &Path,
    name: &str,
    seed: u64,
    overrides: &[(&str, Value)],
) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.gguf"));
    if path.exists() {
        return Ok(path);
    }
    let (hidden, ffn, layers, heads, kv_heads) = (64usize, 128usize, 2usize, 4u32, 2u32);
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_to_unicode().into_iter().map(String::from));
    let vocab = tokens.len();
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if i < TINY_SPECIALS.len() { 3 } else { 1 }))
        .collect();

    let s = |v: &str| Value::String(v.to_string());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny-random-llama")),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.context_length", Value::U32(TINY_CONTEXT)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(vocab as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.chat_template", s(CHATML)),
    ];

    let mut metadata = metadata;
    for (key, value) in overrides {
        metadata.retain(|(k, _)| k != key);
        metadata.push((key, value.clone()));
    }

    let dev = Device::Cpu;
    let mut rng = Rng::seeded(seed);
    let mut random = |shape: (usize, usize), scale: f32| -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(data, shape, &dev)?)
    };
    let q = |t: Tensor, dt: GgmlDType| QTensor::quantize(&t, dt).map_err(ModelError::from);
    let ones = |n: usize| -> Result<QTensor> {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev)?,
            GgmlDType::F32,
        )
        .map_err(ModelError::from)
    };
    let kv_dim = hidden / heads as usize * kv_heads as usize;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            config::TOKEN_EMBEDDING.into(),
            q(random((vocab, hidden), 1.0)?, GgmlDType::Q8_0)?,
        ),
        (config::OUTPUT_NORM.into(), ones(hidden)?),
    ];
    for i in 0..layers {
        let w = 0.3;
        for (proj, shape) in [
            (Proj::Q, (hidden, hidden)),
            (Proj::K, (kv_dim, hidden)),
            (Proj::V, (kv_dim, hidden)),
            (Proj::O, (hidden, hidden)),
            (Proj::Gate, (ffn, hidden)),
            (Proj::Up, (ffn, hidden)),
            (Proj::Down, (hidden, ffn)),
        ] {
            tensors.push((proj.gguf_tensor(i), q(random(shape, w)?, GgmlDType::Q4_1)?));
        }
        tensors.push((config::block_tensor(i, config::ATTN_NORM), ones(hidden)?));
        tensors.push((config::block_tensor(i, config::FFN_NORM), ones(hidden)?));
    }

    // Tests write the same model from several threads: each writes its own
    // temporary file and the rename makes one of them the model.
    static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| ModelError::Load(e.to_string()))?,
    );
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| ModelError::Load(e.to_string()))?;
    Ok(path)
}
