//! An in-memory network around one shard's sans-IO [`Sfu`], with real str0m clients
//! (`corelay_loadtest::Peer`) and a virtual clock: quinn-style deterministic runs of
//! the packet path, for the forwarding benchmark and for tests that need time to pass
//! (ICE consent expiry) or packets to vanish (NACK recovery) without waiting for it.
//!
//! Signaling goes through `protocol::parse` into `ToShard` exactly as the accept shard
//! does; datagrams go straight into `Sfu::handle_datagrams`. Shared by `benches/` and
//! `tests/` through `#[path]`.

#![allow(dead_code)] // each user needs a different subset

use std::collections::{HashMap, VecDeque};
use std::iter;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corelay::media::admission::rtp_ssrc;
use corelay::metrics::{self, AcceptMetrics, ShardMetrics};
use corelay::sfu::{Limits, Sfu};
use corelay::shard::messages::{ConnId, ParticipantSnapshot, ToAccept, ToShard};
use corelay::signaling::protocol::{ClientMsg, error_text, parse};
use corelay_loadtest::{Leg, MediaKind, Peer, PeerConfig, TimeBase};
use futures::channel::oneshot;
use str0m::net::Transmit;

pub const SFU_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50_000);
/// Client legs live on 127.0.0.2, two consecutive ports per peer.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A leg that moved (`moved_addr`) keeps its port on this address.
const MOVED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const CLIENT_PORT_BASE: u16 = 10_000;
/// Smallest clock step, so a deadline in the past cannot stall the loop.
const MIN_STEP: Duration = Duration::from_millis(1);
/// Virtual time a `run_until` may take before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Room a shard keeps beside the peers for one scripted connection at a time.
const SCRIPTED_SEATS: usize = 1;

pub fn leg_addr(peer: usize, leg: Leg) -> SocketAddr {
    let offset = match leg {
        Leg::Publisher => 0,
        Leg::Subscriber => 1,
    };
    let port = CLIENT_PORT_BASE + 2 * u16::try_from(peer).expect("peer index") + offset;
    SocketAddr::from((CLIENT_IP, port))
}

/// Where `peer`'s leg is after a network change.
pub fn moved_addr(peer: usize, leg: Leg) -> SocketAddr {
    SocketAddr::from((MOVED_IP, leg_addr(peer, leg).port()))
}

/// The peer and leg `addr` belongs to.
fn leg_of(addr: SocketAddr) -> (usize, Leg) {
    assert!(
        addr.ip() == CLIENT_IP || addr.ip() == MOVED_IP,
        "datagram to an unknown host {addr}"
    );
    let n = addr.port() - CLIENT_PORT_BASE;
    let leg = if n.is_multiple_of(2) {
        Leg::Publisher
    } else {
        Leg::Subscriber
    };
    (usize::from(n / 2), leg)
}

/// RTP, as opposed to RTCP (RFC 5761 §4), STUN or DTLS (RFC 7983).
pub fn is_rtp(datagram: &[u8]) -> bool {
    rtp_ssrc(datagram).is_some()
}

/// The SFU, its clients, the clock they share, and what the network does to packets.
pub struct Network {
    pub now: Instant,
    pub sfu: Sfu,
    pub peers: Vec<Peer>,
    /// The peers whose RTP datagrams wait in `held` instead of reaching the SFU.
    pub hold_rtp_of: Vec<usize>,
    pub held: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Every datagram from this client address waits in `held` too.
    pub hold_all_from: Option<SocketAddr>,
    /// Client addresses gone from the network (a peer cut off, or moved away):
    /// datagrams from or to them are lost.
    pub gone: Vec<SocketAddr>,
    /// Every n-th RTP datagram to this peer's subscriber leg is lost.
    pub lose_rtp_to: Option<(usize, u64)>,
    rtp_to_lossy: u64,
    /// Every n-th RTP datagram from this peer's publisher leg is lost.
    pub lose_rtp_from: Option<(usize, u64)>,
    rtp_from_lossy: u64,
    /// RTP datagrams each peer's publisher leg sent, by SSRC (lost ones included).
    pub rtp_from: Vec<HashMap<u32, u64>>,
    /// The SFU's socket is overflowing: every tick, its drop counter goes up.
    pub socket_dropping: bool,
    socket_drops: u64,
    /// Close requests the SFU made: (peer, code).
    pub closed: Vec<(usize, u16)>,
    /// What the SFU sent scripted connections (`scripted_signal`), which no `Peer` reads.
    pub scripted: Vec<ToAccept>,
    /// Datagrams to and from this peer take this long each way (one peer, so a queue
    /// in sending order is also in arrival order).
    pub delay: Option<(usize, Duration)>,
    in_flight: VecDeque<(Instant, Flight)>,
    time_base: TimeBase,
}

/// A delayed datagram on its way.
enum Flight {
    ToSfu(SocketAddr, Vec<u8>),
    ToPeer(Transmit),
}

impl Network {
    /// One peer per config, about to join: the first `pump` (every `run_until` starts
    /// with one) delivers their joins, so a test can set up the network before.
    pub fn new(configs: Vec<PeerConfig>) -> Self {
        let now = Instant::now();
        let limits = Limits {
            room_participants: configs.len() + SCRIPTED_SEATS,
            rooms: configs.len() + SCRIPTED_SEATS,
            tracks: 4,
        };
        let sfu = Sfu::new(0, vec![SFU_ADDR], limits, Vec::new()).expect("sfu");
        let time_base = TimeBase::new(now, 1_000_000_000_000);
        let peers: Vec<Peer> = configs
            .into_iter()
            .enumerate()
            .map(|(i, config)| {
                let (publisher, subscriber) =
                    (leg_addr(i, Leg::Publisher), leg_addr(i, Leg::Subscriber));
                Peer::new(config, time_base, publisher, subscriber, now)
            })
            .collect();
        Self {
            now,
            sfu,
            gone: Vec::new(),
            rtp_from: vec![HashMap::new(); peers.len()],
            peers,
            hold_rtp_of: Vec::new(),
            held: VecDeque::new(),
            hold_all_from: None,
            lose_rtp_to: None,
            rtp_to_lossy: 0,
            lose_rtp_from: None,
            rtp_from_lossy: 0,
            socket_dropping: false,
            socket_drops: 0,
            closed: Vec::new(),
            scripted: Vec::new(),
            delay: None,
            in_flight: VecDeque::new(),
            time_base,
        }
    }

    /// A new participant in `peer`'s place (and on its addresses), about to join;
    /// the one before must have left.
    pub fn replace(&mut self, peer: usize, config: PeerConfig) {
        let (publisher, subscriber) = (
            leg_addr(peer, Leg::Publisher),
            leg_addr(peer, Leg::Subscriber),
        );
        self.peers[peer] = Peer::new(config, self.time_base, publisher, subscriber, self.now);
    }

    /// True when `peer`'s subscriber leg is connected and has received at least
    /// `min_packets` video packets of one track.
    pub fn receives_video(&self, peer: usize, min_packets: u64) -> bool {
        self.peers[peer].stats().subscriber_connected && self.video_received(peer) >= min_packets
    }

    /// Video packets `peer` received on its busiest video track.
    pub fn video_received(&self, peer: usize) -> u64 {
        self.peers[peer]
            .stats()
            .tracks
            .iter()
            .filter(|t| t.kind == MediaKind::Video)
            .map(|t| t.received)
            .max()
            .unwrap_or(0)
    }

    /// What the SFU's `/debug/rooms` shows of `peer`.
    pub fn participant(&mut self, peer: usize) -> ParticipantSnapshot {
        let (reply, mut answer) = oneshot::channel();
        self.sfu
            .handle_message(self.now, ToShard::Snapshot { reply });
        let peer_id = self.peers[peer].peer_id().expect("joined").to_owned();
        answer
            .try_recv()
            .ok()
            .flatten()
            .expect("the SFU answers a snapshot at once")
            .into_iter()
            .flat_map(|room| room.participants)
            .find(|p| p.peer_id == peer_id)
            .expect("the peer is in a room")
    }

    /// What the SFU's shard shows on `/metrics`.
    pub fn metrics(&self) -> String {
        let shard = Arc::new(ShardMetrics::default());
        shard.publish(&self.sfu.counters);
        metrics::render(&[shard], &[], &AcceptMetrics::default())
    }

    /// Runs the clock until `done` holds; fails after `RUN_LIMIT` of virtual time.
    pub fn run_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let limit = self.now + RUN_LIMIT;
        self.pump();
        while !done(self) {
            assert!(
                self.now < limit,
                "not reached '{what}' after {RUN_LIMIT:?} of virtual time"
            );
            self.tick();
        }
    }

    /// Advances the clock to the next deadline, fires what is due, and pumps.
    pub fn tick(&mut self) {
        let next = self
            .peers
            .iter()
            .map(Peer::poll_timeout)
            .chain(self.sfu.next_deadline())
            .chain(self.in_flight.front().map(|(at, _)| *at))
            .min()
            .expect("at least one deadline");
        self.now = next.max(self.now + MIN_STEP);
        self.sfu.handle_timeout(self.now);
        for peer in &mut self.peers {
            if peer.poll_timeout() <= self.now {
                peer.handle_timeout(self.now);
            }
        }
        if self.socket_dropping {
            self.socket_drops += 1;
            self.sfu.socket_drops(self.now, self.socket_drops);
        }
        while let Some((at, _)) = self.in_flight.front()
            && *at <= self.now
            && let Some((_, flight)) = self.in_flight.pop_front()
        {
            match flight {
                Flight::ToSfu(source, datagram) => self
                    .sfu
                    .handle_datagrams(self.now, iter::once((source, datagram.as_slice()))),
                Flight::ToPeer(t) => self.arrive(t),
            }
        }
        self.pump();
    }

    /// When a datagram sent now to or from `peer` arrives, if the path delays it.
    fn delayed(&self, peer: usize) -> Option<Instant> {
        let (delayed, by) = self.delay?;
        (delayed == peer).then_some(self.now + by)
    }

    /// Delivers signaling and datagrams both ways until nobody has anything to send.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.peers.len() {
                while let Some(text) = self.peers[i].poll_signal() {
                    self.signal_to_sfu(i, &text);
                    moved = true;
                }
                while let Some(t) = self.peers[i].poll_transmit() {
                    self.datagram_to_sfu(i, t.leg, t.contents);
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

    /// Stops holding datagrams and hands the held ones to the SFU, in order.
    pub fn release_held(&mut self) {
        self.hold_all_from = None;
        self.hold_rtp_of.clear();
        for (source, datagram) in std::mem::take(&mut self.held) {
            self.sfu
                .handle_datagrams(self.now, iter::once((source, datagram.as_slice())));
        }
    }

    fn signal_to_sfu(&mut self, peer: usize, text: &str) {
        if let Err(error) = self.accept_text(peer as ConnId, text) {
            panic!("bad client message {text}: {error}");
        }
    }

    /// A text frame from a connection the test drives itself, with a conn id past the
    /// peers'; replies collect in `scripted`. Not pumped.
    pub fn scripted_signal(&mut self, conn: ConnId, text: &str) {
        assert!(conn as usize >= self.peers.len(), "conn {conn} is a peer's");
        if let Err(error) = self.accept_text(conn, text) {
            self.scripted.push(ToAccept::Send { conn, text: error });
        }
    }

    /// What the accept shard does with a client's text frame; a message it refuses
    /// itself is an `Err` with the `error` it would send.
    fn accept_text(&mut self, conn: ConnId, text: &str) -> Result<(), String> {
        let request = parse(text).map_err(|(id, refusal)| error_text(&refusal, id.as_deref()))?;
        let request_id = request.request_id;
        let msg = match request.msg {
            ClientMsg::Join(join) => ToShard::Join {
                conn,
                request_id,
                join: Box::new(join),
            },
            ClientMsg::Signal(signal) => ToShard::Signal {
                conn,
                request_id,
                signal: Box::new(signal),
            },
            ClientMsg::Ping => return Ok(()),
        };
        self.sfu.handle_message(self.now, msg);
        Ok(())
    }

    fn datagram_to_sfu(&mut self, peer: usize, leg: Leg, contents: Vec<u8>) {
        let source = self.peers[peer].local_addr(leg);
        if self.gone.contains(&source) {
            return;
        }
        if let (true, Some(&[a, b, c, d])) = (
            is_rtp(&contents) && leg == Leg::Publisher,
            contents.get(8..12),
        ) {
            *self.rtp_from[peer]
                .entry(u32::from_be_bytes([a, b, c, d]))
                .or_default() += 1;
            if let Some((lossy, every)) = self.lose_rtp_from
                && lossy == peer
            {
                self.rtp_from_lossy += 1;
                if self.rtp_from_lossy.is_multiple_of(every) {
                    return;
                }
            }
        }
        if (self.hold_rtp_of.contains(&peer) && is_rtp(&contents))
            || self.hold_all_from == Some(source)
        {
            self.held.push_back((source, contents));
        } else if let Some(at) = self.delayed(peer) {
            self.in_flight
                .push_back((at, Flight::ToSfu(source, contents)));
        } else {
            self.sfu
                .handle_datagrams(self.now, iter::once((source, contents.as_slice())));
        }
    }

    fn reply_to_peer(&mut self, reply: ToAccept) {
        let (ToAccept::Send { conn, .. }
        | ToAccept::JoinRefused { conn, .. }
        | ToAccept::Close { conn, .. }) = reply;
        if conn as usize >= self.peers.len() {
            self.scripted.push(reply);
            return;
        }
        match reply {
            ToAccept::Send { conn, text } => {
                self.peers[conn as usize].handle_signal(&text, self.now)
            }
            ToAccept::Close { conn, code, .. } => self.closed.push((conn as usize, code)),
            refused => panic!("the SFU refused a client: {refused:?}"),
        }
    }

    /// Hands an SFU datagram to the client it is addressed to, unless the network
    /// loses it.
    pub fn deliver(&mut self, t: Transmit) {
        let (peer, leg) = leg_of(t.destination);
        if self.gone.contains(&t.destination) {
            return;
        }
        if let Some((lossy, every)) = self.lose_rtp_to
            && lossy == peer
            && leg == Leg::Subscriber
            && is_rtp(&t.contents)
        {
            self.rtp_to_lossy += 1;
            if self.rtp_to_lossy.is_multiple_of(every) {
                return;
            }
        }
        match self.delayed(peer) {
            Some(at) => self.in_flight.push_back((at, Flight::ToPeer(t))),
            None => self.arrive(t),
        }
    }

    fn arrive(&mut self, t: Transmit) {
        let (peer, leg) = leg_of(t.destination);
        self.peers[peer].handle_datagram(leg, t.source, &t.contents, self.now);
    }
}
