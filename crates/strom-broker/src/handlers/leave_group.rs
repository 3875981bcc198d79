//! LeaveGroup: one member (v0-2) or a batch of members by id or static instance id (v3+).

use std::sync::Arc;

use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{LeaveGroupRequest, LeaveGroupResponse};

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: LeaveGroupRequest = ctx.decode()?;
    let v = ctx.version;
    let members: Vec<(String, Option<String>)> = if v >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let result = broker.groups.leave(
        &**broker,
        req.group_id.0.as_str(),
        &members,
        broker.now_ms(),
    );
    let mut resp = LeaveGroupResponse::default();
    match result {
        Err(e) => resp.error_code = e.code(),
        Ok(results) if v >= 3 => {
            resp.members = members
                .iter()
                .zip(results)
                .map(|((id, inst), r)| {
                    MemberResponse::default()
                        .with_member_id(str_bytes(id))
                        .with_group_instance_id(inst.as_deref().map(str_bytes))
                        .with_error_code(r.err().map_or(0, |e| e.code()))
                })
                .collect();
        }
        Ok(results) => {
            resp.error_code = results
                .first()
                .and_then(|r| r.as_ref().err())
                .map_or(0, |e| e.code());
        }
    }
    ctx.reply(&resp)
}
