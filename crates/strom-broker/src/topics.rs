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
    /// A resource type that has no settings to change.
    pub fn unsupported_resource(kind: i8) -> Self {
        ConfigChangeError(
            kafka_protocol::error::ResponseError::InvalidRequest,
            format!("resource type {kind} has no settings that can be changed"),
        )
    }
}

/// Which broker a BROKER resource names: "" is the cluster-wide default.
fn broker_target(broker: &Broker, name: &str) -> Result<Option<i32>, ConfigChangeError> {
    if name.is_empty() {
        return Ok(None);
    }
    let id: i32 = name.parse().map_err(|_| {
        ConfigChangeError(
            kafka_protocol::error::ResponseError::InvalidRequest,
            format!("broker resource name {name} is not a node id"),
        )
    })?;
    if !broker.image().brokers.contains_key(&id) {
        return Err(ConfigChangeError(
            kafka_protocol::error::ResponseError::InvalidRequest,
            format!("no broker {id}"),
        ));
    }
    Ok(Some(id))
}

/// A change to it voids the eligible leader replicas it applies to
/// (`Controller::clear_eligible_leader_replicas`).
pub(crate) const MIN_ISR: &str = "min.insync.replicas";

/// Changes dynamic broker settings: `changes` gives a value to set or `None` to delete; with
/// `replace_all` (legacy AlterConfigs) every other dynamic setting of that resource goes.
/// Stored in the metadata log; topics pick up new defaults at once.
pub fn change_broker_configs(
    broker: &Broker,
    name: &str,
    changes: &[(String, Option<String>)],
    replace_all: bool,
    validate_only: bool,
) -> Result<(), ConfigChangeError> {
    use kafka_protocol::error::ResponseError;
    use strom_meta::MetadataRecord;
    let target = broker_target(broker, name)?;
    let mut records = Vec::new();
    for (k, v) in changes {
        if k == MIN_ISR && v.is_none() && target.is_none() && broker.raft().is_some() {
            return Err(ConfigChangeError(
                ResponseError::InvalidConfig,
                format!("the cluster-wide {MIN_ISR} cannot be removed, only changed"),
            ));
        }
        if k == MIN_ISR && v.is_some() && target.is_some() {
            // Leaders and the controller must agree on it (Kafka refuses it per broker too
            // once eligible leader replicas are on).
            return Err(ConfigChangeError(
                ResponseError::InvalidConfig,
                format!("{MIN_ISR} is set for the cluster (the default broker resource) or per topic, not for one broker"),
            ));
        }
        let value = match v {
            Some(v) => Some(
                crate::config::validate_dynamic_broker_config(k, v)
                    .map_err(|e| ConfigChangeError(ResponseError::InvalidConfig, e.to_string()))?,
            ),
            None => None,
        };
        records.push(MetadataRecord::BrokerConfig {
            broker_id: target,
            name: k.clone(),
            value,
        });
    }
    if validate_only {
        return Ok(());
    }
    broker
        .commit_metadata::<String>(|img| {
            let mut all = records.clone();
            if replace_all {
                all.extend(
                    img.broker_configs
                        .keys()
                        .filter(|(id, n)| *id == target && !changes.iter().any(|(k, _)| k == n))
                        // Legacy AlterConfigs replaces the whole set, but the cluster-wide
                        // min.insync.replicas stays (see above).
                        .filter(|(id, n)| {
                            !(id.is_none() && n.as_str() == MIN_ISR && broker.raft().is_some())
                        })
                        .map(|(id, n)| MetadataRecord::BrokerConfig {
                            broker_id: *id,
                            name: n.clone(),
                            value: None,
                        }),
                );
            }
            if all
                .iter()
                .any(|r| matches!(r, MetadataRecord::BrokerConfig { name, .. } if name == MIN_ISR))
            {
                // A new default may apply to any topic: every ELR goes (as in Kafka).
                let cleared = broker
                    .controller()
                    .clear_eligible_leader_replicas(img, |_| true);
                all.extend(cleared);
            }
            Ok(all)
        })
        .map_err(|e| ConfigChangeError(ResponseError::UnknownServerError, e))?;
    tracing::info!(broker = name, "dynamic broker configs changed");
    Ok(())
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
            let mut records = diff(&t.configs, t.topic_id);
            if records
                .iter()
                .any(|r| matches!(r, MetadataRecord::TopicConfig { name, .. } if name == MIN_ISR))
            {
                let id = t.topic_id;
                let cleared = broker
                    .controller()
                    .clear_eligible_leader_replicas(img, |x| x.topic_id == id);
                records.extend(cleared);
            }
            Ok(records)
        })
        .map_err(|e| ConfigChangeError(ResponseError::UnknownServerError, e))?;
    tracing::info!(topic = name, "topic configs changed");
    Ok(())
}
