//! Reading reference vectors (llama.cpp's for SmolLM2, transformers' for
//! the tiny family models): token ids from JSON, and the choices a greedy
//! decoder makes.

use std::path::PathBuf;

use serde_json::Value;

/// A family's tiny reference model and its vectors
/// (tests/testdata/families/<name>, from `scripts/tiny-families.py`).
pub fn family_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/families")
        .join(name)
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The index of the largest value (the first of equals).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}
