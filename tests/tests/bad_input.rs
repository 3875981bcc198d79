//! Hostile and broken input: every case gets the Kafka error a client expects or a closed
//! connection, and the broker keeps serving everyone else.

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;
use rdkafka::producer::FutureRecord;
use strom_proto::compression::Compression;
use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};
use strom_tests::{
    produce_raw, raw_flexible_request, raw_request, RawClient, SmallDisk, StromProcess,
};

/// A normal client still gets served: metadata and a produce round trip.
async fn still_serving(s: &StromProcess) {
    let p = producer(&s.bootstrap(), &[("message.timeout.ms", "10000")]);
    let d = p
        .send(
            FutureRecord::to("health").payload("ok").key("k"),
            Duration::from_secs(10),
        )
        .await
        .expect("a normal client is still served");
    assert!(d.offset >= 0);
}

fn expect_closed(s: &StromProcess, frame: &[u8], what: &str) {
    let mut c = RawClient::connect(s.addr());
    let _ = c.stream.write_all(frame);
    assert!(c.is_closed_by_peer(), "{what}: connection should be closed");
}

fn i32_count(n: i32) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_close_only_their_connection() {
    let mut s = StromProcess::start(&[]);
    still_serving(&s).await;
    // Size fields above socket.request.max.bytes, or negative: closed before allocation.
    expect_closed(&s, &0x7fff_ffffi32.to_be_bytes(), "huge size");
    expect_closed(&s, &(-5i32).to_be_bytes(), "negative size");
    expect_closed(&s, &104_857_601i32.to_be_bytes(), "one past the limit");
    // Unknown API key and an unsupported version of a known one.
    let mut f = Vec::new();
    let body = raw_request(999, 0, 1, &[]);
    f.extend_from_slice(&(body.len() as i32).to_be_bytes());
    f.extend_from_slice(&body);
    expect_closed(&s, &f, "unknown api key");
    let body = raw_request(ApiKey::Metadata as i16, 77, 1, &[]);
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    expect_closed(&s, &f, "unsupported version");
    // Garbage.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut f = 4092i32.to_be_bytes().to_vec();
    f.extend_from_slice(&garbage[..4092]);
    expect_closed(&s, &f, "garbage body");
    // A truncated frame, then the client goes away.
    {
        let mut c = RawClient::connect(s.addr());
        c.stream.write_all(&1000i32.to_be_bytes()).unwrap();
        c.stream.write_all(&[0u8; 10]).unwrap();
    }
    still_serving(&s).await;
    assert!(s.is_running(), "broker survived:\n{}", s.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_counts_do_not_take_the_broker_down() {
    let mut s = StromProcess::start(&[]);
    let max = i32_count(i32::MAX);
    // Compact array with a count of 2^32-2 (unsigned varint 0xFFFFFFFF).
    let compact_huge = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        // Metadata v4: topics count, 14 bytes of body in all.
        (
            "metadata v4",
            raw_request(ApiKey::Metadata as i16, 4, 1, &max),
        ),
        (
            "metadata v9 flexible",
            raw_flexible_request(ApiKey::Metadata as i16, 9, 1, &compact_huge),
        ),
        (
            "create topics v2",
            raw_request(ApiKey::CreateTopics as i16, 2, 1, &max),
        ),
        (
            "create topics v5 flexible",
            raw_flexible_request(ApiKey::CreateTopics as i16, 5, 1, &compact_huge),
        ),
        (
            "produce v7",
            raw_request(
                ApiKey::Produce as i16,
                7,
                1,
                &[&[0xff, 0xff][..], &[0, 1], &[0, 0, 0x13, 0x88], &max].concat(),
            ),
        ),
        (
            "produce v9 flexible",
            raw_flexible_request(
                ApiKey::Produce as i16,
                9,
                1,
                &[&[0u8][..], &[0, 1], &[0, 0, 0x13, 0x88], &compact_huge].concat(),
            ),
        ),
        (
            "fetch v11",
            raw_request(
                ApiKey::Fetch as i16,
                11,
                1,
                &[&[0xffu8; 4][..], &[0; 12], &[0], &[0; 8], &max].concat(),
            ),
        ),
        (
            "list offsets v5",
            raw_request(
                ApiKey::ListOffsets as i16,
                5,
                1,
                &[&[0xffu8; 4][..], &[0], &max].concat(),
            ),
        ),
        (
            "delete topics v3",
            raw_request(ApiKey::DeleteTopics as i16, 3, 1, &max),
        ),
        (
            "describe configs v1",
            raw_request(ApiKey::DescribeConfigs as i16, 1, 1, &max),
        ),
        (
            "api versions v3 flexible",
            raw_flexible_request(ApiKey::ApiVersions as i16, 3, 1, &compact_huge),
        ),
    ];
    // Group APIs: a short group id "g", then a hostile count where the first array starts.
    let g = [0u8, 1, b'g'];
    let compact_g = [2u8, b'g'];
    let null_str = [0xffu8, 0xff];
    cases.extend([
        (
            "join group v5",
            raw_request(
                ApiKey::JoinGroup as i16,
                5,
                1,
                &[
                    &g[..],
                    &[0, 0, 0x27, 0x10],
                    &[0, 0, 0x27, 0x10],
                    &[0, 0],
                    &null_str,
                    &g,
                    &max,
                ]
                .concat(),
            ),
        ),
        (
            "sync group v3",
            raw_request(
                ApiKey::SyncGroup as i16,
                3,
                1,
                &[&g[..], &[0, 0, 0, 1], &[0, 0], &null_str, &max].concat(),
            ),
        ),
        (
            "offset commit v7",
            raw_request(
                ApiKey::OffsetCommit as i16,
                7,
                1,
                &[&g[..], &[0xff; 4], &[0, 0], &null_str, &max].concat(),
            ),
        ),
        (
            "offset fetch v7",
            raw_request(ApiKey::OffsetFetch as i16, 7, 1, &[&g[..], &max].concat()),
        ),
        (
            "describe groups v4",
            raw_request(ApiKey::DescribeGroups as i16, 4, 1, &max),
        ),
        (
            "delete groups v1",
            raw_request(ApiKey::DeleteGroups as i16, 1, 1, &max),
        ),
        (
            "offset delete v0",
            raw_request(ApiKey::OffsetDelete as i16, 0, 1, &[&g[..], &max].concat()),
        ),
        (
            "leave group v4 flexible",
            raw_flexible_request(
                ApiKey::LeaveGroup as i16,
                4,
                1,
                &[&compact_g[..], &compact_huge].concat(),
            ),
        ),
        (
            "find coordinator v4 flexible",
            raw_flexible_request(
                ApiKey::FindCoordinator as i16,
                4,
                1,
                &[&[0u8][..], &compact_huge].concat(),
            ),
        ),
        (
            "consumer group heartbeat v0 flexible",
            raw_flexible_request(
                ApiKey::ConsumerGroupHeartbeat as i16,
                0,
                1,
                &[
                    &compact_g[..],
                    &[1],
                    &[0; 4],
                    &[0],
                    &[0],
                    &[0, 0, 0x27, 0x10],
                    &compact_huge,
                ]
                .concat(),
            ),
        ),
    ]);
    // A topic name length far past the frame.
    cases.push((
        "metadata v1 long name",
        raw_request(
            ApiKey::Metadata as i16,
            1,
            1,
            &[&i32_count(1)[..], &[0x7f, 0xff]].concat(),
        ),
    ));
    for (what, body) in cases {
        let mut c = RawClient::connect(s.addr());
        c.send_bytes(&body).unwrap();
        // Either an error response or a closed connection is acceptable; the process must live.
        let _ = c.read_frame();
        assert!(s.is_running(), "broker died on {what}:\n{}", s.log());
    }
    still_serving(&s).await;
}

fn produce(c: &mut RawClient, topic: &str, batch: Vec<u8>) -> i16 {
    produce_raw(c, topic, Bytes::from(batch)).0
}

fn batch(n: usize, value_bytes: usize) -> Vec<u8> {
    let recs: Vec<NewRecord> = (0..n)
        .map(|_| NewRecord {
            key: None,
            value: Some(vec![b'x'; value_bytes]),
            headers: vec![],
            timestamp: 1,
        })
        .collect();
    encode_batch(&recs, Compression::None, ProducerInfo::default()).unwrap()
}

fn end_offset(c: &mut RawClient, topic: &str) -> i64 {
    strom_tests::list_offset(c, topic, 0, -1).1
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_batches_get_kafka_errors_and_store_nothing() {
    let s = StromProcess::start(&["message.max.bytes=1000"]);
    create_topic(&s.bootstrap(), "bb", 1, &[]).await;
    let mut c = RawClient::connect(s.addr());
    assert_eq!(produce(&mut c, "bb", batch(2, 10)), 0);
    // Bad CRC: CORRUPT_MESSAGE, nothing stored.
    let mut b = batch(2, 10);
    let last = b.len() - 1;
    b[last] ^= 0xff;
    assert_eq!(produce(&mut c, "bb", b), 2, "CORRUPT_MESSAGE");
    // Truncated batch.
    let b = batch(2, 10);
    assert_eq!(produce(&mut c, "bb", b[..b.len() - 4].to_vec()), 2);
    // Over message.max.bytes: MESSAGE_TOO_LARGE.
    assert_eq!(
        produce(&mut c, "bb", batch(20, 100)),
        10,
        "MESSAGE_TOO_LARGE"
    );
    // Magic v1: not accepted.
    let mut b = batch(1, 1);
    b[16] = 1;
    assert_ne!(produce(&mut c, "bb", b), 0);
    assert_eq!(
        end_offset(&mut c, "bb"),
        2,
        "nothing stored by refused batches"
    );
    // Unknown topic with auto-create on still refuses the produce itself (metadata creates).
    assert_eq!(
        produce(&mut c, "never-made", batch(1, 1)),
        3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
    // The same connection keeps working.
    assert_eq!(produce(&mut c, "bb", batch(1, 1)), 0);
    assert_eq!(end_offset(&mut c, "bb"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_versions_too_new_gets_the_v0_answer() {
    let s = StromProcess::start(&[]);
    let mut c = RawClient::connect(s.addr());
    c.send_bytes(&raw_flexible_request(
        ApiKey::ApiVersions as i16,
        99,
        42,
        &[0, 0, 0],
    ))
    .unwrap();
    let mut frame = c.read_frame().expect("an answer, not a close");
    let header = ResponseHeader::decode(&mut frame, 0).unwrap();
    assert_eq!(header.correlation_id, 42);
    let resp = ApiVersionsResponse::decode(&mut frame, 0).unwrap();
    assert_eq!(resp.error_code, 35, "UNSUPPORTED_VERSION");
    assert!(resp
        .api_keys
        .iter()
        .any(|k| k.api_key == ApiKey::Produce as i16));
    // The client retries with a version from the list, on the same connection.
    let resp: ApiVersionsResponse = c.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(resp.error_code, 0);
    assert!(resp.api_keys.len() >= 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_fails_produce_with_storage_error_and_recovers() {
    let Some(disk) = SmallDisk::mount("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = disk.path().join("data");
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let mut s = StromProcess::start_in(data, None, &[]);
    create_topic(&s.bootstrap(), "full", 1, &[]).await;
    let mut c = RawClient::connect(s.addr());
    let mut stored = 0i64;
    let mut code = 0;
    for _ in 0..200 {
        code = produce(&mut c, "full", batch(10, 10_000));
        if code != 0 {
            break;
        }
        stored += 10;
    }
    assert_eq!(code, 56, "KAFKA_STORAGE_ERROR once the disk is full");
    assert!(stored > 0);
    assert_eq!(
        end_offset(&mut c, "full"),
        stored,
        "the failed write left nothing behind"
    );
    // Everything acknowledged is still readable, and the broker answers.
    let got = consume(
        &s.bootstrap(),
        "full",
        1,
        stored as usize,
        Duration::from_secs(30),
    );
    assert_eq!(got.len() as i64, stored);
    assert!(got.iter().enumerate().all(|(i, g)| g.1 == i as i64));
    // Free space: producing works again, offsets continue.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(produce(&mut c, "full", batch(1, 10)), 0);
    assert_eq!(end_offset(&mut c, "full"), stored + 1);
    assert!(s.is_running());
    // And after an unclean restart the log is consistent.
    s.kill9();
    s.restart();
    let mut c = RawClient::connect(s.addr());
    assert_eq!(end_offset(&mut c, "full"), stored + 1);
    drop(s);
}

fn api_versions_ok(c: &mut RawClient) -> bool {
    c.try_call::<_, ApiVersionsResponse>(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .is_some_and(|r| r.error_code == 0)
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_is_enforced() {
    let s = StromProcess::start(&["max.connections=2"]);
    // The start-up probe's connection may still be counted for a moment: retry until served.
    let connect = || {
        strom_tests::wait_for(Duration::from_secs(10), "a connection slot", || {
            let mut c = RawClient::connect(s.addr());
            api_versions_ok(&mut c).then_some(c)
        })
    };
    let a = connect();
    let mut b = connect();
    let mut c = RawClient::connect(s.addr());
    assert!(!api_versions_ok(&mut c), "a third connection is refused");
    drop(a);
    strom_tests::wait_for(Duration::from_secs(10), "a slot to free up", || {
        let mut d = RawClient::connect(s.addr());
        api_versions_ok(&mut d).then_some(())
    });
    assert!(api_versions_ok(&mut b));
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_request_bytes_bound_memory_across_connections() {
    let s = StromProcess::start(&["queued.max.request.bytes=1000"]);
    // A holds most of the budget with a frame it has not finished sending.
    let mut a = RawClient::connect(s.addr());
    let body = raw_request(ApiKey::ApiVersions as i16, 0, 7, &[]);
    let mut padded = body.clone();
    padded.resize(900, 0);
    a.stream
        .write_all(&(padded.len() as i32).to_be_bytes())
        .unwrap();
    a.stream.write_all(&padded[..100]).unwrap();
    // Give the broker time to read A's size and reserve its bytes.
    std::thread::sleep(Duration::from_millis(500));
    // B's request does not fit in what is left: it is not read while A holds the budget.
    let mut b = RawClient::connect(s.addr());
    let mut big = raw_request(ApiKey::ApiVersions as i16, 0, 9, &[]);
    big.resize(500, 0);
    b.send_bytes(&big).unwrap();
    b.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        std::io::Read::read(&mut b.stream, &mut byte).is_err(),
        "B was served although the request-bytes budget was taken"
    );
    // A finishes; both are served (the trailing padding makes A's request malformed, which
    // closes A, and releases its bytes either way).
    a.stream.write_all(&padded[100..]).unwrap();
    b.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = RawClient::connect(s.addr());
    assert!(
        api_versions_ok(&mut c),
        "the broker serves again once the budget is free"
    );
}
