//! Quick single-stream speed probe of the fast forward (dev aid).
use flywheel_engine::fast::{BatchItem, FastLlama};
use flywheel_engine::gguf::GgufFile;
use std::time::Instant;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let threads: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2);
    let m = FastLlama::load(
        &mut GgufFile::open(std::path::Path::new(&path)).unwrap(),
        threads,
    )
    .unwrap();
    println!(
        "weights read per step: {:.1} MB",
        m.weight_bytes() as f64 / 1e6
    );
    let prompt: Vec<u32> = (100..200).collect();
    let mut c = m.new_cache();
    let t = Instant::now();
    m.step(&mut [BatchItem {
        cache: &mut c,
        tokens: &prompt,
        want_logits: true,
    }])
    .unwrap();
    println!(
        "prefill {:.1} tok/s",
        prompt.len() as f64 / t.elapsed().as_secs_f64()
    );
    for b in [1usize, 4, 8] {
        let mut caches: Vec<_> = (0..b).map(|_| m.new_cache()).collect();
        for c in caches.iter_mut() {
            m.step(&mut [BatchItem {
                cache: c,
                tokens: &prompt[..20],
                want_logits: false,
            }])
            .unwrap();
        }
        let t = Instant::now();
        let steps = 64;
        for s in 0..steps {
            let toks: Vec<[u32; 1]> = (0..b).map(|i| [(300 + s + i) as u32]).collect();
            let mut items: Vec<_> = caches
                .iter_mut()
                .zip(&toks)
                .map(|(c, t)| BatchItem {
                    cache: c,
                    tokens: t,
                    want_logits: true,
                })
                .collect();
            m.step(&mut items).unwrap();
        }
        println!(
            "decode batch {b}: {:.1} tok/s aggregate",
            (steps * b) as f64 / t.elapsed().as_secs_f64()
        );
    }
}
