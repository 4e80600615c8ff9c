//! Seeded task order: one permutation per epoch, derived from (seed, epoch) alone, and a cursor
//! (epoch, position, seed) that is saved with the checkpoint. Because the permutation depends
//! only on the cursor, a sampler rebuilt from a saved cursor continues exactly where the old one
//! stopped, mid-epoch or at an epoch boundary.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where the sampler stands. `position` counts tasks already handed out in `epoch`; it is always
/// < `n_tasks` (an exhausted epoch rolls over to the next one at once, so a resume at a boundary
/// starts the next epoch instead of running an empty one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerCursor {
    pub epoch: u64,
    pub position: usize,
    /// Permutation seed (`run.seed` at the start of the run).
    pub seed: u64,
    /// Number of tasks the permutation was made for; a resume with another task count is refused.
    pub n_tasks: usize,
}

#[derive(Debug, Clone)]
pub struct TaskSampler {
    cursor: SamplerCursor,
    shuffle: bool,
    order: Vec<usize>,
}

/// The order of epoch `epoch`: a ChaCha8 stream keyed by the seed, one stream per epoch.
pub fn epoch_permutation(n_tasks: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_tasks).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
    }
    order
}

impl TaskSampler {
    /// A fresh sampler at epoch 0, position 0. `shuffle = false` keeps file order (evaluation).
    pub fn new(n_tasks: usize, seed: u64, shuffle: bool) -> Result<Self> {
        Self::resume(SamplerCursor { epoch: 0, position: 0, seed, n_tasks }, n_tasks, shuffle)
    }

    /// Continues from a saved cursor; `n_tasks` must be the count the cursor was made for.
    pub fn resume(cursor: SamplerCursor, n_tasks: usize, shuffle: bool) -> Result<Self> {
        if n_tasks == 0 {
            bail!("task sampler: no tasks");
        }
        if cursor.n_tasks != n_tasks {
            bail!(
                "task sampler: the saved cursor is for {} tasks but the task file has {n_tasks}; \
                 resuming would not continue the same order",
                cursor.n_tasks
            );
        }
        if cursor.position >= n_tasks {
            bail!("task sampler: saved position {} is past the {n_tasks} tasks", cursor.position);
        }
        let order = epoch_permutation(n_tasks, cursor.seed, cursor.epoch, shuffle);
        Ok(Self { cursor, shuffle, order })
    }

    pub fn cursor(&self) -> SamplerCursor {
        self.cursor
    }

    /// The next `k` task indices, continuing into the next epoch when this one runs out (every
    /// task appears once per epoch; a batch that spans a boundary may repeat a task).
    pub fn next_batch(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            out.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
            if self.cursor.position == self.cursor.n_tasks {
                self.cursor.epoch += 1;
                self.cursor.position = 0;
                self.order = epoch_permutation(self.cursor.n_tasks, self.cursor.seed, self.cursor.epoch, self.shuffle);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_epoch_is_a_permutation_and_epochs_differ() {
        let mut s = TaskSampler::new(50, 7, true).unwrap();
        let e0 = s.next_batch(50);
        let e1 = s.next_batch(50);
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        let mut sorted1 = e1.clone();
        sorted1.sort();
        assert_eq!(sorted1, sorted);
        assert_ne!(e0, e1);
        assert_ne!(e0, (0..50).collect::<Vec<_>>());
        assert_eq!(s.cursor(), SamplerCursor { epoch: 2, position: 0, seed: 7, n_tasks: 50 });
        // Another seed, another order.
        assert_ne!(TaskSampler::new(50, 8, true).unwrap().next_batch(50), e0);
        // No shuffle: file order.
        assert_eq!(TaskSampler::new(5, 7, false).unwrap().next_batch(7), vec![0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn resume_refuses_a_different_task_count() {
        let c = TaskSampler::new(10, 1, true).unwrap().cursor();
        let e = TaskSampler::resume(c, 11, true).unwrap_err().to_string();
        assert!(e.contains("10 tasks") && e.contains("11"), "{e}");
    }

    proptest! {
        /// Stopping after any number of batches, saving the cursor through JSON and resuming gives
        /// the same stream as never stopping, across epoch boundaries.
        #[test]
        fn resume_anywhere_equals_an_uninterrupted_run(
            n in 1usize..40, seed in any::<u64>(), batch in 1usize..17,
            stop_after in 0usize..12, total in 1usize..12,
        ) {
            let mut straight = TaskSampler::new(n, seed, true).unwrap();
            let want: Vec<Vec<usize>> = (0..stop_after + total).map(|_| straight.next_batch(batch)).collect();

            let mut first = TaskSampler::new(n, seed, true).unwrap();
            let mut got: Vec<Vec<usize>> = (0..stop_after).map(|_| first.next_batch(batch)).collect();
            let saved = serde_json::to_string(&first.cursor()).unwrap();
            drop(first);
            let cursor: SamplerCursor = serde_json::from_str(&saved).unwrap();
            let mut resumed = TaskSampler::resume(cursor, n, true).unwrap();
            got.extend((0..total).map(|_| resumed.next_batch(batch)));
            prop_assert_eq!(got, want);
            prop_assert_eq!(resumed.cursor(), straight.cursor());
        }
    }
}
