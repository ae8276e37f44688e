//! This host's floor for forwarding one packet: the CPU that any SFU spends on each
//! datagram it sends, SRTP's AES-GCM over the datagram and a batched `sendmmsg`,
//! measured on the server's core with datagrams of the run's average size.
//!
//! A shared host's speed moves from one run to the next, and hosts differ, so a
//! server's CPU per packet alone compares poorly across runs. Its ratio to a floor
//! measured in the same run does not. The floor is measured after everyone left,
//! when the server is idle. On loopback the receiver's kernel work runs on the
//! sender's core, which the server's own figure includes as well.

use std::io;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
use serde::Serialize;

use crate::probe;

/// Datagrams per `sendmmsg`, as corelay sends them.
const BATCH: usize = 32;
/// An RTP header without extensions: SRTP's authenticated, unencrypted part.
const HEADER: usize = 12;
/// AES-GCM's tag.
const TAG: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Floor {
    /// Sender CPU per datagram.
    pub us_per_packet: f64,
    pub datagram_bytes: usize,
    /// The core it ran on, when the server's busiest thread was pinned to one.
    pub cpu: Option<usize>,
    /// Datagrams the receiver got, of those sent: a check that they went somewhere.
    pub delivered_pct: f64,
}

/// Sends `datagram_bytes`-sized SRTP-like datagrams to a receiver on `ip` for
/// `duration`, from a thread pinned to `cpu` (if given), and returns that thread's
/// CPU per datagram.
pub fn measure(
    ip: IpAddr,
    cpu: Option<usize>,
    datagram_bytes: usize,
    duration: Duration,
) -> io::Result<Floor> {
    let datagram_bytes = datagram_bytes.clamp(HEADER + TAG, 1500);
    let receiver = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    receiver.set_read_timeout(Some(Duration::from_millis(50)))?;
    let destination = receiver.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let drain = {
        let (stop, received) = (stop.clone(), received.clone());
        thread::Builder::new()
            .name("loadtest-floor-rx".into())
            .spawn(move || {
                let mut buf = [0_u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if receiver.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })?
    };
    let sender = thread::Builder::new()
        .name("loadtest-floor".into())
        .spawn(move || send_for(ip, destination, cpu, datagram_bytes, duration))?;
    let outcome = sender
        .join()
        .map_err(|_| io::Error::other("floor sender panicked"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    let (sent, cpu_seconds, pinned) = outcome?;
    if sent == 0 {
        return Err(io::Error::other("no datagram sent"));
    }
    Ok(Floor {
        us_per_packet: cpu_seconds * 1e6 / sent as f64,
        datagram_bytes,
        cpu: cpu.filter(|_| pinned),
        delivered_pct: received.load(Ordering::Relaxed) as f64 * 100.0 / sent as f64,
    })
}

/// The sender: (datagrams sent, its CPU seconds, whether it got pinned).
fn send_for(
    ip: IpAddr,
    destination: SocketAddr,
    cpu: Option<usize>,
    datagram_bytes: usize,
    duration: Duration,
) -> io::Result<(u64, f64, bool)> {
    let pinned = cpu.is_some_and(|id| core_affinity::set_for_current(core_affinity::CoreId { id }));
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    let key = UnboundKey::new(&AES_256_GCM, &[0x5a; 32])
        .map(LessSafeKey::new)
        .map_err(|_| io::Error::other("AES-256-GCM key"))?;
    let address = Some(SockaddrStorage::from(destination));
    let addresses = [address; BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut datagrams = vec![vec![0_u8; datagram_bytes]; BATCH];
    let mut counter = 0_u64;
    let mut sent = 0_u64;
    let start_cpu = probe::thread_times().map(|t| t.running_seconds);
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        for datagram in &mut datagrams {
            counter += 1;
            let (header, rest) = datagram.split_at_mut(HEADER);
            header[4..12].copy_from_slice(&counter.to_be_bytes());
            let (body, tag_out) = rest.split_at_mut(rest.len() - TAG);
            let mut nonce = [0_u8; NONCE_LEN];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&*header),
                    body,
                )
                .map_err(|_| io::Error::other("AES-256-GCM seal"))?;
            tag_out.copy_from_slice(tag.as_ref());
        }
        let slices: [[IoSlice; 1]; BATCH] = std::array::from_fn(|i| [IoSlice::new(&datagrams[i])]);
        let results = sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &slices,
            addresses,
            [] as [ControlMessage; 0],
            MsgFlags::empty(),
        )?;
        sent += results.count() as u64;
    }
    let end_cpu = probe::thread_times().map(|t| t.running_seconds);
    let cpu_seconds = match (start_cpu, end_cpu) {
        (Some(a), Some(b)) => b - a,
        _ => return Err(io::Error::other("no thread CPU time in /proc")),
    };
    Ok((sent, cpu_seconds, pinned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_what_sending_real_datagrams_costs() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let floor = measure(ip, None, 400, Duration::from_millis(100)).unwrap();
        assert!(floor.us_per_packet > 0.0 && floor.us_per_packet.is_finite());
        assert_eq!(floor.datagram_bytes, 400);
        assert_eq!(floor.cpu, None);
        // The receiver is not pinned and may fall behind, but it gets most of them.
        assert!(floor.delivered_pct > 10.0, "{floor:?}");
    }

    #[test]
    fn a_datagram_holds_at_least_a_header_and_a_tag() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let floor = measure(ip, Some(0), 1, Duration::from_millis(10)).unwrap();
        assert_eq!(floor.datagram_bytes, HEADER + TAG);
        assert_eq!(floor.cpu, Some(0));
    }
}
