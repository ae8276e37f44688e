//! Hostile SDP, over the in-memory network (`sim`): one participant after another
//! joins a room of two publishers and sends a mutated publisher offer, subscriber
//! answer (str0m's own) and trickled candidate, with lines or fields dropped, repeated
//! elsewhere, swapped or cut short, and numbers changed. Each message gets its answer,
//! or nothing, or exactly one `error` with a PROTOCOL.md code, and the two others keep
//! their media and never see the protocol broken: whatever the SDP does to str0m or to
//! us costs at most its sender. The mutations are seeded (`CORELAY_SDP_SEED`; str0m's
//! random ids and SSRCs still vary the text they land on); `CORELAY_SDP_CASES` runs
//! more than the default.

#[path = "sim/mod.rs"]
mod sim;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use corelay::shard::messages::{ConnId, ToAccept, ToShard};
use corelay_loadtest::{MediaKind, PeerConfig};
use serde_json::{Value, json};
use sim::Network;
use str0m::Rtc;
use str0m::change::SdpOffer;
use str0m::media::Direction;

/// PROTOCOL.md §5.
const ERROR_CODES: [&str; 17] = [
    "bad_json",
    "unknown_type",
    "invalid_field",
    "not_joined",
    "already_joined",
    "room_mismatch",
    "invalid_ticket",
    "ticket_expired",
    "ticket_reused",
    "forbidden",
    "room_full",
    "room_locked",
    "banned",
    "too_many_tracks",
    "rate_limited",
    "negotiation_failed",
    "internal",
];
/// Participants who come and go in one room before it starts afresh: each leaves its
/// m-lines behind in the others' subscriber connections.
const VISITORS_PER_ROOM: u64 = 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A publisher offer as str0m makes one: audio and video, every codec it knows.
fn publisher_offer() -> String {
    let mut rtc = Rtc::new(Instant::now());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, _) = api.apply().expect("an offer");
    offer.to_sdp_string()
}

/// A trickled candidate as a browser sends one: server-reflexive, with its extensions.
const CANDIDATE: &str = "candidate:842163049 1 udp 1677729535 203.0.113.7 54321 typ srflx \
    raddr 192.168.1.2 rport 54321 generation 0 ufrag EsAw network-id 1 network-cost 10";

/// One to three edits of `text`'s pieces (an SDP's lines, a candidate's fields, as
/// `separator` splits them): dropped, repeated elsewhere, swapped, cut short, a
/// number changed.
fn mutate(rng: &mut fastrand::Rng, text: &str, separator: &str) -> String {
    let mut lines: Vec<String> = text
        .split(separator)
        .filter(|piece| !piece.is_empty())
        .map(str::to_owned)
        .collect();
    for _ in 0..rng.usize(1..=3) {
        let (a, b) = (rng.usize(..lines.len()), rng.usize(..lines.len()));
        match rng.u8(..5) {
            0 => {
                lines.remove(a);
            }
            // A line repeated elsewhere: another section's payload type, say.
            1 => {
                let line = lines[a].clone();
                lines.insert(b, line);
            }
            2 => lines.swap(a, b),
            3 => {
                let cut = lines[a].floor_char_boundary(rng.usize(..=lines[a].len()));
                lines[a].truncate(cut);
            }
            _ => lines[a] = change_a_number(rng, &lines[a]),
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join(separator)
}

fn mutate_sdp(rng: &mut fastrand::Rng, sdp: &str) -> String {
    mutate(rng, sdp, "\r\n") + "\r\n"
}

/// `line` with one run of digits replaced by an edge value or another number.
fn change_a_number(rng: &mut fastrand::Rng, line: &str) -> String {
    let runs: Vec<(usize, usize)> = line
        .char_indices()
        .filter(|(i, c)| c.is_ascii_digit() && !line[..*i].ends_with(|p: char| p.is_ascii_digit()))
        .map(|(start, _)| {
            let len = line[start..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(line.len() - start);
            (start, start + len)
        })
        .collect();
    let Some(&(start, end)) = runs.get(rng.usize(..runs.len().max(1))) else {
        return line.to_owned();
    };
    let number = match rng.u8(..6) {
        0 => 0,
        1 => rng.u64(96..128),
        2 => u64::from(u16::MAX),
        3 => u64::from(u32::MAX),
        4 => u64::MAX,
        _ => rng.u64(..1000),
    };
    format!("{}{number}{}", &line[..start], &line[end..])
}

/// Sends `msg` from `conn` and delivers everything that follows; returns `replies`.
fn exchange(net: &mut Network, conn: ConnId, msg: &Value) -> (Vec<Value>, Option<u16>) {
    net.scripted_signal(conn, &msg.to_string());
    net.pump();
    replies(net, conn)
}

/// What the SFU sent `conn` since the last call, as JSON, and the close code if it
/// closed it.
fn replies(net: &mut Network, conn: ConnId) -> (Vec<Value>, Option<u16>) {
    let mut texts = Vec::new();
    let mut closed = None;
    for reply in std::mem::take(&mut net.scripted) {
        match reply {
            ToAccept::Send { conn: c, text } | ToAccept::JoinRefused { conn: c, text }
                if c == conn =>
            {
                texts.push(serde_json::from_str(&text).expect("the SFU sends JSON"));
            }
            ToAccept::Close { conn: c, code, .. } if c == conn => closed = Some(code),
            other => panic!("a reply for someone else: {other:?}"),
        }
    }
    (texts, closed)
}

/// The replies that answer request `id`: exactly one for an offer (its `answer` or an
/// `error`), at most one (an `error`) for an answer.
fn answering<'a>(replies: &'a [Value], id: &str) -> Vec<&'a Value> {
    let mine: Vec<&Value> = replies.iter().filter(|r| r["requestId"] == id).collect();
    for reply in &mine {
        if reply["type"] == "error" {
            let code = reply["code"].as_str().unwrap_or("");
            assert!(
                ERROR_CODES.contains(&code),
                "not a PROTOCOL.md code: {reply}"
            );
            assert!(
                reply["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{reply}"
            );
        }
    }
    mine
}

/// How the visitors' messages fared, so the test knows its mutations reach past the
/// parsers.
#[derive(Debug, Default)]
struct Tally {
    offers: Outcomes,
    answers: Outcomes,
    candidates: Outcomes,
    closed: u64,
}

#[derive(Debug, Default)]
struct Outcomes {
    taken: u64,
    refused: u64,
}

impl Outcomes {
    fn count(&mut self, taken: bool) {
        *(if taken {
            &mut self.taken
        } else {
            &mut self.refused
        }) += 1;
    }
}

/// Whether a message that gets no reply when taken (an answer, a candidate) was: it
/// gets nothing, or exactly one `error`.
fn taken(replies: &[Value], id: &str) -> bool {
    let answered = answering(replies, id);
    assert!(
        answered.len() <= 1 && answered.iter().all(|r| r["type"] == "error"),
        "nothing, or one error: {replies:?}"
    );
    answered.is_empty()
}

/// One visitor: joins, offers `offer`, answers the SFU's offer with a mutation of
/// str0m's answer, trickles a mutated candidate, and goes.
fn visit(net: &mut Network, rng: &mut fastrand::Rng, tally: &mut Tally, conn: ConnId, offer: &str) {
    let join = json!({"type": "join", "sessionId": "sim", "userId": format!("v{conn}")});
    let (joined, _) = exchange(net, conn, &join);
    assert!(joined.iter().any(|r| r["type"] == "joined"), "{joined:?}");
    let server_offer = joined.iter().find(|r| r["type"] == "offer").cloned();

    let offer = json!({"type": "offer", "sdp": offer, "requestId": "o"});
    let (after_offer, mut closed) = exchange(net, conn, &offer);
    let answered = answering(&after_offer, "o");
    assert_eq!(answered.len(), 1, "one reply to an offer: {after_offer:?}");
    tally.offers.count(answered[0]["type"] == "answer");
    let server_offer =
        server_offer.or_else(|| after_offer.iter().find(|r| r["type"] == "offer").cloned());

    if let (None, Some(server_offer)) = (closed, server_offer) {
        let sdp = server_offer["sdp"].as_str().expect("sdp");
        let offer = SdpOffer::from_sdp_string(sdp).expect("the SFU's offer parses");
        let answer = Rtc::new(net.now)
            .sdp_api()
            .accept_offer(offer)
            .expect("str0m answers the SFU's offer")
            .to_sdp_string();
        let answer = json!({"type": "answer", "sdp": mutate_sdp(rng, &answer), "requestId": "a"});
        let (after_answer, closing) = exchange(net, conn, &answer);
        tally.answers.count(taken(&after_answer, "a"));
        closed = closing;
    }
    if closed.is_none() {
        let target = if rng.bool() {
            "publisher"
        } else {
            "subscriber"
        };
        let candidate = json!({
            "type": "candidate",
            "candidate": mutate(rng, CANDIDATE, " "),
            "sdpMid": "0",
            "target": target,
            "requestId": "c",
        });
        let (after_candidate, closing) = exchange(net, conn, &candidate);
        tally.candidates.count(taken(&after_candidate, "c"));
        closed = closing;
    }
    if let Some(code) = closed {
        assert_eq!(
            code, 1011,
            "a visitor is closed only when str0m failed on it"
        );
        tally.closed += 1;
    }
    net.sfu
        .handle_message(net.now, ToShard::Disconnect { conn });
    net.pump();
    net.scripted.clear();
}

#[test]
fn mutated_offers_and_answers_cost_only_their_sender() {
    let cases = env_or("CORELAY_SDP_CASES", 1000);
    let seed = env_or("CORELAY_SDP_SEED", 0x5d9);
    let mut rng = fastrand::Rng::with_seed(seed);
    let template = publisher_offer();
    let mut tally = Tally::default();
    let mut case = 0;
    while case < cases {
        let mut net = Network::new(vec![
            PeerConfig::new("sim", "a"),
            PeerConfig::new("sim", "b"),
        ]);
        net.run_until("both publishers receive each other", |net| {
            net.receives_video(0, 10) && net.receives_video(1, 10)
        });
        for _ in 0..VISITORS_PER_ROOM.min(cases - case) {
            let offer = mutate_sdp(&mut rng, &template);
            let conn = 100 + case;
            let visited = catch_unwind(AssertUnwindSafe(|| {
                visit(&mut net, &mut rng, &mut tally, conn, &offer)
            }));
            if visited.is_err() {
                panic!("case {case} of seed {seed:#x} failed; the offer it sent:\n{offer}");
            }
            case += 1;
        }
        let before = [net.video_received(0), net.video_received(1)];
        net.run_until("the publishers' video carries on", |net| {
            net.video_received(0) >= before[0] + 50 && net.video_received(1) >= before[1] + 50
        });
        assert!(net.closed.is_empty(), "{:?}", net.closed);
        for peer in &net.peers {
            let stats = peer.stats();
            assert!(stats.violations.is_empty(), "{:?}", stats.violations);
        }
    }
    eprintln!("{cases} cases of seed {seed:#x}: {tally:?}");
    // Mutations that only ever fail to parse would test the parsers alone.
    for (outcome, n) in [
        ("offers", &tally.offers),
        ("answers", &tally.answers),
        ("candidates", &tally.candidates),
    ] {
        let enough = cases / 10;
        assert!(
            n.taken >= enough && n.refused >= enough,
            "{outcome}: {n:?} of {cases}"
        );
    }
}
