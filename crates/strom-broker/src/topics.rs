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
