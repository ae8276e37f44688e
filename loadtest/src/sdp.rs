//! Reads what the server's SDP says on the wire: each m-section's mid, kind, msid,
//! direction and payload types, and the candidate addresses.
//!
//! The tests assert on the wire text (the protocol promises the publisher's peer id
//! as the msid stream id), so this deliberately does not go through str0m's parsed
//! model, which may normalise or drop what it does not use.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use str0m::Candidate;
use str0m::net::Protocol;

/// One m-section of a server SDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection {
    /// `a=mid` value (empty when missing).
    pub mid: String,
    /// `audio`, `video` or `application`.
    pub kind: String,
    /// First token of `a=msid`: the publisher's peer id for forwarded tracks.
    pub stream_id: Option<String>,
    /// Second token of `a=msid`: the publisher's own track id.
    pub track_id: Option<String>,
    /// `sendonly`, `recvonly`, `sendrecv` or `inactive` (session default applied).
    pub direction: String,
    /// Port 0: the section is rejected or stopped.
    pub port_zero: bool,
    /// `a=rtpmap` payload type to encoding name, e.g. `96 -> "VP8"`.
    pub codecs: BTreeMap<u8, String>,
}

impl MediaSection {
    /// Whether the offerer is sending on this section: live port, a sending
    /// direction, and an msid to attribute it to.
    pub fn is_active_send(&self) -> bool {
        !self.port_zero
            && matches!(self.direction.as_str(), "sendonly" | "sendrecv")
            && self.stream_id.is_some()
    }
}

/// The parts of an SDP the client cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdpSummary {
    /// m-sections in order.
    pub media: Vec<MediaSection>,
    /// Addresses of UDP `a=candidate` lines.
    pub candidates: Vec<SocketAddr>,
}

/// Parses SDP text leniently: lines it does not understand are skipped.
pub fn summarize(sdp: &str) -> SdpSummary {
    let mut out = SdpSummary::default();
    let mut session_direction = "sendrecv".to_string();
    let mut current: Option<MediaSection> = None;
    // Explicit per-section direction, applied when the section ends.
    let mut section_direction: Option<String> = None;

    for line in sdp.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("m=") {
            if let Some(mut m) = current.take() {
                m.direction = section_direction
                    .take()
                    .unwrap_or(session_direction.clone());
                out.media.push(m);
            }
            let mut tokens = rest.split_whitespace();
            current = Some(MediaSection {
                mid: String::new(),
                kind: tokens.next().unwrap_or_default().to_string(),
                stream_id: None,
                track_id: None,
                direction: String::new(),
                port_zero: tokens.next().is_some_and(|p| p == "0"),
                codecs: BTreeMap::new(),
            });
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        if let Some(c) = attr.strip_prefix("candidate:") {
            if let Ok(c) = Candidate::from_sdp_string(&format!("candidate:{c}"))
                && c.proto() == Protocol::Udp
                && !out.candidates.contains(&c.addr())
            {
                out.candidates.push(c.addr());
            }
            continue;
        }
        if let dir @ ("sendonly" | "recvonly" | "sendrecv" | "inactive") = attr {
            match current {
                Some(_) => section_direction = Some(dir.to_string()),
                None => session_direction = dir.to_string(),
            }
            continue;
        }
        let Some(m) = current.as_mut() else {
            continue;
        };
        if let Some(mid) = attr.strip_prefix("mid:") {
            m.mid = mid.to_string();
        } else if let Some(msid) = attr.strip_prefix("msid:") {
            let mut tokens = msid.split_whitespace();
            m.stream_id = tokens.next().map(str::to_string);
            m.track_id = tokens.next().map(str::to_string);
        } else if let Some(map) = attr.strip_prefix("rtpmap:") {
            let mut tokens = map.split_whitespace();
            let pt = tokens.next().and_then(|p| p.parse::<u8>().ok());
            let name = tokens.next().and_then(|n| n.split('/').next());
            if let (Some(pt), Some(name)) = (pt, name) {
                m.codecs.insert(pt, name.to_string());
            }
        }
    }
    if let Some(mut m) = current.take() {
        m.direction = section_direction.unwrap_or(session_direction);
        out.media.push(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\n\
o=- 1 2 IN IP4 0.0.0.0\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1 2\r\n\
a=ice-lite\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 0.0.0.0\r\n\
a=mid:0\r\n\
a=sendonly\r\n\
a=msid:peerA trackA\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\n\
a=mid:1\r\n\
a=sendonly\r\n\
a=msid:peerA trackV\r\n\
a=rtpmap:96 VP8/90000\r\n\
a=rtpmap:97 rtx/90000\r\n\
a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
a=candidate:2 1 tcp 2130706431 127.0.0.1 40001 typ host tcptype passive\r\n\
m=video 0 UDP/TLS/RTP/SAVPF 96\r\n\
a=mid:2\r\n\
a=inactive\r\n\
a=msid:peerB trackX\r\n";

    #[test]
    fn sections_msids_and_candidates() {
        let s = summarize(OFFER);
        assert_eq!(s.media.len(), 3);
        let a = &s.media[0];
        assert_eq!(
            (a.mid.as_str(), a.kind.as_str(), a.direction.as_str()),
            ("0", "audio", "sendonly")
        );
        assert_eq!(a.stream_id.as_deref(), Some("peerA"));
        assert_eq!(a.track_id.as_deref(), Some("trackA"));
        assert_eq!(a.codecs.get(&111).map(String::as_str), Some("opus"));
        assert!(a.is_active_send());
        let v = &s.media[1];
        assert_eq!(v.codecs.get(&96).map(String::as_str), Some("VP8"));
        assert_eq!(v.codecs.get(&97).map(String::as_str), Some("rtx"));
        assert!(v.is_active_send());
        let stopped = &s.media[2];
        assert!(stopped.port_zero);
        assert_eq!(stopped.direction, "inactive");
        assert!(!stopped.is_active_send());
        // Deduplicated, UDP only.
        assert_eq!(
            s.candidates,
            vec!["127.0.0.1:40000".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn session_direction_is_the_default() {
        let s = summarize(
            "v=0\na=recvonly\nm=audio 9 X 0\na=mid:a\nm=video 9 X 0\na=mid:b\na=sendonly\n",
        );
        assert_eq!(s.media[0].direction, "recvonly");
        assert_eq!(s.media[1].direction, "sendonly");
        assert!(!s.media[1].is_active_send(), "no msid");
        assert_eq!(summarize("garbage\n\n"), SdpSummary::default());
    }
}
