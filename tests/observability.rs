//! What an operator reads: with `--log-format json` every line is one JSON object, what
//! happens to a participant is logged in its `peer` span (shard, room, peer), and no
//! line carries a secret, a join ticket or SDP.

mod common;

use std::time::Duration;

use common::{TestServer, Ws};
use corelay::shard::shard_for;
use corelay_loadtest::{Client, ClientConfig, MediaKind};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

#[test]
fn logs_are_json_lines_in_each_participants_span_without_secrets() {
    let (server, logs) = TestServer::start_logged(&["--admin-token", "s3cret-admin"]);
    let room = "observed";
    let clients: Vec<Client> = ["ann", "bob"]
        .into_iter()
        .map(|user| Client::connect(ClientConfig::new(server.addr, room, user)).expect("joins"))
        .collect();
    let ids: Vec<String> = clients.iter().map(|c| c.peer_id().to_owned()).collect();
    clients[1]
        .wait_for(WAIT, |s| {
            [MediaKind::Audio, MediaKind::Video]
                .into_iter()
                .all(|kind| s.track(&ids[0], kind).is_some_and(|t| t.received > 0))
        })
        .expect("bob receives ann's media");
    // A ticket is a credential whether or not this server checks it.
    let mut ticketed = Ws::connect(&server.ws_url(room));
    ticketed
        .send(r#"{"type":"join","sessionId":"observed","userId":"cy","ticket":"tkt-do-not-log"}"#);
    assert_eq!(ticketed.recv()["type"], "joined");
    assert_eq!(server.get("/debug/rooms?token=s3cret-admin").0, 200);
    let mut clients = clients.into_iter();
    let (ann, bob) = (clients.next().expect("ann"), clients.next().expect("bob"));
    bob.leave(WAIT).expect("bob leaves");
    let left = logs.wait_for(WAIT, |l| message(l) == "participant left");
    drop(ann);

    let shard = shard_for(room, 2);
    let in_span_of = |line: &Value, peer: &str| {
        let span = &line["span"];
        span["name"] == "peer"
            && span["peer"] == peer
            && span["room"] == room
            && span["shard"] == shard
    };
    assert!(in_span_of(&left, &ids[1]), "{left}");
    assert_eq!(left["fields"]["why"], "leave", "{left}");
    let lines = logs.lines();
    let json: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for id in &ids {
        let about = |msg: &str| {
            json.iter()
                .filter(|l| message(l) == msg && in_span_of(l, id))
                .count()
        };
        assert_eq!(about("joined"), 1, "{id} joined once, in its span");
        assert_eq!(about("track published"), 2, "{id}'s audio and video");
    }
    for secret in [
        "s3cret-admin",
        "tkt-do-not-log",
        "ice-pwd",
        "fingerprint",
        "v=0",
    ] {
        let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "{secret:?} logged: {leaked:?}");
    }
}
