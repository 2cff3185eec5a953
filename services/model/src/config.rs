//! The hyper-parameters of the transformer every supported family maps
//! onto (a llama, with what each family adds: q/k/v biases, q/k norms,
//! fused matrices, Gemma's norms, soft-caps and GELU), and the names of its
//! tensors: the one table that says what a projection is called in GGUF
//! files and in Hugging Face (and PEFT) checkpoints, and where a fused
//! matrix holds it ([`LlamaConfig::stored_at`]). Which family a file is,
//! and how its keys read (`LlamaConfig::from_gguf`), is the `family`
//! module's.

/// How a file stores the rows of its q and k projections (and biases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeRows {
    /// Each head's rows permuted so that pairs `(2i, 2i+1)` rotate
    /// together: what llama.cpp writes for llama, and what our forward
    /// passes compute in.
    Interleaved,
    /// Hugging Face's order: row `i` rotates with row `i + head_dim / 2`.
    Halves,
}

/// Hyper-parameters of a model, whatever its family.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The family's name (GGUF `general.architecture`).
    pub family: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Size of one attention head: `hidden / n_heads` unless the file says
    /// otherwise (Qwen3's heads are larger).
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    /// q, k and v carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Each head of q and k is RMS-normed before the rotary embedding
    /// (Qwen3).
    pub qk_norm: bool,
    /// How the file stores q and k rows; loaders bring them to
    /// [`RopeRows::Interleaved`].
    pub rope_rows: RopeRows,
    /// q, k and v stored as one matrix, their rows one after another
    /// (Phi-3's `attn_qkv`).
    pub fused_qkv: bool,
    /// gate and up stored as one matrix, gate's rows first (Phi-3's
    /// `ffn_up`).
    pub fused_gate_up: bool,
    /// The feed-forward's gate activation.
    pub activation: Activation,
    /// The embeddings are multiplied by this (Gemma's `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
    /// The attention's output and the feed-forward's are each RMS-normed
    /// before they join the residual (Gemma 2's `post_attention_norm` and
    /// `post_ffw_norm`).
    pub post_norms: bool,
    /// What the attention scores `q . k` are multiplied by:
    /// `1 / sqrt(head_dim)`, or Gemma 2's `1 / sqrt(query_pre_attn_scalar)`.
    pub attn_scale: f32,
    /// Scaled scores become `cap * tanh(score / cap)` (Gemma 2's
    /// `attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2's
    /// `final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Every this many layers, the last attends without a rotary embedding
    /// (SmolLM3's NoPE layers): [`LlamaConfig::rotates`].
    pub no_rope_step: Option<usize>,
    /// Sliding-window attention on most layers (Gemma 3's local layers):
    /// [`LlamaConfig::window`].
    pub sliding: Option<Sliding>,
}

/// Layers that attend to a window of the newest positions only: every
/// layer but the last of every `pattern` (Gemma 2's one local layer to one
/// global, Gemma 3's five to one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sliding {
    /// Positions a local layer's query sees, itself included.
    pub window: usize,
    pub pattern: usize,
    /// The local layers' own rotary base (Gemma 3's 10,000; the global
    /// layers take `rope_theta` and its scaling), where they have one.
    pub rope_theta: Option<f32>,
}

/// The activation of the feed-forward's gate, times up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU: llama, Qwen, Phi-3).
    Silu,
    /// `gelu(gate) * up` with GELU's tanh approximation (Gemma's
    /// `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `cap * tanh(x / cap)`.
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

impl LlamaConfig {
    /// Whether `layer` turns q and k by the rotary embedding: every layer
    /// but SmolLM3's NoPE ones (the last of every `no_rope_step`, as
    /// llama.cpp counts them).
    pub fn rotates(&self, layer: usize) -> bool {
        self.no_rope_step
            .is_none_or(|step| !(layer + 1).is_multiple_of(step))
    }

    /// The window of positions `layer` attends to, where it is a sliding
    /// (local) layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding
            .filter(|s| !(layer + 1).is_multiple_of(s.pattern.max(1)))
            .map(|s| s.window)
    }

    /// Width of q (and of attention's output): `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// `(out, in)` of a projection's weight.
    pub fn proj_shape(&self, proj: Proj) -> (usize, usize) {
        let kv = self.n_kv_heads * self.head_dim;
        match proj {
            Proj::Q => (self.q_dim(), self.hidden),
            Proj::O => (self.hidden, self.q_dim()),
            Proj::K | Proj::V => (kv, self.hidden),
            Proj::Gate | Proj::Up => (self.intermediate, self.hidden),
            Proj::Down => (self.hidden, self.intermediate),
        }
    }

    /// Heads whose rows the rotary embedding pairs, for `proj` (q and k).
    pub fn rotated_heads(&self, proj: Proj) -> Option<usize> {
        match proj {
            Proj::Q => Some(self.n_heads),
            Proj::K => Some(self.n_kv_heads),
            _ => None,
        }
    }

    /// For `proj`, which stored row each row the forward pass computes in
    /// comes from (`None` when they are the same): the file's q and k rows
    /// in Hugging Face order brought to the interleaved order.
    pub fn row_order(&self, proj: Proj) -> Option<Vec<usize>> {
        let heads = self.rotated_heads(proj)?;
        (self.rope_rows == RopeRows::Halves).then(|| interleaved_from_halves(heads, self.head_dim))
    }

    /// Where `layer`'s `proj` is stored: the GGUF tensor that holds its
    /// rows and the first of them there. A projection of its own starts at
    /// row 0 of its tensor; in a family that fuses projections into one
    /// matrix ([`fused_qkv`](Self::fused_qkv),
    /// [`fused_gate_up`](Self::fused_gate_up)) each has its rows of it.
    pub fn stored_at(&self, layer: usize, proj: Proj) -> (String, usize) {
        let rows = |p: Proj| self.proj_shape(p).0;
        match proj {
            Proj::Q | Proj::K | Proj::V if self.fused_qkv => {
                let first = match proj {
                    Proj::Q => 0,
                    Proj::K => rows(Proj::Q),
                    _ => rows(Proj::Q) + rows(Proj::K),
                };
                (block_tensor(layer, ATTN_QKV), first)
            }
            Proj::Gate | Proj::Up if self.fused_gate_up => {
                let first = if proj == Proj::Gate {
                    0
                } else {
                    rows(Proj::Gate)
                };
                (block_tensor(layer, FFN_GATE_UP), first)
            }
            _ => (proj.gguf_tensor(layer), 0),
        }
    }

    /// The matrices of `layer` as the file stores them, each with its
    /// `(rows, columns)`: one per projection, or one per fused group.
    pub fn stored_matrices(&self, layer: usize) -> Vec<(String, (usize, usize))> {
        let mut out: Vec<(String, (usize, usize))> = Vec::new();
        for p in Proj::ALL {
            let (name, _) = self.stored_at(layer, p);
            let (rows, cols) = self.proj_shape(p);
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, shape)) => shape.0 += rows,
                None => out.push((name, (rows, cols))),
            }
        }
        out
    }

    /// [`row_order`](Self::row_order) within one head: for what is stored
    /// per head dimension (Qwen3's q and k norms).
    pub fn head_order(&self) -> Option<Vec<usize>> {
        (self.rope_rows == RopeRows::Halves).then(|| interleaved_from_halves(1, self.head_dim))
    }
}

/// The permutation llama.cpp's converter applies to q and k: within each
/// head, interleaved row `2i + j` is Hugging Face row `j * hd / 2 + i`.
/// Entry `r` of the result is the Hugging Face row of interleaved row `r`.
pub fn interleaved_from_halves(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            h * head_dim + (within % 2) * half + within / 2
        })
        .collect()
}

/// The inverse of a row order: entry `i` of the result is where row `i`
/// went (`inverse[order[r]] == r`).
pub fn inverse_order(order: &[usize]) -> Vec<usize> {
    let mut inverse = vec![0; order.len()];
    for (r, &from) in order.iter().enumerate() {
        inverse[from] = r;
    }
    inverse
}

/// `t`'s rows (its first dimension) gathered by `order`: row `r` of the
/// result is row `order[r]` of `t`.
pub fn gather_rows(
    t: &candle_core::Tensor,
    order: &[usize],
) -> candle_core::Result<candle_core::Tensor> {
    let order: Vec<u32> = order.iter().map(|&r| r as u32).collect();
    t.index_select(&candle_core::Tensor::new(order, t.device())?, 0)
}

/// The GGUF name of a projection's bias in `layer` (`blk.0.attn_q.bias`).
pub fn bias_tensor(layer: usize, proj: Proj) -> String {
    format!("blk.{layer}.{}.bias", proj.gguf_name())
}

/// The token embedding (and, in small models, the output projection too).
pub const TOKEN_EMBEDDING: &str = "token_embd.weight";
/// The final norm's weight.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// The output projection, when not tied to the embedding.
pub const OUTPUT: &str = "output.weight";
/// Per-layer norms (short names, see [`block_tensor`]).
pub const ATTN_NORM: &str = "attn_norm";
pub const FFN_NORM: &str = "ffn_norm";
/// q, k and v in one matrix (Phi-3), short name as [`ATTN_NORM`].
pub const ATTN_QKV: &str = "attn_qkv";
/// gate and up in one matrix (Phi-3): llama.cpp names it as up alone.
pub const FFN_GATE_UP: &str = "ffn_up";
/// Gemma 2's norms of the attention's and the feed-forward's outputs.
pub const POST_ATTN_NORM: &str = "post_attention_norm";
pub const POST_FFN_NORM: &str = "post_ffw_norm";
/// Per-head norms of q and k, in the families that have them.
pub const ATTN_Q_NORM: &str = "attn_q_norm";
pub const ATTN_K_NORM: &str = "attn_k_norm";

/// The GGUF name of a per-layer tensor: `blk.{layer}.{short}.weight`.
pub fn block_tensor(layer: usize, short: &str) -> String {
    format!("blk.{layer}.{short}.weight")
}

/// The projections of a layer that an adapter (LoRA) can add to, named as
/// PEFT's `target_modules` name them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Proj {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// (Hugging Face module, GGUF short name).
    const fn names(self) -> (&'static str, &'static str) {
        match self {
            Proj::Q => ("self_attn.q_proj", "attn_q"),
            Proj::K => ("self_attn.k_proj", "attn_k"),
            Proj::V => ("self_attn.v_proj", "attn_v"),
            Proj::O => ("self_attn.o_proj", "attn_output"),
            Proj::Gate => ("mlp.gate_proj", "ffn_gate"),
            Proj::Up => ("mlp.up_proj", "ffn_up"),
            Proj::Down => ("mlp.down_proj", "ffn_down"),
        }
    }

    /// The module's name in Hugging Face llama checkpoints (and PEFT).
    pub fn hf_name(self) -> &'static str {
        self.names().0
    }

    /// The short name in GGUF files (`attn_q`).
    pub fn gguf_name(self) -> &'static str {
        self.names().1
    }

    /// The GGUF tensor of this projection in `layer`.
    pub fn gguf_tensor(self, layer: usize) -> String {
        block_tensor(layer, self.gguf_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    #[test]
    fn halves_become_pairs_as_llama_cpp_permutes_them() {
        // One head of 8: Hugging Face rows 0..4 rotate with 4..8; after
        // the permutation row 2i holds row i and row 2i+1 holds i + 4.
        assert_eq!(interleaved_from_halves(1, 8), [0, 4, 1, 5, 2, 6, 3, 7]);
        let two = interleaved_from_halves(2, 4);
        assert_eq!(two, [0, 2, 1, 3, 4, 6, 5, 7]);
        let order = interleaved_from_halves(1, 8);
        let back = inverse_order(&order);
        assert_eq!(back, [0, 2, 4, 6, 1, 3, 5, 7]);
        assert!((0..8).all(|i| order[back[i]] == i));
    }

    #[test]
    fn names_agree_with_both_conventions() {
        assert_eq!(Proj::O.gguf_tensor(3), "blk.3.attn_output.weight");
        assert_eq!(Proj::Down.hf_name(), "mlp.down_proj");
        // PEFT's target_modules names are the serde names.
        for p in Proj::ALL {
            let name = serde_json::to_value(p).unwrap();
            assert!(p.hf_name().ends_with(name.as_str().unwrap()), "{p:?}");
        }
    }

    /// What loading `overrides`'s variant of the tiny model says.
    fn load_error(name: &str, overrides: &[(&str, Value)]) -> String {
        use crate::gguf::GgufFile;
        let dir = std::env::temp_dir().join(format!("fw-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = crate::testing::write_tiny_variant(&dir, name, 3, overrides).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let checked = LlamaConfig::from_gguf(&gguf).and_then(|c| c.check_tensors(&gguf));
        match (checked, crate::tokenizer::TextTokenizer::from_gguf(&gguf)) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            (Ok(_), Ok(_)) => "loaded".into(),
        }
    }

    #[test]
    fn what_would_be_served_wrongly_is_refused_at_load_naming_it() {
        let s = |v: &str| Value::String(v.into());
        assert_eq!(load_error("plain", &[]), "loaded");
        assert_eq!(
            load_error("gpt2-pre", &[("tokenizer.ggml.pre", s("gpt-2"))]),
            "loaded"
        );
        let e = load_error("falcon-pre", &[("tokenizer.ggml.pre", s("falcon"))]);
        assert!(e.contains("pre-tokenizer `falcon`"), "{e}");
        let e = load_error("gemma-arch", &[("general.architecture", s("gemma3n"))]);
        assert!(e.contains("architecture gemma3n is not supported"), "{e}");
        let e = load_error("yarn", &[("llama.rope.scaling.type", s("yarn"))]);
        assert!(e.contains("rope scaling `yarn`"), "{e}");
        assert_eq!(
            load_error("no-scaling", &[("llama.rope.scaling.type", s("none"))]),
            "loaded"
        );
    }

    #[test]
    fn metadata_that_disagrees_with_itself_or_the_tensors_is_refused_naming_it() {
        let u = Value::U32;
        let e = load_error("no-heads", &[("llama.attention.head_count", u(0))]);
        assert!(e.contains("0 heads"), "{e}");
        let e = load_error("kv-3", &[("llama.attention.head_count_kv", u(3))]);
        assert!(e.contains("4 heads sharing 3"), "{e}");
        let e = load_error("odd-head", &[("llama.attention.key_length", u(15))]);
        assert!(e.contains("heads of 15 dimensions"), "{e}");
        // Heads of 32 where the tensors hold heads of 16.
        let e = load_error("wide-head", &[("llama.attention.key_length", u(32))]);
        assert!(
            e.contains("tensor blk.0.attn_q.weight is [64, 64]") && e.contains("[128, 64]"),
            "{e}"
        );
        let e = load_error("short-ffn", &[("llama.feed_forward_length", u(96))]);
        assert!(e.contains("blk.0.ffn_gate.weight"), "{e}");
        // A biased family's file without the biases.
        let e = load_error(
            "unbiased-qwen",
            &[
                ("general.architecture", Value::String("qwen2".into())),
                ("qwen2.embedding_length", u(64)),
                ("qwen2.feed_forward_length", u(128)),
                ("qwen2.block_count", u(2)),
                ("qwen2.attention.head_count", u(4)),
                ("qwen2.attention.head_count_kv", u(2)),
            ],
        );
        assert!(
            e.contains("the file has no tensor blk.0.attn_q.bias"),
            "{e}"
        );
    }
}
