//! ConsumerGroupDescribe (KIP-848): epochs, assignor and members with their current and
//! target assignments.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::consumer_group_describe_response::{
    Assignment, DescribedGroup, Member, TopicPartitions,
};
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, TopicName,
};
use strom_group::consumer::Tp;
use strom_meta::MetadataImage;
use uuid::Uuid;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

const OPS_NOT_REQUESTED: i32 = i32::MIN;

fn assignment<'a>(image: &MetadataImage, tps: impl Iterator<Item = &'a Tp>) -> Assignment {
    let mut by_topic: BTreeMap<[u8; 16], Vec<i32>> = BTreeMap::new();
    for (id, p) in tps {
        by_topic.entry(*id).or_default().push(*p);
    }
    Assignment::default().with_topic_partitions(
        by_topic
            .into_iter()
            .map(|(id, ps)| {
                let name = image
                    .topic_by_id(&id)
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                TopicPartitions::default()
                    .with_topic_id(Uuid::from_bytes(id))
                    .with_topic_name(TopicName(str_bytes(&name)))
                    .with_partitions(ps)
            })
            .collect(),
    )
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ConsumerGroupDescribeRequest = ctx.decode()?;
    let image = broker.image();
    let groups = req
        .group_ids
        .iter()
        .map(|id| {
            let mut g = DescribedGroup::default()
                .with_group_id(id.clone())
                .with_authorized_operations(OPS_NOT_REQUESTED);
            match broker.groups.describe_consumer_group(id.0.as_str()) {
                Err(e) => {
                    g.error_code = e.code();
                    g.error_message = message(format!("group {}: {e}", id.0));
                }
                Ok(d) => {
                    g.group_state = str_bytes(d.state);
                    g.group_epoch = d.group_epoch;
                    g.assignment_epoch = d.assignment_epoch;
                    g.assignor_name = str_bytes(&d.assignor);
                    g.members = d
                        .members
                        .iter()
                        .map(|m| {
                            let target = d.targets.get(&m.member_id).cloned().unwrap_or_default();
                            Member::default()
                                .with_member_id(str_bytes(&m.member_id))
                                .with_instance_id(m.instance_id.as_deref().map(str_bytes))
                                .with_rack_id(m.rack_id.as_deref().map(str_bytes))
                                .with_member_epoch(m.member_epoch)
                                .with_client_id(str_bytes(&m.client_id))
                                .with_client_host(str_bytes(&m.client_host))
                                .with_subscribed_topic_names(
                                    m.subscribed
                                        .iter()
                                        .map(|t| TopicName(str_bytes(t)))
                                        .collect(),
                                )
                                .with_assignment(assignment(&image, m.assigned.iter()))
                                .with_target_assignment(assignment(&image, target.iter()))
                        })
                        .collect();
                }
            }
            g
        })
        .collect();
    ctx.reply(&ConsumerGroupDescribeResponse::default().with_groups(groups))
}
