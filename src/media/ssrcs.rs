//! How many RTP streams one connection may open. str0m keeps a sequence-number record
//! for every SSRC it ever decrypted on a connection, for the connection's life (so a
//! stream that switches back keeps its rollover counter), and remaps the media's
//! stream to each new one. A client that sends every packet on a new SSRC would grow
//! its shard's memory by about 32 bytes a packet, with no end, and slow the shard
//! with it. So a connection's first `MAX_SSRCS` SSRCs pass, and RTP on any other is
//! dropped before str0m sees it.
//!
//! The SSRC is read from the clear RTP header, before decryption: a datagram that
//! fails to authenticate still spends the allowance. Only a sender at the client's own
//! address can do that (datagrams are routed by address), and what it could cost the
//! client is the streams it opens afterwards, not those it has.

/// A publisher sends at most a main and an RTX stream on each of its 16 m-lines (six
/// with three simulcast layers: 96), and bandwidth probes on SSRC 0.
pub const MAX_SSRCS: usize = 128;

/// The SSRCs a connection has sent RTP on.
#[derive(Debug, Default)]
pub struct SsrcAllowance {
    /// Few in practice (a publisher's tracks and their RTX), so a scan is the
    /// cheapest lookup; bounded by `MAX_SSRCS`.
    seen: Vec<u32>,
    refused: u64,
}

impl SsrcAllowance {
    /// Whether `datagram` may go on to str0m: anything but RTP may; RTP may on an SSRC
    /// the connection used before, or on a new one while it has fewer than
    /// `MAX_SSRCS`.
    pub fn admits(&mut self, datagram: &[u8]) -> bool {
        let Some(ssrc) = rtp_ssrc(datagram) else {
            return true;
        };
        if self.seen.contains(&ssrc) {
            return true;
        }
        if self.seen.len() < MAX_SSRCS {
            self.seen.push(ssrc);
            return true;
        }
        self.refused += 1;
        false
    }

    /// RTP datagrams refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

/// The SSRC of an RTP datagram: RFC 7983's range for RTP and RTCP, minus RTCP's packet
/// types (RFC 5761 §4).
fn rtp_ssrc(datagram: &[u8]) -> Option<u32> {
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
        let mut allowance = SsrcAllowance::default();
        for ssrc in 0..MAX_SSRCS as u32 {
            assert!(allowance.admits(&rtp(ssrc)));
        }
        assert!(!allowance.admits(&rtp(MAX_SSRCS as u32)));
        assert_eq!(allowance.refused(), 1);
        // The SSRCs already in use keep flowing.
        assert!(allowance.admits(&rtp(0)));
        assert!(allowance.admits(&rtp(MAX_SSRCS as u32 - 1)));
        assert_eq!(allowance.refused(), 1);
    }

    #[test]
    fn only_rtp_counts() {
        let mut allowance = SsrcAllowance::default();
        for ssrc in 0..MAX_SSRCS as u32 {
            allowance.admits(&rtp(ssrc));
        }
        let mut rtcp = rtp(1_000_000);
        rtcp[1] = 200; // a sender report
        let stun = [0_u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0];
        let dtls = [22_u8, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for datagram in [&rtcp[..], &stun, &dtls, &[0x80, 96]] {
            assert!(allowance.admits(datagram));
        }
        assert!(!allowance.admits(&rtp(1_000_000)));
    }
}
