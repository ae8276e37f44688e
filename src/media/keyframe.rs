//! When to ask a publisher for a keyframe on its subscribers' behalf.
//!
//! A subscriber that starts, or whose decoder lost its reference chain, shows nothing
//! until a keyframe; a publisher asked too often spends its bitrate on keyframes.
//! So one request is outstanding at a time: needs that arise meanwhile wait for the
//! keyframe it brings, which serves them all, and a request no keyframe answered goes
//! again after `RETRY`. Once a keyframe has come, a subscriber that needs one is
//! asked for after `MIN_GAP` from the last request: it started after that keyframe.
//! A single fixed throttle made a subscriber arriving just after another wait out the
//! whole interval (the loadtest's first-video p90 sat at 300 ms).

use std::time::{Duration, Instant};

/// An unanswered request (lost, or the publisher ignored it) is sent again after this.
pub const RETRY: Duration = Duration::from_millis(300);
/// Requests are at least this far apart even when each was answered, which bounds the
/// keyframes a subscriber sending PLI after PLI can cost a publisher (10 per second).
pub const MIN_GAP: Duration = Duration::from_millis(100);

/// Keyframe requests for one published video track.
#[derive(Debug, Default)]
pub struct KeyframeRequests {
    last: Option<Instant>,
    /// A keyframe started since `last`.
    answered: bool,
}

impl KeyframeRequests {
    /// Whether to send a request now; if so, it counts as sent.
    pub fn request(&mut self, now: Instant) -> bool {
        let due = self.last.is_none_or(|at| {
            let since = now.saturating_duration_since(at);
            since >= RETRY || (self.answered && since >= MIN_GAP)
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
        assert!(k.request(t));
        assert!(
            !k.request(t + 150 * MS),
            "outstanding: the coming keyframe serves"
        );
        assert!(!k.request(t + 299 * MS));
        assert!(k.request(t + RETRY), "unanswered: asked again");
    }

    #[test]
    fn after_a_keyframe_the_next_request_waits_only_the_gap() {
        let t = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(t));
        k.keyframe();
        assert!(!k.request(t + 99 * MS));
        assert!(k.request(t + MIN_GAP));
        assert!(
            !k.request(t + 2 * MIN_GAP),
            "the new request is outstanding"
        );
    }

    #[test]
    fn a_keyframe_before_any_request_changes_nothing() {
        let t = Instant::now();
        let mut k = KeyframeRequests::default();
        k.keyframe();
        assert!(k.request(t));
        assert!(!k.request(t + MIN_GAP));
    }
}
