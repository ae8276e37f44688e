//! `corelay`: parse the configuration, start the shards, print where we listen.

use std::io::IsTerminal;

use clap::Parser;
use corelay::config::{Config, LogFormat};
use corelay::server::Server;
use tracing::error;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    // A panic is an event like any other: one JSON line under `--log-format json`, in
    // the span of what panicked (a participant's, for a contained str0m panic).
    std::panic::set_hook(Box::new(tracing_panic::panic_hook));
    match Server::start(config) {
        Ok(server) => {
            // One line on stdout, for scripts and tests waiting for readiness.
            println!("listening http://{}", server.http_addr);
            if let Some((shard, panicked)) = server.wait() {
                // Not whole any more (see `server`): exit for the service manager to
                // restart us rather than serve without that shard.
                error!(shard, panicked, "a shard stopped; exiting");
            }
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("corelay: could not start: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
