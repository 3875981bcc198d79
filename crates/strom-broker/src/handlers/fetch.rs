//! Fetch: whole batches straight from the segment files, never past the high watermark.
//! Honours max_bytes, partition_max_bytes and KIP-74 (the first batch of the first non-empty
//! partition is returned even when larger than the limits), long-polls for min_bytes up to
//! max_wait_ms (woken by high-watermark advances, no sleep loop), and serves KIP-227 sessions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
use strom_log::{LogError, ReadOut};
use strom_proto::splice::{encode_response_spliced, file_placeholder, ResponseFrame};
use uuid::Uuid;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::log_error_code;
use crate::fetch_session::{SessionError, SessionKey, SessionPartition};
use crate::partition::Partition;

/// Session ids and epochs with special meaning (KIP-227).
const INITIAL_EPOCH: i32 = 0;
const FINAL_EPOCH: i32 = -1;

struct Plan {
    version: i16,
    correlation_id: i32,
    max_wait_ms: i64,
    min_bytes: usize,
    max_bytes: usize,
    /// Session id to answer with (0: none) and whether only changed partitions are sent.
    session_id: i32,
    incremental: bool,
    partitions: Vec<(SessionKey, SessionPartition)>,
    /// A follower's fetch: its broker id (-1 for consumers).
    replica_id: i32,
    /// current_leader_epoch per partition as sent (KIP-320), -1 when not sent.
    epochs: std::collections::HashMap<([u8; 16], i32), i32>,
    /// A Strom follower's durable log end per partition when it lags its fetch offset
    /// (`replication::DURABLE_END_TAG`).
    durable_ends: std::collections::HashMap<([u8; 16], i32), i64>,
    /// Partitions whose follower says its last write failed (`replication::WRITE_FAILED_TAG`).
    write_failed: std::collections::HashSet<([u8; 16], i32)>,
    /// The consumer's `client.rack` (v11+, KIP-392) when the rack-aware selector is on.
    rack: Option<String>,
    /// Reads of at least this many bytes are sent from the files (`strom.fetch.sendfile.min.bytes`).
    sendfile_min: u64,
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: FetchRequest = ctx.decode()?;
    let v = ctx.version;
    let image = broker.image();
    let key_of = |topic_id: Uuid, name: &str, partition: i32| -> SessionKey {
        if v >= 13 {
            let id = *topic_id.as_bytes();
            SessionKey {
                topic_id: id,
                topic: image
                    .topic_by_id(&id)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
                partition,
            }
        } else {
            SessionKey {
                topic_id: image.topic(name).map(|t| t.topic_id).unwrap_or_default(),
                topic: name.to_string(),
                partition,
            }
        }
    };
    let replica_id = if v >= 15 {
        req.replica_state.replica_id.0
    } else {
        req.replica_id.0
    };
    let mut epochs = std::collections::HashMap::new();
    let mut durable_ends = std::collections::HashMap::new();
    let mut write_failed = std::collections::HashSet::new();
    let mut requested = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let k = key_of(t.topic_id, t.topic.0.as_str(), p.partition);
            if p.current_leader_epoch >= 0 {
                epochs.insert((k.topic_id, p.partition), p.current_leader_epoch);
            }
            if replica_id >= 0 {
                if let Some(end) = crate::replication::tagged_offset(
                    &p.unknown_tagged_fields,
                    crate::replication::DURABLE_END_TAG,
                ) {
                    durable_ends.insert((k.topic_id, p.partition), end);
                }
                if p.unknown_tagged_fields
                    .contains_key(&crate::replication::WRITE_FAILED_TAG)
                {
                    write_failed.insert((k.topic_id, p.partition));
                }
            }
            requested.push((k, p.fetch_offset, p.partition_max_bytes));
        }
    }
    let fresh = |reqd: Vec<(SessionKey, i64, i32)>| -> Vec<(SessionKey, SessionPartition)> {
        reqd.into_iter()
            .map(|(k, off, max)| {
                (
                    k,
                    SessionPartition {
                        fetch_offset: off,
                        max_bytes: max,
                        last_hw: -1,
                        last_log_start: -1,
                        last_error: -1,
                    },
                )
            })
            .collect()
    };

    let (session_id, incremental, partitions) = if v < 7 || req.session_epoch == FINAL_EPOCH {
        if v >= 7 && req.session_id != 0 {
            broker.fetch_sessions.remove(req.session_id);
        }
        (0, false, fresh(requested))
    } else if req.session_epoch == INITIAL_EPOCH {
        if req.session_id != 0 {
            broker.fetch_sessions.remove(req.session_id);
        }
        let set = fresh(requested);
        let id = broker.fetch_sessions.create(set.clone());
        (id, false, set)
    } else {
        let forgotten: Vec<SessionKey> = req
            .forgotten_topics_data
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| key_of(t.topic_id, t.topic.0.as_str(), *p))
            })
            .collect();
        match broker
            .fetch_sessions
            .update(req.session_id, req.session_epoch, requested, &forgotten)
        {
            Ok(set) => (req.session_id, true, set),
            Err(e) => {
                let code = match e {
                    SessionError::NotFound => ResponseError::FetchSessionIdNotFound,
                    SessionError::InvalidEpoch => ResponseError::InvalidFetchSessionEpoch,
                };
                let resp = FetchResponse::default().with_error_code(code.code());
                return ctx.reply(&resp);
            }
        }
    };

    let fetch_max = broker.config.i64("fetch.max.bytes").max(1024) as usize;
    let plan = Plan {
        version: v,
        correlation_id: ctx.correlation_id,
        max_wait_ms: req.max_wait_ms.max(0) as i64,
        min_bytes: req.min_bytes.max(0) as usize,
        max_bytes: (req.max_bytes.max(0) as usize).min(fetch_max),
        session_id,
        incremental,
        partitions,
        replica_id,
        epochs,
        durable_ends,
        write_failed,
        rack: (v >= 11
            && replica_id < 0
            && !req.rack_id.is_empty()
            && !broker.config.get("replica.selector.class").is_empty())
        .then(|| req.rack_id.to_string()),
        sendfile_min: broker.config.i64("strom.fetch.sendfile.min.bytes").max(0) as u64,
    };
    let broker = broker.clone();
    Ok(Reply::Later(Box::pin(
        async move { run(broker, plan).await },
    )))
}

/// KIP-392 (RackAwareReplicaSelector): an in-sync follower in the consumer's rack, unless the
/// leader is in that rack itself.
fn preferred_read_replica(broker: &Broker, part: &Partition, rack: &str) -> Option<i32> {
    let image = broker.image();
    let rack_of = |id: i32| image.brokers.get(&id).and_then(|b| b.rack.clone());
    if rack_of(broker.node_id).as_deref() == Some(rack) {
        return None;
    }
    let role = part.role();
    role.isr
        .iter()
        .copied()
        .find(|r| *r != broker.node_id && image.is_live(*r) && rack_of(*r).as_deref() == Some(rack))
}

impl PartResult {
    /// A partition answered with an error and nothing else.
    fn failed(key: &SessionKey, code: ResponseError) -> Self {
        PartResult {
            preferred: -1,
            key: key.clone(),
            error: code.code(),
            hw: -1,
            log_start: -1,
            records: ReadOut::Copied(Vec::new()),
            leader_leo: None,
        }
    }
}

struct PartResult {
    /// KIP-392: fetch this partition from that replica instead (-1: none).
    preferred: i32,
    key: SessionKey,
    error: i16,
    hw: i64,
    log_start: i64,
    records: ReadOut,
    /// For a follower: this leader's log end offset after the read (`LEADER_LOG_END_TAG`).
    leader_leo: Option<i64>,
}

/// Whether this broker may serve the partition to this fetcher: it must be the leader (or,
/// for a consumer speaking v11+, a follower: KIP-392), and the leader epoch the fetcher knows
/// must be the current one (KIP-320).
fn check_leader(plan: &Plan, key: &SessionKey, part: &Partition) -> Result<(), ResponseError> {
    let follower_read = plan.replica_id < 0 && plan.version >= 11 && part.is_follower();
    if !part.is_leader() && !follower_read {
        return Err(ResponseError::NotLeaderOrFollower);
    }
    match plan.epochs.get(&(key.topic_id, key.partition)) {
        Some(e) if *e < part.leader_epoch() => Err(ResponseError::FencedLeaderEpoch),
        Some(e) if *e > part.leader_epoch() => Err(ResponseError::UnknownLeaderEpoch),
        _ => Ok(()),
    }
}

fn read_all(broker: &Arc<Broker>, plan: &Plan) -> (Vec<PartResult>, usize, bool) {
    let mut results = Vec::with_capacity(plan.partitions.len());
    let mut total = 0usize;
    let mut any_error = false;
    for (key, sp) in &plan.partitions {
        let Some(part) = broker
            .replicas
            .get(&key.topic, key.partition)
            .filter(|_| !key.topic.is_empty())
        else {
            let code = if plan.version >= 13 && key.topic.is_empty() {
                ResponseError::UnknownTopicId
            } else if broker
                .image()
                .topic(&key.topic)
                .is_some_and(|t| t.partitions.contains_key(&key.partition))
            {
                // Kafka: the partition exists but is not hosted here (reassigned away).
                ResponseError::NotLeaderOrFollower
            } else {
                ResponseError::UnknownTopicOrPartition
            };
            any_error = true;
            results.push(PartResult::failed(key, code));
            continue;
        };
        if let Err(code) = check_leader(plan, key, &part) {
            any_error = true;
            results.push(PartResult::failed(key, code));
            continue;
        }
        if plan.replica_id >= 0 {
            // What counts toward the high watermark is what the follower holds durably (a
            // fetch offset past the log end still goes in as it is: it proves nothing).
            let progress = crate::replication::follower_progress(
                sp.fetch_offset,
                plan.durable_ends
                    .get(&(key.topic_id, key.partition))
                    .copied(),
                part.log_end_offset(),
            );
            let can_write = !plan.write_failed.contains(&(key.topic_id, key.partition));
            if let Some(change) =
                part.record_follower_fetch(plan.replica_id, progress, can_write, broker.now_ms())
            {
                crate::replication::propose_isr(broker, &part, change);
            }
        }
        if let Some(rack) = plan.rack.as_deref().filter(|_| part.is_leader()) {
            if let Some(r) = preferred_read_replica(broker, &part, rack) {
                // Kafka answers with the replica to use and no records.
                any_error = true;
                results.push(PartResult {
                    preferred: r,
                    key: key.clone(),
                    error: 0,
                    hw: part.high_watermark(),
                    log_start: part.log_start_offset(),
                    records: ReadOut::Copied(Vec::new()),
                    leader_leo: None,
                });
                continue;
            }
        }
        let remaining = plan.max_bytes.saturating_sub(total);
        let limit = remaining.min(sp.max_bytes.max(0) as usize);
        // KIP-74: only while the response is still empty may a batch exceed the limits.
        let min_one = total == 0;
        let none = || ReadOut::Copied(Vec::new());
        let (error, records) = if limit == 0 && !min_one {
            (0, none())
        } else {
            let read = if plan.replica_id >= 0 {
                part.read_for_replica(sp.fetch_offset, limit, plan.sendfile_min)
            } else {
                part.read(sp.fetch_offset, limit, min_one, plan.sendfile_min)
            };
            match read {
                Ok(data) => (0, data),
                Err(e @ LogError::OffsetOutOfRange { .. }) => (log_error_code(&e).code(), none()),
                Err(e) => {
                    tracing::warn!(topic = %key.topic, partition = key.partition, error = %e, "fetch read failed");
                    (log_error_code(&e).code(), none())
                }
            }
        };
        any_error |= error != 0;
        total += records.len() as usize;
        results.push(PartResult {
            preferred: -1,
            key: key.clone(),
            error,
            hw: part.high_watermark(),
            log_start: part.log_start_offset(),
            records,
            leader_leo: (plan.replica_id >= 0).then(|| part.log_end_offset()),
        });
    }
    (results, total, any_error)
}

async fn run(broker: Arc<Broker>, plan: Plan) -> Option<ResponseFrame> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(plan.max_wait_ms as u64);
    let results = loop {
        // Register for wake-ups before reading, so an append between the read and the wait
        // is not missed.
        let parts: Vec<_> = plan
            .partitions
            .iter()
            .filter_map(|(k, _)| broker.replicas.get(&k.topic, k.partition))
            .collect();
        // Followers wait for appends (they replicate beyond the high watermark); consumers for
        // the high watermark.
        let mut waits: Vec<_> = parts
            .iter()
            .map(|p| {
                Box::pin(if plan.replica_id >= 0 {
                    p.appended.notified()
                } else {
                    p.hw_advanced.notified()
                })
            })
            .collect();
        for w in waits.iter_mut() {
            w.as_mut().enable();
        }
        let (results, total, any_error) = read_all(&broker, &plan);
        let done = total >= plan.min_bytes.max(1)
            || any_error
            || plan.max_wait_ms == 0
            || tokio::time::Instant::now() >= deadline
            || waits.is_empty()
            || broker.is_shutting_down();
        if done {
            break results;
        }
        let mut shutdown = broker.shutdown_signal();
        tokio::select! {
            _ = select_all(waits) => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break read_all(&broker, &plan).0;
        }
    };
    let (frame, sent) = respond(&plan, results);
    if plan.session_id != 0 {
        broker.fetch_sessions.record_sent(plan.session_id, &sent);
    }
    frame
}

/// What a fetch session remembers of each partition sent: key, high watermark, log start, error.
type Sent = Vec<(SessionKey, i64, i64, i16)>;

/// The response frame for what was read (None: it could not be made; the connection closes),
/// and what was sent, for the fetch session.
fn respond(plan: &Plan, results: Vec<PartResult>) -> (Option<ResponseFrame>, Sent) {
    let v = plan.version;
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    let mut sent = Vec::new();
    // Record batches in memory go out by reference, those in files with sendfile: the encoder
    // is given a placeholder for those, in order.
    let mut in_memory = Vec::new();
    let mut in_files = Vec::new();
    for (r, (_, sp)) in results.into_iter().zip(plan.partitions.iter()) {
        if plan.incremental
            && r.preferred < 0
            && r.records.is_empty()
            && r.error == sp.last_error
            && r.hw == sp.last_hw
            && r.log_start == sp.last_log_start
        {
            continue;
        }
        sent.push((r.key.clone(), r.hw, r.log_start, r.error));
        let records = match r.records {
            ReadOut::Copied(v) => {
                let b = Bytes::from(v);
                in_memory.push(b.clone());
                b
            }
            ReadOut::Files(parts) => {
                let total = parts.iter().map(|p| p.len).sum::<u64>() as usize;
                if let Some(placeholder) = file_placeholder(total) {
                    in_files.push(parts);
                    placeholder
                } else {
                    // Too long for a placeholder: copied after all.
                    match ReadOut::Files(parts).into_vec() {
                        Ok(v) => {
                            let b = Bytes::from(v);
                            in_memory.push(b.clone());
                            b
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "fetch read failed; closing connection");
                            return (None, sent);
                        }
                    }
                }
            }
        };
        let mut pd = PartitionData::default()
            .with_partition_index(r.key.partition)
            .with_error_code(r.error)
            .with_high_watermark(r.hw)
            .with_last_stable_offset(r.hw)
            .with_log_start_offset(r.log_start)
            .with_aborted_transactions(None)
            .with_records(Some(records));
        if v < 5 {
            pd.log_start_offset = -1;
        }
        if v >= 11 {
            pd.preferred_read_replica = kafka_protocol::messages::BrokerId(r.preferred);
        }
        if let Some(leo) = r.leader_leo.filter(|_| v >= 12) {
            crate::replication::set_tagged_offset(
                &mut pd.unknown_tagged_fields,
                crate::replication::LEADER_LOG_END_TAG,
                leo,
            );
        }
        let same_topic = topics.last().is_some_and(|t: &FetchableTopicResponse| {
            if v >= 13 {
                t.topic_id.as_bytes() == &r.key.topic_id
            } else {
                t.topic.0.as_str() == r.key.topic
            }
        });
        if !same_topic {
            let mut t = FetchableTopicResponse::default();
            if v >= 13 {
                t.topic_id = Uuid::from_bytes(r.key.topic_id);
            } else {
                t.topic = TopicName(str_bytes(&r.key.topic));
            }
            topics.push(t);
        }
        if let Some(t) = topics.last_mut() {
            t.partitions.push(pd);
        }
    }
    let mut resp = FetchResponse::default().with_responses(topics);
    if v >= 7 {
        resp.session_id = plan.session_id;
    }
    let frame = match encode_response_spliced(plan.correlation_id, v, &resp, in_memory, in_files) {
        Ok(frame) => Some(frame),
        Err(e) => {
            tracing::error!(error = %e, "encoding fetch response failed");
            None
        }
    };
    (frame, sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strom_log::{Log, LogConfig};
    use strom_proto::compression::Compression;
    use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};
    use strom_proto::splice::Part;

    fn key(partition: i32) -> SessionKey {
        SessionKey {
            topic_id: [7; 16],
            topic: "t".into(),
            partition,
        }
    }

    fn plan(partitions: i32, sendfile_min: u64) -> Plan {
        Plan {
            version: 12,
            correlation_id: 5,
            max_wait_ms: 0,
            min_bytes: 1,
            max_bytes: usize::MAX,
            session_id: 0,
            incremental: false,
            partitions: (0..partitions)
                .map(|p| {
                    let sp = SessionPartition {
                        fetch_offset: 0,
                        max_bytes: i32::MAX,
                        last_hw: -1,
                        last_log_start: -1,
                        last_error: 0,
                    };
                    (key(p), sp)
                })
                .collect(),
            replica_id: 2,
            epochs: Default::default(),
            durable_ends: Default::default(),
            write_failed: Default::default(),
            rack: None,
            sendfile_min,
        }
    }

    /// A log of `batches` batches of 10 records of 1 KiB, in segments of 64 KiB.
    fn log(dir: &std::path::Path, batches: usize) -> Log {
        let config = LogConfig {
            segment_bytes: 64 << 10,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir, config, true).unwrap();
        for i in 0..batches {
            let recs: Vec<NewRecord> = (0..10)
                .map(|j| NewRecord {
                    key: None,
                    value: Some(vec![(i * 10 + j) as u8; 1024]),
                    headers: vec![],
                    timestamp: 1_700_000_000_000,
                })
                .collect();
            let b = encode_batch(&recs, Compression::None, ProducerInfo::default()).unwrap();
            log.append(&b, 0, 0).unwrap();
        }
        log
    }

    fn result(partition: i32, records: ReadOut) -> PartResult {
        PartResult {
            preferred: -1,
            key: key(partition),
            error: 0,
            hw: 100,
            log_start: 0,
            records,
            leader_leo: None,
        }
    }

    fn decoded(frame: &ResponseFrame) -> FetchResponse {
        let mut bytes = frame.to_bytes().unwrap();
        // Size, then the v0 response header (correlation id) of Fetch v12's flexible header.
        let _ = bytes.split_to(4);
        assert_eq!(&bytes.split_to(4)[..], &5i32.to_be_bytes());
        let _tagged = bytes.split_to(1);
        strom_proto::api::decode_body::<FetchResponse>(&mut bytes, 12).unwrap()
    }

    #[test]
    fn large_reads_go_out_as_file_parts_with_the_log_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let big = log(&dir.path().join("a"), 30); // ~300 KiB over several segments
        let small = log(&dir.path().join("b"), 1); // ~10 KiB
        let min = 16 << 10;
        let results = vec![
            result(
                0,
                big.read_files(0, usize::MAX, i64::MAX, true, min).unwrap(),
            ),
            result(
                1,
                small
                    .read_files(0, usize::MAX, i64::MAX, true, min)
                    .unwrap(),
            ),
        ];
        assert!(matches!(results[0].records, ReadOut::Files(ref f) if f.len() > 1));
        assert!(matches!(results[1].records, ReadOut::Copied(_)));
        let (frame, sent) = respond(&plan(2, min), results);
        let frame = frame.expect("a frame");
        assert_eq!(sent.len(), 2);
        let ResponseFrame::Parts(parts) = &frame else {
            panic!("file parts make a frame of parts")
        };
        let files: u64 = parts
            .iter()
            .filter_map(|p| match p {
                Part::File(f) => Some(f.len),
                Part::Mem(_) => None,
            })
            .sum();
        let big_bytes = big.read(0, usize::MAX, i64::MAX, true).unwrap();
        assert_eq!(
            files,
            big_bytes.len() as u64,
            "only the large read is sent from files"
        );
        let resp = decoded(&frame);
        let records: Vec<_> = resp.responses[0]
            .partitions
            .iter()
            .map(|p| p.records.clone().unwrap())
            .collect();
        assert!(records[0] == big_bytes[..]);
        assert!(records[1] == small.read(0, usize::MAX, i64::MAX, true).unwrap()[..]);
    }

    #[test]
    fn a_log_truncated_before_sending_fails_the_frame_not_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path(), 10);
        let read = log.read_files(0, usize::MAX, i64::MAX, true, 4096).unwrap();
        let (frame, _) = respond(&plan(1, 4096), vec![result(0, read)]);
        let frame = frame.unwrap();
        log.truncate_to(3).unwrap();
        assert!(
            frame.to_bytes().is_err(),
            "a truncated range must not be sent"
        );
    }
}
