//! Room state: who is in a room, what each participant publishes, and what each one
//! receives. Plain data (and how a leg's `Rtc` is driven); the behaviour lives in
//! `signaling.rs` and `media.rs`.

use std::net::SocketAddr;
use std::time::Instant;

use hashbrown::HashMap;
use str0m::change::SdpPendingOffer;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid};
use str0m::net::Receive;
use str0m::rtp::Ssrc;
use str0m::{Candidate, Input, Rtc, RtcError};
use tracing::Span;

use crate::media::admission::Admission;
use crate::media::forward::Rewriter;
use crate::media::keyframe::KeyframeRequests;
use crate::media::resend::ResendWindow;
use crate::media::rtc::{Panicked, contained};
use crate::media::speaking::SpeakingDetector;
use crate::shard::messages::ConnId;
use crate::signaling::protocol::MediaState;

/// A published track, identified room-wide by its publisher and its publisher-side mid.
pub type TrackKey = (ConnId, Mid);

/// Client candidate addresses one connection may give. str0m keeps every candidate
/// with a new address for the connection's life; a browser gathers a few per network
/// interface (host, server-reflexive, relayed).
pub const MAX_CANDIDATES: usize = 32;
/// Longest candidate line: RFC 8839's fields fit in far less (a foundation is at most
/// 32 characters), and str0m keeps what it is given.
pub const MAX_CANDIDATE_LEN: usize = 512;

pub struct Room {
    pub session_id: String,
    /// Join order, so `peer_joined` replays arrive in the order people came.
    pub members: Vec<ConnId>,
}

/// One side of a participant: its own str0m `Rtc`, ICE credentials and timer.
pub struct Leg {
    pub rtc: Rtc,
    pub ufrag: String,
    /// The timer queued for this leg (the earliest deadline str0m asked for since
    /// the last one fired).
    pub scheduled: Option<Instant>,
    pub connected: bool,
    /// Written to in this round, so queued for its end-of-round tick (see `Sfu::touch`).
    pub touched: bool,
    /// Addresses of the client's candidates handed to str0m (`MAX_CANDIDATES`).
    pub candidates: Vec<SocketAddr>,
    /// What the client's datagrams may still do (`media::admission`).
    pub admission: Admission,
    /// str0m panicked on this `Rtc`: nothing more goes in, and the participant goes
    /// at the end of the round.
    pub poisoned: bool,
}

impl Leg {
    /// Feeds a datagram (str0m ticks to `now` on every datagram, before anything
    /// this round writes).
    pub fn receive(&mut self, now: Instant, datagram: Receive) -> Result<(), LegError> {
        self.guarded(|rtc| rtc.handle_input(Input::Receive(now, datagram)))
    }

    /// Admits the client's candidates (trickled, or in an SDP) unless one is too long
    /// or they would bring the connection past `MAX_CANDIDATES` addresses; says
    /// which, if not.
    pub fn admit_candidates<'a>(
        &mut self,
        candidates: impl IntoIterator<Item = &'a Candidate>,
    ) -> Result<(), String> {
        let before = self.candidates.len();
        for c in candidates {
            let len = c.to_sdp_string().len();
            let admitted = if len > MAX_CANDIDATE_LEN {
                Err(format!(
                    "a candidate of {len} bytes (at most {MAX_CANDIDATE_LEN})"
                ))
            } else if self.candidates.contains(&c.addr()) {
                Ok(())
            } else if self.candidates.len() == MAX_CANDIDATES {
                Err(format!(
                    "more than {MAX_CANDIDATES} candidate addresses on one connection"
                ))
            } else {
                self.candidates.push(c.addr());
                Ok(())
            };
            if let Err(e) = admitted {
                self.candidates.truncate(before);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Ticks the `Rtc`: for a deadline that came due, and after writes, which str0m
    /// sends only from a tick.
    pub fn tick(&mut self, now: Instant) -> Result<(), LegError> {
        self.guarded(|rtc| rtc.handle_input(Input::Timeout(now)))
    }

    /// Runs `f` on the `Rtc` unless it is poisoned, poisoning it if str0m panics.
    pub fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Rtc) -> Result<T, RtcError>,
    ) -> Result<T, LegError> {
        if self.poisoned {
            return Err(LegError::Poisoned);
        }
        let rtc = &mut self.rtc;
        // The error is boxed inside: what crosses the unwind boundary is copied on
        // every call, and an `RtcError` is hundreds of bytes.
        match contained(|| f(rtc).map_err(|e| LegError::Rtc(Box::new(e)))) {
            Ok(result) => result,
            Err(Panicked) => {
                self.poisoned = true;
                Err(LegError::Panicked)
            }
        }
    }
}

/// Why a leg's `Rtc` did not take an input.
#[derive(Debug)]
pub enum LegError {
    /// str0m refused it; after a datagram that is routine, otherwise fatal.
    Rtc(Box<RtcError>),
    /// str0m panicked: the `Rtc` is not to be used again.
    Panicked,
    /// It had panicked before (and its participant is already on its way out).
    Poisoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Mic,
    Camera,
    Screen,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mic => "mic",
            Source::Camera => "camera",
            Source::Screen => "screen",
        }
    }
}

pub fn kind_str(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    }
}

pub struct PublishedTrack {
    pub track_id: String,
    pub kind: MediaKind,
    pub source: Source,
    /// Subscribers with an answered offer for this track: the fan-out list.
    pub fanout: Vec<ConnId>,
    /// What the last payload type seen means: saves a codec lookup per packet.
    pub last_payload: Option<Payload>,
    /// What str0m was last told about NACKs for this track's stream (by SSRC): paused
    /// or not, so the packet path only touches the stream when that changes.
    pub nacks_paused: Option<(Ssrc, bool)>,
    /// Keyframe requests sent to the publisher on subscribers' behalf.
    pub keyframe_requests: KeyframeRequests,
    /// Voice activity of an audio track, from its packets' audio level.
    pub speaking: SpeakingDetector,
}

/// A publisher payload type, as forwarding needs it.
#[derive(Debug, Clone, Copy)]
pub struct Payload {
    pub pt: u8,
    pub codec: Codec,
    /// A resend payload type was negotiated, so str0m NACKs this stream's losses.
    pub resends: bool,
}

/// What one participant receives of one published track.
pub struct Subscription {
    pub mid: Mid,
    /// The subscriber stream's SSRC: str0m finds a stream by SSRC in a hash map, but
    /// by mid only by scanning all of the connection's streams, once per packet.
    pub ssrc: Ssrc,
    pub rewriter: Rewriter,
}

/// The subscriber connection's offer/answer state: one offer outstanding at a time.
#[derive(Default)]
pub struct Negotiation {
    pub pending: Option<PendingOffer>,
    /// Tracks came or went since the outstanding offer: offer again after its answer.
    pub dirty: bool,
    /// Subscriber mids whose track went away, to be set inactive in the next offer.
    pub retired: Vec<Mid>,
}

pub struct PendingOffer {
    pub offer: SdpPendingOffer,
    pub added: Vec<(TrackKey, Mid)>,
}

pub struct Participant {
    pub peer_id: String,
    pub user_id: String,
    pub session_id: String,
    pub state: MediaState,
    pub publisher: Leg,
    pub subscriber: Leg,
    pub tracks: HashMap<Mid, PublishedTrack>,
    pub subscriptions: HashMap<TrackKey, Subscription>,
    /// Subscriber-side mid → the track it carries, for keyframe requests.
    pub subscribed_mids: HashMap<Mid, TrackKey>,
    pub negotiation: Negotiation,
    /// How long the subscriber connection's video streams keep packets for NACKs.
    pub resend: ResendWindow,
    /// `peer{shard, room, peer}`: entered for whatever is logged about this
    /// participant (and for a panic in its signaling), never per packet.
    pub span: Span,
}

impl Participant {
    pub fn leg_mut(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::Publisher => &mut self.publisher,
            Side::Subscriber => &mut self.subscriber,
        }
    }
}

/// Which of a participant's two connections a datagram or timer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Publisher,
    Subscriber,
}

/// The router's key: a participant and one of its two connections.
pub type LegKey = (ConnId, Side);
