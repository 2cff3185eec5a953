//! Everything a GGUF file says about its model, read once: hyper-parameters,
//! tokenizer, chat template (ChatML when the file carries none) and the
//! token that ends an assistant's turn.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::template::{CHATML, ChatMessage, ChatTemplate};
use crate::tokenizer::TextTokenizer;
use crate::{ModelError, Result};

/// An opened model file; the weights stay on disk until loaded.
pub struct ModelFiles {
    pub gguf: GgufFile,
    pub config: LlamaConfig,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Ends the assistant's turn (`<|im_end|>` for ChatML).
    pub eos: u32,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let source = gguf.get_str("tokenizer.chat_template").unwrap_or(CHATML);
        let template = ChatTemplate::new(source, tokenizer.bos.clone(), tokenizer.eos.clone())?;
        let eos_text = tokenizer.eos.clone().unwrap_or_else(|| "<|im_end|>".into());
        let eos = match tokenizer.encode(&eos_text)?.as_slice() {
            [id] => *id,
            other => {
                return Err(ModelError::Load(format!(
                    "end-of-turn token {eos_text} is not one token: {other:?}"
                )));
            }
        };
        Ok(Self {
            gguf,
            config,
            tokenizer,
            template,
            eos,
        })
    }

    /// Prompt token ids for a conversation, ending where the assistant's
    /// reply starts.
    pub fn prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.tokenizer.encode(&self.template.render(messages)?)
    }
}
