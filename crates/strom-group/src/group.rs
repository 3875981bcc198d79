//! One classic-protocol group as a deterministic state machine (Kafka's states: Empty,
//! PreparingRebalance, CompletingRebalance, Stable, Dead). It owns no sockets and no clock:
//! every call takes `now_ms`, and answers that must wait (JoinGroup until the rebalance
//! completes, SyncGroup until the leader's assignment) are handed back in an `Outbox` when they
//! are ready. `tick` drives the timers (session expiry, rebalance and initial-join delays).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::consumer::ConsumerGroup;
use crate::coordinator::GroupConfig;
use crate::error::GroupError;
use crate::records::{GroupValue, MemberValue, OffsetValue};

pub type Waiter<T> = oneshot::Sender<T>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    /// The name Kafka uses in DescribeGroups and ListGroups.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

/// A JoinGroup request, decoded.
#[derive(Debug, Clone, Default)]
pub struct JoinRequest {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a member without an id is given one and asked to rejoin (KIP-394).
    pub require_known_member_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub metadata: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinResult {
    pub error: Option<GroupError>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Only the leader gets the members and their metadata.
    pub members: Vec<JoinMember>,
    /// KIP-814: a static leader that rejoined a stable group must not assign again.
    pub skip_assignment: bool,
}

impl JoinResult {
    fn error(e: GroupError, member_id: &str) -> Self {
        JoinResult {
            error: Some(e),
            generation: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncResult {
    pub error: Option<GroupError>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncResult {
    fn error(e: GroupError) -> Self {
        SyncResult {
            error: Some(e),
            ..Default::default()
        }
    }
}

/// Answers ready to go out. When `persist` is set, the group's metadata must be written to the
/// log (and be durable) before the SyncGroup answers are sent.
#[derive(Debug, Default)]
pub struct Outbox {
    pub joins: Vec<(Waiter<JoinResult>, JoinResult)>,
    pub syncs: Vec<(Waiter<SyncResult>, SyncResult)>,
    pub persist: bool,
    /// The leader's assignment of this generation is being stored: call `Group::stored` once
    /// the write is durable (or failed).
    pub stored_generation: Option<i32>,
}

impl Outbox {
    fn join(&mut self, w: Waiter<JoinResult>, r: JoinResult) {
        self.joins.push((w, r));
    }
    fn merge(&mut self, other: Outbox) {
        self.joins.extend(other.joins);
        self.syncs.extend(other.syncs);
        self.persist |= other.persist;
        self.stored_generation = self.stored_generation.or(other.stored_generation);
    }
}

#[derive(Debug)]
pub struct Member {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    join_waiter: Option<Waiter<JoinResult>>,
    sync_waiter: Option<Waiter<SyncResult>>,
    heartbeat_deadline: i64,
}

impl Member {
    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
    fn same_protocols(&self, other: &[(String, Bytes)]) -> bool {
        self.protocols == other
    }
}

/// The initial-join delay of a group that starts from Empty (`group.initial.rebalance.delay.ms`):
/// while new members keep arriving, the delay is extended, up to the rebalance timeout.
#[derive(Debug, Clone, Copy)]
struct InitialDelay {
    remaining_ms: i64,
    joined_since: bool,
}

#[derive(Debug)]
pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub generation: i32,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, with the deadline to come back.
    pending: HashMap<String, i64>,
    static_members: HashMap<String, String>,
    rebalance_deadline: i64,
    /// Members of the current generation that have not sent SyncGroup yet; those still here at
    /// the rebalance deadline are removed (they hold an assignment they never received).
    pending_sync: std::collections::HashSet<String>,
    /// The leader's assignment was handed in and is being stored; the group turns Stable (and
    /// SyncGroup is answered) only once it is durable.
    storing: bool,
    initial_delay: Option<InitialDelay>,
    /// `group.initial.rebalance.delay.ms`
    initial_delay_ms: i64,
    /// When the state last changed (Kafka's current_state_timestamp).
    pub state_timestamp: i64,
    pub offsets: BTreeMap<(String, i32), OffsetValue>,
    /// Set while the group is a KIP-848 consumer group (then it has no classic members).
    pub consumer: Option<ConsumerGroup>,
}

/// A fresh member id: a prefix (client or instance id, cut to 255 bytes so ids always fit the
/// stored record's string length) and a UUID.
fn new_member_id(prefix: &str) -> String {
    let mut end = prefix.len().min(255);
    while !prefix.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-{}", &prefix[..end], uuid::Uuid::new_v4())
}

impl Group {
    pub fn new(id: &str, now: i64, initial_delay_ms: i64) -> Self {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            protocol_type: None,
            protocol: None,
            generation: 0,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            static_members: HashMap::new(),
            rebalance_deadline: 0,
            pending_sync: Default::default(),
            storing: false,
            initial_delay: None,
            initial_delay_ms,
            state_timestamp: now,
            offsets: BTreeMap::new(),
            consumer: None,
        }
    }

    /// No members of either protocol.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.consumer.as_ref().is_none_or(|c| c.members.is_empty())
    }

    /// A KIP-848 group with members.
    pub fn is_active_consumer_group(&self) -> bool {
        self.consumer
            .as_ref()
            .is_some_and(|c| !c.members.is_empty())
    }

    /// The state name Kafka reports for this group, whichever its protocol.
    pub fn state_name(&self) -> &'static str {
        match &self.consumer {
            Some(c) if self.state != GroupState::Dead => c.state_name(),
            _ => self.state.name(),
        }
    }

    fn set_state(&mut self, s: GroupState, now: i64) {
        self.state = s;
        self.state_timestamp = now;
    }

    fn max_rebalance_timeout(&self) -> i64 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms as i64)
            .max()
            .unwrap_or(0)
    }

    /// Protocol names every member supports.
    fn candidate_protocols(&self) -> Vec<String> {
        let mut iter = self.members.values();
        let Some(first) = iter.next() else {
            return Vec::new();
        };
        let mut c: Vec<String> = first.protocols.iter().map(|(n, _)| n.clone()).collect();
        for m in iter {
            c.retain(|n| m.protocols.iter().any(|(p, _)| p == n));
        }
        c
    }

    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        let candidates = self.candidate_protocols();
        self.protocol_type.as_deref() == Some(protocol_type)
            && protocols.iter().any(|(n, _)| candidates.contains(n))
    }

    /// The protocol with most first-choice votes among those every member supports.
    fn select_protocol(&self) -> Option<String> {
        let candidates = self.candidate_protocols();
        let mut votes: Vec<(String, usize)> = candidates.iter().map(|c| (c.clone(), 0)).collect();
        for m in self.members.values() {
            if let Some((name, _)) = m.protocols.iter().find(|(n, _)| candidates.contains(n)) {
                if let Some(v) = votes.iter_mut().find(|(c, _)| c == name) {
                    v.1 += 1;
                }
            }
        }
        let best = votes.iter().map(|(_, v)| *v).max()?;
        votes.into_iter().find(|(_, v)| *v == best).map(|(c, _)| c)
    }

    fn current_join_result(&self, member_id: &str) -> JoinResult {
        let leader = self.leader.clone().unwrap_or_default();
        let protocol = self.protocol.clone().unwrap_or_default();
        let members = if leader == member_id {
            self.members
                .values()
                .map(|m| JoinMember {
                    member_id: m.member_id.clone(),
                    group_instance_id: m.group_instance_id.clone(),
                    metadata: m.metadata(&protocol),
                })
                .collect()
        } else {
            Vec::new()
        };
        JoinResult {
            error: None,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            leader,
            member_id: member_id.to_string(),
            members,
            skip_assignment: false,
        }
    }

    /// Checks that `member_id` (with its static instance id, if any) is a current member.
    fn check_member(&self, member_id: &str, instance_id: Option<&str>) -> Result<(), GroupError> {
        if let Some(inst) = instance_id {
            match self.static_members.get(inst) {
                Some(id) if id == member_id => return Ok(()),
                Some(_) => return Err(GroupError::FencedInstanceId),
                None => return Err(GroupError::UnknownMemberId),
            }
        }
        if self.members.contains_key(member_id) {
            Ok(())
        } else {
            Err(GroupError::UnknownMemberId)
        }
    }

    pub fn join(
        &mut self,
        cfg: &GroupConfig,
        req: JoinRequest,
        waiter: Waiter<JoinResult>,
        now: i64,
    ) -> Outbox {
        let mut out = Outbox::default();
        let fail = |out: &mut Outbox, w, e, id: &str| out.join(w, JoinResult::error(e, id));
        if self.state == GroupState::Dead {
            fail(
                &mut out,
                waiter,
                GroupError::CoordinatorNotAvailable,
                &req.member_id,
            );
            return out;
        }
        if self.is_active_consumer_group() {
            fail(
                &mut out,
                waiter,
                GroupError::InconsistentGroupProtocol,
                &req.member_id,
            );
            return out;
        }
        self.consumer = None;
        if req.session_timeout_ms < cfg.min_session_timeout_ms
            || req.session_timeout_ms > cfg.max_session_timeout_ms
        {
            fail(
                &mut out,
                waiter,
                GroupError::InvalidSessionTimeout,
                &req.member_id,
            );
            return out;
        }
        if !self.supports(&req.protocol_type, &req.protocols) {
            fail(
                &mut out,
                waiter,
                GroupError::InconsistentGroupProtocol,
                &req.member_id,
            );
            return out;
        }
        if req.member_id.is_empty() {
            if let Some(inst) = req.group_instance_id.clone() {
                if let Some(old_id) = self.static_members.get(&inst).cloned() {
                    return self.replace_static_member(req, &old_id, waiter, now);
                }
                if self.at_max_size(cfg) {
                    fail(&mut out, waiter, GroupError::GroupMaxSizeReached, "");
                    return out;
                }
                let id = new_member_id(&inst);
                return self.add_member(id, req, waiter, now);
            }
            if self.at_max_size(cfg) {
                fail(&mut out, waiter, GroupError::GroupMaxSizeReached, "");
                return out;
            }
            let prefix = if req.client_id.is_empty() {
                "member"
            } else {
                &req.client_id
            };
            let id = new_member_id(prefix);
            if req.require_known_member_id {
                self.pending
                    .insert(id.clone(), now + req.session_timeout_ms as i64);
                fail(&mut out, waiter, GroupError::MemberIdRequired, &id);
                return out;
            }
            return self.add_member(id, req, waiter, now);
        }
        let id = req.member_id.clone();
        if self.pending.remove(&id).is_some() {
            return self.add_member(id, req, waiter, now);
        }
        if let Err(e) = self.check_member(&id, req.group_instance_id.as_deref()) {
            fail(&mut out, waiter, e, &id);
            return out;
        }
        self.update_member(req, waiter, now)
    }

    fn at_max_size(&self, cfg: &GroupConfig) -> bool {
        self.members.len() + self.pending.len() >= cfg.max_size
    }

    fn add_member(
        &mut self,
        id: String,
        req: JoinRequest,
        waiter: Waiter<JoinResult>,
        now: i64,
    ) -> Outbox {
        if self.members.is_empty() {
            self.protocol_type = Some(req.protocol_type.clone());
        }
        if let Some(inst) = &req.group_instance_id {
            self.static_members.insert(inst.clone(), id.clone());
        }
        self.members.insert(
            id.clone(),
            Member {
                member_id: id,
                group_instance_id: req.group_instance_id,
                client_id: req.client_id,
                client_host: req.client_host,
                session_timeout_ms: req.session_timeout_ms,
                rebalance_timeout_ms: req.rebalance_timeout_ms,
                protocols: req.protocols,
                assignment: Bytes::new(),
                join_waiter: Some(waiter),
                sync_waiter: None,
                heartbeat_deadline: now + req.session_timeout_ms as i64,
            },
        );
        let mut out = Outbox::default();
        match self.state {
            GroupState::PreparingRebalance => {
                if let Some(d) = self.initial_delay.as_mut() {
                    d.joined_since = true;
                }
            }
            _ => out.merge(self.prepare_rebalance(now)),
        }
        out.merge(self.try_complete_join(now));
        out
    }

    fn update_member(&mut self, req: JoinRequest, waiter: Waiter<JoinResult>, now: i64) -> Outbox {
        let mut out = Outbox::default();
        let id = req.member_id.clone();
        let is_leader = self.leader.as_deref() == Some(id.as_str());
        let Some(m) = self.members.get_mut(&id) else {
            out.join(waiter, JoinResult::error(GroupError::UnknownMemberId, &id));
            return out;
        };
        let changed = !m.same_protocols(&req.protocols);
        // A stable group's leader rejoining means it wants a new assignment.
        let must_rebalance = changed || (self.state == GroupState::Stable && is_leader);
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.heartbeat_deadline = now + req.session_timeout_ms as i64;
        match self.state {
            GroupState::PreparingRebalance => {
                m.protocols = req.protocols;
                if let Some(old) = m.join_waiter.replace(waiter) {
                    out.join(old, JoinResult::error(GroupError::RebalanceInProgress, &id));
                }
                out.merge(self.try_complete_join(now));
            }
            GroupState::CompletingRebalance | GroupState::Stable if !must_rebalance => {
                // A rejoin with nothing new: the current generation, no rebalance.
                out.join(waiter, self.current_join_result(&id));
            }
            GroupState::CompletingRebalance | GroupState::Stable => {
                m.protocols = req.protocols;
                m.join_waiter = Some(waiter);
                out.merge(self.prepare_rebalance(now));
                out.merge(self.try_complete_join(now));
            }
            GroupState::Empty | GroupState::Dead => {
                out.join(waiter, JoinResult::error(GroupError::UnknownMemberId, &id));
            }
        }
        out
    }

    /// KIP-345: a static member came back with a new member id. The old id is fenced; in a
    /// stable group with unchanged subscription the member keeps its assignment with no
    /// rebalance.
    fn replace_static_member(
        &mut self,
        req: JoinRequest,
        old_id: &str,
        waiter: Waiter<JoinResult>,
        now: i64,
    ) -> Outbox {
        let mut out = Outbox::default();
        let inst = req.group_instance_id.clone().unwrap_or_default();
        let Some(mut m) = self.members.remove(old_id) else {
            self.static_members.remove(&inst);
            return self.add_member(new_member_id(&inst), req, waiter, now);
        };
        if let Some(w) = m.join_waiter.take() {
            out.join(w, JoinResult::error(GroupError::FencedInstanceId, old_id));
        }
        if let Some(w) = m.sync_waiter.take() {
            out.syncs
                .push((w, SyncResult::error(GroupError::FencedInstanceId)));
        }
        let new_id = new_member_id(&inst);
        let unchanged = m.same_protocols(&req.protocols);
        m.member_id = new_id.clone();
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.protocols = req.protocols;
        m.heartbeat_deadline = now + m.session_timeout_ms as i64;
        self.static_members.insert(inst, new_id.clone());
        if self.pending_sync.remove(old_id) {
            self.pending_sync.insert(new_id.clone());
        }
        let was_leader = self.leader.as_deref() == Some(old_id);
        if was_leader {
            self.leader = Some(new_id.clone());
        }
        match self.state {
            GroupState::Stable if unchanged => {
                self.members.insert(new_id.clone(), m);
                let mut r = self.current_join_result(&new_id);
                r.skip_assignment = was_leader;
                out.join(waiter, r);
                out.persist = true;
            }
            GroupState::PreparingRebalance => {
                m.join_waiter = Some(waiter);
                self.members.insert(new_id, m);
                out.merge(self.try_complete_join(now));
            }
            _ => {
                m.join_waiter = Some(waiter);
                self.members.insert(new_id, m);
                out.merge(self.prepare_rebalance(now));
                out.merge(self.try_complete_join(now));
            }
        }
        out
    }

    fn prepare_rebalance(&mut self, now: i64) -> Outbox {
        let mut out = Outbox::default();
        if self.state == GroupState::CompletingRebalance {
            for m in self.members.values_mut() {
                if let Some(w) = m.sync_waiter.take() {
                    out.syncs
                        .push((w, SyncResult::error(GroupError::RebalanceInProgress)));
                }
            }
        }
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
        }
        self.pending_sync.clear();
        self.storing = false;
        let was_empty = self.state == GroupState::Empty;
        self.set_state(GroupState::PreparingRebalance, now);
        let timeout = self.max_rebalance_timeout();
        if was_empty && self.initial_delay_ms > 0 {
            let delay = self.initial_delay_ms.min(timeout);
            self.initial_delay = Some(InitialDelay {
                remaining_ms: (timeout - delay).max(0),
                joined_since: false,
            });
            self.rebalance_deadline = now + delay;
        } else {
            self.initial_delay = None;
            self.rebalance_deadline = now + timeout;
        }
        out
    }

    fn all_joined(&self) -> bool {
        self.pending.is_empty() && self.members.values().all(|m| m.join_waiter.is_some())
    }

    fn try_complete_join(&mut self, now: i64) -> Outbox {
        if self.state == GroupState::PreparingRebalance
            && self.initial_delay.is_none()
            && self.all_joined()
        {
            self.complete_join(now)
        } else {
            Outbox::default()
        }
    }

    fn remove_member(&mut self, id: &str, out: &mut Outbox, error: GroupError) {
        self.pending_sync.remove(id);
        if let Some(mut m) = self.members.remove(id) {
            if let Some(inst) = &m.group_instance_id {
                if self.static_members.get(inst).map(String::as_str) == Some(id) {
                    self.static_members.remove(inst);
                }
            }
            if let Some(w) = m.join_waiter.take() {
                out.join(w, JoinResult::error(error, id));
            }
            if let Some(w) = m.sync_waiter.take() {
                out.syncs.push((w, SyncResult::error(error)));
            }
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = None;
        }
    }

    /// Ends the join phase: members that did not rejoin are dropped, a new generation starts,
    /// every waiting member gets its JoinGroup answer (the leader with the member list).
    fn complete_join(&mut self, now: i64) -> Outbox {
        let mut out = Outbox::default();
        let absent: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none())
            .map(|m| m.member_id.clone())
            .collect();
        for id in absent {
            self.remove_member(&id, &mut out, GroupError::UnknownMemberId);
        }
        self.initial_delay = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.protocol = None;
            self.leader = None;
            self.set_state(GroupState::Empty, now);
            out.persist = true;
            return out;
        }
        self.protocol = self.select_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        tracing::info!(
            group = %self.id,
            generation = self.generation,
            members = self.members.len(),
            protocol = self.protocol.as_deref().unwrap_or(""),
            join_phase_ms = now - self.state_timestamp,
            "rebalance: join phase complete"
        );
        self.set_state(GroupState::CompletingRebalance, now);
        self.rebalance_deadline = now + self.max_rebalance_timeout();
        self.pending_sync = self.members.keys().cloned().collect();
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let result = self.current_join_result(&id);
            if let Some(m) = self.members.get_mut(&id) {
                m.heartbeat_deadline = now + m.session_timeout_ms as i64;
                if let Some(w) = m.join_waiter.take() {
                    out.join(w, result);
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        waiter: Waiter<SyncResult>,
        now: i64,
    ) -> Outbox {
        let mut out = Outbox::default();
        let check = || -> Result<(), GroupError> {
            if self.state == GroupState::Dead {
                return Err(GroupError::CoordinatorNotAvailable);
            }
            self.check_member(member_id, instance_id)?;
            if generation != self.generation {
                return Err(GroupError::IllegalGeneration);
            }
            if protocol_type.is_some_and(|p| Some(p) != self.protocol_type.as_deref())
                || protocol_name.is_some_and(|p| Some(p) != self.protocol.as_deref())
            {
                return Err(GroupError::InconsistentGroupProtocol);
            }
            match self.state {
                GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
                GroupState::Empty | GroupState::Dead => Err(GroupError::UnknownMemberId),
                _ => Ok(()),
            }
        };
        if let Err(e) = check() {
            out.syncs.push((waiter, SyncResult::error(e)));
            return out;
        }
        self.pending_sync.remove(member_id);
        let (ptype, pname) = (self.protocol_type.clone(), self.protocol.clone());
        let ok = |assignment: Bytes| SyncResult {
            error: None,
            protocol_type: ptype.clone(),
            protocol_name: pname.clone(),
            assignment,
        };
        let member = &self.members[member_id];
        if self.state == GroupState::Stable {
            out.syncs.push((waiter, ok(member.assignment.clone())));
            return out;
        }
        // CompletingRebalance: wait for the leader's assignment.
        let is_leader = self.leader.as_deref() == Some(member_id);
        if let Some(m) = self.members.get_mut(member_id) {
            m.heartbeat_deadline = now + m.session_timeout_ms as i64;
            m.sync_waiter = Some(waiter);
        }
        if is_leader && !self.storing {
            let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
            for m in self.members.values_mut() {
                m.assignment = given.remove(&m.member_id).unwrap_or_default();
            }
            self.storing = true;
            out.persist = true;
            out.stored_generation = Some(self.generation);
        }
        out
    }

    /// The group record written after the leader's SyncGroup of `generation` is durable (`ok`)
    /// or could not be stored. Durable: the group is Stable and every waiting SyncGroup gets its
    /// assignment. Failed: the assignment is dropped and the group rebalances, as Kafka does.
    pub fn stored(&mut self, generation: i32, ok: bool, now: i64) -> Outbox {
        let mut out = Outbox::default();
        if !self.storing
            || self.generation != generation
            || self.state != GroupState::CompletingRebalance
        {
            return out;
        }
        self.storing = false;
        if !ok {
            out.merge(self.prepare_rebalance(now));
            out.merge(self.try_complete_join(now));
            return out;
        }
        self.set_state(GroupState::Stable, now);
        let (ptype, pname) = (self.protocol_type.clone(), self.protocol.clone());
        for m in self.members.values_mut() {
            if let Some(w) = m.sync_waiter.take() {
                out.syncs.push((
                    w,
                    SyncResult {
                        error: None,
                        protocol_type: ptype.clone(),
                        protocol_name: pname.clone(),
                        assignment: m.assignment.clone(),
                    },
                ));
            }
        }
        out
    }

    pub fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: i64,
    ) -> Result<(), GroupError> {
        match self.state {
            GroupState::Dead => return Err(GroupError::CoordinatorNotAvailable),
            GroupState::Empty => return Err(GroupError::UnknownMemberId),
            _ => {}
        }
        self.check_member(member_id, instance_id)?;
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        if let Some(m) = self.members.get_mut(member_id) {
            m.heartbeat_deadline = now + m.session_timeout_ms as i64;
        }
        if self.state == GroupState::PreparingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        Ok(())
    }

    /// LeaveGroup for each (member id, instance id); one result per member.
    pub fn leave(
        &mut self,
        members: &[(String, Option<String>)],
        now: i64,
    ) -> (Vec<Result<String, GroupError>>, Outbox) {
        let mut out = Outbox::default();
        let mut results = Vec::with_capacity(members.len());
        let mut removed_any = false;
        for (member_id, inst) in members {
            if self.state == GroupState::Dead {
                results.push(Err(GroupError::CoordinatorNotAvailable));
                continue;
            }
            let id = match inst {
                Some(inst) => match self.static_members.get(inst) {
                    None => Err(GroupError::UnknownMemberId),
                    Some(id) if !member_id.is_empty() && id != member_id => {
                        Err(GroupError::FencedInstanceId)
                    }
                    Some(id) => Ok(id.clone()),
                },
                None if self.pending.remove(member_id).is_some() => {
                    results.push(Ok(member_id.clone()));
                    continue;
                }
                None if self.members.contains_key(member_id) => Ok(member_id.clone()),
                None => Err(GroupError::UnknownMemberId),
            };
            match id {
                Ok(id) => {
                    self.remove_member(&id, &mut out, GroupError::UnknownMemberId);
                    removed_any = true;
                    results.push(Ok(id));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if removed_any {
            out.merge(self.after_removal(now));
        } else {
            out.merge(self.try_complete_join(now));
        }
        (results, out)
    }

    fn after_removal(&mut self, now: i64) -> Outbox {
        let mut out = Outbox::default();
        if matches!(
            self.state,
            GroupState::Stable | GroupState::CompletingRebalance
        ) {
            out.merge(self.prepare_rebalance(now));
        }
        out.merge(self.try_complete_join(now));
        out
    }

    /// Drives the timers: expired sessions and pending member ids, the end of the join phase
    /// (rebalance timeout or initial delay), and members that never sent SyncGroup.
    pub fn tick(&mut self, now: i64) -> Outbox {
        let mut out = Outbox::default();
        if self.state == GroupState::Dead {
            return out;
        }
        let before = self.pending.len();
        self.pending.retain(|_, deadline| *deadline > now);
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                m.join_waiter.is_none() && m.sync_waiter.is_none() && m.heartbeat_deadline <= now
            })
            .map(|m| m.member_id.clone())
            .collect();
        for id in &expired {
            tracing::info!(group = %self.id, member = %id, "member session expired");
            self.remove_member(id, &mut out, GroupError::UnknownMemberId);
        }
        if !expired.is_empty() {
            out.merge(self.after_removal(now));
        } else if self.pending.len() != before {
            out.merge(self.try_complete_join(now));
        }
        if now < self.rebalance_deadline {
            return out;
        }
        match self.state {
            GroupState::PreparingRebalance => {
                if let Some(d) = self.initial_delay {
                    if d.joined_since && d.remaining_ms > 0 {
                        let delay = self.initial_delay_ms.min(d.remaining_ms);
                        self.initial_delay = Some(InitialDelay {
                            remaining_ms: d.remaining_ms - delay,
                            joined_since: false,
                        });
                        self.rebalance_deadline = now + delay;
                        return out;
                    }
                }
                out.merge(self.complete_join(now));
            }
            GroupState::CompletingRebalance if !self.storing => {
                // The leader never sent its assignment: drop whoever did not sync, start over.
                let lagging: Vec<String> = self
                    .members
                    .values()
                    .filter(|m| m.sync_waiter.is_none())
                    .map(|m| m.member_id.clone())
                    .collect();
                for id in &lagging {
                    self.remove_member(id, &mut out, GroupError::UnknownMemberId);
                }
                out.merge(self.prepare_rebalance(now));
                out.merge(self.try_complete_join(now));
            }
            GroupState::Stable if !self.pending_sync.is_empty() => {
                // Members that never fetched their assignment leave; the rest rebalance.
                let lagging: Vec<String> = self.pending_sync.iter().cloned().collect();
                for id in &lagging {
                    tracing::info!(group = %self.id, member = %id, "member never sent SyncGroup");
                    self.remove_member(id, &mut out, GroupError::UnknownMemberId);
                }
                out.merge(self.after_removal(now));
            }
            _ => {}
        }
        out
    }

    /// Whether an offset commit from this member and generation is accepted.
    pub fn validate_commit(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), GroupError> {
        if self.state == GroupState::Dead {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        if generation < 0 && self.state == GroupState::Empty && !self.is_active_consumer_group() {
            return Ok(());
        }
        if let Some(c) = self.consumer.as_ref().filter(|c| !c.members.is_empty()) {
            return c.validate_commit(member_id, generation);
        }
        self.check_member(member_id, instance_id)?;
        if self.state == GroupState::CompletingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        Ok(())
    }

    /// The group's metadata as stored in `__consumer_offsets`.
    pub fn to_record(&self) -> GroupValue {
        let protocol = self.protocol.clone().unwrap_or_default();
        GroupValue {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            current_state_timestamp: self.state_timestamp,
            members: self
                .members
                .values()
                .map(|m| MemberValue {
                    member_id: m.member_id.clone(),
                    group_instance_id: m.group_instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    subscription: m.metadata(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }

    /// Restores a group from its stored metadata (coordinator load). Members get a fresh
    /// session: those that do not heartbeat within it leave as usual.
    pub fn restore(&mut self, v: GroupValue, now: i64) {
        if !v.members.is_empty() {
            // Classic members: whatever KIP-848 state preceded it is over.
            self.consumer = None;
        }
        self.protocol_type = (!v.protocol_type.is_empty()).then_some(v.protocol_type);
        self.generation = v.generation;
        self.protocol = v.protocol;
        self.leader = v.leader;
        self.members.clear();
        self.static_members.clear();
        self.pending.clear();
        let protocol = self.protocol.clone().unwrap_or_default();
        for m in v.members {
            if let Some(inst) = &m.group_instance_id {
                self.static_members
                    .insert(inst.clone(), m.member_id.clone());
            }
            self.members.insert(
                m.member_id.clone(),
                Member {
                    member_id: m.member_id,
                    group_instance_id: m.group_instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    session_timeout_ms: m.session_timeout_ms,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    protocols: vec![(protocol.clone(), m.subscription)],
                    assignment: m.assignment,
                    join_waiter: None,
                    sync_waiter: None,
                    heartbeat_deadline: now + m.session_timeout_ms as i64,
                },
            );
        }
        let state = if self.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
        self.state = state;
        self.state_timestamp = if v.current_state_timestamp > 0 {
            v.current_state_timestamp
        } else {
            now
        };
    }

    /// Marks the group deleted: every waiter is told, nothing more is accepted.
    pub fn mark_dead(&mut self, now: i64) -> Outbox {
        let mut out = Outbox::default();
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            self.remove_member(&id, &mut out, GroupError::CoordinatorNotAvailable);
        }
        self.set_state(GroupState::Dead, now);
        out
    }
}
