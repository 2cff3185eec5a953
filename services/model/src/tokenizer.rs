//! A Hugging Face `tokenizers` tokenizer rebuilt from GGUF metadata, and
//! incremental detokenization for streaming.
//!
//! GGUF's `gpt2` tokenizer model is byte-level BPE. How text is split into
//! words before BPE (`tokenizer.ggml.pre`) differs by family, and every
//! name is mapped explicitly: SmolLM2's `smollm` splits digits one by one
//! before GPT-2's regex (with that order the ids match llama.cpp's, tested
//! against its output); Qwen2's `qwen2` uses its own regex after NFC (ids
//! tested against the family's rules on a tiny vocabulary); Llama 3's
//! `llama-bpe` the same way without NFC and with digits in threes. An
//! unknown name is refused at load.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

/// GGUF `token_type` of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` of user-defined tokens, also matched whole in text.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer plus the ids generation needs to know about.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Tokens that end generation (`eos`, `<|im_end|>`, `<|endoftext|>`).
    pub stop_ids: Vec<u32>,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model {model} is not supported (byte-level BPE `gpt2` only)"
            )));
        }
        let tokens = gguf.get_strings("tokenizer.ggml.tokens")?;
        let merges = gguf
            .get_strings("tokenizer.ggml.merges")
            .unwrap_or_default();
        let types = gguf
            .get_i32s("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let tok_id = |key: &str| gguf.get_u32(key).ok();
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());

        let mut inner = build(&tokens, &merges, pre)?;
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let eos_id = tok_id("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        // ChatML's, Llama 3's (end of turn; end of a message that called a
        // tool, 3.1) and Phi-3's.
        for s in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end|>",
        ] {
            if let Some(id) = inner.token_to_id(s)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            inner,
            stop_ids,
            bos: name(tok_id("tokenizer.ggml.bos_token_id")),
            eos: name(eos_id),
        })
    }

    /// Token ids of `text`, with special tokens in the text recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Text of `ids`; special tokens are kept when `skip_special` is false.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false).unwrap_or_default()
    }

    /// The bytes each token stands for, by id (`None` for special tokens,
    /// which are not text): the vocabulary's byte-level characters mapped
    /// back to bytes. A token may hold part of a UTF-8 character.
    pub fn token_bytes(&self) -> Vec<Option<Box<[u8]>>> {
        let unicode_to_byte = byte_level_inverse();
        let special = self.inner.get_added_tokens_decoder();
        (0..self.inner.get_vocab_size(true) as u32)
            .map(|id| {
                if special.contains_key(&id) {
                    return None;
                }
                let piece = self.inner.id_to_token(id)?;
                piece
                    .chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .map(Vec::into_boxed_slice)
            })
            .collect()
    }
}

/// GPT-2's byte-level alphabet read backwards: printable bytes stand for
/// themselves, the other 68 for the characters from U+0100 up, in byte order.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            };
            (c, b)
        })
        .collect()
}

/// `tokenizer.ggml.pre` values split as SmolLM and StarCoder do: digits one
/// by one, then GPT-2's rules.
const DIGITS_THEN_GPT2: &[&str] = &["smollm", "starcoder", "refact"];
/// GPT-2's own rules (and a file that names none).
const GPT2: &[&str] = &["gpt-2", "gpt2", "default"];
/// Qwen2's (and Qwen2.5's) regex, after NFC normalization.
const QWEN2: &[&str] = &["qwen2"];
/// Llama 3's regex (Llama 3, 3.1, 3.2), no normalization.
const LLAMA3: &[&str] = &["llama-bpe"];

/// The word-splitting regex Llama 3's and Qwen2's `tokenizer.json` give,
/// which differ only in how digits go: contractions in any case, a word
/// with one leading non-letter, `$digits`, punctuation with one leading
/// space, whitespace.
macro_rules! split_regex {
    ($digits:literal) => {
        concat!(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|",
            $digits,
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    };
}

/// Llama 3's: digits in runs of up to three.
const LLAMA3_SPLIT: &str = split_regex!(r"\p{N}{1,3}");
/// Qwen2's: digits one at a time.
const QWEN2_SPLIT: &str = split_regex!(r"\p{N}");

fn build(tokens: &[String], merges: &[String], pre: &str) -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge {m:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // Digits one by one, then the GPT-2 regex.
        p if DIGITS_THEN_GPT2.contains(&p) => Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])
        .into(),
        p if GPT2.contains(&p) => byte_level.into(),
        p if QWEN2.contains(&p) => {
            tok.with_normalizer(Some(NFC))
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            split_then_bytes(QWEN2_SPLIT)?
        }
        p if LLAMA3.contains(&p) => split_then_bytes(LLAMA3_SPLIT)?,
        // Another family splits text its own way: GPT-2's rules would give
        // wrong ids for every word they split differently, so it is
        // refused, not served.
        other => {
            return Err(ModelError::Tokenizer(format!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not one Flywheel knows \
                 ({}): serving it with another family's splitting would give wrong token ids",
                [DIGITS_THEN_GPT2, GPT2, QWEN2, LLAMA3].concat().join(", ")
            )));
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// Words split by `regex` (each match its own word), then their bytes
/// mapped to byte-level characters: the regex has done the splitting.
fn split_then_bytes(regex: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])
    .into())
}

/// Turns a growing list of token ids into text deltas without splitting a
/// multi-byte character across two deltas.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window we re-decode for context.
    prefix: usize,
    /// How far of `ids` has been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for more bytes.
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing as tiny;

    #[test]
    fn tiny_tokenizer_roundtrips_bytes_and_specials() {
        let dir = tempdir();
        let path = tiny::write_tiny_model(&dir, 7).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let tok = TextTokenizer::from_gguf(&gguf).unwrap();
        let text = "<|im_start|>user\nnaïve 🚀 42<|im_end|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], tok.inner.token_to_id("<|im_start|>").unwrap());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert!(
            tok.stop_ids
                .contains(&tok.inner.token_to_id("<|im_end|>").unwrap())
        );
    }

    #[test]
    fn incremental_decoder_never_splits_characters() {
        let dir = tempdir();
        let path = tiny::write_tiny_model(&dir, 7).unwrap();
        let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let text = "héllo 日本 🚀!";
        let ids = tok.encode(text).unwrap();
        // One token per byte in the tiny vocabulary, so multi-byte characters
        // arrive in pieces.
        assert!(ids.len() > text.chars().count());
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for id in ids {
            let delta = dec.push(&tok, id).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
            out.push_str(&delta);
        }
        assert_eq!(out, text);
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
