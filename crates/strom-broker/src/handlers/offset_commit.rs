//! OffsetCommit: committed offsets of a group member (or of a standalone consumer with
//! generation -1), answered once durable in `__consumer_offsets`.

use std::sync::Arc;

use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
use strom_group::coordinator::OffsetCommit;

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: OffsetCommitRequest = ctx.decode()?;
    let commits: Vec<OffsetCommit> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| OffsetCommit {
                topic: t.name.0.to_string(),
                partition: p.partition_index,
                offset: p.committed_offset,
                leader_epoch: p.committed_leader_epoch,
                metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
            })
        })
        .collect();
    let topics_in_order: Vec<_> = req.topics.iter().map(|t| t.name.clone()).collect();
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let image = broker.image();
        let exists = |t: &str, p: i32| {
            image
                .topic(t)
                .is_some_and(|t| t.partitions.contains_key(&p))
        };
        let all: Vec<(String, i32)> = commits
            .iter()
            .map(|c| (c.topic.clone(), c.partition))
            .collect();
        let results = broker
            .groups
            .commit_offsets(
                &*broker,
                req.group_id.0.as_str(),
                req.member_id.as_str(),
                req.group_instance_id.as_deref(),
                req.generation_id_or_member_epoch,
                commits,
                &exists,
                broker.now_ms(),
            )
            .await;
        // One error for every partition when the whole commit failed.
        let codes: Vec<(String, i32, i16)> = match results {
            Ok(r) => r
                .into_iter()
                .map(|(t, p, r)| (t, p, r.err().map_or(0, |e| e.code())))
                .collect(),
            Err(e) => all.into_iter().map(|(t, p)| (t, p, e.code())).collect(),
        };
        let topics = topics_in_order
            .into_iter()
            .map(|name| {
                let partitions = codes
                    .iter()
                    .filter(|(t, _, _)| t.as_str() == name.0.as_str())
                    .map(|(_, p, code)| {
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(*p)
                            .with_error_code(*code)
                    })
                    .collect();
                OffsetCommitResponseTopic::default()
                    .with_name(name)
                    .with_partitions(partitions)
            })
            .collect();
        OffsetCommitResponse::default().with_topics(topics)
    }))
}
