//! One harness thread: a mio event loop multiplexing many [`Peer`]s, each with its
//! nonblocking WebSocket and two nonblocking UDP sockets (the server tells
//! participants apart by source address, so every leg keeps its own socket).
//!
//! The loop waits for readiness or the earliest deadline (a peer's timer, a planned
//! join), feeds what arrived to the peers and sends what they produce. mio is
//! edge-triggered, so every ready socket is drained until it would block. The
//! coordinator asks for a [`WorkerStats`] every second and for a stop at the end,
//! through a channel and a mio [`Waker`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::ClientConfig;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Connector, Message, WebSocket};

use crate::client::transient_udp_error;
use crate::janus::{self, JanusPeer};
use crate::media::MediaConfig;
use crate::peer::{
    ClientStats, CloseInfo, Leg, Milestones, Peer, PeerConfig, RxTotals, SentStats, SessionState,
    TimeBase,
};
use crate::probe;
use crate::report::PeerFigures;
use crate::scenario::Scenario;
use crate::scenario::Target;
use crate::stats::Histogram;

/// The waker's token; session tokens are `slot * 3 + socket`.
const WAKER: Token = Token(usize::MAX);
const SOCKETS_PER_SESSION: usize = 3;
/// How long a leaving participant waits for the server's close before giving up.
pub(crate) const LEAVE_GRACE: Duration = Duration::from_secs(5);
/// A participant joined this long with another publisher in its room should have
/// received media.
const MEDIA_GRACE: Duration = Duration::from_secs(3);
/// Bounds on the keyed counters and samples a worker reports.
const MAX_REASONS: usize = 32;
pub(crate) const MAX_VIOLATION_SAMPLES: usize = 8;
/// Receive buffer of each UDP socket, so a briefly stalled loop does not drop media
/// (the kernel caps it at `net.core.rmem_max`).
const UDP_RECV_BUFFER: libc::c_int = 1 << 20;
/// Largest datagram read; bigger ones are truncated and fail authentication.
const MAX_DATAGRAM: usize = 2048;
/// Bounds on a participant's signaling: one message, and what may queue unsent.
const MAX_WS_MESSAGE: usize = 1 << 20;
const MAX_WS_WRITE_BUFFER: usize = 1 << 20;
/// Deadline of a session with nothing scheduled.
const FAR: Duration = Duration::from_secs(3600);

/// A participant's place in the plan: its room and position there. Churn replaces a
/// participant that left with a new one in the same seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Seat {
    pub room: usize,
    pub index: usize,
}

/// What the coordinator asks of a worker.
pub(crate) enum Command {
    /// Send a [`WorkerStats`].
    Report,
    /// Everyone leaves; send a final [`WorkerStats`] and exit.
    Stop,
}

/// A worker's report. Counters are totals since the start; histograms and the lag
/// cover the time since the previous report.
#[derive(Debug, Default)]
pub(crate) struct WorkerStats {
    pub worker: usize,
    /// Participants connecting or waiting for `joined`.
    pub connecting: u64,
    /// Participants joined and not leaving.
    pub joined: u64,
    /// Joins, failures, ends, errors (`planned` and `peak_joined` unused).
    pub peers: PeerFigures,
    /// Received by participants that measure (stamps) and that count (RTP headers).
    pub measured: RxTotals,
    pub counted: RxTotals,
    pub sent_packets: u64,
    /// Datagrams our sockets refused (send buffer full): the harness's own loss.
    pub tx_dropped: u64,
    pub latency: Histogram,
    pub join_times: JoinTimes,
    /// Latest a timer or planned join ran past its due time.
    pub lag: Duration,
    /// This thread's running and waiting times.
    pub times: Option<probe::ThreadTimes>,
    /// No session is live and none is due: nothing more can happen in this worker.
    pub idle: bool,
    /// The last report: every session has ended.
    pub done: bool,
}

/// The join figures of one report interval, in microseconds.
#[derive(Debug, Default)]
pub(crate) struct JoinTimes {
    /// `join` sent to `joined`.
    pub join: Histogram,
    /// TCP connect started to `joined`.
    pub connect: Histogram,
    /// To the first remote video packet, from when video was both asked for and
    /// announced.
    pub first_video: Histogram,
    /// The same, to the first packet of a remote keyframe (participants that decrypt).
    pub first_keyframe: Histogram,
}

impl JoinTimes {
    pub fn merge(&mut self, other: &JoinTimes) {
        self.join.merge(&other.join);
        self.connect.merge(&other.connect);
        self.first_video.merge(&other.first_video);
        self.first_keyframe.merge(&other.first_keyframe);
    }
}

/// Everything a worker is given.
pub(crate) struct WorkerSetup {
    pub id: usize,
    pub scenario: Arc<Scenario>,
    /// Signaling URL of every room.
    pub urls: Arc<Vec<String>>,
    pub server: SocketAddr,
    /// For `wss://` URLs.
    pub tls: Option<Arc<ClientConfig>>,
    /// Address our UDP sockets bind to (the one that routes to the server).
    pub local_ip: IpAddr,
    pub time_base: TimeBase,
    /// This worker's joins, in time order.
    pub plan: Vec<(Instant, Seat)>,
    pub poll: Poll,
    pub commands: Receiver<Command>,
    pub reports: Sender<WorkerStats>,
}

/// A poll with its waker: how the coordinator reaches a worker blocked in `poll`.
pub(crate) fn poll_with_waker() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

/// Runs the event loop until stopped (or the coordinator is gone).
pub(crate) fn run(setup: WorkerSetup) {
    let mut worker = Worker {
        plan: setup
            .plan
            .into_iter()
            .map(|(at, seat)| (at, seat, 0))
            .collect(),
        id: setup.id,
        scenario: setup.scenario,
        urls: setup.urls,
        server: setup.server,
        tls: setup.tls,
        local_ip: setup.local_ip,
        time_base: setup.time_base,
        poll: setup.poll,
        commands: setup.commands,
        reports: setup.reports,
        slots: Vec::new(),
        free: Vec::new(),
        timers: BinaryHeap::new(),
        rejoin: Vec::new(),
        stats: WorkerStats::default(),
        retired: Retired::default(),
        stopping: false,
        buf: vec![0; MAX_DATAGRAM],
    };
    worker.run();
}

/// What ended sessions leave behind in the totals.
#[derive(Default)]
struct Retired {
    measured: RxTotals,
    counted: RxTotals,
    sent_packets: u64,
}

struct Worker {
    id: usize,
    scenario: Arc<Scenario>,
    urls: Arc<Vec<String>>,
    server: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    local_ip: IpAddr,
    time_base: TimeBase,
    poll: Poll,
    commands: Receiver<Command>,
    reports: Sender<WorkerStats>,
    /// Sessions by slot; a slot's index is its token base.
    slots: Vec<Option<Session>>,
    free: Vec<usize>,
    /// (due, slot); an entry is current only while it equals its session's `wake`.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Planned joins (due, seat, incarnation), in time order.
    plan: VecDeque<(Instant, Seat, u32)>,
    /// Churn: seats to fill again at once.
    rejoin: Vec<(Seat, u32)>,
    stats: WorkerStats,
    retired: Retired,
    stopping: bool,
    buf: Vec<u8>,
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != ErrorKind::Interrupted
            {
                self.stats
                    .peers
                    .violation_samples
                    .push(format!("worker {} poll failed: {e}", self.id));
                self.send_report(true);
                return;
            }
            for event in events.iter() {
                if event.token() != WAKER {
                    self.on_ready(event.token());
                }
            }
            if !self.on_commands() {
                return;
            }
            self.start_due_joins();
            self.run_timers();
            if self.stopping && self.live() == 0 {
                self.send_report(true);
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let join = self.plan.front().map(|(at, ..)| *at);
        let rejoin = (!self.rejoin.is_empty()).then(Instant::now);
        [timer, join, rejoin].into_iter().flatten().min()
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Handles the coordinator's commands; `false` when the worker must exit.
    fn on_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Report) => {
                    if !self.send_report(false) {
                        return false;
                    }
                }
                Ok(Command::Stop) => self.stop(),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Everyone joined leaves cleanly; everyone still joining gives up.
    fn stop(&mut self) {
        self.stopping = true;
        self.plan.clear();
        self.rejoin.clear();
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let Some(session) = self.slots[slot].as_mut() else {
                continue;
            };
            if session.peer.milestones().joined.is_some() {
                session.leave(now);
            } else {
                session.end = Some(End::Failed("run ended before joined".into()));
            }
            self.settle(slot, now);
        }
    }

    fn start_due_joins(&mut self) {
        let now = Instant::now();
        while let Some(&(at, seat, incarnation)) = self.plan.front() {
            if at > now {
                break;
            }
            self.plan.pop_front();
            self.stats.lag = self.stats.lag.max(now - at);
            self.start(seat, incarnation, now);
        }
        for (seat, incarnation) in std::mem::take(&mut self.rejoin) {
            self.start(seat, incarnation, now);
        }
    }

    fn start(&mut self, seat: Seat, incarnation: u32, now: Instant) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        match self.open(seat, incarnation, slot, now) {
            Ok(session) => {
                self.slots[slot] = Some(session);
                self.settle(slot, now);
            }
            Err(e) => {
                self.free.push(slot);
                count(
                    &mut self.stats.peers.join_failures,
                    format!("connect: {:?}", e.kind()),
                );
            }
        }
    }

    fn open(&self, seat: Seat, incarnation: u32, slot: usize, now: Instant) -> io::Result<Session> {
        let scenario = &self.scenario;
        let publishes = seat.index < scenario.publishers_per_room();
        let measured = seat.index >= scenario.peers - scenario.measured_per_room();
        let url = self
            .urls
            .get(seat.room)
            .cloned()
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "no URL for room"))?;
        let mut tcp = TcpStream::connect(self.server)?;
        tcp.set_nodelay(true)?;
        let mut publisher = udp_socket(self.local_ip)?;
        let mut subscriber = udp_socket(self.local_ip)?;
        let registry = self.poll.registry();
        let base = slot * SOCKETS_PER_SESSION;
        registry.register(
            &mut tcp,
            Token(base),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        registry.register(&mut publisher, Token(base + 1), Interest::READABLE)?;
        registry.register(&mut subscriber, Token(base + 2), Interest::READABLE)?;
        let config = PeerConfig {
            room: scenario.room_name(seat.room),
            user: format!("u{}-{incarnation}", seat.index),
            ticket: None,
            publish_audio: publishes,
            publish_video: publishes && !scenario.audio_only,
            media: MediaConfig {
                video_kbps: scenario.video_kbps,
                ..MediaConfig::default()
            },
            message_log_capacity: 0,
            measure: measured,
        };
        let (publisher_addr, subscriber_addr) = (publisher.local_addr()?, subscriber.local_addr()?);
        let peer = match scenario.target {
            Target::Corelay => Participant::Corelay(Box::new(Peer::new(
                config,
                self.time_base,
                publisher_addr,
                subscriber_addr,
                now,
            ))),
            Target::Janus => Participant::Janus(Box::new(JanusPeer::new(
                config,
                self.time_base,
                publisher_addr,
                subscriber_addr,
                now,
            ))),
        };
        // The first seat of a room stays, so one session lives through every
        // renegotiation its room's churn causes.
        let lifetime = scenario.lifetime.filter(|_| seat.index != 0);
        let leave_at = lifetime.map(|lifetime| {
            let seed =
                (seat.room as u64) << 32 ^ (seat.index as u64) << 16 ^ u64::from(incarnation);
            now + lifetime.mul_f64(0.5 + unit_interval(seed))
        });
        Ok(Session {
            seat,
            incarnation,
            measured,
            others_publish: scenario.publishers_per_room() > usize::from(publishes),
            peer,
            conn: Conn::Connecting(tcp, self.tls.clone()),
            url,
            close_frame: None,
            publisher,
            subscriber,
            join_deadline: now + scenario.join_timeout,
            opened: now,
            join_sent: None,
            recorded: Milestones::default(),
            leave_at,
            leave_deadline: None,
            end: None,
            wake: now + FAR,
        })
    }

    fn on_ready(&mut self, token: Token) {
        let slot = token.0 / SOCKETS_PER_SESSION;
        let Some(Some(session)) = self.slots.get_mut(slot) else {
            return;
        };
        match token.0 % SOCKETS_PER_SESSION {
            0 => session.on_signaling(Instant::now()),
            1 => session.on_udp(Leg::Publisher, &mut self.buf),
            _ => session.on_udp(Leg::Subscriber, &mut self.buf),
        }
        self.settle(slot, Instant::now());
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, slot))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(Some(session)) = self.slots.get_mut(slot) else {
                continue;
            };
            if session.wake != at {
                continue;
            }
            self.stats.lag = self.stats.lag.max(now - at);
            session.wake = now + FAR;
            session.on_timer(now);
            self.settle(slot, now);
        }
    }

    /// After any input: send what the peer produced, record milestones, retire the
    /// session if it ended, else schedule its next wake-up.
    fn settle(&mut self, slot: usize, now: Instant) {
        let Some(session) = self.slots[slot].as_mut() else {
            return;
        };
        session.flush(now, &mut self.stats.tx_dropped);
        session.record_milestones(&mut self.stats);
        if let Some(end) = session.outcome(now) {
            self.retire(slot, end, now);
            return;
        }
        // str0m may name a deadline already past; lateness counts from now.
        let due = session.deadline().max(now);
        if due < session.wake {
            session.wake = due;
            self.timers.push(Reverse((due, slot)));
        }
    }

    fn retire(&mut self, slot: usize, end: End, now: Instant) {
        let Some(mut session) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        let Some(joined) = session.peer.milestones().joined else {
            count(&mut self.stats.peers.join_failures, end.label(false));
            return;
        };
        let leaving = session.leave_deadline.is_some();
        self.stats.peers.cut_off += u64::from(!end.planned(leaving));
        count(&mut self.stats.peers.ends, end.label(leaving));
        session.peer.drain_latency(&mut self.stats.latency);
        let totals = session.peer.rx_totals();
        if session.measured {
            self.retired.measured.add(&totals);
        } else {
            self.retired.counted.add(&totals);
        }
        let sent = session.peer.sent();
        self.retired.sent_packets += sent.audio_packets + sent.video_packets;
        if session.others_publish && totals.packets == 0 && now - joined >= MEDIA_GRACE {
            self.stats.peers.without_media += 1;
        }
        let stats = session.peer.stats();
        let peers = &mut self.stats.peers;
        peers.violations += stats.violations.len() as u64;
        for v in stats.violations {
            if peers.violation_samples.len() < MAX_VIOLATION_SAMPLES {
                peers.violation_samples.push(v);
            }
        }
        for e in stats.errors {
            count(&mut peers.errors, e.code);
        }
        if self.scenario.lifetime.is_some() && !self.stopping {
            self.rejoin.push((session.seat, session.incarnation + 1));
        }
    }

    /// Sends the stats (final: the whole worker's last word). `false` when the
    /// coordinator is gone.
    fn send_report(&mut self, done: bool) -> bool {
        let mut report = WorkerStats {
            worker: self.id,
            measured: self.retired.measured,
            counted: self.retired.counted,
            sent_packets: self.retired.sent_packets,
            ..WorkerStats::default()
        };
        for session in self.slots.iter_mut().flatten() {
            session.peer.drain_latency(&mut self.stats.latency);
            let totals = session.peer.rx_totals();
            let sent = session.peer.sent();
            report.sent_packets += sent.audio_packets + sent.video_packets;
            if session.measured {
                report.measured.add(&totals);
            } else {
                report.counted.add(&totals);
            }
            if session.peer.milestones().joined.is_none() {
                report.connecting += 1;
            } else if session.leave_deadline.is_none() {
                report.joined += 1;
            }
        }
        let stats = &mut self.stats;
        report.peers = stats.peers.clone();
        report.tx_dropped = stats.tx_dropped;
        report.latency = std::mem::take(&mut stats.latency);
        report.join_times = std::mem::take(&mut stats.join_times);
        report.lag = std::mem::take(&mut stats.lag);
        report.times = probe::thread_times();
        report.idle = self.plan.is_empty() && self.rejoin.is_empty() && self.live() == 0;
        report.done = done;
        self.reports.send(report).is_ok()
    }
}

/// How a session ended.
enum End {
    /// A local or transport failure, with a reason of bounded variety.
    Failed(String),
    /// The signaling channel closed with this code, or without a close frame for
    /// this reason.
    Closed(Result<u16, String>),
    /// The server answered the join with this error code.
    Refused(String),
    JoinTimeout,
    LeaveUnanswered,
    /// Churn dropped the connection without `leave`.
    Aborted,
}

impl End {
    /// Whether a joined session ended as the run meant it to.
    fn planned(&self, leaving: bool) -> bool {
        matches!(
            (self, leaving),
            (End::Closed(Ok(1000)), true) | (End::Aborted, _)
        )
    }

    fn label(&self, leaving: bool) -> String {
        match (self, leaving) {
            (End::Closed(Ok(1000)), true) => "left".into(),
            (End::Closed(Ok(code)), true) => format!("leave closed {code}"),
            (End::Closed(Ok(code)), false) => format!("closed {code}"),
            (End::Closed(Err(reason)), _) => format!("connection lost: {reason}"),
            (End::Failed(reason), _) => reason.clone(),
            (End::Refused(code), _) => format!("refused: {code}"),
            (End::JoinTimeout, _) => "join timeout".into(),
            (End::LeaveUnanswered, _) => "leave unanswered".into(),
            (End::Aborted, _) => "aborted".into(),
        }
    }
}

/// The signaling connection's stages.
enum Conn {
    /// With the TLS configuration for a `wss://` URL.
    Connecting(TcpStream, Option<Arc<ClientConfig>>),
    Handshaking(MidHandshake<ClientHandshake<Stream>>),
    Open(WebSocket<Stream>),
    Closed,
}

/// The signaling stream: TCP, or TLS over it.
type Stream = MaybeTlsStream<TcpStream>;

/// The participant a session drives: corelay's protocol, or Janus's VideoRoom.
/// Boxed: a participant is ~21 KB and sessions are moved around the worker's table.
enum Participant {
    Corelay(Box<Peer>),
    Janus(Box<JanusPeer>),
}

/// Forwards each call to whichever participant this is (both have the same surface).
/// `mut fn` takes `&mut self`, `ref fn` takes `&self`.
macro_rules! delegate {
    ($($recv:tt fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {
        impl Participant {
            $(delegate!(@receiver $recv, $name, ($($arg: $ty),*), ($($ret)?));)*
        }
    };
    (@receiver mut, $name:ident, ($($arg:ident: $ty:ty),*), ($($ret:ty)?)) => {
        fn $name(&mut self, $($arg: $ty),*) $(-> $ret)? {
            delegate!(@call self, $name, $($arg),*)
        }
    };
    (@receiver ref, $name:ident, ($($arg:ident: $ty:ty),*), ($($ret:ty)?)) => {
        fn $name(&self, $($arg: $ty),*) $(-> $ret)? {
            delegate!(@call self, $name, $($arg),*)
        }
    };
    (@call $self:ident, $name:ident, $($arg:ident),*) => {
        match $self {
            Participant::Corelay(p) => p.$name($($arg),*),
            Participant::Janus(p) => p.$name($($arg),*),
        }
    };
}

delegate! {
    mut fn handle_signal(text: &str, now: Instant);
    mut fn handle_signaling_closed(code: Option<u16>, reason: String);
    mut fn handle_datagram(leg: Leg, source: SocketAddr, contents: &[u8], at: Instant);
    mut fn handle_timeout(now: Instant);
    mut fn leave();
    mut fn report_violation(what: String);
    mut fn poll_signal() -> Option<String>;
    mut fn poll_transmit() -> Option<crate::peer::Transmit>;
    mut fn drain_latency(into: &mut Histogram);
    ref fn poll_timeout() -> Instant;
    ref fn closed() -> Option<&CloseInfo>;
    ref fn milestones() -> Milestones;
    ref fn rx_totals() -> RxTotals;
    ref fn sent() -> SentStats;
    ref fn state() -> &SessionState;
    ref fn stats() -> ClientStats;
}

/// One participant and its sockets.
struct Session {
    seat: Seat,
    incarnation: u32,
    measured: bool,
    /// Someone else in the room publishes, so media must arrive.
    others_publish: bool,
    peer: Participant,
    conn: Conn,
    url: String,
    /// Code and reason of the server's close frame, until the connection ends.
    close_frame: Option<(Option<u16>, String)>,
    publisher: UdpSocket,
    subscriber: UdpSocket,
    join_deadline: Instant,
    /// When the TCP connect started.
    opened: Instant,
    join_sent: Option<Instant>,
    /// The milestones already counted in the join figures.
    recorded: Milestones,
    /// Churn: when to leave.
    leave_at: Option<Instant>,
    /// Set once leaving: when to stop waiting for the server's close.
    leave_deadline: Option<Instant>,
    end: Option<End>,
    /// The due time of this session's current timer entry.
    wake: Instant,
}

impl Session {
    fn on_signaling(&mut self, now: Instant) {
        match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Connecting(tcp, tls) => self.on_connect(tcp, tls),
            Conn::Handshaking(mid) => self.on_handshake(mid.handshake()),
            Conn::Open(ws) => {
                self.conn = Conn::Open(ws);
                self.read_signaling(now);
            }
            Conn::Closed => {}
        }
    }

    /// A nonblocking connect has finished when the socket is writable and has a peer.
    fn on_connect(&mut self, tcp: TcpStream, tls: Option<Arc<ClientConfig>>) {
        if let Ok(Some(e)) | Err(e) = tcp.take_error() {
            self.end = Some(End::Failed(format!("connect: {:?}", e.kind())));
            return;
        }
        match tcp.peer_addr() {
            Ok(_) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_WS_MESSAGE))
                    .max_frame_size(Some(MAX_WS_MESSAGE))
                    .max_write_buffer_size(MAX_WS_WRITE_BUFFER);
                let request = match self.peer {
                    Participant::Corelay(_) => self.url.as_str().into_client_request(),
                    Participant::Janus(_) => janus::websocket_request(&self.url),
                };
                // The TLS handshake runs inside the WebSocket one, on the same
                // readiness events: rustls reports WouldBlock like the socket.
                match request {
                    Ok(request) => self.on_handshake(tungstenite::client_tls_with_config(
                        request,
                        tcp,
                        Some(config),
                        tls.map(Connector::Rustls),
                    )),
                    Err(_) => self.end = Some(End::Failed("bad URL".into())),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotConnected => self.conn = Conn::Connecting(tcp, tls),
            Err(e) => self.end = Some(End::Failed(format!("connect: {:?}", e.kind()))),
        }
    }

    fn on_handshake(
        &mut self,
        result: Result<
            (WebSocket<Stream>, tungstenite::handshake::client::Response),
            HandshakeError<ClientHandshake<Stream>>,
        >,
    ) {
        match result {
            Ok((ws, _)) => self.conn = Conn::Open(ws),
            Err(HandshakeError::Interrupted(mid)) => self.conn = Conn::Handshaking(mid),
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                self.end = Some(End::Failed(format!("http {}", response.status().as_u16())));
            }
            // With the reason, which names a certificate the harness does not trust.
            // Its variety is bounded: tungstenite's, rustls's and the OS's errors.
            Err(HandshakeError::Failure(e)) => {
                self.end = Some(End::Failed(format!("websocket handshake: {e}")));
            }
        }
    }

    /// Reads every complete message; the server closing ends the peer.
    fn read_signaling(&mut self, now: Instant) {
        let Conn::Open(ws) = &mut self.conn else {
            return;
        };
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => self.peer.handle_signal(text.as_str(), now),
                Ok(Message::Binary(b)) => self
                    .peer
                    .report_violation(format!("binary frame of {} bytes from server", b.len())),
                Ok(Message::Close(frame)) => {
                    self.close_frame = Some(match frame {
                        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                        None => (Some(1005), String::new()),
                    });
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    let (code, reason) = self.close_frame.take().unwrap_or((None, e.to_string()));
                    self.peer.handle_signaling_closed(code, reason);
                    self.conn = Conn::Closed;
                    return;
                }
            }
        }
    }

    fn on_udp(&mut self, leg: Leg, buf: &mut [u8]) {
        let socket = match leg {
            Leg::Publisher => &self.publisher,
            Leg::Subscriber => &self.subscriber,
        };
        loop {
            match socket.recv_from(buf) {
                Ok((n, source)) => {
                    self.peer
                        .handle_datagram(leg, source, &buf[..n], Instant::now())
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if transient_udp_error(e.kind()) => {}
                Err(e) => {
                    self.end = Some(End::Failed(format!("udp: {:?}", e.kind())));
                    return;
                }
            }
        }
    }

    fn on_timer(&mut self, now: Instant) {
        if self.leave_at.is_some_and(|at| at <= now) {
            self.leave_at = None;
            // Alternate clean leaves and dropped sockets across seats and incarnations.
            if (self.seat.index as u32 + self.incarnation).is_multiple_of(2) {
                self.leave(now);
            } else {
                self.end = Some(End::Aborted);
            }
        }
        self.peer.handle_timeout(now);
    }

    fn leave(&mut self, now: Instant) {
        self.leave_at = None;
        if self.leave_deadline.is_none() {
            self.peer.leave();
            self.leave_deadline = Some(now + LEAVE_GRACE);
        }
    }

    /// Sends queued datagrams and signaling.
    fn flush(&mut self, now: Instant, tx_dropped: &mut u64) {
        while let Some(t) = self.peer.poll_transmit() {
            let socket = match t.leg {
                Leg::Publisher => &self.publisher,
                Leg::Subscriber => &self.subscriber,
            };
            // UDP is best effort; str0m retransmits what matters. A full send buffer
            // is the harness's own loss, so it is counted.
            if let Err(e) = socket.send_to(&t.contents, t.destination)
                && e.kind() == ErrorKind::WouldBlock
            {
                *tx_dropped += 1;
            }
        }
        let Conn::Open(ws) = &mut self.conn else {
            return;
        };
        while let Some(text) = self.peer.poll_signal() {
            // The join is the first message a peer queues.
            self.join_sent.get_or_insert(now);
            if let Err(e) = ws.write(Message::text(text))
                && !would_block(&e)
            {
                return self.write_failed(&e, now);
            }
        }
        if let Err(e) = ws.flush()
            && !would_block(&e)
            && !matches!(e, tungstenite::Error::ConnectionClosed)
        {
            self.write_failed(&e, now);
        }
    }

    /// A write fails mostly because the server closed the connection: what it sent
    /// before, its close frame with the code that says why, is read first, so that
    /// the session ends with that and not with the write's broken pipe.
    fn write_failed(&mut self, e: &tungstenite::Error, now: Instant) {
        self.read_signaling(now);
        if self.peer.closed().is_none() {
            self.end = Some(End::Failed(format!("signaling write: {e}")));
        }
    }

    /// Join time (`join` sent to `joined`, and from the TCP connect, so with the
    /// handshakes) and time to first video and first keyframe (from when video was
    /// both asked for and announced to its arrival), each once.
    fn record_milestones(&mut self, stats: &mut WorkerStats) {
        let m = self.peer.milestones();
        let Some(sent) = self.join_sent else {
            return;
        };
        if let (Some(joined), None) = (m.joined, self.recorded.joined) {
            self.recorded.joined = Some(joined);
            stats.peers.joins += 1;
            stats.peers.measured += u64::from(self.measured);
            let times = &mut stats.join_times;
            times
                .join
                .record(micros(joined.saturating_duration_since(sent)));
            times
                .connect
                .record(micros(joined.saturating_duration_since(self.opened)));
        }
        let Some(announced) = m.video_announced else {
            return;
        };
        let from = announced.max(sent);
        for (first, recorded, into) in [
            (
                m.first_video,
                &mut self.recorded.first_video,
                &mut stats.join_times.first_video,
            ),
            (
                m.first_keyframe,
                &mut self.recorded.first_keyframe,
                &mut stats.join_times.first_keyframe,
            ),
        ] {
            if let (Some(first), None) = (first, *recorded) {
                *recorded = Some(first);
                into.record(micros(first.saturating_duration_since(from)));
            }
        }
    }

    /// Whether the session is over, and how.
    fn outcome(&mut self, now: Instant) -> Option<End> {
        if let Some(end) = self.end.take() {
            return Some(end);
        }
        if let SessionState::Refused { code, .. } = self.peer.state() {
            return Some(End::Refused(code.clone()));
        }
        if let Some(closed) = self.peer.closed() {
            return Some(End::Closed(
                closed.code.ok_or_else(|| closed.reason.clone()),
            ));
        }
        if self.peer.milestones().joined.is_none() && now >= self.join_deadline {
            return Some(End::JoinTimeout);
        }
        if self.leave_deadline.is_some_and(|d| now >= d) {
            return Some(End::LeaveUnanswered);
        }
        None
    }

    /// When the session next needs attention without input.
    fn deadline(&self) -> Instant {
        let mut due = self.peer.poll_timeout();
        if self.peer.milestones().joined.is_none() {
            due = due.min(self.join_deadline);
        }
        [self.leave_at, self.leave_deadline]
            .into_iter()
            .flatten()
            .fold(due, Instant::min)
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == ErrorKind::WouldBlock)
}

/// A nonblocking UDP socket on `ip` with a receive buffer that rides out short stalls.
fn udp_socket(ip: IpAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int, on a
    // descriptor this function owns.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&UDP_RECV_BUFFER as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// Increments `key`, folding new keys into `other` once the map is full.
fn count(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if map.len() >= MAX_REASONS && !map.contains_key(&key) {
        "other".to_string()
    } else {
        key
    };
    *map.entry(key).or_default() += 1;
}

/// A well-mixed number in `[0, 1)` from `seed` (splitmix64), so churn lifetimes vary
/// reproducibly without a random number generator.
fn unit_interval(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_counts_are_bounded() {
        let mut map = BTreeMap::new();
        for i in 0..100 {
            count(&mut map, format!("reason {i}"));
        }
        count(&mut map, "reason 3".into());
        assert_eq!(map.len(), MAX_REASONS + 1);
        assert_eq!(map["reason 3"], 2);
        assert_eq!(map["other"], 100 - MAX_REASONS as u64);
    }

    #[test]
    fn unit_interval_spreads() {
        let values: Vec<f64> = (0..1000).map(unit_interval).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / 1000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }

    #[test]
    fn end_labels() {
        assert_eq!(End::Closed(Ok(1000)).label(true), "left");
        assert_eq!(End::Closed(Ok(1011)).label(false), "closed 1011");
        assert_eq!(End::Closed(Ok(1008)).label(true), "leave closed 1008");
        assert_eq!(
            End::Closed(Err("reset".into())).label(true),
            "connection lost: reset"
        );
        assert_eq!(
            End::Refused("room_full".into()).label(false),
            "refused: room_full"
        );
        assert!(End::Closed(Ok(1000)).planned(true) && End::Aborted.planned(false));
        assert!(
            !End::Closed(Ok(1000)).planned(false),
            "closed without a leave"
        );
        assert!(!End::Closed(Ok(1009)).planned(true));
        assert!(!End::Closed(Err("reset".into())).planned(false));
    }
}
