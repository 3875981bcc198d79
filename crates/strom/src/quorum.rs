//! `strom quorum describe`: the metadata quorum (KIP-595 DescribeQuorum) as its leader, the
//! active controller, sees it: leader, epoch, high watermark, and each voter's (and observer's)
//! log end offset and lag, in the manner of `kafka-metadata-quorum.sh describe --status
//! --replication`. Lag is the leader's log end offset minus the replica's, as there.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::describe_quorum_request::{PartitionData, TopicData};
use kafka_protocol::messages::describe_quorum_response::ReplicaState;
use kafka_protocol::messages::{DescribeQuorumRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::client::{check, Conn};

const METADATA_TOPIC: &str = "__cluster_metadata";

#[derive(Args, Debug)]
pub struct QuorumArgs {
    /// A broker to talk to (HOST:PORT, or a comma-separated list: the first that answers).
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    cmd: QuorumCmd,
}

#[derive(Subcommand, Debug)]
enum QuorumCmd {
    /// Leader, epoch, high watermark; voters and observers with log end offset and lag.
    Describe,
}

pub fn run(args: QuorumArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    match args.cmd {
        QuorumCmd::Describe => describe(&mut conn),
    }
}

fn describe(conn: &mut Conn) -> Result<()> {
    let req = DescribeQuorumRequest::default().with_topics(vec![TopicData::default()
        .with_topic_name(TopicName(StrBytes::from_static_str(METADATA_TOPIC)))
        .with_partitions(vec![PartitionData::default().with_partition_index(0)])]);
    let resp = conn.call(&req, 2)?;
    check(
        resp.error_code,
        resp.error_message.as_deref(),
        "DescribeQuorum",
    )?;
    let p = resp
        .topics
        .first()
        .and_then(|t| t.partitions.first())
        .context("empty DescribeQuorum response")?;
    check(p.error_code, p.error_message.as_deref(), "DescribeQuorum")?;
    let leader = p.leader_id.0;
    let leader_end = p
        .current_voters
        .iter()
        .find(|v| v.replica_id.0 == leader)
        .map_or(p.high_watermark, |v| v.log_end_offset);
    let lag = |r: &ReplicaState| (leader_end - r.log_end_offset).max(0);
    let max_lag = p.current_voters.iter().map(lag).max().unwrap_or(0);
    let ids = |v: &[ReplicaState]| {
        v.iter()
            .map(|r| r.replica_id.0.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("LeaderId:          {leader}");
    println!("LeaderEpoch:       {}", p.leader_epoch);
    println!("HighWatermark:     {}", p.high_watermark);
    println!("MaxFollowerLag:    {max_lag}");
    println!("CurrentVoters:     [{}]", ids(&p.current_voters));
    println!("CurrentObservers:  [{}]", ids(&p.observers));
    println!();
    println!(
        "{:>6}  {:>14}  {:>8}  {:>14}  {:>14}  STATUS",
        "NODE", "LOG-END-OFFSET", "LAG", "LAST-FETCH", "LAST-CAUGHT-UP"
    );
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let ago = |ts: i64| {
        if ts < 0 {
            "-".to_string()
        } else {
            format!("{} ms ago", (now_ms - ts).max(0))
        }
    };
    let mut rows: Vec<(&ReplicaState, &str)> = Vec::new();
    rows.extend(
        p.current_voters
            .iter()
            .filter(|v| v.replica_id.0 == leader)
            .map(|v| (v, "Leader")),
    );
    rows.extend(
        p.current_voters
            .iter()
            .filter(|v| v.replica_id.0 != leader)
            .map(|v| (v, "Follower")),
    );
    rows.extend(p.observers.iter().map(|o| (o, "Observer")));
    for (r, status) in rows {
        println!(
            "{:>6}  {:>14}  {:>8}  {:>14}  {:>14}  {status}",
            r.replica_id.0,
            r.log_end_offset,
            lag(r),
            ago(r.last_fetch_timestamp),
            ago(r.last_caught_up_timestamp),
        );
    }
    Ok(())
}
