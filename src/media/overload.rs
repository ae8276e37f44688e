//! Overload detection from the receive batches alone. A shard that finds its socket
//! holding a full batch every time it reads is behind: datagrams queue in the kernel
//! and, once its buffer is full, are dropped there.
//!
//! That loss is the shard's own, and asking publishers to resend it only adds to the
//! load: their resends queue behind the same backlog and arrive too late to play (up
//! to a second, in the loadtest's overload runs). So while overloaded the packet path
//! stops sending NACKs to publishers (`crate::sfu::media`). Entering takes a sustained
//! backlog and leaving a sustained lack of one, so the state does not flap.

use std::time::{Duration, Instant};

/// Every batch full for this long: overloaded.
const ENTER_AFTER: Duration = Duration::from_millis(100);
/// No full batch for this long: recovered.
const LEAVE_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Overload {
    /// Start of the current run of full batches.
    full_since: Option<Instant>,
    last_full: Option<Instant>,
    active: bool,
}

impl Overload {
    pub fn active(&self) -> bool {
        self.active
    }

    /// Records one receive batch (`full`: it filled the batch, so more was queued).
    /// Returns the new state when it changes.
    pub fn batch(&mut self, now: Instant, full: bool) -> Option<bool> {
        if !full {
            self.full_since = None;
            return self.settle(now);
        }
        self.last_full = Some(now);
        let since = *self.full_since.get_or_insert(now);
        if !self.active && now.saturating_duration_since(since) >= ENTER_AFTER {
            self.active = true;
            return Some(true);
        }
        None
    }

    /// Ends the overload once no batch has been full for `LEAVE_AFTER`; for timers
    /// too, so a shard whose traffic stopped altogether recovers.
    pub fn settle(&mut self, now: Instant) -> Option<bool> {
        let quiet = self
            .last_full
            .is_none_or(|at| now.saturating_duration_since(at) >= LEAVE_AFTER);
        if self.active && quiet {
            self.active = false;
            return Some(false);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_sustained_backlog_enters_and_a_quiet_second_leaves() {
        let t0 = Instant::now();
        let mut o = Overload::default();
        assert_eq!(o.batch(t0, true), None);
        assert_eq!(o.batch(t0 + ms(99), true), None);
        assert_eq!(o.batch(t0 + ms(100), true), Some(true));
        assert_eq!(o.batch(t0 + ms(101), true), None, "reported once");
        // A batch that drains the socket now and then does not end it...
        assert_eq!(o.batch(t0 + ms(500), false), None);
        assert_eq!(o.batch(t0 + ms(600), true), None);
        assert_eq!(o.settle(t0 + ms(1599)), None);
        // ...a second without a full batch does.
        assert_eq!(o.settle(t0 + ms(1600)), Some(false));
        assert!(!o.active());
    }

    #[test]
    fn short_bursts_are_not_overload() {
        let t0 = Instant::now();
        let mut o = Overload::default();
        for i in 0..100 {
            // Full batches for 90 ms, then one that empties the socket: a burst.
            let start = t0 + ms(i * 100);
            assert_eq!(o.batch(start, true), None);
            assert_eq!(o.batch(start + ms(90), true), None);
            assert_eq!(o.batch(start + ms(95), false), None);
        }
        assert!(!o.active());
    }
}
