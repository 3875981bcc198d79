//! DescribeConfigs for topics (resource type 2) and brokers (4): every setting of the registry
//! with its value, source and, on request, synonyms and documentation.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::config::{self, source, ConfigDef, Scope};

const TOPIC: i8 = 2;
const BROKER: i8 = 4;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeConfigsRequest = ctx.decode()?;
    let v = ctx.version;
    let image = broker.image();
    let mut results = Vec::with_capacity(req.resources.len());
    for res in req.resources {
        let name = res.resource_name.to_string();
        let mut out = DescribeConfigsResult::default()
            .with_resource_type(res.resource_type)
            .with_resource_name(res.resource_name.clone());
        let wanted = |d: &ConfigDef| {
            res.configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k.as_str() == d.name))
        };
        let entries: Option<Vec<DescribeConfigsResourceResult>> = match res.resource_type {
            TOPIC => image.topic(&name).map(|t| {
                config::REGISTRY
                    .iter()
                    .filter(|d| d.scope == Scope::Topic && wanted(d))
                    .filter_map(|d| {
                        let (value, src) = broker.config.topic_value(&t.configs, d.name)?;
                        let mut synonyms = Vec::new();
                        if req.include_synonyms {
                            if let Some(o) = t.configs.get(d.name) {
                                synonyms.push(synonym(d.name, o, source::TOPIC));
                            }
                            if let Some(syn) = d.broker_synonym {
                                let (bv, bs) = broker.config.get_with_source(syn);
                                synonyms.push(synonym(syn, &bv, bs));
                            }
                        }
                        Some(entry(d, value, src, synonyms, v, req.include_documentation))
                    })
                    .collect()
            }),
            BROKER if name.is_empty() || name == broker.node_id.to_string() => Some(
                config::REGISTRY
                    .iter()
                    .filter(|d| d.scope == Scope::Broker && wanted(d))
                    .map(|d| {
                        let (value, src) = broker.config.get_with_source(d.name);
                        let synonyms = if req.include_synonyms {
                            vec![synonym(d.name, &value, src)]
                        } else {
                            vec![]
                        };
                        let mut e = entry(d, value, src, synonyms, v, req.include_documentation);
                        e.read_only = !config::DYNAMIC_BROKER_CONFIGS.contains(&d.name);
                        e
                    })
                    .collect(),
            ),
            _ => None,
        };
        match entries {
            Some(configs) => out.configs = configs,
            None => {
                let code = match res.resource_type {
                    TOPIC => ResponseError::UnknownTopicOrPartition,
                    BROKER => ResponseError::InvalidRequest,
                    _ => ResponseError::InvalidRequest,
                };
                out.error_code = code.code();
                out.error_message = message(format!(
                    "unknown resource {} of type {}",
                    name, res.resource_type
                ));
            }
        }
        results.push(out);
    }
    ctx.reply(&DescribeConfigsResponse::default().with_results(results))
}

fn synonym(name: &str, value: &str, src: i8) -> DescribeConfigsSynonym {
    DescribeConfigsSynonym::default()
        .with_name(str_bytes(name))
        .with_value(Some(str_bytes(value)))
        .with_source(src)
}

fn entry(
    d: &ConfigDef,
    value: String,
    src: i8,
    synonyms: Vec<DescribeConfigsSynonym>,
    v: i16,
    include_doc: bool,
) -> DescribeConfigsResourceResult {
    let mut e = DescribeConfigsResourceResult::default()
        .with_name(str_bytes(d.name))
        .with_value(Some(str_bytes(&value)))
        .with_config_source(src)
        .with_synonyms(synonyms);
    if v >= 3 {
        e.config_type = d.kind.wire_type();
        e.documentation = if include_doc {
            Some(str_bytes(d.doc))
        } else {
            None
        };
    }
    e
}
