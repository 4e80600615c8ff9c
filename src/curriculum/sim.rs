//! Promotion rules under simulated judges, through the real [`Curriculum`]: how often a rule moves
//! a task when the judge answers at random (every such move is false: the policy beats nothing),
//! and how many steps it needs to climb a ladder when the judge has a real preference.
//!
//! Every draw comes from one seeded ChaCha8 stream, tasks and rollouts in a fixed order, so the
//! numbers are the same on every machine. [`table`] prints the measurement that `cargo test --release
//! --lib promotion_rules_under_simulated_judges -- --nocapture` shows.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{AdvanceRule, Curriculum, CurriculumConfig, CurriculumMode, Outcome};
use crate::data::Task;

/// A judge that answers each comparison independently: win with `p_win`, tie with `p_tie`,
/// loss otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judge {
    pub p_win: f64,
    pub p_tie: f64,
}

impl Judge {
    /// Win, tie and loss equally likely.
    pub const UNIFORM: Judge = Judge { p_win: 1.0 / 3.0, p_tie: 1.0 / 3.0 };
    /// A coin: win or loss, never a tie.
    pub const COIN: Judge = Judge { p_win: 0.5, p_tie: 0.0 };
    /// A judge that prefers the policy's answer: win 0.8, tie 0.1, loss 0.1.
    pub const PREFERS: Judge = Judge { p_win: 0.8, p_tie: 0.1 };

    pub fn draw(self, rng: &mut impl Rng) -> Outcome {
        let u: f64 = rng.random();
        if u < self.p_win {
            Outcome::Win
        } else if u < self.p_win + self.p_tie {
            Outcome::Tie
        } else {
            Outcome::Loss
        }
    }
}

/// A dynamic curriculum with this rule (`k_of_m` = Some((k, m)) for k-of-m).
pub fn config(rule: AdvanceRule, k_of_m: Option<(usize, usize)>) -> CurriculumConfig {
    CurriculumConfig {
        mode: CurriculumMode::Dynamic,
        advance_rule: rule,
        advance_k: k_of_m.map(|(k, _)| k),
        advance_window: k_of_m.map(|(_, m)| m),
    }
}

fn ladder_tasks(n_tasks: usize, levels: usize) -> Vec<Task> {
    (0..n_tasks)
        .map(|i| Task::new(format!("t{i}"), "p", (0..levels).map(|l| format!("ref {l}")).collect()))
        .collect()
}

/// One simulated step: `n` comparisons per task drawn from `judge_of(task index, its level)`.
fn step(
    c: &mut Curriculum,
    ids: &[String],
    n: usize,
    rng: &mut ChaCha8Rng,
    judge_of: impl Fn(usize, usize) -> Judge,
) -> Result<usize> {
    let outcomes: Vec<Vec<Outcome>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let judge = judge_of(i, c.level(id).expect("known task"));
            (0..n).map(|_| judge.draw(rng)).collect()
        })
        .collect();
    Ok(c.advance(ids.iter().map(String::as_str).zip(outcomes.iter().map(Vec::as_slice)))?.advanced)
}

/// Moves per 100 comparisons when `judge` answers at random: `n_tasks` tasks, `n` rollouts per
/// task per step, `steps` steps, on ladders too tall to reach the top.
pub fn false_advances(
    cfg: &CurriculumConfig,
    n: usize,
    judge: Judge,
    n_tasks: usize,
    steps: usize,
    seed: u64,
) -> Result<f64> {
    let tasks = ladder_tasks(n_tasks, steps + 1);
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let mut c = Curriculum::new(cfg, &tasks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut advances = 0;
    for _ in 0..steps {
        advances += step(&mut c, &ids, n, &mut rng, |_, _| judge)?;
    }
    Ok(100.0 * advances as f64 / (n_tasks * steps * n) as f64)
}

/// A climb of a ladder of `beats_from.len() + 1` levels.
#[derive(Debug, Clone, PartialEq)]
pub struct Climb {
    /// Mean steps until a task reached its top (`max_steps` for one that did not).
    pub mean_steps: f64,
    /// The slowest task's steps.
    pub max_steps: usize,
    /// Tasks that did not reach the top within `max_steps`.
    pub stuck: usize,
    /// Moves per task made before the policy beat the level it left.
    pub premature: f64,
}

/// A policy that learns: it beats level `l` from step `beats_from[l] + 1` on (steps count from
/// 1). The judge compares it with a level's reference as `after` from then, as `before` until
/// then. The ladder has `beats_from.len() + 1` levels.
#[derive(Debug, Clone, PartialEq)]
pub struct Learning {
    pub beats_from: Vec<usize>,
    pub before: Judge,
    pub after: Judge,
}

/// Climbs `learning`'s ladder with `n_tasks` tasks, `n` rollouts each per step, at most
/// `max_steps` steps.
pub fn climb(
    cfg: &CurriculumConfig,
    n: usize,
    learning: &Learning,
    n_tasks: usize,
    max_steps: usize,
    seed: u64,
) -> Result<Climb> {
    let Learning { beats_from, before, after } = learning;
    let (before, after) = (*before, *after);
    let top = beats_from.len();
    let tasks = ladder_tasks(n_tasks, top + 1);
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let mut c = Curriculum::new(cfg, &tasks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut reached: Vec<Option<usize>> = vec![None; n_tasks];
    let mut premature = 0usize;
    for s in 1..=max_steps {
        if reached.iter().all(Option::is_some) {
            break;
        }
        let levels: Vec<usize> = ids.iter().map(|id| c.level(id).expect("known task")).collect();
        // A task at the top is still judged (its rollouts still train); its moves are over.
        step(&mut c, &ids, n, &mut rng, |_, l| if beats_from.get(l).is_none_or(|&b| s > b) { after } else { before })?;
        for (i, id) in ids.iter().enumerate() {
            let l = c.level(id).expect("known task");
            if l > levels[i] && s <= beats_from[levels[i]] {
                premature += 1;
            }
            if l == top && reached[i].is_none() {
                reached[i] = Some(s);
            }
        }
    }
    let steps: Vec<usize> = reached.iter().map(|r| r.unwrap_or(max_steps)).collect();
    Ok(Climb {
        mean_steps: steps.iter().sum::<usize>() as f64 / n_tasks as f64,
        max_steps: steps.iter().copied().max().unwrap_or(0),
        stuck: reached.iter().filter(|r| r.is_none()).count(),
        premature: premature as f64 / n_tasks as f64,
    })
}

/// One row of [`table`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub rule: String,
    /// Rollouts per task per step.
    pub n: usize,
    /// Moves per 100 comparisons, judge uniform over win / tie / loss.
    pub false_uniform: f64,
    /// Moves per 100 comparisons, judge a win/loss coin.
    pub false_coin: f64,
    /// Climbing 4 levels when the policy beats every level from the start (judge win 0.8).
    pub beaten: Climb,
    /// Climbing 4 levels when the policy beats level l only after step 10 (l + 1): a uniform
    /// judge before, win 0.8 after.
    pub learning: Climb,
}

/// The rules measured: any / majority / all, 3-of-4 and a stricter 6-of-8 with 4 rollouts per
/// step; any and 3-of-4 with one (the paper's PPO setting).
pub fn rules() -> Vec<(String, CurriculumConfig, usize)> {
    vec![
        ("any".into(), config(AdvanceRule::Any, None), 4),
        ("majority".into(), config(AdvanceRule::Majority, None), 4),
        ("all".into(), config(AdvanceRule::All, None), 4),
        ("k-of-m 3/4".into(), config(AdvanceRule::KOfM, Some((3, 4))), 4),
        ("k-of-m 6/8".into(), config(AdvanceRule::KOfM, Some((6, 8))), 4),
        ("any".into(), config(AdvanceRule::Any, None), 1),
        ("k-of-m 3/4".into(), config(AdvanceRule::KOfM, Some((3, 4))), 1),
    ]
}

/// Measures every rule of [`rules`]: 256 tasks, 200 steps under the random judges; 256 tasks,
/// at most 200 steps for the climbs.
pub fn measure(seed: u64) -> Result<Vec<Row>> {
    let (tasks, steps) = (256, 200);
    let learns = |beats_from| Learning { beats_from, before: Judge::UNIFORM, after: Judge::PREFERS };
    rules()
        .into_iter()
        .map(|(rule, cfg, n)| {
            Ok(Row {
                false_uniform: false_advances(&cfg, n, Judge::UNIFORM, tasks, steps, seed)?,
                false_coin: false_advances(&cfg, n, Judge::COIN, tasks, steps, seed)?,
                beaten: climb(&cfg, n, &learns(vec![0, 0, 0]), tasks, steps, seed)?,
                learning: climb(&cfg, n, &learns(vec![10, 20, 30]), tasks, steps, seed)?,
                rule,
                n,
            })
        })
        .collect()
}

/// `rows` as a text table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "rule        n | false moves /100 cmp  | beats all levels  | beats level l after step 10(l+1)\n\
         \x20             | uniform W/T/L  coin   | mean steps   max  | mean steps   max  premature moves/task\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{:<10} {:>2} | {:>13.2} {:>6.2}  | {:>10.2} {:>5}  | {:>10.2} {:>5}  {:>8.2}\n",
            r.rule, r.n, r.false_uniform, r.false_coin, r.beaten.mean_steps, r.beaten.max_steps,
            r.learning.mean_steps, r.learning.max_steps, r.learning.premature,
        ));
    }
    s
}
