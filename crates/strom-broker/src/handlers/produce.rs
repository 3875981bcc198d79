//! Produce: append each partition's batches (validated, offsets assigned, stored as received
//! but for the header) in request order, then answer once the data is durable. acks=0 gets no
//! answer at all; an acks=0 request that fails closes the connection, as in Kafka, so the
//! producer notices.

use std::sync::Arc;

use futures::future::join_all;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, TopicName};

use super::{message, str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;
use crate::error::log_error_code;
use crate::partition::{Partition, ReplicationWait};
use strom_group::coordinator::OFFSETS_TOPIC;
use strom_log::LogError;

/// The topic's `min.insync.replicas`.
fn min_isr(broker: &Broker, image: &strom_meta::MetadataImage, topic: &str) -> usize {
    image
        .topic(topic)
        .map(|t| broker.config.topic_i64(&t.configs, "min.insync.replicas"))
        .unwrap_or(1)
        .max(1) as usize
}

/// acks=1: the leader's copy is durable. acks=all (`min_isr` > 0): also every ISR member has
/// it (the high watermark covers it) and the ISR is at least min.insync.replicas. Either
/// while the replica still leads in `epoch`, the leader epoch it appended in.
async fn wait(
    part: &Arc<Partition>,
    end: i64,
    epoch: i32,
    min_isr: usize,
    timeout: std::time::Duration,
) -> Result<(), ResponseError> {
    match part.wait_durable(end, Some(epoch)).await {
        Ok(()) => {}
        Err(LogError::NotLeader) => return Err(ResponseError::NotLeaderOrFollower),
        Err(e) => {
            tracing::error!(topic = %part.topic, partition = part.index, error = %e, "flush failed; produce not acknowledged");
            return Err(log_error_code(&e));
        }
    }
    if min_isr == 0 {
        return Ok(());
    }
    part.wait_replicated(end, min_isr, epoch, timeout)
        .await
        .map_err(|e| match e {
            ReplicationWait::NotLeader => ResponseError::NotLeaderOrFollower,
            ReplicationWait::NotEnoughReplicasAfterAppend => {
                ResponseError::NotEnoughReplicasAfterAppend
            }
            ReplicationWait::Timeout => ResponseError::RequestTimedOut,
        })
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: ProduceRequest = ctx.decode()?;
    let v = ctx.version;
    let acks = req.acks;
    let timeout_ms = req.timeout_ms;
    let valid_acks = matches!(acks, -1..=1);
    let now = broker.now_ms();
    let image = broker.image();

    let mut responses = Vec::with_capacity(req.topic_data.len());
    // (topic index, partition index, partition, end offset to wait for, leader epoch appended
    // in, min ISR for acks=all)
    let mut pending: Vec<(usize, usize, Arc<Partition>, i64, i32, usize)> = Vec::new();
    let mut any_error = false;

    for topic in req.topic_data {
        let name = if v >= 13 {
            image
                .topic_by_id(topic.topic_id.as_bytes())
                .map(|t| t.name.clone())
        } else {
            Some(topic.name.0.to_string())
        };
        let mut parts = Vec::with_capacity(topic.partition_data.len());
        for pd in topic.partition_data {
            let mut resp = PartitionProduceResponse::default()
                .with_index(pd.index)
                .with_base_offset(-1);
            let code = if !valid_acks {
                Some(ResponseError::InvalidRequiredAcks)
            } else {
                match name
                    .as_deref()
                    .and_then(|n| broker.replicas.get(n, pd.index))
                {
                    None if v >= 13 && name.is_none() => Some(ResponseError::UnknownTopicId),
                    // Kafka: a partition that exists but is not hosted here (reassigned away).
                    None if name
                        .as_deref()
                        .and_then(|n| image.topic(n))
                        .is_some_and(|t| t.partitions.contains_key(&pd.index)) =>
                    {
                        Some(ResponseError::NotLeaderOrFollower)
                    }
                    None => Some(ResponseError::UnknownTopicOrPartition),
                    // Kafka: clients cannot append to internal topics.
                    Some(_) if name.as_deref() == Some(OFFSETS_TOPIC) => {
                        Some(ResponseError::InvalidTopicException)
                    }
                    Some(part) if !part.is_leader() && !broker.null_sink => {
                        Some(ResponseError::NotLeaderOrFollower)
                    }
                    Some(part)
                        if acks == -1
                            && !broker.null_sink
                            && part.isr_len() < min_isr(broker, &image, &part.topic) =>
                    {
                        // Kafka: refused before anything is appended.
                        Some(ResponseError::NotEnoughReplicas)
                    }
                    Some(part) => {
                        if v >= 5 {
                            resp.log_start_offset = part.log_start_offset();
                        }
                        match pd.records {
                            _ if broker.null_sink => {
                                resp.base_offset = 0;
                                None
                            }
                            None => Some(ResponseError::CorruptMessage),
                            Some(records) => {
                                // Stored as received: the log patches a copy of its header.
                                match part.append(&records, now) {
                                    Ok(outcome) => {
                                        resp.base_offset = outcome.base_offset;
                                        if v >= 2 {
                                            resp.log_append_time_ms = outcome.log_append_time_ms;
                                        }
                                        if acks == 0 {
                                            if part.is_durable_mode() {
                                                part.spawn_flush();
                                            }
                                        } else {
                                            let min = if acks == -1 {
                                                min_isr(broker, &image, &part.topic)
                                            } else {
                                                0
                                            };
                                            pending.push((
                                                responses.len(),
                                                parts.len(),
                                                part.clone(),
                                                outcome.last_offset + 1,
                                                outcome.leader_epoch,
                                                min,
                                            ));
                                        }
                                        None
                                    }
                                    Err(e) => {
                                        tracing::debug!(topic = %part.topic, partition = part.index, error = %e, "append refused");
                                        crate::replication::resign_if_storage_failed(broker, &part);
                                        if v >= 8 {
                                            resp.error_message = message(&e);
                                        }
                                        Some(log_error_code(&e))
                                    }
                                }
                            }
                        }
                    }
                }
            };
            if let Some(code) = code {
                any_error = true;
                resp.error_code = code.code();
            }
            parts.push(resp);
        }
        let mut t = TopicProduceResponse::default().with_partition_responses(parts);
        if v >= 13 {
            t.topic_id = topic.topic_id;
        } else {
            t.name = TopicName(str_bytes(name.as_deref().unwrap_or_default()));
        }
        responses.push(t);
    }

    if acks == 0 {
        if any_error {
            return Err(HandlerError::Close(
                "acks=0 produce failed; closing the connection as Kafka does",
            ));
        }
        return Ok(Reply::None);
    }
    let mut resp = ProduceResponse::default().with_responses(responses);
    if pending.is_empty() {
        return ctx.reply(&resp);
    }
    let correlation_id = ctx.correlation_id;
    let started = std::time::Instant::now();
    let timeout = std::time::Duration::from_millis(timeout_ms.max(0) as u64);
    Ok(Reply::Later(Box::pin(async move {
        let results = join_all(
            pending
                .iter()
                .map(|(_, _, p, end, epoch, min)| wait(p, *end, *epoch, *min, timeout)),
        )
        .await;
        for ((ti, pi, part, ..), result) in pending.iter().zip(results) {
            if let Err(code) = result {
                tracing::debug!(topic = %part.topic, partition = part.index, ?code, "produce not acknowledged");
                let r = &mut resp.responses[*ti].partition_responses[*pi];
                r.error_code = code.code();
                r.base_offset = -1;
            }
        }
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            partitions = pending.len(),
            "produce durable"
        );
        match strom_proto::api::encode_response(correlation_id, v, &resp) {
            Ok(b) => Some(b.into()),
            Err(e) => {
                tracing::error!(error = %e, "encoding produce response failed");
                None
            }
        }
    })))
}
