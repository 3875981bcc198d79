//! Failover benchmark: a 3-node cluster on loopback, a topic with replication factor 3 and
//! min.insync.replicas 2, an idempotent acks=all producer writing continuously; the leader of
//! partition 0 is killed with SIGKILL `--kills` times (restarted and caught up in between), and
//! each time the gap between the kill and the next acknowledged write is measured (one write in
//! flight at a time, so an acknowledgement is timed as it arrives).
//!
//! With `--controller`, every kill hits a node that is both the partition's leader and the
//! active controller (until they coincide, the controller and the leader are killed and
//! restarted in turn, unmeasured, so that the quorum and the partition elect other leaders).
//!
//! With `--pause`, the leader is stopped with SIGSTOP instead (a silent failure: a frozen
//! machine, a pulled cable — no closed connection tells anyone) and resumed with SIGCONT after
//! the measurement. Besides the gap to the next acknowledgement, the time until a surviving
//! node's Metadata names another leader is printed: the cluster's part, without the client's
//! `socket.timeout.ms` (set to 1 s here) on the request stuck at the stopped node.
//!
//!   cargo run --release -p strom-tests --bin failover-bench -- --kills 20 [--controller] [--pause]

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use strom_tests::cluster::Cluster;

fn now_us(start: Instant) -> i64 {
    start.elapsed().as_micros() as i64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut kills = 20;
    let mut with_controller = false;
    let mut pause = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--kills" {
            kills = args.next().and_then(|v| v.parse().ok()).expect("--kills N");
        } else if a == "--controller" {
            with_controller = true;
        } else if a == "--pause" {
            pause = true;
        } else {
            eprintln!("usage: failover-bench [--kills N] [--controller] [--pause]");
            std::process::exit(2);
        }
    }
    // Leaderships move only because of what the bench does (no preferred-leader elections
    // between rounds moving the leader it is about to stop).
    let mut c = Cluster::start(3, &["auto.leader.rebalance.enable=false"]);
    let b = c.bootstrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    let topic =
        NewTopic::new("failover", 1, TopicReplication::Fixed(3)).set("min.insync.replicas", "2");
    for r in admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    c.wait_partition("failover", 0, Duration::from_secs(30), "full ISR", |s| {
        s.isr.len() == 3
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "60000")
        .set("retry.backoff.ms", "20")
        .set("retry.backoff.max.ms", "100")
        .set("topic.metadata.refresh.interval.ms", "200")
        // librdkafka doubles its reconnect backoff with every failed connection, up to 10 s by
        // default; the nodes this bench kills and restarts over and over would otherwise be
        // measured by that backoff rather than by the cluster's failover.
        .set("reconnect.backoff.max.ms", "1000")
        // A request to a stopped broker is never answered: librdkafka drops the connection
        // (and retries elsewhere) after socket.timeout.ms, 60 s by default.
        .set("socket.timeout.ms", if pause { "1000" } else { "60000" })
        .create()
        .unwrap();
    let start = Instant::now();
    let last_ack = Arc::new(AtomicI64::new(0));
    let last_ack_sent = Arc::new(AtomicI64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    {
        let (last_ack, last_ack_sent, acked) =
            (last_ack.clone(), last_ack_sent.clone(), acked.clone());
        tokio::spawn(async move {
            // One write in flight at a time, so an acknowledgement is timed when it arrives.
            let mut i = 0u64;
            loop {
                i += 1;
                let v = i.to_string();
                let sent = now_us(start);
                let f = producer
                    .send_result(
                        FutureRecord::<(), _>::to("failover")
                            .payload(&v)
                            .partition(0),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap();
                if let Ok(Ok(_)) = f.await {
                    // Timed by the writes sent since the kill: the one in flight may have been
                    // answered just before it and its acknowledgement read just after.
                    last_ack.store(now_us(start), Ordering::Release);
                    last_ack_sent.store(sent, Ordering::Release);
                    acked.fetch_add(1, Ordering::AcqRel);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    let mut gaps_ms = Vec::new();
    let mut elected_all = Vec::new();
    for k in 0..kills {
        let mut attempt = 0;
        let (victim, controller) = loop {
            c.wait_partition("failover", 0, Duration::from_secs(60), "full ISR", |s| {
                s.isr.len() == 3 && s.leader > 0
            });
            c.wait_brokers(3, Duration::from_secs(60));
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Every node must name the same controller and leader: a node resumed or restarted
            // in the previous round may still be catching up, its view stale.
            let views: Vec<_> = (1..=3)
                .map(|n| {
                    c.view_from(n).and_then(|v| {
                        let s = v.partition("failover", 0)?.clone();
                        Some((v.controller, s))
                    })
                })
                .collect();
            let Some((controller, s)) = views[0].clone() else {
                continue;
            };
            if views.iter().any(|v| *v != views[0]) || s.isr.len() != 3 || s.leader <= 0 {
                continue;
            }
            if !with_controller || controller == s.leader || controller < 0 {
                break (s.leader, controller);
            }
            // Bring the two together. The voters that survive a controller's death elect in
            // order of node id: when the leader has the lowest id of the others, restarting
            // the controller makes it the controller; otherwise restarting the leader moves
            // leadership, and the next round decides again.
            attempt += 1;
            assert!(
                attempt <= 40,
                "the leader never became the active controller"
            );
            let leader_is_next = (1..=3)
                .filter(|n| *n != controller)
                .min()
                .is_some_and(|n| n == s.leader);
            let restart = if leader_is_next { controller } else { s.leader };
            c.node(restart).kill9();
            if restart == controller {
                // Restarted at once, the old controller could win the election again.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline
                    && c.view().map(|v| v.controller).unwrap_or(-1) == controller
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            c.node(restart).restart();
        };
        let killed = now_us(start);
        if pause {
            c.node(victim).pause();
        } else {
            c.node(victim).kill9();
        }
        let mut elected_ms = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while last_ack_sent.load(Ordering::Acquire) < killed && Instant::now() < deadline {
            if elected_ms.is_none() {
                // A view from a surviving node (the kit skips the stopped one).
                let s = c.view().and_then(|v| v.partition("failover", 0).cloned());
                if s.is_some_and(|s| s.leader > 0 && s.leader != victim) {
                    elected_ms = Some((now_us(start) - killed) as f64 / 1000.0);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gap = (last_ack.load(Ordering::Acquire) - killed) as f64 / 1000.0;
        let role = if victim == controller {
            "leader and active controller"
        } else {
            "leader"
        };
        let how = if pause { "stop" } else { "kill" };
        let elected = elected_ms.map_or(String::new(), |e| {
            format!(" (a new leader in Metadata after {e:.0} ms)")
        });
        eprintln!(
            "{how} {}: node {victim} ({role}), writes resumed after {gap:.1} ms{elected}",
            k + 1
        );
        gaps_ms.push(gap);
        if let Some(e) = elected_ms {
            elected_all.push(e);
        }
        if gap > 2000.0 {
            // Over the target: show what the surviving nodes logged since the kill.
            for n in (1..=3).filter(|n| *n != victim) {
                let log = c.node(n).log();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("  node {n}, last lines:");
                for l in tail.iter().rev() {
                    eprintln!("    {l}");
                }
            }
        }
        if pause {
            c.node(victim).resume();
        } else {
            c.node(victim).restart();
        }
    }
    let what = if pause { "stops" } else { "kills" };
    println!(
        "failover over {} leader {what}: {} ({} writes acknowledged)",
        gaps_ms.len(),
        summary(&mut gaps_ms),
        acked.load(Ordering::Acquire)
    );
    if pause {
        println!(
            "a new leader in Metadata over {} leader {what}: {}",
            elected_all.len(),
            summary(&mut elected_all)
        );
    }
}

/// min, p50, p90 and max of `v` (in ms).
fn summary(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "min {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        pct(0.0),
        pct(0.5),
        pct(0.9),
        pct(1.0)
    )
}
