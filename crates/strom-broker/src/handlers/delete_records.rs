//! DeleteRecords: moves partitions' log start offsets forward (-1: to the high watermark);
//! whole segments below go at once. Past the high watermark: OFFSET_OUT_OF_RANGE.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use strom_group::coordinator::OFFSETS_TOPIC;

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::log_error_code;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DeleteRecordsRequest = ctx.decode()?;
    let topics = tokio::task::block_in_place(|| {
        req.topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut r = DeleteRecordsPartitionResult::default()
                            .with_partition_index(p.partition_index)
                            .with_low_watermark(-1);
                        match broker.replicas.get(t.name.0.as_str(), p.partition_index) {
                            None => r.error_code = ResponseError::UnknownTopicOrPartition.code(),
                            Some(_) if t.name.0.as_str() == OFFSETS_TOPIC => {
                                r.error_code = ResponseError::InvalidTopicException.code()
                            }
                            Some(part) => match part.delete_records(p.offset) {
                                Ok(start) => r.low_watermark = start,
                                Err(e) => r.error_code = log_error_code(&e).code(),
                            },
                        }
                        r
                    })
                    .collect();
                DeleteRecordsTopicResult::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions)
            })
            .collect()
    });
    ctx.reply(&DeleteRecordsResponse::default().with_topics(topics))
}
