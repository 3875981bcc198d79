//! Log compaction with real clients: 1M updates over 10k keys on a compacted topic are
//! cleaned down to one record per key, each the latest; readers during cleaning see every
//! key's latest value; `kill -9` in the middle of cleaning leaves a complete log.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::create_topic;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use strom_tests::{wait_for, StromProcess};

const KEYS: u64 = 10_000;
const UPDATES: u64 = 1_000_000;

async fn produce_updates(bootstrap: &str, topic: &str, from: u64, to: u64) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("compression.codec", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for chunk in (from..to).collect::<Vec<_>>().chunks(50_000) {
        let mut futs = Vec::with_capacity(chunk.len());
        for i in chunk {
            let key = format!("k{}", i % KEYS);
            let value = format!("u{i}");
            futs.push(
                p.send_result(FutureRecord::to(topic).key(&key).payload(&value))
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
        for f in futs {
            f.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
}

/// One full read from the start: each key's last value, and how many records there were.
fn read_all(bootstrap: &str, topic: &str) -> (HashMap<String, String>, usize) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "compaction-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut latest = HashMap::new();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                count += 1;
                let k = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
                let v = String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap();
                latest.insert(k, v);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => panic!("consume: {e}"),
            None => {}
        }
    }
    (latest, count)
}

fn expected_latest() -> HashMap<String, String> {
    (UPDATES - KEYS..UPDATES)
        .map(|i| (format!("k{}", i % KEYS), format!("u{i}")))
        .chain(std::iter::once(("sentinel".to_string(), "s".to_string())))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_topic_keeps_the_latest_value_of_every_key() {
    let mut s = StromProcess::start(&["log.cleaner.backoff.ms=200"]);
    let b = s.bootstrap();
    create_topic(
        &b,
        "kv",
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.bytes", "1048576"),
            ("segment.ms", "2000"),
            ("min.cleanable.dirty.ratio", "0.01"),
        ],
    )
    .await;
    let started = Instant::now();
    produce_updates(&b, "kv", 0, UPDATES).await;
    println!("produced {UPDATES} updates in {:?}", started.elapsed());
    // Let the active segment age past segment.ms, then roll it with one more record so that
    // every update lies in a cleanable segment.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    p.send(
        FutureRecord::to("kv").key("sentinel").payload("s"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let want = expected_latest();
    // Readers while the cleaner works: every full read shows every key's latest value.
    for _ in 0..2 {
        let (latest, _) = read_all(&b, "kv");
        assert_eq!(latest, want, "a read during cleaning");
    }
    let cleaned = wait_for(Duration::from_secs(120), "one record per key", || {
        let (latest, count) = read_all(&b, "kv");
        (count == want.len()).then_some(latest)
    });
    assert_eq!(cleaned, want);
    println!(
        "cleaned to {} records after {:?}",
        want.len(),
        started.elapsed()
    );
    assert!(s.log().contains("log cleaned"), "{}", s.log());

    // kill -9 at a random point of a new round of updates and cleaning: the log is complete.
    produce_updates(&b, "kv", UPDATES, UPDATES + 200_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.kill9();
    s.restart();
    let (latest, _) = read_all(&b, "kv");
    let mut want: HashMap<String, String> = want;
    for i in UPDATES + 200_000 - KEYS..UPDATES + 200_000 {
        want.insert(format!("k{}", i % KEYS), format!("u{i}"));
    }
    assert_eq!(latest, want, "after kill -9 during cleaning");
}

/// A tombstone removes its key's older values at once and disappears itself only after
/// `delete.retention.ms`.
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_stay_for_delete_retention_then_go() {
    let s = StromProcess::start(&["log.cleaner.backoff.ms=200"]);
    let b = s.bootstrap();
    create_topic(
        &b,
        "tomb",
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.ms", "1000"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("delete.retention.ms", "15000"),
        ],
    )
    .await;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    let send = |k: &'static str, v: Option<&'static str>| {
        let mut r = FutureRecord::<str, str>::to("tomb").key(k);
        if let Some(v) = v {
            r = r.payload(v);
        }
        p.send(r, Duration::from_secs(10))
    };
    send("a", Some("1")).await.unwrap();
    send("b", Some("2")).await.unwrap();
    send("a", None).await.unwrap();
    // Roll the segment so the cleaner may take it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send("z", Some("roll")).await.unwrap();
    let keys = |b: &str| -> Vec<(String, bool)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", b)
            .set("group.id", "tomb-reader")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("tomb", 0, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        loop {
            match c.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => out.push((
                    String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                    m.payload().is_none(),
                )),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => return out,
                Some(Err(e)) => panic!("{e}"),
            }
        }
    };
    let first = wait_for(Duration::from_secs(10), "a's old value cleaned", || {
        let k = keys(&b);
        (!k.contains(&("a".to_string(), false))).then_some(k)
    });
    assert!(
        first.contains(&("a".to_string(), true)),
        "the tombstone stays: {first:?}"
    );
    assert!(first.contains(&("b".to_string(), false)));
    // Past delete.retention.ms, the next clean (new data makes the log dirty again) drops it.
    tokio::time::sleep(Duration::from_millis(15_000)).await;
    send("y", Some("more")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send("x", Some("roll")).await.unwrap();
    wait_for(Duration::from_secs(30), "the tombstone gone", || {
        let k = keys(&b);
        (!k.iter().any(|(key, _)| key == "a") && k.contains(&("b".to_string(), false)))
            .then_some(())
    });
}
