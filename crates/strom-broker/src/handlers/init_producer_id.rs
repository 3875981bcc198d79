//! InitProducerId for idempotent producers: a fresh producer id (epoch 0) from a block reserved
//! in the metadata log, so ids are never reused across restarts. Transactional ids need the
//! transaction coordinator, which Strom does not have yet.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: InitProducerIdRequest = ctx.decode()?;
    let mut resp = InitProducerIdResponse::default();
    match &req.transactional_id {
        None => {}
        // As Kafka's TransactionCoordinator: an empty transactional id is a bad request.
        Some(t) if t.0.is_empty() => {
            resp.error_code = ResponseError::InvalidRequest.code();
            return ctx.reply(&resp);
        }
        Some(_) => {
            resp.error_code = ResponseError::CoordinatorNotAvailable.code();
            return ctx.reply(&resp);
        }
    }
    // Reserving a block may wait for the controller: off the connection's turn, so that the
    // wait holds no thread.
    let broker = broker.clone();
    Ok(ctx.later(async move {
        match broker.next_producer_id().await {
            Ok(id) => {
                resp.producer_id = ProducerId(id);
                resp.producer_epoch = 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not reserve producer ids");
                resp.error_code = ResponseError::KafkaStorageError.code();
            }
        }
        resp
    }))
}
