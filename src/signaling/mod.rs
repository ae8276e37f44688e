//! Signaling on the accept shard: the wire format (`protocol`), one task per WebSocket
//! (`session`), and the [`Hub`] that routes replies coming back from room shards to
//! the right socket.
//!
//! A session parses and validates every message itself, answers `ping` and anything
//! malformed locally, and hands the rest to the shard owning the room. Shards answer
//! through one mailbox; the hub's dispatcher moves each reply into the connection's own
//! bounded queue. A connection that does not read its replies fast enough is closed
//! rather than buffered without limit.

pub mod protocol;
pub mod session;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::mpsc;
use hashbrown::HashMap;

use crate::config::Config;
use crate::metrics::AcceptMetrics;
use crate::sfu::Limits;
use crate::shard::ShardHandle;
use crate::shard::mailbox::Mailbox;
use crate::shard::messages::{ConnId, ToAccept};

/// Replies one connection may have queued, beyond a join's replay, before it counts
/// as too slow.
const OUTBOUND_QUEUE: usize = 256;

/// What a session receives from its room shard.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    JoinRefused(String),
    Close(u16, &'static str),
}

pub struct Hub {
    pub config: Config,
    pub shards: Vec<ShardHandle>,
    pub metrics: Arc<AcceptMetrics>,
    /// The HTTP port actually bound (for the default Origin allow-list).
    pub port: u16,
    conns: RefCell<HashMap<ConnId, mpsc::Sender<Outbound>>>,
    next_conn: Cell<ConnId>,
    /// Each connection's queue: [`OUTBOUND_QUEUE`] plus the longest join replay
    /// (`joined`, then a `peer_joined` and a `track_published` per track for each
    /// participant of a full room), which arrives all at once.
    queue: usize,
}

impl Hub {
    pub fn new(
        config: Config,
        shards: Vec<ShardHandle>,
        metrics: Arc<AcceptMetrics>,
        port: u16,
    ) -> Self {
        let limits = Limits::from_config(&config);
        Self {
            queue: OUTBOUND_QUEUE + 1 + limits.room_participants * (1 + limits.tracks),
            config,
            shards,
            metrics,
            port,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
        }
    }

    fn register(&self) -> (ConnId, mpsc::Receiver<Outbound>) {
        let conn = self.next_conn.get();
        self.next_conn.set(conn + 1);
        let (tx, rx) = mpsc::channel(self.queue);
        self.conns.borrow_mut().insert(conn, tx);
        (conn, rx)
    }

    fn unregister(&self, conn: ConnId) {
        self.conns.borrow_mut().remove(&conn);
    }

    /// Routes shard replies to sessions until every shard is gone.
    pub async fn dispatch(self: Rc<Self>, inbox: Mailbox<ToAccept>) {
        let mut batch = Vec::with_capacity(256);
        while inbox.recv_batch(&mut batch, 256).await {
            self.route(&mut batch);
            glommio::yield_if_needed().await;
        }
    }

    fn route(&self, batch: &mut Vec<ToAccept>) {
        let mut conns = self.conns.borrow_mut();
        for msg in batch.drain(..) {
            let (conn, out) = match msg {
                ToAccept::Send { conn, text } => (conn, Outbound::Text(text)),
                ToAccept::JoinRefused { conn, text } => (conn, Outbound::JoinRefused(text)),
                ToAccept::Close { conn, code, reason } => (conn, Outbound::Close(code, reason)),
            };
            let Some(tx) = conns.get_mut(&conn) else {
                continue; // the socket is already gone
            };
            if tx.try_send(out).is_err() {
                // Too slow (or gone): dropping the sender ends the session's queue,
                // and the session closes the socket.
                conns.remove(&conn);
            }
        }
    }
}
