//! How long a subscriber's video streams keep sent packets for NACKs: three round
//! trips, as libwebrtc keeps its own sent packets, with Janus's floor (its
//! `min_nack_queue`) and a cap.
//!
//! str0m keeps every sent video packet per subscriber stream, in a buffer that grows
//! to the most packets one window ever held and is only freed when the window is set
//! again. Those buffers are the largest part of a participant's memory, so a window
//! longer than the path needs costs memory for nothing, and one shorter than the
//! round trip answers no NACK at all: the packet is gone before the NACK arrives.

use std::time::Duration;

use str0m::rtp::StreamTx;

/// Never shorter, whatever the round trip: Janus's default `min_nack_queue`.
const MIN: Duration = Duration::from_millis(200);
/// Never longer: bounds the buffer against a path (or a forged receiver report) with
/// a huge round trip. libwebrtc's own floor; two retries fit up to a 316 ms round
/// trip, one up to 475 ms.
const MAX: Duration = Duration::from_millis(1000);
/// Windows move in steps, so round-trip jitter does not reset the buffers.
const STEP: Duration = Duration::from_millis(100);
/// How long a receiver takes to notice a gap: the next packet's arrival, up to a
/// frame interval later.
const GAP_NOTICED: Duration = Duration::from_millis(50);
/// Buffer cap in packets; the window bounds it by time first.
const PACKETS: usize = 1024;
/// Resends stop while they exceed this share of a stream's bytes, so a subscriber
/// that NACKs everything cannot multiply its bandwidth (str0m's default share).
const SHARE_CAP: f32 = 0.15;

/// One subscriber connection's window and the round trip it was fitted to.
#[derive(Debug, Clone, Copy)]
pub struct ResendWindow {
    window: Duration,
    rtt: Option<Duration>,
}

impl Default for ResendWindow {
    /// Until a receiver report gives the round trip: the floor.
    fn default() -> Self {
        Self {
            window: MIN,
            rtt: None,
        }
    }
}

impl ResendWindow {
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Takes a round-trip measurement. Returns the new window when the connection's
    /// video streams must get it: at once when the path got longer, and only after a
    /// clear drop when it got shorter (setting a window empties the buffer).
    pub fn observe(&mut self, rtt: Duration) -> Option<Duration> {
        self.rtt = Some(rtt);
        let fit = fit(rtt);
        let change = fit > self.window || fit + 2 * STEP <= self.window;
        change.then(|| {
            self.window = fit;
            fit
        })
    }

    /// Sets a subscriber stream's resend buffer: this window if the stream has a resend
    /// (RTX) SSRC, as video does; none otherwise, since str0m could not resend from it
    /// (audio: no buffer, and no byte history for the cap either).
    pub fn apply(&self, tx: &mut StreamTx) {
        if tx.rtx().is_some() {
            tx.set_rtx_cache(PACKETS, self.window, Some(SHARE_CAP));
        } else {
            tx.set_rtx_cache(0, Duration::ZERO, None);
        }
    }
}

/// Long enough for a NACK and two retries: the first NACK arrives a round trip (and
/// a noticed gap) after the packet left, each retry a round trip later.
fn fit(rtt: Duration) -> Duration {
    let need = rtt.saturating_mul(3).saturating_add(GAP_NOTICED);
    let steps = need.as_nanos().div_ceil(STEP.as_nanos());
    let rounded = STEP.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
    rounded.clamp(MIN, MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn short_paths_get_the_floor_and_long_ones_the_cap() {
        assert_eq!(fit(ms(0)), MIN);
        assert_eq!(fit(ms(50)), MIN); // 200 ms needed
        assert_eq!(fit(ms(60)), ms(300)); // 230 ms, rounded up a step
        assert_eq!(fit(ms(100)), ms(400));
        assert_eq!(fit(ms(316)), MAX);
        assert_eq!(fit(ms(400)), MAX);
        assert_eq!(fit(Duration::MAX), MAX);
    }

    #[test]
    fn a_longer_path_widens_at_once_and_a_shorter_one_only_after_a_clear_drop() {
        let mut w = ResendWindow::default();
        assert_eq!(w.observe(ms(1)), None, "loopback keeps the floor");
        assert_eq!(w.observe(ms(100)), Some(ms(400)));
        assert_eq!(w.observe(ms(80)), None, "300 ms fits, but only a step less");
        assert_eq!(w.window(), ms(400));
        assert_eq!(w.observe(ms(130)), Some(ms(500)));
        assert_eq!(w.observe(ms(10)), Some(MIN), "two steps down: shrink");
        assert_eq!(w.rtt(), Some(ms(10)));
    }
}
