//! FindCoordinator: the node that coordinates a group — the leader of the group's partition
//! of `__consumer_offsets` (this node, for every group, on a single node). The first request
//! creates `__consumer_offsets`. Transaction coordinators are not served yet. v4+ batches keys.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use strom_group::coordinator::{partition_for, OFFSETS_TOPIC};

const GROUP: i8 = 0;

/// The broker leading `group`'s partition of `__consumer_offsets`: (id, host, port).
fn coordinator_of(broker: &Broker, group: &str) -> Option<(i32, String, i32)> {
    if broker.raft().is_none() {
        return Some((
            broker.node_id,
            broker.advertised_host.clone(),
            broker.advertised_port,
        ));
    }
    let image = broker.image();
    let topic = image.topic(OFFSETS_TOPIC)?;
    let p = partition_for(group, topic.partitions.len() as i32);
    let leader = topic.partitions.get(&p)?.leader;
    let b = image.brokers.get(&leader).filter(|b| !b.fenced)?;
    Some((leader, b.host.clone(), b.port))
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: FindCoordinatorRequest = ctx.decode()?;
    let v = ctx.version;
    let keys: Vec<String> = if v >= 4 {
        req.coordinator_keys.iter().map(|k| k.to_string()).collect()
    } else {
        vec![req.key.to_string()]
    };
    let answer = |key: &str| -> Coordinator {
        let mut c = Coordinator::default()
            .with_key(str_bytes(key))
            .with_node_id(BrokerId(-1))
            .with_host(str_bytes(""))
            .with_port(-1);
        let err = match req.key_type {
            GROUP => broker
                .ensure_offsets_topic()
                .err()
                .map(|e| (e.code(), e.to_string())),
            1 => Some((
                ResponseError::CoordinatorNotAvailable.code(),
                "transactions are not supported yet".to_string(),
            )),
            other => Some((
                ResponseError::InvalidRequest.code(),
                format!("unknown coordinator key type {other}"),
            )),
        };
        match err {
            Some((code, msg)) => {
                c.error_code = code;
                c.error_message = message(msg);
            }
            None => match coordinator_of(broker, key) {
                Some((id, host, port)) => {
                    c.node_id = BrokerId(id);
                    c.host = str_bytes(&host);
                    c.port = port;
                }
                None => {
                    c.error_code = ResponseError::CoordinatorNotAvailable.code();
                    c.error_message = message("the group's offsets partition has no leader");
                }
            },
        }
        c
    };
    let mut resp = FindCoordinatorResponse::default();
    if v >= 4 {
        resp.coordinators = keys.iter().map(|k| answer(k)).collect();
    } else {
        let c = answer(&keys[0]);
        resp.error_code = c.error_code;
        if v >= 1 {
            resp.error_message = c.error_message;
        }
        resp.node_id = c.node_id;
        resp.host = c.host;
        resp.port = c.port;
    }
    ctx.reply(&resp)
}
