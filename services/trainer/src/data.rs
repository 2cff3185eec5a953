//! Training examples as token ids: the prompt rendered with the model's own
//! chat template (ending where the assistant's turn starts), then the answer
//! and the end-of-turn token. Only the answer's tokens carry loss.

use std::path::Path;

use anyhow::Context;
use flywheel_model::{ChatMessage, ChatTemplate, Llama, ModelFiles, TextTokenizer};
use serde::Deserialize;

use crate::TrainConfig;

/// The frozen base model with what it needs to turn chats into tokens.
pub struct Base {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Ends the assistant's turn (`<|im_end|>` for ChatML).
    pub eos: u32,
    /// The Hugging Face repository the file was converted from, if its
    /// metadata says.
    pub hub_source: Option<String>,
}

impl Base {
    /// Loads a GGUF model, dequantized to f32 (gradients do not flow through
    /// quantized matmuls).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut files = ModelFiles::open(path)?;
        let model = Llama::load(&mut files.gguf, &candle_core::Device::Cpu)?;
        Ok(Self {
            model,
            hub_source: files.gguf.hub_source(),
            tokenizer: files.tokenizer,
            template: files.template,
            eos: files.eos,
        })
    }

    /// What an adapter's PEFT config names as its base
    /// (`base_model_name_or_path`): the Hugging Face repository the file was
    /// converted from where its metadata says, so that PEFT finds the base
    /// by itself; `otherwise` (the hub repository it was pulled from, or
    /// the model version's name) where it does not.
    pub fn peft_base_name(&self, otherwise: &str) -> String {
        self.hub_source
            .clone()
            .unwrap_or_else(|| otherwise.to_string())
    }

    /// The prompt's ids: the chat rendered with the template, ending where
    /// the assistant's turn starts.
    fn prompt_ids(&self, prompt: &[Message]) -> anyhow::Result<Vec<u32>> {
        let messages: Vec<ChatMessage> = prompt
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        Ok(self.tokenizer.encode(&self.template.render(&messages)?)?)
    }

    /// Prompt ids and answer ids (with the end-of-turn token) for one example.
    pub fn encode(&self, prompt: &[Message], answer: &str) -> anyhow::Result<Encoded> {
        let mut answer = self.tokenizer.encode(answer)?;
        answer.push(self.eos);
        Ok(Encoded {
            prompt: self.prompt_ids(prompt)?,
            answer,
        })
    }
}

/// The general prompts shipped for replay, in order
/// (`services/trainer/replay/general-prompts.json`: written to share no item
/// and no fact with the retention suite evaluation measures forgetting on).
pub fn replay_prompts() -> Vec<String> {
    #[derive(Deserialize)]
    struct File {
        prompts: Vec<String>,
    }
    let file: File = serde_json::from_str(include_str!("../replay/general-prompts.json"))
        .expect("the shipped replay prompts parse");
    file.prompts
}

/// Most tokens a replayed answer keeps.
pub const REPLAY_MAX_TOKENS: usize = 48;

impl Base {
    /// This model's own greedy answer (no adapter) to `prompt`: the prompt's
    /// ids and up to `max_tokens` answer ids, ending with the end-of-turn
    /// token when the model ended its turn in time.
    pub fn greedy_answer(&self, prompt: &[Message], max_tokens: usize) -> anyhow::Result<Encoded> {
        let mut encoded = Encoded {
            prompt: self.prompt_ids(prompt)?,
            answer: Vec::new(),
        };
        let mut cache = self.model.new_cache();
        let mut next = encoded.prompt.clone();
        while encoded.answer.len() < max_tokens {
            let logits = self.model.forward(&next, &mut cache)?;
            let id = logits.argmax(0)?.to_scalar::<u32>()?;
            encoded.answer.push(id);
            if id == self.eos {
                break;
            }
            next = vec![id];
        }
        Ok(encoded)
    }

    /// The replay set of a run with `config`: the first
    /// `config.replay_prompts` shipped general prompts with this model's own
    /// answers, which training keeps likely while it learns the task (so the
    /// adapter changes little outside it). Empty when neither replay's SFT
    /// loss nor the reference penalty is on.
    pub fn replay_set(&self, config: &TrainConfig) -> anyhow::Result<Vec<Encoded>> {
        if !config.uses_replay() {
            return Ok(Vec::new());
        }
        let max_len = config.max_len;
        replay_prompts()
            .into_iter()
            .take(config.replay_prompts)
            .map(|p| {
                let user = Message {
                    role: "user".into(),
                    content: p,
                };
                Ok(self
                    .greedy_answer(&[user], REPLAY_MAX_TOKENS)?
                    .truncated(max_len))
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One sequence: the prompt (no loss) and the answer (loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

impl Encoded {
    /// Cuts the prompt from the left (the answer from the right if it must)
    /// so the sequence fits in `max_len` tokens.
    pub fn truncated(mut self, max_len: usize) -> Self {
        if self.answer.len() >= max_len {
            self.answer.truncate(max_len.saturating_sub(1).max(1));
        }
        let room = max_len.saturating_sub(self.answer.len());
        if self.prompt.len() > room {
            self.prompt.drain(..self.prompt.len() - room);
        }
        self
    }

    pub fn len(&self) -> usize {
        self.prompt.len() + self.answer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The training data of one run, as read from an exported dataset line.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Sft {
        prompt: Encoded,
    },
    Dpo {
        chosen: Encoded,
        rejected: Encoded,
    },
    Kto {
        completion: Encoded,
        desirable: bool,
    },
}

impl Example {
    /// The sequences the example runs through the model.
    pub fn sequences(&self) -> Vec<&Encoded> {
        match self {
            Example::Sft { prompt } => vec![prompt],
            Example::Dpo { chosen, rejected } => vec![chosen, rejected],
            Example::Kto { completion, .. } => vec![completion],
        }
    }
}

/// A line of `trl-sft`, `trl-dpo` or `trl-kto` JSONL.
#[derive(Debug, Deserialize)]
struct Line {
    prompt: Vec<Message>,
    #[serde(default)]
    completion: Option<Vec<Message>>,
    #[serde(default)]
    chosen: Option<Vec<Message>>,
    #[serde(default)]
    rejected: Option<Vec<Message>>,
    #[serde(default)]
    label: Option<bool>,
}

fn answer_text(turns: &[Message]) -> anyhow::Result<&str> {
    turns
        .iter()
        .find(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
        .context("no assistant message")
}

/// Parses one exported line (TRL conversational forms) into an example.
pub fn parse_line(base: &Base, line: &str, max_len: usize) -> anyhow::Result<Example> {
    let l: Line = serde_json::from_str(line)?;
    let enc = |answer: &str| -> anyhow::Result<Encoded> {
        Ok(base.encode(&l.prompt, answer)?.truncated(max_len))
    };
    Ok(match (&l.completion, &l.chosen, &l.rejected, l.label) {
        (Some(c), None, None, None) => Example::Sft {
            prompt: enc(answer_text(c)?)?,
        },
        (None, Some(c), Some(r), None) => Example::Dpo {
            chosen: enc(answer_text(c)?)?,
            rejected: enc(answer_text(r)?)?,
        },
        (Some(c), None, None, Some(label)) => Example::Kto {
            completion: enc(answer_text(c)?)?,
            desirable: label,
        },
        _ => anyhow::bail!(
            "a line must be prompt/completion, prompt/chosen/rejected or prompt/completion/label"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_answer_and_the_end_of_the_prompt() {
        let e = Encoded {
            prompt: (0..10).collect(),
            answer: vec![100, 101, 102],
        };
        let t = e.clone().truncated(6);
        assert_eq!(t.answer, vec![100, 101, 102]);
        assert_eq!(t.prompt, vec![7, 8, 9]);
        let long = Encoded {
            prompt: vec![1, 2],
            answer: (0..10).collect(),
        }
        .truncated(4);
        assert_eq!(long.len(), 4);
        assert_eq!(long.prompt, vec![2]);
    }
}
