//! Shared helpers for the rdkafka-based tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let res = admin(bootstrap)
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in res {
        r.unwrap_or_else(|(n, e)| panic!("create {n}: {e:?}"));
    }
}

pub fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().unwrap()
}

/// What a test produced, to compare with what it reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: i64,
}

pub fn rec(i: u64, value_bytes: usize) -> Rec {
    let mut value = format!("value-{i}-").into_bytes();
    value.resize(value_bytes.max(value.len()), b'a' + (i % 26) as u8);
    Rec {
        key: format!("key-{i}").into_bytes(),
        value,
        headers: vec![
            ("id".into(), i.to_string().into_bytes()),
            ("id".into(), b"dup-key".to_vec()),
        ],
        timestamp: 1_700_000_000_000 + i as i64,
    }
}

/// Produces `recs` to `partition_of(i)`; returns (partition, offset) -> record index.
pub async fn produce_all(
    p: &FutureProducer,
    topic: &str,
    recs: &[Rec],
    partition_of: impl Fn(usize) -> i32,
) -> HashMap<(i32, i64), usize> {
    let mut acked = HashMap::new();
    for chunk_start in (0..recs.len()).step_by(10_000) {
        let end = (chunk_start + 10_000).min(recs.len());
        let mut futs = Vec::with_capacity(end - chunk_start);
        for (i, r) in recs.iter().enumerate().take(end).skip(chunk_start) {
            let mut h = OwnedHeaders::new();
            for (k, v) in &r.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let fr = FutureRecord::to(topic)
                .key(&r.key)
                .payload(&r.value)
                .headers(h)
                .timestamp(r.timestamp)
                .partition(partition_of(i));
            futs.push((i, p.send_result(fr).map_err(|(e, _)| e).expect("enqueue")));
        }
        for (i, f) in futs {
            let d = f
                .await
                .expect("delivery future")
                .map_err(|(e, _)| e)
                .expect("delivery");
            let (part, off) = (d.partition, d.offset);
            if off < 0 {
                // acks=0: librdkafka reports no offset (OFFSET_INVALID) for an unanswered produce.
                continue;
            }
            assert!(
                acked.insert((part, off), i).is_none(),
                "offset {part}/{off} acknowledged twice"
            );
        }
    }
    acked
}

pub fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "unused-assign-only")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap()
}

/// Reads `count` records from the start of each partition (by assign, no group).
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    count: usize,
    timeout: Duration,
) -> Vec<(i32, i64, Rec)> {
    let c = consumer(bootstrap);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::with_capacity(count);
    let deadline = Instant::now() + timeout;
    while out.len() < count && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.expect("consume error");
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.partition(),
                m.offset(),
                Rec {
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp: m.timestamp().to_millis().unwrap_or(-1),
                },
            ));
        }
    }
    out
}

/// Checks that what was read is exactly what was acknowledged: each partition contiguous from
/// 0, every acknowledged record at its offset, nothing else.
pub fn check_exact(recs: &[Rec], acked: &HashMap<(i32, i64), usize>, got: &[(i32, i64, Rec)]) {
    assert_eq!(
        got.len(),
        acked.len(),
        "read {} records, {} were acknowledged",
        got.len(),
        acked.len()
    );
    let mut next: HashMap<i32, i64> = HashMap::new();
    for (p, off, r) in got {
        let expected_off = next.entry(*p).or_insert(0);
        assert_eq!(
            *off, *expected_off,
            "partition {p}: offsets must be contiguous and in order"
        );
        *expected_off += 1;
        let i = acked
            .get(&(*p, *off))
            .unwrap_or_else(|| panic!("{p}/{off} was never acknowledged"));
        assert_eq!(r, &recs[*i], "record at {p}/{off}");
    }
}
