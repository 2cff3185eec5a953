//! The same kernels with 512-bit registers: a 32-weight block is two
//! registers, and 32 of them let a tile cover two rows by four columns.
//! Every function here requires AVX-512F; callers check first.

use std::arch::x86_64::*;

use super::formats::{Q4_1_BYTES, Q4_1Matrix, Q8_0_BYTES, Q8_0Matrix, QK};

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
