//! The broker side of the group coordinator: its settings from the config registry, the
//! `__consumer_offsets` topic (created on first use, as Kafka does) and the `OffsetsLog` the
//! coordinator writes through — appends to that topic's partitions, durable before answered.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use strom_group::consumer::TopicInfo;
use strom_group::coordinator::{KeyValue, OFFSETS_TOPIC};
use strom_group::{GroupConfig, GroupError, OffsetsLog};
use strom_log::{LogError, ReadOut};
use strom_proto::batch::BatchIter;
use strom_proto::compression::Compression;
use strom_proto::records::{decode_records, encode_batch, NewRecord, ProducerInfo};

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::error::AdminError;

/// How often the coordinator's timers are checked: the resolution of session expiry and
/// rebalance deadlines.
pub const GROUP_TICK: Duration = Duration::from_millis(50);

pub fn group_config(c: &BrokerConfig) -> GroupConfig {
    GroupConfig {
        min_session_timeout_ms: c.i64("group.min.session.timeout.ms") as i32,
        max_session_timeout_ms: c.i64("group.max.session.timeout.ms") as i32,
        initial_rebalance_delay_ms: c.i64("group.initial.rebalance.delay.ms"),
        max_size: c.i64("group.max.size").max(1) as usize,
        offset_metadata_max_bytes: c.i64("offset.metadata.max.bytes").max(0) as usize,
        offsets_retention_ms: c.i64("offsets.retention.minutes").saturating_mul(60_000),
        offsets_retention_check_interval_ms: c.i64("offsets.retention.check.interval.ms"),
        consumer_session_timeout_ms: c.i64("group.consumer.session.timeout.ms"),
        consumer_heartbeat_interval_ms: c.i64("group.consumer.heartbeat.interval.ms") as i32,
        consumer_max_size: c.i64("group.consumer.max.size").max(1) as usize,
    }
}

/// Replays every `__consumer_offsets` partition into the coordinator (broker start).
pub fn load_groups(broker: &Broker) {
    let started = std::time::Instant::now();
    let mut groups = 0;
    for p in 0..broker.groups.partitions() {
        match broker.groups.load(broker, p, broker.now_ms()) {
            Ok(n) => groups += n,
            Err(e) => tracing::error!(partition = p, error = %e, "loading groups failed"),
        }
    }
    tracing::info!(
        groups,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "group coordinator loaded"
    );
}

/// Topic id and partition count by name, for the consumer-group assignors.
pub fn topic_info(image: &strom_meta::MetadataImage, name: &str) -> Option<TopicInfo> {
    image.topic(name).map(|t| TopicInfo {
        id: t.topic_id,
        partitions: t.partitions.len() as i32,
    })
}

impl Broker {
    /// Creates `__consumer_offsets` if it does not exist yet and takes over its partitions.
    pub fn ensure_offsets_topic(&self) -> Result<(), GroupError> {
        if self.groups.partitions() > 0 {
            return Ok(());
        }
        // Another request is creating it: answer COORDINATOR_NOT_AVAILABLE (the client retries,
        // as Kafka answers while the topic is being created) rather than wait for the lock. A
        // cluster's creation waits on the controller, and requests waiting here would hold the
        // runtime's worker threads that wait needs (a deadlock, seen with several clients
        // looking for a coordinator at once).
        let Some(_guard) = self.offsets_topic_init.try_lock() else {
            return Err(GroupError::CoordinatorNotAvailable);
        };
        if self.groups.partitions() > 0 {
            return Ok(());
        }
        let image = self.image();
        let partitions = match image.topic(OFFSETS_TOPIC) {
            Some(t) => t.partitions.len() as i32,
            None => {
                let mut configs = BTreeMap::new();
                configs.insert("cleanup.policy".to_string(), "compact".to_string());
                configs.insert(
                    "segment.bytes".to_string(),
                    self.config.i64("offsets.topic.segment.bytes").to_string(),
                );
                let rf = (self.config.i64("offsets.topic.replication.factor") as usize)
                    .min(image.live_brokers().count().max(1)) as i16;
                let n = self.config.i64("offsets.topic.num.partitions") as i32;
                match crate::topics::create_topic(self, OFFSETS_TOPIC, n, rf, configs, false) {
                    Ok(_)
                    | Err(AdminError::Controller(
                        strom_meta::ControllerError::TopicAlreadyExists(_),
                    )) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "creating __consumer_offsets failed");
                        return Err(GroupError::CoordinatorNotAvailable);
                    }
                }
                tracing::info!(partitions = n, "created __consumer_offsets");
                self.image()
                    .topic(OFFSETS_TOPIC)
                    .map(|t| t.partitions.len() as i32)
                    .unwrap_or(0)
            }
        };
        if partitions == 0 {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        if self.raft().is_some() {
            // A cluster: each broker loads the partitions it leads as leadership arrives.
            self.groups.set_partition_count(partitions);
            return Ok(());
        }
        self.groups.begin_load(partitions);
        for p in 0..partitions {
            self.groups.load(self, p, self.now_ms())?;
        }
        Ok(())
    }
}

impl OffsetsLog for Broker {
    fn append(
        &self,
        partition: i32,
        records: Vec<KeyValue>,
    ) -> Result<BoxFuture<'static, Result<(), GroupError>>, GroupError> {
        let part = self
            .replicas
            .get(OFFSETS_TOPIC, partition)
            .filter(|p| p.is_leader())
            .ok_or(GroupError::NotCoordinator)?;
        let now = self.now_ms();
        let records: Vec<NewRecord> = records
            .into_iter()
            .map(|(k, v)| NewRecord {
                key: Some(k),
                value: v,
                headers: Vec::new(),
                timestamp: now,
            })
            .collect();
        let batch = encode_batch(&records, Compression::None, ProducerInfo::default())
            .map_err(|_| GroupError::StorageError)?;
        let outcome = part.append(&batch, now).map_err(|e| match e {
            LogError::MessageTooLarge { .. } => GroupError::InvalidCommitOffsetSize,
            LogError::NotLeader => GroupError::NotCoordinator,
            e => {
                tracing::error!(partition, error = %e, "appending to __consumer_offsets failed");
                if let Some(me) = self.fetchers.broker() {
                    crate::replication::resign_if_storage_failed(&me, &part);
                }
                GroupError::StorageError
            }
        })?;
        let end = outcome.last_offset + 1;
        let epoch = outcome.leader_epoch;
        let timeout = self.controller_timeout() * 3;
        Ok(Box::pin(async move {
            part.wait_durable(end, Some(epoch))
                .await
                .map_err(|e| match e {
                    // No longer leading (or moved away): another coordinator answers.
                    LogError::NotLeader => GroupError::NotCoordinator,
                    _ => GroupError::StorageError,
                })?;
            // Replicated like an acks=all produce before the coordinator answers.
            part.wait_replicated(end, 1, epoch, timeout)
                .await
                .map_err(|_| GroupError::NotCoordinator)
        }))
    }

    fn read_all(&self, partition: i32) -> Result<Vec<KeyValue>, GroupError> {
        let part = self
            .replicas
            .get(OFFSETS_TOPIC, partition)
            .ok_or(GroupError::NotCoordinator)?;
        let max_decompressed = self.config.i64("strom.max.decompressed.bytes").max(1024) as usize;
        let mut out = Vec::new();
        let mut offset = part.log_start_offset();
        // Up to the log end: a new leader's log is what the partition now holds (records above
        // its high watermark commit as its followers catch up to it).
        let end = part.log_end_offset();
        while offset < end {
            let bytes = part
                .read_for_replica(offset, 1 << 20, u64::MAX)
                .and_then(ReadOut::into_vec)
                .map_err(|_| GroupError::StorageError)?;
            if bytes.is_empty() {
                break;
            }
            let before = offset;
            for item in BatchIter::new(&bytes) {
                let Ok((header, batch)) = item else {
                    tracing::error!(partition, offset, "corrupt batch in __consumer_offsets");
                    return Err(GroupError::StorageError);
                };
                offset = header.last_offset() + 1;
                if header.is_control() {
                    continue;
                }
                let records = decode_records(&header, batch, max_decompressed)
                    .map_err(|_| GroupError::StorageError)?;
                out.extend(
                    records
                        .into_iter()
                        .filter_map(|r| r.key.map(|k| (k, r.value))),
                );
            }
            if offset == before {
                break;
            }
        }
        Ok(out)
    }
}
