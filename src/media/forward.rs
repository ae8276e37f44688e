//! The per-subscriber half of forwarding: payload-type mapping, sequence rebasing and
//! keyframe gating. Pure functions of packet metadata, so the criterion bench and unit
//! tests drive them directly.
//!
//! Each subscriber's outgoing stream has its own SSRC and starts its sequence numbers
//! near zero (a fresh SRTP receiver assumes rollover counter 0), so the publisher's
//! extended sequence numbers are rebased per subscriber. A new video subscriber gets
//! nothing until a keyframe starts, so its decoder never sees a broken reference chain.

use str0m::format::Codec;

/// Payload type slot meaning "the subscriber did not negotiate this codec".
const NO_PT: u8 = u8::MAX;

/// Rewrite state of one (subscriber, published track) pair.
#[derive(Debug, Clone)]
pub struct Rewriter {
    pt_map: [u8; 128],
    /// `(sequence base, timestamp base)`: `out = in - base` once started; `None`
    /// while waiting for the first packet.
    base: Option<(u64, u32)>,
    needs_keyframe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub pt: u8,
    pub seq: u64,
    pub timestamp: u32,
}

impl Rewriter {
    /// `pt_pairs`: publisher payload type → subscriber payload type.
    pub fn new(pt_pairs: impl IntoIterator<Item = (u8, u8)>, video: bool) -> Self {
        let mut pt_map = [NO_PT; 128];
        for (from, to) in pt_pairs {
            if let Some(slot) = pt_map.get_mut(usize::from(from)) {
                *slot = to;
            }
        }
        Self {
            pt_map,
            base: None,
            needs_keyframe: video,
        }
    }

    pub fn waiting_for_keyframe(&self) -> bool {
        self.needs_keyframe
    }

    /// What to send for an incoming packet, or `None` to skip it for this subscriber.
    pub fn rewrite(
        &mut self,
        pt: u8,
        seq: u64,
        timestamp: u32,
        keyframe_start: bool,
    ) -> Option<Rewritten> {
        let out_pt = *self.pt_map.get(usize::from(pt))?;
        if out_pt == NO_PT {
            return None;
        }
        if self.needs_keyframe {
            if !keyframe_start {
                return None;
            }
            self.needs_keyframe = false;
        }
        // Sequence numbers start at 1 and timestamps at 0 for every subscriber, so the
        // stream looks fresh whichever publisher packet it started from.
        let (seq_base, ts_base) = *self.base.get_or_insert((seq.saturating_sub(1), timestamp));
        let out = seq.checked_sub(seq_base).filter(|s| *s > 0)?;
        Some(Rewritten {
            pt: out_pt,
            seq: out,
            timestamp: timestamp.wrapping_sub(ts_base),
        })
    }
}

/// Whether this RTP payload starts a keyframe. Needs no decoding: only the payload
/// descriptor and the first header bits.
pub fn is_keyframe_start(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => vp8_keyframe_start(payload),
        Codec::Vp9 => vp9_keyframe_start(payload),
        Codec::H264 => h264_keyframe_start(payload),
        _ => false,
    }
}

/// RFC 7741 §4.2 descriptor, then the VP8 frame tag's P bit (RFC 6386 §9.1).
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let start = b0 & 0x10 != 0 && b0 & 0x07 == 0;
    if !start {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(1) else { return false };
        i = 2;
        if x & 0x80 != 0 {
            // PictureID: one byte, or two when its M bit is set.
            let Some(&pid) = p.get(i) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    p.get(i).is_some_and(|tag| tag & 0x01 == 0)
}

/// VP9 payload descriptor: B (start of frame) set and P (inter-predicted) clear.
fn vp9_keyframe_start(p: &[u8]) -> bool {
    p.first().is_some_and(|b| b & 0x08 != 0 && b & 0x40 == 0)
}

/// An IDR or SPS NAL unit, alone, first in a STAP-A, or starting an FU-A.
fn h264_keyframe_start(p: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1f {
        IDR | SPS => true,
        STAP_A => {
            let mut i = 1;
            while let (Some(&hi), Some(&lo)) = (p.get(i), p.get(i + 1)) {
                let size = usize::from(u16::from_be_bytes([hi, lo]));
                if p.get(i + 2).is_some_and(|h| matches!(h & 0x1f, IDR | SPS)) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        FU_A => p
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == IDR),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_waits_for_a_keyframe_then_rebases() {
        let mut rw = Rewriter::new([(96, 100)], true);
        let out = |seq, timestamp| {
            Some(Rewritten {
                pt: 100,
                seq,
                timestamp,
            })
        };
        assert_eq!(
            rw.rewrite(96, 5000, 10, false),
            None,
            "delta before keyframe"
        );
        assert_eq!(rw.rewrite(96, 5001, 3000, true), out(1, 0));
        assert_eq!(rw.rewrite(96, 5002, 6000, false), out(2, 3000));
        assert_eq!(
            rw.rewrite(96, 5000, 10, false),
            None,
            "older than the start"
        );
        assert_eq!(
            rw.rewrite(97, 5003, 9000, false),
            None,
            "unmapped payload type"
        );
    }

    #[test]
    fn audio_starts_at_once_and_timestamps_wrap() {
        let mut rw = Rewriter::new([(111, 111)], false);
        let out = |seq, timestamp| {
            Some(Rewritten {
                pt: 111,
                seq,
                timestamp,
            })
        };
        assert_eq!(rw.rewrite(111, 70_000, u32::MAX - 959, false), out(1, 0));
        assert_eq!(rw.rewrite(111, 70_010, 9_120, false), out(11, 10_080));
    }

    #[test]
    fn vp8_descriptor_forms() {
        // S=1, PID=0, no extension; frame tag P=0 → keyframe.
        assert!(vp8_keyframe_start(&[0x10, 0x00, 0x9d]));
        assert!(
            !vp8_keyframe_start(&[0x10, 0x01, 0x9d]),
            "P=1 is a delta frame"
        );
        assert!(
            !vp8_keyframe_start(&[0x00, 0x00]),
            "not the start of a partition"
        );
        // X=1, I=1 with a 15-bit picture id, L=1, T=1, then the tag.
        assert!(vp8_keyframe_start(&[
            0x90, 0xe0, 0x80, 0x01, 0x02, 0x03, 0x00
        ]));
        assert!(!vp8_keyframe_start(&[0x90, 0xe0, 0x80]), "truncated");
    }

    #[test]
    fn h264_and_vp9_forms() {
        assert!(h264_keyframe_start(&[0x65, 0x88]));
        assert!(
            h264_keyframe_start(&[0x78, 0x00, 0x02, 0x67, 0x42]),
            "STAP-A with SPS"
        );
        assert!(h264_keyframe_start(&[0x7c, 0x85]), "FU-A start of an IDR");
        assert!(!h264_keyframe_start(&[0x7c, 0x05]), "FU-A continuation");
        assert!(!h264_keyframe_start(&[0x41]), "non-IDR slice");
        assert!(vp9_keyframe_start(&[0x08]));
        assert!(!vp9_keyframe_start(&[0x48]));
    }
}
