//! Every function here requires AVX2 and FMA; callers check first.

use std::arch::x86_64::*;

use super::formats::{F32Matrix, Q4_1_BYTES, Q4_1Matrix, Q8_0_BYTES, Q8_0Matrix, QK};

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
pub unsafe fn rows<B: Blocks>(m: &B, x: &[f32], t: usize, row0: usize, n: usize, out: &mut [f32]) {
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
pub unsafe fn f32_rows(m: &F32Matrix, x: &[f32], t: usize, row0: usize, n: usize, out: &mut [f32]) {
    for r in 0..n {
        let w = &m.w[(row0 + r) * m.cols..(row0 + r + 1) * m.cols];
        for j in 0..t {
            // SAFETY: the caller holds the feature requirement.
            out[r * t + j] = unsafe { dot(w, &x[j * m.cols..(j + 1) * m.cols]) };
        }
    }
}
