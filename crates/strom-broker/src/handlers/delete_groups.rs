//! DeleteGroups: only empty groups (NON_EMPTY_GROUP otherwise, GROUP_ID_NOT_FOUND for unknown
//! ones); their offsets and metadata get tombstones in `__consumer_offsets`.

use std::sync::Arc;

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse};

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DeleteGroupsRequest = ctx.decode()?;
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let mut results = Vec::with_capacity(req.groups_names.len());
        for g in req.groups_names {
            let r = broker
                .groups
                .delete_group(&*broker, g.0.as_str(), broker.now_ms())
                .await;
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(g)
                    .with_error_code(r.err().map_or(0, |e| e.code())),
            );
        }
        DeleteGroupsResponse::default().with_results(results)
    }))
}
