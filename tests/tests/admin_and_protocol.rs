//! Topic administration, offsets lookups, fetch semantics and fetch sessions, through rdkafka's
//! admin client and, where a client hides the detail, raw requests.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AdminOptions, NewPartitions, ResourceSpecifier};
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use strom_tests::{RawClient, StromProcess};

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn metadata(c: &mut RawClient, topic: &str, auto: bool) -> MetadataResponse {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name(topic)))
        ]))
        .with_allow_auto_topic_creation(auto);
    c.call(ApiKey::Metadata, 9, &req)
}

#[tokio::test(flavor = "multi_thread")]
async fn create_grow_describe_delete_topics() {
    let s = StromProcess::start(&[]);
    let b = s.bootstrap();
    let admin = admin(&b);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));

    // validate_only creates nothing.
    let t = rdkafka::admin::NewTopic::new("vo", 4, rdkafka::admin::TopicReplication::Fixed(1));
    let r = admin
        .create_topics([&t], &AdminOptions::new().validate_only(true))
        .await
        .unwrap();
    assert!(r[0].is_ok());
    let mut c = RawClient::connect(s.addr());
    assert_eq!(
        metadata(&mut c, "vo", false).topics[0].error_code,
        3,
        "validate_only created the topic"
    );

    create_topic(
        &b,
        "admin-t",
        1,
        &[
            ("segment.bytes", "1048576"),
            ("message.timestamp.type", "LogAppendTime"),
        ],
    )
    .await;
    // Again: TOPIC_ALREADY_EXISTS.
    let t = rdkafka::admin::NewTopic::new("admin-t", 1, rdkafka::admin::TopicReplication::Fixed(1));
    let r = admin.create_topics([&t], &opts).await.unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().1,
        rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
    );
    // Unknown config and bad value: INVALID_CONFIG.
    for (k, v) in [("no.such.config", "1"), ("segment.bytes", "abc")] {
        let t =
            rdkafka::admin::NewTopic::new("bad-cfg", 1, rdkafka::admin::TopicReplication::Fixed(1))
                .set(k, v);
        let r = admin.create_topics([&t], &opts).await.unwrap();
        assert_eq!(
            r[0].as_ref().unwrap_err().1,
            rdkafka::types::RDKafkaErrorCode::InvalidConfig,
            "{k}={v}"
        );
    }
    // Replication factor above the broker count.
    let t = rdkafka::admin::NewTopic::new("rf3", 1, rdkafka::admin::TopicReplication::Fixed(3));
    let r = admin.create_topics([&t], &opts).await.unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().1,
        rdkafka::types::RDKafkaErrorCode::InvalidReplicationFactor
    );

    // Describe: the override with its source, a default with its source.
    let d = admin
        .describe_configs([&ResourceSpecifier::Topic("admin-t")], &opts)
        .await
        .unwrap();
    let cfg = d[0].as_ref().unwrap();
    let seg = cfg.get("segment.bytes").unwrap();
    assert_eq!(seg.value.as_deref(), Some("1048576"));
    assert_eq!(seg.source, rdkafka::admin::ConfigSource::DynamicTopic);
    let mmb = cfg.get("max.message.bytes").unwrap();
    assert_eq!(mmb.value.as_deref(), Some("1048588"));
    assert_eq!(mmb.source, rdkafka::admin::ConfigSource::Default);
    let d = admin
        .describe_configs([&ResourceSpecifier::Broker(1)], &opts)
        .await
        .unwrap();
    assert!(d[0].as_ref().unwrap().get("num.partitions").is_some());

    // LogAppendTime from the topic config: the broker's clock, not the producer's.
    let p = producer(&b, &[]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    p.send(
        FutureRecord::to("admin-t")
            .payload("x")
            .key("k")
            .timestamp(1000),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let got = consume(&b, "admin-t", 1, 1, Duration::from_secs(10));
    assert!(
        got[0].2.timestamp >= before,
        "LogAppendTime applied: {}",
        got[0].2.timestamp
    );

    // Grow 1 -> 3, then produce to the new partition 2; shrinking is refused.
    let r = admin
        .create_partitions([&NewPartitions::new("admin-t", 3)], &opts)
        .await
        .unwrap();
    assert!(r[0].is_ok(), "{r:?}");
    let p = producer(&b, &[]);
    let d = p
        .send(
            FutureRecord::to("admin-t")
                .payload("p2")
                .key("k")
                .partition(2),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!((d.partition, d.offset), (2, 0));
    let r = admin
        .create_partitions([&NewPartitions::new("admin-t", 2)], &opts)
        .await
        .unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().1,
        rdkafka::types::RDKafkaErrorCode::InvalidPartitions
    );

    // Delete: gone from metadata, and its directory is removed.
    let r = admin.delete_topics(&["admin-t"], &opts).await.unwrap();
    assert!(r[0].is_ok());
    assert_eq!(metadata(&mut c, "admin-t", false).topics[0].error_code, 3);
    assert!(!s.data_dir().join("admin-t-0").exists());
    let r = admin.delete_topics(&["admin-t"], &opts).await.unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().1,
        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_create_and_invalid_names() {
    let s = StromProcess::start(&["num.partitions=2"]);
    let mut c = RawClient::connect(s.addr());
    let m = metadata(&mut c, "auto-created", true);
    assert_eq!(m.topics[0].error_code, 0);
    assert_eq!(m.topics[0].partitions.len(), 2, "num.partitions");
    assert!(
        m.topics[0].partitions.iter().all(|p| p.leader_id.0 == 1),
        "leader present at once"
    );
    // The client may forbid it (allow_auto_topic_creation=false).
    assert_eq!(
        metadata(&mut c, "not-created", false).topics[0].error_code,
        3
    );
    let long = "x".repeat(250);
    for bad in ["bad/name", ".", "..", long.as_str(), "sp ace"] {
        assert_eq!(
            metadata(&mut c, bad, true).topics[0].error_code,
            17,
            "{bad}"
        );
        let req = CreateTopicsRequest::default()
            .with_topics(vec![CreatableTopic::default()
                .with_name(name(bad))
                .with_num_partitions(1)
                .with_replication_factor(1)])
            .with_timeout_ms(5000);
        let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, 5, &req);
        assert_eq!(r.topics[0].error_code, 17, "{bad}");
    }
    // librdkafka producing to a new topic creates it.
    let p = producer(&s.bootstrap(), &[]);
    let d = p
        .send(
            FutureRecord::to("by-producer").payload("x").key("k"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(d.offset, 0);

    let off = StromProcess::start(&["auto.create.topics.enable=false"]);
    let mut c = RawClient::connect(off.addr());
    assert_eq!(
        metadata(&mut c, "nope", true).topics[0].error_code,
        3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
    let cluster: DescribeClusterResponse = c.call(
        ApiKey::DescribeCluster,
        0,
        &DescribeClusterRequest::default(),
    );
    assert_eq!(cluster.brokers.len(), 1);
    assert!(!cluster.cluster_id.is_empty());
}

fn list_offset(c: &mut RawClient, topic: &str, ts: i64) -> (i16, i64, i64) {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(name(topic))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(ts)])]);
    let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, 7, &req);
    let p = &r.topics[0].partitions[0];
    (p.error_code, p.offset, p.timestamp)
}

#[tokio::test(flavor = "multi_thread")]
async fn list_offsets_and_consume_from_a_timestamp() {
    let s = StromProcess::start(&[]);
    let b = s.bootstrap();
    create_topic(&b, "lo", 1, &[]).await;
    let recs: Vec<Rec> = (0..100).map(|i| rec(i, 5)).collect();
    produce_all(&producer(&b, &[("linger.ms", "0")]), "lo", &recs, |_| 0).await;
    let mut c = RawClient::connect(s.addr());
    assert_eq!(list_offset(&mut c, "lo", -2).1, 0);
    assert_eq!(list_offset(&mut c, "lo", -1).1, 100);
    let base = recs[0].timestamp;
    assert_eq!(list_offset(&mut c, "lo", base + 42), (0, 42, base + 42));
    assert_eq!(
        list_offset(&mut c, "lo", -3),
        (0, 99, base + 99),
        "max timestamp (KIP-734)"
    );
    assert_eq!(
        list_offset(&mut c, "lo", base + 1000).1,
        -1,
        "no record that late"
    );

    // librdkafka: offsets_for_times, then consume from there.
    let consumer = consumer(&b);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("lo", 0, Offset::Offset(base + 60))
        .unwrap();
    let found = consumer
        .offsets_for_times(tpl, Duration::from_secs(10))
        .unwrap();
    let off = found.find_partition("lo", 0).unwrap().offset();
    assert_eq!(off, Offset::Offset(60));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("lo", 0, off).unwrap();
    consumer.assign(&tpl).unwrap();
    let m = wait_msg(&consumer);
    assert_eq!(m.0, 60);
    assert_eq!(m.1, recs[60].value);
    let (lo, hi) = consumer
        .fetch_watermarks("lo", 0, Duration::from_secs(5))
        .unwrap();
    assert_eq!((lo, hi), (0, 100));
}

fn wait_msg(c: &rdkafka::consumer::BaseConsumer) -> (i64, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no message");
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            return (m.offset(), m.payload().unwrap_or_default().to_vec());
        }
    }
}

fn fetch_req(
    topic: &str,
    offset: i64,
    session_id: i32,
    epoch: i32,
    max_wait_ms: i32,
) -> FetchRequest {
    let mut parts = vec![];
    if offset >= 0 {
        parts.push(
            FetchTopic::default()
                .with_topic(name(topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(1 << 20)]),
        );
    }
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_id(session_id)
        .with_session_epoch(epoch)
        .with_topics(parts)
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_long_poll_out_of_range_and_sessions() {
    let s = StromProcess::start(&[]);
    let b = s.bootstrap();
    create_topic(&b, "f", 1, &[]).await;
    let p = producer(&b, &[("linger.ms", "0")]);
    p.send(
        FutureRecord::to("f").payload("first").key("k"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    // Beyond the log end: OFFSET_OUT_OF_RANGE.
    let mut c = RawClient::connect(s.addr());
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", 101, 0, -1, 0));
    assert_eq!(r.responses[0].partitions[0].error_code, 1);

    // Long poll: a consumer waiting at the end gets a record produced later.
    let consumer = consumer(&b);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("f", 0, Offset::Offset(1)).unwrap();
    consumer.assign(&tpl).unwrap();
    assert!(consumer.poll(Duration::from_millis(500)).is_none());
    p.send(
        FutureRecord::to("f").payload("later").key("k"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(wait_msg(&consumer), (1, b"later".to_vec()));

    // A raw long poll waits for max_wait_ms when nothing arrives (bounded check, not timing).
    let t0 = Instant::now();
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", 2, 0, -1, 300));
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    assert!(r.responses[0].partitions[0]
        .records
        .as_ref()
        .is_none_or(|r| r.is_empty()));

    // KIP-227: open a session (epoch 0), then incremental fetches.
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", 2, 0, 0, 0));
    assert_eq!(r.error_code, 0);
    let sid = r.session_id;
    assert!(sid > 0, "session created");
    assert_eq!(r.responses[0].partitions[0].high_watermark, 2);
    // Nothing changed: the incremental response omits the partition.
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", -1, sid, 1, 0));
    assert_eq!(r.error_code, 0);
    assert!(
        r.responses.is_empty(),
        "unchanged partitions are omitted: {r:?}"
    );
    // New data: the partition (which the session remembers at offset 2) comes back with it.
    p.send(
        FutureRecord::to("f").payload("third").key("k"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", -1, sid, 2, 1000));
    assert_eq!(r.responses.len(), 1);
    assert_eq!(r.responses[0].partitions[0].high_watermark, 3);
    assert!(r.responses[0].partitions[0]
        .records
        .as_ref()
        .is_some_and(|r| !r.is_empty()));
    // Wrong epoch and unknown session.
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", -1, sid, 7, 0));
    assert_eq!(r.error_code, 71, "INVALID_FETCH_SESSION_EPOCH");
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &fetch_req("f", -1, sid + 1000, 1, 0));
    assert_eq!(r.error_code, 70, "FETCH_SESSION_ID_NOT_FOUND");
    // Topic ids (v13+): unknown id is UNKNOWN_TOPIC_ID.
    let mut req = fetch_req("", 0, 0, -1, 0);
    req.topics = vec![FetchTopic::default()
        .with_topic_id(uuid_like(7))
        .with_partitions(vec![FetchPartition::default()
            .with_partition(0)
            .with_partition_max_bytes(1000)])];
    let r: FetchResponse = c.call(ApiKey::Fetch, 13, &req);
    assert_eq!(r.responses[0].partitions[0].error_code, 100);
}

fn uuid_like(b: u8) -> uuid::Uuid {
    uuid::Uuid::from_bytes([b; 16])
}

/// `--worker-threads` sizes the runtime that serves requests (for nodes that share a machine);
/// without it there is one worker per core. A one-worker node serves clients as any other.
#[tokio::test(flavor = "multi_thread")]
async fn worker_threads_size_the_request_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let one = StromProcess::start_with(
        tmp.path().to_path_buf(),
        Some(tmp),
        None,
        &[],
        &["--worker-threads", "1"],
    );
    let logged = |p: &StromProcess, want: String| {
        strom_tests::wait_for(Duration::from_secs(10), &want, || {
            p.log().contains(&want).then_some(())
        })
    };
    logged(&one, "workers=1".into());
    let mut c = RawClient::connect(one.addr());
    let md = metadata(&mut c, "one-worker", true);
    assert_eq!(md.topics[0].error_code, 0, "{md:?}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let default = StromProcess::start(&[]);
    logged(&default, format!("workers={cores}"));
}
