//! A seeded, deterministic simulation of the controller (KRaft style) across five brokers in
//! three racks and several topics (replication factor 1..=3, min.insync.replicas 1..=2, some
//! with unclean election), driven by random schedules of faults and admin requests: broker
//! crashes (fenced at once, or when the session expires), restarts (registered fenced, then
//! unfenced by a heartbeat), ISR shrinks and expansions proposed by leaders (delivered at once,
//! delayed, or stale), preferred and unclean elections, leader rebalancing, reassignments
//! (started, completed as followers catch up, cancelled), new partitions and new topics. Every
//! batch of records goes through `MetadataImage::apply` as a broker's applier does, and the
//! image rebuilt from a snapshot (`to_records`) must equal it.
//!
//! Data is modelled just enough to check KIP-966: each replica has a log of record ids; leaders
//! append, followers fetch (truncating to where they diverge from the leader, where KIP-101/279
//! truncation ends up), and the committed prefix grows to the minimum over the ISR, only while
//! the ISR has min.insync.replicas members, and counting replicas of the leader's ISR expansions
//! still in flight (KIP-497's maximal ISR). A leader proposes a follower for the ISR once it
//! holds everything committed.
//!
//! Invariants, after every step: leader -1 or live and in the ISR; ISR, ELR, adding and removing
//! replicas are duplicate-free subsets of the replicas, ISR and ELR disjoint, the ISR live;
//! epochs never go back, every change bumps the partition epoch, a leader change the leader
//! epoch; stale ISR proposals are refused; a new leader comes from the ISR or ELR, or (allowed,
//! and only with none of them live) is unclean; the leader, ISR and ELR hold every committed
//! record, and some replica does after a removal; a leaderless partition has no live ISR or ELR
//! member (nor, with unclean election, any live replica); reassignments end on their target, take
//! replicas away only once the target is in sync, and end as soon as it is; new partitions are
//! placed on distinct live brokers over as many racks as possible with balanced preferred
//! leaders. At the end every broker comes back: every partition must heal (led by its preferred
//! replica, all replicas in sync and identical, no reassignment left).
//!
//! A failure names the seed and step; `SIM_SEED=<seed> SIM_TRACE=1` replays it with a trace,
//! `SIM_SEEDS=<n>` runs more seeds than the default 200. `SIM_HW_IGNORES_PENDING_ISR=1` makes the
//! leaders count only the image's ISR, as strom-broker once did: within a few dozen seeds an
//! expansion still in flight lands after the high watermark passed the follower it adds, and
//! that follower joins the ISR without committed records (the partition epoch has not moved,
//! so the controller cannot tell).
//!
//! The broker side of replication (real logs, high watermark, truncation) has its own
//! simulation in `strom-broker/tests/replication_sim.rs`; this one is about the controller.

use std::collections::{BTreeMap, BTreeSet};

use strom_meta::controller::ElectionError;
use strom_meta::{
    AlterPartitionError, Controller, ControllerError, CreateTopicSpec, MetadataImage,
    MetadataRecord, PartitionImage, TopicImage, TopicPolicy,
};

/// Broker ids and racks: three racks, two of them with two brokers.
const BROKERS: &[(i32, &str)] = &[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")];
const STEPS: usize = 300;
const MAX_TOPICS: u32 = 7;
const MAX_PARTITIONS: i32 = 6;
const UNCLEAN: &str = "unclean.leader.election.enable";
const MIN_ISR: &str = "min.insync.replicas";

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())].clone())
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Reads the topic's own configs, as the broker's policy does.
struct ConfigPolicy;
impl TopicPolicy for ConfigPolicy {
    fn unclean(&self, topic: &TopicImage) -> bool {
        topic.configs.get(UNCLEAN).is_some_and(|v| v == "true")
    }
    fn min_isr(&self, topic: &TopicImage) -> usize {
        topic
            .configs
            .get(MIN_ISR)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }
}

type Key = (String, i32);

/// One partition's data: each replica's log (record ids) and the committed prefix.
#[derive(Default)]
struct Data {
    logs: BTreeMap<i32, Vec<u64>>,
    /// Everything acknowledged to producers (acks=all), in order.
    committed: Vec<u64>,
    next_id: u64,
}

impl Data {
    fn log(&self, broker: i32) -> &[u64] {
        self.logs.get(&broker).map(Vec::as_slice).unwrap_or(&[])
    }
    fn holds_committed(&self, broker: i32) -> bool {
        self.log(broker).starts_with(&self.committed)
    }
}

/// `a` without the members of `b`, in `a`'s order.
fn minus(a: &[i32], b: &[i32]) -> Vec<i32> {
    a.iter().copied().filter(|r| !b.contains(r)).collect()
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// An ISR change a leader sent to the controller and that has not arrived yet.
#[derive(Debug, Clone)]
struct Proposal {
    key: Key,
    leader: i32,
    leader_epoch: i32,
    /// The partition state the leader based the proposal on.
    partition_epoch: i32,
    isr: Vec<i32>,
}

impl Proposal {
    /// Based on the partition's current state.
    fn is_current(&self, p: &PartitionImage) -> bool {
        (self.leader, self.leader_epoch, self.partition_epoch)
            == (p.leader, p.leader_epoch, p.partition_epoch)
    }
}

/// What the step that produced a batch was, for the checks of the transition.
#[derive(Default)]
struct Ctx {
    /// Replicas the leader's ISR proposal asserted are in sync (they may become leader when
    /// the proposal completes a reassignment).
    in_sync: Vec<i32>,
    /// An admin's unclean election (KIP-460) of this partition: it may lose committed data.
    admin_unclean: Option<Key>,
    /// A cancelled reassignment and the replicas it must go back to.
    cancel: Option<(Key, Vec<i32>)>,
    /// Partitions are being created with this replication factor.
    create_rf: Option<usize>,
}

#[derive(Debug, Default)]
struct Stats {
    steps: BTreeMap<&'static str, u64>,
    clean_elections: u64,
    elr_elections: u64,
    unclean_elections: u64,
    committed_lost_unclean: u64,
    stale_refused: u64,
    delayed_applied: u64,
    stranded: u64,
    reassignments_completed: u64,
    reassignments_cancelled: u64,
    leaderless_partition_steps: u64,
    partition_steps: u64,
    live_broker_steps: u64,
    committed_records: u64,
    snapshots: u64,
}

struct Sim {
    seed: u64,
    step: usize,
    trace: bool,
    rng: Rng,
    controller: Controller,
    image: MetadataImage,
    /// Broker processes that are running (the image says which are fenced).
    up: BTreeMap<i32, bool>,
    data: BTreeMap<Key, Data>,
    /// Targets of the reassignments in progress.
    targets: BTreeMap<Key, Vec<i32>>,
    inflight: Vec<Proposal>,
    /// Every (leader, leader epoch, partition epoch) a partition has had: the bases of stale
    /// proposals.
    past_states: BTreeMap<Key, Vec<(i32, i32, i32)>>,
    /// Partitions of unclean topics that a reassignment gave a live replica while they had no
    /// leader: nothing elects it until a broker is unfenced (see `check_liveness`).
    stranded: BTreeSet<Key>,
    topics_created: u32,
    /// `SIM_HW_IGNORES_PENDING_ISR`: the leader's high watermark counts only the ISR of the
    /// image, not expansions in flight (what strom-broker's `maybe_advance_hw` does today).
    hw_ignores_pending_isr: bool,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut sim = Sim {
            seed,
            step: 0,
            trace: std::env::var("SIM_TRACE").is_ok(),
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            controller: Controller::default(),
            image: MetadataImage::empty(),
            up: BROKERS.iter().map(|(b, _)| (*b, true)).collect(),
            data: BTreeMap::new(),
            targets: BTreeMap::new(),
            inflight: Vec::new(),
            past_states: BTreeMap::new(),
            stranded: BTreeSet::new(),
            topics_created: 0,
            hw_ignores_pending_isr: std::env::var("SIM_HW_IGNORES_PENDING_ISR").is_ok(),
            stats: Stats::default(),
        };
        let mut records = vec![MetadataRecord::ClusterId {
            cluster_id: "sim".into(),
        }];
        records.extend(
            BROKERS
                .iter()
                .map(|(b, rack)| MetadataRecord::RegisterBroker {
                    broker_id: *b,
                    host: format!("broker-{b}"),
                    port: 9092,
                    rack: Some(rack.to_string()),
                }),
        );
        sim.commit(records, &Ctx::default());
        for _ in 0..3 {
            sim.new_topic();
        }
        sim.check_state();
        sim
    }

    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "seed {} step {}: {msg}\nreplay with SIM_SEED={} SIM_TRACE=1",
            self.seed, self.step, self.seed
        )
    }

    fn topic(&self, name: &str) -> &TopicImage {
        self.image.topic(name).unwrap()
    }

    fn part(&self, key: &Key) -> &PartitionImage {
        &self.topic(&key.0).partitions[&key.1]
    }

    fn keys(&self) -> Vec<Key> {
        self.image
            .topics
            .values()
            .flat_map(|t| t.partitions.keys().map(|p| (t.name.clone(), *p)))
            .collect()
    }

    fn data(&mut self, key: &Key) -> &mut Data {
        self.data.get_mut(key).unwrap()
    }

    fn is_up(&self, broker: i32) -> bool {
        self.up.get(&broker).copied().unwrap_or(false)
    }

    /// The partition's leader, if its process is running.
    fn serving_leader(&self, key: &Key) -> Option<i32> {
        let l = self.part(key).leader;
        (l >= 0 && self.is_up(l)).then_some(l)
    }

    fn trace(&self, what: impl std::fmt::Display) {
        if self.trace {
            eprintln!("[{}] {what}", self.step);
        }
    }

    /// Appends a batch to the "metadata log" and applies it, checking the transition.
    fn commit(&mut self, records: Vec<MetadataRecord>, ctx: &Ctx) {
        if records.is_empty() {
            return;
        }
        if self.trace {
            for r in &records {
                eprintln!("      {r:?}");
            }
        }
        let first = self.image.offset + 1;
        let (after, delta) = self.image.apply(first, &records);
        if after.offset != first + records.len() as i64 - 1 {
            self.fail(format!(
                "image offset {} after batch at {first}",
                after.offset
            ));
        }
        let before = std::mem::replace(&mut self.image, after);
        self.check_transition(&before, &delta, ctx);
        // A broker that is no longer a replica deletes its log (StopReplica with delete).
        for (key, d) in self.data.iter_mut() {
            if let Some(p) = self
                .image
                .topic(&key.0)
                .and_then(|t| t.partitions.get(&key.1))
            {
                d.logs.retain(|b, _| p.replicas.contains(b));
            }
        }
        for key in self.keys() {
            self.data.entry(key.clone()).or_default();
            let p = self.part(&key);
            let now = (p.leader, p.leader_epoch, p.partition_epoch);
            let past = self.past_states.entry(key).or_default();
            if past.last() != Some(&now) {
                past.push(now);
            }
        }
    }

    /// Checks of one batch: epochs, elections, reassignments, placement, the delta.
    fn check_transition(
        &mut self,
        before: &MetadataImage,
        delta: &strom_meta::image::MetadataDelta,
        ctx: &Ctx,
    ) {
        let after = self.image.clone();
        let mut created: Vec<&PartitionImage> = Vec::new();
        for (name, t) in &after.topics {
            for (i, p) in &t.partitions {
                let key = (name.clone(), *i);
                let Some(o) = before.topic(name).and_then(|ot| ot.partitions.get(i)) else {
                    if !delta
                        .created_partitions
                        .contains(&(name.clone(), t.topic_id, *i))
                    {
                        self.fail(format!("{key:?} created but not in the delta {delta:?}"));
                    }
                    created.push(p);
                    continue;
                };
                if o == p {
                    continue;
                }
                if !delta.changed_partitions.contains(&key) {
                    self.fail(format!("{key:?} changed but not in the delta {delta:?}"));
                }
                if p.leader_epoch < o.leader_epoch || p.partition_epoch <= o.partition_epoch {
                    self.fail(format!(
                        "{key:?} epochs went from {}/{} to {}/{}",
                        o.leader_epoch, o.partition_epoch, p.leader_epoch, p.partition_epoch
                    ));
                }
                if p.leader != o.leader {
                    if p.leader_epoch <= o.leader_epoch {
                        self.fail(format!(
                            "{key:?} leader {} -> {} without a new leader epoch ({})",
                            o.leader, p.leader, p.leader_epoch
                        ));
                    }
                    if p.leader >= 0 {
                        self.check_election(&key, t, o, p, ctx);
                    }
                }
                let removed = minus(&o.replicas, &p.replicas);
                if o.is_reassigning() && !p.is_reassigning() {
                    match &ctx.cancel {
                        Some((k, original)) if *k == key => {
                            if &p.replicas != original {
                                self.fail(format!(
                                    "{key:?} cancelled to {:?}, not the original {original:?}",
                                    p.replicas
                                ));
                            }
                            self.targets.remove(&key);
                            self.stats.reassignments_cancelled += 1;
                        }
                        _ => {
                            let target = self.targets.remove(&key);
                            if target.as_ref() != Some(&p.replicas) {
                                self.fail(format!(
                                    "{key:?} reassignment completed with replicas {:?}, target {target:?}",
                                    p.replicas
                                ));
                            }
                            // KIP-455: the old replicas go only once every new one is in sync
                            // (a new target of current replicas only reorders them).
                            if !removed.is_empty() && p.replicas.iter().any(|r| !p.isr.contains(r))
                            {
                                self.fail(format!(
                                    "{key:?} reassignment completed before its target was in sync: {p:?}"
                                ));
                            }
                            self.stats.reassignments_completed += 1;
                        }
                    }
                }
                if !removed.is_empty() {
                    let d = &self.data[&key];
                    let holder = p.replicas.iter().find(|r| d.holds_committed(**r));
                    if !d.committed.is_empty() && holder.is_none() {
                        self.fail(format!(
                            "{key:?} removed replicas {removed:?}, leaving no replica with the committed data"
                        ));
                    }
                }
            }
        }
        if !created.is_empty() {
            let Some(rf) = ctx.create_rf else {
                self.fail("partitions created by a step that does not create any");
            };
            self.check_placement(before, &created, rf);
        }
    }

    /// A new leader was chosen: from the ISR or the ELR (clean), or, only where allowed and
    /// only when no in-sync or eligible replica is live, from outside (unclean).
    fn check_election(
        &mut self,
        key: &Key,
        t: &TopicImage,
        o: &PartitionImage,
        p: &PartitionImage,
        ctx: &Ctx,
    ) {
        let l = p.leader;
        if o.isr.contains(&l) || ctx.in_sync.contains(&l) {
            self.stats.clean_elections += 1;
            return;
        }
        if o.elr.contains(&l) {
            self.stats.elr_elections += 1;
            return;
        }
        if !ConfigPolicy.unclean(t) && ctx.admin_unclean.as_ref() != Some(key) {
            self.fail(format!(
                "{key:?}: {l} elected from outside ISR {:?} and ELR {:?} without unclean election",
                o.isr, o.elr
            ));
        }
        if let Some(r) = o.isr.iter().chain(&o.elr).find(|r| self.image.is_live(**r)) {
            self.fail(format!(
                "{key:?}: unclean election of {l} while {r} (ISR {:?}, ELR {:?}) is live",
                o.isr, o.elr
            ));
        }
        if p.isr != [l] || !p.elr.is_empty() {
            self.fail(format!(
                "{key:?}: unclean leader {l} with ISR {:?} ELR {:?}",
                p.isr, p.elr
            ));
        }
        // Data loss is what unclean election accepts: what the new leader lacks is gone.
        let d = self.data(key);
        let keep = common_prefix(&d.committed, d.log(l));
        let lost = (d.committed.len() - keep) as u64;
        d.committed.truncate(keep);
        self.stats.unclean_elections += 1;
        self.stats.committed_lost_unclean += lost;
    }

    /// New partitions: replicas on distinct live brokers, over as many racks as possible,
    /// preferred leaders balanced over the live brokers, leader = preferred, ISR = replicas.
    fn check_placement(&self, before: &MetadataImage, created: &[&PartitionImage], rf: usize) {
        let live: Vec<i32> = before.live_brokers().map(|b| b.broker_id).collect();
        let rack = |b: i32| before.brokers[&b].rack.clone();
        let racks: BTreeSet<_> = live.iter().map(|b| rack(*b)).collect();
        let want = rf;
        let mut preferred: BTreeMap<i32, usize> = live.iter().map(|b| (*b, 0)).collect();
        for p in created {
            let distinct: BTreeSet<i32> = p.replicas.iter().copied().collect();
            if p.replicas.len() != want || distinct.len() != want {
                self.fail(format!(
                    "new partition {p:?}: want {want} distinct replicas"
                ));
            }
            if let Some(b) = p.replicas.iter().find(|b| !live.contains(b)) {
                self.fail(format!("new partition {p:?} placed on fenced broker {b}"));
            }
            let covered: BTreeSet<_> = p.replicas.iter().map(|b| rack(*b)).collect();
            if covered.len() != want.min(racks.len()) {
                self.fail(format!(
                    "new partition {p:?} spans racks {covered:?}; {} of {racks:?} were possible",
                    want.min(racks.len())
                ));
            }
            if p.leader != p.replicas[0]
                || p.isr != p.replicas
                || !p.elr.is_empty()
                || p.leader_epoch != 0
                || p.partition_epoch != 0
                || p.is_reassigning()
            {
                self.fail(format!("new partition {p:?} does not start settled"));
            }
            *preferred.get_mut(&p.replicas[0]).unwrap() += 1;
        }
        let (lo, hi) = (
            preferred.values().min().copied().unwrap_or(0),
            preferred.values().max().copied().unwrap_or(0),
        );
        if hi - lo > 1 {
            self.fail(format!(
                "preferred leaders of new partitions unbalanced: {preferred:?}"
            ));
        }
    }

    /// The invariants of the current image and data, after every step.
    fn check_state(&mut self) {
        self.stats.live_broker_steps += self.image.live_brokers().count() as u64;
        for key in self.keys() {
            self.stats.partition_steps += 1;
            let p = self.part(&key).clone();
            let t = self.topic(&key.0);
            let unclean = ConfigPolicy.unclean(t);
            let dups = |v: &[i32]| v.iter().collect::<BTreeSet<_>>().len() != v.len();
            let subset = |a: &[i32], b: &[i32]| a.iter().all(|x| b.contains(x));
            if dups(&p.replicas)
                || dups(&p.isr)
                || dups(&p.elr)
                || dups(&p.adding_replicas)
                || dups(&p.removing_replicas)
            {
                self.fail(format!("{key:?} has duplicates: {p:?}"));
            }
            if p.replicas.is_empty()
                || !subset(&p.isr, &p.replicas)
                || !subset(&p.elr, &p.replicas)
                || p.elr.iter().any(|r| p.isr.contains(r))
            {
                self.fail(format!(
                    "{key:?}: ISR/ELR not disjoint subsets of replicas: {p:?}"
                ));
            }
            if !subset(&p.adding_replicas, &p.replicas)
                || !subset(&p.removing_replicas, &p.replicas)
                || p.adding_replicas
                    .iter()
                    .any(|r| p.removing_replicas.contains(r))
                || p.target_replicas().is_empty()
            {
                self.fail(format!("{key:?}: inconsistent reassignment {p:?}"));
            }
            if p.is_reassigning() && p.target_replicas().iter().all(|r| p.isr.contains(r)) {
                self.fail(format!(
                    "{key:?}: every target replica is in sync but the reassignment goes on: {p:?}"
                ));
            }
            if let Some(r) = p.isr.iter().find(|r| !self.image.is_live(**r)) {
                self.fail(format!("{key:?}: fenced broker {r} in the ISR {p:?}"));
            }
            if p.leader != -1 && (!self.image.is_live(p.leader) || !p.isr.contains(&p.leader)) {
                self.fail(format!(
                    "{key:?}: leader {} not live or not in the ISR: {p:?}",
                    p.leader
                ));
            }
            if p.isr.is_empty() && p.elr.is_empty() {
                self.fail(format!(
                    "{key:?}: no replica is known to hold the committed data: {p:?}"
                ));
            }
            // Safety (KIP-101, KIP-966): the leader, the ISR and the ELR hold all committed data.
            let d = &self.data[&key];
            let committed = d.committed.len();
            for r in (p.leader >= 0)
                .then_some(&p.leader)
                .into_iter()
                .chain(&p.isr)
                .chain(&p.elr)
            {
                if !d.holds_committed(*r) {
                    let log = d.log(*r).to_vec();
                    self.fail(format!(
                        "{key:?}: replica {r} (leader {}, ISR {:?}, ELR {:?}) lacks committed data: log {log:?}, {committed} committed",
                        p.leader, p.isr, p.elr
                    ));
                }
            }
            self.check_liveness(&key, &p, unclean);
        }
    }

    /// A partition without a leader has no live replica the controller may elect: none in the
    /// ISR or ELR, and, with unclean election allowed, none at all — except one that a
    /// reassignment added while it had no leader: the controller elects unclean leaders only
    /// when a broker is fenced or unfenced (or on an admin's request).
    fn check_liveness(&mut self, key: &Key, p: &PartitionImage, unclean: bool) {
        if p.leader >= 0 {
            self.stranded.remove(key);
            return;
        }
        self.stats.leaderless_partition_steps += 1;
        if let Some(r) = p.isr.iter().chain(&p.elr).find(|r| self.image.is_live(**r)) {
            self.fail(format!(
                "{key:?} has no leader but {r} in its ISR/ELR is live: {p:?}"
            ));
        }
        if unclean && !self.stranded.contains(key) {
            if let Some(r) = p.replicas.iter().find(|r| self.image.is_live(**r)) {
                self.fail(format!(
                    "{key:?} (unclean election allowed) has no leader but replica {r} is live: {p:?}"
                ));
            }
        }
    }

    /// A snapshot (`to_records`) rebuilds the same image.
    fn check_snapshot(&mut self) {
        let records = self.image.to_records();
        let (rebuilt, _) = MetadataImage::empty().apply(0, &records);
        let a = &self.image;
        let differs = [
            ("cluster id", a.cluster_id == rebuilt.cluster_id),
            ("brokers", a.brokers == rebuilt.brokers),
            ("topics", a.topics == rebuilt.topics),
            (
                "topic ids",
                a.topic_names_by_id == rebuilt.topic_names_by_id,
            ),
            (
                "producer ids",
                a.next_producer_id == rebuilt.next_producer_id,
            ),
            ("broker configs", a.broker_configs == rebuilt.broker_configs),
            ("records", rebuilt.to_records() == records),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(what, _)| what)
        .collect::<Vec<_>>();
        if !differs.is_empty() {
            self.fail(format!(
                "the image rebuilt from its snapshot differs in {differs:?}: brokers {:?}, rebuilt {:?}",
                a.brokers, rebuilt.brokers
            ));
        }
        self.stats.snapshots += 1;
    }

    /// The leader's high watermark makes the prefix every ISR member holds committed: only
    /// while the ISR has min.insync.replicas members (KIP-966), and counting the replicas of
    /// the leader's ISR expansions still in flight (KIP-497's "maximal ISR": the controller
    /// may admit them any time until the answer arrives, so the high watermark must not pass
    /// them meanwhile).
    fn advance_committed(&mut self, key: &Key) {
        let Some(leader) = self.serving_leader(key) else {
            return;
        };
        let p = self.part(key).clone();
        if p.isr.len() < ConfigPolicy.min_isr(self.topic(&key.0)) {
            return;
        }
        let mut counted = p.isr.clone();
        if !self.hw_ignores_pending_isr {
            for pr in &self.inflight {
                if pr.key == *key && pr.is_current(&p) {
                    counted.extend(pr.isr.iter().filter(|r| !p.isr.contains(r)));
                }
            }
        }
        let d = self.data(key);
        let leader_log = d.log(leader).to_vec();
        let hw = counted
            .iter()
            .map(|r| common_prefix(d.log(*r), &leader_log))
            .min()
            .unwrap_or(0);
        if hw > d.committed.len() {
            if !leader_log.starts_with(&d.committed) {
                let c = d.committed.clone();
                self.fail(format!(
                    "{key:?}: leader {leader} log {leader_log:?} rewrote committed {c:?}"
                ));
            }
            let added = (hw - d.committed.len()) as u64;
            d.committed = leader_log[..hw].to_vec();
            self.stats.committed_records += added;
        }
    }

    fn random_key(&mut self, filter: impl Fn(&Sim, &Key) -> bool) -> Option<Key> {
        let keys: Vec<Key> = self
            .keys()
            .into_iter()
            .filter(|k| filter(self, k))
            .collect();
        self.rng.pick(&keys)
    }

    fn random_broker(&mut self, filter: impl Fn(&Sim, i32) -> bool) -> Option<i32> {
        let ids: Vec<i32> = BROKERS
            .iter()
            .map(|(b, _)| *b)
            .filter(|b| filter(self, *b))
            .collect();
        self.rng.pick(&ids)
    }

    // ---- data plane ----

    fn produce(&mut self) {
        let Some(key) = self.random_key(|s, k| s.serving_leader(k).is_some()) else {
            return;
        };
        let leader = self.part(&key).leader;
        let n = 1 + self.rng.below(3);
        let d = self.data(&key);
        for _ in 0..n {
            d.next_id += 1;
            let id = d.next_id;
            d.logs.entry(leader).or_default().push(id);
        }
        self.trace(format!("produce {n} to {key:?} on {leader}"));
        self.advance_committed(&key);
    }

    /// A follower fetches from the leader: it truncates to where its log diverges from the
    /// leader's, then copies some or all of the rest.
    fn fetch(&mut self, key: &Key, follower: i32, all: bool) {
        let Some(leader) = self.serving_leader(key) else {
            return;
        };
        if follower == leader || !self.is_up(follower) {
            return;
        }
        let n = if all {
            usize::MAX
        } else {
            1 + self.rng.below(4)
        };
        let d = self.data(key);
        let leader_log = d.log(leader).to_vec();
        let log = d.logs.entry(follower).or_default();
        let keep = common_prefix(log, &leader_log);
        log.truncate(keep);
        let upto = leader_log.len().min(keep.saturating_add(n));
        log.extend_from_slice(&leader_log[keep..upto]);
        self.advance_committed(key);
    }

    fn random_fetch(&mut self) {
        let Some(key) = self.random_key(|s, k| s.serving_leader(k).is_some()) else {
            return;
        };
        let p = self.part(&key).clone();
        let Some(f) = self.rng.pick(&p.replicas) else {
            return;
        };
        self.trace(format!("{f} fetches {key:?} from {}", p.leader));
        self.fetch(&key, f, false);
    }

    // ---- ISR changes ----

    /// Followers the leader may add to the ISR: live, and holding everything committed as a
    /// prefix of the leader's log (Kafka: caught up to the high watermark in this epoch).
    fn caught_up(&self, key: &Key) -> Vec<i32> {
        let p = self.part(key);
        let d = &self.data[key];
        let leader_log = d.log(p.leader);
        minus(&p.replicas, &p.isr)
            .into_iter()
            .filter(|r| {
                let log = d.log(*r);
                self.image.is_live(*r)
                    && log.len() >= d.committed.len()
                    && leader_log.starts_with(log)
            })
            .collect()
    }

    /// The current leader proposes an ISR change (`grow`: add caught-up followers, else drop
    /// a follower), delivered now or later.
    fn propose_isr(&mut self, grow: bool) {
        let Some(key) = self.random_key(|s, k| s.serving_leader(k).is_some()) else {
            return;
        };
        let p = self.part(&key).clone();
        let mut isr = p.isr.clone();
        if grow {
            let mut candidates = self.caught_up(&key);
            if candidates.is_empty() {
                return;
            }
            self.rng.shuffle(&mut candidates);
            let n = 1 + self.rng.below(candidates.len());
            isr.extend(&candidates[..n]);
        } else {
            let followers: Vec<i32> = isr.iter().copied().filter(|r| *r != p.leader).collect();
            let Some(f) = self.rng.pick(&followers) else {
                return;
            };
            isr.retain(|r| *r != f);
        }
        let proposal = Proposal {
            key,
            leader: p.leader,
            leader_epoch: p.leader_epoch,
            partition_epoch: p.partition_epoch,
            isr,
        };
        if self.rng.chance(15) {
            self.trace(format!("in flight: {proposal:?}"));
            self.inflight.push(proposal);
            return;
        }
        self.trace(format!("ISR proposal {proposal:?}"));
        let records = self.alter_isr(&proposal).unwrap_or_else(|e| {
            self.fail(format!(
                "a current, valid ISR proposal {proposal:?} was refused: {e}"
            ))
        });
        if records.is_empty() {
            self.fail(format!("ISR proposal {proposal:?} changed nothing"));
        }
        self.commit_isr(&proposal, records);
    }

    fn alter_isr(&self, pr: &Proposal) -> Result<Vec<MetadataRecord>, AlterPartitionError> {
        self.controller.alter_isr(
            &self.image,
            &pr.key.0,
            pr.key.1,
            (pr.leader, pr.leader_epoch, pr.partition_epoch),
            &pr.isr,
            &ConfigPolicy,
        )
    }

    fn commit_isr(&mut self, pr: &Proposal, records: Vec<MetadataRecord>) {
        let ctx = Ctx {
            in_sync: pr.isr.clone(),
            ..Ctx::default()
        };
        self.commit(records, &ctx);
        self.advance_committed(&pr.key);
    }

    /// A proposal sent earlier arrives: refused unless the partition is still in the state it
    /// was based on.
    fn deliver_delayed(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let pr = self.inflight.remove(self.rng.below(self.inflight.len()));
        let p = self.part(&pr.key).clone();
        let current = pr.is_current(&p);
        self.trace(format!("delayed {pr:?} arrives (current: {current})"));
        match self.alter_isr(&pr) {
            Ok(records) if current => {
                if !records.is_empty() {
                    self.stats.delayed_applied += 1;
                }
                self.commit_isr(&pr, records);
            }
            Ok(records) => self.fail(format!(
                "a stale ISR proposal {pr:?} was accepted (now leader {} epochs {}/{}): {records:?}",
                p.leader, p.leader_epoch, p.partition_epoch
            )),
            Err(
                AlterPartitionError::FencedLeaderEpoch { .. }
                | AlterPartitionError::NotLeaderOrFollower
                | AlterPartitionError::InvalidUpdateVersion { .. },
            ) if !current => self.stats.stale_refused += 1,
            // The partition is as it was, but the added replica was fenced since.
            Err(AlterPartitionError::IneligibleReplica(r))
                if current && !p.isr.contains(&r) && !self.image.is_live(r) => {}
            Err(e) => self.fail(format!("delayed proposal {pr:?} refused wrongly: {e}")),
        }
    }

    /// ISR proposals that must be refused: stale or future leader or partition epochs,
    /// senders that do not lead, states the partition had before, ISRs with ineligible replicas.
    fn bad_proposal(&mut self) {
        let Some(key) = self.random_key(|_, _| true) else {
            return;
        };
        let p = self.part(&key).clone();
        let mut isr: Vec<i32> = p.isr.clone();
        let (l, le, pe) = (p.leader, p.leader_epoch, p.partition_epoch);
        let (leader, leader_epoch, partition_epoch, expect) = match self.rng.below(7) {
            0 if l >= 0 && le > 0 => (l, le - 1, pe, "fenced"),
            1 if l >= 0 => (l, le + 1, pe, "fenced"),
            2 if l >= 0 && pe > 0 => (l, le, pe - 1, "update version"),
            3 if l >= 0 => (l, le, pe + 1, "update version"),
            4 => {
                let past: Vec<(i32, i32, i32)> = self.past_states[&key]
                    .iter()
                    .copied()
                    .filter(|(pl, _, _)| *pl >= 0)
                    .filter(|s| *s != (l, le, pe))
                    .collect();
                let Some((pl, ple, ppe)) = self.rng.pick(&past) else {
                    return;
                };
                (pl, ple, ppe, "stale")
            }
            5 if l >= 0 => {
                // Adds a fenced replica or a broker that is not a replica.
                let Some(bad) = self.random_broker(|s, b| {
                    !p.isr.contains(&b) && (!p.replicas.contains(&b) || !s.image.is_live(b))
                }) else {
                    return;
                };
                isr.push(bad);
                (l, le, pe, "ineligible")
            }
            _ => {
                let Some(other) = self.random_broker(|_, b| b != l) else {
                    return;
                };
                (other, le, pe, "not leader")
            }
        };
        if !isr.contains(&leader) {
            isr.push(leader);
        }
        let pr = Proposal {
            key,
            leader,
            leader_epoch,
            partition_epoch,
            isr,
        };
        self.trace(format!("bad proposal ({expect}) {pr:?}"));
        let result = self.alter_isr(&pr);
        let ok = matches!(
            (expect, &result),
            ("fenced", Err(AlterPartitionError::FencedLeaderEpoch { .. }))
                | (
                    "update version",
                    Err(AlterPartitionError::InvalidUpdateVersion { .. })
                )
                | ("not leader", Err(AlterPartitionError::NotLeaderOrFollower))
                | ("ineligible", Err(AlterPartitionError::IneligibleReplica(_)))
                | (
                    "stale",
                    Err(AlterPartitionError::NotLeaderOrFollower
                        | AlterPartitionError::FencedLeaderEpoch { .. }
                        | AlterPartitionError::InvalidUpdateVersion { .. })
                )
        );
        if !ok {
            self.fail(format!(
                "bad ISR proposal ({expect}) {pr:?}: got {result:?}"
            ));
        }
        self.stats.stale_refused += 1;
    }

    // ---- brokers ----

    /// A broker process dies; the controller fences it at once (its connections closed, or a
    /// controlled shutdown) or later, when its session expires.
    fn crash(&mut self) {
        // The more brokers are down, the rarer another crash: mostly one or two at a time,
        // now and then all of them.
        let down = self.up.values().filter(|u| !**u).count();
        if self.rng.below(1 + 2 * down) != 0 {
            return;
        }
        let Some(b) = self.random_broker(|s, b| s.is_up(b)) else {
            return;
        };
        self.up.insert(b, false);
        let now = self.rng.chance(50);
        self.trace(format!("broker {b} crashes (fenced at once: {now})"));
        if now {
            self.fence(b);
        }
    }

    fn fence(&mut self, b: i32) {
        let records = self.controller.fence_broker(&self.image, b, &ConfigPolicy);
        self.commit(records, &Ctx::default());
    }

    fn session_expires(&mut self) {
        let Some(b) = self.random_broker(|s, b| !s.is_up(b) && s.image.is_live(b)) else {
            return;
        };
        self.trace(format!("session of broker {b} expires"));
        self.fence(b);
    }

    /// A broker starts again: it registers fenced (the broker's `register`), sometimes with a
    /// new listener; a heartbeat unfences it later.
    fn restart(&mut self) {
        let Some(b) = self.random_broker(|s, b| !s.is_up(b)) else {
            return;
        };
        self.up.insert(b, true);
        let old = self.image.brokers[&b].clone();
        let port = if self.rng.chance(25) {
            old.port + 1
        } else {
            old.port
        };
        self.trace(format!("broker {b} restarts on port {port}"));
        let mut records = Vec::new();
        if port != old.port {
            records.push(MetadataRecord::RegisterBroker {
                broker_id: b,
                host: old.host.clone(),
                port,
                rack: old.rack.clone(),
            });
        }
        let (after, _) = self.image.apply(self.image.offset, &records);
        records.extend(self.controller.fence_broker(&after, b, &ConfigPolicy));
        if !records
            .iter()
            .any(|r| matches!(r, MetadataRecord::FenceBroker { .. }))
            && !after.brokers[&b].fenced
        {
            records.push(MetadataRecord::FenceBroker { broker_id: b });
        }
        self.commit(records, &Ctx::default());
        if self.image.is_live(b) {
            self.fail(format!("broker {b} registered unfenced"));
        }
    }

    fn heartbeat(&mut self) {
        let Some(b) = self.random_broker(|s, b| s.is_up(b) && !s.image.is_live(b)) else {
            return;
        };
        self.trace(format!("broker {b} heartbeats: unfence"));
        self.unfence(b);
    }

    fn unfence(&mut self, b: i32) {
        let records = self
            .controller
            .unfence_broker(&self.image, b, &ConfigPolicy);
        if records.is_empty() {
            self.fail(format!("unfencing broker {b} wrote nothing"));
        }
        self.commit(records, &Ctx::default());
    }

    // ---- elections ----

    fn elect(&mut self, unclean: bool) {
        let Some(key) = self.random_key(|_, _| true) else {
            return;
        };
        let p = self.part(&key).clone();
        let result = self
            .controller
            .elect_leader(&self.image, &key.0, key.1, unclean);
        self.trace(format!("elect {key:?} (unclean: {unclean}): {result:?}"));
        let live = |r: &i32| self.image.is_live(*r);
        let expected = if unclean {
            if p.leader >= 0 {
                Some(ElectionError::ElectionNotNeeded)
            } else if !p.replicas.iter().any(live) {
                Some(ElectionError::EligibleLeadersNotAvailable)
            } else {
                None
            }
        } else if p.leader == p.replicas[0] {
            Some(ElectionError::ElectionNotNeeded)
        } else if !p.isr.contains(&p.replicas[0]) || !live(&p.replicas[0]) {
            Some(ElectionError::PreferredLeaderNotAvailable)
        } else {
            None
        };
        match (result, expected) {
            (Ok(record), None) => {
                let ctx = Ctx {
                    admin_unclean: unclean.then(|| key.clone()),
                    ..Ctx::default()
                };
                self.commit(vec![record], &ctx);
                if !unclean && self.part(&key).leader != p.replicas[0] {
                    self.fail(format!(
                        "preferred election of {key:?} did not elect {}",
                        p.replicas[0]
                    ));
                }
            }
            (Err(e), Some(want)) if e == want => {}
            (got, want) => self.fail(format!(
                "election of {key:?} (unclean: {unclean}) {p:?}: got {got:?}, expected {want:?}"
            )),
        }
    }

    fn rebalance(&mut self) {
        let pct = [0, 10, 50][self.rng.below(3)];
        let records = self.controller.rebalance_leaders(&self.image, pct);
        self.trace(format!("rebalance at {pct}%: {} elections", records.len()));
        self.commit(records, &Ctx::default());
    }

    // ---- reassignments ----

    fn start_reassignment(&mut self) {
        let Some(key) = self.random_key(|_, _| true) else {
            return;
        };
        let p = self.part(&key).clone();
        let allow_rf_change = self.rng.chance(30);
        let n = if allow_rf_change {
            1 + self.rng.below(3)
        } else {
            p.replicas.len() - p.adding_replicas.len()
        };
        let mut all: Vec<i32> = BROKERS.iter().map(|(b, _)| *b).collect();
        self.rng.shuffle(&mut all);
        let target: Vec<i32> = all[..n].to_vec();
        let was_leaderless = p.leader < 0;
        self.trace(format!("reassign {key:?} {:?} -> {target:?}", p.replicas));
        let records = self
            .controller
            .alter_partition_reassignment(
                &self.image,
                &key.0,
                key.1,
                Some(&target),
                allow_rf_change,
            )
            .unwrap_or_else(|e| {
                self.fail(format!(
                    "reassignment of {key:?} to {target:?} refused: {e}"
                ))
            });
        if records.is_empty() {
            if p.replicas != target || p.is_reassigning() {
                self.fail(format!(
                    "reassignment of {key:?} to {target:?} wrote nothing: {p:?}"
                ));
            }
            return;
        }
        self.targets.insert(key.clone(), target.clone());
        self.commit(records, &Ctx::default());
        let now = self.part(&key).clone();
        if now.target_replicas() != target {
            self.fail(format!("reassignment of {key:?} to {target:?}: {now:?}"));
        }
        if !now.is_reassigning() {
            self.targets.remove(&key);
        }
        let unclean = ConfigPolicy.unclean(self.topic(&key.0));
        if unclean
            && was_leaderless
            && now.leader < 0
            && now.replicas.iter().any(|r| self.image.is_live(*r))
            && self.stranded.insert(key)
        {
            self.stats.stranded += 1;
        }
    }

    fn cancel_reassignment(&mut self) {
        let Some(key) = self.random_key(|s, k| s.part(k).is_reassigning()) else {
            return;
        };
        let p = self.part(&key).clone();
        let original = minus(&p.replicas, &p.adding_replicas);
        self.trace(format!("cancel reassignment of {key:?}: {p:?}"));
        match self
            .controller
            .alter_partition_reassignment(&self.image, &key.0, key.1, None, true)
        {
            Ok(records) => {
                let ctx = Ctx {
                    cancel: Some((key.clone(), original)),
                    ..Ctx::default()
                };
                self.commit(records, &ctx);
                if self.part(&key).is_reassigning() {
                    self.fail(format!(
                        "cancelled reassignment of {key:?} still in progress"
                    ));
                }
            }
            Err(ControllerError::InvalidReplicaAssignment(_))
                if !p.isr.iter().any(|r| original.contains(r)) => {}
            Err(e) => self.fail(format!(
                "cancelling the reassignment of {key:?} refused: {e}"
            )),
        }
    }

    // ---- topics ----

    fn new_topic(&mut self) {
        if self.topics_created >= MAX_TOPICS {
            return;
        }
        let rf = 1 + self.rng.below(3);
        let min_isr = 1 + self.rng.below(rf.min(2));
        let unclean = self.rng.chance(30);
        let n = self.topics_created;
        let mut topic_id = [0u8; 16];
        for b in topic_id.iter_mut() {
            *b = self.rng.next() as u8;
        }
        let spec = CreateTopicSpec {
            name: format!("t{n}"),
            topic_id,
            num_partitions: 1 + self.rng.below(4) as i32,
            replication_factor: rf as i16,
            configs: [
                (UNCLEAN.to_string(), unclean.to_string()),
                (MIN_ISR.to_string(), min_isr.to_string()),
            ]
            .into(),
        };
        let live = self.image.live_brokers().count();
        self.trace(format!(
            "create {} rf {rf} partitions {} min_isr {min_isr} unclean {unclean} ({live} live)",
            spec.name, spec.num_partitions
        ));
        match self.controller.create_topic(&self.image, &spec) {
            Ok(records) => {
                if rf > live {
                    self.fail(format!(
                        "topic {} with rf {rf} created on {live} live brokers",
                        spec.name
                    ));
                }
                self.topics_created += 1;
                let ctx = Ctx {
                    create_rf: Some(rf),
                    ..Ctx::default()
                };
                self.commit(records, &ctx);
            }
            Err(ControllerError::InvalidReplicationFactor(_)) if rf > live => {}
            Err(e) => self.fail(format!("creating {} refused: {e}", spec.name)),
        }
    }

    fn create_partitions(&mut self) {
        let names: Vec<String> = self.image.topics.keys().cloned().collect();
        let Some(name) = self.rng.pick(&names) else {
            return;
        };
        let t = self.topic(&name);
        let current = t.partitions.len() as i32;
        if current >= MAX_PARTITIONS {
            return;
        }
        // New partitions get the replication factor partition 0 ends up with.
        let rf = t.partitions[&0].target_replicas().len();
        let count = current + 1 + self.rng.below(2) as i32;
        self.trace(format!("create partitions of {name}: {current} -> {count}"));
        match self.controller.create_partitions(&self.image, &name, count) {
            Ok(records) => {
                let ctx = Ctx {
                    create_rf: Some(rf),
                    ..Ctx::default()
                };
                self.commit(records, &ctx);
            }
            Err(ControllerError::InvalidReplicationFactor(_))
                if rf > self.image.live_brokers().count() => {}
            Err(e) => self.fail(format!("create_partitions {name} -> {count}: {e}")),
        }
    }

    // ---- the schedule ----

    fn step(&mut self) {
        let what: &'static str = match self.rng.below(100) {
            0..=19 => "produce",
            20..=42 => "fetch",
            43..=52 => "isr grow",
            53..=57 => "isr shrink",
            58..=60 => "delayed isr",
            61..=63 => "bad isr",
            64..=67 => "crash",
            68..=70 => "session expires",
            71..=75 => "restart",
            76..=80 => "heartbeat",
            81..=83 => "preferred election",
            84..=85 => "unclean election",
            86..=87 => "rebalance",
            88..=92 => "reassign",
            93..=94 => "cancel reassignment",
            95..=97 => "create partitions",
            _ => "new topic",
        };
        *self.stats.steps.entry(what).or_default() += 1;
        match what {
            "produce" => self.produce(),
            "fetch" => self.random_fetch(),
            "isr grow" => self.propose_isr(true),
            "isr shrink" => self.propose_isr(false),
            "delayed isr" => self.deliver_delayed(),
            "bad isr" => self.bad_proposal(),
            "crash" => self.crash(),
            "session expires" => self.session_expires(),
            "restart" => self.restart(),
            "heartbeat" => self.heartbeat(),
            "preferred election" => self.elect(false),
            "unclean election" => self.elect(true),
            "rebalance" => self.rebalance(),
            "reassign" => self.start_reassignment(),
            "cancel reassignment" => self.cancel_reassignment(),
            "create partitions" => self.create_partitions(),
            _ => self.new_topic(),
        }
    }

    /// Every broker back and every follower caught up: every partition has a leader, no
    /// reassignment is left in progress, every replica is in sync, and a rebalance gives
    /// every partition its preferred leader.
    fn heal(&mut self) {
        self.trace("heal");
        for b in BROKERS.iter().map(|(b, _)| *b) {
            if !self.is_up(b) {
                self.up.insert(b, true);
            }
            if !self.image.is_live(b) {
                self.unfence(b);
            }
        }
        self.check_state();
        self.inflight.clear();
        for _ in 0..10 {
            let mut changed = false;
            for key in self.keys() {
                let p = self.part(&key).clone();
                if p.leader < 0 {
                    self.fail(format!(
                        "{key:?} has no leader with every broker back: {p:?}"
                    ));
                }
                for r in &p.replicas {
                    self.fetch(&key, *r, true);
                }
                let add = self.caught_up(&key);
                if add.is_empty() {
                    continue;
                }
                let mut isr = p.isr.clone();
                isr.extend(add);
                let pr = Proposal {
                    key: key.clone(),
                    leader: p.leader,
                    leader_epoch: p.leader_epoch,
                    partition_epoch: p.partition_epoch,
                    isr,
                };
                let records = self
                    .alter_isr(&pr)
                    .unwrap_or_else(|e| self.fail(format!("healing {pr:?}: {e}")));
                self.commit_isr(&pr, records);
                changed = true;
            }
            self.check_state();
            if !changed {
                break;
            }
        }
        let records = self.controller.rebalance_leaders(&self.image, 0);
        self.commit(records, &Ctx::default());
        self.check_state();
        for key in self.keys() {
            let p = self.part(&key).clone();
            let mut isr = p.isr.clone();
            isr.sort();
            let mut replicas = p.replicas.clone();
            replicas.sort();
            if p.is_reassigning() || isr != replicas || p.leader != p.replicas[0] {
                self.fail(format!("{key:?} did not heal: {p:?}"));
            }
            let d = self.data(&key);
            let leader_log = d.log(p.leader).to_vec();
            if let Some(r) = p.replicas.iter().find(|r| d.log(**r) != leader_log) {
                self.fail(format!(
                    "{key:?}: replica {r} differs from the leader after healing"
                ));
            }
        }
    }
}

fn run(seed: u64) -> Stats {
    let mut sim = Sim::new(seed);
    for step in 1..=STEPS {
        sim.step = step;
        sim.step();
        sim.check_state();
        if step % 25 == 0 {
            sim.check_snapshot();
        }
    }
    sim.step = STEPS + 1;
    sim.heal();
    sim.check_snapshot();
    sim.stats
}

#[test]
fn controller_survives_random_fault_schedules() {
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let only: Option<u64> = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok());
    let mut total = Stats::default();
    let mut ran = 0;
    for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
        let s = run(seed);
        for (k, v) in s.steps {
            *total.steps.entry(k).or_default() += v;
        }
        total.clean_elections += s.clean_elections;
        total.elr_elections += s.elr_elections;
        total.unclean_elections += s.unclean_elections;
        total.committed_lost_unclean += s.committed_lost_unclean;
        total.stale_refused += s.stale_refused;
        total.delayed_applied += s.delayed_applied;
        total.stranded += s.stranded;
        total.reassignments_completed += s.reassignments_completed;
        total.reassignments_cancelled += s.reassignments_cancelled;
        total.leaderless_partition_steps += s.leaderless_partition_steps;
        total.partition_steps += s.partition_steps;
        total.live_broker_steps += s.live_broker_steps;
        total.committed_records += s.committed_records;
        total.snapshots += s.snapshots;
        ran += 1;
    }
    eprintln!("{ran} seeds: {total:#?}");
    if only.is_none() && seeds >= 50 {
        // The schedules reach the interesting places, not only the happy path.
        for (what, n) in [
            ("clean elections", total.clean_elections),
            ("ELR elections", total.elr_elections),
            ("unclean elections", total.unclean_elections),
            ("refused stale proposals", total.stale_refused),
            ("completed reassignments", total.reassignments_completed),
            ("cancelled reassignments", total.reassignments_cancelled),
            (
                "leaderless partition steps",
                total.leaderless_partition_steps,
            ),
            ("committed records", total.committed_records),
        ] {
            assert!(n > 0, "no {what} in {seeds} seeds");
        }
    }
}
