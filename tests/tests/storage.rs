//! Storage behaviour seen through the wire: segment rolling and recovery across restarts,
//! lazy flushing, and KIP-74 fetch sizing.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use strom_proto::batch::BatchIter;
use strom_proto::compression::Compression;
use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};
use strom_tests::{produce_raw, produce_raw_to, RawClient, StromProcess};

fn segment_files(dir: &std::path::Path, ext: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(ext))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_roll_and_survive_unclean_and_clean_restarts() {
    let mut s = StromProcess::start(&[]);
    create_topic(
        &s.bootstrap(),
        "roll",
        1,
        &[("segment.bytes", "16384"), ("index.interval.bytes", "1024")],
    )
    .await;
    let recs: Vec<Rec> = (0..3000).map(|i| rec(i, 50)).collect();
    let acked = produce_all(
        &producer(
            &s.bootstrap(),
            &[("linger.ms", "0"), ("batch.size", "4096")],
        ),
        "roll",
        &recs,
        |_| 0,
    )
    .await;
    let dir = s.data_dir().join("roll-0");
    let logs = segment_files(&dir, ".log");
    assert!(logs >= 5, "segments rolled at segment.bytes: {logs}");
    assert!(
        segment_files(&dir, ".index") >= logs - 1,
        "rolled segments have their index files"
    );
    s.kill9();
    s.restart();
    check_exact(
        &recs,
        &acked,
        &consume(
            &s.bootstrap(),
            "roll",
            1,
            recs.len(),
            Duration::from_secs(60),
        ),
    );
    assert!(s.terminate());
    s.restart();
    check_exact(
        &recs,
        &acked,
        &consume(
            &s.bootstrap(),
            "roll",
            1,
            recs.len(),
            Duration::from_secs(60),
        ),
    );
    // Offsets continue after the last segment.
    let mut c = RawClient::connect(s.addr());
    let b = encode_batch(
        &[NewRecord {
            value: Some(b"x".to_vec()),
            timestamp: 1,
            ..Default::default()
        }],
        Compression::None,
        ProducerInfo::default(),
    )
    .unwrap();
    assert_eq!(produce_raw(&mut c, "roll", Bytes::from(b)), (0, 3000));
}

#[tokio::test(flavor = "multi_thread")]
async fn lazy_flushing_acknowledges_and_serves() {
    let s = StromProcess::start(&[
        "log.flush.interval.messages=10000",
        "log.flush.interval.ms=200",
    ]);
    create_topic(&s.bootstrap(), "lazy", 2, &[]).await;
    let recs: Vec<Rec> = (0..5000).map(|i| rec(i, 20)).collect();
    let acked = produce_all(&producer(&s.bootstrap(), &[]), "lazy", &recs, |i| {
        (i % 2) as i32
    })
    .await;
    check_exact(
        &recs,
        &acked,
        &consume(
            &s.bootstrap(),
            "lazy",
            2,
            recs.len(),
            Duration::from_secs(60),
        ),
    );
    // A topic can opt back into fsync-before-ack.
    create_topic(&s.bootstrap(), "strict", 1, &[("flush.messages", "1")]).await;
    let acked = produce_all(
        &producer(&s.bootstrap(), &[]),
        "strict",
        &recs[..100],
        |_| 0,
    )
    .await;
    check_exact(
        &recs[..100],
        &acked,
        &consume(&s.bootstrap(), "strict", 1, 100, Duration::from_secs(30)),
    );
}

fn fetch(
    c: &mut RawClient,
    topics: &[(&str, i32)],
    max_bytes: i32,
    partition_max_bytes: i32,
) -> FetchResponse {
    let topics = topics
        .iter()
        .map(|(t, parts)| {
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                .with_partitions(
                    (0..*parts)
                        .map(|p| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(0)
                                .with_partition_max_bytes(partition_max_bytes)
                        })
                        .collect(),
                )
        })
        .collect();
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(max_bytes)
        .with_session_epoch(-1)
        .with_topics(topics);
    c.call(ApiKey::Fetch, 11, &req)
}

fn batches(r: &Option<Bytes>) -> usize {
    r.as_ref().map(|b| BatchIter::new(b).count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_sizing_follows_kip_74() {
    let s = StromProcess::start(&[]);
    create_topic(&s.bootstrap(), "big", 2, &[]).await;
    let mut c = RawClient::connect(s.addr());
    // Two 20 KB batches in each partition.
    for p in 0..2 {
        for _ in 0..2 {
            let b = encode_batch(
                &[NewRecord {
                    value: Some(vec![b'z'; 20_000]),
                    timestamp: 1,
                    ..Default::default()
                }],
                Compression::None,
                ProducerInfo::default(),
            )
            .unwrap();
            assert_eq!(produce_raw_to(&mut c, "big", p, Bytes::from(b)).0, 0);
        }
    }
    // Limits far below one batch: exactly one whole batch, from the first partition only.
    let r = fetch(&mut c, &[("big", 2)], 100, 100);
    let parts = &r.responses[0].partitions;
    assert_eq!(
        batches(&parts[0].records),
        1,
        "first batch returned although larger than the limits"
    );
    assert_eq!(
        batches(&parts[1].records),
        0,
        "no oversize batch once the response is non-empty"
    );
    // partition_max_bytes bounds each partition; max_bytes the whole response.
    let r = fetch(&mut c, &[("big", 2)], 10 << 20, 30_000);
    let parts = &r.responses[0].partitions;
    assert_eq!(
        (batches(&parts[0].records), batches(&parts[1].records)),
        (1, 1)
    );
    let r = fetch(&mut c, &[("big", 2)], 10 << 20, 1 << 20);
    let parts = &r.responses[0].partitions;
    assert_eq!(
        (batches(&parts[0].records), batches(&parts[1].records)),
        (2, 2)
    );
    let r = fetch(&mut c, &[("big", 2)], 50_000, 1 << 20);
    let total: usize = r.responses[0]
        .partitions
        .iter()
        .map(|p| batches(&p.records))
        .sum();
    assert_eq!(total, 2, "max_bytes 50 KB holds two 20 KB batches");
}
