//! HTTP on the signaling port, served by the accept shard: the WebSocket upgrade at
//! `/ws`, health, metrics, capabilities, the rooms debug view and the demo page.
//!
//! Requests are tiny and few, so each connection carries one request (`Connection:
//! close`) and the head is parsed with `httparse`. Backpressure: the accept loop counts
//! open connections and answers 503 past `MAX_CONNECTIONS`, before reading anything.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use serde_json::json;
use tracing::{debug, warn};

use crate::metrics;
use crate::shard::messages::ToShard;
use crate::shard::within;
use crate::signaling::{Hub, session};

const DEMO_PAGE: &str = include_str!("demo.html");
const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until the listener fails.
pub async fn serve(listener: TcpListener, hub: Rc<Hub>) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = hub.metrics.connections.fetch_add(1, Relaxed) + 1;
        let hub = hub.clone();
        glommio::spawn_local(async move {
            let over_limit = open > hub.config.max_connections as u64;
            handle(stream, &hub, over_limit).await;
            hub.metrics.connections.fetch_sub(1, Relaxed);
        })
        .detach();
    }
}

async fn handle(mut stream: TcpStream, hub: &Rc<Hub>, over_limit: bool) {
    if over_limit {
        hub.metrics.rejected_connections.fetch_add(1, Relaxed);
        let _ = respond(&mut stream, 503, "text/plain", b"at connection limit\n").await;
        return;
    }
    // Signaling is small messages sent as they happen. With Nagle's algorithm each
    // waited for the client's (delayed, 40 ms or more) acknowledgement of the last.
    stream.set_nodelay(true).ok();
    // A deadline for the whole head, not each read: a client sending a byte every
    // few seconds would otherwise hold its connection slot for hours.
    let Some(head) = within(HEAD_TIMEOUT, read_head(&mut stream)).await.flatten() else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
        let _ = respond(&mut stream, 400, "text/plain", b"bad request\n").await;
        return;
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (req.method.unwrap_or(""), path) {
        ("GET", "/ws") => {
            let Some(key) = header("sec-websocket-key") else {
                let _ = respond(
                    &mut stream,
                    400,
                    "text/plain",
                    b"expected a WebSocket upgrade\n",
                )
                .await;
                return;
            };
            if let Some(origin) = header("origin")
                && !hub
                    .config
                    .allowed_origins(hub.port)
                    .iter()
                    .any(|o| o == origin)
            {
                let _ = respond(&mut stream, 403, "text/plain", b"origin not allowed\n").await;
                return;
            }
            let accept = derive_accept_key(key.as_bytes());
            let room = query_param(query, "room");
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            // Signaling messages are small: start with a 4 KiB read buffer (it grows to
            // the message size limit when needed) instead of tungstenite's 128 KiB.
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .max_message_size(Some(hub.config.max_message_size))
                .max_frame_size(Some(hub.config.max_message_size));
            let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
            session::run(ws, hub.clone(), room).await;
        }
        ("GET", "/health") => {
            let udp: Vec<_> = hub.shards.iter().map(|s| s.udp_addr.port()).collect();
            let stalled: Vec<_> = hub
                .shards
                .iter()
                .filter(|s| s.pulse.stalled())
                .map(|s| s.index)
                .collect();
            // A load balancer takes the instance out while any shard is stuck: the
            // rooms hashed to it cannot be served.
            let (code, status) = if stalled.is_empty() {
                (200, "ok")
            } else {
                (503, "stalled")
            };
            let body = json!({"status": status, "shards": hub.shards.len(), "udpPorts": udp,
                "stalledShards": stalled})
            .to_string();
            let _ = respond(&mut stream, code, "application/json", body.as_bytes()).await;
        }
        ("GET", "/metrics") => {
            let shards: Vec<_> = hub.shards.iter().map(|s| s.metrics.clone()).collect();
            let pulses: Vec<_> = hub.shards.iter().map(|s| s.pulse.clone()).collect();
            let body = metrics::render(&shards, &pulses, &hub.metrics);
            let _ = respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4",
                body.as_bytes(),
            )
            .await;
        }
        ("GET", "/client/capabilities") => {
            // Behind a balancer that terminates TLS (`deploy/haproxy.cfg` says so in
            // this header), a page served over HTTPS may only open `wss://`.
            let tls = header("x-forwarded-proto").is_some_and(|p| p.eq_ignore_ascii_case("https"));
            let body = capabilities(hub, header("host"), tls).to_string();
            let _ = respond(&mut stream, 200, "application/json", body.as_bytes()).await;
        }
        ("GET", "/debug/rooms") => {
            let authorized = hub.config.admin_token.as_deref().is_none_or(|token| {
                header("authorization").and_then(|v| v.strip_prefix("Bearer ")) == Some(token)
                    || query_param(query, "token").as_deref() == Some(token)
            });
            if !authorized {
                let _ = respond(&mut stream, 401, "text/plain", b"admin token required\n").await;
                return;
            }
            let body = debug_rooms(hub).await.to_string();
            let _ = respond(&mut stream, 200, "application/json", body.as_bytes()).await;
        }
        ("GET", "/") => {
            let _ = respond(
                &mut stream,
                200,
                "text/html; charset=utf-8",
                DEMO_PAGE.as_bytes(),
            )
            .await;
        }
        _ => {
            let _ = respond(&mut stream, 404, "text/plain", b"not found\n").await;
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(head);
        }
        if head.len() > MAX_HEAD {
            debug!("request head too large");
            return None;
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// One query parameter, form-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn capabilities(hub: &Hub, host: Option<&str>, tls: bool) -> serde_json::Value {
    let host = host.unwrap_or("localhost");
    let scheme = if tls { "wss" } else { "ws" };
    json!({
        "rtc": {
            "protocol_version": 1,
            "signaling_url": format!("{scheme}://{host}/ws"),
            "signaling_transport": "websocket",
            "topologies": ["sfu"],
            "features": ["audio", "video", "screen", "media_state", "keyframe_on_subscribe", "nack"],
            "ice_servers": hub.config.ice_servers(),
            "connection_policy": {
                "publisher": "client_offers",
                "subscriber": "server_offers",
                "ice_lite": true,
                "max_room_participants": hub.config.max_room_participants,
                "max_message_size": hub.config.max_message_size,
            },
        }
    })
}

/// Asks every shard for its rooms; a shard that does not answer in time is listed as
/// such rather than holding the request.
async fn debug_rooms(hub: &Hub) -> serde_json::Value {
    let mut rooms = Vec::new();
    let mut unanswered = Vec::new();
    for shard in &hub.shards {
        let (tx, rx) = futures::channel::oneshot::channel();
        if shard
            .mailbox
            .try_send(ToShard::Snapshot { reply: tx })
            .is_err()
        {
            unanswered.push(shard.index);
            continue;
        }
        match within(SNAPSHOT_TIMEOUT, rx).await {
            Some(Ok(list)) => rooms.extend(list),
            _ => unanswered.push(shard.index),
        }
    }
    json!({ "rooms": rooms, "shards": hub.shards.len(), "unansweredShards": unanswered })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("room=a%20b&x=1", "room").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param("x=1", "room"), None);
        assert_eq!(query_param("room=100%", "room").as_deref(), Some("100%"));
        assert_eq!(query_param("room=a+b", "room").as_deref(), Some("a b"));
    }
}
