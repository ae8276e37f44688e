//! The Janus JSON API as spoken over a WebSocket: the requests a VideoRoom
//! participant sends and the parts of Janus's messages it acts on. Building and
//! parsing only, no state, so the formats are tested on their own.
//!
//! Every request carries a `transaction` that Janus echoes in its reply: `success` or
//! `error` for synchronous requests (including the plugin's `create`), `ack` and then
//! an `event` for asynchronous plugin requests (`join`, `publish`, `start`, ...). An
//! `event` without a transaction is the plugin talking on its own.

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub const PLUGIN: &str = "janus.plugin.videoroom";
/// WebSocket subprotocol of the Janus API; without it Janus refuses the requests.
pub const SUBPROTOCOL: &str = "janus-protocol";

/// VideoRoom error codes the participant reacts to.
pub const NO_SUCH_ROOM: i64 = 426;
pub const ROOM_EXISTS: i64 = 427;
/// A subscription to a feed that is gone or whose media is not up yet.
pub const NO_SUCH_FEED: i64 = 428;

/// Publishers a room we create admits: no harness scenario should hit the limit.
const MAX_PUBLISHERS: u32 = 10_000;

/// One request: `janus` is its kind, `fields` (an object) is merged in.
pub fn request(
    janus: &str,
    transaction: &str,
    session: Option<u64>,
    handle: Option<u64>,
    fields: Value,
) -> String {
    let mut m = Map::new();
    m.insert("janus".into(), janus.into());
    m.insert("transaction".into(), transaction.into());
    if let Some(s) = session {
        m.insert("session_id".into(), s.into());
    }
    if let Some(h) = handle {
        m.insert("handle_id".into(), h.into());
    }
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m).to_string()
}

/// A plugin `message` with its body and, when negotiating, a JSEP.
pub fn message(
    transaction: &str,
    session: u64,
    handle: u64,
    body: Value,
    jsep: Option<(&str, &str)>,
) -> String {
    let mut fields = json!({ "body": body });
    if let Some((kind, sdp)) = jsep {
        // Every candidate of ours is in the SDP (str0m does not gather): no trickle.
        fields["jsep"] = json!({ "type": kind, "sdp": sdp, "trickle": false });
    }
    request("message", transaction, Some(session), Some(handle), fields)
}

pub fn join_publisher(room: u64, display: &str) -> Value {
    json!({ "request": "join", "ptype": "publisher", "room": room, "display": display })
}

/// A room for the harness: no bitrate cap and no periodic keyframe requests, so
/// Janus forwards what the publishers send, like corelay.
pub fn create_room(room: u64) -> Value {
    json!({
        "request": "create",
        "room": room,
        "publishers": MAX_PUBLISHERS,
        "bitrate": 0,
        "fir_freq": 0,
        "audiocodec": "opus",
        "videocodec": "vp8",
        "notify_joining": false,
    })
}

/// The first publisher offer is `publish`, later ones renegotiate with `configure`.
pub fn publish(first: bool) -> Value {
    json!({ "request": if first { "publish" } else { "configure" } })
}

/// The multistream subscription: the first one joins the room as a subscriber, later
/// ones add feeds to the same connection. `use_msid` makes each m-section's msid the
/// publisher's, as corelay does, so received media is attributed to its publisher.
pub fn subscribe(first: bool, room: u64, private_id: u64, feeds: &[u64]) -> Value {
    let streams: Vec<Value> = feeds.iter().map(|f| json!({ "feed": f })).collect();
    if first {
        json!({
            "request": "join",
            "ptype": "subscriber",
            "room": room,
            "private_id": private_id,
            "use_msid": true,
            "streams": streams,
        })
    } else {
        json!({ "request": "subscribe", "streams": streams })
    }
}

pub fn trickle_candidate(candidate: &str, sdp_mid: Option<&str>, index: Option<u32>) -> Value {
    let candidate = if candidate.is_empty() {
        json!({ "completed": true })
    } else {
        json!({ "candidate": candidate, "sdpMid": sdp_mid, "sdpMLineIndex": index })
    };
    json!({ "candidate": candidate })
}

/// A message from Janus; fields it does not carry are `None`.
#[derive(Debug, Default, Deserialize)]
pub struct Incoming {
    pub janus: String,
    #[serde(default)]
    pub transaction: Option<String>,
    /// The handle an event concerns.
    #[serde(default)]
    pub sender: Option<u64>,
    /// `success` of `create` and `attach`: `{"id": <session or handle>}`.
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub plugindata: Option<PluginData>,
    #[serde(default)]
    pub jsep: Option<Jsep>,
    #[serde(default)]
    pub error: Option<JanusError>,
    #[serde(default)]
    pub candidate: Option<Candidate>,
    /// `hangup`'s reason.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Incoming {
    pub fn parse(text: &str) -> Result<Incoming, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The id a `create` or `attach` returned.
    pub fn created_id(&self) -> Option<u64> {
        self.data.as_ref()?.get("id")?.as_u64()
    }

    /// The VideoRoom's part of the message.
    pub fn room(&self) -> Option<&VideoRoom> {
        self.plugindata.as_ref().map(|p| &p.data)
    }

    /// The error this reply reports, Janus's own or the plugin's.
    pub fn error(&self) -> Option<(i64, String)> {
        if let Some(e) = &self.error {
            return Some((e.code, e.reason.clone()));
        }
        let room = self.room()?;
        Some((room.error_code?, room.error.clone().unwrap_or_default()))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PluginData {
    #[serde(default)]
    pub data: VideoRoom,
}

/// The VideoRoom fields we use of its events and replies.
#[derive(Debug, Default, Deserialize)]
pub struct VideoRoom {
    /// `joined`, `created`, `attached`, `updated`, `event`, ...
    #[serde(default)]
    pub videoroom: String,
    /// Our feed id (`joined`).
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub private_id: Option<u64>,
    #[serde(default)]
    pub publishers: Vec<Publisher>,
    /// The feed id of a publisher that stopped publishing or left (`"ok"` when it is
    /// us).
    #[serde(default)]
    pub unpublished: Option<Value>,
    #[serde(default)]
    pub leaving: Option<Value>,
    #[serde(default)]
    pub error_code: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
}

impl VideoRoom {
    /// The feed that stopped publishing or left, if another participant's.
    pub fn gone_feed(&self) -> Option<u64> {
        [&self.unpublished, &self.leaving]
            .into_iter()
            .find_map(|v| v.as_ref()?.as_u64())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Publisher {
    pub id: u64,
    #[serde(default)]
    pub display: Option<String>,
    #[serde(default)]
    pub streams: Vec<PublishedStream>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PublishedStream {
    /// `audio`, `video` or `data`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub mid: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Jsep {
    /// `offer` or `answer`.
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JanusError {
    pub code: i64,
    #[serde(default)]
    pub reason: String,
}

/// A trickled candidate of Janus's, or the end of them (`completed`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Candidate {
    #[serde(default)]
    pub completed: bool,
    #[serde(default)]
    pub candidate: Option<String>,
    #[serde(default, rename = "sdpMid")]
    pub sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn requests_carry_session_handle_and_fields() {
        assert_eq!(
            value(&request("create", "1", None, None, Value::Null)),
            json!({"janus": "create", "transaction": "1"})
        );
        assert_eq!(
            value(&request(
                "attach",
                "2",
                Some(7),
                None,
                json!({"plugin": PLUGIN})
            )),
            json!({"janus": "attach", "transaction": "2", "session_id": 7, "plugin": PLUGIN})
        );
        let first = message("3", 7, 9, publish(true), Some(("offer", "v=0")));
        assert_eq!(
            value(&first),
            json!({
                "janus": "message", "transaction": "3", "session_id": 7, "handle_id": 9,
                "body": {"request": "publish"},
                "jsep": {"type": "offer", "sdp": "v=0", "trickle": false},
            })
        );
        assert_eq!(
            value(&message("4", 7, 9, publish(false), None))["body"]["request"],
            "configure"
        );
    }

    #[test]
    fn the_first_subscription_joins_later_ones_subscribe() {
        let join = subscribe(true, 42, 5, &[1, 2]);
        assert_eq!(join["request"], "join");
        assert_eq!(join["ptype"], "subscriber");
        assert_eq!(
            (join["room"].as_u64(), join["private_id"].as_u64()),
            (Some(42), Some(5))
        );
        assert_eq!(join["use_msid"], true);
        assert_eq!(join["streams"], json!([{"feed": 1}, {"feed": 2}]));
        assert_eq!(
            subscribe(false, 42, 5, &[3]),
            json!({"request": "subscribe", "streams": [{"feed": 3}]})
        );
    }

    #[test]
    fn trickle_candidates_and_their_end() {
        assert_eq!(
            trickle_candidate(
                "candidate:1 1 udp 1 127.0.0.1 5 typ host",
                Some("0"),
                Some(0)
            ),
            json!({"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 5 typ host", "sdpMid": "0", "sdpMLineIndex": 0}})
        );
        assert_eq!(
            trickle_candidate("", None, None),
            json!({"candidate": {"completed": true}})
        );
    }

    #[test]
    fn parses_replies_events_and_errors() {
        // As Janus 1.1.2 sent them.
        let attached = Incoming::parse(
            r#"{"janus":"success","session_id":1,"transaction":"b","data":{"id":6342501056527345}}"#,
        )
        .unwrap();
        assert_eq!(attached.created_id(), Some(6342501056527345));
        assert_eq!(attached.error(), None);

        let no_room = Incoming::parse(
            r#"{"janus":"event","session_id":1,"transaction":"c","sender":6,"plugindata":{"plugin":"janus.plugin.videoroom","data":{"videoroom":"event","error_code":426,"error":"No such room (77)"}}}"#,
        )
        .unwrap();
        assert_eq!(no_room.sender, Some(6));
        assert_eq!(
            no_room.error(),
            Some((NO_SUCH_ROOM, "No such room (77)".into()))
        );

        let joined = Incoming::parse(
            r#"{"janus":"event","transaction":"e","sender":6,"plugindata":{"plugin":"janus.plugin.videoroom","data":{"videoroom":"joined","room":77,"id":81,"private_id":34,"publishers":[{"id":9,"display":"bob","streams":[{"type":"audio","mindex":0,"mid":"0","codec":"opus"},{"type":"video","mindex":1,"mid":"1","codec":"vp8","disabled":true}]}]}}}"#,
        )
        .unwrap();
        let room = joined.room().unwrap();
        assert_eq!(
            (room.videoroom.as_str(), room.id, room.private_id),
            ("joined", Some(81), Some(34))
        );
        let bob = &room.publishers[0];
        assert_eq!((bob.id, bob.display.as_deref()), (9, Some("bob")));
        assert_eq!(bob.streams[0].mid.as_deref(), Some("0"));
        assert!(!bob.streams[0].disabled && bob.streams[1].disabled);

        let gone = |text: &str| Incoming::parse(text).unwrap().room().unwrap().gone_feed();
        let data = |d: &str| format!(r#"{{"janus":"event","plugindata":{{"data":{d}}}}}"#);
        assert_eq!(
            gone(&data(r#"{"videoroom":"event","unpublished":9}"#)),
            Some(9)
        );
        assert_eq!(gone(&data(r#"{"videoroom":"event","leaving":9}"#)), Some(9));
        assert_eq!(gone(&data(r#"{"videoroom":"event","leaving":"ok"}"#)), None);

        let error = Incoming::parse(
            r#"{"janus":"error","transaction":"z","error":{"code":458,"reason":"No such session 2"}}"#,
        )
        .unwrap();
        assert_eq!(error.error(), Some((458, "No such session 2".into())));

        let trickle = Incoming::parse(
            r#"{"janus":"trickle","sender":6,"candidate":{"sdpMid":"0","sdpMLineIndex":0,"candidate":"candidate:1 1 udp 1 192.0.2.2 40000 typ host"}}"#,
        )
        .unwrap();
        let c = trickle.candidate.unwrap();
        assert_eq!(
            (c.sdp_mid.as_deref(), c.sdp_m_line_index, c.completed),
            (Some("0"), Some(0), false)
        );
        let done =
            Incoming::parse(r#"{"janus":"trickle","sender":6,"candidate":{"completed":true}}"#)
                .unwrap();
        assert!(done.candidate.unwrap().completed);

        assert!(Incoming::parse(r#"{"transaction":"x"}"#).is_err());
    }
}
