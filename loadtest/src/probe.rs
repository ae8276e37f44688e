//! Where the harness's own figures and the server's come from: CPU time and resident
//! memory from `/proc`, and the server's counters from its Prometheus `/metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

/// Largest `/metrics` response read; corelay's is a few KiB per shard.
const MAX_METRICS_BYTES: u64 = 4 << 20;
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

/// Seconds of CPU (user + system) in a `/proc/.../stat` file, e.g. `/proc/self/stat`,
/// `/proc/thread-self/stat` or `/proc/<pid>/stat`.
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    parse_cpu_ticks(&text).map(|ticks| ticks as f64 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a stat line. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The one CPU that process `pid`'s busiest thread is pinned to, if it is pinned to
/// one: where the server's packet path runs.
pub fn pinned_cpu(pid: u32) -> Option<usize> {
    let busiest = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|entry| {
            let tid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            Some((parse_cpu_ticks(&stat)?, tid))
        })
        .max()?
        .1;
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(busiest)).ok()?;
    let mut cpus = (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false));
    match (cpus.next(), cpus.next()) {
        (Some(cpu), None) => Some(cpu),
        _ => None,
    }
}

/// Time the calling thread spent running, and runnable but waiting for a CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThreadTimes {
    pub running_seconds: f64,
    pub waiting_seconds: f64,
}

/// The calling thread's [`ThreadTimes`], from `/proc/thread-self/schedstat`
/// (nanosecond resolution, unlike `stat`'s clock ticks).
pub fn thread_times() -> Option<ThreadTimes> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

fn parse_schedstat(text: &str) -> Option<ThreadTimes> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(ThreadTimes {
        running_seconds: fields.next()?? as f64 / 1e9,
        waiting_seconds: fields.next()?? as f64 / 1e9,
    })
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&text)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Raises the soft open-file limit to the hard one: each participant holds three
/// sockets. Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// What the server looked like at one moment. Each figure is `None` when its source
/// is unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerSample {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub forwarded_packets: Option<f64>,
    pub udp_tx_packets: Option<f64>,
    pub udp_tx_dropped: Option<f64>,
    pub udp_rx_dropped: Option<f64>,
    pub participants: Option<f64>,
    pub rooms: Option<f64>,
}

/// Reads the server's figures: CPU and memory from `/proc` for a local pid, else
/// from the standard `process_*` metrics if the server exports them; its counters
/// from `/metrics`, summed over shards and over instances (several behind a load
/// balancer).
#[derive(Debug, Clone)]
pub struct ServerProbe {
    pid: Option<u32>,
    instances: Vec<Instance>,
}

/// One server instance's `/metrics`, and what the run saw of it.
#[derive(Debug, Clone)]
struct Instance {
    authority: String,
    path: String,
    peak_participants: Option<f64>,
    peak_rooms: Option<f64>,
    /// CPU seconds and forwarded packets at the last scrape: counters only grow.
    last_counters: [Option<f64>; 2],
    went_backwards: bool,
}

impl Instance {
    fn observe(&mut self, metrics: &Metrics) {
        let metric = |name: &str| metrics.get(name).copied();
        for (peak, name) in [
            (&mut self.peak_participants, "rtc_active_participants"),
            (&mut self.peak_rooms, "rtc_active_rooms"),
        ] {
            if let Some(now) = metric(name) {
                *peak = Some(peak.map_or(now, |p| p.max(now)));
            }
        }
        let counters = [
            metric("process_cpu_seconds_total"),
            metric("rtc_forwarded_packets_total"),
        ];
        self.went_backwards |= counters
            .iter()
            .zip(self.last_counters)
            .any(|(now, before)| matches!((now, before), (Some(n), Some(b)) if *n < b));
        self.last_counters = counters;
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// An instance's share of the run, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceFigures {
    pub metrics_url: String,
    pub peak_participants: Option<u64>,
    pub peak_rooms: Option<u64>,
    /// A counter was lower than at the scrape before: the figures mix processes.
    pub counters_went_backwards: bool,
}

impl ServerProbe {
    /// `metrics`: `host:port` and path of each instance's `/metrics`.
    pub fn new(pid: Option<u32>, metrics: Vec<(String, String)>) -> Self {
        let instances = metrics
            .into_iter()
            .map(|(authority, path)| Instance {
                authority,
                path,
                peak_participants: None,
                peak_rooms: None,
                last_counters: [None; 2],
                went_backwards: false,
            })
            .collect();
        Self { pid, instances }
    }

    /// Where CPU and memory figures come from.
    pub fn cpu_source(&self) -> &'static str {
        if self.pid.is_some() {
            "proc"
        } else {
            "metrics"
        }
    }

    /// Scrapes every instance at once. The counters are summed only when all of them
    /// answered, so that rates never jump when one instance misses a scrape.
    pub fn sample(&mut self) -> ServerSample {
        let scraped: Vec<Option<Metrics>> = std::thread::scope(|scope| {
            let scrapes: Vec<_> = self
                .instances
                .iter()
                .map(|i| scope.spawn(|| http_get(&i.authority, &i.path).ok()))
                .collect();
            scrapes
                .into_iter()
                .map(|s| s.join().ok().flatten().map(|text| parse_metrics(&text)))
                .collect()
        });
        let mut total = (!scraped.is_empty()).then(Metrics::new);
        for (instance, metrics) in self.instances.iter_mut().zip(scraped) {
            let Some(metrics) = metrics else {
                total = None;
                continue;
            };
            instance.observe(&metrics);
            if let Some(sum) = &mut total {
                for (name, value) in metrics {
                    *sum.entry(name).or_default() += value;
                }
            }
        }
        let metric = |name: &str| total.as_ref().and_then(|m| m.get(name).copied());
        let (cpu_seconds, rss_bytes) = match self.pid {
            Some(pid) => (cpu_seconds(&format!("/proc/{pid}/stat")), rss_bytes(pid)),
            None => (
                metric("process_cpu_seconds_total"),
                metric("process_resident_memory_bytes").map(|b| b as u64),
            ),
        };
        ServerSample {
            cpu_seconds,
            rss_bytes,
            forwarded_packets: metric("rtc_forwarded_packets_total"),
            udp_tx_packets: metric("rtc_udp_tx_packets_total"),
            udp_tx_dropped: metric("rtc_udp_tx_dropped_total"),
            udp_rx_dropped: metric("rtc_udp_rx_dropped_total"),
            participants: metric("rtc_active_participants"),
            rooms: metric("rtc_active_rooms"),
        }
    }

    /// Each instance's peaks over the run.
    pub fn instances(&self) -> Vec<InstanceFigures> {
        let count = |v: Option<f64>| v.map(|v| v as u64);
        self.instances
            .iter()
            .map(|i| InstanceFigures {
                metrics_url: i.url(),
                peak_participants: count(i.peak_participants),
                peak_rooms: count(i.peak_rooms),
                counters_went_backwards: i.went_backwards,
            })
            .collect()
    }
}

/// Metric name to the sum of its samples over all label sets (e.g. every shard).
pub type Metrics = BTreeMap<String, f64>;

/// Sums each metric of a Prometheus text exposition over its label sets.
pub fn parse_metrics(text: &str) -> Metrics {
    let mut out = Metrics::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value follows the labels (which may contain spaces inside quotes).
        let after_labels = match line[name_end..].strip_prefix('{') {
            Some(labels) => labels.rfind('}').map(|i| &labels[i + 1..]),
            None => Some(&line[name_end..]),
        };
        let value = after_labels
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value
            && !name.is_empty()
        {
            *out.entry(name.to_string()).or_default() += value;
        }
    }
    out
}

/// GETs `path` from `authority` (`host:port`) over plain HTTP/1.1 and returns the
/// body of a 200 response.
pub fn http_get(authority: &str, path: &str) -> Result<String, String> {
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} does not resolve"))?;
    let stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(SCRAPE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SCRAPE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    get_over(stream, authority, path)
}

/// `GET path` with `Host: authority` over a connected `stream`, plain or TLS, which
/// the server closes after its answer; returns the body of a 200 response.
pub fn get_over(
    mut stream: impl Read + Write,
    authority: &str,
    path: &str,
) -> Result<String, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .take(MAX_METRICS_BYTES)
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    parse_http_response(&response)
}

/// The body of a complete 200 response (by `Content-Length` when given, else
/// everything after the head).
fn parse_http_response(response: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("truncated HTTP response")?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("HTTP status {status:?}"));
    }
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    match length {
        Some(n) if n > body.len() => Err("truncated HTTP body".into()),
        Some(n) => Ok(body[..n].to_string()),
        None => Ok(body.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_status_parsing() {
        let stat = "1234 (we ird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  2048 kB\nVmSwap:\t0 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_vm_rss("Name: x"), None);
        // Our own process: CPU time only grows, and we use memory.
        let before = cpu_seconds("/proc/self/stat").unwrap();
        let spin = (0..2_000_000u64).fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(b));
        assert_ne!(spin, 1);
        assert!(cpu_seconds("/proc/self/stat").unwrap() >= before);
        assert!(thread_times().is_some_and(|t| t.running_seconds > 0.0));
        assert_eq!(
            parse_schedstat("1500000000 250000000 42\n"),
            Some(ThreadTimes {
                running_seconds: 1.5,
                waiting_seconds: 0.25
            })
        );
        assert_eq!(parse_schedstat("12"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(raise_fd_limit().unwrap() > 0);
        // This process standing in for a local server, without metrics.
        let mut probe = ServerProbe::new(Some(std::process::id()), Vec::new());
        let sample = probe.sample();
        assert!(sample.cpu_seconds.is_some() && sample.rss_bytes.is_some());
        assert_eq!(sample.forwarded_packets, None);
        assert_eq!(probe.cpu_source(), "proc");
    }

    #[test]
    fn pinned_cpu_is_where_a_pinned_process_runs() {
        let mut pinned = std::process::Command::new("taskset")
            .args(["-c", "0", "sleep", "10"])
            .spawn()
            .unwrap();
        let mut free = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        // taskset pins itself, then becomes sleep (the same pid).
        let comm = format!("/proc/{}/comm", pinned.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&comm).unwrap() != "sleep\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "taskset never ran sleep"
            );
            std::thread::yield_now();
        }
        assert_eq!(pinned_cpu(pinned.id()), Some(0));
        if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
            assert_eq!(pinned_cpu(free.id()), None);
        }
        for child in [&mut pinned, &mut free] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(pinned_cpu(u32::MAX), None);
    }

    /// A loopback HTTP server answering one GET with each of `bodies`, then gone.
    fn serve(bodies: Vec<String>) -> (String, String) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for body in bodies {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0; 512];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = stream.read(&mut buf).unwrap();
                    assert!(n > 0, "request ended early");
                    request.extend_from_slice(&buf[..n]);
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                stream.write_all((head + &body).as_bytes()).unwrap();
            }
        });
        (authority, "/metrics".into())
    }

    fn metrics(cpu: f64, forwarded: u64, participants: u64, rooms: u64) -> String {
        format!(
            "process_cpu_seconds_total {cpu}\n\
             rtc_forwarded_packets_total{{shard=\"0\"}} {forwarded}\n\
             rtc_active_participants{{shard=\"0\"}} {participants}\n\
             rtc_active_rooms{{shard=\"0\"}} {rooms}\n"
        )
    }

    #[test]
    fn instances_behind_a_balancer_are_summed_and_checked() {
        let a = serve(vec![metrics(1.0, 100, 3, 1), metrics(2.0, 300, 6, 2)]);
        // The second scrape of b comes from another process: its counters are lower.
        let b = serve(vec![metrics(1.0, 50, 4, 2), metrics(0.5, 10, 2, 1)]);
        let mut probe = ServerProbe::new(None, vec![a.clone(), b]);
        let first = probe.sample();
        assert_eq!(first.cpu_seconds, Some(2.0));
        assert_eq!(first.forwarded_packets, Some(150.0));
        assert_eq!(first.participants, Some(7.0));
        let second = probe.sample();
        assert_eq!(second.forwarded_packets, Some(310.0));
        assert_eq!(second.rooms, Some(3.0));
        // Both servers are gone now: no partial sums.
        let third = probe.sample();
        assert_eq!((third.cpu_seconds, third.participants), (None, None));

        let instances = probe.instances();
        assert_eq!(instances.len(), 2);
        assert_eq!(instances[0].metrics_url, format!("http://{}/metrics", a.0));
        let peaks: Vec<_> = instances
            .iter()
            .map(|i| (i.peak_participants, i.peak_rooms, i.counters_went_backwards))
            .collect();
        assert_eq!(peaks, [(Some(6), Some(2), false), (Some(4), Some(2), true)]);
    }

    #[test]
    fn metrics_sum_over_shards() {
        let text = "# HELP rtc_forwarded_packets_total x\n\
                    # TYPE rtc_forwarded_packets_total counter\n\
                    rtc_forwarded_packets_total{shard=\"0\"} 10\n\
                    rtc_forwarded_packets_total{shard=\"1\"} 32\n\
                    rtc_odd{label=\"a } b\"} 1.5 1700000000\n\
                    rtc_signaling_connections 3\n\
                    garbage{\n";
        let m = parse_metrics(text);
        assert_eq!(m["rtc_forwarded_packets_total"], 42.0);
        assert_eq!(m["rtc_odd"], 1.5);
        assert_eq!(m["rtc_signaling_connections"], 3.0);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more";
        assert_eq!(parse_http_response(ok).unwrap(), "hello");
        let no_length = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(parse_http_response(no_length).unwrap(), "all of it");
        assert!(parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200").is_err());
    }
}
