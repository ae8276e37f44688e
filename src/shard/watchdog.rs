//! Shard liveness, and the wake-up for an executor that went to sleep with work to do.
//!
//! glommio 0.9 can park an executor while one of its task queues is still runnable
//! (fixed upstream after 0.9: glommio/glommio#53). If its preempt timer fires between
//! the I/O poll that armed it and the first look at the task queues, the executor
//! reads "preempted before running anything" as "nothing to run" and sleeps in
//! `io_uring_enter`. The tasks it did not run are the ones that would have armed the
//! next accept, receive or timer, so no completion comes to wake it: every room on the
//! shard goes silent, and on shard 0 no connection is accepted. It hits busy 2-core
//! machines: CI saw it twice, and servers started ten at a time on this one stuck for
//! good in 2 starts of 2,000 (their rings held no accept and no timer, and one write to
//! the executor's eventfd, or a debugger's attach, set it going again).
//!
//! So a watchdog thread rings each shard's [`Pulse`] every [`PERIOD`], and a shard that
//! leaves [`KICK_RINGS`] rings unanswered has its thread interrupted with a signal: the
//! `EINTR` returns it from `io_uring_enter`, and glommio looks at its queues again. (A
//! ring alone is not enough: the stall can come before the shard's first task ran, so
//! before anything registered a waker the watchdog could wake.) A shard still silent
//! after [`STALL`] (a task that never yields, say) is reported in `/health`, the log
//! and metrics.

use std::future::poll_fn;
use std::sync::Weak;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::task::Poll;
use std::time::Duration;

use futures::task::AtomicWaker;
use tracing::{info, warn};

/// How often each shard is rung.
const PERIOD: Duration = Duration::from_millis(50);
/// Unanswered rings after which the shard's thread is interrupted (and again every
/// [`STALL`] while it stays silent): a stall of glommio's lasts about this many
/// periods, or up to [`STALL`] if it comes before the shard's first answer.
const KICK_RINGS: u64 = 2;
/// How long a shard may leave its rings unanswered before it is reported stalled.
const STALL: Duration = Duration::from_secs(1);
const STALL_RINGS: u64 = (STALL.as_millis() / PERIOD.as_millis()) as u64;
/// The signal that interrupts a shard's thread; its handler does nothing.
const KICK: libc::c_int = libc::SIGURG;

/// One shard's side of the watchdog. The shard writes only `answered`; the watchdog
/// thread the rest.
#[derive(Default)]
pub struct Pulse {
    rung: AtomicU64,
    answered: AtomicU64,
    bell: AtomicWaker,
    stalled: AtomicBool,
    stalls: AtomicU64,
    kicks: AtomicU64,
}

impl Pulse {
    /// The shard's task: answers every ring, whenever the executor runs it.
    pub async fn answer(&self) {
        poll_fn(|cx| {
            self.bell.register(cx.waker());
            self.answered.store(self.rung.load(Relaxed), Relaxed);
            Poll::<()>::Pending
        })
        .await;
    }

    /// Rings the shard has left unanswered.
    fn lag(&self) -> u64 {
        self.rung
            .load(Relaxed)
            .saturating_sub(self.answered.load(Relaxed))
    }

    /// Whether the shard had answered nothing for [`STALL`] at the last round.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Acquire)
    }

    /// Times the shard was reported stalled (counted before `stalled` is set).
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Relaxed)
    }

    /// Times the shard's thread was interrupted for not answering.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Relaxed)
    }

    fn ring(&self) {
        self.rung.fetch_add(1, Relaxed);
        self.bell.wake();
    }
}

/// A shard as the watchdog sees it: its pulse (weak, so the watchdog ends with the
/// shards), and its executor's thread name.
pub struct Watched {
    pub pulse: Weak<Pulse>,
    pub thread: String,
}

/// Starts the watchdog thread; it ends once every pulse is dropped (every shard gone).
pub fn spawn(shards: Vec<Watched>) -> std::io::Result<()> {
    install_kick_handler()?;
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            while round(&shards) {
                std::thread::sleep(PERIOD);
            }
        })
        .map(drop)
}

/// Interrupts the shards that stopped answering, marks those that have stalled or
/// recovered since the last round (saying so in the log, once), then rings them all.
/// `false` once no shard is left.
fn round(shards: &[Watched]) -> bool {
    let mut alive = false;
    for (shard, Watched { pulse, thread }) in shards.iter().enumerate() {
        let Some(pulse) = pulse.upgrade() else {
            continue;
        };
        alive = true;
        let lag = pulse.lag();
        // One that has never answered may still be starting (under load that takes
        // longer than a kick's wait): it has until STALL.
        let kick_at = if pulse.answered.load(Relaxed) == 0 {
            STALL_RINGS
        } else {
            KICK_RINGS
        };
        if lag == kick_at || (lag > kick_at && lag % STALL_RINGS == 0) {
            let threads = kick(thread);
            pulse.kicks.fetch_add(1, Relaxed);
            if lag == kick_at {
                info!(
                    shard,
                    threads, "shard not answering: interrupting its thread"
                );
            }
        }
        let stalled = lag >= STALL_RINGS;
        if stalled != pulse.stalled() {
            if stalled {
                pulse.stalls.fetch_add(1, Relaxed);
                warn!(
                    shard,
                    "shard stalled: no answer to the watchdog for {STALL:?}"
                );
            } else {
                info!(shard, "shard answers the watchdog again");
            }
            pulse.stalled.store(stalled, Release);
        }
        pulse.ring();
    }
    alive
}

/// Sends [`KICK`] to every thread of this process named `name`: the executor, and
/// glommio's helper thread beside it, whose wait simply resumes. Returns how many.
fn kick(name: &str) -> usize {
    // The kernel keeps the first 15 bytes of a thread's name.
    let name = name.get(..15).unwrap_or(name);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let pid = std::process::id() as libc::pid_t;
    tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid: &libc::pid_t| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        // SAFETY: `tgkill` touches no memory; the signal's handler does nothing.
        .filter(|&tid| unsafe { libc::tgkill(pid, tid, KICK) } == 0)
        .count()
}

extern "C" fn kicked(_: libc::c_int) {}

/// A handler that does nothing, so [`KICK`] interrupts a blocking call (which the
/// default action, ignoring it, would not). `SA_RESTART` resumes other calls.
fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: the action is fully initialised, and its handler is async-signal-safe.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = kicked as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(KICK, &action, std::ptr::null_mut())
    };
    if installed == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::Context;

    /// The watchdog's view of one shard whose thread it cannot find.
    fn watched(pulse: &Arc<Pulse>) -> [Watched; 1] {
        [Watched {
            pulse: Arc::downgrade(pulse),
            thread: "no-such-thread".to_owned(),
        }]
    }

    /// Runs the shard's side once, as its executor would after a ring.
    fn answer(pulse: &Pulse) {
        let waker = futures::task::noop_waker();
        let answering = pin!(pulse.answer());
        assert!(
            answering
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
    }

    #[test]
    fn a_silent_shard_is_interrupted_then_reported_and_recovers() {
        let pulse = Arc::new(Pulse::default());
        let shards = watched(&pulse);
        assert!(round(&shards));
        answer(&pulse);
        for _ in 0..=KICK_RINGS {
            assert!(round(&shards));
        }
        assert_eq!((pulse.kicks(), pulse.stalled()), (1, false));
        for _ in KICK_RINGS..STALL_RINGS {
            round(&shards);
        }
        assert_eq!(
            (pulse.kicks(), pulse.stalled(), pulse.stalls()),
            (2, true, 1)
        );

        answer(&pulse);
        round(&shards);
        assert_eq!((pulse.stalled(), pulse.stalls()), (false, 1));
        for _ in 0..STALL_RINGS {
            answer(&pulse);
            round(&shards);
        }
        assert_eq!(
            (pulse.kicks(), pulse.stalls()),
            (2, 1),
            "an answering shard is left alone"
        );

        drop(pulse);
        assert!(!round(&shards), "the watchdog ends with its shards");
    }

    #[test]
    fn a_shard_that_has_not_answered_yet_has_until_the_stall_limit() {
        let pulse = Arc::new(Pulse::default());
        let shards = watched(&pulse);
        for _ in 0..STALL_RINGS {
            round(&shards);
        }
        assert_eq!((pulse.kicks(), pulse.stalled()), (0, false));
        round(&shards);
        assert_eq!((pulse.kicks(), pulse.stalled()), (1, true));
    }
}
