//! The candle reference forward as a step model: sequences run one after
//! another (no shared weight passes), on whatever device candle drives, so
//! the same scheduler serves on a GPU with the `cuda` feature.

use flywheel_model::{KvCache, Llama, LlamaConfig};

use crate::Result;
use crate::step::{BatchItem, StepModel};

impl StepModel for Llama {
    type Cache = KvCache;
    fn config(&self) -> &LlamaConfig {
        Llama::config(self)
    }
    fn new_cache(&self) -> KvCache {
        Llama::new_cache(self)
    }
    fn cache_len(cache: &KvCache) -> usize {
        cache.len()
    }
    fn step(&self, items: &mut [BatchItem<'_, KvCache>]) -> Result<Vec<Option<Vec<f32>>>> {
        if items.iter().any(|it| it.adapter.is_some()) {
            return Err(crate::EngineError::Invalid(
                "the candle backend applies no adapters".into(),
            ));
        }
        items
            .iter_mut()
            .map(|it| {
                let logits = self.forward(it.tokens, it.cache)?;
                Ok(if it.want_logits {
                    Some(logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
                } else {
                    None
                })
            })
            .collect()
    }
}
