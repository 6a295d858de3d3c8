//! `switchboard-bench`: the load generator of Switchboard.
//!
//! Four scenarios, each printing a human table and writing a JSON result file:
//!
//! * `idle` opens N WebSocket connections to one gateway process, reports the
//!   handshake rate beside the raw TCP accept rate of the machine (measured
//!   with a plain tokio accept loop and the same clients), holds the
//!   connections idle (answering pings) for a settle period and reports the
//!   gateway's RSS per connection. With `--tls` the gateway and its clients
//!   speak TLS (see [`tls`]), so the same figures show what TLS costs.
//! * `echo` runs M clients that each send a message, wait for the echo through
//!   the gateway and the echo origin, and repeat; it reports round trips per
//!   second and the latency distribution (HDR histogram).
//! * `cross-node` starts a `nats-server` and a cluster of gateway nodes,
//!   connects receive-only clients to all nodes but the first, and pushes
//!   messages to them through the first node's control API (one connection
//!   per command, and one message to all of them per command); then the same
//!   with every client on the first node. It reports commands per second, the
//!   latency from the control call to the client's receipt, and the NATS
//!   messages each command costs.
//! * `fanout` subscribes S clients (19,000 by default) to one channel of one
//!   gateway and publishes to it through the control API: first single
//!   messages, each until every subscriber has it (latency of every delivery
//!   and until the last one), then a sustained rate (deliveries per second
//!   received, latency, lost and late deliveries), with the server's CPU and
//!   memory per phase. In the same run, with the same clients, it measures
//!   nginx with the nchan module as the reference (skipped with a message if
//!   not installed) and prints both side by side. Its subscribers read raw
//!   frames and find the publish time stamped in the data without parsing
//!   JSON (see [`subscriber`]). With `--nodes N` the gateway side is a
//!   cluster: the tool starts `nats-server -js` and N nodes joined through it
//!   (see [`nats`]), spreads the subscribers over them and publishes through
//!   the first; it adds the CPU of nats-server and the NATS messages per
//!   publish.
//!
//! One process may hold at most 20,000 open files on the reference machine, so
//! clients are sharded over child processes: the tool re-executes itself with
//! the hidden `worker` (clients) and `acceptor` (TCP baseline) subcommands and
//! drives them over their stdin/stdout with one JSON object per line (see
//! [`proto`]). Client sockets are bound to 127.0.0.2, 127.0.0.3, ... before
//! connecting, so the ephemeral ports of many source addresses are available.
//!
//! Only loopback targets are accepted, and every phase is bounded in time.

mod crossnode;
mod echo;
mod fanout;
mod fleet;
mod http;
mod idle;
mod nats;
mod proto;
mod subscriber;
mod tls;
mod util;
mod worker;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Load generator for the Switchboard WebSocket gateway (loopback only).
///
/// Clients are spread over child processes (at most --per-process
/// connections each) and over source addresses 127.0.0.2, 127.0.0.3, ...
/// Results are printed as a table and written as JSON (--out).
#[derive(Debug, Parser)]
#[command(name = "switchboard-bench", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The scenarios (and the hidden child roles).
#[derive(Debug, Subcommand)]
enum Command {
    /// Hold N idle WebSocket connections on one gateway: handshake rate,
    /// raw TCP accept rate, gateway RSS per connection.
    Idle(idle::IdleArgs),
    /// M clients in send/wait-for-echo loops through the gateway and the echo
    /// origin: round trips per second and latency percentiles.
    Echo(echo::EchoArgs),
    /// Control API commands through one node of a NATS cluster to clients on
    /// the other nodes, beside the same on a single node: commands per
    /// second, latency to receipt, NATS messages per command.
    CrossNode(crossnode::CrossNodeArgs),
    /// S subscribers on one channel of one gateway (or of a NATS cluster of
    /// gateways, --nodes), beside nginx + nchan: single publishes until every
    /// subscriber has them, then a sustained rate; latency, deliveries per
    /// second, server CPU and memory.
    Fanout(Box<fanout::FanoutArgs>),
    /// Child role: a shard of clients driven over stdin/stdout.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
    /// Child role: a plain tokio accept loop, the TCP baseline.
    #[command(hide = true)]
    Acceptor(worker::AcceptorArgs),
}

/// Client-side options shared by the scenarios.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClientOpts {
    /// Most client connections in one child process (each process may hold at
    /// most 20,000 open files).
    #[arg(long, default_value_t = 19_000, value_name = "N")]
    pub(crate) per_process: usize,

    /// Client child processes; 0 picks enough for --per-process, and at least
    /// 2 for `idle` (both cores) and 1 for `echo` and `fanout`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) workers: usize,

    /// Client sockets are bound to 127.0.0.2 .. 127.0.0.(1+N) in turn before
    /// connecting (ephemeral ports are per source address); 0 lets the kernel
    /// choose (127.0.0.1 only).
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=250))]
    pub(crate) source_addrs: u8,

    /// Opening handshakes in flight at once, over all client processes.
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    pub(crate) concurrency: usize,

    /// Bound of the whole connect phase.
    #[arg(long, default_value = "120s", value_name = "DURATION", value_parser = util::parse_duration)]
    pub(crate) connect_timeout: std::time::Duration,
}

/// How to reach (or start) the gateway under test.
#[derive(Debug, Clone, Args)]
pub(crate) struct GatewayOpts {
    /// Use a running gateway at this WebSocket URL (loopback only, e.g.
    /// ws://127.0.0.1:8080/) instead of spawning one.
    #[arg(long, value_name = "URL")]
    pub(crate) url: Option<String>,

    /// Control listener of the running gateway given with --url (e.g.
    /// 127.0.0.1:8081), used for `GET /v1/stats` and `GET /metrics`.
    #[arg(long, value_name = "ADDR", requires = "url")]
    pub(crate) control: Option<std::net::SocketAddr>,

    /// Process id of the running gateway given with --url, for its RSS and CPU time.
    #[arg(long, value_name = "PID", requires = "url")]
    pub(crate) gateway_pid: Option<u32>,

    /// Gateway binary to spawn [default: `switchboard` next to this binary,
    /// else target/release/switchboard].
    #[arg(long, value_name = "PATH")]
    pub(crate) gateway_bin: Option<PathBuf>,

    /// Extra argument for the spawned `switchboard serve` (repeatable), e.g.
    /// --gateway-arg=--permessage-deflate.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) gateway_arg: Vec<String>,
}

impl GatewayOpts {
    /// Checks the options before anything is started: loopback targets only.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            util::loopback_ws_addr(url)?;
        }
        if let Some(c) = self.control {
            util::require_loopback(c)?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Idle(a) => idle::run(a),
        Command::Echo(a) => echo::run(a),
        Command::CrossNode(a) => crossnode::run(a),
        Command::Fanout(a) => fanout::run(*a),
        Command::Worker(a) => worker::run_worker(a),
        Command::Acceptor(a) => worker::run_acceptor(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_of_every_role_parse() {
        for argv in [
            &["b", "idle"][..],
            &["b", "idle", "--tls", "--connections", "6000"],
            &["b", "echo"],
            &["b", "cross-node"],
            &["b", "fanout"],
            &["b", "fanout", "--servers", "nchan", "--rate", "max"],
            &["b", "fanout", "--nodes", "6", "--subscribers", "100000"],
            &[
                "b",
                "worker",
                "--mode",
                "tcp",
                "--addr",
                "127.0.0.1:1",
                "--count",
                "1",
            ],
            &[
                "b",
                "worker",
                "--mode",
                "idle",
                "--addr",
                "127.0.0.1:1",
                "--url",
                "wss://127.0.0.1:1/",
                "--count",
                "1",
                "--tls-ca",
                "ca.pem",
            ],
            &["b", "acceptor", "--expect", "1"],
        ] {
            Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
    }
}
