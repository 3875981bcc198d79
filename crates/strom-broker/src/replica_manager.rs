//! The replica manager owns every partition hosted by this broker: it opens their logs at start
//! and when the metadata image says a partition was created, and closes or deletes them when a
//! topic goes away. Handlers look partitions up here; the lookup is a shared read lock on a map
//! of `Arc`s, and all per-partition work happens on the partition itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use strom_log::{Log, LogConfig, LogError, TimestampType};
use strom_meta::image::{MetadataDelta, MetadataImage, TopicImage};
use strom_proto::compression::Compression;

use crate::config::BrokerConfig;
use crate::flusher::Flusher;
use crate::partition::{Partition, ReplicaRole};

/// The assignment of `partition` in `topic`, as this broker's replica sees it.
pub fn role_of(config: &BrokerConfig, topic: &TopicImage, partition: i32) -> Option<ReplicaRole> {
    topic.partitions.get(&partition).map(|p| ReplicaRole {
        leader: p.leader,
        leader_epoch: p.leader_epoch,
        partition_epoch: p.partition_epoch,
        replicas: p.replicas.clone(),
        isr: p.isr.clone(),
        min_isr: config
            .topic_i64(&topic.configs, "min.insync.replicas")
            .max(1) as usize,
    })
}

fn hosts(topic: &TopicImage, partition: i32, node_id: i32) -> bool {
    topic
        .partitions
        .get(&partition)
        .is_some_and(|p| p.replicas.contains(&node_id))
}

pub struct ReplicaManager {
    node_id: i32,
    data_dir: PathBuf,
    partitions: RwLock<HashMap<(String, i32), Arc<Partition>>>,
    pub flusher: Arc<Flusher>,
    /// In a replicated cluster: the high watermarks replicas start from (see
    /// `hw_checkpoint`); `None` on a one-node cluster, where they start at the durable end.
    start_hw: parking_lot::Mutex<Option<crate::hw_checkpoint::Checkpoint>>,
}

/// The log settings of a topic: its overrides on top of the broker's settings.
pub fn log_config(config: &BrokerConfig, topic: &TopicImage) -> LogConfig {
    let o = &topic.configs;
    let ts_type = match config.topic_value(o, "message.timestamp.type") {
        Some((v, _)) if v == "LogAppendTime" => TimestampType::LogAppendTime,
        _ => TimestampType::CreateTime,
    };
    LogConfig {
        segment_bytes: config.topic_i64(o, "segment.bytes").max(14) as u64,
        segment_ms: config.topic_i64(o, "segment.ms").max(1),
        index_interval_bytes: config.topic_i64(o, "index.interval.bytes").max(0) as u32,
        max_message_bytes: config.topic_i64(o, "max.message.bytes").max(0) as u32,
        timestamp_type: ts_type,
        max_decompressed_bytes: config.i64("strom.max.decompressed.bytes").max(1024) as usize,
        retention_ms: config.topic_i64(o, "retention.ms"),
        retention_bytes: config.topic_i64(o, "retention.bytes"),
        delete_retention: config
            .topic_value(o, "cleanup.policy")
            .is_none_or(|(v, _)| v.contains("delete")),
        compression: match config.topic_value(o, "compression.type") {
            Some((v, _)) => match v.as_str() {
                "uncompressed" => Some(Compression::None),
                "gzip" => Some(Compression::Gzip),
                "snappy" => Some(Compression::Snappy),
                "lz4" => Some(Compression::Lz4),
                "zstd" => Some(Compression::Zstd),
                _ => None,
            },
            None => None,
        },
        timestamp_before_max_ms: config.topic_i64(o, "message.timestamp.before.max.ms"),
        timestamp_after_max_ms: config.topic_i64(o, "message.timestamp.after.max.ms"),
        // With follower fetching (KIP-392) consumers read a follower's tail as they read a
        // leader's: it stays in the page cache.
        direct_replica_writes: config.bool("strom.replica.direct.writes")
            && config.get("replica.selector.class").is_empty(),
        direct_replica_min_bytes: config.i64("strom.replica.direct.min.bytes").max(0) as usize,
    }
}

fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// Every partition directory under `data_dir` (see `partition_dir`), with its topic and
/// partition.
pub fn partition_dirs(data_dir: &Path) -> Vec<(PathBuf, String, i32)> {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("__cluster_metadata") {
                return None;
            }
            let (topic, part) = name.rsplit_once('-')?;
            let part = part.parse::<i32>().ok()?;
            Some((e.path(), topic.to_string(), part))
        })
        .collect()
}

impl ReplicaManager {
    pub fn new(node_id: i32, data_dir: PathBuf) -> std::io::Result<Self> {
        Ok(ReplicaManager {
            node_id,
            flusher: Flusher::new(&data_dir)?,
            data_dir,
            partitions: RwLock::new(HashMap::new()),
            start_hw: parking_lot::Mutex::new(None),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Replicated cluster: partitions opened from now on start from these high watermarks
    /// (their log start when absent), not from their log end.
    pub fn start_from_checkpoint(&self, checkpoint: crate::hw_checkpoint::Checkpoint) {
        *self.start_hw.lock() = Some(checkpoint);
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        self.partitions
            .read()
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Partition>> {
        self.partitions.read().values().cloned().collect()
    }

    fn open_partition(
        &self,
        config: &BrokerConfig,
        topic: &TopicImage,
        partition: i32,
        clean_shutdown: bool,
    ) -> Result<Arc<Partition>, LogError> {
        let dir = partition_dir(&self.data_dir, &topic.name, partition);
        let log = Log::open(&dir, log_config(config, topic), clean_shutdown)?;
        let role = role_of(config, topic, partition).unwrap_or_default();
        let part = Partition::new(
            (topic.name.clone(), topic.topic_id, partition),
            log,
            self.node_id,
            role,
            (
                config.topic_i64(&topic.configs, "flush.messages"),
                config.topic_i64(&topic.configs, "flush.ms"),
            ),
            self.flusher.clone(),
        );
        if let Some(checkpoint) = self.start_hw.lock().as_ref() {
            let hw = checkpoint
                .get(&(topic.name.clone(), partition))
                .copied()
                .unwrap_or(part.log_start_offset());
            part.restart_high_watermark_at(hw);
        }
        Ok(Arc::new(part))
    }

    /// Opens every partition of the image (broker start).
    pub fn load(
        &self,
        config: &BrokerConfig,
        image: &MetadataImage,
        clean_shutdown: bool,
    ) -> Result<(), LogError> {
        let mut map = HashMap::new();
        for topic in image.topics.values() {
            for &p in topic.partitions.keys() {
                if !hosts(topic, p, self.node_id) {
                    continue;
                }
                let part = self.open_partition(config, topic, p, clean_shutdown)?;
                map.insert((topic.name.clone(), p), part);
            }
        }
        *self.partitions.write() = map;
        self.remove_orphans(image);
        Ok(())
    }

    /// Partition directories of topics the image no longer has (a crash between the delete
    /// record and the directory removal) are removed, so a re-created topic starts empty.
    fn remove_orphans(&self, image: &MetadataImage) {
        if image.offset < 0 || image.brokers.is_empty() {
            // An image that has not seen the metadata log proves nothing about what exists.
            return;
        }
        for (path, topic, part) in partition_dirs(&self.data_dir) {
            let known = image
                .topic(&topic)
                .is_some_and(|t| hosts(t, part, self.node_id));
            if !known {
                tracing::warn!(dir = %path.display(), "removing the log of a deleted partition");
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::error!(dir = %path.display(), error = %e, "could not remove");
                }
            }
        }
    }

    /// Brings the hosted partitions in line with a metadata change. Returns the partitions
    /// whose leadership changed (new leader or leader epoch), for replication to act on; that
    /// includes partitions this broker no longer hosts (reassigned away, log deleted).
    pub fn apply_delta(
        &self,
        config: &BrokerConfig,
        image: &MetadataImage,
        delta: &MetadataDelta,
        now_ms: i64,
    ) -> Result<Vec<Arc<Partition>>, LogError> {
        let mut leadership_changed = Vec::new();
        for (name, _id, parts) in &delta.deleted_topics {
            for p in parts {
                let removed = self.partitions.write().remove(&(name.clone(), *p));
                if let Some(part) = removed {
                    if let Some(log) = part.take_log() {
                        log.delete()?;
                    }
                    part.hw_advanced.notify_waiters();
                }
            }
        }
        for (name, _id, p) in &delta.created_partitions {
            let Some(topic) = image.topic(name) else {
                continue;
            };
            if !hosts(topic, *p, self.node_id) || self.get(name, *p).is_some() {
                continue;
            }
            let part = self.open_partition(config, topic, *p, true)?;
            self.partitions
                .write()
                .insert((name.clone(), *p), part.clone());
            leadership_changed.push(part);
        }
        for (name, p) in &delta.changed_partitions {
            let Some(topic) = image.topic(name) else {
                continue;
            };
            let Some(role) = role_of(config, topic, *p) else {
                continue;
            };
            match self.get(name, *p) {
                Some(part) if !role.replicas.contains(&self.node_id) => {
                    // Reassigned away: stop serving and following it, and delete its log.
                    part.set_role(role, now_ms);
                    self.partitions.write().remove(&(name.clone(), *p));
                    if let Some(log) = part.take_log() {
                        tracing::info!(topic = %name, partition = *p, "no longer a replica; deleting the local log");
                        if let Err(e) = log.delete() {
                            tracing::error!(topic = %name, partition = *p, error = %e, "deleting the log of a partition moved away failed");
                        }
                    }
                    part.hw_advanced.notify_waiters();
                    part.appended.notify_waiters();
                    // The caller's role handling takes it out of its fetcher (and, for an
                    // offsets partition, unloads its groups).
                    leadership_changed.push(part);
                }
                Some(part) if part.set_role(role.clone(), now_ms) => {
                    leadership_changed.push(part);
                }
                Some(_) => {}
                None if role.replicas.contains(&self.node_id) => {
                    // Newly assigned here (a reassignment): start an empty replica.
                    let part = self.open_partition(config, topic, *p, true)?;
                    self.partitions
                        .write()
                        .insert((name.clone(), *p), part.clone());
                    leadership_changed.push(part);
                }
                None => {}
            }
        }
        // A broker default changed: every topic may see new effective values.
        let changed: Vec<String> = if delta.changed_broker_configs {
            image.topics.keys().cloned().collect()
        } else {
            delta.changed_topic_configs.clone()
        };
        for name in &changed {
            let Some(topic) = image.topic(name) else {
                continue;
            };
            let lc = log_config(config, topic);
            for part in self.all().into_iter().filter(|p| &p.topic == name) {
                if let Some(role) = role_of(config, topic, part.index) {
                    if part.set_role(role, now_ms) {
                        leadership_changed.push(part.clone());
                    }
                }
                part.set_log_config(lc.clone());
                part.set_flush_policy(
                    config.topic_i64(&topic.configs, "flush.messages"),
                    config.topic_i64(&topic.configs, "flush.ms"),
                );
            }
        }
        Ok(leadership_changed)
    }

    /// Clean shutdown: close every log (fsync, producer-state snapshot, recovery point).
    pub fn close_all(&self) -> Result<(), LogError> {
        let parts: Vec<_> = self.partitions.write().drain().map(|(_, p)| p).collect();
        let mut first_err = None;
        for part in parts {
            if let Some(log) = part.take_log() {
                if let Err(e) = log.close() {
                    tracing::error!(topic = %part.topic, partition = part.index, error = %e, "closing log failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> TopicImage {
        TopicImage {
            name: "t".into(),
            topic_id: [1; 16],
            partitions: Default::default(),
            configs: Default::default(),
        }
    }

    #[test]
    fn followers_write_past_the_page_cache_unless_consumers_may_read_from_them() {
        let direct = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            log_config(&BrokerConfig::new(None, &sets).unwrap(), &topic()).direct_replica_writes
        };
        assert!(direct(&[]));
        let min = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            log_config(&BrokerConfig::new(None, &sets).unwrap(), &topic()).direct_replica_min_bytes
        };
        assert_eq!(min(&[]), 256 << 10);
        assert_eq!(min(&["strom.replica.direct.min.bytes=0"]), 0);
        assert!(!direct(&["strom.replica.direct.writes=false"]));
        assert!(!direct(&[
            "replica.selector.class=org.apache.kafka.common.replica.RackAwareReplicaSelector"
        ]));
    }
}
