//! How much memory a model takes when this engine serves it, said before
//! the weights are read, and a refusal when it cannot fit.
//!
//! The figures are what the CPU kernels hold: Q4_1 and Q8_0 matrices as
//! stored, every other type expanded to f32 (so a Q4_K or F16 file takes
//! about 8x or 2x its size) or quantized at load (`Quantize`), the rotary tables, the keys and values of each
//! sequence (f32, growing with it up to the context), and the prefix
//! cache's budget. A model is refused when the weights, the tables, the
//! prefix cache and one sequence at the full context do not fit in what
//! the machine has available (or the configured budget, if less): such an
//! engine could not answer one long request. What the limit leaves beside
//! the rest is the running sequences' budget for keys and values, which
//! the scheduler admits requests within (each reckoned at its prompt and
//! `max_tokens`); the plan says how much a full batch at the full context
//! would take.

use std::fmt;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use flywheel_model::LlamaConfig;
use flywheel_model::family::{ROPE_FACTORS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT};
use flywheel_model::gguf::GgufFile;

use crate::{EngineConfig, EngineError, Result};

/// The memory one loaded engine takes, by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Weights as the kernels hold them.
    pub weights: u64,
    /// How many of the file's matrices are expanded to f32 (any type but
    /// Q4_1 and Q8_0).
    pub expanded: usize,
    /// Cosine and sine of every position of the context.
    pub tables: u64,
    /// Keys and values of one token, all layers.
    pub kv_per_token: u64,
    /// Positions served: the model's context, or less where configured.
    pub context: usize,
    /// Sequences generating at once.
    pub max_batch: usize,
    /// The prefix cache's budget.
    pub prefix_cache: u64,
}

impl MemoryPlan {
    /// The plan for a model file under `engine`'s settings.
    pub fn for_file(path: &Path, engine: &EngineConfig) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        Ok(Self::new(&gguf, &config, engine))
    }

    pub fn new(gguf: &GgufFile, config: &LlamaConfig, engine: &EngineConfig) -> Self {
        let mut weights = 0u64;
        let mut expanded = 0;
        let to = engine.quantize.ggml_dtype();
        // Rope factors become the rotary tables (`tables`), not weights.
        let rope = [ROPE_FACTORS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT];
        for name in gguf.tensor_names() {
            if rope.contains(&name.as_str()) {
                continue;
            }
            let (Some(dims), Some(dtype)) = (gguf.tensor_dims(&name), gguf.tensor_dtype(&name))
            else {
                continue;
            };
            let elements: u64 = dims.iter().map(|&d| d as u64).product();
            let cols = dims.last().copied().unwrap_or(0);
            let blocks = |t: GgmlDType| cols % t.block_size() == 0;
            let held = match dtype {
                GgmlDType::Q4_1 | GgmlDType::Q8_0 if dims.len() == 2 && blocks(dtype) => {
                    Some(dtype)
                }
                // Quantized at load (`Quantize`), where the rows split into blocks.
                _ => to.filter(|&t| dims.len() == 2 && blocks(t)),
            };
            weights += match held {
                Some(t) => elements / t.block_size() as u64 * t.type_size() as u64,
                None => {
                    expanded += usize::from(dims.len() == 2 && dtype != GgmlDType::F32);
                    elements * 4
                }
            };
        }
        let context = served_context(config, engine);
        let f32_bytes = std::mem::size_of::<f32>() as u64;
        Self {
            weights,
            expanded,
            // Cosines and sines, half a head each per position; twice
            // where the sliding-window layers turn by their own (Gemma 3).
            tables: context as u64
                * config.head_dim as u64
                * f32_bytes
                * (1 + u64::from(config.local_rope().is_some())),
            kv_per_token: 2
                * config.n_layers as u64
                * (config.n_kv_heads * config.head_dim) as u64
                * f32_bytes,
            context,
            max_batch: engine.max_batch,
            prefix_cache: engine.prefix_cache_bytes as u64,
        }
    }

    /// Keys and values of one sequence that fills the context.
    pub fn one_sequence(&self) -> u64 {
        self.kv_per_token * self.context as u64
    }

    /// What the engine needs to answer one request of the full context.
    pub fn needed(&self) -> u64 {
        self.weights + self.tables + self.prefix_cache + self.one_sequence()
    }

    /// Refuses the model when [`needed`](Self::needed) exceeds `limit`.
    pub fn check(&self, name: &str, limit: &MemoryLimit) -> Result<()> {
        if self.needed() <= limit.bytes {
            return Ok(());
        }
        let mut advice = vec!["a smaller model or quantization"];
        if self.expanded > 0 {
            advice.push(
                "its matrices quantized at load (FLYWHEEL_QUANTIZE=q8_0 or q4_1; other types \
                 than Q4_1 and Q8_0 are expanded to f32)",
            );
        }
        advice.push("a shorter context (FLYWHEEL_MAX_CONTEXT)");
        if self.prefix_cache > 0 {
            advice.push("a smaller prefix cache (FLYWHEEL_PREFIX_CACHE_MB)");
        }
        Err(EngineError::DoesNotFit(format!(
            "{name} does not fit in memory: it needs about {} ({self}), and {} is available ({}); \
             serve {}",
            Size(self.needed()),
            Size(limit.bytes),
            limit.source,
            advice.join(", or ")
        )))
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "weights {}", Size(self.weights))?;
        if self.expanded > 0 {
            write!(f, " ({} matrices expanded to f32)", self.expanded)?;
        }
        write!(
            f,
            ", keys and values {} per token: {} for one sequence of {} tokens, {} if all {} \
             batch slots fill it",
            Size(self.kv_per_token),
            Size(self.one_sequence()),
            self.context,
            Size(self.one_sequence() * self.max_batch as u64),
            self.max_batch
        )?;
        if self.prefix_cache > 0 {
            write!(f, ", prefix cache up to {}", Size(self.prefix_cache))?;
        }
        write!(f, ", rotary tables {}", Size(self.tables))
    }
}

/// The positions an engine serves: the model's context, capped by
/// `EngineConfig::max_context` where that is set and shorter.
fn served_context(config: &LlamaConfig, engine: &EngineConfig) -> usize {
    match engine.max_context {
        0 => config.context_length,
        n => n.min(config.context_length),
    }
}

/// How much memory a model may take, and what said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub source: String,
}

impl MemoryLimit {
    /// The least of: `budget` (FLYWHEEL_MEMORY_MB, when set), what the
    /// kernel reports available (`MemAvailable`), and what this process's
    /// cgroup limit leaves (cgroup v2 `memory.max` less `memory.current`,
    /// as in a container). `None` where none of them is known.
    pub fn now(budget: Option<u64>) -> Option<Self> {
        let mut limits = Vec::new();
        if let Some(b) = budget {
            limits.push((b, "the configured budget, FLYWHEEL_MEMORY_MB".to_string()));
        }
        if let Some(b) = mem_available() {
            limits.push((b, "MemAvailable in /proc/meminfo".to_string()));
        }
        if let Some((b, path)) = cgroup_room() {
            limits.push((b, format!("the cgroup limit in {path}")));
        }
        limits
            .into_iter()
            .min_by_key(|(b, _)| *b)
            .map(|(bytes, source)| Self { bytes, source })
    }
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Room under this process's cgroup v2 memory limit, and the limit's file.
fn cgroup_room() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((
        max.saturating_sub(current),
        dir.join("memory.max").display().to_string(),
    ))
}

/// Bytes as people read them: `46.0 KiB`, `1.25 GiB`.
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        match unit {
            0 => write!(f, "{} bytes", self.0),
            _ if v >= 100.0 => write!(f, "{v:.0} {}", UNITS[unit]),
            _ => write!(f, "{v:.1} {}", UNITS[unit]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(Size(512).to_string(), "512 bytes");
        assert_eq!(Size(46 * 1024).to_string(), "46.0 KiB");
        assert_eq!(Size(300 << 20).to_string(), "300 MiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn the_machine_reports_some_memory() {
        let limit = MemoryLimit::now(None).expect("Linux reports MemAvailable");
        assert!(limit.bytes > 0);
        let small = MemoryLimit::now(Some(1 << 20)).unwrap();
        assert_eq!(small.bytes, 1 << 20);
        assert!(
            small.source.contains("FLYWHEEL_MEMORY_MB"),
            "{}",
            small.source
        );
    }
}
