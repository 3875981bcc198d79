//! KIP-848 consumer groups: members heartbeat (ConsumerGroupHeartbeat) with their subscription
//! and owned partitions; the coordinator computes the target assignment with a server-side
//! assignor (`uniform` or `range`) whenever the group epoch moves, and reconciles each member
//! towards it: a member first gives up partitions it must lose (its epoch stays until it has),
//! and a partition is handed to its new owner only once the previous owner released it, so no
//! partition is ever owned by two members. Deterministic, clock passed in, no sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::coordinator::KeyValue;
use crate::error::GroupError;
use crate::records::{
    decode_epoch_value, decode_target_member_value, encode_epoch_value, encode_target_member_value,
    ConsumerMemberValue, CurrentAssignmentValue, RecordKey, TopicPartitions,
};

/// A partition by topic id.
pub type Tp = ([u8; 16], i32);

/// What the coordinator knows of a topic: its id and partition count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicInfo {
    pub id: [u8; 16],
    pub partitions: i32,
}

/// A ConsumerGroupHeartbeat, decoded (topic names resolved by the handler).
#[derive(Debug, Clone, Default)]
pub struct HeartbeatRequest {
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_topics: Option<Vec<String>>,
    pub server_assignor: Option<String>,
    /// Partitions the member reports owning (`None`: unchanged since the last heartbeat).
    pub owned: Option<Vec<Tp>>,
    pub client_id: String,
    pub client_host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeartbeatResponse {
    pub member_id: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// The member's assignment, when it must (re)consider it.
    pub assignment: Option<Vec<Tp>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Stable,
    /// Must give up partitions before it gets its new epoch.
    UnrevokedPartitions,
    /// Waits for partitions other members still own.
    UnreleasedPartitions,
}

#[derive(Debug, Clone)]
pub struct ConsumerMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub subscribed: Vec<String>,
    pub assignor: Option<String>,
    pub member_epoch: i32,
    pub previous_epoch: i32,
    pub state: MemberState,
    /// What the member owns (as told to it).
    pub assigned: BTreeSet<Tp>,
    /// What it was told to give up and has not confirmed yet.
    pub pending_revocation: BTreeSet<Tp>,
    last_sent: Option<BTreeSet<Tp>>,
    /// A static member that left with epoch -2: its next incarnation may take over.
    static_left: bool,
    session_deadline: i64,
    revocation_deadline: Option<i64>,
}

#[derive(Debug, Default, Clone)]
pub struct ConsumerGroup {
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ConsumerMember>,
    pub target: HashMap<String, BTreeSet<Tp>>,
    /// Partition counts of the subscribed topics when the target was computed.
    subscribed_meta: BTreeMap<String, TopicInfo>,
    pub assignor: String,
    /// Restored from the log: the subscribed topics' metadata is taken as current at the next
    /// heartbeat instead of triggering a new assignment.
    meta_unknown: bool,
}

/// Settings of consumer groups (Kafka's `group.consumer.*`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub session_timeout_ms: i64,
    pub heartbeat_interval_ms: i32,
    pub max_size: usize,
}

pub const ASSIGNORS: &[&str] = &["uniform", "range"];

impl ConsumerGroup {
    /// The group state Kafka reports: Empty, Assigning, Reconciling or Stable.
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.assignment_epoch < self.group_epoch {
            "Assigning"
        } else if self
            .members
            .values()
            .any(|m| m.member_epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    /// Partitions owned (or still being given up) by members other than `except`.
    fn owned_by_others(&self, except: &str) -> BTreeSet<Tp> {
        self.members
            .values()
            .filter(|m| m.member_id != except)
            .flat_map(|m| {
                m.assigned
                    .iter()
                    .chain(m.pending_revocation.iter())
                    .copied()
            })
            .collect()
    }

    fn bump_epoch_and_assign(&mut self, topics: &dyn Fn(&str) -> Option<TopicInfo>) {
        self.group_epoch += 1;
        let mut meta = BTreeMap::new();
        for m in self.members.values() {
            for t in &m.subscribed {
                if let Some(info) = topics(t) {
                    meta.insert(t.clone(), info);
                }
            }
        }
        self.subscribed_meta = meta;
        let assignor = self
            .members
            .values()
            .find_map(|m| m.assignor.clone())
            .filter(|a| ASSIGNORS.contains(&a.as_str()))
            .unwrap_or_else(|| "uniform".to_string());
        self.target = match assignor.as_str() {
            "range" => range_assign(&self.members, &self.subscribed_meta),
            _ => uniform_assign(&self.members, &self.subscribed_meta, &self.target),
        };
        self.assignor = assignor;
        self.assignment_epoch = self.group_epoch;
    }

    /// Whether the partition counts of subscribed topics changed since the last assignment.
    fn metadata_changed(&mut self, topics: &dyn Fn(&str) -> Option<TopicInfo>) -> bool {
        if self.meta_unknown {
            self.meta_unknown = false;
            self.subscribed_meta = self
                .members
                .values()
                .flat_map(|m| &m.subscribed)
                .filter_map(|t| topics(t).map(|i| (t.clone(), i)))
                .collect();
            return false;
        }
        let names: BTreeSet<&String> = self.members.values().flat_map(|m| &m.subscribed).collect();
        names
            .into_iter()
            .any(|t| topics(t) != self.subscribed_meta.get(t).copied())
    }

    pub fn heartbeat(
        &mut self,
        cfg: &ConsumerSettings,
        req: HeartbeatRequest,
        topics: &dyn Fn(&str) -> Option<TopicInfo>,
        now: i64,
    ) -> Result<HeartbeatResponse, GroupError> {
        if req
            .server_assignor
            .as_ref()
            .is_some_and(|a| !ASSIGNORS.contains(&a.as_str()))
        {
            return Err(GroupError::UnsupportedAssignor);
        }
        let mut changed = false;
        let member_id = match req.member_epoch {
            0 => {
                if req.subscribed_topics.is_none() || req.rebalance_timeout_ms < 0 {
                    return Err(GroupError::InvalidRequest);
                }
                let id = if req.member_id.is_empty() {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    req.member_id.clone()
                };
                if !self.members.contains_key(&id) && self.members.len() >= cfg.max_size {
                    return Err(GroupError::GroupMaxSizeReached);
                }
                // A static member's new incarnation takes over from one that left with epoch
                // -2 (its partitions and epoch pass on, so nothing is owned twice); while the
                // old one is still a member it is UNRELEASED_INSTANCE_ID.
                if let Some(inst) = &req.instance_id {
                    let old = self
                        .members
                        .values()
                        .find(|m| m.instance_id.as_ref() == Some(inst) && m.member_id != id)
                        .map(|m| (m.member_id.clone(), m.static_left));
                    match old {
                        Some((_, false)) => return Err(GroupError::UnreleasedInstanceId),
                        Some((old_id, true)) => {
                            if let Some(mut m) = self.members.remove(&old_id) {
                                m.member_id = id.clone();
                                m.static_left = false;
                                m.last_sent = None;
                                m.client_id = req.client_id.clone();
                                m.client_host = req.client_host.clone();
                                m.session_deadline = now + cfg.session_timeout_ms;
                                if let Some(t) = self.target.remove(&old_id) {
                                    self.target.insert(id.clone(), t);
                                }
                                let epoch = m.member_epoch;
                                self.members.insert(id.clone(), m);
                                let assignment =
                                    self.members[&id].assigned.iter().copied().collect();
                                if let Some(m) = self.members.get_mut(&id) {
                                    m.last_sent = Some(m.assigned.clone());
                                }
                                return Ok(HeartbeatResponse {
                                    member_id: id,
                                    member_epoch: epoch,
                                    heartbeat_interval_ms: cfg.heartbeat_interval_ms,
                                    assignment: Some(assignment),
                                });
                            }
                        }
                        None => {}
                    }
                }
                // Rejoining with epoch 0 gives up everything it had.
                self.members.remove(&id);
                let mut m = ConsumerMember::new(&id, now + cfg.session_timeout_ms);
                m.instance_id = req.instance_id.clone();
                m.rack_id = req.rack_id.clone();
                m.client_id = req.client_id.clone();
                m.client_host = req.client_host.clone();
                m.rebalance_timeout_ms = req.rebalance_timeout_ms;
                self.members.insert(id.clone(), m);
                changed = true;
                id
            }
            -2 if self
                .members
                .get(&req.member_id)
                .is_some_and(|m| m.instance_id.is_some()) =>
            {
                // A static member's temporary leave: it keeps its assignment until its session
                // ends or its next incarnation takes over.
                if let Some(m) = self.members.get_mut(&req.member_id) {
                    m.static_left = true;
                }
                return Ok(HeartbeatResponse {
                    member_id: req.member_id,
                    member_epoch: -2,
                    heartbeat_interval_ms: 0,
                    assignment: None,
                });
            }
            -1 | -2 => {
                self.members
                    .remove(&req.member_id)
                    .ok_or(GroupError::UnknownMemberId)?;
                self.bump_epoch_and_assign(topics);
                return Ok(HeartbeatResponse {
                    member_id: req.member_id,
                    member_epoch: req.member_epoch,
                    heartbeat_interval_ms: 0,
                    assignment: None,
                });
            }
            epoch => {
                let m = self
                    .members
                    .get(&req.member_id)
                    .ok_or(GroupError::UnknownMemberId)?;
                if epoch != m.member_epoch && epoch != m.previous_epoch {
                    return Err(GroupError::FencedMemberEpoch);
                }
                req.member_id.clone()
            }
        };
        let m = self.members.get_mut(&member_id).expect("member present");
        m.session_deadline = now + cfg.session_timeout_ms;
        if req.rebalance_timeout_ms >= 0 {
            m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        }
        if let Some(mut subs) = req.subscribed_topics.clone() {
            subs.sort();
            subs.dedup();
            if subs != m.subscribed {
                m.subscribed = subs;
                changed = true;
            }
        }
        if let Some(a) = &req.server_assignor {
            if !ASSIGNORS.contains(&a.as_str()) {
                return Err(GroupError::UnsupportedAssignor);
            }
            if m.assignor.as_ref() != Some(a) {
                m.assignor = Some(a.clone());
                changed = true;
            }
        }
        if req.rack_id.is_some() {
            m.rack_id = req.rack_id.clone();
        }
        // The member confirms what it owns: revoked partitions it no longer lists are released.
        if let Some(owned) = &req.owned {
            let owned: BTreeSet<Tp> = owned.iter().copied().collect();
            if !m.pending_revocation.is_empty() && m.pending_revocation.is_disjoint(&owned) {
                m.pending_revocation.clear();
                m.revocation_deadline = None;
            }
            if owned != m.assigned {
                // It must be told its assignment again.
                m.last_sent = None;
            }
        }
        if changed || self.metadata_changed(topics) {
            self.bump_epoch_and_assign(topics);
        }
        self.reconcile(&member_id, now);
        let m = self.members.get_mut(&member_id).expect("member present");
        let assignment = if m.last_sent.as_ref() != Some(&m.assigned) {
            m.last_sent = Some(m.assigned.clone());
            Some(m.assigned.iter().copied().collect())
        } else {
            None
        };
        Ok(HeartbeatResponse {
            member_id,
            member_epoch: m.member_epoch,
            heartbeat_interval_ms: cfg.heartbeat_interval_ms,
            assignment,
        })
    }

    /// Moves one member towards its target assignment.
    fn reconcile(&mut self, member_id: &str, now: i64) {
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let others = self.owned_by_others(member_id);
        let epoch = self.assignment_epoch;
        let Some(m) = self.members.get_mut(member_id) else {
            return;
        };
        if !m.pending_revocation.is_empty() {
            return;
        }
        let revoke: BTreeSet<Tp> = m.assigned.difference(&target).copied().collect();
        if !revoke.is_empty() {
            m.assigned = m.assigned.intersection(&target).copied().collect();
            m.pending_revocation = revoke;
            m.state = MemberState::UnrevokedPartitions;
            m.revocation_deadline = Some(now + m.rebalance_timeout_ms as i64);
            return;
        }
        let wanted: BTreeSet<Tp> = target.difference(&m.assigned).copied().collect();
        let free: Vec<Tp> = wanted
            .iter()
            .filter(|tp| !others.contains(tp))
            .copied()
            .collect();
        m.state = if free.len() == wanted.len() {
            MemberState::Stable
        } else {
            MemberState::UnreleasedPartitions
        };
        m.assigned.extend(free);
        if m.member_epoch != epoch {
            m.previous_epoch = m.member_epoch;
            m.member_epoch = epoch;
        }
    }

    /// Whether a member's session or revocation deadline has passed.
    pub fn has_expired(&self, now: i64) -> bool {
        self.members
            .values()
            .any(|m| m.session_deadline <= now || m.revocation_deadline.is_some_and(|d| d <= now))
    }

    /// Session and revocation timeouts; returns whether members were removed.
    pub fn tick(&mut self, topics: &dyn Fn(&str) -> Option<TopicInfo>, now: i64) -> bool {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                m.session_deadline <= now || m.revocation_deadline.is_some_and(|d| d <= now)
            })
            .map(|m| m.member_id.clone())
            .collect();
        for id in &expired {
            tracing::info!(member = %id, "consumer group member expired");
            self.members.remove(id);
        }
        if !expired.is_empty() {
            self.bump_epoch_and_assign(topics);
        }
        !expired.is_empty()
    }

    /// Whether an offset commit with this member id and epoch is accepted.
    pub fn validate_commit(&self, member_id: &str, epoch: i32) -> Result<(), GroupError> {
        let m = self
            .members
            .get(member_id)
            .ok_or(GroupError::UnknownMemberId)?;
        if epoch != m.member_epoch && epoch != m.previous_epoch {
            return Err(GroupError::StaleMemberEpoch);
        }
        Ok(())
    }
}

fn to_topic_partitions(set: &BTreeSet<Tp>) -> TopicPartitions {
    let mut out: TopicPartitions = Vec::new();
    for (id, p) in set {
        match out.last_mut() {
            Some((last, ps)) if last == id => ps.push(*p),
            _ => out.push((*id, vec![*p])),
        }
    }
    out
}

fn from_topic_partitions(tps: TopicPartitions) -> BTreeSet<Tp> {
    tps.into_iter()
        .flat_map(|(id, ps)| ps.into_iter().map(move |p| (id, p)))
        .collect()
}

impl MemberState {
    fn code(self) -> i8 {
        match self {
            MemberState::UnrevokedPartitions => 0,
            MemberState::UnreleasedPartitions => 1,
            MemberState::Stable => 2,
        }
    }
    fn from_code(c: i8) -> Self {
        match c {
            0 => MemberState::UnrevokedPartitions,
            1 => MemberState::UnreleasedPartitions,
            _ => MemberState::Stable,
        }
    }
}

impl ConsumerMember {
    fn metadata_value(&self) -> ConsumerMemberValue {
        ConsumerMemberValue {
            instance_id: self.instance_id.clone(),
            rack_id: self.rack_id.clone(),
            client_id: self.client_id.clone(),
            client_host: self.client_host.clone(),
            subscribed: self.subscribed.clone(),
            rebalance_timeout_ms: self.rebalance_timeout_ms,
            server_assignor: self.assignor.clone(),
        }
    }
    fn assignment_value(&self) -> CurrentAssignmentValue {
        CurrentAssignmentValue {
            member_epoch: self.member_epoch,
            previous_epoch: self.previous_epoch,
            state: self.state.code(),
            assigned: to_topic_partitions(&self.assigned),
            pending_revocation: to_topic_partitions(&self.pending_revocation),
        }
    }
    /// A member with nothing assigned yet, whose session lasts until `session_deadline`.
    fn new(member_id: &str, session_deadline: i64) -> Self {
        ConsumerMember {
            member_id: member_id.to_string(),
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            rebalance_timeout_ms: 0,
            subscribed: Vec::new(),
            assignor: None,
            member_epoch: 0,
            previous_epoch: -1,
            state: MemberState::Stable,
            assigned: BTreeSet::new(),
            pending_revocation: BTreeSet::new(),
            last_sent: None,
            static_left: false,
            session_deadline,
            revocation_deadline: None,
        }
    }
}

impl ConsumerGroup {
    /// The records that bring the stored state from `before` to `self`: epochs, member
    /// metadata, target and current assignments that changed, tombstones for members gone.
    pub fn diff_records(&self, group: &str, before: &ConsumerGroup) -> Vec<KeyValue> {
        let g = group.to_string();
        let mut out = Vec::new();
        if self.group_epoch != before.group_epoch {
            let key = RecordKey::ConsumerGroup { group: g.clone() };
            out.push((key.encode(), Some(encode_epoch_value(self.group_epoch))));
        }
        for (id, m) in &self.members {
            let old = before.members.get(id);
            if old.map(|o| o.metadata_value()) != Some(m.metadata_value()) {
                let key = RecordKey::ConsumerMember {
                    group: g.clone(),
                    member: id.clone(),
                };
                out.push((key.encode(), Some(m.metadata_value().encode())));
            }
            if old.map(|o| o.assignment_value()) != Some(m.assignment_value()) {
                let key = RecordKey::CurrentAssignment {
                    group: g.clone(),
                    member: id.clone(),
                };
                out.push((key.encode(), Some(m.assignment_value().encode())));
            }
        }
        for id in before.members.keys() {
            if !self.members.contains_key(id) {
                for key in [
                    RecordKey::ConsumerMember {
                        group: g.clone(),
                        member: id.clone(),
                    },
                    RecordKey::CurrentAssignment {
                        group: g.clone(),
                        member: id.clone(),
                    },
                ] {
                    out.push((key.encode(), None));
                }
            }
        }
        for (id, t) in &self.target {
            if before.target.get(id) != Some(t) {
                let key = RecordKey::TargetMember {
                    group: g.clone(),
                    member: id.clone(),
                };
                out.push((
                    key.encode(),
                    Some(encode_target_member_value(&to_topic_partitions(t))),
                ));
            }
        }
        for id in before.target.keys() {
            if !self.target.contains_key(id) {
                let key = RecordKey::TargetMember {
                    group: g.clone(),
                    member: id.clone(),
                };
                out.push((key.encode(), None));
            }
        }
        if self.assignment_epoch != before.assignment_epoch {
            let key = RecordKey::TargetAssignment { group: g.clone() };
            out.push((
                key.encode(),
                Some(encode_epoch_value(self.assignment_epoch)),
            ));
        }
        out
    }

    /// Tombstones for everything stored about this group (it is being deleted).
    pub fn tombstones(&self, group: &str) -> Vec<KeyValue> {
        let mut out: Vec<KeyValue> = ConsumerGroup::default()
            .diff_records(group, self)
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .collect();
        for key in [
            RecordKey::TargetAssignment {
                group: group.to_string(),
            },
            RecordKey::ConsumerGroup {
                group: group.to_string(),
            },
        ] {
            out.push((key.encode(), None));
        }
        out
    }

    /// Replays one stored record (coordinator load). Members get a fresh session.
    pub fn apply_record(
        &mut self,
        key: &RecordKey,
        value: Option<&[u8]>,
        session_timeout_ms: i64,
        now: i64,
    ) -> Result<(), crate::records::DecodeError> {
        self.meta_unknown = true;
        match (key, value) {
            (RecordKey::ConsumerGroup { .. }, Some(v)) => self.group_epoch = decode_epoch_value(v)?,
            (RecordKey::TargetAssignment { .. }, Some(v)) => {
                self.assignment_epoch = decode_epoch_value(v)?
            }
            (RecordKey::TargetMember { member, .. }, Some(v)) => {
                let t = from_topic_partitions(decode_target_member_value(v)?);
                self.target.insert(member.clone(), t);
            }
            (RecordKey::TargetMember { member, .. }, None) => {
                self.target.remove(member);
            }
            (RecordKey::ConsumerMember { member, .. }, Some(v)) => {
                let v = ConsumerMemberValue::decode(v)?;
                let m = self
                    .members
                    .entry(member.clone())
                    .or_insert_with(|| ConsumerMember::new(member, now));
                m.instance_id = v.instance_id;
                m.rack_id = v.rack_id;
                m.client_id = v.client_id;
                m.client_host = v.client_host;
                m.subscribed = v.subscribed;
                m.rebalance_timeout_ms = v.rebalance_timeout_ms;
                m.assignor = v.server_assignor;
                m.session_deadline = now + session_timeout_ms;
            }
            (RecordKey::CurrentAssignment { member, .. }, Some(v)) => {
                let v = CurrentAssignmentValue::decode(v)?;
                let m = self
                    .members
                    .entry(member.clone())
                    .or_insert_with(|| ConsumerMember::new(member, now));
                m.member_epoch = v.member_epoch;
                m.previous_epoch = v.previous_epoch;
                m.state = MemberState::from_code(v.state);
                m.assigned = from_topic_partitions(v.assigned);
                m.pending_revocation = from_topic_partitions(v.pending_revocation);
                m.session_deadline = now + session_timeout_ms;
                if !m.pending_revocation.is_empty() {
                    m.revocation_deadline = Some(now + m.rebalance_timeout_ms as i64);
                }
            }
            (RecordKey::ConsumerMember { member, .. }, None)
            | (RecordKey::CurrentAssignment { member, .. }, None) => {
                self.members.remove(member);
            }
            (RecordKey::ConsumerGroup { .. }, None)
            | (RecordKey::TargetAssignment { .. }, None) => {}
            _ => {}
        }
        if let Some(a) = self.members.values().find_map(|m| m.assignor.clone()) {
            self.assignor = a;
        } else if self.assignor.is_empty() {
            self.assignor = "uniform".to_string();
        }
        Ok(())
    }
}

/// Kafka's range assignment per topic: members subscribed to it, sorted, take contiguous
/// ranges, the first ones one more.
fn range_assign(
    members: &BTreeMap<String, ConsumerMember>,
    meta: &BTreeMap<String, TopicInfo>,
) -> HashMap<String, BTreeSet<Tp>> {
    let mut out: HashMap<String, BTreeSet<Tp>> = members
        .keys()
        .map(|k| (k.clone(), BTreeSet::new()))
        .collect();
    for (topic, info) in meta {
        let subs: Vec<&String> = members
            .values()
            .filter(|m| m.subscribed.contains(topic))
            .map(|m| &m.member_id)
            .collect();
        if subs.is_empty() {
            continue;
        }
        let n = info.partitions.max(0) as usize;
        let (per, extra) = (n / subs.len(), n % subs.len());
        let mut p = 0;
        for (i, id) in subs.iter().enumerate() {
            let count = per + usize::from(i < extra);
            let set = out.entry((*id).clone()).or_default();
            for q in p..p + count {
                set.insert((info.id, q as i32));
            }
            p += count;
        }
    }
    out
}

/// Balanced and sticky: each member first keeps up to its fair share of what it had, then
/// the rest goes to the least-loaded subscribed member (its previous owner on a tie).
fn uniform_assign(
    members: &BTreeMap<String, ConsumerMember>,
    meta: &BTreeMap<String, TopicInfo>,
    previous: &HashMap<String, BTreeSet<Tp>>,
) -> HashMap<String, BTreeSet<Tp>> {
    let mut out: HashMap<String, BTreeSet<Tp>> = members
        .keys()
        .map(|k| (k.clone(), BTreeSet::new()))
        .collect();
    let mut eligible: BTreeMap<Tp, Vec<&String>> = BTreeMap::new();
    for (topic, info) in meta {
        let subs: Vec<&String> = members
            .values()
            .filter(|m| m.subscribed.contains(topic))
            .map(|m| &m.member_id)
            .collect();
        if subs.is_empty() {
            continue;
        }
        for p in 0..info.partitions.max(0) {
            eligible.insert((info.id, p), subs.clone());
        }
    }
    if members.is_empty() {
        return out;
    }
    let floor = eligible.len() / members.len();
    let mut owner_of: HashMap<Tp, &String> = HashMap::new();
    for (id, set) in previous {
        for tp in set {
            if let Some((k, _)) = members.get_key_value(id) {
                owner_of.insert(*tp, k);
            }
        }
    }
    let mut unassigned = Vec::new();
    for (tp, subs) in &eligible {
        match owner_of.get(tp) {
            Some(owner) if subs.contains(owner) && out[*owner].len() < floor.max(1) => {
                out.get_mut(*owner).expect("member").insert(*tp);
            }
            _ => unassigned.push(*tp),
        }
    }
    for tp in unassigned {
        let subs = &eligible[&tp];
        let min = subs.iter().map(|s| out[*s].len()).min().unwrap_or(0);
        let pick = subs
            .iter()
            .find(|s| out[**s].len() == min && owner_of.get(&tp) == Some(*s))
            .or_else(|| subs.iter().find(|s| out[**s].len() == min))
            .copied();
        if let Some(s) = pick {
            out.get_mut(s).expect("member").insert(tp);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: [u8; 16] = [7; 16];

    fn settings() -> ConsumerSettings {
        ConsumerSettings {
            session_timeout_ms: 45_000,
            heartbeat_interval_ms: 500,
            max_size: 100,
        }
    }

    fn topics(name: &str) -> Option<TopicInfo> {
        (name == "t").then_some(TopicInfo {
            id: T,
            partitions: 6,
        })
    }

    fn join(g: &mut ConsumerGroup, id: &str, now: i64) -> HeartbeatResponse {
        g.heartbeat(
            &settings(),
            HeartbeatRequest {
                member_id: id.into(),
                member_epoch: 0,
                rebalance_timeout_ms: 30_000,
                subscribed_topics: Some(vec!["t".into()]),
                owned: Some(vec![]),
                ..Default::default()
            },
            &topics,
            now,
        )
        .unwrap()
    }

    fn beat(
        g: &mut ConsumerGroup,
        id: &str,
        epoch: i32,
        owned: &[i32],
        now: i64,
    ) -> Result<HeartbeatResponse, GroupError> {
        g.heartbeat(
            &settings(),
            HeartbeatRequest {
                member_id: id.into(),
                member_epoch: epoch,
                rebalance_timeout_ms: -1,
                owned: Some(owned.iter().map(|p| (T, *p)).collect()),
                ..Default::default()
            },
            &topics,
            now,
        )
    }

    fn parts(r: &HeartbeatResponse) -> Vec<i32> {
        r.assignment
            .as_ref()
            .map(|a| a.iter().map(|(_, p)| *p).collect())
            .unwrap_or_default()
    }

    /// No partition is owned by two members at once.
    fn exclusive(g: &ConsumerGroup) {
        let mut seen = BTreeSet::new();
        for m in g.members.values() {
            for tp in m.assigned.iter().chain(&m.pending_revocation) {
                assert!(seen.insert(*tp), "{tp:?} owned twice");
            }
        }
    }

    #[test]
    fn a_second_member_gets_partitions_only_after_the_first_revokes_them() {
        let mut g = ConsumerGroup::default();
        let a = join(&mut g, "a", 0);
        assert_eq!(parts(&a), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.member_epoch, 1);
        let b = join(&mut g, "b", 10);
        assert_eq!(b.member_epoch, 2);
        assert!(parts(&b).is_empty(), "nothing free yet: {b:?}");
        exclusive(&g);
        assert_eq!(g.state_name(), "Reconciling");
        // a is told to keep 3 and give up 3; its epoch stays until it confirms.
        let a = beat(&mut g, "a", 1, &[0, 1, 2, 3, 4, 5], 20).unwrap();
        assert_eq!(a.member_epoch, 1);
        let kept = parts(&a);
        assert_eq!(kept.len(), 3);
        exclusive(&g);
        let a = beat(&mut g, "a", 1, &kept, 30).unwrap();
        assert_eq!(a.member_epoch, 2);
        let b = beat(&mut g, "b", 2, &[], 40).unwrap();
        let got = parts(&b);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|p| !kept.contains(p)));
        exclusive(&g);
        assert_eq!(g.state_name(), "Stable");
    }

    #[test]
    fn fencing_unknown_members_and_session_expiry() {
        let mut g = ConsumerGroup::default();
        join(&mut g, "a", 0);
        assert_eq!(
            beat(&mut g, "a", 9, &[], 1),
            Err(GroupError::FencedMemberEpoch)
        );
        assert_eq!(
            beat(&mut g, "x", 1, &[], 1),
            Err(GroupError::UnknownMemberId)
        );
        join(&mut g, "b", 0);
        assert!(!g.tick(&topics, 44_999));
        beat(&mut g, "b", 2, &[], 30_000).unwrap();
        assert!(g.tick(&topics, 45_000), "a never heartbeated again");
        assert!(!g.members.contains_key("a"));
        let b = beat(&mut g, "b", 2, &[], 45_100).unwrap();
        assert_eq!(parts(&b), vec![0, 1, 2, 3, 4, 5], "b takes everything");
        assert_eq!(g.validate_commit("b", b.member_epoch), Ok(()));
        assert_eq!(g.validate_commit("a", 1), Err(GroupError::UnknownMemberId));
    }

    #[test]
    fn leaving_releases_partitions() {
        let mut g = ConsumerGroup::default();
        join(&mut g, "a", 0);
        join(&mut g, "b", 0);
        let a = beat(&mut g, "a", 1, &[0, 1, 2, 3, 4, 5], 1).unwrap();
        beat(&mut g, "a", 1, &parts(&a), 2).unwrap();
        let r = beat(&mut g, "a", -1, &[], 3).unwrap();
        assert_eq!(r.member_epoch, -1);
        let b = beat(&mut g, "b", 2, &[], 4).unwrap();
        assert_eq!(parts(&b).len(), 6);
        exclusive(&g);
    }

    #[test]
    fn stored_records_restore_the_group() {
        let mut g = ConsumerGroup::default();
        let empty = ConsumerGroup::default();
        join(&mut g, "a", 0);
        join(&mut g, "b", 0);
        let a = beat(&mut g, "a", 1, &[0, 1, 2, 3, 4, 5], 1).unwrap();
        beat(&mut g, "a", 1, &parts(&a), 2).unwrap();
        let records = g.diff_records("grp", &empty);
        let mut restored = ConsumerGroup::default();
        for (k, v) in &records {
            let key = RecordKey::decode(k).unwrap();
            restored
                .apply_record(&key, v.as_deref(), 45_000, 100)
                .unwrap();
        }
        assert_eq!(restored.group_epoch, g.group_epoch);
        assert_eq!(restored.assignment_epoch, g.assignment_epoch);
        assert_eq!(restored.target, g.target);
        for (id, m) in &g.members {
            let r = &restored.members[id];
            assert_eq!(r.assigned, m.assigned);
            assert_eq!(r.member_epoch, m.member_epoch);
            assert_eq!(r.subscribed, m.subscribed);
        }
        // The restored group carries on: b gets its partitions with its current epoch, and no
        // new epoch is started just because the group was reloaded.
        let b = beat(&mut restored, "b", 2, &[], 200).unwrap();
        assert_eq!(b.member_epoch, 2);
        assert_eq!(parts(&b).len(), 3);
        assert_eq!(restored.group_epoch, g.group_epoch);
        // A member leaving is written as tombstones.
        let before = restored.clone();
        beat(&mut restored, "a", -1, &[], 300).unwrap();
        let diff = restored.diff_records("grp", &before);
        assert!(diff.iter().any(|(k, v)| v.is_none()
            && RecordKey::decode(k).unwrap()
                == RecordKey::ConsumerMember {
                    group: "grp".into(),
                    member: "a".into()
                }));
    }

    #[test]
    fn a_static_member_is_replaced_only_after_it_left_and_keeps_its_partitions() {
        let mut g = ConsumerGroup::default();
        let static_join = |g: &mut ConsumerGroup, id: &str| {
            g.heartbeat(
                &settings(),
                HeartbeatRequest {
                    member_id: id.into(),
                    member_epoch: 0,
                    instance_id: Some("inst".into()),
                    rebalance_timeout_ms: 30_000,
                    subscribed_topics: Some(vec!["t".into()]),
                    ..Default::default()
                },
                &topics,
                0,
            )
        };
        let a = static_join(&mut g, "a").unwrap();
        join(&mut g, "b", 0);
        let a = beat(&mut g, "a", a.member_epoch, &[0, 1, 2, 3, 4, 5], 1).unwrap();
        let kept = parts(&a);
        beat(&mut g, "a", 1, &kept, 2).unwrap();
        // A new incarnation while the old one is a member: refused, nothing changes.
        assert_eq!(
            static_join(&mut g, "a2"),
            Err(GroupError::UnreleasedInstanceId)
        );
        exclusive(&g);
        // The old one leaves temporarily: the new one takes its partitions and epoch over.
        beat(&mut g, "a", -2, &[], 3).unwrap();
        let epoch_before = g.group_epoch;
        let a2 = static_join(&mut g, "a2").unwrap();
        let mut got = parts(&a2);
        got.sort();
        assert_eq!(got, kept);
        assert_eq!(g.group_epoch, epoch_before, "no rebalance");
        assert!(!g.members.contains_key("a"));
        exclusive(&g);
    }

    #[test]
    fn an_unknown_assignor_changes_nothing() {
        let mut g = ConsumerGroup::default();
        let r = g.heartbeat(
            &settings(),
            HeartbeatRequest {
                member_id: "m".into(),
                member_epoch: 0,
                rebalance_timeout_ms: 1000,
                subscribed_topics: Some(vec!["t".into()]),
                server_assignor: Some("mystery".into()),
                ..Default::default()
            },
            &topics,
            0,
        );
        assert_eq!(r, Err(GroupError::UnsupportedAssignor));
        assert!(g.members.is_empty());
    }

    #[test]
    fn range_and_uniform_are_balanced() {
        for assignor in ["range", "uniform"] {
            let mut g = ConsumerGroup::default();
            for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
                g.heartbeat(
                    &settings(),
                    HeartbeatRequest {
                        member_id: id.to_string(),
                        member_epoch: 0,
                        rebalance_timeout_ms: 1000,
                        subscribed_topics: Some(vec!["t".into()]),
                        server_assignor: Some(assignor.into()),
                        ..Default::default()
                    },
                    &topics,
                    i as i64,
                )
                .unwrap();
            }
            let mut sizes: Vec<usize> = g.target.values().map(|s| s.len()).collect();
            sizes.sort();
            assert_eq!(sizes, vec![1, 1, 2, 2], "{assignor}");
            let all: BTreeSet<Tp> = g.target.values().flatten().copied().collect();
            assert_eq!(all.len(), 6);
        }
    }
}
