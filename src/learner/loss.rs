//! Policy-gradient losses: PPO's clipped surrogate (with optional dual clip), GAE advantages for
//! a value head, GRPO's group-relative advantages, clipped value loss, KL to a frozen reference.
//!
//! Per-token tensors are flat ([N] over the response tokens of a micro-batch). Aggregation is a
//! per-token weight: token-mean gives every token of the mini-batch 1/N_tokens, sequence-mean
//! gives a token of sequence s 1/(len_s * N_seqs). Weighted sums then add up exactly across
//! micro-batches, so gradient accumulation equals one big batch.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    #[default]
    TokenMean,
    SequenceMean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// log p - log p_ref (unbiased, can be negative per token).
    #[default]
    K1,
    /// exp(log p_ref - log p) - (log p_ref - log p) - 1 (unbiased, always >= 0; Schulman 2020).
    K3,
}

/// Aggregation weights for the response tokens of a mini-batch, given each sequence's length.
pub fn token_weights(lens: &[usize], agg: Aggregation) -> Vec<Vec<f32>> {
    let total: usize = lens.iter().sum();
    let n = lens.len();
    lens.iter()
        .map(|&l| {
            let w = match agg {
                Aggregation::TokenMean => 1.0 / total.max(1) as f64,
                Aggregation::SequenceMean => 1.0 / (l.max(1) * n.max(1)) as f64,
            };
            vec![w as f32; l]
        })
        .collect()
}

/// Output of [`ppo_policy_loss`]: the weighted loss and the weighted share of clipped tokens.
pub struct PolicyLoss {
    pub loss: Tensor,
    pub clip_fraction: Tensor,
}

/// PPO clipped surrogate, per token: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old).
/// With `dual_clip = Some(c)` (c > 1), tokens with A < 0 are further bounded by -A c (Ye et al. 2020).
/// `is_weight` (no gradient) scales each token's term: the truncated importance weight of the
/// behaviour policy (see [`tis_weights`]).
pub fn ppo_policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    weight: &Tensor,
    clip: f64,
    dual_clip: Option<f64>,
    is_weight: Option<&Tensor>,
) -> PolicyLoss {
    let ratio = (logp - old_logp).exp();
    let pg1 = -(adv * &ratio);
    let pg2 = -(adv * ratio.clamp(1.0 - clip, 1.0 + clip));
    let clipped = pg2.gt_tensor(&pg1).to_kind(Kind::Float);
    let mut pg = pg1.maximum(&pg2);
    if let Some(c) = dual_clip {
        let bound = -(adv * c);
        let neg = adv.lt(0.0);
        pg = pg.minimum(&bound).where_self(&neg, &pg);
    }
    if let Some(w) = is_weight {
        pg = pg * w;
    }
    PolicyLoss { loss: (pg * weight).sum(Kind::Float), clip_fraction: (clipped * weight).sum(Kind::Float) }
}

/// Truncated importance weights per token, min(exp(ln pi_old - ln mu), cap), for tokens sampled
/// by a behaviour policy mu (the engine) and scored by the learner's pi_old; with the share of
/// tokens truncated and the mean k1 estimate of KL(mu || pi_old) (ln mu - ln pi_old on tokens
/// drawn from mu).
pub fn tis_weights(old_logp: &[f32], behaviour: &[f32], cap: f64) -> (Vec<f32>, usize, f64) {
    let mut clipped = 0;
    let mut kl = 0.0;
    let w = old_logp
        .iter()
        .zip(behaviour)
        .map(|(&o, &b)| {
            kl += (b - o) as f64;
            let r = ((o - b) as f64).exp();
            if r > cap {
                clipped += 1;
            }
            // f64::min would turn a NaN ratio into the cap; a token without a ratio gets none.
            if r.is_nan() { 0.0 } else { r.min(cap) as f32 }
        })
        .collect();
    (w, clipped, kl)
}

/// Clipped value loss (PPO2): 0.5 max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2).
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, weight: &Tensor, clip: Option<f64>) -> Tensor {
    let l1 = (values - returns).square();
    let l = match clip {
        Some(c) => {
            let vc = old_values + (values - old_values).clamp(-c, c);
            l1.maximum(&(vc - returns).square())
        }
        None => l1,
    };
    (l * weight).sum(Kind::Float) * 0.5
}

/// Per-token KL estimate of the policy from the reference, from the sampled tokens' log-probs.
pub fn kl_estimate(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Tensor {
    match est {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K3 => {
            let d = ref_logp - logp;
            d.exp() - d - 1.0
        }
    }
}

/// GAE over one response whose only reward is `reward` at the last token.
/// delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0); A_t = delta_t + gamma lambda A_{t+1}.
/// Returns (advantages, returns = A + V).
pub fn gae(reward: f64, values: &[f32], gamma: f64, lambda: f64) -> (Vec<f32>, Vec<f32>) {
    let n = values.len();
    let mut adv = vec![0f32; n];
    let mut next_adv = 0.0f64;
    let mut next_v = 0.0f64;
    for t in (0..n).rev() {
        let r = if t + 1 == n { reward } else { 0.0 };
        let v = values[t] as f64;
        let delta = r + gamma * next_v - v;
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv as f32;
        next_v = v;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// GRPO advantages: reward minus its group's mean, divided by the group's (unbiased) standard
/// deviation + `eps` when `normalise`. A group of one has no baseline and gets 0.
pub fn grpo_advantages(rewards: &[f64], groups: &[u64], normalise: bool, eps: f64) -> Vec<f64> {
    use std::collections::HashMap;
    let mut by: HashMap<u64, Vec<f64>> = HashMap::new();
    for (r, g) in rewards.iter().zip(groups) {
        by.entry(*g).or_default().push(*r);
    }
    let stats: HashMap<u64, (f64, f64, usize)> = by
        .into_iter()
        .map(|(g, rs)| {
            let n = rs.len();
            let mean = rs.iter().sum::<f64>() / n as f64;
            let var = if n > 1 { rs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
            (g, (mean, var.sqrt(), n))
        })
        .collect();
    rewards
        .iter()
        .zip(groups)
        .map(|(r, g)| {
            let (mean, std, n) = stats[g];
            if n < 2 {
                0.0
            } else if normalise {
                (r - mean) / (std + eps)
            } else {
                r - mean
            }
        })
        .collect()
}

/// Whitening over all tokens (PPO advantage normalisation): (a - mean) / (std + 1e-8).
pub fn whiten(xs: &mut [Vec<f32>]) {
    let n: usize = xs.iter().map(|x| x.len()).sum();
    if n < 2 {
        return;
    }
    let mean = xs.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = xs.iter().flatten().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let s = var.sqrt() + 1e-8;
    for x in xs.iter_mut().flatten() {
        *x = ((*x as f64 - mean) / s) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }
    fn f(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    #[test]
    fn ppo_clip_by_hand() {
        // ratios e^0.5 = 1.6487 (A=+1: clipped at 1.2 -> -1.2 vs -1.6487 -> max = -1.2, clipped),
        // e^-0.5 = 0.6065 (A=-2: -A r = 1.2131, -A clip = 2*0.8 = 1.6 -> 1.6, clipped),
        // e^0.1 = 1.1052 (A=+0.5: -0.5526 both sides, not clipped).
        let logp = t(&[0.5, -0.5, 0.1]);
        let old = t(&[0.0, 0.0, 0.0]);
        let adv = t(&[1.0, -2.0, 0.5]);
        let w = t(&[1.0 / 3.0; 3]);
        let out = ppo_policy_loss(&logp, &old, &adv, &w, 0.2, None, None);
        let want = (-1.2 + 1.6 - 0.5 * 0.1f64.exp()) / 3.0;
        assert!((f(&out.loss) - want).abs() < 1e-6, "{} vs {want}", f(&out.loss));
        assert!((f(&out.clip_fraction) - 2.0 / 3.0).abs() < 1e-6);
        // Dual clip c = 1.5 bounds the A<0 token at -A c = 3 ... only when the loss exceeds it:
        // logp = 2 for A = -2: -A r = 2 e^2 = 14.78 -> bounded to 3.
        let logp = t(&[2.0]);
        let out = ppo_policy_loss(&logp, &t(&[0.0]), &t(&[-2.0]), &t(&[1.0]), 0.2, Some(1.5), None);
        assert!((f(&out.loss) - 3.0).abs() < 1e-6);
        let out = ppo_policy_loss(&logp, &t(&[0.0]), &t(&[-2.0]), &t(&[1.0]), 0.2, None, None);
        assert!((f(&out.loss) - 2.0 * 2f64.exp()).abs() < 1e-4);
    }

    #[test]
    fn ppo_gradient_is_minus_advantage_times_ratio_when_unclipped() {
        let logp = t(&[0.05]).set_requires_grad(true);
        let out = ppo_policy_loss(&logp, &t(&[0.0]), &t(&[2.0]), &t(&[1.0]), 0.2, None, None);
        out.loss.backward();
        let g = f(&logp.grad().squeeze());
        assert!((g + 2.0 * 0.05f64.exp()).abs() < 1e-6, "{g}");
    }

    #[test]
    fn value_loss_by_hand() {
        // v=1.5, old=1.0, R=0: unclipped 2.25, clipped v -> 1.2 -> 1.44; max 2.25; *0.5 = 1.125.
        // v=0.0, old=1.0, R=2: unclipped 4, clipped v -> 0.8 -> 1.44; max 4; *0.5 = 2.
        let l = value_loss(&t(&[1.5, 0.0]), &t(&[1.0, 1.0]), &t(&[0.0, 2.0]), &t(&[0.5, 0.5]), Some(0.2));
        assert!((f(&l) - (1.125 + 2.0) / 2.0).abs() < 1e-6);
        let l = value_loss(&t(&[1.5]), &t(&[1.0]), &t(&[0.0]), &t(&[1.0]), None);
        assert!((f(&l) - 1.125).abs() < 1e-6);
    }

    #[test]
    fn kl_estimators_by_hand() {
        let (lp, rf) = (t(&[-1.0, -2.0]), t(&[-1.5, -1.0]));
        let k1 = Vec::<f32>::try_from(kl_estimate(&lp, &rf, KlEstimator::K1)).unwrap();
        assert_eq!(k1, vec![0.5, -1.0]);
        let k3 = Vec::<f32>::try_from(kl_estimate(&lp, &rf, KlEstimator::K3)).unwrap();
        // d = -0.5: e^-0.5 + 0.5 - 1 = 0.106531; d = 1: e - 2 = 0.718282
        assert!((k3[0] - 0.106_530_66).abs() < 1e-6 && (k3[1] - 0.718_281_8).abs() < 1e-6);
    }

    #[test]
    fn gae_by_hand() {
        // gamma = lambda = 1: A_t = R - V_t, returns = R everywhere.
        let (a, r) = gae(1.0, &[0.2, 0.5, 0.9], 1.0, 1.0);
        assert_eq!(a, vec![0.8, 0.5, 0.100000024]);
        assert!(r.iter().all(|x| (x - 1.0).abs() < 1e-6));
        // gamma = 0.5, lambda = 0.5, values [1, 2], R = 4:
        // delta_1 = 4 - 2 = 2; A_1 = 2. delta_0 = 0 + 0.5*2 - 1 = 0; A_0 = 0 + 0.25*2 = 0.5.
        let (a, r) = gae(4.0, &[1.0, 2.0], 0.5, 0.5);
        assert_eq!(a, vec![0.5, 2.0]);
        assert_eq!(r, vec![1.5, 4.0]);
    }

    #[test]
    fn grpo_by_hand() {
        // group 7: [1, 0, 0.5] mean 0.5, unbiased std 0.5; group 9 a single rollout -> 0.
        let a = grpo_advantages(&[1.0, 0.0, 0.5, 1.0], &[7, 7, 7, 9], true, 0.0);
        assert_eq!(a, vec![1.0, -1.0, 0.0, 0.0]);
        let a = grpo_advantages(&[1.0, 0.0, 0.5, 1.0], &[7, 7, 7, 9], false, 0.0);
        assert_eq!(a, vec![0.5, -0.5, 0.0, 0.0]);
        // All equal: no signal, no NaN.
        let a = grpo_advantages(&[1.0, 1.0], &[1, 1], true, 1e-6);
        assert_eq!(a, vec![0.0, 0.0]);
    }

    #[test]
    fn weights_sum_to_one() {
        let w = token_weights(&[2, 4], Aggregation::TokenMean);
        assert_eq!(w[0][0], 1.0 / 6.0);
        let w = token_weights(&[2, 4], Aggregation::SequenceMean);
        assert_eq!((w[0][0], w[1][0]), (0.25, 0.125));
        let s: f32 = w.iter().flatten().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }

    #[test]
    fn tis_weights_truncate_and_measure_the_mismatch() {
        let old = [-1.0f32, -2.0, -0.5, -3.0];
        let mu = [-1.0f32, -1.0, -2.0, -3.5];
        let (w, clipped, kl) = tis_weights(&old, &mu, 2.0);
        let want = [1.0, (-1.0f64).exp(), 1.5f64.exp().min(2.0), 0.5f64.exp()];
        for (a, b) in w.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(clipped, 1);
        assert!((kl - (0.0 + 1.0 - 1.5 - 0.5)).abs() < 1e-6, "{kl}");
        // The weight scales the token's surrogate term and nothing else.
        let t = |v: &[f32]| Tensor::from_slice(v);
        let a = ppo_policy_loss(&t(&[-1.0, -1.0]), &t(&[-1.0, -1.0]), &t(&[1.0, -1.0]), &t(&[0.5, 0.5]), 0.2, None, None);
        let b = ppo_policy_loss(&t(&[-1.0, -1.0]), &t(&[-1.0, -1.0]), &t(&[1.0, -1.0]), &t(&[0.5, 0.5]), 0.2, None, Some(&t(&[2.0, 0.0])));
        assert!((a.loss.double_value(&[]) - 0.0).abs() < 1e-7);
        assert!((b.loss.double_value(&[]) + 1.0).abs() < 1e-6, "{}", b.loss.double_value(&[]));
    }
}
