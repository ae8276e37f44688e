//! Shared by the integration tests: a real corelay process on loopback, started with
//! free ports and awaited through its readiness line, and a plain WebSocket client.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use corelay_loadtest::report::Report;
use serde_json::Value;
use str0m::media::{Direction, MediaKind};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Starts `corelay` with `--shards 2` on ephemeral ports, candidates on 127.0.0.1;
    /// warnings and errors go to the test's stderr.
    pub fn start(extra: &[&str]) -> Self {
        Self::spawn(extra, "warn", Stdio::inherit())
    }

    /// As `start`, logging at info level as JSON, each line kept for the test.
    pub fn start_logged(extra: &[&str]) -> (Self, Logs) {
        let mut server = Self::spawn(
            &[extra, &["--log-format", "json"]].concat(),
            "info",
            Stdio::piped(),
        );
        let stderr = server.child.stderr.take().expect("stderr");
        (server, Logs::collect(stderr))
    }

    fn spawn(extra: &[&str], log_level: &str, stderr: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_corelay"))
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--udp-port-base",
                "0",
                "--shards",
                "2",
                "--public-ip",
                "127.0.0.1",
                "--log-level",
                log_level,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start corelay");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read readiness line");
        let addr = line
            .trim()
            .strip_prefix("listening http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Self { child, addr }
    }

    /// Ends the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self, room: &str) -> String {
        format!("ws://{}/ws?room={room}", self.addr)
    }

    /// A plain HTTP GET; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request(&format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.addr
        ))
    }

    /// Sends a raw request; returns (status, body). Reads the head, then the body by
    /// `Content-Length`, so an upgraded (101) connection does not hang the test.
    pub fn request(&self, raw: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(raw.as_bytes()).expect("write");
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub fn debug_rooms(&self) -> Value {
        let (status, body) = self.get("/debug/rooms");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("rooms JSON")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server's log lines, as it writes them, for a test to wait on and inspect.
#[derive(Clone)]
pub struct Logs(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Logs {
    fn collect(stderr: ChildStderr) -> Self {
        let logs = Self(Arc::default());
        let shared = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let (lines, arrived) = &*shared.0;
                // Poisoned: the test already failed.
                let Ok(mut lines) = lines.lock() else { break };
                lines.push(line);
                arrived.notify_all();
            }
        });
        logs
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().expect("log lines").clone()
    }

    /// Waits for a JSON line `matches` (fails the test after `limit`); returns it.
    pub fn wait_for(&self, limit: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let (lines, arrived) = &*self.0;
        let deadline = Instant::now() + limit;
        let mut seen = lines.lock().expect("log lines");
        let mut checked = 0;
        loop {
            for line in &seen[checked..] {
                if let Ok(json) = serde_json::from_str(line)
                    && matches(&json)
                {
                    return json;
                }
            }
            checked = seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such log line in {limit:?}");
            seen = arrived.wait_timeout(seen, left).expect("log lines").0;
        }
    }
}

/// A signaling-only client: enough for protocol tests that need no media.
pub struct Ws(pub WebSocket<MaybeTlsStream<TcpStream>>);

impl Ws {
    pub fn connect(url: &str) -> Self {
        let (ws, _) = tungstenite::connect(url).expect("websocket connect");
        Self::over(ws)
    }

    /// Wraps a connected WebSocket, plain or TLS.
    pub fn over(ws: WebSocket<MaybeTlsStream<TcpStream>>) -> Self {
        let tcp = match ws.get_ref() {
            MaybeTlsStream::Rustls(s) => s.get_ref(),
            MaybeTlsStream::Plain(s) => s,
            _ => unreachable!("tungstenite is built with rustls only"),
        };
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self(ws)
    }

    pub fn send(&mut self, text: &str) {
        self.0.send(Message::text(text)).expect("send");
    }

    /// The next text message as JSON (fails the test after 10 s of silence).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.0.read().expect("read") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Skips messages until one of type `kind` arrives.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.recv();
            if msg["type"] == kind {
                return msg;
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub fn close_code(&mut self) -> u16 {
        loop {
            match self.0.read() {
                Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }

    pub fn join(url: &str, room: &str, user: &str) -> (Self, Value) {
        Self::connect(url).join_as(room, user)
    }

    /// Joins on this connection.
    pub fn join_as(mut self, room: &str, user: &str) -> (Self, Value) {
        self.send(&format!(
            r#"{{"type":"join","sessionId":"{room}","userId":"{user}"}}"#
        ));
        let joined = self.recv();
        assert_eq!(joined["type"], "joined", "{joined}");
        (self, joined)
    }
}

/// A real publisher `offer` message from str0m, one sending track of each kind given.
pub fn offer(kinds: &[MediaKind]) -> String {
    let mut rtc = str0m::Rtc::new(std::time::Instant::now());
    let mut api = rtc.sdp_api();
    for kind in kinds {
        api.add_media(*kind, Direction::SendOnly, None, None, None);
    }
    let (offer, _) = api.apply().expect("an offer");
    serde_json::json!({"type": "offer", "sdp": offer.to_sdp_string()}).to_string()
}

/// What any harness run on loopback must show: nobody failed to join, everyone who had
/// a publisher to hear received media, the protocol was kept, nothing was lost or
/// duplicated, and the server held no one afterwards.
pub fn assert_clean_run(report: &Report) {
    let peers = &report.peers;
    assert!(peers.join_failures.is_empty(), "{:?}", peers.join_failures);
    assert!(peers.joins >= peers.planned, "{peers:?}");
    assert_eq!(peers.without_media, 0, "everyone received media");
    assert_eq!(peers.violations, 0, "{:?}", peers.violation_samples);
    assert!(peers.errors.is_empty(), "{:?}", peers.errors);
    assert_eq!(report.stopped_early_s, None, "the run went its full length");
    assert_eq!(peers.cut_off, 0, "{:?}", peers.ends);
    let join = report.join_ms.expect("join times");
    assert_eq!(join.count, peers.joins);
    // Every session's handshakes come before its join, so each percentile of the
    // whole is at least the join's.
    let connect = report.connect_ms.expect("connect times");
    assert_eq!(connect.count, join.count);
    assert!(
        connect.p50 >= join.p50 && connect.p99 >= join.p99,
        "{connect:?} {join:?}"
    );
    // Decrypted and stamped by the measuring participants; counted from clear RTP
    // headers by everyone else.
    let (measured, counted) = (report.loss.measured, report.loss.counted);
    assert!(measured.received > 0, "{measured:?}");
    assert!(counted.received > 0, "{counted:?}");
    assert_eq!((measured.lost, measured.duplicates), (0, 0), "{measured:?}");
    assert_eq!(counted.lost, 0, "{counted:?}");
    assert_eq!(report.server.participants_after_leave, Some(0));
    assert_eq!(report.server.rooms_after_leave, Some(0));
}

/// How many participants saw a first video frame.
pub fn first_videos(report: &Report) -> u64 {
    report.first_video_ms.map_or(0, |d| d.count)
}
