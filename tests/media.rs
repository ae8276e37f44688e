//! The core promise, end to end on loopback with real str0m peers: everyone in a room
//! receives everyone else's audio and video (never their own), each track labelled with
//! its publisher, and departures (clean or abrupt) renegotiate the rest.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use corelay_loadtest::{Client, ClientConfig, ClientStats, MediaKind};

const WAIT: Duration = Duration::from_secs(20);

fn publisher(server: &TestServer, room: &str, user: &str) -> Client {
    let config = ClientConfig {
        publish_audio: true,
        publish_video: true,
        ..ClientConfig::new(server.addr, room, user)
    };
    Client::connect(config).unwrap_or_else(|e| panic!("{user} could not join: {e:?}"))
}

/// True when `stats` holds flowing audio and video (with a keyframe) from each of `from`.
fn receives_from(stats: &ClientStats, from: &[&str]) -> bool {
    from.iter().all(|peer| {
        let audio = stats.track(peer, MediaKind::Audio);
        let video = stats.track(peer, MediaKind::Video);
        audio.is_some_and(|t| t.received >= 25 && t.bytes > 0)
            && video.is_some_and(|t| t.received >= 25 && t.keyframes >= 1)
    })
}

/// The publishers named by the active `msid`s of the latest subscriber offer.
fn offered_publishers(stats: &ClientStats) -> BTreeSet<String> {
    stats
        .active_msids()
        .into_iter()
        .map(|(stream, _)| stream)
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[test]
fn three_peers_exchange_media_and_departures_renegotiate() {
    let server = TestServer::start(&[]);
    let clients: Vec<Client> = ["ann", "bob", "cat"]
        .iter()
        .map(|user| publisher(&server, "trio", user))
        .collect();
    let ids: Vec<String> = clients.iter().map(|c| c.peer_id().to_owned()).collect();

    for (i, client) in clients.iter().enumerate() {
        let others: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| id.as_str())
            .collect();
        let stats = client
            .wait_for(WAIT, |s| receives_from(s, &others))
            .unwrap_or_else(|e| panic!("{} got no media from {others:?}: {e:?}", ids[i]));
        assert!(
            stats.tracks_from(&ids[i]).next().is_none(),
            "a participant never receives its own tracks"
        );
        assert_eq!(offered_publishers(&stats), set(&others));
        // Each forwarded msid is <publisher peerId> <publisher's own track id>.
        for (j, other) in clients.iter().enumerate().filter(|(j, _)| *j != i) {
            for track in other.snapshot().published {
                assert!(
                    stats
                        .active_msids()
                        .contains(&(ids[j].clone(), track.track_id.clone())),
                    "msid for {}'s {:?} track",
                    ids[j],
                    track.kind
                );
            }
        }
        for kind in [MediaKind::Audio, MediaKind::Video] {
            for other in &others {
                let track = stats.track(other, kind).expect("track");
                assert_eq!(track.lost, 0, "no loss on loopback: {track:?}");
            }
        }
        assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    }

    // A clean leave: the others hear peer_left and get an offer without its tracks.
    let mut clients = clients.into_iter();
    let (ann, bob, cat) = (
        clients.next().expect("ann"),
        clients.next().expect("bob"),
        clients.next().expect("cat"),
    );
    cat.leave(WAIT).expect("leave closes with 1000");
    for client in [&ann, &bob] {
        client
            .wait_for(WAIT, |s| {
                s.peers_left.contains(&ids[2]) && !offered_publishers(s).contains(&ids[2])
            })
            .expect("peer_left and a renegotiated offer after leave");
    }

    // An abrupt disconnect (no leave, socket dropped) does the same.
    let before = ann.snapshot().subscriber_offers;
    bob.abort();
    let stats = ann
        .wait_for(WAIT, |s| {
            s.peers_left.contains(&ids[1])
                && s.subscriber_offers > before
                && offered_publishers(s).is_empty()
        })
        .expect("peer_left and a renegotiated offer after a dropped socket");
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
}

#[test]
fn late_joiner_gets_a_keyframe_quickly() {
    let server = TestServer::start(&[]);
    // A long keyframe interval: only the server's PLI on the newcomer's behalf can
    // produce a keyframe within the wait below.
    let config = ClientConfig {
        publish_audio: true,
        publish_video: true,
        keyframe_interval: Duration::from_secs(60),
        ..ClientConfig::new(server.addr, "late", "early")
    };
    let early = Client::connect(config).expect("join");
    let watcher = publisher(&server, "late", "watcher");
    watcher
        .wait_for(WAIT, |s| receives_from(s, &[early.peer_id()]))
        .expect("first watcher decodes");
    let before = early.snapshot().keyframe_requests;
    let late = publisher(&server, "late", "late");
    let stats = late
        .wait_for(Duration::from_secs(1), |s| {
            s.track(early.peer_id(), MediaKind::Video)
                .is_some_and(|t| t.keyframes >= 1)
        })
        .expect("a keyframe within one second of joining");
    // Snapshots are published by the client's own thread: wait for it to catch up.
    early
        .wait_for(Duration::from_secs(1), |s| s.keyframe_requests > before)
        .expect("the keyframe was the server's request on the newcomer's behalf");
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
}

/// A client that has just talked acknowledges what it receives late (delayed ACK: 40
/// ms on Linux, up to 200 ms elsewhere), and Nagle's algorithm held the server's next
/// message until that acknowledgement: news of a newcomer came 40 ms after the
/// newcomer's own `joined`.
#[test]
fn news_reaches_a_client_as_soon_as_the_newcomer_hears() {
    let server = TestServer::start(&[]);
    let url = server.ws_url("nagle");
    let (mut quiet, _) = Ws::join(&url, "nagle", "quiet");
    quiet.send(r#"{"type":"ping"}"#);
    quiet.recv_type("pong");
    let _newcomer = Ws::join(&url, "nagle", "newcomer");
    let joined = Instant::now();
    quiet.recv_type("peer_joined");
    let late = joined.elapsed();
    assert!(
        late < Duration::from_millis(15),
        "peer_joined came {late:?} after the newcomer's joined"
    );
}

/// A newcomer hears of everyone already in a full room, however large the room is set
/// to be: its queue of replies holds a whole replay (here 300 replies, arriving at
/// once; a publisher's tracks would add one each). A queue too small closes the
/// newcomer with 1008 before it reads any.
#[test]
fn a_newcomer_to_a_large_room_hears_of_everyone() {
    let server = TestServer::start(&["--max-room-participants", "300"]);
    let url = server.ws_url("large");
    let present: Vec<Ws> = (0..299)
        .map(|i| Ws::join(&url, "large", &format!("u{i}")).0)
        .collect();
    let (mut newcomer, _) = Ws::join(&url, "large", "newcomer");
    // Not a `ping` as the end marker: the accept shard answers it at once, and may do
    // so while the replay is still on its way from the room's shard.
    let mut heard = BTreeSet::new();
    while heard.len() < present.len() {
        let msg = newcomer.recv();
        if msg["type"] == "peer_joined" {
            heard.insert(msg["userId"].as_str().unwrap_or_default().to_owned());
        }
    }
    let everyone: BTreeSet<String> = (0..299).map(|i| format!("u{i}")).collect();
    assert_eq!(heard, everyone);
}

/// Two publishers in a room with media flowing, for tests that disturb the server
/// and then check the room did not notice.
struct CalmRoom {
    a: Client,
    b: Client,
    /// Video packets `b` had received from `a` before the disturbance.
    before: u64,
}

impl CalmRoom {
    fn start(server: &TestServer, room: &str) -> Self {
        let a = publisher(server, room, "a");
        let b = publisher(server, room, "b");
        let base = b
            .wait_for(WAIT, |s| receives_from(s, &[a.peer_id()]))
            .expect("media flows");
        let before = base
            .track(a.peer_id(), MediaKind::Video)
            .map_or(0, |t| t.received);
        Self { a, b, before }
    }

    /// Media kept flowing without loss, and neither participant saw an error.
    fn assert_undisturbed(&self) {
        let stats = self
            .b
            .wait_for(WAIT, |s| {
                s.track(self.a.peer_id(), MediaKind::Video)
                    .is_some_and(|t| t.received > self.before + 60)
            })
            .expect("media keeps flowing during and after the disturbance");
        let video = stats
            .track(self.a.peer_id(), MediaKind::Video)
            .expect("video");
        assert_eq!(video.lost, 0, "{video:?}");
        for client in [&self.a, &self.b] {
            let s = client.snapshot();
            assert!(
                s.errors.is_empty(),
                "bystanders see no errors: {:?}",
                s.errors
            );
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        }
    }
}

#[test]
fn garbage_flood_does_not_disturb_a_room() {
    let server = TestServer::start(&[]);
    let room = CalmRoom::start(&server, "calm");

    // The flooder shares the room and the shard.
    let (mut flooder, _) = Ws::join(&server.ws_url("calm"), "calm", "flooder");
    let garbage = [
        "{",
        "null",
        r#"{"type":"offer","sdp":"v=0 garbage"}"#,
        r#"{"type":"answer","sdp":"nope"}"#,
        r#"{"type":"candidate","candidate":"candidate:1 1 udp x y z"}"#,
        r#"{"type":"media_state","speaking":42}"#,
        r#"{"type":"\u0000"}"#,
    ];
    const FLOOD: usize = 500;
    for i in 0..FLOOD {
        flooder.send(garbage[i % garbage.len()]);
    }
    // Exactly one error per refused message, and the flooder is throttled.
    let mut codes = BTreeSet::new();
    for _ in 0..FLOOD {
        // Room traffic (peer_joined, offers) interleaves; only errors answer the flood.
        let reply = flooder.recv_type("error");
        codes.insert(reply["code"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        codes.contains("bad_json") && codes.contains("rate_limited"),
        "{codes:?}"
    );

    room.assert_undisturbed();
}

#[test]
fn udp_garbage_does_not_disturb_a_room() {
    let server = TestServer::start(&[]);
    let room = CalmRoom::start(&server, "udp");

    let (_, health) = server.get("/health");
    let health: serde_json::Value = serde_json::from_str(&health).expect("json");
    let ports: Vec<u16> = health["udpPorts"]
        .as_array()
        .expect("udpPorts")
        .iter()
        .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    assert_eq!(ports.len(), 2);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    // Deterministic junk: random bytes, and datagrams that look like STUN (first
    // byte 0..3, with and without a magic cookie), DTLS (20..63) and RTP (128..191).
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut junk = [0_u8; 1200];
    for i in 0..4000_usize {
        let len = 1 + (i * 37) % junk.len();
        for byte in junk.iter_mut().take(len) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        junk[0] = [junk[0], 0x00, 0x01, 0x16, 0x80][i % 5];
        if i % 10 == 1 && len > 8 {
            junk[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        }
        let port = ports[i % ports.len()];
        let _ = socket.send_to(&junk[..len], ("127.0.0.1", port));
    }

    room.assert_undisturbed();
    let (_, metrics) = server.get("/metrics");
    let unrouted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("rtc_unrouted_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(unrouted > 0, "junk was counted as unrouted:\n{metrics}");
}
