//! `switchboard-bench`: the load generator of Switchboard.
//!
//! Scenarios, each printing a table and, with `--json PATH`, writing every
//! figure as JSON:
//!
//! * [`idle`]: N idle WebSocket connections on one gateway: the handshake
//!   rate beside the raw TCP accept rate of the same clients (and, with
//!   `--floor`, beside the [`floor`] server's handshake rate), and the
//!   gateway's RSS per connection;
//! * [`echo`]: M clients in send / wait-for-echo loops through the gateway
//!   and the echo origin: round trips per second and latency percentiles;
//! * [`fanout`]: S subscribers on one channel (of one gateway, a NATS
//!   cluster of them, or any server reached with `--url`, such as nginx +
//!   nchan, see `compare/nchan.sh`): single messages until all have them,
//!   then a sustained rate; with `--floor`, single messages against the
//!   [`floor`] server too (a minimal fan-out write loop) in the same run;
//! * [`crossnode`]: control API commands through one node of a NATS cluster
//!   to clients on the others, beside the same on a single node;
//! * [`sessions`]: the memory of suspended sessions (empty, and with
//!   messages waiting) and the time a resume takes;
//! * [`fallbacks`]: the memory per idle connection of each transport (native
//!   WebSocket, SSE, long-poll sessions with a poll waiting and between
//!   polls), each on a gateway of its own, in one run. (Fan-out to SSE
//!   subscribers is `fanout --transport sse`.)
//! * [`graphql`]: S GraphQL subscribers (`graphql-transport-ws`) over I
//!   distinct inputs on one gateway whose GraphQL endpoint is an origin the
//!   tool runs in-process: gateway RSS per idle subscription (beside plain
//!   idle connections), then triggers: trigger-to-delivery latency and
//!   origin requests per trigger.
//!
//! * [`million`] (`cluster-idle`): a million idle connections (or
//!   `--connections`) held by a cluster of gateway processes joined over
//!   one nats-server: memory, kernel memory, connect time, NATS traffic,
//!   one message to all of them, a drain.
//!
//! Clients run in worker processes of this binary ([`engine`]); the servers
//! are started by [`servers`]; [`measure`] reads `/proc` and keeps the
//! histograms. Everything runs on loopback and every phase is bounded.

mod buscost;
mod crossnode;
mod echo;
mod engine;
mod fallbacks;
mod fanout;
mod floor;
mod graphql;
mod idle;
mod measure;
mod million;
mod servers;
mod sessions;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load generator for the Switchboard WebSocket gateway (loopback only).
#[derive(Debug, Parser)]
#[command(name = "switchboard-bench", version, about)]
struct Cli {
    #[command(flatten)]
    opts: Opts,
    #[command(subcommand)]
    command: Command,
}

/// The scenarios, and the hidden child roles.
#[derive(Debug, Subcommand)]
enum Command {
    /// Idle connections: handshake rate (beside raw TCP accepts, and a
    /// minimal server's with --floor) and gateway memory per connection.
    Idle(idle::Args),
    /// Echo round trips through the gateway and an origin: rate and latency.
    Echo(echo::Args),
    /// Channel fan-out: single messages to every subscriber, then a
    /// sustained rate; one gateway, a cluster (--nodes) or any --url.
    Fanout(fanout::Args),
    /// Control API commands through one node to clients on other nodes.
    CrossNode(crossnode::Args),
    /// The broker's memory and CPU per 1,000 channels with history (NATS
    /// or Redis).
    BusChannels(buscost::Args),
    /// Suspended sessions: memory per session and resume latency.
    Sessions(sessions::Args),
    /// HTTP fallbacks: memory per idle SSE stream and long-poll session,
    /// beside native WebSocket connections.
    Fallbacks(fallbacks::Args),
    /// GraphQL subscriptions: memory per idle subscription, trigger to
    /// delivery latency and origin requests per trigger.
    Graphql(graphql::Args),
    /// A cluster of gateways over one nats-server holding C idle
    /// connections (a million by default): memory, connect time, NATS
    /// traffic, one message to all, a drain.
    #[command(alias = "million")]
    ClusterIdle(million::Args),
    /// Child role: a shard of clients (see the engine module).
    #[command(hide = true)]
    Worker {
        /// The worker's configuration (JSON).
        config: String,
    },
    /// Child role: a plain tokio accept loop, the TCP baseline of `idle`.
    #[command(hide = true)]
    Acceptor {
        /// Connections to accept before reporting.
        expect: usize,
    },
    /// Child role: the minimal WebSocket server of `fanout --floor` and
    /// `idle --floor`.
    #[command(hide = true)]
    Floor {
        /// Most clients to accept.
        expect: usize,
    },
}

/// Options of every scenario.
#[derive(Debug, Clone, Args)]
pub(crate) struct Opts {
    /// Gateway binary [default: `switchboard` beside this binary, else
    /// target/release/switchboard].
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) gateway_bin: Option<PathBuf>,

    /// Extra argument for every spawned `switchboard serve` (repeatable),
    /// e.g. --gateway-arg=--permessage-deflate.
    #[arg(long, global = true, value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) gateway_arg: Vec<String>,

    /// Most client connections per worker process (at most 19,000: a
    /// process may hold 20,000 open files).
    #[arg(long, global = true, default_value_t = engine::MAX_PER_PROCESS, value_name = "N")]
    pub(crate) per_process: usize,

    /// Client worker processes [default: as few as --per-process allows; at
    /// least 2 for `idle`].
    #[arg(long, global = true, value_name = "N")]
    pub(crate) workers: Option<usize>,

    /// Bind client sockets to 127.0.0.2 .. 127.0.0.(1+N) in turn (ephemeral
    /// ports are per source address); 0 lets the kernel choose.
    #[arg(long, global = true, default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=250))]
    pub(crate) source_addrs: u8,

    /// Handshakes in flight at once, over all workers.
    #[arg(long, global = true, default_value_t = 1000, value_name = "N")]
    pub(crate) concurrency: usize,

    /// Bound of a whole connect phase.
    #[arg(long, global = true, default_value = "120s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,

    /// Write the results as JSON to this file.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
}

impl Opts {
    /// Worker configurations for `total` clients of `gateway` (at least
    /// `min_workers` processes unless --workers says otherwise).
    pub(crate) fn workers_for(
        &self,
        gateway: &servers::Gateway,
        total: usize,
        min_workers: usize,
        subprotocol: Option<&str>,
        mode: engine::Mode,
    ) -> Vec<engine::WorkerConfig> {
        let shards = engine::shards(total, self.per_process, self.workers.unwrap_or(min_workers));
        let n = shards.len();
        shards
            .into_iter()
            .map(|(offset, count)| engine::WorkerConfig {
                addr: gateway.addr,
                target: gateway.target.clone(),
                subprotocol: subprotocol.map(str::to_owned),
                count,
                offset,
                source_addrs: self.source_addrs,
                concurrency: self.concurrency.div_ceil(n),
                mode: mode.clone(),
                tls: None,
                transport: engine::Transport::WebSocket,
                hold_while_connecting: false,
                connect_rate: 0.0,
            })
            .collect()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Worker { config } => engine::run_worker(&config).map(|()| true),
        Command::Acceptor { expect } => idle::run_acceptor(expect).map(|()| true),
        Command::Floor { expect } => floor::run_floor(expect).map(|()| true),
        scenario => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    match scenario {
                        Command::Idle(a) => idle::run(&cli.opts, a).await,
                        Command::Echo(a) => echo::run(&cli.opts, a).await,
                        Command::Fanout(a) => fanout::run(&cli.opts, a).await,
                        Command::CrossNode(a) => crossnode::run(&cli.opts, a).await,
                        Command::BusChannels(a) => buscost::run(&cli.opts, a).await,
                        Command::Sessions(a) => sessions::run(&cli.opts, a).await,
                        Command::Fallbacks(a) => fallbacks::run(&cli.opts, a).await,
                        Command::Graphql(a) => graphql::run(&cli.opts, a).await,
                        Command::ClusterIdle(a) => million::run(&cli.opts, a).await,
                        Command::Worker { .. }
                        | Command::Acceptor { .. }
                        | Command::Floor { .. } => unreachable!(),
                    }
                })
            }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the problems of a run (an invalid measurement) and says whether
/// there were none.
pub(crate) fn report_problems(problems: &[String]) -> bool {
    for p in problems {
        eprintln!("switchboard-bench: PROBLEM: {p}");
    }
    problems.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        for argv in [
            &["b", "idle", "--connections", "500"][..],
            &["b", "echo", "--json", "x.json"],
            &["b", "fanout", "--nodes", "6", "--subscribers", "100000"],
            &[
                "b",
                "fanout",
                "--url",
                "ws://127.0.0.1:1/sub",
                "--publish-url",
                "http://127.0.0.1:2/pub",
            ],
            &["b", "cross-node", "--rate", "1000"],
            &["b", "sessions", "--sessions", "100", "--messages", "10"],
            &["b", "fallbacks", "--connections", "10000"],
            &[
                "b",
                "fallbacks",
                "--transports",
                "sse,long-poll",
                "--hold",
                "5s",
            ],
            &["b", "fanout", "--transport", "sse", "--subscribers", "10"],
            &["b", "fanout", "--transport", "sse-bidirectional"],
            &[
                "b",
                "fanout",
                "--transport",
                "sse",
                "--url",
                "http://127.0.0.1:1/es",
                "--publish-url",
                "http://127.0.0.1:2/pub",
            ],
            &["b", "graphql", "--subscribers", "1000", "--inputs", "10"],
            &["b", "graphql", "--no-baseline", "--trigger-interval", "1s"],
            &["b", "acceptor", "3"],
            &[
                "b",
                "cluster-idle",
                "--connections",
                "15000",
                "--nodes",
                "3",
            ],
            &["b", "million", "--hold", "60s", "--port-range", "keep"],
            &["b", "floor", "3"],
            &["b", "idle", "--connections", "17500", "--floor"],
            &[
                "b",
                "fanout",
                "--floor",
                "--single-only",
                "--subscribers",
                "5000",
            ],
        ] {
            Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
    }
}
