//! Retention with real clients: by size and by time whole old segments go and the log start
//! offset moves; a consumer behind it is reset by `auto.offset.reset`; DeleteRecords moves the
//! start on request and the move survives `kill -9`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{create_topic, produce_all, producer, rec};
use kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use strom_tests::{wait_for, RawClient, StromProcess};

fn earliest(c: &mut RawClient, topic: &str) -> i64 {
    let (code, offset) = strom_tests::list_offset(c, topic, 0, -2);
    assert_eq!(code, 0);
    offset
}

fn log_bytes(s: &StromProcess, topic: &str) -> u64 {
    std::fs::read_dir(s.data_dir().join(format!("{topic}-0")))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// The first record a consumer gets when it starts at offset 0 with `auto.offset.reset`.
fn first_offset_from_zero(bootstrap: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "retention-reader")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(0))
        .unwrap();
    c.assign(&tpl).unwrap();
    wait_for(Duration::from_secs(30), "a record", || {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => Some(m.offset()),
            _ => None,
        }
    })
}

const SETS: &[&str] = &["log.retention.check.interval.ms=200"];

#[tokio::test(flavor = "multi_thread")]
async fn retention_bytes_deletes_old_segments_and_consumers_are_reset() {
    let s = StromProcess::start(SETS);
    let b = s.bootstrap();
    create_topic(
        &b,
        "rbytes",
        1,
        &[
            ("segment.bytes", "2048"),
            ("retention.bytes", "8192"),
            ("retention.ms", "-1"),
        ],
    )
    .await;
    let p = producer(&b, &[("linger.ms", "0"), ("batch.num.messages", "1")]);
    let recs: Vec<_> = (0..300).map(|i| rec(i, 100)).collect();
    produce_all(&p, "rbytes", &recs, |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    let start = wait_for(Duration::from_secs(30), "log start to move", || {
        let e = earliest(&mut c, "rbytes");
        (e > 0).then_some(e)
    });
    // Give the checker a few more rounds: the size must settle within Kafka's bounds.
    std::thread::sleep(Duration::from_millis(600));
    let size = log_bytes(&s, "rbytes");
    assert!(size >= 8192, "never below retention.bytes: {size}");
    assert!(
        size < 8192 + 2048 + 400,
        "at most one segment above it: {size}"
    );
    let start = earliest(&mut c, "rbytes").max(start);
    assert!(start > 0 && start < 300);
    // A consumer at offset 0 is behind the log start: auto.offset.reset=earliest applies.
    assert_eq!(first_offset_from_zero(&b, "rbytes"), start);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_ms_deletes_segments_of_old_records_only() {
    let s = StromProcess::start(SETS);
    let b = s.bootstrap();
    create_topic(
        &b,
        "rtime",
        1,
        &[("segment.bytes", "2048"), ("retention.ms", "60000")],
    )
    .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let p = producer(&b, &[("linger.ms", "0"), ("batch.num.messages", "1")]);
    let mut old: Vec<_> = (0..100).map(|i| rec(i, 100)).collect();
    for r in &mut old {
        r.timestamp = now - 3_600_000;
    }
    produce_all(&p, "rtime", &old, |_| 0).await;
    let mut new: Vec<_> = (100..130).map(|i| rec(i, 100)).collect();
    for r in &mut new {
        r.timestamp = now;
    }
    produce_all(&p, "rtime", &new, |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    let start = wait_for(Duration::from_secs(30), "old segments deleted", || {
        let e = earliest(&mut c, "rtime");
        (e > 0).then_some(e)
    });
    std::thread::sleep(Duration::from_millis(600));
    let start = earliest(&mut c, "rtime").max(start);
    // Old records went (all but the segment shared with new ones); every new one is there.
    assert!(start > 50 && start <= 100, "{start}");
    let got = common::consume(
        &b,
        "rtime",
        1,
        130 - start as usize,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 130 - start as usize);
    assert_eq!(got[0].1, start);
    assert!(got.iter().filter(|(_, o, _)| *o >= 100).count() == 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_records_moves_the_log_start_and_survives_kill9() {
    let mut s = StromProcess::start(&[]);
    let b = s.bootstrap();
    create_topic(&b, "drec", 1, &[("segment.bytes", "4096")]).await;
    let p = producer(&b, &[]);
    let recs: Vec<_> = (0..100).map(|i| rec(i, 100)).collect();
    produce_all(&p, "drec", &recs, |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    let delete = |c: &mut RawClient, offset: i64| -> (i16, i64) {
        let req = DeleteRecordsRequest::default()
            .with_timeout_ms(5000)
            .with_topics(vec![DeleteRecordsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("drec")))
                .with_partitions(vec![DeleteRecordsPartition::default()
                    .with_partition_index(0)
                    .with_offset(offset)])]);
        let r: DeleteRecordsResponse = c.call(ApiKey::DeleteRecords, 2, &req);
        let p = &r.topics[0].partitions[0];
        (p.error_code, p.low_watermark)
    };
    assert_eq!(
        delete(&mut c, 101).0,
        1,
        "OFFSET_OUT_OF_RANGE past the high watermark"
    );
    assert_eq!(delete(&mut c, 37), (0, 37));
    assert_eq!(earliest(&mut c, "drec"), 37);
    assert_eq!(delete(&mut c, 10), (0, 37), "never moves back");
    s.kill9();
    s.restart();
    let mut c = RawClient::connect(s.addr());
    assert_eq!(earliest(&mut c, "drec"), 37);
    assert_eq!(first_offset_from_zero(&b, "drec"), 37);
    // -1: everything up to the high watermark.
    assert_eq!(delete(&mut c, -1), (0, 100));
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_config_changes_apply_live_and_survive_restart() {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let mut s = StromProcess::start(SETS);
    let b = s.bootstrap();
    create_topic(&b, "live", 1, &[]).await;
    let p = producer(&b, &[("linger.ms", "0"), ("batch.num.messages", "1")]);
    let recs: Vec<_> = (0..300).map(|i| rec(i, 100)).collect();
    produce_all(&p, "live", &recs[..50], |_| 0).await;
    let admin = common::admin(&b);
    let opts = AdminOptions::new();
    let change = AlterConfig::new(ResourceSpecifier::Topic("live"))
        .set("segment.bytes", "2048")
        .set("retention.bytes", "8192");
    for r in admin.alter_configs(&[change], &opts).await.unwrap() {
        r.unwrap();
    }
    // New segments roll at the new size, and retention applies, without a restart.
    produce_all(&p, "live", &recs[50..], |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    wait_for(
        Duration::from_secs(30),
        "retention after the change",
        || (earliest(&mut c, "live") > 0).then_some(()),
    );
    // An invalid value is refused (INVALID_CONFIG; checked below: nothing changed).
    let bad = AlterConfig::new(ResourceSpecifier::Topic("live")).set("retention.ms", "soon");
    let _ = admin.alter_configs(&[bad], &opts).await.unwrap();
    s.kill9();
    s.restart();
    let admin = common::admin(&b);
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic("live")], &opts)
        .await
        .unwrap();
    let cfg = described[0].as_ref().unwrap();
    let value = |n: &str| {
        cfg.entries
            .iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value("segment.bytes").as_deref(), Some("2048"));
    assert_eq!(value("retention.bytes").as_deref(), Some("8192"));
    assert_eq!(value("retention.ms").as_deref(), Some("604800000"));
}

/// The VALUE SOURCE columns of `name` in `strom config describe` output.
fn line(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
}

fn strom_config(bootstrap: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    strom_tests::strom_cli(bootstrap, &all)
}

#[tokio::test(flavor = "multi_thread")]
async fn strom_config_sets_describes_and_deletes_topic_settings() {
    let mut s = StromProcess::start(&[]);
    let b = s.bootstrap();
    create_topic(&b, "cfgcli", 1, &[]).await;
    let (ok, text) = strom_config(
        &b,
        &[
            "set",
            "--topic",
            "cfgcli",
            "retention.ms=3600000",
            "cleanup.policy=compact,delete",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = strom_config(&b, &["set", "--topic", "cfgcli", "retention.ms=an hour"]);
    assert!(
        !ok && text.contains("InvalidConfig") && text.contains("retention.ms"),
        "{text}"
    );
    s.kill9();
    s.restart();
    let (ok, text) = strom_config(&b, &["describe", "--topic", "cfgcli"]);
    assert!(ok, "{text}");
    assert_eq!(
        line(&text, "retention.ms").as_deref(),
        Some("3600000 dynamic topic")
    );
    assert_eq!(
        line(&text, "cleanup.policy").as_deref(),
        Some("compact,delete dynamic topic")
    );
    let (ok, text) = strom_config(&b, &["delete", "--topic", "cfgcli", "retention.ms"]);
    assert!(ok, "{text}");
    let (_, text) = strom_config(&b, &["describe", "--topic", "cfgcli"]);
    assert_eq!(
        line(&text, "retention.ms").as_deref(),
        Some("604800000 default")
    );
    let (ok, text) = strom_config(&b, &["describe", "--topic", "nope"]);
    assert!(!ok && text.contains("UnknownTopicOrPartition"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamic_broker_defaults_apply_to_topics_live_and_survive_restart() {
    let mut s = StromProcess::start(SETS);
    let b = s.bootstrap();
    create_topic(&b, "dyn", 1, &[]).await;
    let (ok, text) = strom_config(
        &b,
        &[
            "set",
            "--broker",
            "1",
            "log.segment.bytes=2048",
            "log.retention.bytes=8192",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = strom_config(&b, &["set", "--broker", "1", "max.connections=5"]);
    assert!(
        !ok && text.contains("cannot be changed at runtime"),
        "{text}"
    );
    // The topic has no overrides: the new broker defaults apply to it without a restart.
    let p = producer(&b, &[("linger.ms", "0"), ("batch.num.messages", "1")]);
    let recs: Vec<_> = (0..300).map(|i| rec(i, 100)).collect();
    produce_all(&p, "dyn", &recs, |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    wait_for(
        Duration::from_secs(30),
        "retention from the broker default",
        || (earliest(&mut c, "dyn") > 0).then_some(()),
    );
    s.kill9();
    s.restart();
    let (_, text) = strom_config(&b, &["describe", "--broker", "1"]);
    assert_eq!(
        line(&text, "log.retention.bytes").as_deref(),
        Some("8192 dynamic broker")
    );
    let (_, text) = strom_config(&b, &["describe", "--topic", "dyn"]);
    assert_eq!(
        line(&text, "retention.bytes").as_deref(),
        Some("8192 dynamic broker")
    );
    let (ok, _) = strom_config(&b, &["delete", "--broker", "1", "log.retention.bytes"]);
    assert!(ok);
    let (_, text) = strom_config(&b, &["describe", "--topic", "dyn"]);
    assert_eq!(
        line(&text, "retention.bytes").as_deref(),
        Some("-1 default")
    );
}
