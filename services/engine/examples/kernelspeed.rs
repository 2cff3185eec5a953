//! Kernel throughput probe (dev aid).
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use flywheel_engine::kernels::QMatrix;
use std::time::Instant;
fn main() {
    let (rows, cols) = (3072, 576);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let m = QMatrix::from_qtensor(&QTensor::quantize(&w, dt).unwrap()).unwrap();
        for t in [1usize, 4, 16] {
            let x = vec![0.5f32; t * cols];
            let mut y = vec![0f32; t * rows];
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let iters = 2000 / t;
            let s = Instant::now();
            pool.install(|| {
                for _ in 0..iters {
                    m.matmul(&x, t, &mut y);
                }
            });
            let secs = s.elapsed().as_secs_f64();
            let blocks = (rows * cols / 32 * iters) as f64;
            println!(
                "{dt:?} t={t}: {:.1} ns/block, {:.1} GFLOP/s",
                secs * 1e9 / blocks,
                2.0 * (rows * cols * t * iters) as f64 / secs / 1e9
            );
        }
    }
}
