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
