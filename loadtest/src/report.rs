//! What a load run found: the figures (join times, latency, loss, packet rates,
//! server CPU per forwarded packet, memory per participant), a per-second series,
//! and warnings; as a progress line, a plain-text table and JSON. The HTML report
//! is in [`crate::html`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::floor::Floor;
use crate::probe::InstanceFigures;
use crate::scenario::Scenario;
use crate::stats::Histogram;
use crate::worker::MAX_VIOLATION_SAMPLES;

/// Harness CPU above this share of its threads means the harness, not the server,
/// may have been the limit.
pub const HARNESS_CPU_LIMIT: f64 = 0.9;
/// A typical second whose latest timer ran this late means the event loop fell behind.
pub const LAG_LIMIT_MS: f64 = 20.0;
/// A typical second in which a worker waited this long for a CPU means another
/// process competes for the harness's cores.
pub const WAIT_LIMIT_PCT: f64 = 10.0;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub started_unix_ms: u64,
    /// From the first join to the end of the leave phase.
    pub elapsed_s: f64,
    /// When the run stopped before its time because no participant was left and
    /// none was due (every join failed, or the server dropped everyone).
    pub stopped_early_s: Option<f64>,
    /// The steady window: everyone due has joined; rates and CPU figures average
    /// over it.
    pub steady: Window,
    pub peers: PeerFigures,
    /// `join` sent to `joined` received.
    pub join_ms: Option<Distribution>,
    /// TCP connect started to `joined`: the join with the TCP, TLS and WebSocket
    /// handshakes before it (what a user waits for).
    pub connect_ms: Option<Distribution>,
    /// To the first remote video packet, from the later of our `join` and the first
    /// video `track_published` (so early joiners do not count the wait for others).
    pub first_video_ms: Option<Distribution>,
    /// The same to the first packet of a remote keyframe, where a decoder can start:
    /// participants that decrypt (measure) only. Equal to the first video for a
    /// server that starts each subscriber's video at a keyframe.
    pub first_keyframe_ms: Option<Distribution>,
    /// Publisher send to subscriber receive, from the stamps (measured participants).
    pub latency_ms: Option<Distribution>,
    pub loss: LossFigures,
    pub rates: Rates,
    pub server: ServerFigures,
    pub harness: HarnessFigures,
    pub warnings: Vec<String>,
    pub series: Vec<Sample>,
}

/// Seconds since the start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerFigures {
    pub planned: u64,
    /// Sessions that reached `joined` (churn replacements included).
    pub joins: u64,
    pub peak_joined: u64,
    /// Joined sessions that decrypted and measured.
    pub measured: u64,
    /// Sessions that never joined, by reason.
    pub join_failures: BTreeMap<String, u64>,
    /// How joined sessions ended, by reason (`left` is a clean leave).
    pub ends: BTreeMap<String, u64>,
    /// Joined sessions that ended other than as planned (a clean leave, or churn
    /// dropping its socket): the server closed them, or the connection broke.
    pub cut_off: u64,
    /// Sessions that should have received media (another publisher in the room,
    /// joined long enough) and received none.
    pub without_media: u64,
    /// Protocol violations the participants saw.
    pub violations: u64,
    pub violation_samples: Vec<String>,
    /// `error` messages by code.
    pub errors: BTreeMap<String, u64>,
}

impl PeerFigures {
    /// Adds another worker's counts; violation samples up to a bound.
    pub(crate) fn absorb(&mut self, other: &PeerFigures) {
        self.joins += other.joins;
        self.measured += other.measured;
        self.without_media += other.without_media;
        self.cut_off += other.cut_off;
        self.violations += other.violations;
        for (into, from) in [
            (&mut self.join_failures, &other.join_failures),
            (&mut self.ends, &other.ends),
            (&mut self.errors, &other.errors),
        ] {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
        let room = MAX_VIOLATION_SAMPLES.saturating_sub(self.violation_samples.len());
        self.violation_samples
            .extend(other.violation_samples.iter().take(room).cloned());
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Distribution {
    pub count: u64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Distribution {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram) -> Option<Self> {
        let s = h.summary()?;
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: s.count,
            min: ms(s.min),
            p50: ms(s.p50),
            p90: ms(s.p90),
            p99: ms(s.p99),
            max: ms(s.max),
            mean: ms(s.mean),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossFigures {
    /// End to end, from the stamps: publisher to measured subscriber.
    pub measured: Loss,
    /// Server to counting subscriber, from RTP sequence numbers.
    pub counted: Loss,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Loss {
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub loss_pct: Option<f64>,
}

impl Loss {
    pub fn new(received: u64, lost: u64, duplicates: u64, reordered: u64) -> Self {
        Self {
            received,
            lost,
            duplicates,
            reordered,
            loss_pct: loss_pct(received, lost),
        }
    }
}

/// `lost` as a percentage of what was expected; `None` when nothing was.
pub fn loss_pct(received: u64, lost: u64) -> Option<f64> {
    let expected = received + lost;
    (expected > 0).then(|| lost as f64 * 100.0 / expected as f64)
}

/// Averages over the steady window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// RTP packets received by all participants (what the server forwarded to us).
    pub rx_pps: f64,
    pub rx_mbps: f64,
    /// RTP packets our publishers sent.
    pub tx_pps: f64,
    /// Datagrams the server sent (`rtc_udp_tx_packets_total`).
    pub server_egress_pps: Option<f64>,
    /// RTP packets the server forwarded (`rtc_forwarded_packets_total`).
    pub server_forwarded_pps: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerFigures {
    /// `proc` (a local `--server-pid`) or `metrics` (`process_*` metrics).
    pub cpu_source: String,
    /// Percent of one core, over the steady window.
    pub cpu_pct: Option<f64>,
    /// Server CPU time per forwarded packet.
    pub cpu_us_per_forwarded_packet: Option<f64>,
    /// What a packet costs any SFU on the server's core, measured after the run
    /// (a local `--server-pid` only).
    pub floor: Option<Floor>,
    /// At the end of the steady window.
    pub rss_mb: Option<f64>,
    /// Growth since before the first join, per participant.
    pub rss_per_participant_kb: Option<f64>,
    /// Growth over the steady window. The population is constant there (churn
    /// included), so steady growth suggests a leak.
    pub rss_growth_mb: Option<f64>,
    /// `rtc_active_participants` at the end of the steady window.
    pub participants: Option<u64>,
    /// Datagrams the server's kernel refused during the run.
    pub udp_tx_dropped: Option<u64>,
    /// Datagrams the server's kernel dropped on arrival during the run (its socket's
    /// receive buffer was full: the server fell behind).
    pub udp_rx_dropped: Option<u64>,
    /// Participants and rooms the server still held after everyone left, beyond what
    /// it held before the run: anything but zero is a leak (or someone else's load).
    pub participants_after_leave: Option<i64>,
    pub rooms_after_leave: Option<i64>,
    /// Each server instance measured (several behind a load balancer; the figures
    /// above are their sums).
    pub instances: Vec<InstanceFigures>,
}

impl ServerFigures {
    /// CPU per forwarded packet over the floor: comparable across hosts and runs.
    pub fn cpu_vs_floor(&self) -> Option<f64> {
        Some(self.cpu_us_per_forwarded_packet? / self.floor?.us_per_packet)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HarnessFigures {
    pub threads: usize,
    /// Percent of one core, over the steady window.
    pub cpu_pct: Option<f64>,
    /// The busiest worker thread in its busiest second, percent of one core.
    pub worker_cpu_max_pct: Option<f64>,
    /// Median over the steady window's seconds of each second's worst timer lag.
    pub lag_p50_ms: f64,
    pub lag_max_ms: f64,
    /// Median over the steady window's seconds of the most any worker was runnable
    /// but waiting for a CPU, percent of the second.
    pub wait_p50_pct: Option<f64>,
    /// Datagrams our own sockets refused.
    pub tx_dropped: u64,
    /// The harness may have been the bottleneck; see the warnings.
    pub limited: bool,
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    pub joined: u64,
    pub connecting: u64,
    #[serde(flatten)]
    pub rates: Rates,
    /// End to end, measured participants, this second.
    pub loss_pct: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub harness_cpu_pct: Option<f64>,
    pub worker_cpu_max_pct: Option<f64>,
    /// The longest any worker waited for a CPU, percent of the second.
    pub worker_wait_max_pct: Option<f64>,
    pub lag_ms: f64,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub server_participants: Option<u64>,
}

impl Sample {
    /// The one-line progress report.
    pub fn progress_line(&self) -> String {
        format!(
            "[{:>5.0}s] joined {:>5} (+{} joining) | rx {:>8.0} pps tx {:>7.0} pps | loss {} | p99 {} | harness CPU {} | server CPU {}{}",
            self.t,
            self.joined,
            self.connecting,
            self.rates.rx_pps,
            self.rates.tx_pps,
            opt(self.loss_pct, |v| format!("{v:.2}%")),
            opt(self.latency_p99_ms, |v| format!("{v:.1} ms")),
            opt(self.harness_cpu_pct, |v| format!("{v:.0}%")),
            opt(self.server_cpu_pct, |v| format!("{v:.0}%")),
            if self.harness_limited() {
                " | HARNESS-LIMITED"
            } else {
                ""
            }
        )
    }

    /// This second, the harness rather than the server may have been the limit.
    pub fn harness_limited(&self) -> bool {
        self.worker_cpu_max_pct
            .is_some_and(|c| c > HARNESS_CPU_LIMIT * 100.0)
            || self.worker_wait_max_pct.is_some_and(|w| w > WAIT_LIMIT_PCT)
            || self.lag_ms > LAG_LIMIT_MS
    }
}

/// Counts by key, as `key: n, key: n`.
fn keyed(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "n/a".to_string(), f)
}

impl Report {
    /// The figures as (label, value) rows: the text table and the HTML table.
    pub fn rows(&self) -> Vec<(String, String)> {
        let s = &self.scenario;
        let dist = |d: &Option<Distribution>| {
            d.map_or("n/a".into(), |d| {
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms  (n={})",
                    d.p50, d.p90, d.p99, d.max, d.count
                )
            })
        };
        let loss = |l: &Loss| {
            format!(
                "{} of {}  (dup {}, reordered {})",
                opt(l.loss_pct, |v| format!("{v:.3}%")),
                l.received + l.lost,
                l.duplicates,
                l.reordered
            )
        };
        let p = &self.peers;
        let r = &self.rates;
        let sv = &self.server;
        let h = &self.harness;
        let mut rows = vec![
            (
                "scenario",
                format!(
                    "{} room(s) x {} peers, {} publishing {}, {} s after a {:.1} s ramp",
                    s.rooms,
                    s.peers,
                    s.publishers_per_room(),
                    if s.audio_only {
                        "audio".to_string()
                    } else {
                        format!("audio + {} kbps video", s.video_kbps)
                    },
                    s.duration.as_secs_f64(),
                    s.ramp().as_secs_f64()
                ),
            ),
            (
                "steady window",
                format!("{:.0} s .. {:.0} s", self.steady.from_s, self.steady.to_s),
            ),
            (
                "participants",
                format!(
                    "{} planned, {} joins, peak {} joined, {} measuring",
                    p.planned, p.joins, p.peak_joined, p.measured
                ),
            ),
            ("join failures", keyed(&p.join_failures)),
            ("session ends", keyed(&p.ends)),
            ("join -> joined", dist(&self.join_ms)),
            ("connect -> joined", dist(&self.connect_ms)),
            ("join -> first video", dist(&self.first_video_ms)),
            (
                "join -> first keyframe",
                format!("{}  (measuring only)", dist(&self.first_keyframe_ms)),
            ),
            ("end-to-end latency", dist(&self.latency_ms)),
            ("loss (stamps, e2e)", loss(&self.loss.measured)),
            ("loss (RTP seq)", loss(&self.loss.counted)),
            (
                "received at subscribers",
                format!("{:.0} pkt/s, {:.2} Mbit/s", r.rx_pps, r.rx_mbps),
            ),
            ("sent by publishers", format!("{:.0} pkt/s", r.tx_pps)),
            (
                "server forwarded",
                opt(r.server_forwarded_pps, |v| format!("{v:.0} pkt/s")),
            ),
            (
                "server egress",
                opt(r.server_egress_pps, |v| format!("{v:.0} datagrams/s")),
            ),
            (
                "server CPU",
                format!(
                    "{}  ({})",
                    opt(sv.cpu_pct, |v| format!("{v:.1}% of a core")),
                    sv.cpu_source
                ),
            ),
            (
                "server CPU per forwarded packet",
                format!(
                    "{}{}",
                    opt(sv.cpu_us_per_forwarded_packet, |v| format!("{v:.2} us")),
                    sv.cpu_vs_floor()
                        .map_or(String::new(), |v| format!("  ({v:.2}x the floor)"))
                ),
            ),
            (
                "floor: AES-GCM + sendmmsg",
                match sv.floor {
                    Some(f) => format!(
                        "{:.2} us per {}-byte datagram, {}",
                        f.us_per_packet,
                        f.datagram_bytes,
                        f.cpu.map_or("unpinned".into(), |c| format!("on core {c}"))
                    ),
                    None => "n/a".into(),
                },
            ),
            (
                "server RSS",
                format!(
                    "{}  ({} per participant, {} over the steady window)",
                    opt(sv.rss_mb, |v| format!("{v:.1} MB")),
                    opt(sv.rss_per_participant_kb, |v| format!("{v:.0} KB")),
                    opt(sv.rss_growth_mb, |v| format!("{v:+.1} MB"))
                ),
            ),
            (
                "server after everyone left",
                match (sv.participants_after_leave, sv.rooms_after_leave) {
                    (Some(p), Some(r)) => format!("{p:+} participants, {r:+} rooms"),
                    _ => "n/a".into(),
                },
            ),
            (
                "harness CPU",
                format!(
                    "{} over {} thread(s), busiest worker {}",
                    opt(h.cpu_pct, |v| format!("{v:.1}%")),
                    h.threads,
                    opt(h.worker_cpu_max_pct, |v| format!("{v:.0}%"))
                ),
            ),
            (
                "harness loop lag",
                format!(
                    "typical {:.1} ms, worst {:.1} ms; waited for a CPU {} of the time",
                    h.lag_p50_ms,
                    h.lag_max_ms,
                    opt(h.wait_p50_pct, |v| format!("{v:.1}%"))
                ),
            ),
            (
                "protocol",
                format!("{} violations, errors: {}", p.violations, keyed(&p.errors)),
            ),
        ];
        if sv.instances.len() > 1 {
            let peaks = |f: fn(&InstanceFigures) -> Option<u64>| {
                sv.instances
                    .iter()
                    .map(|i| f(i).map_or("n/a".into(), |v| v.to_string()))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            let at = rows
                .iter()
                .position(|(label, _)| *label == "server forwarded")
                .unwrap_or(rows.len());
            let value = format!(
                "{}, figures summed; peak participants {}, rooms {}",
                sv.instances.len(),
                peaks(|i| i.peak_participants),
                peaks(|i| i.peak_rooms)
            );
            rows.insert(at, ("server instances", value));
        }
        rows.extend(self.warnings.iter().map(|w| ("WARNING", w.clone())));
        rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The final table, for a terminal.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (label, value) in rows {
            let _ = writeln!(out, "{label:<width$}  {value}");
        }
        out
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Plain structs of numbers, strings and maps with string keys: cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The average datagram the subscribers received, in bytes: the size the floor
    /// is measured with.
    pub fn mean_datagram_bytes(&self) -> Option<usize> {
        let r = &self.rates;
        (r.rx_pps > 0.0).then(|| (r.rx_mbps * 1e6 / 8.0 / r.rx_pps).round() as usize)
    }

    /// Works out `harness.limited` and the warnings from the figures.
    pub fn assess(&mut self) {
        let mut warnings = Vec::new();
        let h = &self.harness;
        let cpu_limit = HARNESS_CPU_LIMIT * 100.0 * h.threads as f64;
        if h.cpu_pct.is_some_and(|c| c > cpu_limit)
            || h.worker_cpu_max_pct
                .is_some_and(|c| c > HARNESS_CPU_LIMIT * 100.0)
        {
            warnings.push(format!(
                "THE HARNESS WAS CPU-BOUND ({} over {} thread(s), busiest worker {}): the figures measure the harness, not the server. Add --threads or cores.",
                opt(h.cpu_pct, |v| format!("{v:.0}%")),
                h.threads,
                opt(h.worker_cpu_max_pct, |v| format!("{v:.0}%")),
            ));
        }
        if h.lag_p50_ms > LAG_LIMIT_MS {
            warnings.push(format!(
                "THE HARNESS EVENT LOOP FELL BEHIND (timers typically {:.0} ms late): latency and rates are understated. Add --threads or cores.",
                h.lag_p50_ms
            ));
        }
        if let Some(wait) = h.wait_p50_pct.filter(|w| *w > WAIT_LIMIT_PCT) {
            warnings.push(format!(
                "THE HARNESS WAITED FOR A CPU {wait:.0}% OF THE TIME: another process competes for its cores. Pin it (taskset) to cores of its own."
            ));
        }
        let limited = !warnings.is_empty();
        if let Some(t) = self.stopped_early_s {
            warnings.insert(
                0,
                format!(
                    "THE RUN STOPPED AT {t:.0} s OF {:.0}: no participant was left and none was due to join (see the join failures and session ends)",
                    (self.scenario.ramp() + self.scenario.duration).as_secs_f64()
                ),
            );
        }
        if h.tx_dropped > 0 {
            warnings.push(format!(
                "{} datagrams were dropped by the harness's own send buffers",
                h.tx_dropped
            ));
        }
        let p = &self.peers;
        let failures: u64 = p.join_failures.values().sum();
        if failures > 0 {
            warnings.push(format!("{failures} participants failed to join"));
        }
        if p.cut_off > 0 {
            warnings.push(format!(
                "{} joined participants were cut off before the run ended them: {}",
                p.cut_off,
                keyed(&p.ends)
            ));
        }
        if p.without_media > 0 {
            warnings.push(format!(
                "{} participants received no media although others published",
                p.without_media
            ));
        }
        if p.violations > 0 {
            warnings.push(format!(
                "{} protocol violations, e.g. {:?}",
                p.violations,
                p.violation_samples.first()
            ));
        }
        if let Some(n) = self.server.udp_rx_dropped.filter(|n| *n > 0) {
            warnings.push(format!(
                "the server's sockets dropped {n} arriving datagrams: it could not keep up (loss above is its own)"
            ));
        }
        if let Some(n) = self.server.participants_after_leave.filter(|n| *n > 0) {
            warnings.push(format!(
                "the server still holds {n} participants after everyone left (a leak, or other load)"
            ));
        }
        for i in self
            .server
            .instances
            .iter()
            .filter(|i| i.counters_went_backwards)
        {
            warnings.push(format!(
                "the counters at {} went backwards during the run, so the server figures are wrong: the server restarted, or that URL reaches several instances (behind a load balancer, pass each instance's --metrics-url)",
                i.metrics_url
            ));
        }
        if self.server.cpu_pct.is_none() {
            warnings.push(
                "no server CPU figure: pass --server-pid for a local server, or --metrics-url for one that exports process_cpu_seconds_total (one per instance behind a load balancer)".into(),
            );
        }
        self.harness.limited = limited;
        self.warnings = warnings;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scenario::Preset;

    /// A report with every section filled, for report and HTML tests.
    pub(crate) fn sample_report() -> Report {
        let mut latency = Histogram::default();
        for us in [800, 1_200, 1_500, 9_000] {
            latency.record(us);
        }
        let series = (1..=5)
            .map(|t| Sample {
                t: f64::from(t),
                joined: 3,
                rates: Rates {
                    rx_pps: 600.0 + f64::from(t),
                    tx_pps: 300.0,
                    server_egress_pps: Some(640.0),
                    ..Rates::default()
                },
                loss_pct: Some(0.0),
                latency_p50_ms: Some(1.0),
                latency_p90_ms: Some(2.0),
                latency_p99_ms: (t != 3).then_some(4.5),
                harness_cpu_pct: Some(12.0),
                server_cpu_pct: Some(30.0),
                ..Sample::default()
            })
            .collect();
        Report {
            scenario: Scenario::preset(Preset::Meeting),
            started_unix_ms: 1_700_000_000_000,
            elapsed_s: 5.0,
            stopped_early_s: None,
            steady: Window {
                from_s: 2.0,
                to_s: 5.0,
            },
            peers: PeerFigures {
                planned: 5,
                joins: 5,
                peak_joined: 5,
                measured: 1,
                ends: [("left".to_string(), 5)].into(),
                ..PeerFigures::default()
            },
            join_ms: Distribution::from_micros(&latency),
            connect_ms: Distribution::from_micros(&latency),
            first_video_ms: None,
            first_keyframe_ms: None,
            latency_ms: Distribution::from_micros(&latency),
            loss: LossFigures {
                measured: Loss::new(999, 1, 0, 0),
                counted: Loss::new(0, 0, 0, 0),
            },
            rates: Rates {
                rx_pps: 600.0,
                rx_mbps: 1.5,
                tx_pps: 300.0,
                server_egress_pps: Some(640.0),
                server_forwarded_pps: Some(600.0),
            },
            server: ServerFigures {
                cpu_source: "metrics".into(),
                cpu_pct: Some(30.0),
                cpu_us_per_forwarded_packet: Some(5.0),
                participants_after_leave: Some(0),
                rooms_after_leave: Some(0),
                ..ServerFigures::default()
            },
            harness: HarnessFigures {
                threads: 1,
                cpu_pct: Some(12.0),
                ..HarnessFigures::default()
            },
            warnings: Vec::new(),
            series,
        }
    }

    #[test]
    fn distributions_and_loss() {
        let d = sample_report().latency_ms.unwrap();
        assert_eq!(d.count, 4);
        assert_eq!((d.min, d.max), (0.8, 9.0));
        assert_eq!(loss_pct(999, 1), Some(0.1));
        assert_eq!(loss_pct(0, 0), None);
        assert_eq!(Distribution::from_micros(&Histogram::default()), None);
    }

    #[test]
    fn the_floor_turns_cpu_per_packet_into_a_ratio() {
        let mut report = sample_report();
        // 1.5 Mbit/s over 600 packets/s.
        assert_eq!(report.mean_datagram_bytes(), Some(313));
        assert!(
            report
                .table()
                .contains("floor: AES-GCM + sendmmsg        n/a")
        );
        report.server.floor = Some(Floor {
            us_per_packet: 2.0,
            datagram_bytes: 313,
            cpu: Some(0),
            delivered_pct: 100.0,
        });
        assert_eq!(report.server.cpu_vs_floor(), Some(2.5));
        let table = report.table();
        assert!(table.contains("5.00 us  (2.50x the floor)"), "{table}");
        assert!(
            table.contains("2.00 us per 313-byte datagram, on core 0"),
            "{table}"
        );
        report.rates.rx_pps = 0.0;
        assert_eq!(report.mean_datagram_bytes(), None);
    }

    #[test]
    fn json_shape() {
        let json: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 17);
        assert_eq!(json["first_keyframe_ms"], serde_json::Value::Null);
        assert_eq!(json["first_video_ms"], serde_json::Value::Null);
        assert_eq!(json["stopped_early_s"], serde_json::Value::Null);
        assert_eq!(json["connect_ms"]["p99"], 9.0);
        assert_eq!(json["steady"]["from_s"], 2.0);
        assert_eq!(json["server"]["cpu_us_per_forwarded_packet"], 5.0);
        assert_eq!(json["harness"]["limited"], false);
        assert_eq!(json["scenario"]["duration"], 30.0);
        assert_eq!(json["scenario"]["preset"], "meeting");
        assert_eq!(json["latency_ms"]["p99"], 9.0);
        assert_eq!(json["loss"]["measured"]["loss_pct"], 0.1);
        assert_eq!(json["series"].as_array().unwrap().len(), 5);
        assert_eq!(json["series"][2]["latency_p99_ms"], serde_json::Value::Null);
        // Each second's rates sit beside its other figures.
        assert_eq!(json["series"][0]["rx_pps"], 601.0);
        assert_eq!(
            json["series"][0]["server_forwarded_pps"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn worker_figures_add_up() {
        let one = PeerFigures {
            joins: 2,
            measured: 1,
            violations: 6,
            violation_samples: vec!["v".into(); 6],
            ends: [("left".to_string(), 2)].into(),
            ..PeerFigures::default()
        };
        let mut total = PeerFigures::default();
        total.absorb(&one);
        total.absorb(&one);
        assert_eq!((total.joins, total.measured, total.violations), (4, 2, 12));
        assert_eq!(total.ends["left"], 4);
        assert_eq!(total.violation_samples.len(), MAX_VIOLATION_SAMPLES);
    }

    #[test]
    fn table_and_progress_line() {
        let report = sample_report();
        let table = report.table();
        assert!(table.contains("end-to-end latency"));
        assert!(table.contains("p99 9.0"));
        // No floor measured: the figure stands alone.
        assert!(table.contains("server CPU per forwarded packet  5.00 us\n"));
        let width = report.rows().iter().map(|(k, _)| k.len()).max().unwrap();
        assert!(table.lines().all(|l| &l[width..width + 2] == "  "));
        let line = report.series[0].progress_line();
        assert!(
            line.contains("loss 0.00%") && line.contains("p99 4.5 ms"),
            "{line}"
        );
        assert!(Sample::default().progress_line().contains("p99 n/a"));
        assert!(!line.contains("HARNESS-LIMITED"));
        let starved = Sample {
            worker_wait_max_pct: Some(50.0),
            ..Sample::default()
        };
        assert!(starved.progress_line().ends_with("| HARNESS-LIMITED"));
    }

    #[test]
    fn assessment_flags_a_saturated_harness_and_leaks() {
        let mut report = sample_report();
        report.assess();
        assert!(!report.harness.limited);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);

        report.harness.worker_cpu_max_pct = Some(97.0);
        report.server.participants_after_leave = Some(2);
        report.peers.join_failures.insert("http 503".into(), 3);
        report.assess();
        assert!(report.harness.limited);
        assert!(report.warnings[0].contains("CPU-BOUND"));
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("3 participants failed"))
        );
        assert!(report.warnings.iter().any(|w| w.contains("still holds 2")));

        let mut dropped = sample_report();
        dropped.peers.cut_off = 2;
        dropped.peers.ends.insert("closed 1009".into(), 2);
        dropped.assess();
        assert!(!dropped.harness.limited, "the server's doing, not ours");
        assert_eq!(
            dropped.warnings,
            [
                "2 joined participants were cut off before the run ended them: closed 1009: 2, left: 5"
            ]
        );

        let mut overloaded = sample_report();
        overloaded.server.udp_rx_dropped = Some(1234);
        overloaded.assess();
        assert!(!overloaded.harness.limited, "the server's limit, not ours");
        assert!(overloaded.warnings[0].contains("dropped 1234 arriving datagrams"));
        assert!(report.table().contains("WARNING"));

        let mut starved = sample_report();
        starved.harness.wait_p50_pct = Some(35.0);
        starved.assess();
        assert!(starved.harness.limited);
        assert!(starved.warnings[0].contains("WAITED FOR A CPU 35%"));

        let mut abandoned = sample_report();
        abandoned.stopped_early_s = Some(3.0);
        abandoned.assess();
        assert!(!abandoned.harness.limited, "not the harness's limit");
        assert!(abandoned.warnings[0].starts_with("THE RUN STOPPED AT 3 s OF 30"));

        let mut lagging = sample_report();
        lagging.harness.lag_p50_ms = 40.0;
        lagging.server.cpu_pct = None;
        lagging.assess();
        assert!(lagging.harness.limited);
        assert!(lagging.warnings[0].contains("FELL BEHIND"));
        assert!(lagging.warnings.iter().any(|w| w.contains("--server-pid")));
    }

    #[test]
    fn instances_behind_a_balancer() {
        let row = |report: &Report, label: &str| {
            report
                .rows()
                .into_iter()
                .find_map(|(l, v)| (l == label).then_some(v))
        };
        let mut report = sample_report();
        let instance = |n: u64, backwards: bool| InstanceFigures {
            metrics_url: format!("http://10.0.0.{n}:5005/metrics"),
            peak_participants: Some(3 * n),
            peak_rooms: Some(n),
            counters_went_backwards: backwards,
        };
        report.server.instances = vec![instance(1, false)];
        assert_eq!(row(&report, "server instances"), None, "one server");

        report.server.instances.push(instance(2, true));
        assert_eq!(
            row(&report, "server instances").as_deref(),
            Some("2, figures summed; peak participants 3 + 6, rooms 1 + 2")
        );
        report.assess();
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0]
                .starts_with("the counters at http://10.0.0.2:5005/metrics went backwards")
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["server"]["instances"][1]["peak_rooms"], 2);
    }
}
