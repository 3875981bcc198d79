//! The `strom` binary: `strom server` runs a broker; `strom bench` drives load against one;
//! `strom group` administers consumer groups; `strom config` topic and broker settings;
//! `strom topic`, `strom reassign`, `strom elect`, `strom quorum` and `strom cluster` the
//! replicated cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use strom_broker::{Broker, BrokerConfig, BrokerOptions};

mod bench;
mod bench_groups;
mod client;
mod cluster_cmd;
mod config_cmd;
mod elect;
mod group;
mod quorum;
mod reassign;
mod topic;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "strom",
    version,
    about = "A Kafka-compatible event streaming platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker. Alone it is a whole single-node cluster.
    #[command(after_long_help = strom_broker::config::help_text())]
    Server(ServerArgs),
    /// Load generator: produce and consume throughput and produce latency percentiles.
    Bench(bench::BenchArgs),
    /// Consumer-group timings: first join, a rebalance, offset-commit throughput.
    BenchGroups(bench_groups::GroupBenchArgs),
    /// Consumer groups: list, describe (lag), delete, reset offsets.
    Group(group::GroupArgs),
    /// Topic and broker settings: describe, set, delete.
    Config(config_cmd::ConfigArgs),
    /// Topics: describe partitions (leader, epoch, replicas, ISR, ELR, offline replicas).
    Topic(topic::TopicArgs),
    /// Move a partition to other replicas; list or cancel reassignments in progress.
    Reassign(reassign::ReassignArgs),
    /// Leader election: preferred (back to the first replica) or unclean.
    Elect(elect::ElectArgs),
    /// The metadata quorum: leader, epoch, high watermark, voters and their lag.
    Quorum(quorum::QuorumArgs),
    /// The cluster's brokers: unregister a decommissioned one.
    Cluster(cluster_cmd::ClusterArgs),
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Kafka listener address.
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// host:port given to clients in Metadata (default: the listener address).
    #[arg(long)]
    advertise: Option<String>,
    /// Where logs and metadata live.
    #[arg(long, default_value = "./strom-data")]
    data_dir: PathBuf,
    /// This node's id.
    #[arg(long, default_value_t = 1)]
    node_id: i32,
    /// TOML file of settings with Kafka names (`"log.segment.bytes" = 1048576`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A setting NAME=VALUE (repeatable); overrides the config file. See --help for the list.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Benchmark baseline: acknowledge Produce without storing anything.
    #[arg(long, hide = true)]
    null_sink: bool,
    /// The metadata quorum's voters, ID@HOST:PORT,... (their controller listeners). Without
    /// it the node is a one-node cluster of its own. A node whose --node-id is not listed is a
    /// broker-only node: it hosts and leads partitions but never votes or becomes the active
    /// controller (Kafka's process.roles=broker); it needs --controller-listen.
    #[arg(long, value_name = "ID@HOST:PORT,...")]
    controller_quorum: Option<String>,
    /// This node's controller listener (default: its entry in --controller-quorum). Required
    /// on a broker-only node, where the active controller sends it the metadata log: a
    /// specific address the voters can reach, not 0.0.0.0.
    #[arg(long, value_name = "HOST:PORT")]
    controller_listen: Option<SocketAddr>,
    /// Threads that serve requests (default: one per core). Nodes that share a machine do
    /// better with their share of its cores: fewer threads contend for them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

fn parse_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("--advertise {s}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("--advertise {s}: bad port"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        let code = if storage_failure(&e) {
            strom_broker::flusher::EXIT_STORAGE_FAILED
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// Whether the disk failed `e` (an I/O error, a full or read-only file system, a quota): the
/// node then exits with the status a storage failure has while it runs.
fn storage_failure(e: &anyhow::Error) -> bool {
    fn disk(io: &std::io::Error) -> bool {
        let failed = matches!(
            io.raw_os_error(),
            Some(libc::EIO | libc::ENOSPC | libc::EROFS | libc::EDQUOT)
        );
        // An error wrapping an I/O error directly (its `source` skips that one).
        failed
            || io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
                .is_some_and(disk)
    }
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(disk)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Command::Server(ServerArgs {
        worker_threads: Some(n),
        ..
    }) = &cli.command
    {
        rt.worker_threads(*n as usize);
    }
    let rt = rt.enable_all().build()?;
    match cli.command {
        Command::Server(args) => rt.block_on(server(args)),
        Command::Bench(args) => rt.block_on(bench::run(args)),
        Command::Group(args) => group::run(args),
        Command::Config(args) => config_cmd::run(args),
        Command::Topic(args) => topic::run(args),
        Command::Reassign(args) => reassign::run(args),
        Command::Elect(args) => elect::run(args),
        Command::Quorum(args) => quorum::run(args),
        Command::Cluster(args) => cluster_cmd::run(args),
        Command::BenchGroups(args) => rt.block_on(bench_groups::run(args)),
    }
}

async fn server(args: ServerArgs) -> Result<()> {
    let config = BrokerConfig::new(args.config.as_deref(), &args.set)?;
    let advertise = args.advertise.as_deref().map(parse_host_port).transpose()?;
    let cluster = match &args.controller_quorum {
        None => None,
        Some(q) => {
            let quorum = strom_broker::cluster::parse_quorum(q)
                .map_err(|e| anyhow::anyhow!("--controller-quorum: {e}"))?;
            let mine = quorum
                .iter()
                .find(|(id, _)| *id == args.node_id)
                .map(|(_, a)| *a);
            let controller_listen = match (args.controller_listen, mine) {
                (Some(l), _) => l,
                (None, Some(a)) => a,
                (None, None) => anyhow::bail!(
                    "node {} is not a voter of --controller-quorum, so it is a broker-only node: \
                     give it --controller-listen HOST:PORT, the address where the active \
                     controller sends it the metadata log",
                    args.node_id
                ),
            };
            Some(strom_broker::cluster::ClusterOptions {
                controller_listen,
                quorum,
            })
        }
    };
    // Installed before the start, which in a cluster waits for the quorum and to catch up:
    // a SIGTERM meanwhile stops the node at once with a clean exit. It leads nothing yet and
    // what it wrote is as safe as after a kill -9; `exit` does not wait for the start's
    // blocking tasks, as dropping the runtime would.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let start = Broker::start(BrokerOptions {
        cluster,
        node_id: args.node_id,
        listen: args.listen,
        advertise,
        data_dir: args.data_dir,
        config,
        null_sink: args.null_sink,
    });
    let running = tokio::select! {
        running = start => running?,
        _ = term.recv() => {
            tracing::info!("SIGTERM received while starting: stopping before serving");
            std::process::exit(0);
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT received while starting: stopping before serving");
            std::process::exit(0);
        }
    };
    let broker = running.broker.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        broker.begin_shutdown();
    });
    running.serve().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use strom_broker::StartError;

    #[test]
    fn a_start_failed_by_the_disk_is_a_storage_failure_and_others_are_not() {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let dir = PathBuf::from("d");
        let failed = |e: StartError| storage_failure(&anyhow::Error::from(e));
        assert!(failed(StartError::DataDir(dir.clone(), eio())));
        assert!(failed(StartError::DataDir(
            dir.clone(),
            io::Error::other(eio())
        )));
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(failed(StartError::Log(full.into())));
        assert!(failed(StartError::Metadata(eio().into())));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(!failed(StartError::DataDir(dir, denied)));
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(!failed(StartError::Listen(
            "127.0.0.1:9092".parse().unwrap(),
            in_use
        )));
        let timeout = strom_meta::MetadataLogError::Timeout("no quorum".into());
        assert!(!failed(StartError::Quorum(timeout)));
        assert!(failed(StartError::Quorum(eio().into())));
    }
}
