//! ConsumerGroupHeartbeat (KIP-848): join, stay, leave, and receive the server-side
//! assignment of a consumer group.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::consumer_group_heartbeat_response::{Assignment, TopicPartitions};
use kafka_protocol::messages::{ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse};
use strom_group::consumer::HeartbeatRequest;
use strom_group::GroupError;
use uuid::Uuid;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::groups::topic_info;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ConsumerGroupHeartbeatRequest = ctx.decode()?;
    let mut resp = ConsumerGroupHeartbeatResponse::default();
    if req
        .subscribed_topic_regex
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        resp.error_code = GroupError::InvalidRequest.code();
        resp.error_message = message("regular-expression subscriptions are not supported yet");
        return ctx.reply(&resp);
    }
    if let Err(e) = broker.ensure_offsets_topic() {
        resp.error_code = e.code();
        return ctx.reply(&resp);
    }
    let hb = HeartbeatRequest {
        member_id: req.member_id.to_string(),
        member_epoch: req.member_epoch,
        instance_id: req.instance_id.as_ref().map(|s| s.to_string()),
        rack_id: req.rack_id.as_ref().map(|s| s.to_string()),
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        subscribed_topics: req
            .subscribed_topic_names
            .as_ref()
            .map(|ts| ts.iter().map(|t| t.0.to_string()).collect()),
        server_assignor: req.server_assignor.as_ref().map(|s| s.to_string()),
        owned: req.topic_partitions.as_ref().map(|tps| {
            tps.iter()
                .flat_map(|tp| {
                    let id = *tp.topic_id.as_bytes();
                    tp.partitions.iter().map(move |p| (id, *p))
                })
                .collect()
        }),
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.peer.ip()),
    };
    let image = broker.image();
    let topics = |name: &str| topic_info(&image, name);
    let result = broker.groups.consumer_heartbeat(
        &**broker,
        req.group_id.0.as_str(),
        hb,
        &topics,
        broker.now_ms(),
    );
    let group = req.group_id.0.to_string();
    Ok(ctx.later(async move {
        // The answer goes out once what it changed is durable.
        let result = match result {
            Ok((r, Some(durable))) => durable.await.map(|()| r),
            Ok((r, None)) => Ok(r),
            Err(e) => Err(e),
        };
        match result {
            Err(e) => {
                tracing::debug!(%group, error = %e, "consumer group heartbeat refused");
                resp.error_code = e.code();
                resp.error_message = message(e);
            }
            Ok(r) => {
                resp.member_id = Some(str_bytes(&r.member_id));
                resp.member_epoch = r.member_epoch;
                resp.heartbeat_interval_ms = r.heartbeat_interval_ms;
                resp.assignment = r.assignment.map(|tps| {
                    let mut by_topic: BTreeMap<[u8; 16], Vec<i32>> = BTreeMap::new();
                    for (id, p) in tps {
                        by_topic.entry(id).or_default().push(p);
                    }
                    Assignment::default().with_topic_partitions(
                        by_topic
                            .into_iter()
                            .map(|(id, ps)| {
                                TopicPartitions::default()
                                    .with_topic_id(Uuid::from_bytes(id))
                                    .with_partitions(ps)
                            })
                            .collect(),
                    )
                });
            }
        }
        resp
    }))
}
