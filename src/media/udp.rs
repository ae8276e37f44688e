//! All socket tricks in one place: batched receive (`recvmmsg`) and batched send
//! (`sendmmsg`) on a shard's UDP socket, socket buffer sizes, and interface discovery.
//!
//! The shard awaits the first datagram of a batch through glommio (so an idle shard
//! sleeps in io_uring), then drains whatever else is queued without blocking. Sends
//! never block either: a full socket buffer drops the datagram, as the network would.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use str0m::net::Transmit;

/// Largest datagram we accept; WebRTC stays under 1500 bytes.
pub const MAX_DATAGRAM: usize = 2048;
/// Datagrams handled per batch: one `recvmmsg`, one round of str0m ticks.
pub const BATCH: usize = 32;
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Receive buffers for one batch, allocated once per shard.
pub struct RecvBatch {
    bufs: Box<[[u8; MAX_DATAGRAM]; BATCH]>,
    sources: [SocketAddr; BATCH],
    lens: [usize; BATCH],
    len: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: Box::new([[0; MAX_DATAGRAM]; BATCH]),
            sources: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            lens: [0; BATCH],
            len: 0,
        }
    }
}

impl RecvBatch {
    /// The buffer the awaited first datagram is read into.
    pub fn first_buf(&mut self) -> &mut [u8] {
        self.len = 0;
        &mut self.bufs[0]
    }

    pub fn set_first(&mut self, len: usize, source: SocketAddr) {
        self.lens[0] = len;
        self.sources[0] = source;
        self.len = 1;
    }

    /// The socket had at least a batch queued: it may have filled up.
    pub fn is_full(&self) -> bool {
        self.len == BATCH
    }

    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        (0..self.len).map(|i| (self.sources[i], &self.bufs[i][..self.lens[i]]))
    }

    /// Appends whatever is already queued on `fd`, without waiting.
    pub fn drain_more(&mut self, fd: RawFd) {
        let room = BATCH - self.len;
        if room == 0 {
            return;
        }
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..room {
            let slot = self.len + i;
            iovs[i] = libc::iovec {
                iov_base: self.bufs[slot].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            msgs[i].msg_hdr.msg_name = (&raw mut names[i]).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            msgs[i].msg_hdr.msg_iov = &raw mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer refers to a live local or to `self.bufs`, sized as declared.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                room as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        for i in 0..usize::try_from(n).unwrap_or(0) {
            if let Some(source) = from_sockaddr(&names[i]) {
                let slot = self.len;
                self.lens[slot] = msgs[i].msg_len as usize;
                self.sources[slot] = source;
                self.len += 1;
            }
        }
    }
}

/// Outgoing datagrams collected while handling a batch, sent with one `sendmmsg`
/// per `BATCH`.
#[derive(Default)]
pub struct SendQueue {
    pending: Vec<Transmit>,
    /// Datagrams the kernel refused (socket buffer full); they are dropped.
    pub dropped: u64,
}

impl SendQueue {
    pub fn push(&mut self, t: Transmit) {
        self.pending.push(t);
    }

    /// Takes the queued datagrams without a socket: for in-memory drivers (the
    /// benchmark) that deliver them themselves.
    pub fn drain(&mut self) -> impl Iterator<Item = Transmit> + '_ {
        self.pending.drain(..)
    }

    /// Sends everything queued; returns (datagrams, bytes) handed to the kernel.
    pub fn flush(&mut self, fd: RawFd) -> (u64, u64) {
        let (mut sent, mut bytes) = (0_u64, 0_u64);
        for chunk in self.pending.chunks(BATCH) {
            // SAFETY: all-zero is a valid value for these plain C structs.
            let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
            let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            for (i, t) in chunk.iter().enumerate() {
                let name_len = to_sockaddr(t.destination, &mut names[i]);
                iovs[i] = libc::iovec {
                    iov_base: t.contents.as_ptr().cast_mut().cast(),
                    iov_len: t.contents.len(),
                };
                msgs[i].msg_hdr.msg_name = (&raw mut names[i]).cast();
                msgs[i].msg_hdr.msg_namelen = name_len;
                msgs[i].msg_hdr.msg_iov = &raw mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            let mut done = 0;
            while done < chunk.len() {
                // SAFETY: the arrays outlive the call; iovecs point into `chunk`, which
                // the kernel only reads.
                let n = unsafe {
                    libc::sendmmsg(
                        fd,
                        msgs.as_mut_ptr().add(done),
                        (chunk.len() - done) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                match usize::try_from(n) {
                    Ok(n) if n > 0 => {
                        for t in &chunk[done..done + n] {
                            bytes += t.contents.len() as u64;
                        }
                        sent += n as u64;
                        done += n;
                    }
                    _ => {
                        let err = io::Error::last_os_error();
                        if err.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        // Full buffer or an unreachable destination: skip this datagram.
                        self.dropped += 1;
                        done += 1;
                    }
                }
            }
        }
        self.pending.clear();
        (sent, bytes)
    }
}

/// Larger kernel buffers absorb bursts (a keyframe fanned out to a room).
pub fn tune_socket(fd: RawFd) {
    let size: libc::c_int = SOCKET_BUFFER;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: plain setsockopt with a correctly sized int; failure only leaves the default.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
    }
}

/// Datagrams the kernel dropped because the socket's receive buffer was full.
pub fn receive_drops(fd: RawFd) -> Option<u64> {
    // The kernel fills as much of its `SK_MEMINFO_*` array as fits: up to the drops.
    const WANTED: usize = libc::SK_MEMINFO_DROPS as usize + 1;
    let mut info = [0_u32; WANTED];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    if usize::try_from(len).ok()? < size_of_val(&info) {
        return None; // a kernel too old to count drops
    }
    Some(u64::from(info[WANTED - 1]))
}

fn to_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = u32::from_ne_bytes(sin.sin_addr.s_addr.to_ne_bytes()).to_ne_bytes();
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip.into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Every address of every interface that is up.
pub fn interface_ips() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&raw mut head) != 0 {
            return ips;
        }
        let mut cur = head;
        while let Some(ifa) = cur.as_ref() {
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            if up && let Some(addr) = ifa.ifa_addr.as_ref() {
                let family = i32::from(addr.sa_family);
                if family == libc::AF_INET || family == libc::AF_INET6 {
                    let storage: &libc::sockaddr_storage = &*(ifa.ifa_addr.cast());
                    if let Some(sa) = from_sockaddr(storage) {
                        ips.push(sa.ip());
                    }
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn sockaddr_round_trip() {
        for text in ["127.0.0.1:5000", "[::1]:6000", "[fe80::1%2]:7"] {
            let addr: SocketAddr = text.parse().unwrap();
            // SAFETY: zeroed sockaddr_storage is valid.
            let mut storage = unsafe { zeroed() };
            to_sockaddr(addr, &mut storage);
            assert_eq!(from_sockaddr(&storage), Some(addr));
        }
    }

    #[test]
    fn receive_drops_counts_what_a_full_buffer_lost() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(receive_drops(rx.as_raw_fd()), Some(0));
        // The default receive buffer holds a few hundred kilobytes at most.
        for _ in 0..2_000 {
            tx.send_to(&[0; 1_000], rx.local_addr().unwrap()).unwrap();
        }
        assert!(receive_drops(rx.as_raw_fd()).is_some_and(|d| d > 0));
    }

    #[test]
    fn drain_more_reads_what_is_queued() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..3_u8 {
            tx.send_to(&[i; 10], rx.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::default();
        let n = rx.recv(batch.first_buf()).unwrap();
        batch.set_first(n, tx.local_addr().unwrap());
        // The two others are already queued on loopback once send_to returned.
        batch.drain_more(rx.as_raw_fd());
        let got: Vec<(SocketAddr, Vec<u8>)> = batch.iter().map(|(a, b)| (a, b.to_vec())).collect();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(a, _)| *a == tx.local_addr().unwrap()));
        assert_eq!(got[2].1, vec![2; 10]);
    }
}
