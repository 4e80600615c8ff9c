//! Requests in flight on a loopback server, now and at most: what tests read to see how much
//! concurrency a client really used.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct InFlightGauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl InFlightGauge {
    /// Counts one request in flight until the returned guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    /// Restarts the maximum from the requests in flight now.
    pub fn reset_max(&self) {
        self.max.store(self.now(), Ordering::SeqCst);
    }
}

pub struct InFlight<'a>(&'a InFlightGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}
