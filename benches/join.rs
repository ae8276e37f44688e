//! What a join costs its shard, beside signaling: a participant's two str0m `Rtc`s.
//! Compares str0m's stock crypto provider, which builds a dimpl DTLS config (and runs
//! its crypto self-test) for every `Rtc`, with `media::dtls`, which shares one. Both
//! use the same certificate; the printed line is the ratio of the two means.
//!
//! Run: `cargo bench --bench join` (add `-- --quick` for a short run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use corelay::media::dtls;
use criterion::{Criterion, criterion_group, criterion_main};
use str0m::RtcConfig;
use str0m::crypto::CryptoProvider;

fn build(crypto: &Arc<CryptoProvider>, cert: &str0m::config::DtlsCert) -> str0m::Rtc {
    RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .set_crypto_provider(crypto.clone())
        .set_dtls_cert(cert.clone())
        .build(Instant::now())
}

fn join(c: &mut Criterion) {
    let stock = Arc::new(str0m::crypto::from_feature_flags());
    let shared = Arc::new(dtls::crypto_provider());
    let cert = stock
        .dtls_provider
        .generate_certificate()
        .expect("a DTLS certificate");
    // The shard's first `Rtc` builds the shared config; time those after it.
    build(&shared, &cert);
    let mut group = c.benchmark_group("rtc_build");
    group.measurement_time(Duration::from_secs(3));
    let mut means = Vec::new();
    for (name, crypto) in [("stock", &stock), ("shared_dtls_config", &shared)] {
        let mut total = (Duration::ZERO, 0_u64);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(build(crypto, &cert));
                }
                let took = start.elapsed();
                total.0 += took;
                total.1 += iters;
                took
            })
        });
        if total.1 > 0 {
            means.push((name, total.0 / total.1 as u32));
        }
    }
    group.finish();
    if let [(_, stock), (_, shared)] = means[..] {
        println!(
            "rtc_build: stock {stock:?}, shared DTLS config {shared:?} per Rtc: {:.1}x",
            stock.as_secs_f64() / shared.as_secs_f64()
        );
    }
}

criterion_group!(benches, join);
criterion_main!(benches);
