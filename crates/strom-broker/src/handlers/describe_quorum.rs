//! DescribeQuorum (KIP-595, KIP-836): the metadata quorum's leader, epoch, high watermark,
//! voters and observers (the broker-only nodes, Raft learners), as the active controller sees
//! them (a broker that is not the leader asks it). A one-node cluster answers with itself as
//! the only voter. `nodes` lists the voters' controller listeners only, as Kafka's does; v2
//! gives each voter's metadata log directory id (KIP-853) as the log last recorded it.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_quorum_response::{
    Listener, Node, PartitionData, ReplicaState, TopicData,
};
use kafka_protocol::messages::{BrokerId, DescribeQuorumRequest, DescribeQuorumResponse};

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::cluster::{ControllerRequest, ControllerResponse, QuorumView};

const METADATA_TOPIC: &str = "__cluster_metadata";

/// A voter's recorded metadata log directory id (KIP-853); zero where none is known (an
/// observer, a single node, a log from before directory ids).
fn directory_of(q: &QuorumView, id: i32) -> uuid::Uuid {
    q.directories
        .iter()
        .find(|(voter, _)| *voter == id)
        .and_then(|(_, dir)| uuid::Uuid::parse_str(dir).ok())
        .unwrap_or_default()
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeQuorumRequest = ctx.decode()?;
    let broker = broker.clone();
    let v = ctx.version;
    Ok(ctx.later(async move {
        let view = match broker.raft() {
            None => Ok(QuorumView {
                leader_id: broker.node_id,
                leader_epoch: 1,
                high_watermark: broker.image().offset + 1,
                voters: vec![(broker.node_id, broker.image().offset + 1, -1, -1)],
                observers: Vec::new(),
                directories: Vec::new(),
            }),
            Some(_) => {
                match crate::cluster::call(&broker, &ControllerRequest::DescribeQuorum).await {
                    Ok(ControllerResponse::Quorum(q)) => Ok(q),
                    Ok(other) => Err(format!("unexpected controller answer {other:?}")),
                    Err(e) => Err(e),
                }
            }
        };
        let mut topics = Vec::new();
        for t in req.topics {
            let mut parts = Vec::new();
            for p in t.partitions {
                let mut d = PartitionData::default().with_partition_index(p.partition_index);
                match (
                    &view,
                    t.topic_name.0.as_str() == METADATA_TOPIC && p.partition_index == 0,
                ) {
                    (_, false) => d.error_code = ResponseError::UnknownTopicOrPartition.code(),
                    (Err(e), true) => {
                        d.error_code = ResponseError::NotLeaderOrFollower.code();
                        if v >= 2 {
                            d.error_message = Some(str_bytes(e));
                        }
                    }
                    (Ok(q), true) => {
                        d.leader_id = BrokerId(q.leader_id);
                        d.leader_epoch = q.leader_epoch;
                        d.high_watermark = q.high_watermark;
                        let replicas = |rows: &[(i32, i64, i64, i64)]| {
                            rows.iter()
                                .map(|(id, end, fetch, caught)| {
                                    let mut r = ReplicaState::default()
                                        .with_replica_id(BrokerId(*id))
                                        .with_log_end_offset(*end);
                                    if v >= 1 {
                                        r.last_fetch_timestamp = *fetch;
                                        r.last_caught_up_timestamp = *caught;
                                    }
                                    if v >= 2 {
                                        r.replica_directory_id = directory_of(q, *id);
                                    }
                                    r
                                })
                                .collect()
                        };
                        d.current_voters = replicas(&q.voters);
                        d.observers = replicas(&q.observers);
                    }
                }
                parts.push(d);
            }
            topics.push(
                TopicData::default()
                    .with_topic_name(t.topic_name)
                    .with_partitions(parts),
            );
        }
        let mut resp = DescribeQuorumResponse::default().with_topics(topics);
        if v >= 2 {
            if let Ok(q) = &view {
                resp.nodes = q
                    .voters
                    .iter()
                    .filter_map(|(id, _, _, _)| {
                        let addr = broker.controller_address(*id)?;
                        Some(Node::default().with_node_id(BrokerId(*id)).with_listeners(
                            vec![Listener::default()
                                    .with_name(str_bytes("CONTROLLER"))
                                    .with_host(str_bytes(&addr.ip().to_string()))
                                    .with_port(addr.port())],
                        ))
                    })
                    .collect();
            }
        }
        resp
    }))
}
