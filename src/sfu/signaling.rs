//! Room state changes driven by signaling: join, publish (client offers), subscribe
//! (server offers, one outstanding at a time), trickle, media state, leave.
//!
//! Every refusal is one `error` to the sender with a PROTOCOL.md code; nothing here
//! affects other participants except through the room's normal messages.

use std::time::Instant;

use hashbrown::HashMap;
use str0m::Candidate;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid};
use tracing::{debug, info, info_span};

use super::Sfu;
use super::room::{
    Leg, Negotiation, Participant, PendingOffer, PublishedTrack, Room, Side, Source, Subscription,
    TrackKey, kind_str,
};
use crate::media::admission::Admission;
use crate::media::forward::Rewriter;
use crate::media::keyframe::{KeyframeRequests, Need};
use crate::media::resend::ResendWindow;
use crate::media::rtc::{Panicked, Role, contained, pt_for};
use crate::shard::messages::{
    ConnId, ParticipantSnapshot, RoomSnapshot, ToAccept, ToShard, TrackSnapshot,
};
use crate::signaling::protocol::{
    ErrorCode, Join, MediaState, Refusal, ServerMsg, Signal, Target, error_text,
};

impl Sfu {
    pub fn handle_message(&mut self, now: Instant, msg: ToShard) {
        match msg {
            ToShard::Join {
                conn,
                request_id,
                join,
            } => {
                if let Err(refusal) = self.join(now, conn, request_id.as_deref(), *join) {
                    self.counters.join_fail += 1;
                    self.to_accept.push_back(ToAccept::JoinRefused {
                        conn,
                        text: error_text(&refusal, request_id.as_deref()),
                    });
                }
            }
            ToShard::Signal {
                conn,
                request_id,
                signal,
            } => {
                let span = self.span_of(conn);
                let _enter = span.enter();
                let handled = contained(|| self.signal(now, conn, request_id.as_deref(), *signal));
                let handled = handled.unwrap_or_else(|Panicked| {
                    self.poison(conn);
                    Err(Refusal::new(
                        ErrorCode::NegotiationFailed,
                        "the server's WebRTC stack failed on this message; closing",
                    ))
                });
                if let Err(refusal) = handled {
                    if refusal.code == ErrorCode::NegotiationFailed {
                        self.counters.negotiation_error += 1;
                    }
                    self.send(conn, error_text(&refusal, request_id.as_deref()));
                }
            }
            ToShard::Disconnect { conn } => self.remove_participant(now, conn, "socket closed"),
            ToShard::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
        self.finish_round(now);
    }

    fn send(&mut self, conn: ConnId, text: String) {
        self.to_accept.push_back(ToAccept::Send { conn, text });
    }

    /// Sends to everyone in the room but `except`.
    pub(super) fn broadcast(&mut self, session_id: &str, except: ConnId, text: &str) {
        let Some(room) = self.rooms.get(session_id) else {
            return;
        };
        for &member in &room.members {
            if member != except {
                self.to_accept.push_back(ToAccept::Send {
                    conn: member,
                    text: text.to_owned(),
                });
            }
        }
    }

    fn join(
        &mut self,
        now: Instant,
        conn: ConnId,
        request_id: Option<&str>,
        join: Join,
    ) -> Result<(), Refusal> {
        if self.peers.contains_key(&conn) {
            return Err(Refusal::new(
                ErrorCode::AlreadyJoined,
                "this socket already joined a room",
            ));
        }
        match self.rooms.get(&join.session_id) {
            Some(room) if room.members.len() >= self.limits.room_participants => {
                return Err(Refusal::new(
                    ErrorCode::RoomFull,
                    format!(
                        "room is full ({} participants)",
                        self.limits.room_participants
                    ),
                ));
            }
            None if self.rooms.len() >= self.limits.rooms => {
                return Err(Refusal::new(
                    ErrorCode::RoomFull,
                    "this server hosts no more rooms",
                ));
            }
            _ => {}
        }
        let peer_id = format!("p{:x}{}", self.shard, fastrand_id());
        // A root span, so its three fields are whole wherever it is entered.
        let span = info_span!(parent: None, "peer", shard = self.shard, room = %join.session_id, peer = %peer_id);
        let _enter = span.enter();
        let leg = |role| {
            let (rtc, ufrag) = self.factory.build(role, now);
            Leg {
                rtc,
                ufrag,
                scheduled: None,
                connected: false,
                touched: false,
                candidates: Vec::new(),
                admission: Admission::new(now),
                poisoned: false,
            }
        };
        let publisher = leg(Role::Publisher);
        let subscriber = leg(Role::Subscriber);
        self.router
            .insert(publisher.ufrag.clone(), (conn, Side::Publisher));
        self.router
            .insert(subscriber.ufrag.clone(), (conn, Side::Subscriber));
        let participant = Participant {
            peer_id: peer_id.clone(),
            user_id: join.user_id.clone(),
            session_id: join.session_id.clone(),
            state: MediaState::default(),
            publisher,
            subscriber,
            tracks: HashMap::new(),
            subscriptions: HashMap::new(),
            subscribed_mids: HashMap::new(),
            negotiation: Negotiation::default(),
            resend: ResendWindow::default(),
            span: span.clone(),
        };
        let room = self
            .rooms
            .entry(join.session_id.clone())
            .or_insert_with(|| Room {
                session_id: join.session_id.clone(),
                members: Vec::new(),
            });
        let existing = room.members.clone();
        room.members.push(conn);
        self.peers.insert(conn, participant);
        for side in [Side::Publisher, Side::Subscriber] {
            self.drain((conn, side));
        }

        self.send(
            conn,
            ServerMsg::Joined {
                peer_id: &peer_id,
                session_id: &join.session_id,
                ice_servers: &self.ice_servers,
                request_id,
            }
            .to_text(),
        );
        // Replay who is here and what they publish, then announce the newcomer.
        let mut replay = Vec::new();
        for other in &existing {
            let Some(o) = self.peers.get(other) else {
                continue;
            };
            replay.push(
                ServerMsg::PeerJoined {
                    peer_id: &o.peer_id,
                    user_id: &o.user_id,
                    state: o.state,
                }
                .to_text(),
            );
            for track in o.tracks.values() {
                replay.push(track_published(&o.peer_id, track));
            }
        }
        for text in replay {
            self.send(conn, text);
        }
        let announce = ServerMsg::PeerJoined {
            peer_id: &peer_id,
            user_id: &join.user_id,
            state: MediaState::default(),
        }
        .to_text();
        self.broadcast(&join.session_id, conn, &announce);
        info!(members = existing.len() + 1, "joined");
        self.offer_later(conn);
        Ok(())
    }

    fn signal(
        &mut self,
        now: Instant,
        conn: ConnId,
        request_id: Option<&str>,
        signal: Signal,
    ) -> Result<(), Refusal> {
        if !self.peers.contains_key(&conn) {
            return Err(Refusal::new(ErrorCode::NotJoined, "send join first"));
        }
        match signal {
            Signal::Offer { sdp } => self.publisher_offer(now, conn, request_id, &sdp),
            Signal::Answer { sdp } => self.subscriber_answer(now, conn, &sdp),
            Signal::Candidate(c) => {
                if c.candidate.trim().is_empty() {
                    return Ok(()); // end of candidates: ICE-lite needs nothing
                }
                let line = c.candidate.trim().trim_start_matches("a=");
                let candidate = Candidate::from_sdp_string(line).map_err(|e| {
                    Refusal::new(ErrorCode::InvalidField, format!("bad candidate: {e}"))
                })?;
                let side = match c.target {
                    Target::Publisher => Side::Publisher,
                    Target::Subscriber => Side::Subscriber,
                };
                if let Some(p) = self.peers.get_mut(&conn) {
                    let leg = p.leg_mut(side);
                    leg.admit_candidates([&candidate])
                        .map_err(|e| Refusal::new(ErrorCode::InvalidField, e))?;
                    leg.rtc.add_remote_candidate(candidate);
                }
                self.drain((conn, side));
                Ok(())
            }
            Signal::MediaState(patch) => {
                let Some(p) = self.peers.get_mut(&conn) else {
                    return Ok(());
                };
                p.state.apply(patch);
                let text = ServerMsg::MediaState {
                    peer_id: &p.peer_id,
                    state: p.state,
                }
                .to_text();
                let session_id = p.session_id.clone();
                self.broadcast(&session_id, conn, &text);
                Ok(())
            }
            Signal::Leave => {
                self.remove_participant(now, conn, "leave");
                self.to_accept.push_back(ToAccept::Close {
                    conn,
                    code: 1000,
                    reason: "left",
                });
                Ok(())
            }
        }
    }

    fn publisher_offer(
        &mut self,
        now: Instant,
        conn: ConnId,
        request_id: Option<&str>,
        sdp: &str,
    ) -> Result<(), Refusal> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| {
            Refusal::new(
                ErrorCode::NegotiationFailed,
                format!("unreadable offer: {}", sdp_error(&e)),
            )
        })?;
        // Tracks are the sending m-lines (a live port, a sending direction). str0m
        // keeps every m-line an offer ever had, stopped and inactive ones too, so
        // those are bounded as well.
        let media = || offer.media_lines.iter().filter(|m| m.typ.is_media());
        let live = media().filter(|m| !m.disabled && m.direction().is_sending());
        if live.count() > self.limits.tracks {
            return Err(Refusal::new(
                ErrorCode::TooManyTracks,
                format!("at most {} tracks per participant", self.limits.tracks),
            ));
        }
        let most = SECTIONS_PER_TRACK * self.limits.tracks;
        if media().count() > most {
            return Err(Refusal::new(
                ErrorCode::TooManyTracks,
                format!("at most {most} m-lines per offer, stopped and inactive ones included"),
            ));
        }
        let Some(p) = self.peers.get_mut(&conn) else {
            return Ok(());
        };
        p.publisher
            .admit_candidates(&sdp_candidates(sdp))
            .map_err(|e| Refusal::new(ErrorCode::InvalidField, e))?;
        let answer = p.publisher.rtc.sdp_api().accept_offer(offer).map_err(|e| {
            Refusal::new(ErrorCode::NegotiationFailed, format!("offer refused: {e}"))
        })?;
        // An offer with new ICE credentials restarts ICE (a network change, say), and
        // str0m answers with a new local ufrag: the client's checks will carry that.
        let ufrag = p.publisher.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != p.publisher.ufrag {
            let old = std::mem::replace(&mut p.publisher.ufrag, ufrag.clone());
            self.router.rename(&old, ufrag);
        }
        let answer = answer.to_sdp_string();
        debug!(sdp = %answer, "publisher answer");
        self.send(
            conn,
            ServerMsg::Answer {
                sdp: &answer,
                request_id,
            }
            .to_text(),
        );
        // MediaAdded / MediaChanged events publish and unpublish tracks.
        self.drain((conn, Side::Publisher));
        self.finish_round(now);
        Ok(())
    }

    /// A publisher's new m-line: announce it and offer it to everyone else.
    pub(super) fn track_added(&mut self, conn: ConnId, mid: Mid, kind: MediaKind) {
        let Some(p) = self.peers.get_mut(&conn) else {
            return;
        };
        if p.tracks.contains_key(&mid) {
            return;
        }
        let Some(media) = p.publisher.rtc.media(mid) else {
            return;
        };
        if !media.direction().is_receiving() {
            return;
        }
        let track_id = msid_token(media.track_id());
        let track_id = match track_id.as_str() {
            "" | "-" => mid.to_string(),
            _ => track_id,
        };
        let hinted_screen = [media.track_id(), media.stream_id()]
            .iter()
            .any(|id| id.to_ascii_lowercase().contains("screen"));
        let has_camera = p.tracks.values().any(|t| t.source == Source::Camera);
        let source = match kind {
            MediaKind::Audio => Source::Mic,
            MediaKind::Video if hinted_screen || has_camera => Source::Screen,
            MediaKind::Video => Source::Camera,
        };
        let track = PublishedTrack {
            track_id,
            kind,
            source,
            fanout: Vec::new(),
            last_payload: None,
            nacks_paused: None,
            keyframe_requests: KeyframeRequests::default(),
            speaking: Default::default(),
        };
        let text = track_published(&p.peer_id, &track);
        p.span
            .in_scope(|| info!(track = %track.track_id, kind = kind_str(kind), "track published"));
        p.tracks.insert(mid, track);
        let session_id = p.session_id.clone();
        self.counters.publish_track += 1;
        self.broadcast(&session_id, conn, &text);
        self.renegotiate_room(&session_id, conn);
    }

    pub(super) fn track_removed(&mut self, _now: Instant, (conn, mid): TrackKey) {
        let Some(p) = self.peers.get_mut(&conn) else {
            return;
        };
        let Some(track) = p.tracks.remove(&mid) else {
            return;
        };
        let text = ServerMsg::TrackUnpublished {
            peer_id: &p.peer_id,
            track_id: &track.track_id,
        }
        .to_text();
        let session_id = p.session_id.clone();
        for subscriber in &track.fanout {
            if let Some(s) = self.peers.get_mut(subscriber)
                && let Some(sub) = s.subscriptions.remove(&(conn, mid))
            {
                s.subscribed_mids.remove(&sub.mid);
                s.negotiation.retired.push(sub.mid);
            }
        }
        self.broadcast(&session_id, conn, &text);
        self.renegotiate_room(&session_id, conn);
    }

    fn renegotiate_room(&mut self, session_id: &str, except: ConnId) {
        let members = self
            .rooms
            .get(session_id)
            .map(|r| r.members.clone())
            .unwrap_or_default();
        for member in members {
            if member != except {
                self.offer_later(member);
            }
        }
    }

    /// Marks a subscriber as needing a new offer. Offers are made at the end of the
    /// round, so an offer that publishes audio and video (or a participant leaving
    /// with both) costs every other participant one renegotiation, not two.
    fn offer_later(&mut self, conn: ConnId) {
        if let Some(p) = self.peers.get_mut(&conn) {
            p.negotiation.dirty = true;
            self.offers_due.push(conn);
        }
    }

    /// Offers the subscriber every track it lacks and retires the ones gone, unless an
    /// offer is already outstanding (then `dirty` stays set and the answer brings us
    /// back here).
    pub(super) fn renegotiate(&mut self, conn: ConnId) {
        let Some(p) = self.peers.get(&conn) else {
            return;
        };
        if p.negotiation.pending.is_some() || !p.negotiation.dirty {
            return;
        }
        let Some(room) = self.rooms.get(&p.session_id) else {
            return;
        };
        // What the room publishes that this participant does not receive yet.
        let mut wanted = Vec::new();
        for &other in &room.members {
            if other == conn {
                continue;
            }
            let Some(o) = self.peers.get(&other) else {
                continue;
            };
            for (mid, track) in &o.tracks {
                if !p.subscriptions.contains_key(&(other, *mid)) {
                    wanted.push((
                        (other, *mid),
                        track.kind,
                        o.peer_id.clone(),
                        track.track_id.clone(),
                    ));
                }
            }
        }
        let Some(p) = self.peers.get_mut(&conn) else {
            return;
        };
        p.negotiation.dirty = false;
        let retired = std::mem::take(&mut p.negotiation.retired);
        if wanted.is_empty() && retired.is_empty() {
            return;
        }
        // A retired track's send stream goes at once: str0m would otherwise keep it
        // (and walk it on every tick) for as long as the connection lives.
        let mut direct = p.subscriber.rtc.direct_api();
        for &mid in &retired {
            if let Some(ssrc) = direct.stream_tx_by_mid(mid, None).map(|tx| tx.ssrc()) {
                direct.remove_stream_tx(ssrc);
            }
        }
        let mut api = p.subscriber.rtc.sdp_api();
        let mut added = Vec::new();
        for (key, kind, peer_id, track_id) in wanted {
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(peer_id),
                Some(track_id),
                None,
            );
            added.push((key, mid));
        }
        // Inactive, not stopped: a session whose m-lines were all stopped would have
        // an empty BUNDLE group, which browsers refuse (and str0m reuses no slot).
        for mid in retired {
            api.set_direction(mid, Direction::Inactive);
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        let sdp = offer.to_sdp_string();
        p.negotiation.pending = Some(PendingOffer {
            offer: pending,
            added,
        });
        self.send(conn, ServerMsg::Offer { sdp: &sdp }.to_text());
        self.drain((conn, Side::Subscriber));
    }

    fn subscriber_answer(&mut self, now: Instant, conn: ConnId, sdp: &str) -> Result<(), Refusal> {
        let Some(p) = self.peers.get_mut(&conn) else {
            return Ok(());
        };
        p.subscriber
            .admit_candidates(&sdp_candidates(sdp))
            .map_err(|e| Refusal::new(ErrorCode::InvalidField, e))?;
        let Some(pending) = p.negotiation.pending.take() else {
            return Err(Refusal::new(
                ErrorCode::NegotiationFailed,
                "no subscriber offer is outstanding",
            ));
        };
        let answer = SdpAnswer::from_sdp_string(sdp);
        let accepted = answer.map_err(|e| sdp_error(&e)).and_then(|a| {
            p.subscriber
                .rtc
                .sdp_api()
                .accept_answer(pending.offer, a)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = accepted {
            // The offer is spent either way; offer again on the next change.
            p.negotiation.dirty = true;
            return Err(Refusal::new(
                ErrorCode::NegotiationFailed,
                format!("answer refused: {e}"),
            ));
        }
        let connected = p.subscriber.connected;
        for (track_key, mid) in pending.added {
            self.subscribe(conn, track_key, mid);
            // Before the connection is up a keyframe would reach nobody; `Connected`
            // asks for them then.
            if connected {
                self.request_keyframe(now, track_key, Need::Start);
            }
        }
        self.drain((conn, Side::Subscriber));
        // Changes that arrived while the offer was out are offered now.
        self.offers_due.push(conn);
        Ok(())
    }

    /// Starts forwarding `track_key` to `conn` on subscriber mid `mid`.
    fn subscribe(&mut self, conn: ConnId, track_key: TrackKey, mid: Mid) {
        let (publisher, pub_mid) = track_key;
        if conn == publisher {
            return;
        }
        let [Some(s), Some(p)] = self.peers.get_disjoint_mut([&conn, &publisher]) else {
            return; // the publisher left while the offer was out
        };
        let Some(track) = p.tracks.get_mut(&pub_mid) else {
            s.negotiation.retired.push(mid);
            s.negotiation.dirty = true;
            return;
        };
        let pt_pairs: Vec<(u8, u8)> = p
            .publisher
            .rtc
            .codec_config()
            .params()
            .iter()
            .filter_map(|params| {
                let to = pt_for(&s.subscriber.rtc, params.spec().codec)?;
                Some((*params.pt(), *to))
            })
            .collect();
        let video = track.kind == MediaKind::Video;
        let mut api = s.subscriber.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return; // str0m made no stream for the answered mid: nothing to write to
        };
        s.resend.apply(tx);
        let ssrc = tx.ssrc();
        s.subscriptions.insert(
            track_key,
            Subscription {
                mid,
                ssrc,
                rewriter: Rewriter::new(pt_pairs, video),
            },
        );
        s.subscribed_mids.insert(mid, track_key);
        if !track.fanout.contains(&conn) {
            track.fanout.push(conn);
        }
    }

    /// Removes a participant and everything it published; tells the room.
    pub(super) fn remove_participant(&mut self, now: Instant, conn: ConnId, why: &str) {
        let Some(p) = self.peers.get(&conn) else {
            return;
        };
        let mids: Vec<Mid> = p.tracks.keys().copied().collect();
        for mid in mids {
            self.track_removed(now, (conn, mid));
        }
        let Some(mut p) = self.peers.remove(&conn) else {
            return;
        };
        p.span.in_scope(|| info!(why, "participant left"));
        self.router
            .remove(&p.publisher.ufrag, (conn, Side::Publisher));
        self.router
            .remove(&p.subscriber.ufrag, (conn, Side::Subscriber));
        p.publisher.rtc.disconnect();
        p.subscriber.rtc.disconnect();
        // Stop forwarding to it.
        for (publisher, mid) in p.subscriptions.keys() {
            if let Some(track) = self
                .peers
                .get_mut(publisher)
                .and_then(|o| o.tracks.get_mut(mid))
            {
                track.fanout.retain(|c| *c != conn);
            }
        }
        let left = ServerMsg::PeerLeft {
            peer_id: &p.peer_id,
        }
        .to_text();
        if let Some(room) = self.rooms.get_mut(&p.session_id) {
            room.members.retain(|c| *c != conn);
            if room.members.is_empty() {
                self.rooms.remove(&p.session_id);
                return;
            }
        }
        self.broadcast(&p.session_id, conn, &left);
    }

    fn snapshot(&self) -> Vec<RoomSnapshot> {
        self.rooms
            .values()
            .map(|room| RoomSnapshot {
                session_id: room.session_id.clone(),
                shard: self.shard,
                participants: room
                    .members
                    .iter()
                    .filter_map(|c| self.peers.get(c))
                    .map(|p| ParticipantSnapshot {
                        peer_id: p.peer_id.clone(),
                        user_id: p.user_id.clone(),
                        tracks: p
                            .tracks
                            .values()
                            .map(|t| TrackSnapshot {
                                track_id: t.track_id.clone(),
                                kind: kind_str(t.kind),
                                source: t.source.as_str(),
                            })
                            .collect(),
                        publisher_connected: p.publisher.connected,
                        subscriber_connected: p.subscriber.connected,
                        rtt_ms: p.resend.rtt().map(|rtt| rtt.as_secs_f64() * 1e3),
                        resend_window_ms: p.resend.window().as_millis() as u64,
                    })
                    .collect(),
            })
            .collect()
    }
}

fn track_published(peer_id: &str, track: &PublishedTrack) -> String {
    ServerMsg::TrackPublished {
        peer_id,
        track_id: &track.track_id,
        kind: kind_str(track.kind),
        source: track.source.as_str(),
    }
    .to_text()
}

/// An RFC 8830 msid-id (at most 64 token chars), filtered the way str0m filters the
/// ids it writes into subscriber offers, so `track_published` and the msid agree and
/// a client cannot bloat either.
fn msid_token(id: &str) -> String {
    let token = |c: &char| matches!(*c as u32, 0x21 | 0x23..=0x27 | 0x2a..=0x2b | 0x2d..=0x2e | 0x30..=0x39 | 0x41..=0x5a | 0x5e..=0x7d);
    id.chars().filter(token).take(64).collect()
}

/// m-lines a publisher offer may hold per allowed track: room for tracks that were
/// removed (inactive) or stopped and not recycled.
const SECTIONS_PER_TRACK: usize = 4;

/// An SDP's `a=candidate` lines that str0m can read (and so keeps).
fn sdp_candidates(sdp: &str) -> Vec<Candidate> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a="))
        .filter(|l| l.starts_with("candidate:"))
        .filter_map(|l| Candidate::from_sdp_string(l).ok())
        .collect()
}

/// The parser's message without its memory addresses, on one line.
fn sdp_error(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .filter(|l| !l.contains("PointerOffset") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A peer id suffix: random, URL- and msid-safe.
fn fastrand_id() -> String {
    (0..12).map(|_| fastrand::alphanumeric()).collect()
}

#[cfg(test)]
mod tests {
    use super::msid_token;

    #[test]
    fn msid_tokens_are_bounded_and_clean() {
        assert_eq!(msid_token("cam-1{x}"), "cam-1{x}");
        assert_eq!(msid_token("a b\"c:d/e~"), "abcde");
        assert_eq!(msid_token(&"x".repeat(500)).len(), 64);
    }
}
