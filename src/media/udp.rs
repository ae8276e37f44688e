//! All socket tricks in one place: batched receive (`recvmmsg`), batched send
//! (`sendmmsg`, with GSO for runs to one destination) on a shard's UDP socket, socket
//! buffer sizes, and interface discovery.
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

/// Most segments in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 before 6.x).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send (a UDP datagram's limit, with headroom).
const GSO_MAX_BYTES: usize = 60_000;
/// iovecs per `sendmmsg`: room for every message of a batch to carry a few segments.
const IOV_CAP: usize = 4 * BATCH;

/// Outgoing datagrams collected while handling a batch, sent with one `sendmmsg` per
/// `BATCH` messages.
///
/// A run of datagrams to one destination where all but the last have the same size
/// (a subscriber's share of a round: a video frame's packets, or audio from several
/// publishers) becomes one message with `UDP_SEGMENT` (GSO): the kernel walks its
/// stack once for the run and cuts it into datagrams at the end. quinn-udp does GSO
/// well but sends one destination per syscall; an SFU fans out to many destinations,
/// so both are combined here.
pub struct SendQueue {
    pending: Vec<Transmit>,
    /// Datagrams the kernel refused (socket buffer full); they are dropped.
    pub dropped: u64,
    /// Coalesce runs with GSO; turned off for good the first time the kernel refuses.
    gso: bool,
}

impl Default for SendQueue {
    fn default() -> Self {
        Self {
            pending: Vec::new(),
            dropped: 0,
            gso: true,
        }
    }
}

/// Control-message space for one `UDP_SEGMENT` value, aligned for `cmsghdr`.
type GsoControl = [u64; 4];

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
        let mut next = 0;
        while next < self.pending.len() {
            // SAFETY: all-zero is a valid value for these plain C structs.
            let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
            let mut iovs: [libc::iovec; IOV_CAP] = unsafe { zeroed() };
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            let mut controls: [GsoControl; BATCH] = [[0; 4]; BATCH];
            // Each message's first datagram and datagram count.
            let mut runs = [(0_usize, 0_usize); BATCH];
            let (mut count, mut iov_used) = (0, 0);
            while next < self.pending.len() && count < BATCH && iov_used < IOV_CAP {
                let rest = &self.pending[next..];
                let run = if self.gso {
                    gso_run(rest, IOV_CAP - iov_used)
                } else {
                    1
                };
                for (k, t) in rest[..run].iter().enumerate() {
                    iovs[iov_used + k] = libc::iovec {
                        iov_base: t.contents.as_ptr().cast_mut().cast(),
                        iov_len: t.contents.len(),
                    };
                }
                let hdr = &mut msgs[count].msg_hdr;
                hdr.msg_namelen = to_sockaddr(rest[0].destination, &mut names[count]);
                hdr.msg_name = (&raw mut names[count]).cast();
                hdr.msg_iov = &raw mut iovs[iov_used];
                hdr.msg_iovlen = run;
                if run > 1 {
                    set_segment_size(hdr, &mut controls[count], rest[0].contents.len());
                }
                runs[count] = (next, run);
                count += 1;
                iov_used += run;
                next += run;
            }
            let mut done = 0;
            while done < count {
                // SAFETY: the arrays outlive the call; iovecs point into `pending`,
                // which the kernel only reads.
                let n = unsafe {
                    libc::sendmmsg(
                        fd,
                        msgs.as_mut_ptr().add(done),
                        (count - done) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if let Ok(n @ 1..) = usize::try_from(n) {
                    for &(first, run) in &runs[done..done + n] {
                        for t in &self.pending[first..first + run] {
                            bytes += t.contents.len() as u64;
                        }
                        sent += run as u64;
                    }
                    done += n;
                    continue;
                }
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let (first, run) = runs[done];
                if run > 1 && gso_unsupported(&err) {
                    // No GSO on this path: resend from this run on, one by one.
                    self.gso = false;
                    next = first;
                    break;
                }
                // Full buffer or an unreachable destination: drop this message.
                self.dropped += run as u64;
                done += 1;
            }
        }
        self.pending.clear();
        (sent, bytes)
    }
}

/// How many datagrams from the start of `rest` one GSO message can carry: same
/// destination, the same size except a shorter last one, within the kernel's limits.
fn gso_run(rest: &[Transmit], iov_room: usize) -> usize {
    let first = &rest[0];
    let size = first.contents.len();
    let limit = GSO_MAX_SEGMENTS.min(iov_room);
    let (mut run, mut total) = (1, size);
    for t in &rest[1..] {
        let len = t.contents.len();
        if run == limit || t.destination != first.destination || len > size {
            break;
        }
        if total + len > GSO_MAX_BYTES {
            break;
        }
        run += 1;
        total += len;
        if len < size {
            break; // a shorter datagram can only be the last segment
        }
    }
    run
}

/// Attaches `UDP_SEGMENT = size` to a message.
fn set_segment_size(hdr: &mut libc::msghdr, control: &mut GsoControl, size: usize) {
    let value = size as u16;
    hdr.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    // SAFETY: `control` is aligned for cmsghdr and larger than CMSG_SPACE(2), so the
    // first header and its data lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), value);
    }
}

/// The errors a kernel or device without UDP GSO gives for a segmented send.
fn gso_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
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

    fn transmit(to: SocketAddr, fill: u8, len: usize) -> Transmit {
        Transmit {
            proto: str0m::net::Protocol::Udp,
            source: "127.0.0.1:1".parse().unwrap(),
            destination: to,
            contents: vec![fill; len].into(),
        }
    }

    #[test]
    fn gso_runs_arrive_as_separate_datagrams_in_order() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // To a: a run of three full segments and a short tail, then one after b's.
        let plan = [
            (to_a, 1, 1200),
            (to_a, 2, 1200),
            (to_a, 3, 1200),
            (to_a, 4, 700),
            (to_b, 5, 90),
            (to_b, 6, 90),
            (to_a, 7, 1200),
        ];
        assert_eq!(gso_run(&[transmit(to_a, 0, 10)], 1), 1);
        let mut queue = SendQueue::default();
        for &(to, fill, len) in &plan {
            queue.push(transmit(to, fill, len));
        }
        let runs: Vec<usize> = {
            let mut at = 0;
            std::iter::from_fn(|| {
                (at < queue.pending.len()).then(|| {
                    let run = gso_run(&queue.pending[at..], IOV_CAP);
                    at += run;
                    run
                })
            })
            .collect()
        };
        assert_eq!(runs, [4, 2, 1]);
        let total: usize = plan.iter().map(|p| p.2).sum();
        assert_eq!(queue.flush(tx.as_raw_fd()), (7, total as u64));
        assert!(queue.gso, "loopback takes GSO sends");
        // The same again without GSO, as on a path whose kernel refused it.
        queue.gso = false;
        for &(to, fill, len) in &plan {
            queue.push(transmit(to, fill, len));
        }
        assert_eq!(queue.flush(tx.as_raw_fd()), (7, total as u64));
        let mut buf = [0_u8; 2048];
        for rx in [&a, &b] {
            rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }
        for &(to, fill, len) in plan.iter().chain(&plan) {
            let rx = if to == to_a { &a } else { &b };
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!((n, buf[0], buf[n - 1]), (len, fill, fill));
        }
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
