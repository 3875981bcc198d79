//! `strom reassign`: move a partition to other replicas, list the moves in progress, or cancel
//! one (KIP-455 AlterPartitionReassignments / ListPartitionReassignments), in the manner of
//! `kafka-reassign-partitions.sh` for one partition at a time. The move itself goes on in the
//! cluster after the command returns: new replicas catch up, then the old ones leave.

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, BrokerId, ListPartitionReassignmentsRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::client::{check, id_list, Conn};

/// How long the broker may take over the request.
const TIMEOUT_MS: i32 = 25_000;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("action").required(true).args(["replicas", "list", "cancel"])))]
pub struct ReassignArgs {
    /// A broker to talk to (HOST:PORT, or a comma-separated list: the first that answers).
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// The partition's topic.
    #[arg(long, required_unless_present = "list", conflicts_with = "list")]
    topic: Option<String>,
    /// The partition.
    #[arg(long, required_unless_present = "list", conflicts_with = "list")]
    partition: Option<i32>,
    /// The new replicas, preferred leader first: 2,3,4.
    #[arg(long, value_delimiter = ',', value_name = "ID,ID,...")]
    replicas: Option<Vec<i32>>,
    /// Lists the reassignments in progress.
    #[arg(long)]
    list: bool,
    /// Cancels the partition's reassignment: it goes back to its replicas from before.
    #[arg(long)]
    cancel: bool,
}

pub fn run(args: ReassignArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    if args.list {
        return list(&mut conn);
    }
    let topic = args.topic.context("--topic is required")?;
    let partition = args.partition.context("--partition is required")?;
    let target = if args.cancel { None } else { args.replicas };
    if matches!(&target, Some(r) if r.is_empty()) {
        bail!("--replicas needs at least one broker id");
    }
    alter(&mut conn, &topic, partition, target.as_deref())
}

fn alter(conn: &mut Conn, topic: &str, partition: i32, target: Option<&[i32]>) -> Result<()> {
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(TIMEOUT_MS)
        .with_allow_replication_factor_change(true)
        .with_topics(vec![ReassignableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![ReassignablePartition::default()
                .with_partition_index(partition)
                .with_replicas(
                    target.map(|t| t.iter().map(|b| BrokerId(*b)).collect()),
                )])]);
    let resp = conn.call(&req, 1)?;
    let what = format!("{topic}-{partition}");
    check(resp.error_code, resp.error_message.as_deref(), &what)?;
    let p = resp
        .responses
        .first()
        .and_then(|t| t.partitions.first())
        .context("empty AlterPartitionReassignments response")?;
    check(p.error_code, p.error_message.as_deref(), &what)?;
    match target {
        Some(t) => println!(
            "started the reassignment of {topic}-{partition} to replicas {}",
            id_list(t.iter().copied())
        ),
        None => println!("cancelled the reassignment of {topic}-{partition}"),
    }
    Ok(())
}

fn list(conn: &mut Conn) -> Result<()> {
    let req = ListPartitionReassignmentsRequest::default()
        .with_timeout_ms(TIMEOUT_MS)
        .with_topics(None);
    let resp = conn.call(&req, 0)?;
    check(
        resp.error_code,
        resp.error_message.as_deref(),
        "list reassignments",
    )?;
    let mut rows = Vec::new();
    for t in &resp.topics {
        for p in &t.partitions {
            let ids = |v: &[BrokerId]| id_list(v.iter().map(|b| b.0));
            rows.push((
                t.name.0.to_string(),
                p.partition_index,
                ids(&p.replicas),
                ids(&p.adding_replicas),
                ids(&p.removing_replicas),
            ));
        }
    }
    if rows.is_empty() {
        println!("no reassignment in progress");
        return Ok(());
    }
    rows.sort();
    println!(
        "{:<24} {:>9}  {:<16} {:<16} REMOVING",
        "TOPIC", "PARTITION", "REPLICAS", "ADDING"
    );
    for (t, p, replicas, adding, removing) in rows {
        println!("{t:<24} {p:>9}  {replicas:<16} {adding:<16} {removing}");
    }
    Ok(())
}
