//! `strom bench-groups`: consumer-group timings with librdkafka members (first join, a
//! rebalance of N members over P partitions) and offset-commit throughput from many
//! concurrent groups over the wire. `--create-groups N` only fills the coordinator with N
//! groups (for a load-after-restart measurement by `bench/groups.sh`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use hdrhistogram::Histogram;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{FindCoordinatorRequest, GroupId, OffsetCommitRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;

use crate::client::{error_name, Conn};

#[derive(Args, Debug, Clone)]
pub struct GroupBenchArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic to create for the run (a fresh name per run).
    #[arg(long)]
    topic: String,
    /// Members of the rebalance measurement.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 100)]
    partitions: i32,
    /// Concurrent groups committing offsets.
    #[arg(long, default_value_t = 100)]
    commit_groups: usize,
    #[arg(long, default_value_t = 5)]
    commit_seconds: u64,
    /// Only create this many groups (one committed offset each) and exit.
    #[arg(long)]
    create_groups: Option<usize>,
}

struct Tracker {
    assigned: Mutex<usize>,
}

/// A member polling in its own thread; `assigned` is its current partition count.
struct Member {
    assigned: Arc<Tracker>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    fn start(args: &GroupBenchArgs, group: &str, extra: &[(&str, &str)]) -> Result<Member> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &args.bootstrap)
            .set("group.id", group);
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        let tracker = Arc::new(Tracker {
            assigned: Mutex::new(0),
        });
        let consumer: BaseConsumer<TrackerRef> =
            cfg.create_with_context(TrackerRef(tracker.clone()))?;
        consumer.subscribe(&[&args.topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(20));
            }
        });
        Ok(Member {
            assigned: tracker,
            stop,
            thread: Some(thread),
        })
    }
    fn assigned(&self) -> usize {
        self.assigned.assigned.lock().map(|a| *a).unwrap_or(0)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct TrackerRef(Arc<Tracker>);
impl ClientContext for TrackerRef {}
impl ConsumerContext for TrackerRef {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Ok(mut a) = self.0.assigned.lock() {
            *a = match r {
                Rebalance::Assign(tpl) => tpl.count(),
                _ => 0,
            };
        }
    }
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(start.elapsed())
}

fn commit(conn: &mut Conn, group: &str, topic: &str, partition: i32, offset: i64) -> Result<()> {
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(StrBytes::from_static_str(""))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(partition)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)
                .with_committed_metadata(Some(StrBytes::from_static_str("")))])]);
    let resp = conn.call(&req, 8)?;
    let code = resp.topics[0].partitions[0].error_code;
    if code != 0 {
        bail!("commit for {group}: {}", error_name(code));
    }
    Ok(())
}

/// Runs `groups` committers (one connection and one group each) for `secs` seconds, or until
/// each committed once when `once`. Returns (commits, latency histogram in µs).
fn committers(
    args: &GroupBenchArgs,
    prefix: &str,
    groups: usize,
    secs: u64,
    once: bool,
) -> Result<(u64, Histogram<u64>)> {
    // The coordinator (and __consumer_offsets) must exist first.
    let mut probe = Conn::connect(&args.bootstrap)?;
    let find = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_static_str("probe"))
        .with_key_type(0);
    probe.call(&find, 3)?;
    let done = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads = groups.min(100);
    let mut handles = Vec::new();
    for t in 0..threads {
        let (args, prefix, done, hist) =
            (args.clone(), prefix.to_string(), done.clone(), hist.clone());
        handles.push(std::thread::spawn(move || -> Result<()> {
            let mut conn = Conn::connect(&args.bootstrap)?;
            let mut local = Histogram::<u64>::new(3)?;
            // This thread's groups, committed to in turn.
            let mine: Vec<usize> = (t..groups).step_by(threads).collect();
            let mut i = 0usize;
            loop {
                if (once && i >= mine.len()) || (!once && Instant::now() >= deadline) {
                    break;
                }
                let g = mine[i % mine.len()];
                let group = format!("{prefix}-{g}");
                let started = Instant::now();
                let partition = (g as i32) % args.partitions;
                commit(&mut conn, &group, &args.topic, partition, i as i64)?;
                local.record(started.elapsed().as_micros() as u64)?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            hist.lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .add(&local)?;
            Ok(())
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("committer panicked"))??;
    }
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    Ok((done.load(Ordering::Relaxed), h))
}

pub async fn run(args: GroupBenchArgs) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .create()?;
    let topic = NewTopic::new(&args.topic, args.partitions, TopicReplication::Fixed(1));
    for r in admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("create {t}: {e}");
            }
        }
    }
    let args2 = args.clone();
    tokio::task::spawn_blocking(move || run_blocking(args2)).await?
}

fn run_blocking(args: GroupBenchArgs) -> Result<()> {
    if let Some(n) = args.create_groups {
        let started = Instant::now();
        let (done, _) = committers(&args, "load", n, 0, true)?;
        println!(
            "created {done} groups with one committed offset each in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }

    // First join of one consumer with default client settings.
    let first = Member::start(&args, &format!("{}-first", args.topic), &[])?;
    let t = wait("first assignment", Duration::from_secs(60), || {
        first.assigned() > 0
    })?;
    println!(
        "first join (1 member, default client settings, group.initial.rebalance.delay.ms applies): {} ms",
        t.as_millis()
    );
    drop(first);

    // A rebalance of N members: N-1 stable, then the last joins.
    let group = format!("{}-rebalance", args.topic);
    let fast = [
        ("heartbeat.interval.ms", "100"),
        ("session.timeout.ms", "10000"),
    ];
    let n = args.members.max(2);
    let mut members = Vec::new();
    for _ in 0..n - 1 {
        members.push(Member::start(&args, &group, &fast)?);
    }
    let total = args.partitions as usize;
    wait(
        "first N-1 members balanced",
        Duration::from_secs(120),
        || {
            members.iter().all(|m| m.assigned() > 0)
                && members.iter().map(|m| m.assigned()).sum::<usize>() == total
        },
    )?;
    members.push(Member::start(&args, &group, &fast)?);
    let t = wait("all members balanced", Duration::from_secs(120), || {
        members.iter().all(|m| m.assigned() > 0)
            && members.iter().map(|m| m.assigned()).sum::<usize>() == total
    })?;
    println!(
        "rebalance: {n}th member joins a stable group of {} over {} partitions; all assigned after {} ms (heartbeat.interval.ms 100: members learn of the rebalance at their next heartbeat)",
        n - 1,
        args.partitions,
        t.as_millis()
    );
    drop(members);

    // Offset commit throughput from concurrent groups.
    let (done, hist) = committers(
        &args,
        "commit",
        args.commit_groups,
        args.commit_seconds,
        false,
    )?;
    println!(
        "offset commits: {} groups over {} s: {:.0} commits/s, latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        args.commit_groups,
        args.commit_seconds,
        done as f64 / args.commit_seconds as f64,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
    );
    Ok(())
}
