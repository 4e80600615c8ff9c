//! AdamW (Loshchilov & Hutter) written here because tch's optimizer state cannot be read or
//! saved, and exact resume needs it: fp32 moments (and fp32 master weights for non-f32
//! parameters), bias correction, decoupled weight decay, global grad-norm clipping, LR schedules.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::model::{copy_checked, read_all, write_all};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    /// Linear decay to `min_lr_ratio * lr` at `total_steps`.
    Linear,
    /// Half-cosine decay to `min_lr_ratio * lr` at `total_steps`.
    Cosine,
}

/// Learning rate at optimizer step `step` (0-based): linear warm-up over `warmup` steps, then the schedule.
pub fn lr_at(lr: f64, sched: Schedule, warmup: u64, total: u64, min_ratio: f64, step: u64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    let min = lr * min_ratio;
    match sched {
        Schedule::Constant => lr,
        Schedule::Linear => min + (lr - min) * (1.0 - p),
        Schedule::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stepped {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the norm was not finite and nothing was changed.
    pub applied: bool,
}

struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    /// f32 copy of a bf16/f16 parameter; the parameter is rounded from it after every step.
    master: Option<Tensor>,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    /// `params`: (name, trainable tensor), in a fixed order.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let z = || Tensor::zeros(param.size(), (Kind::Float, param.device()));
                let master = (param.kind() != Kind::Float).then(|| param.detach().to_kind(Kind::Float));
                Slot { name, m: z(), v: z(), master, param }
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Global L2 norm of all gradients (missing gradients count as zero).
    pub fn grad_norm(&self) -> f64 {
        let _g = tch::no_grad_guard();
        let mut sq = 0.0f64;
        for s in &self.slots {
            let g = s.param.grad();
            if g.defined() {
                // In f64: a large but finite gradient (clipping's job) must not overflow to inf
                // and be skipped as non-finite.
                sq += g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
            }
        }
        sq.sqrt()
    }

    /// Clips gradients to global norm `max_norm` (if > 0) and takes one step at `lr`. A NaN or
    /// infinite norm (`norm > max_norm` is false for NaN, so clipping cannot catch it) skips the
    /// step: parameters, master copies, moments and the step count stay as they were.
    pub fn step(&mut self, lr: f64, max_norm: f64) -> Stepped {
        let norm = self.grad_norm();
        if !norm.is_finite() {
            return Stepped { grad_norm: norm, applied: false };
        }
        let clip = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.step += 1;
        let t = self.step as i32;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        let _g = tch::no_grad_guard();
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            let g = g.to_kind(Kind::Float) * clip;
            let _ = s.m.g_mul_scalar_(beta1).g_add_(&(&g * (1.0 - beta1)));
            let _ = s.v.g_mul_scalar_(beta2).g_add_(&(g.square() * (1.0 - beta2)));
            let denom = (&s.v / bc2).sqrt() + eps;
            let update = (&s.m / bc1) / denom;
            let mut p = match &s.master {
                Some(m) => m.shallow_clone(),
                None => s.param.shallow_clone(),
            };
            if weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let _ = p.g_sub_(&(update * lr));
            if s.master.is_some() {
                s.param.copy_(&p);
            }
        }
        Stepped { grad_norm: norm, applied: true }
    }

    /// Writes moments (and masters) as safetensors, with the step count in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut ts = Vec::new();
        for s in &self.slots {
            ts.push((format!("m.{}", s.name), s.m.shallow_clone()));
            ts.push((format!("v.{}", s.name), s.v.shallow_clone()));
            if let Some(m) = &s.master {
                ts.push((format!("master.{}", s.name), m.shallow_clone()));
            }
        }
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        write_all(path, &ts, Some(meta))
    }

    /// Restores state saved by [`AdamW::save`] for the same parameter names and shapes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let step: u64 = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: no step in the metadata", path.display()))?;
        let mut saved = read_all(path)?;
        for s in &self.slots {
            let mut want = vec![(format!("m.{}", s.name), &s.m), (format!("v.{}", s.name), &s.v)];
            if let Some(m) = &s.master {
                want.push((format!("master.{}", s.name), m));
            }
            for (n, dst) in want {
                let src = saved.remove(&n).with_context(|| format!("{}: missing tensor {n}", path.display()))?;
                ensure!(src.kind() == Kind::Float, "{}: tensor {n} is {:?}, expected f32", path.display(), src.kind());
                copy_checked(dst, &src, &n).with_context(|| format!("{}", path.display()))?;
            }
        }
        if let Some(extra) = saved.keys().next() {
            bail!("{}: unexpected tensor {extra} (no such trainable parameter)", path.display());
        }
        self.step = step;
        // Parameters follow their masters.
        let _g = tch::no_grad_guard();
        for s in &mut self.slots {
            if let Some(m) = &s.master {
                s.param.copy_(m);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_by_hand() {
        assert_eq!(lr_at(1.0, Schedule::Constant, 0, 10, 0.0, 5), 1.0);
        assert_eq!(lr_at(1.0, Schedule::Constant, 4, 10, 0.0, 0), 0.25);
        assert_eq!(lr_at(1.0, Schedule::Constant, 4, 10, 0.0, 3), 1.0);
        assert_eq!(lr_at(1.0, Schedule::Linear, 0, 10, 0.0, 5), 0.5);
        assert_eq!(lr_at(1.0, Schedule::Linear, 0, 10, 0.1, 10), 0.1);
        assert!((lr_at(1.0, Schedule::Cosine, 2, 12, 0.0, 7) - 0.5).abs() < 1e-12);
        assert!((lr_at(2.0, Schedule::Cosine, 0, 10, 0.5, 100) - 1.0).abs() < 1e-12);
    }

    /// Two steps on one scalar against the AdamW formulas evaluated by hand.
    #[test]
    fn adamw_matches_the_formulas() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        let (lr, mut x, mut m, mut v) = (0.01f64, 1.0f64, 0.0f64, 0.0f64);
        for t in 1..=2 {
            opt.zero_grad();
            (&p * &p * 3.0).sum(Kind::Float).backward(); // grad 6x
            let g = 6.0 * x;
            assert!(opt.step(lr, 0.0).applied);
            m = 0.9 * m + 0.1 * g;
            v = 0.99 * v + 0.01 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = v / (1.0 - 0.99f64.powi(t));
            x = x * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            assert!((p.double_value(&[0]) - x).abs() < 1e-6, "step {t}: {} vs {x}", p.double_value(&[0]));
        }
    }

    /// With betas 0 and eps 1 the update is g / (|g| + 1) elementwise, which depends on the
    /// gradient's scale: clipped (0.6, 0.8) and unclipped (3, 4) give different steps.
    #[test]
    fn clipping_scales_to_the_max_norm() {
        let cfg = AdamWConfig { beta1: 0.0, beta2: 0.0, eps: 1.0, weight_decay: 0.0 };
        let moved = |max_norm: f64| {
            let a = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
            let mut opt = AdamW::new(vec![("a".into(), a.shallow_clone())], cfg);
            (&a * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
            assert!((opt.grad_norm() - 5.0).abs() < 1e-6);
            let s = opt.step(1.0, max_norm);
            assert!(s.applied && (s.grad_norm - 5.0).abs() < 1e-6, "{s:?}");
            Vec::<f32>::try_from(&a.detach()).unwrap()
        };
        let clipped = moved(1.0);
        let want = [-0.6 / 1.6, -0.8 / 1.8];
        for (got, want) in clipped.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-5, "clipped step {clipped:?}, want {want:?}");
        }
        let unclipped = moved(0.0);
        assert!((unclipped[0] as f64 + 0.75).abs() < 1e-5 && (unclipped[1] as f64 + 0.8).abs() < 1e-5, "{unclipped:?}");
        // A max_norm above the norm leaves the gradient alone.
        assert_eq!(moved(10.0), unclipped);
    }

    /// A NaN or infinite gradient changes nothing: not the weights, not the f32 masters of bf16
    /// weights, not the moments, not the step count.
    #[test]
    fn non_finite_gradients_skip_the_step() {
        for bad in [f32::NAN, f32::INFINITY] {
            let w = Tensor::from_slice(&[1.0f32, 2.0]).to_kind(Kind::BFloat16).set_requires_grad(true);
            let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
            let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg);
            (&w * &w).sum(Kind::Float).backward();
            assert!(opt.step(0.1, 1.0).applied);
            let before = |o: &AdamW| (o.slots[0].m.copy(), o.slots[0].v.copy(), o.slots[0].master.as_ref().unwrap().copy());
            let (m, v, master) = before(&opt);
            let p = w.detach().copy();
            opt.zero_grad();
            (&w * Tensor::from_slice(&[bad, 1.0]).to_kind(Kind::BFloat16)).sum(Kind::Float).backward();
            let s = opt.step(0.1, 1.0);
            assert!(!s.applied && !s.grad_norm.is_finite(), "{s:?}");
            assert_eq!(opt.step, 1);
            assert!(w.detach().equal(&p), "weights changed");
            assert!(opt.slots[0].m.equal(&m) && opt.slots[0].v.equal(&v), "moments changed");
            assert!(opt.slots[0].master.as_ref().unwrap().equal(&master), "master changed");
        }
    }

    #[test]
    fn state_round_trips_and_rejects_wrong_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg);
        (&p * &p).sum(Kind::Float).backward();
        assert!(opt.step(0.1, 0.0).applied);
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let q = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut other = AdamW::new(vec![("w".into(), q.shallow_clone())], cfg);
        other.load(&path).unwrap();
        assert_eq!(other.step, 1);
        assert!(other.slots[0].m.equal(&opt.slots[0].m) && other.slots[0].v.equal(&opt.slots[0].v));
        let r = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut wrong = AdamW::new(vec![("u".into(), r)], cfg);
        let err = format!("{:#}", wrong.load(&path).unwrap_err());
        assert!(err.contains("m.u"), "{err}");
        let r = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let mut wrong = AdamW::new(vec![("w".into(), r)], cfg);
        let err = format!("{:#}", wrong.load(&path).unwrap_err());
        assert!(err.contains("m.w") && err.contains("shape"), "{err}");
    }
}
