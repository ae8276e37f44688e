//! Rooms spread over shards by the documented hash, and a room never straddles two:
//! `/debug/rooms` and `/metrics` show where everything lives.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, Ws};
use corelay::shard::shard_for;

#[test]
fn rooms_land_on_their_hashed_shard_and_stay_whole() {
    let server = TestServer::start(&[]);
    let rooms: Vec<String> = (0..12).map(|i| format!("room-{i}")).collect();
    let mut sockets = Vec::new();
    for room in &rooms {
        for user in ["a", "b", "c"] {
            let (ws, joined) = Ws::join(&server.ws_url(room), room, user);
            assert_eq!(joined["sessionId"], room.as_str());
            sockets.push(ws);
        }
    }
    // `joined` is sent after the shard added the participant, so the snapshot below
    // sees every join.
    let listed = server.debug_rooms();
    let mut per_shard = BTreeMap::new();
    for room in listed["rooms"].as_array().expect("rooms") {
        let id = room["sessionId"].as_str().expect("id");
        let shard = room["shard"].as_u64().expect("shard") as usize;
        assert_eq!(shard, shard_for(id, 2), "{id} is on its hashed shard");
        assert_eq!(
            room["participants"].as_array().map(Vec::len),
            Some(3),
            "{room}"
        );
        *per_shard.entry(shard).or_insert(0) += 1;
    }
    assert_eq!(
        per_shard.values().sum::<usize>(),
        rooms.len(),
        "each room listed once"
    );
    assert_eq!(per_shard.len(), 2, "both shards host rooms: {per_shard:?}");

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for (shard, count) in &per_shard {
        let line = format!("rtc_active_rooms{{shard=\"{shard}\"}} {count}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
        let participants = format!("rtc_active_participants{{shard=\"{shard}\"}} {}", count * 3);
        assert!(metrics.contains(&participants), "missing {participants:?}");
    }

    // Rooms are removed when empty.
    drop(sockets);
    let mut remaining = usize::MAX;
    for _ in 0..200 {
        remaining = server.debug_rooms()["rooms"].as_array().map_or(0, Vec::len);
        if remaining == 0 {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(remaining, 0, "empty rooms are removed");
}

#[test]
fn http_endpoints_answer() {
    let server = TestServer::start(&["--admin-token", "s3cret"]);
    let (status, body) = server.get("/health");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["status"], "ok");

    let (status, body) = server.get("/client/capabilities");
    assert_eq!(status, 200);
    let caps: serde_json::Value = serde_json::from_str(&body).expect("json");
    for key in [
        "protocol_version",
        "signaling_url",
        "signaling_transport",
        "topologies",
        "features",
        "ice_servers",
        "connection_policy",
    ] {
        assert!(
            !caps["rtc"][key].is_null(),
            "capabilities lack {key}: {caps}"
        );
    }

    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "rtc_active_rooms",
        "rtc_active_participants",
        "rtc_join_fail_total",
        "rtc_publish_track_total",
        "rtc_negotiation_error_total",
        "rtc_forced_disconnect_total",
        "rtc_join_ticket_issued_total",
        "rtc_forwarded_packets_total",
        "rtc_forwarded_bytes_total",
        "rtc_subscriber_rtt_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "metrics lack {name}"
        );
    }

    assert_eq!(server.get("/debug/rooms").0, 401, "admin token enforced");
    assert_eq!(server.get("/debug/rooms?token=s3cret").0, 200);
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") && page.contains("/ws"),
        "demo page served"
    );
    assert_eq!(server.get("/nope").0, 404);
}
