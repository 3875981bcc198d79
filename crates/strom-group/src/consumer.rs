//! KIP-848 consumer groups: members heartbeat (ConsumerGroupHeartbeat) with their subscription
//! and owned partitions; the coordinator computes the target assignment with a server-side
//! assignor (`uniform` or `range`) whenever the group epoch moves, and reconciles each member
//! towards it: a member first gives up partitions it must lose (its epoch stays until it has),
//! and a partition is handed to its new owner only once the previous owner released it, so no
//! partition is ever owned by two members. Deterministic, clock passed in, no sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::GroupError;

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
    session_deadline: i64,
    revocation_deadline: Option<i64>,
}

#[derive(Debug, Default)]
pub struct ConsumerGroup {
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ConsumerMember>,
    pub target: HashMap<String, BTreeSet<Tp>>,
    /// Partition counts of the subscribed topics when the target was computed.
    subscribed_meta: BTreeMap<String, TopicInfo>,
    pub assignor: String,
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
    fn metadata_changed(&self, topics: &dyn Fn(&str) -> Option<TopicInfo>) -> bool {
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
                // A static member replacing its previous incarnation takes its place.
                if let Some(inst) = &req.instance_id {
                    let old: Vec<String> = self
                        .members
                        .values()
                        .filter(|m| m.instance_id.as_ref() == Some(inst) && m.member_id != id)
                        .map(|m| m.member_id.clone())
                        .collect();
                    for o in old {
                        self.members.remove(&o);
                    }
                }
                // Rejoining with epoch 0 gives up everything it had.
                self.members.remove(&id);
                self.members.insert(
                    id.clone(),
                    ConsumerMember {
                        member_id: id.clone(),
                        instance_id: req.instance_id.clone(),
                        rack_id: req.rack_id.clone(),
                        client_id: req.client_id.clone(),
                        client_host: req.client_host.clone(),
                        rebalance_timeout_ms: req.rebalance_timeout_ms,
                        subscribed: Vec::new(),
                        assignor: None,
                        member_epoch: 0,
                        previous_epoch: -1,
                        state: MemberState::Stable,
                        assigned: BTreeSet::new(),
                        pending_revocation: BTreeSet::new(),
                        last_sent: None,
                        session_deadline: now + cfg.session_timeout_ms,
                        revocation_deadline: None,
                    },
                );
                changed = true;
                id
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
