//! Micro-batches and the memory-lean forward/backward: right-padded batches, log-probs from
//! hidden states in row chunks (never the whole batch x length x vocab logits), and optional
//! per-layer activation recompute (tch has no checkpointing API, so the backward pass is
//! driven by hand: layer inputs are kept, each layer is re-run with grad and back-propagated
//! with the gradient of its output).

use tch::{Device, Kind, Tensor};

use super::model::{CausalLm, Fwd, Rope};

/// A right-padded batch of prompt+response sequences.
pub struct MicroBatch {
    /// [B, L] token ids (padding = 0; causal attention never lets a real token see it).
    pub ids: Tensor,
    /// [N] flat indices into B*L of the positions that predict a response token.
    pub pred_pos: Tensor,
    /// [N] the response tokens.
    pub targets: Tensor,
    /// Response length of each sequence, in batch order.
    pub lens: Vec<usize>,
}

/// Packs (prompt, response) pairs. Response token j of a sequence with prompt length p sits at
/// position p + j and is predicted by the hidden state at p + j - 1.
pub fn pack(seqs: &[(&[u32], &[u32])], device: Device) -> MicroBatch {
    let l = seqs.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(1);
    let b = seqs.len();
    let mut ids = vec![0i64; b * l];
    let (mut pos, mut tgt, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (p, r)) in seqs.iter().enumerate() {
        for (k, &t) in p.iter().chain(r.iter()).enumerate() {
            ids[i * l + k] = t as i64;
        }
        for (j, &t) in r.iter().enumerate() {
            pos.push((i * l + p.len() + j - 1) as i64);
            tgt.push(t as i64);
        }
        lens.push(r.len());
    }
    MicroBatch {
        ids: Tensor::from_slice(&ids).view([b as i64, l as i64]).to_device(device),
        pred_pos: Tensor::from_slice(&pos).to_device(device),
        targets: Tensor::from_slice(&tgt).to_device(device),
        lens,
    }
}

/// Splits `order` into runs whose padded size (count x longest) stays within `budget` tokens;
/// a sequence longer than the budget gets a micro-batch of its own.
pub fn split_by_tokens(order: &[usize], len_of: impl Fn(usize) -> usize, budget: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in order {
        let l = len_of(i);
        let new_longest = longest.max(l);
        if !cur.is_empty() && (cur.len() + 1) * new_longest > budget {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(l);
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Whether [`token_stats`] computes the entropy, and with a graph or as a plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    Skip,
    Value,
    Grad,
}

/// `t` in f32 (the same tensor when it already is); differentiable.
pub fn as_f32(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Float {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}

/// ln softmax(h W^T * inv_t)[target] and the entropy of that distribution, `chunk` rows at a time.
/// The product is taken in f32 whatever the weights' dtype: bf16 logits carry about three
/// significant digits, and a log-prob (and the PPO ratio) read from them is off by as much.
pub fn token_stats(h: &Tensor, w: &Tensor, targets: &Tensor, inv_t: f64, chunk: usize, entropy: Entropy) -> (Tensor, Option<Tensor>) {
    let n = h.size()[0];
    let (w, h) = (as_f32(w), as_f32(h));
    let chunk = chunk.max(1) as i64;
    let (mut lps, mut ents) = (Vec::new(), Vec::new());
    let mut s = 0;
    while s < n {
        let len = chunk.min(n - s);
        let logits = h.narrow(0, s, len).matmul(&w.tr());
        let logits = if inv_t != 1.0 { logits * inv_t } else { logits };
        let lse = logits.logsumexp(-1, true);
        let tgt = targets.narrow(0, s, len).unsqueeze(1);
        lps.push((logits.gather(1, &tgt, false) - &lse).squeeze_dim(1));
        let ent = |logits: &Tensor, lse: &Tensor| {
            let logp = logits - lse;
            -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float)
        };
        match entropy {
            Entropy::Skip => {}
            Entropy::Value => ents.push(tch::no_grad(|| ent(&logits.detach(), &lse.detach()))),
            Entropy::Grad => ents.push(ent(&logits, &lse)),
        }
        s += len;
    }
    let ent = (entropy != Entropy::Skip).then(|| Tensor::cat(&ents, 0));
    (Tensor::cat(&lps, 0), ent)
}

/// The trunk's output and what its backward pass needs.
pub enum Trunk {
    /// Ordinary autograd graph through every layer.
    Graph { h: Tensor },
    /// Recompute mode: outputs computed without a graph; only each layer's input is kept.
    Saved { h: Tensor, inputs: Vec<Tensor>, last: Tensor, rope: Rope },
}

impl Trunk {
    pub fn h(&self) -> &Tensor {
        match self {
            Trunk::Graph { h } | Trunk::Saved { h, .. } => h,
        }
    }
}

/// Seeds libtorch's generator per (micro-batch seed, layer), so LoRA dropout draws the same
/// masks in the first forward and in the recompute, and on resume.
fn seed_layer(seed: u64, layer: usize) {
    tch::manual_seed((seed ^ (layer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) as i64 & i64::MAX);
}

pub fn trunk_forward(lm: &CausalLm, ids: &Tensor, f: Fwd, recompute: bool, seed: u64) -> Trunk {
    let (pos, _) = lm.positions_and_mask(ids, None);
    let rope = lm.rope(&pos);
    if !recompute {
        let mut x = lm.embed(ids);
        for (l, layer) in lm.model.layers.iter().enumerate() {
            seed_layer(seed, l);
            x = layer.forward(&x, &rope, None, f);
        }
        return Trunk::Graph { h: lm.model.norm.forward(&x) };
    }
    let _g = tch::no_grad_guard();
    let mut x = lm.embed(ids);
    let mut inputs = Vec::with_capacity(lm.model.layers.len());
    for (l, layer) in lm.model.layers.iter().enumerate() {
        seed_layer(seed, l);
        let y = layer.forward(&x, &rope, None, f);
        inputs.push(x);
        x = y;
    }
    let h = lm.model.norm.forward(&x);
    Trunk::Saved { h, inputs, last: x, rope }
}

/// Back-propagates `g_sel` (the gradient of the selected rows `h.view(-1, H)[pred_pos]`) into
/// every trainable parameter of the trunk.
pub fn trunk_backward(lm: &CausalLm, ids: &Tensor, trunk: Trunk, pred_pos: &Tensor, g_sel: &Tensor, f: Fwd, seed: u64) {
    let hdim = lm.cfg.hidden_size as i64;
    let select = |h: &Tensor| h.view([-1, hdim]).index_select(0, pred_pos);
    match trunk {
        Trunk::Graph { h } => (select(&h) * g_sel).sum(Kind::Float).backward(),
        Trunk::Saved { inputs, last, rope, .. } => {
            let x = last.detach().set_requires_grad(true);
            (select(&lm.model.norm.forward(&x)) * g_sel).sum(Kind::Float).backward();
            let mut g = x.grad().detach();
            for (l, layer) in lm.model.layers.iter().enumerate().rev() {
                let xin = inputs[l].detach().set_requires_grad(true);
                seed_layer(seed, l);
                let y = layer.forward(&xin, &rope, None, f);
                (y * &g).sum(Kind::Float).backward();
                g = xin.grad().detach();
            }
            if lm.model.embed_tokens.requires_grad() {
                (lm.embed(ids) * g).sum(Kind::Float).backward();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_positions_and_targets() {
        let a: (&[u32], &[u32]) = (&[5, 6], &[7, 8, 9]);
        let b: (&[u32], &[u32]) = (&[1], &[2]);
        let mb = pack(&[a, b], Device::Cpu);
        assert_eq!(mb.ids.size(), vec![2, 5]);
        assert_eq!(Vec::<i64>::try_from(&mb.pred_pos).unwrap(), vec![1, 2, 3, 5]);
        assert_eq!(Vec::<i64>::try_from(&mb.targets).unwrap(), vec![7, 8, 9, 2]);
        assert_eq!(Vec::<i64>::try_from(mb.ids.view([-1])).unwrap(), vec![5, 6, 7, 8, 9, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn token_budget_split() {
        let lens = [3, 3, 5, 1, 9];
        let parts = split_by_tokens(&[0, 1, 2, 3, 4], |i| lens[i], 10);
        // [3,3] = 6, +5 -> 3*5 = 15 > 10; [5,1] = 10; 9 alone.
        assert_eq!(parts, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(split_by_tokens(&[4], |i| lens[i], 2), vec![vec![4]]);
    }

    #[test]
    fn chunked_stats_equal_full_log_softmax() {
        tch::manual_seed(0);
        let h = Tensor::randn([7, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([11, 4], (Kind::Float, Device::Cpu));
        let tgt = Tensor::from_slice(&[0i64, 3, 10, 5, 5, 1, 2]);
        let full = (h.matmul(&w.tr()) * 0.5).log_softmax(-1, Kind::Float);
        let want = full.gather(1, &tgt.unsqueeze(1), false).squeeze_dim(1);
        let want_ent = -(full.exp() * &full).sum_dim_intlist(-1, false, Kind::Float);
        for chunk in [1, 3, 7, 100] {
            let (lp, ent) = token_stats(&h, &w, &tgt, 0.5, chunk, Entropy::Grad);
            assert!(lp.allclose(&want, 1e-6, 1e-6, false), "chunk {chunk}");
            assert!(ent.unwrap().allclose(&want_ent, 1e-6, 1e-6, false));
        }
    }
}
