//! Follower replication, as Kafka does it: one fetcher per leader broker fetches every
//! partition this broker follows from that leader with the Fetch API (replica id set), after
//! first truncating any divergent tail with OffsetForLeaderEpoch (KIP-101, KIP-279: to the
//! smaller of the leader's and its own end offset for the last common epoch — never to its high
//! watermark). The leader's high watermark only counts durable copies: a follower's fetch
//! offset counts as its progress when everything below it is fsynced, and otherwise the fetch
//! says how far its log is durable (`DURABLE_END_TAG`). A follower behind its leader (the
//! response says the leader's log end, `LEADER_LOG_END_TAG`) fetches again while its fsync
//! runs; one that has caught up waits for the fsync first, so a fetch the leader parks never
//! holds back durable progress the leader does not know of.
//! When every partition of a response came back without error and the leader holds more than
//! it sent, the next fetch goes out before the records are appended (fetch offsets and epochs
//! predicted from the batch headers), so the leader reads and sends while the follower writes;
//! appends that end elsewhere than predicted drop the connection and the fetch in flight.
//! The leader side proposes ISR changes (AlterPartition through the controller): a follower
//! that caught up rejoins, one that lagged for `replica.lag.time.max.ms` leaves.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::{BrokerId, FetchRequest, OffsetForLeaderEpochRequest, TopicName};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::handlers::str_bytes;
use crate::partition::Partition;
use crate::peer::PeerConn;

const FETCH_VERSION: i16 = 12;
const EPOCH_VERSION: i16 = 3;

/// Tagged fields between Strom brokers (Kafka's own tags are small numbers; other brokers
/// ignore unknown tags). In a follower's fetch partition: the end of its fsynced log, when
/// below the fetch offset.
pub const DURABLE_END_TAG: i32 = 0x5354_0001;
/// In a fetch response partition to a follower: the leader's log end offset.
pub const LEADER_LOG_END_TAG: i32 = 0x5354_0002;
/// In a follower's fetch partition, empty: its last write to this partition's log failed (a
/// full or failing disk) and none has succeeded since. The leader takes it out of the ISR at
/// once and lets it back only once it can write again (as Kafka does with the replicas of a
/// failed log directory, KIP-858).
pub const WRITE_FAILED_TAG: i32 = 0x5354_0003;

/// An offset carried in a tagged field (8 bytes, big-endian); `None` when absent or malformed.
pub fn tagged_offset(
    fields: &std::collections::BTreeMap<i32, bytes::Bytes>,
    tag: i32,
) -> Option<i64> {
    let b = fields.get(&tag)?;
    let raw: [u8; 8] = b.as_ref().try_into().ok()?;
    Some(i64::from_be_bytes(raw)).filter(|o| *o >= 0)
}

/// What a follower's fetch proves it holds durably, for the high watermark: the fetch offset,
/// or the durable end it reports when lower. A fetch offset past the leader's log end (a
/// follower that has not truncated a divergent tail) goes in as it is, to be refused.
pub fn follower_progress(fetch_offset: i64, durable_end: Option<i64>, leader_leo: i64) -> i64 {
    match durable_end {
        Some(d) if fetch_offset <= leader_leo => fetch_offset.min(d),
        _ => fetch_offset,
    }
}

pub fn set_tagged_offset(
    fields: &mut std::collections::BTreeMap<i32, bytes::Bytes>,
    tag: i32,
    offset: i64,
) {
    fields.insert(tag, bytes::Bytes::copy_from_slice(&offset.to_be_bytes()));
}

#[derive(Clone)]
struct Follow {
    part: Arc<Partition>,
    leader_epoch: i32,
    truncated: bool,
    /// The leader refused this partition `refusals` times in a row (it may not have applied
    /// the metadata that made it leader yet, or no longer be the leader): it is asked for again
    /// at `retry_at`, while the fetcher's other partitions go on without waiting (Kafka delays
    /// a failed partition alone too).
    refusals: u32,
    retry_at: Option<Instant>,
}

/// First pause after a partition was refused; it doubles with each refusal in a row, up to
/// `replica.fetch.backoff.ms`. Short, because the usual cause is a leader that applies the same
/// metadata a few milliseconds after its follower.
const FIRST_RETRY: Duration = Duration::from_millis(5);

/// How long a partition waits after its `refusals`-th refusal in a row.
fn retry_delay(refusals: u32, max: Duration) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1u32 << refusals.saturating_sub(1).min(16));
    doubled.min(max)
}

type Key = (String, i32);

struct Fetcher {
    leader: i32,
    partitions: Mutex<HashMap<Key, Follow>>,
    /// Bumped whenever a partition joins or leaves: a fetch that waits at the leader for the
    /// old set is given up, so that a partition that just joined (a new topic, a leadership
    /// change) is not held back for `replica.fetch.wait.max.ms` by partitions with no traffic.
    generation: AtomicU64,
    wake: Notify,
}

impl Fetcher {
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

/// What one fetch round did.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// Data appended, the high watermark moved, or the leader waited out the fetch with nothing
    /// new (it long-polls, so the next fetch can go out at once). Refused partitions wait for
    /// their retry on their own.
    Done,
    /// The leader answered at once with nothing although it was asked to wait: fetching again
    /// at once could spin, so the fetcher pauses.
    Idle,
    /// The fetcher's partitions changed while the fetch waited; its answer is still owed on
    /// the connection, which must be dropped.
    Interrupted,
}

/// The fetchers of this broker, one per leader it follows partitions of.
#[derive(Default)]
pub struct ReplicaFetchers {
    broker: OnceLock<Weak<Broker>>,
    fetchers: Mutex<HashMap<i32, Arc<Fetcher>>>,
}

impl ReplicaFetchers {
    pub fn attach(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    /// The broker, once attached (for tasks that need an owned handle).
    pub fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// A deleted partition leaves its fetcher.
    pub fn remove(&self, topic: &str, partition: i32) {
        let key = (topic.to_string(), partition);
        for f in self.fetchers.lock().values() {
            if f.partitions.lock().remove(&key).is_some() {
                f.changed();
            }
        }
    }

    /// A partition's role changed: it leaves whatever fetcher had it and, when this broker is
    /// now a follower with a live leader, joins that leader's fetcher (truncating first).
    pub fn update(&self, node_id: i32, part: &Arc<Partition>) {
        let key = (part.topic.clone(), part.index);
        let role = part.role();
        let mut fetchers = self.fetchers.lock();
        for f in fetchers.values() {
            if f.partitions.lock().remove(&key).is_some() {
                f.changed();
            }
        }
        if role.leader < 0 || role.leader == node_id || !role.replicas.contains(&node_id) {
            return;
        }
        let Some(weak) = self.broker.get().cloned() else {
            return;
        };
        let f = fetchers.entry(role.leader).or_insert_with(|| {
            let f = Arc::new(Fetcher {
                leader: role.leader,
                partitions: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                wake: Notify::new(),
            });
            tokio::spawn(run_fetcher(weak, f.clone()));
            f
        });
        f.partitions.lock().insert(
            key,
            Follow {
                part: part.clone(),
                leader_epoch: role.leader_epoch,
                truncated: false,
                refusals: 0,
                retry_at: None,
            },
        );
        f.changed();
    }
}

fn ms(broker: &Broker, name: &str) -> Duration {
    Duration::from_millis(broker.config.i64(name).max(0) as u64)
}

async fn run_fetcher(weak: Weak<Broker>, f: Arc<Fetcher>) {
    let mut conn: Option<PeerConn> = None;
    // A fetch sent ahead on `conn` (see `fetch_once`); its answer is owed on that connection.
    let mut inflight: Option<Inflight> = None;
    loop {
        let Some(broker) = weak.upgrade() else {
            return;
        };
        if broker.is_shutting_down() {
            return;
        }
        // Read before the partitions: a change in between interrupts one fetch needlessly,
        // never the other way round.
        let generation = f.generation.load(Ordering::Acquire);
        if inflight
            .as_ref()
            .is_some_and(|i| i.generation != generation)
        {
            // Asked for the old set of partitions: its answer goes with the connection.
            inflight = None;
            conn = None;
        }
        let now = Instant::now();
        let (follows, next_retry, any) = {
            let parts = f.partitions.lock();
            let waiting = |v: &Follow| v.retry_at.filter(|t| *t > now);
            let follows: Vec<(Key, Follow)> = parts
                .iter()
                .filter(|(_, v)| waiting(v).is_none())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let next_retry = parts.values().filter_map(waiting).min();
            (follows, next_retry, !parts.is_empty())
        };
        if !any {
            drop(broker);
            conn = None;
            inflight = None;
            let _ = tokio::time::timeout(Duration::from_secs(1), f.wake.notified()).await;
            continue;
        }
        if follows.is_empty() {
            // Every partition waits for its retry; the connection stays (unless an answer is
            // owed on it).
            if inflight.take().is_some() {
                conn = None;
            }
            drop(broker);
            let until = next_retry.unwrap_or(now + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(until, f.wake.notified()).await;
            continue;
        }
        let backoff = ms(&broker, "replica.fetch.backoff.ms");
        let timeout = ms(&broker, "replica.fetch.wait.max.ms") + broker.controller_timeout() * 5;
        if conn.is_none() {
            let image = broker.image();
            let Some(leader) = image.brokers.get(&f.leader) else {
                tokio::time::sleep(backoff).await;
                continue;
            };
            let addr = format!("{}:{}", leader.host, leader.port);
            let max = broker
                .config
                .i64("replica.fetch.response.max.bytes")
                .max(1 << 20) as usize
                * 2
                + (64 << 20);
            match PeerConn::connect(&addr, broker.controller_timeout(), max).await {
                Ok(c) => conn = Some(c.named(format!("broker-{}-fetcher-0", broker.node_id))),
                Err(e) => {
                    tracing::debug!(leader = f.leader, error = %e, "replica fetcher cannot connect");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let untruncated: Vec<(Key, Follow)> = follows
            .iter()
            .filter(|(_, fl)| !fl.truncated)
            .cloned()
            .collect();
        if !untruncated.is_empty() && inflight.take().is_some() {
            conn = None;
            continue;
        }
        if !untruncated.is_empty() {
            // Partitions the leader refused wait for their retry; the others went on.
            match truncate(&broker, c, &f, untruncated, timeout).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(leader = f.leader, error = %e, "OffsetForLeaderEpoch failed");
                    conn = None;
                    tokio::time::sleep(backoff).await;
                }
            }
            continue;
        }
        // A partition waiting for its retry must not wait behind a fetch the leader parks.
        let max_wait = ms(&broker, "replica.fetch.wait.max.ms");
        let wait =
            max_wait.min(next_retry.map_or(Duration::MAX, |t| t.saturating_duration_since(now)));
        let ahead = inflight.take();
        match fetch_once(&broker, c, &f, &follows, generation, wait, ahead).await {
            Ok((Fetched::Done, next)) => inflight = next,
            // A wait shortened for a retry that is due is no sign of a spinning leader.
            Ok((Fetched::Idle, _)) if wait < max_wait => {}
            Ok((Fetched::Idle, _)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok((Fetched::Interrupted, _)) => conn = None,
            Err(e) => {
                tracing::debug!(leader = f.leader, error = %e, "replica fetch failed");
                conn = None;
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Changes the fetcher's state of a partition, unless it has since moved to another leader
/// epoch (what the round learned is about the epoch it asked in).
fn update(f: &Fetcher, key: &Key, epoch: i32, change: impl FnOnce(&mut Follow)) {
    if let Some(fl) = f.partitions.lock().get_mut(key) {
        if fl.leader_epoch == epoch {
            change(fl);
        }
    }
}

fn mark(f: &Fetcher, key: &Key, epoch: i32, truncated: bool) {
    update(f, key, epoch, |fl| fl.truncated = truncated);
}

/// The leader refused the partition (or this broker could not append what it sent): it waits
/// before it is asked for again.
fn refused(f: &Fetcher, key: &Key, epoch: i32, max: Duration) {
    update(f, key, epoch, |fl| {
        fl.refusals = fl.refusals.saturating_add(1);
        fl.retry_at = Some(Instant::now() + retry_delay(fl.refusals, max));
    });
}

/// A fetch of the partition was answered and appended: a later refusal starts again from the
/// first pause.
fn accepted(f: &Fetcher, key: &Key, fl: &Follow) {
    if fl.refusals > 0 {
        update(f, key, fl.leader_epoch, |fl| {
            fl.refusals = 0;
            fl.retry_at = None;
        });
    }
}

/// KIP-101/279 truncation of the partitions that just started following. Those the leader
/// refuses (it or this broker has stale metadata) wait for a retry.
async fn truncate(
    broker: &Broker,
    conn: &mut PeerConn,
    f: &Fetcher,
    follows: Vec<(Key, Follow)>,
    timeout: Duration,
) -> Result<(), String> {
    let mut by_topic: HashMap<String, Vec<OffsetForLeaderPartition>> = HashMap::new();
    let mut asked = Vec::new();
    for (key, fl) in &follows {
        match fl.part.latest_epoch() {
            Ok(Some(epoch)) => {
                by_topic.entry(key.0.clone()).or_default().push(
                    OffsetForLeaderPartition::default()
                        .with_partition(key.1)
                        .with_current_leader_epoch(fl.leader_epoch)
                        .with_leader_epoch(epoch),
                );
                asked.push((key.clone(), fl.clone()));
            }
            // Nothing written in any epoch: nothing can diverge.
            Ok(None) => mark(f, key, fl.leader_epoch, true),
            Err(e) => return Err(e.to_string()),
        }
    }
    if asked.is_empty() {
        return Ok(());
    }
    let req = OffsetForLeaderEpochRequest::default()
        .with_replica_id(BrokerId(broker.node_id))
        .with_topics(
            by_topic
                .into_iter()
                .map(|(t, parts)| {
                    OffsetForLeaderTopic::default()
                        .with_topic(TopicName(str_bytes(&t)))
                        .with_partitions(parts)
                })
                .collect(),
        );
    let resp = conn.call(&req, EPOCH_VERSION, timeout).await?;
    let backoff = ms(broker, "replica.fetch.backoff.ms");
    for t in resp.topics {
        for p in t.partitions {
            let key = (t.topic.0.to_string(), p.partition);
            let Some((_, fl)) = asked.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            if p.error_code != 0 {
                tracing::debug!(topic = %key.0, partition = key.1, error = p.error_code, "leader refused OffsetForLeaderEpoch");
                refused(f, &key, fl.leader_epoch, backoff);
                continue;
            }
            let part = &fl.part;
            let leo = part.log_end_offset();
            let own = if p.leader_epoch >= 0 {
                part.end_offset_for_epoch(p.leader_epoch)
                    .map_err(|e| e.to_string())?
            } else {
                (-1, -1)
            };
            let (target, complete) =
                truncation_offset(p.leader_epoch, p.end_offset, own, part.log_start_offset());
            if target < leo {
                let cut = part.as_follower_of(f.leader, fl.leader_epoch, |part| {
                    tracing::info!(topic = %key.0, partition = key.1, from = leo, to = target, leader_epoch = p.leader_epoch, complete, "truncating a divergent tail");
                    part.truncate_to(target)
                });
                match cut {
                    Some(r) => r.map_err(|e| e.to_string())?,
                    // No longer this leader's follower: the answer is not about its log now.
                    None => continue,
                }
            }
            if !complete {
                // Another round at once, with the older epoch this cut left as the latest.
                continue;
            }
            // Its pause grows back to the first only once a fetch is answered and appended:
            // a disk that cannot take the data fails after every truncation.
            mark(f, &key, fl.leader_epoch, true);
        }
    }
    Ok(())
}

/// Where a follower truncates (KIP-101, KIP-279), given the leader's answer to
/// OffsetForLeaderEpoch for the follower's latest epoch — `(epoch, end_offset)`: the largest
/// epoch the leader has at or below it and where that epoch ends there — and the follower's own
/// answer for that epoch (`end_offset_for_epoch` on its log). Returns the offset and whether
/// truncation is complete:
/// - the follower has the leader's epoch: the smaller of the two ends, complete;
/// - it does not (its floor epoch is older): an intermediate cut at its own end of that older
///   epoch, after which it asks again with its new, older latest epoch (Kafka's fetcher does
///   the same; one round would keep a divergent tail written in an epoch the leader never had);
/// - the leader has no epoch at or below the follower's (-1): nothing is shared, everything from
///   the follower's log start goes.
pub fn truncation_offset(
    leader_epoch: i32,
    leader_end_offset: i64,
    own: (i32, i64),
    log_start_offset: i64,
) -> (i64, bool) {
    if leader_epoch < 0 || leader_end_offset < 0 {
        return (log_start_offset, true);
    }
    match own {
        (e, o) if e == leader_epoch && o >= 0 => (leader_end_offset.min(o), true),
        (e, o) if e >= 0 && o >= 0 => (o, false),
        _ => (leader_end_offset, true),
    }
}

/// A fetch sent before the data of the previous one was appended: its answer is the next
/// round's. It asks from where the previous answer's whole batches end.
struct Inflight {
    follows: Vec<(Key, Follow)>,
    generation: u64,
}

/// Where a follower's log ending at `log_end` ends, and in which epoch, once the whole batches
/// of `records` past its end are appended (`None`: nothing in them is new). Headers only: the
/// append checks the rest, and a round whose append does not end here drops the fetch sent
/// ahead.
fn end_after(log_end: i64, records: &[u8]) -> Option<(i64, i32)> {
    let mut end = log_end;
    let mut epoch = None;
    for b in strom_proto::batch::BatchIter::new(records) {
        let (h, _) = b.ok()?;
        let last = h.base_offset.checked_add(h.last_offset_delta as i64)?;
        if last >= end {
            end = last.checked_add(1)?;
            epoch = Some(h.partition_leader_epoch);
        }
    }
    epoch.map(|e| (end, e))
}

fn fetch_request(
    broker: &Broker,
    follows: &[(Key, Follow)],
    wait: Duration,
    ahead: &HashMap<Key, (i64, i32)>,
) -> FetchRequest {
    let per_partition = broker.config.i64("replica.fetch.max.bytes").max(0) as i32;
    let mut topics: Vec<FetchTopic> = Vec::new();
    for (key, fl) in follows {
        let (topic, index) = key;
        let (leo, epoch) = match ahead.get(key) {
            Some(&(end, epoch)) => (end, epoch),
            None => (
                fl.part.log_end_offset(),
                fl.part.latest_epoch().ok().flatten().unwrap_or(-1),
            ),
        };
        let mut part = FetchPartition::default()
            .with_partition(*index)
            .with_current_leader_epoch(fl.leader_epoch)
            .with_fetch_offset(leo)
            .with_last_fetched_epoch(epoch)
            .with_log_start_offset(fl.part.log_start_offset())
            .with_partition_max_bytes(per_partition);
        let durable = fl.part.durable_end();
        if durable < leo {
            set_tagged_offset(&mut part.unknown_tagged_fields, DURABLE_END_TAG, durable);
        }
        if fl.part.write_failed() {
            part.unknown_tagged_fields
                .insert(WRITE_FAILED_TAG, bytes::Bytes::new());
        }
        match topics.iter_mut().find(|t| t.topic.0.as_str() == topic) {
            Some(t) => t.partitions.push(part),
            None => topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(str_bytes(topic)))
                    .with_partitions(vec![part]),
            ),
        }
    }
    FetchRequest::default()
        .with_replica_id(BrokerId(broker.node_id))
        .with_max_wait_ms(wait.as_millis().min(i32::MAX as u128) as i32)
        .with_min_bytes(1)
        .with_max_bytes(broker.config.i64("replica.fetch.response.max.bytes") as i32)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(topics)
}

/// One fetch round, asking the leader to wait up to `wait` for data; or, with `inflight`, the
/// round of the fetch already sent. When the answer leaves the leader ahead of this follower
/// and holds nothing but data, the next fetch goes out before the data is appended (and
/// returned as the new `Inflight`): the leader serves it while this broker writes.
async fn fetch_once(
    broker: &Broker,
    conn: &mut PeerConn,
    f: &Fetcher,
    follows: &[(Key, Follow)],
    generation: u64,
    wait: Duration,
    inflight: Option<Inflight>,
) -> Result<(Fetched, Option<Inflight>), String> {
    // A fetch sent ahead goes on only while it asks for the partitions a fresh one would
    // (not when one that waited for its retry is due again).
    // `sent_at`: when this round's fetch went out, if it was not sent ahead (which does not
    // wait at the leader).
    let mut same_set = true;
    let current = follows;
    let (follows, generation, sent_at) = match &inflight {
        Some(i) => {
            let asked: HashSet<&Key> = i.follows.iter().map(|(k, _)| k).collect();
            same_set =
                asked.len() == current.len() && current.iter().all(|(k, _)| asked.contains(k));
            (&i.follows[..], i.generation, None)
        }
        None => {
            let req = fetch_request(broker, follows, wait, &HashMap::new());
            let sent_at = Instant::now();
            conn.send(&req, FETCH_VERSION).await?;
            (follows, generation, Some(sent_at))
        }
    };
    let by_key: HashMap<&Key, &Follow> = follows.iter().map(|(k, fl)| (k, fl)).collect();
    let timeout = sent_at.map_or(Duration::ZERO, |_| wait) + broker.controller_timeout() * 5;
    // The records of a partition are read to where its direct write can take them from.
    let place = |topic: &str, partition: i32| {
        by_key
            .iter()
            .find(|((t, p), _)| t == topic && *p == partition)
            .and_then(|(_, fl)| fl.part.append_position())
    };
    let resp = {
        let call = tokio::time::timeout(timeout, conn.receive_fetch(FETCH_VERSION, &place));
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => break r.map_err(|_| "request timed out".to_string())??,
                _ = f.wake.notified() => {
                    if f.generation.load(Ordering::Acquire) != generation {
                        return Ok((Fetched::Interrupted, None));
                    }
                }
            }
        }
    };
    if resp.error_code != 0 {
        return Err(format!("fetch error {}", resp.error_code));
    }
    // The next fetch goes out before the appends when every partition answered without error
    // and the leader has more for one of them than it sent (so that fetch returns at once).
    let mut ahead: HashMap<Key, (i64, i32)> = HashMap::new();
    let mut plain = true;
    let mut leader_has_more = false;
    for t in &resp.responses {
        for p in &t.partitions {
            let key = (t.topic.0.to_string(), p.partition_index);
            let Some(fl) = by_key.get(&key) else {
                plain = false;
                continue;
            };
            if p.error_code != 0 {
                plain = false;
                continue;
            }
            let Some(records) = p.records.as_ref().filter(|r| !r.is_empty()) else {
                continue;
            };
            match end_after(fl.part.log_end_offset(), records) {
                Some((end, epoch)) => {
                    let leader_leo = tagged_offset(&p.unknown_tagged_fields, LEADER_LOG_END_TAG);
                    leader_has_more |= leader_leo.is_some_and(|l| l > end);
                    ahead.insert(key, (end, epoch));
                }
                None => plain = false,
            }
        }
    }
    let go_ahead =
        plain && same_set && leader_has_more && f.generation.load(Ordering::Acquire) == generation;
    // Sent ahead without waiting at the leader: the durable ends it reports are from before
    // these appends, and a parked fetch would hold back what their fsyncs reach.
    let mut send_failed = false;
    let next = if go_ahead {
        let req = fetch_request(broker, follows, Duration::ZERO, &ahead);
        match conn.send(&req, FETCH_VERSION).await {
            Ok(()) => Some(Inflight {
                follows: follows.to_vec(),
                generation,
            }),
            Err(e) => {
                // The answer at hand is still appended; the connection goes after it.
                tracing::debug!(leader = f.leader, error = %e, "sending a replica fetch ahead failed");
                send_failed = true;
                None
            }
        }
    } else {
        None
    };
    let backoff = ms(broker, "replica.fetch.backoff.ms");
    let mut any_progress = false;
    let mut any_refused = false;
    let mut appended = Vec::new();
    // Whether the leader has more for this fetcher than it sent: then the next fetch returns
    // at once, and may go out before the fsync of this one's data completes.
    let mut leader_ahead = false;
    for t in resp.responses {
        for p in t.partitions {
            let key = (t.topic.0.to_string(), p.partition_index);
            let Some(&fl) = by_key.get(&key) else {
                continue;
            };
            let part = &fl.part;
            match ResponseError::try_from_code(p.error_code) {
                None if p.error_code == 0 => {
                    let leader_leo = tagged_offset(&p.unknown_tagged_fields, LEADER_LOG_END_TAG);
                    let records = p.records.unwrap_or_default();
                    if records.is_empty() {
                        accepted(f, &key, fl);
                        if let Some(end) = leader_leo {
                            part.follower_at_leader_end(end);
                        }
                    } else {
                        let append = part.as_follower_of(f.leader, fl.leader_epoch, |part| {
                            part.append_replicated(&records)
                        });
                        match append {
                            // No longer this leader's follower (elected, or following another
                            // leader or epoch): the answer is not for its log any more.
                            None => continue,
                            Some(Ok(out)) => {
                                accepted(f, &key, fl);
                                if out.appended_batches > 0 {
                                    any_progress = true;
                                    appended.push(part.clone());
                                    leader_ahead |=
                                        leader_leo.is_some_and(|l| l > out.log_end_offset);
                                }
                            }
                            Some(Err(e)) => {
                                // A full or failing disk: truncate and fetch again after
                                // a pause that doubles while it lasts, not in a tight loop.
                                tracing::error!(topic = %key.0, partition = key.1, error = %e, "appending replicated data failed");
                                mark(f, &key, fl.leader_epoch, false);
                                refused(f, &key, fl.leader_epoch, backoff);
                                any_refused = true;
                            }
                        }
                    }
                    part.set_leader_hw(p.high_watermark);
                    if p.high_watermark > part.high_watermark() {
                        any_progress = true;
                    }
                }
                Some(ResponseError::OffsetOutOfRange) => {
                    if part.log_end_offset() < p.log_start_offset {
                        let restart = part.as_follower_of(f.leader, fl.leader_epoch, |part| {
                            tracing::info!(topic = %key.0, partition = key.1, start = p.log_start_offset, "follower is behind the leader's log start; starting over there");
                            part.truncate_fully_and_start_at(p.log_start_offset)
                        });
                        if let Some(r) = restart {
                            r.map_err(|e| e.to_string())?;
                        }
                    } else {
                        // Truncate again before the next fetch; a leader that keeps answering
                        // so is asked less and less often.
                        mark(f, &key, fl.leader_epoch, false);
                        refused(f, &key, fl.leader_epoch, backoff);
                    }
                    any_progress = true;
                }
                _ => {
                    tracing::debug!(topic = %key.0, partition = key.1, error = p.error_code, "replica fetch refused");
                    refused(f, &key, fl.leader_epoch, backoff);
                    any_refused = true;
                }
            }
        }
    }
    if send_failed || next.is_some() || leader_ahead {
        // The fsyncs run while the next fetch is out (sent ahead, or sent at once because the
        // leader has more); it reports what they reached.
        for part in &appended {
            if part.is_durable_mode() {
                part.spawn_flush();
            }
        }
        // The fetch sent ahead asked from where these appends were to end: if one ended
        // elsewhere (an error), its answer does not fit, and the connection goes with it.
        let fits = ahead.iter().all(|(key, (end, _))| {
            by_key
                .get(key)
                .is_some_and(|fl| fl.part.log_end_offset() == *end)
        });
        return Ok(match next {
            _ if send_failed => (Fetched::Interrupted, None),
            Some(next) if fits => (Fetched::Done, Some(next)),
            Some(_) => (Fetched::Interrupted, None),
            None => (Fetched::Done, None),
        });
    }
    // The next fetch may wait at the leader: everything it reports must be durable first
    // (also what an earlier fetch left to fsync).
    for (_, fl) in follows {
        let end = fl.part.log_end_offset();
        if fl.part.durable_end() < end {
            match fl.part.wait_durable(end, None).await {
                Ok(()) => {}
                // Deleted meanwhile (reassigned away): nothing to report for it.
                Err(_) if fl.part.is_closed() => continue,
                Err(e) => return Err(format!("fsync of replicated data failed: {e}")),
            }
        }
        fl.part.maybe_advance_hw();
    }
    // An answer to a fetch sent ahead (which did not wait) is never a sign of a spinning
    // leader: the next fetch is an ordinary one.
    let outcome = match sent_at {
        Some(at) => round_outcome(any_progress, any_refused, at.elapsed(), wait),
        None => Fetched::Done,
    };
    Ok((outcome, None))
}

/// Whether a fetch round calls for a pause before the next. The leader long-polls, so an empty
/// answer after the wait asked for is no reason to pause (a pause there would hold back data
/// produced during it, by up to the pause); refused partitions have their own retry. Only an
/// empty answer well before the wait, with nothing refused, could repeat in a tight loop.
fn round_outcome(progress: bool, refused: bool, took: Duration, wait: Duration) -> Fetched {
    if progress || refused || (!wait.is_zero() && took >= wait / 2) {
        Fetched::Done
    } else {
        Fetched::Idle
    }
}

/// An ISR change a leader proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IsrChange {
    Add(i32),
    Remove(Vec<i32>),
    /// The leader cannot write its log: another in-sync replica leads and it leaves the ISR
    /// (`Controller::resign_leadership`).
    Resign,
}

impl IsrChange {
    /// The replica an expansion asks to add.
    pub fn added(&self) -> Option<i32> {
        match self {
            IsrChange::Add(r) => Some(*r),
            _ => None,
        }
    }
}

/// After a refused append: if the log's writes are failing on its storage (a full or failing
/// disk, `Partition::write_failed`, which classifies the error), the leader asks to hand the
/// partition to another in-sync replica, so that producers go on there while it retries as a
/// follower. Refusals of the client's data change nothing; nor does a leader alone in its ISR.
pub fn resign_if_storage_failed(broker: &Arc<Broker>, part: &Arc<Partition>) {
    if part.write_failed() && part.is_leader() && part.isr_len() > 1 {
        propose_isr(broker, part, IsrChange::Resign);
    }
}

/// Sends an ISR change for `part` to the controller in the background (one at a time per
/// partition); the new ISR takes effect when the metadata image carries it.
pub fn propose_isr(broker: &Arc<Broker>, part: &Arc<Partition>, change: IsrChange) {
    if let IsrChange::Add(replica) = change {
        // A fenced (or unregistered) replica is not eligible (KIP-841): the controller would
        // refuse it, and this leader would ask again on every fetch the replica sends.
        if !broker.image().is_live(replica) {
            part.isr_add_answered(replica);
            return;
        }
    }
    let Some(token) = part.begin_isr_change() else {
        return;
    };
    let broker = broker.clone();
    let part = part.clone();
    // The partition state this decision rests on: the controller refuses the change once the
    // partition moved on (KIP-497), even if this broker still leads in the same epoch — a
    // follower found caught up may have been reassigned away and back since, its log gone.
    let (epoch, partition_epoch) = {
        let role = part.role();
        (role.leader_epoch, role.partition_epoch)
    };
    tokio::spawn(async move {
        let me = broker.node_id;
        let result = loop {
            let result = broker
                .commit_metadata_async::<IsrProposalError>(|img| {
                    let Some(p) = img
                        .topic(&part.topic)
                        .and_then(|t| t.partitions.get(&part.index))
                    else {
                        return Ok(Vec::new());
                    };
                    let state = (me, epoch, partition_epoch);
                    let mut isr = p.isr.clone();
                    match &change {
                        IsrChange::Add(r) if !isr.contains(r) => isr.push(*r),
                        IsrChange::Add(_) => return Ok(Vec::new()),
                        IsrChange::Remove(rs) => isr.retain(|r| !rs.contains(r)),
                        IsrChange::Resign => {
                            return broker
                                .controller()
                                .resign_leadership(img, &part.topic, part.index, state, &*broker)
                                .map_err(|e| IsrProposalError::Refused(e.to_string()))
                        }
                    }
                    broker
                        .controller()
                        .alter_isr(img, &part.topic, part.index, state, &isr, &*broker)
                        .map_err(|e| IsrProposalError::Refused(e.to_string()))
                })
                .await;
            // An expansion whose outcome is unknown (a timeout, the controller lost mid-append,
            // its metadata late here) may have committed: the replica keeps counting toward
            // the high watermark and the leader asks again until it knows — the same request
            // answers at once once this broker's metadata holds it, and is refused once the
            // partition moved on (as Kafka retries AlterPartition). Dropping the replica from
            // the count meanwhile would let the high watermark pass records it lacks while the
            // controller has it in the ISR, and so may elect it next.
            let retry = matches!(result, Err(IsrProposalError::Uncertain(_)))
                && change.added().is_some()
                && part.leads_in(epoch)
                && part.role().partition_epoch == partition_epoch;
            if !retry {
                break result;
            }
            tracing::debug!(topic = %part.topic, partition = part.index, ?change, "ISR expansion outcome unknown; asking again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match result {
            Ok(img) if matches!(change, IsrChange::Resign) => {
                let leader = img
                    .topic(&part.topic)
                    .and_then(|t| t.partitions.get(&part.index))
                    .map(|p| p.leader);
                if leader == Some(me) {
                    tracing::warn!(topic = %part.topic, partition = part.index, "the log cannot be written and no other in-sync replica can lead: staying the leader");
                } else {
                    tracing::warn!(topic = %part.topic, partition = part.index, ?leader, "the log cannot be written: leadership handed over");
                }
            }
            Ok(_) => {
                tracing::info!(topic = %part.topic, partition = part.index, ?change, "ISR changed")
            }
            Err(e) => {
                tracing::warn!(topic = %part.topic, partition = part.index, ?change, error = %e, "ISR change not confirmed")
            }
        }
        part.end_isr_change(token, change.added());
    });
}

/// Why an ISR change was not confirmed: refused as built here (nothing was sent), or an
/// outcome this broker does not know (a timeout, a lost controller, the controller's answer:
/// it may have committed).
#[derive(Debug)]
enum IsrProposalError {
    Refused(String),
    Uncertain(String),
}

impl From<String> for IsrProposalError {
    fn from(e: String) -> Self {
        IsrProposalError::Uncertain(e)
    }
}

impl std::fmt::Display for IsrProposalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IsrProposalError::Refused(e) => write!(f, "refused: {e}"),
            IsrProposalError::Uncertain(e) => write!(f, "outcome unknown: {e}"),
        }
    }
}

/// Leader side: drops followers that lagged for `replica.lag.time.max.ms` from the ISR.
pub async fn isr_ticker(broker: Arc<Broker>) {
    let lag_ms = broker.config.i64("replica.lag.time.max.ms").max(1);
    let mut tick =
        tokio::time::interval(Duration::from_millis((lag_ms as u64 / 2).clamp(10, 5000)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = broker.now_ms();
        for p in broker.replicas.all() {
            if let Some(keep) = p.shrunk_isr(now, lag_ms) {
                let removed: Vec<i32> = p
                    .role()
                    .isr
                    .into_iter()
                    .filter(|r| !keep.contains(r))
                    .collect();
                propose_isr(&broker, &p, IsrChange::Remove(removed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::protocol::{Decodable, Encodable};

    #[test]
    fn a_refused_partition_waits_longer_after_each_refusal_up_to_the_backoff() {
        let max = Duration::from_millis(1000);
        let delays: Vec<u128> = (1..=10).map(|n| retry_delay(n, max).as_millis()).collect();
        assert_eq!(delays, vec![5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(retry_delay(u32::MAX, max), max);
        assert_eq!(retry_delay(3, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn only_an_early_empty_answer_pauses_the_fetcher() {
        let wait = Duration::from_millis(500);
        // The leader waited the fetch out with nothing new: fetch again at once (a pause would
        // hold back whatever is produced during it).
        assert_eq!(
            round_outcome(false, false, Duration::from_millis(500), wait),
            Fetched::Done
        );
        assert_eq!(
            round_outcome(true, false, Duration::from_millis(1), wait),
            Fetched::Done
        );
        // Refused partitions wait on their own; the others go on.
        assert_eq!(
            round_outcome(false, true, Duration::from_millis(1), wait),
            Fetched::Done
        );
        // Nothing, at once, although asked to wait: could spin.
        assert_eq!(
            round_outcome(false, false, Duration::from_millis(1), wait),
            Fetched::Idle
        );
        assert_eq!(
            round_outcome(false, false, Duration::from_millis(1), Duration::ZERO),
            Fetched::Idle
        );
    }

    #[test]
    fn a_fetch_sent_ahead_asks_from_where_the_whole_new_batches_end() {
        let batch = |base: i64, n: i32, epoch: i32| {
            let recs: Vec<strom_proto::records::NewRecord> = (0..n)
                .map(|i| strom_proto::records::NewRecord {
                    key: None,
                    value: Some(vec![b'v'; 10]),
                    headers: vec![],
                    timestamp: i as i64,
                })
                .collect();
            let mut b = strom_proto::records::encode_batch(
                &recs,
                strom_proto::compression::Compression::None,
                Default::default(),
            )
            .unwrap();
            strom_proto::batch::set_base_offset(&mut b, base);
            strom_proto::batch::set_partition_leader_epoch(&mut b, epoch);
            b
        };
        let mut data = batch(10, 5, 3);
        data.extend_from_slice(&batch(15, 2, 4));
        let partial = batch(17, 3, 4);
        data.extend_from_slice(&partial[..partial.len() - 1]);
        assert_eq!(end_after(10, &data), Some((17, 4)));
        // The fetch started inside a batch the log has: only what is past its end counts.
        assert_eq!(end_after(12, &data), Some((17, 4)));
        assert_eq!(end_after(15, &data[..batch(10, 5, 3).len()]), None);
        // Nothing whole, or garbage: nothing to predict, no fetch ahead.
        assert_eq!(end_after(10, &partial[..40]), None);
        assert_eq!(end_after(10, &[0u8; 80]), None);
        // Offsets that overflow: no prediction, no panic.
        assert_eq!(end_after(0, &batch(i64::MAX - 1, 5, 3)), None);
    }

    #[test]
    fn the_leader_counts_what_the_follower_holds_durably() {
        assert_eq!(follower_progress(100, None, 200), 100);
        assert_eq!(follower_progress(100, Some(60), 200), 60);
        // A durable end is never more than the fetch offset proves.
        assert_eq!(follower_progress(100, Some(150), 200), 100);
        // A fetch past the leader's end goes in unchanged, to be refused as divergent.
        assert_eq!(follower_progress(300, Some(60), 200), 300);
    }

    #[test]
    fn durable_end_and_leader_log_end_survive_the_wire() {
        let mut part = FetchPartition::default().with_fetch_offset(100);
        set_tagged_offset(&mut part.unknown_tagged_fields, DURABLE_END_TAG, 60);
        let req = FetchRequest::default().with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(str_bytes("t")))
            .with_partitions(vec![part])]);
        let mut buf = BytesMut::new();
        req.encode(&mut buf, FETCH_VERSION).unwrap();
        let back = FetchRequest::decode(&mut buf.freeze(), FETCH_VERSION).unwrap();
        let p = &back.topics[0].partitions[0];
        assert_eq!(
            tagged_offset(&p.unknown_tagged_fields, DURABLE_END_TAG),
            Some(60)
        );
        assert_eq!(
            tagged_offset(&p.unknown_tagged_fields, LEADER_LOG_END_TAG),
            None
        );

        let mut pd = PartitionData::default();
        set_tagged_offset(&mut pd.unknown_tagged_fields, LEADER_LOG_END_TAG, 1234);
        let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(str_bytes("t")))
            .with_partitions(vec![pd])]);
        let mut buf = BytesMut::new();
        resp.encode(&mut buf, FETCH_VERSION).unwrap();
        let back = FetchResponse::decode(&mut buf.freeze(), FETCH_VERSION).unwrap();
        let p = &back.responses[0].partitions[0];
        assert_eq!(
            tagged_offset(&p.unknown_tagged_fields, LEADER_LOG_END_TAG),
            Some(1234)
        );
        // Malformed or negative values are ignored.
        let mut f = std::collections::BTreeMap::new();
        f.insert(DURABLE_END_TAG, bytes::Bytes::from_static(b"abc"));
        assert_eq!(tagged_offset(&f, DURABLE_END_TAG), None);
        set_tagged_offset(&mut f, DURABLE_END_TAG, -5);
        assert_eq!(tagged_offset(&f, DURABLE_END_TAG), None);
    }
}
