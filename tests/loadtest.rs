//! The load harness end to end, in process, against a fresh corelay: a short run of a
//! few rooms must join everyone, deliver media to every participant without loss on
//! loopback, leave the server empty, measure the floor on the server's core, and write
//! valid JSON and HTML reports. Each other preset runs briefly too.

mod common;

use std::time::Duration;

use common::TestServer;
use corelay_loadtest::{Preset, Scenario, html, run};

#[test]
fn short_run_delivers_media_without_loss_and_writes_reports() {
    let server = TestServer::start(&[]);
    let scenario = Scenario {
        url: format!("ws://{}", server.addr),
        rooms: 3,
        peers: 3,
        duration: Duration::from_secs(4),
        room_prefix: "harness".into(),
        // One measuring participant per room; the others count packets.
        measure_fraction: 0.3,
        // Local: CPU and memory from /proc, and the floor on the server's core.
        server_pid: Some(server.pid()),
        ..Scenario::preset(Preset::Meeting)
    };
    let mut progress = Vec::new();
    let report = run(&scenario, |sample| progress.push(sample.clone())).expect("run starts");
    eprint!("{}", report.table());

    common::assert_clean_run(&report);
    let peers = &report.peers;
    assert_eq!(peers.joins, 9);
    assert_eq!(common::first_videos(&report), 9);
    assert_eq!(peers.measured, 3, "one measuring participant per room");
    // The measuring participants also see where their decoders can start. Every
    // subscriber's video starts at a keyframe, so that is their first video packet.
    let video = report.first_video_ms.expect("first video");
    let keyframe = report.first_keyframe_ms.expect("first keyframe");
    assert_eq!(keyframe.count, 3);
    assert!(
        keyframe.min >= video.min && keyframe.max <= video.max,
        "{keyframe:?} {video:?}"
    );
    assert_eq!(peers.ends.get("left"), Some(&9), "{:?}", peers.ends);
    let latency = report.latency_ms.expect("latency measured");
    assert!(latency.count > 0 && latency.min >= 0.0);
    assert!(report.rates.server_forwarded_pps.is_some_and(|p| p > 0.0));
    assert_eq!(
        report.server.udp_rx_dropped,
        Some(0),
        "the server's socket kept up"
    );
    assert_eq!(report.series.len(), progress.len());
    // The floor ran on a core a shard is pinned to, with the run's datagrams.
    let floor = report.server.floor.expect("floor measured");
    assert!(floor.cpu.is_some(), "{floor:?}");
    assert_eq!(Some(floor.datagram_bytes), report.mean_datagram_bytes());
    assert!(
        floor.us_per_packet > 0.0 && floor.delivered_pct > 0.0,
        "{floor:?}"
    );
    assert!(report.server.cpu_vs_floor().is_some());
    assert!(report.table().contains("x the floor)"));

    let dir = std::env::temp_dir().join(format!("corelay-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json_path, html_path) = (dir.join("report.json"), dir.join("report.html"));
    std::fs::write(&json_path, report.to_json()).expect("write JSON");
    std::fs::write(&html_path, html::render(&report)).expect("write HTML");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("read JSON"))
            .expect("JSON parses");
    for key in [
        "scenario",
        "peers",
        "join_ms",
        "connect_ms",
        "first_video_ms",
        "first_keyframe_ms",
        "latency_ms",
        "loss",
        "rates",
        "server",
        "harness",
        "warnings",
        "series",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    assert_eq!(json["scenario"]["rooms"], 3);
    assert_eq!(json["peers"]["joins"], 9);
    assert!(json["server"]["floor"]["us_per_packet"].is_number());
    let series = json["series"].as_array().expect("series");
    assert!(!series.is_empty());
    assert!(series.iter().all(|s| s["rx_pps"].is_number()));

    let html = std::fs::read_to_string(&html_path).expect("read HTML");
    assert!(html.contains("<svg"), "charts are inline SVG");
    for external in ["http://", "https://", "<script"] {
        assert!(!html.contains(external), "HTML references {external}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// A short run of `preset` against a fresh server, with its shape trimmed by `shape`.
fn short_run(preset: Preset, shape: impl FnOnce(Scenario) -> Scenario) -> corelay_loadtest::Report {
    let server = TestServer::start(&[]);
    let scenario = shape(Scenario {
        url: format!("ws://{}", server.addr),
        duration: Duration::from_secs(4),
        measure_fraction: 0.5,
        room_prefix: format!("{preset:?}"),
        ..Scenario::preset(preset)
    });
    let report = run(&scenario, |_| {}).expect("run starts");
    eprint!("{}", report.table());
    report
}

#[test]
fn churn_replaces_who_leaves_and_the_server_lets_go() {
    let report = short_run(Preset::Churn, |s| Scenario {
        rooms: 2,
        lifetime: Some(Duration::from_secs(2)),
        ..s
    });
    common::assert_clean_run(&report);
    let peers = &report.peers;
    assert!(
        peers.joins > peers.planned,
        "replacements joined: {peers:?}"
    );
    assert_eq!(common::first_videos(&report), peers.joins);
    // Half leave with `leave`, half drop their socket.
    let ends = |label: &str| peers.ends.get(label).copied().unwrap_or(0);
    assert!(ends("left") > 0 && ends("aborted") > 0, "{:?}", peers.ends);
}

#[test]
fn voice_rooms_carry_audio_only() {
    // Two workers, a room each: their figures are merged.
    let report = short_run(Preset::Voice, |s| Scenario {
        rooms: 2,
        threads: 2,
        ..s
    });
    common::assert_clean_run(&report);
    assert_eq!(report.peers.joins, 20);
    assert_eq!(common::first_videos(&report), 0, "nobody sent video");
    assert_eq!(report.harness.threads, 2);
}

#[test]
fn webinar_subscribers_receive_the_one_publisher() {
    let report = short_run(Preset::Webinar, |s| s);
    common::assert_clean_run(&report);
    assert_eq!(report.peers.joins, 25);
    // Everyone but the publisher, who has no one to watch.
    assert_eq!(common::first_videos(&report), 24);
}

#[test]
fn a_run_whose_server_goes_away_stops_and_says_so() {
    let mut server = TestServer::start(&[]);
    let scenario = endless_meeting(&server, "vanishing");
    let planned = scenario.total_peers() as u64;
    let report = run(&scenario, |sample| {
        if sample.joined == planned {
            server.kill();
        }
    })
    .expect("run starts");
    eprint!("{}", report.table());

    let peers = &report.peers;
    assert_eq!(peers.joins, planned, "{:?}", peers.join_failures);
    assert_eq!(
        peers.ends.values().sum::<u64>(),
        planned,
        "{:?}",
        peers.ends
    );
    assert!(
        peers
            .ends
            .keys()
            .all(|end| end.starts_with("connection lost")),
        "{:?}",
        peers.ends
    );
    assert_eq!(peers.cut_off, planned);
    let stopped = report.stopped_early_s.expect("stopped early");
    assert!(report.elapsed_s < 60.0, "{}", report.elapsed_s);
    assert!(
        report.warnings[0].starts_with(&format!("THE RUN STOPPED AT {stopped:.0} s OF 600")),
        "{:?}",
        report.warnings
    );
}

/// A server that closes every participant (its message limit is below a publisher's
/// offer, so each gets 1009) is reported as such: every session cut off with the
/// close code the server sent, and the run stops early.
#[test]
fn participants_the_server_closes_are_reported_with_its_close_code() {
    let server = TestServer::start(&["--max-message-size", "1024"]);
    let scenario = endless_meeting(&server, "too-big");
    let planned = scenario.total_peers() as u64;
    let report = run(&scenario, |_| {}).expect("run starts");
    eprint!("{}", report.table());

    let peers = &report.peers;
    assert_eq!(peers.joins, planned, "{:?}", peers.join_failures);
    assert_eq!(
        peers.ends.get("closed 1009"),
        Some(&planned),
        "{:?}",
        peers.ends
    );
    assert_eq!(peers.cut_off, planned);
    assert!(report.stopped_early_s.is_some());
    assert!(report.elapsed_s < 60.0, "{}", report.elapsed_s);
}

/// Two meeting rooms for far longer than a test may take: the run must notice when
/// it has nobody left.
fn endless_meeting(server: &TestServer, room_prefix: &str) -> Scenario {
    Scenario {
        url: format!("ws://{}", server.addr),
        rooms: 2,
        duration: Duration::from_secs(600),
        room_prefix: room_prefix.into(),
        ..Scenario::preset(Preset::Meeting)
    }
}
