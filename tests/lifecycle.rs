//! Deterministic runs of one shard's SFU over the in-memory network (`sim`), for what
//! needs time to pass or packets to vanish: ICE consent expiry removes a participant
//! that went silent, NACKs recover lost packets from the resend buffer, a subscriber
//! right after another gets its own keyframe without a long throttle (and only once
//! its connection is up), voice activity follows the audio level, a forwarded packet
//! leaves in the batch that brought it, a late connection starts with live media, a
//! shard whose socket drops datagrams stops asking publishers for resends, the
//! tracks of publishers who left leave no streams on a long-lived subscriber, a
//! publisher that stops and starts again is forwarded each time, one that moved to a
//! new address and restarted ICE is forwarded again, one that closed its connection
//! leaves, and one that sends on ever-new SSRCs, or floods, is held to its allowance.

#[path = "sim/mod.rs"]
mod sim;

use std::time::{Duration, Instant};

use corelay_loadtest::{Leg, MediaKind, PeerConfig, TrackStats};
use sim::{Network, is_rtp, leg_addr, moved_addr};

fn peer(user: &str, publish: bool) -> PeerConfig {
    PeerConfig {
        publish_audio: publish,
        publish_video: publish,
        ..PeerConfig::new("sim", user)
    }
}

fn peer_id(net: &Network, i: usize) -> String {
    net.peers[i].peer_id().expect("joined").to_owned()
}

/// A publisher that sends a keyframe only when asked (and at its start).
fn publisher_on_request() -> PeerConfig {
    let mut config = peer("pub", true);
    config.media.keyframe_interval = Duration::from_secs(600);
    config
}

/// Lets peer `i`'s held subscriber connection through; returns when it came up and
/// how long its first video (a keyframe: the server starts video at one) took after.
fn connect_and_time_first_video(net: &mut Network, i: usize) -> (Instant, Duration) {
    net.release_held();
    net.run_until("the subscriber connects", |net| {
        net.peers[i].stats().subscriber_connected
    });
    let connected = net.now;
    net.run_until("the subscriber's first video", |net| {
        net.receives_video(i, 1)
    });
    (connected, net.now - connected)
}

fn offered_publishers(net: &Network, i: usize) -> Vec<String> {
    net.peers[i]
        .stats()
        .active_msids()
        .into_iter()
        .map(|(stream, _)| stream)
        .collect()
}

#[test]
fn a_silent_participant_is_removed_when_ice_consent_expires() {
    let mut net = Network::new(vec![peer("a", true), peer("b", true), peer("c", true)]);
    net.run_until("everyone receives video", |net| {
        (0..3).all(|i| net.receives_video(i, 10))
    });
    let gone = peer_id(&net, 2);

    // c's network dies; its WebSocket stays open, so only ICE can notice.
    net.gone
        .extend([leg_addr(2, Leg::Publisher), leg_addr(2, Leg::Subscriber)]);
    net.run_until("c is removed", |net| net.closed.contains(&(2, 1011)));
    net.run_until("the others are told and renegotiated", |net| {
        (0..2).all(|i| {
            net.peers[i].stats().peers_left.contains(&gone)
                && !offered_publishers(net, i).contains(&gone)
        })
    });
    assert_eq!(net.sfu.counters.forced_disconnect, 1);
    assert_eq!(net.sfu.counters.active_participants, 2);

    // The two who remain still exchange media.
    let before = net.peers[0]
        .stats()
        .tracks
        .iter()
        .map(|t| t.received)
        .sum::<u64>();
    net.run_until("media keeps flowing", |net| {
        net.peers[0]
            .stats()
            .tracks
            .iter()
            .map(|t| t.received)
            .sum::<u64>()
            > before + 50
    });
}

#[test]
fn nacks_recover_lost_video_from_the_resend_buffer() {
    let mut net = Network::new(vec![peer("pub", true), peer("sub", false)]);
    net.run_until("the subscriber receives video", |net| {
        net.receives_video(1, 10)
    });
    // 10 % keeps the resends under the 15 % share str0m may spend on them.
    let video = video_after_losing(&mut net, 10, Duration::from_millis(500));
    assert_eq!(video.lost, 0, "every lost packet was resent: {video:?}");
    assert!(
        video.reordered > 0,
        "resends arrive late, so losses did happen"
    );
    let violations = net.peers[1].stats().violations;
    assert!(violations.is_empty(), "{violations:?}");
}

/// Loses every `every`-th RTP datagram on the way to peer 1's subscriber leg (resends
/// included) for 300 more video packets, then stops and lets the last resends land
/// for `settle`. Returns what peer 1 got of the video.
fn video_after_losing(net: &mut Network, every: u64, settle: Duration) -> TrackStats {
    net.lose_rtp_to = Some((1, every));
    let target = net.video_received(1) + 300;
    net.run_until("300 more video packets", |net| {
        net.video_received(1) >= target
    });
    net.lose_rtp_to = None;
    let end = net.now + settle;
    net.run_until("the last resends land", |net| net.now >= end);
    net.peers[1]
        .stats()
        .tracks
        .into_iter()
        .find(|t| t.kind == MediaKind::Video)
        .expect("video")
}

/// A subscriber 300 ms away still gets its losses resent: its video streams keep
/// packets for three round trips (capped at 1 s). At the 200 ms floor, every packet
/// would be gone before its NACK came back.
#[test]
fn a_distant_subscriber_gets_resends_from_a_window_fitted_to_its_round_trip() {
    let mut net = Network::new(vec![peer("pub", true), peer("far", false)]);
    net.delay = Some((1, Duration::from_millis(150)));
    net.run_until("the subscriber receives video", |net| {
        net.receives_video(1, 10)
    });
    let limit = net.now + Duration::from_secs(10);
    let far = loop {
        let far = net.participant(1);
        if far.rtt_ms.is_some() {
            break far;
        }
        assert!(net.now < limit, "no round trip measured: {far:?}");
        net.tick();
    };
    let rtt = far.rtt_ms.unwrap_or_default();
    assert!((295.0..320.0).contains(&rtt), "round trip {rtt} ms");
    assert_eq!(far.resend_window_ms, 1000, "3 x 300 ms + 50 ms, a step up");
    let metrics = net.metrics();
    let sample = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    let reports = sample("rtc_subscriber_rtt_seconds_count{shard=\"0\"}");
    assert!(reports > 0.0, "the round trip is on /metrics");
    let within = |le: &str| {
        sample(&format!(
            "rtc_subscriber_rtt_seconds_bucket{{shard=\"0\",le=\"{le}\"}}"
        ))
    };
    assert_eq!(within("0.2"), 0.0, "none nearer than 200 ms:\n{metrics}");
    assert_eq!(within("0.5"), reports, "all within 500 ms:\n{metrics}");

    // The loss is periodic, and so is the media: at some periods it lines up with a
    // resend and its retries too (1 in 10 lost one packet for good), or misses video
    // entirely. 1 in 20 does neither.
    let video = video_after_losing(&mut net, 20, Duration::from_secs(2));
    assert_eq!(video.lost, 0, "every lost packet was resent: {video:?}");
    assert!(video.reordered > 0, "losses did happen");
}

/// A subscriber that connects just after another needs a keyframe of its own (the one
/// requested for the first came before it). It used to wait out a fixed 300 ms
/// throttle since that first request.
#[test]
fn a_subscriber_right_after_another_gets_its_own_keyframe_quickly() {
    // Every keyframe but the first is one the server asked for.
    let mut net = Network::new(vec![
        publisher_on_request(),
        peer("first", false),
        peer("second", false),
    ]);
    let second = leg_addr(2, Leg::Subscriber);
    net.hold_all_from = Some(second);
    let requests = |net: &Network| net.peers[0].stats().keyframe_requests;
    let keyframes = |net: &Network, i: usize| {
        let stats = net.peers[i].stats();
        stats
            .tracks
            .iter()
            .filter(|t| t.kind == MediaKind::Video)
            .map(|t| t.keyframes)
            .sum::<u64>()
    };
    net.run_until("the first subscriber's keyframe", |net| {
        keyframes(net, 1) > 0
    });
    // The first video keyframe was the request made when the first subscriber connected.
    let first_request = net.now;
    let asked = requests(&net);
    assert!(asked > 0, "the first keyframe was requested");

    // The second subscriber's connection gets through 150 ms after that request.
    let release = first_request + Duration::from_millis(150);
    net.run_until("150 ms on", |net| net.now >= release);
    let (connected, waited) = connect_and_time_first_video(&mut net, 2);
    assert!(connected - first_request < Duration::from_millis(300));
    assert_eq!(keyframes(&net, 2), 1);
    assert_eq!(
        requests(&net),
        asked + 1,
        "one more request, for the second"
    );
    assert!(
        waited < Duration::from_millis(50),
        "the second subscriber waited {waited:?} for its first keyframe"
    );
}

/// A keyframe asked for while the subscriber's connection is not up reaches nobody,
/// and the request that counts (when it connects) then waited out the throttle.
#[test]
fn a_keyframe_is_asked_for_when_the_subscriber_can_receive_it() {
    let mut net = Network::new(vec![publisher_on_request(), peer("sub", false)]);
    net.hold_all_from = Some(leg_addr(1, Leg::Subscriber));
    net.run_until("the subscriber has the publisher's tracks", |net| {
        !offered_publishers(net, 1).is_empty()
    });
    let later = net.now + Duration::from_millis(200);
    net.run_until("200 ms of media", |net| net.now >= later);
    assert_eq!(
        net.peers[0].stats().keyframe_requests,
        0,
        "a keyframe was asked for before the subscriber could receive it"
    );

    let (_, waited) = connect_and_time_first_video(&mut net, 1);
    assert!(
        waited < Duration::from_millis(50),
        "the first video came {waited:?} after connecting"
    );
}

#[test]
fn voice_activity_follows_the_audio_level() {
    let mut net = Network::new(vec![peer("talker", true), peer("listener", false)]);
    net.run_until("audio flows", |net| {
        net.peers[1]
            .stats()
            .tracks
            .iter()
            .any(|t| t.kind == MediaKind::Audio && t.received > 10)
    });
    let talker = peer_id(&net, 0);
    let speaking = |net: &Network| {
        let stats = net.peers[1].stats();
        stats
            .peers
            .get(&talker)
            .map(|p| (p.flags.speaking, p.speaking_events))
    };
    assert_eq!(speaking(&net), Some((false, 0)), "silence is not speech");

    net.peers[0].set_audio_level(-20);
    net.run_until("speaking starts", |net| speaking(net) == Some((true, 1)));
    net.peers[0].set_audio_level(-127);
    net.run_until("speaking stops", |net| speaking(net) == Some((false, 2)));
    let level = net.peers[1].stats().peers[&talker].level;
    assert!(
        level.is_some_and(|l| l > 60),
        "quiet level reported: {level:?}"
    );
    assert!(
        net.peers[0].stats().violations.is_empty(),
        "the talker is not told about itself"
    );
}

/// str0m sends what was written to a connection only after a tick, and a datagram
/// from that connection earlier in the same batch ticks it *before* the write. The
/// write must still be ticked out in this batch: left to the connection's timer, it
/// waited, and on a saturated shard (timers starved) send queues grew without bound.
#[test]
fn a_packet_leaves_in_the_batch_that_brought_it() {
    let mut net = Network::new(vec![peer("pub", true), peer("sub", false)]);
    net.run_until("the subscriber receives video", |net| {
        net.receives_video(1, 10)
    });
    let subscriber = leg_addr(1, Leg::Subscriber);
    net.hold_rtp_of = vec![0];
    net.hold_all_from = Some(subscriber);
    let held_from = |net: &Network, from_subscriber: bool| {
        net.held
            .iter()
            .rev()
            .find(|(source, _)| (*source == subscriber) == from_subscriber)
            .cloned()
    };
    net.run_until("the subscriber connection sends something", |net| {
        held_from(net, true).is_some() && held_from(net, false).is_some()
    });
    let batch = [held_from(&net, true), held_from(&net, false)].map(Option::unwrap);
    let forwarded = net.sfu.counters.forwarded_packets;

    net.sfu
        .handle_datagrams(net.now, batch.iter().map(|(s, d)| (*s, d.as_slice())));
    assert_eq!(net.sfu.counters.forwarded_packets, forwarded + 1);
    let sent: Vec<_> = net.sfu.transmits.drain().collect();
    assert!(
        sent.iter()
            .any(|t| t.destination == subscriber && is_rtp(&t.contents)),
        "the forwarded packet waits for a timer instead of leaving now"
    );
}

/// str0m queues media written to a connection whose DTLS is not up yet and sends it
/// all once it is: a subscriber that connected late got a burst of stale media, and
/// one that never connected held a growing queue until it was removed.
#[test]
fn a_late_connection_starts_with_live_media() {
    let mut net = Network::new(vec![peer("pub", true), peer("sub", false)]);
    // The subscriber connection's ICE and DTLS are held up for two seconds, while its
    // signaling (and so its subscriptions) goes through.
    net.hold_all_from = Some(leg_addr(1, Leg::Subscriber));
    let late = net.now + Duration::from_secs(2);
    net.run_until("two seconds of publishing", |net| net.now >= late);
    assert!(!net.peers[1].stats().subscriber_connected);
    assert!(
        !offered_publishers(&net, 1).is_empty(),
        "the subscriber has its offer"
    );
    net.hold_all_from = None;
    net.held.clear();

    let audio = |net: &Network| {
        let stats = net.peers[1].stats();
        stats
            .tracks
            .iter()
            .find(|t| t.kind == MediaKind::Audio)
            .and_then(|t| t.latency_us)
    };
    net.run_until("the subscriber receives audio", |net| {
        audio(net).is_some_and(|l| l.count >= 20)
    });
    let latency = audio(&net).expect("audio latency");
    assert!(
        latency.max < 200_000,
        "the first audio was stale: {latency:?}"
    );
}

/// A shard whose socket drops datagrams lost those packets itself: asking publishers
/// to resend them only adds to the backlog, so it stops until it has caught up.
#[test]
fn an_overloaded_shard_stops_asking_publishers_for_resends() {
    let mut net = Network::new(vec![peer("pub", true), peer("sub", false)]);
    net.run_until("the subscriber receives video", |net| {
        net.receives_video(1, 10)
    });
    // The streams the publisher sends media on; resends come on another (RTX).
    let media: Vec<u32> = net.rtp_from[0].keys().copied().collect();
    let resends = |net: &Network| -> u64 {
        net.rtp_from[0]
            .iter()
            .filter(|(ssrc, _)| !media.contains(ssrc))
            .map(|(_, n)| n)
            .sum()
    };
    net.lose_rtp_from = Some((0, 10));
    net.run_until("the publisher resends what was lost", |net| {
        resends(net) > 0
    });

    net.socket_dropping = true;
    let dropping = net.now + Duration::from_millis(100);
    net.run_until("the socket drops for 100 ms", |net| net.now >= dropping);
    assert_eq!(net.sfu.counters.overloaded, 1, "the shard is overloaded");
    assert_eq!(net.sfu.counters.overloads, 1);
    let (resent, received) = (resends(&net), net.video_received(1));
    let end = net.now + Duration::from_secs(1);
    net.run_until("a second more of drops and loss", |net| net.now >= end);
    assert_eq!(resends(&net), resent, "no NACKs reached the publisher");
    assert!(net.video_received(1) > received + 20, "media still flows");

    net.socket_dropping = false;
    net.run_until("the shard recovers", |net| net.sfu.counters.overloaded == 0);
    net.run_until("NACKs resume", |net| resends(net) > resent);
    assert_eq!(net.sfu.counters.overloads, 1);
}

/// A long-lived participant's subscriber connection outlives many publishers: each
/// one gone leaves an inactive m-line (str0m never reuses one), but no send stream
/// for str0m to keep, tick and report on, so no SSRC in the offers either.
#[test]
fn publishers_that_left_leave_no_streams_on_a_long_lived_subscriber() {
    const VISITS: usize = 10;
    let mut net = Network::new(vec![peer("stays", false), peer("visitor", true)]);
    let visitor_video = |net: &Network| {
        let id = net.peers[1].peer_id()?;
        let received = net.peers[0].stats().track(id, MediaKind::Video)?.received;
        (received > 10).then_some(())
    };
    net.run_until("the first visitor's video", |net| {
        visitor_video(net).is_some()
    });
    for _ in 0..VISITS {
        net.peers[1].leave();
        net.run_until("the visitor's tracks are retired", |net| {
            offered_publishers(net, 0).is_empty()
        });
        net.replace(1, peer("visitor", true));
        net.run_until("the next visitor's video", |net| {
            visitor_video(net).is_some()
        });
    }

    let stats = net.peers[0].stats();
    let offer = stats.messages_of("offer").last().expect("an offer");
    let offer: serde_json::Value = serde_json::from_str(&offer.raw).expect("json");
    let sdp = offer["sdp"].as_str().expect("sdp");
    let sections: Vec<&str> = sdp.split("\r\nm=").skip(1).collect();
    let inactive: Vec<&&str> = sections
        .iter()
        .filter(|m| m.contains("a=inactive"))
        .collect();
    assert_eq!(
        inactive.len(),
        2 * VISITS,
        "an audio and a video m-line per visitor gone"
    );
    for section in inactive {
        assert!(
            !section.contains("a=ssrc:"),
            "a retired m-line declares a stream: {section}"
        );
    }
    assert_eq!(
        sections.len() - 2 * VISITS,
        2,
        "the visitor's live audio and video"
    );
    for track in &stats.tracks {
        assert_eq!(
            (track.lost, track.duplicates, track.reordered),
            (0, 0, 0),
            "{track:?}"
        );
    }
}

/// A publisher that stops and starts again (as apps toggle a camera or a screen share
/// with `removeTrack` and `addTrack`) is forwarded each time: only its sending m-lines
/// count as tracks. Its offers are refused once all its m-lines, stopped and inactive
/// ones included, pass four per allowed track.
#[test]
fn a_publisher_that_stops_and_starts_again_is_forwarded_each_time() {
    let mut net = Network::new(vec![peer("pub", true), peer("sub", false)]);
    let videos = |net: &Network| {
        let stats = net.peers[1].stats();
        stats
            .tracks
            .iter()
            .filter(|t| t.kind == MediaKind::Video && t.received > 0)
            .count()
    };
    net.run_until("the first video", |net| videos(net) == 1);
    let restart = |net: &mut Network| {
        let now = net.now;
        net.peers[0].set_publish(false, false, now);
        net.run_until("the publisher's tracks are retired", |net| {
            offered_publishers(net, 1).is_empty()
        });
        let now = net.now;
        net.peers[0].set_publish(true, true, now);
    };
    // Each start adds an audio and a video m-line: 8 starts fill the 16 allowed.
    for started in 2..=8 {
        restart(&mut net);
        net.run_until("the new video", |net| videos(net) == started);
    }
    assert!(net.peers[0].stats().errors.is_empty());

    restart(&mut net);
    net.run_until("the ninth start is refused", |net| {
        net.peers[0].stats().has_error("too_many_tracks")
    });
    let stats = net.peers[0].stats();
    let error = stats.errors.first().expect("the error");
    assert!(error.message.contains("at most 16 m-lines"), "{error:?}");
}

/// A publisher whose network changed restarts ICE from its new address, as a
/// browser's `restartIce()` does: the server answers with new credentials, learns
/// the new address from the checks, and forwards its media again.
#[test]
fn a_publisher_that_moved_restarts_ice_and_is_forwarded_again() {
    let mut net = Network::new(vec![peer("mover", true), peer("watcher", false)]);
    net.run_until("video", |net| net.video_received(1) > 10);
    net.gone.push(leg_addr(0, Leg::Publisher));
    let now = net.now;
    net.peers[0].move_publisher(moved_addr(0, Leg::Publisher), now);
    let before = net.video_received(1);
    net.run_until("video from the new address", |net| {
        net.video_received(1) > before + 50
    });
    let stats = net.peers[0].stats();
    assert!(
        stats.errors.is_empty() && stats.violations.is_empty(),
        "{:?} {:?}",
        stats.errors,
        stats.violations
    );
    assert!(net.closed.is_empty(), "{:?}", net.closed);
}

/// A client that closes its publisher connection (a browser tab closing sends a DTLS
/// close_notify before its WebSocket `leave` arrives) leaves the room, and the shard
/// keeps serving the others.
#[test]
fn a_client_that_closes_its_connection_leaves() {
    let mut net = Network::new(vec![peer("closer", true), peer("watcher", true)]);
    net.run_until("video both ways", |net| {
        net.video_received(0) > 10 && net.video_received(1) > 10
    });
    let gone = peer_id(&net, 0);
    let now = net.now;
    net.peers[0].close_connection(Leg::Publisher, now);
    net.run_until("the closer is removed", |net| {
        net.closed.contains(&(0, 1011))
    });
    net.run_until("the watcher is told", |net| {
        net.peers[1].stats().peers_left.contains(&gone)
    });
}

#[test]
fn a_client_that_sends_each_packet_on_a_new_ssrc_is_held_to_its_allowance() {
    let mut net = Network::new(vec![
        peer("rotator", true),
        peer("steady", true),
        peer("watcher", false),
    ]);
    net.run_until("everyone joined", |net| {
        net.peers.iter().all(|p| p.peer_id().is_some())
    });
    let (rotator, steady) = (peer_id(&net, 0), peer_id(&net, 1));
    let received = |net: &Network, from: &str, kind| {
        net.peers[2]
            .stats()
            .track(from, kind)
            .map_or(0, |t| t.received)
    };
    net.run_until("media from both publishers", |net| {
        received(net, &rotator, MediaKind::Video) > 10
            && received(net, &steady, MediaKind::Video) > 10
    });
    net.peers[0].rotate_audio_ssrc();
    // At 50 audio packets a second, the allowance (128) goes in about 3 s.
    net.run_until("new SSRCs are refused", |net| {
        refused(net, "rtc_rtp_ssrc_refused_total") > 50
    });
    let audio = received(&net, &rotator, MediaKind::Audio);
    let video = [&rotator, &steady].map(|p| received(&net, p, MediaKind::Video));
    let until = net.now + Duration::from_secs(2);
    net.run_until("two more seconds", |net| net.now >= until);
    assert_eq!(
        received(&net, &rotator, MediaKind::Audio),
        audio,
        "audio on new SSRCs is no longer forwarded"
    );
    // The rotator's video keeps its SSRC, so it still flows, as does everyone else's.
    for (p, before) in [&rotator, &steady].into_iter().zip(video) {
        assert!(
            received(&net, p, MediaKind::Video) > before + 50,
            "video from {p}"
        );
    }
}

#[test]
fn a_client_that_floods_is_held_to_its_rate() {
    let mut flooder = peer("flooder", true);
    // About 10,000 full-size video packets a second, twice the allowance.
    flooder.media.video_kbps = 100_000;
    let mut net = Network::new(vec![flooder, peer("steady", true), peer("watcher", false)]);
    net.run_until("everyone joined", |net| {
        net.peers.iter().all(|p| p.peer_id().is_some())
    });
    let (flooder, steady) = (peer_id(&net, 0), peer_id(&net, 1));
    let received = |net: &Network, from: &str| {
        net.peers[2]
            .stats()
            .track(from, MediaKind::Video)
            .map_or(0, |t| t.received)
    };
    net.run_until("the flood is refused", |net| {
        refused(net, "rtc_udp_rate_refused_total") > 1_000
    });
    let before = [&flooder, &steady].map(|p| received(&net, p));
    let sent_before = net.peers[0].sent().video_packets;
    let start = net.now;
    net.run_until("three more seconds", |net| {
        net.now >= start + Duration::from_secs(3)
    });
    let flooded = received(&net, &flooder) - before[0];
    // Three seconds may touch four of the allowance's windows; RTCP and STUN share it.
    assert!(
        (5_000..=4 * 5_000).contains(&flooded),
        "{flooded} of the flooder's packets forwarded in 3 s"
    );
    let sent = net.peers[0].sent().video_packets - sent_before;
    assert!(sent > 2 * flooded, "the flooder sent {sent} in 3 s");
    let steady_video = net.peers[2].stats();
    let steady_video = steady_video
        .track(&steady, MediaKind::Video)
        .expect("steady video");
    assert!(
        steady_video.received > before[1] + 50,
        "the steady publisher still flows"
    );
    assert_eq!(steady_video.lost, 0, "and loses nothing");
}

fn refused(net: &Network, metric: &str) -> u64 {
    let series = format!("{metric}{{shard=\"0\"}}");
    net.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}
