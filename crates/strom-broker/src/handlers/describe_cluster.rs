//! DescribeCluster (KIP-700): cluster id, controller and brokers: the live ones, and from v2
//! with `include_fenced_brokers` the fenced ones too, marked (KIP-1073).

use std::sync::Arc;

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::{BrokerId, DescribeClusterRequest, DescribeClusterResponse};

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeClusterRequest = ctx.decode()?;
    let fenced_too = ctx.version >= 2 && req.include_fenced_brokers;
    let image = broker.image();
    let brokers = image
        .brokers
        .values()
        .filter(|b| fenced_too || !b.fenced)
        .map(|b| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(b.broker_id))
                .with_host(str_bytes(&b.host))
                .with_port(b.port)
                .with_rack(b.rack.as_deref().map(str_bytes))
                .with_is_fenced(b.fenced)
        })
        .collect();
    let resp = DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(&image.cluster_id))
        .with_controller_id(BrokerId(broker.controller_id()))
        .with_brokers(brokers);
    ctx.reply(&resp)
}
