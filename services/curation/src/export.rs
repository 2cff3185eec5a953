//! Dataset examples in the JSON Lines shapes training tools read: TRL's
//! conversational prompt-completion, preference and unpaired-preference
//! forms, TRL's (and OpenAI's) `messages` form for SFT, and OpenAI's
//! preference fine-tuning form for DPO.

use std::str::FromStr;

use serde_json::{Value, json};

use crate::build::{DpoPair, KtoExample, Message, SftExample};

/// An export format; each reads one kind of example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TRL SFT: `{"prompt": [messages], "completion": [assistant]}`.
    TrlSft,
    /// TRL DPO: `{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}`.
    TrlDpo,
    /// TRL KTO: `{"prompt": [messages], "completion": [assistant], "label": bool}`.
    TrlKto,
    /// SFT as whole conversations: `{"messages": [..., assistant]}` (TRL and
    /// OpenAI chat fine-tuning read the same shape).
    Messages,
    /// OpenAI chat fine-tuning JSONL (SFT).
    OpenAi,
    /// OpenAI preference fine-tuning JSONL (DPO): `input`, `preferred_output`,
    /// `non_preferred_output`.
    OpenAiDpo,
}

/// The kinds of examples, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sft,
    Dpo,
    Kto,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sft => "sft",
            Kind::Dpo => "dpo",
            Kind::Kto => "kto",
        }
    }
}

impl Format {
    pub const ALL: [(&'static str, Format); 6] = [
        ("trl-sft", Format::TrlSft),
        ("trl-dpo", Format::TrlDpo),
        ("trl-kto", Format::TrlKto),
        ("messages", Format::Messages),
        ("openai", Format::OpenAi),
        ("openai-dpo", Format::OpenAiDpo),
    ];

    /// The kind of example the format is made from.
    pub fn kind(self) -> Kind {
        match self {
            Format::TrlSft | Format::Messages | Format::OpenAi => Kind::Sft,
            Format::TrlDpo | Format::OpenAiDpo => Kind::Dpo,
            Format::TrlKto => Kind::Kto,
        }
    }

    /// Turns one stored example (the serialized SFT example, DPO pair or KTO
    /// example) into one line of this format.
    pub fn line(self, stored: Value) -> Result<Value, serde_json::Error> {
        let assistant = |text: String| vec![Message::new("assistant", text)];
        Ok(match self {
            Format::TrlSft => {
                let e: SftExample = serde_json::from_value(stored)?;
                json!({"prompt": e.prompt, "completion": assistant(e.completion)})
            }
            Format::Messages | Format::OpenAi => {
                let e: SftExample = serde_json::from_value(stored)?;
                let mut messages = e.prompt;
                messages.push(Message::new("assistant", e.completion));
                json!({ "messages": messages })
            }
            Format::TrlDpo => {
                let e: DpoPair = serde_json::from_value(stored)?;
                json!({
                    "prompt": e.prompt,
                    "chosen": assistant(e.chosen),
                    "rejected": assistant(e.rejected),
                })
            }
            Format::OpenAiDpo => {
                let e: DpoPair = serde_json::from_value(stored)?;
                json!({
                    "input": {"messages": e.prompt},
                    "preferred_output": assistant(e.chosen),
                    "non_preferred_output": assistant(e.rejected),
                })
            }
            Format::TrlKto => {
                let e: KtoExample = serde_json::from_value(stored)?;
                json!({
                    "prompt": e.prompt,
                    "completion": assistant(e.completion),
                    "label": e.label,
                })
            }
        })
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = Format::ALL.iter().map(|(n, _)| *n).collect();
                format!("unknown format `{s}`; one of: {}", names.join(", "))
            })
    }
}

impl Message {
    pub fn new(role: &str, content: String) -> Self {
        Self {
            role: role.to_string(),
            content,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Split;

    fn prompt() -> Vec<Message> {
        vec![Message::new("user", "Capital of France?".into())]
    }

    #[test]
    fn sft_formats_end_with_the_answer() {
        let e = SftExample {
            prompt: prompt(),
            completion: "Paris.".into(),
            correction: false,
            split: Split::Train,
            source: "c1".into(),
        };
        let stored = serde_json::to_value(&e).unwrap();
        let trl = Format::TrlSft.line(stored.clone()).unwrap();
        assert_eq!(trl["prompt"][0]["content"], "Capital of France?");
        assert_eq!(
            trl["completion"],
            json!([{"role": "assistant", "content": "Paris."}])
        );
        let chat = Format::OpenAi.line(stored).unwrap();
        assert_eq!(chat["messages"].as_array().unwrap().len(), 2);
        assert_eq!(chat["messages"][1]["role"], "assistant");
        assert!(chat.get("source").is_none(), "lineage stays out of exports");
    }

    #[test]
    fn preference_formats_keep_chosen_and_rejected_apart() {
        let p = DpoPair {
            prompt: prompt(),
            chosen: "Paris.".into(),
            rejected: "Lyon.".into(),
            split: Split::Eval,
            sources: vec!["a".into(), "b".into()],
        };
        let stored = serde_json::to_value(&p).unwrap();
        let trl = Format::TrlDpo.line(stored.clone()).unwrap();
        assert_eq!(trl["chosen"][0]["content"], "Paris.");
        assert_eq!(trl["rejected"][0]["content"], "Lyon.");
        let oa = Format::OpenAiDpo.line(stored).unwrap();
        assert_eq!(oa["preferred_output"][0]["content"], "Paris.");
        assert_eq!(oa["non_preferred_output"][0]["content"], "Lyon.");
        assert_eq!(oa["input"]["messages"][0]["role"], "user");
    }

    #[test]
    fn kto_keeps_its_label_and_wrong_kinds_are_errors() {
        let k = KtoExample {
            prompt: prompt(),
            completion: "Lyon.".into(),
            label: false,
            split: Split::Train,
            source: "c".into(),
        };
        let stored = serde_json::to_value(&k).unwrap();
        assert_eq!(Format::TrlKto.line(stored).unwrap()["label"], false);
        assert!(Format::TrlDpo.line(json!({"prompt": []})).is_err());
        assert!("trl-xyz".parse::<Format>().unwrap_err().contains("trl-sft"));
    }
}
