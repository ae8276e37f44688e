//! Prometheus metrics, per shard, without cross-core traffic on the packet path.
//!
//! Each shard counts in plain integers (`Counters`, owned by its `Sfu`) and publishes a
//! copy into its own `ShardMetrics` once per batch with relaxed stores. The accept
//! shard reads those cells when `/metrics` is scraped. No cell is written by two cores.
//! The text exposition format is a handful of lines, so it is written here directly.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters a shard updates on its own core.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub active_rooms: u64,
    pub active_participants: u64,
    pub join_fail: u64,
    pub publish_track: u64,
    pub negotiation_error: u64,
    pub forced_disconnect: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub udp_rx_packets: u64,
    pub udp_tx_packets: u64,
    pub udp_tx_dropped: u64,
    pub udp_rx_dropped: u64,
    pub unrouted_packets: u64,
    pub keyframe_requests: u64,
    pub overloaded: u64,
    pub overloads: u64,
}

struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    get: fn(&Counters) -> u64,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "rtc_active_rooms",
        kind: "gauge",
        help: "Rooms hosted.",
        get: |c| c.active_rooms,
    },
    Metric {
        name: "rtc_active_participants",
        kind: "gauge",
        help: "Participants joined.",
        get: |c| c.active_participants,
    },
    Metric {
        name: "rtc_join_fail_total",
        kind: "counter",
        help: "Joins refused.",
        get: |c| c.join_fail,
    },
    Metric {
        name: "rtc_publish_track_total",
        kind: "counter",
        help: "Tracks published.",
        get: |c| c.publish_track,
    },
    Metric {
        name: "rtc_negotiation_error_total",
        kind: "counter",
        help: "Offers or answers that failed to apply.",
        get: |c| c.negotiation_error,
    },
    Metric {
        name: "rtc_forced_disconnect_total",
        kind: "counter",
        help: "Participants removed by the server (ICE/DTLS failure, slow socket).",
        get: |c| c.forced_disconnect,
    },
    Metric {
        name: "rtc_join_ticket_issued_total",
        kind: "counter",
        help: "Join tickets issued.",
        get: |_| 0,
    },
    Metric {
        name: "rtc_forwarded_packets_total",
        kind: "counter",
        help: "RTP packets handed to subscribers.",
        get: |c| c.forwarded_packets,
    },
    Metric {
        name: "rtc_forwarded_bytes_total",
        kind: "counter",
        help: "RTP payload bytes handed to subscribers.",
        get: |c| c.forwarded_bytes,
    },
    Metric {
        name: "rtc_udp_rx_packets_total",
        kind: "counter",
        help: "Datagrams received.",
        get: |c| c.udp_rx_packets,
    },
    Metric {
        name: "rtc_udp_tx_packets_total",
        kind: "counter",
        help: "Datagrams sent.",
        get: |c| c.udp_tx_packets,
    },
    Metric {
        name: "rtc_udp_tx_dropped_total",
        kind: "counter",
        help: "Datagrams the kernel refused (send buffer full).",
        get: |c| c.udp_tx_dropped,
    },
    Metric {
        name: "rtc_udp_rx_dropped_total",
        kind: "counter",
        help: "Datagrams the kernel dropped (receive buffer full: the shard fell behind).",
        get: |c| c.udp_rx_dropped,
    },
    Metric {
        name: "rtc_unrouted_packets_total",
        kind: "counter",
        help: "Datagrams that matched no connection.",
        get: |c| c.unrouted_packets,
    },
    Metric {
        name: "rtc_keyframe_requests_total",
        kind: "counter",
        help: "Keyframe requests sent to publishers.",
        get: |c| c.keyframe_requests,
    },
    Metric {
        name: "rtc_shard_overloaded",
        kind: "gauge",
        help: "1 while the shard's socket drops datagrams (NACKs to publishers paused).",
        get: |c| c.overloaded,
    },
    Metric {
        name: "rtc_shard_overloads_total",
        kind: "counter",
        help: "Times the shard's socket started dropping datagrams.",
        get: |c| c.overloads,
    },
];

/// One shard's published copy of its counters.
#[derive(Default)]
pub struct ShardMetrics {
    cells: [AtomicU64; METRICS.len()],
}

impl ShardMetrics {
    pub fn publish(&self, counters: &Counters) {
        for (cell, metric) in self.cells.iter().zip(METRICS) {
            cell.store((metric.get)(counters), Relaxed);
        }
    }

    fn value(&self, index: usize) -> u64 {
        self.cells.get(index).map_or(0, |c| c.load(Relaxed))
    }
}

/// Server-wide counters of the accept shard (signaling refusals, connections).
#[derive(Default)]
pub struct AcceptMetrics {
    pub connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub signaling_errors: AtomicU64,
}

pub fn render(shards: &[std::sync::Arc<ShardMetrics>], accept: &AcceptMetrics) -> String {
    let mut out = String::with_capacity(4096);
    for (i, metric) in METRICS.iter().enumerate() {
        let _ = writeln!(out, "# HELP {} {}", metric.name, metric.help);
        let _ = writeln!(out, "# TYPE {} {}", metric.name, metric.kind);
        for (shard, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{}{{shard=\"{shard}\"}} {}", metric.name, m.value(i));
        }
    }
    let accept_metrics = [
        (
            "rtc_signaling_connections",
            "gauge",
            "Open HTTP/WebSocket connections.",
            &accept.connections,
        ),
        (
            "rtc_signaling_rejected_connections_total",
            "counter",
            "Connections refused at the connection limit.",
            &accept.rejected_connections,
        ),
        (
            "rtc_signaling_errors_total",
            "counter",
            "Client messages refused before reaching a shard.",
            &accept.signaling_errors,
        ),
    ];
    for (name, kind, help, cell) in accept_metrics {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {}", cell.load(Relaxed));
    }
    if let Some((cpu_seconds, rss_bytes)) = process_usage() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time."
        );
        let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
        let _ = writeln!(out, "process_cpu_seconds_total {cpu_seconds}");
        let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory.");
        let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
        let _ = writeln!(out, "process_resident_memory_bytes {rss_bytes}");
    }
    out
}

/// The standard process metrics, from /proc (so load tests can size a remote host).
fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is parenthesised and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (hz, page) = (u64::try_from(hz).ok()?.max(1), u64::try_from(page).ok()?);
    Some((ticks as f64 / hz as f64, pages * page))
}
