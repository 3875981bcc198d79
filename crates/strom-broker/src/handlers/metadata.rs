//! Metadata: brokers, controller, topics with partitions, leaders and replicas. Creates missing
//! topics when both the broker (`auto.create.topics.enable`) and the client allow it, answering
//! with the new topic's leader already present.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use strom_meta::controller::validate_topic_name;
use strom_meta::{MetadataImage, TopicImage};
use uuid::Uuid;

use strom_group::coordinator::OFFSETS_TOPIC;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::AdminError;
use crate::topics;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: MetadataRequest = ctx.decode()?;
    let v = ctx.version;
    let mut image = broker.image();
    // v0: an empty list means all topics; v1+: null means all, empty means none.
    let all = match &req.topics {
        None => true,
        Some(t) => t.is_empty() && v == 0,
    };
    let allow_auto =
        (v < 4 || req.allow_auto_topic_creation) && broker.config.bool("auto.create.topics.enable");

    let mut topics = Vec::new();
    if all {
        for t in image.topics.values() {
            topics.push(topic_entry(&image, t, v));
        }
    } else {
        for requested in req.topics.iter().flatten() {
            match &requested.name {
                Some(name) => {
                    let name = name.0.as_str();
                    if let Some(t) = image.topic(name) {
                        topics.push(topic_entry(&image, t, v));
                        continue;
                    }
                    if let Err(e) = validate_topic_name(name) {
                        tracing::debug!(topic = name, error = %e, "metadata for invalid topic name");
                        topics.push(error_entry(
                            Some(name),
                            None,
                            ResponseError::InvalidTopicException,
                            v,
                        ));
                        continue;
                    }
                    // Internal topics are created by their coordinator, never auto-created.
                    if !allow_auto || name == OFFSETS_TOPIC {
                        topics.push(error_entry(
                            Some(name),
                            None,
                            ResponseError::UnknownTopicOrPartition,
                            v,
                        ));
                        continue;
                    }
                    match topics::create_topic(broker, name, -1, -1, Default::default(), false) {
                        Ok(_)
                        | Err(AdminError::Controller(
                            strom_meta::ControllerError::TopicAlreadyExists(_),
                        )) => {
                            image = broker.image();
                            match image.topic(name) {
                                Some(t) => topics.push(topic_entry(&image, t, v)),
                                None => topics.push(error_entry(
                                    Some(name),
                                    None,
                                    ResponseError::UnknownTopicOrPartition,
                                    v,
                                )),
                            }
                            tracing::info!(topic = name, "auto-created topic");
                        }
                        Err(e) => {
                            tracing::warn!(topic = name, error = %e, "auto-create failed");
                            topics.push(error_entry(Some(name), None, e.code(), v));
                        }
                    }
                }
                None => {
                    let id = *requested.topic_id.as_bytes();
                    match image.topic_by_id(&id) {
                        Some(t) => topics.push(topic_entry(&image, t, v)),
                        None => topics.push(error_entry(
                            None,
                            Some(id),
                            ResponseError::UnknownTopicId,
                            v,
                        )),
                    }
                }
            }
        }
    }

    // Kafka lists the brokers that are alive (registered and not fenced).
    let brokers = image
        .live_brokers()
        .map(|b| {
            let mut e = MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.broker_id))
                .with_host(str_bytes(&b.host))
                .with_port(b.port);
            if v >= 1 {
                e.rack = b.rack.as_deref().map(str_bytes);
            }
            e
        })
        .collect();
    let mut resp = MetadataResponse::default()
        .with_brokers(brokers)
        .with_topics(topics);
    if v >= 1 {
        resp.controller_id = BrokerId(broker.controller_id());
    }
    if v >= 2 {
        resp.cluster_id = Some(str_bytes(&image.cluster_id));
    }
    ctx.reply(&resp)
}

fn error_entry(
    name: Option<&str>,
    id: Option<[u8; 16]>,
    code: ResponseError,
    v: i16,
) -> MetadataResponseTopic {
    let mut t = MetadataResponseTopic::default()
        .with_error_code(code.code())
        .with_name(name.map(|n| TopicName(str_bytes(n))));
    if v >= 10 {
        if let Some(id) = id {
            t.topic_id = Uuid::from_bytes(id);
        }
    }
    if v < 12 && t.name.is_none() {
        t.name = Some(TopicName(str_bytes("")));
    }
    t
}

fn topic_entry(image: &MetadataImage, t: &TopicImage, v: i16) -> MetadataResponseTopic {
    let partitions = t
        .partitions
        .values()
        .map(|p| {
            let offline: Vec<BrokerId> = p
                .replicas
                .iter()
                .filter(|r| !image.is_live(**r))
                .map(|r| BrokerId(*r))
                .collect();
            let mut e = MetadataResponsePartition::default()
                .with_partition_index(p.partition)
                .with_leader_id(BrokerId(p.leader))
                .with_replica_nodes(p.replicas.iter().map(|r| BrokerId(*r)).collect())
                .with_isr_nodes(p.isr.iter().map(|r| BrokerId(*r)).collect());
            if v >= 7 {
                e.leader_epoch = p.leader_epoch;
            }
            if v >= 5 {
                e.offline_replicas = offline;
            }
            e
        })
        .collect();
    let mut e = MetadataResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(&t.name))))
        .with_partitions(partitions);
    if v >= 1 {
        e.is_internal = t.name == OFFSETS_TOPIC;
    }
    if v >= 10 {
        e.topic_id = Uuid::from_bytes(t.topic_id);
    }
    e
}
