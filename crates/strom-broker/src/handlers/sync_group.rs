//! SyncGroup: the leader hands in the assignment; every member waits for its share, which is
//! answered once the group's metadata is durable in `__consumer_offsets`.

use std::sync::Arc;

use kafka_protocol::messages::{SyncGroupRequest, SyncGroupResponse};

use super::{group_code, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: SyncGroupRequest = ctx.decode()?;
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let assignments = req
            .assignments
            .iter()
            .map(|a| (a.member_id.to_string(), a.assignment.clone()))
            .collect();
        let r = broker
            .groups
            .sync(
                &*broker,
                req.group_id.0.as_str(),
                req.member_id.as_str(),
                req.group_instance_id.as_deref(),
                req.generation_id,
                req.protocol_type.as_deref(),
                req.protocol_name.as_deref(),
                assignments,
                broker.now_ms(),
            )
            .await;
        SyncGroupResponse::default()
            .with_error_code(group_code(r.error))
            .with_protocol_type(r.protocol_type.as_deref().map(str_bytes))
            .with_protocol_name(r.protocol_name.as_deref().map(str_bytes))
            .with_assignment(r.assignment)
    }))
}
