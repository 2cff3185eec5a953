//! Chat templates: the Jinja template in a model's metadata, rendered with
//! minijinja the way Hugging Face `apply_chat_template` does (Python string
//! methods through `pycompat`, `raise_exception`, `strftime_now` for the
//! templates that date their system prompt, as Llama 3.2's does,
//! `add_generation_prompt`).

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// One message of a conversation, text only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// ChatML, for models whose metadata carries no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, Error> {
            use std::fmt::Write;
            let mut out = String::new();
            // A format chrono cannot write is the template's error, not a
            // panic (`to_string` would panic on it).
            write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: cannot format a date as {format:?}"),
                )
            })?;
            Ok(out)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.unwrap_or_default(),
            eos: eos.unwrap_or_default(),
        })
    }

    /// The prompt text for `messages`, ending where the assistant's reply starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        // A template that raises is telling the caller the conversation is
        // malformed (e.g. roles out of order): that is bad input, not a crash.
        .map_err(|e| ModelError::Invalid(format!("chat template rejected the messages: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_template_inserts_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        let out = t
            .render(&[msg("user", "What is the capital of France?")])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>"));
    }

    #[test]
    fn a_template_can_date_its_system_prompt() {
        // As Llama 3.2's does: today's date where transformers gives it.
        let src =
            "{% if strftime_now is defined %}{{ strftime_now('%Y') }}{% else %}none{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let year = chrono::Local::now().format("%Y").to_string();
        assert_eq!(t.render(&[msg("user", "hi")]).unwrap(), year);
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
        let err = bad.render(&[msg("user", "hi")]).unwrap_err().to_string();
        assert!(err.contains("cannot format a date"), "{err}");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[msg("user", "  hi ")]).unwrap(), "HI");
        let err = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }
}
