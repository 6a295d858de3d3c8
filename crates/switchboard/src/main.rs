//! The `switchboard` binary: parses the command line, loads the configuration
//! (flags > `SWITCHBOARD_*` environment > TOML file > defaults), sets up
//! logging, runs a gateway node (joining its NATS cluster when configured)
//! and drains it on SIGTERM/SIGINT.

mod backend;
mod build_info;
mod cli;

use backend::Startup;
use clap::Parser;
use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: its size classes fit the blocks an
/// idle connection keeps (a 128-byte aligned task cell and I/O
/// registration), where glibc pads aligned blocks and leaves holes between
/// them (docs/benchmarks.md, idle connections).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => serve(*args),
        cli::Command::Healthcheck(args) => healthcheck(&args),
    }
}

/// `switchboard healthcheck`: one GET, exit 0 on 2xx. Proxies from the
/// environment are ignored: the check is about this host's node.
fn healthcheck(args: &cli::HealthcheckArgs) -> ExitCode {
    let fail = |why: String| {
        eprintln!("switchboard healthcheck: {}: {why}", args.url);
        ExitCode::FAILURE
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let answer = runtime.block_on(async {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(args.timeout))
            .danger_accept_invalid_certs(args.insecure)
            .build()?
            .get(&args.url)
            .send()
            .await
    });
    match answer {
        Ok(answer) if answer.status().is_success() => {
            println!("{}: {}", args.url, answer.status());
            ExitCode::SUCCESS
        }
        Ok(answer) => fail(format!("answered {}", answer.status())),
        Err(e) => fail(error_chain(&e)),
    }
}

/// An error and its causes on one line (reqwest's own text stops at
/// "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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
        let mut cluster = loaded.cluster.clone();
        cluster.nats = cluster.nats.map(|u| redact_url(&u));
        // One document: the gateway's settings and the cluster backend's.
        let mut all = toml::Table::try_from(&shown).unwrap_or_default();
        all.extend(toml::Table::try_from(&cluster).unwrap_or_default());
        println!("{}", toml::to_string_pretty(&all).unwrap_or_default());
        eprintln!("switchboard: configuration is valid");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&loaded.log_level, &loaded.log_format) {
        eprintln!("switchboard: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let build: serde_json::Map<String, serde_json::Value> = build_info::BUILD
        .labels()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    tracing::info!(
        build = %serde_json::Value::Object(build),
        "switchboard {} starting",
        build_info::BUILD
    );
    // Every client socket is a descriptor: take all the process may have.
    // The node derives its connection cap from the result (logged in
    // "switchboard node started").
    if let Err(e) = switchboard_server::fds::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit; keeping the current one");
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
        let bound = match backend::bind(loaded.config, &loaded.cluster).await {
            Ok(b) => b,
            Err(Startup::Config(e)) => {
                eprintln!("switchboard: configuration error: {e}");
                return ExitCode::from(EX_USAGE);
            }
            Err(Startup::Other(e)) => {
                eprintln!("switchboard: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        bound.gateway.set_build_info(&build_info::BUILD.labels());
        let report = bound.gateway.run(shutdown_signal()).await;
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

/// `nats://user:pass@host` → `nats://<redacted>@host`, for each URL.
fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}<redacted>{}", &u[..scheme + 3], &u[at..])
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}
