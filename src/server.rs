//! Start-up: bind every socket first (so the ports are known and a bind failure is
//! reported before anything runs), then start one executor per shard. Shard 0's
//! executor also runs the accept side: the HTTP listener and the hub that routes
//! shard replies to WebSocket sessions.
//!
//! A watchdog thread watches the shards (`shard::watchdog`).
//!
//! A shard never stops on its own. If one does (a panic, or a failed start), the
//! server is no longer whole: its rooms are gone, joins hashed to it fail, and if it
//! was shard 0 nothing accepts connections. So `wait` returns at the first shard to
//! stop, and `main` exits with a failure for the service manager to restart it.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;

use glommio::net::TcpListener;
use tracing::info;

use crate::config::Config;
use crate::metrics::AcceptMetrics;
use crate::shard::mailbox::mailbox;
use crate::shard::watchdog::{self, Watched};
use crate::shard::{self, Extra};
use crate::signaling::Hub;

/// Replies from all shards waiting for the accept shard, and the bytes of JSON they
/// may hold (what does not fit waits on its shard).
const ACCEPT_MAILBOX: usize = 65_536;
const ACCEPT_MAILBOX_BYTES: usize = 256 << 20;

pub struct Server {
    pub http_addr: SocketAddr,
    pub udp_addrs: Vec<SocketAddr>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    pub fn start(config: Config) -> std::io::Result<Self> {
        let prepared = shard::prepare(&config)?;
        let handles: Vec<_> = prepared.iter().map(|p| p.handle.clone()).collect();
        let listener = StdTcpListener::bind(config.http_addr())?;
        let http_addr = listener.local_addr()?;
        let (to_accept, accept_inbox) = mailbox(ACCEPT_MAILBOX, ACCEPT_MAILBOX_BYTES);

        let accept_config = config.clone();
        let accept_handles = handles.clone();
        let listener_fd = listener.into_raw_fd();
        let mut accept: Option<Extra> = Some(Box::new(move || {
            // SAFETY: the fd is a bound listener whose ownership moved into this closure.
            let listener = unsafe { TcpListener::from_raw_fd(listener_fd) };
            let metrics = Arc::new(AcceptMetrics::default());
            let hub = Rc::new(Hub::new(
                accept_config,
                accept_handles,
                metrics,
                http_addr.port(),
            ));
            glommio::spawn_local(hub.clone().dispatch(accept_inbox)).detach();
            glommio::spawn_local(crate::http::serve(listener, hub)).detach();
        }));

        let mut executors = Vec::with_capacity(prepared.len());
        for shard in prepared {
            executors.push(shard::start(
                shard,
                &config,
                to_accept.clone(),
                accept.take(),
            )?);
        }
        let watched: Vec<_> = handles
            .iter()
            .zip(&executors)
            .map(|(handle, executor)| Watched {
                pulse: Arc::downgrade(&handle.pulse),
                thread: executor.thread().name().unwrap_or_default().to_owned(),
            })
            .collect();
        watchdog::spawn(watched)?;
        let udp_addrs = handles.iter().map(|h| h.udp_addr).collect();
        info!(%http_addr, ?udp_addrs, candidates = ?config.candidate_ips(), "corelay started");
        Ok(Self {
            http_addr,
            udp_addrs,
            executors,
        })
    }

    /// Blocks until a shard stops; returns its index and whether it panicked.
    pub fn wait(self) -> Option<(usize, bool)> {
        let joins = self
            .executors
            .into_iter()
            .map(|executor| move || executor.join());
        first_to_end(joins).map(|(shard, ended)| (shard, ended.is_err()))
    }
}

/// Runs each blocking `join` on a thread of its own and returns the first to end,
/// with its index (`None` if there were none).
fn first_to_end<R: Send + 'static>(
    joins: impl IntoIterator<Item = impl FnOnce() -> R + Send + 'static>,
) -> Option<(usize, R)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    for (index, join) in joins.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((index, join()));
        });
    }
    drop(tx);
    rx.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::first_to_end;

    #[test]
    fn the_first_shard_to_stop_is_reported_with_how() {
        let (_hold, held) = crossbeam_channel::bounded::<()>(0);
        let running = move || held.recv().is_ok();
        let panicking = || std::thread::spawn(|| panic!("a shard bug")).join().is_ok();
        let joins: Vec<Box<dyn FnOnce() -> bool + Send>> =
            vec![Box::new(running), Box::new(panicking)];
        assert_eq!(first_to_end(joins), Some((1, false)));
    }
}
