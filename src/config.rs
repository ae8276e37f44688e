//! Everything an operator can set, as command-line flags with matching environment
//! variables. The names follow the seed designs (`PORT`, `STUN_SERVERS`, ...) so existing
//! deployment files keep working.

use std::net::{IpAddr, SocketAddr};

use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// corelay: a thread-per-core WebRTC SFU.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// HTTP and WebSocket port (0 picks a free one and prints it).
    #[arg(long, env = "PORT", default_value_t = 5005)]
    pub port: u16,

    /// Address the HTTP listener and the UDP media sockets bind to.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// First UDP media port; shard k binds `udp_port_base + k`. 0 lets every shard pick
    /// a free port (tests use this).
    #[arg(long, env = "UDP_PORT_BASE", default_value_t = 50000)]
    pub udp_port_base: u16,

    /// Number of shards (one pinned executor per core). Default: every core the
    /// process may run on.
    #[arg(long, env = "SHARDS")]
    pub shards: Option<usize>,

    /// IP addresses put in ICE candidates, comma separated. Default: the host's
    /// non-loopback addresses (so a browser on the same host or LAN connects), or
    /// 127.0.0.1 if it has none.
    #[arg(long = "public-ip", env = "PUBLIC_IPS", value_delimiter = ',')]
    pub public_ips: Vec<IpAddr>,

    /// STUN server URLs handed to clients in `joined.iceServers`, comma separated.
    #[arg(long, env = "STUN_SERVERS", value_delimiter = ',')]
    pub stun_servers: Vec<String>,

    /// TURN server URLs handed to clients, comma separated.
    #[arg(long, env = "TURN_SERVERS", value_delimiter = ',')]
    pub turn_servers: Vec<String>,

    /// Username for the TURN servers.
    #[arg(long, env = "TURN_USERNAME")]
    pub turn_username: Option<String>,

    /// Password for the TURN servers (never logged).
    #[arg(long, env = "TURN_PASSWORD", hide_env_values = true)]
    pub turn_password: Option<String>,

    /// Origins allowed to open the WebSocket, comma separated. Default: the local demo
    /// origins of PROTOCOL.md §1. Requests without an Origin header are always allowed.
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Maximum concurrent HTTP/WebSocket connections; beyond it upgrades get HTTP 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Largest signaling message in bytes; larger ones close the socket with 1009.
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value_t = 256 * 1024)]
    pub max_message_size: usize,

    /// Most participants in one room; the next join gets `room_full`.
    #[arg(long, env = "MAX_ROOM_PARTICIPANTS", default_value_t = 50)]
    pub max_room_participants: usize,

    /// Most rooms one shard hosts; beyond it joins get `room_full`.
    #[arg(long, env = "MAX_ROOMS_PER_SHARD", default_value_t = 10_000)]
    pub max_rooms_per_shard: usize,

    /// Signaling messages a client may send per second (burst: twice that).
    #[arg(long, env = "MESSAGE_RATE", default_value_t = 50)]
    pub message_rate: u32,

    /// Seconds after opening by which a WebSocket must be in a room (its `join`
    /// accepted or pending); one that is not is closed with 1008, so sockets that
    /// never join hold no connection slot.
    #[arg(long, env = "JOIN_TIMEOUT", default_value_t = 30)]
    pub join_timeout: u64,

    /// Seconds between WebSocket pings to each client (browsers answer on their
    /// own); a client heard nothing from for two intervals, its TCP connection
    /// silently gone, is closed with 1008. 0 sends no pings.
    #[arg(long, env = "PING_INTERVAL", default_value_t = 20)]
    pub ping_interval: u64,

    /// Bearer token guarding `/debug/rooms`; unset leaves it open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Log filter (`info`, `corelay=debug`, ...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The shape of one entry of `joined.iceServers` (WebRTC's RTCIceServer).
#[derive(Debug, Clone, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl Config {
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| core_affinity::get_core_ids().map_or(1, |ids| ids.len()))
            .max(1)
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    pub fn udp_addr(&self, shard: usize) -> SocketAddr {
        let port = match self.udp_port_base {
            0 => 0,
            base => base.saturating_add(u16::try_from(shard).unwrap_or(u16::MAX)),
        };
        SocketAddr::new(self.bind, port)
    }

    /// The origins PROTOCOL.md §1 allows by default, for the port we actually bound.
    pub fn allowed_origins(&self, port: u16) -> Vec<String> {
        if !self.cors_origins.is_empty() {
            return self.cors_origins.clone();
        }
        vec![
            format!("http://localhost:{port}"),
            format!("http://127.0.0.1:{port}"),
            "http://localhost:3000".into(),
            "http://localhost:8080".into(),
            "http://127.0.0.1:8080".into(),
        ]
    }

    pub fn ice_servers(&self) -> Vec<IceServer> {
        let mut servers = Vec::new();
        if !self.stun_servers.is_empty() {
            servers.push(IceServer {
                urls: self.stun_servers.clone(),
                username: None,
                credential: None,
            });
        }
        if !self.turn_servers.is_empty() {
            servers.push(IceServer {
                urls: self.turn_servers.clone(),
                username: self.turn_username.clone(),
                credential: self.turn_password.clone(),
            });
        }
        servers
    }

    /// The candidate addresses: configured, else every non-loopback interface address.
    pub fn candidate_ips(&self) -> Vec<IpAddr> {
        if !self.public_ips.is_empty() {
            return self.public_ips.clone();
        }
        // A socket bound to an IPv4 address cannot be reached over IPv6 (and the
        // reverse, unless bound to `::`, which is dual-stack).
        let reachable = |ip: &IpAddr| match self.bind {
            IpAddr::V6(v6) if v6.is_unspecified() => true,
            bind => bind.is_ipv4() == ip.is_ipv4(),
        };
        let mut ips = crate::media::udp::interface_ips();
        ips.retain(|ip| {
            reachable(ip) && !ip.is_loopback() && !ip.is_unspecified() && !is_link_local(ip)
        });
        if ips.is_empty() {
            ips.push(IpAddr::from([127, 0, 0, 1]));
        }
        ips
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}
