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
//! A second set of cases makes every subscriber a (slow) video publisher too, so each
//! subscriber connection carries K streams instead of one, as in a meeting. The timed
//! path is the same (only peer 0's packets are held and fed), so the ratio of the two
//! at one K is what a larger room adds to each forwarded packet: a lookup or a tick
//! that scans a connection's streams shows up here.
//!
//! `K=4,after 50 visitors` is `K=4` once 50 participants have joined, published audio
//! and video, and left: each subscriber connection then carries 100 inactive m-lines,
//! and its ratio to `K=4` is what the departed still cost a packet.
//!
//! The last case, `rooms=12`, is shaped like the loadtest's meeting preset: twelve
//! rooms of five, everyone publishing audio and video, every publisher's packets
//! held and fed in the order they were sent. A batch then mixes many publishers, so
//! each subscriber connection gets a few of its packets, not all 32, and is ticked
//! for those few, with its state gone cold since its last batch. Against `K=4` (the
//! same copies per packet, one tick per subscriber per batch) it shows what that costs.
//!
//! Each criterion iteration is one published packet, with `Throughput::Elements(K)`
//! (K copies per packet; 4 in `rooms=12`), so criterion's `time` is per published
//! packet and its `thrpt` is forwarded packets per second; the line printed after
//! each case divides by K for you. Every run checks that each published packet was
//! written to all K receiving legs and came out as K encrypted RTP datagrams, and
//! after each case every receiver must have got its video without loss, duplicates
//! or reordering.
//!
//! A counting global allocator tallies allocations made during step 2 only; after
//! each K a line gives time and allocations per forwarded packet, and at the end the
//! allocations per published packet are split into a per-received part and a
//! per-subscriber part (a least-squares fit over K).
//!
//! Run: `cargo bench --bench forward` (add `-- --quick` for a short run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corelay::media::udp::BATCH;
use corelay::sfu::Sfu;
use corelay_loadtest::{MediaConfig, MediaKind, PeerConfig};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use str0m::net::Transmit;

/// Subscriber counts benchmarked.
const FANOUTS: [usize; 3] = [1, 4, 16];
/// Subscriber counts benchmarked with every subscriber publishing too.
const MEETINGS: [usize; 2] = [4, 16];
/// Meeting rooms benchmarked side by side (see [`Case::Rooms`]).
const ROOMS: usize = 12;
/// Participants per room in [`Case::Rooms`], as in the loadtest's meeting preset.
const ROOM_SIZE: usize = 5;
/// The other publishers' video rate in the meeting cases: enough to keep their
/// streams live, little enough that the untimed steps stay short.
const SLOW_VIDEO_KBPS: u32 = 100;
/// Participants who came, published and left before [`Case::Visited`] is timed.
const VISITS: usize = 50;
/// Publisher datagrams held back and fed per timed run.
const CHUNK: usize = 128;
/// In a fan-out, the publisher is peer 0 and subscribers are 1..=K. A peer's conn
/// id is its index.
const PUBLISHER: usize = 0;

/// What one benchmark case puts on the shard.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// One video publisher, K subscribers: a batch is 32 packets of one track, so a
    /// subscriber connection is ticked once per batch.
    Fanout(usize),
    /// As `Fanout`, with every subscriber publishing (slow) video too, so each
    /// subscriber connection carries K streams.
    Meeting(usize),
    /// As `Fanout`, after `VISITS` participants came, published audio and video, and
    /// left: what the tracks of those gone still cost a subscriber connection.
    Visited(usize),
    /// `ROOMS` rooms of `ROOM_SIZE`, everyone publishing audio and 300 kbps video,
    /// as in the loadtest's meeting preset, all of it held and fed: a batch mixes
    /// many publishers' packets, as the shard's socket delivers them.
    Rooms,
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Fanout(k) => format!("K={k}"),
            Case::Meeting(k) => format!("K={k},meeting"),
            Case::Visited(k) => format!("K={k},after {VISITS} visitors"),
            Case::Rooms => format!("rooms={ROOMS}"),
        }
    }

    fn peers(self) -> usize {
        match self {
            Case::Fanout(k) | Case::Meeting(k) => k + 1,
            // The last peer is the visitor of the moment.
            Case::Visited(k) => k + 2,
            Case::Rooms => ROOMS * ROOM_SIZE,
        }
    }

    /// Copies forwarded of each published packet.
    fn copies(self) -> usize {
        match self {
            Case::Fanout(k) | Case::Meeting(k) | Case::Visited(k) => k,
            Case::Rooms => ROOM_SIZE - 1,
        }
    }

    /// Peers whose RTP is held and fed in the timed section.
    fn fed(self) -> Vec<usize> {
        match self {
            Case::Fanout(_) | Case::Meeting(_) | Case::Visited(_) => vec![PUBLISHER],
            Case::Rooms => (0..self.peers()).collect(),
        }
    }

    /// Peers that must receive video, and from how many publishers each.
    fn receivers(self) -> (std::ops::Range<usize>, usize) {
        match self {
            Case::Fanout(k) => (PUBLISHER + 1..k + 1, 1),
            Case::Meeting(k) => (PUBLISHER + 1..k + 1, k),
            // The first visitor's video too, before it leaves.
            Case::Visited(k) => (PUBLISHER + 1..k + 1, 2),
            Case::Rooms => (0..self.peers(), ROOM_SIZE - 1),
        }
    }

    fn peer_config(self, index: usize) -> PeerConfig {
        match self {
            Case::Visited(k) if index == k + 1 => PeerConfig {
                media: MediaConfig {
                    video_kbps: SLOW_VIDEO_KBPS,
                    ..MediaConfig::default()
                },
                message_log_capacity: 0,
                ..PeerConfig::new("bench", "visitor")
            },
            Case::Fanout(_) | Case::Meeting(_) | Case::Visited(_) => {
                let publisher = index == PUBLISHER;
                PeerConfig {
                    publish_audio: false,
                    publish_video: publisher || matches!(self, Case::Meeting(_)),
                    // A high rate gives many packets per frame, so a chunk spans little
                    // virtual time.
                    media: MediaConfig {
                        video_kbps: if publisher { 4_000 } else { SLOW_VIDEO_KBPS },
                        ..MediaConfig::default()
                    },
                    message_log_capacity: 0,
                    ..PeerConfig::new("bench", format!("user-{index}"))
                }
            }
            Case::Rooms => PeerConfig {
                message_log_capacity: 0,
                ..PeerConfig::new(
                    format!("room-{}", index / ROOM_SIZE),
                    format!("user-{index}"),
                )
            },
        }
    }
}

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
// The in-memory network (shared with the deterministic tests)

#[path = "../tests/sim/mod.rs"]
mod sim;

use sim::{Network, is_rtp};

/// The network of one case, plus the reused buffers of the timed section so it
/// allocates only what the SFU does.
struct Bench {
    case: Case,
    net: Network,
    feed: Vec<(SocketAddr, Vec<u8>)>,
    outbox: Vec<Transmit>,
}

impl Bench {
    fn new(case: Case) -> Self {
        let configs = (0..case.peers()).map(|i| case.peer_config(i)).collect();
        let mut net = Network::new(configs);
        let (receivers, streams) = case.receivers();
        net.run_until("every receiver gets all its video", |net| {
            receivers.clone().all(|i| {
                let stats = net.peers[i].stats();
                let live = stats
                    .tracks
                    .iter()
                    .filter(|t| t.kind == MediaKind::Video && t.received > 0);
                stats.subscriber_connected && live.count() == streams
            })
        });
        if let Case::Visited(k) = case {
            let visitor = k + 1;
            for visit in 0..VISITS {
                if visit > 0 {
                    net.replace(visitor, case.peer_config(visitor));
                }
                let id = |net: &Network| net.peers[visitor].peer_id().map(str::to_owned);
                let subscribers_have = |net: &Network, id: &str| {
                    (1..=k).all(|i| {
                        let msids = net.peers[i].stats().active_msids();
                        msids.iter().any(|(stream, _)| stream == id)
                    })
                };
                net.run_until("every subscriber is offered the visitor's tracks", |net| {
                    id(net).is_some_and(|id| subscribers_have(net, &id))
                });
                let gone = id(&net).expect("joined");
                net.peers[visitor].leave();
                net.run_until("the visitor's tracks are gone", |net| {
                    !subscribers_have(net, &gone)
                        && (1..=k).all(|i| net.peers[i].stats().active_msids().len() == 1)
                });
            }
            // Leaving closes the socket; only the visitors' own closes are expected.
            net.closed
                .retain(|&(peer, code)| (peer, code) != (visitor, 1000));
        }
        net.hold_rtp_of = case.fed();
        Self {
            case,
            net,
            feed: Vec::with_capacity(CHUNK),
            outbox: Vec::new(),
        }
    }

    /// Panics unless every client saw a clean session and every receiver got all the
    /// video it was sent, in order: the measured path did its whole job.
    fn assert_healthy(&self) {
        assert!(self.net.closed.is_empty(), "{:?}", self.net.closed);
        for (i, peer) in self.net.peers.iter().enumerate() {
            let stats = peer.stats();
            assert!(
                stats.violations.is_empty() && stats.errors.is_empty(),
                "client {i}: {:?} {:?}",
                stats.violations,
                stats.errors
            );
        }
        let (receivers, _) = self.case.receivers();
        for i in receivers {
            let stats = self.net.peers[i].stats();
            let videos = stats.tracks.iter().filter(|t| t.kind == MediaKind::Video);
            let mut seen = 0;
            for video in videos {
                seen += 1;
                assert_eq!(
                    (video.lost, video.duplicates, video.reordered),
                    (0, 0, 0),
                    "receiver {i}: {video:?}"
                );
            }
            assert!(seen > 0, "receiver {i} got no video");
        }
    }

    /// Runs the clock until at least `n` publisher datagrams are held.
    fn hold_publisher_rtp(&mut self, n: usize) {
        while self.net.held.len() < n {
            self.net.tick();
        }
    }

    /// Feeds `n` held datagrams to the SFU; only this is timed and counted.
    fn forward_held(&mut self, n: usize) -> Sample {
        self.feed.extend(self.net.held.drain(..n));
        self.outbox.reserve(n * self.case.copies() + BATCH);
        let sfu = &mut self.net.sfu;
        let forwarded_before = sfu.counters.forwarded_packets;
        let allocations_before = allocations();
        let start = Instant::now();
        feed_batches(sfu, self.net.now, &self.feed, &mut self.outbox);
        let elapsed = start.elapsed();
        let sample = Sample {
            elapsed,
            allocations: allocations() - allocations_before,
            published: n as u64,
            forwarded: sfu.counters.forwarded_packets - forwarded_before,
        };
        let encrypted = self.outbox.iter().filter(|t| is_rtp(&t.contents)).count();
        assert_eq!(
            (sample.forwarded, encrypted as u64),
            (
                sample.published * self.case.copies() as u64,
                sample.forwarded
            ),
            "every published packet must be written to, and sent by, every receiving leg"
        );
        self.feed.clear();
        let mut outbox = std::mem::take(&mut self.outbox);
        for t in outbox.drain(..) {
            self.net.deliver(t);
        }
        self.outbox = outbox;
        self.net.pump();
        sample
    }
}

/// The timed section, kept out of line so that callgrind can count just it:
/// `--toggle-collect='*feed_batches*'`, divided by the forwarded count the bench
/// prints, gives instructions per forwarded packet, which the host's noise leaves alone.
#[inline(never)]
fn feed_batches(
    sfu: &mut Sfu,
    now: Instant,
    feed: &[(SocketAddr, Vec<u8>)],
    outbox: &mut Vec<Transmit>,
) {
    for batch in feed.chunks(BATCH) {
        let batch = batch.iter().map(|(source, d)| (*source, d.as_slice()));
        sfu.handle_datagrams(now, batch);
        outbox.extend(sfu.transmits.drain());
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
fn run(net: &mut Bench, iters: u64, total: &mut Sample) -> Duration {
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

fn report(name: &str, s: &Sample) {
    println!(
        "forward/{name}: {:.2} allocations per forwarded packet ({ALLOCATION_SOURCES}); \
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

/// Runs one case if the command line's filter keeps it; returns its timed total.
fn case(group: &mut BenchmarkGroup<'_, WallTime>, case: Case) -> Option<Sample> {
    let name = case.name();
    // Built on first use, so a benchmark filtered out on the command line costs nothing.
    let mut net = None;
    let mut total = Sample::default();
    group.throughput(Throughput::Elements(case.copies() as u64));
    group.bench_function(BenchmarkId::from_parameter(&name), |b| {
        let net = net.get_or_insert_with(|| Bench::new(case));
        b.iter_custom(|iters| run(net, iters, &mut total));
    });
    let net = net?;
    net.assert_healthy();
    report(&name, &total);
    Some(total)
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let fanouts: Vec<(usize, Sample)> = FANOUTS
        .into_iter()
        .filter_map(|k| Some((k, case(&mut group, Case::Fanout(k))?)))
        .collect();
    let meetings: Vec<(usize, Sample)> = MEETINGS
        .into_iter()
        .filter_map(|k| Some((k, case(&mut group, Case::Meeting(k))?)))
        .collect();
    let visited = case(&mut group, Case::Visited(4));
    let rooms = case(&mut group, Case::Rooms);
    group.finish();
    if fanouts.len() > 1 {
        report_allocation_split(&fanouts);
    }
    let time = |s: &Sample| s.per_forwarded(s.elapsed.as_nanos() as f64);
    let fanout = |k: usize| fanouts.iter().find(|(fk, _)| *fk == k).map(|(_, s)| s);
    for (k, meeting) in &meetings {
        if let Some(single) = fanout(*k) {
            println!(
                "forward/K={k}: {:.2}x the time per forwarded packet with {k} streams per \
                 subscriber connection as with one",
                time(meeting) / time(single)
            );
        }
    }
    if let (Some(visited), Some(fresh)) = (visited, fanout(4)) {
        println!(
            "forward/K=4: {:.2}x the time per forwarded packet after {VISITS} visitors came \
             and went as before any",
            time(&visited) / time(fresh)
        );
    }
    if let (Some(rooms), Some(single)) = (rooms, fanout(ROOM_SIZE - 1)) {
        println!(
            "forward/rooms={ROOMS}: {:.2}x the time per forwarded packet of K={}, where a \
             batch shares one tick per subscriber connection",
            time(&rooms) / time(single),
            ROOM_SIZE - 1
        );
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
