//! DescribeGroups: state, protocol and members (with metadata and assignment once stable).
//! An unknown group is "Dead" with no error before v6 and GROUP_ID_NOT_FOUND from v6, as Kafka.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
use kafka_protocol::messages::{ConsumerProtocolAssignment, TopicName};
use kafka_protocol::protocol::Encodable;
use strom_group::consumer::Tp;
use strom_meta::MetadataImage;

use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse};
use strom_group::group::GroupState;
use strom_group::GroupError;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

/// Kafka's "authorized operations not requested" value.
const OPS_NOT_REQUESTED: i32 = i32::MIN;

/// A KIP-848 member's partitions in the classic consumer-protocol assignment format (version
/// prefix, then the message), so classic tools can show them.
fn encode_assignment(image: &MetadataImage, tps: &[Tp]) -> Bytes {
    let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (id, p) in tps {
        if let Some(t) = image.topic_by_id(id) {
            by_topic.entry(t.name.clone()).or_default().push(*p);
        }
    }
    let a = ConsumerProtocolAssignment::default().with_assigned_partitions(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                TopicPartition::default()
                    .with_topic(TopicName(str_bytes(&t)))
                    .with_partitions(ps)
            })
            .collect(),
    );
    let mut b = BytesMut::new();
    b.put_i16(0);
    match a.encode(&mut b, 0) {
        Ok(()) => b.freeze(),
        Err(_) => Bytes::new(),
    }
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeGroupsRequest = ctx.decode()?;
    let image = broker.image();
    let v = ctx.version;
    let groups = req
        .groups
        .iter()
        .map(|id| {
            let mut g = DescribedGroup::default()
                .with_group_id(id.clone())
                .with_authorized_operations(OPS_NOT_REQUESTED);
            match broker.groups.describe(id.0.as_str()) {
                Err(e) => g.error_code = e.code(),
                Ok(d) => {
                    if d.state == GroupState::Dead && v >= 6 {
                        g.error_code = GroupError::GroupIdNotFound.code();
                        g.error_message = message(format!("group {} not found", d.group_id));
                    }
                    g.group_state = str_bytes(d.state_name);
                    g.protocol_type = str_bytes(&d.protocol_type);
                    g.protocol_data = str_bytes(&d.protocol);
                    g.members = d
                        .members
                        .into_iter()
                        .map(|m| {
                            DescribedGroupMember::default()
                                .with_member_id(str_bytes(&m.member_id))
                                .with_group_instance_id(
                                    m.group_instance_id.as_deref().map(str_bytes),
                                )
                                .with_client_id(str_bytes(&m.client_id))
                                .with_client_host(str_bytes(&m.client_host))
                                .with_member_metadata(m.metadata)
                                .with_member_assignment(if m.consumer_assignment.is_empty() {
                                    m.assignment
                                } else {
                                    encode_assignment(&image, &m.consumer_assignment)
                                })
                        })
                        .collect();
                }
            }
            g
        })
        .collect();
    ctx.reply(&DescribeGroupsResponse::default().with_groups(groups))
}
