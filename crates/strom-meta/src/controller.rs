//! The controller: turns admin requests into metadata records, given the current image. It is a
//! pure function of its inputs (no clock, no randomness, no I/O) so that the same logic runs in
//! a simulated cluster later; callers supply topic ids and append the records to the log.

use std::collections::BTreeMap;

use crate::image::MetadataImage;
use crate::record::{MetadataRecord, TopicId};

/// Kafka's limit on topic name length (`Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_NAME_CHARS: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error("topic '{0}' already exists")]
    TopicAlreadyExists(String),
    #[error("{0}")]
    InvalidTopic(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidReplicationFactor(String),
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
}

#[derive(Debug, Clone)]
pub struct CreateTopicSpec {
    pub name: String,
    pub topic_id: TopicId,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Controller {
    /// Upper bound on partitions in one topic, to keep a typo from creating a million logs.
    pub max_partitions_per_topic: i32,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            max_partitions_per_topic: 100_000,
        }
    }
}

/// Kafka's legal topic names: `[a-zA-Z0-9._-]`, 1..=249 characters, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), ControllerError> {
    if name.is_empty() {
        return Err(ControllerError::InvalidTopic("topic name is empty".into()));
    }
    if name == "." || name == ".." {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name cannot be '{name}'"
        )));
    }
    if name.chars().count() > MAX_TOPIC_NAME_CHARS {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name is longer than {MAX_TOPIC_NAME_CHARS} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name '{name}' contains '{c}'; legal characters are ASCII alphanumerics, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Names that differ only in '.' versus '_' collide in metric names; Kafka refuses the second.
fn collision_key(name: &str) -> String {
    name.replace('.', "_")
}

impl Controller {
    fn placement(&self, image: &MetadataImage, partition: i32, rf: usize) -> Vec<i32> {
        let brokers: Vec<i32> = image.brokers.keys().copied().collect();
        (0..rf)
            .map(|i| brokers[(partition as usize + i) % brokers.len()])
            .collect()
    }

    fn partition_records(
        &self,
        image: &MetadataImage,
        topic_id: TopicId,
        partitions: std::ops::Range<i32>,
        rf: usize,
    ) -> Vec<MetadataRecord> {
        partitions
            .map(|p| {
                let replicas = self.placement(image, p, rf);
                MetadataRecord::Partition {
                    topic_id,
                    partition: p,
                    leader: replicas[0],
                    isr: replicas.clone(),
                    replicas,
                    leader_epoch: 0,
                    partition_epoch: 0,
                }
            })
            .collect()
    }

    pub fn create_topic(
        &self,
        image: &MetadataImage,
        spec: &CreateTopicSpec,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        validate_topic_name(&spec.name)?;
        if image.topics.contains_key(&spec.name) {
            return Err(ControllerError::TopicAlreadyExists(spec.name.clone()));
        }
        let key = collision_key(&spec.name);
        if let Some(other) = image.topics.keys().find(|n| collision_key(n) == key) {
            return Err(ControllerError::InvalidTopic(format!(
                "topic '{}' collides with existing topic '{other}' ('.' and '_' are the same in metric names)",
                spec.name
            )));
        }
        if spec.num_partitions <= 0 || spec.num_partitions > self.max_partitions_per_topic {
            return Err(ControllerError::InvalidPartitions(format!(
                "number of partitions must be between 1 and {}, got {}",
                self.max_partitions_per_topic, spec.num_partitions
            )));
        }
        let live = image.brokers.len();
        if spec.replication_factor <= 0 || spec.replication_factor as usize > live {
            return Err(ControllerError::InvalidReplicationFactor(format!(
                "replication factor {} is not between 1 and the {live} available broker(s)",
                spec.replication_factor
            )));
        }
        let mut records = vec![MetadataRecord::Topic {
            name: spec.name.clone(),
            topic_id: spec.topic_id,
        }];
        for (name, value) in &spec.configs {
            records.push(MetadataRecord::TopicConfig {
                topic_id: spec.topic_id,
                name: name.clone(),
                value: Some(value.clone()),
            });
        }
        records.extend(self.partition_records(
            image,
            spec.topic_id,
            0..spec.num_partitions,
            spec.replication_factor as usize,
        ));
        Ok(records)
    }

    pub fn delete_topic(
        &self,
        image: &MetadataImage,
        name: &str,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let topic = image
            .topic(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        Ok(vec![MetadataRecord::RemoveTopic {
            topic_id: topic.topic_id,
        }])
    }

    pub fn create_partitions(
        &self,
        image: &MetadataImage,
        name: &str,
        new_count: i32,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let topic = image
            .topic(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        let current = topic.partitions.len() as i32;
        if new_count <= current {
            return Err(ControllerError::InvalidPartitions(format!(
                "topic currently has {current} partitions, {new_count} would not be an increase"
            )));
        }
        if new_count > self.max_partitions_per_topic {
            return Err(ControllerError::InvalidPartitions(format!(
                "number of partitions must be at most {}",
                self.max_partitions_per_topic
            )));
        }
        let rf = topic
            .partitions
            .values()
            .next()
            .map(|p| p.replicas.len())
            .unwrap_or(1)
            .min(image.brokers.len().max(1));
        Ok(self.partition_records(image, topic.topic_id, current..new_count, rf))
    }

    /// A block of `count` producer ids: returns the first id and the record that reserves it.
    pub fn allocate_producer_ids(
        &self,
        image: &MetadataImage,
        count: i64,
    ) -> (i64, MetadataRecord) {
        let first = image.next_producer_id;
        (
            first,
            MetadataRecord::ProducerIds {
                next_producer_id: first + count,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_broker() -> MetadataImage {
        let (img, _) = MetadataImage::empty().apply(
            0,
            &[MetadataRecord::RegisterBroker {
                broker_id: 1,
                host: "h".into(),
                port: 9092,
                rack: None,
            }],
        );
        img
    }

    fn spec(name: &str, parts: i32) -> CreateTopicSpec {
        CreateTopicSpec {
            name: name.into(),
            topic_id: [name.len() as u8; 16],
            num_partitions: parts,
            replication_factor: 1,
            configs: BTreeMap::new(),
        }
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic_name("a.b_c-D9").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
        assert!(validate_topic_name(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn create_grow_delete() {
        let c = Controller::default();
        let img = image_with_broker();
        let recs = c.create_topic(&img, &spec("t.x", 2)).unwrap();
        let (img, _) = img.apply(1, &recs);
        assert_eq!(img.topic("t.x").unwrap().partitions.len(), 2);
        assert_eq!(
            c.create_topic(&img, &spec("t.x", 1)),
            Err(ControllerError::TopicAlreadyExists("t.x".into()))
        );
        assert!(matches!(
            c.create_topic(&img, &spec("t_x", 1)),
            Err(ControllerError::InvalidTopic(_))
        ));
        assert!(c.create_partitions(&img, "t.x", 2).is_err());
        let recs = c.create_partitions(&img, "t.x", 5).unwrap();
        assert_eq!(recs.len(), 3);
        let (img, delta) = img.apply(10, &recs);
        assert_eq!(delta.created_partitions.len(), 3);
        assert_eq!(img.topic("t.x").unwrap().partitions.len(), 5);
        let mut rf2 = spec("y", 1);
        rf2.replication_factor = 2;
        assert!(matches!(
            c.create_topic(&img, &rf2),
            Err(ControllerError::InvalidReplicationFactor(_))
        ));
        let recs = c.delete_topic(&img, "t.x").unwrap();
        let (img, delta) = img.apply(20, &recs);
        assert!(img.topic("t.x").is_none());
        assert_eq!(delta.deleted_topics[0].2.len(), 5);
    }
}
