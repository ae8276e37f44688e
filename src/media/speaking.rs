//! Server-side voice activity from the RFC 6464 audio level every browser puts on its
//! Opus packets: no decoding. A smoothed level with hysteresis in level and time, so
//! `speaking` messages change at most a few times a second however the level jitters.

use std::time::{Duration, Instant};

/// Louder than this (dBov, 0 is loudest) starts speech...
const START_DBOV: u8 = 50;
/// ...quieter than this ends it.
const STOP_DBOV: u8 = 60;
/// Speech must last this long to be announced.
const START_AFTER: Duration = Duration::from_millis(150);
/// Silence must last this long to end speech.
const STOP_AFTER: Duration = Duration::from_millis(800);

#[derive(Debug, Default)]
pub struct SpeakingDetector {
    /// Smoothed level in dBov, times 16 for integer precision.
    smoothed_x16: u32,
    speaking: bool,
    /// Since when the level has been on the other side of the threshold.
    crossing_since: Option<Instant>,
}

impl SpeakingDetector {
    /// Feeds one packet's level (dBov, 0..=127). Returns `Some(speaking)` when the
    /// state changes.
    pub fn update(&mut self, now: Instant, dbov: u8) -> Option<bool> {
        let level_x16 = u32::from(dbov.min(127)) * 16;
        if self.smoothed_x16 == 0 {
            self.smoothed_x16 = level_x16;
        }
        // One-pole low-pass: an eighth of the way per packet (~160 ms at 50 pps).
        self.smoothed_x16 = (self.smoothed_x16 * 7 + level_x16) / 8;
        let level = self.level();
        let crossing = if self.speaking {
            level > STOP_DBOV
        } else {
            level < START_DBOV
        };
        if !crossing {
            self.crossing_since = None;
            return None;
        }
        let since = *self.crossing_since.get_or_insert(now);
        let hold = if self.speaking {
            STOP_AFTER
        } else {
            START_AFTER
        };
        if now.saturating_duration_since(since) < hold {
            return None;
        }
        self.speaking = !self.speaking;
        self.crossing_since = None;
        Some(self.speaking)
    }

    /// The smoothed level in dBov (0 loudest, 127 silence).
    pub fn level(&self) -> u8 {
        u8::try_from(self.smoothed_x16 / 16).unwrap_or(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `dbov` at 50 packets/s for `ms`; returns the state changes seen.
    fn feed(d: &mut SpeakingDetector, t: &mut Instant, dbov: u8, ms: u64) -> Vec<bool> {
        let mut changes = Vec::new();
        for _ in 0..ms / 20 {
            *t += Duration::from_millis(20);
            changes.extend(d.update(*t, dbov));
        }
        changes
    }

    #[test]
    fn speech_starts_and_stops_with_hysteresis() {
        let mut d = SpeakingDetector::default();
        let mut t = Instant::now();
        assert!(
            feed(&mut d, &mut t, 127, 500).is_empty(),
            "silence stays silent"
        );
        assert_eq!(feed(&mut d, &mut t, 20, 600), vec![true]);
        assert!(d.level() < 30);
        // A short pause does not end speech.
        assert!(feed(&mut d, &mut t, 127, 300).is_empty());
        assert!(feed(&mut d, &mut t, 20, 300).is_empty());
        assert_eq!(feed(&mut d, &mut t, 127, 2000), vec![false]);
    }

    #[test]
    fn a_click_is_not_speech() {
        let mut d = SpeakingDetector::default();
        let mut t = Instant::now();
        feed(&mut d, &mut t, 127, 200);
        assert!(feed(&mut d, &mut t, 0, 40).is_empty());
        assert!(feed(&mut d, &mut t, 127, 1000).is_empty());
    }
}
