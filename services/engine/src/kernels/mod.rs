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
//! The instruction set is chosen when the engine loads ([`Simd::detect`]):
//! AVX-512 ([`avx512`]) or AVX2+FMA ([`avx2`]) where the CPU has them, a
//! portable loop ([`portable`]) elsewhere, each computing the same thing;
//! configuration may cap it (`FLYWHEEL_SIMD`).

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod formats;
mod portable;

use rayon::prelude::*;

pub use formats::QMatrix;

impl QMatrix {
    /// `y = x W^T` for `t` rows of input: `x` is `t x cols`, `y` is `t x rows`.
    /// Runs on the current rayon pool, split by output rows.
    pub fn matmul(&self, simd: Simd, x: &[f32], t: usize, y: &mut [f32]) {
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
                self.rows_into(simd, x, t, row0, n, &mut local);
                for (r, col) in local.chunks_exact(t).enumerate() {
                    for (j, &v) in col.iter().enumerate() {
                        // SAFETY: (j, row0 + r) is inside y (t x rows), and no two
                        // chunks share a row, so writes never overlap.
                        unsafe { out.write(j * rows + row0 + r, v) };
                    }
                }
            });
    }

    fn rows_into(&self, simd: Simd, x: &[f32], t: usize, row0: usize, n: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd == Simd::Avx512 {
            // SAFETY: `Simd::Avx512` is only ever detected on CPUs with
            // AVX-512F (and AVX2); the kernels assert their bounds.
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
        if simd >= Simd::Avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (`Simd::detect`); the
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
        portable::rows(self, x, t, row0, n, out);
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

/// The instruction set the kernels use, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Simd {
    #[default]
    Portable,
    Avx2,
    Avx512,
}

impl Simd {
    /// The widest set this CPU has, at most `limit` (which configuration
    /// lowers for comparison, or for machines where wide vectors throttle).
    pub fn detect(limit: Simd) -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let best = if avx2 && is_x86_feature_detected!("avx512f") {
                Simd::Avx512
            } else if avx2 {
                Simd::Avx2
            } else {
                Simd::Portable
            };
            best.min(limit)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = limit;
            Simd::Portable
        }
    }
}

impl std::str::FromStr for Simd {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "portable" => Ok(Self::Portable),
            "avx2" => Ok(Self::Avx2),
            "avx512" => Ok(Self::Avx512),
            other => Err(format!("{other:?} is not portable, avx2 or avx512")),
        }
    }
}

/// `sum(a[i] * b[i])`.
#[inline]
pub fn dot(simd: Simd, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd >= Simd::Avx2 && a.len() == b.len() {
        // SAFETY: AVX2/FMA present (`Simd::detect`); lengths equal.
        return unsafe { avx2::dot(a, b) };
    }
    let _ = simd;
    portable::dot(a, b)
}

/// `y += a * x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::formats::QMatrix;
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = flywheel_model::rng::Rng::seeded(seed);
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    /// Every instruction set this CPU has, the portable loop included.
    fn paths() -> Vec<Simd> {
        let best = Simd::detect(Simd::Avx512);
        [Simd::Portable, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|s| *s <= best)
            .collect()
    }

    /// Each kernel against an f32 reference built from candle's own dequantization.
    fn check(dtype: GgmlDType) {
        for simd in paths() {
            check_with(dtype, simd);
        }
    }

    fn check_with(dtype: GgmlDType, simd: Simd) {
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
            m.matmul(simd, &x, t, &mut y);
            for j in 0..t {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wd[r][c] as f64 * x[j * cols + c] as f64)
                        .sum();
                    let got = y[j * rows + r] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} {simd:?} t={t} r={r}: {got} vs {want}"
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
        for simd in paths() {
            let mut all = vec![0f32; 7 * rows];
            m.matmul(simd, &x, 7, &mut all);
            for j in 0..7 {
                let mut one = vec![0f32; rows];
                m.matmul(simd, &x[j * cols..(j + 1) * cols], 1, &mut one);
                assert_eq!(one, all[j * rows..(j + 1) * rows], "{simd:?} column {j}");
            }
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
        let simd = Simd::detect(Simd::Avx512);
        ma.matmul(simd, &x, 1, &mut ya);
        mb.matmul(simd, &x, 1, &mut yb);
        s.matmul(simd, &x, 1, &mut ys);
        assert_eq!(&ys[..16], &ya[..]);
        assert_eq!(&ys[16..], &yb[..]);
    }
}
