//! The per-packet forwarding path, end to end inside one shard: a publisher's SRTP
//! datagram is routed, decrypted by its publisher `Rtc`, rewritten for each of K
//! subscribers, written to their `Rtc`s, and encrypted by str0m into K datagrams.
//! The figure of merit is the time (and heap allocations) per *forwarded* packet.
//!
//! # How
//!
//! No sockets and no runtime: the sans-IO [`Sfu`] is driven directly, quinn-style,
//! with real `corelay_loadtest::Peer` clients over an in-memory network on a virtual
//! clock. Setup joins one publisher (VP8 video only, so every RTP packet it sends is
//! one video packet to forward) and K subscribers to one room and runs signaling,
//! ICE, DTLS and the first keyframe until every subscriber is receiving video.
//!
//! Then the publisher's RTP datagrams are held back instead of delivered. Each timed
//! run is:
//!
//! 1. untimed: advance the virtual clock (everything else, RTCP and STUN included,
//!    flows normally) until enough fresh publisher datagrams are held. SRTP replay
//!    protection rejects a datagram seen before, so every timed input is new;
//! 2. timed: hand them to [`Sfu::handle_datagrams`] in receive batches of
//!    [`BATCH`], as the shard runtime does after `recvmmsg`, and move what comes out
//!    of [`Sfu::transmits`] into a preallocated outbox (where `sendmmsg` would go);
//! 3. untimed: deliver the outbox to the subscribers, so their receivers, RTCP and
//!    ICE consent stay those of a healthy session. The datagrams are freed here too.
//!
//! Each criterion iteration is one published packet, with `Throughput::Elements(K)`,
//! so criterion's `time` is per published packet and its `thrpt` is forwarded
//! packets per second; the line printed after each K divides by K for you. Every run
//! checks that each published packet was written to all K subscriber legs and came
//! out as K encrypted RTP datagrams, and after each K every subscriber must have
//! received its video without loss, duplicates or reordering.
//!
//! A counting global allocator tallies allocations made during step 2 only; after
//! each K a line gives time and allocations per forwarded packet, and at the end the
//! allocations per published packet are split into a per-received part and a
//! per-subscriber part (a least-squares fit over K).
//!
//! Run: `cargo bench --bench forward` (add `-- --quick` for a short run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::iter;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corelay::media::udp::BATCH;
use corelay::sfu::{Limits, Sfu};
use corelay::shard::messages::{ToAccept, ToShard};
use corelay::signaling::protocol::{ClientMsg, parse};
use corelay_loadtest::{Leg, MediaConfig, MediaKind, Peer, PeerConfig, TimeBase};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use str0m::net::Transmit;

/// Subscriber counts benchmarked.
const FANOUTS: [usize; 3] = [1, 4, 16];
/// Publisher datagrams held back and fed per timed run.
const CHUNK: usize = 128;
const SFU_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50_000);
/// Client legs live on 127.0.0.2, two consecutive ports per peer.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const CLIENT_PORT_BASE: u16 = 10_000;
/// The publisher is peer 0; subscribers are 1..=K. A peer's conn id is its index.
const PUBLISHER: usize = 0;
/// Smallest step of the virtual clock, so a deadline that stays due cannot stall it.
const MIN_STEP: Duration = Duration::from_millis(1);
/// Virtual time the setup may take before it is declared stuck.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// Allocation counting

/// `System`, counting every allocation (`alloc`, `alloc_zeroed` and `realloc`).
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------
// The in-memory network

fn leg_addr(peer: usize, leg: Leg) -> SocketAddr {
    let offset = match leg {
        Leg::Publisher => 0,
        Leg::Subscriber => 1,
    };
    let port = CLIENT_PORT_BASE + 2 * u16::try_from(peer).expect("peer index") + offset;
    SocketAddr::from((CLIENT_IP, port))
}

/// The peer and leg `addr` belongs to.
fn leg_of(addr: SocketAddr) -> (usize, Leg) {
    assert_eq!(addr.ip(), CLIENT_IP, "datagram to an unknown host {addr}");
    let n = addr.port() - CLIENT_PORT_BASE;
    let leg = if n.is_multiple_of(2) {
        Leg::Publisher
    } else {
        Leg::Subscriber
    };
    (usize::from(n / 2), leg)
}

/// RTP, as opposed to RTCP (RFC 5761 §4), STUN or DTLS (RFC 7983).
fn is_rtp(datagram: &[u8]) -> bool {
    matches!(datagram, [b0, b1, ..] if (128..=191).contains(b0) && !(64..=95).contains(&(b1 & 0x7f)))
}

/// The SFU, its clients, and the clock they share.
struct Network {
    now: Instant,
    sfu: Sfu,
    peers: Vec<Peer>,
    /// Once set, the publisher's RTP datagrams wait in `held` instead of reaching the SFU.
    hold: bool,
    held: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Reused buffers of the timed section, so it allocates only what the SFU does.
    feed: Vec<(SocketAddr, Vec<u8>)>,
    outbox: Vec<Transmit>,
}

impl Network {
    /// A room with one video publisher and `subscribers` receiving it.
    fn new(subscribers: usize) -> Self {
        let now = Instant::now();
        let limits = Limits {
            room_participants: subscribers + 1,
            rooms: 1,
            tracks: 4,
        };
        let sfu = Sfu::new(0, vec![SFU_ADDR], limits, Vec::new()).expect("sfu");
        let time_base = TimeBase::new(now, 1_000_000_000_000);
        let peers = (0..=subscribers)
            .map(|i| {
                let config = peer_config(i);
                let (publisher, subscriber) =
                    (leg_addr(i, Leg::Publisher), leg_addr(i, Leg::Subscriber));
                Peer::new(config, time_base, publisher, subscriber, now)
            })
            .collect();
        let mut net = Self {
            now,
            sfu,
            peers,
            hold: false,
            held: VecDeque::new(),
            feed: Vec::with_capacity(CHUNK),
            outbox: Vec::new(),
        };
        net.run_until("every subscriber receives video", Self::all_receive_video);
        net.hold = true;
        net
    }

    fn subscribers(&self) -> usize {
        self.peers.len() - 1
    }

    fn all_receive_video(&self) -> bool {
        self.peers[PUBLISHER + 1..].iter().all(|p| {
            let stats = p.stats();
            stats.subscriber_connected
                && stats
                    .tracks
                    .iter()
                    .any(|t| t.kind == MediaKind::Video && t.packets > 0)
        })
    }

    /// Panics unless every client saw a clean session and every subscriber got all
    /// the video it was sent, in order: the measured path did its whole job.
    fn assert_healthy(&self) {
        for (i, peer) in self.peers.iter().enumerate() {
            let stats = peer.stats();
            assert!(
                stats.violations.is_empty() && stats.errors.is_empty(),
                "client {i}: {:?} {:?}",
                stats.violations,
                stats.errors
            );
            if i == PUBLISHER {
                continue;
            }
            let video = stats.tracks.iter().find(|t| t.kind == MediaKind::Video);
            let video = video.unwrap_or_else(|| panic!("subscriber {i} got no video"));
            assert_eq!(
                (video.lost, video.duplicates, video.reordered),
                (0, 0, 0),
                "subscriber {i}: {video:?}"
            );
        }
    }

    fn run_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let limit = self.now + SETUP_LIMIT;
        self.pump();
        while !done(self) {
            assert!(
                self.now < limit,
                "setup stuck: not reached '{what}' after {SETUP_LIMIT:?}"
            );
            self.tick();
        }
    }

    /// Advances the clock to the next deadline, fires what is due, and pumps.
    fn tick(&mut self) {
        let next = self
            .peers
            .iter()
            .map(Peer::poll_timeout)
            .chain(self.sfu.next_deadline())
            .min()
            .expect("at least one deadline");
        self.now = next.max(self.now + MIN_STEP);
        self.sfu.handle_timeout(self.now);
        for peer in &mut self.peers {
            if peer.poll_timeout() <= self.now {
                peer.handle_timeout(self.now);
            }
        }
        self.pump();
    }

    /// Delivers signaling and datagrams both ways until nobody has anything to send.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.peers.len() {
                while let Some(text) = self.peers[i].poll_signal() {
                    self.signal_to_sfu(i, &text);
                    moved = true;
                }
                while let Some(t) = self.peers[i].poll_transmit() {
                    self.datagram_to_sfu(leg_addr(i, t.leg), t.contents);
                    moved = true;
                }
            }
            for reply in std::mem::take(&mut self.sfu.to_accept) {
                self.reply_to_peer(reply);
                moved = true;
            }
            let transmits: Vec<Transmit> = self.sfu.transmits.drain().collect();
            moved |= !transmits.is_empty();
            for t in transmits {
                self.deliver(t);
            }
            if !moved {
                return;
            }
        }
    }

    /// What the accept shard does with a client's text frame.
    fn signal_to_sfu(&mut self, peer: usize, text: &str) {
        let request = parse(text).unwrap_or_else(|e| panic!("bad client message {text}: {e:?}"));
        let (conn, request_id) = (peer as u64, request.request_id);
        let msg = match request.msg {
            ClientMsg::Join(join) => ToShard::Join {
                conn,
                request_id,
                join,
            },
            ClientMsg::Signal(signal) => ToShard::Signal {
                conn,
                request_id,
                signal,
            },
            ClientMsg::Ping => return,
        };
        self.sfu.handle_message(self.now, msg);
    }

    fn datagram_to_sfu(&mut self, source: SocketAddr, contents: Vec<u8>) {
        if self.hold && source == leg_addr(PUBLISHER, Leg::Publisher) && is_rtp(&contents) {
            self.held.push_back((source, contents));
        } else {
            self.sfu
                .handle_datagrams(self.now, iter::once((source, contents.as_slice())));
        }
    }

    fn reply_to_peer(&mut self, reply: ToAccept) {
        match reply {
            ToAccept::Send { conn, text } => {
                self.peers[conn as usize].handle_signal(&text, self.now)
            }
            refused => panic!("the SFU refused a benchmark client: {refused:?}"),
        }
    }

    fn deliver(&mut self, t: Transmit) {
        let (peer, leg) = leg_of(t.destination);
        self.peers[peer].handle_datagram(leg, t.source, &t.contents, self.now);
    }

    /// Runs the clock until at least `n` publisher datagrams are held.
    fn hold_publisher_rtp(&mut self, n: usize) {
        while self.held.len() < n {
            self.tick();
        }
    }

    /// Feeds `n` held datagrams to the SFU; only this is timed and counted.
    fn forward_held(&mut self, n: usize) -> Sample {
        self.feed.extend(self.held.drain(..n));
        self.outbox.reserve(n * self.subscribers() + BATCH);
        let forwarded_before = self.sfu.counters.forwarded_packets;
        let allocations_before = allocations();
        let start = Instant::now();
        for batch in self.feed.chunks(BATCH) {
            let batch = batch.iter().map(|(source, d)| (*source, d.as_slice()));
            self.sfu.handle_datagrams(self.now, batch);
            self.outbox.extend(self.sfu.transmits.drain());
        }
        let elapsed = start.elapsed();
        let sample = Sample {
            elapsed,
            allocations: allocations() - allocations_before,
            published: n as u64,
            forwarded: self.sfu.counters.forwarded_packets - forwarded_before,
        };
        let encrypted = self.outbox.iter().filter(|t| is_rtp(&t.contents)).count();
        assert_eq!(
            (sample.forwarded, encrypted as u64),
            (
                sample.published * self.subscribers() as u64,
                sample.forwarded
            ),
            "every published packet must be written to, and sent by, every subscriber leg"
        );
        self.feed.clear();
        let mut outbox = std::mem::take(&mut self.outbox);
        for t in outbox.drain(..) {
            self.deliver(t);
        }
        self.outbox = outbox;
        self.pump();
        sample
    }
}

fn peer_config(index: usize) -> PeerConfig {
    let publisher = index == PUBLISHER;
    PeerConfig {
        publish_audio: false,
        publish_video: publisher,
        // A high rate gives many packets per frame, so a chunk spans little virtual time.
        media: MediaConfig {
            video_kbps: 4_000,
            ..MediaConfig::default()
        },
        message_log_capacity: 0,
        ..PeerConfig::new("bench", format!("user-{index}"))
    }
}

// ---------------------------------------------------------------------------------
// Measurements

/// One or more timed runs added up.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    elapsed: Duration,
    allocations: u64,
    published: u64,
    forwarded: u64,
}

impl std::ops::AddAssign for Sample {
    fn add_assign(&mut self, other: Self) {
        self.elapsed += other.elapsed;
        self.allocations += other.allocations;
        self.published += other.published;
        self.forwarded += other.forwarded;
    }
}

impl Sample {
    fn per_forwarded(&self, x: f64) -> f64 {
        x / self.forwarded.max(1) as f64
    }

    fn allocations_per_published(&self) -> f64 {
        self.allocations as f64 / self.published.max(1) as f64
    }
}

/// Feeds `iters` fresh publisher packets in chunks and returns the timed total.
fn run(net: &mut Network, iters: u64, total: &mut Sample) -> Duration {
    let mut left = usize::try_from(iters).expect("iteration count");
    let mut elapsed = Duration::ZERO;
    while left > 0 {
        let n = left.min(CHUNK);
        net.hold_publisher_rtp(n);
        let sample = net.forward_held(n);
        elapsed += sample.elapsed;
        *total += sample;
        left -= n;
    }
    elapsed
}

/// Where the timed section's allocations came from when traced (a backtrace per
/// allocation) with str0m 0.25. corelay's own packet path allocated nothing.
const ALLOCATION_SOURCES: &str = "str0m internals: per received datagram, the `Arc<[u8]>` \
payload of the `RtpPacket` and a temporary `String` in `Mid::from(&str)` while parsing the \
MID header extension, plus 3 for each transport-wide CC feedback report sent back to the \
publisher (every few dozen packets); per forwarded copy, the `Vec` \
`SrtpContext::protect_rtp` returns, which becomes the `Transmit`";

fn report(k: usize, s: &Sample) {
    println!(
        "forward/K={k}: {:.2} allocations per forwarded packet ({ALLOCATION_SOURCES}); \
         {:.0} ns per forwarded packet; {} published, {} forwarded",
        s.per_forwarded(s.allocations as f64),
        s.per_forwarded(s.elapsed.as_nanos() as f64),
        s.published,
        s.forwarded,
    );
}

/// Splits allocations per published packet into `a + b·K` (least squares over K).
fn report_allocation_split(samples: &[(usize, Sample)]) {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|(k, s)| (*k as f64, s.allocations_per_published()))
        .collect();
    let n = points.len() as f64;
    let mean_k = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_a = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points
        .iter()
        .map(|(k, a)| (k - mean_k) * (a - mean_a))
        .sum();
    let variance: f64 = points.iter().map(|(k, _)| (k - mean_k).powi(2)).sum();
    let per_copy = covariance / variance;
    let per_received = mean_a - per_copy * mean_k;
    println!(
        "forward: allocations per published packet = {per_received:.2} per received datagram \
         + {per_copy:.2} per forwarded copy × K"
    );
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut samples = Vec::new();
    for k in FANOUTS {
        // Built on first use, so a benchmark filtered out on the command line costs nothing.
        let mut net = None;
        let mut total = Sample::default();
        group.throughput(Throughput::Elements(k as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("K={k}")), |b| {
            let net = net.get_or_insert_with(|| Network::new(k));
            b.iter_custom(|iters| run(net, iters, &mut total));
        });
        if let Some(net) = net {
            net.assert_healthy();
            report(k, &total);
            samples.push((k, total));
        }
    }
    group.finish();
    if samples.len() > 1 {
        report_allocation_split(&samples);
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
