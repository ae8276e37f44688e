//! Synthetic media payloads: the measurement stamp every packet carries, Opus-sized
//! audio packets, and VP8 packets with a valid RFC 7741 payload descriptor and, on
//! keyframes, a valid VP8 keyframe header.
//!
//! The stamp is a fixed-size *trailer* (the last [`STAMP_LEN`] bytes of the RTP
//! payload) rather than sitting right after the VP8 headers: an SFU may rewrite the
//! VP8 descriptor (picture id, TL0PICIDX) and change its length, and a trailer is found
//! the same way for every codec without parsing anything.

/// Marks a payload as ours; a packet without it is counted as unstamped.
pub const STAMP_MAGIC: [u8; 4] = *b"CRLY";
/// Magic, sequence number (u64 BE), send time (u64 BE).
pub const STAMP_LEN: usize = 4 + 8 + 8;

/// Measurement data embedded in every media packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Sender-side packet counter of the track, starting at 0, never wrapping.
    pub seq: u64,
    /// Send time in microseconds since the UNIX epoch.
    pub sent_unix_micros: u64,
}

impl Stamp {
    /// Appends the stamp as a trailer.
    pub fn append_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&STAMP_MAGIC);
        buf.extend_from_slice(&self.seq.to_be_bytes());
        buf.extend_from_slice(&self.sent_unix_micros.to_be_bytes());
    }

    /// Reads the trailer of a payload, if it carries one.
    pub fn from_trailer(payload: &[u8]) -> Option<Stamp> {
        let start = payload.len().checked_sub(STAMP_LEN)?;
        let t = &payload[start..];
        if t[..4] != STAMP_MAGIC {
            return None;
        }
        Some(Stamp {
            seq: u64::from_be_bytes(t[4..12].try_into().ok()?),
            sent_unix_micros: u64::from_be_bytes(t[12..20].try_into().ok()?),
        })
    }
}

/// Opus TOC byte: config 15 (hybrid fullband, 20 ms), mono, one frame. Gives a
/// server that peeks at the payload something plausible to look at.
const OPUS_TOC: u8 = 15 << 3;

/// An Opus-sized audio payload of `size` bytes (at least TOC plus stamp).
pub fn audio_payload(size: usize, stamp: Stamp) -> Vec<u8> {
    let size = size.max(1 + STAMP_LEN);
    let mut buf = Vec::with_capacity(size);
    buf.push(OPUS_TOC);
    buf.resize(size - STAMP_LEN, 0);
    stamp.append_to(&mut buf);
    buf
}

/// Length of the descriptor we write: first byte, X byte, 15-bit picture id.
const DESCRIPTOR_LEN: usize = 4;
/// VP8 keyframe header: 3-byte frame tag, start code, 2-byte width, 2-byte height.
const KEYFRAME_HEADER_LEN: usize = 10;
/// Interframe header: the 3-byte frame tag only.
const INTERFRAME_HEADER_LEN: usize = 3;
const START_CODE: [u8; 3] = [0x9d, 0x01, 0x2a];

/// Splits synthetic VP8 frames into RTP payloads.
#[derive(Debug, Clone)]
pub struct Vp8Packetizer {
    /// Largest RTP payload to produce.
    max_payload: usize,
    width: u16,
    height: u16,
    /// 15-bit picture id, incremented per frame as browsers do.
    picture_id: u16,
}

/// One RTP payload of a VP8 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vp8Packet {
    /// The RTP payload: descriptor, frame bytes, stamp.
    pub payload: Vec<u8>,
    /// RTP marker: set on the last packet of the frame.
    pub marker: bool,
}

impl Vp8Packetizer {
    /// `max_payload` bounds each RTP payload (1200 keeps a packet under any path MTU).
    pub fn new(max_payload: usize, width: u16, height: u16) -> Self {
        Self {
            max_payload: max_payload.max(DESCRIPTOR_LEN + KEYFRAME_HEADER_LEN + STAMP_LEN + 1),
            width,
            height,
            picture_id: 0,
        }
    }

    /// Packetizes one frame of `frame_len` VP8 bytes (header included, stamps and
    /// descriptors not). `stamp` is called once per packet, in order.
    pub fn packetize(
        &mut self,
        frame_len: usize,
        keyframe: bool,
        mut stamp: impl FnMut() -> Stamp,
    ) -> Vec<Vp8Packet> {
        let header_len = if keyframe {
            KEYFRAME_HEADER_LEN
        } else {
            INTERFRAME_HEADER_LEN
        };
        let frame_len = frame_len.max(header_len);
        let capacity = self.max_payload - DESCRIPTOR_LEN - STAMP_LEN;
        let count = frame_len.div_ceil(capacity);
        // Even split, as browsers do, so the last packet is not a runt.
        let per_packet = frame_len.div_ceil(count);

        let picture_id = self.picture_id;
        self.picture_id = (self.picture_id + 1) & 0x7fff;

        let mut packets = Vec::with_capacity(count);
        let mut remaining = frame_len;
        for i in 0..count {
            let body = per_packet.min(remaining);
            remaining -= body;
            let mut buf = Vec::with_capacity(DESCRIPTOR_LEN + body + STAMP_LEN);
            // X=1, S on the first packet, PID=0; then I=1 and a 15-bit picture id (M=1).
            buf.push(0x80 | if i == 0 { 0x10 } else { 0 });
            buf.push(0x80);
            buf.push(0x80 | (picture_id >> 8) as u8);
            buf.push(picture_id as u8);
            let body_start = buf.len();
            if i == 0 {
                self.write_frame_header(&mut buf, keyframe, frame_len - header_len);
            }
            buf.resize(body_start + body, 0);
            stamp().append_to(&mut buf);
            packets.push(Vp8Packet {
                payload: buf,
                marker: i + 1 == count,
            });
        }
        packets
    }

    /// RFC 6386 section 9.1 frame tag (plus start code and dimensions on keyframes).
    fn write_frame_header(&self, buf: &mut Vec<u8>, keyframe: bool, first_partition: usize) {
        let first_partition = first_partition.min(0x7ffff) as u32;
        // Bit 0: frame type (0 = key), bits 1-3: version 0, bit 4: show_frame,
        // bits 5-23: first partition size.
        let tag = (first_partition << 5) | (1 << 4) | u32::from(!keyframe);
        buf.extend_from_slice(&tag.to_le_bytes()[..3]);
        if keyframe {
            buf.extend_from_slice(&START_CODE);
            // 14-bit dimensions, scale bits 0.
            buf.extend_from_slice(&(self.width & 0x3fff).to_le_bytes());
            buf.extend_from_slice(&(self.height & 0x3fff).to_le_bytes());
        }
    }
}

/// What the receiver learns from a VP8 payload's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Info {
    /// S bit set and partition index 0: the packet starts a frame.
    pub frame_start: bool,
    /// Starts a frame whose header says keyframe and carries the start code.
    pub keyframe: bool,
    /// Picture id, when the descriptor carries one.
    pub picture_id: Option<u16>,
}

/// Parses an RFC 7741 payload descriptor and, on a frame start, the VP8 frame tag.
/// `None` when the payload is too short for what its descriptor announces.
pub fn parse_vp8(payload: &[u8]) -> Option<Vp8Info> {
    let first = *payload.first()?;
    let frame_start = first & 0x10 != 0 && first & 0x07 == 0;
    let mut at = 1;
    let mut picture_id = None;
    if first & 0x80 != 0 {
        let x = *payload.get(at)?;
        at += 1;
        if x & 0x80 != 0 {
            let b = *payload.get(at)?;
            if b & 0x80 != 0 {
                let b2 = *payload.get(at + 1)?;
                picture_id = Some((u16::from(b & 0x7f) << 8) | u16::from(b2));
                at += 2;
            } else {
                picture_id = Some(u16::from(b));
                at += 1;
            }
        }
        // L: TL0PICIDX byte; T or K: TID/Y/KEYIDX byte.
        if x & 0x40 != 0 {
            at += 1;
        }
        if x & 0x30 != 0 {
            at += 1;
        }
    }
    let rest = payload.get(at..)?;
    let keyframe = frame_start
        && rest.len() >= KEYFRAME_HEADER_LEN
        && rest[0] & 0x01 == 0
        && rest[3..6] == START_CODE;
    Some(Vp8Info {
        frame_start,
        keyframe,
        picture_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut() -> Stamp {
        let mut seq = 0;
        move || {
            seq += 1;
            Stamp {
                seq: seq - 1,
                sent_unix_micros: 1_700_000_000_000_000 + seq,
            }
        }
    }

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            seq: 0x0102_0304_0506_0708,
            sent_unix_micros: 42,
        };
        let mut buf = vec![9, 9, 9];
        s.append_to(&mut buf);
        assert_eq!(buf.len(), 3 + STAMP_LEN);
        assert_eq!(Stamp::from_trailer(&buf), Some(s));
        assert_eq!(Stamp::from_trailer(&buf[1..]), Some(s));
        assert_eq!(Stamp::from_trailer(&buf[..buf.len() - 1]), None);
        assert_eq!(Stamp::from_trailer(&[0; 5]), None);
    }

    #[test]
    fn audio_payload_has_size_toc_and_stamp() {
        let s = Stamp {
            seq: 7,
            sent_unix_micros: 8,
        };
        let p = audio_payload(100, s);
        assert_eq!(p.len(), 100);
        assert_eq!(p[0], OPUS_TOC);
        assert_eq!(Stamp::from_trailer(&p), Some(s));
        // Too small a size still fits the TOC and the stamp.
        assert_eq!(audio_payload(3, s).len(), 1 + STAMP_LEN);
    }

    #[test]
    fn keyframe_is_split_with_valid_headers() {
        let mut p = Vp8Packetizer::new(1200, 640, 480);
        let packets = p.packetize(5000, true, counter());
        // 1176 frame bytes fit per packet: 5000 bytes need 5 packets of 1000.
        assert_eq!(packets.len(), 5);
        for (i, pkt) in packets.iter().enumerate() {
            assert!(pkt.payload.len() <= 1200);
            assert_eq!(pkt.payload.len(), DESCRIPTOR_LEN + 1000 + STAMP_LEN);
            assert_eq!(pkt.marker, i == 4, "marker only on the last packet");
            let info = parse_vp8(&pkt.payload).unwrap();
            assert_eq!(info.frame_start, i == 0);
            assert_eq!(info.keyframe, i == 0);
            assert_eq!(info.picture_id, Some(0));
            assert_eq!(Stamp::from_trailer(&pkt.payload).unwrap().seq, i as u64);
        }
        let first = &packets[0].payload;
        // S bit, PID 0.
        assert_eq!(first[0] & 0x17, 0x10);
        let h = &first[DESCRIPTOR_LEN..];
        assert_eq!(h[0] & 0x01, 0, "P bit 0 on a keyframe");
        assert_eq!(h[0] & 0x10, 0x10, "show_frame");
        assert_eq!(&h[3..6], &[0x9d, 0x01, 0x2a]);
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 640);
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 480);
        let partition = u32::from_le_bytes([h[0], h[1], h[2], 0]) >> 5;
        assert_eq!(partition, 5000 - 10);
    }

    #[test]
    fn interframe_is_not_a_keyframe_and_picture_id_advances() {
        let mut p = Vp8Packetizer::new(1200, 640, 480);
        p.packetize(100, true, counter());
        let packets = p.packetize(100, false, counter());
        assert_eq!(packets.len(), 1);
        assert!(packets[0].marker);
        let info = parse_vp8(&packets[0].payload).unwrap();
        assert!(info.frame_start);
        assert!(!info.keyframe);
        assert_eq!(info.picture_id, Some(1));
        assert_eq!(packets[0].payload[DESCRIPTOR_LEN] & 0x01, 1, "P bit 1");
    }

    #[test]
    fn picture_id_wraps_at_15_bits() {
        let mut p = Vp8Packetizer::new(1200, 16, 16);
        p.picture_id = 0x7fff;
        let a = p.packetize(10, false, counter());
        let b = p.packetize(10, false, counter());
        assert_eq!(parse_vp8(&a[0].payload).unwrap().picture_id, Some(0x7fff));
        assert_eq!(parse_vp8(&b[0].payload).unwrap().picture_id, Some(0));
    }

    #[test]
    fn parse_handles_other_descriptor_shapes() {
        // No X byte, S=1, keyframe header right after the first byte.
        let mut v = vec![0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 1, 0, 1, 0];
        assert!(parse_vp8(&v).unwrap().keyframe);
        // Start code damaged: not a keyframe.
        v[4] = 0;
        assert!(!parse_vp8(&v).unwrap().keyframe);
        // X with I (7-bit picture id), L and T.
        let v = [
            0x90, 0xe0, 0x05, 0x11, 0x22, 0x00, 0, 0, 0x9d, 0x01, 0x2a, 0, 0, 0, 0,
        ];
        let info = parse_vp8(&v).unwrap();
        assert_eq!(info.picture_id, Some(5));
        assert!(info.keyframe);
        // PID != 0 is never a frame start.
        assert!(!parse_vp8(&[0x11, 0, 0, 0]).unwrap().frame_start);
        // Truncated descriptors.
        assert_eq!(parse_vp8(&[]), None);
        assert_eq!(parse_vp8(&[0x80]), None);
        assert_eq!(parse_vp8(&[0x80, 0x80, 0x80]), None);
    }
}
