//! CreatePartitions: grow a topic's partition count (never shrink).

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};

use super::{message, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::AdminError;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: CreatePartitionsRequest = ctx.decode()?;
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        let outcome = if t.assignments.is_some() {
            Err(AdminError::Internal(
                "manual replica assignment is not supported yet".into(),
            ))
        } else if req.validate_only {
            broker
                .controller()
                .create_partitions(&broker.image(), &name, t.count)
                .map(|_| ())
                .map_err(AdminError::from)
        } else {
            broker
                .commit_metadata::<AdminError>(|img| {
                    Ok(broker.controller().create_partitions(img, &name, t.count)?)
                })
                .map(|_| ())
        };
        if let Err(e) = outcome {
            r.error_code = match &e {
                AdminError::Internal(_) if t.assignments.is_some() => {
                    ResponseError::InvalidReplicaAssignment.code()
                }
                _ => e.code().code(),
            };
            r.error_message = message(&e);
        }
        results.push(r);
    }
    ctx.reply(&CreatePartitionsResponse::default().with_results(results))
}
