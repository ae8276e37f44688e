//! How a shard builds its str0m `Rtc`s: ICE-lite, RTP mode, one DTLS certificate per
//! shard (and one DTLS config per process, `media::dtls`), server-chosen ICE
//! credentials (their ufrag is the routing key for the first STUN packet), and codec
//! lists trimmed to what we forward.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::config::DtlsCert;
use str0m::crypto::CryptoProvider;
use str0m::format::Codec;
use str0m::media::Pt;
use str0m::rtp::Extension;
use str0m::{Candidate, IceCreds, Rtc, RtcConfig};

use super::dtls;

/// H264 constrained baseline, packetization mode 1: what every browser decodes.
const SUBSCRIBER_H264: (u8, u8, u32) = (108, 109, 0x42e01f);
/// Header extensions on subscriber connections, with str0m's standard ids.
const SUBSCRIBER_EXTENSIONS: [(u8, Extension); 4] = [
    (1, Extension::AudioLevel),
    (2, Extension::AbsoluteSendTime),
    (4, Extension::RtpMid),
    (13, Extension::VideoOrientation),
];

/// How often a subscriber connection reports its round trip. Publisher connections
/// keep str0m's default of no stats.
const RTT_INTERVAL: Duration = Duration::from_secs(1);

pub struct RtcFactory {
    crypto: Arc<CryptoProvider>,
    cert: DtlsCert,
    candidates: Vec<Candidate>,
}

pub enum Role {
    /// Receives the client's media; accepts any codec we can forward.
    Publisher,
    /// Sends media to the client; offers a short codec list so offers stay small.
    Subscriber,
}

impl RtcFactory {
    /// `addrs`: the candidate addresses (public IPs with this shard's UDP port).
    pub fn new(addrs: &[SocketAddr]) -> Result<Self, String> {
        let crypto = Arc::new(dtls::crypto_provider());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or("could not generate a DTLS certificate")?;
        let candidates = addrs
            .iter()
            .map(|addr| Candidate::host(*addr, "udp").map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            crypto,
            cert,
            candidates,
        })
    }

    /// Builds an `Rtc` and returns it with its local ICE ufrag.
    pub fn build(&self, role: Role, now: Instant) -> (Rtc, String) {
        let creds = IceCreds::new();
        let ufrag = creds.ufrag.clone();
        let mut config = RtcConfig::new()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .set_local_ice_credentials(creds)
            .set_crypto_provider(self.crypto.clone())
            .set_dtls_cert(self.cert.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_vp9(true);
        config = match role {
            Role::Publisher => config.enable_h264(true),
            Role::Subscriber => {
                let (pt, rtx, profile) = SUBSCRIBER_H264;
                config
                    .codec_config()
                    .add_h264(pt.into(), Some(rtx.into()), true, profile);
                // No transport-wide sequence numbers downstream: nothing here consumes
                // the browsers' TWCC feedback yet, and str0m keeps a 1000-entry send
                // record per connection for it (about 90 KB) and parses every report.
                // Bandwidth estimation for subscribers brings it back.
                SUBSCRIBER_EXTENSIONS
                    .into_iter()
                    .fold(config.clear_extension_map(), |c, (id, ext)| {
                        c.set_extension(id, ext)
                    })
                    // Stats carry the round trip from the client's receiver reports,
                    // which sizes the resend window (`media::resend`).
                    .set_stats_interval(Some(RTT_INTERVAL))
            }
        };
        let mut rtc = config.build(now);
        for candidate in &self.candidates {
            rtc.add_local_candidate(candidate.clone());
        }
        (rtc, ufrag)
    }
}

/// What `rtc` negotiated for payload type `pt`: its codec, and whether it has a
/// resend (RTX) payload type (str0m NACKs the losses of such streams, and only those).
pub fn payload_of(rtc: &Rtc, pt: Pt) -> Option<(Codec, bool)> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.pt() == pt)
        .map(|p| (p.spec().codec, p.resend().is_some()))
}

/// The payload type `rtc` uses for `codec`, if it negotiated one.
pub fn pt_for(rtc: &Rtc, codec: Codec) -> Option<Pt> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec)
        .map(|p| p.pt())
}

/// str0m panicked inside [`contained`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// Runs `f`, which hands what a client sent (SDP, candidates, datagrams) to str0m, or
/// drives the `Rtc` that took it, and turns a panic into `Err`.
///
/// str0m asserts on some input it accepts: 0.25 panics on an answer that lists the
/// offer's VP9 profile 2 payload type in its audio section. Unwound, that would end
/// the shard and, by design (`main`), the process with every room in it. The `Rtc`
/// that panicked is in an unknown state, so the caller drops its participant. The
/// panic hook has already logged what str0m said.
pub fn contained<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| Panicked)
}
