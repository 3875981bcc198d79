//! ListPartitionReassignments (KIP-455): the ongoing reassignments, of every partition or of
//! the requested ones, as this broker's metadata image has them.

use std::sync::Arc;

use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    BrokerId, ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};
use strom_meta::image::PartitionImage;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

fn ids(v: &[i32]) -> Vec<BrokerId> {
    v.iter().map(|b| BrokerId(*b)).collect()
}

fn ongoing(p: &PartitionImage) -> OngoingPartitionReassignment {
    OngoingPartitionReassignment::default()
        .with_partition_index(p.partition)
        .with_replicas(ids(&p.replicas))
        .with_adding_replicas(ids(&p.adding_replicas))
        .with_removing_replicas(ids(&p.removing_replicas))
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ListPartitionReassignmentsRequest = ctx.decode()?;
    let image = broker.image();
    let mut topics = Vec::new();
    let mut push = |name: &str, parts: Vec<OngoingPartitionReassignment>| {
        if !parts.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(TopicName(str_bytes(name)))
                    .with_partitions(parts),
            );
        }
    };
    match req.topics {
        None => {
            for t in image.topics.values() {
                let parts = t
                    .partitions
                    .values()
                    .filter(|p| p.is_reassigning())
                    .map(ongoing)
                    .collect();
                push(&t.name, parts);
            }
        }
        Some(requested) => {
            for rt in requested {
                let Some(t) = image.topic(rt.name.0.as_str()) else {
                    continue;
                };
                let parts = rt
                    .partition_indexes
                    .iter()
                    .filter_map(|i| t.partitions.get(i))
                    .filter(|p| p.is_reassigning())
                    .map(ongoing)
                    .collect();
                push(&t.name, parts);
            }
        }
    }
    ctx.reply(&ListPartitionReassignmentsResponse::default().with_topics(topics))
}
