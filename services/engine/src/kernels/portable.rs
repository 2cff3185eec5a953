//! The kernels in plain Rust, for CPUs without AVX2: the same results as
//! the SIMD paths up to summation order.

use super::formats::QMatrix;

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums, like the SIMD path, so the order is similar.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks(8).zip(b.chunks(8)) {
        for i in 0..ca.len() {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum()
}

/// Rows `row0..row0 + n` of `m` against all `t` columns of `x`, into `out`
/// laid out `[n][t]`.
pub fn rows(m: &QMatrix, x: &[f32], t: usize, row0: usize, n: usize, out: &mut [f32]) {
    let cols = m.cols();
    let mut w = vec![0f32; cols];
    for r in 0..n {
        m.row(row0 + r, &mut w);
        for j in 0..t {
            out[r * t + j] = dot(&w, &x[j * cols..(j + 1) * cols]);
        }
    }
}
