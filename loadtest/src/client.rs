//! A threaded driver around [`Peer`] for integration tests: one WebSocket, two
//! loopback UDP sockets, and a few threads per client.
//!
//! Threads: the WebSocket thread owns the socket (reads with a short timeout, then
//! writes whatever is queued), one reader per UDP socket, and the driver thread that
//! owns the [`Peer`]. Everything the peer consumes arrives on one bounded channel, so
//! the driver is a plain str0m-style loop: wait for input or the peer's deadline,
//! feed it, send what comes out. Tests read [`ClientStats`] snapshots the driver
//! publishes (at once after signaling changes, at most every
//! [`MEDIA_SNAPSHOT_INTERVAL`] for media counters).
//!
//! This costs four threads per client, fine for a handful of clients in one test;
//! the load harness drives many [`Peer`]s from one loop instead.

use std::fmt;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

use crate::media::MediaConfig;
use crate::peer::{ClientStats, CloseInfo, Leg, Peer, PeerConfig, SessionState, TimeBase};
use crate::protocol::ClientMessage;

/// Media counters reach snapshots at most this often; signaling changes at once.
pub const MEDIA_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(20);
/// How long a WebSocket read blocks before queued writes get their turn: the
/// worst-case extra latency of an outgoing signaling message.
const WS_POLL: Duration = Duration::from_millis(5);
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP readers check for shutdown this often.
const UDP_POLL: Duration = Duration::from_millis(50);
/// Inputs queued for the driver; a full queue blocks the UDP readers, and the
/// kernel then drops datagrams, as it would for a slow real client.
const INPUT_QUEUE: usize = 4096;
/// Inputs handled per wake-up before the driver flushes output.
const INPUT_BATCH: usize = 256;
/// The driver wakes at least this often even when the peer has no deadline.
const MAX_IDLE_WAIT: Duration = Duration::from_millis(100);

/// What to connect to and what to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// e.g. `ws://127.0.0.1:PORT/ws?room=ROOM`, used verbatim (see [`ClientConfig::new`]).
    pub ws_url: String,
    /// `sessionId` of the join.
    pub room: String,
    /// `userId` of the join.
    pub user: String,
    pub ticket: Option<String>,
    /// `Origin` header of the upgrade request; none by default, like a native client.
    pub origin: Option<String>,
    pub publish_audio: bool,
    pub publish_video: bool,
    /// Target video bitrate.
    pub video_kbps: u32,
    /// Time between periodic keyframes.
    pub keyframe_interval: Duration,
    /// Bounds the TCP connect, the upgrade, and the wait for `joined`.
    pub connect_timeout: Duration,
    /// Received signaling messages kept in snapshots.
    pub message_log_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let media = MediaConfig::default();
        Self {
            ws_url: String::new(),
            room: String::new(),
            user: String::new(),
            ticket: None,
            origin: None,
            publish_audio: true,
            publish_video: true,
            video_kbps: media.video_kbps,
            keyframe_interval: media.keyframe_interval,
            connect_timeout: Duration::from_secs(5),
            message_log_capacity: 256,
        }
    }
}

impl ClientConfig {
    /// Joins `room` as `user` on the server whose HTTP port is `server`, with the
    /// `room` query parameter a load balancer would hash on.
    pub fn new(server: SocketAddr, room: &str, user: &str) -> Self {
        Self {
            ws_url: format!("ws://{server}/ws?room={}", percent_encode(room)),
            room: room.to_string(),
            user: user.to_string(),
            ..Self::default()
        }
    }
}

/// Why a client operation failed.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    WebSocket(tungstenite::Error),
    /// The upgrade was refused with this HTTP status (403 origin, 503 full).
    Http(u16),
    /// The server answered the join with `error`.
    Refused {
        code: String,
        message: String,
    },
    /// The condition did not hold in time; the last snapshot.
    Timeout(Box<ClientStats>),
    /// The session ended (signaling closed) before the condition held.
    Ended(Box<ClientStats>),
    /// `leave` was not answered by a close with code 1000.
    UnexpectedClose(Option<CloseInfo>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "io: {e}"),
            Error::WebSocket(e) => write!(f, "websocket: {e}"),
            Error::Http(status) => write!(f, "upgrade refused with HTTP {status}"),
            Error::Refused { code, message } => write!(f, "join refused: {code}: {message}"),
            Error::Timeout(s) => write!(f, "timed out; last state: {}", brief(s)),
            Error::Ended(s) => write!(f, "session ended; last state: {}", brief(s)),
            Error::UnexpectedClose(c) => write!(f, "leave ended with {c:?}, expected code 1000"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        Error::WebSocket(e)
    }
}

/// One line of context for a failed wait (the full snapshot is in `Debug`).
fn brief(s: &ClientStats) -> String {
    format!(
        "{:?}, peers {:?}, {} tracks, {} offers, errors {:?}, violations {:?}, closed {:?}",
        s.state,
        s.peers.keys().collect::<Vec<_>>(),
        s.tracks.len(),
        s.subscriber_offers,
        s.errors,
        s.violations,
        s.closed
    )
}

/// A connected, joined participant running on its own threads. Dropping it closes
/// the TCP connection without `leave`, like a crashed browser tab.
pub struct Client {
    peer_id: String,
    commands: SyncSender<Input>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Client {
    /// Connects, joins, and returns once `joined` arrived (publishing then starts on
    /// its own). A join refused with `error` returns [`Error::Refused`].
    pub fn connect(config: ClientConfig) -> Result<Client, Error> {
        let ws = open_websocket(&config)?;
        let publisher = UdpSocket::bind("127.0.0.1:0")?;
        let subscriber = UdpSocket::bind("127.0.0.1:0")?;
        let peer_config = PeerConfig {
            room: config.room.clone(),
            user: config.user.clone(),
            ticket: config.ticket.clone(),
            publish_audio: config.publish_audio,
            publish_video: config.publish_video,
            media: MediaConfig {
                video_kbps: config.video_kbps,
                keyframe_interval: config.keyframe_interval,
                ..MediaConfig::default()
            },
            message_log_capacity: config.message_log_capacity,
            measure: true,
        };
        let peer = Peer::new(
            peer_config,
            shared_time_base(),
            publisher.local_addr()?,
            subscriber.local_addr()?,
            Instant::now(),
        );
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(Snapshot {
                stats: peer.stats(),
                finished: false,
            }),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (input_tx, input_rx) = mpsc::sync_channel(INPUT_QUEUE);
        // Unbounded, but fed only by the driver with the peer's bounded signaling
        // output and the test's own commands.
        let (ws_tx, ws_rx) = mpsc::channel();

        for socket in [&publisher, &subscriber] {
            socket.set_read_timeout(Some(UDP_POLL))?;
        }
        let sockets = Sockets {
            publisher: publisher.try_clone()?,
            subscriber: subscriber.try_clone()?,
        };
        let mut threads = Vec::new();
        for (socket, leg) in [(publisher, Leg::Publisher), (subscriber, Leg::Subscriber)] {
            let tx = input_tx.clone();
            let stop = stop.clone();
            threads.push(spawn("udp", move || udp_reader(socket, leg, tx, stop))?);
        }
        let tx = input_tx.clone();
        threads.push(spawn("ws", move || websocket(ws, ws_rx, tx))?);
        let driver_shared = shared.clone();
        let driver_stop = stop.clone();
        threads.push(spawn("driver", move || {
            drive(peer, input_rx, ws_tx, sockets, driver_shared, driver_stop)
        })?);

        let mut client = Client {
            peer_id: String::new(),
            commands: input_tx,
            shared,
            stop,
            threads,
        };
        let stats =
            client.wait_for(config.connect_timeout, |s| s.state != SessionState::Joining)?;
        match stats.state {
            SessionState::Joined => {
                client.peer_id = stats.peer_id.unwrap_or_default();
                Ok(client)
            }
            SessionState::Refused { code, message } => Err(Error::Refused { code, message }),
            _ => Err(Error::Ended(Box::new(stats))),
        }
    }

    /// Our peer id from `joined`.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The latest published snapshot.
    pub fn snapshot(&self) -> ClientStats {
        self.shared.lock().stats.clone()
    }

    /// Waits until `condition` holds for a snapshot and returns that snapshot. Fails
    /// at `timeout`, or as soon as the session has ended without it holding.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&ClientStats) -> bool,
    ) -> Result<ClientStats, Error> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.lock();
        loop {
            if condition(&guard.stats) {
                return Ok(guard.stats.clone());
            }
            if guard.finished {
                return Err(Error::Ended(Box::new(guard.stats.clone())));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(Box::new(guard.stats.clone())));
            }
            guard = self
                .shared
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Sends a typed message (e.g. `media_state`, `ping`).
    pub fn send(&self, message: ClientMessage) {
        self.command(Command::Send(message));
    }

    /// Sends a raw text frame, bypassing the peer (for bad-input tests).
    pub fn send_text(&self, text: impl Into<String>) {
        self.command(Command::Raw(WsOut::Text(text.into())));
    }

    /// Sends a raw binary frame (the protocol says the server closes with 1003).
    pub fn send_binary(&self, data: Vec<u8>) {
        self.command(Command::Raw(WsOut::Binary(data)));
    }

    /// Changes which tracks are published; renegotiates the publisher connection.
    pub fn set_publish(&self, audio: bool, video: bool) {
        self.command(Command::SetPublish { audio, video });
    }

    /// RFC 6464 level of our audio from now on: -127 (silence) to 0 dBov.
    pub fn set_audio_level(&self, level: i8) {
        self.command(Command::SetAudioLevel(level));
    }

    /// Sends `leave` and waits for the server to close the socket, which must be
    /// with code 1000. Returns the final snapshot.
    pub fn leave(&self, timeout: Duration) -> Result<ClientStats, Error> {
        self.command(Command::Leave);
        let stats = match self.wait_for(timeout, |s| s.closed.is_some()) {
            Ok(s) => s,
            Err(Error::Ended(s)) => *s,
            Err(e) => return Err(e),
        };
        match &stats.closed {
            Some(CloseInfo {
                code: Some(1000), ..
            }) => Ok(stats),
            other => Err(Error::UnexpectedClose(other.clone())),
        }
    }

    /// Drops the connection abruptly: no `leave`, no close frame. Same as dropping;
    /// this names the intent at the call site.
    pub fn abort(self) {
        drop(self);
    }

    fn command(&self, command: Command) {
        // A send fails only when the driver has finished; the snapshot says why.
        let _ = self.commands.send(Input::Command(command));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.commands.send(Input::Command(Command::Abort));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The snapshot slot shared by the driver and the test thread.
struct Shared {
    snapshot: Mutex<Snapshot>,
    changed: Condvar,
}

struct Snapshot {
    stats: ClientStats,
    /// The driver has exited; the snapshot will not change again.
    finished: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A panicking driver leaves a consistent snapshot behind: it is replaced whole.
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, stats: ClientStats, finished: bool) {
        let mut guard = self.lock();
        guard.stats = stats;
        guard.finished = finished;
        self.changed.notify_all();
    }
}

/// Everything the driver reacts to.
enum Input {
    Signal(String),
    SignalingClosed {
        code: Option<u16>,
        reason: String,
    },
    Violation(String),
    Datagram {
        leg: Leg,
        source: SocketAddr,
        data: Vec<u8>,
        at: Instant,
    },
    Command(Command),
}

enum Command {
    Send(ClientMessage),
    Raw(WsOut),
    SetPublish { audio: bool, video: bool },
    SetAudioLevel(i8),
    Leave,
    Abort,
}

/// Frames for the WebSocket thread to write.
enum WsOut {
    Text(String),
    Binary(Vec<u8>),
}

struct Sockets {
    publisher: UdpSocket,
    subscriber: UdpSocket,
}

/// All clients of a process share one time base, so their stamps compare exactly.
fn shared_time_base() -> TimeBase {
    static BASE: OnceLock<TimeBase> = OnceLock::new();
    *BASE.get_or_init(TimeBase::now)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("corelay-client-{name}"))
        .spawn(f)
}

fn open_websocket(config: &ClientConfig) -> Result<WebSocket<TcpStream>, Error> {
    let mut request = config.ws_url.as_str().into_client_request()?;
    if let Some(origin) = &config.origin {
        let value = HeaderValue::from_str(origin)
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        request.headers_mut().insert("Origin", value);
    }
    let uri = request.uri();
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(ErrorKind::NotFound, "ws_url host did not resolve"))?;
    let tcp = TcpStream::connect_timeout(&addr, config.connect_timeout)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(config.connect_timeout))?;
    tcp.set_write_timeout(Some(WS_WRITE_TIMEOUT))?;
    let (ws, _response) = tungstenite::client(request, tcp).map_err(|e| match e {
        HandshakeError::Failure(tungstenite::Error::Http(response)) => {
            Error::Http(response.status().as_u16())
        }
        HandshakeError::Failure(e) => Error::WebSocket(e),
        HandshakeError::Interrupted(_) => {
            Error::Io(io::Error::new(ErrorKind::TimedOut, "websocket upgrade"))
        }
    })?;
    ws.get_ref().set_read_timeout(Some(WS_POLL))?;
    Ok(ws)
}

/// Owns the WebSocket: forwards text frames to the driver, writes queued frames, and
/// reports how the connection ended. Exits when the driver drops its sender, which
/// closes the TCP connection without a close frame.
fn websocket(mut ws: WebSocket<TcpStream>, out: Receiver<WsOut>, tx: SyncSender<Input>) {
    let mut close_frame: Option<CloseInfo> = None;
    loop {
        loop {
            let message = match out.try_recv() {
                Ok(WsOut::Text(t)) => Message::text(t),
                Ok(WsOut::Binary(b)) => Message::binary(b),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = ws.get_ref().shutdown(Shutdown::Both);
                    return;
                }
            };
            // A failed write surfaces as a failed read below; after the server's
            // close, writes are refused and there is nothing to do about it.
            let _ = ws.send(message);
        }
        let input = match ws.read() {
            Ok(Message::Text(t)) => Input::Signal(t.to_string()),
            Ok(Message::Binary(b)) => {
                Input::Violation(format!("binary frame of {} bytes from server", b.len()))
            }
            Ok(Message::Close(frame)) => {
                close_frame = Some(CloseInfo {
                    // A close frame without a status reads as 1005, as in browsers.
                    code: Some(frame.as_ref().map_or(1005, |f| u16::from(f.code))),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                });
                // tungstenite replies; keep reading until the server closes TCP.
                continue;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                continue;
            }
            Err(e) => {
                let info = close_frame.take().unwrap_or(CloseInfo {
                    code: None,
                    reason: e.to_string(),
                });
                let _ = tx.send(Input::SignalingClosed {
                    code: info.code,
                    reason: info.reason,
                });
                return;
            }
        };
        if tx.send(input).is_err() {
            return;
        }
    }
}

fn udp_reader(socket: UdpSocket, leg: Leg, tx: SyncSender<Input>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, source)) => {
                let input = Input::Datagram {
                    leg,
                    source,
                    data: buf[..n].to_vec(),
                    at: Instant::now(),
                };
                if tx.send(input).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) if transient_udp_error(e.kind()) => {}
            Err(_) => return,
        }
    }
}

/// A UDP receive error to read past: ICMP errors of earlier sends, and signal
/// interruptions.
pub(crate) fn transient_udp_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

/// The str0m-style loop: wait for input or the peer's deadline, feed the peer,
/// send its output, publish a snapshot when something changed.
fn drive(
    mut peer: Peer,
    inputs: Receiver<Input>,
    ws: Sender<WsOut>,
    sockets: Sockets,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let mut published = peer.generation();
    let mut published_at = Instant::now();
    flush(&mut peer, &sockets, &ws);
    'run: loop {
        let wait = peer
            .poll_timeout()
            .saturating_duration_since(Instant::now())
            .min(MAX_IDLE_WAIT);
        let first = match inputs.recv_timeout(wait) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for input in first.into_iter().chain(inputs.try_iter().take(INPUT_BATCH)) {
            if !apply(&mut peer, input, &ws) {
                break 'run;
            }
        }
        peer.handle_timeout(Instant::now());
        flush(&mut peer, &sockets, &ws);

        let generation = peer.generation();
        let media_due = generation.media != published.media
            && published_at.elapsed() >= MEDIA_SNAPSHOT_INTERVAL;
        if generation.signaling != published.signaling || media_due {
            shared.publish(peer.stats(), false);
            published = generation;
            published_at = Instant::now();
        }
        if peer.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    shared.publish(peer.stats(), true);
}

/// Feeds one input to the peer; `false` when the client is being dropped.
fn apply(peer: &mut Peer, input: Input, ws: &Sender<WsOut>) -> bool {
    let now = Instant::now();
    match input {
        Input::Signal(text) => peer.handle_signal(&text, now),
        Input::SignalingClosed { code, reason } => peer.handle_signaling_closed(code, reason),
        Input::Violation(what) => peer.report_violation(what),
        Input::Datagram {
            leg,
            source,
            data,
            at,
        } => peer.handle_datagram(leg, source, &data, at),
        Input::Command(Command::Send(message)) => peer.send(message),
        Input::Command(Command::Raw(frame)) => {
            let _ = ws.send(frame);
        }
        Input::Command(Command::SetPublish { audio, video }) => peer.set_publish(audio, video, now),
        Input::Command(Command::SetAudioLevel(level)) => peer.set_audio_level(level),
        Input::Command(Command::Leave) => peer.leave(),
        Input::Command(Command::Abort) => return false,
    }
    true
}

fn flush(peer: &mut Peer, sockets: &Sockets, ws: &Sender<WsOut>) {
    while let Some(t) = peer.poll_transmit() {
        let socket = match t.leg {
            Leg::Publisher => &sockets.publisher,
            Leg::Subscriber => &sockets.subscriber,
        };
        // UDP is best effort; str0m retransmits what matters.
        let _ = socket.send_to(&t.contents, t.destination);
    }
    while let Some(text) = peer.poll_signal() {
        // The WebSocket thread is gone only once the connection closed, which the
        // peer learns from its own input.
        let _ = ws.send(WsOut::Text(text));
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::CloseFrame;
    use tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn urls_encode_the_room() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let c = ClientConfig::new(addr, "a b/ü", "u");
        assert_eq!(c.ws_url, "ws://127.0.0.1:8080/ws?room=a%20b%2F%C3%BC");
        assert_eq!(c.room, "a b/ü");
        assert!(c.publish_audio && c.publish_video);
    }

    /// A one-connection signaling server running `script` on its own thread.
    fn fake_server(
        script: impl FnOnce(WebSocket<TcpStream>) + Send + 'static,
    ) -> (SocketAddr, JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            script(tungstenite::accept(tcp).unwrap());
        });
        (addr, handle)
    }

    /// Reads text frames until one of type `kind`; `None` if the connection ended.
    fn read_until(ws: &mut WebSocket<TcpStream>, kind: &str) -> Option<serde_json::Value> {
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == kind {
                        return Some(v);
                    }
                }
                Ok(Message::Close(_)) => panic!("client sent a close frame"),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn join_reply(ws: &mut WebSocket<TcpStream>) {
        let join = read_until(ws, "join").unwrap();
        assert_eq!(join["sessionId"], "room");
        assert_eq!(join["userId"], "alice");
        let joined = serde_json::json!({
            "type": "joined", "peerId": "p1", "sessionId": "room",
            "iceServers": [], "requestId": join["requestId"],
        });
        ws.send(Message::text(joined.to_string())).unwrap();
    }

    #[test]
    fn refused_join_reports_the_servers_error() {
        let (addr, server) = fake_server(|mut ws| {
            let join = read_until(&mut ws, "join").unwrap();
            let error = serde_json::json!({
                "type": "error", "code": "room_full", "message": "full",
                "requestId": join["requestId"],
            });
            ws.send(Message::text(error.to_string())).unwrap();
            read_until(&mut ws, "never");
        });
        let result = Client::connect(ClientConfig::new(addr, "room", "alice"));
        match result {
            Err(Error::Refused { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("room_full", "full"));
            }
            other => panic!("{:?}", other.map(|c| c.snapshot())),
        }
        server.join().unwrap();
    }

    #[test]
    fn join_signal_and_leave_with_1000() {
        let (addr, server) = fake_server(|mut ws| {
            join_reply(&mut ws);
            let bob = r#"{"type":"peer_joined","peerId":"bob","userId":"b","audioEnabled":true,"videoEnabled":true,"screenEnabled":false,"speaking":false}"#;
            ws.send(Message::text(bob)).unwrap();
            read_until(&mut ws, "ping").unwrap();
            ws.send(Message::text(r#"{"type":"pong"}"#)).unwrap();
            read_until(&mut ws, "leave").unwrap();
            ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .unwrap();
            // Drive the close handshake to the end.
            while ws.read().is_ok() {}
        });
        let client = Client::connect(ClientConfig {
            publish_audio: false,
            publish_video: false,
            ..ClientConfig::new(addr, "room", "alice")
        })
        .unwrap();
        assert_eq!(client.peer_id(), "p1");
        client
            .wait_for(Duration::from_secs(5), |s| s.peers.contains_key("bob"))
            .unwrap();
        client.send(ClientMessage::Ping { request_id: None });
        client
            .wait_for(Duration::from_secs(5), |s| s.pongs == 1)
            .unwrap();
        let last = client.leave(Duration::from_secs(5)).unwrap();
        let closed = last.closed.clone().unwrap();
        assert_eq!((closed.code, closed.reason.as_str()), (Some(1000), "bye"));
        assert!(last.violations.is_empty(), "{:?}", last.violations);
        // Finished sessions fail waits at once instead of running into the timeout.
        let started = Instant::now();
        let waited = client.wait_for(Duration::from_secs(30), |s| s.pongs == 2);
        assert!(matches!(waited, Err(Error::Ended(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
        server.join().unwrap();
    }

    #[test]
    fn dropping_closes_without_leave_or_close_frame() {
        let (done_tx, done_rx) = mpsc::channel();
        let (addr, server) = fake_server(move |mut ws| {
            join_reply(&mut ws);
            // Panics on a close frame; returns `None` once the TCP connection ends.
            done_tx.send(read_until(&mut ws, "leave")).unwrap();
        });
        let client = Client::connect(ClientConfig::new(addr, "room", "alice")).unwrap();
        // Publishing, so the offer was sent before the abort.
        client
            .wait_for(Duration::from_secs(5), |s| s.published.len() == 2)
            .unwrap();
        client.abort();
        let seen = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen, None, "no leave before the connection dropped");
        server.join().unwrap();
    }

    #[test]
    fn connect_to_nothing_fails_fast() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = ClientConfig::new(port, "r", "u");
        assert!(matches!(Client::connect(config), Err(Error::Io(_))));
    }
}
