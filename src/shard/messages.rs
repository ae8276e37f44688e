//! Everything that crosses shards, one enum per direction. Media never appears here:
//! only signaling hand-off and admin snapshots.

use futures::channel::oneshot;
use serde::Serialize;

use super::mailbox::Weigh;
use crate::signaling::protocol::{Join, Signal};

/// Identifies one WebSocket connection server-wide (assigned by the accept shard).
pub type ConnId = u64;

/// Accept shard → room shard.
#[derive(Debug)]
pub enum ToShard {
    // Boxed: a bounded channel reserves a slot of the largest variant for each of its
    // `MAILBOX_CAPACITY` messages, so slots stay a few words each.
    Join {
        conn: ConnId,
        request_id: Option<String>,
        join: Box<Join>,
    },
    Signal {
        conn: ConnId,
        request_id: Option<String>,
        signal: Box<Signal>,
    },
    /// The socket closed without `leave`.
    Disconnect { conn: ConnId },
    /// `/debug/rooms` asks each shard for its rooms.
    Snapshot {
        reply: oneshot::Sender<Vec<RoomSnapshot>>,
    },
}

impl Weigh for ToShard {
    fn bytes(&self) -> usize {
        let id = |request_id: &Option<String>| request_id.as_ref().map_or(0, String::len);
        match self {
            Self::Join {
                request_id, join, ..
            } => {
                id(request_id)
                    + join.session_id.len()
                    + join.user_id.len()
                    + join.ticket.as_ref().map_or(0, String::len)
            }
            Self::Signal {
                request_id, signal, ..
            } => {
                id(request_id)
                    + match signal.as_ref() {
                        Signal::Offer { sdp } | Signal::Answer { sdp } => sdp.len(),
                        Signal::Candidate(c) => {
                            c.candidate.len() + c.sdp_mid.as_ref().map_or(0, String::len)
                        }
                        Signal::MediaState(_) | Signal::Leave => 0,
                    }
            }
            Self::Disconnect { .. } | Self::Snapshot { .. } => 0,
        }
    }
}

/// Room shard → accept shard. Text is already serialized JSON, made on the room shard.
#[derive(Debug)]
pub enum ToAccept {
    Send {
        conn: ConnId,
        text: String,
    },
    /// The join was refused; `text` is the `error`. The socket may join again.
    JoinRefused {
        conn: ConnId,
        text: String,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
}

impl Weigh for ToAccept {
    fn bytes(&self) -> usize {
        match self {
            Self::Send { text, .. } | Self::JoinRefused { text, .. } => text.len(),
            Self::Close { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomSnapshot {
    pub session_id: String,
    pub shard: usize,
    pub participants: Vec<ParticipantSnapshot>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantSnapshot {
    pub peer_id: String,
    pub user_id: String,
    pub tracks: Vec<TrackSnapshot>,
    pub publisher_connected: bool,
    pub subscriber_connected: bool,
    /// The subscriber connection's round trip, from the client's receiver reports.
    pub rtt_ms: Option<f64>,
    /// How long its video streams keep packets for NACKs (`media::resend`).
    pub resend_window_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackSnapshot {
    pub track_id: String,
    pub kind: &'static str,
    pub source: &'static str,
}
