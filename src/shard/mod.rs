//! The shard runtime: one glommio executor pinned per core, each owning one UDP socket
//! and one [`Sfu`]. Rooms are assigned to shards by [`shard_for`], so a room's peers,
//! their `Rtc`s and their packets never leave that core.
//!
//! Three tasks per shard share the `Sfu` through a `RefCell` (one thread, no locks):
//! - the UDP task awaits a datagram, drains the rest of the batch with `recvmmsg`
//!   (and, when that filled the batch, reads the socket's drop counter: overload),
//!   hands the batch to the `Sfu` and flushes;
//! - the mailbox task takes signaling from the accept shard, a bounded batch at a time;
//! - the timer task sleeps until the `Sfu`'s next str0m deadline.
//!
//! A fourth task, apart from the `Sfu`, answers the [`watchdog`], which interrupts a
//! shard that stops answering (glommio can put an executor to sleep with work to do).
//!
//! The UDP and timer tasks yield only when the executor's preempt timer says so, which
//! bounds how long the others (and, on shard 0, the accept loop) wait under load.
//!
//! "Flush" is the same after each: send the queued datagrams with `sendmmsg`, pass
//! signaling replies to the accept shard (what its mailbox has no room for waits, and
//! the timer task offers it again soon), publish counters, and wake the timer task if
//! the next deadline moved earlier.

pub mod mailbox;
pub mod messages;
pub mod watchdog;

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::{Either, select};
use futures::task::AtomicWaker;
use glommio::net::UdpSocket;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{Instrument, info_span, warn};

use crate::config::Config;
use crate::media::udp::{self, RecvBatch};
use crate::metrics::ShardMetrics;
use crate::sfu::{Limits, Sfu};
use mailbox::{Mailbox, MailboxSender, mailbox};
use messages::{ToAccept, ToShard};
use watchdog::Pulse;

/// Signaling messages a shard's mailbox holds before senders are refused.
pub const MAILBOX_CAPACITY: usize = 4096;
/// Bytes of SDP and other client text those messages may carry (without it, 4096
/// offers of `--max-message-size` could hold a gigabyte).
pub const MAILBOX_BYTES: usize = 64 << 20;
/// Messages one mailbox drain takes before yielding to the packet path.
const MAILBOX_BATCH: usize = 64;
/// The timer task's longest sleep when no `Rtc` has a deadline.
const IDLE_SLEEP: Duration = Duration::from_secs(1);
/// How soon replies the accept shard's mailbox had no room for are offered again.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);
/// Replies a shard keeps for the accept shard beyond its mailbox; past this (the
/// accept shard stalled for long) the newest are dropped and counted.
const BACKLOG_LIMIT: usize = 65_536;
/// How long one task runs before the executor polls io_uring and lets the others
/// run. Under load the UDP task always finds a datagram waiting and never parks, so
/// glommio's 100 ms default held signaling, WebSocket I/O and str0m's timers back
/// that long at every hop: joins near the knee took 250-500 ms.
const PREEMPT: Duration = Duration::from_millis(1);

/// What the rest of the server holds of a shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    pub mailbox: MailboxSender<ToShard>,
    pub metrics: Arc<ShardMetrics>,
    pub udp_addr: SocketAddr,
    pub pulse: Arc<Pulse>,
}

/// The shard owning a room: FNV-1a (64-bit) of the `sessionId` bytes, modulo the shard
/// count. Stable across versions and processes, so operators can predict placement.
pub fn shard_for(session_id: &str, shards: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = session_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % shards.max(1) as u64) as usize
}

/// A shard about to start: its socket is bound, so its address is known.
pub struct PreparedShard {
    pub handle: ShardHandle,
    socket: StdUdpSocket,
    inbox: Mailbox<ToShard>,
    core: Option<usize>,
}

/// Binds each shard's UDP socket and mailbox (so the caller learns the ports before
/// any executor runs).
pub fn prepare(config: &Config) -> std::io::Result<Vec<PreparedShard>> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    (0..config.shard_count())
        .map(|index| {
            let socket = StdUdpSocket::bind(config.udp_addr(index))?;
            udp::tune_socket(socket.as_raw_fd());
            let udp_addr = socket.local_addr()?;
            let (tx, inbox) = mailbox(MAILBOX_CAPACITY, MAILBOX_BYTES);
            Ok(PreparedShard {
                handle: ShardHandle {
                    index,
                    mailbox: tx,
                    metrics: Arc::new(ShardMetrics::default()),
                    udp_addr,
                    pulse: Arc::new(Pulse::default()),
                },
                socket,
                inbox,
                core: (!cores.is_empty()).then(|| cores[index % cores.len()].id),
            })
        })
        .collect()
}

/// Extra work a shard's executor runs beside its own tasks (the accept loop on
/// shard 0).
pub type Extra = Box<dyn FnOnce() + Send>;

/// Starts a prepared shard on its own pinned executor thread.
pub fn start(
    shard: PreparedShard,
    config: &Config,
    to_accept: MailboxSender<ToAccept>,
    extra: Option<Extra>,
) -> std::io::Result<glommio::ExecutorJoinHandle<()>> {
    let index = shard.handle.index;
    let port = shard.handle.udp_addr.port();
    let candidates: Vec<SocketAddr> = config
        .candidate_ips()
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    let limits = Limits::from_config(config);
    let ice_servers = config.ice_servers();
    let placement = shard.core.map_or(Placement::Unbound, Placement::Fixed);
    let metrics = shard.handle.metrics.clone();
    let pulse = shard.handle.pulse.clone();
    let fd = shard.socket.into_raw_fd();
    let inbox = shard.inbox;
    LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{index}"))
        .io_memory(1 << 20)
        .preempt_timer(PREEMPT)
        .spawn(move || async move {
            // SAFETY: `fd` came from a bound socket whose ownership moved here.
            let socket = unsafe { UdpSocket::from_raw_fd(fd) };
            let sfu = match Sfu::new(index, candidates, limits, ice_servers) {
                Ok(sfu) => sfu,
                Err(e) => {
                    warn!(shard = index, error = %e, "shard could not start");
                    return;
                }
            };
            if let Some(extra) = extra {
                extra();
            }
            let shard = Rc::new(Shard {
                sfu: RefCell::new(sfu),
                socket,
                to_accept,
                metrics,
                timer_wake: AtomicWaker::new(),
                timer_target: Cell::new(Instant::now() + IDLE_SLEEP),
            });
            let span = info_span!("shard", shard = index);
            let udp = glommio::spawn_local(shard.clone().udp_task().instrument(span.clone()));
            let timers = glommio::spawn_local(shard.clone().timer_task().instrument(span.clone()));
            let answers = glommio::spawn_local(async move { pulse.answer().await });
            shard.mailbox_task(inbox).instrument(span).await;
            drop((udp, timers, answers));
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
}

struct Shard {
    sfu: RefCell<Sfu>,
    socket: UdpSocket,
    to_accept: MailboxSender<ToAccept>,
    metrics: Arc<ShardMetrics>,
    /// Wakes the timer task when a new deadline is earlier than its sleep.
    timer_wake: AtomicWaker,
    timer_target: Cell<Instant>,
}

impl Shard {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    async fn udp_task(self: Rc<Self>) {
        let mut batch = RecvBatch::default();
        loop {
            let (len, source) = match self.socket.recv_from(batch.first_buf()).await {
                Ok(got) => got,
                Err(e) => {
                    // ICMP errors surface here on some kernels; they are not fatal.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            };
            batch.set_first(len, source);
            batch.drain_more(self.fd());
            {
                let now = Instant::now();
                let mut sfu = self.sfu.borrow_mut();
                if batch.is_full()
                    && let Some(drops) = udp::receive_drops(self.fd())
                {
                    sfu.socket_drops(now, drops);
                }
                sfu.handle_datagrams(now, batch.iter());
            }
            self.flush();
            glommio::yield_if_needed().await;
        }
    }

    async fn mailbox_task(self: Rc<Self>, inbox: Mailbox<ToShard>) {
        let mut batch = Vec::with_capacity(MAILBOX_BATCH);
        while inbox.recv_batch(&mut batch, MAILBOX_BATCH).await {
            for msg in batch.drain(..) {
                self.sfu.borrow_mut().handle_message(Instant::now(), msg);
            }
            self.flush();
            glommio::yield_if_needed().await;
        }
    }

    async fn timer_task(self: Rc<Self>) {
        loop {
            let now = Instant::now();
            let target = wake_at(&self.sfu.borrow(), now)
                .unwrap_or(now + IDLE_SLEEP)
                .min(now + IDLE_SLEEP);
            self.timer_target.set(target);
            if target > now {
                let woken = poll_fn(|cx| {
                    self.timer_wake.register(cx.waker());
                    if self.timer_target.get() < target {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                });
                let sleep = Timer::new(target - now);
                futures::pin_mut!(woken);
                if let Either::Right(_) = select(sleep, woken).await {
                    continue; // an earlier deadline appeared: recompute
                }
            }
            self.sfu.borrow_mut().handle_timeout(Instant::now());
            self.flush();
            // Deadlines that are always due must not keep packets and signaling out.
            glommio::yield_if_needed().await;
        }
    }

    fn flush(&self) {
        let mut sfu = self.sfu.borrow_mut();
        let (sent, _bytes) = sfu.transmits.flush(self.fd());
        sfu.counters.udp_tx_packets += sent;
        sfu.counters.udp_tx_dropped = sfu.transmits.dropped;
        self.to_accept.send_from(&mut sfu.to_accept);
        if sfu.to_accept.len() > BACKLOG_LIMIT {
            let dropped = sfu.to_accept.len() - BACKLOG_LIMIT;
            sfu.to_accept.truncate(BACKLOG_LIMIT);
            sfu.counters.signaling_dropped += dropped as u64;
            warn!(
                dropped,
                "accept shard not taking replies; signaling dropped"
            );
        }
        self.metrics.publish(&sfu.counters);
        if let Some(next) = wake_at(&sfu, Instant::now())
            && next < self.timer_target.get()
        {
            self.timer_target.set(next);
            self.timer_wake.wake();
        }
    }
}

/// `fut`'s output, or `None` if `limit` passed first (glommio's own `timeout` takes
/// only futures of its `Result`).
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures::pin_mut!(fut);
    match select(fut, Timer::new(limit)).await {
        Either::Left((done, _)) => Some(done),
        Either::Right(_) => None,
    }
}

/// When the timer task must run next: the earliest str0m deadline, or soon if
/// replies wait for room in the accept shard's mailbox.
fn wake_at(sfu: &Sfu, now: Instant) -> Option<Instant> {
    let retry = (!sfu.to_accept.is_empty()).then(|| now + BACKLOG_RETRY);
    sfu.next_deadline().into_iter().chain(retry).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies left waiting for the accept shard bring the timer task back within
    /// [`BACKLOG_RETRY`], even on a shard with no str0m deadline at all.
    #[test]
    fn waiting_replies_wake_the_timer_task_soon() {
        let limits = Limits {
            room_participants: 1,
            rooms: 1,
            tracks: 1,
        };
        let mut sfu = Sfu::new(
            0,
            vec![SocketAddr::from(([127, 0, 0, 1], 1))],
            limits,
            Vec::new(),
        )
        .expect("sfu");
        let now = Instant::now();
        assert_eq!(wake_at(&sfu, now), None);
        sfu.to_accept.push_back(ToAccept::Close {
            conn: 1,
            code: 1000,
            reason: "",
        });
        assert_eq!(wake_at(&sfu, now), Some(now + BACKLOG_RETRY));
    }

    #[test]
    fn shard_hash_is_stable_and_spreads() {
        // Pinned values: changing the hash would move rooms between deployments.
        assert_eq!(shard_for("", 7), (0xcbf2_9ce4_8422_2325_u64 % 7) as usize);
        assert_eq!(shard_for("room-1", 1), 0);
        let mut seen = [0_usize; 2];
        for i in 0..100 {
            seen[shard_for(&format!("room-{i}"), 2)] += 1;
        }
        assert!(seen[0] > 20 && seen[1] > 20, "{seen:?}");
    }
}
