//! A sans-IO participant for Janus's VideoRoom plugin, so the harness can put the
//! same load on Janus as on corelay and measure it the same way (`--target janus`).
//!
//! [`JanusPeer`] wraps a corelay [`Peer`] and translates signaling. The `Peer` keeps
//! doing all the media work (its two str0m connections, stamped synthetic audio and
//! VP8, receive statistics); this layer speaks Janus's JSON API on the signaling
//! channel and hands the `Peer` the corelay messages it expects (`joined`, `answer`,
//! `offer`, `candidate`, `peer_joined`, `track_published`, ...). What is measured is
//! therefore identical, by construction, for both servers. The surface is the
//! `Peer`'s, so a driver runs either.
//!
//! The Janus session: `create`; `attach` two VideoRoom handles (publisher and
//! subscriber); `join` the room as a publisher (on 426, `create` the room and join
//! again); `publish` the `Peer`'s offer. Every other publisher is subscribed to on
//! the one multistream subscriber handle (`feeds.rs` has the rules, including the
//! retries on 428). `keepalive` every 25 s. Leaving is `leave`, `detach` and
//! `destroy`, each once Janus confirmed the previous one.
//! Janus's trickled candidates go to the `Peer`, whose own are all in its SDP.
//!
//! VideoRoom rooms are numbers: [`room_number`] hashes the harness's room name. The
//! signaling WebSocket must ask for Janus's subprotocol: see [`websocket_request`].

mod api;
mod feeds;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::http::HeaderValue;
use tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;

use crate::peer::{
    ClientStats, CloseInfo, Leg, Milestones, Peer, PeerConfig, RxTotals, SentStats, SessionState,
    TimeBase, Transmit,
};
use crate::stats::Histogram;
use api::Incoming;
use feeds::Feeds;

/// Janus drops a session after 60 s without a request.
const KEEPALIVE: Duration = Duration::from_secs(25);

/// The WebSocket upgrade request for Janus: `url` with the `janus-protocol`
/// subprotocol, which Janus requires. The path and query are ignored by Janus.
pub fn websocket_request(url: &str) -> Result<Request, tungstenite::Error> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(api::SUBPROTOCOL),
    );
    Ok(request)
}

/// The VideoRoom room number for a harness room name: FNV-1a, kept within 53 bits
/// (exact in any JSON implementation) and nonzero.
pub fn room_number(name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash & ((1 << 53) - 1)).max(1)
}

/// What a transaction was, for its reply.
#[derive(Debug)]
enum Pending {
    CreateSession,
    Attach(Leg),
    JoinRoom,
    CreateRoom,
    /// The `Peer`'s offer, with its `requestId` to echo in the answer.
    Publish(Option<String>),
    Subscribe,
    Start,
    Leave,
    Detach,
    Destroy,
}

/// The sans-IO Janus participant. See the module docs.
pub struct JanusPeer {
    peer: Peer,
    room_name: String,
    room: u64,
    display: String,
    session: Option<u64>,
    publisher: Option<u64>,
    subscriber: Option<u64>,
    /// Our feed id and private id, once joined as a publisher.
    joined: Option<(u64, u64)>,
    /// The `requestId` of the `Peer`'s join, echoed in the `joined` it is given.
    join_request: Option<String>,
    published: bool,
    pending: BTreeMap<u64, Pending>,
    next_transaction: u64,
    feeds: Feeds,
    keepalive_at: Option<Instant>,
    leaving: bool,
    /// Handles whose `detach` Janus has not confirmed.
    detaching: usize,
    out: VecDeque<String>,
}

impl JanusPeer {
    /// Creates the participant and queues the Janus session's `create`.
    /// `publisher_addr` and `subscriber_addr` are the local sockets of the two legs.
    pub fn new(
        config: PeerConfig,
        time_base: TimeBase,
        publisher_addr: SocketAddr,
        subscriber_addr: SocketAddr,
        now: Instant,
    ) -> Self {
        let mut this = Self {
            room_name: config.room.clone(),
            room: room_number(&config.room),
            display: config.user.clone(),
            peer: Peer::new(config, time_base, publisher_addr, subscriber_addr, now),
            session: None,
            publisher: None,
            subscriber: None,
            joined: None,
            join_request: None,
            published: false,
            pending: BTreeMap::new(),
            next_transaction: 1,
            feeds: Feeds::default(),
            keepalive_at: None,
            leaving: false,
            detaching: 0,
            out: VecDeque::new(),
        };
        this.forward_peer_signals();
        this
    }

    /// A text message from Janus.
    pub fn handle_signal(&mut self, text: &str, now: Instant) {
        match Incoming::parse(text) {
            Ok(message) => self.on_message(message, now),
            Err(e) => self
                .peer
                .report_violation(format!("unparseable Janus message ({e}): {text:.200}")),
        }
        self.forward_peer_signals();
        self.subscribe_more(now);
    }

    /// A datagram that arrived on `leg`'s socket from `source` at `at`.
    pub fn handle_datagram(&mut self, leg: Leg, source: SocketAddr, contents: &[u8], at: Instant) {
        self.peer.handle_datagram(leg, source, contents, at);
        self.forward_peer_signals();
    }

    /// Time passed; call at [`JanusPeer::poll_timeout`] (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.session.is_some() && self.keepalive_at.is_some_and(|at| at <= now) {
            self.keepalive_at = Some(now + KEEPALIVE);
            self.request("keepalive", None, Value::Null, None);
        }
        self.peer.handle_timeout(now);
        self.forward_peer_signals();
        self.subscribe_more(now);
    }

    /// The signaling channel is gone; media stops and the peer is finished.
    pub fn handle_signaling_closed(&mut self, code: Option<u16>, reason: String) {
        self.peer.handle_signaling_closed(code, reason);
    }

    /// Records something the driver saw on the signaling channel that should not be.
    pub fn report_violation(&mut self, what: String) {
        self.peer.report_violation(what);
    }

    /// Leaves the room and ends the Janus session; finished once Janus confirms.
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.peer.leave();
        self.forward_peer_signals();
        // Without a session yet, it is destroyed as soon as `create` returns it.
        if self.session.is_some() {
            self.end_session();
        }
    }

    /// Next signaling message to send.
    pub fn poll_signal(&mut self) -> Option<String> {
        self.out.pop_front()
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.peer.poll_transmit()
    }

    /// When [`JanusPeer::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let retry = self.feeds.retry_at().filter(|_| !self.leaving);
        [self.keepalive_at, retry]
            .into_iter()
            .flatten()
            .fold(self.peer.poll_timeout(), Instant::min)
    }

    /// Whether the session is over (Janus confirmed the leave, or the signaling
    /// channel closed); nothing more will happen.
    pub fn is_finished(&self) -> bool {
        self.peer.is_finished()
    }

    /// The wrapped participant, for everything else it reports.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub fn stats(&self) -> ClientStats {
        self.peer.stats()
    }

    pub fn state(&self) -> &SessionState {
        self.peer.state()
    }

    pub fn closed(&self) -> Option<&CloseInfo> {
        self.peer.closed()
    }

    pub fn milestones(&self) -> Milestones {
        self.peer.milestones()
    }

    pub fn sent(&self) -> SentStats {
        self.peer.sent()
    }

    pub fn rx_totals(&self) -> RxTotals {
        self.peer.rx_totals()
    }

    pub fn drain_latency(&mut self, into: &mut Histogram) {
        self.peer.drain_latency(into);
    }

    /// Turns what the `Peer` wants to say to corelay into Janus requests.
    fn forward_peer_signals(&mut self) {
        while let Some(text) = self.peer.poll_signal() {
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let field = |name: &str| message[name].as_str();
            match field("type") {
                Some("join") => {
                    self.join_request = field("requestId").map(String::from);
                    self.request("create", None, Value::Null, Some(Pending::CreateSession));
                }
                Some("offer") => {
                    let pending = Pending::Publish(field("requestId").map(String::from));
                    let body = api::publish(!self.published);
                    self.published = true;
                    let jsep = Some(("offer", field("sdp").unwrap_or_default()));
                    self.send(Leg::Publisher, body, jsep, Some(pending));
                }
                Some("answer") => {
                    self.feeds.answered();
                    let jsep = Some(("answer", field("sdp").unwrap_or_default()));
                    let body = json!({ "request": "start" });
                    self.send(Leg::Subscriber, body, jsep, Some(Pending::Start));
                }
                Some("candidate") => {
                    let leg = match field("target") {
                        Some("subscriber") => Leg::Subscriber,
                        _ => Leg::Publisher,
                    };
                    let candidate = api::trickle_candidate(
                        field("candidate").unwrap_or_default(),
                        field("sdpMid"),
                        message["sdpMLineIndex"].as_u64().map(|i| i as u32),
                    );
                    if let Some(handle) = self.handle(leg) {
                        self.request("trickle", Some(handle), candidate, None);
                    }
                }
                // `leave` is done by `leave()`; Janus has no counterpart of the rest
                // (`media_state`, `ping`).
                _ => {}
            }
        }
    }

    fn on_message(&mut self, message: Incoming, now: Instant) {
        if message.janus == "ack" {
            // The reply proper comes as an event (sometimes before the ack).
            return;
        }
        let pending = message
            .transaction
            .as_deref()
            .and_then(|t| t.parse().ok())
            .and_then(|t| self.pending.remove(&t));
        if let Some(pending) = pending {
            self.on_reply(pending, message, now);
            return;
        }
        match message.janus.as_str() {
            "event" => self.on_event(message, now),
            "trickle" => self.on_trickle(message, now),
            "hangup" if !self.leaving => {
                let leg = message.sender.and_then(|h| self.leg(h));
                let reason = message.reason.unwrap_or_default();
                self.peer
                    .report_violation(format!("Janus hung up {leg:?}: {reason}"));
            }
            "timeout" => {
                if !self.leaving {
                    self.peer.report_violation("Janus session timed out".into());
                }
                self.session_over();
            }
            "error" if !self.leaving => self.failed("request", &message, now),
            // Replies to `keepalive`, `trickle`, `leave` and `detach`; `webrtcup`,
            // `media`, `slowlink`, `detached`: the `Peer` sees the connections itself.
            _ => {}
        }
    }

    fn on_reply(&mut self, pending: Pending, message: Incoming, now: Instant) {
        let ending = matches!(
            pending,
            Pending::CreateSession | Pending::Leave | Pending::Detach | Pending::Destroy
        );
        if self.leaving && !ending {
            return;
        }
        let error = message.error();
        match pending {
            Pending::CreateSession => match message.created_id() {
                Some(id) => {
                    self.session = Some(id);
                    self.keepalive_at = Some(now + KEEPALIVE);
                    if self.leaving {
                        self.end_session();
                    } else {
                        self.attach(Leg::Publisher);
                        self.attach(Leg::Subscriber);
                    }
                }
                None => self.failed("create", &message, now),
            },
            Pending::Attach(leg) => match (message.created_id(), leg) {
                (Some(id), Leg::Publisher) => {
                    self.publisher = Some(id);
                    self.join_room();
                }
                (Some(id), Leg::Subscriber) => self.subscriber = Some(id),
                (None, _) => self.failed("attach", &message, now),
            },
            Pending::JoinRoom => match (error, message.room()) {
                (Some((api::NO_SUCH_ROOM, _)), _) => {
                    let body = api::create_room(self.room);
                    self.send(Leg::Publisher, body, None, Some(Pending::CreateRoom));
                }
                (None, Some(room)) if room.videoroom == "joined" => {
                    self.on_joined(room.id, room.private_id, &room.publishers, now)
                }
                _ => self.failed("join", &message, now),
            },
            // Another participant may have created it first.
            Pending::CreateRoom => match error {
                None | Some((api::ROOM_EXISTS, _)) => self.join_room(),
                Some(_) => self.failed("create room", &message, now),
            },
            Pending::Publish(request_id) => match &message.jsep {
                Some(jsep) if error.is_none() && jsep.kind == "answer" => {
                    let answer =
                        json!({"type": "answer", "sdp": jsep.sdp, "requestId": request_id});
                    self.tell_peer(answer, now);
                }
                _ => self.failed("publish", &message, now),
            },
            Pending::Subscribe => match (error, &message.jsep) {
                (Some((api::NO_SUCH_FEED, _)), _) => self.feeds.refused(true, now),
                (None, Some(jsep)) if jsep.kind == "offer" => {
                    self.feeds.accepted();
                    self.tell_peer(json!({"type": "offer", "sdp": jsep.sdp}), now);
                }
                _ => {
                    self.feeds.refused(false, now);
                    self.failed("subscribe", &message, now);
                }
            },
            Pending::Start => {
                self.feeds.started();
                if error.is_some() {
                    self.failed("start", &message, now);
                }
            }
            Pending::Leave => self.detach(),
            Pending::Detach => {
                self.detaching = self.detaching.saturating_sub(1);
                if self.detaching == 0 {
                    self.destroy();
                }
            }
            Pending::Destroy => self.session_over(),
        }
    }

    /// An event Janus sent on its own: room news, or a new subscriber offer after a
    /// publisher we receive left.
    fn on_event(&mut self, message: Incoming, now: Instant) {
        if self.leaving {
            return;
        }
        if let Some(jsep) = &message.jsep
            && jsep.kind == "offer"
            && message.sender.is_some()
            && message.sender == self.subscriber
        {
            self.tell_peer(json!({"type": "offer", "sdp": jsep.sdp}), now);
        }
        let Some(room) = message.room() else {
            return;
        };
        self.add_publishers(&room.publishers, now);
        if let Some(feed) = room.gone_feed()
            && let Some(tracks) = self.feeds.remove(feed)
        {
            let peer_id = feed.to_string();
            for track in tracks {
                let unpublished =
                    json!({"type": "track_unpublished", "peerId": peer_id, "trackId": track});
                self.tell_peer(unpublished, now);
            }
            self.tell_peer(json!({"type": "peer_left", "peerId": peer_id}), now);
        }
    }

    fn on_trickle(&mut self, message: Incoming, now: Instant) {
        let (Some(leg), Some(c)) = (message.sender.and_then(|h| self.leg(h)), message.candidate)
        else {
            return;
        };
        let target = match leg {
            Leg::Publisher => "publisher",
            Leg::Subscriber => "subscriber",
        };
        let candidate = if c.completed {
            String::new()
        } else {
            c.candidate.unwrap_or_default()
        };
        let message = json!({
            "type": "candidate",
            "candidate": candidate,
            "sdpMid": c.sdp_mid,
            "sdpMLineIndex": c.sdp_m_line_index,
            "target": target,
        });
        self.tell_peer(message, now);
    }

    fn on_joined(
        &mut self,
        id: Option<u64>,
        private_id: Option<u64>,
        publishers: &[api::Publisher],
        now: Instant,
    ) {
        let (Some(id), Some(private_id)) = (id, private_id) else {
            self.peer
                .report_violation("Janus joined without id or private_id".into());
            return;
        };
        self.joined = Some((id, private_id));
        // Our feed id is our peer id, so the Peer's msid names it, and `use_msid`
        // subscribers see it as corelay's subscribers see a peer id.
        let joined = json!({
            "type": "joined",
            "peerId": id.to_string(),
            "sessionId": self.room_name,
            "iceServers": [],
            "requestId": self.join_request,
        });
        self.tell_peer(joined, now);
        self.add_publishers(publishers, now);
    }

    /// Announces new publishers to the `Peer` the way corelay does, and wants them.
    fn add_publishers(&mut self, publishers: &[api::Publisher], now: Instant) {
        let ours = self.joined.map(|(id, _)| id);
        for publisher in publishers.iter().filter(|p| Some(p.id) != ours) {
            let streams: Vec<_> = publisher
                .streams
                .iter()
                .filter(|s| !s.disabled && matches!(s.kind.as_str(), "audio" | "video"))
                .collect();
            let tracks = streams
                .iter()
                .map(|s| s.mid.clone().unwrap_or_default())
                .collect();
            if !self.feeds.add(publisher.id, tracks) {
                continue;
            }
            let has = |kind: &str| streams.iter().any(|s| s.kind == kind);
            let peer_id = publisher.id.to_string();
            let joined = json!({
                "type": "peer_joined",
                "peerId": peer_id,
                "userId": publisher.display.clone().unwrap_or_default(),
                "audioEnabled": has("audio"),
                "videoEnabled": has("video"),
                "screenEnabled": false,
                "speaking": false,
            });
            self.tell_peer(joined, now);
            for stream in &streams {
                let source = if stream.kind == "audio" {
                    "mic"
                } else {
                    "camera"
                };
                let published = json!({
                    "type": "track_published",
                    "peerId": peer_id,
                    "trackId": stream.mid.clone().unwrap_or_default(),
                    "kind": stream.kind,
                    "source": source,
                });
                self.tell_peer(published, now);
            }
        }
    }

    /// Sends the next subscriber request, if one is due.
    fn subscribe_more(&mut self, now: Instant) {
        let Some((_, private_id)) = self.joined else {
            return;
        };
        if self.leaving || self.subscriber.is_none() {
            return;
        }
        if let Some(request) = self.feeds.next_request(now) {
            let body = api::subscribe(request.join, self.room, private_id, &request.feeds);
            self.send(Leg::Subscriber, body, None, Some(Pending::Subscribe));
        }
    }

    fn attach(&mut self, leg: Leg) {
        let plugin = json!({ "plugin": api::PLUGIN });
        self.request("attach", None, plugin, Some(Pending::Attach(leg)));
    }

    fn join_room(&mut self) {
        let body = api::join_publisher(self.room, &self.display);
        self.send(Leg::Publisher, body, None, Some(Pending::JoinRoom));
    }

    /// Ends the session one confirmed step at a time (Janus runs requests
    /// concurrently): `leave` the room, `detach` both handles, `destroy` the session.
    fn end_session(&mut self) {
        self.keepalive_at = None;
        if self.joined.is_some() {
            let body = json!({"request": "leave"});
            self.send(Leg::Publisher, body, None, Some(Pending::Leave));
        } else {
            self.detach();
        }
    }

    fn detach(&mut self) {
        let handles = [self.publisher.take(), self.subscriber.take()];
        for handle in handles.into_iter().flatten() {
            self.detaching += 1;
            self.request("detach", Some(handle), Value::Null, Some(Pending::Detach));
        }
        if self.detaching == 0 {
            self.destroy();
        }
    }

    fn destroy(&mut self) {
        self.request("destroy", None, Value::Null, Some(Pending::Destroy));
    }

    /// The Janus session is gone: for the driver, the signaling is over.
    fn session_over(&mut self) {
        self.session = None;
        self.keepalive_at = None;
        let code = if self.leaving { 1000 } else { 1011 };
        self.peer
            .handle_signaling_closed(Some(code), "Janus session ended".into());
    }

    /// A request of `kind` in our session (none before `create` returns it), on
    /// `handle` if it concerns one.
    fn request(
        &mut self,
        kind: &str,
        handle: Option<u64>,
        fields: Value,
        pending: Option<Pending>,
    ) {
        let transaction = self.transaction(pending);
        let request = api::request(kind, &transaction, self.session, handle, fields);
        self.out.push_back(request);
    }

    /// A plugin message on `leg`'s handle.
    fn send(
        &mut self,
        leg: Leg,
        body: Value,
        jsep: Option<(&str, &str)>,
        pending: Option<Pending>,
    ) {
        let (Some(session), Some(handle)) = (self.session, self.handle(leg)) else {
            self.peer
                .report_violation(format!("{leg:?} request before its Janus handle: {body}"));
            return;
        };
        let transaction = self.transaction(pending);
        self.out
            .push_back(api::message(&transaction, session, handle, body, jsep));
    }

    /// A Janus error in reply to `what` becomes an `error` for the `Peer` (which
    /// counts it as a refusal while joining); a reply that is no error and not what
    /// was asked for is a violation.
    fn failed(&mut self, what: &str, message: &Incoming, now: Instant) {
        match message.error() {
            Some((code, reason)) => {
                let error =
                    json!({"type": "error", "code": format!("janus {code}"), "message": reason});
                self.tell_peer(error, now);
            }
            None => self.peer.report_violation(format!(
                "unexpected Janus reply to {what}: {}",
                message.janus
            )),
        }
    }

    fn tell_peer(&mut self, message: Value, now: Instant) {
        self.peer.handle_signal(&message.to_string(), now);
    }

    fn transaction(&mut self, pending: Option<Pending>) -> String {
        let id = self.next_transaction;
        self.next_transaction += 1;
        if let Some(p) = pending {
            self.pending.insert(id, p);
        }
        id.to_string()
    }

    fn handle(&self, leg: Leg) -> Option<u64> {
        match leg {
            Leg::Publisher => self.publisher,
            Leg::Subscriber => self.subscriber,
        }
    }

    fn leg(&self, handle: u64) -> Option<Leg> {
        [Leg::Publisher, Leg::Subscriber]
            .into_iter()
            .find(|&leg| self.handle(leg) == Some(handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::net::{TcpStream, UdpSocket};
    use str0m::change::SdpOffer;
    use str0m::media::{Direction, MediaKind};
    use str0m::{Candidate, Rtc};
    use tungstenite::stream::MaybeTlsStream;
    use tungstenite::{Message, WebSocket};

    const SESSION: u64 = 10;
    const PUB: u64 = 20;
    const SUB: u64 = 30;
    const ME: u64 = 100;
    const BOB: u64 = 200;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sent(peer: &mut JanusPeer) -> Vec<Value> {
        std::iter::from_fn(|| peer.poll_signal())
            .map(|s| serde_json::from_str(&s).unwrap())
            .collect()
    }

    /// Janus's reply to `request`: `kind` with `fields` merged in.
    fn reply(peer: &mut JanusPeer, request: &Value, kind: &str, fields: Value, now: Instant) {
        let mut message = json!({"janus": kind, "transaction": request["transaction"]});
        if let (Value::Object(m), Value::Object(f)) = (&mut message, fields) {
            m.extend(f);
        }
        peer.handle_signal(&message.to_string(), now);
    }

    /// Janus's success reply to the session `create`.
    fn session_created(peer: &mut JanusPeer, create: &Value, now: Instant) {
        reply(
            peer,
            create,
            "success",
            json!({"data": {"id": SESSION}}),
            now,
        );
    }

    fn plugin(data: Value) -> Value {
        json!({"plugindata": {"plugin": api::PLUGIN, "data": data}})
    }

    /// An ICE-lite str0m standing in for Janus's side of a connection.
    fn janus_rtc(now: Instant) -> Rtc {
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr("127.0.0.1:40000"), "udp").unwrap());
        rtc
    }

    #[test]
    fn room_numbers_are_stable_nonzero_and_json_safe() {
        assert_eq!(room_number("load1-0"), room_number("load1-0"));
        assert_ne!(room_number("load1-0"), room_number("load1-1"));
        for name in ["", "a", "load123-7"] {
            let n = room_number(name);
            assert!(n > 0 && n < 1 << 53, "{name}: {n}");
        }
    }

    #[test]
    fn websocket_request_asks_for_the_janus_subprotocol() {
        let request = websocket_request("ws://127.0.0.1:8188/ws?room=x").unwrap();
        assert_eq!(request.headers()[SEC_WEBSOCKET_PROTOCOL], "janus-protocol");
        assert!(websocket_request("not a url").is_err());
    }

    /// The whole Janus conversation against scripted replies: session, handles,
    /// room creation on 426, publish, a subscription retried after 428, Janus's offer
    /// answered with `start`, a departure, keepalive, and the leave.
    #[test]
    fn a_session_from_create_to_destroy() {
        let start = Instant::now();
        let now = start;
        let config = PeerConfig {
            message_log_capacity: 0,
            ..PeerConfig::new("room", "alice")
        };
        let base = TimeBase::new(now, 1_000_000);
        let local = (addr("127.0.0.1:50000"), addr("127.0.0.1:50001"));
        let mut peer = JanusPeer::new(config, base, local.0, local.1, now);
        let room = room_number("room");

        let create = sent(&mut peer).remove(0);
        assert_eq!(create["janus"], "create");
        session_created(&mut peer, &create, now);
        let attaches = sent(&mut peer);
        assert_eq!(attaches.len(), 2);
        for a in &attaches {
            assert_eq!(
                (a["janus"].as_str(), a["session_id"].as_u64()),
                (Some("attach"), Some(SESSION))
            );
            assert_eq!(a["plugin"], api::PLUGIN);
        }
        // Janus may answer in any order; only the publisher handle joins.
        reply(
            &mut peer,
            &attaches[1],
            "success",
            json!({"data": {"id": SUB}}),
            now,
        );
        assert!(sent(&mut peer).is_empty());
        reply(
            &mut peer,
            &attaches[0],
            "success",
            json!({"data": {"id": PUB}}),
            now,
        );
        let join = sent(&mut peer).remove(0);
        assert_eq!(join["handle_id"].as_u64(), Some(PUB));
        assert_eq!(join["body"], api::join_publisher(room, "alice"));

        // No such room: create it; someone else was faster (427): join again.
        reply(&mut peer, &join, "ack", json!({}), now);
        let no_room =
            plugin(json!({"videoroom": "event", "error_code": 426, "error": "No such room"}));
        reply(&mut peer, &join, "event", no_room, now);
        let create_room = sent(&mut peer).remove(0);
        assert_eq!(create_room["body"], api::create_room(room));
        let exists = plugin(json!({"videoroom": "event", "error_code": 427, "error": "exists"}));
        reply(&mut peer, &create_room, "success", exists, now);
        let join = sent(&mut peer).remove(0);
        assert_eq!(join["body"]["request"], "join");

        // Joined, with bob already publishing: publish, and subscribe to bob.
        let joined = plugin(json!({
            "videoroom": "joined", "room": room, "id": ME, "private_id": 7,
            "publishers": [{"id": BOB, "display": "bob", "streams": [
                {"type": "audio", "mindex": 0, "mid": "0", "codec": "opus"},
                {"type": "video", "mindex": 1, "mid": "1", "codec": "vp8"},
            ]}],
        }));
        reply(&mut peer, &join, "event", joined, now);
        let out = sent(&mut peer);
        assert_eq!(out.len(), 2, "{out:?}");
        let (publish, subscribe) = (&out[0], &out[1]);
        assert_eq!(publish["body"]["request"], "publish");
        assert_eq!(publish["jsep"]["type"], "offer");
        let offer = publish["jsep"]["sdp"].as_str().unwrap();
        assert!(
            offer.contains(&format!("a=msid:{ME} ")),
            "our feed id is our msid"
        );
        assert_eq!(subscribe["handle_id"].as_u64(), Some(SUB));
        assert_eq!(subscribe["body"], api::subscribe(true, room, 7, &[BOB]));

        let stats = peer.stats();
        assert_eq!(stats.state, SessionState::Joined);
        assert_eq!(stats.peer_id, Some(ME.to_string()));
        assert_eq!(stats.peers[&BOB.to_string()].user_id, "bob");
        assert_eq!(stats.announced_tracks.len(), 2);
        assert_eq!(peer.milestones().video_announced, Some(now));

        // Bob's media is not up yet: 428, then the same join after the backoff.
        let no_feed =
            plugin(json!({"videoroom": "event", "error_code": 428, "error": "No such feed"}));
        reply(&mut peer, subscribe, "event", no_feed, now);
        assert!(sent(&mut peer).is_empty());
        let retry = start + Duration::from_millis(100);
        assert!(peer.poll_timeout() <= retry);
        peer.handle_timeout(retry);
        let subscribe = sent(&mut peer).remove(0);
        assert_eq!(subscribe["body"], api::subscribe(true, room, 7, &[BOB]));

        // Janus answers our offer.
        let mut janus_pub = janus_rtc(now);
        let offer = SdpOffer::from_sdp_string(offer).unwrap();
        let answer = janus_pub.sdp_api().accept_offer(offer).unwrap();
        let configured = json!({
            "jsep": {"type": "answer", "sdp": answer.to_sdp_string()},
            "plugindata": {"data": {"videoroom": "event", "configured": "ok"}},
        });
        reply(&mut peer, publish, "event", configured, retry);
        assert_eq!(peer.stats().publisher_answers, 1);

        // Janus offers bob's audio (under bob's msid, as `use_msid` asks); the
        // answer goes back in a `start`.
        let mut janus_sub = janus_rtc(now);
        let mut change = janus_sub.sdp_api();
        let msid = (Some(BOB.to_string()), Some("bobmic".into()));
        change.add_media(MediaKind::Audio, Direction::SendOnly, msid.0, msid.1, None);
        let (offer, _) = change.apply().unwrap();
        let attached = json!({
            "jsep": {"type": "offer", "sdp": offer.to_sdp_string()},
            "plugindata": {"data": {"videoroom": "attached", "room": room}},
        });
        reply(&mut peer, &subscribe, "event", attached, retry);
        let start_request = sent(&mut peer).remove(0);
        assert_eq!(start_request["handle_id"].as_u64(), Some(SUB));
        assert_eq!(start_request["body"], json!({"request": "start"}));
        assert_eq!(start_request["jsep"]["type"], "answer");
        let started = plugin(json!({"videoroom": "event", "started": "ok"}));
        reply(&mut peer, &start_request, "event", started, retry);
        assert_eq!(
            peer.stats().active_msids(),
            [(BOB.to_string(), "bobmic".to_string())]
        );

        // Janus's candidates reach the Peer (ours are all in the SDP).
        let trickle = json!({"janus": "trickle", "sender": SUB, "candidate": {"completed": true}});
        peer.handle_signal(&trickle.to_string(), retry);

        // Bob leaves.
        let leaving = json!({"janus": "event", "sender": PUB, "plugindata": {"data": {"videoroom": "event", "leaving": BOB}}});
        peer.handle_signal(&leaving.to_string(), retry);
        let stats = peer.stats();
        assert!(stats.peers.is_empty() && stats.announced_tracks.is_empty());
        assert_eq!(stats.peers_left, [BOB.to_string()]);

        // Keepalive every 25 s.
        let keepalive_at = start + KEEPALIVE;
        assert!(peer.poll_timeout() <= keepalive_at);
        peer.handle_timeout(keepalive_at);
        let keepalive = sent(&mut peer);
        assert_eq!(keepalive.len(), 1);
        assert_eq!(keepalive[0]["janus"], "keepalive");
        assert_eq!(keepalive[0]["session_id"].as_u64(), Some(SESSION));

        let stats = peer.stats();
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
        assert!(stats.errors.is_empty(), "{:?}", stats.errors);

        // Leave: `leave`, then `detach` both handles, then `destroy`, each once the
        // previous step is confirmed; done when destroyed.
        let now = keepalive_at;
        peer.leave();
        let leave = sent(&mut peer).remove(0);
        assert_eq!(leave["body"], json!({"request": "leave"}));
        let left = plugin(json!({"videoroom": "event", "leaving": "ok"}));
        reply(&mut peer, &leave, "event", left, now);
        let detaches = sent(&mut peer);
        let handles: Vec<_> = detaches.iter().map(|d| d["handle_id"].as_u64()).collect();
        assert_eq!(handles, [Some(PUB), Some(SUB)]);
        assert!(detaches.iter().all(|d| d["janus"] == "detach"));
        reply(&mut peer, &detaches[1], "success", json!({}), now);
        assert!(sent(&mut peer).is_empty());
        reply(&mut peer, &detaches[0], "success", json!({}), now);
        let destroy = sent(&mut peer).remove(0);
        assert_eq!(destroy["janus"], "destroy");
        assert!(!peer.is_finished());
        reply(&mut peer, &destroy, "success", json!({}), now);
        assert!(peer.is_finished());
        assert_eq!(peer.closed().and_then(|c| c.code), Some(1000));
        assert_eq!(peer.state(), &SessionState::Left);
    }

    #[test]
    fn refusals_lost_sessions_and_early_leaves() {
        let now = Instant::now();
        let base = TimeBase::new(now, 1_000_000);
        let local = (addr("127.0.0.1:50000"), addr("127.0.0.1:50001"));
        let new = || JanusPeer::new(PeerConfig::new("r", "u"), base, local.0, local.1, now);

        let mut peer = new();
        let create = sent(&mut peer).remove(0);
        let error = json!({"error": {"code": 490, "reason": "Unauthorized"}});
        reply(&mut peer, &create, "error", error, now);
        assert_eq!(
            peer.state(),
            &SessionState::Refused {
                code: "janus 490".into(),
                message: "Unauthorized".into()
            }
        );

        let mut peer = new();
        let create = sent(&mut peer).remove(0);
        session_created(&mut peer, &create, now);
        peer.handle_signal(r#"{"janus":"timeout","session_id":10}"#, now);
        peer.handle_signal("not json", now);
        assert!(peer.is_finished());
        assert_eq!(peer.closed().and_then(|c| c.code), Some(1011));
        assert_eq!(
            peer.stats().violations.len(),
            2,
            "{:?}",
            peer.stats().violations
        );

        // Leaving while the session is being created: destroyed as soon as it exists.
        let mut peer = new();
        let create = sent(&mut peer).remove(0);
        peer.leave();
        assert!(sent(&mut peer).is_empty());
        session_created(&mut peer, &create, now);
        let destroy = sent(&mut peer).remove(0);
        assert_eq!(destroy["janus"], "destroy");
        assert_eq!(destroy["session_id"].as_u64(), Some(SESSION));
        reply(&mut peer, &destroy, "success", json!({}), now);
        assert_eq!(peer.closed().and_then(|c| c.code), Some(1000));
    }

    /// A participant on real sockets, polled: just enough driver for a test.
    struct Live {
        peer: JanusPeer,
        ws: WebSocket<MaybeTlsStream<TcpStream>>,
        publisher: UdpSocket,
        subscriber: UdpSocket,
    }

    impl Live {
        fn connect(url: &str, room: &str, user: &str, ip: &str, base: TimeBase) -> Live {
            let (ws, _) = tungstenite::connect(websocket_request(url).unwrap()).unwrap();
            if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                tcp.set_nonblocking(true).unwrap();
            }
            let publisher = UdpSocket::bind((ip, 0)).unwrap();
            let subscriber = UdpSocket::bind((ip, 0)).unwrap();
            for socket in [&publisher, &subscriber] {
                socket.set_nonblocking(true).unwrap();
            }
            let peer = JanusPeer::new(
                PeerConfig::new(room, user),
                base,
                publisher.local_addr().unwrap(),
                subscriber.local_addr().unwrap(),
                Instant::now(),
            );
            Live {
                peer,
                ws,
                publisher,
                subscriber,
            }
        }

        fn step(&mut self, buf: &mut [u8]) {
            loop {
                match self.ws.read() {
                    Ok(Message::Text(text)) => self.peer.handle_signal(&text, Instant::now()),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if !self.peer.is_finished() {
                            self.peer.handle_signaling_closed(None, e.to_string());
                        }
                        break;
                    }
                }
            }
            for (socket, leg) in [
                (&self.publisher, Leg::Publisher),
                (&self.subscriber, Leg::Subscriber),
            ] {
                while let Ok((n, from)) = socket.recv_from(buf) {
                    self.peer
                        .handle_datagram(leg, from, &buf[..n], Instant::now());
                }
            }
            let now = Instant::now();
            if self.peer.poll_timeout() <= now {
                self.peer.handle_timeout(now);
            }
            while let Some(t) = self.peer.poll_transmit() {
                let socket = match t.leg {
                    Leg::Publisher => &self.publisher,
                    Leg::Subscriber => &self.subscriber,
                };
                let _ = socket.send_to(&t.contents, t.destination);
            }
            while let Some(text) = self.peer.poll_signal() {
                let _ = self.ws.write(Message::text(text));
            }
            let _ = self.ws.flush();
        }
    }

    fn run(peers: &mut [Live], for_how_long: Duration, until: impl Fn(&[Live]) -> bool) {
        let mut buf = vec![0; 2048];
        let end = Instant::now() + for_how_long;
        while Instant::now() < end && !until(peers) {
            for p in peers.iter_mut() {
                p.step(&mut buf);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Three participants against a running Janus with the VideoRoom plugin, e.g.
    /// the one `loadtest/compare-janus.sh --janus-only` starts (`tests/run` runs this
    /// test that way): all publish, each receives the other two, all leave cleanly.
    /// The UDP sockets bind to the URL's host, the address Janus does ICE on.
    #[test]
    #[ignore = "needs a running Janus: JANUS_URL=ws://<host address>:<port>"]
    fn live_janus_three_participants() {
        let url = std::env::var("JANUS_URL").expect("JANUS_URL");
        let uri: tungstenite::http::Uri = url.parse().unwrap();
        let ip = uri.host().unwrap().to_string();
        let room = format!("janus-live-{}", std::process::id());
        let base = TimeBase::now();
        let mut peers: Vec<Live> = ["a", "b", "c"]
            .iter()
            .map(|user| Live::connect(&url, &room, user, &ip, base))
            .collect();
        // Enough media from both others, on both kinds, for the checks below.
        let media_from_both = |peers: &[Live]| {
            peers.iter().all(|live| {
                let stats = live.peer.stats();
                stats.peers.len() == 2
                    && stats.peers.keys().all(|other| {
                        [MediaKind::Audio, MediaKind::Video]
                            .into_iter()
                            .all(|kind| {
                                stats
                                    .track(other, kind)
                                    .is_some_and(|t| t.packets > 50 && t.latency_us.is_some())
                            })
                    })
            })
        };
        run(&mut peers, Duration::from_secs(20), media_from_both);

        for live in &peers {
            let stats = live.peer.stats();
            let me = stats.peer_id.clone().unwrap();
            eprintln!(
                "{me}: pub {} sub {} sent {:?} errors {:?} violations {:?}",
                stats.publisher_connected,
                stats.subscriber_connected,
                stats.sent,
                stats.errors,
                stats.violations
            );
            for t in &stats.tracks {
                eprintln!(
                    "  from {} {:?} {} pkts lost {} latency {:?}",
                    t.peer_id, t.kind, t.packets, t.lost, t.latency_us
                );
            }
            assert!(stats.violations.is_empty(), "{:?}", stats.violations);
            assert!(stats.publisher_connected && stats.subscriber_connected);
            assert_eq!(stats.peers.len(), 2, "{:?}", stats.peers);
            for other in stats.peers.keys() {
                for kind in [MediaKind::Audio, MediaKind::Video] {
                    let track = stats.track(other, kind).expect("a track from each");
                    assert!(track.packets > 50, "{track:?}");
                    assert!(track.lost * 100 <= track.received, "{track:?}");
                    assert!(track.latency_us.is_some());
                }
            }
            assert!(live.peer.milestones().first_video.is_some());
        }

        for live in &mut peers {
            live.peer.leave();
        }
        run(&mut peers, Duration::from_secs(5), |peers| {
            peers.iter().all(|p| p.peer.is_finished())
        });
        for live in &peers {
            let closed = live.peer.closed().cloned();
            assert_eq!(closed.and_then(|c| c.code), Some(1000));
        }
    }
}
