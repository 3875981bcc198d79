//! UnregisterBroker (KIP-631, `kafka-cluster.sh unregister`): removes a decommissioned broker
//! for good. The active controller writes records that take it out of every ISR, ELR and
//! leadership and remove its registration (partitions keep it in their replica lists, offline
//! until reassigned), then removes a broker-only node from the Raft membership. Controller
//! voters are refused (INVALID_REQUEST); an unknown id is BROKER_ID_NOT_REGISTERED.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{UnregisterBrokerRequest, UnregisterBrokerResponse};

use super::{message, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::cluster::{ControllerRequest, ControllerResponse};
use crate::error::AdminError;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: UnregisterBrokerRequest = ctx.decode()?;
    let broker = broker.clone();
    let id = req.broker_id.0;
    Ok(ctx.later(async move {
        let outcome: Result<(), (i16, String)> = match broker.raft() {
            // A one-node cluster: its only broker is the controller itself.
            None => broker
                .commit_metadata_async::<AdminError>(|img| {
                    let voters = broker.voter_ids();
                    Ok(broker
                        .controller()
                        .unregister_broker(img, id, &voters, &*broker)?)
                })
                .await
                .map(|_| ())
                .map_err(|e| (e.code().code(), e.to_string())),
            Some(_) => {
                let req = ControllerRequest::UnregisterBroker { broker_id: id };
                // An append and a membership change, each waiting for a commit.
                let within = broker.controller_timeout() * 2;
                match crate::cluster::call_within(&broker, &req, within).await {
                    Ok(ControllerResponse::Ok) => Ok(()),
                    Ok(ControllerResponse::Refused {
                        error_code,
                        message,
                    }) => Err((error_code, message)),
                    Ok(ControllerResponse::NotController) => Err((
                        ResponseError::NotController.code(),
                        "the active controller changed; retry".into(),
                    )),
                    Ok(ControllerResponse::Error(e)) => {
                        Err((ResponseError::UnknownServerError.code(), e))
                    }
                    Ok(other) => Err((
                        ResponseError::UnknownServerError.code(),
                        format!("unexpected controller answer {other:?}"),
                    )),
                    Err(e) => Err((ResponseError::RequestTimedOut.code(), e)),
                }
            }
        };
        match outcome {
            Ok(()) => {
                tracing::info!(broker_id = id, "UnregisterBroker: broker unregistered");
                UnregisterBrokerResponse::default()
            }
            Err((code, why)) => UnregisterBrokerResponse::default()
                .with_error_code(code)
                .with_error_message(message(why)),
        }
    }))
}
