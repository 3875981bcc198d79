//! The metadata image: an immutable snapshot of everything the metadata log has said so far.
//! Readers hold an `Arc<MetadataImage>` for the duration of a request; a change produces a new
//! image (topics are shared between images through `Arc`, so that is cheap).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::record::{MetadataRecord, TopicId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerImage {
    pub broker_id: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
    /// Fenced brokers lead nothing and are not in any ISR; Metadata still lists them.
    pub fenced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionImage {
    pub partition: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    /// KIP-966 eligible leader replicas (see `MetadataRecord::Partition`).
    pub elr: Vec<i32>,
    /// KIP-966 last known eligible leader replicas (see `MetadataRecord::Partition`).
    pub last_known_elr: Vec<i32>,
    /// An ongoing reassignment: replicas joining (not yet in sync) and leaving. The target
    /// assignment is `replicas` without `removing_replicas`.
    pub adding_replicas: Vec<i32>,
    pub removing_replicas: Vec<i32>,
}

impl PartitionImage {
    pub fn is_reassigning(&self) -> bool {
        !self.adding_replicas.is_empty() || !self.removing_replicas.is_empty()
    }

    /// The replicas the partition ends up with: all of them when no reassignment is ongoing.
    pub fn target_replicas(&self) -> Vec<i32> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.removing_replicas.contains(r))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicImage {
    pub name: String,
    pub topic_id: TopicId,
    pub partitions: BTreeMap<i32, PartitionImage>,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct MetadataImage {
    /// Offset of the last applied record in the metadata log; -1 for the empty image.
    pub offset: i64,
    pub cluster_id: String,
    pub brokers: BTreeMap<i32, BrokerImage>,
    pub topics: BTreeMap<String, Arc<TopicImage>>,
    pub topic_names_by_id: HashMap<TopicId, String>,
    pub next_producer_id: i64,
    /// Dynamic broker settings by (broker id, or `None` for the cluster default, and name).
    pub broker_configs: BTreeMap<(Option<i32>, String), String>,
}

/// What changed between two images, for the broker to act on (create or delete logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataDelta {
    pub created_partitions: Vec<(String, TopicId, i32)>,
    /// Existing partitions whose leader, ISR, replicas or epochs changed.
    pub changed_partitions: Vec<(String, i32)>,
    pub deleted_topics: Vec<(String, TopicId, Vec<i32>)>,
    pub changed_topic_configs: Vec<String>,
    pub changed_broker_configs: bool,
    /// Brokers registered, fenced, unfenced or unregistered.
    pub changed_brokers: bool,
}

impl MetadataImage {
    pub fn empty() -> Self {
        MetadataImage {
            offset: -1,
            ..Default::default()
        }
    }

    pub fn topic(&self, name: &str) -> Option<&Arc<TopicImage>> {
        self.topics.get(name)
    }

    pub fn topic_by_id(&self, id: &TopicId) -> Option<&Arc<TopicImage>> {
        self.topic_names_by_id
            .get(id)
            .and_then(|n| self.topics.get(n))
    }

    /// Records that rebuild an equivalent image when applied to an empty one (everything but
    /// `offset`): the content of a metadata snapshot.
    pub fn to_records(&self) -> Vec<MetadataRecord> {
        let mut out = Vec::new();
        if !self.cluster_id.is_empty() {
            out.push(MetadataRecord::ClusterId {
                cluster_id: self.cluster_id.clone(),
            });
        }
        for b in self.brokers.values() {
            out.push(MetadataRecord::RegisterBroker {
                broker_id: b.broker_id,
                host: b.host.clone(),
                port: b.port,
                rack: b.rack.clone(),
            });
            // Registering unfences: a fenced broker must come back fenced, or the image
            // rebuilt from a snapshot lets a dead broker lead and join ISRs.
            if b.fenced {
                out.push(MetadataRecord::FenceBroker {
                    broker_id: b.broker_id,
                });
            }
        }
        for ((broker_id, name), value) in &self.broker_configs {
            out.push(MetadataRecord::BrokerConfig {
                broker_id: *broker_id,
                name: name.clone(),
                value: Some(value.clone()),
            });
        }
        if self.next_producer_id != 0 {
            out.push(MetadataRecord::ProducerIds {
                next_producer_id: self.next_producer_id,
            });
        }
        for topic in self.topics.values() {
            out.push(MetadataRecord::Topic {
                name: topic.name.clone(),
                topic_id: topic.topic_id,
            });
            for (name, value) in &topic.configs {
                out.push(MetadataRecord::TopicConfig {
                    topic_id: topic.topic_id,
                    name: name.clone(),
                    value: Some(value.clone()),
                });
            }
            for p in topic.partitions.values() {
                out.push(MetadataRecord::Partition {
                    topic_id: topic.topic_id,
                    partition: p.partition,
                    replicas: p.replicas.clone(),
                    isr: p.isr.clone(),
                    leader: p.leader,
                    leader_epoch: p.leader_epoch,
                    partition_epoch: p.partition_epoch,
                    elr: p.elr.clone(),
                    last_known_elr: p.last_known_elr.clone(),
                    adding_replicas: p.adding_replicas.clone(),
                    removing_replicas: p.removing_replicas.clone(),
                });
            }
        }
        out
    }

    /// Applies records (already durable at offsets `first_offset..`) and returns the new image
    /// with the delta. Records that refer to unknown topics are ignored: replay must never fail.
    pub fn apply(
        &self,
        first_offset: i64,
        records: &[MetadataRecord],
    ) -> (MetadataImage, MetadataDelta) {
        let mut next = self.clone();
        let delta = next.apply_in_place(first_offset, records);
        (next, delta)
    }

    /// `apply` without the copy, for an owner that keeps no older image.
    pub(crate) fn apply_in_place(
        &mut self,
        first_offset: i64,
        records: &[MetadataRecord],
    ) -> MetadataDelta {
        let mut delta = MetadataDelta::default();
        for (i, record) in records.iter().enumerate() {
            self.offset = first_offset + i as i64;
            self.apply_one(record, &mut delta);
        }
        delta
    }

    /// Applies one replicated batch: every record gets the batch's `offset` (a Raft log index),
    /// so image offsets stay comparable with the log's offsets.
    pub fn apply_batch(
        &self,
        offset: i64,
        records: &[MetadataRecord],
    ) -> (MetadataImage, MetadataDelta) {
        let mut next = self.clone();
        let mut delta = MetadataDelta::default();
        for record in records {
            next.apply_one(record, &mut delta);
        }
        next.offset = offset.max(self.offset);
        (next, delta)
    }

    /// Brokers that are registered and not fenced.
    pub fn live_brokers(&self) -> impl Iterator<Item = &BrokerImage> {
        self.brokers.values().filter(|b| !b.fenced)
    }

    pub fn is_live(&self, broker_id: i32) -> bool {
        self.brokers.get(&broker_id).is_some_and(|b| !b.fenced)
    }

    /// What changed from `self` to `next` (used when a snapshot replaces the whole image).
    pub fn diff(&self, next: &MetadataImage) -> MetadataDelta {
        let mut delta = MetadataDelta::default();
        for (name, old) in &self.topics {
            match next.topic(name) {
                Some(new) if new.topic_id == old.topic_id => {
                    for (p, np) in &new.partitions {
                        match old.partitions.get(p) {
                            None => delta
                                .created_partitions
                                .push((name.clone(), new.topic_id, *p)),
                            Some(op) if op != np => {
                                delta.changed_partitions.push((name.clone(), *p))
                            }
                            Some(_) => {}
                        }
                    }
                    if new.configs != old.configs {
                        delta.changed_topic_configs.push(name.clone());
                    }
                }
                _ => delta.deleted_topics.push((
                    name.clone(),
                    old.topic_id,
                    old.partitions.keys().copied().collect(),
                )),
            }
        }
        for (name, new) in &next.topics {
            let same = self.topic(name).is_some_and(|t| t.topic_id == new.topic_id);
            if !same {
                for p in new.partitions.keys() {
                    delta
                        .created_partitions
                        .push((name.clone(), new.topic_id, *p));
                }
            }
        }
        delta.changed_broker_configs = self.broker_configs != next.broker_configs;
        delta.changed_brokers = self.brokers != next.brokers;
        delta
    }

    fn apply_one(&mut self, record: &MetadataRecord, delta: &mut MetadataDelta) {
        match record {
            MetadataRecord::ClusterId { cluster_id } => self.cluster_id = cluster_id.clone(),
            MetadataRecord::RegisterBroker {
                broker_id,
                host,
                port,
                rack,
            } => {
                self.brokers.insert(
                    *broker_id,
                    BrokerImage {
                        broker_id: *broker_id,
                        host: host.clone(),
                        port: *port,
                        rack: rack.clone(),
                        fenced: false,
                    },
                );
                delta.changed_brokers = true;
            }
            MetadataRecord::FenceBroker { broker_id }
            | MetadataRecord::UnfenceBroker { broker_id } => {
                let fenced = matches!(record, MetadataRecord::FenceBroker { .. });
                if let Some(b) = self.brokers.get_mut(broker_id) {
                    b.fenced = fenced;
                    delta.changed_brokers = true;
                }
            }
            MetadataRecord::UnregisterBroker { broker_id } => {
                // Its dynamic settings stay, as in Kafka: a broker registering again under the
                // same id finds them.
                if self.brokers.remove(broker_id).is_some() {
                    delta.changed_brokers = true;
                }
            }
            MetadataRecord::Topic { name, topic_id } => {
                self.topic_names_by_id.insert(*topic_id, name.clone());
                self.topics.insert(
                    name.clone(),
                    Arc::new(TopicImage {
                        name: name.clone(),
                        topic_id: *topic_id,
                        partitions: BTreeMap::new(),
                        configs: BTreeMap::new(),
                    }),
                );
            }
            MetadataRecord::Partition {
                topic_id,
                partition,
                replicas,
                isr,
                leader,
                leader_epoch,
                partition_epoch,
                elr,
                last_known_elr,
                adding_replicas,
                removing_replicas,
            } => {
                let Some(name) = self.topic_names_by_id.get(topic_id).cloned() else {
                    return;
                };
                let Some(topic) = self.topics.get_mut(&name) else {
                    return;
                };
                let topic = Arc::make_mut(topic);
                let existed = topic.partitions.contains_key(partition);
                topic.partitions.insert(
                    *partition,
                    PartitionImage {
                        partition: *partition,
                        replicas: replicas.clone(),
                        isr: isr.clone(),
                        leader: *leader,
                        leader_epoch: *leader_epoch,
                        partition_epoch: *partition_epoch,
                        elr: elr.clone(),
                        last_known_elr: last_known_elr.clone(),
                        adding_replicas: adding_replicas.clone(),
                        removing_replicas: removing_replicas.clone(),
                    },
                );
                if !existed {
                    delta.created_partitions.push((name, *topic_id, *partition));
                } else if !delta
                    .changed_partitions
                    .contains(&(name.clone(), *partition))
                {
                    delta.changed_partitions.push((name, *partition));
                }
            }
            MetadataRecord::RemoveTopic { topic_id } => {
                if let Some(name) = self.topic_names_by_id.remove(topic_id) {
                    if let Some(topic) = self.topics.remove(&name) {
                        let parts = topic.partitions.keys().copied().collect();
                        delta
                            .created_partitions
                            .retain(|(n, id, _)| !(n == &name && id == topic_id));
                        delta.changed_partitions.retain(|(n, _)| n != &name);
                        delta.deleted_topics.push((name, *topic_id, parts));
                    }
                }
            }
            MetadataRecord::TopicConfig {
                topic_id,
                name,
                value,
            } => {
                let Some(topic_name) = self.topic_names_by_id.get(topic_id).cloned() else {
                    return;
                };
                if let Some(topic) = self.topics.get_mut(&topic_name) {
                    let topic = Arc::make_mut(topic);
                    match value {
                        Some(v) => topic.configs.insert(name.clone(), v.clone()),
                        None => topic.configs.remove(name),
                    };
                    if !delta.changed_topic_configs.contains(&topic_name) {
                        delta.changed_topic_configs.push(topic_name);
                    }
                }
            }
            MetadataRecord::BrokerConfig {
                broker_id,
                name,
                value,
            } => {
                let key = (*broker_id, name.clone());
                match value {
                    Some(v) => self.broker_configs.insert(key, v.clone()),
                    None => self.broker_configs.remove(&key),
                };
                delta.changed_broker_configs = true;
            }
            MetadataRecord::ProducerIds { next_producer_id } => {
                self.next_producer_id = (*next_producer_id).max(self.next_producer_id);
            }
            // The Raft layer's own (see `raft::state_machine`).
            MetadataRecord::VoterDirectory { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the image but `offset`.
    fn same_content(a: &MetadataImage, b: &MetadataImage) -> bool {
        a.cluster_id == b.cluster_id
            && a.brokers == b.brokers
            && a.topics == b.topics
            && a.topic_names_by_id == b.topic_names_by_id
            && a.next_producer_id == b.next_producer_id
            && a.broker_configs == b.broker_configs
    }

    #[test]
    fn to_records_round_trips() {
        let empty = MetadataImage::empty();
        assert!(empty.to_records().is_empty());
        let (t1, t2, gone) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let mut records = vec![
            MetadataRecord::ClusterId {
                cluster_id: "c-1".into(),
            },
            MetadataRecord::RegisterBroker {
                broker_id: 1,
                host: "h1".into(),
                port: 9092,
                rack: Some("r1".into()),
            },
            MetadataRecord::RegisterBroker {
                broker_id: 2,
                host: "h2".into(),
                port: 9093,
                rack: None,
            },
            // Registered, then gone for good (UnregisterBroker): absent from the snapshot.
            MetadataRecord::RegisterBroker {
                broker_id: 3,
                host: "h3".into(),
                port: 9094,
                rack: None,
            },
            MetadataRecord::FenceBroker { broker_id: 3 },
            MetadataRecord::UnregisterBroker { broker_id: 3 },
            MetadataRecord::BrokerConfig {
                broker_id: None,
                name: "log.retention.ms".into(),
                value: Some("1000".into()),
            },
            MetadataRecord::BrokerConfig {
                broker_id: Some(2),
                name: "x".into(),
                value: Some("y".into()),
            },
            MetadataRecord::BrokerConfig {
                broker_id: Some(2),
                name: "deleted".into(),
                value: Some("soon".into()),
            },
            MetadataRecord::BrokerConfig {
                broker_id: Some(2),
                name: "deleted".into(),
                value: None,
            },
            MetadataRecord::ProducerIds {
                next_producer_id: 5000,
            },
        ];
        for (name, id) in [("a", t1), ("b", t2), ("gone", gone)] {
            records.push(MetadataRecord::Topic {
                name: name.into(),
                topic_id: id,
            });
            records.push(MetadataRecord::TopicConfig {
                topic_id: id,
                name: "cleanup.policy".into(),
                value: Some("compact".into()),
            });
            for p in 0..3 {
                records.push(MetadataRecord::Partition {
                    topic_id: id,
                    partition: p,
                    replicas: vec![1, 2],
                    isr: vec![2],
                    leader: 2,
                    leader_epoch: p + 4,
                    partition_epoch: p + 7,
                    elr: vec![1],
                    last_known_elr: vec![],
                    adding_replicas: if p == 1 { vec![2] } else { vec![] },
                    removing_replicas: if p == 2 { vec![1] } else { vec![] },
                });
            }
        }
        records.push(MetadataRecord::RemoveTopic { topic_id: gone });
        let (img, _) = MetadataImage::empty().apply(0, &records);
        let rebuilt_records = img.to_records();
        let (rebuilt, _) = MetadataImage::empty().apply(100, &rebuilt_records);
        assert!(same_content(&img, &rebuilt), "{img:?}\n{rebuilt:?}");
        assert!(rebuilt.topic("gone").is_none());
        assert_eq!(
            rebuilt.brokers.keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(rebuilt.topic("a").unwrap().partitions.len(), 3);
        // Idempotent: a snapshot of a snapshot is the same records.
        assert_eq!(rebuilt.to_records(), rebuilt_records);
    }

    /// Found by the controller simulation: snapshots wrote fenced brokers as registrations
    /// only, and registering unfences, so every fenced broker came back live.
    #[test]
    fn snapshots_keep_fenced_brokers_fenced() {
        let records: Vec<MetadataRecord> = [1, 2]
            .into_iter()
            .map(|broker_id| MetadataRecord::RegisterBroker {
                broker_id,
                host: "h".into(),
                port: 9092,
                rack: None,
            })
            .chain([MetadataRecord::FenceBroker { broker_id: 2 }])
            .collect();
        let (img, _) = MetadataImage::empty().apply(0, &records);
        let (rebuilt, _) = MetadataImage::empty().apply(0, &img.to_records());
        assert!(rebuilt.is_live(1));
        assert!(!rebuilt.is_live(2), "{:?}", rebuilt.brokers);
        assert_eq!(rebuilt.brokers, img.brokers);
    }

    #[test]
    fn replay_builds_topics_and_deltas() {
        let id = [7u8; 16];
        let records = vec![
            MetadataRecord::Topic {
                name: "t".into(),
                topic_id: id,
            },
            MetadataRecord::Partition {
                topic_id: id,
                partition: 0,
                replicas: vec![1],
                isr: vec![1],
                leader: 1,
                leader_epoch: 0,
                partition_epoch: 0,
                elr: vec![],
                last_known_elr: vec![],
                adding_replicas: vec![],
                removing_replicas: vec![],
            },
        ];
        let (img, delta) = MetadataImage::empty().apply(0, &records);
        assert_eq!(img.offset, 1);
        assert_eq!(img.topic("t").unwrap().partitions.len(), 1);
        assert_eq!(delta.created_partitions, vec![("t".to_string(), id, 0)]);
        let (img2, delta2) = img.apply(2, &[MetadataRecord::RemoveTopic { topic_id: id }]);
        assert!(img2.topic("t").is_none());
        assert!(img2.topic_by_id(&id).is_none());
        assert_eq!(delta2.deleted_topics, vec![("t".to_string(), id, vec![0])]);
        // The old image is untouched: readers holding it keep a consistent view.
        assert!(img.topic("t").is_some());
    }
}
