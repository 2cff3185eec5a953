//! Matrix kernels for the inference hot path: quantized weights times f32
//! activations.
//!
//! Weights stay in their GGUF block format (Q4_1: 32 weights as 4-bit
//! integers with a scale and a minimum; Q8_0: 32 signed bytes and a scale),
//! so decoding a token reads ~0.6 bytes per weight instead of 4. Each block
//! is expanded to f32 in registers and multiplied with **f32** activations:
//! quantizing the activations too (what candle's and llama.cpp's quantized
//! matmuls do) is what makes SmolLM2 answer wrongly.
//!
//! A block is dequantized once and used for every column of the batch, which
//! is why batched decoding and prefill cost little more than one stream.
//! Every output element is computed with the same sequence of operations
//! whatever the batch size, so batching never changes a sequence's numbers.
//!
//! AVX2+FMA is used when the CPU has it (checked at run time); otherwise a
//! portable loop computes the same thing.

#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::{EngineError, Result};

const QK: usize = 32;

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
    rows: usize,
    cols: usize,
    raw: Vec<u8>,
}

/// GGUF's Q8_0 blocks: per 32 weights an f16 scale and 32 signed bytes.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    raw: Vec<u8>,
}

const Q4_1_BYTES: usize = 20;
const Q8_0_BYTES: usize = 34;

fn f16_at(raw: &[u8], at: usize) -> f32 {
    f16(raw[at], raw[at + 1])
}

impl Q4_1Matrix {
    const BYTES: usize = Q4_1_BYTES;
}

impl Q8_0Matrix {
    const BYTES: usize = Q8_0_BYTES;
}

#[derive(Debug, Clone)]
pub struct F32Matrix {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
}

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_le_bytes([lo, hi]).to_f32()
}

impl QMatrix {
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

    /// `y = x W^T` for `t` rows of input: `x` is `t x cols`, `y` is `t x rows`.
    /// Runs on the current rayon pool, split by output rows.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), t * cols);
        assert_eq!(y.len(), t * rows);
        let chunk_rows = (rows / (rayon::current_num_threads() * 4)).clamp(8, 256);
        let out = SharedOut(y.as_mut_ptr());
        (0..rows.div_ceil(chunk_rows))
            .into_par_iter()
            .for_each(|c| {
                let row0 = c * chunk_rows;
                let n = chunk_rows.min(rows - row0);
                // Each chunk computes its rows for all t columns into a small
                // local buffer, then writes them to their places in `y`.
                let mut local = vec![0f32; n * t];
                self.rows_into(x, t, row0, n, &mut local);
                for (r, col) in local.chunks_exact(t).enumerate() {
                    for (j, &v) in col.iter().enumerate() {
                        // SAFETY: (j, row0 + r) is inside y (t x rows), and no two
                        // chunks share a row, so writes never overlap.
                        unsafe { out.write(j * rows + row0 + r, v) };
                    }
                }
            });
    }

    fn rows_into(&self, x: &[f32], t: usize, row0: usize, n: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked above); the kernels
            // assert their bounds.
            let done = unsafe {
                match self {
                    Self::Q4_1(m) => avx512::rows(m, x, t, row0, n, out),
                    Self::Q8_0(m) => avx512::rows(m, x, t, row0, n, out),
                    Self::F32(_) => false,
                }
            };
            if done {
                return;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); the
            // kernels only read within the slices' bounds (asserted there).
            unsafe {
                match self {
                    Self::Q4_1(m) => avx2::rows(m, x, t, row0, n, out),
                    Self::Q8_0(m) => avx2::rows(m, x, t, row0, n, out),
                    Self::F32(m) => avx2::f32_rows(m, x, t, row0, n, out),
                }
            }
            return;
        }
        let mut w = vec![0f32; self.cols()];
        for r in 0..n {
            self.row(row0 + r, &mut w);
            for j in 0..t {
                out[r * t + j] = dot_portable(&w, &x[j * self.cols()..(j + 1) * self.cols()]);
            }
        }
    }
}

/// The output of a parallel matmul, written by chunks that own disjoint rows.
struct SharedOut(*mut f32);
// SAFETY: chunks write disjoint elements (see `matmul`), and the buffer
// outlives the parallel loop, which joins before `matmul` returns.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must be in bounds and written by no other thread.
    unsafe fn write(&self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v };
    }
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums, like the SIMD path, so the order is similar.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks(8).zip(b.chunks(8)) {
        for i in 0..ca.len() {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum()
}

/// Which SIMD path runs: `FLYWHEEL_SIMD=avx2` (or `portable`) forces a
/// narrower one, for comparison and for machines where wide vectors throttle.
fn simd_limit() -> &'static str {
    static LIMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIMIT.get_or_init(|| std::env::var("FLYWHEEL_SIMD").unwrap_or_default())
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        simd_limit().is_empty() && is_x86_feature_detected!("avx512f") && has_avx2()
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        simd_limit() != "portable"
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `sum(a[i] * b[i])`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && a.len() == b.len() {
        // SAFETY: AVX2/FMA present; lengths equal.
        return unsafe { avx2::dot(a, b) };
    }
    dot_portable(a, b)
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Every function here requires AVX2 and FMA; callers check first.
    use std::arch::x86_64::*;

    use super::{F32Matrix, Q4_1_BYTES, Q4_1Matrix, Q8_0_BYTES, Q8_0Matrix, QK};

    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                )
            };
            acc = _mm256_fmadd_ps(va, vb, acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// A weight format whose 32-weight blocks can be expanded to f32.
    pub trait Blocks {
        fn cols(&self) -> usize;
        fn blocks(&self) -> usize;
        /// The 32 weights of block `i` (row-major block order).
        ///
        /// # Safety
        /// AVX2 and FMA must be available and `i < self.blocks()`.
        unsafe fn dequant(&self, i: usize) -> [__m256; 4];
    }

    impl Blocks for Q4_1Matrix {
        fn cols(&self) -> usize {
            self.cols
        }
        fn blocks(&self) -> usize {
            self.raw.len() / Self::BYTES
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dequant(&self, i: usize) -> [__m256; 4] {
            // SAFETY: i < blocks, so the block's bytes are inside raw.
            let (v, d, mn) = unsafe {
                let p = self.raw.as_ptr().add(i * Q4_1_BYTES);
                (
                    _mm_loadu_si128(p.add(4) as *const __m128i),
                    _mm256_cvtph_ps(_mm_set1_epi16((p as *const u16).read_unaligned() as i16)),
                    _mm256_cvtph_ps(_mm_set1_epi16(
                        (p.add(2) as *const u16).read_unaligned() as i16
                    )),
                )
            };
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            [
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, mn),
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                    d,
                    mn,
                ),
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, mn),
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                    d,
                    mn,
                ),
            ]
        }
    }

    impl Blocks for Q8_0Matrix {
        fn cols(&self) -> usize {
            self.cols
        }
        fn blocks(&self) -> usize {
            self.raw.len() / Self::BYTES
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dequant(&self, i: usize) -> [__m256; 4] {
            // SAFETY: i < blocks, so the block's bytes are inside raw.
            let (lo, hi, d) = unsafe {
                let p = self.raw.as_ptr().add(i * Q8_0_BYTES);
                (
                    _mm_loadu_si128(p.add(2) as *const __m128i),
                    _mm_loadu_si128(p.add(18) as *const __m128i),
                    _mm256_cvtph_ps(_mm_set1_epi16((p as *const u16).read_unaligned() as i16)),
                )
            };
            [
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d),
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                    d,
                ),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d),
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                    d,
                ),
            ]
        }
    }

    /// `R` rows against `C` columns: each block is expanded once and used
    /// for all `C` columns; each column's 32 inputs are loaded once and used
    /// for all `R` rows. Whatever the tile shape, one (row, column) dot
    /// product is always the same two chains of fused multiply-adds over
    /// the blocks in order, so results do not depend on the batch.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // indices keep the tile's registers explicit
    unsafe fn tile<B: Blocks, const R: usize, const C: usize>(
        m: &B,
        x: &[f32],
        t: usize,
        t0: usize,
        rows: [usize; R],
        local: [usize; R],
        out: &mut [f32],
    ) {
        let cols = m.cols();
        let bpr = cols / QK;
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        for b in 0..bpr {
            let mut w = [[_mm256_setzero_ps(); 4]; R];
            for r in 0..R {
                // SAFETY: rows[r] is a row of m, so the block index is in range.
                w[r] = unsafe { m.dequant(rows[r] * bpr + b) };
            }
            for c in 0..C {
                // SAFETY: t0 + c < t and b < bpr: the 32 floats lie in `x`.
                let xs = unsafe {
                    let p = x.as_ptr().add((t0 + c) * cols + b * QK);
                    [
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(p.add(16)),
                        _mm256_loadu_ps(p.add(24)),
                    ]
                };
                for r in 0..R {
                    let a = &mut acc[r][c];
                    a[0] = _mm256_fmadd_ps(w[r][0], xs[0], a[0]);
                    a[1] = _mm256_fmadd_ps(w[r][1], xs[1], a[1]);
                    a[0] = _mm256_fmadd_ps(w[r][2], xs[2], a[0]);
                    a[1] = _mm256_fmadd_ps(w[r][3], xs[3], a[1]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[local[r] * t + t0 + c] = hsum(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
            }
        }
    }

    /// Rows `row0..row0 + n` of `m` against all `t` columns of `x`, into
    /// `out` laid out `[n][t]`. One column (decode of one stream): rows in
    /// pairs, so two independent chains hide the FMA latency. Several
    /// columns: four columns per expanded block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<B: Blocks>(
        m: &B,
        x: &[f32],
        t: usize,
        row0: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let bpr = m.cols() / QK;
        assert!(x.len() >= t * m.cols() && out.len() >= n * t && (row0 + n) * bpr <= m.blocks());
        // SAFETY (all tiles): rows < row0 + n and columns < t, checked above.
        unsafe {
            if t == 1 {
                let mut r = 0;
                while r + 2 <= n {
                    tile::<B, 2, 1>(m, x, 1, 0, [row0 + r, row0 + r + 1], [r, r + 1], out);
                    r += 2;
                }
                if r < n {
                    tile::<B, 1, 1>(m, x, 1, 0, [row0 + r], [r], out);
                }
                return;
            }
            for r in 0..n {
                let (g, l) = ([row0 + r], [r]);
                let mut t0 = 0;
                while t0 + 4 <= t {
                    tile::<B, 1, 4>(m, x, t, t0, g, l, out);
                    t0 += 4;
                }
                match t - t0 {
                    3 => tile::<B, 1, 3>(m, x, t, t0, g, l, out),
                    2 => tile::<B, 1, 2>(m, x, t, t0, g, l, out),
                    1 => tile::<B, 1, 1>(m, x, t, t0, g, l, out),
                    _ => {}
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_rows(
        m: &F32Matrix,
        x: &[f32],
        t: usize,
        row0: usize,
        n: usize,
        out: &mut [f32],
    ) {
        for r in 0..n {
            let w = &m.w[(row0 + r) * m.cols..(row0 + r + 1) * m.cols];
            for j in 0..t {
                // SAFETY: the caller holds the feature requirement.
                out[r * t + j] = unsafe { dot(w, &x[j * m.cols..(j + 1) * m.cols]) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The same kernels with 512-bit registers: a 32-weight block is two
    //! registers, and 32 of them let a tile cover two rows by four columns.
    //! Every function here requires AVX-512F; callers check first.
    use std::arch::x86_64::*;

    use super::{Q4_1_BYTES, Q4_1Matrix, Q8_0_BYTES, Q8_0Matrix, QK};

    pub trait Blocks {
        fn cols(&self) -> usize;
        fn blocks(&self) -> usize;
        /// The 32 weights of block `i`.
        ///
        /// # Safety
        /// AVX-512F must be available and `i < self.blocks()`.
        unsafe fn dequant(&self, i: usize) -> [__m512; 2];
    }

    impl Blocks for Q4_1Matrix {
        fn cols(&self) -> usize {
            self.cols
        }
        fn blocks(&self) -> usize {
            self.raw.len() / Self::BYTES
        }
        #[inline]
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn dequant(&self, i: usize) -> [__m512; 2] {
            // SAFETY: i < blocks, so the block's bytes are inside raw.
            let (v, d, mn) = unsafe {
                let p = self.raw.as_ptr().add(i * Q4_1_BYTES);
                (
                    _mm_loadu_si128(p.add(4) as *const __m128i),
                    _mm512_cvtph_ps(_mm256_set1_epi16((p as *const u16).read_unaligned() as i16)),
                    _mm512_cvtph_ps(_mm256_set1_epi16(
                        (p.add(2) as *const u16).read_unaligned() as i16
                    )),
                )
            };
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            [
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, mn),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, mn),
            ]
        }
    }

    impl Blocks for Q8_0Matrix {
        fn cols(&self) -> usize {
            self.cols
        }
        fn blocks(&self) -> usize {
            self.raw.len() / Self::BYTES
        }
        #[inline]
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn dequant(&self, i: usize) -> [__m512; 2] {
            // SAFETY: i < blocks, so the block's bytes are inside raw.
            let (lo, hi, d) = unsafe {
                let p = self.raw.as_ptr().add(i * Q8_0_BYTES);
                (
                    _mm_loadu_si128(p.add(2) as *const __m128i),
                    _mm_loadu_si128(p.add(18) as *const __m128i),
                    _mm512_cvtph_ps(_mm256_set1_epi16((p as *const u16).read_unaligned() as i16)),
                )
            };
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
            ]
        }
    }

    /// `R` rows by `C` columns; one (row, column) dot product is always two
    /// chains (first and second half of each block) of one FMA per block,
    /// whatever the tile, so results do not depend on the batch.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    #[allow(clippy::needless_range_loop)] // indices keep the tile's registers explicit
    unsafe fn tile<B: Blocks, const R: usize, const C: usize>(
        m: &B,
        x: &[f32],
        t: usize,
        t0: usize,
        rows: [usize; R],
        local: [usize; R],
        out: &mut [f32],
    ) {
        let cols = m.cols();
        let bpr = cols / QK;
        let mut acc = [[[_mm512_setzero_ps(); 2]; C]; R];
        for b in 0..bpr {
            let mut w = [[_mm512_setzero_ps(); 2]; R];
            for r in 0..R {
                // SAFETY: rows[r] is a row of m.
                w[r] = unsafe { m.dequant(rows[r] * bpr + b) };
            }
            for c in 0..C {
                // SAFETY: t0 + c < t and b < bpr: the 32 floats lie in `x`.
                let xs = unsafe {
                    let p = x.as_ptr().add((t0 + c) * cols + b * QK);
                    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                };
                for r in 0..R {
                    let a = &mut acc[r][c];
                    a[0] = _mm512_fmadd_ps(w[r][0], xs[0], a[0]);
                    a[1] = _mm512_fmadd_ps(w[r][1], xs[1], a[1]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[local[r] * t + t0 + c] =
                    _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]));
            }
        }
    }

    /// Rows `row0..row0 + n` against all `t` columns, into `out` as `[n][t]`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn rows<B: Blocks>(
        m: &B,
        x: &[f32],
        t: usize,
        row0: usize,
        n: usize,
        out: &mut [f32],
    ) -> bool {
        let bpr = m.cols() / QK;
        assert!(x.len() >= t * m.cols() && out.len() >= n * t && (row0 + n) * bpr <= m.blocks());
        // SAFETY (all tiles): rows < row0 + n and columns < t, checked above.
        unsafe {
            if t == 1 {
                // Four rows at once: eight independent chains hide latency.
                let mut r = 0;
                while r + 4 <= n {
                    let g = [row0 + r, row0 + r + 1, row0 + r + 2, row0 + r + 3];
                    tile::<B, 4, 1>(m, x, 1, 0, g, [r, r + 1, r + 2, r + 3], out);
                    r += 4;
                }
                while r < n {
                    tile::<B, 1, 1>(m, x, 1, 0, [row0 + r], [r], out);
                    r += 1;
                }
                return true;
            }
            let mut r = 0;
            while r < n {
                let pair = r + 2 <= n;
                let mut t0 = 0;
                macro_rules! run {
                    ($c:literal) => {
                        if pair {
                            tile::<B, 2, $c>(m, x, t, t0, [row0 + r, row0 + r + 1], [r, r + 1], out)
                        } else {
                            tile::<B, 1, $c>(m, x, t, t0, [row0 + r], [r], out)
                        }
                    };
                }
                while t0 + 4 <= t {
                    run!(4);
                    t0 += 4;
                }
                match t - t0 {
                    3 => run!(3),
                    2 => run!(2),
                    1 => run!(1),
                    _ => {}
                }
                r += if pair { 2 } else { 1 };
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sampling::Rng::seeded(seed);
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    /// Each kernel against an f32 reference built from candle's own dequantization.
    fn check(dtype: GgmlDType) {
        let (rows, cols) = (70, 128);
        let w = Tensor::from_vec(random(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let wd = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let m = QMatrix::from_qtensor(&q).unwrap();
        for t in [1, 2, 3, 4, 5, 9] {
            let x = random(t * cols, 2 + t as u64);
            let mut y = vec![0f32; t * rows];
            m.matmul(&x, t, &mut y);
            for j in 0..t {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wd[r][c] as f64 * x[j * cols + c] as f64)
                        .sum();
                    let got = y[j * rows + r] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} t={t} r={r}: {got} vs {want}"
                    );
                }
            }
        }
        // Row lookup matches the dequantized tensor exactly.
        let mut row = vec![0f32; cols];
        m.row(5, &mut row);
        assert_eq!(row, wd[5]);
    }

    #[test]
    fn q4_1_matches_f32_reference() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matches_f32_reference() {
        check(GgmlDType::Q8_0);
    }

    #[test]
    fn other_formats_fall_back_to_f32() {
        let q = QTensor::quantize(
            &Tensor::ones((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F16,
        )
        .unwrap();
        assert!(matches!(
            QMatrix::from_qtensor(&q).unwrap(),
            QMatrix::F32(_)
        ));
        check(GgmlDType::F16);
    }

    #[test]
    fn batch_size_does_not_change_a_column() {
        let (rows, cols) = (33, 64);
        let w = Tensor::from_vec(random(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let m = QMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let x = random(7 * cols, 8);
        let mut all = vec![0f32; 7 * rows];
        m.matmul(&x, 7, &mut all);
        for j in 0..7 {
            let mut one = vec![0f32; rows];
            m.matmul(&x[j * cols..(j + 1) * cols], 1, &mut one);
            assert_eq!(one, all[j * rows..(j + 1) * rows], "column {j}");
        }
    }

    #[test]
    fn stacking_equals_separate_matmuls() {
        let cols = 64;
        let a = QTensor::quantize(
            &Tensor::from_vec(random(16 * cols, 3), (16, cols), &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let b = QTensor::quantize(
            &Tensor::from_vec(random(8 * cols, 4), (8, cols), &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let (ma, mb) = (
            QMatrix::from_qtensor(&a).unwrap(),
            QMatrix::from_qtensor(&b).unwrap(),
        );
        let s = QMatrix::stack(vec![ma.clone(), mb.clone()]).unwrap();
        let x = random(cols, 5);
        let (mut ya, mut yb, mut ys) = (vec![0f32; 16], vec![0f32; 8], vec![0f32; 24]);
        ma.matmul(&x, 1, &mut ya);
        mb.matmul(&x, 1, &mut yb);
        s.matmul(&x, 1, &mut ys);
        assert_eq!(&ys[..16], &ya[..]);
        assert_eq!(&ys[16..], &yb[..]);
    }
}
