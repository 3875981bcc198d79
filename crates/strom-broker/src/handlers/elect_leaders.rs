//! ElectLeaders (KIP-460): a preferred election moves leadership back to each partition's
//! first replica when it is live and in sync; an unclean one gives a leaderless partition a
//! leader, from outside the ISR if no in-sync replica is alive. With no partitions listed, every
//! partition that needs the election is elected and reported.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::{ElectLeadersRequest, ElectLeadersResponse, TopicName};
use strom_meta::controller::ElectionError;

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

const PREFERRED: i8 = 0;
const UNCLEAN: i8 = 1;

fn code(e: &ElectionError) -> ResponseError {
    match e {
        ElectionError::UnknownTopicOrPartition => ResponseError::UnknownTopicOrPartition,
        ElectionError::ElectionNotNeeded => ResponseError::ElectionNotNeeded,
        ElectionError::PreferredLeaderNotAvailable => ResponseError::PreferredLeaderNotAvailable,
        ElectionError::EligibleLeadersNotAvailable => ResponseError::EligibleLeadersNotAvailable,
    }
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ElectLeadersRequest = ctx.decode()?;
    let v = ctx.version;
    let election_type = if v >= 1 { req.election_type } else { PREFERRED };
    if election_type != PREFERRED && election_type != UNCLEAN {
        let resp =
            ElectLeadersResponse::default().with_error_code(ResponseError::InvalidRequest.code());
        return ctx.reply(&resp);
    }
    let all = req.topic_partitions.is_none();
    let wanted: Vec<(String, i32)> = match &req.topic_partitions {
        Some(tps) => tps
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.topic.0.to_string(), *p)))
            .collect(),
        None => {
            let image = broker.image();
            image
                .topics
                .values()
                .flat_map(|t| t.partitions.keys().map(|p| (t.name.clone(), *p)))
                .collect()
        }
    };
    let mut results: Vec<((String, i32), Result<(), ElectionError>)> = Vec::new();
    let committed = broker.commit_metadata::<String>(|img| {
        results.clear();
        let mut records = Vec::new();
        for (t, p) in &wanted {
            let r = broker
                .controller()
                .elect_leader(img, t, *p, election_type == UNCLEAN);
            match r {
                Ok(rec) => {
                    records.push(rec);
                    results.push(((t.clone(), *p), Ok(())));
                }
                Err(e) => results.push(((t.clone(), *p), Err(e))),
            }
        }
        Ok(records)
    });
    let mut by_topic: Vec<ReplicaElectionResult> = Vec::new();
    for ((t, p), r) in results {
        // Asked for everything: report only the partitions an election was for.
        if all && matches!(r, Err(ElectionError::ElectionNotNeeded)) {
            continue;
        }
        let mut pr = PartitionResult::default().with_partition_id(p);
        match (&committed, r) {
            (Err(e), Ok(())) => {
                pr.error_code = ResponseError::UnknownServerError.code();
                pr.error_message = message(e);
            }
            (_, Err(e)) => {
                pr.error_code = code(&e).code();
                pr.error_message = message(&e);
            }
            (Ok(_), Ok(())) => {}
        }
        match by_topic.iter_mut().find(|x| x.topic.0.as_str() == t) {
            Some(x) => x.partition_result.push(pr),
            None => by_topic.push(
                ReplicaElectionResult::default()
                    .with_topic(TopicName(str_bytes(&t)))
                    .with_partition_result(vec![pr]),
            ),
        }
    }
    ctx.reply(&ElectLeadersResponse::default().with_replica_election_results(by_topic))
}
