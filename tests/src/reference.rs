//! Reading reference vectors (llama.cpp's for SmolLM2, transformers' for
//! the tiny family models): token ids from JSON, and the choices a greedy
//! decoder makes.

use serde_json::Value;

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
