//! CreateTopics: validated names, partition counts, replication factors and configs; with
//! validate_only nothing is created.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use uuid::Uuid;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::config::{self, validate_topic_configs};
use crate::topics;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: CreateTopicsRequest = ctx.decode()?;
    let v = ctx.version;
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatableTopicResult::default().with_name(t.name.clone());
        let fail = |r: &mut CreatableTopicResult, code: ResponseError, msg: String| {
            r.error_code = code.code();
            if v >= 1 {
                r.error_message = message(msg);
            }
        };
        if !t.assignments.is_empty() {
            fail(
                &mut r,
                ResponseError::InvalidRequest,
                "manual replica assignment is not supported yet".into(),
            );
            results.push(r);
            continue;
        }
        let pairs: Vec<(String, Option<String>)> = t
            .configs
            .iter()
            .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
            .collect();
        let configs = match validate_topic_configs(&pairs) {
            Ok(c) => c,
            Err(e) => {
                fail(&mut r, ResponseError::InvalidConfig, e.to_string());
                results.push(r);
                continue;
            }
        };
        let created = topics::create_topic(
            broker,
            &name,
            t.num_partitions,
            t.replication_factor,
            configs.clone(),
            req.validate_only,
        );
        match created {
            Err(e) => fail(&mut r, e.code(), e.to_string()),
            Ok(topic) => {
                if v >= 5 {
                    let parts = match &topic {
                        Some(t) => t.partitions.len() as i32,
                        None if t.num_partitions == -1 => {
                            broker.config.i64("num.partitions") as i32
                        }
                        None => t.num_partitions,
                    };
                    r.num_partitions = parts;
                    r.replication_factor = topic
                        .as_ref()
                        .and_then(|t| {
                            t.partitions
                                .values()
                                .next()
                                .map(|p| p.replicas.len() as i16)
                        })
                        .unwrap_or(if t.replication_factor == -1 {
                            1
                        } else {
                            t.replication_factor
                        });
                    let cfgs = config::REGISTRY
                        .iter()
                        .filter(|d| d.scope == config::Scope::Topic)
                        .filter_map(|d| {
                            let (value, source) = broker.config.topic_value(&configs, d.name)?;
                            Some(
                                CreatableTopicConfigs::default()
                                    .with_name(str_bytes(d.name))
                                    .with_value(Some(str_bytes(&value)))
                                    .with_config_source(source),
                            )
                        })
                        .collect();
                    r.configs = Some(cfgs);
                }
                if v >= 7 {
                    if let Some(t) = &topic {
                        r.topic_id = Uuid::from_bytes(t.topic_id);
                    }
                }
            }
        }
        results.push(r);
    }
    ctx.reply(&CreateTopicsResponse::default().with_topics(results))
}
