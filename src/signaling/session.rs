//! One WebSocket connection on the accept shard: read, validate, rate-limit, and either
//! answer locally or hand the message to the room's shard; write whatever the shard
//! sends back. When the socket ends without `leave`, the shard is told so the
//! participant leaves the room at once.

use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures::future::ready;
use futures::{Stream, StreamExt, stream};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use tracing::{Instrument, debug, info_span};

use super::protocol::{self, ClientMsg, ErrorCode, Refusal, Request, ServerMsg};
use super::{Hub, Outbound};
use crate::shard::mailbox::{MailboxSender, TrySendError};
use crate::shard::messages::{ConnId, ToShard};
use crate::shard::{shard_for, within};

/// How long a closing session waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a session that ended waits before offering its `Disconnect` again to a
/// full shard mailbox.
const MAILBOX_RETRY: Duration = Duration::from_millis(5);
/// How long one write to the client may take. A client that stops reading fills its
/// TCP window and the write waits; past this the socket is dropped and the participant
/// leaves, instead of the session (and its slot) waiting forever.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

enum Event {
    Client(Result<Message, WsError>),
    Shard(Outbound),
    /// The hub dropped our queue: we did not keep up with our replies.
    Overflow,
    /// `--join-timeout` after opening; the socket must be in a room by then.
    JoinDeadline,
    /// Every `--ping-interval`: ping the client, or close if it has gone quiet.
    Keepalive,
}

/// Token bucket: `rate` messages per second, bursts up to twice that.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where this socket's room lives once it has sent `join`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Joined {
    No,
    Shard(usize),
}

pub async fn run(ws: WebSocketStream<TcpStream>, hub: Rc<Hub>, room_hint: Option<String>) {
    let (conn, replies) = hub.register();
    let span = info_span!("session", conn, room = room_hint.as_deref().unwrap_or(""));
    Session {
        hub: hub.clone(),
        conn,
        room_hint,
        joined: Joined::No,
        limit: RateLimit::new(hub.config.message_rate),
    }
    .serve(ws, replies)
    .instrument(span)
    .await;
    hub.unregister(conn);
}

struct Session {
    hub: Rc<Hub>,
    conn: ConnId,
    room_hint: Option<String>,
    joined: Joined,
    limit: RateLimit,
}

impl Session {
    async fn serve(
        mut self,
        ws: WebSocketStream<TcpStream>,
        replies: futures::channel::mpsc::Receiver<Outbound>,
    ) {
        let (mut sink, client) = ws.split();
        let shard_events = replies
            .map(Event::Shard)
            .chain(stream::once(futures::future::ready(Event::Overflow)));
        let events = stream::select(
            client.map(Event::Client),
            stream::select(shard_events, self.timers()),
        );
        futures::pin_mut!(events);
        let mut last_heard = Instant::now();
        let mut closed_by_server = false;
        // The client stopped reading: nothing more can be written to it.
        let mut stalled = false;
        // The close frame we answer with, if the server ends the session.
        let mut closing = None;
        while let Some(event) = events.next().await {
            if let Event::Client(Ok(_)) = event {
                last_heard = Instant::now();
            }
            let reply = match event {
                Event::Client(Ok(Message::Text(text))) => {
                    self.on_text(text.as_str()).map(Message::text)
                }
                Event::Client(Ok(Message::Binary(_))) => {
                    closing = Some(close(
                        CloseCode::Unsupported,
                        "binary frames are not accepted",
                    ));
                    break;
                }
                Event::Client(Ok(Message::Close(_))) => break,
                Event::Client(Ok(_)) => None, // ping/pong: tungstenite answers pings
                Event::Client(Err(WsError::Capacity(e))) => {
                    debug!(error = %e, "message too large");
                    closing = Some(close(CloseCode::Size, "message too large"));
                    break;
                }
                Event::Client(Err(e)) => {
                    debug!(error = %e, "websocket error");
                    break;
                }
                Event::Shard(Outbound::Text(text)) => Some(Message::text(text)),
                Event::Shard(Outbound::JoinRefused(text)) => {
                    self.joined = Joined::No;
                    Some(Message::text(text))
                }
                Event::Shard(Outbound::Close(code, reason)) => {
                    closed_by_server = true;
                    closing = Some(close(CloseCode::from(code), reason));
                    break;
                }
                Event::Overflow => {
                    closing = Some(close(CloseCode::Policy, "not reading fast enough"));
                    break;
                }
                Event::JoinDeadline if self.joined == Joined::No => {
                    closing = Some(close(CloseCode::Policy, "no join in time"));
                    break;
                }
                Event::JoinDeadline => None,
                Event::Keepalive if last_heard.elapsed() >= 2 * self.ping_interval() => {
                    debug!("client went quiet; closing");
                    closing = Some(close(CloseCode::Policy, "no reply to ping"));
                    break;
                }
                Event::Keepalive => Some(Message::Ping(Default::default())),
            };
            if let Some(message) = reply {
                match within(WRITE_DEADLINE, sink.send(message)).await {
                    Some(Ok(())) => {}
                    Some(Err(_)) => break,
                    None => {
                        debug!("client stopped reading; dropping the socket");
                        stalled = true;
                        break;
                    }
                }
            }
        }
        let server_closes = closing.is_some();
        let closed = !stalled && within(WRITE_DEADLINE, sink.close(closing)).await.is_some();
        if closed && server_closes {
            // RFC 6455 §7.1.1: wait (briefly) for the client's close frame before
            // dropping TCP, or a message it sent meanwhile draws a reset that can
            // destroy our close frame before the client reads it.
            let client_done = events
                .take_while(|e| ready(!matches!(e, Event::Client(Ok(Message::Close(_)) | Err(_)))))
                .for_each(|_| ready(()));
            within(CLOSE_GRACE, client_done).await;
        }
        if let (Joined::Shard(shard), false) = (self.joined, closed_by_server)
            && let Some(handle) = self.hub.shards.get(shard)
        {
            disconnect(&handle.mailbox, self.conn).await;
        }
    }

    fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.hub.config.ping_interval)
    }

    /// The session's own clock: its join deadline, then a keepalive tick every
    /// `--ping-interval` (none when it is 0).
    fn timers(&self) -> impl Stream<Item = Event> + use<> {
        let join_deadline = stream::once(Timer::new(Duration::from_secs(
            self.hub.config.join_timeout,
        )))
        .map(|_| Event::JoinDeadline);
        let interval = self.ping_interval();
        let ticks = stream::unfold(interval, |interval| async move {
            Timer::new(interval).await;
            Some((Event::Keepalive, interval))
        })
        .take_while(move |_| ready(!interval.is_zero()));
        stream::select(join_deadline, ticks)
    }

    /// Handles one client message; returns the local reply, if any.
    fn on_text(&mut self, text: &str) -> Option<String> {
        let refuse = |refusal: Refusal, request_id: Option<&str>| {
            self.hub
                .metrics
                .signaling_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(protocol::error_text(&refusal, request_id))
        };
        // Every frame counts against the rate, well-formed or not.
        let allowed = self.limit.allow(Instant::now());
        let request = match protocol::parse(text) {
            Ok(request) if allowed => request,
            Ok(Request { request_id, .. }) | Err((request_id, _)) if !allowed => {
                return refuse(
                    Refusal::new(ErrorCode::RateLimited, "too many messages; slow down"),
                    request_id.as_deref(),
                );
            }
            Ok(request) => request,
            Err((request_id, refusal)) => return refuse(refusal, request_id.as_deref()),
        };
        let request_id = request.request_id;
        let (shard, msg) = match request.msg {
            ClientMsg::Ping => {
                return Some(
                    ServerMsg::Pong {
                        request_id: request_id.as_deref(),
                    }
                    .to_text(),
                );
            }
            ClientMsg::Join(join) => {
                if self.joined != Joined::No {
                    return refuse(
                        Refusal::new(ErrorCode::AlreadyJoined, "one join per socket"),
                        request_id.as_deref(),
                    );
                }
                if self
                    .room_hint
                    .as_ref()
                    .is_some_and(|room| *room != join.session_id)
                {
                    return refuse(
                        Refusal::new(
                            ErrorCode::RoomMismatch,
                            "sessionId differs from the room in the URL",
                        ),
                        request_id.as_deref(),
                    );
                }
                let shard = shard_for(&join.session_id, self.hub.shards.len());
                let msg = ToShard::Join {
                    conn: self.conn,
                    request_id: request_id.clone(),
                    join: Box::new(join),
                };
                (shard, msg)
            }
            ClientMsg::Signal(signal) => {
                let Joined::Shard(shard) = self.joined else {
                    return refuse(
                        Refusal::new(ErrorCode::NotJoined, "send join first"),
                        request_id.as_deref(),
                    );
                };
                let msg = ToShard::Signal {
                    conn: self.conn,
                    request_id: request_id.clone(),
                    signal: Box::new(signal),
                };
                (shard, msg)
            }
        };
        let is_join = matches!(msg, ToShard::Join { .. });
        let handed = self
            .hub
            .shards
            .get(shard)
            .is_some_and(|h| h.mailbox.try_send(msg).is_ok());
        if !handed {
            return refuse(
                Refusal::new(ErrorCode::RateLimited, "server busy; retry shortly"),
                request_id.as_deref(),
            );
        }
        if is_join {
            self.joined = Joined::Shard(shard);
        }
        None
    }
}

/// Tells the shard the socket is gone, waiting for room in its mailbox: a lost
/// `Disconnect` would leave the participant in its room until ICE consent expired,
/// or for good if its media never connected. The session holds its connection slot
/// meanwhile, so waiting sessions are bounded by `--max-connections`.
async fn disconnect(mailbox: &MailboxSender<ToShard>, conn: ConnId) {
    let mut msg = ToShard::Disconnect { conn };
    while let Err(TrySendError::Full(back)) = mailbox.try_send(msg) {
        msg = back;
        Timer::new(MAILBOX_RETRY).await;
    }
}

fn close(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::mailbox::mailbox;

    /// A socket that closes while its shard's mailbox is full still leaves its room:
    /// the `Disconnect` waits for room instead of being dropped.
    #[test]
    fn a_disconnect_waits_for_room_in_a_full_mailbox() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let (tx, rx) = mailbox(1, 1 << 20);
            assert!(tx.try_send(ToShard::Disconnect { conn: 1 }).is_ok());
            let leaving = glommio::spawn_local(async move { disconnect(&tx, 2).await });
            let (mut got, mut batch) = (Vec::new(), Vec::new());
            while rx.recv_batch(&mut batch, 4).await {
                got.append(&mut batch);
            }
            leaving.await;
            let conns: Vec<_> = got
                .iter()
                .map(|m| match m {
                    ToShard::Disconnect { conn } => *conn,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(conns, [1, 2]);
        });
    }
}
