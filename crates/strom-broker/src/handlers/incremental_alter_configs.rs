//! IncrementalAlterConfigs (KIP-339): SET, DELETE, APPEND, SUBTRACT on topic settings, SET
//! and DELETE on the broker settings that can change at runtime; stored in the metadata log and
//! applied live.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};

use super::{message, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::config::{apply_topic_config_ops, ConfigOp};
use crate::topics::{change_broker_configs, change_topic_configs, ConfigChangeError};

pub const TOPIC: i8 = 2;
pub const BROKER: i8 = 4;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: IncrementalAlterConfigsRequest = ctx.decode()?;
    let responses = req
        .resources
        .iter()
        .map(|r| {
            let name = r.resource_name.to_string();
            let result = if r.resource_type == BROKER {
                r.configs
                    .iter()
                    .map(|c| match c.config_operation {
                        0 => Ok((c.name.to_string(), c.value.as_ref().map(|v| v.to_string()))),
                        1 => Ok((c.name.to_string(), None)),
                        _ => Err(ConfigChangeError(
                            ResponseError::InvalidRequest,
                            "only SET and DELETE apply to broker settings".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|changes| {
                        tokio::task::block_in_place(|| {
                            change_broker_configs(broker, &name, &changes, false, req.validate_only)
                        })
                    })
            } else if r.resource_type != TOPIC {
                Err(ConfigChangeError::unsupported_resource(r.resource_type))
            } else {
                r.configs
                    .iter()
                    .map(|c| {
                        ConfigOp::from_wire(
                            c.config_operation,
                            c.value.as_ref().map(|v| v.to_string()),
                        )
                        .map(|op| (c.name.to_string(), op))
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| ConfigChangeError(ResponseError::InvalidRequest, e))
                    .and_then(|ops| {
                        tokio::task::block_in_place(|| {
                            change_topic_configs(
                                broker,
                                &name,
                                |current| {
                                    apply_topic_config_ops(current, &ops, |n| {
                                        broker
                                            .config
                                            .topic_value(current, n)
                                            .map(|(v, _)| v)
                                            .unwrap_or_default()
                                    })
                                },
                                req.validate_only,
                            )
                        })
                    })
            };
            let mut resp = AlterConfigsResourceResponse::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            if let Err(ConfigChangeError(code, msg)) = result {
                resp.error_code = code.code();
                resp.error_message = message(msg);
            }
            resp
        })
        .collect();
    ctx.reply(&IncrementalAlterConfigsResponse::default().with_responses(responses))
}
