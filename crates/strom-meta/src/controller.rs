//! The controller: turns admin requests into metadata records, given the current image. It is a
//! pure function of its inputs (no clock, no randomness, no I/O) so that the same logic runs in
//! a simulated cluster later; callers supply topic ids and append the records to the log.

use std::collections::{BTreeMap, BTreeSet};

use crate::image::MetadataImage;
use crate::record::{MetadataRecord, TopicId};

/// Kafka's limit on topic name length (`Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_NAME_CHARS: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error("topic '{0}' already exists")]
    TopicAlreadyExists(String),
    #[error("{0}")]
    InvalidTopic(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidReplicationFactor(String),
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("unknown partition {1} of topic '{0}'")]
    UnknownPartition(String, i32),
    #[error("{0}")]
    InvalidReplicaAssignment(String),
    #[error("no reassignment of partition {1} of topic '{0}' is in progress")]
    NoReassignmentInProgress(String, i32),
    #[error("broker {0} is not registered")]
    BrokerIdNotRegistered(i32),
    #[error("{0}")]
    InvalidRequest(String),
}

#[derive(Debug, Clone)]
pub struct CreateTopicSpec {
    pub name: String,
    pub topic_id: TopicId,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Controller {
    /// Upper bound on partitions in one topic, to keep a typo from creating a million logs.
    pub max_partitions_per_topic: i32,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            max_partitions_per_topic: 100_000,
        }
    }
}

/// Kafka's legal topic names: `[a-zA-Z0-9._-]`, 1..=249 characters, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), ControllerError> {
    if name.is_empty() {
        return Err(ControllerError::InvalidTopic("topic name is empty".into()));
    }
    if name == "." || name == ".." {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name cannot be '{name}'"
        )));
    }
    if name.chars().count() > MAX_TOPIC_NAME_CHARS {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name is longer than {MAX_TOPIC_NAME_CHARS} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(ControllerError::InvalidTopic(format!(
            "topic name '{name}' contains '{c}'; legal characters are ASCII alphanumerics, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Names that differ only in '.' versus '_' collide in metric names; Kafka refuses the second.
fn collision_key(name: &str) -> String {
    name.replace('.', "_")
}

/// Why an ISR change (AlterPartition) was refused; each maps to Kafka's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlterPartitionError {
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    #[error("the sender is not the leader of this partition")]
    NotLeaderOrFollower,
    #[error("leader epoch {got} is not the current {current}")]
    FencedLeaderEpoch { got: i32, current: i32 },
    /// Kafka's INVALID_UPDATE_VERSION: the proposal was based on an older partition state.
    #[error("partition epoch {got} is not the current {current}")]
    InvalidUpdateVersion { got: i32, current: i32 },
    #[error("the proposed ISR contains a replica that is not live or not assigned: {0}")]
    IneligibleReplica(i32),
    #[error("the proposed ISR is not valid: {0}")]
    InvalidRequest(String),
}

/// The brokers that can take new replicas, in an order that alternates racks (Kafka's
/// rack-aware assignment): consecutive entries sit in different racks whenever racks allow.
fn rack_alternating(image: &MetadataImage) -> Vec<i32> {
    let mut by_rack: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for b in image.live_brokers() {
        by_rack
            .entry(b.rack.clone().unwrap_or_default())
            .or_default()
            .push(b.broker_id);
    }
    let mut out = Vec::new();
    let longest = by_rack.values().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for ids in by_rack.values() {
            if let Some(id) = ids.get(i) {
                out.push(*id);
            }
        }
    }
    out
}

/// Per-topic settings the controller's decisions depend on.
pub trait TopicPolicy {
    /// `unclean.leader.election.enable`.
    fn unclean(&self, topic: &crate::image::TopicImage) -> bool;
    /// `min.insync.replicas`.
    fn min_isr(&self, topic: &crate::image::TopicImage) -> usize;
}

/// The same answers for every topic (tests, simulations).
#[derive(Debug, Clone, Copy)]
pub struct FixedPolicy {
    pub unclean: bool,
    pub min_isr: usize,
}

impl TopicPolicy for FixedPolicy {
    fn unclean(&self, _: &crate::image::TopicImage) -> bool {
        self.unclean
    }
    fn min_isr(&self, _: &crate::image::TopicImage) -> usize {
        self.min_isr
    }
}

/// A partition's leadership: leader, ISR and eligible leader replicas.
struct Leadership {
    leader: i32,
    isr: Vec<i32>,
    elr: Vec<i32>,
}

impl Leadership {
    /// The partition's leadership as it is.
    fn of(p: &crate::image::PartitionImage) -> Self {
        Leadership {
            leader: p.leader,
            isr: p.isr.clone(),
            elr: p.elr.clone(),
        }
    }
}

/// The topic and partition an AlterPartition-like request from `leader_id` acts on, if it
/// still leads in the epochs it names: the partition may have moved on since (KIP-497).
fn leader_state<'a>(
    image: &'a MetadataImage,
    topic: &str,
    partition: i32,
    (leader_id, leader_epoch, partition_epoch): (i32, i32, i32),
) -> Result<
    (
        &'a crate::image::TopicImage,
        &'a crate::image::PartitionImage,
    ),
    AlterPartitionError,
> {
    let t = image
        .topic(topic)
        .ok_or(AlterPartitionError::UnknownTopicOrPartition)?;
    let p = t
        .partitions
        .get(&partition)
        .ok_or(AlterPartitionError::UnknownTopicOrPartition)?;
    if p.leader != leader_id {
        return Err(AlterPartitionError::NotLeaderOrFollower);
    }
    if p.leader_epoch != leader_epoch {
        return Err(AlterPartitionError::FencedLeaderEpoch {
            got: leader_epoch,
            current: p.leader_epoch,
        });
    }
    if p.partition_epoch != partition_epoch {
        return Err(AlterPartitionError::InvalidUpdateVersion {
            got: partition_epoch,
            current: p.partition_epoch,
        });
    }
    Ok((t, p))
}

/// KIP-966: the ISR becomes `isr`. Replicas that leave it while it is below min.insync.replicas
/// become eligible leader replicas: the high watermark cannot advance without them from then on,
/// so they hold everything committed. An ISR back at min.insync.replicas clears them.
fn next_isr(
    p: &crate::image::PartitionImage,
    isr: Vec<i32>,
    min_isr: usize,
) -> (Vec<i32>, Vec<i32>) {
    if isr.len() >= min_isr {
        return (isr, Vec::new());
    }
    let mut elr: Vec<i32> = p.elr.iter().copied().filter(|r| !isr.contains(r)).collect();
    for r in &p.isr {
        if !isr.contains(r) && !elr.contains(r) {
            elr.push(*r);
        }
    }
    (isr, elr)
}

/// The leadership a partition should have after its ISR or the set of live brokers changed:
/// the first replica (in preference order) that is in the ISR and live; else one that is an
/// eligible leader replica and live (KIP-966: it forms the ISR alone); else, with unclean
/// election allowed, the first live replica (the ISR alone, no ELR); else no leader (-1).
fn elect(
    image: &MetadataImage,
    replicas: &[i32],
    isr: &[i32],
    elr: &[i32],
    last_known: &[i32],
    unclean: bool,
) -> Leadership {
    if let Some(r) = replicas
        .iter()
        .find(|r| isr.contains(r) && image.is_live(**r))
    {
        return Leadership {
            leader: *r,
            isr: isr.to_vec(),
            elr: elr.to_vec(),
        };
    }
    if let Some(r) = replicas
        .iter()
        .find(|r| elr.contains(r) && image.is_live(**r))
    {
        return Leadership {
            leader: *r,
            isr: vec![*r],
            elr: elr.iter().copied().filter(|e| e != r).collect(),
        };
    }
    if isr.is_empty() && elr.is_empty() {
        // Kafka's balanced recovery (KIP-966): with no in-sync or eligible replica left, the
        // last leader may lead again once it is back, as before eligible replicas existed.
        // It held everything committed when it stopped leading; only a topic that does not
        // fsync every write can have lost some of that since (an unclean restart, which also
        // takes it out of the ELR: `unclean_restart`).
        if let Some(r) = last_known
            .iter()
            .find(|r| replicas.contains(r) && image.is_live(**r))
        {
            tracing::warn!(
                leader = *r,
                "no in-sync or eligible replica left: the last leader leads again (after a \
                 power loss it may miss acknowledged records of a topic that does not fsync \
                 every write)"
            );
            return Leadership {
                leader: *r,
                isr: vec![*r],
                elr: Vec::new(),
            };
        }
    }
    if unclean {
        if let Some(r) = replicas.iter().find(|r| image.is_live(**r)) {
            return Leadership {
                leader: *r,
                isr: vec![*r],
                elr: Vec::new(),
            };
        }
    }
    Leadership {
        leader: -1,
        isr: isr.to_vec(),
        elr: elr.to_vec(),
    }
}

/// The next record of `p` under leadership `l`. A change that leaves every target replica of
/// a reassignment in the ISR completes it — an ISR expansion, but also an election that makes
/// an eligible (KIP-966) or unclean leader the whole ISR: nothing else would complete it then
/// if the replicas being removed never come back.
fn partition_record(
    image: &MetadataImage,
    topic_id: TopicId,
    p: &crate::image::PartitionImage,
    l: Leadership,
) -> MetadataRecord {
    if let Some(done) = complete_reassignment(image, topic_id, p, &l) {
        return done;
    }
    reassigned_record(
        topic_id,
        p,
        Assignment {
            replicas: p.replicas.clone(),
            adding: p.adding_replicas.clone(),
            removing: p.removing_replicas.clone(),
        },
        l,
    )
}

/// A partition's replicas with its reassignment state.
struct Assignment {
    replicas: Vec<i32>,
    adding: Vec<i32>,
    removing: Vec<i32>,
}

impl Assignment {
    fn settled(replicas: Vec<i32>) -> Self {
        Assignment {
            replicas,
            adding: Vec::new(),
            removing: Vec::new(),
        }
    }
}

/// The next record of `p`: a new partition epoch, and a new leader epoch if the leader changed.
/// Eligible leader replicas outside the new replica set are dropped.
fn reassigned_record(
    topic_id: TopicId,
    p: &crate::image::PartitionImage,
    a: Assignment,
    l: Leadership,
) -> MetadataRecord {
    let leader_epoch = if l.leader != p.leader {
        p.leader_epoch + 1
    } else {
        p.leader_epoch
    };
    // As Kafka keeps it (balanced recovery on): the last leader of a partition that has
    // none, for `elect`; empty while it has one.
    let last_known: Vec<i32> = if l.leader >= 0 {
        Vec::new()
    } else if p.leader >= 0 {
        vec![p.leader]
    } else {
        p.last_known_elr.clone()
    };
    let last_known_elr = last_known
        .into_iter()
        .filter(|r| a.replicas.contains(r))
        .collect();
    MetadataRecord::Partition {
        topic_id,
        partition: p.partition,
        isr: l.isr,
        leader: l.leader,
        leader_epoch,
        partition_epoch: p.partition_epoch + 1,
        last_known_elr,
        elr: l
            .elr
            .into_iter()
            .filter(|r| a.replicas.contains(r))
            .collect(),
        replicas: a.replicas,
        adding_replicas: a.adding,
        removing_replicas: a.removing,
    }
}

/// Moves a partition with leadership `l` to the replica set `replicas` (dropping the others):
/// the ISR and ELR keep only members of it, and a leader outside it (or none) is replaced by
/// the first live in-sync (or eligible) replica in `replicas` order.
fn settle_on(image: &MetadataImage, replicas: &[i32], l: &Leadership) -> Leadership {
    let keep = |set: &[i32]| -> Vec<i32> {
        replicas
            .iter()
            .copied()
            .filter(|r| set.contains(r))
            .collect()
    };
    let (isr, elr) = (keep(&l.isr), keep(&l.elr));
    if l.leader >= 0 && replicas.contains(&l.leader) {
        Leadership {
            leader: l.leader,
            isr,
            elr,
        }
    } else {
        elect(image, replicas, &isr, &elr, &[], false)
    }
}

/// KIP-455: a reassignment completes once every target replica is in the ISR. Given the
/// leadership (leader, ISR, ELR) a change would produce, the record that finishes the
/// reassignment along with that change, if it does.
fn complete_reassignment(
    image: &MetadataImage,
    topic_id: TopicId,
    p: &crate::image::PartitionImage,
    l: &Leadership,
) -> Option<MetadataRecord> {
    if !p.is_reassigning() {
        return None;
    }
    let target = p.target_replicas();
    if target.is_empty() || !target.iter().all(|r| l.isr.contains(r)) {
        return None;
    }
    let l = settle_on(image, &target, l);
    Some(reassigned_record(
        topic_id,
        p,
        Assignment::settled(target),
        l,
    ))
}

impl Controller {
    fn placement(
        &self,
        image: &MetadataImage,
        topic_id: &TopicId,
        partition: i32,
        rf: usize,
    ) -> Vec<i32> {
        let brokers = rack_alternating(image);
        if brokers.is_empty() {
            return Vec::new();
        }
        // A start derived from the topic id spreads leaders of different topics; consecutive
        // partitions then rotate through the brokers so leaders are balanced within a topic.
        let start = topic_id.iter().map(|b| *b as usize).sum::<usize>();
        let first = (start + partition as usize) % brokers.len();
        let rack = |b: i32| image.brokers.get(&b).and_then(|b| b.rack.as_deref());
        let racks = brokers
            .iter()
            .map(|b| rack(*b))
            .collect::<BTreeSet<_>>()
            .len();
        // The followers come next in the rack-alternating order, but skipping brokers whose
        // rack already holds a replica while some rack holds none: with racks of unequal size
        // a plain window of that order wraps around onto a rack it already used (racks a, b, c
        // with brokers 1a 2b 3c 4a 5b: the window from 4 is 4a 5b 1a). Kafka's rack-aware
        // assignment skips the same way.
        let mut replicas: Vec<i32> = Vec::with_capacity(rf);
        let mut used = BTreeSet::new();
        for spread in [true, false] {
            for i in 0..brokers.len() {
                let b = brokers[(first + i) % brokers.len()];
                if replicas.len() == rf || replicas.contains(&b) {
                    continue;
                }
                if spread && used.contains(&rack(b)) && used.len() < racks {
                    continue;
                }
                used.insert(rack(b));
                replicas.push(b);
            }
        }
        replicas
    }

    /// A broker stopped heartbeating or shut down: fence it, move the leaderships it held to
    /// other in-sync (or eligible, KIP-966) replicas and take it out of every ISR — into the
    /// ELR when that leaves the ISR below min.insync.replicas, so no out-of-sync replica can be
    /// elected without unclean election.
    pub fn fence_broker(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        policy: &dyn TopicPolicy,
    ) -> Vec<MetadataRecord> {
        if !image.is_live(broker_id) {
            return Vec::new();
        }
        let mut records = vec![MetadataRecord::FenceBroker { broker_id }];
        let (after, _) = image.apply(image.offset, &records);
        records.extend(self.leave_partitions(image, &after, broker_id, policy, false));
        records
    }

    /// UnregisterBroker (KIP-631, Kafka's `ReplicationControlManager.handleBrokerUnregistered`):
    /// the broker leaves for good. As fencing does, it loses every leadership (others are
    /// elected) and leaves every ISR; unlike fencing it also leaves every ELR, since it will
    /// never come back with its data. Partitions keep it in their replica lists: those replicas
    /// are offline until reassigned. The records end with `UnregisterBroker`, which removes
    /// the registration. A controller-quorum voter (`voters`) cannot be unregistered: it
    /// would register again with its next heartbeat, and Kafka refuses it too.
    pub fn unregister_broker(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        voters: &[i32],
        policy: &dyn TopicPolicy,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        if voters.contains(&broker_id) {
            return Err(ControllerError::InvalidRequest(format!(
                "broker {broker_id} is a controller-quorum voter; only broker-only nodes can be \
                 unregistered"
            )));
        }
        if !image.brokers.contains_key(&broker_id) {
            return Err(ControllerError::BrokerIdNotRegistered(broker_id));
        }
        let unregister = MetadataRecord::UnregisterBroker { broker_id };
        let (after, _) = image.apply(image.offset, std::slice::from_ref(&unregister));
        let mut records = self.leave_partitions(image, &after, broker_id, policy, true);
        records.push(unregister);
        Ok(records)
    }

    /// The partition records that take `broker_id` (no longer live in `after`, the image with
    /// it fenced or unregistered) out of every leadership and ISR of `image`'s partitions,
    /// electing new leaders where it led or none leads. A replica leaving an ISR that drops
    /// below min.insync.replicas becomes an eligible leader replica, unless `forget`: then it
    /// also leaves every ELR.
    fn leave_partitions(
        &self,
        image: &MetadataImage,
        after: &MetadataImage,
        broker_id: i32,
        policy: &dyn TopicPolicy,
        forget: bool,
    ) -> Vec<MetadataRecord> {
        let mut records = Vec::new();
        for topic in image.topics.values() {
            for p in topic.partitions.values() {
                let in_elr =
                    forget && (p.elr.contains(&broker_id) || p.last_known_elr.contains(&broker_id));
                if p.leader != broker_id && !p.isr.contains(&broker_id) && !in_elr {
                    continue;
                }
                let isr: Vec<i32> = p.isr.iter().copied().filter(|r| *r != broker_id).collect();
                let (isr, mut elr) = next_isr(p, isr, policy.min_isr(topic));
                if forget {
                    elr.retain(|r| *r != broker_id);
                }
                let l = if p.leader == broker_id || p.leader == -1 {
                    elect(
                        after,
                        &p.replicas,
                        &isr,
                        &elr,
                        &p.last_known_elr,
                        policy.unclean(topic),
                    )
                } else {
                    Leadership {
                        leader: p.leader,
                        isr,
                        elr,
                    }
                };
                let mut record = partition_record(after, topic.topic_id, p, l);
                if let (true, MetadataRecord::Partition { last_known_elr, .. }) =
                    (forget, &mut record)
                {
                    // An unregistered broker may come back with nothing: never the last
                    // leader to elect again either.
                    last_known_elr.retain(|r| *r != broker_id);
                }
                records.push(record);
            }
        }
        records
    }

    /// A fenced broker heartbeats again: unfence it and give it the leadership of partitions
    /// that have none and where it is in the ISR or ELR (or, with unclean election, a replica).
    pub fn unfence_broker(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        policy: &dyn TopicPolicy,
    ) -> Vec<MetadataRecord> {
        match image.brokers.get(&broker_id) {
            Some(b) if b.fenced => {}
            _ => return Vec::new(),
        }
        let mut records = vec![MetadataRecord::UnfenceBroker { broker_id }];
        let (after, _) = image.apply(image.offset, &records);
        for topic in image.topics.values() {
            for p in topic.partitions.values() {
                if p.leader != -1 || !p.replicas.contains(&broker_id) {
                    continue;
                }
                let l = elect(
                    &after,
                    &p.replicas,
                    &p.isr,
                    &p.elr,
                    &p.last_known_elr,
                    policy.unclean(topic),
                );
                if l.leader != -1 {
                    records.push(partition_record(&after, topic.topic_id, p, l));
                }
            }
        }
        records
    }

    /// AlterPartition (KIP-497): the leader proposes a new ISR for its partition, based on the
    /// partition state it knows, `partition_epoch`. A proposal based on an older state is
    /// refused even when the leader epoch still matches: the replicas it found caught up may
    /// have left and come back since (reassigned away and back, logs deleted), and only the
    /// leader can tell again.
    pub fn alter_isr(
        &self,
        image: &MetadataImage,
        topic: &str,
        partition: i32,
        (leader_id, leader_epoch, partition_epoch): (i32, i32, i32),
        new_isr: &[i32],
        policy: &dyn TopicPolicy,
    ) -> Result<Vec<MetadataRecord>, AlterPartitionError> {
        let (t, p) = leader_state(
            image,
            topic,
            partition,
            (leader_id, leader_epoch, partition_epoch),
        )?;
        if !new_isr.contains(&leader_id) {
            return Err(AlterPartitionError::InvalidRequest(
                "the ISR must contain the leader".into(),
            ));
        }
        for r in new_isr {
            if !p.replicas.contains(r) || (!p.isr.contains(r) && !image.is_live(*r)) {
                return Err(AlterPartitionError::IneligibleReplica(*r));
            }
        }
        let mut isr: Vec<i32> = p
            .replicas
            .iter()
            .copied()
            .filter(|r| new_isr.contains(r))
            .collect();
        isr.dedup();
        if isr == p.isr {
            return Ok(Vec::new());
        }
        // The ELR the change leaves (KIP-966) goes on into a completed reassignment too: an
        // ISR back at min.insync.replicas clears it.
        let (isr, elr) = next_isr(p, isr, policy.min_isr(t));
        Ok(vec![partition_record(
            image,
            t.topic_id,
            p,
            Leadership {
                leader: p.leader,
                isr,
                elr,
            },
        )])
    }

    /// A leader that cannot write its log (a full or failing disk) gives the partition up: the
    /// first live replica (in preference order) of the rest of the ISR leads, and the old
    /// leader leaves the ISR — into the ELR when that leaves the ISR below min.insync.replicas,
    /// since it still holds everything committed. It goes on as a follower and rejoins the ISR
    /// once it can write again. Kafka moves the leaderships of a failed log directory the same
    /// way (KIP-858); with a single directory it halts the broker instead. With no other live
    /// in-sync replica there is nothing better: no records, the leader stays. Checked against
    /// the partition state the leader knows, as AlterPartition is.
    pub fn resign_leadership(
        &self,
        image: &MetadataImage,
        topic: &str,
        partition: i32,
        (leader_id, leader_epoch, partition_epoch): (i32, i32, i32),
        policy: &dyn TopicPolicy,
    ) -> Result<Vec<MetadataRecord>, AlterPartitionError> {
        let (t, p) = leader_state(
            image,
            topic,
            partition,
            (leader_id, leader_epoch, partition_epoch),
        )?;
        let rest: Vec<i32> = p.isr.iter().copied().filter(|r| *r != leader_id).collect();
        let Some(next) = p
            .replicas
            .iter()
            .copied()
            .find(|r| rest.contains(r) && image.is_live(*r))
        else {
            return Ok(Vec::new());
        };
        let (isr, elr) = next_isr(p, rest, policy.min_isr(t));
        Ok(vec![partition_record(
            image,
            t.topic_id,
            p,
            Leadership {
                leader: next,
                isr,
                elr,
            },
        )])
    }

    /// AlterPartitionReassignments (KIP-455) for one partition. `Some(target)` starts (or
    /// replaces) a reassignment to `target`: the replicas become the target followed by the
    /// current replicas not in it, the new ones join as followers and the reassignment
    /// completes in the ISR change that brings the last of them in sync (`alter_isr`). `None`
    /// cancels an ongoing one: back to the replicas before it, minus those still joining.
    /// `allow_rf_change: false` (version 1, KIP-860) refuses a target of another size.
    pub fn alter_partition_reassignment(
        &self,
        image: &MetadataImage,
        topic: &str,
        partition: i32,
        target: Option<&[i32]>,
        allow_rf_change: bool,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let t = image
            .topic(topic)
            .ok_or_else(|| ControllerError::UnknownTopic(topic.to_string()))?;
        let p = t
            .partitions
            .get(&partition)
            .ok_or_else(|| ControllerError::UnknownPartition(topic.to_string(), partition))?;
        let original: Vec<i32> = p
            .replicas
            .iter()
            .copied()
            .filter(|r| !p.adding_replicas.contains(r))
            .collect();
        let Some(target) = target else {
            if !p.is_reassigning() {
                return Err(ControllerError::NoReassignmentInProgress(
                    topic.to_string(),
                    partition,
                ));
            }
            let l = settle_on(image, &original, &Leadership::of(p));
            if l.isr.is_empty() {
                return Err(ControllerError::InvalidReplicaAssignment(format!(
                    "cancelling would leave partition {partition} of '{topic}' without an in-sync replica"
                )));
            }
            return Ok(vec![reassigned_record(
                t.topic_id,
                p,
                Assignment::settled(original),
                l,
            )]);
        };
        if target.is_empty() {
            return Err(ControllerError::InvalidReplicaAssignment(
                "the target replica list is empty".into(),
            ));
        }
        for (i, r) in target.iter().enumerate() {
            if target[..i].contains(r) {
                return Err(ControllerError::InvalidReplicaAssignment(format!(
                    "broker {r} appears more than once in the target replicas"
                )));
            }
            if !image.brokers.contains_key(r) {
                return Err(ControllerError::InvalidReplicaAssignment(format!(
                    "broker {r} is not registered"
                )));
            }
        }
        if !allow_rf_change && target.len() != original.len() {
            return Err(ControllerError::InvalidReplicationFactor(format!(
                "the target has {} replicas, the partition {}, and changing the replication factor is not allowed",
                target.len(),
                original.len()
            )));
        }
        if target == p.replicas.as_slice() && !p.is_reassigning() {
            return Ok(Vec::new());
        }
        let removing: Vec<i32> = p
            .replicas
            .iter()
            .copied()
            .filter(|r| !target.contains(r))
            .collect();
        let adding: Vec<i32> = target
            .iter()
            .copied()
            .filter(|r| !p.replicas.contains(r))
            .collect();
        let mut replicas = target.to_vec();
        replicas.extend(&removing);
        let mut started = p.clone();
        started.replicas = replicas.clone();
        started.adding_replicas = adding.clone();
        started.removing_replicas = removing.clone();
        // Every target replica already in sync (a pure removal): done at once.
        if let Some(done) = complete_reassignment(image, t.topic_id, &started, &Leadership::of(p)) {
            return Ok(vec![done]);
        }
        Ok(vec![reassigned_record(
            t.topic_id,
            p,
            Assignment {
                replicas,
                adding,
                removing,
            },
            Leadership {
                leader: p.leader,
                isr: p.isr.clone(),
                elr: p.elr.clone(),
            },
        )])
    }

    fn partition_records(
        &self,
        image: &MetadataImage,
        topic_id: TopicId,
        partitions: std::ops::Range<i32>,
        rf: usize,
    ) -> Vec<MetadataRecord> {
        partitions
            .map(|p| {
                let replicas = self.placement(image, &topic_id, p, rf);
                MetadataRecord::Partition {
                    topic_id,
                    partition: p,
                    leader: replicas[0],
                    isr: replicas.clone(),
                    replicas,
                    leader_epoch: 0,
                    partition_epoch: 0,
                    elr: Vec::new(),
                    last_known_elr: Vec::new(),
                    adding_replicas: Vec::new(),
                    removing_replicas: Vec::new(),
                }
            })
            .collect()
    }

    pub fn create_topic(
        &self,
        image: &MetadataImage,
        spec: &CreateTopicSpec,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        validate_topic_name(&spec.name)?;
        if image.topics.contains_key(&spec.name) {
            return Err(ControllerError::TopicAlreadyExists(spec.name.clone()));
        }
        let key = collision_key(&spec.name);
        if let Some(other) = image.topics.keys().find(|n| collision_key(n) == key) {
            return Err(ControllerError::InvalidTopic(format!(
                "topic '{}' collides with existing topic '{other}' ('.' and '_' are the same in metric names)",
                spec.name
            )));
        }
        if spec.num_partitions <= 0 || spec.num_partitions > self.max_partitions_per_topic {
            return Err(ControllerError::InvalidPartitions(format!(
                "number of partitions must be between 1 and {}, got {}",
                self.max_partitions_per_topic, spec.num_partitions
            )));
        }
        let live = image.live_brokers().count();
        if spec.replication_factor <= 0 || spec.replication_factor as usize > live {
            return Err(ControllerError::InvalidReplicationFactor(format!(
                "replication factor {} is not between 1 and the {live} available broker(s)",
                spec.replication_factor
            )));
        }
        let mut records = vec![MetadataRecord::Topic {
            name: spec.name.clone(),
            topic_id: spec.topic_id,
        }];
        for (name, value) in &spec.configs {
            records.push(MetadataRecord::TopicConfig {
                topic_id: spec.topic_id,
                name: name.clone(),
                value: Some(value.clone()),
            });
        }
        records.extend(self.partition_records(
            image,
            spec.topic_id,
            0..spec.num_partitions,
            spec.replication_factor as usize,
        ));
        Ok(records)
    }

    pub fn delete_topic(
        &self,
        image: &MetadataImage,
        name: &str,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let topic = image
            .topic(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        Ok(vec![MetadataRecord::RemoveTopic {
            topic_id: topic.topic_id,
        }])
    }

    pub fn create_partitions(
        &self,
        image: &MetadataImage,
        name: &str,
        new_count: i32,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let topic = image
            .topic(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        let current = topic.partitions.len() as i32;
        if new_count <= current {
            return Err(ControllerError::InvalidPartitions(format!(
                "topic currently has {current} partitions, {new_count} would not be an increase"
            )));
        }
        if new_count > self.max_partitions_per_topic {
            return Err(ControllerError::InvalidPartitions(format!(
                "number of partitions must be at most {}",
                self.max_partitions_per_topic
            )));
        }
        let live = image.live_brokers().count();
        if live == 0 {
            return Err(ControllerError::InvalidReplicationFactor(
                "every broker is fenced: no broker can take the new partitions".into(),
            ));
        }
        // The replication factor partition 0 ends up with: while it is being reassigned its
        // replicas are the target plus the ones leaving. New partitions get all of it or are
        // refused, as a new topic is: never a silently lower replication factor.
        let rf = topic
            .partitions
            .values()
            .next()
            .map(|p| p.target_replicas().len())
            .unwrap_or(1)
            .max(1);
        if rf > live {
            return Err(ControllerError::InvalidReplicationFactor(format!(
                "the topic's replication factor is {rf} but only {live} broker(s) are available"
            )));
        }
        Ok(self.partition_records(image, topic.topic_id, current..new_count, rf))
    }

    /// A block of `count` producer ids: returns the first id and the record that reserves it.
    pub fn allocate_producer_ids(
        &self,
        image: &MetadataImage,
        count: i64,
    ) -> (i64, MetadataRecord) {
        let first = image.next_producer_id;
        (
            first,
            MetadataRecord::ProducerIds {
                next_producer_id: first + count,
            },
        )
    }
}

/// Why a leader election (ElectLeaders, KIP-460) did not happen for a partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElectionError {
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    #[error("the partition already has the leader this election would pick")]
    ElectionNotNeeded,
    #[error("the preferred replica is not alive or not in the ISR")]
    PreferredLeaderNotAvailable,
    #[error("no live replica can become leader")]
    EligibleLeadersNotAvailable,
}

impl Controller {
    /// ElectLeaders for one partition. Preferred: the first replica, if it is live and in the
    /// ISR and not the leader yet. Unclean: only for a partition without a live leader — an
    /// in-sync replica if one is live, else any live replica (which then forms the ISR alone).
    pub fn elect_leader(
        &self,
        image: &MetadataImage,
        topic: &str,
        partition: i32,
        unclean: bool,
    ) -> Result<MetadataRecord, ElectionError> {
        let t = image
            .topic(topic)
            .ok_or(ElectionError::UnknownTopicOrPartition)?;
        let p = t
            .partitions
            .get(&partition)
            .ok_or(ElectionError::UnknownTopicOrPartition)?;
        if unclean {
            if p.leader >= 0 && image.is_live(p.leader) {
                return Err(ElectionError::ElectionNotNeeded);
            }
            let l = elect(image, &p.replicas, &p.isr, &p.elr, &p.last_known_elr, true);
            if l.leader < 0 {
                return Err(ElectionError::EligibleLeadersNotAvailable);
            }
            return Ok(partition_record(image, t.topic_id, p, l));
        }
        let preferred = *p
            .replicas
            .first()
            .ok_or(ElectionError::PreferredLeaderNotAvailable)?;
        if p.leader == preferred {
            return Err(ElectionError::ElectionNotNeeded);
        }
        if !p.isr.contains(&preferred) || !image.is_live(preferred) {
            return Err(ElectionError::PreferredLeaderNotAvailable);
        }
        Ok(partition_record(
            image,
            t.topic_id,
            p,
            Leadership {
                leader: preferred,
                isr: p.isr.clone(),
                elr: p.elr.clone(),
            },
        ))
    }

    /// Partitions without a live leader whose topic allows unclean election: any live replica
    /// leads (in-sync and eligible ones first). Fencing and unfencing already elect this way;
    /// this catches partitions that went offline while `unclean.leader.election.enable` was
    /// off and stayed offline after it was turned on (Kafka elects them then too).
    pub fn elect_unclean_leaders(
        &self,
        image: &MetadataImage,
        policy: &dyn TopicPolicy,
    ) -> Vec<MetadataRecord> {
        let mut records = Vec::new();
        for topic in image.topics.values().filter(|t| policy.unclean(t)) {
            for p in topic.partitions.values() {
                if p.leader >= 0 && image.is_live(p.leader) {
                    continue;
                }
                if let Ok(r) = self.elect_leader(image, &topic.name, p.partition, true) {
                    records.push(r);
                }
            }
        }
        records
    }

    /// KIP-966: an eligible leader replica holds everything committed because the high
    /// watermark could not advance without it under the `min.insync.replicas` it left the ISR
    /// with. Once that setting changes the promise is void (lowered, the ISR alone commits
    /// records the replica never got), so a change clears the ELR of every partition of the
    /// topics it applies to: `applies` picks them. The records go in the same commit as the
    /// change, so that no leader acts on the new value while a stale ELR still stands. Kafka
    /// does the same.
    pub fn clear_eligible_leader_replicas(
        &self,
        image: &MetadataImage,
        applies: impl Fn(&crate::image::TopicImage) -> bool,
    ) -> Vec<MetadataRecord> {
        let mut records = Vec::new();
        for topic in image.topics.values().filter(|t| applies(t)) {
            for p in topic.partitions.values().filter(|p| !p.elr.is_empty()) {
                let kept = Leadership {
                    leader: p.leader,
                    isr: p.isr.clone(),
                    elr: Vec::new(),
                };
                records.push(partition_record(image, topic.topic_id, p, kept));
            }
        }
        records
    }

    /// Broker `broker_id` registers without a log for partitions it is recorded as holding
    /// data for (`lost` names them): its disk was replaced or wiped. It leaves their ISR, ELR
    /// and last known ELR, so that it is never elected with nothing, and catches up as a
    /// follower. Kafka tells lost replicas by their log directory's id (KIP-858).
    pub fn lost_replicas(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        lost: impl Fn(&crate::image::TopicImage, i32) -> bool,
    ) -> Vec<MetadataRecord> {
        let mut records = Vec::new();
        for topic in image.topics.values() {
            for p in topic.partitions.values() {
                let listed = p.leader == broker_id
                    || p.isr.contains(&broker_id)
                    || p.elr.contains(&broker_id)
                    || p.last_known_elr.contains(&broker_id);
                if !listed || !lost(topic, p.partition) {
                    continue;
                }
                let without = |set: &[i32]| -> Vec<i32> {
                    set.iter().copied().filter(|r| *r != broker_id).collect()
                };
                let isr = without(&p.isr);
                let elr = without(&p.elr);
                let l = if p.leader == broker_id {
                    elect(image, &p.replicas, &isr, &elr, &[], false)
                } else {
                    Leadership {
                        leader: p.leader,
                        isr,
                        elr,
                    }
                };
                let mut record = partition_record(image, topic.topic_id, p, l);
                if let MetadataRecord::Partition { last_known_elr, .. } = &mut record {
                    last_known_elr.retain(|r| *r != broker_id);
                }
                records.push(record);
            }
        }
        records
    }

    /// KIP-966: broker `broker_id` registers after an unclean shutdown. For the topics that
    /// `lazy` names — those not fsyncing every write, where the high watermark follows what
    /// replicas hold in memory — what it acknowledged may be gone, so it leaves every ELR of
    /// theirs, as in Kafka (whose topics never fsync every write). Topics that fsync every
    /// write keep it: the high watermark only ever counted what it had on disk. A partition
    /// left with no in-sync or eligible replica may still be led by its last leader once that
    /// is back (`elect`).
    pub fn unclean_restart(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        lazy: impl Fn(&crate::image::TopicImage) -> bool,
    ) -> Vec<MetadataRecord> {
        let mut records = Vec::new();
        for topic in image.topics.values().filter(|t| lazy(t)) {
            for p in topic
                .partitions
                .values()
                .filter(|p| p.elr.contains(&broker_id))
            {
                let l = Leadership {
                    leader: p.leader,
                    isr: p.isr.clone(),
                    elr: p.elr.iter().copied().filter(|r| *r != broker_id).collect(),
                };
                records.push(partition_record(image, topic.topic_id, p, l));
            }
        }
        records
    }

    /// `auto.leader.rebalance.enable`: for every broker whose share of partitions it prefers
    /// but does not lead exceeds `imbalance_pct`, the preferred elections that can happen.
    pub fn rebalance_leaders(
        &self,
        image: &MetadataImage,
        imbalance_pct: i64,
    ) -> Vec<MetadataRecord> {
        let mut preferred: BTreeMap<i32, (usize, usize)> = BTreeMap::new();
        for t in image.topics.values() {
            for p in t.partitions.values() {
                if let Some(first) = p.replicas.first() {
                    let e = preferred.entry(*first).or_default();
                    e.0 += 1;
                    if p.leader != *first {
                        e.1 += 1;
                    }
                }
            }
        }
        let imbalanced: Vec<i32> = preferred
            .iter()
            .filter(|(_, (total, off))| {
                *total > 0 && (*off * 100) > imbalance_pct.max(0) as usize * *total
            })
            .map(|(b, _)| *b)
            .collect();
        let mut records = Vec::new();
        for t in image.topics.values() {
            for p in t.partitions.values() {
                if p.replicas.first().is_some_and(|f| imbalanced.contains(f)) {
                    if let Ok(r) = self.elect_leader(image, &t.name, p.partition, false) {
                        records.push(r);
                    }
                }
            }
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_broker() -> MetadataImage {
        let (img, _) = MetadataImage::empty().apply(
            0,
            &[MetadataRecord::RegisterBroker {
                broker_id: 1,
                host: "h".into(),
                port: 9092,
                rack: None,
            }],
        );
        img
    }

    fn spec(name: &str, parts: i32) -> CreateTopicSpec {
        CreateTopicSpec {
            name: name.into(),
            topic_id: [name.len() as u8; 16],
            num_partitions: parts,
            replication_factor: 1,
            configs: BTreeMap::new(),
        }
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic_name("a.b_c-D9").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
        assert!(validate_topic_name(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn create_grow_delete() {
        let c = Controller::default();
        let img = image_with_broker();
        let recs = c.create_topic(&img, &spec("t.x", 2)).unwrap();
        let (img, _) = img.apply(1, &recs);
        assert_eq!(img.topic("t.x").unwrap().partitions.len(), 2);
        assert_eq!(
            c.create_topic(&img, &spec("t.x", 1)),
            Err(ControllerError::TopicAlreadyExists("t.x".into()))
        );
        assert!(matches!(
            c.create_topic(&img, &spec("t_x", 1)),
            Err(ControllerError::InvalidTopic(_))
        ));
        assert!(c.create_partitions(&img, "t.x", 2).is_err());
        let recs = c.create_partitions(&img, "t.x", 5).unwrap();
        assert_eq!(recs.len(), 3);
        let (img, delta) = img.apply(10, &recs);
        assert_eq!(delta.created_partitions.len(), 3);
        assert_eq!(img.topic("t.x").unwrap().partitions.len(), 5);
        let mut rf2 = spec("y", 1);
        rf2.replication_factor = 2;
        assert!(matches!(
            c.create_topic(&img, &rf2),
            Err(ControllerError::InvalidReplicationFactor(_))
        ));
        let recs = c.delete_topic(&img, "t.x").unwrap();
        let (img, delta) = img.apply(20, &recs);
        assert!(img.topic("t.x").is_none());
        assert_eq!(delta.deleted_topics[0].2.len(), 5);
    }

    fn cluster(brokers: &[(i32, &str)]) -> MetadataImage {
        let records: Vec<MetadataRecord> = brokers
            .iter()
            .map(|(id, rack)| MetadataRecord::RegisterBroker {
                broker_id: *id,
                host: "h".into(),
                port: 9092 + id,
                rack: (!rack.is_empty()).then(|| rack.to_string()),
            })
            .collect();
        MetadataImage::empty().apply(0, &records).0
    }

    /// Leader 1 of t-0, in leader epoch 5, proposes `isr` (min.insync.replicas 1).
    fn leader_1_proposes(
        c: &Controller,
        img: &MetadataImage,
        isr: &[i32],
    ) -> Result<Vec<MetadataRecord>, AlterPartitionError> {
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let epoch = partition(img, "t", 0).partition_epoch;
        c.alter_isr(img, "t", 0, (1, 5, epoch), isr, &policy)
    }

    /// Brokers 1, 2 and 3 with topic "t" of `parts` partitions, each on all three.
    fn three_brokers_with_t(c: &Controller, parts: i32) -> MetadataImage {
        let img = cluster(&[(1, ""), (2, ""), (3, "")]);
        let mut s = spec("t", parts);
        s.replication_factor = 3;
        img.apply(10, &c.create_topic(&img, &s).unwrap()).0
    }

    fn partition(img: &MetadataImage, topic: &str, p: i32) -> crate::image::PartitionImage {
        img.topic(topic).unwrap().partitions[&p].clone()
    }

    /// Creates topic "t" (`parts` partitions of `rf` replicas, topic id `[id; 16]`), checks
    /// that every partition has distinct replicas over `racks` racks, and counts the partitions
    /// each broker leads.
    fn placed(
        img: &MetadataImage,
        id: u8,
        parts: i32,
        rf: i16,
        racks: usize,
    ) -> BTreeMap<i32, usize> {
        let c = Controller::default();
        let mut s = spec("t", parts);
        s.topic_id = [id; 16];
        s.replication_factor = rf;
        let (img, _) = img.apply(10, &c.create_topic(img, &s).unwrap());
        let mut leaders = BTreeMap::new();
        for p in img.topic("t").unwrap().partitions.values() {
            let spread: BTreeSet<_> = p
                .replicas
                .iter()
                .map(|r| img.brokers[r].rack.clone())
                .collect();
            assert_eq!(spread.len(), racks, "replicas of {p:?} share a rack");
            assert_eq!(
                p.replicas.iter().collect::<BTreeSet<_>>().len(),
                rf as usize
            );
            *leaders.entry(p.leader).or_insert(0) += 1;
        }
        leaders
    }

    #[test]
    fn placement_is_rack_aware_and_balances_leaders() {
        let img = cluster(&[(1, "a"), (2, "a"), (3, "b"), (4, "b")]);
        let leaders = placed(&img, 1, 8, 2, 2);
        assert_eq!(leaders.len(), 4);
        assert!(leaders.values().all(|n| *n == 2), "{leaders:?}");
    }

    /// Found by the controller simulation: with racks of unequal size, replicas took a window
    /// of the rack-alternating broker order, which wraps around onto a rack already used.
    #[test]
    fn placement_spreads_over_every_rack_when_racks_are_unequal() {
        let img = cluster(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]);
        for id in 0..5u8 {
            let leaders = placed(&img, id, 5, 3, 3);
            assert_eq!(
                leaders.len(),
                5,
                "one preferred leader per broker: {leaders:?}"
            );
        }
        // More replicas than racks: every rack, then the rest, on distinct brokers.
        placed(&img, 0, 5, 5, 3);
    }

    #[test]
    fn fencing_moves_leadership_to_the_isr_and_unfencing_restores_offline_partitions() {
        let c = Controller::default();
        let no_unclean = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let img = three_brokers_with_t(&c, 3);
        let before = partition(&img, "t", 0);
        let leader = before.leader;
        let (img, delta) = img.apply(20, &c.fence_broker(&img, leader, &no_unclean));
        assert!(img.brokers[&leader].fenced);
        assert_eq!(delta.changed_partitions.len(), 3);
        let after = partition(&img, "t", 0);
        assert_ne!(after.leader, leader);
        assert!(!after.isr.contains(&leader));
        assert_eq!(after.leader_epoch, before.leader_epoch + 1);
        assert_eq!(after.partition_epoch, before.partition_epoch + 1);
        assert!(c.fence_broker(&img, leader, &no_unclean).is_empty());

        // Fence the other two: the last ISR member becomes an eligible leader replica (KIP-966),
        // the partition goes offline.
        let others: Vec<i32> = after.isr.clone();
        let mut img = img;
        for b in &others {
            img = img.apply(30, &c.fence_broker(&img, *b, &no_unclean)).0;
        }
        let offline = partition(&img, "t", 0);
        assert_eq!(offline.leader, -1);
        assert!(offline.isr.is_empty());
        assert_eq!(offline.elr.len(), 1);
        let last = offline.elr[0];
        // The first fenced broker is not in the ISR: without unclean election it cannot lead.
        let img2 = img
            .apply(40, &c.unfence_broker(&img, leader, &no_unclean))
            .0;
        assert_eq!(partition(&img2, "t", 0).leader, -1);
        let unclean = FixedPolicy {
            unclean: true,
            min_isr: 1,
        };
        let img3 = img.apply(40, &c.unfence_broker(&img, leader, &unclean)).0;
        assert_eq!(partition(&img3, "t", 0).leader, leader);
        assert_eq!(partition(&img3, "t", 0).isr, vec![leader]);
        // The last ISR member coming back takes the leadership cleanly.
        let img4 = img.apply(40, &c.unfence_broker(&img, last, &no_unclean)).0;
        assert_eq!(partition(&img4, "t", 0).leader, last);
    }

    #[test]
    fn a_leader_that_cannot_write_hands_over_to_a_live_in_sync_replica() {
        let c = Controller::default();
        let min2 = FixedPolicy {
            unclean: false,
            min_isr: 2,
        };
        let img = three_brokers_with_t(&c, 1);
        let p = partition(&img, "t", 0);
        let state = (p.leader, p.leader_epoch, p.partition_epoch);

        // Only the leader itself may resign, in its current epochs.
        let other = p.replicas[1];
        let stale = |st: (i32, i32, i32)| c.resign_leadership(&img, "t", 0, st, &min2);
        assert_eq!(
            stale((other, p.leader_epoch, p.partition_epoch)),
            Err(AlterPartitionError::NotLeaderOrFollower)
        );
        assert!(matches!(
            stale((p.leader, p.leader_epoch - 1, p.partition_epoch)),
            Err(AlterPartitionError::FencedLeaderEpoch { .. })
        ));
        assert!(matches!(
            stale((p.leader, p.leader_epoch, p.partition_epoch - 1)),
            Err(AlterPartitionError::InvalidUpdateVersion { .. })
        ));

        // The next replica in preference order that is live and in sync leads; the old leader
        // leaves the ISR (still at min.insync.replicas: no ELR).
        let (img, _) = img.apply(
            20,
            &c.resign_leadership(&img, "t", 0, state, &min2).unwrap(),
        );
        let q = partition(&img, "t", 0);
        assert_eq!(q.leader, p.replicas[1]);
        assert_eq!(q.isr, p.replicas[1..].to_vec());
        assert!(q.elr.is_empty());
        assert_eq!(q.leader_epoch, p.leader_epoch + 1);
        assert_eq!(q.partition_epoch, p.partition_epoch + 1);

        // The next one cannot write either and its only in-sync peer is fenced: the peer is
        // skipped, so nothing changes and it stays the leader.
        let last = q.replicas[2];
        let (img, _) = img.apply(30, &[MetadataRecord::FenceBroker { broker_id: last }]);
        let q = partition(&img, "t", 0);
        let state = (q.leader, q.leader_epoch, q.partition_epoch);
        assert_eq!(c.resign_leadership(&img, "t", 0, state, &min2), Ok(vec![]));

        // Back live: it takes over, and the ISR drops below min.insync.replicas, so the
        // resigning replica, holding everything committed, becomes eligible (KIP-966).
        let (img, _) = img.apply(40, &[MetadataRecord::UnfenceBroker { broker_id: last }]);
        let (img, _) = img.apply(
            50,
            &c.resign_leadership(&img, "t", 0, state, &min2).unwrap(),
        );
        let r = partition(&img, "t", 0);
        assert_eq!((r.leader, r.isr.clone()), (last, vec![last]));
        assert_eq!(r.elr, vec![q.leader]);
    }

    #[test]
    fn alter_isr_checks_leader_epoch_and_eligibility() {
        let c = Controller::default();
        let img = three_brokers_with_t(&c, 1);
        let p = partition(&img, "t", 0);
        let follower = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
        assert_eq!(
            c.alter_isr(
                &img,
                "t",
                0,
                (follower, p.leader_epoch, p.partition_epoch),
                &[follower],
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1
                }
            ),
            Err(AlterPartitionError::NotLeaderOrFollower)
        );
        assert!(matches!(
            c.alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch + 1, p.partition_epoch),
                &[p.leader],
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1
                }
            ),
            Err(AlterPartitionError::FencedLeaderEpoch { .. })
        ));
        let shrink = c
            .alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch, p.partition_epoch),
                &[p.leader],
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1,
                },
            )
            .unwrap();
        let (img, _) = img.apply(20, &shrink);
        assert_eq!(partition(&img, "t", 0).isr, vec![p.leader]);
        assert_eq!(partition(&img, "t", 0).leader_epoch, p.leader_epoch);
        // The same leader and leader epoch, but a proposal based on the state before the
        // shrink: refused (Kafka's INVALID_UPDATE_VERSION).
        assert_eq!(
            c.alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch, p.partition_epoch),
                &p.isr,
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1
                }
            ),
            Err(AlterPartitionError::InvalidUpdateVersion {
                got: p.partition_epoch,
                current: p.partition_epoch + 1
            })
        );
        let p = partition(&img, "t", 0);
        // A fenced broker may not rejoin the ISR.
        let (img, _) = img.apply(
            30,
            &[MetadataRecord::FenceBroker {
                broker_id: follower,
            }],
        );
        assert_eq!(
            c.alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch, p.partition_epoch),
                &[p.leader, follower],
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1
                }
            ),
            Err(AlterPartitionError::IneligibleReplica(follower))
        );
        assert_eq!(
            c.alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch, p.partition_epoch),
                &[p.leader, 9],
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1
                }
            ),
            Err(AlterPartitionError::IneligibleReplica(9))
        );
    }

    #[test]
    fn preferred_and_unclean_elections_and_leader_balance() {
        let c = Controller::default();
        let no_unclean = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let img = three_brokers_with_t(&c, 3);
        assert!(
            c.rebalance_leaders(&img, 10).is_empty(),
            "balanced from the start"
        );
        let p0 = partition(&img, "t", 0);
        let preferred = p0.replicas[0];
        assert_eq!(
            c.elect_leader(&img, "t", 0, false),
            Err(ElectionError::ElectionNotNeeded)
        );
        assert_eq!(
            c.elect_leader(&img, "t", 0, true),
            Err(ElectionError::ElectionNotNeeded)
        );
        assert_eq!(
            c.elect_leader(&img, "x", 0, false),
            Err(ElectionError::UnknownTopicOrPartition)
        );
        // The preferred replica dies: not electable; once back in the ISR it is.
        let (img, _) = img.apply(20, &c.fence_broker(&img, preferred, &no_unclean));
        assert_ne!(partition(&img, "t", 0).leader, preferred);
        assert_eq!(
            c.elect_leader(&img, "t", 0, false),
            Err(ElectionError::PreferredLeaderNotAvailable)
        );
        let (img, _) = img.apply(30, &c.unfence_broker(&img, preferred, &no_unclean));
        let p = partition(&img, "t", 0);
        let mut isr = p.isr.clone();
        isr.push(preferred);
        let (img, _) = img.apply(
            40,
            &c.alter_isr(
                &img,
                "t",
                0,
                (p.leader, p.leader_epoch, p.partition_epoch),
                &isr,
                &FixedPolicy {
                    unclean: false,
                    min_isr: 1,
                },
            )
            .unwrap(),
        );
        // One of three partitions preferred by that broker is led elsewhere: above 10 %.
        let moves = c.rebalance_leaders(&img, 10);
        assert_eq!(moves.len(), 1);
        let (img, _) = img.apply(50, &moves);
        assert_eq!(partition(&img, "t", 0).leader, preferred);
        assert!(c.rebalance_leaders(&img, 10).is_empty());
        // Unclean: every ISR member gone, a live out-of-sync replica takes over.
        let mut img = img;
        for b in [1, 2, 3] {
            img = img.apply(60, &c.fence_broker(&img, b, &no_unclean)).0;
        }
        let last = partition(&img, "t", 0).elr[0];
        let other = *[1, 2, 3].iter().find(|b| **b != last).unwrap();
        img = img
            .apply(70, &[MetadataRecord::UnfenceBroker { broker_id: other }])
            .0;
        let rec = c.elect_leader(&img, "t", 0, true).unwrap();
        let (img, _) = img.apply(80, &[rec]);
        assert_eq!(partition(&img, "t", 0).leader, other);
        assert_eq!(partition(&img, "t", 0).isr, vec![other]);
        assert!(
            partition(&img, "t", 0).elr.is_empty(),
            "unclean: the ELR goes"
        );
    }

    const MIN_ISR_2: FixedPolicy = FixedPolicy {
        unclean: false,
        min_isr: 2,
    };

    /// Topics t and u of one partition on the same three brokers (a, b, x: t's replicas in
    /// order), min.insync.replicas 2, after x and then b were fenced: ISR [a], ELR [b].
    fn t_and_u_below_min_isr(c: &Controller) -> (MetadataImage, (i32, i32, i32)) {
        let img = three_brokers_with_t(c, 1);
        let mut u = spec("u", 1);
        u.topic_id = [9; 16];
        u.replication_factor = 3;
        let (img, _) = img.apply(11, &c.create_topic(&img, &u).unwrap());
        let p = partition(&img, "t", 0);
        let (a, b, x) = (p.replicas[0], p.replicas[1], p.replicas[2]);
        let mut img = img;
        for gone in [x, b] {
            img = img.apply(20, &c.fence_broker(&img, gone, &MIN_ISR_2)).0;
        }
        (img, (a, b, x))
    }

    #[test]
    fn a_min_insync_replicas_change_clears_the_eligible_leader_replicas_it_applies_to() {
        let c = Controller::default();
        let policy = MIN_ISR_2;
        let (img, (a, b, _)) = t_and_u_below_min_isr(&c);
        let before = partition(&img, "t", 0);
        assert_eq!((before.isr.clone(), before.elr.clone()), (vec![a], vec![b]));
        assert!(!partition(&img, "u", 0).elr.is_empty());
        // Only topic t's setting changed: only t's ELR goes.
        let records = c.clear_eligible_leader_replicas(&img, |t| t.name == "t");
        assert_eq!(records.len(), 1);
        let (img, _) = img.apply(30, &records);
        let after = partition(&img, "t", 0);
        assert!(after.elr.is_empty(), "{after:?}");
        assert_eq!(
            (after.leader, after.isr.clone(), after.leader_epoch),
            (a, vec![a], before.leader_epoch),
            "the leadership stays"
        );
        assert_eq!(after.partition_epoch, before.partition_epoch + 1);
        assert!(!partition(&img, "u", 0).elr.is_empty());
        // Nothing eligible left: nothing to write.
        assert!(c
            .clear_eligible_leader_replicas(&img, |t| t.name == "t")
            .is_empty());
        // The last in-sync replica dies: b, no longer eligible, may not lead when it returns.
        let (img, _) = img.apply(40, &c.fence_broker(&img, a, &policy));
        let (img, _) = img.apply(50, &c.unfence_broker(&img, b, &policy));
        assert_eq!(partition(&img, "t", 0).leader, -1);
        let (img, _) = img.apply(60, &c.unfence_broker(&img, a, &policy));
        assert_eq!(partition(&img, "t", 0).leader, a);
    }

    #[test]
    fn an_unclean_restart_takes_a_replica_out_of_the_elrs_of_topics_that_do_not_fsync() {
        let c = Controller::default();
        let policy = MIN_ISR_2;
        // t does not fsync every write, u does.
        let (img, (a, b, _)) = t_and_u_below_min_isr(&c);
        let lazy = |t: &crate::image::TopicImage| t.name == "t";
        let state = |img: &MetadataImage, t: &str| {
            let p = partition(img, t, 0);
            (p.leader, p.elr, p.last_known_elr)
        };
        assert_eq!(state(&img, "t"), (a, vec![b], vec![]));
        assert_eq!(state(&img, "u").1, vec![b]);
        // b restarts uncleanly: it leaves t's ELR, not u's.
        let before = partition(&img, "t", 0);
        let records = c.unclean_restart(&img, b, lazy);
        assert_eq!(records.len(), 1);
        let (img, _) = img.apply(30, &records);
        let after = partition(&img, "t", 0);
        assert_eq!(state(&img, "t"), (a, vec![], vec![]));
        assert_eq!(after.leader_epoch, before.leader_epoch);
        assert_eq!(after.partition_epoch, before.partition_epoch + 1);
        assert_eq!(state(&img, "u").1, vec![b]);
        // The last leader dies: it is remembered as the last known leader.
        let (img, _) = img.apply(40, &c.fence_broker(&img, a, &policy));
        assert_eq!(state(&img, "t"), (-1, vec![a], vec![a]));
        // b is back: eligible for u, not for t.
        let (img, _) = img.apply(50, &c.unfence_broker(&img, b, &policy));
        assert_eq!(
            state(&img, "t").0,
            -1,
            "b may have lost what t acknowledged"
        );
        assert_eq!(
            state(&img, "u").0,
            b,
            "u fsyncs: b holds what it acknowledged"
        );
        // a restarts uncleanly too and leaves t's ELR; with no in-sync or eligible replica
        // left, t's last leader leads again once it is back, as Kafka's balanced recovery does.
        let (img, _) = img.apply(60, &c.unclean_restart(&img, a, lazy));
        assert_eq!(state(&img, "t"), (-1, vec![], vec![a]));
        let (img, _) = img.apply(70, &c.unfence_broker(&img, a, &policy));
        let led = partition(&img, "t", 0);
        assert_eq!((led.leader, led.isr.clone()), (a, vec![a]));
        assert!(
            led.elr.is_empty() && led.last_known_elr.is_empty(),
            "{led:?}"
        );
    }

    #[test]
    fn an_unregistered_broker_is_not_the_last_leader_to_elect_again() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let img = three_brokers_with_t(&c, 1);
        let p = partition(&img, "t", 0);
        let (a, b, x) = (p.replicas[0], p.replicas[1], p.replicas[2]);
        let mut img = img;
        for gone in [x, b] {
            img = img.apply(20, &c.fence_broker(&img, gone, &policy)).0;
        }
        assert_eq!(partition(&img, "t", 0).isr, vec![a]);
        // a, the last in-sync replica and leader, is unregistered (its disk replaced, say).
        let (img, _) = img.apply(30, &c.unregister_broker(&img, a, &[], &policy).unwrap());
        let p = partition(&img, "t", 0);
        assert_eq!(p.leader, -1);
        assert!(p.isr.is_empty() && p.elr.is_empty(), "{p:?}");
        assert!(p.last_known_elr.is_empty(), "{p:?}");
        // It comes back empty under the same id: it may not lead.
        let back = MetadataRecord::RegisterBroker {
            broker_id: a,
            host: "h".into(),
            port: 1,
            rack: None,
        };
        let (img, _) = img.apply(40, &[back]);
        let (img, _) = img.apply(50, &c.unfence_broker(&img, a, &policy));
        assert_eq!(partition(&img, "t", 0).leader, -1);
    }

    #[test]
    fn kip966_replicas_leaving_a_short_isr_stay_eligible() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 2,
        };
        let img = three_brokers_with_t(&c, 1);
        let p = partition(&img, "t", 0);
        let (a, b, x) = (p.replicas[0], p.replicas[1], p.replicas[2]);
        // ISR 3 -> 2 (still at min): x is simply out.
        let (img, _) = img.apply(20, &c.fence_broker(&img, x, &policy));
        assert_eq!(partition(&img, "t", 0).isr, vec![a, b]);
        assert!(partition(&img, "t", 0).elr.is_empty());
        // ISR 2 -> 1 (below min): b becomes eligible.
        let (img, _) = img.apply(30, &c.fence_broker(&img, b, &policy));
        assert_eq!(partition(&img, "t", 0).isr, vec![a]);
        assert_eq!(partition(&img, "t", 0).elr, vec![b]);
        // The last ISR member dies too: no leader, both eligible.
        let (img, _) = img.apply(40, &c.fence_broker(&img, a, &policy));
        let p = partition(&img, "t", 0);
        assert_eq!(p.leader, -1);
        assert!(p.isr.is_empty());
        assert_eq!(p.elr, vec![b, a]);
        // x comes back: never in sync with the last writes, it may not lead.
        let (img, _) = img.apply(50, &c.unfence_broker(&img, x, &policy));
        assert_eq!(partition(&img, "t", 0).leader, -1);
        // b comes back: eligible, it leads cleanly with an ISR of itself.
        let (img, _) = img.apply(60, &c.unfence_broker(&img, b, &policy));
        let p = partition(&img, "t", 0);
        assert_eq!(p.leader, b);
        assert_eq!(p.isr, vec![b]);
        assert_eq!(p.elr, vec![a]);
        // x catches up and joins: the ISR is back at min, the ELR is cleared.
        let rec = c
            .alter_isr(
                &img,
                "t",
                0,
                (b, p.leader_epoch, p.partition_epoch),
                &[b, x],
                &policy,
            )
            .unwrap();
        let (img, _) = img.apply(70, &rec);
        assert_eq!(partition(&img, "t", 0).isr.len(), 2);
        assert!(partition(&img, "t", 0).elr.is_empty());
    }

    /// UnregisterBroker: a live broker loses its leaderships (elected elsewhere, as fencing
    /// does) and leaves every ISR; a fenced one leaves the ELR it was left in; replica lists
    /// keep it; the registration is gone, also from an image rebuilt from a snapshot.
    #[test]
    fn unregistering_a_broker_takes_it_out_of_every_isr_elr_and_leadership() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 2,
        };
        let img = cluster(&[(1, ""), (2, ""), (3, ""), (4, "")]);
        let mut s = spec("t", 4);
        s.replication_factor = 2;
        let (img, _) = img.apply(10, &c.create_topic(&img, &s).unwrap());
        let led_by_4: Vec<i32> = img
            .topic("t")
            .unwrap()
            .partitions
            .values()
            .filter(|p| p.leader == 4)
            .map(|p| p.partition)
            .collect();
        let with_4: Vec<i32> = img
            .topic("t")
            .unwrap()
            .partitions
            .values()
            .filter(|p| p.replicas.contains(&4))
            .map(|p| p.partition)
            .collect();
        assert!(
            !led_by_4.is_empty() && with_4.len() > led_by_4.len(),
            "{img:?}"
        );

        // A live broker.
        let records = c.unregister_broker(&img, 4, &[1, 2, 3], &policy).unwrap();
        assert_eq!(
            records.last(),
            Some(&MetadataRecord::UnregisterBroker { broker_id: 4 })
        );
        let (after, delta) = img.apply(20, &records);
        assert!(delta.changed_brokers);
        assert!(!after.brokers.contains_key(&4));
        assert_eq!(after.brokers.len(), 3);
        for p in after.topic("t").unwrap().partitions.values() {
            let before = partition(&img, "t", p.partition);
            assert_eq!(p.replicas, before.replicas, "replica lists keep the broker");
            assert!(!p.isr.contains(&4) && !p.elr.contains(&4), "{p:?}");
            assert_ne!(p.leader, 4);
            if led_by_4.contains(&p.partition) {
                assert!(p.leader > 0, "another replica leads: {p:?}");
                assert_eq!(p.leader_epoch, before.leader_epoch + 1);
            } else {
                assert_eq!(p.leader, before.leader);
            }
        }
        // Applied the same way every time (replay, a snapshot of it).
        assert_eq!(img.apply(20, &records).0.brokers, after.brokers);
        let (rebuilt, _) = MetadataImage::empty().apply(0, &after.to_records());
        assert_eq!(rebuilt.brokers, after.brokers);
        assert_eq!(rebuilt.topics, after.topics);
        // Unregistered: a second attempt, and any unknown id, is refused.
        assert_eq!(
            c.unregister_broker(&after, 4, &[1, 2, 3], &policy),
            Err(ControllerError::BrokerIdNotRegistered(4))
        );
        assert_eq!(
            c.unregister_broker(&img, 9, &[1, 2, 3], &policy),
            Err(ControllerError::BrokerIdNotRegistered(9))
        );

        // A fenced broker: fencing left it an eligible leader replica where the ISR went below
        // min.insync.replicas; unregistering takes it out of those ELRs too.
        let (fenced, _) = img.apply(20, &c.fence_broker(&img, 4, &policy));
        let in_elr: Vec<i32> = fenced
            .topic("t")
            .unwrap()
            .partitions
            .values()
            .filter(|p| p.elr.contains(&4))
            .map(|p| p.partition)
            .collect();
        assert_eq!(in_elr, with_4, "{fenced:?}");
        let records = c
            .unregister_broker(&fenced, 4, &[1, 2, 3], &policy)
            .unwrap();
        assert_eq!(records.len(), in_elr.len() + 1);
        let (after, _) = fenced.apply(30, &records);
        assert!(!after.brokers.contains_key(&4));
        for p in after.topic("t").unwrap().partitions.values() {
            assert!(p.replicas.contains(&4) == with_4.contains(&p.partition));
            assert!(p.elr.is_empty() && !p.isr.contains(&4), "{p:?}");
            assert!(p.leader > 0 && p.leader != 4, "{p:?}");
        }
        // A broker with nothing to leave only loses its registration.
        let spare = cluster(&[(1, ""), (5, "")]);
        assert_eq!(
            c.unregister_broker(&spare, 5, &[1], &policy).unwrap(),
            vec![MetadataRecord::UnregisterBroker { broker_id: 5 }]
        );
    }

    /// A controller-quorum voter cannot be unregistered (it is refused before anything is
    /// written), even while it is registered and fenced.
    #[test]
    fn a_controller_voter_cannot_be_unregistered() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let img = cluster(&[(1, ""), (2, ""), (3, ""), (4, "")]);
        let (img, _) = img.apply(10, &c.fence_broker(&img, 2, &policy));
        for id in [1, 2, 3] {
            let e = c
                .unregister_broker(&img, id, &[1, 2, 3], &policy)
                .unwrap_err();
            assert!(
                matches!(&e, ControllerError::InvalidRequest(m) if m.contains("voter")),
                "{e:?}"
            );
        }
        assert!(c.unregister_broker(&img, 4, &[1, 2, 3], &policy).is_ok());
    }

    /// Topic "t" with one partition on brokers 1, 2, 3 (of 1..=4), leader 1.
    fn reassignable() -> MetadataImage {
        one_partition(&[1, 2, 3, 4], &[1, 2, 3], (5, 7))
    }

    /// Topic "t" with one partition on `replicas` (all in sync, the first leads) of `brokers`.
    fn one_partition(
        brokers: &[i32],
        replicas: &[i32],
        (leader_epoch, partition_epoch): (i32, i32),
    ) -> MetadataImage {
        let ids: Vec<(i32, &str)> = brokers.iter().map(|b| (*b, "")).collect();
        let id = [9u8; 16];
        cluster(&ids)
            .apply(
                10,
                &[
                    MetadataRecord::Topic {
                        name: "t".into(),
                        topic_id: id,
                    },
                    MetadataRecord::Partition {
                        topic_id: id,
                        partition: 0,
                        replicas: replicas.to_vec(),
                        isr: replicas.to_vec(),
                        leader: replicas[0],
                        leader_epoch,
                        partition_epoch,
                        elr: vec![],
                        last_known_elr: vec![],
                        adding_replicas: vec![],
                        removing_replicas: vec![],
                    },
                ],
            )
            .0
    }

    #[test]
    fn reassignment_starts_progresses_and_completes_moving_the_leader_off() {
        let c = Controller::default();
        let img = reassignable();
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[4, 2, 3]), true)
            .unwrap();
        let (img, delta) = img.apply(20, &recs);
        assert_eq!(delta.changed_partitions, vec![("t".to_string(), 0)]);
        let p = partition(&img, "t", 0);
        assert_eq!(p.replicas, vec![4, 2, 3, 1]);
        assert_eq!(p.adding_replicas, vec![4]);
        assert_eq!(p.removing_replicas, vec![1]);
        assert_eq!(p.isr, vec![1, 2, 3]);
        assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (1, 5, 8));
        assert_eq!(p.target_replicas(), vec![4, 2, 3]);

        // Other ISR changes keep the reassignment going.
        let (img, _) = img.apply(30, &leader_1_proposes(&c, &img, &[1, 2]).unwrap());
        let p = partition(&img, "t", 0);
        assert_eq!(p.isr, vec![2, 1]);
        assert!(p.is_reassigning());
        // Fencing and unfencing carry it along.
        let no_unclean = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let (img, _) = img.apply(31, &c.fence_broker(&img, 3, &no_unclean));
        assert_eq!(partition(&img, "t", 0).adding_replicas, vec![4]);
        assert_eq!(partition(&img, "t", 0).removing_replicas, vec![1]);
        let (img, _) = img.apply(32, &c.unfence_broker(&img, 3, &no_unclean));
        let (img, _) = img.apply(33, &leader_1_proposes(&c, &img, &[1, 2, 3]).unwrap());
        // The new replica caught up: the same change completes the reassignment, and the
        // leader, not a target replica, hands over to the first in-sync target replica.
        let recs = leader_1_proposes(&c, &img, &[2, 1, 3, 4]).unwrap();
        assert_eq!(recs.len(), 1);
        let (img, _) = img.apply(40, &recs);
        let p = partition(&img, "t", 0);
        assert_eq!(p.replicas, vec![4, 2, 3]);
        assert_eq!(p.isr, vec![4, 2, 3]);
        assert_eq!(p.leader, 4);
        assert_eq!(p.leader_epoch, 6);
        assert!(!p.is_reassigning());
        // Snapshots carry the state too.
        let rebuilt = MetadataImage::empty().apply(0, &img.to_records()).0;
        assert_eq!(partition(&rebuilt, "t", 0), p);
    }

    #[test]
    fn reassignment_keeping_the_leader_completes_without_election() {
        let c = Controller::default();
        let img = reassignable();
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[1, 2, 4]), true)
            .unwrap();
        let (img, _) = img.apply(20, &recs);
        let recs = leader_1_proposes(&c, &img, &[1, 2, 3, 4]).unwrap();
        let (img, _) = img.apply(30, &recs);
        let p = partition(&img, "t", 0);
        assert_eq!(p.replicas, vec![1, 2, 4]);
        assert_eq!(p.isr, vec![1, 2, 4]);
        assert_eq!((p.leader, p.leader_epoch), (1, 5));
        assert!(!p.is_reassigning());
    }

    /// Found by the controller simulation: the ISR change that completed a reassignment kept
    /// the ELR from before it, though the change brought the ISR back to min.insync.replicas
    /// (which clears it, KIP-966) — leaving a replica in both the ISR and the ELR.
    #[test]
    fn completing_a_reassignment_keeps_the_isr_changes_elr() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 2,
        };
        let img = reassignable();
        let shrink = |img: &MetadataImage, isr: &[i32]| {
            let recs = c
                .alter_isr(
                    img,
                    "t",
                    0,
                    (1, 5, partition(img, "t", 0).partition_epoch),
                    isr,
                    &policy,
                )
                .unwrap();
            img.apply(img.offset + 1, &recs).0
        };
        let img = shrink(&img, &[1, 2]);
        let img = shrink(&img, &[1]);
        assert_eq!(partition(&img, "t", 0).elr, vec![2]);
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[1, 2]), true)
            .unwrap();
        let (img, _) = img.apply(30, &recs);
        assert!(partition(&img, "t", 0).is_reassigning());
        // 2 catches up: the ISR is back at min.insync.replicas and the move is done.
        let img = shrink(&img, &[1, 2]);
        let p = partition(&img, "t", 0);
        assert!(!p.is_reassigning());
        assert_eq!(
            (p.replicas.clone(), p.isr.clone()),
            (vec![1, 2], vec![1, 2])
        );
        assert!(p.elr.is_empty(), "{p:?}");
    }

    /// Found by the controller simulation: the leader found the joining replica 4 caught up
    /// and proposed it for the ISR; before the proposal arrived, the reassignment was cancelled
    /// (4's log deleted) and started again (4 back, empty). The leader and its epoch never
    /// changed, so checking the leader epoch alone admitted 4 without the committed data.
    #[test]
    fn an_isr_proposal_based_on_an_older_partition_state_is_refused() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let img = reassignable();
        let to_4 = |img: &MetadataImage| {
            let recs = c
                .alter_partition_reassignment(img, "t", 0, Some(&[1, 2, 4]), true)
                .unwrap();
            img.apply(img.offset + 1, &recs).0
        };
        let img = to_4(&img);
        let based_on = partition(&img, "t", 0);
        let proposal = (1, 5, based_on.partition_epoch);
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, None, true)
            .unwrap();
        let img = img.apply(30, &recs).0;
        assert!(!partition(&img, "t", 0).replicas.contains(&4));
        let img = to_4(&img);
        let p = partition(&img, "t", 0);
        assert_eq!((p.leader, p.leader_epoch), (1, 5));
        assert_eq!(
            c.alter_isr(&img, "t", 0, proposal, &[1, 2, 3, 4], &policy),
            Err(AlterPartitionError::InvalidUpdateVersion {
                got: based_on.partition_epoch,
                current: p.partition_epoch
            })
        );
        // Proposed again from the current state, it is taken.
        let recs = c
            .alter_isr(
                &img,
                "t",
                0,
                (1, 5, p.partition_epoch),
                &[1, 2, 3, 4],
                &policy,
            )
            .unwrap();
        assert_eq!(
            img.apply(40, &recs).0.topic("t").unwrap().partitions[&0].isr,
            vec![1, 2, 4]
        );
    }

    /// Found by the controller simulation: only an ISR change (AlterPartition) completed a
    /// reassignment. An election that makes an eligible or unclean leader the whole ISR can
    /// bring the target in sync too; the leader then has nothing to propose, and with the
    /// replicas being removed gone for good the reassignment stayed open forever (and could
    /// not be cancelled: the original replicas had no in-sync member).
    #[test]
    fn an_election_that_brings_the_target_in_sync_completes_the_reassignment() {
        let c = Controller::default();
        let policy = FixedPolicy {
            unclean: false,
            min_isr: 2,
        };
        let img = one_partition(&[1, 2, 3], &[1, 2], (0, 0));
        let img = img.apply(20, &c.fence_broker(&img, 2, &policy)).0;
        let offline = img.apply(21, &c.fence_broker(&img, 1, &policy)).0;
        let p = partition(&offline, "t", 0);
        assert_eq!((p.leader, p.elr), (-1, vec![2, 1]));
        let reassign = |img: &MetadataImage, target: &[i32]| {
            let recs = c
                .alter_partition_reassignment(img, "t", 0, Some(target), true)
                .unwrap();
            let img = img.apply(30, &recs).0;
            assert!(partition(&img, "t", 0).is_reassigning());
            img
        };
        // Broker 1 is gone for good: the partition moves to 2 alone. 2 comes back and leads as
        // an eligible replica, alone in the ISR: the whole target.
        let img = reassign(&offline, &[2]);
        let img = img.apply(40, &c.unfence_broker(&img, 2, &policy)).0;
        let p = partition(&img, "t", 0);
        assert!(!p.is_reassigning(), "{p:?}");
        assert_eq!((p.leader, p.replicas, p.isr), (2, vec![2], vec![2]));
        assert!(p.elr.is_empty());
        // Or it moves to 3, which an admin's unclean election (KIP-460) makes the leader.
        let img = reassign(&offline, &[3]);
        let img = img
            .apply(50, &[c.elect_leader(&img, "t", 0, true).unwrap()])
            .0;
        let p = partition(&img, "t", 0);
        assert!(!p.is_reassigning(), "{p:?}");
        assert_eq!((p.leader, p.replicas, p.isr), (3, vec![3], vec![3]));
    }

    #[test]
    fn reassignment_to_in_sync_replicas_completes_at_once() {
        let c = Controller::default();
        let img = reassignable();
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[3, 2]), true)
            .unwrap();
        let (img, _) = img.apply(20, &recs);
        let p = partition(&img, "t", 0);
        assert_eq!(p.replicas, vec![3, 2]);
        assert_eq!(p.isr, vec![3, 2]);
        assert_eq!((p.leader, p.leader_epoch), (3, 6));
        assert!(!p.is_reassigning());
        // The same replicas: nothing to do.
        assert!(c
            .alter_partition_reassignment(&img, "t", 0, Some(&[3, 2]), true)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn cancelling_a_reassignment_reverts_to_the_original_replicas() {
        let c = Controller::default();
        let img = reassignable();
        assert_eq!(
            c.alter_partition_reassignment(&img, "t", 0, None, true),
            Err(ControllerError::NoReassignmentInProgress("t".into(), 0))
        );
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[4, 2, 3]), true)
            .unwrap();
        let (img, _) = img.apply(20, &recs);
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, None, true)
            .unwrap();
        let (img, _) = img.apply(30, &recs);
        let p = partition(&img, "t", 0);
        assert_eq!(p.replicas, vec![2, 3, 1]);
        assert_eq!(p.isr, vec![2, 3, 1]);
        assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (1, 5, 9));
        assert!(!p.is_reassigning());
    }

    /// Found by the controller simulation: new partitions took the length of partition 0's
    /// replica list, which during a reassignment includes the replicas leaving; and with every
    /// broker fenced, placement found no replica and the controller panicked.
    #[test]
    fn new_partitions_get_the_target_replication_factor_and_need_a_live_broker() {
        let c = Controller::default();
        let img = reassignable();
        let recs = c
            .alter_partition_reassignment(&img, "t", 0, Some(&[4]), true)
            .unwrap();
        let (img, _) = img.apply(20, &recs);
        assert_eq!(partition(&img, "t", 0).replicas.len(), 4);
        let (img, _) = img.apply(30, &c.create_partitions(&img, "t", 3).unwrap());
        assert_eq!(partition(&img, "t", 1).replicas.len(), 1);
        assert_eq!(partition(&img, "t", 2).replicas.len(), 1);
        let mut img = img;
        for b in 1..=4 {
            img = img
                .apply(40, &[MetadataRecord::FenceBroker { broker_id: b }])
                .0;
        }
        assert!(matches!(
            c.create_partitions(&img, "t", 4),
            Err(ControllerError::InvalidReplicationFactor(_))
        ));
    }

    /// New partitions had their replication factor cut to the live broker count without a
    /// word: with one of three brokers down, a replication-factor-3 topic grew partitions with
    /// two replicas each, for good.
    #[test]
    fn new_partitions_are_refused_rather_than_given_fewer_replicas() {
        let c = Controller::default();
        let img = one_partition(&[1, 2, 3], &[1, 2, 3], (0, 0));
        let (down, _) = img.apply(20, &[MetadataRecord::FenceBroker { broker_id: 3 }]);
        assert!(matches!(
            c.create_partitions(&down, "t", 2),
            Err(ControllerError::InvalidReplicationFactor(_))
        ));
        let (img, _) = img.apply(30, &c.create_partitions(&img, "t", 2).unwrap());
        assert_eq!(partition(&img, "t", 1).replicas.len(), 3);
    }

    /// A partition that went offline while unclean election was off is elected once the topic
    /// allows it, from whatever replica is live; a partition with a live leader is left alone.
    #[test]
    fn offline_partitions_get_an_unclean_leader_once_the_topic_allows_it() {
        let c = Controller::default();
        let img = one_partition(&[1, 2, 3], &[1, 2], (0, 0));
        let clean = FixedPolicy {
            unclean: false,
            min_isr: 1,
        };
        let unclean = FixedPolicy {
            unclean: true,
            min_isr: 1,
        };
        assert!(
            c.elect_unclean_leaders(&img, &unclean).is_empty(),
            "leader live"
        );
        // 2 falls out of sync, then 1 (the last in-sync replica) dies, then 2 comes back.
        let (img, _) = img.apply(
            20,
            &c.alter_isr(&img, "t", 0, (1, 0, 0), &[1], &clean).unwrap(),
        );
        let (img, _) = img.apply(30, &[MetadataRecord::FenceBroker { broker_id: 2 }]);
        let (img, _) = img.apply(40, &c.fence_broker(&img, 1, &clean));
        let (img, _) = img.apply(50, &c.unfence_broker(&img, 2, &clean));
        assert_eq!(partition(&img, "t", 0).leader, -1, "2 is not in sync");
        assert!(c.elect_unclean_leaders(&img, &clean).is_empty());
        let (img, _) = img.apply(60, &c.elect_unclean_leaders(&img, &unclean));
        let p = partition(&img, "t", 0);
        assert_eq!((p.leader, p.isr.clone()), (2, vec![2]));
        assert!(c.elect_unclean_leaders(&img, &unclean).is_empty());
    }

    #[test]
    fn reassignment_requests_are_validated() {
        let c = Controller::default();
        let img = reassignable();
        assert!(matches!(
            c.alter_partition_reassignment(&img, "nope", 0, Some(&[1]), true),
            Err(ControllerError::UnknownTopic(_))
        ));
        assert_eq!(
            c.alter_partition_reassignment(&img, "t", 1, Some(&[1]), true),
            Err(ControllerError::UnknownPartition("t".into(), 1))
        );
        for bad in [&[][..], &[1, 2, 2], &[1, 2, 9]] {
            assert!(
                matches!(
                    c.alter_partition_reassignment(&img, "t", 0, Some(bad), true),
                    Err(ControllerError::InvalidReplicaAssignment(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            c.alter_partition_reassignment(&img, "t", 0, Some(&[1, 2]), false),
            Err(ControllerError::InvalidReplicationFactor(_))
        ));
        assert!(c
            .alter_partition_reassignment(&img, "t", 0, Some(&[4, 2, 1]), false)
            .is_ok());
    }
}
