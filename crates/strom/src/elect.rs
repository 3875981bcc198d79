//! `strom elect`: a preferred or unclean leader election (KIP-460 ElectLeaders) for one
//! partition or for every partition, in the manner of `kafka-leader-election.sh`. As there, a
//! partition that needs no election (ELECTION_NOT_NEEDED) is reported but is not a failure.

use anyhow::{bail, Result};
use clap::{ArgGroup, Args, ValueEnum};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
use kafka_protocol::messages::{ElectLeadersRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::client::{check, detail, error_name, Conn};

/// How long the broker may take over the request.
const TIMEOUT_MS: i32 = 25_000;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ElectionType {
    /// Back to the first replica, if it is alive and in sync.
    Preferred,
    /// A leaderless partition gets a leader, from outside the ISR if it must (data may be lost).
    Unclean,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["topic", "all"])))]
pub struct ElectArgs {
    /// A broker to talk to (HOST:PORT, or a comma-separated list: the first that answers).
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long = "type", value_enum)]
    election_type: ElectionType,
    /// The partition's topic.
    #[arg(long, requires = "partition")]
    topic: Option<String>,
    /// The partition.
    #[arg(long, requires = "topic")]
    partition: Option<i32>,
    /// Every partition that needs the election.
    #[arg(long)]
    all: bool,
}

pub fn run(args: ElectArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    let (code, label) = match args.election_type {
        ElectionType::Preferred => (0, "PREFERRED"),
        ElectionType::Unclean => (1, "UNCLEAN"),
    };
    let partitions = match (&args.topic, args.partition) {
        (Some(t), Some(p)) => Some(vec![TopicPartitions::default()
            .with_topic(TopicName(StrBytes::from_string(t.clone())))
            .with_partitions(vec![p])]),
        _ => None,
    };
    let req = ElectLeadersRequest::default()
        .with_election_type(code)
        .with_timeout_ms(TIMEOUT_MS)
        .with_topic_partitions(partitions);
    let resp = conn.call(&req, 2)?;
    check(resp.error_code, None, &format!("leader election ({label})"))?;
    let (mut elected, mut not_needed, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for t in &resp.replica_election_results {
        for p in &t.partition_result {
            let tp = format!("{}-{}", t.topic.0, p.partition_id);
            if p.error_code == 0 {
                elected.push(tp);
            } else if p.error_code == ResponseError::ElectionNotNeeded.code() {
                not_needed.push(tp);
            } else {
                failed.push(format!(
                    "{tp}: {}{}",
                    error_name(p.error_code),
                    detail(p.error_message.as_deref())
                ));
            }
        }
    }
    if !elected.is_empty() {
        println!(
            "leader election ({label}) done for partitions {}",
            elected.join(", ")
        );
    }
    if !not_needed.is_empty() {
        println!(
            "a valid leader was already elected for partitions {}",
            not_needed.join(", ")
        );
    }
    if elected.is_empty() && not_needed.is_empty() && failed.is_empty() {
        println!("no partition needed a {label} election");
    }
    if !failed.is_empty() {
        bail!("leader election ({label}) failed for {}", failed.join(", "));
    }
    Ok(())
}
