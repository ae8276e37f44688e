//! A sans-IO corelay participant: the signaling state machine plus its two str0m
//! connections (publisher: we offer and send; subscriber: the server offers and we
//! receive), synthetic media generation, and receive-side measurement.
//!
//! Like str0m itself it never touches a socket or a clock: signaling text, UDP
//! datagrams and time go in; signaling text, datagrams and a deadline come out. The
//! threaded test client ([`crate::client`]) and the load harness's event loop both
//! drive this same type. After any input, drain [`Peer::poll_signal`] and
//! [`Peer::poll_transmit`], then wake again at [`Peer::poll_timeout`].
//!
//! Each connection has its own local UDP socket, so the caller says which [`Leg`] a
//! datagram arrived on and every [`Transmit`] says which socket to send it from.
//!
//! A peer either measures what it receives (decrypts every packet: per-track stats,
//! latency and loss from the stamps) or, for the load harness's cheap subscribers,
//! only counts it: RTP headers are in the clear under SRTP, so packets, bytes and
//! sequence gaps are read from the header and the packet is dropped before str0m.
//! STUN, DTLS and RTCP always reach str0m, so ICE consent and DTLS stay alive.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};

use crate::media::{AudioSource, MediaConfig, MediaPacket, VideoSource};
use crate::payload::{Stamp, parse_vp8};
use crate::protocol::{ClientMessage, MediaFlags, ServerMessage, Target, message_type};
use crate::sdp::{MediaSection, summarize};
use crate::stats::{Histogram, RtpSeqTracker, SeqTracker, Summary};

/// Bounds on everything a long-running or misbehaving session could grow.
const MAX_ERRORS: usize = 64;
const MAX_VIOLATIONS: usize = 64;
const MAX_PEERS_LEFT: usize = 256;
const MAX_RX_TRACKS: usize = 256;
const MAX_SERVER_ADDRS: usize = 32;
const MAX_QUEUED_TRANSMITS: usize = 4096;
const MAX_QUEUED_SIGNALS: usize = 1024;
/// Deadline reported by an idle connection.
const IDLE: Duration = Duration::from_secs(3600);

/// One of the participant's two peer connections, and the UDP socket it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// The connection we offer and send media on.
    Publisher,
    /// The connection the server offers and sends media on.
    Subscriber,
}

/// Maps `Instant`s to wall-clock microseconds, so stamps from different clients can
/// be compared without the sans-IO core reading the system clock. Clients in one
/// process should share one base so their latencies are exactly comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBase {
    instant: Instant,
    unix_micros: u64,
}

impl TimeBase {
    /// A base anchored at the given pair of readings.
    pub fn new(instant: Instant, unix_micros: u64) -> Self {
        Self {
            instant,
            unix_micros,
        }
    }

    /// Reads both clocks now.
    pub fn now() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        Self::new(Instant::now(), unix)
    }

    /// Wall-clock microseconds at `at`.
    pub fn unix_micros(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_micros + d.as_micros() as u64,
            None => self
                .unix_micros
                .saturating_sub(self.instant.duration_since(at).as_micros() as u64),
        }
    }
}

/// Who joins where and what it publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// `sessionId` of the join.
    pub room: String,
    /// `userId` of the join.
    pub user: String,
    /// Join ticket, for servers configured with a ticket secret.
    pub ticket: Option<String>,
    /// Publish an Opus audio track once joined.
    pub publish_audio: bool,
    /// Publish a VP8 video track once joined.
    pub publish_video: bool,
    /// Shape of the published media.
    pub media: MediaConfig,
    /// How many received signaling messages to keep for inspection (0 keeps none).
    pub message_log_capacity: usize,
    /// Decrypt and measure received media; `false` only counts it (see the module
    /// docs), which costs a fraction of the CPU.
    pub measure: bool,
}

impl PeerConfig {
    /// Publishes audio and video with default media.
    pub fn new(room: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            room: room.into(),
            user: user.into(),
            ticket: None,
            publish_audio: true,
            publish_video: true,
            media: MediaConfig::default(),
            message_log_capacity: 256,
            measure: true,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from.
    pub leg: Leg,
    /// Always loopback or an address the server's SDP listed.
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// Where the signaling session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// `join` sent, no reply yet.
    Joining,
    /// `joined` received.
    Joined,
    /// The server answered the join with `error`.
    Refused { code: String, message: String },
    /// The server sent `kicked`.
    Kicked { reason: String },
    /// We sent `leave`.
    Left,
}

/// A remote participant as announced by `peer_joined` and kept current by
/// `media_state` and `speaking`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    pub user_id: String,
    pub flags: MediaFlags,
    /// Last `level` of a `speaking` message.
    pub level: Option<u8>,
    /// How many `speaking` messages named this peer.
    pub speaking_events: u64,
}

/// A track announced by `track_published` and not yet unpublished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedTrack {
    pub peer_id: String,
    pub track_id: String,
    pub kind: String,
    pub source: String,
}

/// One of our published tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTrack {
    pub mid: String,
    pub kind: MediaKind,
    /// Our track id (the second `a=msid` token of our offer).
    pub track_id: String,
    /// Negotiated payload type; `None` until the answer accepted our codec.
    pub pt: Option<u8>,
}

/// An `error` message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub request_id: Option<String>,
}

/// A received signaling message, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedMessage {
    /// Its `type` field (empty when it has none).
    pub kind: String,
    pub raw: String,
}

/// How the signaling channel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// WebSocket close code (1005 for a close frame without one), `None` when the
    /// connection dropped without a close frame.
    pub code: Option<u16>,
    pub reason: String,
}

/// Receive statistics of one remote track.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackStats {
    /// Publisher's peer id: the msid stream id of the server's offer.
    pub peer_id: String,
    /// The msid track id of the server's offer.
    pub track_id: String,
    pub mid: String,
    pub kind: MediaKind,
    /// Encoding name from the offer's rtpmap for the last packet's payload type.
    pub codec: Option<String>,
    pub packets: u64,
    /// RTP payload bytes.
    pub bytes: u64,
    /// VP8 frame starts that are keyframes.
    pub keyframes: u64,
    /// Packets without our stamp (not counted in loss or latency).
    pub unstamped: u64,
    /// Distinct stamped packets.
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Send-to-receive latency in microseconds.
    pub latency_us: Option<Summary>,
    pub last_received: Option<Instant>,
}

/// What we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SentStats {
    pub audio_packets: u64,
    pub video_packets: u64,
    pub video_frames: u64,
    pub keyframes: u64,
    /// RTP payload bytes.
    pub bytes: u64,
}

/// Receive totals of the subscriber connection, cheap enough to read every second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxTotals {
    /// RTP datagrams received.
    pub packets: u64,
    /// Their size on the wire (SRTP header, payload and tag).
    pub bytes: u64,
    /// Distinct packets: by stamp when measuring, by RTP sequence number otherwise.
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

impl RxTotals {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &RxTotals) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
    }

    fn add_seq(&mut self, seq: &SeqTracker) {
        self.received += seq.unique();
        self.lost += seq.lost();
        self.duplicates += seq.duplicates();
        self.reordered += seq.reordered();
    }
}

/// When the session reached each step, for the harness's join figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Milestones {
    /// `joined` arrived.
    pub joined: Option<Instant>,
    /// The first `track_published` of a video track arrived: from then on, video is
    /// something we are waiting for.
    pub video_announced: Option<Instant>,
    /// The first video RTP packet arrived.
    pub first_video: Option<Instant>,
    /// The first packet of a video keyframe arrived (seen only when decrypting).
    pub first_keyframe: Option<Instant>,
}

/// A snapshot of everything a test may want to assert on.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStats {
    pub state: SessionState,
    pub peer_id: Option<String>,
    /// Participants currently in the room (`peer_joined` minus `peer_left`).
    pub peers: BTreeMap<String, RemotePeer>,
    /// Peer ids of `peer_left` messages, oldest first (bounded).
    pub peers_left: Vec<String>,
    /// Tracks announced by `track_published` and not unpublished.
    pub announced_tracks: Vec<AnnouncedTrack>,
    /// The m-sections of the most recent server offer we accepted.
    pub offered: Vec<MediaSection>,
    /// Receive statistics per (mid, msid).
    pub tracks: Vec<TrackStats>,
    /// Packets on a mid the latest offer does not attribute to an msid.
    pub unattributed_packets: u64,
    pub published: Vec<LocalTrack>,
    pub sent: SentStats,
    pub subscriber_offers: u64,
    pub publisher_answers: u64,
    pub pongs: u64,
    /// PLI/FIR received for our video.
    pub keyframe_requests: u64,
    pub publisher_connected: bool,
    pub subscriber_connected: bool,
    /// `error` messages (bounded, oldest first).
    pub errors: Vec<ServerError>,
    /// Server behaviour the protocol or WebRTC does not allow, and local failures it
    /// caused (bounded, oldest first). Empty in a healthy session.
    pub violations: Vec<String>,
    /// Received signaling messages (bounded, oldest first).
    pub messages: Vec<LoggedMessage>,
    /// Server candidates ignored because they were neither loopback nor in its SDP.
    pub ignored_candidates: u64,
    /// Datagrams str0m wanted to send somewhere not allowed.
    pub blocked_transmits: u64,
    pub closed: Option<CloseInfo>,
}

impl ClientStats {
    /// `(stream id, track id)` of every m-section the latest offer sends on.
    pub fn active_msids(&self) -> Vec<(String, String)> {
        self.offered
            .iter()
            .filter(|m| m.is_active_send())
            .map(|m| {
                (
                    m.stream_id.clone().unwrap_or_default(),
                    m.track_id.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Receive statistics of tracks published by `peer_id`.
    pub fn tracks_from<'a>(&'a self, peer_id: &'a str) -> impl Iterator<Item = &'a TrackStats> {
        self.tracks.iter().filter(move |t| t.peer_id == peer_id)
    }

    /// The `kind` track from `peer_id` that received the most packets.
    pub fn track(&self, peer_id: &str, kind: MediaKind) -> Option<&TrackStats> {
        self.tracks
            .iter()
            .filter(|t| t.peer_id == peer_id && t.kind == kind)
            .max_by_key(|t| t.packets)
    }

    /// Whether an `error` with this code arrived.
    pub fn has_error(&self, code: &str) -> bool {
        self.errors.iter().any(|e| e.code == code)
    }

    /// Logged messages of one type.
    pub fn messages_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a LoggedMessage> {
        self.messages.iter().filter(move |m| m.kind == kind)
    }
}

/// Counters that tell a driver whether a new snapshot is worth taking: signaling
/// changes matter at once, media counters only periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation {
    pub signaling: u64,
    pub media: u64,
}

struct Endpoint {
    rtc: Rtc,
    local: SocketAddr,
    connected: bool,
    timeout: Instant,
}

impl Endpoint {
    fn new(leg: Leg, local: SocketAddr, now: Instant) -> Self {
        // RTP mode: we write ready RTP payloads and read packets without depacketizing.
        let (provider, cert) = shared_crypto();
        let mut config = Rtc::builder()
            .set_rtp_mode(true)
            .set_crypto_provider(provider.clone());
        if let Some(cert) = cert {
            config = config.set_dtls_cert(cert.clone());
        }
        if leg == Leg::Publisher {
            // Offer exactly what we generate, so the server cannot pick another codec.
            config = config
                .clear_codecs()
                .enable_opus(true, false)
                .enable_vp8(true);
        }
        let mut rtc = config.build(now);
        // A host candidate for our socket; str0m puts it in our SDP.
        if let Ok(c) = Candidate::host(local, "udp") {
            rtc.add_local_candidate(c);
        }
        Self {
            rtc,
            local,
            connected: false,
            timeout: now,
        }
    }
}

/// Which connections had input since they were last drained.
#[derive(Debug, Clone, Copy)]
struct Touched {
    publisher: bool,
    subscriber: bool,
}

impl Touched {
    const NONE: Touched = Touched {
        publisher: false,
        subscriber: false,
    };
    const BOTH: Touched = Touched {
        publisher: true,
        subscriber: true,
    };

    fn leg(leg: Leg) -> Touched {
        Touched::NONE.with(leg)
    }

    fn with(self, leg: Leg) -> Touched {
        match leg {
            Leg::Publisher => Touched {
                publisher: true,
                ..self
            },
            Leg::Subscriber => Touched {
                subscriber: true,
                ..self
            },
        }
    }
}

/// Builds the process's shared crypto and its DTLS config now, so that the first
/// participant's join does not carry the one-time set-up.
pub(crate) fn warm_up() {
    Endpoint::new(
        Leg::Subscriber,
        SocketAddr::from(([127, 0, 0, 1], 9)),
        Instant::now(),
    );
}

/// One crypto provider and one DTLS certificate for every connection in the process.
/// Generating a certificate costs a fraction of a millisecond per connection, and
/// str0m's stock provider builds a DTLS config (a crypto self-test, about 1 ms) for
/// each: on a worker's thread that stalls every participant it runs. Nothing
/// requires them to differ: each DTLS session still has its own keys.
fn shared_crypto() -> &'static (Arc<CryptoProvider>, Option<DtlsCert>) {
    static SHARED: OnceLock<(Arc<CryptoProvider>, Option<DtlsCert>)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let provider = corelay::media::dtls::crypto_provider();
        let cert = provider.dtls_provider.generate_certificate();
        (Arc::new(provider), cert)
    })
}

struct Publishing {
    mid: Mid,
    pt: Option<Pt>,
}

struct TrackRx {
    kind: MediaKind,
    codec: Option<String>,
    packets: u64,
    bytes: u64,
    keyframes: u64,
    unstamped: u64,
    seq: SeqTracker,
    latency: Histogram,
    last_received: Option<Instant>,
}

impl TrackRx {
    fn new(kind: MediaKind) -> Self {
        Self {
            kind,
            codec: None,
            packets: 0,
            bytes: 0,
            keyframes: 0,
            unstamped: 0,
            seq: SeqTracker::default(),
            latency: Histogram::default(),
            last_received: None,
        }
    }
}

/// The sans-IO participant. See the module docs.
pub struct Peer {
    config: PeerConfig,
    time_base: TimeBase,
    last_now: Instant,
    publisher: Endpoint,
    subscriber: Endpoint,
    state: SessionState,
    peer_id: Option<String>,
    next_request: u64,
    join_request: String,
    pending_offer: Option<(SdpPendingOffer, String)>,
    /// The wanted tracks changed while an offer was outstanding.
    renegotiate: bool,
    /// Where the publisher connection moves, and whether the offer that restarts ICE
    /// for it went out: the move happens with its answer.
    publisher_move: Option<(SocketAddr, bool)>,
    /// Each audio packet goes out on a new SSRC (see [`Peer::rotate_audio_ssrc`]).
    rotate_audio_ssrc: bool,
    audio: Option<Publishing>,
    video: Option<Publishing>,
    audio_src: AudioSource,
    video_src: VideoSource,
    offered: Vec<MediaSection>,
    server_addrs: Vec<SocketAddr>,
    rx: BTreeMap<(String, String, String), TrackRx>,
    /// Latency samples since the last [`Peer::drain_latency`]; allocated on first use.
    interval_latency: Option<Histogram>,
    /// Counting mode: sequence tracking per SSRC, read from clear RTP headers.
    clear_rx: Vec<(u32, RtpSeqTracker)>,
    rx_wire: RxTotals,
    milestones: Milestones,
    unattributed_packets: u64,
    peers: BTreeMap<String, RemotePeer>,
    peers_left: VecDeque<String>,
    announced: BTreeMap<(String, String), AnnouncedTrack>,
    errors: VecDeque<ServerError>,
    violations: VecDeque<String>,
    log: VecDeque<LoggedMessage>,
    sent: SentStats,
    subscriber_offers: u64,
    publisher_answers: u64,
    pongs: u64,
    keyframe_requests: u64,
    ignored_candidates: u64,
    blocked_transmits: u64,
    closed: Option<CloseInfo>,
    out_signal: VecDeque<String>,
    out_transmit: VecDeque<Transmit>,
    generation: Generation,
}

impl Peer {
    /// Creates the participant and queues its `join`. `publisher_addr` and
    /// `subscriber_addr` are the local sockets of the two legs.
    pub fn new(
        config: PeerConfig,
        time_base: TimeBase,
        publisher_addr: SocketAddr,
        subscriber_addr: SocketAddr,
        now: Instant,
    ) -> Self {
        let publisher = Endpoint::new(Leg::Publisher, publisher_addr, now);
        let subscriber = Endpoint::new(Leg::Subscriber, subscriber_addr, now);
        // Vary RTP numbering per participant without a random number generator.
        let seed = u32::from(publisher_addr.port()) << 16 | u32::from(subscriber_addr.port());
        let mut peer = Self {
            time_base,
            last_now: now,
            publisher,
            subscriber,
            state: SessionState::Joining,
            peer_id: None,
            next_request: 1,
            join_request: String::new(),
            pending_offer: None,
            renegotiate: false,
            publisher_move: None,
            rotate_audio_ssrc: false,
            audio: None,
            video: None,
            audio_src: AudioSource::new(seed),
            video_src: VideoSource::new(seed.rotate_left(8), &config.media),
            offered: Vec::new(),
            server_addrs: Vec::new(),
            rx: BTreeMap::new(),
            interval_latency: None,
            clear_rx: Vec::new(),
            rx_wire: RxTotals::default(),
            milestones: Milestones::default(),
            unattributed_packets: 0,
            peers: BTreeMap::new(),
            peers_left: VecDeque::new(),
            announced: BTreeMap::new(),
            errors: VecDeque::new(),
            violations: VecDeque::new(),
            log: VecDeque::new(),
            sent: SentStats::default(),
            subscriber_offers: 0,
            publisher_answers: 0,
            pongs: 0,
            keyframe_requests: 0,
            ignored_candidates: 0,
            blocked_transmits: 0,
            closed: None,
            out_signal: VecDeque::new(),
            out_transmit: VecDeque::new(),
            generation: Generation::default(),
            config,
        };
        peer.join_request = peer.request_id("join");
        peer.send(ClientMessage::Join {
            session_id: peer.config.room.clone(),
            user_id: peer.config.user.clone(),
            ticket: peer.config.ticket.clone(),
            request_id: Some(peer.join_request.clone()),
        });
        peer
    }

    /// Queues a message to the server.
    pub fn send(&mut self, message: ClientMessage) {
        if self.out_signal.len() >= MAX_QUEUED_SIGNALS {
            self.violation("signaling output queue full: driver not draining".into());
            return;
        }
        self.out_signal.push_back(message.to_json());
    }

    /// Sends `leave` and stops media.
    pub fn leave(&mut self) {
        self.send(ClientMessage::Leave);
        self.state = SessionState::Left;
        self.audio_src.pacer.stop();
        self.video_src.pacer.stop();
        self.generation.signaling += 1;
    }

    /// Changes which tracks we publish, renegotiating the publisher connection.
    pub fn set_publish(&mut self, audio: bool, video: bool, now: Instant) {
        self.config.publish_audio = audio;
        self.config.publish_video = video;
        self.negotiate_publisher();
        self.drive(now, Touched::BOTH);
    }

    /// Moves the publisher connection to a new local address, as after a network
    /// change, and restarts ICE on it (a browser's `restartIce()`).
    pub fn move_publisher(&mut self, local: SocketAddr, now: Instant) {
        self.publisher_move = Some((local, false));
        self.negotiate_publisher();
        self.drive(now, Touched::BOTH);
    }

    /// Closes one connection as a browser does when its tab closes (`pc.close()`):
    /// str0m sends the server a DTLS close_notify.
    pub fn close_connection(&mut self, leg: Leg, now: Instant) {
        // Closing an `Rtc` that is already closed does nothing.
        let _ = self.endpoint(leg).rtc.close();
        self.drive(now, Touched::BOTH);
    }

    /// Sends every later audio packet on a new SSRC, as a hostile client might: each
    /// one is a new stream to the server.
    pub fn rotate_audio_ssrc(&mut self) {
        self.rotate_audio_ssrc = true;
    }

    /// The local address of one leg's socket.
    pub fn local_addr(&self, leg: Leg) -> SocketAddr {
        match leg {
            Leg::Publisher => self.publisher.local,
            Leg::Subscriber => self.subscriber.local,
        }
    }

    /// Changes the RFC 6464 level of subsequent audio packets (-127 silence .. 0).
    pub fn set_audio_level(&mut self, level: i8) {
        self.config.media.audio_level = level.clamp(-127, 0);
    }

    /// A text message from the signaling channel.
    pub fn handle_signal(&mut self, text: &str, now: Instant) {
        let now = self.advance(now);
        self.generation.signaling += 1;
        if self.config.message_log_capacity > 0 {
            if self.log.len() >= self.config.message_log_capacity {
                self.log.pop_front();
            }
            self.log.push_back(LoggedMessage {
                kind: message_type(text).unwrap_or_default(),
                raw: text.to_string(),
            });
        }
        match serde_json::from_str::<ServerMessage>(text) {
            Ok(message) => self.on_message(message, now),
            Err(e) => self.violation(format!("unparseable server message ({e}): {text:.200}")),
        }
        self.drive(now, Touched::BOTH);
    }

    /// The signaling channel is gone; media stops and the peer is finished.
    pub fn handle_signaling_closed(&mut self, code: Option<u16>, reason: String) {
        self.closed = Some(CloseInfo { code, reason });
        self.audio_src.pacer.stop();
        self.video_src.pacer.stop();
        self.generation.signaling += 1;
    }

    /// Records something the driver saw on the signaling channel that the protocol
    /// does not allow (e.g. a binary frame).
    pub fn report_violation(&mut self, what: String) {
        self.violation(what);
    }

    /// A datagram that arrived on `leg`'s socket from `source` at `at`.
    pub fn handle_datagram(&mut self, leg: Leg, source: SocketAddr, contents: &[u8], at: Instant) {
        let at = self.advance(at);
        if leg == Leg::Subscriber
            && let Some(rtp) = ClearRtp::parse(contents)
        {
            self.rx_wire.packets += 1;
            self.rx_wire.bytes += contents.len() as u64;
            if !self.config.measure {
                self.count_rtp(rtp, at);
                return;
            }
        }
        let Ok(contents) = contents.try_into() else {
            return;
        };
        let endpoint = self.endpoint(leg);
        let input = Input::Receive(
            at,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: endpoint.local,
                contents,
            },
        );
        // Each leg has its own socket, but strays (late packets of an old session, a
        // scanner) must not reach str0m.
        if !endpoint.rtc.accepts(&input) {
            return;
        }
        if let Err(e) = endpoint.rtc.handle_input(input) {
            self.violation(format!("{leg:?} rejected a datagram: {e}"));
        }
        self.drive(at, Touched::leg(leg));
    }

    /// Time passed; call at [`Peer::poll_timeout`] (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.advance(now);
        let mut touched = Touched::NONE;
        for leg in [Leg::Publisher, Leg::Subscriber] {
            let endpoint = self.endpoint(leg);
            // A connection is only woken when its own deadline passed: str0m's
            // timeout handling is most of an idle participant's cost.
            if !endpoint.rtc.is_alive() || endpoint.timeout > now {
                continue;
            }
            touched = touched.with(leg);
            if let Err(e) = endpoint.rtc.handle_input(Input::Timeout(now)) {
                self.violation(format!("{leg:?} timeout handling failed: {e}"));
            }
        }
        self.drive(now, touched);
    }

    /// Next signaling message to send.
    pub fn poll_signal(&mut self) -> Option<String> {
        self.out_signal.pop_front()
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out_transmit.pop_front()
    }

    /// When [`Peer::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Instant {
        [self.audio_src.pacer.next(), self.video_src.pacer.next()]
            .into_iter()
            .flatten()
            .fold(
                self.publisher.timeout.min(self.subscriber.timeout),
                Instant::min,
            )
    }

    /// Whether the signaling channel has closed; nothing more will happen.
    pub fn is_finished(&self) -> bool {
        self.closed.is_some()
    }

    /// Our peer id once joined.
    pub fn peer_id(&self) -> Option<&str> {
        self.peer_id.as_deref()
    }

    /// Change counters, for deciding when to take a snapshot.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Where the signaling session stands.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// How the signaling channel ended, once it has.
    pub fn closed(&self) -> Option<&CloseInfo> {
        self.closed.as_ref()
    }

    /// When the session reached each step.
    pub fn milestones(&self) -> Milestones {
        self.milestones
    }

    /// What we sent so far.
    pub fn sent(&self) -> SentStats {
        self.sent
    }

    /// Receive totals over all tracks, from stamps when measuring, from RTP sequence
    /// numbers otherwise.
    pub fn rx_totals(&self) -> RxTotals {
        let mut totals = RxTotals {
            packets: self.rx_wire.packets,
            bytes: self.rx_wire.bytes,
            ..RxTotals::default()
        };
        for track in self.rx.values() {
            totals.add_seq(&track.seq);
        }
        for (_, stream) in &self.clear_rx {
            totals.add_seq(stream.tracker());
        }
        totals
    }

    /// Moves the latency samples recorded since the last call into `into`.
    pub fn drain_latency(&mut self, into: &mut Histogram) {
        if let Some(h) = self.interval_latency.as_mut() {
            into.merge(h);
            h.clear();
        }
    }

    /// A snapshot of the session and its media statistics.
    pub fn stats(&self) -> ClientStats {
        let tracks = self
            .rx
            .iter()
            .map(|((mid, peer_id, track_id), t)| TrackStats {
                peer_id: peer_id.clone(),
                track_id: track_id.clone(),
                mid: mid.clone(),
                kind: t.kind,
                codec: t.codec.clone(),
                packets: t.packets,
                bytes: t.bytes,
                keyframes: t.keyframes,
                unstamped: t.unstamped,
                received: t.seq.unique(),
                lost: t.seq.lost(),
                duplicates: t.seq.duplicates(),
                reordered: t.seq.reordered(),
                latency_us: t.latency.summary(),
                last_received: t.last_received,
            })
            .collect();
        let published = [
            (&self.audio, MediaKind::Audio),
            (&self.video, MediaKind::Video),
        ]
        .into_iter()
        .filter_map(|(p, kind)| {
            let p = p.as_ref()?;
            Some(LocalTrack {
                mid: p.mid.to_string(),
                kind,
                track_id: self
                    .publisher
                    .rtc
                    .media(p.mid)
                    .map(|m| m.track_id().to_string())
                    .unwrap_or_default(),
                pt: p.pt.map(|pt| *pt),
            })
        })
        .collect();
        ClientStats {
            state: self.state.clone(),
            peer_id: self.peer_id.clone(),
            peers: self.peers.clone(),
            peers_left: self.peers_left.iter().cloned().collect(),
            announced_tracks: self.announced.values().cloned().collect(),
            offered: self.offered.clone(),
            tracks,
            unattributed_packets: self.unattributed_packets,
            published,
            sent: self.sent,
            subscriber_offers: self.subscriber_offers,
            publisher_answers: self.publisher_answers,
            pongs: self.pongs,
            keyframe_requests: self.keyframe_requests,
            publisher_connected: self.publisher.connected,
            subscriber_connected: self.subscriber.connected,
            errors: self.errors.iter().cloned().collect(),
            violations: self.violations.iter().cloned().collect(),
            messages: self.log.iter().cloned().collect(),
            ignored_candidates: self.ignored_candidates,
            blocked_transmits: self.blocked_transmits,
            closed: self.closed.clone(),
        }
    }

    fn on_message(&mut self, message: ServerMessage, now: Instant) {
        match message {
            ServerMessage::Joined {
                peer_id,
                session_id,
                request_id,
                ..
            } => {
                if self.state != SessionState::Joining {
                    self.violation(format!("joined while {:?}", self.state));
                    return;
                }
                if session_id != self.config.room {
                    self.violation(format!(
                        "joined names session {session_id:?}, we asked for {:?}",
                        self.config.room
                    ));
                }
                if request_id.as_deref() != Some(self.join_request.as_str()) {
                    self.violation(format!("joined echoes requestId {request_id:?}"));
                }
                self.peer_id = Some(peer_id);
                self.state = SessionState::Joined;
                self.milestones.joined = Some(now);
                self.negotiate_publisher();
            }
            ServerMessage::PeerJoined {
                peer_id,
                user_id,
                flags,
            } => {
                if self.peer_id.as_ref() == Some(&peer_id) {
                    self.violation("peer_joined announces ourselves".into());
                    return;
                }
                self.peers.insert(
                    peer_id,
                    RemotePeer {
                        user_id,
                        flags,
                        level: None,
                        speaking_events: 0,
                    },
                );
            }
            ServerMessage::PeerLeft { peer_id } => {
                if self.peers.remove(&peer_id).is_none() {
                    self.violation(format!("peer_left for unknown peer {peer_id}"));
                }
                if self.peers_left.len() >= MAX_PEERS_LEFT {
                    self.peers_left.pop_front();
                }
                self.peers_left.push_back(peer_id);
            }
            ServerMessage::MediaState { peer_id, flags } => {
                if self.peer_id.as_ref() == Some(&peer_id) {
                    self.violation("media_state echoed to its sender".into());
                } else if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.flags = flags;
                } else {
                    self.violation(format!("media_state for unknown peer {peer_id}"));
                }
            }
            ServerMessage::Answer { sdp, request_id } => self.on_answer(&sdp, request_id, now),
            ServerMessage::Offer { sdp } => self.on_offer(&sdp),
            ServerMessage::Candidate {
                candidate, target, ..
            } => self.on_candidate(&candidate, target),
            ServerMessage::TrackPublished {
                peer_id,
                track_id,
                kind,
                source,
            } => {
                if kind == "video"
                    && self.milestones.video_announced.is_none()
                    && self.peer_id.as_ref() != Some(&peer_id)
                {
                    self.milestones.video_announced = Some(now);
                }
                if self.announced.len() < MAX_RX_TRACKS {
                    let key = (peer_id.clone(), track_id.clone());
                    self.announced.insert(
                        key,
                        AnnouncedTrack {
                            peer_id,
                            track_id,
                            kind,
                            source,
                        },
                    );
                }
            }
            ServerMessage::TrackUnpublished { peer_id, track_id } => {
                self.announced.remove(&(peer_id, track_id));
            }
            ServerMessage::Speaking {
                peer_id,
                speaking,
                level,
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.flags.speaking = speaking;
                    p.level = level;
                    p.speaking_events += 1;
                } else if self.peer_id.as_ref() != Some(&peer_id) {
                    self.violation(format!("speaking for unknown peer {peer_id}"));
                }
            }
            ServerMessage::Kicked { reason } => {
                self.state = SessionState::Kicked { reason };
                self.audio_src.pacer.stop();
                self.video_src.pacer.stop();
            }
            ServerMessage::Error {
                code,
                message,
                request_id,
            } => {
                if self.state == SessionState::Joining {
                    self.state = SessionState::Refused {
                        code: code.clone(),
                        message: message.clone(),
                    };
                }
                if self.errors.len() >= MAX_ERRORS {
                    self.errors.pop_front();
                }
                self.errors.push_back(ServerError {
                    code,
                    message,
                    request_id,
                });
            }
            ServerMessage::Pong { .. } => self.pongs += 1,
        }
    }

    /// Sends a publisher offer when the published tracks differ from the wanted ones.
    fn negotiate_publisher(&mut self) {
        if self.state != SessionState::Joined {
            return;
        }
        if self.pending_offer.is_some() {
            self.renegotiate = true;
            return;
        }
        let stream_id = self.peer_id.clone();
        let mut api = self.publisher.rtc.sdp_api();
        for (want, slot, kind) in [
            (self.config.publish_audio, &mut self.audio, MediaKind::Audio),
            (self.config.publish_video, &mut self.video, MediaKind::Video),
        ] {
            match (want, slot.as_ref()) {
                (true, None) => {
                    let mid =
                        api.add_media(kind, Direction::SendOnly, stream_id.clone(), None, None);
                    *slot = Some(Publishing { mid, pt: None });
                }
                (false, Some(p)) => {
                    api.stop_media(p.mid);
                    *slot = None;
                }
                _ => {}
            }
        }
        if self.audio.is_none() {
            self.audio_src.pacer.stop();
        }
        if self.video.is_none() {
            self.video_src.pacer.stop();
        }
        if let Some((_, offered)) = &mut self.publisher_move {
            // The old address's candidate goes when the answer restarts the agent.
            api.ice_restart(false);
            *offered = true;
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        let request_id = self.request_id("offer");
        self.pending_offer = Some((pending, request_id.clone()));
        self.send(ClientMessage::Offer {
            sdp: offer.to_sdp_string(),
            request_id: Some(request_id),
        });
    }

    fn on_answer(&mut self, sdp: &str, request_id: Option<String>, now: Instant) {
        let Some((pending, ours)) = self.pending_offer.take() else {
            self.violation("answer without an outstanding offer".into());
            return;
        };
        self.publisher_answers += 1;
        if request_id.as_ref() != Some(&ours) {
            self.violation(format!(
                "answer echoes requestId {request_id:?}, sent {ours}"
            ));
        }
        self.learn_server_addrs(sdp);
        let accepted = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| e.to_string())
            .and_then(|answer| {
                self.publisher
                    .rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = accepted {
            self.violation(format!("publisher answer not accepted: {e}"));
            return;
        }
        if let Some((local, true)) = self.publisher_move {
            self.publisher_move = None;
            self.publisher.local = local;
            if let Ok(c) = Candidate::host(local, "udp") {
                self.publisher.rtc.add_local_candidate(c);
            }
        }
        for (slot, codec) in [
            (&mut self.audio, Codec::Opus),
            (&mut self.video, Codec::Vp8),
        ] {
            if let Some(p) = slot {
                p.pt = negotiated_pt(&self.publisher.rtc, p.mid, codec);
            }
        }
        let refused = [(&self.audio, "Opus"), (&self.video, "VP8")]
            .into_iter()
            .filter(|(slot, _)| slot.as_ref().is_some_and(|p| p.pt.is_none()))
            .map(|(_, codec)| codec)
            .collect::<Vec<_>>();
        for codec in refused {
            self.violation(format!("answer did not accept {codec}"));
        }
        self.start_sources(now);
        if std::mem::take(&mut self.renegotiate) {
            self.negotiate_publisher();
        }
    }

    fn on_offer(&mut self, sdp: &str) {
        self.subscriber_offers += 1;
        // After `leave` the server closes the socket; an answer sent into that close
        // would only make its kernel reset the connection.
        if self.state == SessionState::Left {
            return;
        }
        self.learn_server_addrs(sdp);
        let answer = SdpOffer::from_sdp_string(sdp)
            .map_err(|e| e.to_string())
            .and_then(|offer| {
                self.subscriber
                    .rtc
                    .sdp_api()
                    .accept_offer(offer)
                    .map_err(|e| e.to_string())
            });
        match answer {
            Ok(answer) => {
                self.offered = summarize(sdp).media;
                self.send(ClientMessage::Answer {
                    sdp: answer.to_sdp_string(),
                });
            }
            Err(e) => self.violation(format!("subscriber offer not accepted: {e}")),
        }
    }

    fn on_candidate(&mut self, candidate: &str, target: Target) {
        if candidate.is_empty() {
            // End of candidates: nothing to do for a full agent that already has them.
            return;
        }
        let text = candidate.strip_prefix("a=").unwrap_or(candidate);
        let c = match Candidate::from_sdp_string(text) {
            Ok(c) => c,
            Err(e) => {
                self.violation(format!("bad server candidate: {e}"));
                return;
            }
        };
        if !self.destination_allowed(c.addr()) {
            self.ignored_candidates += 1;
            return;
        }
        let leg = match target {
            Target::Publisher => Leg::Publisher,
            Target::Subscriber => Leg::Subscriber,
        };
        self.endpoint(leg).rtc.add_remote_candidate(c);
    }

    fn learn_server_addrs(&mut self, sdp: &str) {
        for addr in summarize(sdp).candidates {
            if !self.server_addrs.contains(&addr) && self.server_addrs.len() < MAX_SERVER_ADDRS {
                self.server_addrs.push(addr);
            }
        }
    }

    /// Loopback, or an address the server itself listed in an SDP: we never send
    /// anywhere else.
    fn destination_allowed(&self, addr: SocketAddr) -> bool {
        addr.ip().is_loopback() || self.server_addrs.contains(&addr)
    }

    /// Starts the media clocks of negotiated tracks once the publisher is connected.
    fn start_sources(&mut self, now: Instant) {
        if !self.publisher.connected || self.closed.is_some() || self.state != SessionState::Joined
        {
            return;
        }
        if self.audio.as_ref().is_some_and(|p| p.pt.is_some())
            && self.audio_src.pacer.next().is_none()
        {
            self.audio_src.pacer.start(now);
        }
        if self.video.as_ref().is_some_and(|p| p.pt.is_some())
            && self.video_src.pacer.next().is_none()
        {
            self.video_src.pacer.start(now);
        }
    }

    /// Generates due media and drains the connections that had input (a connection
    /// without input since its last drain has nothing new), twice at most: a keyframe
    /// request surfaced while draining makes a frame due immediately.
    fn drive(&mut self, now: Instant, mut touched: Touched) {
        for _ in 0..2 {
            touched.publisher |= self.generate_media(now);
            if touched.publisher {
                self.poll_leg(Leg::Publisher, now);
            }
            if touched.subscriber {
                self.poll_leg(Leg::Subscriber, now);
            }
            if self.poll_timeout() > now {
                break;
            }
            touched = Touched::NONE;
        }
    }

    /// Writes due media into the publisher connection; whether anything was written.
    fn generate_media(&mut self, now: Instant) -> bool {
        let before = self.sent;
        let unix = self.time_base.unix_micros(now);
        let media = &self.config.media;
        let audio_ext = ExtensionValues {
            audio_level: Some(media.audio_level),
            voice_activity: Some(media.audio_level > -127),
            ..Default::default()
        };
        if let Some(Publishing { mid, pt: Some(pt) }) = self.audio {
            while let Some(p) = self.audio_src.poll(now, unix, media) {
                self.generation.media += 1;
                self.sent.audio_packets += 1;
                self.sent.bytes += p.payload.len() as u64;
                if self.rotate_audio_ssrc {
                    let mut api = self.publisher.rtc.direct_api();
                    let ssrc = api.new_ssrc();
                    api.reset_stream_tx(mid, None, ssrc, None);
                }
                write_rtp(
                    &mut self.publisher.rtc,
                    mid,
                    pt,
                    p,
                    now,
                    audio_ext.clone(),
                    false,
                );
            }
        }
        if let Some(Publishing { mid, pt: Some(pt) }) = self.video {
            loop {
                let packets = self.video_src.poll(now, unix, media);
                let Some(first) = packets.first() else {
                    break;
                };
                self.generation.media += 1;
                self.sent.video_frames += 1;
                if parse_vp8(&first.payload).is_some_and(|i| i.keyframe) {
                    self.sent.keyframes += 1;
                }
                for p in packets {
                    self.sent.video_packets += 1;
                    self.sent.bytes += p.payload.len() as u64;
                    let ext = ExtensionValues::default();
                    write_rtp(&mut self.publisher.rtc, mid, pt, p, now, ext, true);
                }
            }
        }
        self.sent != before
    }

    /// Drains one connection's output until it reports its next timeout.
    fn poll_leg(&mut self, leg: Leg, now: Instant) {
        loop {
            let endpoint = self.endpoint(leg);
            if !endpoint.rtc.is_alive() {
                endpoint.timeout = now + IDLE;
                return;
            }
            let output = match endpoint.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    endpoint.rtc.disconnect();
                    self.violation(format!("{leg:?} connection failed: {e}"));
                    return;
                }
            };
            match output {
                Output::Timeout(t) => {
                    self.endpoint(leg).timeout = t;
                    return;
                }
                Output::Transmit(t) => {
                    if !self.destination_allowed(t.destination) {
                        self.blocked_transmits += 1;
                    } else if self.out_transmit.len() < MAX_QUEUED_TRANSMITS {
                        self.out_transmit.push_back(Transmit {
                            leg,
                            destination: t.destination,
                            contents: t.contents.into(),
                        });
                    }
                }
                Output::Event(e) => self.on_event(leg, e, now),
            }
        }
    }

    fn on_event(&mut self, leg: Leg, event: Event, now: Instant) {
        match (leg, event) {
            (_, Event::Connected) => {
                self.endpoint(leg).connected = true;
                self.generation.signaling += 1;
                self.start_sources(now);
            }
            (Leg::Publisher, Event::KeyframeRequest(req))
                if self.video.as_ref().is_some_and(|v| v.mid == req.mid) =>
            {
                self.keyframe_requests += 1;
                self.video_src.request_keyframe(now);
            }
            (Leg::Subscriber, Event::RtpPacket(packet)) => self.on_rtp(&packet),
            _ => {}
        }
    }

    fn on_rtp(&mut self, packet: &RtpPacket) {
        self.generation.media += 1;
        let mid = packet.header.ext_vals.mid.or_else(|| {
            self.subscriber
                .rtc
                .direct_api()
                .stream_rx(&packet.header.ssrc)
                .map(|s| s.mid())
        });
        let section = mid.and_then(|mid| {
            self.offered
                .iter()
                .find(|s| s.mid == *mid && s.stream_id.is_some())
        });
        let Some(section) = section else {
            self.unattributed_packets += 1;
            return;
        };
        let kind = match section.kind.as_str() {
            "audio" => MediaKind::Audio,
            "video" => MediaKind::Video,
            _ => {
                self.unattributed_packets += 1;
                return;
            }
        };
        let key = (
            section.mid.clone(),
            section.stream_id.clone().unwrap_or_default(),
            section.track_id.clone().unwrap_or_default(),
        );
        let codec = section.codecs.get(&*packet.header.payload_type).cloned();
        if !self.rx.contains_key(&key) && self.rx.len() >= MAX_RX_TRACKS {
            self.unattributed_packets += 1;
            return;
        }
        if kind == MediaKind::Video && self.milestones.first_video.is_none() {
            self.milestones.first_video = Some(packet.timestamp);
        }
        let received_unix = self.time_base.unix_micros(packet.timestamp);
        let track = self.rx.entry(key).or_insert_with(|| TrackRx::new(kind));
        track.packets += 1;
        track.bytes += packet.payload.len() as u64;
        track.last_received = Some(packet.timestamp);
        if codec
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("vp8"))
            && parse_vp8(&packet.payload).is_some_and(|i| i.keyframe)
        {
            track.keyframes += 1;
            self.milestones
                .first_keyframe
                .get_or_insert(packet.timestamp);
        }
        track.codec = codec;
        match Stamp::from_trailer(&packet.payload) {
            Some(stamp) => {
                track.seq.record(stamp.seq);
                let latency = received_unix.saturating_sub(stamp.sent_unix_micros);
                track.latency.record(latency);
                self.interval_latency
                    .get_or_insert_with(Histogram::default)
                    .record(latency);
            }
            None => track.unstamped += 1,
        }
    }

    /// Counting mode: one RTP packet seen only by its clear header.
    fn count_rtp(&mut self, rtp: ClearRtp, at: Instant) {
        self.generation.media += 1;
        if self.milestones.first_video.is_none()
            && self
                .offered
                .iter()
                .any(|m| m.kind == "video" && m.codecs.contains_key(&rtp.pt))
        {
            self.milestones.first_video = Some(at);
        }
        // A linear scan: a subscriber receives a few streams per publisher, and the
        // SSRCs sit in one small contiguous array.
        let index = match self.clear_rx.iter().position(|(ssrc, _)| *ssrc == rtp.ssrc) {
            Some(i) => i,
            None if self.clear_rx.len() < MAX_RX_TRACKS => {
                self.clear_rx.push((rtp.ssrc, RtpSeqTracker::default()));
                self.clear_rx.len() - 1
            }
            None => {
                self.unattributed_packets += 1;
                return;
            }
        };
        self.clear_rx[index].1.record(rtp.seq);
    }

    fn endpoint(&mut self, leg: Leg) -> &mut Endpoint {
        match leg {
            Leg::Publisher => &mut self.publisher,
            Leg::Subscriber => &mut self.subscriber,
        }
    }

    /// Time never goes backwards for str0m, even when a datagram's receive time is
    /// older than a timeout already handled.
    fn advance(&mut self, now: Instant) -> Instant {
        self.last_now = self.last_now.max(now);
        self.last_now
    }

    fn request_id(&mut self, what: &str) -> String {
        let id = format!("{what}-{}", self.next_request);
        self.next_request += 1;
        id
    }

    fn violation(&mut self, what: String) {
        self.generation.signaling += 1;
        if self.violations.len() >= MAX_VIOLATIONS {
            self.violations.pop_front();
        }
        self.violations.push_back(what);
    }
}

/// The clear fields of an SRTP packet's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClearRtp {
    pt: u8,
    seq: u16,
    ssrc: u32,
}

impl ClearRtp {
    /// RTP (not RTCP, STUN or DTLS) by RFC 7983's first byte and RFC 5761's payload
    /// type ranges; `None` for anything else.
    fn parse(datagram: &[u8]) -> Option<ClearRtp> {
        let header = datagram.get(..12)?;
        let pt = header[1] & 0x7f;
        if !(128..=191).contains(&header[0]) || (64..=95).contains(&pt) {
            return None;
        }
        Some(ClearRtp {
            pt,
            seq: u16::from_be_bytes([header[2], header[3]]),
            ssrc: u32::from_be_bytes([header[8], header[9], header[10], header[11]]),
        })
    }
}

/// The payload type the answer accepted for `codec` on `mid`.
fn negotiated_pt(rtc: &Rtc, mid: Mid, codec: Codec) -> Option<Pt> {
    let remote = rtc.media(mid)?.remote_pts();
    rtc.codec_config()
        .find(|p| p.spec().codec == codec && remote.contains(&p.pt()))
        .map(|p| p.pt())
}

fn write_rtp(
    rtc: &mut Rtc,
    mid: Mid,
    pt: Pt,
    packet: MediaPacket,
    now: Instant,
    ext: ExtensionValues,
    nackable: bool,
) {
    let mut api = rtc.direct_api();
    let Some(stream) = api.stream_tx_by_mid(mid, None) else {
        return;
    };
    stream.write_rtp(
        RtpWrite::new(
            pt,
            packet.rtp_seq.into(),
            packet.rtp_time,
            now,
            packet.payload,
        )
        .marker(packet.marker)
        .nackable(nackable)
        .ext_vals(ext),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{Stamp, audio_payload};
    use str0m::change::SdpApi;
    use str0m::media::KeyframeRequestKind;

    const PUB: &str = "127.0.0.1:50000";
    const SUB: &str = "127.0.0.1:50001";
    const SERVER_PUB: &str = "127.0.0.1:40000";
    const SERVER_SUB: &str = "127.0.0.1:40001";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn new_peer(now: Instant) -> Peer {
        let config = PeerConfig {
            message_log_capacity: 4,
            ..PeerConfig::new("room", "alice")
        };
        Peer::new(
            config,
            TimeBase::new(now, 1_000_000),
            addr(PUB),
            addr(SUB),
            now,
        )
    }

    fn signals(peer: &mut Peer) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| peer.poll_signal())
            .map(|s| serde_json::from_str(&s).unwrap())
            .collect()
    }

    fn joined(peer: &mut Peer, now: Instant) -> Vec<serde_json::Value> {
        signals(peer);
        peer.handle_signal(
            r#"{"type":"joined","peerId":"me","sessionId":"room","iceServers":[],"requestId":"join-1"}"#,
            now,
        );
        signals(peer)
    }

    #[test]
    fn joins_then_offers_both_tracks_under_our_peer_id() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        let join = signals(&mut peer);
        assert_eq!(
            join,
            vec![
                serde_json::json!({"type":"join","sessionId":"room","userId":"alice","requestId":"join-1"})
            ]
        );
        let out = joined(&mut peer, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["type"], "offer");
        assert_eq!(out[0]["requestId"], "offer-2");
        let sdp = summarize(out[0]["sdp"].as_str().unwrap());
        let kinds: Vec<_> = sdp.media.iter().map(|m| m.kind.as_str()).collect();
        assert_eq!(kinds, ["audio", "video"]);
        for m in &sdp.media {
            assert_eq!(m.direction, "sendonly");
            assert_eq!(m.stream_id.as_deref(), Some("me"));
        }
        assert_eq!(sdp.candidates, vec![addr(PUB)]);
        let video_codecs: Vec<_> = sdp.media[1].codecs.values().collect();
        assert!(video_codecs.iter().all(|c| *c == "VP8" || *c == "rtx"));
        let stats = peer.stats();
        assert_eq!(stats.state, SessionState::Joined);
        assert_eq!(stats.peer_id.as_deref(), Some("me"));
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    }

    #[test]
    fn refused_join_and_bounded_log() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        peer.handle_signal(
            r#"{"type":"error","code":"room_full","message":"full","requestId":"join-1"}"#,
            now,
        );
        assert_eq!(
            peer.stats().state,
            SessionState::Refused {
                code: "room_full".into(),
                message: "full".into()
            }
        );
        for _ in 0..10 {
            peer.handle_signal(r#"{"type":"pong"}"#, now);
        }
        let stats = peer.stats();
        assert_eq!(stats.messages.len(), 4);
        assert_eq!(stats.pongs, 10);
        assert!(stats.has_error("room_full"));
        // Refused: no offer was made.
        assert!(signals(&mut peer).iter().all(|m| m["type"] == "join"));
    }

    #[test]
    fn room_membership_and_violations() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        joined(&mut peer, now);
        let flags =
            r#""audioEnabled":true,"videoEnabled":true,"screenEnabled":false,"speaking":false"#;
        peer.handle_signal(
            &format!(r#"{{"type":"peer_joined","peerId":"bob","userId":"b",{flags}}}"#),
            now,
        );
        peer.handle_signal(
            &format!(
                r#"{{"type":"media_state","peerId":"bob",{}}}"#,
                flags.replace("true", "false")
            ),
            now,
        );
        peer.handle_signal(
            r#"{"type":"speaking","peerId":"bob","speaking":true,"level":30}"#,
            now,
        );
        let bob = peer.stats().peers["bob"].clone();
        assert_eq!(bob.user_id, "b");
        assert!(!bob.flags.audio_enabled);
        assert!(bob.flags.speaking);
        assert_eq!((bob.level, bob.speaking_events), (Some(30), 1));

        peer.handle_signal(
            r#"{"type":"track_published","peerId":"bob","trackId":"t","kind":"audio","source":"mic"}"#,
            now,
        );
        assert_eq!(peer.stats().announced_tracks.len(), 1);
        peer.handle_signal(
            r#"{"type":"track_unpublished","peerId":"bob","trackId":"t"}"#,
            now,
        );
        assert!(peer.stats().announced_tracks.is_empty());

        peer.handle_signal(r#"{"type":"peer_left","peerId":"bob"}"#, now);
        let stats = peer.stats();
        assert!(stats.peers.is_empty());
        assert_eq!(stats.peers_left, ["bob"]);
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);

        // Echoed media state, unknown types, a missing field, an unsolicited answer.
        peer.handle_signal(
            &format!(r#"{{"type":"media_state","peerId":"me",{flags}}}"#),
            now,
        );
        peer.handle_signal(r#"{"type":"bogus"}"#, now);
        peer.handle_signal(r#"{"type":"peer_left"}"#, now);
        peer.handle_signal(r#"not json"#, now);
        let stats = peer.stats();
        assert_eq!(stats.violations.len(), 4, "{:?}", stats.violations);
        assert_eq!(stats.messages.last().unwrap().kind, "");
        assert_eq!(stats.messages[1].kind, "bogus");

        peer.handle_signal(r#"{"type":"kicked","reason":"bye"}"#, now);
        assert_eq!(
            peer.stats().state,
            SessionState::Kicked {
                reason: "bye".into()
            }
        );
        peer.handle_signaling_closed(Some(4000), "kicked".into());
        assert!(peer.is_finished());
    }

    #[test]
    fn refuses_to_send_anywhere_but_loopback_or_the_servers_sdp() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        joined(&mut peer, now);
        peer.handle_signal(
            r#"{"type":"candidate","candidate":"candidate:1 1 udp 2130706431 8.8.8.8 3478 typ host","sdpMid":"0","sdpMLineIndex":0,"target":"subscriber"}"#,
            now,
        );
        peer.handle_signal(
            r#"{"type":"candidate","candidate":"","sdpMid":null,"sdpMLineIndex":null}"#,
            now,
        );
        let stats = peer.stats();
        assert_eq!(stats.ignored_candidates, 1);
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
        assert!(peer.destination_allowed(addr("[::1]:5")));
        assert!(!peer.destination_allowed(addr("10.0.0.1:5")));
    }

    /// An ICE-lite str0m pair standing in for the server's two connections.
    struct FakeServer {
        publisher: Rtc,
        subscriber: Rtc,
        received: Vec<RtpPacket>,
    }

    impl FakeServer {
        fn new(now: Instant) -> Self {
            let rtc = |a: &str| {
                let mut rtc = Rtc::builder()
                    .set_ice_lite(true)
                    .set_rtp_mode(true)
                    .build(now);
                rtc.add_local_candidate(Candidate::host(addr(a), "udp").unwrap());
                rtc
            };
            Self {
                publisher: rtc(SERVER_PUB),
                subscriber: rtc(SERVER_SUB),
                received: Vec::new(),
            }
        }

        /// Moves datagrams both ways until everyone is idle at `now`.
        fn exchange(&mut self, peer: &mut Peer, now: Instant) {
            for leg in [Leg::Publisher, Leg::Subscriber] {
                self.rtc(leg).handle_input(Input::Timeout(now)).unwrap();
                self.drain(leg, peer, now);
            }
            for _ in 0..100 {
                let Some(t) = peer.poll_transmit() else {
                    return;
                };
                let (leg, source) = match t.destination.to_string().as_str() {
                    SERVER_PUB => (Leg::Publisher, addr(PUB)),
                    SERVER_SUB => (Leg::Subscriber, addr(SUB)),
                    other => panic!("peer sent to {other}"),
                };
                let input = Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: t.destination,
                        contents: t.contents.as_slice().try_into().unwrap(),
                    },
                );
                self.rtc(leg).handle_input(input).unwrap();
                // str0m holds one received RTP packet until polled: drain per input.
                self.drain(leg, peer, now);
            }
            panic!("no quiescence");
        }

        fn rtc(&mut self, leg: Leg) -> &mut Rtc {
            match leg {
                Leg::Publisher => &mut self.publisher,
                Leg::Subscriber => &mut self.subscriber,
            }
        }

        fn drain(&mut self, leg: Leg, peer: &mut Peer, now: Instant) {
            let source = match leg {
                Leg::Publisher => addr(SERVER_PUB),
                Leg::Subscriber => addr(SERVER_SUB),
            };
            loop {
                match self.rtc(leg).poll_output().unwrap() {
                    Output::Timeout(_) => return,
                    Output::Transmit(t) => peer.handle_datagram(leg, source, &t.contents, now),
                    Output::Event(Event::RtpPacket(p)) => self.received.push(p),
                    Output::Event(_) => {}
                }
            }
        }
    }

    impl FakeServer {
        /// Changes the subscriber connection with `edit`, offers it to the peer, and
        /// applies the peer's answer.
        fn offer_subscriber<T>(
            &mut self,
            peer: &mut Peer,
            now: Instant,
            edit: impl FnOnce(&mut SdpApi) -> T,
        ) -> T {
            let mut change = self.subscriber.sdp_api();
            let edited = edit(&mut change);
            let (offer, pending) = change.apply().unwrap();
            let offer = serde_json::json!({"type":"offer","sdp":offer.to_sdp_string()});
            peer.handle_signal(&offer.to_string(), now);
            let answer = signals(peer).remove(0);
            assert_eq!(answer["type"], "answer");
            let answer = SdpAnswer::from_sdp_string(answer["sdp"].as_str().unwrap()).unwrap();
            self.subscriber
                .sdp_api()
                .accept_answer(pending, answer)
                .unwrap();
            edited
        }

        /// 20 ms of audio from "bob" with stamp `seq`, stamped 5 ms before `now`.
        fn write_audio(&mut self, mid: Mid, seq: u64, start: Instant, now: Instant) {
            let opus = self
                .subscriber
                .codec_config()
                .find(|p| p.spec().codec == Codec::Opus)
                .unwrap()
                .pt();
            let stamp = Stamp {
                seq,
                sent_unix_micros: 1_000_000 + (now.duration_since(start).as_micros() as u64)
                    - 5_000,
            };
            let mut api = self.subscriber.direct_api();
            let tx = api.stream_tx_by_mid(mid, None).unwrap();
            tx.write_rtp(RtpWrite::new(
                opus,
                (100 + seq).into(),
                seq as u32 * 960,
                now,
                audio_payload(100, stamp),
            ));
        }
    }

    /// Joins `peer`, answers its publisher offer, and has it accept a subscriber
    /// offer with "bob"'s audio; returns the fake server and the audio's mid.
    fn negotiated(mut peer: Peer, now: Instant) -> (Peer, FakeServer, Mid) {
        let mut server = FakeServer::new(now);
        let offer = joined(&mut peer, now).remove(0);
        answer_offer(&mut peer, &mut server, &offer, now);
        let audio_mid = server.offer_subscriber(&mut peer, now, |change| {
            change.add_media(
                MediaKind::Audio,
                Direction::SendOnly,
                Some("bob".into()),
                Some("bobmic".into()),
                None,
            )
        });
        (peer, server, audio_mid)
    }

    #[test]
    fn nothing_is_answered_after_leave() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        joined(&mut peer, now);
        peer.leave();
        assert_eq!(signals(&mut peer), [serde_json::json!({"type": "leave"})]);
        let mut server = FakeServer::new(now);
        let mut change = server.subscriber.sdp_api();
        change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, _) = change.apply().unwrap();
        let offer = serde_json::json!({"type":"offer","sdp":offer.to_sdp_string()});
        peer.handle_signal(&offer.to_string(), now);
        assert!(signals(&mut peer).is_empty());
        assert_eq!(peer.stats().subscriber_offers, 1);
    }

    #[test]
    fn clear_rtp_headers_are_told_from_other_datagrams() {
        let mut rtp = vec![
            0x80,
            0x80 | 111,
            0x12,
            0x34,
            0,
            0,
            0,
            1,
            0xde,
            0xad,
            0xbe,
            0xef,
        ];
        assert_eq!(
            ClearRtp::parse(&rtp),
            Some(ClearRtp {
                pt: 111,
                seq: 0x1234,
                ssrc: 0xdead_beef
            })
        );
        assert_eq!(ClearRtp::parse(&rtp[..11]), None, "short");
        rtp[1] = 200; // RTCP sender report
        assert_eq!(ClearRtp::parse(&rtp), None);
        rtp[1] = 0x80 | 95; // RFC 5761: PT 64..=95 is RTCP's range
        assert_eq!(ClearRtp::parse(&rtp), None);
        rtp[0] = 0x00; // STUN
        rtp[1] = 0x01;
        assert_eq!(ClearRtp::parse(&rtp), None);
        rtp[0] = 22; // DTLS handshake
        assert_eq!(ClearRtp::parse(&rtp), None);
    }

    /// A counting subscriber never decrypts media, yet its ICE and DTLS stay up and
    /// it counts packets and gaps from the clear headers.
    #[test]
    fn counting_subscriber_reads_headers_and_keeps_its_connection() {
        let start = Instant::now();
        let mut now = start;
        let config = PeerConfig {
            measure: false,
            ..PeerConfig::new("room", "alice")
        };
        let peer = Peer::new(
            config,
            TimeBase::new(now, 1_000_000),
            addr(PUB),
            addr(SUB),
            now,
        );
        let (mut peer, mut server, audio_mid) = negotiated(peer, now);
        assert!(peer.milestones().joined.is_some());
        let mut written = 0;
        let mut seq = 0;
        while now < start + Duration::from_secs(2) {
            now += Duration::from_millis(5);
            peer.handle_timeout(now);
            server.exchange(&mut peer, now);
            if server.subscriber.is_connected()
                && now.duration_since(start).as_millis().is_multiple_of(20)
            {
                // Packet 10 is never sent: one gap.
                if seq != 10 {
                    server.write_audio(audio_mid, seq, start, now);
                    written += 1;
                }
                seq += 1;
            }
        }
        server.exchange(&mut peer, now);
        let totals = peer.rx_totals();
        assert!(written > 50, "{written}");
        assert_eq!(totals.packets, written);
        assert_eq!((totals.received, totals.lost), (written, 1));
        assert!(totals.bytes > written * 100);
        let stats = peer.stats();
        assert!(stats.tracks.is_empty(), "nothing was decrypted");
        assert!(stats.subscriber_connected);
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
        assert_eq!(peer.milestones().first_video, None, "audio only");
        let mut latency = Histogram::default();
        peer.drain_latency(&mut latency);
        assert_eq!(latency.count(), 0);
    }

    /// Answers the peer's pending publisher offer the way the server would.
    fn answer_offer(
        peer: &mut Peer,
        server: &mut FakeServer,
        offer: &serde_json::Value,
        now: Instant,
    ) {
        let sdp = SdpOffer::from_sdp_string(offer["sdp"].as_str().unwrap()).unwrap();
        let answer = server.publisher.sdp_api().accept_offer(sdp).unwrap();
        let answer = serde_json::json!({
            "type": "answer",
            "sdp": answer.to_sdp_string(),
            "requestId": offer["requestId"],
        });
        peer.handle_signal(&answer.to_string(), now);
    }

    #[test]
    fn unpublishing_waits_for_the_answer_then_renegotiates() {
        let now = Instant::now();
        let mut peer = new_peer(now);
        let mut server = FakeServer::new(now);
        let first = joined(&mut peer, now).remove(0);
        peer.set_publish(false, true, now);
        assert!(signals(&mut peer).is_empty(), "one offer at a time");
        answer_offer(&mut peer, &mut server, &first, now);
        let second = signals(&mut peer).remove(0);
        assert_eq!(second["type"], "offer");
        assert_eq!(second["requestId"], "offer-3");
        let sdp = summarize(second["sdp"].as_str().unwrap());
        assert!(
            !sdp.media[0].is_active_send(),
            "audio stopped: {:?}",
            sdp.media[0]
        );
        assert!(sdp.media[1].is_active_send());
        answer_offer(&mut peer, &mut server, &second, now);
        let stats = peer.stats();
        assert_eq!(stats.publisher_answers, 2);
        assert_eq!(stats.published.len(), 1);
        assert_eq!(stats.published[0].kind, MediaKind::Video);
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    }

    /// The whole peer against an in-memory ICE-lite "server": publisher offer/answer,
    /// subscriber offer/answer, ICE+DTLS on both legs, media both ways, keyframe
    /// requests, and attribution of received media to the msid of the offer.
    #[test]
    fn media_flows_both_ways_through_a_fake_server() {
        let start = Instant::now();
        let mut now = start;
        let (mut peer, mut server, audio_mid) = negotiated(new_peer(now), now);
        let mut sent = 0u64;
        let mut requested = false;
        while now < start + Duration::from_secs(3) {
            now += Duration::from_millis(5);
            peer.handle_timeout(now);
            server.exchange(&mut peer, now);
            if server.subscriber.is_connected()
                && now.duration_since(start).as_millis().is_multiple_of(20)
            {
                server.write_audio(audio_mid, sent, start, now);
                sent += 1;
            }
            if !requested && now > start + Duration::from_millis(2500) {
                requested = true;
                let video = peer.stats().published[1].mid.as_str().into();
                let mut api = server.publisher.direct_api();
                let rx = api.stream_rx_by_mid(video, None).unwrap();
                rx.request_keyframe(KeyframeRequestKind::Pli);
            }
        }

        let stats = peer.stats();
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
        assert!(stats.publisher_connected && stats.subscriber_connected);
        assert_eq!(
            stats.active_msids(),
            [("bob".to_string(), "bobmic".to_string())]
        );

        // What we received from "bob".
        let track = stats.track("bob", MediaKind::Audio).expect("bob's audio");
        assert_eq!(track.track_id, "bobmic");
        assert_eq!(track.codec.as_deref(), Some("opus"));
        assert!(track.packets > 50, "{track:?}");
        assert_eq!((track.lost, track.duplicates, track.unstamped), (0, 0, 0));
        // Stamped 5 ms before the write, delivered at the next 5 ms step.
        let latency = track.latency_us.unwrap();
        assert_eq!((latency.min, latency.max), (10_000, 10_000), "{latency:?}");

        // What the server received from us.
        let published = &stats.published;
        assert_eq!(published.len(), 2);
        assert!(
            published
                .iter()
                .all(|p| p.pt.is_some() && !p.track_id.is_empty())
        );
        let from_us = |mid: &str| {
            server
                .received
                .iter()
                .filter(|p| p.header.ext_vals.mid.is_some_and(|m| &*m == mid))
                .collect::<Vec<_>>()
        };
        let audio = from_us(&published[0].mid);
        eprintln!(
            "sent {:?} rtpseqs {:?}",
            stats.sent,
            audio
                .iter()
                .map(|p| (*p.seq_no, p.header.timestamp))
                .take(12)
                .collect::<Vec<_>>()
        );
        let video = from_us(&published[1].mid);
        assert!(audio.len() > 100, "{} audio packets", audio.len());
        assert!(video.len() > 60, "{} video packets", video.len());
        let stamps: Vec<_> = audio
            .iter()
            .map(|p| Stamp::from_trailer(&p.payload).unwrap().seq)
            .collect();
        assert!(stamps.windows(2).all(|w| w[1] == w[0] + 1), "{stamps:?}");
        let first = parse_vp8(&video[0].payload).unwrap();
        assert!(first.keyframe, "video starts with a keyframe");
        assert_eq!(
            video
                .iter()
                .filter(|p| parse_vp8(&p.payload).unwrap().keyframe)
                .count() as u64,
            stats.sent.keyframes
        );
        // Periodic keyframes at the start and 2 s later, one on the request at 2.5 s.
        assert_eq!(stats.keyframe_requests, 1);
        assert_eq!(stats.sent.keyframes, 3);
        assert!(
            video.iter().filter(|p| p.header.marker).count() as u64 >= stats.sent.video_frames - 1
        );

        // The server stops bob's track: the next offer no longer lists it.
        server.offer_subscriber(&mut peer, now, |change| change.stop_media(audio_mid));
        let stats = peer.stats();
        assert_eq!(stats.subscriber_offers, 2);
        assert!(stats.active_msids().is_empty(), "{:?}", stats.offered);
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    }
}
