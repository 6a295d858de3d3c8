//! The `switchboard` binary: parses the command line, loads the configuration
//! (flags > `SWITCHBOARD_*` environment > TOML file > defaults), sets up
//! logging, runs a gateway node and drains it on SIGTERM/SIGINT.

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => serve(*args),
    }
}

fn serve(args: cli::ServeArgs) -> ExitCode {
    let loaded = match cli::load(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switchboard: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if args.check {
        let mut shown = loaded.config.clone();
        // Never print secrets.
        shown.origin_secret = shown.origin_secret.map(|_| "<redacted>".into());
        shown.api_key = shown.api_key.iter().map(|_| "<redacted>".into()).collect();
        println!("{}", toml::to_string_pretty(&shown).unwrap_or_default());
        eprintln!("switchboard: configuration is valid");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&loaded.log_level, &loaded.log_format) {
        eprintln!("switchboard: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = match switchboard_server::Gateway::bind(loaded.config).await {
            Ok(g) => g,
            Err(e @ switchboard_server::GatewayError::Config(_)) => {
                eprintln!("switchboard: configuration error: {e}");
                return ExitCode::from(EX_USAGE);
            }
            Err(e) => {
                eprintln!("switchboard: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let report = gateway.run(shutdown_signal()).await;
        if report.completed {
            ExitCode::SUCCESS
        } else {
            tracing::warn!(?report, "drain did not complete before drain-timeout");
            ExitCode::FAILURE
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(level: &str, format: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid log-level {level:?}: {e}"))?;
    let json = match format {
        "json" => true,
        "text" => false,
        "auto" => !std::io::stderr().is_terminal(),
        other => {
            return Err(format!(
                "invalid log-format {other:?}: expected auto, json or text"
            ))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(())
}
