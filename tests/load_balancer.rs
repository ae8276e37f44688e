//! corelay scaled out: two instances behind HAProxy running the shipped config,
//! `deploy/haproxy.cfg`, which terminates TLS (with a certificate made for the test)
//! and routes each WebSocket by a hash of its `room` parameter. `tests/run` installs
//! Debian's haproxy.
//!
//! Through the balancer, over `wss://`, the load harness must find every room whole
//! on one instance, rooms on both instances, media delivered without loss, and the
//! instances' figures summed; a WebSocket without its room is refused, and the
//! capabilities name a `wss://` signaling URL. A harness that does not trust the
//! certificate says so. A join for a room whose instance is down must land on the
//! other.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use corelay_loadtest::probe::get_over;
use corelay_loadtest::{Preset, Scenario, run, tls};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use tungstenite::Connector;

/// HAProxy with `deploy/haproxy.cfg` in front of two instances.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    /// Holds the balancer's certificate and key, and apart the certificate alone,
    /// which clients trust.
    dir: PathBuf,
    tls: Arc<ClientConfig>,
}

impl Balancer {
    fn start(instances: [&TestServer; 2]) -> Self {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!(
            "corelay-balancer-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let made = rcgen::generate_simple_self_signed([addr.ip().to_string()])
            .expect("a self-signed certificate");
        let cert = made.cert.pem();
        std::fs::write(dir.join("ca.pem"), &cert).expect("write ca.pem");
        std::fs::write(
            dir.join("balancer.pem"),
            cert + &made.signing_key.serialize_pem(),
        )
        .expect("write balancer.pem");
        let tls = tls::client_config(Some(&dir.join("ca.pem"))).expect("trust ca.pem");

        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let child = Command::new(haproxy())
            .args(["-db", "-f", config])
            .env("CORELAY_LB_BIND", addr.to_string())
            .env("CORELAY_LB_CERT", dir.join("balancer.pem"))
            .env("CORELAY_1", instances[0].addr.to_string())
            .env("CORELAY_2", instances[1].addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy");
        let mut balancer = Self {
            child,
            addr,
            dir,
            tls,
        };
        // Ready once it proxies a request through to an instance.
        let deadline = Instant::now() + Duration::from_secs(10);
        while balancer.get("/health").is_err() {
            if let Ok(Some(status)) = balancer.child.try_wait() {
                panic!("haproxy exited: {status}");
            }
            assert!(Instant::now() < deadline, "haproxy never proxied /health");
            std::thread::sleep(Duration::from_millis(20));
        }
        balancer
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The body of a 200 answer to `GET path`, over TLS.
    fn get(&self, path: &str) -> Result<String, String> {
        let tcp = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let name = ServerName::from(self.addr.ip());
        let conn = ClientConnection::new(self.tls.clone(), name).map_err(|e| e.to_string())?;
        get_over(StreamOwned::new(conn, tcp), &self.addr.to_string(), path)
    }

    /// A WebSocket through the balancer, over TLS.
    fn websocket(&self, path: &str) -> Result<Ws, tungstenite::Error> {
        let tcp = TcpStream::connect(self.addr)?;
        let url = format!("wss://{}{path}", self.addr);
        let connector = Connector::Rustls(self.tls.clone());
        let (ws, _) = tungstenite::client_tls_with_config(url, tcp, None, Some(connector))
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => {
                    unreachable!("a blocking socket")
                }
            })?;
        Ok(Ws::over(ws))
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
        balancer.get("/metrics").is_err_and(|e| e.contains("403")),
        "per-instance pages stay behind the balancer"
    );
    match balancer.websocket("/ws") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a WebSocket without its room got through"),
    }
    // A page served through the balancer is on HTTPS, so it must be told wss://.
    let caps: serde_json::Value =
        serde_json::from_str(&balancer.get("/client/capabilities").expect("capabilities"))
            .expect("json");
    assert_eq!(
        caps["rtc"]["signaling_url"],
        format!("wss://{}/ws", balancer.addr)
    );
    let scenario = Scenario {
        url: format!("wss://{}", balancer.addr),
        ca_file: Some(balancer.ca_file()),
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

    // Without the balancer's certificate, the harness trusts the system's roots only,
    // and its report says why nobody joined.
    let untrusting = Scenario {
        ca_file: None,
        rooms: 1,
        duration: Duration::from_secs(1),
        room_prefix: "untrusting".into(),
        ..scenario
    };
    let report = run(&untrusting, |_| {}).expect("run starts");
    let failures = &report.peers.join_failures;
    assert_eq!(report.peers.joins, 0, "{failures:?}");
    assert_eq!(failures.values().sum::<u64>(), 3, "{failures:?}");
    assert!(
        failures
            .keys()
            .all(|reason| reason.contains("invalid peer certificate")),
        "{failures:?}"
    );
}

#[test]
fn a_room_whose_instance_is_down_opens_on_another() {
    let [first, second] = [TestServer::start(&[]), TestServer::start(&[])];
    let balancer = Balancer::start([&first, &second]);
    let join = |room: &str, user: &str| {
        balancer
            .websocket(&format!("/ws?room={room}"))
            .expect("a WebSocket through the balancer")
            .join_as(room, user)
            .0
    };
    // Rooms until one lands on the second instance.
    let mut joined = Vec::new();
    let room = (0..32)
        .map(|n| format!("failover-{n}"))
        .find(|room| {
            joined.push(join(room, "early"));
            rooms(&second).contains(room)
        })
        .expect("a room hashed to the second instance");
    drop(second);

    let mut ws = join(&room, "late");
    assert!(rooms(&first).contains(&room), "{:?}", rooms(&first));
    ws.send(r#"{"type":"ping","requestId":"p"}"#);
    assert_eq!(ws.recv_type("pong")["requestId"], "p");
}
