//! Synthetic WebRTC clients for corelay, built on str0m.
//!
//! Two users: the server's integration tests (a few [`Client`]s in one process,
//! blocking API, threads) and the load harness (many participants, cheap). Both run
//! the same sans-IO [`Peer`], which speaks the signaling protocol of
//! `/work/shared/PROTOCOL.md`, publishes synthetic Opus-sized audio and VP8 video
//! through a publisher connection, and measures what arrives on its subscriber
//! connection (loss, duplicates, reordering, latency) from a stamp every packet
//! carries.
//!
//! - [`protocol`]: the signaling messages.
//! - [`peer`]: the participant state machine (sans-IO).
//! - [`media`] and [`payload`]: what is sent, and how packets are stamped.
//! - [`sdp`]: reading the server's SDP as written on the wire.
//! - [`stats`]: loss/duplicate/reorder tracking and percentiles.
//! - [`client`]: the threaded driver for tests.

pub mod client;
pub mod media;
pub mod payload;
pub mod peer;
pub mod protocol;
pub mod sdp;
pub mod stats;

pub use client::{Client, ClientConfig, Error};
pub use media::MediaConfig;
pub use peer::{ClientStats, Leg, Peer, PeerConfig, SessionState, TimeBase, TrackStats, Transmit};
pub use protocol::ClientMessage;
pub use str0m::media::MediaKind;
