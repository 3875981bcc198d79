//! A group consumer in its own process, so tests can `kill -9` one member of a group. It
//! subscribes with librdkafka and prints one line per event on stdout:
//! `ASSIGN p,p,..`, `REVOKE p,p,..` (after a synchronous commit of what it consumed), then
//! `OWN p,p,..` with the whole current assignment (incremental protocols change it piecewise),
//! and `MSG partition offset`. Usage: `group-consumer BOOTSTRAP GROUP TOPIC [name=value ...]`.

use std::io::Write;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, TopicPartitionList};

struct Ctx;
impl ClientContext for Ctx {}

fn partitions(tpl: &TopicPartitionList) -> String {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort();
    ps.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            say(format!("REVOKE {}", partitions(tpl)));
        }
    }
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            say(format!("ASSIGN {}", partitions(tpl)));
        }
        if let Ok(all) = consumer.assignment() {
            say(format!("OWN {}", partitions(&all)));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: group-consumer BOOTSTRAP GROUP TOPIC [name=value ...]");
        std::process::exit(2);
    }
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args[1])
        .set("group.id", &args[2])
        .set("auto.offset.reset", "earliest");
    // With the KIP-848 protocol the broker owns session and heartbeat timing.
    if !args[4..].iter().any(|a| a == "group.protocol=consumer") {
        cfg.set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
    }
    for kv in &args[4..] {
        if let Some((k, v)) = kv.split_once('=') {
            cfg.set(k, v);
        }
    }
    let consumer: BaseConsumer<Ctx> = cfg.create_with_context(Ctx).expect("consumer");
    consumer.subscribe(&[&args[3]]).expect("subscribe");
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => say(format!("MSG {} {}", m.partition(), m.offset())),
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
}
