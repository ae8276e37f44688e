//! The JSON wire format of PROTOCOL.md: what clients send, what we answer, and the
//! validation that turns any malformed message into exactly one `error` with its code.
//!
//! Parsing goes through `serde_json::Value` first so that a message that is valid JSON
//! but wrong in shape gets `invalid_field` naming the field, not a generic `bad_json`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::IceServer;

/// PROTOCOL.md §5, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    InvalidField,
    NotJoined,
    AlreadyJoined,
    RoomMismatch,
    InvalidTicket,
    TicketExpired,
    TicketReused,
    Forbidden,
    RoomFull,
    RoomLocked,
    Banned,
    TooManyTracks,
    RateLimited,
    NegotiationFailed,
    Internal,
}

/// A refused message: the code and a sentence saying what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    #[default]
    Publisher,
    Subscriber,
}

/// The booleans a participant shows the room. `None` in an update leaves a flag as is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaStatePatch {
    pub audio_enabled: Option<bool>,
    pub video_enabled: Option<bool>,
    pub screen_enabled: Option<bool>,
    pub speaking: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaState {
    pub audio_enabled: bool,
    pub video_enabled: bool,
    pub screen_enabled: bool,
    pub speaking: bool,
}

impl Default for MediaState {
    fn default() -> Self {
        Self {
            audio_enabled: true,
            video_enabled: true,
            screen_enabled: false,
            speaking: false,
        }
    }
}

impl MediaState {
    pub fn apply(&mut self, patch: MediaStatePatch) {
        let fields = [
            (&mut self.audio_enabled, patch.audio_enabled),
            (&mut self.video_enabled, patch.video_enabled),
            (&mut self.screen_enabled, patch.screen_enabled),
            (&mut self.speaking, patch.speaking),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                *field = v;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Join {
    pub session_id: String,
    pub user_id: String,
    #[serde(default)]
    pub ticket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default)]
    pub sdp_m_line_index: Option<u32>,
    #[serde(default)]
    pub target: Target,
}

/// Messages that need the room: they are handed to the shard that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Offer { sdp: String },
    Answer { sdp: String },
    Candidate(Candidate),
    MediaState(MediaStatePatch),
    Leave,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    Join(Join),
    Signal(Signal),
    Ping,
}

/// A parsed client message with the `requestId` to echo on the direct reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_id: Option<String>,
    pub msg: ClientMsg,
}

pub const MAX_ID_LEN: usize = 256;
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Parses one text frame. On refusal the `requestId` is still returned when it could
/// be read, so the `error` carries it.
pub fn parse(text: &str) -> Result<Request, (Option<String>, Refusal)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            None,
            Refusal::new(ErrorCode::BadJson, format!("not JSON: {e}")),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((
            None,
            Refusal::new(ErrorCode::BadJson, "a message must be a JSON object"),
        ));
    };
    let request_id = match obj.remove("requestId") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if id.chars().count() <= MAX_REQUEST_ID_LEN => Some(id),
        Some(_) => {
            return Err((
                None,
                Refusal::new(
                    ErrorCode::InvalidField,
                    "requestId must be a string of at most 64 characters",
                ),
            ));
        }
    };
    let refuse = |r: Refusal| (request_id.clone(), r);
    let kind = match obj.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => {
            return Err(refuse(Refusal::new(
                ErrorCode::InvalidField,
                "type must be a string",
            )));
        }
    };
    let body = Value::Object(obj);
    let msg = match kind.as_str() {
        "join" => {
            let join: Join = fields(body).map_err(refuse)?;
            check_id("sessionId", &join.session_id).map_err(refuse)?;
            check_id("userId", &join.user_id).map_err(refuse)?;
            ClientMsg::Join(join)
        }
        "offer" | "answer" => {
            #[derive(Deserialize)]
            struct Sdp {
                sdp: String,
            }
            let Sdp { sdp } = fields(body).map_err(refuse)?;
            if sdp.trim().is_empty() {
                return Err(refuse(Refusal::new(
                    ErrorCode::InvalidField,
                    "sdp must not be empty",
                )));
            }
            ClientMsg::Signal(if kind == "offer" {
                Signal::Offer { sdp }
            } else {
                Signal::Answer { sdp }
            })
        }
        "candidate" => ClientMsg::Signal(Signal::Candidate(fields(body).map_err(refuse)?)),
        "media_state" => ClientMsg::Signal(Signal::MediaState(fields(body).map_err(refuse)?)),
        "leave" => ClientMsg::Signal(Signal::Leave),
        "ping" => ClientMsg::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(refuse(Refusal::new(
                ErrorCode::UnknownType,
                format!("unknown message type {shown:?}"),
            )));
        }
    };
    Ok(Request { request_id, msg })
}

fn fields<T: for<'de> Deserialize<'de>>(body: Value) -> Result<T, Refusal> {
    serde_json::from_value(body).map_err(|e| Refusal::new(ErrorCode::InvalidField, e.to_string()))
}

fn check_id(name: &str, value: &str) -> Result<(), Refusal> {
    let len = value.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("{name} must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("{name} must not contain control characters"),
        ));
    }
    Ok(())
}

/// Everything the server sends. Serialized once, on the shard that produced it.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ServerMsg<'a> {
    Joined {
        peer_id: &'a str,
        session_id: &'a str,
        ice_servers: &'a [IceServer],
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    PeerJoined {
        peer_id: &'a str,
        user_id: &'a str,
        #[serde(flatten)]
        state: MediaState,
    },
    PeerLeft {
        peer_id: &'a str,
    },
    MediaState {
        peer_id: &'a str,
        #[serde(flatten)]
        state: MediaState,
    },
    Answer {
        sdp: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Offer {
        sdp: &'a str,
    },
    TrackPublished {
        peer_id: &'a str,
        track_id: &'a str,
        kind: &'a str,
        source: &'a str,
    },
    TrackUnpublished {
        peer_id: &'a str,
        track_id: &'a str,
    },
    Speaking {
        peer_id: &'a str,
        speaking: bool,
        level: u8,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
}

impl ServerMsg<'_> {
    pub fn to_text(&self) -> String {
        // Serializing these plain structs cannot fail; an empty object is the safe fallback.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

pub fn error_text(refusal: &Refusal, request_id: Option<&str>) -> String {
    ServerMsg::Error {
        code: refusal.code,
        message: &refusal.message,
        request_id,
    }
    .to_text()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse(text).expect_err("must be refused").1.code
    }

    #[test]
    fn refusals_carry_the_protocol_codes() {
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[1]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::InvalidField);
        assert_eq!(
            code(r#"{"type":"join","sessionId":"r"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"join","sessionId":"","userId":"u"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"join","sessionId":"a\u0007","userId":"u"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"offer","sdp":" "}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"media_state","speaking":"yes"}"#),
            ErrorCode::InvalidField
        );
        let long_id = "x".repeat(65);
        assert_eq!(
            code(&format!(r#"{{"type":"ping","requestId":"{long_id}"}}"#)),
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn request_id_survives_a_refusal() {
        let (id, refusal) = parse(r#"{"type":"nope","requestId":"r1"}"#).unwrap_err();
        assert_eq!(id.as_deref(), Some("r1"));
        let text = error_text(&refusal, id.as_deref());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unknown_type");
        assert_eq!(v["requestId"], "r1");
    }

    #[test]
    fn server_messages_are_camel_case() {
        let text = ServerMsg::PeerJoined {
            peer_id: "p1",
            user_id: "u1",
            state: MediaState::default(),
        }
        .to_text();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "peer_joined");
        assert_eq!(v["peerId"], "p1");
        assert_eq!(v["audioEnabled"], true);
        assert_eq!(v["screenEnabled"], false);
    }

    #[test]
    fn candidate_target_defaults_to_publisher() {
        let req = parse(r#"{"type":"candidate","candidate":"","sdpMid":"0"}"#).unwrap();
        let ClientMsg::Signal(Signal::Candidate(c)) = req.msg else {
            panic!("not a candidate")
        };
        assert_eq!(c.target, Target::Publisher);
    }
}
