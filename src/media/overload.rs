//! Overload: the shard's socket is full and the kernel drops datagrams in it
//! (`media::udp::receive_drops`, read after each full receive batch, the only time
//! the buffer can have filled).
//!
//! That loss is the shard's own, and asking publishers to resend it only adds to the
//! load: their resends queue behind the same backlog and arrive too late to play (up
//! to a second, in the loadtest's overload runs). So while overloaded the packet path
//! stops sending NACKs to publishers (`crate::sfu::media`). The state ends after a
//! second without drops, so it does not flap.

use std::time::{Duration, Instant};

/// No new drops for this long: recovered.
const LEAVE_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Overload {
    /// The socket's drop counter when last read.
    drops: u64,
    last_drop: Option<Instant>,
    active: bool,
}

impl Overload {
    pub fn active(&self) -> bool {
        self.active
    }

    /// Records the socket's drop counter. Returns the new state when it changes.
    pub fn drops(&mut self, now: Instant, total: u64) -> Option<bool> {
        if total <= self.drops {
            return self.settle(now);
        }
        self.drops = total;
        self.last_drop = Some(now);
        if self.active {
            return None;
        }
        self.active = true;
        Some(true)
    }

    /// Ends the overload after `LEAVE_AFTER` without drops; for timers too, since the
    /// counter is only read after full batches.
    pub fn settle(&mut self, now: Instant) -> Option<bool> {
        let quiet = self
            .last_drop
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
    fn drops_enter_and_a_quiet_second_leaves() {
        let t0 = Instant::now();
        let mut o = Overload::default();
        assert_eq!(o.drops(t0, 0), None, "a full buffer that lost nothing");
        assert_eq!(o.drops(t0 + ms(10), 3), Some(true));
        assert_eq!(o.drops(t0 + ms(20), 9), None, "reported once");
        assert_eq!(o.drops(t0 + ms(900), 9), None);
        assert_eq!(o.settle(t0 + ms(1019)), None);
        assert_eq!(o.settle(t0 + ms(1020)), Some(false));
        assert!(!o.active());
        assert_eq!(o.drops(t0 + ms(1100), 9), None, "old drops do not count");
        assert_eq!(o.drops(t0 + ms(1200), 10), Some(true));
    }
}
