//! librdkafka (rdkafka crate) producing and consuming against a real strom process.

mod common;

use std::time::Duration;

use common::*;
use strom_tests::StromProcess;

#[tokio::test(flavor = "multi_thread")]
async fn records_round_trip_exactly_over_three_partitions() {
    let s = StromProcess::start(&[]);
    create_topic(&s.bootstrap(), "rt", 3, &[]).await;
    let recs: Vec<Rec> = (0..200_000).map(|i| rec(i, 40)).collect();
    let p = producer(&s.bootstrap(), &[]);
    let acked = produce_all(&p, "rt", &recs, |i| (i % 3) as i32).await;
    assert_eq!(acked.len(), recs.len());
    let got = consume(
        &s.bootstrap(),
        "rt",
        3,
        recs.len(),
        Duration::from_secs(120),
    );
    check_exact(&recs, &acked, &got);
    // Per partition, production order is consumption order.
    for part in 0..3 {
        let ids: Vec<usize> = got
            .iter()
            .filter(|g| g.0 == part)
            .map(|g| acked[&(g.0, g.1)])
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "partition {part} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_sent_from_the_files_with_sendfile_arrive_exactly() {
    // Every read of 4 KiB or more is sent with sendfile: librdkafka must get exactly what was
    // produced, over fetches that span batch, segment and response boundaries.
    let s = StromProcess::start(&[
        "strom.fetch.sendfile.min.bytes=4096",
        "log.segment.bytes=1048576",
    ]);
    create_topic(&s.bootstrap(), "sf", 2, &[]).await;
    let recs: Vec<Rec> = (0..40_000)
        .map(|i| rec(i, 10 + (i as usize * 37) % 3000))
        .collect();
    let p = producer(&s.bootstrap(), &[]);
    let acked = produce_all(&p, "sf", &recs, |i| (i % 2) as i32).await;
    assert_eq!(acked.len(), recs.len());
    let got = consume(
        &s.bootstrap(),
        "sf",
        2,
        recs.len(),
        Duration::from_secs(120),
    );
    check_exact(&recs, &acked, &got);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_compression_codec_is_stored_and_served() {
    let s = StromProcess::start(&[]);
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        create_topic(&s.bootstrap(), &topic, 1, &[]).await;
        let recs: Vec<Rec> = (0..5_000).map(|i| rec(i, 200)).collect();
        let p = producer(&s.bootstrap(), &[("compression.codec", codec)]);
        let acked = produce_all(&p, &topic, &recs, |_| 0).await;
        let got = consume(
            &s.bootstrap(),
            &topic,
            1,
            recs.len(),
            Duration::from_secs(60),
        );
        check_exact(&recs, &acked, &got);
    }
}

/// The codecs of the batches stored in partition 0 of `topic`, read with a raw Fetch.
fn stored_codecs(s: &StromProcess, topic: &str) -> Vec<strom_proto::compression::Compression> {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let mut c = strom_tests::RawClient::connect(s.addr());
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(64 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(64 << 20)])]);
    let r: FetchResponse = c.call(ApiKey::Fetch, 11, &req);
    let data = r.responses[0].partitions[0]
        .records
        .clone()
        .unwrap_or_default();
    strom_proto::batch::BatchIter::new(&data)
        .map(|b| b.unwrap().0.compression().unwrap())
        .collect()
}

/// `compression.type` other than `producer`: every producer codec is stored in the topic's
/// codec, and every record reads back exactly.
#[tokio::test(flavor = "multi_thread")]
async fn compression_type_recompresses_every_codec() {
    use strom_proto::compression::Compression;
    let s = StromProcess::start(&[]);
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for (target, want) in [
        ("uncompressed", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let topic = format!("ct-{target}");
        create_topic(&s.bootstrap(), &topic, 1, &[("compression.type", target)]).await;
        let recs: Vec<Rec> = (0..200).map(|i| rec(i, 300)).collect();
        let mut acked = std::collections::HashMap::new();
        for (i, codec) in codecs.iter().enumerate() {
            let p = producer(&s.bootstrap(), &[("compression.codec", codec)]);
            let part = &recs[i * 40..(i + 1) * 40];
            for ((p_, o), j) in produce_all(&p, &topic, part, |_| 0).await {
                acked.insert((p_, o), j + i * 40);
            }
        }
        let stored = stored_codecs(&s, &topic);
        assert!(!stored.is_empty());
        assert!(stored.iter().all(|c| *c == want), "{target}: {stored:?}");
        let got = consume(
            &s.bootstrap(),
            &topic,
            1,
            recs.len(),
            Duration::from_secs(30),
        );
        check_exact(&recs, &acked, &got);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_zero_and_one_are_stored() {
    let s = StromProcess::start(&[]);
    for acks in ["0", "1"] {
        let topic = format!("acks-{acks}");
        create_topic(&s.bootstrap(), &topic, 1, &[]).await;
        let recs: Vec<Rec> = (0..2_000).map(|i| rec(i, 10)).collect();
        let p = producer(&s.bootstrap(), &[("acks", acks)]);
        let acked = produce_all(&p, &topic, &recs, |_| 0).await;
        let got = consume(
            &s.bootstrap(),
            &topic,
            1,
            recs.len(),
            Duration::from_secs(60),
        );
        if acks == "1" {
            check_exact(&recs, &acked, &got);
        } else {
            // acks=0: no offsets come back, but every record arrives, in order.
            assert_eq!(got.len(), recs.len());
            for (i, (_, off, r)) in got.iter().enumerate() {
                assert_eq!(*off, i as i64);
                assert_eq!(r, &recs[i]);
            }
        }
    }
}

/// `message.timestamp.before.max.ms` / `after.max.ms`: a CreateTime record too far from the
/// broker's clock is refused with INVALID_TIMESTAMP and not stored.
#[tokio::test(flavor = "multi_thread")]
async fn timestamps_too_far_from_now_are_refused() {
    use rdkafka::producer::FutureRecord;
    use rdkafka::types::RDKafkaErrorCode;
    let s = StromProcess::start(&[]);
    create_topic(
        &s.bootstrap(),
        "tsrange",
        1,
        &[
            ("message.timestamp.before.max.ms", "3600000"),
            ("message.timestamp.after.max.ms", "60000"),
        ],
    )
    .await;
    let p = producer(&s.bootstrap(), &[("retries", "0")]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let send = |ts: i64| {
        p.send(
            FutureRecord::to("tsrange")
                .payload("x")
                .key("k")
                .timestamp(ts),
            Duration::from_secs(10),
        )
    };
    for ts in [now - 2 * 3_600_000, now + 120_000] {
        let err = send(ts).await.unwrap_err().0;
        assert_eq!(
            err.rdkafka_error_code(),
            Some(RDKafkaErrorCode::InvalidTimestamp),
            "{err}"
        );
    }
    let ok = send(now - 1000)
        .await
        .expect("a timestamp in range is stored");
    assert_eq!(ok.offset, 0, "nothing was stored before it");
}
