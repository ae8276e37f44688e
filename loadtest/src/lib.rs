//! Synthetic WebRTC clients for corelay, built on str0m, and the load harness.
//!
//! Two users: the server's integration tests (a few [`Client`]s in one process,
//! blocking API, threads) and the load harness ([`run`]: many participants per
//! thread, cheap). Both run the same sans-IO [`Peer`], which speaks the signaling
//! protocol of `/work/shared/PROTOCOL.md`, publishes synthetic Opus-sized audio and
//! VP8 video through a publisher connection, and measures what arrives on its
//! subscriber connection (loss, duplicates, reordering, latency) from a stamp every
//! packet carries.
//!
//! - [`protocol`]: the signaling messages.
//! - [`peer`]: the participant state machine (sans-IO).
//! - [`media`] and [`payload`]: what is sent, and how packets are stamped.
//! - [`sdp`]: reading the server's SDP as written on the wire.
//! - [`stats`]: loss/duplicate/reorder tracking and percentiles.
//! - [`client`]: the threaded driver for tests.
//! - [`tls`]: `wss://` through a balancer that terminates TLS.
//! - [`janus`]: the same participant speaking Janus's VideoRoom API (`--target janus`).
//! - [`scenario`], [`run()`], [`report`], [`html`], [`probe`]: the load harness (the
//!   `corelay-loadtest` binary is a thin CLI over them); `worker` is its event loop,
//!   and [`floor`] measures what one packet costs any SFU on the server's core.

pub mod client;
pub mod floor;
pub mod html;
pub mod janus;
pub mod media;
pub mod payload;
pub mod peer;
pub mod probe;
pub mod protocol;
pub mod report;
mod run;
pub mod scenario;
pub mod sdp;
pub mod stats;
pub mod tls;
mod worker;

pub use client::{Client, ClientConfig, Error};
pub use media::MediaConfig;
pub use peer::{
    ClientStats, Leg, Milestones, Peer, PeerConfig, RxTotals, SessionState, TimeBase, TrackStats,
    Transmit,
};
pub use protocol::ClientMessage;
pub use report::{Report, Sample};
pub use run::run;
pub use scenario::{Preset, Scenario, Target};
pub use str0m::media::MediaKind;
