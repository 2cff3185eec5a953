//! A stored dataset version's examples as token-level training examples.

use std::path::Path;

use anyhow::bail;
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Encoded, Example, Objective, TrainConfig};
use sha2::{Digest, Sha256};

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

/// The run's replay set ([`Base::replay_set`]), kept in `dir` and read from
/// there when a run on the same model made it before: the answers are the
/// frozen model's greedy ones, the same every time, and generating them
/// takes the trainer's forward half a minute on two cores. The file is
/// named by the model file's sha256 (`model_sha256`), the shipped prompts
/// and the settings that shape the set.
pub fn replay_set(
    base: &Base,
    train: &TrainConfig,
    dir: &Path,
    model_sha256: &str,
) -> anyhow::Result<Vec<Encoded>> {
    if !train.uses_replay() {
        return Ok(Vec::new());
    }
    let mut h = Sha256::new();
    h.update(model_sha256);
    for p in flywheel_trainer::data::replay_prompts() {
        h.update(p);
        h.update([0]);
    }
    h.update(format!(
        "{} {} {}",
        train.replay_prompts,
        train.max_len,
        flywheel_trainer::data::REPLAY_MAX_TOKENS
    ));
    let path = dir.join(format!("replay-{}.json", hex::encode(h.finalize())));
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(set) = serde_json::from_str::<Vec<(Vec<u32>, Vec<u32>)>>(&text)
    {
        return Ok(set
            .into_iter()
            .map(|(prompt, answer)| Encoded { prompt, answer })
            .collect());
    }
    let set = base.replay_set(train)?;
    let pairs: Vec<(&[u32], &[u32])> = set.iter().map(|e| (&e.prompt[..], &e.answer[..])).collect();
    std::fs::create_dir_all(dir)?;
    // Written whole, then renamed: a reader never sees half a file.
    let part = path.with_extension(format!("{}.part", std::process::id()));
    std::fs::write(&part, serde_json::to_string(&pairs)?)?;
    std::fs::rename(&part, &path)?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_set_is_made_once_per_model_and_read_back() {
        let dir = std::env::temp_dir().join(format!("fw-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = flywheel_model::testing::write_tiny_model(&dir, 3).unwrap();
        let base = Base::load(&path).unwrap();
        let train = TrainConfig {
            replay_prompts: 3,
            reference_kl: 1.0,
            ..Default::default()
        };
        let cache = dir.join("replay");
        let made = replay_set(&base, &train, &cache, "aaaa").unwrap();
        assert_eq!(made, base.replay_set(&train).unwrap());
        let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(files.len(), 1);
        // What is read back is the file, not a new generation: change the
        // file and the change comes back.
        let file = files[0].as_ref().unwrap().path();
        std::fs::write(&file, "[[[1, 2], [3]]]").unwrap();
        let read = replay_set(&base, &train, &cache, "aaaa").unwrap();
        assert_eq!(
            read,
            vec![Encoded {
                prompt: vec![1, 2],
                answer: vec![3]
            }]
        );
        // Another model, or other settings, make their own.
        let other = replay_set(&base, &train, &cache, "bbbb").unwrap();
        assert_eq!(other, made);
        let fewer = TrainConfig {
            replay_prompts: 2,
            ..train.clone()
        };
        assert_eq!(replay_set(&base, &fewer, &cache, "aaaa").unwrap().len(), 2);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
