//! corelay: a thread-per-core WebRTC SFU.
//!
//! # How the pieces fit
//!
//! ```text
//!  browser ──WebSocket──▶ accept shard (shard 0's executor)
//!                          http/       HTTP, upgrade, demo page, metrics
//!                          signaling/  parse + validate, per-socket session, hub
//!                              │ ToShard (crossbeam mailbox + doorbell)
//!                              ▼                      ▲ ToAccept
//!                          shard k (pinned executor, one per core)
//!                          shard/      runtime: UDP, mailbox and timer tasks
//!                          sfu/        rooms, negotiation, the packet path (sans IO)
//!                          media/      router, rewrite, keyframes, str0m + DTLS config, UDP
//!  browser ◀──UDP (SRTP)──▶ shard k's socket: udp_port_base + k
//! ```
//!
//! A room lives on the shard [`shard::shard_for`] picks from its `sessionId`. Everything
//! about it (participants, their two str0m `Rtc`s, packets) stays on that core. Only
//! signaling crosses cores, as the messages in [`shard::messages`].

pub mod config;
pub mod http;
pub mod media;
pub mod metrics;
pub mod server;
pub mod sfu;
pub mod shard;
pub mod signaling;
