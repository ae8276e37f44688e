//! The load run's coordinator: plans the joins, starts the worker threads, samples
//! everyone once a second (workers, the harness's CPU, the server's CPU, memory and
//! counters), stops the run, measures the floor on a local server's core, and turns
//! it all into a [`Report`].

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::Waker;

use crate::floor;
use crate::peer::{self, RxTotals, TimeBase};
use crate::probe::{self, ServerProbe, ServerSample, ThreadTimes};
use crate::report::{
    Distribution, HarnessFigures, Loss, LossFigures, PeerFigures, Rates, Report, Sample,
    ServerFigures, Window, loss_pct,
};
use crate::scenario::Scenario;
use crate::stats::Histogram;
use crate::tls;
use crate::worker::{self, Command, JoinTimes, LEAVE_GRACE, Seat, WorkerSetup, WorkerStats};

const TICK: Duration = Duration::from_secs(1);
/// How long a tick waits for the workers' reports; a late one counts next tick.
const REPORT_WAIT: Duration = Duration::from_millis(900);
/// The steady window starts this long after the last planned join (at most half the
/// duration): time for the last participants' ICE and DTLS.
const WARMUP: Duration = Duration::from_secs(2);
/// After the leave phase, how long to wait for the server to drop everyone.
const SETTLE: Duration = Duration::from_secs(3);
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// How long the floor is measured for, once everyone left.
const FLOOR_TIME: Duration = Duration::from_secs(1);

/// Runs `scenario` to the end and reports. `progress` sees each second's sample as
/// it is taken. Fails only when the run cannot start; everything that goes wrong
/// during it is in the report.
pub fn run(scenario: &Scenario, mut progress: impl FnMut(&Sample)) -> Result<Report, String> {
    scenario.validate()?;
    let server = scenario.server_addr()?;
    let local_ip = local_ip_for(server)?;
    let urls = (0..scenario.rooms)
        .map(|r| scenario.room_url(r))
        .collect::<Result<Vec<_>, _>>()?;
    let metrics = scenario.metrics_endpoints()?;
    let tls = scenario
        .tls()?
        .then(|| tls::client_config(scenario.ca_file.as_deref()))
        .transpose()?;
    probe::raise_fd_limit();
    peer::warm_up();
    let probe = ServerProbe::new(scenario.server_pid, metrics);
    let scenario = Arc::new(scenario.clone());
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;

    let mut run = Coordinator::new(scenario.clone(), probe);
    let start = run.start;
    let mut plans = vec![Vec::new(); scenario.threads];
    for k in 0..scenario.total_peers() {
        let seat = Seat {
            room: k / scenario.peers,
            index: k % scenario.peers,
        };
        let at = start + Duration::from_secs_f64(k as f64 / scenario.join_rate);
        plans[seat.room % scenario.threads].push((at, seat));
    }
    let urls = Arc::new(urls);
    let (reports_tx, reports) = mpsc::channel();
    let mut workers = Vec::new();
    for (id, plan) in plans.into_iter().enumerate() {
        let (poll, waker) = worker::poll_with_waker().map_err(|e| e.to_string())?;
        let (commands, commands_rx) = mpsc::channel();
        let setup = WorkerSetup {
            id,
            scenario: scenario.clone(),
            urls: urls.clone(),
            server,
            tls: tls.clone(),
            local_ip,
            time_base: run.time_base,
            plan,
            poll,
            commands: commands_rx,
            reports: reports_tx.clone(),
        };
        thread::Builder::new()
            .name(format!("loadtest-worker-{id}"))
            .spawn(move || worker::run(setup))
            .map_err(|e| e.to_string())?;
        workers.push(WorkerHandle {
            commands,
            waker,
            outstanding: false,
            done: false,
            latest: WorkerStats::default(),
            last_times: None,
            last_at: start,
        });
    }
    run.workers = workers;
    run.reports = Some(reports);

    let end = start + scenario.ramp() + scenario.duration;
    let mut next = start + TICK;
    let mut stopped_early = None;
    loop {
        thread::sleep(next.saturating_duration_since(Instant::now()));
        let sample = run.tick();
        progress(&sample);
        if next >= end {
            break;
        }
        // Everyone failed or was dropped (a server gone, a wrong URL): waiting out
        // the duration would only add zeros.
        if run.workers.iter().all(|w| w.latest.idle) {
            stopped_early = Some(sample.t);
            break;
        }
        next += TICK;
    }
    let steady_end = run.checkpoints.len().saturating_sub(1);
    run.stop();
    let mut report = run.report(started_unix_ms, steady_end, stopped_early);
    if let (Some(pid), Some(bytes)) = (scenario.server_pid, report.mean_datagram_bytes()) {
        match floor::measure(local_ip, probe::pinned_cpu(pid), bytes, FLOOR_TIME) {
            Ok(floor) => report.server.floor = Some(floor),
            Err(e) => report
                .warnings
                .push(format!("the floor was not measured: {e}")),
        }
    }
    Ok(report)
}

/// The local address the kernel would use to reach `server`: where the UDP sockets
/// bind, so the candidates we announce are reachable.
fn local_ip_for(server: SocketAddr) -> Result<IpAddr, String> {
    if server.ip().is_loopback() {
        return Ok(server.ip());
    }
    let unspecified: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let probe = UdpSocket::bind(unspecified).map_err(|e| e.to_string())?;
    // Connecting a UDP socket sends nothing; it only picks the route.
    probe.connect(server).map_err(|e| e.to_string())?;
    Ok(probe.local_addr().map_err(|e| e.to_string())?.ip())
}

struct WorkerHandle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    /// A report was asked for and has not arrived.
    outstanding: bool,
    done: bool,
    /// The latest report, its histograms moved out.
    latest: WorkerStats,
    last_times: Option<ThreadTimes>,
    last_at: Instant,
}

impl WorkerHandle {
    fn send(&mut self, command: Command) {
        // A worker that is gone has sent its last report; nothing to ask it.
        if self.commands.send(command).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Totals over all workers at one tick.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    at: Instant,
    rx: RxTotals,
    measured: RxTotals,
    sent_packets: u64,
    harness_cpu: Option<f64>,
    server: ServerSample,
}

impl Checkpoint {
    /// Nothing received or sent yet; CPU as of now.
    fn new(at: Instant, server: ServerSample) -> Self {
        Self {
            at,
            rx: RxTotals::default(),
            measured: RxTotals::default(),
            sent_packets: 0,
            harness_cpu: probe::cpu_seconds("/proc/self/stat"),
            server,
        }
    }
}

struct Coordinator {
    scenario: Arc<Scenario>,
    probe: ServerProbe,
    start: Instant,
    time_base: TimeBase,
    workers: Vec<WorkerHandle>,
    reports: Option<Receiver<WorkerStats>>,
    baseline: ServerSample,
    checkpoints: Vec<Checkpoint>,
    series: Vec<Sample>,
    latency: Histogram,
    join_times: JoinTimes,
    /// This tick's interval data, reset each tick.
    interval_latency: Histogram,
    interval_lag: Duration,
    /// The busiest worker's CPU and the longest-waiting worker's runqueue wait.
    interval_worker: (Option<f64>, Option<f64>),
    peak_joined: u64,
    /// The server once everyone left.
    after_leave: Option<ServerSample>,
}

impl Coordinator {
    fn new(scenario: Arc<Scenario>, mut probe: ServerProbe) -> Self {
        let baseline = probe.sample();
        let start = Instant::now();
        let first = Checkpoint::new(start, baseline);
        Self {
            scenario,
            probe,
            start,
            time_base: TimeBase::now(),
            workers: Vec::new(),
            reports: None,
            baseline,
            checkpoints: vec![first],
            series: Vec::new(),
            latency: Histogram::default(),
            join_times: JoinTimes::default(),
            interval_latency: Histogram::default(),
            interval_lag: Duration::ZERO,
            interval_worker: (None, None),
            peak_joined: 0,
            after_leave: None,
        }
    }

    /// Takes one sample: asks every worker for its stats, reads CPU and the server.
    fn tick(&mut self) -> Sample {
        for w in self
            .workers
            .iter_mut()
            .filter(|w| !w.outstanding && !w.done)
        {
            w.outstanding = true;
            w.send(Command::Report);
        }
        let deadline = Instant::now() + REPORT_WAIT;
        while self.workers.iter().any(|w| w.outstanding && !w.done) {
            if !self.receive_until(deadline) {
                break;
            }
        }
        let server = self.probe.sample();
        let checkpoint = self.checkpoint(server);
        let previous = self.checkpoints.last().copied().unwrap_or(checkpoint);
        self.checkpoints.push(checkpoint);
        let sample = self.sample(&previous, &checkpoint);
        self.series.push(sample.clone());
        sample
    }

    /// Receives one report, waiting until `deadline`; `false` once it passed.
    fn receive_until(&mut self, deadline: Instant) -> bool {
        let Some(reports) = &self.reports else {
            return false;
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        match reports.recv_timeout(wait) {
            Ok(report) => {
                self.absorb(report);
                true
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => false,
        }
    }

    fn absorb(&mut self, mut report: WorkerStats) {
        self.latency.merge(&report.latency);
        self.join_times.merge(&report.join_times);
        self.interval_latency.merge(&report.latency);
        self.interval_lag = self.interval_lag.max(report.lag);
        let Some(w) = self.workers.get_mut(report.worker) else {
            return;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(w.last_at).as_secs_f64();
        if let (Some(times), Some(last)) = (report.times, w.last_times)
            && elapsed > 0.0
        {
            let pct = |now: f64, before: f64| Some((now - before) * 100.0 / elapsed);
            let (cpu, wait) = &mut self.interval_worker;
            *cpu = max(*cpu, pct(times.running_seconds, last.running_seconds));
            *wait = max(*wait, pct(times.waiting_seconds, last.waiting_seconds));
        }
        w.last_times = report.times.or(w.last_times);
        w.last_at = now;
        w.outstanding = false;
        w.done |= report.done;
        report.latency = Histogram::default();
        report.join_times = JoinTimes::default();
        w.latest = report;
    }

    fn checkpoint(&self, server: ServerSample) -> Checkpoint {
        let mut c = Checkpoint::new(Instant::now(), server);
        for w in &self.workers {
            c.rx.add(&w.latest.measured);
            c.rx.add(&w.latest.counted);
            c.measured.add(&w.latest.measured);
            c.sent_packets += w.latest.sent_packets;
        }
        c
    }

    fn sample(&mut self, a: &Checkpoint, b: &Checkpoint) -> Sample {
        let rates = Interval { a, b };
        let joined = self.workers.iter().map(|w| w.latest.joined).sum();
        self.peak_joined = self.peak_joined.max(joined);
        let latency = Distribution::from_micros(&self.interval_latency);
        self.interval_latency.clear();
        let lag_ms = std::mem::take(&mut self.interval_lag).as_secs_f64() * 1000.0;
        let (worker_cpu, worker_wait) = std::mem::take(&mut self.interval_worker);
        Sample {
            t: b.at.duration_since(self.start).as_secs_f64(),
            joined,
            connecting: self.workers.iter().map(|w| w.latest.connecting).sum(),
            rates: rates.rates(),
            loss_pct: loss_pct(
                b.measured.received.saturating_sub(a.measured.received),
                b.measured.lost.saturating_sub(a.measured.lost),
            ),
            latency_p50_ms: latency.map(|d| d.p50),
            latency_p90_ms: latency.map(|d| d.p90),
            latency_p99_ms: latency.map(|d| d.p99),
            harness_cpu_pct: rates.per_second(|c| c.harness_cpu).map(|v| v * 100.0),
            worker_cpu_max_pct: worker_cpu,
            worker_wait_max_pct: worker_wait,
            lag_ms,
            server_cpu_pct: rates
                .per_second(|c| c.server.cpu_seconds)
                .map(|v| v * 100.0),
            server_rss_mb: b.server.rss_bytes.map(|b| b as f64 / 1e6),
            server_participants: b.server.participants.map(|p| p as u64),
        }
    }

    /// Everyone leaves; waits for the workers' last reports, then for the server to
    /// let go of everyone.
    fn stop(&mut self) {
        for w in &mut self.workers {
            w.send(Command::Stop);
        }
        let deadline = Instant::now() + LEAVE_GRACE + SETTLE;
        while self.workers.iter().any(|w| !w.done) {
            if !self.receive_until(deadline) {
                break;
            }
        }
        // Polling the server's own count: the one readiness signal it offers.
        let settle = Instant::now() + SETTLE;
        loop {
            let server = self.probe.sample();
            let settled = match (server.participants, self.baseline.participants) {
                (Some(now), Some(before)) => now <= before,
                _ => true,
            };
            if settled || Instant::now() >= settle {
                self.after_leave = Some(server);
                break;
            }
            thread::sleep(SETTLE_POLL);
        }
    }

    /// The figures; rates and CPU over the steady window, which ends at checkpoint
    /// `steady_end` (the last before the leave phase).
    fn report(
        &self,
        started_unix_ms: u64,
        steady_end: usize,
        stopped_early_s: Option<f64>,
    ) -> Report {
        let scenario = &*self.scenario;
        let steady_from = self.start + scenario.ramp() + WARMUP.min(scenario.duration / 2);
        let first = self
            .checkpoints
            .iter()
            .position(|c| c.at >= steady_from)
            .filter(|i| *i < steady_end)
            .unwrap_or(0);
        let (a, b) = (&self.checkpoints[first], &self.checkpoints[steady_end]);
        let window = Interval { a, b };
        // Sample k covers checkpoints k to k + 1.
        let samples = &self.series[first.min(self.series.len())..steady_end.min(self.series.len())];
        let lags = sorted(samples.iter().map(|s| Some(s.lag_ms)));
        let waits = sorted(samples.iter().map(|s| s.worker_wait_max_pct));

        let mut peers = PeerFigures {
            planned: scenario.total_peers() as u64,
            peak_joined: self.peak_joined,
            ..PeerFigures::default()
        };
        let (mut measured, mut counted, mut tx_dropped) =
            (RxTotals::default(), RxTotals::default(), 0);
        for w in &self.workers {
            let l = &w.latest;
            peers.absorb(&l.peers);
            measured.add(&l.measured);
            counted.add(&l.counted);
            tx_dropped += l.tx_dropped;
        }
        let loss = |t: &RxTotals| Loss::new(t.received, t.lost, t.duplicates, t.reordered);

        let delta = |f: fn(&ServerSample) -> Option<f64>| Some(f(&b.server)? - f(&a.server)?);
        let cpu_us_per_forwarded_packet =
            match (delta(|s| s.cpu_seconds), delta(|s| s.forwarded_packets)) {
                (Some(cpu), Some(packets)) if packets > 0.0 => Some(cpu * 1e6 / packets),
                _ => None,
            };
        let participants = b.server.participants.unwrap_or(self.peak_joined as f64);
        let rss_per_participant_kb = match (b.server.rss_bytes, self.baseline.rss_bytes) {
            (Some(now), Some(before)) if participants > 0.0 => {
                Some((now as f64 - before as f64) / participants / 1e3)
            }
            _ => None,
        };
        let after = self.after_leave.unwrap_or_default();
        let growth = |now: Option<f64>, before: Option<f64>| Some((now? - before?) as i64);
        let mut report = Report {
            scenario: scenario.clone(),
            started_unix_ms,
            elapsed_s: self.start.elapsed().as_secs_f64(),
            stopped_early_s,
            steady: Window {
                from_s: a.at.duration_since(self.start).as_secs_f64(),
                to_s: b.at.duration_since(self.start).as_secs_f64(),
            },
            peers,
            join_ms: Distribution::from_micros(&self.join_times.join),
            connect_ms: Distribution::from_micros(&self.join_times.connect),
            first_video_ms: Distribution::from_micros(&self.join_times.first_video),
            first_keyframe_ms: Distribution::from_micros(&self.join_times.first_keyframe),
            latency_ms: Distribution::from_micros(&self.latency),
            loss: LossFigures {
                measured: loss(&measured),
                counted: loss(&counted),
            },
            rates: window.rates(),
            server: ServerFigures {
                cpu_source: self.probe.cpu_source().into(),
                cpu_pct: window
                    .per_second(|c| c.server.cpu_seconds)
                    .map(|v| v * 100.0),
                cpu_us_per_forwarded_packet,
                floor: None,
                instances: self.probe.instances(),
                rss_mb: b.server.rss_bytes.map(|b| b as f64 / 1e6),
                rss_per_participant_kb,
                rss_growth_mb: match (b.server.rss_bytes, a.server.rss_bytes) {
                    (Some(end), Some(start)) => Some((end as f64 - start as f64) / 1e6),
                    _ => None,
                },
                participants: b.server.participants.map(|p| p as u64),
                udp_tx_dropped: growth(after.udp_tx_dropped, self.baseline.udp_tx_dropped)
                    .map(|d| d.max(0) as u64),
                udp_rx_dropped: growth(after.udp_rx_dropped, self.baseline.udp_rx_dropped)
                    .map(|d| d.max(0) as u64),
                participants_after_leave: growth(after.participants, self.baseline.participants),
                rooms_after_leave: growth(after.rooms, self.baseline.rooms),
            },
            harness: HarnessFigures {
                threads: scenario.threads,
                cpu_pct: window.per_second(|c| c.harness_cpu).map(|v| v * 100.0),
                worker_cpu_max_pct: samples
                    .iter()
                    .filter_map(|s| s.worker_cpu_max_pct)
                    .reduce(f64::max),
                lag_p50_ms: median(&lags).unwrap_or(0.0),
                lag_max_ms: lags.last().copied().unwrap_or(0.0),
                wait_p50_pct: median(&waits),
                tx_dropped,
                limited: false,
            },
            warnings: Vec::new(),
            series: self.series.clone(),
        };
        report.assess();
        report
    }
}

/// The larger of two optional figures.
fn max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The present values, ascending.
fn sorted(values: impl Iterator<Item = Option<f64>>) -> Vec<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    v.sort_by(f64::total_cmp);
    v
}

fn median(sorted: &[f64]) -> Option<f64> {
    sorted.get(sorted.len() / 2).copied()
}

/// Rates between two checkpoints.
struct Interval<'a> {
    a: &'a Checkpoint,
    b: &'a Checkpoint,
}

impl Interval<'_> {
    /// The per-second rate of a cumulative figure; `None` when either end lacks it.
    fn per_second(&self, f: impl Fn(&Checkpoint) -> Option<f64>) -> Option<f64> {
        let seconds = self.b.at.duration_since(self.a.at).as_secs_f64();
        let (a, b) = (f(self.a)?, f(self.b)?);
        (seconds > 0.0).then(|| (b - a).max(0.0) / seconds)
    }

    fn rates(&self) -> Rates {
        Rates {
            rx_pps: self
                .per_second(|c| Some(c.rx.packets as f64))
                .unwrap_or(0.0),
            rx_mbps: self
                .per_second(|c| Some(c.rx.bytes as f64 * 8e-6))
                .unwrap_or(0.0),
            tx_pps: self
                .per_second(|c| Some(c.sent_packets as f64))
                .unwrap_or(0.0),
            server_egress_pps: self.per_second(|c| c.server.udp_tx_packets),
            server_forwarded_pps: self.per_second(|c| c.server.forwarded_packets),
        }
    }
}
