//! DescribeGroups: state, protocol and members (with metadata and assignment once stable).
//! An unknown group is "Dead" with no error before v6 and GROUP_ID_NOT_FOUND from v6, as Kafka.

use std::sync::Arc;

use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse};
use strom_group::group::GroupState;
use strom_group::GroupError;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

/// Kafka's "authorized operations not requested" value.
const OPS_NOT_REQUESTED: i32 = i32::MIN;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeGroupsRequest = ctx.decode()?;
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
                    g.group_state = str_bytes(d.state.name());
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
                                .with_member_assignment(m.assignment)
                        })
                        .collect();
                }
            }
            g
        })
        .collect();
    ctx.reply(&DescribeGroupsResponse::default().with_groups(groups))
}
