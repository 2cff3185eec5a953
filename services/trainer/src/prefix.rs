//! Prompt prefixes that the sequences of one step share (a product's system
//! prompt, the prompt of a DPO pair's two answers), each run once. The
//! sequences continue from the prefix's cache together, packed into one
//! batch ([`crate::train::answer_logprobs_packed`]), and the step's one
//! backward pass goes through each prefix once. The loss and its gradients
//! are those of running every sequence whole (the same tokens at the same
//! positions); only the prefix's work is paid once instead of once per
//! sequence, which on a task whose system prompt is most of each example is
//! most of a step.

use std::collections::HashMap;
use std::rc::Rc;

use flywheel_model::{KvCache, Llama};

use crate::data::{Encoded, Example};
use crate::lora::Lora;
use crate::ops::TrainOps;

/// Sequences whose prompts agree on their first this many tokens are run
/// from one prefix; shorter shared runs are run with each sequence (the
/// saving would not pay for the bookkeeping).
pub const MIN_SHARED: usize = 16;

/// A prefix run once, with the adapter as it is this step.
pub struct Prefix {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Prefix {
    /// The prefix `seqs` share, run with `lora`: the longest run of tokens
    /// every prompt starts with, short of each prompt's last token (the
    /// position that predicts the first answer token runs with its
    /// sequence). `None` for fewer than two sequences or a shared run under
    /// [`MIN_SHARED`] tokens.
    pub fn shared(
        model: &Llama,
        lora: Option<&Lora>,
        seqs: &[&Encoded],
    ) -> anyhow::Result<Option<Self>> {
        let len = shared_len(seqs);
        if seqs.len() < 2 || len < MIN_SHARED {
            return Ok(None);
        }
        let ids = seqs[0].prompt[..len].to_vec();
        let cache = model.prefill(&TrainOps::new(lora), &ids)?;
        Ok(Some(Self { ids, cache }))
    }

    /// The prefixes of a batch, one entry per example: examples are grouped
    /// by their prompts' first [`MIN_SHARED`] tokens, and each group that
    /// holds two sequences or more (a DPO pair alone is two) shares one.
    pub fn for_batch(
        model: &Llama,
        lora: Option<&Lora>,
        examples: &[&Example],
    ) -> anyhow::Result<Vec<Option<Rc<Prefix>>>> {
        let mut groups: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, e) in examples.iter().enumerate() {
            let prompt = &e.sequences()[0].prompt;
            if prompt.len() > MIN_SHARED {
                groups.entry(&prompt[..MIN_SHARED]).or_default().push(i);
            }
        }
        let mut out = vec![None; examples.len()];
        for members in groups.values() {
            let seqs: Vec<&Encoded> = members
                .iter()
                .flat_map(|&i| examples[i].sequences())
                .collect();
            if let Some(p) = Prefix::shared(model, lora, &seqs)? {
                let p = Rc::new(p);
                for &i in members {
                    out[i] = Some(p.clone());
                }
            }
        }
        Ok(out)
    }

    /// Tokens in the prefix.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `e`'s prompt starts with this prefix and goes on past it.
    pub fn covers(&self, e: &Encoded) -> bool {
        e.prompt.len() > self.ids.len() && e.prompt.starts_with(&self.ids)
    }

    /// The prefix's keys and values, for the sequences that continue it.
    pub(crate) fn kv(&self) -> &KvCache {
        &self.cache
    }
}

/// The longest common start of every prompt in `seqs`, at most each
/// prompt's length less one.
fn shared_len(seqs: &[&Encoded]) -> usize {
    let Some(first) = seqs.first() else {
        return 0;
    };
    seqs.iter()
        .fold(first.prompt.len().saturating_sub(1), |len, e| {
            let cap = len.min(e.prompt.len().saturating_sub(1));
            first.prompt[..cap]
                .iter()
                .zip(&e.prompt)
                .take_while(|(a, b)| a == b)
                .count()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(prompt: &[u32]) -> Encoded {
        Encoded {
            prompt: prompt.to_vec(),
            answer: vec![99],
        }
    }

    #[test]
    fn the_shared_run_stops_at_the_first_difference_and_short_of_each_prompts_end() {
        let (a, b) = (enc(&[1, 2, 3, 4, 5]), enc(&[1, 2, 3, 7, 8]));
        assert_eq!(shared_len(&[&a, &b]), 3);
        // Identical prompts: the last prompt token stays with each sequence.
        assert_eq!(shared_len(&[&a, &a.clone()]), 4);
        // A prompt that is a prefix of another caps the run below its end.
        let short = enc(&[1, 2, 3]);
        assert_eq!(shared_len(&[&a, &short]), 2);
        assert_eq!(shared_len(&[&enc(&[5, 1]), &a]), 0);
        assert_eq!(shared_len(&[]), 0);
    }
}
