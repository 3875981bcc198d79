//! OffsetDelete: removes a group's committed offsets for topics its members do not subscribe
//! to (GROUP_SUBSCRIBED_TO_TOPIC otherwise).

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::{
    ConsumerProtocolSubscription, OffsetDeleteRequest, OffsetDeleteResponse, TopicName,
};
use kafka_protocol::protocol::Decodable;
use strom_group::group::Group;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

/// The topics of a consumer-protocol subscription (version prefix, then the message).
pub fn subscribed_topics(metadata: &Bytes) -> Vec<String> {
    let mut b = metadata.clone();
    if b.len() < 2 {
        return Vec::new();
    }
    let version = i16::from_be_bytes([b[0], b[1]]);
    let _ = bytes::Buf::get_i16(&mut b);
    let version = version.clamp(0, 3);
    ConsumerProtocolSubscription::decode(&mut b, version)
        .map(|s| s.topics.iter().map(|t| t.to_string()).collect())
        .unwrap_or_default()
}

fn is_subscribed(g: &Group, topic: &str) -> bool {
    g.protocol_type.as_deref() == Some("consumer")
        && g.members.values().any(|m| {
            m.protocols
                .iter()
                .any(|(_, meta)| subscribed_topics(meta).iter().any(|t| t == topic))
        })
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: OffsetDeleteRequest = ctx.decode()?;
    let broker = broker.clone();
    Ok(ctx.later(async move {
        let partitions: Vec<(String, i32)> = req
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.name.0.to_string(), p.partition_index))
            })
            .collect();
        let mut resp = OffsetDeleteResponse::default();
        match broker
            .groups
            .delete_offsets(
                &*broker,
                req.group_id.0.as_str(),
                partitions,
                &is_subscribed,
            )
            .await
        {
            Err(e) => resp.error_code = e.code(),
            Ok(rows) => {
                let mut topics: Vec<OffsetDeleteResponseTopic> = Vec::new();
                for (t, p, r) in rows {
                    let part = OffsetDeleteResponsePartition::default()
                        .with_partition_index(p)
                        .with_error_code(r.err().map_or(0, |e| e.code()));
                    match topics.iter_mut().find(|x| x.name.0.as_str() == t) {
                        Some(x) => x.partitions.push(part),
                        None => topics.push(
                            OffsetDeleteResponseTopic::default()
                                .with_name(TopicName(str_bytes(&t)))
                                .with_partitions(vec![part]),
                        ),
                    }
                }
                resp.topics = topics;
            }
        }
        resp
    }))
}
