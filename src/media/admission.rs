//! What one client's datagrams may make its connection's `Rtc` do, checked before
//! str0m sees them.
//!
//! - **SSRCs.** str0m keeps a sequence-number record for every SSRC it ever decrypted
//!   on a connection, for the connection's life (so a stream that switches back keeps
//!   its rollover counter), and remaps the media's stream to each new one. A client
//!   that sends every packet on a new SSRC would grow its shard's memory by about 32
//!   bytes a packet, with no end, and slow the shard with it. So a connection's first
//!   `MAX_SSRCS` SSRCs pass, and RTP on any other is dropped.
//! - **Rate.** Every datagram costs the shard a decryption and, for media, a copy per
//!   subscriber: one connection sending more than any real client would could take
//!   the shard (every room on it) for itself. Past `MAX_RATE` datagrams in a second,
//!   the rest of that second's are dropped.
//!
//! Both read only the clear header: a datagram that fails to authenticate still
//! counts. Only a sender at the client's own address can do that (datagrams are
//! routed by address), and what it could cost the client is streams it opens later
//! and media while it floods, not its connection.

use std::fmt;
use std::time::{Duration, Instant};

/// A publisher sends at most a main and an RTX stream on each of its 16 m-lines (six
/// with three simulcast layers: 96), and bandwidth probes on SSRC 0.
pub const MAX_SSRCS: usize = 128;
/// Datagrams a second: about 48 Mbit/s of full-size packets, where a browser's
/// largest screen share sends 2,000 (20 Mbit/s).
pub const MAX_RATE: u32 = 5_000;
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Why a datagram was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RTP on an SSRC past the connection's `MAX_SSRCS`.
    Ssrc,
    /// Past `MAX_RATE` in the current second.
    Rate,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ssrc => write!(f, "RTP on more than {MAX_SSRCS} SSRCs"),
            Self::Rate => write!(f, "more than {MAX_RATE} datagrams a second"),
        }
    }
}

/// One connection's allowance.
#[derive(Debug)]
pub struct Admission {
    /// The SSRCs the client sent RTP on. Few in practice (a publisher's tracks and
    /// their RTX), so a scan is the cheapest lookup; bounded by `MAX_SSRCS`.
    ssrcs: Vec<u32>,
    window_end: Instant,
    in_window: u32,
    refusals: u64,
}

impl Admission {
    pub fn new(now: Instant) -> Self {
        Self {
            ssrcs: Vec::new(),
            window_end: now + RATE_WINDOW,
            in_window: 0,
            refusals: 0,
        }
    }

    /// Whether `datagram`, received at `now`, may go on to str0m.
    pub fn admit(&mut self, now: Instant, datagram: &[u8]) -> Result<(), Refusal> {
        let refusal = self.check(now, datagram);
        if refusal.is_err() {
            self.refusals += 1;
        }
        refusal
    }

    /// Datagrams refused so far, for either reason.
    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    fn check(&mut self, now: Instant, datagram: &[u8]) -> Result<(), Refusal> {
        if now >= self.window_end {
            self.window_end = now + RATE_WINDOW;
            self.in_window = 0;
        }
        if self.in_window == MAX_RATE {
            return Err(Refusal::Rate);
        }
        self.in_window += 1;
        let Some(ssrc) = rtp_ssrc(datagram) else {
            return Ok(());
        };
        if self.ssrcs.contains(&ssrc) {
            return Ok(());
        }
        if self.ssrcs.len() == MAX_SSRCS {
            return Err(Refusal::Ssrc);
        }
        self.ssrcs.push(ssrc);
        Ok(())
    }
}

/// The SSRC of an RTP datagram: RFC 7983's range for RTP and RTCP, minus RTCP's packet
/// types (RFC 5761 §4).
pub fn rtp_ssrc(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [b0, b1, _, _, _, _, _, _, s0, s1, s2, s3, ..]
            if (128..=191).contains(b0) && !(64..=95).contains(&(b1 & 0x7f)) =>
        {
            Some(u32::from_be_bytes([*s0, *s1, *s2, *s3]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(ssrc: u32) -> Vec<u8> {
        let mut packet = vec![0x80, 111, 0, 1, 0, 0, 0, 0];
        packet.extend_from_slice(&ssrc.to_be_bytes());
        packet.extend_from_slice(&[0; 20]);
        packet
    }

    #[test]
    fn new_ssrcs_pass_until_the_allowance_is_spent() {
        let now = Instant::now();
        let mut admission = Admission::new(now);
        for ssrc in 0..MAX_SSRCS as u32 {
            assert_eq!(admission.admit(now, &rtp(ssrc)), Ok(()));
        }
        assert_eq!(
            admission.admit(now, &rtp(MAX_SSRCS as u32)),
            Err(Refusal::Ssrc)
        );
        // The SSRCs already in use keep flowing.
        assert_eq!(admission.admit(now, &rtp(0)), Ok(()));
        assert_eq!(admission.admit(now, &rtp(MAX_SSRCS as u32 - 1)), Ok(()));
        assert_eq!(admission.refusals(), 1);
    }

    #[test]
    fn only_rtp_spends_ssrcs() {
        let now = Instant::now();
        let mut admission = Admission::new(now);
        for ssrc in 0..MAX_SSRCS as u32 {
            let _ = admission.admit(now, &rtp(ssrc));
        }
        let mut rtcp = rtp(1_000_000);
        rtcp[1] = 200; // a sender report
        let stun = [0_u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0];
        let dtls = [22_u8, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for datagram in [&rtcp[..], &stun, &dtls, &[0x80, 96]] {
            assert_eq!(admission.admit(now, datagram), Ok(()));
        }
        assert_eq!(admission.admit(now, &rtp(1_000_000)), Err(Refusal::Ssrc));
    }

    #[test]
    fn a_second_holds_at_most_the_rate() {
        let start = Instant::now();
        let mut admission = Admission::new(start);
        let packet = rtp(7);
        let admitted = |admission: &mut Admission, at| {
            (0..2 * MAX_RATE)
                .filter(|_| admission.admit(at, &packet).is_ok())
                .count()
        };
        assert_eq!(admitted(&mut admission, start), MAX_RATE as usize);
        let later = start + Duration::from_millis(999);
        assert_eq!(admitted(&mut admission, later), 0);
        assert_eq!(
            admitted(&mut admission, start + RATE_WINDOW),
            MAX_RATE as usize
        );
        assert_eq!(admission.refusals(), 4 * u64::from(MAX_RATE));
    }
}
