//! Bad input gets the PROTOCOL.md §5 code it deserves, the socket stays usable, and
//! transport-level abuse gets the close code or HTTP status the protocol names.
//! What a client gives that the server keeps (candidates) is bounded, and so is the
//! time a request head may take, a socket may stay outside a room or unheard from, and
//! a write to a client may wait.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use corelay::shard::shard_for;
use corelay_loadtest::{Client, ClientConfig, ClientStats, MediaKind};
use str0m::change::SdpOffer;
use tungstenite::Message;

/// Sends `msgs` on a fresh socket (joined first when `join` is set) and asserts the
/// last reply is an `error` with `code`, then that the socket still answers `ping`.
fn expect_error(server: &TestServer, join: bool, msgs: &[&str], code: &str) {
    let room = format!("bad-{code}");
    let mut ws = if join {
        Ws::join(&server.ws_url(&room), &room, "u").0
    } else {
        Ws::connect(&server.ws_url(&room))
    };
    let (last, setup) = msgs.split_last().expect("a message");
    for msg in setup {
        ws.send(msg);
        ws.recv();
    }
    ws.send(last);
    let reply = ws.recv_type("error");
    assert_eq!(reply["code"], code, "for {last}: {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error says what was wrong: {reply}"
    );
    ws.send(r#"{"type":"ping","requestId":"still-there"}"#);
    let pong = ws.recv_type("pong");
    assert_eq!(pong["requestId"], "still-there");
}

#[test]
fn every_client_error_code() {
    let server = TestServer::start(&[]);
    // A real publisher offer with one track more than allowed.
    let too_many_tracks = common::offer(&[MediaKind::Audio; 5]);
    let long_request_id = format!(r#"{{"type":"ping","requestId":"{}"}}"#, "r".repeat(65));
    let cases: &[(bool, &[&str], &str)] = &[
        (false, &["{not json"], "bad_json"),
        (false, &["[1,2]"], "bad_json"),
        (false, &[r#"{"type":"teleport"}"#], "unknown_type"),
        (false, &[r#"{"sessionId":"x"}"#], "invalid_field"),
        (
            false,
            &[r#"{"type":"join","sessionId":"bad-invalid_field"}"#],
            "invalid_field",
        ),
        (false, &[&long_request_id], "invalid_field"),
        (false, &[r#"{"type":"offer","sdp":"v=0"}"#], "not_joined"),
        (false, &[r#"{"type":"leave"}"#], "not_joined"),
        (
            false,
            &[r#"{"type":"join","sessionId":"elsewhere","userId":"u"}"#],
            "room_mismatch",
        ),
        (
            true,
            &[r#"{"type":"join","sessionId":"bad-already_joined","userId":"u"}"#],
            "already_joined",
        ),
        (true, &[&too_many_tracks], "too_many_tracks"),
        (
            true,
            &[r#"{"type":"offer","sdp":"hello"}"#],
            "negotiation_failed",
        ),
        (
            true,
            &[r#"{"type":"answer","sdp":"v=0"}"#],
            "negotiation_failed",
        ),
        (
            true,
            &[r#"{"type":"candidate","candidate":"candidate:nonsense"}"#],
            "invalid_field",
        ),
        (
            true,
            &[r#"{"type":"media_state","audioEnabled":"off"}"#],
            "invalid_field",
        ),
    ];
    for (join, msgs, code) in cases {
        expect_error(&server, *join, msgs, code);
    }
}

/// str0m 0.25 asserts on some SDP it accepts: an answer that lists the offer's VP9
/// profile 2 payload type in its audio section panics it. The shard contains
/// the panic: that participant gets `negotiation_failed` and is closed with 1011 (its
/// `Rtc` is not to be trusted any more), and the rest of the room carries on.
#[test]
fn an_answer_that_panics_str0m_costs_only_its_sender() {
    let (server, logs) = TestServer::start_logged(&[]);
    let room = "str0m-panic";
    let url = server.ws_url(room);
    // The panic needs the audio section first: one participant publishes audio and
    // the next video, and offers list the room's tracks in join order.
    let speaker = Client::connect(ClientConfig {
        publish_video: false,
        ..ClientConfig::new(server.addr, room, "speaks")
    })
    .expect("speaker joins");
    let camera = Client::connect(ClientConfig {
        publish_audio: false,
        ..ClientConfig::new(server.addr, room, "films")
    })
    .expect("camera joins");
    let watcher = Client::connect(ClientConfig {
        publish_audio: false,
        publish_video: false,
        ..ClientConfig::new(server.addr, room, "watches")
    })
    .expect("watcher joins");
    let video_from = |stats: &ClientStats| {
        stats
            .track(camera.peer_id(), MediaKind::Video)
            .map_or(0, |t| t.received)
    };
    watcher
        .wait_for(Duration::from_secs(20), |s| {
            video_from(s) > 0 && s.track(speaker.peer_id(), MediaKind::Audio).is_some()
        })
        .expect("the watcher gets both tracks");
    let (mut victim, joined) = Ws::join(&url, room, "answers-badly");
    let victim_id = joined["peerId"].as_str().expect("peerId").to_owned();

    let offer = victim.recv_type("offer");
    let offer = SdpOffer::from_sdp_string(offer["sdp"].as_str().expect("sdp"))
        .expect("the server's offer parses");
    let answer = str0m::Rtc::new(Instant::now())
        .sdp_api()
        .accept_offer(offer)
        .expect("an answer")
        .to_sdp_string();
    let vp9_profile_2 = answer
        .lines()
        .find_map(|l| {
            let pt = l.strip_prefix("a=fmtp:")?.strip_suffix(" profile-id=2")?;
            Some(format!("a=rtpmap:{pt} VP9/90000\r\n"))
        })
        .expect("VP9 profile 2 in the answer");
    let (mut broken, mut in_audio) = (String::new(), false);
    for line in answer.lines() {
        if line.starts_with("m=") {
            in_audio = line.starts_with("m=audio");
        }
        broken += line;
        broken += "\r\n";
        if in_audio && line.starts_with("a=mid:") {
            broken += &vp9_profile_2;
        }
    }
    victim.send(&serde_json::json!({"type": "answer", "sdp": broken}).to_string());
    let error = victim.recv_type("error");
    assert_eq!(error["code"], "negotiation_failed", "{error}");
    assert_eq!(victim.close_code(), 1011);

    let before = video_from(&watcher.snapshot());
    watcher
        .wait_for(Duration::from_secs(20), |s| {
            s.peers_left.contains(&victim_id) && video_from(s) >= before + 50
        })
        .expect("the watcher still gets video, and saw the victim go");
    let (_, joined) = Ws::join(&url, room, "newcomer");
    assert_eq!(joined["sessionId"], room);
    let counted = format!(
        "rtc_str0m_panics_total{{shard=\"{}\"}} 1",
        shard_for(room, 2)
    );
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains(&counted), "no {counted:?} in\n{metrics}");
    // The panic is logged as one JSON event in the victim's span, not as the default
    // hook's plain text.
    let panic = logs.wait_for(Duration::from_secs(5), |l| {
        l["fields"]["panic.payload"]
            .as_str()
            .is_some_and(|p| p.contains("Pt locked"))
    });
    assert_eq!(panic["level"], "ERROR", "{panic}");
    assert_eq!(panic["span"]["peer"], victim_id, "{panic}");
    for line in logs.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "{line}"
        );
    }
}

/// str0m keeps every candidate with a new address for the connection's life, so a
/// connection gets at most 32 addresses, each in a line of at most 512 bytes.
#[test]
fn candidates_are_bounded_per_connection() {
    let server = TestServer::start(&[]);
    let room = "bad-candidates";
    let mut ws = Ws::join(&server.ws_url(room), room, "u").0;
    let candidate = |foundation: &str, port: usize| {
        format!(
            r#"{{"type":"candidate","candidate":"candidate:{foundation} 1 udp 2130706431 10.0.0.1 {port} typ host"}}"#
        )
    };
    for i in 0..32 {
        ws.send(&candidate("1", 5000 + i));
    }
    // An address given before is not another one.
    ws.send(&candidate("2", 5000));
    ws.send(r#"{"type":"ping","requestId":"after-32"}"#);
    let reply = ws.recv();
    assert_eq!(
        (&reply["type"], &reply["requestId"]),
        (&"pong".into(), &"after-32".into()),
        "32 addresses are fine: {reply}"
    );

    ws.send(&candidate("1", 5032));
    let reply = ws.recv_type("error");
    assert_eq!(reply["code"], "invalid_field", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("more than 32 candidate addresses"),
        "{reply}"
    );

    let long = candidate(&"f".repeat(600), 6000);
    ws.send(&long);
    let reply = ws.recv_type("error");
    assert_eq!(reply["code"], "invalid_field", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("at most 512"), "{reply}");

    ws.send(r#"{"type":"ping","requestId":"still-there"}"#);
    assert_eq!(ws.recv_type("pong")["requestId"], "still-there");
}

#[test]
fn request_id_is_echoed_on_errors() {
    let server = TestServer::start(&[]);
    let mut ws = Ws::connect(&server.ws_url("rid"));
    ws.send(r#"{"type":"offer","sdp":"v=0","requestId":"abc"}"#);
    let reply = ws.recv();
    assert_eq!(reply["code"], "not_joined");
    assert_eq!(reply["requestId"], "abc");
}

#[test]
fn room_full() {
    let server = TestServer::start(&["--max-room-participants", "1"]);
    let (_first, _) = Ws::join(&server.ws_url("small"), "small", "a");
    let mut second = Ws::connect(&server.ws_url("small"));
    second.send(r#"{"type":"join","sessionId":"small","userId":"b"}"#);
    assert_eq!(second.recv()["code"], "room_full");
    // Refused joins may be retried on the same socket: the first one leaves.
    drop(_first);
    let mut joined = false;
    for _ in 0..50 {
        second.send(r#"{"type":"join","sessionId":"small","userId":"b"}"#);
        let reply = second.recv();
        if reply["type"] == "joined" {
            joined = true;
            break;
        }
        assert_eq!(reply["code"], "room_full");
    }
    assert!(joined, "a place freed up when the first participant left");
}

#[test]
fn rate_limited() {
    let server = TestServer::start(&["--message-rate", "2"]);
    let mut ws = Ws::connect(&server.ws_url("rate"));
    // Burst is twice the rate: the fifth message in a row is refused.
    for _ in 0..4 {
        ws.send(r#"{"type":"ping"}"#);
        assert_eq!(ws.recv()["type"], "pong");
    }
    ws.send(r#"{"type":"ping"}"#);
    assert_eq!(ws.recv()["code"], "rate_limited");
}

#[test]
fn oversize_message_closes_with_1009() {
    let server = TestServer::start(&["--max-message-size", "1024"]);
    let mut ws = Ws::connect(&server.ws_url("big"));
    ws.send(&format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(4096)
    ));
    assert_eq!(ws.close_code(), 1009);
}

#[test]
fn binary_frame_closes_with_1003() {
    let server = TestServer::start(&[]);
    let mut ws = Ws::connect(&server.ws_url("bin"));
    ws.0.send(Message::binary(vec![1_u8, 2, 3])).expect("send");
    assert_eq!(ws.close_code(), 1003);
}

fn upgrade_request(server: &TestServer, origin: Option<&str>) -> u16 {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    server
        .request(&format!(
            "GET /ws?room=o HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n",
            server.addr
        ))
        .0
}

/// The request head has a deadline as a whole, not only per read: a client that
/// sends it a byte a second (each read well within the per-read timeout) is cut off
/// after 10 s, without an answer, instead of holding its connection for hours.
#[test]
fn a_request_head_sent_slowly_is_cut_off() {
    let server = TestServer::start(&[]);
    let mut tcp = TcpStream::connect(server.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    tcp.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
        .expect("write");
    let started = Instant::now();
    let cut_off = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still connected after 20 s"
        );
        // The read's timeout paces the bytes.
        if tcp.write_all(b"x").is_err() {
            break started.elapsed();
        }
        match tcp.read(&mut [0; 256]) {
            Ok(0) => break started.elapsed(),
            Ok(n) => panic!("answered an unfinished head ({n} bytes)"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break started.elapsed(),
        }
    };
    assert!(
        cut_off > Duration::from_secs(8),
        "cut off after {cut_off:?}: too early"
    );
}

/// A socket that is not in a room `--join-timeout` after opening is closed with 1008;
/// one that joined in time stays.
#[test]
fn a_socket_that_never_joins_is_closed() {
    let server = TestServer::start(&["--join-timeout", "1"]);
    let (mut joined, _) = Ws::join(&server.ws_url("idle"), "idle", "a");
    let mut idle = Ws::connect(&server.ws_url("idle"));
    idle.send(r#"{"type":"ping"}"#);
    idle.recv_type("pong");
    assert_eq!(idle.close_code(), 1008);
    // The joined socket's deadline passed first, and it is still served.
    joined.send(r#"{"type":"ping"}"#);
    joined.recv_type("pong");
}

/// A participant whose client stops reading (its TCP window full of replies) is
/// dropped after the 10 s write deadline, and the room sees it leave, instead of its
/// session waiting on the write forever.
#[test]
fn a_client_that_stops_reading_is_dropped() {
    let server = TestServer::start(&[]);
    let (mut observer, _) = Ws::join(&server.ws_url("stall"), "stall", "observer");
    let (stalled, joined) = Ws::join(&server.ws_url("stall"), "stall", "stalled");
    let peer = joined["peerId"].as_str().expect("peerId").to_owned();
    observer.recv_type("peer_joined");
    let tungstenite::stream::MaybeTlsStream::Plain(tcp) = stalled.0.get_ref() else {
        panic!("plain TCP expected");
    };
    let mut tcp = tcp.try_clone().expect("clone");
    // Masked one-byte text frames: each draws an `error` (bad JSON, then rate limited),
    // written to a client that never reads. The writes stop going through once the
    // server, stuck on its own write, stops reading too.
    let frame = [0x81, 0x81, 0, 0, 0, 0, b'x'];
    let frames: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 10_000)
        .collect();
    tcp.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let writer = std::thread::spawn(move || {
        for _ in 0..100 {
            if tcp.write_all(&frames).is_err() {
                return true;
            }
        }
        false
    });
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = observer.0.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(40)))
            .expect("timeout");
    }
    let left = observer.recv_type("peer_left");
    assert_eq!(left["peerId"], peer);
    assert!(
        writer.join().expect("writer"),
        "the server kept reading a client that never read its replies"
    );
    drop(stalled);
}

/// The server pings every `--ping-interval`; a client it hears nothing from for two
/// intervals (as when its network vanished without a FIN) is closed and leaves its
/// room, while one that reads, and so answers the pings, stays.
#[test]
fn a_client_that_goes_quiet_is_closed() {
    let server = TestServer::start(&["--ping-interval", "1"]);
    let (mut observer, _) = Ws::join(&server.ws_url("quiet"), "quiet", "observer");
    let (quiet, joined) = Ws::join(&server.ws_url("quiet"), "quiet", "quiet");
    let left = observer.recv_type("peer_left");
    assert_eq!(left["peerId"], joined["peerId"]);
    observer.send(r#"{"type":"ping"}"#);
    observer.recv_type("pong");
    drop(quiet);
}

#[test]
fn origin_allow_list() {
    let server = TestServer::start(&[]);
    assert_eq!(upgrade_request(&server, Some("http://evil.example")), 403);
    let own = format!("http://127.0.0.1:{}", server.addr.port());
    assert_eq!(upgrade_request(&server, Some(&own)), 101);
    assert_eq!(upgrade_request(&server, Some("http://localhost:3000")), 101);
    assert_eq!(
        upgrade_request(&server, None),
        101,
        "non-browser clients are allowed"
    );
}

#[test]
fn connection_limit_gives_503() {
    let server = TestServer::start(&["--max-connections", "2"]);
    let mut a = Ws::connect(&server.ws_url("lim"));
    let mut b = Ws::connect(&server.ws_url("lim"));
    for ws in [&mut a, &mut b] {
        ws.send(r#"{"type":"ping"}"#);
        ws.recv_type("pong");
    }
    assert_eq!(upgrade_request(&server, None), 503);
    drop(a);
    // The slot frees once the server sees the close; poll for it.
    let mut status = 503;
    for _ in 0..100 {
        status = upgrade_request(&server, None);
        if status == 101 {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(status, 101, "a freed slot is usable again");
}
