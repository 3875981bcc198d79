//! ListOffsets: earliest (-2), latest (-1), max timestamp (-3, KIP-734), or the first offset at
//! or after a timestamp.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::log_error_code;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ListOffsetsRequest = ctx.decode()?;
    let v = ctx.version;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let mut r =
                ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
            match broker.replicas.get(t.name.0.as_str(), p.partition_index) {
                None => r.error_code = ResponseError::UnknownTopicOrPartition.code(),
                Some(part) if !part.is_leader() => {
                    r.error_code = ResponseError::NotLeaderOrFollower.code()
                }
                Some(part)
                    if p.current_leader_epoch >= 0
                        && p.current_leader_epoch < part.leader_epoch() =>
                {
                    r.error_code = ResponseError::FencedLeaderEpoch.code()
                }
                Some(part)
                    if p.current_leader_epoch >= 0
                        && p.current_leader_epoch > part.leader_epoch() =>
                {
                    r.error_code = ResponseError::UnknownLeaderEpoch.code()
                }
                Some(part) => {
                    let epoch = part.leader_epoch();
                    let found = match p.timestamp {
                        LATEST => Ok(Some((-1, part.high_watermark()))),
                        EARLIEST => Ok(Some((-1, part.log_start_offset()))),
                        MAX_TIMESTAMP => part.max_timestamp_and_offset(),
                        ts if ts >= 0 => part
                            .offset_for_timestamp(ts)
                            .map(|found| found.map(|(offset, ts)| (ts, offset))),
                        _ => Err(strom_log::LogError::Corrupt(String::new())),
                    };
                    match found {
                        Ok(Some((ts, offset))) => {
                            r.timestamp = ts;
                            r.offset = offset;
                            if v >= 4 {
                                r.leader_epoch = epoch;
                            }
                        }
                        Ok(None) => {
                            // No record at or after the timestamp: Kafka answers offset -1.
                            r.timestamp = -1;
                            r.offset = -1;
                        }
                        Err(strom_log::LogError::Corrupt(_)) if p.timestamp < 0 => {
                            // -4 / -5 belong to tiered storage, which Strom does not have.
                            r.error_code = ResponseError::UnsupportedVersion.code();
                        }
                        Err(e) => r.error_code = log_error_code(&e).code(),
                    }
                }
            }
            parts.push(r);
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    ctx.reply(&ListOffsetsResponse::default().with_topics(topics))
}
