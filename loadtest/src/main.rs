//! `corelay-loadtest`: the load harness's command line, a thin layer over
//! [`corelay_loadtest::run`]. Prints a progress line a second (stderr) and the final
//! table (stdout); writes the JSON and HTML reports when asked.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use corelay_loadtest::{Preset, Scenario, Target, html, run};

/// Load harness for corelay (or any SFU speaking its protocol): many synthetic str0m
/// participants per thread, in many rooms. Reports join time, end-to-end latency,
/// loss, packet rates, and server CPU per forwarded packet and memory per participant.
///
/// A preset sets the scenario's shape; explicit flags override it. Without a preset,
/// the meeting preset applies.
#[derive(Debug, Parser)]
#[command(name = "corelay-loadtest", version)]
struct Cli {
    /// Server or load balancer, `ws://host:port`, or `wss://host[:port]` through a
    /// balancer that terminates TLS; participants connect to `<url>/ws?room=<room>`.
    #[arg(long, default_value = "ws://127.0.0.1:5005")]
    url: String,
    /// For `wss://`: trust the certificates in this PEM file instead of the system's
    /// roots (a private CA, or the balancer's self-signed certificate).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The SFU behind `--url`: corelay, or Janus's VideoRoom (for a side-by-side).
    #[arg(long, value_enum, default_value_t = Target::Corelay)]
    target: Target,
    /// The scenario's shape (default: meeting); the flags below override it.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Rooms (default 1).
    #[arg(long)]
    rooms: Option<usize>,
    /// Participants per room (default: the preset's).
    #[arg(long)]
    peers: Option<usize>,
    /// Publishers per room (the first to join); default: as the preset says.
    #[arg(long)]
    publishers: Option<usize>,
    /// Video bitrate per publisher (default 300).
    #[arg(long)]
    video_kbps: Option<u32>,
    /// Publish audio only.
    #[arg(long)]
    audio_only: bool,
    /// Seconds of media after the last planned join (default 30).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Joins per second across all rooms (default 20).
    #[arg(long)]
    join_rate: Option<f64>,
    /// Seconds each participant stays (±50 %) before leaving and being replaced
    /// (churn preset: 8; otherwise everyone stays). The first participant of each
    /// room stays throughout, to live through all of its room's renegotiations.
    #[arg(long, value_name = "SECONDS")]
    lifetime: Option<f64>,
    /// Worker threads, each one event loop.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Fraction of participants per room that decrypt and measure latency and loss
    /// (at least one per room); the rest only count packets.
    #[arg(long, default_value_t = 0.1)]
    measure_fraction: f64,
    /// Room names are `<prefix>-<n>` (default: `load<pid>`).
    #[arg(long)]
    room_prefix: Option<String>,
    /// Process id of a local server: its CPU and memory come from /proc, and after the
    /// run the floor (AES-GCM + sendmmsg per datagram) is measured on its core.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's Prometheus endpoint (default: http://<host:port of --url>/metrics).
    /// Behind a load balancer, give each instance's (repeat the flag): the figures are
    /// summed over them.
    #[arg(long = "metrics-url", value_name = "URL")]
    metrics_urls: Vec<String>,
    /// Seconds a participant may take to join before it counts as failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    join_timeout: f64,
    /// Write every figure and the per-second series as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl Cli {
    fn scenario(&self) -> Result<Scenario, String> {
        let seconds = |name: &str, s: f64| {
            Duration::try_from_secs_f64(s).map_err(|_| format!("--{name}: {s} is not a duration"))
        };
        let mut s = Scenario::preset(self.preset.unwrap_or(Preset::Meeting));
        s.preset = self.preset;
        s.url = self.url.clone();
        s.ca_file = self.ca_file.clone();
        s.target = self.target;
        s.rooms = self.rooms.unwrap_or(s.rooms);
        s.peers = self.peers.unwrap_or(s.peers);
        s.publishers = self.publishers.or(s.publishers);
        s.video_kbps = self.video_kbps.unwrap_or(s.video_kbps);
        s.audio_only |= self.audio_only;
        if let Some(d) = self.duration {
            s.duration = seconds("duration", d)?;
        }
        s.join_rate = self.join_rate.unwrap_or(s.join_rate);
        if let Some(l) = self.lifetime {
            s.lifetime = Some(seconds("lifetime", l)?);
        }
        s.threads = self.threads;
        s.measure_fraction = self.measure_fraction;
        if let Some(prefix) = &self.room_prefix {
            s.room_prefix = prefix.clone();
        }
        s.server_pid = self.server_pid;
        s.metrics_urls = self.metrics_urls.clone();
        s.join_timeout = seconds("join-timeout", self.join_timeout)?;
        s.validate()?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let scenario = match cli.scenario() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corelay-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    let report = match run(&scenario, |sample| {
        if !quiet {
            eprintln!("{}", sample.progress_line());
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corelay-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    let outputs = [
        (&cli.json, report.to_json()),
        (&cli.html, html::render(&report)),
    ];
    for (path, contents) in outputs {
        if let Some(path) = path
            && let Err(e) = std::fs::write(path, contents)
        {
            eprintln!("corelay-loadtest: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_preset() {
        let cli = Cli::parse_from([
            "corelay-loadtest",
            "--preset",
            "webinar",
            "--peers",
            "40",
            "--duration",
            "5",
            "--url",
            "ws://[::1]:7000",
        ]);
        let s = cli.scenario().unwrap();
        assert_eq!((s.peers, s.publishers_per_room()), (40, 1));
        assert_eq!(s.duration, Duration::from_secs(5));
        assert_eq!(s.preset, Some(Preset::Webinar));

        let s = Cli::parse_from(["corelay-loadtest", "--peers", "3", "--audio-only"])
            .scenario()
            .unwrap();
        assert_eq!((s.peers, s.publishers_per_room(), s.preset), (3, 3, None));
        assert!(s.audio_only);

        let churn = Cli::parse_from(["corelay-loadtest", "--preset", "churn", "--lifetime", "3"]);
        assert_eq!(
            churn.scenario().unwrap().lifetime,
            Some(Duration::from_secs(3))
        );
        let bad = Cli::parse_from(["corelay-loadtest", "--duration=-1"]);
        assert!(bad.scenario().is_err());
        let bad = Cli::parse_from(["corelay-loadtest", "--publishers", "9"]);
        assert!(bad.scenario().is_err());
    }
}
