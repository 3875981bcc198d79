//! `strom bench`: a load generator on librdkafka (an independent client, so what it measures is
//! what users see). Produce throughput at full speed, produce latency percentiles at a fixed
//! rate, and consume throughput; one result line per run, as a Markdown table row.

use std::sync::atomic::{AtomicU64, Ordering};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::sync::Mutex;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Broker to load.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic to create (a fresh name per run is best).
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// Replication factor of the topic created for the run.
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,
    /// Value size of each record.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Records to produce.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Records per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value = "all")]
    acks: String,
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    /// The producer's queue of records not yet acknowledged, in KiB
    /// (`queue.buffering.max.kbytes`). The default, 32 MiB, is the Java producer's
    /// `buffer.memory`: sending blocks while it is full, as a real producer's does, so a slower
    /// broker does not make the load generator buffer the whole run (its page faults then cost
    /// the client more against the slower target, and the latencies measured would be mostly
    /// time queued in the client).
    #[arg(long, default_value_t = 32768)]
    buffer_kbytes: u64,
    /// Also consume everything back and report consume throughput.
    #[arg(long)]
    consume: bool,
    /// Distinct keys (record i gets key i % keys).
    #[arg(long, default_value_t = 1024)]
    keys: u64,
    /// A config of the topic created for the run, NAME=VALUE (repeatable).
    #[arg(long = "topic-config", value_name = "NAME=VALUE")]
    topic_config: Vec<String>,
    /// A label for the result row (e.g. "strom" or "null-sink").
    #[arg(long, default_value = "strom")]
    label: String,
    /// Print the table header before the result row.
    #[arg(long)]
    header: bool,
    /// Also print, per second of the run (by send time), the records acknowledged and their
    /// latency p50/p99/max, to stderr: shows when a tail happens, not only how large it is.
    #[arg(long)]
    timeline: bool,
}

struct LatencyContext {
    hist: Mutex<Histogram<u64>>,
    /// With `--timeline`: one histogram per second since `start`.
    timeline: Option<Mutex<Vec<Histogram<u64>>>>,
    start: Instant,
    acked: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for LatencyContext {}

impl ProducerContext for LatencyContext {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                let us = sent_at.elapsed().as_micros() as u64;
                if let Ok(mut h) = self.hist.lock() {
                    let _ = h.record(us.max(1));
                }
                if let Some(Ok(mut t)) = self.timeline.as_ref().map(|t| t.lock()) {
                    let sec = sent_at.saturating_duration_since(self.start).as_secs() as usize;
                    while t.len() <= sec {
                        match Histogram::new_with_bounds(1, 60_000_000, 3) {
                            Ok(h) => t.push(h),
                            Err(_) => return,
                        }
                    }
                    let _ = t[sec].record(us.max(1));
                }
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    create_topic(&args).await?;
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

async fn create_topic(args: &BenchArgs) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .create()?;
    let mut topic = NewTopic::new(
        &args.topic,
        args.partitions,
        TopicReplication::Fixed(args.replication_factor),
    );
    for kv in &args.topic_config {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--topic-config {kv}: expected NAME=VALUE"))?;
        topic = topic.set(k, v);
    }
    let res = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        if let Err((name, code)) = r {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                bail!("creating {name}: {code:?}");
            }
        }
    }
    Ok(())
}

fn run_blocking(args: BenchArgs) -> Result<()> {
    let start = Instant::now();
    let ctx = LatencyContext {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        timeline: args.timeline.then(|| Mutex::new(Vec::new())),
        start,
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };
    let producer: ThreadedProducer<LatencyContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("acks", &args.acks)
        .set("linger.ms", args.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", args.buffer_kbytes.to_string())
        .set("enable.idempotence", "false")
        .create_with_context(ctx)?;

    let value = vec![b'x'; args.record_bytes];
    let interval = if args.rate > 0 {
        Some(Duration::from_secs_f64(1.0 / args.rate as f64))
    } else {
        None
    };
    for i in 0..args.records {
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let key = (i % args.keys.max(1)).to_be_bytes();
        let partition = (i % args.partitions as u64) as i32;
        let mut record = BaseRecord::with_opaque_to(&args.topic, Box::new(Instant::now()))
            .key(&key[..])
            .payload(&value[..])
            .partition(partition);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => bail!("send: {e}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    let elapsed = start.elapsed().as_secs_f64();
    let c = producer.context();
    let acked = c.acked.load(Ordering::Relaxed);
    let failed = c.failed.load(Ordering::Relaxed);
    let h = c
        .hist
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    if let Some(Ok(t)) = c.timeline.as_ref().map(|t| t.lock()) {
        for (sec, h) in t.iter().enumerate() {
            eprintln!(
                "second {sec}: {} acked, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                h.len(),
                h.value_at_quantile(0.50) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            );
        }
    }
    let rps = acked as f64 / elapsed;
    let mbps = rps * args.record_bytes as f64 / 1e6;
    if args.header {
        println!("{TABLE_HEADER}");
    }
    let mut consume = String::from("-");
    if args.consume {
        let (n, secs) = consume_all(&args)?;
        consume = format!("{:.0} rec/s", n as f64 / secs);
    }
    println!(
        "| {} | {} B | {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} |",
        args.label,
        args.record_bytes,
        args.partitions,
        if args.rate > 0 {
            args.rate.to_string()
        } else {
            "max".into()
        },
        acked,
        rps,
        mbps,
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        failed,
        consume
    );
    Ok(())
}

fn consume_all(args: &BenchArgs) -> Result<(u64, f64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", "strom-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..args.partitions {
        tpl.add_partition_offset(&args.topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let start = Instant::now();
    let mut n = 0u64;
    let deadline = start + Duration::from_secs(300);
    while n < args.records && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if m.payload().is_some() {
                n += 1;
            }
        }
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

/// The header matching the rows `run` prints.
pub const TABLE_HEADER: &str = "| target | record | partitions | rate | acked | records/s | MB/s | p50 ms | p99 ms | p99.9 ms | failed | consume |\n|---|---|---|---|---|---|---|---|---|---|---|---|";
