//! str0m's DTLS, as its aws-lc-rs provider does it (dimpl), but with one dimpl `Config`
//! per process. Building a `Config` runs dimpl's crypto self-test (key exchanges on
//! three curves, cipher test vectors), about 1.2 ms; the stock provider built one for
//! every `Rtc`, so each join stalled its shard for 2.5 ms, packets and all, and a
//! join-heavy run spent a fifth of the shard's CPU there.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::{CryptoError, CryptoProvider};

/// str0m's default crypto, with DTLS instances built on a shared `Config`.
pub fn crypto_provider() -> CryptoProvider {
    CryptoProvider {
        dtls_provider: &SHARED_CONFIG,
        ..str0m::crypto::from_feature_flags()
    }
}

static SHARED_CONFIG: SharedConfigDtls = SharedConfigDtls {
    config: OnceLock::new(),
};

#[derive(Debug)]
struct SharedConfigDtls {
    /// Built by the first `Rtc`, with its MTU (every `Rtc` of ours has the same).
    config: OnceLock<(Option<usize>, Arc<dimpl::Config>)>,
}

fn build_config(mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
    // ICE verifies return routability before DTLS, so server cookies add nothing.
    let builder = dimpl::Config::builder().use_server_cookie(false);
    let builder = match mtu {
        Some(mtu) => builder.mtu(mtu),
        None => builder,
    };
    builder
        .build()
        .map(Arc::new)
        .map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))
}

impl DtlsProvider for SharedConfigDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = match self.config.get() {
            Some((built_for, config)) if *built_for == mtu => config.clone(),
            Some(_) => build_config(mtu)?,
            None => {
                let config = build_config(mtu)?;
                // A racing shard may have set it first; either config serves.
                let _ = self.config.set((mtu, config.clone()));
                config
            }
        };
        let cert = cert.clone();
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version {other}"
                )));
            }
        };
        Ok(Box::new(Instance(dtls)))
    }
}

/// A dimpl `Dtls` as str0m drives it.
struct Instance(dimpl::Dtls);

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instance")
    }
}

impl DtlsInstance for Instance {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}
