//! What a load run does: how many rooms and participants, who publishes what, how
//! fast they join, how long the run lasts, and where the server is. Presets name the
//! common shapes; every field can then be overridden.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};
use tungstenite::http::Uri;

use crate::client::percent_encode;

/// Upper bound on participants in one run: each costs three sockets and two str0m
/// connections.
pub const MAX_PEERS: usize = 100_000;
/// Upper bound on worker threads.
pub const MAX_THREADS: usize = 256;

/// Named scenario shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 5 participants per room, all publishing audio and video.
    Meeting,
    /// 10 participants per room, all publishing audio only.
    Voice,
    /// 1 publisher and 24 subscribers per room.
    Webinar,
    /// 4 publishing participants per room, each leaving after about 8 s (cleanly or by
    /// dropping its socket, alternately) and replaced at once: finds leaks and
    /// renegotiation bugs.
    Churn,
}

/// Which SFU the participants speak to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// corelay's protocol (PROTOCOL.md).
    #[default]
    Corelay,
    /// Janus's VideoRoom plugin over its WebSocket API, for a side-by-side.
    Janus,
}

/// One load run. Build it from [`Scenario::preset`] and override fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// `ws://host:port` of one server, or `wss://` (or `ws://`) of a load balancer;
    /// peers connect to `<url>/ws?room=<room>`.
    pub url: String,
    /// Certificates (PEM) to trust for `wss://` instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    pub target: Target,
    pub preset: Option<Preset>,
    pub rooms: usize,
    /// Participants per room.
    pub peers: usize,
    /// Publishers per room (the first ones to join); `None`: every participant.
    pub publishers: Option<usize>,
    /// Video bitrate of each publisher.
    pub video_kbps: u32,
    /// Publish audio only.
    pub audio_only: bool,
    /// How long media runs once the last planned participant was due to join.
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
    /// Joins per second across all rooms.
    pub join_rate: f64,
    /// Churn: how long each participant stays (varied ±50 % per participant) before
    /// leaving and being replaced, except each room's first, who stays. `None`:
    /// everyone stays for the whole run.
    #[serde(serialize_with = "optional_seconds")]
    pub lifetime: Option<Duration>,
    /// Worker threads, each an event loop over its share of the rooms.
    pub threads: usize,
    /// Fraction of participants per room that decrypt and measure latency and loss
    /// (at least one per room); the others only count packets.
    pub measure_fraction: f64,
    /// Room names are `<room_prefix>-<n>`.
    pub room_prefix: String,
    /// Process id of a local server: CPU and memory from `/proc`, and the floor
    /// (`floor.rs`) on its core after the run.
    pub server_pid: Option<u32>,
    /// `http://host:port/metrics` of each server instance (several behind a load
    /// balancer, whose figures are summed); empty: derived from `url`.
    pub metrics_urls: Vec<String>,
    /// A participant not joined this long after it started connecting has failed.
    #[serde(serialize_with = "seconds")]
    pub join_timeout: Duration,
}

impl Scenario {
    /// The preset's scenario against `ws://127.0.0.1:5005`, one room, 30 seconds.
    pub fn preset(preset: Preset) -> Self {
        let base = Self {
            url: "ws://127.0.0.1:5005".into(),
            ca_file: None,
            target: Target::Corelay,
            preset: Some(preset),
            rooms: 1,
            peers: 5,
            publishers: None,
            video_kbps: 300,
            audio_only: false,
            duration: Duration::from_secs(30),
            join_rate: 20.0,
            lifetime: None,
            threads: 1,
            measure_fraction: 0.1,
            room_prefix: format!("load{}", std::process::id()),
            server_pid: None,
            metrics_urls: Vec::new(),
            join_timeout: Duration::from_secs(10),
        };
        match preset {
            Preset::Meeting => base,
            Preset::Voice => Self {
                peers: 10,
                audio_only: true,
                ..base
            },
            Preset::Webinar => Self {
                peers: 25,
                publishers: Some(1),
                ..base
            },
            Preset::Churn => Self {
                peers: 4,
                lifetime: Some(Duration::from_secs(8)),
                ..base
            },
        }
    }

    /// Refuses scenarios that cannot run.
    pub fn validate(&self) -> Result<(), String> {
        let total = self.rooms.saturating_mul(self.peers);
        if self.rooms == 0 || self.peers == 0 {
            return Err("--rooms and --peers must be at least 1".into());
        }
        if total > MAX_PEERS {
            return Err(format!("{total} participants: at most {MAX_PEERS} per run"));
        }
        if self.publishers.is_some_and(|p| p > self.peers) {
            return Err("--publishers cannot exceed --peers".into());
        }
        if !(self.join_rate.is_finite() && self.join_rate > 0.0) {
            return Err("--join-rate must be positive".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if self.lifetime.is_some_and(|l| l < Duration::from_secs(1)) {
            return Err("--lifetime must be at least 1 s".into());
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(format!("--threads must be 1..={MAX_THREADS}"));
        }
        if !(0.0..=1.0).contains(&self.measure_fraction) {
            return Err("--measure-fraction must be within 0..=1".into());
        }
        if !self.audio_only && self.video_kbps == 0 {
            return Err("--video-kbps must be positive".into());
        }
        if self.server_pid.is_some() && self.metrics_urls.len() > 1 {
            return Err("--server-pid measures one local server: behind a load balancer, CPU and memory come from each instance's --metrics-url".into());
        }
        self.metrics_endpoints()?;
        // Also checks the URL when the metrics come from elsewhere.
        let tls = self.tls()?;
        if self.ca_file.is_some() && !tls {
            return Err("--ca-file is for a wss:// URL".into());
        }
        Ok(())
    }

    /// Participants over all rooms.
    pub fn total_peers(&self) -> usize {
        self.rooms * self.peers
    }

    /// Publishers per room.
    pub fn publishers_per_room(&self) -> usize {
        self.publishers.unwrap_or(self.peers).min(self.peers)
    }

    /// Participants per room that decrypt and measure: the last ones to join, so a
    /// webinar measures subscribers rather than its publisher.
    pub fn measured_per_room(&self) -> usize {
        ((self.peers as f64 * self.measure_fraction).round() as usize).clamp(1, self.peers)
    }

    /// Time from the first join to the last planned one.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.total_peers().saturating_sub(1) as f64 / self.join_rate)
    }

    /// Name of room `n`.
    pub fn room_name(&self, n: usize) -> String {
        format!("{}-{n}", self.room_prefix)
    }

    /// Signaling URL for room `n`.
    pub fn room_url(&self, n: usize) -> Result<String, String> {
        let endpoint = self.endpoint()?;
        Ok(format!(
            "{}://{}/ws?room={}",
            endpoint.scheme(),
            endpoint.authority,
            percent_encode(&self.room_name(n))
        ))
    }

    /// The server's address (resolved once: every participant connects to it).
    pub fn server_addr(&self) -> Result<SocketAddr, String> {
        let endpoint = self.endpoint()?;
        (endpoint.host.as_str(), endpoint.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.url))?
            .next()
            .ok_or_else(|| format!("{} does not resolve", self.url))
    }

    /// `host:port` and path of each instance's metrics endpoint.
    pub fn metrics_endpoints(&self) -> Result<Vec<(String, String)>, String> {
        let urls = if self.metrics_urls.is_empty() {
            let endpoint = self.endpoint()?;
            if endpoint.tls {
                // corelay serves plain HTTP; TLS ends at a balancer, which keeps
                // `/metrics` to itself.
                return Err(format!(
                    "{}: behind TLS, give each instance's --metrics-url http://host:port/metrics",
                    self.url
                ));
            }
            vec![format!("http://{}/metrics", endpoint.authority)]
        } else {
            self.metrics_urls.clone()
        };
        urls.iter()
            .map(|url| {
                let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
                if uri.scheme_str() != Some("http") {
                    return Err(format!("{url}: only http:// metrics URLs are supported"));
                }
                let authority = uri
                    .authority()
                    .ok_or_else(|| format!("{url}: no host"))?
                    .to_string();
                Ok((authority, uri.path().to_string()))
            })
            .collect()
    }

    fn endpoint(&self) -> Result<Endpoint, String> {
        let uri: Uri = self.url.parse().map_err(|e| format!("{}: {e}", self.url))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("{}: give a ws:// or wss:// URL", self.url)),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "{}: give the server's base URL; the harness adds /ws?room=",
                self.url
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{}: no host", self.url))?;
        Ok(Endpoint {
            tls,
            authority: authority.to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        })
    }

    /// Whether peers speak TLS to the server (a `wss://` URL).
    pub fn tls(&self) -> Result<bool, String> {
        self.endpoint().map(|e| e.tls)
    }
}

struct Endpoint {
    tls: bool,
    authority: String,
    host: String,
    port: u16,
}

impl Endpoint {
    fn scheme(&self) -> &'static str {
        if self.tls { "wss" } else { "ws" }
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn optional_seconds<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => seconds(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_derived_counts() {
        let webinar = Scenario::preset(Preset::Webinar);
        assert_eq!(webinar.publishers_per_room(), 1);
        assert_eq!(webinar.measured_per_room(), 3);
        let meeting = Scenario {
            rooms: 3,
            ..Scenario::preset(Preset::Meeting)
        };
        assert_eq!(meeting.publishers_per_room(), 5);
        assert_eq!(meeting.measured_per_room(), 1, "at least one per room");
        assert_eq!(meeting.total_peers(), 15);
        assert_eq!(meeting.ramp(), Duration::from_millis(700));
        assert!(Scenario::preset(Preset::Voice).audio_only);
        assert!(Scenario::preset(Preset::Churn).lifetime.is_some());
        for preset in [
            Preset::Meeting,
            Preset::Voice,
            Preset::Webinar,
            Preset::Churn,
        ] {
            assert_eq!(Scenario::preset(preset).validate(), Ok(()));
        }
    }

    #[test]
    fn urls() {
        let s = Scenario {
            url: "ws://127.0.0.1:9000/".into(),
            room_prefix: "a b".into(),
            ..Scenario::preset(Preset::Meeting)
        };
        assert_eq!(
            s.room_url(2).unwrap(),
            "ws://127.0.0.1:9000/ws?room=a%20b-2"
        );
        assert_eq!(s.server_addr().unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            s.metrics_endpoints().unwrap(),
            [("127.0.0.1:9000".into(), "/metrics".into())]
        );
        // Behind a load balancer: each instance's endpoint, in order.
        let balanced = Scenario {
            metrics_urls: vec![
                "http://10.0.0.1:5005/metrics".into(),
                "http://10.0.0.2:5005/metrics".into(),
            ],
            ..s.clone()
        };
        assert_eq!(
            balanced.metrics_endpoints().unwrap(),
            [
                ("10.0.0.1:5005".into(), "/metrics".into()),
                ("10.0.0.2:5005".into(), "/metrics".into())
            ]
        );
        let with_pid = Scenario {
            server_pid: Some(1),
            ..balanced.clone()
        };
        assert!(with_pid.validate().unwrap_err().contains("each instance"));
        let https = Scenario {
            metrics_urls: vec!["https://10.0.0.1/metrics".into()],
            ..s.clone()
        };
        assert!(https.validate().unwrap_err().contains("only http://"));
        let v6 = Scenario {
            url: "ws://[::1]:9000".into(),
            ..s.clone()
        };
        assert_eq!(v6.server_addr().unwrap(), "[::1]:9000".parse().unwrap());
        // Through a balancer that terminates TLS: instances' metrics are given.
        let secure = Scenario {
            url: "wss://lb.example".into(),
            ..balanced.clone()
        };
        assert_eq!(
            secure.room_url(0).unwrap(),
            "wss://lb.example/ws?room=a%20b-0"
        );
        assert_eq!(secure.tls(), Ok(true));
        let unmeasured = Scenario {
            metrics_urls: Vec::new(),
            ..secure.clone()
        };
        assert!(unmeasured.validate().unwrap_err().contains("--metrics-url"));
        let plain_with_ca = Scenario {
            ca_file: Some("ca.pem".into()),
            ..balanced.clone()
        };
        assert!(plain_with_ca.validate().unwrap_err().contains("wss://"));
        for bad in ["ws://x:1/ws?room=a", "http://x:1", "not a url"] {
            for base in [&s, &balanced] {
                let s = Scenario {
                    url: bad.into(),
                    ..base.clone()
                };
                assert!(s.validate().is_err(), "{bad}");
            }
        }
    }

    #[test]
    fn validation() {
        let ok = Scenario::preset(Preset::Meeting);
        let bad = [
            Scenario {
                publishers: Some(6),
                ..ok.clone()
            },
            Scenario {
                rooms: 0,
                ..ok.clone()
            },
            Scenario {
                join_rate: 0.0,
                ..ok.clone()
            },
            Scenario {
                measure_fraction: 1.5,
                ..ok.clone()
            },
            Scenario {
                threads: 0,
                ..ok.clone()
            },
            Scenario {
                rooms: MAX_PEERS,
                ..ok.clone()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
