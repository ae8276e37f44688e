//! One shard's SFU, sans IO: datagrams, signaling messages and instants go in;
//! datagrams, signaling replies and the next deadline come out. The shard runtime
//! (`crate::shard`) owns the socket and the clock and calls the three entry points:
//!
//! - [`Sfu::handle_datagrams`]: a receive batch (the packet path, `media.rs`),
//! - [`Sfu::handle_message`]: signaling handed over from the accept shard (`signaling.rs`),
//! - [`Sfu::handle_timeout`]: str0m timers that came due.
//!
//! After each, the runtime sends [`Sfu::transmits`], forwards [`Sfu::to_accept`] and
//! sleeps until [`Sfu::next_deadline`]. Rooms, participants and every str0m `Rtc`
//! live here and nowhere else; nothing is shared with other cores.

mod media;
pub mod room;
mod signaling;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use hashbrown::HashMap;
use str0m::rtp::RtpPacket;
use str0m::{Event, Output};
use tracing::{Span, debug, info, warn};

use crate::config::{Config, IceServer};
use crate::media::keyframe::Need;
use crate::media::overload::Overload;
use crate::media::router::Router;
use crate::media::rtc::RtcFactory;
use crate::media::udp::SendQueue;
use crate::metrics::Counters;
use crate::shard::messages::{ConnId, ToAccept};
use room::{LegError, LegKey, Participant, Room, Side};

/// Limits that keep one shard's memory bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub room_participants: usize,
    pub rooms: usize,
    /// Published tracks per participant (mic, camera, screen and its audio).
    pub tracks: usize,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            room_participants: config.max_room_participants,
            rooms: config.max_rooms_per_shard,
            tracks: 4,
        }
    }
}

pub struct Sfu {
    shard: usize,
    factory: RtcFactory,
    /// This shard's candidate addresses; the first of a datagram's family is the
    /// destination str0m sees (it matches datagrams to local candidates).
    local_addrs: Vec<SocketAddr>,
    limits: Limits,
    ice_servers: Vec<IceServer>,
    rooms: HashMap<String, Room>,
    peers: HashMap<ConnId, Participant>,
    router: Router<LegKey>,
    overload: Overload,
    /// str0m deadlines; an entry is stale when its leg's `scheduled` differs.
    timers: BinaryHeap<Reverse<(Instant, LegKey)>>,
    /// The timers one `handle_timeout` takes (reused, never shrunk).
    due: Vec<(Instant, LegKey)>,
    /// RTP packets a publisher produced, waiting to fan out (reused, never shrunk).
    forward_queue: Vec<(ConnId, RtpPacket)>,
    /// Non-media events, handled after the packet path.
    events: Vec<(LegKey, Event)>,
    /// Legs written to in this round; each is ticked and drained once at its end.
    touched: Vec<LegKey>,
    /// Participants whose `Rtc` failed; removed at the end of the round.
    doomed: Vec<(ConnId, &'static str)>,
    /// Subscribers that may need a new offer, made at the end of the round.
    offers_due: Vec<ConnId>,
    /// Datagrams to send; the runtime flushes them.
    pub transmits: SendQueue,
    /// Signaling to hand back to the accept shard, oldest first. What its mailbox has
    /// no room for waits here: a lost reply (an `offer`, a `Close`) would leave the
    /// client and the room disagreeing for good.
    pub to_accept: VecDeque<ToAccept>,
    pub counters: Counters,
}

impl Sfu {
    pub fn new(
        shard: usize,
        local_addrs: Vec<SocketAddr>,
        limits: Limits,
        ice_servers: Vec<IceServer>,
    ) -> Result<Self, String> {
        Ok(Self {
            shard,
            factory: RtcFactory::new(&local_addrs)?,
            local_addrs,
            limits,
            ice_servers,
            rooms: HashMap::new(),
            peers: HashMap::new(),
            router: Router::default(),
            overload: Overload::default(),
            timers: BinaryHeap::new(),
            due: Vec::new(),
            forward_queue: Vec::with_capacity(256),
            events: Vec::new(),
            touched: Vec::with_capacity(256),
            doomed: Vec::new(),
            offers_due: Vec::new(),
            transmits: SendQueue::default(),
            to_accept: VecDeque::new(),
            counters: Counters::default(),
        })
    }

    /// Drives every leg whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Take what is due first, then tick it. str0m clamps a timeout to the time of
        // its last input, so a leg may ask for `now` again right after this tick; it
        // waits for the next call and a later `now`, rather than spinning here on a
        // clock that does not move.
        let mut due = std::mem::take(&mut self.due);
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((at, key));
        }
        for (at, key) in due.drain(..) {
            let Some(p) = self.peers.get_mut(&key.0) else {
                continue;
            };
            let leg = p.leg_mut(key.1);
            if leg.scheduled != Some(at) {
                continue; // superseded by an earlier deadline
            }
            leg.scheduled = None;
            if let Err(e) = leg.tick(now) {
                self.leg_failed(key.0, &e);
                continue;
            }
            self.drain(key);
        }
        self.due = due;
        let recovered = self.overload.settle(now);
        self.overload_changed(recovered);
        self.finish_round(now);
    }

    /// The socket's drop counter, read by the runtime after a full receive batch.
    pub fn socket_drops(&mut self, now: Instant, total: u64) {
        self.counters.udp_rx_dropped = total;
        let changed = self.overload.drops(now, total);
        self.overload_changed(changed);
    }

    fn overload_changed(&mut self, state: Option<bool>) {
        let Some(overloaded) = state else {
            return;
        };
        self.counters.overloaded = u64::from(overloaded);
        if overloaded {
            self.counters.overloads += 1;
            warn!(
                shard = self.shard,
                "socket dropping datagrams: NACKs to publishers paused"
            );
        } else {
            info!(
                shard = self.shard,
                "socket caught up: NACKs to publishers resumed"
            );
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Empties one leg's str0m outputs, as str0m requires after every input.
    /// Media events queue for fan-out; other events queue for `finish_round`.
    fn drain(&mut self, key: LegKey) {
        let Some(p) = self.peers.get_mut(&key.0) else {
            return;
        };
        let leg = p.leg_mut(key.1);
        // The whole drain is guarded once: guarding each output would move every
        // event (a 400-byte `RtpPacket`, say) through the unwind boundary.
        let drained = leg.guarded(|rtc| {
            loop {
                match rtc.poll_output()? {
                    Output::Transmit(t) => self.transmits.push(t),
                    Output::Timeout(at) => break Ok(at),
                    Output::Event(Event::RtpPacket(packet)) => {
                        self.forward_queue.push((key.0, packet));
                    }
                    Output::Event(event) => self.events.push((key, event)),
                }
            }
        });
        match drained {
            // One live entry per leg: a later deadline waits for the entry already
            // queued (an early tick is harmless to str0m), so the heap does not grow
            // with every packet.
            Ok(at) if leg.scheduled.is_none_or(|queued| at < queued) => {
                leg.scheduled = Some(at);
                self.timers.push(Reverse((at, key)));
            }
            Ok(_) => {}
            Err(e) => self.leg_failed(key.0, &e),
        }
    }

    /// A leg's `Rtc` failed: its participant goes at the end of the round.
    fn leg_failed(&mut self, conn: ConnId, e: &LegError) {
        let span = self.span_of(conn);
        let _enter = span.enter();
        let why = match e {
            LegError::Rtc(e) => {
                debug!(error = %e, "rtc failed");
                "rtc error"
            }
            LegError::Panicked => {
                warn!("str0m panicked; dropping the participant");
                self.counters.str0m_panics += 1;
                "str0m panicked"
            }
            LegError::Poisoned => return,
        };
        self.doomed.push((conn, why));
    }

    /// The participant's span, for logging about it from shard-wide code.
    fn span_of(&self, conn: ConnId) -> Span {
        self.peers
            .get(&conn)
            .map_or_else(Span::none, |p| p.span.clone())
    }

    /// str0m panicked somewhere in handling `conn`'s signaling: neither of its
    /// `Rtc`s is used again, and it goes at the end of the round.
    fn poison(&mut self, conn: ConnId) {
        if let Some(p) = self.peers.get_mut(&conn) {
            p.publisher.poisoned = true;
            p.subscriber.poisoned = true;
        }
        self.leg_failed(conn, &LegError::Panicked);
    }

    fn touch(&mut self, key: LegKey) {
        let Some(p) = self.peers.get_mut(&key.0) else {
            return;
        };
        let leg = p.leg_mut(key.1);
        if !leg.touched {
            leg.touched = true;
            self.touched.push(key);
        }
    }

    /// Completes a round of input: fans out queued media, ticks and drains every leg
    /// written to, handles the remaining events, and removes failed participants.
    fn finish_round(&mut self, now: Instant) {
        loop {
            self.forward_all(now);
            let mut touched = std::mem::take(&mut self.touched);
            for key in touched.drain(..) {
                if let Some(p) = self.peers.get_mut(&key.0) {
                    let leg = p.leg_mut(key.1);
                    leg.touched = false;
                    if let Err(e) = leg.tick(now) {
                        self.leg_failed(key.0, &e);
                        continue;
                    }
                }
                self.drain(key);
            }
            // Keep the allocation for the next round.
            if self.touched.is_empty() {
                self.touched = touched;
            }
            let events = std::mem::take(&mut self.events);
            for (key, event) in events {
                self.handle_event(now, key, event);
            }
            for (conn, why) in std::mem::take(&mut self.doomed) {
                if !self.peers.contains_key(&conn) {
                    continue; // doomed twice in one round
                }
                self.counters.forced_disconnect += 1;
                self.remove_participant(now, conn, why);
                self.to_accept.push_back(ToAccept::Close {
                    conn,
                    code: 1011,
                    reason: "media connection failed",
                });
            }
            for conn in std::mem::take(&mut self.offers_due) {
                self.renegotiate(conn);
            }
            if self.forward_queue.is_empty()
                && self.touched.is_empty()
                && self.events.is_empty()
                && self.offers_due.is_empty()
            {
                break;
            }
        }
        // Stale entries come only from deadlines moving earlier; if they ever pile up,
        // rebuild from the live ones so the heap stays bounded by the legs.
        if self.timers.len() > 4 * self.peers.len() + 1024 {
            self.timers = self
                .peers
                .iter()
                .flat_map(|(conn, p)| {
                    [
                        (Side::Publisher, &p.publisher),
                        (Side::Subscriber, &p.subscriber),
                    ]
                    .into_iter()
                    .filter_map(move |(side, leg)| Some(Reverse((leg.scheduled?, (*conn, side)))))
                })
                .collect();
        }
        self.counters.active_rooms = self.rooms.len() as u64;
        self.counters.active_participants = self.peers.len() as u64;
    }

    fn handle_event(&mut self, now: Instant, key: LegKey, event: Event) {
        match (key.1, event) {
            (side, Event::Connected) => {
                if let Some(p) = self.peers.get_mut(&key.0) {
                    p.leg_mut(side).connected = true;
                }
                if side == Side::Subscriber {
                    self.request_keyframes_for(now, key.0);
                }
            }
            (_, Event::IceConnectionStateChange(str0m::IceConnectionState::Disconnected)) => {
                // ICE consent expired: the client is gone without a word.
                self.doomed.push((key.0, "ice disconnected"));
            }
            (_, Event::Closed) => {
                // A DTLS close_notify: the client closed the connection (`pc.close()`,
                // or its tab closing). A closed `Rtc` never reports ICE again, so
                // without this the participant would stay in its room.
                self.doomed.push((key.0, "connection closed by client"));
            }
            (Side::Publisher, Event::MediaAdded(added)) => {
                self.track_added(key.0, added.mid, added.kind);
            }
            (Side::Publisher, Event::MediaChanged(changed)) => {
                if changed.direction.is_receiving() {
                    // A slot set inactive earlier and now sending again.
                    let kind = self
                        .peers
                        .get(&key.0)
                        .and_then(|p| p.publisher.rtc.media(changed.mid))
                        .map(|m| m.kind());
                    if let Some(kind) = kind {
                        self.track_added(key.0, changed.mid, kind);
                    }
                } else {
                    self.track_removed(now, (key.0, changed.mid));
                }
            }
            (Side::Subscriber, Event::KeyframeRequest(req)) => {
                let track = self
                    .peers
                    .get(&key.0)
                    .and_then(|p| p.subscribed_mids.get(&req.mid).copied());
                if let Some(track) = track {
                    self.request_keyframe(now, track, Need::Repair);
                }
            }
            (Side::Subscriber, Event::MediaEgressStats(stats)) => {
                if let Some(rtt) = stats.rtt {
                    self.subscriber_rtt(key.0, rtt);
                }
            }
            _ => {}
        }
    }
}
