//! The corelay signaling messages (`/work/shared/PROTOCOL.md`, version 1) as typed
//! serde values: what a client sends and what it may receive.
//!
//! Server messages are parsed strictly (a listed field missing or of the wrong type
//! is a protocol violation the tests can see) but tolerate extra fields.

use serde::{Deserialize, Serialize};

/// A message from the client to the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Joins or creates the room; one per socket.
    #[serde(rename_all = "camelCase")]
    Join {
        session_id: String,
        user_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Offer of the client's publisher connection.
    #[serde(rename_all = "camelCase")]
    Offer {
        sdp: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Answer to the server's subscriber offer.
    Answer { sdp: String },
    /// Trickled ICE candidate; an empty `candidate` ends the candidates.
    #[serde(rename_all = "camelCase")]
    Candidate {
        candidate: String,
        sdp_mid: Option<String>,
        sdp_m_line_index: Option<u32>,
        target: Target,
    },
    /// Updates the sender's media state; absent fields are unchanged.
    #[serde(rename_all = "camelCase")]
    MediaState {
        #[serde(skip_serializing_if = "Option::is_none")]
        audio_enabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        video_enabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        screen_enabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        speaking: Option<bool>,
    },
    /// Leaves the room; the server closes the socket with 1000.
    Leave,
    /// The server replies `pong`.
    #[serde(rename_all = "camelCase")]
    Ping {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
}

impl ClientMessage {
    /// The JSON text frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys,
        // no fallible Serialize impls.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Which of the participant's two peer connections a candidate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The connection the client sends media on (client offers).
    #[default]
    Publisher,
    /// The connection the server sends media on (server offers).
    Subscriber,
}

/// A participant's media flags as carried by `peer_joined` and `media_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFlags {
    pub audio_enabled: bool,
    pub video_enabled: bool,
    pub screen_enabled: bool,
    pub speaking: bool,
}

/// A message from the server to the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Reply to `join`.
    #[serde(rename_all = "camelCase")]
    Joined {
        peer_id: String,
        session_id: String,
        ice_servers: Vec<serde_json::Value>,
        #[serde(default)]
        request_id: Option<String>,
    },
    /// Another participant is, or already was, in the room.
    #[serde(rename_all = "camelCase")]
    PeerJoined {
        peer_id: String,
        user_id: String,
        #[serde(flatten)]
        flags: MediaFlags,
    },
    /// A participant left, was kicked, or its socket closed.
    #[serde(rename_all = "camelCase")]
    PeerLeft { peer_id: String },
    /// A participant's media state changed.
    #[serde(rename_all = "camelCase")]
    MediaState {
        peer_id: String,
        #[serde(flatten)]
        flags: MediaFlags,
    },
    /// Answer to our publisher offer.
    #[serde(rename_all = "camelCase")]
    Answer {
        sdp: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    /// Offer of our subscriber connection.
    Offer { sdp: String },
    /// A server ICE candidate.
    #[serde(rename_all = "camelCase")]
    Candidate {
        candidate: String,
        #[serde(default)]
        sdp_mid: Option<String>,
        #[serde(default)]
        sdp_m_line_index: Option<u32>,
        #[serde(default)]
        target: Target,
    },
    /// A participant started publishing a track.
    #[serde(rename_all = "camelCase")]
    TrackPublished {
        peer_id: String,
        track_id: String,
        kind: String,
        source: String,
    },
    /// It stopped.
    #[serde(rename_all = "camelCase")]
    TrackUnpublished { peer_id: String, track_id: String },
    /// Server-detected voice activity changed.
    #[serde(rename_all = "camelCase")]
    Speaking {
        peer_id: String,
        speaking: bool,
        #[serde(default)]
        level: Option<u8>,
    },
    /// Removed by moderation; the socket then closes.
    Kicked { reason: String },
    /// A client message was refused.
    #[serde(rename_all = "camelCase")]
    Error {
        code: String,
        message: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    /// Reply to `ping`.
    #[serde(rename_all = "camelCase")]
    Pong {
        #[serde(default)]
        request_id: Option<String>,
    },
}

/// The `type` field of any JSON object, for logging messages we cannot parse.
pub fn message_type(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_str::<Typed>(text).ok().map(|t| t.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_use_protocol_names() {
        let join = ClientMessage::Join {
            session_id: "r".into(),
            user_id: "u".into(),
            ticket: None,
            request_id: Some("1".into()),
        };
        assert_eq!(
            join.to_json(),
            r#"{"type":"join","sessionId":"r","userId":"u","requestId":"1"}"#
        );
        assert_eq!(ClientMessage::Leave.to_json(), r#"{"type":"leave"}"#);
        let state = ClientMessage::MediaState {
            audio_enabled: Some(false),
            video_enabled: None,
            screen_enabled: None,
            speaking: None,
        };
        assert_eq!(
            state.to_json(),
            r#"{"type":"media_state","audioEnabled":false}"#
        );
        let cand = ClientMessage::Candidate {
            candidate: String::new(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
            target: Target::Subscriber,
        };
        assert_eq!(
            cand.to_json(),
            r#"{"type":"candidate","candidate":"","sdpMid":"0","sdpMLineIndex":0,"target":"subscriber"}"#
        );
    }

    #[test]
    fn server_messages_parse() {
        let m: ServerMessage = serde_json::from_str(
            r#"{"type":"peer_joined","peerId":"p","userId":"u","audioEnabled":true,
                "videoEnabled":false,"screenEnabled":false,"speaking":false,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::PeerJoined {
                peer_id: "p".into(),
                user_id: "u".into(),
                flags: MediaFlags {
                    audio_enabled: true,
                    ..MediaFlags::default()
                },
            }
        );
        let m: ServerMessage = serde_json::from_str(
            r#"{"type":"candidate","candidate":"","sdpMid":null,"sdpMLineIndex":null}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            ServerMessage::Candidate {
                target: Target::Publisher,
                ..
            }
        ));
        let m: ServerMessage = serde_json::from_str(r#"{"type":"pong"}"#).unwrap();
        assert_eq!(m, ServerMessage::Pong { request_id: None });
    }

    #[test]
    fn violations_fail_to_parse() {
        // Missing a listed field.
        assert!(serde_json::from_str::<ServerMessage>(r#"{"type":"peer_left"}"#).is_err());
        // Unknown type.
        assert!(serde_json::from_str::<ServerMessage>(r#"{"type":"nope"}"#).is_err());
        assert_eq!(message_type(r#"{"type":"nope"}"#).as_deref(), Some("nope"));
        assert_eq!(message_type("[1]"), None);
    }
}
