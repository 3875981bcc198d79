//! `strom topic describe`: each partition's leader, leader epoch, replicas, ISR, eligible leader
//! replicas (KIP-966) and offline replicas, in the manner of `kafka-topics.sh --describe`. It
//! pages through DescribeTopicPartitions (KIP-966) with its cursor.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::describe_topic_partitions_request::{Cursor, TopicRequest};
use kafka_protocol::messages::describe_topic_partitions_response::DescribeTopicPartitionsResponsePartition;
use kafka_protocol::messages::{BrokerId, DescribeTopicPartitionsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::client::{error_name, id_list, Conn};

/// Partitions asked for per request (Kafka's default `response_partition_limit`).
const PAGE_PARTITIONS: i32 = 2000;
/// A bound on the pages of one describe (2000 partitions each).
const MAX_PAGES: usize = 10_000;

#[derive(Args, Debug)]
pub struct TopicArgs {
    /// A broker to talk to (HOST:PORT, or a comma-separated list: the first that answers).
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    cmd: TopicCmd,
}

#[derive(Subcommand, Debug)]
enum TopicCmd {
    /// Per partition: leader, leader epoch, replicas, ISR, ELR and offline replicas.
    Describe {
        /// Only these topics (repeatable); every topic without it.
        #[arg(long)]
        topic: Vec<String>,
    },
}

struct Described {
    topic_id: String,
    internal: bool,
    partitions: Vec<DescribeTopicPartitionsResponsePartition>,
}

pub fn run(args: TopicArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    match args.cmd {
        TopicCmd::Describe { topic } => describe(&mut conn, &topic),
    }
}

fn describe(conn: &mut Conn, topics: &[String]) -> Result<()> {
    let mut found: BTreeMap<String, Described> = BTreeMap::new();
    let mut failed: BTreeMap<String, i16> = BTreeMap::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..MAX_PAGES {
        let req = DescribeTopicPartitionsRequest::default()
            .with_topics(
                topics
                    .iter()
                    .map(|t| {
                        TopicRequest::default()
                            .with_name(TopicName(StrBytes::from_string(t.clone())))
                    })
                    .collect(),
            )
            .with_response_partition_limit(PAGE_PARTITIONS)
            .with_cursor(cursor.take());
        let resp = conn.call(&req, 0)?;
        for t in resp.topics {
            let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
            if t.error_code != 0 {
                failed.insert(name, t.error_code);
                continue;
            }
            // A topic split across pages comes back once per page.
            found
                .entry(name)
                .or_insert_with(|| Described {
                    topic_id: t.topic_id.to_string(),
                    internal: t.is_internal,
                    partitions: Vec::new(),
                })
                .partitions
                .extend(t.partitions);
        }
        match resp.next_cursor {
            None => break,
            Some(next) => {
                cursor = Some(
                    Cursor::default()
                        .with_topic_name(next.topic_name)
                        .with_partition_index(next.partition_index),
                )
            }
        }
    }
    if cursor.is_some() {
        bail!("more than {MAX_PAGES} pages of partitions");
    }

    if found.is_empty() && failed.is_empty() {
        println!("no topics");
    }
    let ids = |v: &[BrokerId]| id_list(v.iter().map(|b| b.0));
    let mut first = true;
    for (name, t) in &found {
        if !first {
            println!();
        }
        first = false;
        println!(
            "Topic: {name}  TopicId: {}  Partitions: {}  Internal: {}",
            t.topic_id,
            t.partitions.len(),
            t.internal
        );
        println!(
            "  {:>9}  {:>6}  {:>5}  {:<16} {:<16} {:<16} OFFLINE",
            "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR", "ELR"
        );
        for p in &t.partitions {
            let leader = if p.leader_id.0 < 0 {
                "none".to_string()
            } else {
                p.leader_id.0.to_string()
            };
            println!(
                "  {:>9}  {:>6}  {:>5}  {:<16} {:<16} {:<16} {}",
                p.partition_index,
                leader,
                p.leader_epoch,
                ids(&p.replica_nodes),
                ids(&p.isr_nodes),
                ids(p.eligible_leader_replicas.as_deref().unwrap_or(&[])),
                ids(&p.offline_replicas),
            );
        }
    }
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|(t, code)| format!("{t}: {}", error_name(*code)))
            .collect();
        bail!("cannot describe topic {}", why.join(", "));
    }
    Ok(())
}
