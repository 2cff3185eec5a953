//! A stored dataset version's examples as token-level training examples.

use anyhow::bail;
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Objective};

fn to_messages(m: &[flywheel_curation::build::Message]) -> Vec<Message> {
    m.iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// A stored dataset example as a training example.
pub fn example(
    base: &Base,
    objective: Objective,
    stored: serde_json::Value,
    max_len: usize,
) -> anyhow::Result<Example> {
    Ok(match objective {
        Objective::Sft => {
            let e: SftExample = serde_json::from_value(stored)?;
            Example::Sft {
                prompt: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
            }
        }
        Objective::Dpo => {
            let e: DpoPair = serde_json::from_value(stored)?;
            let prompt = to_messages(&e.prompt);
            Example::Dpo {
                chosen: base.encode(&prompt, &e.chosen)?.truncated(max_len),
                rejected: base.encode(&prompt, &e.rejected)?.truncated(max_len),
            }
        }
        Objective::Kto => {
            let e: KtoExample = serde_json::from_value(stored)?;
            Example::Kto {
                completion: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
                desirable: e.label,
            }
        }
    })
}

/// Loads a dataset version's examples for an objective, split into
/// (train, eval).
pub fn load_examples(
    base: &Base,
    objective: Objective,
    rows: Vec<(String, serde_json::Value)>,
    max_len: usize,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (split, stored) in rows {
        let e = example(base, objective, stored, max_len)?;
        if split == "eval" {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    if train.is_empty() {
        bail!("no training examples in the train split");
    }
    Ok((train, eval))
}
