//! Prometheus metrics, per shard, without cross-core traffic on the packet path.
//!
//! Each shard counts in plain integers (`Counters`, owned by its `Sfu`) and publishes a
//! copy into its own `ShardMetrics` once per batch with relaxed stores. The accept
//! shard reads those cells when `/metrics` is scraped. No cell is written by two cores.
//! The text exposition format is a handful of lines, so it is written here directly.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::shard::watchdog::Pulse;

/// Counters a shard updates on its own core.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub active_rooms: u64,
    pub active_participants: u64,
    pub join_fail: u64,
    pub publish_track: u64,
    pub negotiation_error: u64,
    pub forced_disconnect: u64,
    pub str0m_panics: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub udp_rx_packets: u64,
    pub udp_tx_packets: u64,
    pub udp_tx_dropped: u64,
    pub udp_rx_dropped: u64,
    pub signaling_dropped: u64,
    pub unrouted_packets: u64,
    pub refused_ssrc_packets: u64,
    pub refused_rate_packets: u64,
    pub keyframe_requests: u64,
    pub overloaded: u64,
    pub overloads: u64,
    pub subscriber_rtt: RttHistogram,
}

/// Upper bounds of the round-trip buckets, in milliseconds: loopback and LAN, then
/// the range where the resend window (`media::resend`) grows with the path.
const RTT_BOUNDS_MS: [u64; 9] = [5, 10, 20, 50, 100, 200, 300, 500, 1000];
/// One per bound, and one above them all.
const RTT_BUCKETS: usize = RTT_BOUNDS_MS.len() + 1;

/// Subscribers' round trips, one observation per stream's receiver-report stats
/// (about one a second each): how far the audience is, without a label per peer.
#[derive(Debug, Default, Clone, Copy)]
pub struct RttHistogram {
    buckets: [u64; RTT_BUCKETS],
    sum_us: u64,
}

impl RttHistogram {
    pub fn observe(&mut self, rtt: Duration) {
        let ms = rtt.as_millis();
        let bucket = RTT_BOUNDS_MS
            .iter()
            .position(|&bound| ms <= u128::from(bound))
            .unwrap_or(RTT_BOUNDS_MS.len());
        if let Some(count) = self.buckets.get_mut(bucket) {
            *count += 1;
        }
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.sum_us = self.sum_us.saturating_add(us);
    }
}

/// One per-shard metric family, read from a `T`.
struct Metric<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    get: fn(&T) -> u64,
}

const METRICS: &[Metric<Counters>] = &[
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
        name: "rtc_str0m_panics_total",
        kind: "counter",
        help: "str0m panics contained; each removes the participant whose Rtc panicked.",
        get: |c| c.str0m_panics,
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
        name: "rtc_signaling_dropped_total",
        kind: "counter",
        help: "Signaling replies dropped: the accept shard left too many untaken.",
        get: |c| c.signaling_dropped,
    },
    Metric {
        name: "rtc_unrouted_packets_total",
        kind: "counter",
        help: "Datagrams that matched no connection.",
        get: |c| c.unrouted_packets,
    },
    Metric {
        name: "rtc_rtp_ssrc_refused_total",
        kind: "counter",
        help: "RTP datagrams dropped: their connection had used up its allowance of SSRCs.",
        get: |c| c.refused_ssrc_packets,
    },
    Metric {
        name: "rtc_udp_rate_refused_total",
        kind: "counter",
        help: "Datagrams dropped: their connection sent more than its allowance a second.",
        get: |c| c.refused_rate_packets,
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
    rtt_buckets: [AtomicU64; RTT_BUCKETS],
    rtt_sum_us: AtomicU64,
}

impl ShardMetrics {
    pub fn publish(&self, counters: &Counters) {
        for (cell, metric) in self.cells.iter().zip(METRICS) {
            cell.store((metric.get)(counters), Relaxed);
        }
        let rtt = &counters.subscriber_rtt;
        for (cell, count) in self.rtt_buckets.iter().zip(rtt.buckets) {
            cell.store(count, Relaxed);
        }
        self.rtt_sum_us.store(rtt.sum_us, Relaxed);
    }

    fn value(&self, index: usize) -> u64 {
        self.cells.get(index).map_or(0, |c| c.load(Relaxed))
    }

    /// This shard's round-trip histogram: cumulative buckets, sum and count.
    fn render_rtt(&self, out: &mut String, shard: usize) {
        let name = "rtc_subscriber_rtt_seconds";
        let mut count = 0;
        for (i, cell) in self.rtt_buckets.iter().enumerate() {
            count += cell.load(Relaxed);
            let le = RTT_BOUNDS_MS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |&ms| (ms as f64 / 1e3).to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {count}"
            );
        }
        let sum = self.rtt_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {count}");
    }
}

/// Server-wide counters of the accept shard (signaling refusals, connections).
#[derive(Default)]
pub struct AcceptMetrics {
    pub connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub signaling_errors: AtomicU64,
}

/// What the watchdog knows of each shard (`shard::watchdog`).
const PULSE_METRICS: &[Metric<Pulse>] = &[
    Metric {
        name: "rtc_shard_stalled",
        kind: "gauge",
        help: "1 while the shard has not answered the watchdog for a second.",
        get: |p| u64::from(p.stalled()),
    },
    Metric {
        name: "rtc_shard_stalls_total",
        kind: "counter",
        help: "Times the shard stopped answering the watchdog for a second.",
        get: Pulse::stalls,
    },
    Metric {
        name: "rtc_shard_kicks_total",
        kind: "counter",
        help: "Times the watchdog interrupted the shard's thread for not answering.",
        get: Pulse::kicks,
    },
];

/// A family's header and one sample per shard, in shard order.
fn write_family<T>(out: &mut String, metric: &Metric<T>, values: impl Iterator<Item = u64>) {
    let _ = writeln!(out, "# HELP {} {}", metric.name, metric.help);
    let _ = writeln!(out, "# TYPE {} {}", metric.name, metric.kind);
    for (shard, value) in values.enumerate() {
        let _ = writeln!(out, "{}{{shard=\"{shard}\"}} {value}", metric.name);
    }
}

pub fn render(
    shards: &[Arc<ShardMetrics>],
    pulses: &[Arc<Pulse>],
    accept: &AcceptMetrics,
) -> String {
    let mut out = String::with_capacity(4096);
    for (i, metric) in METRICS.iter().enumerate() {
        write_family(&mut out, metric, shards.iter().map(|m| m.value(i)));
    }
    let _ = writeln!(
        out,
        "# HELP rtc_subscriber_rtt_seconds Subscribers' round trips, one per stream report."
    );
    let _ = writeln!(out, "# TYPE rtc_subscriber_rtt_seconds histogram");
    for (shard, m) in shards.iter().enumerate() {
        m.render_rtt(&mut out, shard);
    }
    for metric in PULSE_METRICS {
        write_family(&mut out, metric, pulses.iter().map(|p| (metric.get)(p)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, line_start: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line_start:?} in\n{text}"))
    }

    #[test]
    fn round_trips_render_as_a_cumulative_histogram_per_shard() {
        let mut counters = Counters::default();
        for ms in [1, 5, 6, 300, 2500] {
            counters.subscriber_rtt.observe(Duration::from_millis(ms));
        }
        let (near, far) = (Arc::new(ShardMetrics::default()), Arc::default());
        near.publish(&counters);
        let text = render(&[near, far], &[], &AcceptMetrics::default());

        assert!(text.contains("# TYPE rtc_subscriber_rtt_seconds histogram"));
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("rtc_subscriber_rtt_seconds_bucket{{shard=\"0\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.005"), 2.0, "a bound is inclusive");
        assert_eq!(bucket("0.01"), 3.0);
        assert_eq!(bucket("0.2"), 3.0);
        assert_eq!(bucket("0.3"), 4.0);
        assert_eq!(bucket("1"), 4.0);
        assert_eq!(bucket("+Inf"), 5.0, "above every bound");
        assert_eq!(
            sample(&text, "rtc_subscriber_rtt_seconds_count{shard=\"0\"}"),
            5.0
        );
        assert_eq!(
            sample(&text, "rtc_subscriber_rtt_seconds_sum{shard=\"0\"}"),
            2.812
        );
        assert_eq!(
            sample(&text, "rtc_subscriber_rtt_seconds_count{shard=\"1\"}"),
            0.0
        );
    }
}
