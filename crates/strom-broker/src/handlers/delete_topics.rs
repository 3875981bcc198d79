//! DeleteTopics: by name (v0-5) or by name or id (v6+). The topic's logs are removed.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse, TopicName};
use uuid::Uuid;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::AdminError;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DeleteTopicsRequest = ctx.decode()?;
    let v = ctx.version;
    let targets: Vec<(Option<String>, Uuid)> = if v >= 6 {
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| (Some(n.0.to_string()), Uuid::nil()))
            .collect()
    };
    let mut results = Vec::with_capacity(targets.len());
    for (name, id) in targets {
        let image = broker.image();
        let resolved = match &name {
            Some(n) => image.topic(n).cloned(),
            None => image.topic_by_id(id.as_bytes()).cloned(),
        };
        let mut r = DeletableTopicResult::default()
            .with_name(name.as_deref().map(|n| TopicName(str_bytes(n))));
        if v >= 6 {
            r.topic_id = id;
        }
        match resolved {
            None => {
                r.error_code = if name.is_none() {
                    ResponseError::UnknownTopicId.code()
                } else {
                    ResponseError::UnknownTopicOrPartition.code()
                };
            }
            Some(topic) => {
                if v >= 6 {
                    r.name = Some(TopicName(str_bytes(&topic.name)));
                    r.topic_id = Uuid::from_bytes(topic.topic_id);
                }
                let res = broker.commit_metadata::<AdminError>(|img| {
                    Ok(broker.controller().delete_topic(img, &topic.name)?)
                });
                if let Err(e) = res {
                    r.error_code = e.code().code();
                    if v >= 5 {
                        r.error_message = message(&e);
                    }
                } else {
                    tracing::info!(topic = %topic.name, "deleted topic");
                }
            }
        }
        if v < 6 && r.name.is_none() {
            r.name = Some(TopicName(str_bytes("")));
        }
        results.push(r);
    }
    ctx.reply(&DeleteTopicsResponse::default().with_responses(results))
}
