//! Nothing acknowledged is lost: kill -9 under load, a failed fsync, restarts, idempotent
//! retries.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, InitProducerIdResponse};
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use strom_proto::compression::Compression;
use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};
use strom_tests::proxy::Proxy;
use strom_tests::{
    expect_storage_halt, fail_fsyncs, free_port, produce_raw, RawClient, StromProcess,
};

/// Reads every record of `topic` up to the high watermark: (partition, offset, value).
fn read_everything(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(i32, i64, Vec<u8>)> {
    let c = consumer(bootstrap);
    let mut total = 0usize;
    for p in 0..partitions {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        assert_eq!(lo, 0);
        total += hi as usize;
    }
    consume(bootstrap, topic, partitions, total, Duration::from_secs(60))
        .into_iter()
        .map(|(p, o, r)| (p, o, r.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_dash_nine_under_load_loses_no_acknowledged_record() {
    stop_under_load_and_verify(|s| s.kill9()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_finishes_in_flight_requests_and_loses_nothing() {
    stop_under_load_and_verify(|s| {
        assert!(s.terminate(), "clean exit under load:\n{}", s.log());
        assert!(s.data_dir().join(".strom-clean-shutdown").exists());
    })
    .await;
}

/// Streams at full rate, stops the broker with `stop_broker` mid-stream, restarts it and checks that
/// every acknowledged record is there exactly once at its offset, with contiguous offsets.
/// One failed fsync stops the node, though the next one would succeed: after a writeback error
/// the kernel may have dropped the pages it could not write, so acknowledging past it could
/// acknowledge records that are not on disk. What was acknowledged before is there after a
/// restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_fsync_stops_the_node_and_loses_no_acknowledged_record() {
    stop_under_load_and_verify(|s| {
        let dir = std::fs::canonicalize(s.data_dir()).unwrap();
        let mut paths = vec![dir.clone()];
        for p in 0..2 {
            let seg = dir.join(format!("dur-{p}/00000000000000000000.log"));
            paths.push(std::fs::canonicalize(seg).unwrap());
        }
        // Each thread's first fsync of those files fails; the ones after it would not.
        let strace = fail_fsyncs(s.pid().expect("running"), &paths, Some("1"));
        expect_storage_halt(s, strace, "fsync of the log failed: stopping the node");
    })
    .await;
}

/// A segment that rolls is fsynced before it becomes immutable: that fsync failing stops the
/// node too (the roll would otherwise be retried, and a retried fsync proves nothing).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_fsync_of_a_rolling_segment_stops_the_node() {
    let mut s = StromProcess::start(&[]);
    // Flushed only at the roll: the fsync that fails is the roll's.
    let configs = [
        ("segment.bytes", "1048576"),
        ("flush.messages", "1000000000"),
    ];
    create_topic(&s.bootstrap(), "roll", 1, &configs).await;
    let p = producer(&s.bootstrap(), &[("acks", "1"), ("linger.ms", "1")]);
    let value = vec![b'x'; 10_000];
    let record = || FutureRecord::to("roll").payload(&value).key("k");
    let wait = Duration::from_secs(5);
    p.send(record(), wait).await.unwrap();
    let seg = s.data_dir().join("roll-0/00000000000000000000.log");
    let seg = std::fs::canonicalize(seg).unwrap();
    let strace = fail_fsyncs(s.pid().expect("running"), &[seg], None);
    // Past the segment's size: the roll fsyncs it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.is_running() && Instant::now() < deadline {
        let _ = p.send(record(), wait).await;
    }
    expect_storage_halt(&mut s, strace, "fsync of the log failed: stopping the node");
}

async fn stop_under_load_and_verify(stop_broker: impl FnOnce(&mut StromProcess)) {
    let mut s = StromProcess::start(&[]);
    create_topic(&s.bootstrap(), "dur", 2, &[]).await;
    let p = producer(
        &s.bootstrap(),
        &[
            ("message.timeout.ms", "3000"),
            ("retries", "0"),
            ("linger.ms", "1"),
        ],
    );
    let acked: Arc<Mutex<HashMap<u64, (i32, i64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (acked2, stop2) = (acked.clone(), stop.clone());
    let writer = tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut id = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let payload = format!("rec-{id}");
            let key = id.to_string();
            let fr = FutureRecord::to("dur")
                .payload(&payload)
                .key(&key)
                .partition((id % 2) as i32);
            match p.send_result(fr) {
                Ok(f) => pending.push((id, f)),
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            id += 1;
            if pending.len() >= 2000 {
                for (id, f) in pending.drain(..) {
                    if let Ok(Ok(d)) = f.await {
                        acked2.lock().unwrap().insert(id, (d.partition, d.offset));
                    }
                }
            }
        }
        for (id, f) in pending.drain(..) {
            if let Ok(Ok(d)) = f.await {
                acked2.lock().unwrap().insert(id, (d.partition, d.offset));
            }
        }
        id
    });
    // Let it stream at full rate, then stop the broker mid-stream.
    wait_until(Duration::from_secs(30), || {
        acked.lock().unwrap().len() > 20_000
    })
    .await;
    stop_broker(&mut s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20_000 && (acked.len() as u64) < sent,
        "acked {} of {sent}",
        acked.len()
    );

    s.restart();
    let log = read_everything(&s.bootstrap(), "dur", 2);
    let mut next = [0i64; 2];
    let mut seen = HashSet::new();
    let mut at: HashMap<(i32, i64), u64> = HashMap::new();
    for (p, off, v) in &log {
        assert_eq!(*off, next[*p as usize], "offsets contiguous after recovery");
        next[*p as usize] += 1;
        let id: u64 = String::from_utf8_lossy(v)
            .trim_start_matches("rec-")
            .parse()
            .unwrap();
        assert!(seen.insert(id), "record {id} stored twice");
        at.insert((*p, *off), id);
    }
    for (id, po) in &acked {
        assert_eq!(
            at.get(po),
            Some(id),
            "acknowledged record {id} at {po:?} lost or moved"
        );
    }
    // Offsets continue after the recovered end, with no gap and no reuse.
    let p = producer(&s.bootstrap(), &[]);
    for part in 0..2 {
        let d = p
            .send(
                FutureRecord::to("dur")
                    .payload("after")
                    .key("k")
                    .partition(part),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(d.offset, next[part as usize]);
    }
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not reached in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_producer_through_dropped_connections_has_no_duplicates() {
    let port = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let tmp = tempfile::tempdir().unwrap();
    let advertise = proxy.addr.to_string();
    let s = StromProcess::start_with(
        tmp.path().to_path_buf(),
        Some(tmp),
        Some(port),
        &[],
        &["--advertise", &advertise],
    );
    let bootstrap = proxy.addr.to_string();
    create_topic(&bootstrap, "idem", 2, &[]).await;
    let p = producer(
        &bootstrap,
        &[
            ("enable.idempotence", "true"),
            ("linger.ms", "2"),
            ("retry.backoff.ms", "10"),
        ],
    );
    let n = 30_000u64;
    let mut futs = Vec::new();
    for id in 0..n {
        let payload = format!("{id}");
        let fr = FutureRecord::to("idem")
            .payload(&payload)
            .key("k")
            .partition((id % 2) as i32);
        futs.push(p.send_result(fr).map_err(|(e, _)| e).unwrap());
        if id % 3000 == 1500 {
            // Responses in flight are lost; librdkafka retries the same sequences.
            tokio::time::sleep(Duration::from_millis(5)).await;
            proxy.cut_all();
        }
    }
    for f in futs {
        f.await
            .unwrap()
            .map_err(|(e, _)| e)
            .expect("idempotent delivery");
    }
    assert!(
        proxy.connections.load(std::sync::atomic::Ordering::Relaxed) > 3,
        "connections were really cut"
    );
    let log = read_everything(&s.bootstrap(), "idem", 2);
    assert_eq!(log.len() as u64, n, "every record exactly once");
    let mut last = [-1i64; 2];
    for (part, _, v) in log {
        let id: i64 = String::from_utf8(v).unwrap().parse().unwrap();
        assert!(id > last[part as usize], "order kept in partition {part}");
        last[part as usize] = id;
    }
}

fn idempotent_batch(pid: i64, seq: i32, n: usize) -> Bytes {
    let recs: Vec<NewRecord> = (0..n)
        .map(|i| NewRecord {
            key: None,
            value: Some(format!("v{}", seq as usize + i).into_bytes()),
            headers: vec![],
            timestamp: 1,
        })
        .collect();
    Bytes::from(
        encode_batch(
            &recs,
            Compression::None,
            ProducerInfo {
                producer_id: pid,
                producer_epoch: 0,
                base_sequence: seq,
            },
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn producer_state_survives_kill_dash_nine() {
    let mut s = StromProcess::start(&[]);
    create_topic(&s.bootstrap(), "pstate", 1, &[]).await;
    let mut c = RawClient::connect(s.addr());
    let init: InitProducerIdResponse = c.call(
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60000),
    );
    assert_eq!(init.error_code, 0);
    let pid = init.producer_id.0;
    assert!(pid >= 0);
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 0, 10)),
        (0, 0)
    );
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 10, 5)),
        (0, 10)
    );
    s.kill9();
    s.restart();
    let mut c = RawClient::connect(s.addr());
    // The retried batch is answered with its original offset and not stored again.
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 10, 5)),
        (0, 10)
    );
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 0, 10)),
        (0, 0)
    );
    // A gap is refused.
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 20, 1)).0,
        45,
        "OUT_OF_ORDER_SEQUENCE_NUMBER"
    );
    assert_eq!(
        produce_raw(&mut c, "pstate", idempotent_batch(pid, 15, 1)),
        (0, 15)
    );
    // Producer ids are never reused across restarts.
    let init2: InitProducerIdResponse = c.call(
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60000),
    );
    assert!(init2.producer_id.0 > pid);
    let log = read_everything(&s.bootstrap(), "pstate", 1);
    assert_eq!(log.len(), 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_shutdown_keeps_data_and_skips_recovery() {
    let mut s = StromProcess::start(&[]);
    create_topic(&s.bootstrap(), "clean", 1, &[]).await;
    let recs: Vec<Rec> = (0..1000).map(|i| rec(i, 10)).collect();
    let acked = produce_all(&producer(&s.bootstrap(), &[]), "clean", &recs, |_| 0).await;
    assert!(s.terminate(), "SIGTERM exits cleanly:\n{}", s.log());
    assert!(s.data_dir().join(".strom-clean-shutdown").exists());
    s.restart();
    // The listener is bound before the logs are loaded: wait for the second start's line.
    let log = strom_tests::wait_for(Duration::from_secs(20), "the restart logged", || {
        let log = s.log();
        (log.matches("logs loaded").count() >= 2).then_some(log)
    });
    assert!(log.contains("clean_shutdown=true"), "{log}");
    let got = consume(
        &s.bootstrap(),
        "clean",
        1,
        recs.len(),
        Duration::from_secs(30),
    );
    check_exact(&recs, &acked, &got);
}

/// After `kill -9` what a log holds may be only in the page cache (appended, its fsync not
/// done, or not yet reached the disk). Recovery counts what it keeps as written — a follower
/// then reports it durable, a leader acknowledges past it, a voter answers by its metadata log —
/// so it fsyncs it first: with the fsyncs of a partition's segment failing, the restart stops
/// with the storage-failure status instead of serving what it never made durable. The same
/// with the metadata log's, on a single node (its embedded log) and a quorum of one voter (the
/// Raft log), though there the first append at start fsyncs the file too; a voter's failing
/// metadata disk is a storage failure (74) like any other.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_after_kill_dash_nine_fsyncs_what_it_keeps() {
    for metadata_log in ["metadata.log", "raft.log"] {
        let args: Vec<String> = if metadata_log == "raft.log" {
            let c = free_port();
            vec![
                "--node-id".into(),
                "1".into(),
                "--controller-quorum".into(),
                format!("1@127.0.0.1:{c}"),
                "--controller-listen".into(),
                format!("127.0.0.1:{c}"),
            ]
        } else {
            Vec::new()
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let arg_refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut node = StromProcess::start_with(dir, Some(tmp), None, &[], &arg_refs);
        // A voter listens before its broker is registered and unfenced (no broker to place a
        // topic on until then).
        wait_until(Duration::from_secs(30), || {
            args.is_empty() || node.log().contains("broker unfenced")
        })
        .await;
        let b = node.bootstrap();
        create_topic(&b, "kept", 1, &[]).await;
        let p = producer(&b, &[]);
        for i in 0..10 {
            p.send(
                FutureRecord::<(), _>::to("kept").payload(&format!("v{i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("acknowledged");
        }
        node.kill9();
        let data = node.data_dir();
        for file in [
            data.join("kept-0").join("00000000000000000000.log"),
            data.join("__cluster_metadata-0").join(metadata_log),
        ] {
            assert!(
                std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) > 0,
                "nothing in {}",
                file.display()
            );
            let log_path = data.join("restart.log");
            let status = start_with_failing_fsyncs(data, Some(&file), &args, &log_path);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert_eq!(status.code(), Some(74), "{}:\n{log}", file.display());
        }
    }
}

/// A disk that fails while the node starts (every fsync EIO, here before it ever served)
/// stops it with the storage-failure status (74), as a failure while it runs does: not the
/// status of a bad configuration (1), and never a node serving on a disk it cannot sync.
#[test]
fn a_disk_failing_while_the_node_starts_stops_it_with_the_storage_failure_status() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("node.log");
    let data = dir.path().join("data");
    let status = start_with_failing_fsyncs(&data, None, &[], &log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // strace exits with its tracee's status.
    assert_eq!(status.code(), Some(74), "{}", log());
    assert!(log().contains("Input/output error"), "{}", log());
}

/// Starts a node on `data` (with `args`) under strace with every fsync failing (EIO), of the
/// file `only` if given, its log in `log_path`, and returns its exit status (strace exits with its
/// tracee's). A node that serves instead (or is still starting after 30 s) is killed, strace
/// with it, and the test fails.
fn start_with_failing_fsyncs(
    data: &std::path::Path,
    only: Option<&std::path::Path>,
    args: &[String],
    log_path: &std::path::Path,
) -> std::process::ExitStatus {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("strace");
    // Its own process group, so that a node that does start goes with strace.
    cmd.process_group(0)
        .stdout(std::process::Stdio::null())
        .args(["-f", "-qq", "-o", "/dev/null"]);
    if let Some(path) = only {
        cmd.arg("-P").arg(path);
    }
    let mut child = cmd
        .args(["-e", "trace=fdatasync,fsync,syncfs"])
        .args(["-e", "inject=fdatasync,fsync,syncfs:error=EIO", "--"])
        .arg(strom_tests::strom_bin())
        .arg("server")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .stderr(std::fs::File::create(log_path).unwrap())
        .spawn()
        .expect("strace (the test command installs it)");
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline || log().contains("listening on") {
            // SAFETY: kill(2) of the process group this test created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("the node went on with failing fsyncs:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
