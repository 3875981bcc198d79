//! A replicated cluster of real `strom` processes (Raft metadata quorum, ISR replication),
//! driven by librdkafka: leader failover under an acks=all idempotent producer with nothing
//! acknowledged lost, controller failover, a restarted node catching up and rejoining the ISR,
//! min.insync.replicas refusing acks=all writes once too few replicas remain, controlled
//! shutdown of the active controller (leaderships and the quorum handed over before exit),
//! partition reassignment (KIP-455) moving a replica off its leader under load, or pending and
//! cancelled,
//! a broker-only node (not a controller voter) leading and following partitions, an active
//! controller cut off from the other voters by a silent network resigning (check quorum) and
//! following the new one once healed, and one whose voters are down (refusing) resigning too,
//! a follower whose disk is full backing off and catching up once it has space again, a
//! leader whose fsync fails and a controller whose metadata log fails stopping and the
//! others taking over,
//! DescribeTopicPartitions (KIP-966: ISR, ELR, offline replicas, paging), the `strom topic`,
//! `reassign`, `elect` and `quorum` commands run as a separate process, and a seeded schedule
//! of random faults (kills, pauses, shutdowns, two nodes at once, replaced disks) after which
//! nothing acknowledged is lost and the replicas agree.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use kafka_protocol::error::ResponseError;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use strom_proto::compression::Compression;
use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};
use strom_tests::cluster::{Cluster, Network, PartitionState};
use strom_tests::proxy::Proxy;
use strom_tests::{
    all_threads_traced, expect_storage_halt, fail_fsyncs, produce_raw, slow_fsyncs, stop_tracing,
    wait_for, RawClient, SmallDisk,
};

fn one_record(value: &str) -> bytes::Bytes {
    let r = NewRecord {
        key: None,
        value: Some(value.as_bytes().to_vec()),
        headers: Vec::new(),
        timestamp: 1_700_000_000_000,
    };
    bytes::Bytes::from(encode_batch(&[r], Compression::None, ProducerInfo::default()).unwrap())
}

const WAIT: Duration = Duration::from_secs(30);

async fn create_replicated(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    rf: i32,
    configs: &[(&str, &str)],
) {
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(rf));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let res = common::admin(bootstrap)
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(n, e)| panic!("create {n}: {e:?}"));
    }
}

fn producer(bootstrap: &str, acks: &str, idempotent: bool) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", acks)
        .set(
            "enable.idempotence",
            if idempotent { "true" } else { "false" },
        )
        .set("linger.ms", "2")
        .set("message.timeout.ms", "60000")
        .set("retry.backoff.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap()
}

/// Produces the values one at a time to partition 0, each acknowledged before the next.
async fn send_values(p: &FutureProducer, topic: &str, values: std::ops::Range<u64>) {
    for i in values {
        let v = i.to_string();
        p.send(
            FutureRecord::<(), _>::to(topic).payload(&v).partition(0),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
}

/// Reads partition `p` from the start until `n` records or the timeout; returns the values.
fn read_values(bootstrap: &str, topic: &str, p: i32, n: usize, timeout: Duration) -> Vec<u64> {
    let c = assigned_consumer(bootstrap, topic, p);
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(value_of(&m)),
            Some(Err(e)) => eprintln!("consume: {e}"),
            None => {}
        }
    }
    out
}

/// A consumer (no group) assigned partition `p` of `topic` from the beginning.
fn assigned_consumer(bootstrap: &str, topic: &str, p: i32) -> BaseConsumer {
    let c: BaseConsumer = assign_config(bootstrap).create().unwrap();
    assign_from_beginning(&c, topic, p);
    c
}

/// A consumer that is assigned its partition (no group membership, no commits).
fn assign_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "unused-assign-only")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500");
    config
}

fn assign_from_beginning<C: rdkafka::consumer::ConsumerContext>(
    c: &BaseConsumer<C>,
    topic: &str,
    p: i32,
) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
}

/// The number a test record carries as its value.
fn value_of(m: &rdkafka::message::BorrowedMessage<'_>) -> u64 {
    std::str::from_utf8(m.payload().unwrap_or_default())
        .unwrap()
        .parse::<u64>()
        .unwrap()
}

/// The last lines a librdkafka client logged (its `debug` output included), for a test that
/// fails to tell what the client was doing.
#[derive(Clone, Default)]
struct RecentClientLog(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl RecentClientLog {
    const LINES: usize = 400;

    fn text(&self) -> String {
        self.0
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl rdkafka::ClientContext for RecentClientLog {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(format!("{:?} {level:?} {fac} {message}", Instant::now()));
    }
}

impl rdkafka::consumer::ConsumerContext for RecentClientLog {}

/// A consumer of partition `p` from the beginning, on its own thread, that runs until it has
/// `until` records (usize::MAX: keep going), or 60 s after `until` was set: every (offset,
/// value) it was given, in the order it was given them, from `join`. It keeps its last log
/// lines, fetches and leader changes included, for `check`.
fn consume_continuously(
    bootstrap: &str,
    topic: &str,
    p: i32,
    until: Arc<AtomicUsize>,
) -> Consuming {
    let recent = RecentClientLog::default();
    let c: BaseConsumer<RecentClientLog> = assign_config(bootstrap)
        .set("debug", "fetch,topic,metadata")
        .create_with_context(recent.clone())
        .unwrap();
    assign_from_beginning(&c, topic, p);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut deadline = None;
        loop {
            let want = until.load(Ordering::Acquire);
            if want != usize::MAX {
                let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
                if out.len() >= want || Instant::now() >= d {
                    break;
                }
            }
            match c.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => out.push((m.offset(), value_of(&m))),
                Some(Err(e)) => eprintln!("consume: {e}"),
                None => {}
            }
        }
        let _ = tx.send(out);
        // Closing a consumer with a group.id can wait in librdkafka for good (seen once, when
        // a node had stopped answering): the answer is already out, and this thread ends
        // with the test.
        drop(c);
    });
    Consuming(rx, recent)
}

/// The answer of `consume_continuously`.
struct Consuming(std::sync::mpsc::Receiver<Vec<(i64, u64)>>, RecentClientLog);

impl Consuming {
    /// What the consumer was given is the log `values` holds, all of it (`check_consumed`);
    /// if it fell short, its last log lines are printed first.
    fn check(self, values: &[u64]) {
        let consumed = self.0.recv().unwrap();
        if consumed.len() != values.len() {
            eprintln!(
                "the continuous consumer's last log lines:\n{}",
                self.1.text()
            );
        }
        check_consumed(&consumed, values);
    }
}

/// Produces 0..total to `partition` with at most 500 in flight; counts acknowledgements in
/// `acked_count` and returns the acknowledged values.
async fn produce_sequence(
    p: FutureProducer,
    topic: String,
    partition: i32,
    total: u64,
    acked_count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, usize) {
    let (acked, failed) = produce_window(p, topic, partition, total, 500, acked_count, stop).await;
    (acked.into_iter().map(|(v, _)| v).collect(), failed)
}

/// Produces 0..total to `partition` with at most `window` records in flight; counts
/// acknowledgements in `acked_count` and returns each acknowledged value with the offset it was
/// acknowledged at.
async fn produce_window(
    p: FutureProducer,
    topic: String,
    partition: i32,
    total: u64,
    window: usize,
    acked_count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (Vec<(u64, i64)>, usize) {
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut inflight = FuturesUnordered::new();
    for i in 0..total {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let value = i.to_string();
        let fut = p
            .send_result(
                FutureRecord::<(), _>::to(&topic)
                    .payload(&value)
                    .partition(partition),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
        inflight.push(async move { (i, fut.await) });
        while inflight.len() >= window {
            let (i, r) = inflight.next().await.unwrap();
            match r {
                Ok(Ok(delivery)) => {
                    acked.push((i, delivery.offset));
                    acked_count.fetch_add(1, Ordering::AcqRel);
                }
                _ => failed += 1,
            }
        }
    }
    while let Some((i, r)) = inflight.next().await {
        match r {
            Ok(Ok(delivery)) => {
                acked.push((i, delivery.offset));
                acked_count.fetch_add(1, Ordering::AcqRel);
            }
            _ => failed += 1,
        }
    }
    (acked, failed)
}

/// Waits (up to 60 s) until `acked` counts `n` acknowledgements; fails with `what` otherwise.
async fn wait_acked(c: &Cluster, acked: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Acquire) < n {
        assert!(Instant::now() < deadline, "{what}:\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the partition back (everything acknowledged and what failed but may have been
/// written) and checks it against the acknowledged history.
fn read_back_and_check(b: &str, topic: &str, p: i32, acked: &[u64], failed: usize) -> Vec<u64> {
    let values = read_values(b, topic, p, acked.len() + failed, Duration::from_secs(60));
    check_history(acked, &values);
    values
}

/// Prints each run of acknowledged values missing from `values` (what partition `p` holds)
/// with the offsets they were acknowledged at, and what the log holds there now: where to look
/// in the nodes' logs (`STROM_KEEP_LOGS=1` keeps them).
fn describe_loss(p: usize, acked_at: &[(u64, i64)], values: &[u64]) {
    let held: HashSet<u64> = values.iter().copied().collect();
    let lost: Vec<&(u64, i64)> = acked_at.iter().filter(|(v, _)| !held.contains(v)).collect();
    for run in lost.chunk_by(|a, b| b.0 == a.0 + 1) {
        let (first, last) = (run[0], run[run.len() - 1]);
        let now = |o: i64| values.get(o as usize).copied();
        eprintln!(
            "partition {p}: values {}..={} lost, acknowledged at offsets {}..={}; the log now \
             holds {:?}..={:?} there",
            first.0,
            last.0,
            first.1,
            last.1,
            now(first.1),
            now(last.1)
        );
    }
}

/// What was read back is the history a client expects: no value twice, in the order produced,
/// every acknowledged value present.
fn check_history(acked: &[u64], values: &[u64]) {
    let mut seen = HashSet::new();
    for v in values {
        assert!(seen.insert(*v), "value {v} was stored twice");
    }
    for w in values.windows(2) {
        assert!(w[0] < w[1], "order not preserved: {} before {}", w[0], w[1]);
    }
    let missing: Vec<u64> = acked
        .iter()
        .filter(|v| !seen.contains(v))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// What a consumer that ran through failovers was given (offset, value) against the log read
/// back afterwards (`values`, from offset 0): every offset once, in order, each holding what
/// the log holds (nothing it was given was truncated away later), up to the end.
fn check_consumed(consumed: &[(i64, u64)], values: &[u64]) {
    for w in consumed.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "the consumer went backwards or saw an offset twice: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    for (offset, v) in consumed {
        assert_eq!(
            values.get(*offset as usize),
            Some(v),
            "the consumer was given offset {offset} = {v}, which the log does not hold"
        );
    }
    assert_eq!(
        consumed.len(),
        values.len(),
        "the continuous consumer did not reach the end of the log (last given: {:?})",
        consumed.last()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_record_and_the_node_rejoins() {
    // Every follower write goes past the page cache (by default only large ones do): the
    // kill interrupts that path, and the restarted node recovers from it.
    let mut c = Cluster::start(3, &["strom.replica.direct.min.bytes=0"]);
    let b = c.bootstrap();
    create_replicated(&b, "orders", 1, 3, &[("min.insync.replicas", "2")]).await;
    let before = c.wait_partition("orders", 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });

    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_until = Arc::new(AtomicUsize::new(usize::MAX));
    let consumer = consume_continuously(&b, "orders", 0, consumer_until.clone());
    let total = 40_000;
    let task = tokio::spawn(produce_sequence(
        producer(&b, "all", true),
        "orders".into(),
        0,
        total,
        acked_count.clone(),
        stop.clone(),
    ));
    wait_acked(&c, &acked_count, 5_000, "producer made no progress").await;
    let victim = before.leader;
    let at_kill = acked_count.load(Ordering::Acquire);
    let killed_at = Instant::now();
    c.node(victim).kill9();
    // Writes resume: more acknowledgements arrive after the kill.
    let what = "writes did not resume after the leader was killed";
    wait_acked(&c, &acked_count, at_kill + 5_000, what).await;
    eprintln!(
        "writes resumed; 5000 more acknowledged {:?} after the kill",
        killed_at.elapsed()
    );
    let after = c.wait_partition("orders", 0, WAIT, "a new leader", |s| {
        s.leader > 0 && s.leader != victim
    });
    assert!(after.leader_epoch > before.leader_epoch);
    assert!(
        !after.isr.contains(&victim),
        "a dead broker stays in the ISR: {after:?}"
    );

    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {} of {total}, {failed} failed", acked.len());
    assert!(acked.len() > 10_000);

    // The killed node comes back, truncates what it must, catches up and rejoins the ISR.
    c.node(victim).restart();
    c.wait_partition(
        "orders",
        0,
        Duration::from_secs(60),
        "the restarted node rejoins the ISR",
        |s| s.isr.contains(&victim),
    );

    let values = read_back_and_check(&b, "orders", 0, &acked, failed);

    // The consumer that ran through the failover saw only what the log keeps (nothing it was
    // given was later truncated away), each offset once and in order, and reached the end.
    consumer_until.store(values.len(), Ordering::Release);
    consumer.check(&values);

    // Now the restarted node must hold the same log: make it the only possible leader by
    // stopping the others one at a time is not possible without the quorum, so kill the current
    // leader and read again from whoever leads next (the restarted node or the third one).
    let leader_now = c.view().unwrap().partition("orders", 0).unwrap().leader;
    c.node(leader_now).kill9();
    c.wait_partition("orders", 0, WAIT, "another new leader", |s| {
        s.leader > 0 && s.leader != leader_now
    });
    // It kept its log: a restart must never take its partitions for deleted ones.
    assert!(
        !c.node(victim).log().contains("removing the log"),
        "the restarted node dropped a log:\n{}",
        c.node(victim).log()
    );
    let again = read_values(&b, "orders", 0, values.len(), Duration::from_secs(60));
    assert_eq!(again, values, "the next leader serves a different log");
}

/// A zombie: the node that leads the partition and is the active controller stops (SIGSTOP,
/// as in a long GC pause or a stalled VM) with its connections open, so nobody sees it go.
/// The others elect a new controller and partition leader, writes resume; then it wakes up
/// believing it still leads both, with produce requests waiting in its sockets. It must not
/// acknowledge anything it appends then, must step down to follow the new leader (dropping what
/// it appended as a stale leader) and rejoin the ISR; nothing acknowledged is lost, nothing is
/// stored twice, and a consumer running throughout never sees a record taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_and_controller_wakes_up_as_a_follower_and_nothing_acked_is_lost() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "zombie", 3, 3, &[("min.insync.replicas", "2")]).await;
    let controller = c.view().unwrap().controller;
    // Leaders are spread over the brokers: one partition is led by the controller.
    let (p, before) = wait_for(WAIT, "a partition led by the controller", || {
        let v = c.view()?;
        (0..3).find_map(|p| {
            let s = v.partition("zombie", p)?;
            (s.leader == controller && s.isr.len() == 3).then(|| (p as i32, s.clone()))
        })
    });

    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_until = Arc::new(AtomicUsize::new(usize::MAX));
    let consumer = consume_continuously(&b, "zombie", p, consumer_until.clone());
    // A request to a paused broker gets no answer, only silence: librdkafka gives up on the
    // connection after socket.timeout.ms (default 60 s; its produce requests wait for
    // message.timeout.ms otherwise), fails what is in flight there as possibly persisted and
    // retries it on the new leader, in order (idempotence).
    let prod: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("socket.timeout.ms", "3000")
        .set("message.timeout.ms", "60000")
        .set("retry.backoff.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    let total = 40_000;
    let task = tokio::spawn(produce_sequence(
        prod,
        "zombie".into(),
        p,
        total,
        acked_count.clone(),
        stop.clone(),
    ));
    wait_acked(&c, &acked_count, 5_000, "producer made no progress").await;
    let at_pause = acked_count.load(Ordering::Acquire);
    let paused_at = Instant::now();
    c.node(controller).pause();
    let after = c.wait_partition("zombie", p as usize, WAIT, "a new leader", |s| {
        s.leader > 0 && s.leader != controller
    });
    assert!(after.leader_epoch > before.leader_epoch);
    let v = wait_view(&mut c, WAIT, "a new controller", |v| {
        v.controller > 0 && v.controller != controller
    })
    .await;
    eprintln!(
        "new leader {} and controller {} {:?} after the pause",
        after.leader,
        v.controller,
        paused_at.elapsed()
    );
    let what = "writes did not resume after the leader was paused";
    wait_acked(&c, &acked_count, at_pause + 5_000, what).await;
    eprintln!(
        "writes resumed; 5000 more acknowledged {:?} after the pause",
        paused_at.elapsed()
    );

    // It wakes up with the producer still writing.
    c.node(controller).resume();
    let rejoined = c.wait_partition(
        "zombie",
        p as usize,
        Duration::from_secs(60),
        "the woken node rejoins the ISR as a follower",
        |s| s.isr.contains(&controller) && s.leader != controller,
    );
    assert_eq!(rejoined.leader_epoch, after.leader_epoch, "{rejoined:?}");
    // Its own view agrees: it follows the new controller and the new leader.
    let own = wait_for(WAIT, "the woken node's metadata to catch up", || {
        let v = c.view_from(controller)?;
        let s = v.partition("zombie", p as usize)?.clone();
        (v.controller != controller && s.leader == after.leader).then_some(v)
    });
    assert!(own.brokers.contains(&controller), "{:?}", own.brokers);
    let q = describe_quorum(&mut c, controller);
    assert_ne!(
        q.leader, controller,
        "the woken node still calls itself the quorum's leader"
    );

    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {} of {total}, {failed} failed", acked.len());
    assert!(acked.len() > 10_000);
    let values = read_back_and_check(&b, "zombie", p, &acked, failed);
    consumer_until.store(values.len(), Ordering::Release);
    consumer.check(&values);

    // The woken node holds the same log as the leader: it is the preferred replica (it led
    // first), so a preferred election makes it lead again, and it serves the same records.
    assert_eq!(before.replicas[0], controller, "{before:?}");
    assert_eq!(elect_leaders(&mut c, after.leader, 0, "zombie", p), 0);
    c.wait_partition(
        "zombie",
        p as usize,
        WAIT,
        "the woken node leads again",
        |s| s.leader == controller,
    );
    let again = read_values(&b, "zombie", p, values.len(), Duration::from_secs(60));
    assert_eq!(again, values, "the woken node serves a different log");
}

/// The whole cluster stops at once (SIGSTOP to every node, as when the machine or VM they run
/// on stalls) for longer than two broker sessions, then goes on. Nobody was silent while
/// anybody watched: the controller must not take its own stall for the brokers' silence and
/// fence them (which would leave every partition without a leader until they heartbeat
/// again), and no partition changes leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_of_the_whole_cluster_fences_no_broker_and_moves_no_leader() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "stall", 3, 3, &[("min.insync.replicas", "2")]).await;
    let before = wait_view(&mut c, WAIT, "full ISRs", |v| {
        (0..3).all(|p| v.partition("stall", p).is_some_and(|s| s.isr.len() == 3))
    })
    .await;
    for id in 1..=3 {
        c.node(id).pause();
    }
    std::thread::sleep(Duration::from_millis(3000));
    for id in 1..=3 {
        c.node(id).resume();
    }
    // Watch for a few sessions (broker.session.timeout.ms is 1200 ms): every broker stays
    // registered and unfenced and every partition keeps its leader and leader epoch.
    let until = Instant::now() + Duration::from_secs(4);
    let mut views = 0;
    while Instant::now() < until {
        if let Some(v) = c.view() {
            views += 1;
            assert_eq!(
                v.brokers,
                vec![1, 2, 3],
                "a broker was fenced:\n{}",
                c.logs()
            );
            for p in 0..3 {
                let (was, now) = (before.partition("stall", p), v.partition("stall", p));
                assert_eq!(
                    was.map(|s| (s.leader, s.leader_epoch)),
                    now.map(|s| (s.leader, s.leader_epoch)),
                    "partition {p} changed leader:\n{}",
                    c.logs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        views > 10,
        "the cluster hardly answered after the stall ({views} views)"
    );
    assert!(
        !(1..=3).any(|id| c.node(id).log().contains("missed its session timeout")),
        "a broker was judged by the controller's own stall:\n{}",
        c.logs()
    );
    let p = producer(&b, "all", true);
    send_values(&p, "stall", 0..20).await;
    assert_eq!(
        read_values(&b, "stall", 0, 20, WAIT),
        (0..20).collect::<Vec<_>>()
    );
}

/// What DescribeQuorum (v2) answers: the leader, its epoch, the high watermark, and the voters
/// and observers with their log end offsets.
struct Quorum {
    leader: i32,
    epoch: i32,
    high_watermark: i64,
    voters: Vec<(i32, i64)>,
    observers: Vec<(i32, i64)>,
    /// Each voter's metadata log directory id (KIP-853, v2; nil where none is recorded).
    directories: Vec<(i32, String)>,
}

/// DescribeQuorum (v2) through node `id`.
fn describe_quorum(c: &mut Cluster, id: i32) -> Quorum {
    try_describe_quorum(c, id)
        .unwrap_or_else(|(code, message)| panic!("DescribeQuorum: error {code}: {message:?}"))
}

/// DescribeQuorum (v2) through node `id`: the quorum, or the error code and message it
/// answered with (a node that knows no active controller cannot ask one).
fn try_describe_quorum(c: &mut Cluster, id: i32) -> Result<Quorum, (i16, Option<String>)> {
    use kafka_protocol::messages::describe_quorum_request::{PartitionData, TopicData};
    use kafka_protocol::messages::describe_quorum_response::ReplicaState;
    use kafka_protocol::messages::{
        ApiKey, DescribeQuorumRequest, DescribeQuorumResponse, TopicName,
    };
    use kafka_protocol::protocol::StrBytes;
    let mut raw = RawClient::connect(c.node(id).addr());
    let req = DescribeQuorumRequest::default().with_topics(vec![TopicData::default()
        .with_topic_name(TopicName(StrBytes::from_static_str("__cluster_metadata")))
        .with_partitions(vec![PartitionData::default().with_partition_index(0)])]);
    let resp: DescribeQuorumResponse = raw.call(ApiKey::DescribeQuorum, 2, &req);
    let p = &resp.topics[0].partitions[0];
    if p.error_code != 0 {
        return Err((
            p.error_code,
            p.error_message.as_ref().map(|m| m.to_string()),
        ));
    }
    assert_eq!(resp.nodes.len(), 3, "controller listeners of the voters");
    let ids = |rs: &[ReplicaState]| {
        let mut v: Vec<(i32, i64)> = rs
            .iter()
            .map(|r| (r.replica_id.0, r.log_end_offset))
            .collect();
        v.sort_unstable();
        v
    };
    let mut directories: Vec<(i32, String)> = p
        .current_voters
        .iter()
        .map(|r| (r.replica_id.0, r.replica_directory_id.to_string()))
        .collect();
    directories.sort_unstable();
    Ok(Quorum {
        leader: p.leader_id.0,
        epoch: p.leader_epoch,
        high_watermark: p.high_watermark,
        voters: ids(&p.current_voters),
        observers: ids(&p.observers),
        directories,
    })
}

/// A controller is stopped until the others have elected a new one in a later term, then
/// killed, and so is the new one. The old controller restarts first: it comes back believing
/// it still leads its old term, the voter left has seen a later one and refuses it, and it must
/// then go through an election with that voter instead of failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_after_the_others_moved_on_starts_and_rejoins() {
    let mut c = Cluster::start(3, &[]);
    let old = c.view().unwrap().controller;
    c.node(old).pause();
    let new = wait_for(WAIT, "a new controller", || {
        c.view()
            .map(|v| v.controller)
            .filter(|n| *n > 0 && *n != old)
    });
    let left = 6 - old - new;
    c.node(old).kill9();
    c.node(new).kill9();
    c.node(old).restart();
    let b = c.node(left).bootstrap();
    create_replicated(&b, "after", 1, 1, &[]).await;
    c.node(new).restart();
    c.wait_brokers(3, WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_controller_takes_over_and_metadata_changes_work_again() {
    let mut c = Cluster::start(3, &[]);
    let old = c.view().unwrap().controller;
    let asked = if old == 1 { 2 } else { 1 };
    let Quorum {
        leader,
        epoch,
        high_watermark: hw,
        voters,
        observers,
        ..
    } = describe_quorum(&mut c, asked);
    assert!(observers.is_empty(), "no broker-only nodes: {observers:?}");
    // Each voter's directory id, once the controller has recorded them, is the one in its
    // metadata log directory.
    let kept: Vec<(i32, String)> = (1..=3)
        .map(|id| {
            let file = c
                .node(id)
                .data_dir()
                .join("__cluster_metadata-0/directory.id");
            (
                id,
                std::fs::read_to_string(file).unwrap().trim().to_string(),
            )
        })
        .collect();
    wait_for(WAIT, "the voters' directory ids", || {
        let q = describe_quorum(&mut c, asked);
        eprintln!("directory ids {:?}", q.directories);
        (q.directories == kept).then_some(())
    });
    assert_eq!(
        leader, old,
        "DescribeQuorum from a follower names the active controller"
    );
    assert!(hw > 0);
    assert_eq!(
        voters.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        voters.iter().all(|(_, end)| *end > 0),
        "every voter has replicated: {voters:?}"
    );
    c.node(old).kill9();
    let deadline = Instant::now() + WAIT;
    let new = loop {
        if let Some(v) = c.view() {
            if v.controller > 0 && v.controller != old {
                break v.controller;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new controller:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(new, old);
    // The new controller fences the dead node once its session runs out.
    c.wait_brokers(2, WAIT);
    let live: Vec<String> = (1..=3)
        .filter(|id| *id != old)
        .map(|id| c.node(id).bootstrap())
        .collect();
    create_replicated(&live.join(","), "after-failover", 2, 2, &[]).await;
    let s = c.wait_partition("after-failover", 1, WAIT, "leaders", |s| {
        s.leader > 0 && s.isr.len() == 2
    });
    assert!(!s.replicas.contains(&old), "placed on a dead broker: {s:?}");
    let asked = (1..=3).find(|id| *id != old).unwrap();
    let q = describe_quorum(&mut c, asked);
    assert_eq!(q.leader, new);
    assert!(
        q.epoch > epoch && q.high_watermark > hw,
        "the quorum moved on"
    );
}

/// A node restarted while the active controller's answers cannot reach it (it hears the
/// metadata log, but the answer to its registration is held) retries its registration instead
/// of failing to start, and joins once the link heals. Found by the random-fault test: a one-way
/// cut during a restart once ended the node with "no active controller answered".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_registration_goes_unanswered_retries_until_it_registers() {
    let (mut c, net) = Cluster::start_partitionable(3, 0, &[]).await;
    let controller = c.view().unwrap().controller;
    let n = (1..=3).find(|id| *id != controller).unwrap();
    c.node(n).kill9();
    net.controller[&(n, controller)].hold_replies();
    // Returns once its listener is bound, before it registers.
    c.node(n).restart();
    wait_for(WAIT, "a registration attempt to fail", || {
        let log = c.node(n).log();
        log.contains("registration with the controller failed; retrying")
            .then_some(())
    });
    assert!(c.node(n).is_running(), "{}", c.node(n).log());
    net.heal();
    c.wait_brokers(3, WAIT);
    assert!(c.node(n).is_running(), "{}", c.node(n).log());
}

/// A follower fenced by the controller (its heartbeats held on its link to the active
/// controller) while its replica fetcher still reaches the leader is not proposed for the ISR
/// on its every fetch: a leader asks to add live replicas only (KIP-841), as the controller
/// refuses the others. The random-fault test once saw a leader ask hundreds of times a second.
/// Healed, the follower is unfenced and rejoins the ISR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_follower_that_still_fetches_is_not_proposed_for_the_isr_again_and_again() {
    let (mut c, net) = Cluster::start_partitionable(3, 0, &[]).await;
    let b = c.bootstrap();
    create_replicated(&b, "fenced", 1, 3, &[]).await;
    c.wait_partition("fenced", 0, WAIT, "a full ISR", |s| s.isr.len() == 3);
    let controller = c.view().unwrap().controller;
    let n = (1..=3).find(|id| *id != controller).unwrap();
    net.controller[&(n, controller)].hold();
    let others: Vec<i32> = (1..=3).filter(|id| *id != n).collect();
    wait_for(WAIT, "the cut-off broker to be fenced", || {
        (c.view_from(controller)?.brokers == others).then_some(())
    });
    let s = c.wait_partition("fenced", 0, WAIT, "the fenced broker out", |s| {
        s.leader > 0 && s.leader != n && !s.isr.contains(&n)
    });
    // It keeps fetching, caught up, for two seconds.
    let producer = producer(&b, "all", true);
    for i in 0..20 {
        let v = i.to_string();
        let record = FutureRecord::<(), _>::to("fenced").payload(&v).partition(0);
        producer.send(record, WAIT).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused =
        format!("change=Add({n}) error=the proposed ISR contains a replica that is not live");
    let asked = c.node(s.leader).log().matches(&refused).count();
    assert!(
        asked <= 3,
        "the leader proposed fenced node {n} {asked} times:\n{}",
        c.logs()
    );
    net.heal();
    c.wait_partition(
        "fenced",
        0,
        WAIT,
        "the healed broker back in the ISR",
        |s| s.isr.len() == 3,
    );
}

/// Waits until the former active controller `old`, asked directly, no longer names itself
/// (without check quorum it would forever: nothing tells it of a newer term) and has logged its
/// resignation. The bound is generous; the window is 1.5 election timeouts (900 ms by default).
fn wait_resigned(c: &mut Cluster, old: i32, since: Instant, after: &str) {
    wait_for(Duration::from_secs(5), "the controller to resign", || {
        let v = c.view_from(old)?;
        (v.controller != old).then_some(v)
    });
    eprintln!(
        "node {old} stopped naming itself the controller {:?} after {after}",
        since.elapsed()
    );
    assert!(
        c.node(old)
            .log()
            .contains("no longer acting as the active controller"),
        "the resignation is logged:\n{}",
        c.logs()
    );
}

/// Waits until the two nodes `others` name the same controller, one of them, and returns it.
fn agreed_controller_among(c: &mut Cluster, others: &[i32]) -> i32 {
    wait_for(WAIT, "the other two to agree on a new controller", || {
        let a = c.view_from(others[0])?.controller;
        let b = c.view_from(others[1])?.controller;
        (a == b && others.contains(&a)).then_some(a)
    })
}

/// A one-way partition: the active controller's requests still reach the other voters but
/// nothing they send reaches it, answers included. Its appends and heartbeats then wait out
/// their timeouts instead of keeping the others from electing, and the two others elect a
/// controller and change metadata again; the cut-off node, which hears of no newer term,
/// stops naming itself after the check-quorum window. Healed, it follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_is_heard_but_hears_nothing_is_replaced_and_stops_claiming() {
    // Only the controller links are held here (not the replica fetchers').
    let (mut c, net) = Cluster::start_partitionable(3, 0, &[]).await;
    let proxies = &net.controller;
    let old = c.view().unwrap().controller;
    let others: Vec<i32> = (1..=3).filter(|id| *id != old).collect();
    let before = describe_quorum(&mut c, old);
    for ((from, to), p) in proxies {
        if *from == old {
            p.hold_replies();
        } else if *to == old {
            p.hold();
        }
    }
    let held_at = Instant::now();
    let new = agreed_controller_among(&mut c, &others);
    eprintln!(
        "nodes {others:?} agree on controller {new} {:?} after the one-way cut",
        held_at.elapsed()
    );
    assert!(describe_quorum(&mut c, new).epoch > before.epoch);
    wait_for(WAIT, "the cut-off node to stop naming itself", || {
        (c.view_from(old)?.controller != old).then_some(())
    });
    // Its heartbeats go unanswered: it is fenced, so the new topic is placed on the majority.
    wait_for(WAIT, "the cut-off node to be fenced", || {
        (!c.view_from(new)?.brokers.contains(&old)).then_some(())
    });
    let majority: Vec<String> = others.iter().map(|id| c.node(*id).bootstrap()).collect();
    create_replicated(&majority.join(","), "one-way-cut", 1, 2, &[]).await;
    c.wait_partition_from(
        new,
        "one-way-cut",
        0,
        WAIT,
        "a leader and a full ISR",
        |s| s.leader > 0 && s.isr.len() == 2,
    );

    for p in proxies.values() {
        p.release();
    }
    wait_for(WAIT, "the healed node to follow the new controller", || {
        let v = c.view_from(old)?;
        (v.controller == new && v.brokers == vec![1, 2, 3]).then_some(())
    });
    assert_eq!(describe_quorum(&mut c, old).leader, new);
}

/// The active controller is cut off from the other voters by a silent network (every byte
/// on its controller links held, nothing closed or refused, so no fast path notices): as
/// KRaft's leader resigns after 1.5 fetch timeouts without a majority (KAFKA-15489), it stops
/// calling itself the controller while the two others elect a new one and go on changing
/// metadata; healed, it follows the new controller and its broker serves again. Each voter
/// reaches each other voter through its own proxy (`--controller-quorum` per node), so the
/// partition cuts exactly the controller's links; broker traffic is not proxied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_the_voters_stops_claiming_it_and_follows_once_healed() {
    // Only the controller links are held here (not the replica fetchers').
    let (mut c, net) = Cluster::start_partitionable(3, 0, &[]).await;
    let proxies = &net.controller;
    let old = c.view().unwrap().controller;
    let others: Vec<i32> = (1..=3).filter(|id| *id != old).collect();
    let before = describe_quorum(&mut c, old);
    assert_eq!(before.leader, old);
    let links: Vec<&Proxy> = proxies
        .iter()
        .filter(|((from, to), _)| *from == old || *to == old)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(links.len(), 4);
    // The controller's links carry its controller traffic: replication to the followers one
    // way, their brokers' heartbeats to it the other.
    for ((from, to), p) in proxies {
        if *from == old || *to == old {
            assert!(
                p.connections.load(Ordering::Relaxed) > 0,
                "nothing went through the proxy from node {from} to node {to}"
            );
        }
    }

    for p in &links {
        p.hold();
    }
    let held_at = Instant::now();
    wait_resigned(&mut c, old, held_at, "the cut");
    // The majority elects a new controller and both of them say so.
    let new = agreed_controller_among(&mut c, &others);
    eprintln!(
        "nodes {others:?} agree on controller {new} {:?} after the cut",
        held_at.elapsed()
    );
    // DescribeQuorum through the cut-off node names it no more: it knows no active controller
    // to ask, and says so.
    match try_describe_quorum(&mut c, old) {
        Ok(q) => assert_ne!(q.leader, old, "DescribeQuorum from the cut-off node"),
        Err((code, message)) => {
            eprintln!("DescribeQuorum from node {old}: error {code} {message:?}");
            assert_eq!(code, ResponseError::NotLeaderOrFollower.code());
        }
    }
    let q = describe_quorum(&mut c, others[1]);
    assert_eq!(q.leader, new);
    assert!(
        q.epoch > before.epoch,
        "a new quorum epoch: {} → {}",
        before.epoch,
        q.epoch
    );
    // It fences the cut-off broker (no heartbeat reaches it), then places a new topic on the
    // two it hears from.
    wait_for(WAIT, "the cut-off broker to be fenced", || {
        let v = c.view_from(new)?;
        (v.brokers == others).then_some(())
    });
    let majority: Vec<String> = others.iter().map(|id| c.node(*id).bootstrap()).collect();
    create_replicated(&majority.join(","), "during-cut", 2, 2, &[]).await;
    // (Asked of the new controller: `Cluster::view` would ask the cut-off node first.)
    for p in 0..2 {
        let s = wait_for(WAIT, "leaders and full ISRs", || {
            let s = c.view_from(new)?.partition("during-cut", p)?.clone();
            (s.leader > 0 && s.isr.len() == 2).then_some(s)
        });
        assert!(
            !s.replicas.contains(&old),
            "placed on the cut-off broker: {s:?}"
        );
    }
    // Still cut off, it still names no controller.
    assert_eq!(c.view_from(old).map(|v| v.controller), Some(-1));

    for p in &links {
        p.release();
    }
    // Healed, it follows the new controller, its broker is registered and unfenced again, and
    // it serves what changed meanwhile.
    let v = wait_for(WAIT, "the healed node to follow the new controller", || {
        let v = c.view_from(old)?;
        let caught_up = v
            .partition("during-cut", 1)
            .is_some_and(|s| s.leader > 0 && s.isr.len() == 2);
        (v.controller == new && v.brokers == vec![1, 2, 3] && caught_up).then_some(v)
    });
    eprintln!("node {old} follows node {new} again: {:?}", v.brokers);
    assert_eq!(describe_quorum(&mut c, old).leader, new);
    for id in &others {
        wait_for(WAIT, "every node to list the healed broker", || {
            (c.view_from(*id)?.brokers == vec![1, 2, 3]).then_some(())
        });
    }
    // A metadata change through the healed node, with a replica on it.
    create_replicated(&c.node(old).bootstrap(), "after-cut", 3, 3, &[]).await;
    for p in 0..3 {
        c.wait_partition("after-cut", p, WAIT, "leaders and full ISRs", |s| {
            s.leader > 0 && s.isr.len() == 3
        });
    }
    let p = producer(&c.node(old).bootstrap(), "all", true);
    send_values(&p, "after-cut", 0..20).await;
}

/// Check quorum when the voters refuse instead of staying silent: both other voters killed
/// (their ports refuse connections at once, where the test above holds every byte), the active
/// controller stops naming itself within the same window rather than answering as the
/// controller of a quorum it no longer has; with them back, the three elect one again.
#[test]
fn a_controller_whose_voters_are_down_stops_claiming_it() {
    let mut c = Cluster::start(3, &[]);
    let old = c.view().unwrap().controller;
    let others: Vec<i32> = (1..=3).filter(|id| *id != old).collect();
    assert_eq!(describe_quorum(&mut c, old).leader, old);
    for id in &others {
        c.node(*id).kill9();
    }
    wait_resigned(&mut c, old, Instant::now(), "the kills");
    for id in &others {
        c.node(*id).restart();
    }
    c.wait_brokers(3, WAIT);
    let leader = wait_for(WAIT, "a controller the old one names", || {
        let q = try_describe_quorum(&mut c, old).ok()?;
        (q.leader > 0).then_some(q.leader)
    });
    eprintln!("controller {leader} after the voters came back");
}

/// Controlled shutdown of the active controller (SIGTERM): before the process exits its
/// partition leaderships move to in-sync replicas and it hands the metadata quorum's leadership
/// to another voter (as a KRaft controller resigns), and it logs no error on the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_partition_leaderships_and_the_controller_before_exit() {
    let mut c = Cluster::start(3, &[]);
    let old = c.view().unwrap().controller;
    create_replicated(
        &c.bootstrap(),
        "handover",
        3,
        3,
        &[("min.insync.replicas", "2")],
    )
    .await;
    let mut led = 0;
    for p in 0..3 {
        let s = c.wait_partition("handover", p, WAIT, "full ISR", |s| {
            s.leader > 0 && s.isr.len() == 3
        });
        led += usize::from(s.leader == old);
    }
    assert!(
        led > 0,
        "leaders are balanced: the controller leads a partition"
    );
    let epoch = describe_quorum(&mut c, old).epoch;

    assert!(c.node(old).terminate(), "clean exit:\n{}", c.logs());
    let log = c.node(old).log();
    assert!(
        log.contains("controlled shutdown: leaderships moved"),
        "partition leaderships moved before exit:\n{log}"
    );
    assert!(
        log.contains("metadata quorum leadership handed over"),
        "the controller resigned before exit:\n{log}"
    );
    assert!(
        !log.contains(" ERROR "),
        "a clean shutdown logs no error:\n{log}"
    );

    let survivors: Vec<i32> = (1..=3).filter(|id| *id != old).collect();
    let q = wait_for(WAIT, "a new controller", || {
        Some(describe_quorum(&mut c, survivors[0])).filter(|q| q.leader > 0 && q.leader != old)
    });
    assert!(
        q.epoch > epoch,
        "a new quorum epoch: {} → {}",
        epoch,
        q.epoch
    );
    for p in 0..3 {
        let s = c.wait_partition("handover", p, WAIT, "a live leader", |s| {
            s.leader > 0 && s.leader != old
        });
        assert!(
            !s.isr.contains(&old),
            "the stopped node left the ISR: {s:?}"
        );
    }
    let live: Vec<String> = survivors.iter().map(|id| c.node(*id).bootstrap()).collect();
    let p = producer(&live.join(","), "all", true);
    send_values(&p, "handover", 0..50).await;
}

/// Waits until the cluster's view satisfies `f`, failing after `within`.
async fn wait_view(
    c: &mut Cluster,
    within: Duration,
    what: &str,
    f: impl Fn(&strom_tests::cluster::ClusterView) -> bool,
) -> strom_tests::cluster::ClusterView {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = c.view() {
            if f(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}; view {:?}\n{}",
            c.view(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A killed process is noticed at once (its peers' connections close and its controller
/// listener refuses): the timeouts here are long enough that neither an election by timeout
/// (the dead leader's lease alone lasts 8 s) nor fencing by session timeout (30 s) can happen
/// within the window the test allows, so only the fast path passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_noticed_before_any_timeout_runs_out() {
    let window = Duration::from_secs(6);
    let mut c = Cluster::start(
        3,
        &[
            "controller.quorum.election.timeout.ms=4000",
            "broker.session.timeout.ms=30000",
        ],
    );
    create_replicated(&c.bootstrap(), "fast", 3, 3, &[]).await;
    for p in 0..3 {
        c.wait_partition("fast", p, WAIT, "full ISR", |s| {
            s.leader > 0 && s.isr.len() == 3
        });
    }
    // The active controller dies: a survivor takes over and fences it.
    let old = c.view().unwrap().controller;
    c.node(old).kill9();
    let v = wait_view(
        &mut c,
        window,
        "a new controller fencing the old one",
        |v| v.controller > 0 && v.controller != old && !v.brokers.contains(&old),
    )
    .await;
    for p in 0..3 {
        let s = v.partition("fast", p).unwrap();
        assert!(
            s.leader > 0 && s.leader != old,
            "fast/{p} still led by {old}: {s:?}"
        );
    }
    c.node(old).restart();
    c.wait_brokers(3, WAIT);
    for p in 0..3 {
        c.wait_partition("fast", p, WAIT, "full ISR again", |s| s.isr.len() == 3);
    }
    // A broker that is not the controller dies: the controller fences it at once.
    let controller = c.view().unwrap().controller;
    let victim = (1..=3).find(|id| *id != controller).unwrap();
    c.node(victim).kill9();
    let v = wait_view(&mut c, window, "the dead broker fenced", |v| {
        !v.brokers.contains(&victim)
            && (0..3).all(|p| v.partition("fast", p).is_some_and(|s| s.leader != victim))
    })
    .await;
    assert_eq!(v.controller, controller, "the controller did not move");
    // Writes with acks=all go on through the two live replicas.
    let prod = producer(&c.bootstrap(), "all", true);
    send_values(&prod, "fast", 0..100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_in_sync_replicas_refuse_acks_all_but_not_acks_1() {
    // Five voters keep a metadata majority while two of the topic's three replicas are down.
    let mut c = Cluster::start(5, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "guarded", 1, 3, &[("min.insync.replicas", "2")]).await;
    let s = c.wait_partition("guarded", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let all = producer(&b, "all", false);
    let one = producer(&b, "1", false);
    let send = |p: &FutureProducer, v: &str| {
        let p = p.clone();
        let v = v.to_string();
        async move {
            p.send(
                FutureRecord::<(), _>::to("guarded")
                    .payload(&v)
                    .partition(0),
                Duration::from_secs(20),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    };
    send(&all, "1").await.expect("acks=all with a full ISR");

    let followers: Vec<i32> = s
        .replicas
        .iter()
        .copied()
        .filter(|r| *r != s.leader)
        .collect();
    for f in &followers {
        c.node(*f).kill9();
    }
    c.wait_partition("guarded", 0, WAIT, "ISR shrinks to the leader", |x| {
        x.isr == vec![s.leader]
    });
    // librdkafka retries NOT_ENOUGH_REPLICAS until its timeout; the raw wire shows the code.
    let mut raw = RawClient::connect(c.node(s.leader).addr());
    let (code, _) = produce_raw(&mut raw, "guarded", one_record("2"));
    assert_eq!(
        code, 19,
        "acks=all with the ISR below min.insync.replicas: NOT_ENOUGH_REPLICAS"
    );
    let short = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("acks", "all")
        .set("message.timeout.ms", "2000")
        .create::<FutureProducer>()
        .unwrap();
    match send(&short, "2").await {
        Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::NotEnoughReplicas | RDKafkaErrorCode::MessageTimedOut,
        )) => {}
        other => panic!("librdkafka acks=all with too few replicas: {other:?}"),
    }
    send(&one, "3").await.expect("acks=1 keeps working");

    c.node(followers[0]).restart();
    c.wait_partition(
        "guarded",
        0,
        Duration::from_secs(60),
        "a follower rejoins",
        |x| x.isr.len() == 2,
    );
    send(&all, "4").await.expect("acks=all works again");
    let values = read_values(&b, "guarded", 0, 3, WAIT);
    assert_eq!(values, vec![1, 3, 4], "what the partition holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_partition_replicates_while_the_fetch_for_idle_ones_waits_at_the_leader() {
    // Followers' fetches wait at the leader up to replica.fetch.wait.max.ms when their
    // partitions have no traffic. A partition that joins such a fetcher (here: a new topic)
    // must not wait for that fetch to come back before it is replicated.
    let mut c = Cluster::start(3, &["replica.fetch.wait.max.ms=20000"]);
    let b = c.bootstrap();
    // Three partitions, leaders on all three nodes: every node fetches from both others.
    create_replicated(&b, "idle", 3, 3, &[]).await;
    let mut leaders = Vec::new();
    for p in 0..3 {
        let s = c.wait_partition("idle", p, WAIT, "full ISR", |s| s.isr.len() == 3);
        leaders.push(s.leader);
    }
    leaders.sort();
    leaders.dedup();
    assert_eq!(
        leaders.len(),
        3,
        "the idle topic's leaders are spread over the nodes"
    );
    let all = producer(&b, "all", false);
    for p in 0..3 {
        all.send(
            FutureRecord::<(), _>::to("idle").payload("x").partition(p),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("acks=all to the idle topic");
    }
    // Now every follower's fetch is parked at its leader, for up to 20 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    create_replicated(&b, "fresh", 1, 3, &[]).await;
    c.wait_partition("fresh", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let quick = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("acks", "all")
        .set("message.timeout.ms", "2000")
        .create::<FutureProducer>()
        .unwrap();
    quick
        .send(
            FutureRecord::<(), _>::to("fresh").payload("7").partition(0),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("acks=all to the new topic within its 2 s delivery timeout");
    assert_eq!(read_values(&b, "fresh", 0, 1, WAIT), vec![7]);
}

/// FindCoordinator (v4) for a group through node `id`: the coordinator's node id.
fn find_coordinator(c: &mut Cluster, id: i32, group: &str) -> i32 {
    match find_coordinator_at(c.node(id).addr(), group) {
        (0, node) => node,
        _ => -1,
    }
}

/// FindCoordinator (v4) for a group at `addr`: the error code and the coordinator's node id.
fn find_coordinator_at(addr: SocketAddr, group: &str) -> (i16, i32) {
    use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, FindCoordinatorResponse};
    use kafka_protocol::protocol::StrBytes;
    let mut raw = RawClient::connect(addr);
    let req = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![StrBytes::from_string(group.to_string())]);
    let resp: FindCoordinatorResponse = raw.call(ApiKey::FindCoordinator, 4, &req);
    let co = &resp.coordinators[0];
    (co.error_code, co.node_id.0)
}

/// InitProducerId (v4, no transactional id) at `addr`: the error code and the producer id.
fn init_producer_id_at(addr: SocketAddr) -> (i16, i64) {
    use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, InitProducerIdResponse};
    let mut raw = RawClient::connect(addr);
    let req = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60000);
    let resp: InitProducerIdResponse = raw.call(ApiKey::InitProducerId, 4, &req);
    (resp.error_code, resp.producer_id.0)
}

/// Many clients at once on a new cluster, all at a node that is not the controller: idempotent
/// producers asking for producer ids (the node reserves its first block through the
/// controller), then consumers looking for a group coordinator before `__consumer_offsets`
/// exists (one request creates it through the controller; the others are told
/// COORDINATOR_NOT_AVAILABLE (15) and try again). Every one gets an answer and the node keeps
/// heartbeating. Both once stopped the node for good: requests blocked on a lock held every
/// worker thread while the request holding it waited for the controller's answer, which needed
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once_on_a_new_cluster_get_producer_ids_and_coordinators() {
    let mut c = Cluster::start(3, &[]);
    let controller = c.view().unwrap().controller;
    let node = if controller == 1 { 2 } else { 1 };
    let addr = c.node(node).addr();
    let all_at_once = |ask: fn(SocketAddr, usize) -> i64| {
        let askers: Vec<_> = (0..16)
            .map(|i| std::thread::spawn(move || ask(addr, i)))
            .collect();
        askers
            .into_iter()
            .map(|a| a.join().unwrap())
            .collect::<Vec<_>>()
    };
    let ids = all_at_once(|addr, _| {
        let (code, id) = init_producer_id_at(addr);
        assert_eq!(code, 0, "InitProducerId");
        id
    });
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "distinct producer ids: {ids:?}"
    );
    let coordinators = all_at_once(|addr, i| {
        let group = format!("g{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, coordinator) = find_coordinator_at(addr, &group);
            if code == 0 {
                return coordinator as i64;
            }
            assert_eq!(code, 15, "only COORDINATOR_NOT_AVAILABLE meanwhile");
            assert!(Instant::now() < deadline, "no coordinator for {group}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(coordinators.iter().all(|c| *c > 0), "{coordinators:?}");
    // Still heartbeating: never fenced.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.view().unwrap().brokers, vec![1, 2, 3], "{}", c.logs());
    assert!(!c
        .node(controller)
        .log()
        .contains("missed its session timeout"));
}

fn group_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap()
}

fn poll_values(c: &BaseConsumer, n: usize, timeout: Duration) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let v = std::str::from_utf8(m.payload().unwrap())
                .unwrap()
                .parse()
                .unwrap();
            out.push((m.offset(), v));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_losing_the_group_coordinator() {
    let mut c = Cluster::start(3, &["group.initial.rebalance.delay.ms=0"]);
    let b = c.bootstrap();
    create_replicated(&b, "events", 1, 3, &[("min.insync.replicas", "2")]).await;
    c.wait_partition("events", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let p = producer(&b, "all", true);
    send_values(&p, "events", 0..100).await;

    let first = group_consumer(&b, "g1");
    first.subscribe(&["events"]).unwrap();
    let got = poll_values(&first, 50, WAIT);
    assert_eq!(got.len(), 50, "first member read");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("events", 0, Offset::Offset(50))
        .unwrap();
    first
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    drop(first);

    // The offsets topic is replicated; its partition for g1 is led by the coordinator.
    let s = c.wait_partition(
        "__consumer_offsets",
        0,
        WAIT,
        "replicated offsets topic",
        |s| s.isr.len() == 3,
    );
    assert_eq!(s.replicas.len(), 3);
    // Every node names the leader of g1's partition of __consumer_offsets.
    let p_g1 = strom_group::coordinator::partition_for("g1", 50) as usize;
    let leader = c
        .view()
        .unwrap()
        .partition("__consumer_offsets", p_g1)
        .unwrap()
        .leader;
    let coordinator = find_coordinator(&mut c, 1, "g1");
    assert_eq!(coordinator, leader);
    for id in 2..=3 {
        assert_eq!(find_coordinator(&mut c, id, "g1"), leader);
    }
    c.node(coordinator).kill9();
    let other = (1..=3).find(|id| *id != coordinator).unwrap();
    let deadline = Instant::now() + WAIT;
    let moved = loop {
        let co = find_coordinator(&mut c, other, "g1");
        if co > 0 && co != coordinator {
            break co;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator did not move:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(moved, coordinator);
    let leader = c
        .view()
        .unwrap()
        .partition("__consumer_offsets", p_g1)
        .unwrap()
        .leader;
    assert_eq!(
        moved, leader,
        "the new coordinator is the partition's new leader"
    );

    let live: Vec<String> = (1..=3)
        .filter(|id| *id != coordinator)
        .map(|id| c.node(id).bootstrap())
        .collect();
    let second = group_consumer(&live.join(","), "g1");
    second.subscribe(&["events"]).unwrap();
    let rest = poll_values(&second, 50, Duration::from_secs(60));
    assert_eq!(
        rest.first().map(|r| r.0),
        Some(50),
        "resumes at the committed offset"
    );
    assert_eq!(rest.len(), 50);
    assert_eq!(rest.last().unwrap().1, 99);
}

/// ElectLeaders (v2) through node `id` for `topic`/`partition`: the partition's error code.
fn elect_leaders(c: &mut Cluster, id: i32, election_type: i8, topic: &str, partition: i32) -> i16 {
    use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
    use kafka_protocol::messages::{ApiKey, ElectLeadersRequest, ElectLeadersResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let mut raw = RawClient::connect(c.node(id).addr());
    let req = ElectLeadersRequest::default()
        .with_election_type(election_type)
        .with_timeout_ms(10_000)
        .with_topic_partitions(Some(vec![TopicPartitions::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![partition])]));
    let resp: ElectLeadersResponse = raw.call(ApiKey::ElectLeaders, 2, &req);
    assert_eq!(resp.error_code, 0);
    resp.replica_election_results[0].partition_result[0].error_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_leaders_come_back_by_election_and_by_auto_rebalance() {
    // Explicit ElectLeaders, with the automatic balance off.
    let mut c = Cluster::start(3, &["auto.leader.rebalance.enable=false"]);
    let b = c.bootstrap();
    create_replicated(&b, "pref", 1, 3, &[]).await;
    let s = c.wait_partition("pref", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let preferred = s.replicas[0];
    assert_eq!(
        s.leader, preferred,
        "a new partition is led by its preferred replica"
    );
    let asked = if preferred == 1 { 2 } else { 1 };
    assert_eq!(
        elect_leaders(&mut c, asked, 0, "pref", 0),
        84,
        "ELECTION_NOT_NEEDED"
    );
    assert_eq!(
        elect_leaders(&mut c, asked, 1, "pref", 0),
        84,
        "unclean: the leader is alive"
    );
    c.node(preferred).kill9();
    c.wait_partition("pref", 0, WAIT, "failover", |s| {
        s.leader > 0 && s.leader != preferred
    });
    assert_eq!(
        elect_leaders(&mut c, asked, 0, "pref", 0),
        80,
        "PREFERRED_LEADER_NOT_AVAILABLE"
    );
    c.node(preferred).restart();
    c.wait_partition("pref", 0, Duration::from_secs(60), "rejoin", |s| {
        s.isr.contains(&preferred)
    });
    let moved = c.view().unwrap().partition("pref", 0).unwrap().leader;
    assert_ne!(
        moved, preferred,
        "no automatic move back while it is disabled"
    );
    assert_eq!(elect_leaders(&mut c, asked, 0, "pref", 0), 0);
    let after = c.wait_partition("pref", 0, WAIT, "preferred leader", |s| {
        s.leader == preferred
    });
    assert!(after.leader_epoch > s.leader_epoch + 1);
    assert_eq!(elect_leaders(&mut c, asked, 1, "unknown-topic", 0), 3);
    drop(c);

    // auto.leader.rebalance.enable (Kafka's default) moves it back by itself.
    let mut c = Cluster::start(3, &["leader.imbalance.check.interval.seconds=1"]);
    let b = c.bootstrap();
    create_replicated(&b, "auto", 1, 3, &[]).await;
    let s = c.wait_partition("auto", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let preferred = s.replicas[0];
    c.node(preferred).kill9();
    c.wait_partition("auto", 0, WAIT, "failover", |s| {
        s.leader > 0 && s.leader != preferred
    });
    c.node(preferred).restart();
    c.wait_partition(
        "auto",
        0,
        Duration::from_secs(60),
        "leadership back on the preferred replica",
        |s| s.leader == preferred,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_fetch_from_an_in_sync_replica_in_their_rack() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let mut c = Cluster::start_with(
        3,
        &["replica.selector.class=org.apache.kafka.common.replica.RackAwareReplicaSelector"],
        |id| vec![format!("broker.rack=rack{id}")],
    );
    let b = c.bootstrap();
    create_replicated(&b, "near", 1, 3, &[("min.insync.replicas", "3")]).await;
    let s = c.wait_partition("near", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let p = producer(&b, "all", true);
    send_values(&p, "near", 0..10).await;
    let follower = *s.replicas.iter().find(|r| **r != s.leader).unwrap();
    let fetch = |c: &mut Cluster, node: i32, version: i16, rack: &str| -> (i16, i32, usize) {
        let mut raw = RawClient::connect(c.node(node).addr());
        let req = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(0)
            .with_max_bytes(1 << 20)
            .with_session_epoch(-1)
            .with_rack_id(StrBytes::from_string(rack.to_string()))
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("near")))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20)])]);
        let resp: FetchResponse = raw.call(ApiKey::Fetch, version, &req);
        let pd = &resp.responses[0].partitions[0];
        (
            pd.error_code,
            pd.preferred_read_replica.0,
            pd.records.as_ref().map_or(0, |r| r.len()),
        )
    };
    // The leader points a consumer in the follower's rack to the follower, with no records.
    let rack = format!("rack{follower}");
    let (err, preferred, bytes) = fetch(&mut c, s.leader, 12, &rack);
    assert_eq!((err, preferred, bytes), (0, follower, 0));
    // A consumer in the leader's rack (or none) reads from the leader.
    let (err, preferred, bytes) = fetch(&mut c, s.leader, 12, &format!("rack{}", s.leader));
    assert_eq!((err, preferred), (0, -1));
    assert!(bytes > 0);
    // The follower serves consumers speaking v11+ (up to its high watermark).
    let deadline = Instant::now() + WAIT;
    loop {
        let (err, _, bytes) = fetch(&mut c, follower, 12, &rack);
        assert_eq!(err, 0);
        if bytes > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never served the records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fetch(&mut c, follower, 10, &rack).0,
        6,
        "older clients: NOT_LEADER_OR_FOLLOWER"
    );
    // librdkafka with client.rack reads everything (through the follower).
    let cons: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", "unused-assign-only")
        .set("client.rack", &rack)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("near", 0, Offset::Beginning)
        .unwrap();
    cons.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 10 && Instant::now() < deadline {
        if let Some(Ok(m)) = cons.poll(Duration::from_millis(100)) {
            got.push(
                std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// Seven voters (a metadata majority outlives all three replicas of a topic) and `topic`: one
/// partition, RF 3, min.insync.replicas 2 and `configs`, holding the values 0..100, all
/// acknowledged. Then its followers die in turn: x while the ISR stays at min.insync.replicas
/// (simply out of sync), y when that leaves the leader alone (KIP-966: y stays eligible).
/// Returns the cluster, its bootstrap and (leader a, x, y, a node with no replica of it).
async fn leader_alone_with_y_eligible(
    topic: &str,
    configs: &[(&str, &str)],
) -> (Cluster, String, (i32, i32, i32, i32)) {
    let mut c = Cluster::start(7, &[]);
    let b = c.bootstrap();
    let mut all = vec![("min.insync.replicas", "2")];
    all.extend_from_slice(configs);
    create_replicated(&b, topic, 1, 3, &all).await;
    let s = c.wait_partition(topic, 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    send_values(&producer(&b, "all", true), topic, 0..100).await;
    let a = s.leader;
    let followers: Vec<i32> = s.replicas.iter().copied().filter(|r| *r != a).collect();
    let (x, y) = (followers[0], followers[1]);
    let other = (1..=7).find(|n| !s.replicas.contains(n)).unwrap();
    c.node(x).kill9();
    c.wait_partition(topic, 0, WAIT, "x leaves the ISR", |s| !s.isr.contains(&x));
    c.node(y).kill9();
    c.wait_partition(topic, 0, WAIT, "the leader alone in the ISR", |s| {
        s.isr == vec![a]
    });
    (c, b, (a, x, y, other))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip966_the_last_replicas_standing_keep_every_acknowledged_record() {
    let (mut c, b, (a, x, y, _)) = leader_alone_with_y_eligible("elr", &[]).await;
    let mut raw = RawClient::connect(c.node(a).addr());
    assert_eq!(
        produce_raw(&mut raw, "elr", one_record("lost?")).0,
        19,
        "NOT_ENOUGH_REPLICAS"
    );
    drop(raw);
    // The last in-sync replica goes too: the partition is offline.
    c.node(a).kill9();
    c.wait_partition("elr", 0, WAIT, "no leader", |s| s.leader == -1);
    // x comes back: it was not in sync at the end, so it may not lead (no unclean election).
    c.node(x).restart();
    c.wait_brokers(5, WAIT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.view().unwrap().partition("elr", 0).unwrap().leader,
        -1,
        "x must not lead"
    );
    // y comes back: an eligible leader replica, it leads cleanly with every acknowledged record.
    c.node(y).restart();
    let led = c.wait_partition("elr", 0, WAIT, "y leads", |s| s.leader == y);
    assert!(led.isr.contains(&y), "{led:?}");
    let values = read_values(&b, "elr", 0, 100, WAIT);
    assert_eq!(values, (0..100).collect::<Vec<_>>());
    // x catches up from y and joins: acks=all works again.
    c.wait_partition("elr", 0, Duration::from_secs(60), "x rejoins", |s| {
        s.isr.contains(&x)
    });
    let p = producer(&b, "all", true);
    p.send(
        FutureRecord::<(), _>::to("elr").payload("100").partition(0),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("acks=all with the ISR back at min.insync.replicas");
    // a returns as a follower and truncates nothing acknowledged.
    c.node(a).restart();
    c.wait_partition("elr", 0, Duration::from_secs(60), "a rejoins", |s| {
        s.isr.contains(&a)
    });
    let values = read_values(&b, "elr", 0, 101, WAIT);
    assert_eq!(values, (0..101).collect::<Vec<_>>());
}

/// KIP-966: lowering `min.insync.replicas` lets the ISR commit records without the eligible
/// leader replicas, so the change clears them (as Kafka does). Otherwise an eligible replica
/// that missed records acknowledged under the new value would lead once the last in-sync one
/// died, and those records would be gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_min_insync_replicas_voids_the_eligible_leader_replicas() {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let (mut c, b, (a, _, y, _)) = leader_alone_with_y_eligible("low", &[]).await;
    described_when(&mut c, a, "low", 0, "y is eligible", |d| d.elr == vec![y]);
    // The operator lowers min.insync.replicas: the leader alone commits from now on.
    let change = AlterConfig::new(ResourceSpecifier::Topic("low")).set("min.insync.replicas", "1");
    for r in common::admin(&b)
        .alter_configs(&[change], &AdminOptions::new())
        .await
        .expect("alter_configs")
    {
        r.expect("min.insync.replicas=1");
    }
    send_values(&producer(&b, "all", true), "low", 100..110).await;
    let deadline = Instant::now() + WAIT;
    while !described(&mut c, a, "low", 0).elr.is_empty() {
        assert!(Instant::now() < deadline, "the ELR must be cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last in-sync replica dies. y, which never got 100..110, comes back: it may not lead.
    c.node(a).kill9();
    c.wait_partition("low", 0, WAIT, "no leader", |s| s.leader == -1);
    c.node(y).restart();
    c.wait_brokers(5, WAIT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.view().unwrap().partition("low", 0).unwrap().leader,
        -1,
        "y misses acknowledged records: it must not lead"
    );
    // a comes back and leads with everything acknowledged.
    c.node(a).restart();
    c.wait_partition("low", 0, WAIT, "a leads", |s| s.leader == a);
    assert_eq!(
        read_values(&b, "low", 0, 110, WAIT),
        (0..110).collect::<Vec<_>>()
    );
}

/// IncrementalAlterConfigs of one broker setting through node `id`, for broker `resource`
/// ("" is the cluster-wide default): the resource's error code.
fn set_broker_config(c: &mut Cluster, id: i32, resource: &str, name: &str, value: &str) -> i16 {
    alter_broker_config(c, id, resource, name, Some(value))
}

/// `set_broker_config`, or with `None` a DELETE of the setting.
fn alter_broker_config(
    c: &mut Cluster,
    id: i32,
    resource: &str,
    name: &str,
    value: Option<&str>,
) -> i16 {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig,
    };
    use kafka_protocol::messages::{
        ApiKey, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
    };
    use kafka_protocol::protocol::StrBytes;
    let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
        AlterConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(StrBytes::from_string(resource.to_string()))
            .with_configs(vec![AlterableConfig::default()
                .with_name(StrBytes::from_string(name.to_string()))
                .with_config_operation(if value.is_some() { 0 } else { 1 })
                .with_value(value.map(|v| StrBytes::from_string(v.to_string())))]),
    ]);
    let mut raw = RawClient::connect(c.node(id).addr());
    let resp: IncrementalAlterConfigsResponse = raw.call(ApiKey::IncrementalAlterConfigs, 1, &req);
    resp.responses[0].error_code
}

/// KIP-966 for a topic that does not fsync every write (`flush.messages` above 1): a replica
/// coming back from an unclean shutdown may have lost what it acknowledged, so it is no longer
/// an eligible leader of it (as in Kafka). The last leader may still lead again once no
/// in-sync or eligible replica is left (Kafka's balanced recovery, through the last known ELR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncleanly_restarted_replica_of_a_topic_without_fsync_is_no_longer_eligible() {
    let configs = [("flush.messages", "1000")];
    let (mut c, b, (a, _, y, other)) = leader_alone_with_y_eligible("lazy", &configs).await;
    c.node(a).kill9();
    c.wait_partition("lazy", 0, WAIT, "no leader", |s| s.leader == -1);
    described_when(&mut c, other, "lazy", 0, "eligible: y and a", |d| {
        (&d.elr, &d.last_known_elr) == (&vec![y, a], &vec![a])
    });
    // y comes back from its kill -9: no longer eligible, it may not lead; a, the last leader,
    // comes back (uncleanly too) and leads with everything acknowledged.
    let why = "y restarted uncleanly: it must not lead";
    y_back_not_leading_then_a_leads(&mut c, &b, "lazy", (a, y, other), why).await;
}

/// y restarts and must not lead (nor stay eligible), then a restarts and leads the partition
/// with the 100 values acknowledged before.
async fn y_back_not_leading_then_a_leads(
    c: &mut Cluster,
    b: &str,
    topic: &str,
    (a, y, other): (i32, i32, i32),
    why: &str,
) {
    c.node(y).restart();
    c.wait_brokers(5, WAIT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = described(c, other, topic, 0);
    assert_eq!(d.leader, -1, "{why}");
    assert_eq!(d.elr, vec![a]);
    c.node(a).restart();
    c.wait_partition(topic, 0, WAIT, "a leads", |s| s.leader == a);
    assert_eq!(
        read_values(b, topic, 0, 100, WAIT),
        (0..100).collect::<Vec<_>>()
    );
}

/// A node whose disk was replaced comes back without the logs the metadata says it holds: it
/// may not lead them from the ELR with nothing (every acknowledged record would go, and the
/// other replicas would truncate to it). It leaves their ISR and ELR at registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_is_gone_is_not_elected_with_nothing() {
    let (mut c, b, (a, _, y, other)) = leader_alone_with_y_eligible("wiped", &[]).await;
    c.node(a).kill9();
    c.wait_partition("wiped", 0, WAIT, "no leader", |s| s.leader == -1);
    described_when(&mut c, other, "wiped", 0, "eligible: y and a", |d| {
        d.elr == vec![y, a]
    });
    // y's disk is replaced: its log of the partition is gone.
    let log = c.node(y).data_dir().join("wiped-0");
    std::fs::remove_dir_all(&log).unwrap();
    // It may not lead; a comes back and leads with everything; y catches up from it.
    let why = "y holds nothing: it must not lead";
    y_back_not_leading_then_a_leads(&mut c, &b, "wiped", (a, y, other), why).await;
    c.wait_partition("wiped", 0, Duration::from_secs(60), "y back in sync", |s| {
        s.isr.contains(&y)
    });
}

/// `min.insync.replicas` is one value for the whole cluster (or per topic): a dynamic setting
/// for one broker is refused (INVALID_CONFIG), since leaders and the controller must agree on
/// it. A new cluster-wide value clears every eligible leader replica, whatever the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_insync_replicas_is_refused_for_one_broker_and_clears_elrs_for_the_cluster() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    assert_eq!(
        set_broker_config(&mut c, 1, "2", "min.insync.replicas", "2"),
        40
    );
    // min.insync.replicas 3 of 3: the one replica that leaves the ISR stays eligible.
    create_replicated(&b, "all3", 1, 3, &[("min.insync.replicas", "3")]).await;
    let s = c.wait_partition("all3", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let x = *s.replicas.iter().find(|r| **r != s.leader).unwrap();
    c.node(x).kill9();
    c.wait_partition("all3", 0, WAIT, "x leaves the ISR", |s| !s.isr.contains(&x));
    let id = s.leader;
    described_when(&mut c, id, "all3", 0, "x is eligible", |d| d.elr == vec![x]);
    assert_eq!(
        set_broker_config(&mut c, id, "", "min.insync.replicas", "1"),
        0
    );
    let deadline = Instant::now() + WAIT;
    while !described(&mut c, id, "all3", 0).elr.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cluster-wide change must clear the ELR"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Legacy AlterConfigs of the cluster-wide broker settings through node `id`: `name` set to
/// `value` and every other dynamic cluster-wide setting replaced (removed). The error code.
fn replace_cluster_configs(c: &mut Cluster, id: i32, name: &str, value: &str) -> i16 {
    use kafka_protocol::messages::alter_configs_request::{AlterConfigsResource, AlterableConfig};
    use kafka_protocol::messages::{AlterConfigsRequest, AlterConfigsResponse, ApiKey};
    use kafka_protocol::protocol::StrBytes;
    let req = AlterConfigsRequest::default().with_resources(vec![AlterConfigsResource::default()
        .with_resource_type(4)
        .with_resource_name(StrBytes::from_static_str(""))
        .with_configs(vec![AlterableConfig::default()
            .with_name(StrBytes::from_string(name.to_string()))
            .with_value(Some(StrBytes::from_string(value.to_string())))])]);
    let mut raw = RawClient::connect(c.node(id).addr());
    let resp: AlterConfigsResponse = raw.call(ApiKey::AlterConfigs, 1, &req);
    resp.responses[0].error_code
}

/// Each broker's `min.insync.replicas` as DescribeConfigs gives it: value, and whether it comes
/// from the cluster-wide dynamic default.
async fn min_isr_of_each_broker(bootstrap: &str, n: i32) -> Vec<(String, bool)> {
    use rdkafka::admin::{ConfigSource, ResourceSpecifier};
    let admin = common::admin(bootstrap);
    let mut seen = Vec::new();
    for id in 1..=n {
        let d = admin
            .describe_configs([&ResourceSpecifier::Broker(id)], &AdminOptions::new())
            .await
            .unwrap();
        let r = d[0].as_ref().unwrap();
        let e = r.get("min.insync.replicas").unwrap();
        let dynamic_default = matches!(e.source, ConfigSource::DynamicDefaultBroker);
        seen.push((e.value.clone().unwrap(), dynamic_default));
    }
    seen
}

/// Nodes started with different `min.insync.replicas` still agree on one: the first to
/// register writes its own as the cluster-wide value, which outranks every node's static
/// setting (as Kafka does with eligible leader replicas on). It can be changed, not removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_with_different_min_insync_replicas_agree_on_one() {
    let mut c = Cluster::start_with(3, &[], |id| vec![format!("min.insync.replicas={id}")]);
    let b = c.bootstrap();
    let seen = min_isr_of_each_broker(&b, 3).await;
    assert!(
        seen.iter().all(|s| *s == seen[0]) && seen[0].1,
        "one cluster-wide value: {seen:?}"
    );
    assert!(["1", "2", "3"].contains(&seen[0].0.as_str()), "{seen:?}");
    // Removing it is refused, and a legacy AlterConfigs of the cluster-wide settings, which
    // replaces them all, keeps it; changing it works, everywhere.
    assert_eq!(
        alter_broker_config(&mut c, 2, "", "min.insync.replicas", None),
        40
    );
    assert_eq!(
        replace_cluster_configs(&mut c, 1, "log.retention.ms", "3600000"),
        0
    );
    assert_eq!(min_isr_of_each_broker(&b, 3).await, seen);
    assert_eq!(
        set_broker_config(&mut c, 3, "", "min.insync.replicas", "2"),
        0
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = min_isr_of_each_broker(&b, 3).await;
        if seen.iter().all(|(v, d)| v == "2" && *d) {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A partition that went offline while unclean election was off gets a leader once the
/// operator turns `unclean.leader.election.enable` on for its topic: the out-of-sync replica
/// that came back leads with what it has (the loss the operator accepted), and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_unclean_election_on_brings_an_offline_partition_back() {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    // Five voters keep a metadata majority while both replicas of the topic are down.
    let mut c = Cluster::start(5, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "unc", 1, 2, &[]).await;
    let s = c.wait_partition("unc", 0, WAIT, "full ISR", |s| s.isr.len() == 2);
    let (a, x) = (
        s.leader,
        s.replicas.iter().copied().find(|r| *r != s.leader).unwrap(),
    );
    let p = producer(&b, "all", false);
    send_values(&p, "unc", 0..10).await;
    // x goes and misses 10..20; then a, the last in-sync replica, goes too.
    c.node(x).kill9();
    c.wait_partition("unc", 0, WAIT, "x leaves the ISR", |s| s.isr == vec![a]);
    send_values(&p, "unc", 10..20).await;
    c.node(a).kill9();
    c.wait_partition("unc", 0, WAIT, "offline", |s| s.leader == -1);
    c.node(x).restart();
    c.wait_brokers(4, WAIT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.view().unwrap().partition("unc", 0).unwrap().leader,
        -1,
        "x is out of sync: it may not lead while unclean election is off"
    );
    let change = AlterConfig::new(ResourceSpecifier::Topic("unc"))
        .set("unclean.leader.election.enable", "true");
    for r in common::admin(&b)
        .alter_configs(&[change], &AdminOptions::new())
        .await
        .expect("alter_configs")
    {
        r.expect("unclean.leader.election.enable=true");
    }
    let led = c.wait_partition("unc", 0, WAIT, "x leads", |s| s.leader == x);
    assert_eq!(led.isr, vec![x], "{led:?}");
    let p = producer(&b, "all", false);
    send_values(&p, "unc", 100..101).await;
    let mut want: Vec<u64> = (0..10).collect();
    want.push(100);
    assert_eq!(read_values(&b, "unc", 0, 11, WAIT), want);
}

/// A leader's high watermark survives its restart (`replication-offset-checkpoint`): a replica
/// that comes back as the only in-sync one serves consumers what was committed, not what it
/// merely wrote while its ISR was below min.insync.replicas (KIP-966: that is not committed
/// until the ISR is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_serves_only_what_was_committed() {
    // Five voters keep a metadata majority while both replicas of the topic are down.
    let mut c = Cluster::start(5, &["replica.high.watermark.checkpoint.interval.ms=100"]);
    let b = c.bootstrap();
    create_replicated(&b, "hw", 1, 2, &[("min.insync.replicas", "2")]).await;
    let s = c.wait_partition("hw", 0, WAIT, "full ISR", |s| s.isr.len() == 2);
    send_values(&producer(&b, "all", true), "hw", 0..100).await;
    let a = s.leader;
    let x = *s.replicas.iter().find(|r| **r != a).unwrap();
    c.node(x).kill9();
    c.wait_partition("hw", 0, WAIT, "the leader alone in the ISR", |s| {
        s.isr == vec![a]
    });
    // acks=1 still appends on the leader, but nothing is committed while the ISR is short.
    send_values(&producer(&b, "1", false), "hw", 100..101).await;
    let mut raw = RawClient::connect(c.node(a).addr());
    assert_eq!(strom_tests::list_offset(&mut raw, "hw", 0, -1), (0, 100));
    drop(raw);
    // Long enough for several checkpoints.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.node(a).kill9();
    c.wait_partition("hw", 0, WAIT, "no leader", |s| s.leader == -1);
    c.node(a).restart();
    c.wait_partition("hw", 0, WAIT, "a leads again", |s| s.leader == a);
    let mut raw = RawClient::connect(c.node(a).addr());
    assert_eq!(
        strom_tests::list_offset(&mut raw, "hw", 0, -1),
        (0, 100),
        "the restarted leader's high watermark is what was committed"
    );
    drop(raw);
    assert_eq!(
        read_values(&b, "hw", 0, 101, Duration::from_secs(3)),
        (0..100).collect::<Vec<_>>()
    );
    // x comes back and catches up: the ISR is at min.insync.replicas again, so the record
    // written meanwhile is committed now.
    c.node(x).restart();
    c.wait_partition("hw", 0, Duration::from_secs(60), "x rejoins", |s| {
        s.isr.contains(&x)
    });
    assert_eq!(
        read_values(&b, "hw", 0, 101, WAIT),
        (0..101).collect::<Vec<_>>()
    );
}

/// AlterPartitionReassignments (v1) through node `id`: the error code of each partition.
fn alter_reassignments(c: &mut Cluster, id: i32, topic: &str, target: Option<&[i32]>) -> i16 {
    use kafka_protocol::messages::alter_partition_reassignments_request::{
        ReassignablePartition, ReassignableTopic,
    };
    use kafka_protocol::messages::{
        AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
        TopicName,
    };
    use kafka_protocol::protocol::StrBytes;
    let mut raw = RawClient::connect(c.node(id).addr());
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(30_000)
        .with_allow_replication_factor_change(true)
        .with_topics(vec![ReassignableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![ReassignablePartition::default()
                .with_partition_index(0)
                .with_replicas(
                    target.map(|t| t.iter().map(|b| BrokerId(*b)).collect()),
                )])]);
    let resp: AlterPartitionReassignmentsResponse =
        raw.call(ApiKey::AlterPartitionReassignments, 1, &req);
    assert_eq!(resp.error_code, 0);
    let p = &resp.responses[0].partitions[0];
    if p.error_code != 0 {
        eprintln!("reassignment refused: {:?}", p.error_message);
    }
    p.error_code
}

/// ListPartitionReassignments (all partitions) through node `id`: (topic, partition,
/// replicas, adding, removing) of each ongoing reassignment.
#[allow(clippy::type_complexity)]
fn list_reassignments(
    c: &mut Cluster,
    id: i32,
) -> Vec<(String, i32, Vec<i32>, Vec<i32>, Vec<i32>)> {
    use kafka_protocol::messages::{
        ApiKey, ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
    };
    let mut raw = RawClient::connect(c.node(id).addr());
    let req = ListPartitionReassignmentsRequest::default().with_timeout_ms(30_000);
    let resp: ListPartitionReassignmentsResponse =
        raw.call(ApiKey::ListPartitionReassignments, 0, &req);
    assert_eq!(resp.error_code, 0);
    let ids = |v: &[kafka_protocol::messages::BrokerId]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    resp.topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                (
                    t.name.0.to_string(),
                    p.partition_index,
                    ids(&p.replicas),
                    ids(&p.adding_replicas),
                    ids(&p.removing_replicas),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassigning_a_partition_off_its_leader_under_load_loses_nothing() {
    let mut c = Cluster::start(4, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "moving", 1, 3, &[("min.insync.replicas", "2")]).await;
    let before = c.wait_partition("moving", 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });
    let newcomer = (1..=4).find(|id| !before.replicas.contains(id)).unwrap();
    let victim = before.leader;
    // The fourth node replaces the current leader (and is the preferred leader).
    let mut target = vec![newcomer];
    target.extend(before.replicas.iter().copied().filter(|r| *r != victim));
    // Requests go through a broker that is neither the leader nor the newcomer.
    let via = target[1];

    // Refusals: unregistered broker, duplicates, unknown partition, cancel without one.
    assert_eq!(
        alter_reassignments(&mut c, via, "moving", Some(&[1, 99])),
        39
    );
    assert_eq!(
        alter_reassignments(&mut c, via, "moving", Some(&[1, 1])),
        39
    );
    assert_eq!(alter_reassignments(&mut c, via, "nope", Some(&[1])), 3);
    assert_eq!(alter_reassignments(&mut c, via, "moving", None), 85);
    assert!(list_reassignments(&mut c, via).is_empty());

    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(produce_sequence(
        producer(&b, "all", true),
        "moving".into(),
        0,
        1_000_000,
        acked_count.clone(),
        stop.clone(),
    ));
    wait_acked(&c, &acked_count, 30_000, "producer made no progress").await;

    let started = Instant::now();
    assert_eq!(alter_reassignments(&mut c, via, "moving", Some(&target)), 0);
    let ongoing = list_reassignments(&mut c, via);
    eprintln!("right after the request: {ongoing:?}");
    if let Some((_, p, replicas, adding, removing)) = ongoing.first() {
        assert_eq!(*p, 0);
        assert_eq!(adding, &vec![newcomer]);
        assert_eq!(removing, &vec![victim]);
        assert_eq!(replicas.len(), 4);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let listed = list_reassignments(&mut c, via);
        let view = c.view().and_then(|v| v.partition("moving", 0).cloned());
        if let Some(s) = &view {
            if listed.is_empty()
                && s.replicas == target
                && s.isr.len() == 3
                && target.contains(&s.leader)
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the reassignment did not complete: {listed:?} {view:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = c.view().unwrap().partition("moving", 0).cloned().unwrap();
    eprintln!(
        "reassigned in {:?}: {before:?} -> {after:?}",
        started.elapsed()
    );
    assert_ne!(after.leader, victim);
    assert!(after.leader_epoch > before.leader_epoch);

    // Writes go on at the new leader.
    let at_done = acked_count.load(Ordering::Acquire);
    let what = "writes did not go on after the reassignment";
    wait_acked(&c, &acked_count, at_done + 5_000, what).await;
    stop.store(true, Ordering::Release);
    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {}, {failed} failed", acked.len());

    read_back_and_check(&b, "moving", 0, &acked, failed);

    // The removed replica deleted its log; the newcomer has one.
    let gone = c.node(victim).data_dir().join("moving-0");
    let deadline = Instant::now() + WAIT;
    while gone.exists() {
        assert!(Instant::now() < deadline, "{} still exists", gone.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.node(newcomer).data_dir().join("moving-0").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reassignment_to_a_dead_broker_waits_and_can_be_cancelled() {
    let mut c = Cluster::start(4, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "stuck", 1, 3, &[("min.insync.replicas", "2")]).await;
    let before = c.wait_partition("stuck", 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });
    let dead = (1..=4).find(|id| !before.replicas.contains(id)).unwrap();
    c.node(dead).kill9();
    c.wait_brokers(3, WAIT);
    let mut target = vec![dead];
    target.extend(
        before
            .replicas
            .iter()
            .copied()
            .filter(|r| *r != before.leader),
    );
    let via = before.leader;
    assert_eq!(alter_reassignments(&mut c, via, "stuck", Some(&target)), 0);
    let listed = list_reassignments(&mut c, via);
    let mut replicas = target.clone();
    replicas.push(before.leader);
    assert_eq!(
        listed,
        vec![(
            "stuck".to_string(),
            0,
            replicas.clone(),
            vec![dead],
            vec![before.leader]
        )]
    );
    let s = c.wait_partition("stuck", 0, WAIT, "the reassignment is visible", |s| {
        s.replicas == replicas
    });
    assert_eq!(s.leader, before.leader);
    // It stays pending while the new replica cannot catch up, and writes go on.
    let p = producer(&b, "all", true);
    p.send(
        FutureRecord::<(), _>::to("stuck").payload("1").partition(0),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("acks=all during the reassignment");
    assert_eq!(list_reassignments(&mut c, via).len(), 1);

    assert_eq!(alter_reassignments(&mut c, via, "stuck", None), 0);
    assert!(list_reassignments(&mut c, via).is_empty());
    let mut original = before.replicas.clone();
    original.sort_unstable();
    let s = c.wait_partition("stuck", 0, WAIT, "the cancel is visible", |s| {
        let mut r = s.replicas.clone();
        r.sort_unstable();
        r == original
    });
    assert_eq!(s.leader, before.leader);
    assert_eq!(s.isr.len(), 3);
    p.send(
        FutureRecord::<(), _>::to("stuck").payload("2").partition(0),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("acks=all after the cancel");
    assert_eq!(read_values(&b, "stuck", 0, 2, WAIT), vec![1, 2]);
}

/// One partition as DescribeTopicPartitions reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Described {
    leader: i32,
    leader_epoch: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
    elr: Vec<i32>,
    last_known_elr: Vec<i32>,
    offline: Vec<i32>,
}

/// DescribeTopicPartitions (v0) through node `id`.
fn describe_topic_partitions(
    c: &mut Cluster,
    id: i32,
    topics: &[&str],
    limit: i32,
    cursor: Option<(String, i32)>,
) -> kafka_protocol::messages::DescribeTopicPartitionsResponse {
    use kafka_protocol::messages::describe_topic_partitions_request::{Cursor, TopicRequest};
    use kafka_protocol::messages::{
        ApiKey, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, TopicName,
    };
    use kafka_protocol::protocol::StrBytes;
    let name = |s: &str| TopicName(StrBytes::from_string(s.to_string()));
    let req = DescribeTopicPartitionsRequest::default()
        .with_topics(
            topics
                .iter()
                .map(|t| TopicRequest::default().with_name(name(t)))
                .collect(),
        )
        .with_response_partition_limit(limit)
        .with_cursor(cursor.map(|(t, p)| {
            Cursor::default()
                .with_topic_name(name(&t))
                .with_partition_index(p)
        }));
    let mut raw = RawClient::connect(c.node(id).addr());
    let resp: DescribeTopicPartitionsResponse = raw.call(ApiKey::DescribeTopicPartitions, 0, &req);
    resp
}

/// Partition `p` of `topic` as node `id` describes it.
/// `described` once `f` holds for it: node `id` applies metadata records a moment after the
/// node `Cluster::view` asks (fails with `what` after `WAIT`).
fn described_when(
    c: &mut Cluster,
    id: i32,
    topic: &str,
    p: i32,
    what: &str,
    f: impl Fn(&Described) -> bool,
) -> Described {
    let deadline = Instant::now() + WAIT;
    loop {
        let d = described(c, id, topic, p);
        if f(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "{what}: node {id} says {d:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn described(c: &mut Cluster, id: i32, topic: &str, p: i32) -> Described {
    let resp = describe_topic_partitions(c, id, &[topic], 2000, None);
    let t = &resp.topics[0];
    assert_eq!(t.error_code, 0, "{topic}: {t:?}");
    let part = t
        .partitions
        .iter()
        .find(|x| x.partition_index == p)
        .unwrap_or_else(|| panic!("{topic}/{p} missing: {t:?}"));
    let ids = |v: &[kafka_protocol::messages::BrokerId]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    Described {
        leader: part.leader_id.0,
        leader_epoch: part.leader_epoch,
        replicas: ids(&part.replica_nodes),
        isr: ids(&part.isr_nodes),
        elr: ids(part.eligible_leader_replicas.as_deref().unwrap_or(&[])),
        last_known_elr: ids(part.last_known_elr.as_deref().unwrap_or(&[])),
        offline: ids(&part.offline_replicas),
    }
}

/// Every (topic, partition) of a paged DescribeTopicPartitions through node `id`, page by
/// page, with the error code of each topic answered with one.
#[allow(clippy::type_complexity)]
fn describe_all_pages(
    c: &mut Cluster,
    id: i32,
    topics: &[&str],
    limit: i32,
) -> (Vec<(String, i32)>, Vec<(String, i16)>) {
    let mut parts = Vec::new();
    let mut errors = Vec::new();
    let mut cursor = None;
    for _ in 0..100 {
        let resp = describe_topic_partitions(c, id, topics, limit, cursor.take());
        let page: usize = resp.topics.iter().map(|t| t.partitions.len()).sum();
        assert!(page <= limit as usize, "page of {page} over limit {limit}");
        for t in &resp.topics {
            let name = t.name.as_ref().unwrap().0.to_string();
            if t.error_code != 0 {
                errors.push((name.clone(), t.error_code));
                assert_eq!(t.topic_id, uuid::Uuid::nil());
            }
            parts.extend(
                t.partitions
                    .iter()
                    .map(|p| (name.clone(), p.partition_index)),
            );
        }
        match resp.next_cursor {
            Some(n) => cursor = Some((n.topic_name.0.to_string(), n.partition_index)),
            None => return (parts, errors),
        }
    }
    panic!("paging did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_topic_partitions_reports_isr_elr_offline_replicas_and_pages() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    // With min.insync.replicas equal to the replication factor, a replica that leaves the ISR
    // becomes an eligible leader replica (KIP-966).
    create_replicated(&b, "dtp", 1, 3, &[("min.insync.replicas", "3")]).await;
    create_replicated(&b, "dtp-a", 5, 2, &[]).await;
    create_replicated(&b, "dtp-b", 3, 1, &[]).await;
    let s = c.wait_partition("dtp", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let leader = s.leader;
    let d = described(&mut c, leader, "dtp", 0);
    assert_eq!(
        (d.leader, d.leader_epoch, &d.replicas),
        (s.leader, s.leader_epoch, &s.replicas),
        "the same partition as Metadata"
    );
    assert_eq!(d.isr.len(), 3);
    assert!(d.elr.is_empty() && d.offline.is_empty(), "{d:?}");
    let resp = describe_topic_partitions(&mut c, leader, &["dtp"], 10, None);
    assert!(!resp.topics[0].is_internal);
    assert_ne!(resp.topics[0].topic_id, uuid::Uuid::nil());

    // A follower dies: once fenced it is offline, leaves the ISR and, the ISR being short of
    // min.insync.replicas, stays eligible to lead.
    let x = *s.replicas.iter().find(|r| **r != leader).unwrap();
    c.node(x).kill9();
    let deadline = Instant::now() + WAIT;
    let d = loop {
        let d = described(&mut c, leader, "dtp", 0);
        if !d.isr.contains(&x) && d.offline == vec![x] {
            break d;
        }
        assert!(Instant::now() < deadline, "{x} stayed in sync: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d.leader, leader);
    assert_eq!(d.isr.len(), 2);
    assert_eq!(d.elr, vec![x], "{d:?}");
    assert_eq!(d.replicas, s.replicas);

    // Unknown names are answered with an error and no topic id.
    let resp = describe_topic_partitions(&mut c, leader, &["no-such-topic"], 10, None);
    assert_eq!(resp.topics.len(), 1);
    assert_eq!(resp.topics[0].error_code, 3, "UNKNOWN_TOPIC_OR_PARTITION");
    assert!(resp.next_cursor.is_none());

    // Pages of every size list each partition exactly once, in topic then partition order.
    let mut expected: Vec<(String, i32)> = c
        .view()
        .unwrap()
        .topics
        .iter()
        .flat_map(|(n, _, ps)| (0..ps.len() as i32).map(move |p| (n.clone(), p)))
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 9);
    for limit in [1, 2, 3, 4, 9, 2000] {
        let (parts, errors) = describe_all_pages(&mut c, leader, &[], limit);
        assert_eq!(parts, expected, "all topics, limit {limit}");
        assert!(errors.is_empty());
    }
    let listed = ["dtp-b", "no-such-topic", "dtp-a", "dtp-b"];
    for limit in [1, 3, 5] {
        let (parts, errors) = describe_all_pages(&mut c, leader, &listed, limit);
        let want: Vec<(String, i32)> = expected
            .iter()
            .filter(|(t, _)| t.starts_with("dtp-"))
            .cloned()
            .collect();
        assert_eq!(parts, want, "listed topics, limit {limit}");
        assert_eq!(errors, vec![("no-such-topic".to_string(), 3)]);
    }

    // The follower comes back: in sync again, nothing offline, no eligible leader replicas.
    c.node(x).restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = described(&mut c, leader, "dtp", 0);
        if d.isr.len() == 3 {
            assert!(d.elr.is_empty() && d.offline.is_empty(), "{d:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{x} did not rejoin: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `strom ARGS... --bootstrap` against the cluster.
fn strom(c: &Cluster, args: &[&str]) -> (bool, String) {
    strom_tests::strom_cli(&c.bootstrap(), args)
}

/// The columns of partition `p` of `topic` in `strom topic describe` output: partition,
/// leader, epoch, replicas, ISR, ELR, offline.
fn cli_partition(text: &str, topic: &str, p: i32) -> Option<Vec<String>> {
    let header = format!("Topic: {topic} ");
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&header)).skip(1);
    lines
        .by_ref()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cols| cols.len() == 7 && cols[0] == p.to_string())
}

/// Polls `strom topic describe --topic T` until `f` holds for partition `p`'s columns.
async fn wait_cli_partition(
    c: &Cluster,
    topic: &str,
    p: i32,
    what: &str,
    f: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, text) = strom(c, &["topic", "describe", "--topic", topic]);
        if let Some(cols) = cli_partition(&text, topic, p).filter(|cols| ok && f(cols)) {
            return cols;
        }
        assert!(Instant::now() < deadline, "{what}: last output\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strom_cli_describes_reassigns_elects_and_shows_the_quorum() {
    let mut c = Cluster::start(3, &["auto.leader.rebalance.enable=false"]);
    let b = c.bootstrap();

    // quorum describe names the leader DescribeQuorum names.
    let (ok, text) = strom(&c, &["quorum", "describe"]);
    assert!(ok, "{text}");
    let Quorum { leader, epoch, .. } = describe_quorum(&mut c, 1);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(field("LeaderId:"), leader.to_string(), "{text}");
    assert_eq!(field("LeaderEpoch:"), epoch.to_string(), "{text}");
    assert_eq!(field("CurrentVoters:"), "[1, 2, 3]", "{text}");
    assert_eq!(
        text.lines().filter(|l| l.ends_with("Leader")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with("Follower")).count(),
        2,
        "{text}"
    );

    // topic describe shows what Metadata shows; unknown topics fail with the error's name.
    create_replicated(&b, "cli", 1, 2, &[]).await;
    let s = c.wait_partition("cli", 0, WAIT, "full ISR", |s| s.isr.len() == 2);
    let ids = |v: &[i32]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let cols = wait_cli_partition(&c, "cli", 0, "described", |cols| cols[4].contains(',')).await;
    assert_eq!(cols[1], s.leader.to_string());
    assert_eq!(cols[3], ids(&s.replicas));
    assert_eq!((cols[5].as_str(), cols[6].as_str()), ("-", "-"));
    let (ok, text) = strom(&c, &["topic", "describe", "--topic", "no-such-topic"]);
    assert!(!ok && text.contains("UnknownTopicOrPartition"), "{text}");
    let (ok, text) = strom(&c, &["topic", "describe"]);
    assert!(ok && cli_partition(&text, "cli", 0).is_some(), "{text}");

    // reassign: the new replicas show up in topic describe.
    let newcomer = (1..=3).find(|id| !s.replicas.contains(id)).unwrap();
    let target = vec![newcomer, s.replicas[0]];
    let (ok, text) = strom(
        &c,
        &[
            "reassign",
            "--topic",
            "cli",
            "--partition",
            "0",
            "--replicas",
            &ids(&target),
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("cli-0"), "{text}");
    let cols = wait_cli_partition(&c, "cli", 0, "reassigned", |cols| {
        cols[3] == ids(&target) && cols[4].split(',').count() == 2
    })
    .await;
    assert!(target.contains(&cols[1].parse().unwrap()), "{cols:?}");
    let after = c.wait_partition("cli", 0, WAIT, "Metadata agrees", |s| s.replicas == target);
    assert_eq!(after.replicas, target);
    let (ok, text) = strom(&c, &["reassign", "--list"]);
    assert!(ok && text.contains("no reassignment in progress"), "{text}");
    let (ok, text) = strom(
        &c,
        &["reassign", "--cancel", "--topic", "cli", "--partition", "0"],
    );
    assert!(!ok && text.contains("NoReassignmentInProgress"), "{text}");
    let (ok, text) = strom(
        &c,
        &[
            "reassign",
            "--topic",
            "no-such-topic",
            "--partition",
            "0",
            "--replicas",
            "1",
        ],
    );
    assert!(!ok && text.contains("UnknownTopicOrPartition"), "{text}");

    // elect --type preferred moves leadership back after a restart.
    create_replicated(&b, "pref", 1, 3, &[]).await;
    let s = c.wait_partition("pref", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let preferred = s.replicas[0];
    assert_eq!(s.leader, preferred);
    let elect_pref = [
        "elect",
        "--type",
        "preferred",
        "--topic",
        "pref",
        "--partition",
        "0",
    ];
    let (ok, text) = strom(&c, &elect_pref);
    assert!(ok && text.contains("already elected"), "{text}");
    c.node(preferred).kill9();
    c.wait_partition("pref", 0, WAIT, "failover", |s| {
        s.leader > 0 && s.leader != preferred
    });
    c.node(preferred).restart();
    c.wait_partition("pref", 0, Duration::from_secs(60), "rejoin", |s| {
        s.isr.contains(&preferred)
    });
    let cols = wait_cli_partition(&c, "pref", 0, "led elsewhere", |cols| {
        cols[4].split(',').count() == 3
    })
    .await;
    assert_ne!(cols[1], preferred.to_string(), "no automatic move back");
    let (ok, text) = strom(&c, &elect_pref);
    assert!(ok && text.contains("pref-0"), "{text}");
    wait_cli_partition(&c, "pref", 0, "preferred leader back", |cols| {
        cols[1] == preferred.to_string()
    })
    .await;
    // Every preferred replica is back in sync (the restarted node may be the preferred replica
    // of "cli"), so an election over all partitions has nothing to fail on.
    c.wait_partition("cli", 0, Duration::from_secs(60), "cli in sync", |s| {
        s.isr.len() == 2
    });
    let (ok, text) = strom(&c, &["elect", "--type", "preferred", "--all"]);
    assert!(ok, "{text}");
    let (ok, text) = strom(
        &c,
        &[
            "elect",
            "--type",
            "unclean",
            "--topic",
            "no-such-topic",
            "--partition",
            "0",
        ],
    );
    assert!(!ok && text.contains("UnknownTopicOrPartition"), "{text}");
}

/// A broker-only node (id 4, not in `--controller-quorum`: a Raft learner of the metadata log,
/// Kafka's `process.roles=broker`) is a broker like the others: registered, hosting replicas
/// and leading a partition under an acks=all producer; killed, its partition fails over with
/// nothing acknowledged lost; restarted, it rejoins the ISR and can lead again. It is listed
/// as a DescribeQuorum observer and is never the active controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_only_node_leads_and_follows_partitions_but_never_controls() {
    let mut c = Cluster::start_mixed(3, 1, &[], |_| Vec::new());
    let never_controller = |c: &mut Cluster| {
        for id in 1..=4 {
            if !c.node(id).is_running() {
                continue;
            }
            if let Some(v) = c.view_from(id) {
                assert_ne!(v.controller, 4, "node {id} names node 4 the controller");
            }
        }
    };
    for id in 1..=4 {
        let v = c.view_from(id).expect("metadata");
        assert_eq!(v.brokers, vec![1, 2, 3, 4], "as node {id} sees it");
        assert!(
            (1..=3).contains(&v.controller),
            "controller {}",
            v.controller
        );
    }
    let q = describe_quorum(&mut c, 4);
    assert!((1..=3).contains(&q.leader));
    assert_eq!(
        q.voters.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        q.observers.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![4],
        "the broker-only node is an observer"
    );

    let b = c.bootstrap();
    create_replicated(&b, "observed", 4, 4, &[("min.insync.replicas", "2")]).await;
    let mut led_by_4 = None;
    for p in 0..4 {
        let s = c.wait_partition("observed", p, WAIT, "full ISR", |s| {
            s.isr.len() == 4 && s.leader > 0
        });
        assert_eq!(s.replicas.len(), 4, "{s:?}");
        if s.leader == 4 {
            led_by_4 = Some((p, s));
        }
    }
    // Placement rotates the preferred leader over every broker, node 4 included.
    let (p, before) = led_by_4.expect("no partition led by the broker-only node");
    let partition = p as i32;

    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let total = 20_000;
    let task = tokio::spawn(produce_sequence(
        producer(&b, "all", true),
        "observed".into(),
        partition,
        total,
        acked_count.clone(),
        stop.clone(),
    ));
    wait_acked(&c, &acked_count, 3_000, "producer made no progress").await;
    never_controller(&mut c);
    let at_kill = acked_count.load(Ordering::Acquire);
    c.node(4).kill9();
    let what = "writes did not resume after the broker-only leader was killed";
    wait_acked(&c, &acked_count, at_kill + 3_000, what).await;
    let after = c.wait_partition("observed", p, WAIT, "a new leader", |s| {
        s.leader > 0 && s.leader != 4 && !s.isr.contains(&4)
    });
    assert!(after.leader_epoch > before.leader_epoch);
    c.wait_brokers(3, WAIT);
    never_controller(&mut c);

    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {} of {total}, {failed} failed", acked.len());
    assert!(acked.len() > 6_000);
    let values = read_back_and_check(&b, "observed", partition, &acked, failed);

    // Back with its log and its place in the metadata log: it catches up, rejoins the ISR and,
    // by a preferred election, leads its partition again with the same records.
    c.node(4).restart();
    c.wait_brokers(4, WAIT);
    c.wait_partition(
        "observed",
        p,
        Duration::from_secs(60),
        "the broker-only node rejoins the ISR",
        |s| s.isr.contains(&4),
    );
    assert!(
        !c.node(4).log().contains("removing the log"),
        "the restarted broker-only node dropped a log:\n{}",
        c.node(4).log()
    );
    // 0, or ELECTION_NOT_NEEDED if the automatic leader balance got there first.
    let code = elect_leaders(&mut c, 1, 0, "observed", partition);
    assert!(code == 0 || code == 84, "ElectLeaders: error {code}");
    c.wait_partition("observed", p, WAIT, "node 4 leads again", |s| s.leader == 4);
    let again = read_values(
        &b,
        "observed",
        partition,
        values.len(),
        Duration::from_secs(60),
    );
    assert_eq!(again, values, "the broker-only node serves a different log");
    let q = describe_quorum(&mut c, 2);
    assert_eq!(q.observers.iter().map(|v| v.0).collect::<Vec<_>>(), vec![4]);
    assert_ne!(q.leader, 4);
    never_controller(&mut c);
}

/// DescribeCluster v2 with fenced brokers (KIP-1073) through node `id`: (broker, fenced).
fn registered_brokers(c: &mut Cluster, id: i32) -> Vec<(i32, bool)> {
    use kafka_protocol::messages::{ApiKey, DescribeClusterRequest, DescribeClusterResponse};
    let mut raw = RawClient::connect(c.node(id).addr());
    let req = DescribeClusterRequest::default().with_include_fenced_brokers(true);
    let resp: DescribeClusterResponse = raw.call(ApiKey::DescribeCluster, 2, &req);
    assert_eq!(
        resp.error_code, 0,
        "DescribeCluster: {:?}",
        resp.error_message
    );
    let mut v: Vec<(i32, bool)> = resp
        .brokers
        .iter()
        .map(|b| (b.broker_id.0, b.is_fenced))
        .collect();
    v.sort_unstable();
    v
}

/// UnregisterBroker (KIP-631) through `strom cluster unregister`: a stopped broker-only node
/// is fenced but still registered, an observer of the metadata quorum and an eligible leader
/// replica (KIP-966) of the partitions it was in sync for. Unregistered, it is gone from
/// DescribeCluster (even with fenced brokers), from Metadata, from the quorum's observers and
/// from every ISR and ELR, while replica lists keep it; topics keep working. Unknown ids fail
/// with BrokerIdNotRegistered, voters with InvalidRequest. Started again, it registers as a new
/// broker; unregistered while running, it shuts itself down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_broker_only_node_leaves_the_cluster_for_good() {
    let mut c = Cluster::start_mixed(3, 1, &["auto.leader.rebalance.enable=false"], |_| {
        Vec::new()
    });
    let b = c.bootstrap();
    create_replicated(&b, "kept", 4, 2, &[("min.insync.replicas", "2")]).await;
    let mut with_4 = Vec::new();
    for p in 0..4 {
        let s = c.wait_partition("kept", p, WAIT, "full ISR", |s| {
            s.isr.len() == 2 && s.leader > 0
        });
        if s.replicas.contains(&4) {
            with_4.push(p as i32);
        }
    }
    assert!(!with_4.is_empty(), "placement skipped node 4");

    assert!(c.node(4).terminate(), "node 4 did not stop cleanly");
    c.wait_brokers(3, WAIT);
    wait_for(WAIT, "node 4 fenced", || {
        (registered_brokers(&mut c, 1) == vec![(1, false), (2, false), (3, false), (4, true)])
            .then_some(())
    });
    let q = describe_quorum(&mut c, 1);
    assert_eq!(q.observers.iter().map(|o| o.0).collect::<Vec<_>>(), vec![4]);
    for p in &with_4 {
        wait_cli_partition(&c, "kept", *p, "node 4 eligible", |cols| cols[5] == "4").await;
    }

    let (ok, text) = strom(&c, &["cluster", "unregister", "--id", "4"]);
    assert!(ok, "{text}");
    assert!(text.contains("Broker 4 is no longer registered"), "{text}");
    for id in 1..=3 {
        wait_for(WAIT, "every node to drop broker 4", || {
            (registered_brokers(&mut c, id) == vec![(1, false), (2, false), (3, false)])
                .then_some(())
        });
        assert_eq!(c.view_from(id).unwrap().brokers, vec![1, 2, 3]);
    }
    let q = describe_quorum(&mut c, 2);
    assert!(
        q.observers.is_empty(),
        "still an observer: {:?}",
        q.observers
    );
    assert_eq!(
        q.voters.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for p in 0..4 {
        let s = c.wait_partition("kept", p, WAIT, "led", |s| s.leader > 0);
        assert_eq!(
            s.replicas.contains(&4),
            with_4.contains(&(p as i32)),
            "{s:?}"
        );
        assert!(!s.isr.contains(&4) && s.leader != 4, "{s:?}");
    }
    for p in &with_4 {
        let cols = wait_cli_partition(&c, "kept", *p, "no ELR", |cols| cols[5] == "-").await;
        assert!(
            cols[6].contains('4'),
            "an offline replica until reassigned: {cols:?}"
        );
    }

    // Topics keep working: a new one is placed on the three brokers left.
    create_replicated(&b, "after", 1, 3, &[]).await;
    let s = c.wait_partition("after", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    assert!(!s.replicas.contains(&4), "{s:?}");
    send_values(&producer(&b, "all", true), "after", 0..50).await;
    let values = read_values(&b, "after", 0, 50, Duration::from_secs(30));
    assert_eq!(values, (0..50).collect::<Vec<u64>>());

    // Errors, with the Kafka error's name.
    for unknown in ["4", "42"] {
        let (ok, text) = strom(&c, &["cluster", "unregister", "--id", unknown]);
        assert!(!ok && text.contains("BrokerIdNotRegistered"), "{text}");
    }
    let (ok, text) = strom(&c, &["cluster", "unregister", "--id", "2"]);
    assert!(
        !ok && text.contains("InvalidRequest") && text.contains("voter"),
        "{text}"
    );
    assert_eq!(
        registered_brokers(&mut c, 2).len(),
        3,
        "a refused voter stays"
    );

    // Started again, it registers as a new broker and joins the quorum as an observer.
    c.node(4).restart();
    c.wait_brokers(4, WAIT);
    wait_for(WAIT, "node 4 an observer again", || {
        (describe_quorum(&mut c, 1).observers.len() == 1).then_some(())
    });
    // Unregistered while running: its next heartbeat tells it, and it shuts down.
    let (ok, text) = strom(&c, &["cluster", "unregister", "--id", "4"]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + WAIT;
    while c.node(4).is_running() {
        assert!(
            Instant::now() < deadline,
            "the running node 4 did not shut down:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.node(4).log().contains("unregistered from the cluster"),
        "{}",
        c.node(4).log()
    );
    c.wait_brokers(3, WAIT);
    assert!(describe_quorum(&mut c, 3).observers.is_empty());
    assert_eq!(registered_brokers(&mut c, 3).len(), 3);
}

/// The active controller's metadata log cannot be fsynced: the node stops (staying up, it would
/// serve from a metadata image that no longer changes); a new controller takes over and
/// metadata changes work again; restarted, the node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_metadata_log_fails_stops_and_another_takes_over() {
    let mut c = Cluster::start(3, &[]);
    let old = c.view().unwrap().controller;
    let dir = std::fs::canonicalize(c.node(old).data_dir()).unwrap();
    let raft_log = dir.join("__cluster_metadata-0/raft.log");
    let pid = c.node(old).pid().expect("running");
    let strace = fail_fsyncs(pid, &[raft_log], None);
    // A metadata change makes every voter append to its metadata log: this one fails.
    let b = c.bootstrap();
    let creating = tokio::spawn(async move {
        let t = NewTopic::new("during", 1, TopicReplication::Fixed(3));
        let _ = common::admin(&b)
            .create_topics(
                [&t],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
            )
            .await;
    });
    expect_storage_halt(
        c.node(old),
        strace,
        "the metadata log failed: stopping the node",
    );
    let _ = creating.await;
    let live: Vec<String> = (1..=3)
        .filter(|id| *id != old)
        .map(|id| c.node(id).bootstrap())
        .collect();
    create_replicated(&live.join(","), "after", 1, 2, &[]).await;
    let s = c.wait_partition("after", 0, WAIT, "a leader", |s| {
        s.leader > 0 && s.isr.len() == 2
    });
    assert!(
        !s.replicas.contains(&old),
        "placed on a stopped broker: {s:?}"
    );
    let new = c.view().unwrap().controller;
    assert!(new > 0 && new != old, "controller {new}");
    c.node(old).restart();
    c.wait_brokers(3, WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_fsync_fails_stops_and_the_others_take_over_losing_nothing() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    let (before, (acked_count, _stop, task)) = under_load(&mut c, "synced", 30_000).await;
    let victim = before.leader;
    wait_acked(&c, &acked_count, 2_000, "producer made no progress").await;

    // The leader's fsyncs of the partition's segment (and of the data directory, which a
    // flush of several files syncs as a whole) fail from now on, as on a failing disk.
    let dir = std::fs::canonicalize(c.node(victim).data_dir()).unwrap();
    let segment = std::fs::canonicalize(dir.join("synced-0/00000000000000000000.log")).unwrap();
    let pid = c.node(victim).pid().expect("running");
    let strace = fail_fsyncs(pid, &[segment, dir], None);
    // It stops by itself, with the status that says why, instead of retrying the fsync.
    expect_storage_halt(
        c.node(victim),
        strace,
        "fsync of the log failed: stopping the node",
    );
    // The others take over and writes resume.
    let at_stop = acked_count.load(Ordering::Acquire);
    wait_acked(&c, &acked_count, at_stop + 2_000, "writes did not resume").await;
    let after = c.wait_partition("synced", 0, WAIT, "a new leader", |s| {
        s.leader > 0 && s.leader != victim
    });
    assert!(after.leader_epoch > before.leader_epoch);
    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {}, {failed} failed", acked.len());

    // Restarted (its disk healthy again), it recovers its log and rejoins the ISR.
    c.node(victim).restart();
    c.wait_partition(
        "synced",
        0,
        Duration::from_secs(60),
        "the restarted node rejoins the ISR",
        |s| s.isr.contains(&victim),
    );
    read_back_and_check(&b, "synced", 0, &acked, failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_disk_is_full_backs_off_and_rejoins_once_it_has_space() {
    // Follower writes go past the page cache (all of them here), fall back to the page cache
    // when that fails, and are taken back when that fails too.
    let mut c = Cluster::start(
        3,
        &[
            "replica.lag.time.max.ms=1500",
            "strom.replica.direct.min.bytes=0",
        ],
    );
    let b = c.bootstrap();
    create_replicated(&b, "full", 1, 3, &[("min.insync.replicas", "2")]).await;
    let s = c.wait_partition("full", 0, WAIT, "full ISR", |s| s.isr.len() == 3);
    let f = *s.replicas.iter().find(|r| **r != s.leader).unwrap();
    let segment = |c: &mut Cluster, id: i32| {
        let p = c
            .node(id)
            .data_dir()
            .join("full-0/00000000000000000000.log");
        std::fs::canonicalize(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let ours = segment(&mut c, f);
    let theirs = segment(&mut c, s.leader);
    let p = producer(&b, "all", true);
    send_values(&p, "full", 0..20).await;
    let mut sent = 20;

    // Every write to the follower's segment fails as on a full disk (strace injects ENOSPC into
    // the direct write and into the page cache write it falls back to).
    let mut strace = fill_disk_for(c.node(f).pid().expect("running"), &ours);
    let failed_before = c
        .node(f)
        .log()
        .matches("appending replicated data failed")
        .count();
    // acks=all waits until the follower leaves the ISR, then goes on with the other two.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        send_values(&p, "full", sent..sent + 20).await;
        sent += 20;
    }
    let x = c.wait_partition("full", 0, WAIT, "the full follower is out", |x| {
        !x.isr.contains(&f)
    });
    assert_eq!(x.isr.len(), 2, "{x:?}");
    let failures = c
        .node(f)
        .log()
        .matches("appending replicated data failed")
        .count()
        - failed_before;
    // Each failure waits twice as long as the one before (up to replica.fetch.backoff.ms):
    // about a dozen in five seconds, where a loop without a pause fails thousands of times.
    assert!(
        (1..=40).contains(&failures),
        "{failures} failed appends while the disk was full"
    );
    assert!(
        c.node(f).log().contains("a direct write failed"),
        "the direct write failed first"
    );

    // Space again: the follower catches up, byte for byte, and rejoins.
    // SAFETY: kill(2) on a child process of ours.
    unsafe { libc::kill(strace.id() as i32, libc::SIGTERM) };
    let _ = strace.wait();
    send_values(&p, "full", sent..sent + 20).await;
    sent += 20;
    c.wait_partition(
        "full",
        0,
        Duration::from_secs(30),
        "the follower rejoins",
        |x| x.isr.len() == 3,
    );
    wait_same_segment(&ours, &theirs, "the follower's segment is the leader's");
    assert!(c.node(f).is_running());
    let values = read_values(&b, "full", 0, sent as usize, WAIT);
    assert_eq!(values, (0..sent).collect::<Vec<_>>());
}

/// Waits until segment `ours` holds what `theirs` holds, byte for byte: nothing half-written
/// was left behind. Past its size a segment written directly may hold the zeros of its last
/// block.
fn wait_same_segment(ours: &std::path::Path, theirs: &std::path::Path, what: &str) {
    wait_for(WAIT, what, || {
        let (a, b) = (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
        (a.len() >= b.len() && a[..b.len()] == b[..] && a[b.len()..].iter().all(|z| *z == 0))
            .then_some(())
    });
}

/// Starts failing every write of `pid` to `file` with ENOSPC, as a full disk would (the
/// page-cache writes of a leader's appends, a follower's direct writes and their fallback).
/// Kill the returned strace to give the space back.
fn fill_disk_for(pid: u32, file: &std::path::Path) -> std::process::Child {
    let strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string(), "-P"])
        .arg(file)
        .args(["-e", "trace=pwrite64,pwritev"])
        .args(["-e", "inject=pwrite64,pwritev:error=ENOSPC"])
        .spawn()
        .expect("strace (the test command installs it)");
    wait_for(WAIT, "strace attached", || {
        all_threads_traced(pid).then_some(())
    });
    strace
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_is_full_hands_over_and_rejoins_once_it_has_space() {
    let mut c = Cluster::start(3, &[]);
    let (before, (acked_count, stop, task)) = under_load(&mut c, "spill", u64::MAX).await;
    let victim = before.leader;
    let segment = |c: &mut Cluster, id: i32| {
        let p = c
            .node(id)
            .data_dir()
            .join("spill-0/00000000000000000000.log");
        std::fs::canonicalize(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let ours = segment(&mut c, victim);
    wait_acked(&c, &acked_count, 2_000, "producer made no progress").await;

    // The leader's disk is full: its appends fail (and are taken back). It hands the partition
    // to an in-sync follower and leaves the ISR; producers go on there.
    let mut strace = fill_disk_for(c.node(victim).pid().expect("running"), &ours);
    let at_fault = acked_count.load(Ordering::Acquire);
    let after = c.wait_partition("spill", 0, WAIT, "another leader", |s| {
        s.leader > 0 && s.leader != victim && !s.isr.contains(&victim)
    });
    assert!(after.leader_epoch > before.leader_epoch, "{after:?}");
    assert_eq!(after.isr.len(), 2, "{after:?}");
    wait_acked(&c, &acked_count, at_fault + 2_000, "writes did not resume").await;
    assert!(
        c.node(victim).log().contains("leadership handed over"),
        "{}",
        c.node(victim).log()
    );
    // Still serving, as a follower that cannot write yet: it says so in its fetches and stays
    // out of the ISR, so that acks=all writes do not wait for it.
    wait_for(WAIT, "the old leader fails to write as a follower", || {
        c.node(victim)
            .log()
            .contains("appending replicated data failed")
            .then_some(())
    });
    let at_follow = acked_count.load(Ordering::Acquire);
    wait_acked(&c, &acked_count, at_follow + 2_000, "writes stopped").await;
    let view = c.view_from(after.leader).expect("metadata");
    let now = view.partition("spill", 0).expect("spill-0");
    assert!(!now.isr.contains(&victim), "{view:?}");
    assert!(c.node(victim).is_running());

    // Space again: it catches up and rejoins the ISR while the producer goes on.
    // SAFETY: kill(2) on a child process of ours.
    unsafe { libc::kill(strace.id() as i32, libc::SIGTERM) };
    let _ = strace.wait();
    rejoin_and_check(
        &mut c,
        "spill",
        (victim, after.leader),
        (&acked_count, &stop, task),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_real_disk_fills_up_loses_nothing_and_catches_up_once_freed() {
    // Each node on a small file system of its own; the leader's is filled up while an
    // idempotent acks=all producer runs. Every file of that node is then out of space: the
    // segment, and maybe the metadata log too, whose failure stops the node (exit status 74,
    // as Kafka halts on a failed log directory) instead of leaving it serving.
    let Some(disks) = (0..3)
        .map(|_| SmallDisk::mount("64m"))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let parents: Vec<_> = disks.iter().map(|d| d.path().to_path_buf()).collect();
    let mut c = Cluster::start_on(3, &[], &parents);
    let (before, (acked_count, stop, task)) = under_load(&mut c, "brim", u64::MAX).await;
    let victim = before.leader;
    wait_acked(&c, &acked_count, 2_000, "producer made no progress").await;

    let disk = &disks[(victim - 1) as usize];
    let filler = disk.fill_leaving(256 << 10);
    let at_fault = acked_count.load(Ordering::Acquire);
    let after = c.wait_partition("brim", 0, WAIT, "another leader", |s| {
        s.leader > 0 && s.leader != victim && !s.isr.contains(&victim)
    });
    assert!(after.leader_epoch > before.leader_epoch, "{after:?}");
    wait_acked(&c, &acked_count, at_fault + 2_000, "writes did not resume").await;
    let stopped = !c.node(victim).is_running();
    if stopped {
        assert_eq!(
            c.node(victim).exit_code(),
            Some(74),
            "{}",
            c.node(victim).log()
        );
    } else {
        let log = c.node(victim).log();
        assert!(log.contains("leadership handed over"), "{log}");
    }
    eprintln!(
        "full disk: the old leader {}",
        ["went on", "stopped"][stopped as usize]
    );

    // Space again (and a restart if it stopped): it catches up and rejoins.
    std::fs::remove_file(&filler).unwrap();
    if stopped {
        c.node(victim).restart();
    }
    rejoin_and_check(
        &mut c,
        "brim",
        (victim, after.leader),
        (&acked_count, &stop, task),
    )
    .await;
}

/// After a full disk: the old leader (`victim`) rejoins the ISR while the producer goes on;
/// then the producer stops and nothing it had acknowledged is lost, and the old leader's log
/// is the new leader's byte for byte (nothing half-written was left behind).
async fn rejoin_and_check(
    c: &mut Cluster,
    topic: &str,
    (victim, leader): (i32, i32),
    (acked_count, stop, task): (&AtomicUsize, &AtomicBool, Producing),
) {
    c.wait_partition(
        topic,
        0,
        Duration::from_secs(60),
        "the old leader rejoins",
        |s| s.isr.len() == 3,
    );
    let at_rejoin = acked_count.load(Ordering::Acquire);
    wait_acked(c, acked_count, at_rejoin + 1_000, "writes stopped").await;
    stop.store(true, Ordering::Release);
    let (acked, failed) = task.await.unwrap();
    eprintln!("acknowledged {}, {failed} failed", acked.len());
    read_back_and_check(&c.bootstrap(), topic, 0, &acked, failed);
    let segment = |c: &mut Cluster, id: i32| {
        let name = format!("{topic}-0/00000000000000000000.log");
        c.node(id).data_dir().join(name)
    };
    let (ours, theirs) = (segment(c, victim), segment(c, leader));
    wait_same_segment(&ours, &theirs, "the old leader's segment is the new one's");
}

/// A running `produce_sequence`.
type Producing = tokio::task::JoinHandle<(Vec<u64>, usize)>;

/// A topic of one partition, RF 3 and min.insync.replicas 2, with a full ISR, and an
/// idempotent acks=all producer writing `total` values into it (`produce_sequence`).
async fn under_load(
    c: &mut Cluster,
    topic: &str,
    total: u64,
) -> (
    PartitionState,
    (Arc<AtomicUsize>, Arc<AtomicBool>, Producing),
) {
    let b = c.bootstrap();
    create_replicated(&b, topic, 1, 3, &[("min.insync.replicas", "2")]).await;
    let before = c.wait_partition(topic, 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });
    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(produce_sequence(
        producer(&b, "all", true),
        topic.into(),
        0,
        total,
        acked_count.clone(),
        stop.clone(),
    ));
    (before, (acked_count, stop, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_one_of_the_last_two_replicas_stops_acks_all_only_until_it_is_freed() {
    // One replica down, min.insync.replicas 2: the leader's disk fills. It hands over and the
    // ISR is below the minimum, so acks=all is refused and no data comes. Once freed, the old
    // leader holds everything and has nothing to write: it must rejoin without a write (and
    // without a restart), or the partition stays closed to acks=all for good.
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "last2", 1, 3, &[("min.insync.replicas", "2")]).await;
    let s = c.wait_partition("last2", 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });
    let all = producer(&b, "all", false);
    send_values(&all, "last2", 0..10).await;
    let (gone, other) = {
        let f: Vec<i32> = s
            .replicas
            .iter()
            .copied()
            .filter(|r| *r != s.leader)
            .collect();
        (f[0], f[1])
    };
    c.node(gone).kill9();
    c.wait_partition("last2", 0, WAIT, "the dead replica leaves the ISR", |x| {
        x.isr.len() == 2 && !x.isr.contains(&gone)
    });

    let path = c
        .node(s.leader)
        .data_dir()
        .join("last2-0/00000000000000000000.log");
    let ours = std::fs::canonicalize(&path).unwrap();
    let mut strace = fill_disk_for(c.node(s.leader).pid().expect("running"), &ours);
    let mut raw = RawClient::connect(c.node(s.leader).addr());
    let (code, _) = produce_raw(&mut raw, "last2", one_record("10"));
    assert_eq!(code, 56, "KAFKA_STORAGE_ERROR from the full disk");
    c.wait_partition("last2", 0, WAIT, "the other replica leads alone", |x| {
        x.leader == other && x.isr == vec![other]
    });
    let mut raw = RawClient::connect(c.node(other).addr());
    let (code, _) = produce_raw(&mut raw, "last2", one_record("10"));
    assert_eq!(
        code, 19,
        "acks=all below min.insync.replicas: NOT_ENOUGH_REPLICAS"
    );

    // SAFETY: kill(2) on a child process of ours.
    unsafe { libc::kill(strace.id() as i32, libc::SIGTERM) };
    let _ = strace.wait();
    c.wait_partition(
        "last2",
        0,
        WAIT,
        "the old leader rejoins with no write",
        |x| x.isr.len() == 2 && x.isr.contains(&s.leader),
    );
    send_values(&all, "last2", 10..20).await;
    let values = read_values(&b, "last2", 0, 20, WAIT);
    assert_eq!(values, (0..20).collect::<Vec<_>>());
}

/// A follower reads each large fetch answer so that its records lie where its direct write can
/// take them from: the write gathers a first block, the whole blocks in place in the answer and
/// a last block (one `pwritev`) instead of copying the answer into an aligned buffer and
/// writing that (`pwrite64`). The replicas end up the same byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_write_large_fetch_answers_from_where_they_received_them() {
    let mut c = Cluster::start(3, &[]);
    let b = c.bootstrap();
    create_replicated(&b, "placed", 1, 3, &[("min.insync.replicas", "2")]).await;
    let s = c.wait_partition("placed", 0, WAIT, "full ISR", |s| {
        s.isr.len() == 3 && s.leader > 0
    });
    let follower = *s.replicas.iter().find(|r| **r != s.leader).unwrap();
    let segment = |c: &mut Cluster, id: i32| {
        let dir = std::fs::canonicalize(c.node(id).data_dir()).unwrap();
        dir.join("placed-0/00000000000000000000.log")
    };
    let (ours, theirs) = (segment(&mut c, follower), segment(&mut c, s.leader));
    let trace = tempfile::NamedTempFile::new().unwrap();
    let pid = c.node(follower).pid().expect("running");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(trace.path())
        .args(["-p", &pid.to_string(), "-P"])
        .arg(&ours)
        .args(["-e", "trace=pwritev,pwrite64"])
        .spawn()
        .expect("strace (the test command installs it)");
    wait_for(WAIT, "strace attached", || {
        all_threads_traced(pid).then_some(())
    });

    // ~30 MiB in batches of up to 1 MB: the follower's fetch answers are large.
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let n = 30_000u64;
    let values: Vec<String> = (0..n).map(|i| format!("{i:01000}")).collect();
    let sends = values.iter().map(|v| {
        p.send(
            FutureRecord::<(), _>::to("placed").payload(v).partition(0),
            Duration::from_secs(60),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e).expect("acknowledged");
    }
    wait_same_segment(&ours, &theirs, "the follower holds what the leader holds");
    let _ = strace.kill();
    let _ = strace.wait();
    let text = std::fs::read_to_string(trace.path()).unwrap();
    let gathered = text
        .lines()
        .filter(|l| l.contains("pwritev(") && l.contains("iov_len=4096}, {"))
        .count();
    let copied = text.lines().filter(|l| l.contains("pwrite64(")).count();
    eprintln!("follower segment writes: {gathered} gathered, {copied} copied");
    assert!(
        gathered > 0 && gathered >= copied,
        "{gathered} writes gathered from the answers, {copied} copied:\n{}",
        &text[..text.len().min(4000)]
    );
    let acked: Vec<u64> = (0..n).collect();
    read_back_and_check(&b, "placed", 0, &acked, 0);
}

/// One fault of the random schedule below.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9` of a node, restarted after the pause.
    Kill(i32),
    /// SIGSTOP of a node (silence with its sockets open), SIGCONT after the pause.
    Pause(i32),
    /// SIGTERM (controlled shutdown), restarted after the pause.
    Terminate(i32),
    /// `kill -9` of two nodes at once: no metadata majority and no ISR of two left until
    /// both are restarted after the pause.
    KillTwo(i32, i32),
    /// One node paused while another is killed; both back after the pause.
    PauseAndKill(i32, i32),
    /// `kill -9` of a node whose disk is then replaced (its data directory emptied: metadata
    /// log and partitions), restarted empty after the pause.
    Wipe(i32),
    /// A node cut off from the two others (controller and replication links; clients reach
    /// every node), healed after the pause.
    Isolate(i32),
    /// The link between two nodes cut, both still linked to the third.
    Cut(i32, i32),
    /// What the first node sends reaches the second, nothing comes back.
    OneWay(i32, i32),
    /// Every fsync of a node delayed (a slow disk), until after the pause.
    SlowDisk(i32),
    /// Every fsync of a node failing (a failed disk): it must stop by itself (exit 74), and
    /// is restarted after the pause.
    DiskFails(i32),
    /// Every connection to a node's Kafka listener dropped, clients' and replica fetchers'
    /// (answers in flight lost, requests retried), every 100 ms during the pause.
    Resets(i32),
    /// Every byte to and from a node's Kafka listener held (clients' and the other nodes'
    /// replica fetchers) while its controller links work: a gray failure the controller does
    /// not see, the node heartbeating and keeping its leaderships.
    Unreachable(i32),
}

/// Picks the next fault: a random node, the active controller or the leader of a random
/// partition as the (first) victim, and another random node.
fn next_fault(rng: &mut impl rand::Rng, c: &mut Cluster, topic: &str, partitions: i32) -> Fault {
    let nodes = c.nodes.len() as i32;
    let view = c.view();
    let controller = view.as_ref().map(|v| v.controller).filter(|id| *id > 0);
    let p = rng.gen_range(0..partitions) as usize;
    let leader = view
        .as_ref()
        .and_then(|v| v.partition(topic, p))
        .map(|s| s.leader)
        .filter(|id| *id > 0);
    let victim = match rng.gen_range(0..3) {
        0 => controller,
        1 => leader,
        _ => None,
    }
    .unwrap_or_else(|| rng.gen_range(1..=nodes));
    let other = (victim - 1 + rng.gen_range(1..nodes)) % nodes + 1;
    match rng.gen_range(0..19) {
        0..=2 => Fault::Kill(victim),
        3..=4 => Fault::Pause(victim),
        5 => Fault::Terminate(victim),
        6 => Fault::KillTwo(victim, other),
        7 => Fault::PauseAndKill(victim, other),
        8 => Fault::Wipe(victim),
        9..=11 => Fault::Isolate(victim),
        12..=13 => Fault::Cut(victim, other),
        14 => Fault::OneWay(victim, other),
        15 => Fault::SlowDisk(victim),
        16 => Fault::DiskFails(victim),
        17 => Fault::Unreachable(victim),
        _ => Fault::Resets(victim),
    }
}

/// A seeded schedule of random faults on a cluster of three voters and a broker-only node (RF 3
/// over the four, min.insync.replicas 2, three partitions) while an idempotent acks=all producer writes to every partition and a consumer
/// reads each one: nodes killed, paused, shut down, two at once, disks replaced, failing or
/// slow; the network between nodes partitioned (a node isolated, one link cut, or one way
/// only) while clients still reach every node; a node's Kafka listener unreachable for clients
/// and the other nodes alike while its controller links work; the controller and partition
/// leaders among the victims. (The active controller's metadata log reaches the broker-only
/// node around the proxies: cut off, it still learns the metadata but cannot heartbeat or
/// fetch.) After most faults the cluster must heal (every partition back to
/// a full ISR, writes acknowledged again) before the next; the others follow at once, while a
/// node catches up or a leader is elected. At the end every acknowledged record is read back, once
/// and in order, every consumer was given only what the log keeps, and after each node in
/// turn is killed the next leaders serve the same logs. `NEMESIS_SEED` repeats a schedule (the
/// seed is printed), `NEMESIS_ROUNDS` lengthens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_lose_nothing_acknowledged_and_the_replicas_agree() {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let rounds: usize = std::env::var("NEMESIS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("NEMESIS_SEED={seed} NEMESIS_ROUNDS={rounds}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    const TOPIC: &str = "nemesis";
    const PARTITIONS: i32 = 3;
    // Followers cut off leave the ISR within the shorter faults.
    let (mut c, net) = Cluster::start_partitionable(3, 1, &["replica.lag.time.max.ms=2000"]).await;
    let nodes = c.nodes.len() as i32;
    let b = c.bootstrap();
    create_replicated(&b, TOPIC, PARTITIONS, 3, &[("min.insync.replicas", "2")]).await;
    let healed = |c: &mut Cluster, what: &str| {
        for p in 0..PARTITIONS as usize {
            let what = format!("{what} (seed {seed})");
            c.wait_partition(TOPIC, p, Duration::from_secs(60), &what, |s| {
                s.leader > 0 && s.isr.len() == 3
            });
        }
    };
    healed(&mut c, "full ISR at the start");
    // The nodes that follow a partition now (their fetchers must go through the proxies), and
    // the broker-only node among the replicas.
    let view = c.view().expect("a view of the cluster");
    let start: Vec<&PartitionState> = (0..PARTITIONS as usize)
        .map(|p| view.partition(TOPIC, p).expect("the partition"))
        .collect();
    let followers: BTreeSet<i32> = start
        .iter()
        .flat_map(|s| s.replicas.iter().copied().filter(|r| *r != s.leader))
        .collect();
    assert!(
        start.iter().any(|s| s.replicas.contains(&nodes)),
        "the broker-only node holds no replica: {start:?}"
    );

    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    let mut producers = Vec::new();
    for p in 0..PARTITIONS {
        let until = Arc::new(AtomicUsize::new(usize::MAX));
        consumers.push((until.clone(), consume_continuously(&b, TOPIC, p, until)));
        producers.push(tokio::spawn(produce_window(
            producer(&b, "all", true),
            TOPIC.into(),
            p,
            u64::MAX,
            50,
            acked_count.clone(),
            stop.clone(),
        )));
    }
    wait_acked(&c, &acked_count, 1_000, "no writes before the faults").await;

    for round in 0..rounds {
        let fault = next_fault(&mut rng, &mut c, TOPIC, PARTITIONS);
        let down_for = Duration::from_millis(rng.gen_range(100..3_000));
        eprintln!("round {round}: {fault:?} for {down_for:?}");
        let mut back = Vec::new();
        let mut tracing = None;
        match fault {
            Fault::Kill(n) => {
                c.node(n).kill9();
                back.push((n, false));
            }
            Fault::Pause(n) => {
                c.node(n).pause();
                back.push((n, true));
            }
            Fault::Terminate(n) => {
                use std::os::unix::process::ExitStatusExt;
                let status = tokio::task::block_in_place(|| c.node(n).terminate_status());
                match status {
                    Some(s) if s.success() => {}
                    // Still starting (listening, not serving yet): no handler, killed.
                    Some(s) if s.signal() == Some(libc::SIGTERM) => {
                        eprintln!("node {n} was still starting: SIGTERM ended it")
                    }
                    other => panic!("node {n} did not shut down: {other:?}\n{}", c.logs()),
                }
                back.push((n, false));
            }
            Fault::KillTwo(a, z) => {
                c.node(a).kill9();
                c.node(z).kill9();
                back.extend([(a, false), (z, false)]);
            }
            Fault::PauseAndKill(a, z) => {
                c.node(a).pause();
                c.node(z).kill9();
                back.extend([(a, true), (z, false)]);
            }
            Fault::Wipe(n) => {
                c.node(n).kill9();
                for entry in std::fs::read_dir(c.node(n).data_dir()).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(&path).unwrap();
                    } else {
                        std::fs::remove_file(&path).unwrap();
                    }
                }
                back.push((n, false));
            }
            Fault::Isolate(n) => {
                for other in (1..=nodes).filter(|o| *o != n) {
                    net.cut(n, other);
                }
            }
            Fault::Cut(a, z) => net.cut(a, z),
            Fault::OneWay(a, z) => net.cut_one_way(a, z),
            Fault::Resets(_) => {}
            Fault::Unreachable(n) => net.kafka[&n].hold(),
            Fault::SlowDisk(n) => {
                let pid = c.node(n).pid().expect("running");
                let delay = Duration::from_millis(rng.gen_range(20..300));
                eprintln!("node {n}: every fsync {delay:?} late");
                tracing = Some(tokio::task::block_in_place(|| slow_fsyncs(pid, delay)));
            }
            Fault::DiskFails(n) => {
                let pid = c.node(n).pid().expect("running");
                let (strace, status) = tokio::task::block_in_place(|| {
                    let strace = fail_fsyncs(pid, &[], None);
                    let node = c.node(n);
                    let status = wait_for(WAIT, "the node with a failed disk to stop", || {
                        node.exit_status()
                    });
                    (strace, status)
                });
                stop_tracing(strace);
                assert_eq!(status.code(), Some(74), "seed {seed}\n{}", c.node(n).log());
                back.push((n, false));
            }
        }
        match fault {
            Fault::Resets(n) => {
                let until = Instant::now() + down_for;
                while Instant::now() < until {
                    net.kafka[&n].cut_all();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            _ => tokio::time::sleep(down_for).await,
        }
        net.heal();
        if let Some(strace) = tracing {
            stop_tracing(strace);
        }
        for (n, paused) in back {
            if paused {
                c.node(n).resume();
            } else {
                c.node(n).restart();
            }
        }
        // Mostly the next fault waits for the cluster to heal; sometimes it comes while a
        // restarted node is still catching up or a new leader is still being elected.
        if rng.gen_bool(0.6) {
            let at = acked_count.load(Ordering::Acquire);
            tokio::task::block_in_place(|| healed(&mut c, &format!("round {round} healed")));
            wait_acked(&c, &acked_count, at + 500, "writes did not resume").await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
        }
    }
    let at = acked_count.load(Ordering::Acquire);
    tokio::task::block_in_place(|| healed(&mut c, "healed after the faults"));
    wait_acked(&c, &acked_count, at + 500, "writes did not resume").await;

    stop.store(true, Ordering::Release);
    let mut logs = Vec::new();
    for (p, task) in producers.into_iter().enumerate() {
        let (acked_at, failed) = task.await.unwrap();
        eprintln!(
            "partition {p}: {} acknowledged, {failed} failed",
            acked_at.len()
        );
        let acked: Vec<u64> = acked_at.iter().map(|(v, _)| *v).collect();
        let values = tokio::task::block_in_place(|| {
            read_values(&b, TOPIC, p as i32, acked.len() + failed, WAIT * 2)
        });
        describe_loss(p, &acked_at, &values);
        check_history(&acked, &values);
        logs.push(values);
    }
    // Each consumer stops once it has its partition's whole log (or 60 s later).
    for ((until, consumer), log) in consumers.into_iter().zip(&logs) {
        until.store(log.len(), Ordering::Release);
        consumer.check(log);
    }

    // The partitions cut replication too: every node's fetcher went through the proxies.
    for &from in &followers {
        let fetcher = Network::fetcher(from);
        let through: u64 = net.kafka.values().map(|p| p.connections_of(&fetcher)).sum();
        assert!(
            through > 0,
            "no connection of {fetcher} through the proxies"
        );
    }

    // Every replica holds the same logs: with each node in turn gone, the others serve them.
    for victim in 1..=nodes {
        c.node(victim).kill9();
        for (p, log) in logs.iter().enumerate() {
            c.wait_partition(TOPIC, p, WAIT, "a leader other than the victim", |s| {
                s.leader > 0 && s.leader != victim
            });
            let again = read_values(&b, TOPIC, p as i32, log.len(), WAIT);
            assert_eq!(
                &again, log,
                "partition {p} without node {victim} (seed {seed})"
            );
        }
        c.node(victim).restart();
        tokio::task::block_in_place(|| healed(&mut c, "the victim rejoins"));
    }
}

/// A voter started while its quorum cannot form (the other voters are not running) waits
/// before it serves; a SIGTERM then stops it at once with a clean exit (it leads nothing
/// yet), not by the signal's default action.
#[test]
fn a_node_waiting_for_its_quorum_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("node.log");
    let controller: Vec<u16> = (0..3).map(|_| strom_tests::free_port()).collect();
    let quorum = (0..3)
        .map(|i| format!("{}@127.0.0.1:{}", i + 1, controller[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut child = std::process::Command::new(strom_tests::strom_bin())
        .arg("server")
        .args(["--node-id", "1", "--controller-quorum", &quorum])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", strom_tests::free_port()))
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(WAIT, "the node to wait for its quorum", || {
        log()
            .contains("initializing the metadata quorum")
            .then_some(())
    });
    // It keeps waiting: no quorum, so it does not serve.
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "{}", log());
    assert!(!log().contains("listening on"), "{}", log());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(10), "the node to stop", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}\n{}", log());
    assert!(
        log().contains("SIGTERM received while starting"),
        "{}",
        log()
    );
}
