//! Weight matrices as the kernels read them: GGUF's Q4_1 and Q8_0 blocks
//! kept byte for byte, anything else dequantized to f32.

use candle_core::quantized::{GgmlDType, QTensor};

use crate::{EngineError, Result};

pub const QK: usize = 32;

/// A weight matrix of `rows x cols` (output x input), row-major.
#[derive(Debug, Clone)]
pub enum QMatrix {
    Q4_1(Q4_1Matrix),
    Q8_0(Q8_0Matrix),
    F32(F32Matrix),
}

/// GGUF's Q4_1 blocks, kept byte for byte: per 32 weights an f16 scale `d`,
/// an f16 minimum `m` and 16 bytes whose byte j holds weight j (low nibble)
/// and weight j+16 (high nibble); weight = q * d + m.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) raw: Vec<u8>,
}

/// GGUF's Q8_0 blocks: per 32 weights an f16 scale and 32 signed bytes.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) raw: Vec<u8>,
}

pub const Q4_1_BYTES: usize = 20;
pub const Q8_0_BYTES: usize = 34;

fn f16_at(raw: &[u8], at: usize) -> f32 {
    f16(raw[at], raw[at + 1])
}

impl Q4_1Matrix {
    pub const BYTES: usize = Q4_1_BYTES;
}

impl Q8_0Matrix {
    pub const BYTES: usize = Q8_0_BYTES;
}

#[derive(Debug, Clone)]
pub struct F32Matrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) w: Vec<f32>,
}

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_le_bytes([lo, hi]).to_f32()
}

impl QMatrix {
    /// An f32 matrix from its rows.
    pub fn f32(rows: usize, cols: usize, w: Vec<f32>) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(EngineError::Invalid(format!(
                "a {rows} x {cols} matrix needs {} values, not {}",
                rows * cols,
                w.len()
            )));
        }
        Ok(Self::F32(F32Matrix { rows, cols, w }))
    }

    /// [`from_qtensor`](Self::from_qtensor), a matrix of a type without a
    /// kernel quantized to `to` (Q8_0 or Q4_1) rather than expanded, where
    /// its rows split into blocks.
    pub fn from_qtensor_as(t: &QTensor, to: Option<GgmlDType>) -> Result<Self> {
        let (_, cols) = t.shape().dims2()?;
        match to {
            Some(to)
                if !matches!(t.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) && cols % QK == 0 =>
            {
                let w = t.dequantize(&candle_core::Device::Cpu)?;
                Self::from_qtensor(&QTensor::quantize(&w, to)?)
            }
            _ => Self::from_qtensor(t),
        }
    }

    /// Takes a GGUF tensor as it is stored when we have a kernel for its
    /// format; any other format is dequantized to f32.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        let raw = t.data()?;
        match t.dtype() {
            GgmlDType::Q4_1 if cols % QK == 0 => {
                let raw = raw.to_vec();
                assert_eq!(raw.len(), rows * cols / QK * Q4_1_BYTES);
                Ok(Self::Q4_1(Q4_1Matrix { rows, cols, raw }))
            }
            GgmlDType::Q8_0 if cols % QK == 0 => {
                let raw = raw.to_vec();
                assert_eq!(raw.len(), rows * cols / QK * Q8_0_BYTES);
                Ok(Self::Q8_0(Q8_0Matrix { rows, cols, raw }))
            }
            _ => {
                let w = t
                    .dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Self::F32(F32Matrix { rows, cols, w }))
            }
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.rows,
            Self::Q8_0(m) => m.rows,
            Self::F32(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.cols,
            Self::Q8_0(m) => m.cols,
            Self::F32(m) => m.cols,
        }
    }

    /// Bytes of weight data read by one pass over the matrix.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.raw.len(),
            Self::Q8_0(m) => m.raw.len(),
            Self::F32(m) => 4 * m.w.len(),
        }
    }

    /// Stacks matrices with the same column count into one (their rows
    /// concatenated), so several projections of one input run as one pass.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self> {
        let cols = parts[0].cols();
        if parts.iter().any(|p| p.cols() != cols) {
            return Err(EngineError::Load("stacked matrices differ in width".into()));
        }
        let rows = parts.iter().map(|p| p.rows()).sum();
        if parts.iter().all(|p| matches!(p, Self::Q4_1(_))) {
            let mut out = Q4_1Matrix {
                rows,
                cols,
                raw: vec![],
            };
            for p in parts {
                if let Self::Q4_1(p) = p {
                    out.raw.extend(p.raw);
                }
            }
            return Ok(Self::Q4_1(out));
        }
        if parts.iter().all(|p| matches!(p, Self::Q8_0(_))) {
            let mut out = Q8_0Matrix {
                rows,
                cols,
                raw: vec![],
            };
            for p in parts {
                if let Self::Q8_0(p) = p {
                    out.raw.extend(p.raw);
                }
            }
            return Ok(Self::Q8_0(out));
        }
        // Mixed formats: fall back to f32 for the stack.
        let mut w = Vec::with_capacity(rows * cols);
        for p in &parts {
            let mut row = vec![0f32; cols];
            for r in 0..p.rows() {
                p.row(r, &mut row);
                w.extend_from_slice(&row);
            }
        }
        Ok(Self::F32(F32Matrix { rows, cols, w }))
    }

    /// The matrix with its rows reordered: row `r` of the result is row
    /// `order[r]` of this one. Quantized blocks run along a row, so rows
    /// move byte for byte.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        let mut seen = vec![false; self.rows()];
        let is_permutation = order.len() == self.rows()
            && order
                .iter()
                .all(|&r| r < seen.len() && !std::mem::replace(&mut seen[r], true));
        if !is_permutation {
            return Err(EngineError::Load(format!(
                "a row order that is not a permutation of the matrix's {} rows",
                self.rows()
            )));
        }
        let pick = |raw: &[u8], row_bytes: usize| -> Vec<u8> {
            order
                .iter()
                .flat_map(|&r| raw[r * row_bytes..(r + 1) * row_bytes].iter().copied())
                .collect()
        };
        Ok(match self {
            Self::Q4_1(m) => Self::Q4_1(Q4_1Matrix {
                raw: pick(&m.raw, m.cols / QK * Q4_1_BYTES),
                ..*m
            }),
            Self::Q8_0(m) => Self::Q8_0(Q8_0Matrix {
                raw: pick(&m.raw, m.cols / QK * Q8_0_BYTES),
                ..*m
            }),
            Self::F32(m) => Self::F32(F32Matrix {
                w: order
                    .iter()
                    .flat_map(|&r| m.w[r * m.cols..(r + 1) * m.cols].iter().copied())
                    .collect(),
                ..*m
            }),
        })
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            Self::Q4_1(m) => {
                let bpr = m.cols / QK;
                for b in 0..bpr {
                    let at = (r * bpr + b) * Q4_1_BYTES;
                    let (d, mn) = (f16_at(&m.raw, at), f16_at(&m.raw, at + 2));
                    let q = &m.raw[at + 4..at + Q4_1_BYTES];
                    let o = &mut out[b * QK..b * QK + QK];
                    for j in 0..16 {
                        o[j] = (q[j] & 0x0F) as f32 * d + mn;
                        o[j + 16] = (q[j] >> 4) as f32 * d + mn;
                    }
                }
            }
            Self::Q8_0(m) => {
                let bpr = m.cols / QK;
                for b in 0..bpr {
                    let at = (r * bpr + b) * Q8_0_BYTES;
                    let d = f16_at(&m.raw, at);
                    for j in 0..QK {
                        out[b * QK + j] = m.raw[at + 2 + j] as i8 as f32 * d;
                    }
                }
            }
            Self::F32(m) => out.copy_from_slice(&m.w[r * m.cols..(r + 1) * m.cols]),
        }
    }
}
