//! Rooms spread over shards by the documented hash, and a room never straddles two:
//! `/debug/rooms` and `/metrics` show where everything lives, and `/health` which
//! shard stopped.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use corelay::shard::shard_for;
use serde_json::Value;

#[test]
fn rooms_land_on_their_hashed_shard_and_stay_whole() {
    let server = TestServer::start(&[]);
    let rooms: Vec<String> = (0..12).map(|i| format!("room-{i}")).collect();
    let mut sockets = Vec::new();
    for room in &rooms {
        for user in ["a", "b", "c"] {
            let (ws, joined) = Ws::join(&server.ws_url(room), room, user);
            assert_eq!(joined["sessionId"], room.as_str());
            sockets.push(ws);
        }
    }
    // `joined` is sent after the shard added the participant, so the snapshot below
    // sees every join.
    let listed = server.debug_rooms();
    let mut per_shard = BTreeMap::new();
    for room in listed["rooms"].as_array().expect("rooms") {
        let id = room["sessionId"].as_str().expect("id");
        let shard = room["shard"].as_u64().expect("shard") as usize;
        assert_eq!(shard, shard_for(id, 2), "{id} is on its hashed shard");
        assert_eq!(
            room["participants"].as_array().map(Vec::len),
            Some(3),
            "{room}"
        );
        *per_shard.entry(shard).or_insert(0) += 1;
    }
    assert_eq!(
        per_shard.values().sum::<usize>(),
        rooms.len(),
        "each room listed once"
    );
    assert_eq!(per_shard.len(), 2, "both shards host rooms: {per_shard:?}");

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for (shard, count) in &per_shard {
        let line = format!("rtc_active_rooms{{shard=\"{shard}\"}} {count}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
        let participants = format!("rtc_active_participants{{shard=\"{shard}\"}} {}", count * 3);
        assert!(metrics.contains(&participants), "missing {participants:?}");
    }

    // Rooms are removed when empty.
    drop(sockets);
    let mut remaining = usize::MAX;
    for _ in 0..200 {
        remaining = server.debug_rooms()["rooms"].as_array().map_or(0, Vec::len);
        if remaining == 0 {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(remaining, 0, "empty rooms are removed");
}

#[test]
fn http_endpoints_answer() {
    let server = TestServer::start(&["--admin-token", "s3cret"]);
    let (status, body) = server.get("/health");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["status"], "ok");

    let (status, body) = server.get("/client/capabilities");
    assert_eq!(status, 200);
    let caps: serde_json::Value = serde_json::from_str(&body).expect("json");
    for key in [
        "protocol_version",
        "signaling_url",
        "signaling_transport",
        "topologies",
        "features",
        "ice_servers",
        "connection_policy",
    ] {
        assert!(
            !caps["rtc"][key].is_null(),
            "capabilities lack {key}: {caps}"
        );
    }
    assert_eq!(
        caps["rtc"]["signaling_url"],
        format!("ws://{}/ws", server.addr)
    );

    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "rtc_active_rooms",
        "rtc_active_participants",
        "rtc_join_fail_total",
        "rtc_publish_track_total",
        "rtc_negotiation_error_total",
        "rtc_forced_disconnect_total",
        "rtc_join_ticket_issued_total",
        "rtc_forwarded_packets_total",
        "rtc_forwarded_bytes_total",
        "rtc_subscriber_rtt_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "metrics lack {name}"
        );
    }

    assert_eq!(server.get("/debug/rooms").0, 401, "admin token enforced");
    assert_eq!(server.get("/debug/rooms?token=s3cret").0, 200);
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") && page.contains("/ws"),
        "demo page served"
    );
    assert_eq!(server.get("/nope").0, 404);
}

/// A shard that stops (here: its executor thread frozen the way a debugger freezes
/// it) is named by `/health` with a 503, so a load balancer takes the instance out,
/// and counted in the metrics; the other shard goes on serving its rooms; once the
/// shard runs again, `/health` says so.
#[test]
fn a_stopped_shard_is_reported_and_the_others_carry_on() {
    let server = TestServer::start(&[]);
    assert_eq!(health(&server, 200)["stalledShards"], serde_json::json!([]));

    let frozen = Frozen::asleep(server.pid(), 1);
    let report = health(&server, 503);
    assert_eq!(report["status"], "stalled", "{report}");
    assert_eq!(report["stalledShards"], serde_json::json!([1]), "{report}");
    let room = (0..)
        .map(|i| format!("room-{i}"))
        .find(|room| shard_for(room, 2) == 0)
        .expect("a room on shard 0");
    let (_ws, joined) = Ws::join(&server.ws_url(&room), &room, "alice");
    assert_eq!(joined["sessionId"], room.as_str(), "shard 0 still serves");
    let (_, metrics) = server.get("/metrics");
    for line in [
        "rtc_shard_stalled{shard=\"0\"} 0",
        "rtc_shard_stalled{shard=\"1\"} 1",
        "rtc_shard_stalls_total{shard=\"1\"} 1",
        "rtc_shard_kicks_total{shard=\"0\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    // The watchdog interrupted the silent shard's thread, which (stopped) holds the
    // signal until it runs again.
    assert!(
        !metrics.contains("rtc_shard_kicks_total{shard=\"1\"} 0"),
        "shard 1 was not interrupted:\n{metrics}"
    );
    assert!(frozen.holds(libc::SIGURG), "no SIGURG waits for shard 1");

    drop(frozen);
    assert_eq!(health(&server, 200)["stalledShards"], serde_json::json!([]));
    let (_, metrics) = server.get("/metrics");
    for line in [
        "rtc_shard_stalled{shard=\"1\"} 0",
        "rtc_shard_stalls_total{shard=\"1\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

/// A stopped shard's mailbox fills up to its byte bound and no further: the accept
/// shard refuses what does not fit with `rate_limited` ("server busy") instead of
/// holding it, and the other shard serves on. Once the shard runs again, every
/// message the mailbox took is answered, once and in order, and a join that came
/// while it was stopped (small enough to fit) completes.
#[test]
fn a_stopped_shards_full_mailbox_refuses_what_does_not_fit() {
    /// Offers per flooder: within one client's message burst, so only the mailbox
    /// refuses; four flooders' worth is more than the mailbox's bytes.
    const OFFERS: usize = 80;
    const FLOODERS: usize = 4;
    const SDP_BYTES: usize = 250_000;
    let server = TestServer::start(&[]);
    let room_on = |shard| {
        (0..)
            .map(|i| format!("room-{i}"))
            .find(|room| shard_for(room, 2) == shard)
            .expect("a room")
    };
    let (stopped_room, live_room) = (room_on(1), room_on(0));
    let url = server.ws_url(&stopped_room);
    let mut flooders: Vec<Ws> = (0..FLOODERS)
        .map(|i| Ws::join(&url, &stopped_room, &format!("flooder-{i}")).0)
        .collect();
    for ws in &mut flooders {
        for _ in 1..FLOODERS {
            ws.recv_type("peer_joined");
        }
    }

    let frozen = Frozen::asleep(server.pid(), 1);
    let sdp = format!("v=0\\r\\n{}", "a".repeat(SDP_BYTES));
    let mut taken: Vec<Vec<String>> = Vec::new();
    let mut busy = 0;
    for (i, ws) in flooders.iter_mut().enumerate() {
        for n in 0..OFFERS {
            ws.send(&format!(
                r#"{{"type":"offer","sdp":"{sdp}","requestId":"{i}-{n}"}}"#
            ));
        }
        ws.send(r#"{"type":"ping","requestId":"flushed"}"#);
        let mut refused = Vec::new();
        loop {
            let msg = ws.recv();
            if msg["type"] == "pong" {
                break;
            }
            assert_eq!(msg["type"], "error", "{msg}");
            assert_eq!(msg["code"], "rate_limited", "{msg}");
            assert_eq!(msg["message"], "server busy; retry shortly", "{msg}");
            refused.push(msg["requestId"].as_str().expect("requestId").to_owned());
        }
        busy += refused.len();
        taken.push(
            (0..OFFERS)
                .map(|n| format!("{i}-{n}"))
                .filter(|id| !refused.contains(id))
                .collect(),
        );
    }
    let held: usize = taken.iter().map(Vec::len).sum();
    assert!(busy > 0, "the mailbox took all {held} offers");
    assert!(
        held * SDP_BYTES <= corelay::shard::MAILBOX_BYTES + SDP_BYTES,
        "{held} offers of {SDP_BYTES} bytes held"
    );

    let (_live, joined) = Ws::join(&server.ws_url(&live_room), &live_room, "alice");
    assert_eq!(
        joined["sessionId"],
        live_room.as_str(),
        "shard 0 still serves"
    );
    let mut late = Ws::connect(&url);
    late.send(&format!(
        r#"{{"type":"join","sessionId":"{stopped_room}","userId":"late"}}"#
    ));

    drop(frozen);
    for (ws, ids) in flooders.iter_mut().zip(&taken) {
        for id in ids {
            let answer = ws.recv_type("error");
            assert_eq!(
                answer["requestId"],
                id.as_str(),
                "one answer each, in order"
            );
            assert_eq!(answer["code"], "negotiation_failed", "{answer}");
        }
        ws.send(r#"{"type":"ping"}"#);
        let after = std::iter::repeat_with(|| ws.recv()).find(|msg| msg["type"] != "peer_joined");
        assert_eq!(after.map(|msg| msg["type"].clone()), Some("pong".into()));
    }
    let joined = late.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    let peers: Vec<Value> = (0..FLOODERS)
        .map(|_| late.recv_type("peer_joined"))
        .collect();
    assert!(
        peers.iter().all(|p| p["userId"]
            .as_str()
            .is_some_and(|u| u.starts_with("flooder-"))),
        "{peers:?}"
    );
}

/// `/health`'s JSON, once it answers with `status` (within ten seconds).
fn health(server: &TestServer, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = server.get("/health");
        if got == status {
            return serde_json::from_str(&body).expect("health JSON");
        }
        assert!(Instant::now() < deadline, "/health still {got}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A thread of another process held stopped, without stopping its siblings (ptrace's
/// seize and interrupt), until dropped.
struct Frozen(libc::pid_t);

impl Frozen {
    /// The executor thread of shard `shard` (the first thread glommio names after it),
    /// stopped where a shard that stopped answering sleeps: in `io_uring_enter`.
    /// Stopped anywhere else it could hold what the other shards wait for, which a real
    /// stall does not: caught starting up, it held glommio's one-time `membarrier`
    /// set-up, and shard 0 waited on it.
    fn asleep(pid: u32, shard: usize) -> Self {
        const IO_URING_ENTER: &str = "426";
        let prefix = format!("shard-{shard}-");
        let tid: libc::pid_t = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the server's threads")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|tid: &libc::pid_t| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .is_ok_and(|name| name.starts_with(&prefix))
            })
            .min()
            .unwrap_or_else(|| panic!("no thread named {prefix}*"));
        let none = std::ptr::null_mut::<libc::c_void>();
        let in_io_uring_enter = || {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
                .is_ok_and(|call| call.split(' ').next() == Some(IO_URING_ENTER))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Each stop wakes the thread when it ends: let it go back to sleep first.
            if !in_io_uring_enter() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // SAFETY: ptrace and waitpid on a thread id; no memory is passed.
            let stopped = unsafe {
                libc::ptrace(libc::PTRACE_SEIZE, tid, none, none) == 0
                    && libc::ptrace(libc::PTRACE_INTERRUPT, tid, none, none) == 0
                    && libc::waitpid(tid, std::ptr::null_mut(), libc::__WALL) == tid
            };
            assert!(
                stopped,
                "could not stop thread {tid}: {}",
                std::io::Error::last_os_error()
            );
            let frozen = Self(tid);
            if in_io_uring_enter() {
                return frozen;
            }
        }
        panic!("shard {shard} was never caught asleep in io_uring_enter");
    }
}

impl Frozen {
    /// Whether `signal` is pending for this thread alone.
    fn holds(&self, signal: libc::c_int) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0))
            .expect("the thread's status");
        let pending = status
            .lines()
            .find_map(|line| line.strip_prefix("SigPnd:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .expect("SigPnd");
        pending & (1 << (signal - 1)) != 0
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let none = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: detaching the thread this test stopped.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, none, none) };
    }
}
