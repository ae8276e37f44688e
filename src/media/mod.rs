//! Media building blocks the shard's packet path (`crate::sfu`) is made of: demuxing
//! datagrams to connections (`router`), per-subscriber rewriting (`forward`), str0m
//! configuration (`rtc`) and batched socket IO (`udp`).

pub mod forward;
pub mod router;
pub mod rtc;
pub mod udp;
