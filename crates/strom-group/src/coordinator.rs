//! The groups of every `__consumer_offsets` partition this node leads, one shard per partition
//! (the coordinator of a group is the leader of partition `abs(hash(group)) % partitions`, so
//! shards follow partition leadership when the cluster arrives). A shard is loaded by replaying
//! its partition; until then its groups answer COORDINATOR_LOAD_IN_PROGRESS. Every change that
//! must survive a restart — a committed offset, a completed rebalance, a deleted group — is
//! appended to the partition while the shard is locked (so the log order is the memory order)
//! and answered only once durable.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::consumer::{
    ConsumerGroup, ConsumerMember, ConsumerSettings, HeartbeatRequest, HeartbeatResponse,
    TopicInfo, Tp,
};
use crate::error::GroupError;
use crate::group::{Group, GroupState, JoinRequest, JoinResult, Outbox, SyncResult};
use crate::records::{GroupValue, OffsetValue, RecordKey};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// A record for `__consumer_offsets`: key, and value or `None` for a tombstone.
pub type KeyValue = (Vec<u8>, Option<Vec<u8>>);

/// Where the coordinator keeps its state: the partitions of `__consumer_offsets`.
pub trait OffsetsLog: Send + Sync {
    /// Appends `records` to `partition` now (in call order); the future resolves once they are
    /// durable.
    fn append(
        &self,
        partition: i32,
        records: Vec<KeyValue>,
    ) -> Result<BoxFuture<'static, Result<(), GroupError>>, GroupError>;
    /// Every record of `partition`, in log order.
    fn read_all(&self, partition: i32) -> Result<Vec<KeyValue>, GroupError>;
}

/// Kafka's group settings (broker configs of the same names).
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`
    pub min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms`
    pub max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms`
    pub initial_rebalance_delay_ms: i64,
    /// `group.max.size`
    pub max_size: usize,
    /// `offset.metadata.max.bytes`
    pub offset_metadata_max_bytes: usize,
    /// `offsets.retention.minutes`, in ms
    pub offsets_retention_ms: i64,
    /// `offsets.retention.check.interval.ms`
    pub offsets_retention_check_interval_ms: i64,
    /// `group.consumer.session.timeout.ms`
    pub consumer_session_timeout_ms: i64,
    /// `group.consumer.heartbeat.interval.ms`
    pub consumer_heartbeat_interval_ms: i32,
    /// `group.consumer.max.size`
    pub consumer_max_size: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout_ms: 6000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3000,
            max_size: i32::MAX as usize,
            offset_metadata_max_bytes: 4096,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            offsets_retention_check_interval_ms: 600_000,
            consumer_session_timeout_ms: 45_000,
            consumer_heartbeat_interval_ms: 5_000,
            consumer_max_size: i32::MAX as usize,
        }
    }
}

/// Java's `String.hashCode` of the group id, as Kafka uses it to place a group.
pub fn java_string_hash(s: &str) -> i32 {
    let mut h: i32 = 0;
    for unit in s.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(unit as i32);
    }
    h
}

/// The `__consumer_offsets` partition of a group (Kafka's `Utils.abs(hash) % n`).
pub fn partition_for(group: &str, partitions: i32) -> i32 {
    let h = java_string_hash(group);
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions.max(1)
}

enum Shard {
    Loading,
    Active(HashMap<String, Group>),
}

#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
    /// A KIP-848 member's partitions (by topic id); its `assignment` bytes are empty.
    pub consumer_assignment: Vec<Tp>,
}

#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: GroupState,
    /// Kafka's state name (a consumer group's own states included).
    pub state_name: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone)]
pub struct GroupListing {
    pub group_id: String,
    pub protocol_type: String,
    /// Kafka's state name (classic or consumer states).
    pub state: &'static str,
    /// "Classic" or "Consumer".
    pub group_type: &'static str,
}

/// A KIP-848 group as ConsumerGroupDescribe shows it.
#[derive(Debug, Clone)]
pub struct ConsumerGroupDescription {
    pub state: &'static str,
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: String,
    pub members: Vec<ConsumerMember>,
    pub targets: HashMap<String, Vec<Tp>>,
}

/// One partition's commit in an OffsetCommit request.
#[derive(Debug, Clone)]
pub struct OffsetCommit {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

pub type PartitionResults = Vec<(String, i32, Result<(), GroupError>)>;

/// Resolves once records appended for a request are durable.
pub type Durable = BoxFuture<'static, Result<(), GroupError>>;

pub struct GroupCoordinator {
    cfg: GroupConfig,
    /// Partition count of `__consumer_offsets` (0 until it exists).
    partitions: RwLock<i32>,
    shards: RwLock<HashMap<i32, Arc<Mutex<Shard>>>>,
    last_expiry_check: Mutex<i64>,
}

/// Sends the answers of an outbox that needs nothing stored.
fn send_outbox(out: Outbox) {
    for (w, r) in out.joins {
        let _ = w.send(r);
    }
    for (w, r) in out.syncs {
        let _ = w.send(r);
    }
}

/// Appends `records` and lets them become durable in the background (housekeeping that no
/// request waits for: expiry, removals).
fn append_in_background(log: &dyn OffsetsLog, p: i32, records: Vec<KeyValue>, what: &str) {
    if records.is_empty() {
        return;
    }
    match log.append(p, records) {
        Ok(fut) => {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(fut);
            }
        }
        Err(e) => tracing::warn!(partition = p, error = %e, "storing {what} failed"),
    }
}

impl GroupCoordinator {
    /// Runs `f` on every loaded shard's groups, each shard locked in turn.
    fn for_each_active_shard(&self, mut f: impl FnMut(i32, &mut HashMap<String, Group>)) {
        let shards: Vec<(i32, Arc<Mutex<Shard>>)> = self
            .shards
            .read()
            .iter()
            .map(|(p, s)| (*p, s.clone()))
            .collect();
        for (p, shard) in shards {
            if let Shard::Active(groups) = &mut *shard.lock() {
                f(p, groups);
            }
        }
    }

    pub fn new(cfg: GroupConfig) -> Self {
        GroupCoordinator {
            cfg,
            partitions: RwLock::new(0),
            shards: RwLock::new(HashMap::new()),
            last_expiry_check: Mutex::new(0),
        }
    }

    pub fn config(&self) -> &GroupConfig {
        &self.cfg
    }

    pub fn partitions(&self) -> i32 {
        *self.partitions.read()
    }

    pub fn partition_of(&self, group: &str) -> i32 {
        partition_for(group, self.partitions())
    }

    /// Takes leadership of `partitions` partitions of `__consumer_offsets` (all of them on a
    /// single node): each shard answers COORDINATOR_LOAD_IN_PROGRESS until `load` ran.
    pub fn begin_load(&self, partitions: i32) {
        *self.partitions.write() = partitions;
        let mut shards = self.shards.write();
        for p in 0..partitions {
            shards
                .entry(p)
                .or_insert_with(|| Arc::new(Mutex::new(Shard::Loading)));
        }
    }

    /// A cluster: `__consumer_offsets` has `partitions` partitions; this node coordinates only
    /// those it leads (`begin_load_partition`), the others answer NOT_COORDINATOR.
    pub fn set_partition_count(&self, partitions: i32) {
        *self.partitions.write() = partitions;
    }

    /// This node became the leader of partition `p`: its groups answer
    /// COORDINATOR_LOAD_IN_PROGRESS until `load` ran. False if it was already loading or loaded.
    pub fn begin_load_partition(&self, p: i32) -> bool {
        let mut shards = self.shards.write();
        if shards.contains_key(&p) {
            return false;
        }
        shards.insert(p, Arc::new(Mutex::new(Shard::Loading)));
        true
    }

    /// This node is no longer the leader of partition `p`: forget its groups (their members
    /// find the new coordinator, which loads them from the log).
    pub fn unload(&self, p: i32) -> bool {
        self.shards.write().remove(&p).is_some()
    }

    /// Replays partition `p` into its shard. Returns the number of groups loaded.
    pub fn load(&self, log: &dyn OffsetsLog, p: i32, now: i64) -> Result<usize, GroupError> {
        let records = log.read_all(p)?;
        let mut groups: HashMap<String, Group> = HashMap::new();
        for (key, value) in records {
            let key = match RecordKey::decode(&key) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "skipping a record");
                    continue;
                }
            };
            match (key, value) {
                (
                    RecordKey::Offset {
                        group,
                        topic,
                        partition,
                    },
                    Some(v),
                ) => match OffsetValue::decode(&v) {
                    Ok(v) => {
                        groups
                            .entry(group.clone())
                            .or_insert_with(|| self.new_group(&group, now))
                            .offsets
                            .insert((topic, partition), v);
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "skipping a record"),
                },
                (
                    RecordKey::Offset {
                        group,
                        topic,
                        partition,
                    },
                    None,
                ) => {
                    if let Some(g) = groups.get_mut(&group) {
                        g.offsets.remove(&(topic, partition));
                    }
                }
                (RecordKey::Group { group }, Some(v)) => match GroupValue::decode(&v) {
                    Ok(v) => groups
                        .entry(group.clone())
                        .or_insert_with(|| self.new_group(&group, now))
                        .restore(v, now),
                    Err(e) => tracing::warn!(partition = p, error = %e, "skipping a record"),
                },
                (RecordKey::Group { group }, None) => {
                    groups.remove(&group);
                }
                (RecordKey::ConsumerGroup { group }, None) => {
                    if let Some(g) = groups.get_mut(&group) {
                        g.consumer = None;
                    }
                }
                (key, value) => {
                    let group = key.group().to_string();
                    let g = groups
                        .entry(group.clone())
                        .or_insert_with(|| self.new_group(&group, now));
                    g.protocol_type = Some("consumer".to_string());
                    let c = g.consumer.get_or_insert_with(ConsumerGroup::default);
                    let session = self.cfg.consumer_session_timeout_ms;
                    if let Err(e) = c.apply_record(&key, value.as_deref(), session, now) {
                        tracing::warn!(partition = p, error = %e, "skipping a record");
                    }
                }
            }
        }
        groups.retain(|_, g| !(g.is_empty() && g.offsets.is_empty() && g.generation == 0));
        let n = groups.len();
        let shard = self
            .shards
            .write()
            .entry(p)
            .or_insert_with(|| Arc::new(Mutex::new(Shard::Loading)))
            .clone();
        let mut guard = shard.lock();
        // A shard already serving keeps its state (a second load must not roll it back).
        if matches!(*guard, Shard::Loading) {
            *guard = Shard::Active(groups);
        }
        Ok(n)
    }

    fn new_group(&self, id: &str, now: i64) -> Group {
        Group::new(id, now, self.cfg.initial_rebalance_delay_ms)
    }

    fn shard(&self, group: &str) -> Result<(i32, Arc<Mutex<Shard>>), GroupError> {
        let n = self.partitions();
        if n == 0 {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        let p = partition_for(group, n);
        let shard = self
            .shards
            .read()
            .get(&p)
            .cloned()
            .ok_or(GroupError::NotCoordinator)?;
        Ok((p, shard))
    }

    /// Runs `f` on the loaded group map of `group`'s shard, with the shard locked.
    fn with_groups<T>(
        &self,
        group: &str,
        f: impl FnOnce(i32, &mut HashMap<String, Group>) -> Result<T, GroupError>,
    ) -> Result<T, GroupError> {
        let (p, shard) = self.shard(group)?;
        let mut guard = shard.lock();
        match &mut *guard {
            Shard::Loading => Err(GroupError::CoordinatorLoadInProgress),
            Shard::Active(groups) => f(p, groups),
        }
    }

    /// Sends the answers in `out`; when the group's metadata must be persisted first, appends
    /// it now (under the caller's lock) and sends the SyncGroup answers once it is durable.
    fn dispatch(&self, log: &dyn OffsetsLog, p: i32, group: &mut Group, out: Outbox) {
        if !out.persist {
            send_outbox(out);
            return;
        }
        // What these answers report (an assignment, a static member's new id) must be durable
        // first; if it cannot be stored the members hear COORDINATOR_NOT_AVAILABLE and retry.
        let key = RecordKey::Group {
            group: group.id.clone(),
        }
        .encode();
        let value = group.to_record().encode();
        let durable = log.append(p, vec![(key, Some(value))]);
        let stored_generation = out.stored_generation;
        let (joins, syncs) = (out.joins, out.syncs);
        let send_all = move |res: Result<(), GroupError>| {
            if let Err(e) = res {
                tracing::warn!(error = %e, "storing group metadata failed");
            }
            let failed = res.is_err();
            for (w, mut r) in joins {
                if failed {
                    r = JoinResult {
                        error: Some(GroupError::CoordinatorNotAvailable),
                        generation: -1,
                        member_id: r.member_id,
                        ..Default::default()
                    };
                }
                let _ = w.send(r);
            }
            for (w, mut r) in syncs {
                if failed {
                    r = SyncResult {
                        error: Some(GroupError::CoordinatorNotAvailable),
                        ..Default::default()
                    };
                }
                let _ = w.send(r);
            }
        };
        let fut = match durable {
            Ok(fut) => fut,
            Err(e) => {
                send_all(Err(e));
                if let Some(gen) = stored_generation {
                    let now = group.state_timestamp;
                    send_outbox(group.stored(gen, false, now));
                }
                return;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                // Finishes once durable: the shard is locked again then (not now).
                let shard = self.shards.read().get(&p).cloned();
                let group_id = group.id.clone();
                handle.spawn(async move {
                    let res = fut.await;
                    let ok = res.is_ok();
                    send_all(res);
                    let (Some(gen), Some(shard)) = (stored_generation, shard) else {
                        return;
                    };
                    let mut guard = shard.lock();
                    if let Shard::Active(groups) = &mut *guard {
                        if let Some(g) = groups.get_mut(&group_id) {
                            let now = g.state_timestamp;
                            send_outbox(g.stored(gen, ok, now));
                        }
                    }
                });
            }
            Err(_) => {
                let res = futures::executor::block_on(fut);
                let ok = res.is_ok();
                send_all(res);
                if let Some(gen) = stored_generation {
                    let now = group.state_timestamp;
                    send_outbox(group.stored(gen, ok, now));
                }
            }
        }
    }

    pub async fn join(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        req: JoinRequest,
        now: i64,
    ) -> JoinResult {
        if group_id.is_empty() {
            return JoinResult {
                error: Some(GroupError::InvalidGroupId),
                generation: -1,
                member_id: req.member_id,
                ..Default::default()
            };
        }
        let (tx, rx) = oneshot::channel();
        let member_id = req.member_id.clone();
        let res = self.with_groups(group_id, |p, groups| {
            let g = groups
                .entry(group_id.to_string())
                .or_insert_with(|| self.new_group(group_id, now));
            // An empty consumer group becomes a classic one: its stored KIP-848 state goes, so
            // a reload does not bring it back.
            if let Some(c) = g.consumer.take_if(|c| c.members.is_empty()) {
                append_in_background(log, p, c.tombstones(group_id), "consumer-group removal");
            }
            let out = g.join(&self.cfg, req, tx, now);
            self.dispatch(log, p, g, out);
            Ok(())
        });
        if let Err(e) = res {
            return JoinResult {
                error: Some(e),
                generation: -1,
                member_id,
                ..Default::default()
            };
        }
        rx.await.unwrap_or_else(|_| JoinResult {
            error: Some(GroupError::CoordinatorNotAvailable),
            generation: -1,
            member_id,
            ..Default::default()
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn sync(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        now: i64,
    ) -> SyncResult {
        let (tx, rx) = oneshot::channel();
        let res = self.with_groups(group_id, |p, groups| {
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::UnknownMemberId)?;
            let out = g.sync(
                member_id,
                instance_id,
                generation,
                protocol_type,
                protocol_name,
                assignments,
                tx,
                now,
            );
            self.dispatch(log, p, g, out);
            Ok(())
        });
        if let Err(e) = res {
            return SyncResult {
                error: Some(e),
                ..Default::default()
            };
        }
        rx.await.unwrap_or(SyncResult {
            error: Some(GroupError::CoordinatorNotAvailable),
            ..Default::default()
        })
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: i64,
    ) -> Result<(), GroupError> {
        self.with_groups(group_id, |_, groups| {
            groups
                .get_mut(group_id)
                .ok_or(GroupError::UnknownMemberId)?
                .heartbeat(member_id, instance_id, generation, now)
        })
    }

    /// LeaveGroup: one result per (member id, instance id).
    pub fn leave(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        members: &[(String, Option<String>)],
        now: i64,
    ) -> Result<Vec<Result<String, GroupError>>, GroupError> {
        self.with_groups(group_id, |p, groups| {
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::UnknownMemberId)?;
            let (results, out) = g.leave(members, now);
            self.dispatch(log, p, g, out);
            Ok(results)
        })
    }

    /// OffsetCommit. `partition_exists` says whether a topic partition exists. The answer
    /// comes once the accepted commits are durable.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_offsets(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        commits: Vec<OffsetCommit>,
        partition_exists: &(dyn Fn(&str, i32) -> bool + Sync),
        now: i64,
    ) -> Result<PartitionResults, GroupError> {
        if group_id.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        let (results, durable) = self.with_groups(group_id, |p, groups| {
            if !groups.contains_key(group_id) {
                if generation >= 0 {
                    return Err(GroupError::IllegalGeneration);
                }
                groups.insert(group_id.to_string(), self.new_group(group_id, now));
            }
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::CoordinatorNotAvailable)?;
            g.validate_commit(member_id, instance_id, generation)?;
            let mut results = Vec::with_capacity(commits.len());
            let mut records = Vec::new();
            let mut accepted = Vec::new();
            for c in commits {
                let metadata = c.metadata.unwrap_or_default();
                let r = if metadata.len() > self.cfg.offset_metadata_max_bytes {
                    Err(GroupError::OffsetMetadataTooLarge)
                } else if !partition_exists(&c.topic, c.partition) {
                    Err(GroupError::UnknownTopicOrPartition)
                } else {
                    let v = OffsetValue {
                        offset: c.offset,
                        leader_epoch: c.leader_epoch,
                        metadata,
                        commit_timestamp: now,
                    };
                    let key = RecordKey::Offset {
                        group: group_id.to_string(),
                        topic: c.topic.clone(),
                        partition: c.partition,
                    };
                    records.push((key.encode(), Some(v.encode())));
                    accepted.push(((c.topic.clone(), c.partition), v));
                    Ok(())
                };
                results.push((c.topic, c.partition, r));
            }
            if records.is_empty() {
                return Ok((results, None));
            }
            let fut = log.append(p, records)?;
            // In memory now, in log order; undone below if the write does not become durable.
            let mut undo = Vec::with_capacity(accepted.len());
            for (k, v) in accepted {
                let before = g.offsets.insert(k.clone(), v.clone());
                undo.push((k, v, before));
            }
            Ok((results, Some((fut, undo))))
        })?;
        if let Some((fut, undo)) = durable {
            if let Err(e) = fut.await {
                // Put back what was there, unless a later commit already replaced ours.
                let _ = self.with_groups(group_id, |_, groups| {
                    if let Some(g) = groups.get_mut(group_id) {
                        for (k, ours, before) in undo {
                            if g.offsets.get(&k) == Some(&ours) {
                                match before {
                                    Some(b) => g.offsets.insert(k, b),
                                    None => g.offsets.remove(&k),
                                };
                            }
                        }
                    }
                    Ok(())
                });
                return Err(e);
            }
        }
        Ok(results)
    }

    /// OffsetFetch: the committed offset of each asked partition (`None`: every committed one).
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<Vec<(String, i32)>>,
    ) -> Result<Vec<(String, i32, Option<OffsetValue>)>, GroupError> {
        self.with_groups(group_id, |_, groups| {
            let g = groups.get(group_id);
            Ok(match partitions {
                Some(ps) => ps
                    .into_iter()
                    .map(|(t, p)| {
                        let v = g.and_then(|g| g.offsets.get(&(t.clone(), p)).cloned());
                        (t, p, v)
                    })
                    .collect(),
                None => g
                    .map(|g| {
                        g.offsets
                            .iter()
                            .map(|((t, p), v)| (t.clone(), *p, Some(v.clone())))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
    }

    /// Every loaded group. Shards still loading are reported as the error.
    pub fn list_groups(&self) -> (Vec<GroupListing>, Option<GroupError>) {
        let shards: Vec<Arc<Mutex<Shard>>> = self.shards.read().values().cloned().collect();
        let mut out = Vec::new();
        let mut err = None;
        for s in shards {
            match &*s.lock() {
                Shard::Loading => err = Some(GroupError::CoordinatorLoadInProgress),
                Shard::Active(groups) => out.extend(groups.values().map(|g| GroupListing {
                    group_id: g.id.clone(),
                    protocol_type: g.protocol_type.clone().unwrap_or_default(),
                    state: g.state_name(),
                    group_type: if g.consumer.is_some() {
                        "Consumer"
                    } else {
                        "Classic"
                    },
                })),
            }
        }
        out.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        (out, err)
    }

    /// DescribeGroups for one group; an unknown group is described as Dead, as Kafka does.
    pub fn describe(&self, group_id: &str) -> Result<GroupDescription, GroupError> {
        self.with_groups(group_id, |_, groups| {
            let Some(g) = groups.get(group_id) else {
                return Ok(GroupDescription {
                    group_id: group_id.to_string(),
                    state: GroupState::Dead,
                    state_name: GroupState::Dead.name(),
                    protocol_type: String::new(),
                    protocol: String::new(),
                    generation: -1,
                    members: Vec::new(),
                });
            };
            if let Some(c) = &g.consumer {
                return Ok(GroupDescription {
                    group_id: g.id.clone(),
                    state: g.state,
                    state_name: g.state_name(),
                    protocol_type: "consumer".to_string(),
                    protocol: c.assignor.clone(),
                    generation: c.group_epoch,
                    members: c
                        .members
                        .values()
                        .map(|m| MemberDescription {
                            member_id: m.member_id.clone(),
                            group_instance_id: m.instance_id.clone(),
                            client_id: m.client_id.clone(),
                            client_host: m.client_host.clone(),
                            metadata: Bytes::new(),
                            assignment: Bytes::new(),
                            consumer_assignment: m.assigned.iter().copied().collect(),
                        })
                        .collect(),
                });
            }
            let protocol = g.protocol.clone().unwrap_or_default();
            let stable = g.state == GroupState::Stable;
            Ok(GroupDescription {
                group_id: g.id.clone(),
                state: g.state,
                state_name: g.state_name(),
                protocol_type: g.protocol_type.clone().unwrap_or_default(),
                protocol: if stable {
                    protocol.clone()
                } else {
                    String::new()
                },
                generation: g.generation,
                members: g
                    .members
                    .values()
                    .map(|m| MemberDescription {
                        member_id: m.member_id.clone(),
                        group_instance_id: m.group_instance_id.clone(),
                        client_id: m.client_id.clone(),
                        client_host: m.client_host.clone(),
                        metadata: if stable {
                            m.protocols
                                .iter()
                                .find(|(n, _)| *n == protocol)
                                .map(|(_, b)| b.clone())
                                .unwrap_or_default()
                        } else {
                            Bytes::new()
                        },
                        assignment: if stable {
                            m.assignment.clone()
                        } else {
                            Bytes::new()
                        },
                        consumer_assignment: Vec::new(),
                    })
                    .collect(),
            })
        })
    }

    /// DeleteGroups for one group: only an empty group; its offsets and metadata get
    /// tombstones.
    pub async fn delete_group(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        now: i64,
    ) -> Result<(), GroupError> {
        let fut = self.with_groups(group_id, |p, groups| {
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::GroupIdNotFound)?;
            match g.state {
                GroupState::Dead => return Err(GroupError::GroupIdNotFound),
                GroupState::Empty if !g.is_active_consumer_group() => {}
                _ => return Err(GroupError::NonEmptyGroup),
            }
            let records = tombstones(g);
            let fut = log.append(p, records)?;
            let out = g.mark_dead(now);
            self.dispatch(log, p, g, out);
            groups.remove(group_id);
            Ok(fut)
        })?;
        fut.await
    }

    /// OffsetDelete: removes committed offsets of topics the group is not subscribed to.
    /// `subscribed` says whether a (non-empty) group's members subscribe to a topic.
    pub async fn delete_offsets(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        partitions: Vec<(String, i32)>,
        subscribed: &(dyn Fn(&Group, &str) -> bool + Sync),
    ) -> Result<PartitionResults, GroupError> {
        let (results, fut) = self.with_groups(group_id, |p, groups| {
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::GroupIdNotFound)?;
            if g.state == GroupState::Dead {
                return Err(GroupError::GroupIdNotFound);
            }
            let mut results = Vec::new();
            let mut records = Vec::new();
            for (t, part) in partitions {
                let active = g.state != GroupState::Empty || g.is_active_consumer_group();
                if active && subscribed(g, &t) {
                    results.push((t, part, Err(GroupError::GroupSubscribedToTopic)));
                    continue;
                }
                if g.offsets.remove(&(t.clone(), part)).is_some() {
                    let key = RecordKey::Offset {
                        group: group_id.to_string(),
                        topic: t.clone(),
                        partition: part,
                    };
                    records.push((key.encode(), None));
                }
                results.push((t, part, Ok(())));
            }
            let fut = if records.is_empty() {
                None
            } else {
                Some(log.append(p, records)?)
            };
            Ok((results, fut))
        })?;
        if let Some(f) = fut {
            f.await?;
        }
        Ok(results)
    }

    /// Timers of every loaded group; offset expiry every `offsets.retention.check.interval.ms`.
    pub fn tick(&self, log: &dyn OffsetsLog, topics: &dyn Fn(&str) -> Option<TopicInfo>, now: i64) {
        let check_expiry = {
            let mut last = self.last_expiry_check.lock();
            if now - *last >= self.cfg.offsets_retention_check_interval_ms {
                *last = now;
                true
            } else {
                false
            }
        };
        self.for_each_active_shard(|p, groups| {
            for g in groups.values_mut() {
                if let Some(c) = g.consumer.as_mut() {
                    if c.has_expired(now) {
                        let before = c.clone();
                        if c.tick(topics, now) && c.members.is_empty() {
                            g.state_timestamp = now;
                        }
                        let records = c.diff_records(&g.id, &before);
                        append_in_background(log, p, records, "member expiry");
                    }
                }
                let out = g.tick(now);
                if !out.joins.is_empty() || !out.syncs.is_empty() || out.persist {
                    self.dispatch(log, p, g, out);
                }
            }
            if check_expiry {
                self.expire_offsets(log, p, groups, now);
            }
        });
    }

    /// KIP-211: the offsets of an empty group expire `offsets.retention.minutes` after it
    /// became empty; a group that only commits (no protocol) expires each offset on its own.
    /// A group left with nothing is removed.
    fn expire_offsets(
        &self,
        log: &dyn OffsetsLog,
        p: i32,
        groups: &mut HashMap<String, Group>,
        now: i64,
    ) {
        let retention = self.cfg.offsets_retention_ms;
        let mut records = Vec::new();
        let mut gone = Vec::new();
        for g in groups.values_mut() {
            if g.state != GroupState::Empty || g.is_active_consumer_group() {
                continue;
            }
            let expired: Vec<(String, i32)> = if g.protocol_type.is_some() {
                if now - g.state_timestamp >= retention {
                    g.offsets.keys().cloned().collect()
                } else {
                    Vec::new()
                }
            } else {
                g.offsets
                    .iter()
                    .filter(|(_, v)| now - v.commit_timestamp >= retention)
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            for (t, part) in expired {
                g.offsets.remove(&(t.clone(), part));
                let key = RecordKey::Offset {
                    group: g.id.clone(),
                    topic: t,
                    partition: part,
                };
                records.push((key.encode(), None));
            }
            if g.offsets.is_empty() && now - g.state_timestamp >= retention {
                if let Some(c) = &g.consumer {
                    records.extend(c.tombstones(&g.id));
                }
                records.push((
                    RecordKey::Group {
                        group: g.id.clone(),
                    }
                    .encode(),
                    None,
                ));
                gone.push(g.id.clone());
            }
        }
        for id in &gone {
            groups.remove(id);
        }
        if records.is_empty() {
            return;
        }
        tracing::info!(
            partition = p,
            records = records.len(),
            groups_removed = gone.len(),
            "expired committed offsets"
        );
        append_in_background(log, p, records, "offset expiry");
    }
}

impl GroupCoordinator {
    fn consumer_settings(&self) -> ConsumerSettings {
        ConsumerSettings {
            session_timeout_ms: self.cfg.consumer_session_timeout_ms,
            heartbeat_interval_ms: self.cfg.consumer_heartbeat_interval_ms,
            max_size: self.cfg.consumer_max_size,
        }
    }

    /// ConsumerGroupHeartbeat (KIP-848). A group with classic members is not a consumer group.
    /// Membership is kept in memory: after a coordinator restart members rejoin (they get
    /// UNKNOWN_MEMBER_ID); committed offsets are durable as for every group.
    pub fn consumer_heartbeat(
        &self,
        log: &dyn OffsetsLog,
        group_id: &str,
        req: HeartbeatRequest,
        topics: &dyn Fn(&str) -> Option<TopicInfo>,
        now: i64,
    ) -> Result<(HeartbeatResponse, Option<Durable>), GroupError> {
        if group_id.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        let settings = self.consumer_settings();
        self.with_groups(group_id, |p, groups| {
            if !groups.contains_key(group_id) {
                if req.member_epoch != 0 {
                    return Err(GroupError::UnknownMemberId);
                }
                groups.insert(group_id.to_string(), self.new_group(group_id, now));
            }
            let g = groups
                .get_mut(group_id)
                .ok_or(GroupError::GroupIdNotFound)?;
            if g.state == GroupState::Dead {
                return Err(GroupError::CoordinatorNotAvailable);
            }
            if !g.members.is_empty() {
                return Err(GroupError::GroupIdNotFound);
            }
            let was_empty = !g.is_active_consumer_group();
            g.protocol_type = Some("consumer".to_string());
            let c = g.consumer.get_or_insert_with(ConsumerGroup::default);
            let before = c.clone();
            let r = c.heartbeat(&settings, req, topics, now)?;
            let records = c.diff_records(group_id, &before);
            if was_empty != c.members.is_empty() {
                g.state_timestamp = now;
            }
            // Written in memory order under the shard lock; the answer waits until durable.
            let durable = if records.is_empty() {
                None
            } else {
                Some(log.append(p, records)?)
            };
            Ok((r, durable))
        })
    }

    /// ConsumerGroupDescribe of one group (GROUP_ID_NOT_FOUND unless a consumer group).
    pub fn describe_consumer_group(
        &self,
        group_id: &str,
    ) -> Result<ConsumerGroupDescription, GroupError> {
        self.with_groups(group_id, |_, groups| {
            let c = groups
                .get(group_id)
                .and_then(|g| g.consumer.as_ref())
                .ok_or(GroupError::GroupIdNotFound)?;
            Ok(ConsumerGroupDescription {
                state: c.state_name(),
                group_epoch: c.group_epoch,
                assignment_epoch: c.assignment_epoch,
                assignor: c.assignor.clone(),
                members: c.members.values().cloned().collect(),
                targets: c
                    .target
                    .iter()
                    .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
                    .collect(),
            })
        })
    }
}

impl GroupCoordinator {
    /// A topic was deleted: every group's committed offsets for it go (with tombstones), so a
    /// topic re-created under the same name does not inherit them.
    pub fn on_topics_deleted(&self, log: &dyn OffsetsLog, topics: &[String]) {
        self.for_each_active_shard(|p, groups| {
            let mut records = Vec::new();
            for g in groups.values_mut() {
                let gone: Vec<(String, i32)> = g
                    .offsets
                    .keys()
                    .filter(|(t, _)| topics.contains(t))
                    .cloned()
                    .collect();
                for (t, part) in gone {
                    g.offsets.remove(&(t.clone(), part));
                    let key = RecordKey::Offset {
                        group: g.id.clone(),
                        topic: t,
                        partition: part,
                    };
                    records.push((key.encode(), None));
                }
            }
            append_in_background(log, p, records, "removal of a deleted topic's offsets");
        });
    }
}

fn tombstones(g: &Group) -> Vec<KeyValue> {
    let mut records: Vec<KeyValue> = g
        .offsets
        .keys()
        .map(|(t, part)| {
            (
                RecordKey::Offset {
                    group: g.id.clone(),
                    topic: t.clone(),
                    partition: *part,
                }
                .encode(),
                None,
            )
        })
        .collect();
    if let Some(c) = &g.consumer {
        records.extend(c.tombstones(&g.id));
    }
    records.push((
        RecordKey::Group {
            group: g.id.clone(),
        }
        .encode(),
        None,
    ));
    records
}
