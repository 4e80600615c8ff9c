//! The tch learner: turns scored trajectories into policy updates (PPO with a GAE value head,
//! or GRPO), with our own AdamW so that training resumes bit for bit.
//!
//! ```text
//! Learner::new(&cfg.learner, model_dir, seed)
//! learner.update(&[Trajectory], temperature) -> UpdateStats
//! learner.export(dir)            // HF dir (merged weights) the engine can reload
//! learner.export_adapter(dir)    // PEFT adapter (LoRA only)
//! learner.save(dir) / load(dir)  // trainable weights + optimizer + counters
//! ```
//! Only trajectories with a reward exist: an unscored rollout cannot be turned into one.

pub mod batch;
pub mod config;
pub mod io;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
mod persist;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub use config::{Algorithm, LearnerConfig};
pub use model::{CausalLm, Fwd};

use batch::{pack, split_by_tokens, token_stats, trunk_backward, trunk_forward, Entropy};
use optim::{AdamW, AdamWConfig};
use crate::seed::mix;

/// One scored rollout: what the update may learn from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    /// The engine's ln-probs of `response_ids` (behaviour policy); compared with the learner's.
    pub behaviour_logprobs: Vec<f32>,
    pub reward: f64,
    /// Rollouts of one prompt share a group (GRPO baselines).
    pub group: u64,
}


/// Averages over the update's optimizer steps (token- or sequence-weighted like the loss).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateStats {
    pub loss: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    /// Mean per-token KL estimate to the reference (0 without a reference).
    pub kl: f64,
    pub entropy: f64,
    pub clip_fraction: f64,
    /// Pre-clip global gradient norm, averaged over optimizer steps.
    pub grad_norm: f64,
    /// Learning rate of the last optimizer step.
    pub lr: f64,
    /// Optimizer steps applied.
    pub optimizer_steps: u64,
    /// Optimizer steps skipped because the gradient norm was NaN or infinite.
    pub skipped_steps: u64,
    pub trajectories: usize,
    pub tokens: usize,
    pub mean_reward: f64,
    /// max |engine ln p - learner ln p| over the batch's tokens, before the update.
    pub behaviour_logprob_max_diff: f64,
    /// Mean over tokens of ln mu - ln pi_old (k1 estimate of KL(engine || learner)) before the
    /// update: how off-policy the batch is.
    pub is_mismatch_kl: f64,
    /// Share of tokens whose importance ratio pi_old / mu exceeds `is_cap` (truncated under
    /// token-tis).
    pub is_clipped_share: f64,
}

/// A value head on the policy trunk: V(h) = h w^T + b, one scalar per position.
struct ValueHead {
    _vs: VarStore,
    weight: Tensor,
    bias: Tensor,
}

impl ValueHead {
    fn new(hidden: usize, lm: &CausalLm) -> Self {
        let vs = VarStore::new(lm.device());
        let root = vs.root() / "value_head";
        let weight = root.add("weight", Tensor::zeros([1, hidden as i64], (lm.kind(), lm.device())), true);
        let bias = root.add("bias", Tensor::zeros([1], (lm.kind(), lm.device())), true);
        Self { _vs: vs, weight, bias }
    }

    fn forward(&self, h: &Tensor) -> Tensor {
        h.linear(&self.weight, Some(&self.bias)).squeeze_dim(-1).to_kind(Kind::Float)
    }
}

/// Per-trajectory quantities fixed at the start of an update.
struct Scored {
    old_logp: Vec<Vec<f32>>,
    /// Token-TIS weights per trajectory (`is_correction = token-tis`).
    is_weight: Option<Vec<Vec<f32>>>,
    ref_logp: Option<Vec<Vec<f32>>>,
    old_values: Option<Vec<Vec<f32>>>,
    adv: Vec<Vec<f32>>,
    returns: Option<Vec<Vec<f32>>>,
}

#[derive(Default)]
struct Acc {
    loss: f64,
    policy: f64,
    value: f64,
    kl: f64,
    entropy: f64,
    clip: f64,
}

impl Acc {
    fn add(&mut self, o: &Acc) {
        self.loss += o.loss;
        self.policy += o.policy;
        self.value += o.value;
        self.kl += o.kl;
        self.entropy += o.entropy;
        self.clip += o.clip;
    }
}

pub struct Learner {
    cfg: LearnerConfig,
    model_dir: PathBuf,
    seed: u64,
    policy: CausalLm,
    value_head: Option<ValueHead>,
    /// Frozen copy of the starting weights for the KL term (full fine-tuning only; with LoRA the
    /// reference is the base model with adapters switched off).
    reference: Option<CausalLm>,
    params: Vec<(String, Tensor)>,
    opt: AdamW,
    /// `update` calls completed; with `seed` it fixes every random draw of the next update.
    updates: u64,
    /// Optimizer steps skipped in a row (non-finite gradients), across updates.
    skipped_in_a_row: u64,
}

/// The learner stopped: too many optimizer steps in a row had a NaN or infinite gradient norm.
/// The weights are those of the last good step, so the newest checkpoint is clean.
#[derive(Debug, Clone)]
pub struct Diverged {
    pub skipped_in_a_row: u64,
    pub last_grad_norm: f64,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training diverged: {} optimizer steps in a row had a non-finite gradient norm (last {}); \
             none of them was applied and no checkpoint is written now, so the newest checkpoint is clean \
             (the steps after it are lost). Lower learner.lr or learner.max_grad_norm, or check the rewards, \
             then resume",
            self.skipped_in_a_row, self.last_grad_norm
        )
    }
}

impl std::error::Error for Diverged {}

impl Learner {
    pub fn new(cfg: &LearnerConfig, model_dir: &Path, seed: u64) -> Result<Self> {
        let mut p = crate::validate::Problems::default();
        cfg.validate("learner", &mut p);
        ensure!(p.0.is_empty(), "{}", p.0.join("\n  "));
        if cfg.threads > 0 {
            tch::set_num_threads(cfg.threads as i32);
        }
        let device = cfg.tch_device();
        tch::manual_seed(mix(seed, 0x10ad) as i64 & i64::MAX);
        let lora = cfg.lora.enabled.then_some(&cfg.lora);
        let policy = CausalLm::load(model_dir, device, cfg.kind(), lora, lora.is_none())
            .with_context(|| format!("loading the policy from {}", model_dir.display()))?;
        let value_head = (cfg.algorithm == Algorithm::Ppo).then(|| ValueHead::new(policy.cfg.hidden_size, &policy));
        let reference = if cfg.kl_coef > 0.0 && lora.is_none() {
            Some(CausalLm::load(model_dir, device, cfg.kind(), None, false)?)
        } else {
            None
        };
        let mut params: Vec<(String, Tensor)> =
            policy.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        if let Some(v) = &value_head {
            params.push(("value_head.weight".into(), v.weight.shallow_clone()));
            params.push(("value_head.bias".into(), v.bias.shallow_clone()));
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(
            params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            AdamWConfig { beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: cfg.weight_decay },
        );
        Ok(Self { cfg: cfg.clone(), model_dir: model_dir.to_path_buf(), seed, policy, value_head, reference, params, opt, updates: 0, skipped_in_a_row: 0 })
    }

    pub fn policy(&self) -> &CausalLm {
        &self.policy
    }

    pub fn config(&self) -> &LearnerConfig {
        &self.cfg
    }

    /// Trainable parameters by name (adapters and value head with LoRA; everything otherwise).
    pub fn trainable(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    pub fn optimizer_steps(&self) -> u64 {
        self.opt.step
    }

    fn inv_t(temperature: f64) -> f64 {
        if temperature > 0.0 { 1.0 / temperature } else { 1.0 }
    }

    /// Teacher-forced ln softmax(logits / T)[id] of each response token (T <= 0 means 1, as the
    /// engine records greedy rollouts), in micro-batches and logit chunks.
    pub fn logprobs(&self, seqs: &[(&[u32], &[u32])], temperature: f64) -> Result<Vec<Vec<f32>>> {
        self.check_ids(seqs.iter().copied())?;
        let out = self.forward_nograd(seqs, Self::inv_t(temperature), Fwd::EVAL, false)?;
        Ok(out.into_iter().map(|(lp, _)| lp).collect())
    }

    fn check_ids<'a>(&self, seqs: impl Iterator<Item = (&'a [u32], &'a [u32])>) -> Result<()> {
        let v = self.policy.cfg.vocab_size as u32;
        for (i, (p, r)) in seqs.enumerate() {
            ensure!(!p.is_empty(), "sequence {i}: empty prompt");
            ensure!(!r.is_empty(), "sequence {i}: empty response");
            if let Some(bad) = p.iter().chain(r).find(|&&t| t >= v) {
                anyhow::bail!("sequence {i}: token id {bad} outside the vocabulary ({v})");
            }
        }
        Ok(())
    }

    /// (ln-probs, values) per sequence without a graph.
    fn forward_nograd(&self, seqs: &[(&[u32], &[u32])], inv_t: f64, f: Fwd, values: bool) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.forward_nograd_with(&self.policy, seqs, inv_t, f, values)
    }

    fn forward_nograd_with(&self, lm: &CausalLm, seqs: &[(&[u32], &[u32])], inv_t: f64, f: Fwd, values: bool) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let _g = tch::no_grad_guard();
        let order: Vec<usize> = (0..seqs.len()).collect();
        let mut out = vec![(Vec::new(), Vec::new()); seqs.len()];
        let len_of = |i: usize| seqs[i].0.len() + seqs[i].1.len();
        for part in split_by_tokens(&order, len_of, self.cfg.micro_batch_tokens) {
            let sub: Vec<_> = part.iter().map(|&i| seqs[i]).collect();
            let mb = pack(&sub, lm.device());
            let h = lm.trunk(&mb.ids, None, f);
            let sel = h.view([-1, lm.cfg.hidden_size as i64]).index_select(0, &mb.pred_pos);
            let (lp, _) = token_stats(&sel, lm.lm_head_weight(), &mb.targets, inv_t, self.cfg.logprob_chunk, Entropy::Skip);
            let lp = Vec::<f32>::try_from(lp.to_device(tch::Device::Cpu))?;
            let vals = match (&self.value_head, values) {
                (Some(vh), true) => Vec::<f32>::try_from(vh.forward(&sel).to_device(tch::Device::Cpu))?,
                _ => Vec::new(),
            };
            let mut at = 0;
            for (k, &i) in part.iter().enumerate() {
                let n = mb.lens[k];
                out[i].0 = lp[at..at + n].to_vec();
                if !vals.is_empty() {
                    out[i].1 = vals[at..at + n].to_vec();
                }
                at += n;
            }
        }
        Ok(out)
    }

    fn score(&self, trajs: &[Trajectory], inv_t: f64) -> Result<Scored> {
        let seqs: Vec<(&[u32], &[u32])> = trajs.iter().map(|t| (&t.prompt_ids[..], &t.response_ids[..])).collect();
        let ppo = self.cfg.algorithm == Algorithm::Ppo;
        let cur = self.forward_nograd(&seqs, inv_t, Fwd::EVAL, ppo)?;
        let ref_logp = if self.cfg.kl_coef > 0.0 {
            let (lm, f) = match &self.reference {
                Some(r) => (r, Fwd::EVAL),
                None => (&self.policy, Fwd { adapters: false, train: false }),
            };
            Some(self.forward_nograd_with(lm, &seqs, inv_t, f, false)?.into_iter().map(|x| x.0).collect())
        } else {
            None
        };
        let (old_logp, values): (Vec<_>, Vec<_>) = cur.into_iter().unzip();
        let (adv, old_values, returns) = if ppo {
            let (mut adv, mut rets) = (Vec::new(), Vec::new());
            for (t, v) in trajs.iter().zip(&values) {
                let (a, r) = loss::gae(t.reward, v, self.cfg.gamma, self.cfg.lambda);
                adv.push(a);
                rets.push(r);
            }
            if self.cfg.whiten_advantages {
                loss::whiten(&mut adv);
            }
            (adv, Some(values), Some(rets))
        } else {
            let rewards: Vec<f64> = trajs.iter().map(|t| t.reward).collect();
            let groups: Vec<u64> = trajs.iter().map(|t| t.group).collect();
            let a = loss::grpo_advantages(&rewards, &groups, self.cfg.grpo_normalise_std, 1e-6);
            let adv = trajs.iter().zip(a).map(|(t, a)| vec![a as f32; t.response_ids.len()]).collect();
            (adv, None, None)
        };
        Ok(Scored { old_logp, is_weight: None, ref_logp, old_values, adv, returns })
    }

    /// One update on a batch of scored trajectories: `ppo_epochs` passes, each split into
    /// `mini_batches` optimizer steps, each accumulated over token-budgeted micro-batches.
    /// `temperature` is the one the rollouts were sampled at (0 = greedy = 1).
    pub fn update(&mut self, trajs: &[Trajectory], temperature: f64) -> Result<UpdateStats> {
        ensure!(!trajs.is_empty(), "update needs at least one trajectory");
        self.check_ids(trajs.iter().map(|t| (&t.prompt_ids[..], &t.response_ids[..])))?;
        for (i, t) in trajs.iter().enumerate() {
            ensure!(t.reward.is_finite(), "trajectory {i}: reward {} is not finite", t.reward);
            ensure!(
                t.behaviour_logprobs.iter().all(|x| !x.is_nan() && *x <= 0.0),
                "trajectory {i}: a behaviour log-prob is NaN or positive"
            );
            ensure!(
                t.behaviour_logprobs.len() == t.response_ids.len(),
                "trajectory {i}: {} behaviour log-probs for {} response tokens",
                t.behaviour_logprobs.len(),
                t.response_ids.len()
            );
        }
        let inv_t = Self::inv_t(temperature);
        let scored = self.score(trajs, inv_t)?;
        let mut stats = UpdateStats {
            trajectories: trajs.len(),
            tokens: trajs.iter().map(|t| t.response_ids.len()).sum(),
            mean_reward: trajs.iter().map(|t| t.reward).sum::<f64>() / trajs.len() as f64,
            ..Default::default()
        };
        stats.behaviour_logprob_max_diff = trajs
            .iter()
            .zip(&scored.old_logp)
            .flat_map(|(t, lp)| t.behaviour_logprobs.iter().zip(lp).map(|(a, b)| (a - b).abs() as f64))
            .fold(0.0, f64::max);
        // Behaviour (engine) vs learner before the update: always measured, applied with token-tis.
        let (mut weights_is, mut clipped, mut kl) = (Vec::new(), 0usize, 0.0);
        for (t, lp) in trajs.iter().zip(&scored.old_logp) {
            let (w, c, k) = loss::tis_weights(lp, &t.behaviour_logprobs, self.cfg.is_cap);
            weights_is.push(w);
            clipped += c;
            kl += k;
        }
        stats.is_mismatch_kl = kl / stats.tokens.max(1) as f64;
        stats.is_clipped_share = clipped as f64 / stats.tokens.max(1) as f64;
        let mut scored = scored;
        if self.cfg.is_correction == config::IsCorrection::TokenTis {
            scored.is_weight = Some(weights_is);
        }

        let mut acc = Acc::default();
        let mut norms = 0.0;
        // The log-prob head in f32 (token_stats works in f32): a frozen lm_head (LoRA, or tied
        // and frozen) is cast once per update; a trained one per micro-step, inside its graph.
        let w_head = self.policy.lm_head_weight();
        let head = (!w_head.requires_grad()).then(|| tch::no_grad(|| batch::as_f32(w_head)));
        let steps_before = self.opt.step;
        for epoch in 0..self.cfg.ppo_epochs {
            let mut order: Vec<usize> = (0..trajs.len()).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(self.seed, self.updates), epoch as u64));
            order.shuffle(&mut rng);
            let n_mini = self.cfg.mini_batches.min(order.len());
            for m in 0..n_mini {
                let mini = &order[m * order.len() / n_mini..(m + 1) * order.len() / n_mini];
                let lens: Vec<usize> = mini.iter().map(|&i| trajs[i].response_ids.len()).collect();
                let weights = loss::token_weights(&lens, self.cfg.aggregation);
                self.opt.zero_grad();
                let mut mini_acc = Acc::default();
                let len_of = |i: usize| trajs[i].prompt_ids.len() + trajs[i].response_ids.len();
                let pos_in_mini = |i: usize| mini.iter().position(|&x| x == i).expect("member");
                for (k, micro) in split_by_tokens(mini, len_of, self.cfg.micro_batch_tokens).into_iter().enumerate() {
                    let w: Vec<&[f32]> = micro.iter().map(|&i| &weights[pos_in_mini(i)][..]).collect();
                    let seed = mix(mix(self.seed, self.opt.step), k as u64 + 1);
                    self.micro_step(trajs, &micro, &w, &scored, inv_t, seed, head.as_ref(), &mut mini_acc)?;
                }
                let lr = optim::lr_at(
                    self.cfg.lr,
                    self.cfg.schedule,
                    self.cfg.warmup_steps,
                    self.cfg.total_steps,
                    self.cfg.min_lr_ratio,
                    self.opt.step,
                );
                let stepped = self.opt.step(lr, self.cfg.max_grad_norm);
                if stepped.applied {
                    // Only applied steps count in the averages: one skipped mini-batch must not
                    // turn the good ones' losses into NaN.
                    norms += stepped.grad_norm;
                    acc.add(&mini_acc);
                    stats.lr = lr;
                    self.skipped_in_a_row = 0;
                } else {
                    stats.skipped_steps += 1;
                    self.skipped_in_a_row += 1;
                    if self.skipped_in_a_row >= self.cfg.max_skipped_steps {
                        return Err(Diverged { skipped_in_a_row: self.skipped_in_a_row, last_grad_norm: stepped.grad_norm }.into());
                    }
                }
            }
        }
        self.updates += 1;
        stats.optimizer_steps = self.opt.step - steps_before;
        // Averages over the applied steps (NaN, written as null, when none was applied).
        let steps = if stats.optimizer_steps > 0 { stats.optimizer_steps as f64 } else { f64::NAN };
        stats.grad_norm = if stats.optimizer_steps > 0 { norms / stats.optimizer_steps as f64 } else { f64::NAN };
        stats.loss = acc.loss / steps;
        stats.policy_loss = acc.policy / steps;
        stats.value_loss = acc.value / steps;
        stats.kl = acc.kl / steps;
        stats.entropy = acc.entropy / steps;
        stats.clip_fraction = acc.clip / steps;
        Ok(stats)
    }

    /// Forward, loss and backward of one micro-batch; gradients accumulate in the parameters.
    #[allow(clippy::too_many_arguments)]
    fn micro_step(
        &self,
        trajs: &[Trajectory],
        micro: &[usize],
        weights: &[&[f32]],
        scored: &Scored,
        inv_t: f64,
        seed: u64,
        head_f32: Option<&Tensor>,
        acc: &mut Acc,
    ) -> Result<()> {
        let dev = self.policy.device();
        let flat = |src: &Vec<Vec<f32>>| -> Tensor {
            let v: Vec<f32> = micro.iter().flat_map(|&i| src[i].iter().copied()).collect();
            Tensor::from_slice(&v).to_device(dev)
        };
        let seqs: Vec<(&[u32], &[u32])> =
            micro.iter().map(|&i| (&trajs[i].prompt_ids[..], &trajs[i].response_ids[..])).collect();
        let mb = pack(&seqs, dev);
        let f = Fwd { adapters: true, train: true };
        let lm = &self.policy;
        let trunk = trunk_forward(lm, &mb.ids, f, self.cfg.activation_recompute, seed);
        let sel = trunk.h().view([-1, lm.cfg.hidden_size as i64]).index_select(0, &mb.pred_pos);
        let hd = sel.detach().set_requires_grad(true);
        // Cast once per micro-step rather than per chunk when it is trained (token_stats works in f32).
        let w_head = &head_f32.map(|h| h.shallow_clone()).unwrap_or_else(|| batch::as_f32(lm.lm_head_weight()));
        let chunk = self.cfg.logprob_chunk as i64;
        let want_ent = self.cfg.entropy_coef > 0.0;
        let entropy = if want_ent { Entropy::Grad } else { Entropy::Value };
        let wv: Vec<f32> = weights.iter().flat_map(|w| w.iter().copied()).collect();
        let (wt, old_lp, adv) = (Tensor::from_slice(&wv).to_device(dev), flat(&scored.old_logp), flat(&scored.adv));
        let is_w = scored.is_weight.as_ref().map(flat);
        let ref_lp = scored.ref_logp.as_ref().map(flat);

        // Every per-token term depends only on its own token, so each logit chunk's loss is
        // back-propagated at once and its [chunk, vocab] activations freed before the next.
        let n = hd.size()[0];
        let mut s = 0;
        while s < n {
            let len = chunk.min(n - s);
            let part = |t: &Tensor| t.narrow(0, s, len);
            let (lp, ent) = token_stats(&part(&hd), w_head, &part(&mb.targets), inv_t, chunk as usize, entropy);
            let ent = ent.expect("entropy requested");
            let w = part(&wt);
            let isw = is_w.as_ref().map(part);
            let pl = loss::ppo_policy_loss(&lp, &part(&old_lp), &part(&adv), &w, self.cfg.clip_range, self.cfg.dual_clip, isw.as_ref());
            let ent_sum = (&ent * &w).sum(Kind::Float);
            let mut obj = pl.loss.shallow_clone();
            if want_ent {
                obj = obj - &ent_sum * self.cfg.entropy_coef;
            }
            if let Some(r) = &ref_lp {
                let kl = (loss::kl_estimate(&lp, &part(r), self.cfg.kl_estimator) * &w).sum(Kind::Float);
                acc.kl += kl.double_value(&[]);
                obj = obj + kl * self.cfg.kl_coef;
            }
            obj.backward();
            acc.loss += obj.double_value(&[]);
            acc.policy += pl.loss.double_value(&[]);
            acc.clip += pl.clip_fraction.double_value(&[]);
            acc.entropy += ent_sum.double_value(&[]);
            s += len;
        }
        if let (Some(vh), Some(old_v), Some(ret)) = (&self.value_head, &scored.old_values, &scored.returns) {
            let v = vh.forward(&hd);
            let vl = loss::value_loss(&v, &flat(old_v), &flat(ret), &wt, self.cfg.value_clip);
            acc.value += vl.double_value(&[]);
            let scaled = vl * self.cfg.value_coef;
            scaled.backward();
            acc.loss += scaled.double_value(&[]);
        }
        let g_h = hd.grad();
        trunk_backward(lm, &mb.ids, trunk, &mb.pred_pos, &g_h, f, seed);
        Ok(())
    }

    /// Greedy decode with the current (adapted) policy, for checks against the engine.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
        self.policy.greedy(prompt, max_new, eos)
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }
}

#[cfg(test)]
mod tests {
    /// The trainer moves the learner into `spawn_blocking` and back: it must stay `Send`.
    #[test]
    fn learner_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::Learner>();
    }
}
