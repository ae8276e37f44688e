//! Which of the room's publishers (Janus "feeds") we subscribe to, and when to ask.
//!
//! All feeds arrive on one multistream subscriber connection, negotiated one step at
//! a time: a `join` (the first time) or `subscribe` request, Janus's offer, our
//! answer in a `start`, its confirmation. Feeds announced meanwhile wait for the next
//! step. Janus refuses a feed whose publisher's media is not up yet with 428; those
//! feeds are asked for again after a backoff that doubles up to a bound. Pure
//! bookkeeping, no IO, so the rules are tested on their own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Feeds tracked per participant; announcements beyond it are ignored.
const MAX_FEEDS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To be asked for.
    Wanted,
    /// In the request in flight.
    Requested,
    /// In our subscriber connection.
    Subscribed,
    /// Janus refused it for a reason other than 428: not asked for again.
    Refused,
}

/// A publisher in the room: its tracks (mids, as announced) and our subscription.
#[derive(Debug, Clone)]
struct Feed {
    tracks: Vec<String>,
    state: State,
}

/// The next subscriber request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The first subscription joins the room as a subscriber.
    pub join: bool,
    pub feeds: Vec<u64>,
}

#[derive(Debug)]
pub struct Feeds {
    feeds: BTreeMap<u64, Feed>,
    /// A `join`/`subscribe` is in flight.
    requesting: bool,
    /// Offers answered with a `start` that Janus has not confirmed.
    starting: u32,
    /// The subscriber joined the room.
    joined: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Default for Feeds {
    fn default() -> Self {
        Self {
            feeds: BTreeMap::new(),
            requesting: false,
            starting: 0,
            joined: false,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Feeds {
    /// A publisher announced with these tracks; whether it is new to us.
    pub fn add(&mut self, id: u64, tracks: Vec<String>) -> bool {
        if self.feeds.contains_key(&id) || self.feeds.len() >= MAX_FEEDS {
            return false;
        }
        let state = State::Wanted;
        self.feeds.insert(id, Feed { tracks, state });
        true
    }

    /// A publisher stopped publishing or left: its tracks, if it was known. Janus
    /// removes it from our subscription itself (and sends a new offer).
    pub fn remove(&mut self, id: u64) -> Option<Vec<String>> {
        self.feeds.remove(&id).map(|f| f.tracks)
    }

    /// The request to send now, if one is due: nothing in flight, no backoff
    /// pending, some feed wanted. Its feeds become requested.
    pub fn next_request(&mut self, now: Instant) -> Option<Request> {
        if self.requesting || self.starting > 0 || self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        let feeds: Vec<u64> = self
            .feeds
            .iter_mut()
            .filter(|(_, f)| f.state == State::Wanted)
            .map(|(id, f)| {
                f.state = State::Requested;
                *id
            })
            .collect();
        if feeds.is_empty() {
            return None;
        }
        self.requesting = true;
        Some(Request {
            join: !self.joined,
            feeds,
        })
    }

    /// Janus accepted the request and sent its offer.
    pub fn accepted(&mut self) {
        self.requesting = false;
        self.joined = true;
        self.backoff = FIRST_BACKOFF;
        self.set_requested(State::Subscribed);
    }

    /// Janus refused the request. `retry` (428: media not up yet) asks again after
    /// the backoff; otherwise the feeds are given up.
    pub fn refused(&mut self, retry: bool, now: Instant) {
        self.requesting = false;
        if retry {
            self.set_requested(State::Wanted);
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else {
            self.set_requested(State::Refused);
        }
    }

    /// We answered an offer of Janus's with a `start`.
    pub fn answered(&mut self) {
        self.starting += 1;
    }

    /// Janus confirmed a `start`.
    pub fn started(&mut self) {
        self.starting = self.starting.saturating_sub(1);
    }

    /// When [`Feeds::next_request`] may have something again without other input.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Feeds in our subscriber connection.
    #[cfg(test)]
    fn subscribed(&self) -> usize {
        self.feeds
            .values()
            .filter(|f| f.state == State::Subscribed)
            .count()
    }

    fn set_requested(&mut self, to: State) {
        for feed in self.feeds.values_mut() {
            if feed.state == State::Requested {
                feed.state = to;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracks() -> Vec<String> {
        vec!["0".into(), "1".into()]
    }

    #[test]
    fn one_request_at_a_time_then_the_feeds_announced_meanwhile() {
        let now = Instant::now();
        let mut feeds = Feeds::default();
        assert_eq!(feeds.next_request(now), None, "nothing wanted");
        assert!(feeds.add(1, tracks()));
        assert!(!feeds.add(1, tracks()), "announced twice");
        assert!(feeds.add(2, tracks()));
        let first = feeds.next_request(now).unwrap();
        assert_eq!(
            first,
            Request {
                join: true,
                feeds: vec![1, 2]
            }
        );

        assert!(feeds.add(3, tracks()));
        assert_eq!(feeds.next_request(now), None, "join in flight");
        feeds.accepted();
        assert_eq!(feeds.subscribed(), 2);
        feeds.answered();
        assert_eq!(feeds.next_request(now), None, "start not confirmed");
        feeds.started();
        assert_eq!(
            feeds.next_request(now),
            Some(Request {
                join: false,
                feeds: vec![3]
            })
        );
        feeds.accepted();
        assert_eq!(feeds.subscribed(), 3);

        assert_eq!(feeds.remove(2), Some(tracks()));
        assert_eq!(feeds.remove(2), None);
        assert_eq!(feeds.subscribed(), 2);
    }

    #[test]
    fn no_such_feed_retries_with_a_doubling_bounded_backoff() {
        let start = Instant::now();
        let mut feeds = Feeds::default();
        feeds.add(1, tracks());
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert!(feeds.next_request(now).is_some());
            feeds.refused(true, now);
            let at = feeds.retry_at().unwrap();
            assert_eq!(
                feeds.next_request(at - Duration::from_millis(1)),
                None,
                "backing off"
            );
            waits.push(at - now);
            now = at;
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);

        // Still the first subscription; success resets the backoff.
        assert_eq!(
            feeds.next_request(now),
            Some(Request {
                join: true,
                feeds: vec![1]
            })
        );
        feeds.accepted();
        assert_eq!(feeds.retry_at(), None);
        feeds.add(2, tracks());
        feeds.next_request(now).unwrap();
        feeds.refused(true, now);
        assert_eq!(feeds.retry_at(), Some(now + FIRST_BACKOFF));
    }

    #[test]
    fn other_refusals_give_the_feeds_up_and_departures_cancel_retries() {
        let now = Instant::now();
        let mut feeds = Feeds::default();
        feeds.add(1, tracks());
        feeds.next_request(now).unwrap();
        feeds.refused(false, now);
        assert_eq!(feeds.retry_at(), None);
        assert_eq!(feeds.next_request(now), None, "given up");

        feeds.add(2, tracks());
        feeds.next_request(now).unwrap();
        feeds.refused(true, now);
        feeds.remove(2);
        let later = now + MAX_BACKOFF;
        assert_eq!(
            feeds.next_request(later),
            None,
            "the feed left while backing off"
        );
        assert_eq!(feeds.retry_at(), None);
    }

    #[test]
    fn announcements_are_bounded() {
        let mut feeds = Feeds::default();
        for id in 0..MAX_FEEDS as u64 {
            assert!(feeds.add(id, Vec::new()));
        }
        assert!(!feeds.add(u64::MAX, Vec::new()));
    }
}
