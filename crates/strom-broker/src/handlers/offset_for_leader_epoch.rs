//! OffsetForLeaderEpoch (KIP-101, KIP-279, KIP-320): for each partition, the largest leader
//! epoch at or below the one asked for and the offset where it ends on this leader. Followers
//! use it to find where their log diverges; clients use it to detect truncation.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::log_error_code;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: OffsetForLeaderEpochRequest = ctx.decode()?;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let mut r = EpochEndOffset::default()
                .with_partition(p.partition)
                .with_leader_epoch(-1)
                .with_end_offset(-1);
            let code = match broker.replicas.get(t.topic.0.as_str(), p.partition) {
                None => Some(ResponseError::UnknownTopicOrPartition),
                Some(part) if !part.is_leader() => Some(ResponseError::NotLeaderOrFollower),
                Some(part)
                    if p.current_leader_epoch >= 0
                        && p.current_leader_epoch < part.leader_epoch() =>
                {
                    Some(ResponseError::FencedLeaderEpoch)
                }
                Some(part) if p.current_leader_epoch > part.leader_epoch() => {
                    Some(ResponseError::UnknownLeaderEpoch)
                }
                Some(part) => match part.end_offset_for_epoch(p.leader_epoch) {
                    Ok((epoch, end)) => {
                        r.leader_epoch = epoch;
                        r.end_offset = end;
                        None
                    }
                    Err(e) => Some(log_error_code(&e)),
                },
            };
            if let Some(code) = code {
                r.error_code = code.code();
            }
            parts.push(r);
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(parts),
        );
    }
    ctx.reply(&OffsetForLeaderEpochResponse::default().with_topics(topics))
}
