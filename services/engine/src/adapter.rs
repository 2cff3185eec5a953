//! LoRA adapters on the serving path: the weights a caller hands the
//! engine ([`AdapterWeights`]) and the same laid out for the CPU kernels
//! ([`Adapter`]), which add `scale * B A x` to each adapted projection.

use flywheel_model::config::{LlamaConfig, Proj};

use crate::kernels::QMatrix;
use crate::{EngineError, Result};

/// A LoRA adapter for the serving kernels: per adapted projection `A (rank,
/// in)` and `B (out, rank)`, row-major f32, rows in the order the forward
/// passes compute in (the interleaved-rope order for q and k, whatever
/// order the model's file stores them in); the delta is `scale * B A x`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    pub scale: f32,
    pub pairs: Vec<AdapterPair>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterPair {
    pub layer: usize,
    pub proj: Proj,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A LoRA adapter as the kernels apply it: per layer and projection
/// (indexed as [`Proj::ALL`]) `A (rank, in)` and `B (out, rank)`, added as
/// `scale * B A x` to the projection's output before anything else uses it.
/// The base weights are shared by every adapter on the same engine.
pub struct Adapter {
    pub(crate) scale: f32,
    pub(crate) pairs: Vec<[Option<(QMatrix, QMatrix)>; 7]>,
    bytes: usize,
}

impl Adapter {
    /// Checks `w`'s shapes against the model and lays it out.
    pub fn new(w: AdapterWeights, cfg: &LlamaConfig) -> Result<Self> {
        let mut pairs: Vec<[Option<(QMatrix, QMatrix)>; 7]> =
            (0..cfg.n_layers).map(|_| Default::default()).collect();
        let mut bytes = 0;
        for p in w.pairs {
            let (out, inp) = cfg.proj_shape(p.proj);
            let slot = pairs
                .get_mut(p.layer)
                .ok_or_else(|| EngineError::Invalid(format!("no layer {}", p.layer)))?;
            bytes += 4 * (p.a.len() + p.b.len());
            let a = QMatrix::f32(p.rank, inp, p.a)?;
            let b = QMatrix::f32(out, p.rank, p.b)?;
            slot[proj_index(p.proj)] = Some((a, b));
        }
        Ok(Self {
            scale: w.scale,
            pairs,
            bytes,
        })
    }

    /// Bytes of adapter weights held.
    pub fn weight_bytes(&self) -> usize {
        self.bytes
    }
}

pub(crate) fn proj_index(p: Proj) -> usize {
    Proj::ALL.iter().position(|&q| q == p).unwrap_or(0)
}
