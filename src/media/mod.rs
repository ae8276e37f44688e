//! Media building blocks the shard's packet path (`crate::sfu`) is made of: demuxing
//! datagrams to connections (`router`), per-subscriber rewriting (`forward`), voice
//! activity (`speaking`), when to ask for keyframes (`keyframe`), how long to keep
//! packets for NACKs (`resend`), how many RTP streams and datagrams a second a client
//! may send (`admission`), str0m configuration (`rtc`), batched socket IO (`udp`) and
//! telling when the shard is behind its socket (`overload`).

pub mod admission;
pub mod dtls;
pub mod forward;
pub mod keyframe;
pub mod overload;
pub mod resend;
pub mod router;
pub mod rtc;
pub mod speaking;
pub mod udp;
