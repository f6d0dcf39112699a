//! Whether the processor's loops are running or retrying through an
//! outage, for `/readyz` and the paused gauge.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Shared health flags for `/readyz`.
#[derive(Default)]
pub struct Health {
    /// How many loops (apply lanes, the publish stage, the delivery
    /// fan-out) are retrying through an outage right now.
    retrying: AtomicUsize,
    /// True once the consumer is running.
    pub running: AtomicBool,
}

impl Health {
    /// Marks one loop as retrying until the returned guard is dropped.
    pub fn pause(&self) -> Paused<'_> {
        self.retrying.fetch_add(1, Ordering::Relaxed);
        Paused(self)
    }

    /// True while any loop is retrying.
    pub fn is_paused(&self) -> bool {
        self.retrying.load(Ordering::Relaxed) != 0
    }
}

/// One loop retrying through an outage: dropping it marks the loop as
/// running again. A count, not a flag, so that one lane's recovery does
/// not hide another lane still retrying.
#[must_use = "the loop counts as paused only while this is held"]
pub struct Paused<'a>(&'a Health);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_paused_while_any_loop_retries() {
        let h = Health::default();
        assert!(!h.is_paused());
        let lane = h.pause();
        let publish = h.pause();
        drop(lane);
        assert!(h.is_paused(), "publish still retrying");
        drop(publish);
        assert!(!h.is_paused());
    }
}
