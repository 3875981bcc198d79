//! Topic administration shared by CreateTopics and auto-creation in Metadata: validation, the
//! controller call and the metadata commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use strom_meta::{CreateTopicSpec, TopicImage};

use crate::broker::Broker;
use crate::error::AdminError;

pub fn new_topic_id() -> [u8; 16] {
    // Never the all-zero id, which the wire uses for "no id".
    loop {
        let id = *uuid::Uuid::new_v4().as_bytes();
        if id != [0u8; 16] {
            return id;
        }
    }
}

/// Creates a topic (or, with `validate_only`, checks that it could be created).
pub fn create_topic(
    broker: &Broker,
    name: &str,
    num_partitions: i32,
    replication_factor: i16,
    configs: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<Option<Arc<TopicImage>>, AdminError> {
    let num_partitions = if num_partitions == -1 {
        broker.config.i64("num.partitions") as i32
    } else {
        num_partitions
    };
    let replication_factor = if replication_factor == -1 {
        broker.config.i64("default.replication.factor") as i16
    } else {
        replication_factor
    };
    let spec = CreateTopicSpec {
        name: name.to_string(),
        topic_id: new_topic_id(),
        num_partitions,
        replication_factor,
        configs,
    };
    if validate_only {
        broker.controller().create_topic(&broker.image(), &spec)?;
        return Ok(None);
    }
    let image = broker
        .commit_metadata::<AdminError>(|img| Ok(broker.controller().create_topic(img, &spec)?))?;
    Ok(image.topic(name).cloned())
}

/// Why a topic's configs could not be changed: the wire error and a message saying what.
pub struct ConfigChangeError(pub kafka_protocol::error::ResponseError, pub String);

impl ConfigChangeError {
    /// A resource other than a topic: dynamic broker settings are not served yet.
    pub fn not_a_topic() -> Self {
        ConfigChangeError(
            kafka_protocol::error::ResponseError::InvalidRequest,
            "only topic configs can be changed yet (dynamic broker configs are not supported)"
                .into(),
        )
    }
}

/// Replaces a topic's config overrides with `build(current)` (AlterConfigs and
/// IncrementalAlterConfigs): the change is a set of TopicConfig records in the metadata log,
/// applied to the partitions live. With `validate_only` nothing changes.
pub fn change_topic_configs(
    broker: &Broker,
    name: &str,
    build: impl FnOnce(
        &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, crate::config::ConfigError>,
    validate_only: bool,
) -> Result<(), ConfigChangeError> {
    use kafka_protocol::error::ResponseError;
    use strom_meta::MetadataRecord;
    let unknown = || {
        ConfigChangeError(
            ResponseError::UnknownTopicOrPartition,
            format!("topic {name} does not exist"),
        )
    };
    let image = broker.image();
    let topic = image.topic(name).ok_or_else(unknown)?;
    let wanted = build(&topic.configs)
        .map_err(|e| ConfigChangeError(ResponseError::InvalidConfig, e.to_string()))?;
    if validate_only {
        return Ok(());
    }
    let diff = |current: &BTreeMap<String, String>, topic_id| -> Vec<MetadataRecord> {
        let mut records: Vec<MetadataRecord> = wanted
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| MetadataRecord::TopicConfig {
                topic_id,
                name: k.clone(),
                value: Some(v.clone()),
            })
            .collect();
        records.extend(
            current
                .keys()
                .filter(|k| !wanted.contains_key(*k))
                .map(|k| MetadataRecord::TopicConfig {
                    topic_id,
                    name: k.clone(),
                    value: None,
                }),
        );
        records
    };
    broker
        .commit_metadata::<String>(|img| {
            let t = img
                .topic(name)
                .ok_or_else(|| format!("topic {name} does not exist"))?;
            Ok(diff(&t.configs, t.topic_id))
        })
        .map_err(|e| ConfigChangeError(ResponseError::UnknownServerError, e))?;
    tracing::info!(topic = name, "topic configs changed");
    Ok(())
}
