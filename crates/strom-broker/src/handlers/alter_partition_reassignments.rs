//! AlterPartitionReassignments (KIP-455): start, replace or cancel (`replicas: null`) the
//! reassignment of partitions. Any broker serves it: the controller logic builds the records
//! and they commit like every other metadata change; the replicas then move on their own (new
//! ones fetch, join the ISR, and the ISR change that completes the target finishes the move).

use std::sync::Arc;

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse,
};

use super::{message, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::AdminError;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: AlterPartitionReassignmentsRequest = ctx.decode()?;
    // KIP-860: version 0 has no such field and always allows it.
    let allow_rf_change = ctx.version < 1 || req.allow_replication_factor_change;
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let mut responses = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let name = t.name.0.to_string();
            let mut parts = Vec::with_capacity(t.partitions.len());
            for p in t.partitions {
                let target: Option<Vec<i32>> =
                    p.replicas.map(|rs| rs.into_iter().map(|b| b.0).collect());
                let outcome = broker
                    .commit_metadata_async::<AdminError>(|img| {
                        Ok(broker.controller().alter_partition_reassignment(
                            img,
                            &name,
                            p.partition_index,
                            target.as_deref(),
                            allow_rf_change,
                        )?)
                    })
                    .await;
                let mut r =
                    ReassignablePartitionResponse::default().with_partition_index(p.partition_index);
                match outcome {
                    Ok(_) => {
                        tracing::info!(topic = %name, partition = p.partition_index, ?target, "partition reassignment changed")
                    }
                    Err(e) => {
                        r.error_code = e.code().code();
                        r.error_message = message(&e);
                    }
                }
                parts.push(r);
            }
            responses.push(
                ReassignableTopicResponse::default()
                    .with_name(t.name)
                    .with_partitions(parts),
            );
        }
        AlterPartitionReassignmentsResponse::default()
            .with_allow_replication_factor_change(allow_rf_change)
            .with_responses(responses)
    }))
}
