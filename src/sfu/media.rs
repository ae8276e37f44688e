//! The packet path, socket to socket:
//!
//! 1. `handle_datagrams`: each datagram of a receive batch is routed in O(1)
//!    (`media::router`) to its `Rtc`, which decrypts it (unless the client sent more
//!    than it may, `media::admission`); the `Rtc` is drained and any RTP packets it
//!    produced queue up in `forward_queue`.
//! 2. `forward_all`: each queued packet fans out to the track's subscribers. Per
//!    subscriber, `media::forward::Rewriter` maps the payload type and rebases the
//!    sequence number, and the payload (an `Arc<[u8]>`) is shared, not copied.
//! 3. `Sfu::finish_round` ticks and drains every `Rtc` written to, once per batch;
//!    str0m encrypts, and the runtime sends `transmits` with one `sendmmsg`.
//!
//! Keyframe requests (PLI) travel the other way, one outstanding per published track
//! (`media::keyframe`).
//! Audio levels feed voice activity detection on the way through. While the shard's
//! socket drops datagrams (`media::overload`), publishers get no NACKs. Subscribers'
//! NACKs are answered by str0m from a buffer per video stream, kept as long as the
//! subscriber's round trip needs (`media::resend`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::media::{KeyframeRequestKind, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use tracing::{debug, warn};

use super::Sfu;
use super::room::{LegError, Payload, Side, TrackKey};
use crate::media::admission::Refusal;
use crate::media::forward::is_keyframe_start;
use crate::media::keyframe::Need;
use crate::media::rtc::payload_of;
use crate::shard::messages::ConnId;
use crate::signaling::protocol::ServerMsg;

impl Sfu {
    /// Step 1: one receive batch.
    pub fn handle_datagrams<'a>(
        &mut self,
        now: Instant,
        batch: impl Iterator<Item = (SocketAddr, &'a [u8])>,
    ) {
        for (source, data) in batch {
            self.counters.udp_rx_packets += 1;
            let Some(key) = self.router.route(source, data) else {
                self.counters.unrouted_packets += 1;
                continue;
            };
            let Some(destination) = self.destination_for(source) else {
                continue;
            };
            let Ok(receive) = Receive::new(Protocol::Udp, source, destination, data) else {
                continue;
            };
            let Some(p) = self.peers.get_mut(&key.0) else {
                continue;
            };
            let leg = p.leg_mut(key.1);
            if let Err(refusal) = leg.admission.admit(now, data) {
                match refusal {
                    Refusal::Ssrc => self.counters.refused_ssrc_packets += 1,
                    Refusal::Rate => self.counters.refused_rate_packets += 1,
                }
                if leg.admission.refusals() == 1 {
                    p.span
                        .in_scope(|| warn!("dropping a client's datagrams: {refusal}"));
                }
                continue;
            }
            match leg.receive(now, receive) {
                Ok(()) => {}
                Err(LegError::Rtc(e)) => {
                    p.span
                        .in_scope(|| debug!(error = %e, "rtc refused a datagram"));
                    continue;
                }
                Err(e) => {
                    self.leg_failed(key.0, &e);
                    continue;
                }
            }
            self.drain(key);
        }
        self.finish_round(now);
    }

    fn destination_for(&self, source: SocketAddr) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|a| a.is_ipv4() == source.is_ipv4())
            .copied()
    }

    /// Step 2: fan out everything the publishers produced in this round.
    pub(super) fn forward_all(&mut self, now: Instant) {
        let mut queue = std::mem::take(&mut self.forward_queue);
        for (publisher, packet) in queue.drain(..) {
            self.forward(now, publisher, &packet);
        }
        // Keep the allocation: the queue is reused every batch.
        self.forward_queue = queue;
    }

    fn forward(&mut self, now: Instant, publisher: ConnId, packet: &str0m::rtp::RtpPacket) {
        let overloaded = self.overload.active();
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        let pt = *packet.header.payload_type;
        let ssrc = packet.header.ssrc;
        let Some(mid) = p
            .publisher
            .rtc
            .direct_api()
            .stream_rx(&ssrc)
            .map(|s| s.mid())
        else {
            return;
        };
        let Some(track) = p.tracks.get_mut(&mid) else {
            return;
        };
        let payload = match track.last_payload {
            Some(payload) if payload.pt == pt => payload,
            _ => {
                let Some((codec, resends)) = payload_of(&p.publisher.rtc, pt.into()) else {
                    return;
                };
                let payload = Payload { pt, codec, resends };
                track.last_payload = Some(payload);
                payload
            }
        };
        // Overloaded, the shard's own socket loses packets: resends would queue behind
        // the same backlog (see `media::overload`).
        let pause_nacks = overloaded || !payload.resends;
        if track.nacks_paused != Some((ssrc, pause_nacks)) {
            if let Some(rx) = p.publisher.rtc.direct_api().stream_rx(&ssrc) {
                rx.suppress_nack(pause_nacks);
            }
            track.nacks_paused = Some((ssrc, pause_nacks));
        }
        let codec = payload.codec;
        let video = track.kind == MediaKind::Video;
        let keyframe = video && is_keyframe_start(codec, &packet.payload);
        if keyframe {
            track.keyframe_requests.keyframe();
        }
        let speaking = packet
            .header
            .ext_vals
            .audio_level
            .and_then(|level| track.speaking.update(now, level.unsigned_abs()))
            .map(|speaking| (speaking, track.speaking.level()));
        // The fan-out list is borrowed out of the track while subscribers are written.
        let fanout = std::mem::take(&mut track.fanout);
        let track_key: TrackKey = (publisher, mid);
        let ext_vals = ExtensionValues {
            audio_level: packet.header.ext_vals.audio_level,
            voice_activity: packet.header.ext_vals.voice_activity,
            video_orientation: packet.header.ext_vals.video_orientation,
            ..Default::default()
        };
        let mut wants_keyframe = false;
        for &conn in &fanout {
            let Some(s) = self.peers.get_mut(&conn) else {
                continue;
            };
            // Until DTLS is up str0m would queue what is written, unsent: a late
            // connection would start with a stale burst, a dead one hold it forever.
            if !s.subscriber.connected || s.subscriber.poisoned {
                continue;
            }
            let Some(sub) = s.subscriptions.get_mut(&track_key) else {
                continue;
            };
            let rewritten =
                sub.rewriter
                    .rewrite(pt, *packet.seq_no, packet.header.timestamp, keyframe);
            let Some(out) = rewritten else {
                wants_keyframe |= sub.rewriter.waiting_for_keyframe();
                continue;
            };
            let mut api = s.subscriber.rtc.direct_api();
            let Some(tx) = api.stream_tx(&sub.ssrc) else {
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(
                    out.pt.into(),
                    out.seq.into(),
                    out.timestamp,
                    packet.timestamp,
                    packet.payload.clone(),
                )
                .marker(packet.header.marker)
                .ext_vals(ext_vals.clone())
                // Only video is resent (browsers do not NACK Opus): audio stays out
                // of the resend buffer.
                .nackable(video),
            );
            self.counters.forwarded_packets += 1;
            self.counters.forwarded_bytes += packet.payload.len() as u64;
            self.touch((conn, Side::Subscriber));
        }
        if let Some(track) = self
            .peers
            .get_mut(&publisher)
            .and_then(|p| p.tracks.get_mut(&mid))
        {
            track.fanout = fanout;
        }
        if wants_keyframe {
            self.request_keyframe(now, track_key, Need::Start);
        }
        if let Some((speaking, level)) = speaking {
            self.announce_speaking(publisher, speaking, level);
        }
    }

    /// Tells the rest of the room that a participant started or stopped speaking.
    fn announce_speaking(&mut self, conn: ConnId, speaking: bool, level: u8) {
        let Some(p) = self.peers.get(&conn) else {
            return;
        };
        let text = ServerMsg::Speaking {
            peer_id: &p.peer_id,
            speaking,
            level,
        }
        .to_text();
        let session_id = p.session_id.clone();
        self.broadcast(&session_id, conn, &text);
    }

    /// Asks a publisher for a keyframe, unless one already asked for will serve
    /// (`media::keyframe`).
    pub(super) fn request_keyframe(
        &mut self,
        now: Instant,
        (publisher, mid): TrackKey,
        need: Need,
    ) {
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        let Some(track) = p.tracks.get_mut(&mid) else {
            return;
        };
        // The policy first: a subscriber waiting for a keyframe asks on every packet.
        if track.kind != MediaKind::Video || !track.keyframe_requests.request(now, need) {
            return;
        }
        let mut api = p.publisher.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(mid, None) else {
            // Nothing received yet: the first keyframe comes by itself, and answers
            // the request counted above.
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        self.counters.keyframe_requests += 1;
        self.touch((publisher, Side::Publisher));
    }

    /// A subscriber (re)connected: every video track it receives needs a keyframe.
    pub(super) fn request_keyframes_for(&mut self, now: Instant, subscriber: ConnId) {
        let Some(p) = self.peers.get(&subscriber) else {
            return;
        };
        let tracks: Vec<TrackKey> = p.subscriptions.keys().copied().collect();
        for track in tracks {
            self.request_keyframe(now, track, Need::Start);
        }
    }

    /// A receiver report gave the subscriber connection's round trip: count it for
    /// `/metrics`, and refit the window its video streams keep for NACKs
    /// (`media::resend`).
    pub(super) fn subscriber_rtt(&mut self, subscriber: ConnId, rtt: Duration) {
        self.counters.subscriber_rtt.observe(rtt);
        let Some(p) = self.peers.get_mut(&subscriber) else {
            return;
        };
        let Some(window) = p.resend.observe(rtt) else {
            return;
        };
        p.span
            .in_scope(|| debug!(?rtt, ?window, "resend window refitted"));
        let mut api = p.subscriber.rtc.direct_api();
        for sub in p.subscriptions.values() {
            if let Some(tx) = api.stream_tx(&sub.ssrc) {
                p.resend.apply(tx);
            }
        }
    }
}
