//! AdamW with decoupled weight decay (Loshchilov and Hutter), written out
//! here rather than taken from `candle_nn` so that its state (the moment
//! estimates and the step count) can be checkpointed: a run resumed after a
//! crash continues with the same moments it had, not from zero.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    /// First and second moment estimates, one each per variable.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (bias correction uses it).
    t: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    /// PyTorch's defaults for the betas and epsilon.
    pub fn new(vars: Vec<Var>, learning_rate: f64, weight_decay: f64) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            learning_rate,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u32 {
        self.t
    }

    /// One update from `grads`; variables without a gradient keep their
    /// value and moments.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2, lr) = (self.beta1, self.beta2, self.learning_rate);
        let correct1 = 1.0 / (1.0 - b1.powi(self.t as i32));
        let correct2 = 1.0 / (1.0 - b2.powi(self.t as i32));
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // The moments outlive the step: they must not hold its graph.
            let g = &g.detach();
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m * correct1)? / ((&v * correct2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (step * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut tensors = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            tensors.insert(format!("m.{i}"), m.to_device(&Device::Cpu)?);
            tensors.insert(format!("v.{i}"), v.to_device(&Device::Cpu)?);
        }
        tensors.insert("t".into(), Tensor::new(&[self.t], &Device::Cpu)?);
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Restores what [`save`](Self::save) wrote, for the same variables
    /// (same count, same shapes, same order).
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let device = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let mut tensors = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        let t = tensors
            .remove("t")
            .context("optimizer state has no step count")?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, var) in self.vars.iter().enumerate() {
            for (name, out) in [("m", &mut m), ("v", &mut v)] {
                let x = tensors
                    .remove(&format!("{name}.{i}"))
                    .with_context(|| format!("optimizer state has no {name}.{i}"))?;
                if x.dims() != var.dims() {
                    bail!(
                        "optimizer state {name}.{i} is {:?}, its variable {:?}",
                        x.dims(),
                        var.dims()
                    );
                }
                out.push(x);
            }
        }
        if !tensors.is_empty() {
            bail!(
                "optimizer state holds {} tensors more than this adapter has",
                tensors.len() / 2
            );
        }
        self.m = m;
        self.v = v;
        self.t = t.first().copied().unwrap_or(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the update written out by hand for one scalar.
    #[test]
    fn matches_the_update_rule() {
        let x = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], 0.1, 0.01).unwrap();
        let (mut m, mut v, mut theta) = (0.0f64, 0.0f64, 1.0f64);
        for t in 1..=3 {
            // loss = x^2, gradient 2x
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
            let g = 2.0 * theta;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let step =
                (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            theta = theta * (1.0 - 0.1 * 0.01) - 0.1 * step;
            let got = x.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!((got - theta).abs() < 1e-6, "step {t}: {got} vs {theta}");
        }
    }

    #[test]
    fn state_round_trips_and_rejects_other_shapes() {
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], 0.1, 0.0).unwrap();
        let grads = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        let path =
            std::env::temp_dir().join(format!("fw-adamw-{}.safetensors", std::process::id()));
        opt.save(&path).unwrap();
        let mut again = AdamW::new(vec![x.clone()], 0.1, 0.0).unwrap();
        again.load(&path).unwrap();
        assert_eq!(again.steps_taken(), 1);
        assert_eq!(
            again.m[0].to_vec1::<f32>().unwrap(),
            opt.m[0].to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            again.v[0].to_vec1::<f32>().unwrap(),
            opt.v[0].to_vec1::<f32>().unwrap()
        );
        let y = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let err = AdamW::new(vec![y], 0.1, 0.0)
            .unwrap()
            .load(&path)
            .unwrap_err();
        assert!(format!("{err:#}").contains("m.0"), "{err:#}");
        let _ = std::fs::remove_file(path);
    }
}
