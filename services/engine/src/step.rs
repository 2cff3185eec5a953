//! What the scheduler needs from a model: a cache per sequence and batched
//! steps over any mix of prompt chunks and single tokens. [`crate::cpu`]
//! (our kernels) and [`crate::candle`] (candle's forward, for GPUs)
//! implement it.

use flywheel_model::LlamaConfig;

use crate::Result;

/// One sequence's part of a step.
pub struct BatchItem<'a, C> {
    pub cache: &'a mut C,
    pub tokens: &'a [u32],
    /// Whether the logits after this item's last token are needed.
    pub want_logits: bool,
    /// The LoRA adapter this sequence runs with, if any.
    pub adapter: Option<&'a crate::adapter::Adapter>,
}

pub trait StepModel: Send + 'static {
    type Cache: Send;
    fn config(&self) -> &LlamaConfig;
    fn new_cache(&self) -> Self::Cache;
    fn cache_len(cache: &Self::Cache) -> usize;
    /// Runs one step; per item, the logits after its last token when asked for.
    fn step(&self, items: &mut [BatchItem<'_, Self::Cache>]) -> Result<Vec<Option<Vec<f32>>>>;
    /// A new cache holding the first `n` positions of `cache`, for a prompt
    /// that begins as that sequence did ([`crate::prefix`]); `None` where
    /// the model cannot copy its caches (then nothing is kept for reuse).
    fn cache_prefix(_cache: &Self::Cache, _n: usize) -> Option<Self::Cache> {
        None
    }
    /// Bytes `cache` holds.
    fn cache_bytes(_cache: &Self::Cache) -> usize {
        0
    }
}
