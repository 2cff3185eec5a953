//! A Hugging Face `tokenizers` tokenizer rebuilt from GGUF metadata, and
//! incremental detokenization for streaming.
//!
//! GGUF's `llama` tokenizer model is SentencePiece's BPE (Llama 2, Mistral
//! v0.1-0.3): text with `▁` for each space, one more in front, merged by
//! the score of the piece a merge makes, a character no piece holds spelled
//! as its bytes (`<0x0A>`). The file carries pieces and scores, not merges:
//! they are derived here (ids tested against the `sentencepiece` library on
//! a tiny vocabulary).
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
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

/// GGUF `token_type` of ordinary pieces.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `token_type` of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` of user-defined tokens, also matched whole in text.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The bytes each token stands for, by id; `None` for special tokens.
pub type TokenBytes = Vec<Option<Box<[u8]>>>;

/// SentencePiece's stand-in for a space.
const SPACE: &str = "\u{2581}";

/// How a vocabulary spells text (GGUF's `tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// `gpt2`: byte-level BPE, every byte a printable character.
    ByteLevel,
    /// `llama`: SentencePiece BPE, `▁` for a space, `<0xXX>` for a byte.
    SentencePiece,
}

/// The tokenizer plus the ids generation needs to know about.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub spelling: Spelling,
    /// SentencePiece vocabularies that put a space before the text
    /// (`tokenizer.ggml.add_space_prefix`, on unless the file says not):
    /// the same tokenizer without it, for text that continues a sequence.
    continuation: Option<Tokenizer>,
    /// SentencePiece vocabularies: the bytes of each token (`None` for a
    /// special token), which decoding joins, and whether it drops the space
    /// that begins a text.
    pieces: Option<(TokenBytes, bool)>,
    /// Tokens that end generation (`eos`, `<|im_end|>`, `<|endoftext|>`).
    pub stop_ids: Vec<u32>,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys,
    /// or by the `tokenizer.json` a converted Hugging Face folder keeps in it.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        if let Ok(json) = gguf.get_str(crate::hf::TOKENIZER_JSON) {
            return Self::from_tokenizer_json(json, gguf);
        }
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let tokens = gguf.get_strings("tokenizer.ggml.tokens")?;
        let types = gguf
            .get_i32s("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let tok_id = |key: &str| gguf.get_u32(key).ok();
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let mut space_prefix = false;
        let (mut inner, spelling, mut continuation) = match model {
            "gpt2" => {
                let merges = gguf
                    .get_strings("tokenizer.ggml.merges")
                    .unwrap_or_default();
                let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
                (build(&tokens, &merges, pre)?, Spelling::ByteLevel, None)
            }
            "llama" => {
                let scores = gguf.get_f32s("tokenizer.ggml.scores")?;
                let prefix = gguf
                    .get_bool("tokenizer.ggml.add_space_prefix")
                    .unwrap_or(true);
                let unk = name(tok_id("tokenizer.ggml.unknown_token_id"));
                let bpe = sentencepiece(&tokens, &scores, &types, unk)?;
                let continuation = prefix
                    .then(|| spm_tokenizer(bpe.clone(), false))
                    .transpose()?;
                let inner = spm_tokenizer(bpe, prefix)?;
                space_prefix = prefix;
                (inner, Spelling::SentencePiece, continuation)
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer model `{other}` (tokenizer.ggml.model) is not supported \
                     (byte-level BPE `gpt2` and SentencePiece BPE `llama` are)"
                )));
            }
        };
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        for tok in std::iter::once(&mut inner).chain(continuation.as_mut()) {
            tok.add_special_tokens(special.clone())
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        }

        Self::finish(gguf, inner, spelling, continuation, space_prefix)
    }

    /// A Hugging Face `tokenizer.json` (a converted folder's, kept whole in
    /// the file) through the `tokenizers` crate. Byte-level BPE (Llama 3,
    /// Qwen) runs as the file sets it up. SentencePiece BPE (a BPE with byte
    /// fallback: Llama 2, Mistral) runs on the file's vocabulary and merges
    /// with its text set up as for a GGUF vocabulary, a `▁` in front of each
    /// text where the file puts one: as sentencepiece does (the Metaspace
    /// step transformers writes now puts none in front of a text that
    /// begins with a space).
    fn from_tokenizer_json(json: &str, gguf: &GgufFile) -> Result<Self> {
        let bad = |e: String| ModelError::Tokenizer(format!("tokenizer.json: {e}"));
        let file: Tokenizer = json.parse().map_err(|e| bad(format!("{e}")))?;
        let setup: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let bpe = match file.get_model() {
            tokenizers::models::ModelWrapper::BPE(bpe) => bpe.clone(),
            _ => {
                return Err(bad(format!(
                    "a {} vocabulary (byte-level BPE and SentencePiece BPE are read)",
                    setup["model"]["type"].as_str().unwrap_or("non-BPE")
                )));
            }
        };
        let byte_level = mentions(&setup["pre_tokenizer"], "ByteLevel")
            || mentions(&setup["decoder"], "ByteLevel");
        if !bpe.byte_fallback {
            if !byte_level {
                return Err(bad(
                    "a BPE vocabulary neither byte-level nor with byte fallback \
                     (SentencePiece's): its bytes cannot be told"
                        .into(),
                ));
            }
            return Self::finish(gguf, file, Spelling::ByteLevel, None, false);
        }
        let prefix =
            prepends_space(&setup["normalizer"]) || prepends_space(&setup["pre_tokenizer"]);
        let mut inner = spm_tokenizer(bpe.clone(), prefix)?;
        let mut continuation = prefix.then(|| spm_tokenizer(bpe, false)).transpose()?;
        let mut added: Vec<(u32, AddedToken)> =
            file.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        for tok in std::iter::once(&mut inner).chain(continuation.as_mut()) {
            for (_, t) in &added {
                let done = match t.special {
                    true => tok.add_special_tokens(vec![t.clone()]),
                    false => tok.add_tokens(vec![t.clone()]),
                };
                done.map_err(|e| bad(e.to_string()))?;
            }
        }
        Self::finish(gguf, inner, Spelling::SentencePiece, continuation, prefix)
    }

    /// What every vocabulary shares: the begin and end tokens, the tokens
    /// that end generation, a SentencePiece vocabulary's bytes.
    fn finish(
        gguf: &GgufFile,
        inner: Tokenizer,
        spelling: Spelling,
        continuation: Option<Tokenizer>,
        space_prefix: bool,
    ) -> Result<Self> {
        let tok_id = |key: &str| gguf.get_u32(key).ok();
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let eos_id = tok_id("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        // A converted folder's generation_config.json list.
        if let Ok(ids) = gguf.get_array(crate::hf::EOS_TOKEN_IDS, |v| v.to_u32()) {
            for id in ids {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        // ChatML's, Llama 3's (end of turn; end of a message that called a
        // tool, 3.1), Phi-3's and Gemma's.
        for s in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end|>",
            "<end_of_turn>",
        ] {
            if let Some(id) = inner.token_to_id(s)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        let bos = name(tok_id("tokenizer.ggml.bos_token_id"));
        let eos = name(eos_id);
        let mut tok = Self {
            inner,
            spelling,
            continuation,
            pieces: None,
            stop_ids,
            bos,
            eos,
        };
        if spelling == Spelling::SentencePiece {
            tok.pieces = Some((tok.token_bytes(), space_prefix));
        }
        Ok(tok)
    }

    /// Token ids of `text`, with special tokens in the text recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Token ids of `text` as it continues a sequence: as [`encode`](Self::encode),
    /// but without the space a SentencePiece vocabulary puts before a text
    /// of its own (what the model writes after its prompt, forced bytes).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        match &self.continuation {
            Some(tok) => tok
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            None => self.encode(text),
        }
    }

    /// Text of `ids`; special tokens are kept when `skip_special` is false.
    /// A SentencePiece vocabulary's tokens are joined as bytes, read as
    /// UTF-8 with each invalid sequence a U+FFFD (as llama.cpp's bytes
    /// read), the space that begins the text dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let Some((pieces, space_prefix)) = &self.pieces else {
            return self
                .inner
                .decode(ids, skip_special)
                .map_err(|e| ModelError::Tokenizer(e.to_string()));
        };
        let mut bytes = Vec::new();
        for &id in ids {
            match pieces.get(id as usize) {
                Some(Some(b)) => bytes.extend_from_slice(b),
                Some(None) if !skip_special => bytes
                    .extend_from_slice(self.inner.id_to_token(id).unwrap_or_default().as_bytes()),
                Some(None) => {}
                None => {
                    return Err(ModelError::Tokenizer(format!(
                        "token id {id} is outside the vocabulary"
                    )));
                }
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if *space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }

    /// One token's text on its own. A SentencePiece token keeps the space
    /// its `▁` stands for (decoding drops the one that begins a text).
    pub fn token_text(&self, id: u32) -> String {
        match &self.pieces {
            Some((pieces, _)) => match pieces.get(id as usize) {
                Some(Some(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
                Some(None) => self.inner.id_to_token(id).unwrap_or_default(),
                None => String::new(),
            },
            None => self.decode(&[id], false).unwrap_or_default(),
        }
    }

    /// The bytes each token stands for, by id (`None` for special tokens,
    /// which are not text): the vocabulary's byte-level characters mapped
    /// back to bytes, or a SentencePiece piece with its `▁` as spaces. A
    /// token may hold part of a UTF-8 character.
    pub fn token_bytes(&self) -> TokenBytes {
        if let Some((pieces, _)) = &self.pieces {
            return pieces.clone();
        }
        let unicode_to_byte = byte_level_inverse();
        let special = self.inner.get_added_tokens_decoder();
        (0..self.inner.get_vocab_size(true) as u32)
            .map(|id| {
                if special.contains_key(&id) {
                    return None;
                }
                let piece = self.inner.id_to_token(id)?;
                match self.spelling {
                    Spelling::ByteLevel => piece
                        .chars()
                        .map(|c| unicode_to_byte.get(&c).copied())
                        .collect::<Option<Vec<u8>>>(),
                    Spelling::SentencePiece => spm_piece_bytes(&piece),
                }
                .map(Vec::into_boxed_slice)
            })
            .collect()
    }
}

/// Whether a tokenizer.json step, or any step of a sequence of them, is
/// one `is` picks.
fn any_step(step: &serde_json::Value, is: &dyn Fn(&serde_json::Value) -> bool) -> bool {
    is(step)
        || ["pretokenizers", "decoders", "normalizers"]
            .iter()
            .filter_map(|k| step[*k].as_array())
            .flatten()
            .any(|s| any_step(s, is))
}

/// Whether a tokenizer.json step (or a sequence of them) is of `kind`.
fn mentions(step: &serde_json::Value, kind: &str) -> bool {
    any_step(step, &|s| s["type"] == kind)
}

/// Whether a tokenizer.json normalizer or pre-tokenizer puts a `▁` in front
/// of the text: a `Prepend` of it (Llama 2's files), or a `Metaspace` that
/// prepends (newer files).
fn prepends_space(step: &serde_json::Value) -> bool {
    any_step(step, &|s| match s["type"].as_str() {
        Some("Prepend") => s["prepend"] == SPACE,
        Some("Metaspace") => match s["prepend_scheme"].as_str() {
            Some(scheme) => scheme != "never",
            None => s["add_prefix_space"] == true,
        },
        _ => false,
    })
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

/// The bytes a SentencePiece piece stands for: `<0xXX>` one byte, any
/// other its text with `▁` as a space.
fn spm_piece_bytes(piece: &str) -> Option<Vec<u8>> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && hex.len() == 2
    {
        return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
    }
    Some(piece.replace(SPACE, " ").into_bytes())
}

/// SentencePiece's BPE on a GGUF vocabulary, as llama.cpp runs it: the
/// text's characters are merged, pair by pair, into the adjacent pair whose
/// joined piece has the highest score (leftmost first among equals), and a
/// character no piece holds is spelled by its bytes' `<0xXX>` pieces. In
/// merge-rank terms: every ordinary piece, split anywhere into two pieces
/// of the vocabulary, is a merge ranked by its own score.
fn sentencepiece(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    unk: Option<String>,
) -> Result<BPE> {
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "{} scores (tokenizer.ggml.scores) for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let kind = |i: usize| types.get(i).copied().unwrap_or(TOKEN_TYPE_NORMAL);
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !matches!(kind(id), TOKEN_TYPE_NORMAL | TOKEN_TYPE_USER_DEFINED) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = ranked
        .into_iter()
        .map(|(_, _, a, b)| (a.to_string(), b.to_string()))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    bpe.build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

/// A SentencePiece tokenizer: spaces to `▁` (one put in front of each text
/// between special tokens when `space_prefix`, as llama.cpp does), no
/// word splitting. (Decoding is [`TextTokenizer::decode`]'s.)
fn spm_tokenizer(bpe: BPE, space_prefix: bool) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
    let escape = Replace::new(" ", SPACE).map_err(err)?;
    let normalizer: NormalizerWrapper = match space_prefix {
        true => tokenizers::normalizers::Sequence::new(vec![
            Prepend::new(SPACE.into()).into(),
            escape.into(),
        ])
        .into(),
        false => escape.into(),
    };
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(normalizer)).map_err(err)?;
    Ok(tok)
}

/// `tokenizer.ggml.pre` values split as SmolLM and StarCoder do: digits one
/// by one, then GPT-2's rules.
const DIGITS_THEN_GPT2: &[&str] = &["smollm", "starcoder", "refact"];
/// GPT-2's own rules (and a file that names none).
const GPT2: &[&str] = &["gpt-2", "gpt2", "default"];
/// Qwen2's (and Qwen2.5's) regex, after NFC normalization.
const QWEN2: &[&str] = &["qwen2"];
/// Llama 3's regex (Llama 3, 3.1, 3.2; SmolLM3, whose tokenizer llama.cpp's
/// converter names `smaug-bpe`), no normalization.
const LLAMA3: &[&str] = &["llama-bpe", "smaug-bpe"];
/// Mistral's byte-level BPE (Ministral, Mistral NeMo), no normalization.
const TEKKEN: &[&str] = &["tekken"];

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
/// Tekken's (its tokenizer.json's): words split where the letters' case
/// changes (an upper-case run, then lower-case), no contractions, digits one
/// at a time, slashes kept after punctuation.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

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
    // Llama 3's and tekken's tokenizer.json (and llama.cpp for them) take a
    // word the vocabulary holds whole as one token, whatever the merges
    // would make of it.
    let ignore_merges = LLAMA3.contains(&pre) || TEKKEN.contains(&pre);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
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
        p if TEKKEN.contains(&p) => split_then_bytes(TEKKEN_SPLIT)?,
        // Another family splits text its own way: GPT-2's rules would give
        // wrong ids for every word they split differently, so it is
        // refused, not served.
        other => {
            return Err(ModelError::Tokenizer(format!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not one Flywheel knows \
                 ({}): serving it with another family's splitting would give wrong token ids",
                [DIGITS_THEN_GPT2, GPT2, QWEN2, LLAMA3, TEKKEN]
                    .concat()
                    .join(", ")
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
        // `before` is where `after` began (the ids it decodes are a prefix
        // of `after`'s, ending at complete text); should a vocabulary's
        // decoding ever change what it had, wait rather than split text.
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
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

    /// A SentencePiece vocabulary by hand: `<unk>`, `<s>`, `</s>`, the
    /// byte pieces, then pieces with scores.
    fn spm(pieces: &[(&str, f32)]) -> TextTokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, score) in pieces {
            tokens.push(p.to_string());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(*score);
        }
        let bpe = sentencepiece(&tokens, &scores, &types, Some("<unk>".into())).unwrap();
        let mut inner = spm_tokenizer(bpe.clone(), true).unwrap();
        let mut continuation = spm_tokenizer(bpe, false).unwrap();
        for t in [&mut inner, &mut continuation] {
            t.add_special_tokens([
                AddedToken::from("<s>", true),
                AddedToken::from("</s>", true),
            ])
            .unwrap();
        }
        let mut tok = TextTokenizer {
            inner,
            spelling: Spelling::SentencePiece,
            continuation: Some(continuation),
            pieces: None,
            stop_ids: vec![2],
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
        };
        tok.pieces = Some((tok.token_bytes(), true));
        tok
    }

    fn pieces(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| tok.inner.id_to_token(i).unwrap())
            .collect()
    }

    #[test]
    fn sentencepiece_merges_the_best_scored_piece_first() {
        let single = [("\u{2581}", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0)];
        // `ab` outscores `bc`: "abc" is ab + c. With the scores the other
        // way round it is a + bc, though the merges are the same pairs.
        let tok = spm(&[&single[..], &[("ab", -5.0), ("bc", -6.0)]].concat());
        let ids = tok.encode("abc").unwrap();
        assert_eq!(pieces(&tok, &ids), ["\u{2581}", "ab", "c"]);
        let tok = spm(&[&single[..], &[("ab", -6.0), ("bc", -5.0)]].concat());
        let ids = tok.encode("abc").unwrap();
        assert_eq!(pieces(&tok, &ids), ["\u{2581}", "a", "bc"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "abc");
    }

    #[test]
    fn sentencepiece_spaces_bytes_and_special_tokens() {
        let tok = spm(&[
            ("\u{2581}", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("\u{2581}a", -4.0),
            ("\u{2581}b", -5.0),
        ]);
        // A space in front of the text and of each text after a special
        // token, as llama.cpp tokenizes; a character no piece holds as its
        // UTF-8 bytes.
        let ids = tok.encode("a b<s>a é").unwrap();
        assert_eq!(
            pieces(&tok, &ids),
            [
                "\u{2581}a",
                "\u{2581}b",
                "<s>",
                "\u{2581}a",
                "\u{2581}",
                "<0xC3>",
                "<0xA9>"
            ]
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), "a b<s> a é");
        // Continuing a sequence: no space in front.
        let cont = tok.encode_continuation("a b").unwrap();
        assert_eq!(pieces(&tok, &cont), ["a", "\u{2581}b"]);
        // What each token stands for, as the schema's matcher reads it.
        let bytes = tok.token_bytes();
        let byte_of = |p: &str| bytes[tok.inner.token_to_id(p).unwrap() as usize].clone();
        assert_eq!(byte_of("\u{2581}a").as_deref(), Some(&b" a"[..]));
        assert_eq!(byte_of("<0xC3>").as_deref(), Some(&[0xC3u8][..]));
        assert_eq!(byte_of("<s>"), None);
        assert_eq!(
            tok.token_text(tok.inner.token_to_id("\u{2581}b").unwrap()),
            " b"
        );
    }

    #[test]
    fn sentencepiece_bytes_stream_as_they_decode() {
        // A model's stray bytes: a valid one then an invalid one, a
        // character in three byte pieces, a last one still incomplete.
        let tok = spm(&[("\u{2581}", -1.0), ("a", -2.0), ("\u{2581}a", -3.0)]);
        let id = |p: &str| tok.inner.token_to_id(p).unwrap();
        let ids = [
            id("\u{2581}a"),
            id("<0x22>"),
            id("<0xAD>"),
            id("\u{2581}"),
            id("a"),
            id("<0xE2>"),
            id("<0x82>"),
            id("<0xAC>"),
            id("<0xC3>"),
        ];
        let whole = tok.decode(&ids[..ids.len() - 1], true).unwrap();
        assert_eq!(whole, "a\"\u{FFFD} a\u{20AC}");
        let mut dec = IncrementalDecoder::default();
        let streamed: String = ids.iter().map(|&i| dec.push(&tok, i).unwrap()).collect();
        assert_eq!(streamed, whole);
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
