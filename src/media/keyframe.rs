//! When to ask a publisher for a keyframe on its subscribers' behalf.
//!
//! A subscriber that starts on a track shows nothing until a keyframe; one whose
//! decoder broke sends PLI/FIR; a publisher asked too often spends its bitrate on
//! keyframes. One request per track is outstanding at a time: needs that arise
//! meanwhile wait for the keyframe it brings, which serves them all, and a request no
//! keyframe answered goes again after `RETRY`. Once a keyframe has come, a subscriber
//! that starts needs a new one (it missed that one) and is asked for at once, as
//! mediasoup does. Subscribers' own requests, which a client controls, also keep
//! `MIN_GAP` after the last request.
//!
//! A single 300 ms throttle for everything made a subscriber joining just after
//! another wait it out: the loadtest's first-video p90 was 299 ms.

use std::time::{Duration, Instant};

/// An unanswered request (lost, or the publisher ignored it) is sent again after this.
pub const RETRY: Duration = Duration::from_millis(300);
/// Least time between requests a subscriber's PLI/FIR causes: bounds what a client
/// sending one after another costs the publisher (10 keyframes per second).
pub const MIN_GAP: Duration = Duration::from_millis(100);

/// Why a subscriber needs a keyframe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// It starts on the track: its connection came up, or it subscribed, or it is
    /// still waiting for its first keyframe.
    Start,
    /// Its decoder asked (PLI/FIR).
    Repair,
}

/// Keyframe requests for one published video track.
#[derive(Debug, Default)]
pub struct KeyframeRequests {
    last: Option<Instant>,
    /// A keyframe started since `last`.
    answered: bool,
}

impl KeyframeRequests {
    /// Whether to send a request now; if so, it counts as sent.
    pub fn request(&mut self, now: Instant, need: Need) -> bool {
        let due = self.last.is_none_or(|at| {
            let since = now.saturating_duration_since(at);
            since >= RETRY || (self.answered && (need == Need::Start || since >= MIN_GAP))
        });
        if due {
            self.last = Some(now);
            self.answered = false;
        }
        due
    }

    /// A keyframe started on the track.
    pub fn keyframe(&mut self) {
        self.answered = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_request_is_outstanding_until_a_keyframe_or_the_retry() {
        let t = Instant::now();
        let mut k = KeyframeRequests::default();
        k.keyframe(); // answers nothing: no request was out
        assert!(k.request(t, Need::Start));
        assert!(
            !k.request(t + 150 * MS, Need::Start),
            "the coming keyframe serves"
        );
        assert!(!k.request(t + 299 * MS, Need::Repair));
        assert!(
            k.request(t + RETRY, Need::Repair),
            "unanswered: asked again"
        );
    }

    #[test]
    fn after_a_keyframe_a_start_goes_at_once_and_a_repair_keeps_the_gap() {
        let t = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(t, Need::Start));
        k.keyframe();
        assert!(!k.request(t + MS, Need::Repair), "within the gap");
        assert!(k.request(t + MS, Need::Start));
        assert!(
            !k.request(t + 2 * MS, Need::Start),
            "the new request is outstanding"
        );
        k.keyframe();
        assert!(!k.request(t + 100 * MS, Need::Repair));
        assert!(k.request(t + MS + MIN_GAP, Need::Repair));
    }
}
