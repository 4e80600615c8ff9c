//! The letter task the bench and the run tests train on: references with more and more `a`s,
//! and a scripted judge that prefers the answer with more of them.

use super::scripted::{rules, Behavior};
use crate::data::Task;
use crate::judge::Verdict;

/// Tasks whose references contain more and more of the letter `a` (what the bench's and the
/// tests' scripted judge rewards).
pub fn letter_tasks(n: usize) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let refs = [2usize, 5, 9].iter().map(|&k| format!("{}{}", "a".repeat(k), " reference text".repeat(i % 3 + 1))).collect();
            Task::new(format!("t{i:03}"), format!("Write a short text number {i} about the sea."), refs)
        })
        .collect()
}

/// Prefers the answer with more `a`s; a tie when equal. Deterministic, order-symmetric.
pub fn more_a_judge() -> Behavior {
    rules::verdict_by(|first, second| {
        let (x, y) = (first.matches('a').count(), second.matches('a').count());
        match x.cmp(&y) {
            std::cmp::Ordering::Greater => Verdict::First,
            std::cmp::Ordering::Less => Verdict::Second,
            std::cmp::Ordering::Equal => Verdict::Tie,
        }
    })
}

/// Prefers the shorter answer; a tie when equal. Mixed outcomes on short random rollouts, so an
/// update has something to learn from.
pub fn shorter_judge() -> Behavior {
    rules::verdict_by(|first, second| match first.len().cmp(&second.len()) {
        std::cmp::Ordering::Less => Verdict::First,
        std::cmp::Ordering::Greater => Verdict::Second,
        std::cmp::Ordering::Equal => Verdict::Tie,
    })
}
