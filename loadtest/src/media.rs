//! Synthetic media sources: when each audio packet and video frame is due, how big
//! it is, and its RTP sequence number and timestamp. Sans-IO: time comes in as
//! arguments, RTP payloads come out; the peer writes them into str0m.

use std::time::{Duration, Instant};

use crate::payload::{Stamp, Vp8Packetizer, audio_payload};

/// Audio packets are 20 ms of Opus: 50 packets a second.
pub const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const AUDIO_CLOCK: u64 = 48_000;
const VIDEO_CLOCK: u64 = 90_000;
/// A keyframe is this many times an average frame, roughly what real encoders do.
const KEYFRAME_SIZE_FACTOR: usize = 4;
/// How many overdue packets or frames a source emits at once after a stall before it
/// skips ahead; bursts beyond that would only measure our own scheduling lag.
const MAX_CATCH_UP: u32 = 3;

/// Shape of the synthetic media a participant publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaConfig {
    /// Target video bitrate in kbit/s, keyframes included.
    pub video_kbps: u32,
    /// Video frames per second.
    pub video_fps: u32,
    /// Time between periodic keyframes (keyframe requests add more).
    pub keyframe_interval: Duration,
    /// Dimensions written into keyframe headers.
    pub video_width: u16,
    /// Dimensions written into keyframe headers.
    pub video_height: u16,
    /// RTP payload size of an audio packet.
    pub audio_payload_bytes: usize,
    /// Largest video RTP payload.
    pub max_video_payload: usize,
    /// RFC 6464 audio level sent with every audio packet, in str0m's convention:
    /// -127 (silence) to 0 (loudest) dBov. Servers detect speaking from this.
    pub audio_level: i8,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            video_kbps: 300,
            video_fps: 30,
            keyframe_interval: Duration::from_secs(2),
            video_width: 640,
            video_height: 360,
            audio_payload_bytes: 100,
            max_video_payload: 1200,
            audio_level: -127,
        }
    }
}

/// Fixed-interval schedule that resynchronises after a stall.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: None,
        }
    }

    /// Starts the schedule with the first tick due at `now`.
    pub(crate) fn start(&mut self, now: Instant) {
        self.next = Some(now);
    }

    pub(crate) fn stop(&mut self) {
        self.next = None;
    }

    /// Due time of the next tick, `None` when stopped.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Consumes one tick if it is due.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let Some(mut next) = self.next else {
            return false;
        };
        if next > now {
            return false;
        }
        // Far behind after a stall: keep at most MAX_CATCH_UP ticks of backlog.
        let backlog = self.interval * (MAX_CATCH_UP - 1);
        if now.duration_since(next) > backlog {
            next = now - backlog;
        }
        self.next = Some(next + self.interval);
        true
    }
}

/// One RTP packet's worth of media, ready for `RtpWrite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MediaPacket {
    pub(crate) payload: Vec<u8>,
    pub(crate) marker: bool,
    /// Extended RTP sequence number.
    pub(crate) rtp_seq: u64,
    pub(crate) rtp_time: u32,
}

/// State shared by both kinds: stamp counter, RTP numbering, clock.
#[derive(Debug, Clone)]
struct Numbering {
    stamp_seq: u64,
    rtp_seq: u64,
    rtp_time_base: u32,
    clock: u64,
    started: Option<Instant>,
}

impl Numbering {
    /// `seed` varies the initial RTP sequence and time per stream, as RFC 3550 asks.
    fn new(seed: u32, clock: u64) -> Self {
        Self {
            stamp_seq: 0,
            // Below 2^15 so the first extended sequence needs no out-of-band ROC.
            rtp_seq: u64::from(seed & 0x7fff),
            rtp_time_base: seed.rotate_left(16),
            clock,
            started: None,
        }
    }

    fn rtp_time(&mut self, now: Instant) -> u32 {
        let started = *self.started.get_or_insert(now);
        let ticks = now.duration_since(started).as_micros() as u64 * self.clock / 1_000_000;
        self.rtp_time_base.wrapping_add(ticks as u32)
    }

    fn stamp(&mut self, sent_unix_micros: u64) -> Stamp {
        let seq = self.stamp_seq;
        self.stamp_seq += 1;
        Stamp {
            seq,
            sent_unix_micros,
        }
    }

    fn next_rtp_seq(&mut self) -> u64 {
        let seq = self.rtp_seq;
        self.rtp_seq += 1;
        seq
    }
}

/// Opus-sized audio at 50 packets a second.
#[derive(Debug, Clone)]
pub(crate) struct AudioSource {
    pub(crate) pacer: Pacer,
    numbering: Numbering,
}

impl AudioSource {
    pub(crate) fn new(seed: u32) -> Self {
        Self {
            pacer: Pacer::new(AUDIO_INTERVAL),
            numbering: Numbering::new(seed, AUDIO_CLOCK),
        }
    }

    /// The next packet if one is due.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        unix_micros: u64,
        config: &MediaConfig,
    ) -> Option<MediaPacket> {
        if !self.pacer.tick(now) {
            return None;
        }
        let stamp = self.numbering.stamp(unix_micros);
        Some(MediaPacket {
            payload: audio_payload(config.audio_payload_bytes, stamp),
            marker: false,
            rtp_seq: self.numbering.next_rtp_seq(),
            rtp_time: self.numbering.rtp_time(now),
        })
    }
}

/// VP8 video at a target bitrate with periodic and on-demand keyframes.
#[derive(Debug, Clone)]
pub(crate) struct VideoSource {
    pub(crate) pacer: Pacer,
    numbering: Numbering,
    packetizer: Vp8Packetizer,
    last_keyframe: Option<Instant>,
    force_keyframe: bool,
}

impl VideoSource {
    pub(crate) fn new(seed: u32, config: &MediaConfig) -> Self {
        let fps = config.video_fps.max(1);
        Self {
            pacer: Pacer::new(Duration::from_secs(1) / fps),
            numbering: Numbering::new(seed, VIDEO_CLOCK),
            packetizer: Vp8Packetizer::new(
                config.max_video_payload,
                config.video_width,
                config.video_height,
            ),
            last_keyframe: None,
            force_keyframe: true,
        }
    }

    /// Makes the next frame a keyframe and sends it right away (a PLI/FIR arrived).
    pub(crate) fn request_keyframe(&mut self, now: Instant) {
        self.force_keyframe = true;
        if self.pacer.next().is_some() {
            self.pacer.start(now);
        }
    }

    /// The packets of the next frame if one is due; empty otherwise.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        unix_micros: u64,
        config: &MediaConfig,
    ) -> Vec<MediaPacket> {
        if !self.pacer.tick(now) {
            return Vec::new();
        }
        let keyframe = self.force_keyframe
            || self
                .last_keyframe
                .is_none_or(|t| now.duration_since(t) >= config.keyframe_interval);
        if keyframe {
            self.force_keyframe = false;
            self.last_keyframe = Some(now);
        }
        let rtp_time = self.numbering.rtp_time(now);
        let numbering = &mut self.numbering;
        let frames = self
            .packetizer
            .packetize(frame_len(config, keyframe), keyframe, || {
                numbering.stamp(unix_micros)
            });
        frames
            .into_iter()
            .map(|p| MediaPacket {
                payload: p.payload,
                marker: p.marker,
                rtp_seq: self.numbering.next_rtp_seq(),
                rtp_time,
            })
            .collect()
    }
}

/// Frame size in bytes such that periodic keyframes plus delta frames average out to
/// the target bitrate.
fn frame_len(config: &MediaConfig, keyframe: bool) -> usize {
    let fps = config.video_fps.max(1) as usize;
    let average = (config.video_kbps as usize * 1000 / 8 / fps).max(1);
    let per_interval = (config.keyframe_interval.as_secs_f64() * fps as f64) as usize;
    if per_interval <= KEYFRAME_SIZE_FACTOR {
        return average;
    }
    if keyframe {
        return average * KEYFRAME_SIZE_FACTOR;
    }
    (average * (per_interval - KEYFRAME_SIZE_FACTOR) / (per_interval - 1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{STAMP_LEN, parse_vp8};

    #[test]
    fn pacer_ticks_on_schedule_and_skips_after_a_stall() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(20));
        assert!(!p.tick(t0), "stopped pacer never ticks");
        p.start(t0);
        assert!(p.tick(t0));
        assert!(!p.tick(t0 + ms(19)));
        assert!(p.tick(t0 + ms(20)));
        // Stalled for 200 ms: a bounded burst, then the schedule moves past now.
        let late = t0 + ms(240);
        let burst = (0..20).filter(|_| p.tick(late)).count();
        assert_eq!(burst, MAX_CATCH_UP as usize);
        assert_eq!(p.next(), Some(late + ms(20)));
        p.stop();
        assert_eq!(p.next(), None);
    }

    #[test]
    fn audio_packets_are_sized_numbered_and_timed() {
        let t0 = Instant::now();
        let config = MediaConfig::default();
        let mut a = AudioSource::new(0x0001_0005);
        a.pacer.start(t0);
        let p0 = a.poll(t0, 1_000, &config).unwrap();
        assert!(a.poll(t0, 1_000, &config).is_none());
        let p1 = a.poll(t0 + AUDIO_INTERVAL, 21_000, &config).unwrap();
        assert_eq!(p0.payload.len(), 100);
        assert_eq!(p1.rtp_seq, p0.rtp_seq + 1);
        assert_eq!(p1.rtp_time.wrapping_sub(p0.rtp_time), 960);
        let s1 = Stamp::from_trailer(&p1.payload).unwrap();
        assert_eq!((s1.seq, s1.sent_unix_micros), (1, 21_000));
    }

    #[test]
    fn video_hits_bitrate_and_keyframe_cadence() {
        let config = MediaConfig::default();
        let t0 = Instant::now();
        let mut v = VideoSource::new(7, &config);
        v.pacer.start(t0);
        let frame = Duration::from_secs(1) / 30;
        let (mut bytes, mut keyframes, mut frames) = (0, 0, 0);
        let mut last_seq = None;
        for i in 0..300 {
            let now = t0 + frame * i;
            let packets = v.poll(now, 0, &config);
            assert!(!packets.is_empty(), "frame {i} due");
            frames += 1;
            let info = parse_vp8(&packets[0].payload).unwrap();
            if info.keyframe {
                keyframes += 1;
            }
            assert!(packets.last().unwrap().marker);
            for p in &packets {
                assert!(p.payload.len() <= 1200);
                assert_eq!(p.rtp_time, packets[0].rtp_time);
                if let Some(s) = last_seq {
                    assert_eq!(p.rtp_seq, s + 1);
                }
                last_seq = Some(p.rtp_seq);
                bytes += p.payload.len() - STAMP_LEN - 4;
            }
        }
        assert_eq!(frames, 300);
        // 10 s at a keyframe every 2 s.
        assert_eq!(keyframes, 5);
        let kbps = bytes * 8 / 10 / 1000;
        assert!((290..=310).contains(&kbps), "{kbps} kbps");
    }

    #[test]
    fn keyframe_request_sends_one_now() {
        let config = MediaConfig::default();
        let t0 = Instant::now();
        let mut v = VideoSource::new(7, &config);
        v.pacer.start(t0);
        assert!(
            parse_vp8(&v.poll(t0, 0, &config)[0].payload)
                .unwrap()
                .keyframe
        );
        let soon = t0 + Duration::from_millis(5);
        assert!(v.poll(soon, 0, &config).is_empty());
        v.request_keyframe(soon);
        let packets = v.poll(soon, 0, &config);
        assert!(parse_vp8(&packets[0].payload).unwrap().keyframe);
    }
}
