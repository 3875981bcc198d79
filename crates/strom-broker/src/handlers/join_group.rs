//! JoinGroup: held until the group's rebalance completes (or answered at once with an error,
//! MEMBER_ID_REQUIRED for a v4+ member without an id, or the current generation).

use std::sync::Arc;

use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{JoinGroupRequest, JoinGroupResponse};
use strom_group::group::JoinRequest;

use super::{group_code, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: JoinGroupRequest = ctx.decode()?;
    let v = ctx.version;
    let join = JoinRequest {
        member_id: req.member_id.to_string(),
        group_instance_id: req.group_instance_id.as_ref().map(|s| s.to_string()),
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.peer.ip()),
        session_timeout_ms: req.session_timeout_ms,
        // v0 has no rebalance timeout: Kafka uses the session timeout.
        rebalance_timeout_ms: if v >= 1 {
            req.rebalance_timeout_ms
        } else {
            req.session_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect(),
        require_known_member_id: v >= 4,
    };
    let group_id = req.group_id.0.to_string();
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let r = broker
            .groups
            .join(&*broker, &group_id, join, broker.now_ms())
            .await;
        JoinGroupResponse::default()
            .with_error_code(group_code(r.error))
            .with_generation_id(r.generation)
            .with_protocol_type(r.protocol_type.as_deref().map(str_bytes))
            .with_protocol_name(
                // Before v7 the name is not nullable.
                Some(str_bytes(r.protocol_name.as_deref().unwrap_or(""))),
            )
            .with_leader(str_bytes(&r.leader))
            .with_skip_assignment(r.skip_assignment && v >= 9)
            .with_member_id(str_bytes(&r.member_id))
            .with_members(
                r.members
                    .into_iter()
                    .map(|m| {
                        JoinGroupResponseMember::default()
                            .with_member_id(str_bytes(&m.member_id))
                            .with_group_instance_id(m.group_instance_id.as_deref().map(str_bytes))
                            .with_metadata(m.metadata)
                    })
                    .collect(),
            )
    }))
}
