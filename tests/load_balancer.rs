//! corelay scaled out: two instances behind HAProxy running the shipped config,
//! `deploy/haproxy.cfg`, which routes each WebSocket by a hash of its `room`
//! parameter. `tests/run` installs Debian's haproxy.
//!
//! Through the balancer, the load harness must find every room whole on one instance,
//! rooms on both instances, media delivered without loss, and the instances' figures
//! summed; a WebSocket without its room is refused. A join for a room whose instance
//! is down must land on the other.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use corelay_loadtest::probe::http_get;
use corelay_loadtest::{Preset, Scenario, run};

/// HAProxy with `deploy/haproxy.cfg` in front of two instances.
struct Balancer {
    child: Child,
    addr: SocketAddr,
}

impl Balancer {
    fn start(instances: [&TestServer; 2]) -> Self {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let mut child = Command::new(haproxy())
            .args(["-db", "-f", config])
            .env("CORELAY_LB_BIND", addr.to_string())
            .env("CORELAY_1", instances[0].addr.to_string())
            .env("CORELAY_2", instances[1].addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy");
        // Ready once it proxies a request through to an instance.
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(&addr.to_string(), "/health").is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("haproxy exited: {status}");
            }
            assert!(Instant::now() < deadline, "haproxy never proxied /health");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian installs it in /usr/sbin, which a user's PATH may lack.
fn haproxy() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy is not installed: tests/run installs Debian's package")
}

fn metrics_url(server: &TestServer) -> String {
    format!("http://{}/metrics", server.addr)
}

/// The rooms an instance holds.
fn rooms(server: &TestServer) -> Vec<String> {
    server.debug_rooms()["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["sessionId"].as_str().expect("sessionId").to_string())
        .collect()
}

#[test]
fn rooms_stay_whole_and_spread_over_instances() {
    let instances = [TestServer::start(&[]), TestServer::start(&[])];
    let balancer = Balancer::start([&instances[0], &instances[1]]);
    assert!(
        http_get(&balancer.addr.to_string(), "/metrics").is_err_and(|e| e.contains("403")),
        "per-instance pages stay behind the balancer"
    );
    match tungstenite::connect(format!("ws://{}/ws", balancer.addr)) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("a WebSocket without its room got through: {other:?}"),
    }
    let scenario = Scenario {
        url: format!("ws://{}", balancer.addr),
        rooms: 6,
        peers: 3,
        duration: Duration::from_secs(3),
        room_prefix: "balanced".into(),
        measure_fraction: 0.3,
        metrics_urls: instances.iter().map(metrics_url).collect(),
        ..Scenario::preset(Preset::Meeting)
    };
    let report = run(&scenario, |_| {}).expect("run starts");
    eprint!("{}", report.table());

    // A room split over two instances would leave someone without media.
    common::assert_clean_run(&report);
    assert_eq!(report.peers.joins, 18);
    assert_eq!(common::first_videos(&report), 18);

    let held = &report.server.instances;
    assert_eq!(held.len(), 2, "{held:?}");
    let peak_rooms: Vec<u64> = held.iter().filter_map(|i| i.peak_rooms).collect();
    let peak_participants: u64 = held.iter().filter_map(|i| i.peak_participants).sum();
    assert_eq!(
        peak_rooms.iter().sum::<u64>(),
        6,
        "each room on one instance: {held:?}"
    );
    assert!(peak_rooms.iter().all(|r| *r > 0), "rooms on both: {held:?}");
    assert_eq!(peak_participants, 18, "{held:?}");
    assert!(held.iter().all(|i| !i.counters_went_backwards), "{held:?}");
    // The server figures are the instances' sums.
    assert!(report.rates.server_forwarded_pps.is_some_and(|p| p > 0.0));
    assert!(report.server.cpu_us_per_forwarded_packet.is_some());
    assert!(report.table().contains("server instances"));
    // Warnings about the harness's own CPU depend on what else the host runs (they
    // start "THE HARNESS"); none about the server or the run may appear.
    assert!(
        report.warnings.iter().all(|w| w.starts_with("THE HARNESS")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn a_room_whose_instance_is_down_opens_on_another() {
    let [first, second] = [TestServer::start(&[]), TestServer::start(&[])];
    let balancer = Balancer::start([&first, &second]);
    let url = |room: &str| format!("ws://{}/ws?room={room}", balancer.addr);
    // Rooms until one lands on the second instance.
    let mut joined = Vec::new();
    let room = (0..32)
        .map(|n| format!("failover-{n}"))
        .find(|room| {
            joined.push(Ws::join(&url(room), room, "early").0);
            rooms(&second).contains(room)
        })
        .expect("a room hashed to the second instance");
    drop(second);

    let (mut ws, _) = Ws::join(&url(&room), &room, "late");
    assert!(rooms(&first).contains(&room), "{:?}", rooms(&first));
    ws.send(r#"{"type":"ping","requestId":"p"}"#);
    assert_eq!(ws.recv_type("pong")["requestId"], "p");
}
