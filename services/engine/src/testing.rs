//! Test support (the `testing` feature): the CPU forward pass without the
//! scheduler, so reference tests can compare its logits with llama.cpp's.

use std::path::Path;

use flywheel_model::gguf::GgufFile;

use crate::Result;
use crate::adapter::Adapter;
use crate::cpu::{CpuLlama, SeqCache};
use crate::kernels::Simd;
use crate::step::BatchItem;

pub struct CpuForward {
    model: CpuLlama,
}

/// One sequence's keys and values.
pub struct Sequence(SeqCache);

impl CpuForward {
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        Self::load_as(path, threads, crate::Quantize::Keep)
    }

    /// [`load`](Self::load) with matrices of other types quantized at load.
    pub fn load_as(path: &Path, threads: usize, quantize: crate::Quantize) -> Result<Self> {
        let mut gguf = GgufFile::open(path)?;
        Ok(Self {
            model: CpuLlama::load_as(&mut gguf, threads, Simd::Avx512, quantize)?,
        })
    }

    /// Serves at most `n` positions, as `EngineConfig::max_context` has the
    /// engine do.
    pub fn limit_context(&mut self, n: usize) {
        self.model.limit_context(n);
    }

    /// Bytes the loaded model holds (weights as the kernels keep them,
    /// vectors, rotary tables).
    pub fn held_bytes(&self) -> usize {
        self.model.held_bytes()
    }

    /// Bytes a sequence's cache has taken (its capacity, not its length).
    pub fn sequence_bytes(seq: &Sequence) -> usize {
        <CpuLlama as crate::step::StepModel>::cache_bytes(&seq.0)
    }

    pub fn new_sequence(&self) -> Sequence {
        Sequence(self.model.new_cache())
    }

    /// Runs `tokens` after what `seq` holds; the logits after the last one.
    pub fn logits(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits_with(seq, tokens, None)
    }

    /// [`logits`](Self::logits) with a LoRA adapter applied.
    pub fn logits_with(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        adapter: Option<&crate::AdapterWeights>,
    ) -> Result<Vec<f32>> {
        let adapter = adapter
            .map(|w| Adapter::new(w.clone(), crate::step::StepModel::config(&self.model)))
            .transpose()?;
        let mut out = self.model.step(&mut [BatchItem {
            cache: &mut seq.0,
            tokens,
            want_logits: true,
            verify: 0,
            adapter: adapter.as_ref(),
        }])?;
        Ok(out.remove(0).unwrap_or_default())
    }
}
