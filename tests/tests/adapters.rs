//! A LoRA adapter served on its base's weights gives what training computed:
//! the engine's kernels with the adapter applied in the batch against the
//! trainer's differentiable forward with the same adapter, on the tiny model.

use candle_core::Tensor;
use flywheel_engine::testing::CpuForward;
use flywheel_model::Proj;
use flywheel_trainer::ops::TrainOps;
use flywheel_trainer::{Base, Lora, LoraConfig};

#[test]
fn the_served_adapter_matches_the_trained_one() {
    let dir = std::env::temp_dir().join(format!("fw-adapters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 9).unwrap();
    let base = Base::load(&path).unwrap();
    let lora = Lora::new(
        &base.model,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Proj::ALL.to_vec(),
            seed: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // B starts at zero; give it values so the adapter matters.
    for (i, p) in lora.pairs.values().enumerate() {
        let (out, r) = p.b.as_tensor().dims2().unwrap();
        let vals: Vec<f32> = (0..out * r)
            .map(|k| (((k * 37 + i * 11) % 17) as f32 - 8.0) * 0.02)
            .collect();
        p.b.set(&Tensor::from_vec(vals, (out, r), base.model.device()).unwrap())
            .unwrap();
    }
    let tokens: Vec<u32> = (30..60).collect();
    let trained = base
        .model
        .logits(&TrainOps::new(Some(&lora)), &tokens, tokens.len() - 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let without = base
        .model
        .logits(&TrainOps::new(None), &tokens, tokens.len() - 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    let weights = flywheel_modelhub::served_adapter(&lora).unwrap();
    let engine = CpuForward::load(&path, 2).unwrap();
    let served = engine
        .logits_with(&mut engine.new_sequence(), &tokens, Some(&weights))
        .unwrap();
    let max = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        max(&trained, &without) > 0.05,
        "the adapter must matter for this test to mean anything"
    );
    let d = max(&served, &trained);
    assert!(d < 1e-3, "served and trained logits differ by {d}");
}
