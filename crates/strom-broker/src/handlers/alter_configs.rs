//! AlterConfigs (the legacy, non-incremental form): a topic's overrides, or a broker's
//! dynamic settings, become exactly the given set.

use std::sync::Arc;

use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{AlterConfigsRequest, AlterConfigsResponse};

use super::incremental_alter_configs::{BROKER, TOPIC};
use super::{message, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::config::validate_topic_configs;
use crate::topics::{change_broker_configs, change_topic_configs, ConfigChangeError};

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: AlterConfigsRequest = ctx.decode()?;
    let responses = req
        .resources
        .iter()
        .map(|r| {
            let name = r.resource_name.to_string();
            let result = if r.resource_type == BROKER {
                let changes: Vec<(String, Option<String>)> = r
                    .configs
                    .iter()
                    .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
                    .collect();
                tokio::task::block_in_place(|| {
                    change_broker_configs(broker, &name, &changes, true, req.validate_only)
                })
            } else if r.resource_type != TOPIC {
                Err(ConfigChangeError::unsupported_resource(r.resource_type))
            } else {
                let pairs: Vec<(String, Option<String>)> = r
                    .configs
                    .iter()
                    .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
                    .collect();
                tokio::task::block_in_place(|| {
                    change_topic_configs(
                        broker,
                        &name,
                        |_| validate_topic_configs(&pairs),
                        req.validate_only,
                    )
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
    ctx.reply(&AlterConfigsResponse::default().with_responses(responses))
}
