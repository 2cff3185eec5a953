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
    /// Positions before the last whose logits are wanted as well (a draft
    /// being checked, [`crate::scheduler`]): with `want_logits`, the item's
    /// logits are `verify + 1` rows, one per position, the last token's last.
    pub verify: usize,
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
    /// Whether [`BatchItem::verify`] and [`StepModel::truncate_cache`] are
    /// supported (speculative decoding runs only where they are).
    fn verifies(&self) -> bool {
        false
    }
    /// Keeps the first `n` positions of `cache` (a rejected draft's keys
    /// and values dropped).
    fn truncate_cache(_cache: &mut Self::Cache, _n: usize) {}
}
