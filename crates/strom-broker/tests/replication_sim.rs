//! A seeded, deterministic simulation of one partition replicated on three brokers: the real
//! controller (elections, fencing, ISR changes, KIP-497 epochs), and on each broker the real
//! `Partition` over a real log — the code the broker runs: appends that take place only while
//! the replica leads, fetch answers and truncations applied only while it follows the leader and
//! epoch they came from, the high watermark over the ISR (a replica proposed for it counting
//! until its proposal is answered), KIP-101/279 truncation, ISR expansion (past the high
//! watermark and the start of the leader epoch) and shrinking, one ISR change at a time per
//! partition (`begin_isr_change` / `end_isr_change`), acks=all waits that end when the leader
//! epoch does. What the simulation plays itself is the wire and `propose_isr`'s protocol: a
//! refusal is answered once the leader's metadata caught up, a committed change once the
//! leader's metadata shows it.
//!
//! Every message is in flight until a random later step delivers it, in any order: produce
//! requests, fetches and their answers, OffsetForLeaderEpoch and its answer, AlterPartition and
//! its answer. Brokers apply the metadata the controller commits each at its own later step,
//! so answers arrive after elections, produces reach leaders that were deposed, proposals rest
//! on stale partition epochs. Brokers crash (their in-flight answers lost), restart, and their
//! disks fill up; a leader that cannot write hands over, a follower that cannot write leaves the
//! ISR until it can. Half the schedules (odd seeds) run as Strom does by default, fsyncing
//! before acks=all (`flush.messages` 1): the simulation plays the flusher (each broker fsyncs at
//! random steps), followers report their durable end with each fetch as they do on the wire,
//! and a crash may be a power loss — each segment file back to what its last fsync made durable
//! (the last fsync or truncation), sometimes with zeros where the lost bytes were, as a file
//! system without a journal can leave them. The others flush lazily, and a crash keeps the
//! page cache, as `kill -9` does. A failing seed is printed and replays exactly (`SIM_SEED`, `SIM_TRACE`);
//! `SIM_SEEDS` and `SIM_STEPS` widen the search (200 schedules of 1 500 steps by default).
//!
//! Invariants: every acknowledged record stays at its offset in the leader's log through every
//! failover; no offset is acknowledged twice; in every log the batches' leader epochs never go
//! down and each record lies within its epoch as the epoch cache answers OffsetForLeaderEpoch (a
//! batch of an old epoch appended after a newer one began is the election race of a fetch
//! answer that arrived late); at the end, once every broker is back and caught up, all logs are
//! identical and every replica is in the ISR.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use strom_broker::flusher::Flusher;
use strom_broker::partition::{Partition, ReplicaRole, ReplicationWait};
use strom_broker::replication::{follower_progress, truncation_offset, IsrChange};
use strom_log::{Log, LogConfig, ReadOut};
use strom_meta::{Controller, CreateTopicSpec, FixedPolicy, MetadataImage, MetadataRecord};
use strom_proto::batch::BatchIter;
use strom_proto::compression::Compression;
use strom_proto::records::{decode_records, encode_batch, NewRecord, ProducerInfo};

const BROKERS: i32 = 3;
const MIN_ISR: usize = 2;
const TOPIC: &str = "t";
const POLICY: FixedPolicy = FixedPolicy {
    unclean: false,
    min_isr: MIN_ISR,
};
/// `replica.lag.time.max.ms` in simulated time.
const LAG_MS: i64 = 300;
/// Simulated time per step.
const STEP_MS: i64 = 5;
/// Lazy flushing (a crash keeps the page cache, as `kill -9` does).
const LAZY: (i64, i64) = (i64::MAX, i64::MAX);
/// Durable mode: an fsync before every acknowledgement (Strom's default).
const DURABLE: (i64, i64) = (1, i64::MAX);
/// Durable mode: each broker's flusher runs at one step in this many (rarely enough that
/// followers often hold records they have not fsynced when a crash comes).
const FLUSH_ONE_IN: u64 = 8;
/// Bytes per fetch answer: a few batches, so that catching up takes several round trips.
const FETCH_BYTES: usize = 300;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A message on the wire. `inc`: the incarnation of the broker it goes to when it was sent
/// (a broker that restarted since lost the connection, and the message with it).
#[derive(Debug)]
enum Msg {
    Produce {
        to: i32,
        inc: u32,
        value: u64,
    },
    Fetch {
        from: i32,
        from_inc: u32,
        to: i32,
        epoch: i32,
        offset: i64,
        /// The follower's durable end (`DURABLE_END_TAG`).
        durable: i64,
        can_write: bool,
    },
    /// `None`: refused (not the leader in that epoch).
    FetchAnswer {
        to: i32,
        inc: u32,
        from: i32,
        epoch: i32,
        answer: Option<(Bytes, i64, i64)>,
    },
    EpochQuery {
        from: i32,
        from_inc: u32,
        to: i32,
        epoch: i32,
        latest: i32,
    },
    EpochAnswer {
        to: i32,
        inc: u32,
        from: i32,
        epoch: i32,
        answer: Option<(i32, i64)>,
    },
    Alter {
        from: i32,
        inc: u32,
        token: u64,
        epoch: i32,
        partition_epoch: i32,
        change: IsrChange,
    },
    /// The leader learns the outcome of its proposal (in `epoch`, on `partition_epoch`) as
    /// `propose_isr` does: a refusal once its metadata caught up with the controller's (a
    /// proposal on a stale image is refused only after the broker fetched the newer one); a
    /// committed change once its own metadata shows it (the broker waits for that image, and
    /// asks again while the outcome is unknown), or once it no longer leads.
    AlterAnswer {
        to: i32,
        inc: u32,
        token: u64,
        change: IsrChange,
        epoch: i32,
        partition_epoch: i32,
        committed: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Truncate,
    Fetch,
}

struct Node {
    dir: tempfile::TempDir,
    /// `None` while the broker is down.
    part: Option<Arc<Partition>>,
    /// Bumped at each crash.
    inc: u32,
    /// The fetcher: the leader and epoch it follows (from the role this broker applied).
    follow: Option<(i32, i32)>,
    phase: Phase,
    /// A request of the fetcher is in flight.
    busy: bool,
    /// Its disk is full: appends fail (and leave the log as it was).
    disk_full: bool,
    /// Its last append failed and none succeeded since (`Partition::write_failed`).
    write_failed: bool,
    /// Durable mode: what each segment file holds on the disk itself (as of its last fsync
    /// or truncation); a power loss puts the files back to it.
    disk: BTreeMap<std::path::PathBuf, Vec<u8>>,
}

/// A produce appended by a leader, waiting for acks=all.
struct Waiter {
    node: i32,
    inc: u32,
    base: i64,
    end: i64,
    epoch: i32,
    value: u64,
}

struct Sim {
    /// Durable mode (see the module's doc); otherwise lazy flushing.
    durable: bool,
    /// Crashes that lost what was not fsynced.
    power_losses: usize,
    controller: Controller,
    image: MetadataImage,
    nodes: BTreeMap<i32, Node>,
    flusher: Arc<Flusher>,
    _flusher_dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    wire: Vec<Msg>,
    waiters: Vec<Waiter>,
    acked: BTreeMap<i64, u64>,
    next_value: u64,
    now: i64,
    /// Leaderships handed over by a leader that could not write.
    handovers: usize,
    /// Fetch answers and truncations the role guard kept out of a log (they arrived after
    /// the replica stopped following that leader and epoch).
    stale_refused: usize,
}

fn one_record(value: u64) -> Vec<u8> {
    let r = NewRecord {
        key: None,
        value: Some(value.to_string().into_bytes()),
        headers: Vec::new(),
        timestamp: 1_700_000_000_000,
    };
    encode_batch(&[r], Compression::None, ProducerInfo::default()).unwrap()
}

/// Every (offset, batch leader epoch, value) in a replica's log.
fn contents(part: &Partition) -> Vec<(i64, i32, u64)> {
    let mut out = Vec::new();
    let mut at = part.log_start_offset();
    let end = part.log_end_offset();
    while at < end {
        let ReadOut::Copied(bytes) = part.read_for_replica(at, 64 << 10, u64::MAX).unwrap() else {
            panic!("a read below the copy threshold came back as file ranges");
        };
        if bytes.is_empty() {
            break;
        }
        for item in BatchIter::new(&bytes) {
            let (h, batch) = item.unwrap();
            for r in decode_records(&h, batch, 1 << 20).unwrap() {
                let v = std::str::from_utf8(&r.value.unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                out.push((r.offset, h.partition_leader_epoch, v));
            }
            at = h.last_offset() + 1;
        }
    }
    out
}

impl Sim {
    fn new(durable: bool) -> Sim {
        let controller = Controller::default();
        let mut records: Vec<MetadataRecord> = (1..=BROKERS)
            .map(|id| MetadataRecord::RegisterBroker {
                broker_id: id,
                host: "h".into(),
                port: 9000 + id,
                rack: None,
            })
            .collect();
        let (image, _) = MetadataImage::empty().apply(0, &records);
        let spec = CreateTopicSpec {
            name: TOPIC.into(),
            topic_id: [1; 16],
            num_partitions: 1,
            replication_factor: BROKERS as i16,
            configs: Default::default(),
        };
        records = controller.create_topic(&image, &spec).unwrap();
        let (image, _) = image.apply(10, &records);
        let flusher_dir = tempfile::tempdir().unwrap();
        let mut sim = Sim {
            durable,
            power_losses: 0,
            controller,
            image,
            nodes: BTreeMap::new(),
            flusher: Flusher::new(flusher_dir.path()).unwrap(),
            _flusher_dir: flusher_dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap(),
            wire: Vec::new(),
            waiters: Vec::new(),
            acked: BTreeMap::new(),
            next_value: 0,
            now: 0,
            handovers: 0,
            stale_refused: 0,
        };
        for id in 1..=BROKERS {
            let node = Node {
                dir: tempfile::tempdir().unwrap(),
                part: None,
                inc: 0,
                follow: None,
                phase: Phase::Truncate,
                busy: false,
                disk_full: false,
                write_failed: false,
                disk: BTreeMap::new(),
            };
            sim.nodes.insert(id, node);
            sim.open(id);
        }
        sim
    }

    fn state(&self) -> strom_meta::PartitionImage {
        self.image.topic(TOPIC).unwrap().partitions[&0].clone()
    }

    fn role(&self) -> ReplicaRole {
        let p = self.state();
        ReplicaRole {
            leader: p.leader,
            leader_epoch: p.leader_epoch,
            partition_epoch: p.partition_epoch,
            replicas: p.replicas.clone(),
            isr: p.isr.clone(),
            min_isr: MIN_ISR,
        }
    }

    fn part(&self, id: i32) -> Option<Arc<Partition>> {
        self.nodes[&id].part.clone()
    }

    fn node(&mut self, id: i32) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    fn commit(&mut self, records: Vec<MetadataRecord>) {
        if !records.is_empty() {
            let offset = self.image.offset + 1;
            self.image = self.image.apply(offset, &records).0;
        }
    }

    /// The broker starts (or restarts) with the log on its disk and the current metadata, and
    /// its fetcher truncates before it fetches.
    fn open(&mut self, id: i32) {
        let log = Log::open(self.nodes[&id].dir.path(), LogConfig::default(), false).unwrap();
        let part = Arc::new(Partition::new(
            (TOPIC.into(), [1; 16], 0),
            log,
            id,
            ReplicaRole::default(),
            if self.durable { DURABLE } else { LAZY },
            self.flusher.clone(),
        ));
        part.restart_high_watermark_at(0);
        self.node(id).part = Some(part);
        // What recovery kept it made durable (a torn tail is cut and fsynced).
        self.on_disk(id);
        self.apply_metadata(id, true);
    }

    /// Durable mode: the segment files as they are now are on the disk (after an fsync or a
    /// truncation, which fsyncs).
    fn on_disk(&mut self, id: i32) {
        if !self.durable {
            return;
        }
        let mut disk = BTreeMap::new();
        for entry in std::fs::read_dir(self.nodes[&id].dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                disk.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
        self.node(id).disk = disk;
    }

    /// Durable mode: broker `id`'s flusher fsyncs what is written.
    fn flush(&mut self, id: i32) {
        let Some(part) = self.part(id) else { return };
        part.flush_now().unwrap();
        self.on_disk(id);
    }

    /// Broker `id` applies the metadata committed so far (the replica manager's `set_role`,
    /// then the fetcher's new state for a new leader or epoch).
    fn apply_metadata(&mut self, id: i32, restarted: bool) {
        let Some(part) = self.part(id) else { return };
        let role = self.role();
        let changed = part.set_role(role.clone(), self.now) || restarted;
        let node = self.node(id);
        if role.leader == id || role.leader < 0 {
            node.follow = None;
        } else if changed {
            node.follow = Some((role.leader, role.leader_epoch));
            node.phase = Phase::Truncate;
            node.busy = false;
        }
    }

    fn alive(&self, id: i32, inc: u32) -> Option<Arc<Partition>> {
        let n = &self.nodes[&id];
        n.part.clone().filter(|_| n.inc == inc)
    }

    /// `replication::propose_isr`: one change in flight per partition; a fenced replica is
    /// not proposed for the ISR (KIP-841).
    fn propose(&mut self, id: i32, change: IsrChange) {
        let Some(part) = self.part(id) else { return };
        if let IsrChange::Add(r) = change {
            if !self.image.is_live(r) {
                part.isr_add_answered(r);
                return;
            }
        }
        let Some(token) = part.begin_isr_change() else {
            return;
        };
        let role = part.role();
        self.wire.push(Msg::Alter {
            from: id,
            inc: self.nodes[&id].inc,
            token,
            epoch: role.leader_epoch,
            partition_epoch: role.partition_epoch,
            change,
        });
    }

    /// The client sends a record to the leader it knows.
    fn send_produce(&mut self) {
        let leader = self.state().leader;
        if leader < 0 {
            return;
        }
        let value = self.next_value;
        self.next_value += 1;
        let inc = self.nodes[&leader].inc;
        self.wire.push(Msg::Produce {
            to: leader,
            inc,
            value,
        });
    }

    /// The fetcher of `id` sends its next request, unless one is in flight.
    fn fetcher_step(&mut self, id: i32) {
        let Some(part) = self.part(id) else { return };
        let n = &self.nodes[&id];
        let Some((leader, epoch)) = n.follow else {
            return;
        };
        if n.busy {
            return;
        }
        let msg = match n.phase {
            Phase::Truncate => match part.latest_epoch().unwrap() {
                Some(latest) => Msg::EpochQuery {
                    from: id,
                    from_inc: n.inc,
                    to: leader,
                    epoch,
                    latest,
                },
                None => {
                    self.node(id).phase = Phase::Fetch;
                    return;
                }
            },
            Phase::Fetch => Msg::Fetch {
                from: id,
                from_inc: n.inc,
                to: leader,
                epoch,
                offset: part.log_end_offset(),
                durable: part.durable_end(),
                can_write: !n.write_failed,
            },
        };
        self.node(id).busy = true;
        self.wire.push(msg);
    }

    /// A request of `id`'s fetcher (incarnation `inc`, following `leader` in `epoch`) was
    /// lost with its leader: the fetcher tries again, if it still follows them.
    fn request_lost(&mut self, id: i32, inc: u32, leader: i32, epoch: i32) {
        let n = self.node(id);
        if n.inc == inc && n.follow == Some((leader, epoch)) {
            n.busy = false;
        }
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Produce { to, inc, value } => self.on_produce(to, inc, value),
            Msg::Fetch {
                from,
                from_inc,
                to,
                epoch,
                offset,
                durable,
                can_write,
            } => self.on_fetch((from, from_inc), to, epoch, (offset, durable), can_write),
            Msg::FetchAnswer {
                to,
                inc,
                from,
                epoch,
                answer,
            } => self.on_fetch_answer(to, inc, from, epoch, answer),
            Msg::EpochQuery {
                from,
                from_inc,
                to,
                epoch,
                latest,
            } => {
                let Some(part) = self.part(to) else {
                    return self.request_lost(from, from_inc, to, epoch);
                };
                // The leader answers for its own epoch only (FENCED / UNKNOWN_LEADER_EPOCH).
                let answer = part
                    .leads_in(epoch)
                    .then(|| part.end_offset_for_epoch(latest).unwrap());
                self.wire.push(Msg::EpochAnswer {
                    to: from,
                    inc: from_inc,
                    from: to,
                    epoch,
                    answer,
                });
            }
            Msg::EpochAnswer {
                to,
                inc,
                from,
                epoch,
                answer,
            } => self.on_epoch_answer(to, inc, from, epoch, answer),
            Msg::Alter {
                from,
                inc,
                token,
                epoch,
                partition_epoch,
                change,
            } => self.on_alter((from, inc, token), epoch, partition_epoch, change),
            answer @ Msg::AlterAnswer { .. } => self.on_alter_answer(answer),
        }
    }

    fn on_alter_answer(&mut self, answer: Msg) {
        let Msg::AlterAnswer {
            to,
            inc,
            token,
            ref change,
            epoch,
            partition_epoch,
            committed,
        } = answer
        else {
            unreachable!("not an AlterPartition answer: {answer:?}");
        };
        let Some(part) = self.alive(to, inc) else {
            return;
        };
        if !committed {
            self.apply_metadata(to, false);
        } else if part.leads_in(epoch) && part.role().partition_epoch == partition_epoch {
            // Not known to the leader yet: it waits for its metadata (and asks again).
            self.wire.push(answer);
            return;
        }
        part.end_isr_change(token, change.added());
    }

    /// The produce handler: refused unless leading with the ISR at min.insync.replicas; an
    /// append that fails on the storage hands the leadership over.
    fn on_produce(&mut self, to: i32, inc: u32, value: u64) {
        let Some(part) = self.alive(to, inc) else {
            return;
        };
        if !part.is_leader() || part.isr_len() < MIN_ISR {
            return;
        }
        if self.nodes[&to].disk_full {
            self.node(to).write_failed = true;
            if part.isr_len() > 1 {
                self.propose(to, IsrChange::Resign);
            }
            return;
        }
        match part.append(&one_record(value), self.now) {
            Ok(out) => {
                self.node(to).write_failed = false;
                self.waiters.push(Waiter {
                    node: to,
                    inc,
                    base: out.base_offset,
                    end: out.last_offset + 1,
                    epoch: out.leader_epoch,
                    value,
                });
            }
            Err(strom_log::LogError::NotLeader) => {}
            Err(e) => panic!("append failed: {e}"),
        }
    }

    /// The fetch handler, for a follower.
    fn on_fetch(
        &mut self,
        (from, from_inc): (i32, u32),
        to: i32,
        epoch: i32,
        (offset, durable): (i64, i64),
        can_write: bool,
    ) {
        let Some(part) = self.part(to) else {
            return self.request_lost(from, from_inc, to, epoch);
        };
        let answer = if part.leads_in(epoch) {
            let leo = part.log_end_offset();
            assert!(
                offset <= leo,
                "follower {from} fetches at {offset}, past the end {leo} of leader {to} in epoch {epoch}"
            );
            // What counts for the high watermark is what the follower holds durably.
            let progress = follower_progress(offset, Some(durable), leo);
            if let Some(change) = part.record_follower_fetch(from, progress, can_write, self.now) {
                self.propose(to, change);
            }
            let ReadOut::Copied(data) = part
                .read_for_replica(offset, FETCH_BYTES, u64::MAX)
                .unwrap()
            else {
                panic!("a read below the copy threshold came back as file ranges");
            };
            Some((
                Bytes::from(data),
                part.log_end_offset(),
                part.high_watermark(),
            ))
        } else {
            None
        };
        self.wire.push(Msg::FetchAnswer {
            to: from,
            inc: from_inc,
            from: to,
            epoch,
            answer,
        });
    }

    /// The fetcher takes an answer. Its own state moves only if it still follows the leader and
    /// epoch the answer is for; the log only through `as_follower_of`, which checks the role.
    fn on_fetch_answer(
        &mut self,
        to: i32,
        inc: u32,
        from: i32,
        epoch: i32,
        answer: Option<(Bytes, i64, i64)>,
    ) {
        let Some(part) = self.alive(to, inc) else {
            return;
        };
        let current = self.nodes[&to].follow == Some((from, epoch));
        if current {
            self.node(to).busy = false;
        }
        let Some((data, leader_end, leader_hw)) = answer else {
            return;
        };
        if data.is_empty() {
            if current && part.log_end_offset() >= leader_end {
                part.follower_at_leader_end(leader_end);
                self.node(to).write_failed = false;
            }
        } else if self.nodes[&to].disk_full {
            if current {
                self.node(to).write_failed = true;
            }
        } else {
            match part.as_follower_of(from, epoch, |p| p.append_replicated(&data)) {
                None => self.stale_refused += 1,
                Some(Ok(_)) => self.node(to).write_failed = false,
                Some(Err(e)) => panic!("replicated append failed: {e}"),
            }
        }
        if current {
            part.set_leader_hw(leader_hw);
        }
    }

    /// OffsetForLeaderEpoch answered: truncate (KIP-101/279), then fetch once complete.
    fn on_epoch_answer(
        &mut self,
        to: i32,
        inc: u32,
        from: i32,
        epoch: i32,
        answer: Option<(i32, i64)>,
    ) {
        let Some(part) = self.alive(to, inc) else {
            return;
        };
        let current = self.nodes[&to].follow == Some((from, epoch));
        if current {
            self.node(to).busy = false;
        }
        let Some((leader_epoch, leader_end)) = answer else {
            return;
        };
        let own = if leader_epoch >= 0 {
            part.end_offset_for_epoch(leader_epoch).unwrap()
        } else {
            (-1, -1)
        };
        let (cut, complete) =
            truncation_offset(leader_epoch, leader_end, own, part.log_start_offset());
        match part.as_follower_of(from, epoch, |p| p.truncate_to(cut)) {
            None => self.stale_refused += 1,
            Some(r) => {
                r.unwrap();
                self.on_disk(to);
                if complete && current {
                    self.node(to).phase = Phase::Fetch;
                }
            }
        }
    }

    /// The controller takes an AlterPartition (`propose_isr`'s request): the ISR built from
    /// the controller's own state, checked against the epochs the leader sent.
    fn on_alter(
        &mut self,
        (from, inc, token): (i32, u32, u64),
        epoch: i32,
        partition_epoch: i32,
        change: IsrChange,
    ) {
        let state = (from, epoch, partition_epoch);
        let p = self.state();
        let mut isr = p.isr.clone();
        let result = match &change {
            IsrChange::Add(r) if isr.contains(r) => Ok(Vec::new()),
            IsrChange::Add(r) => {
                isr.push(*r);
                self.controller
                    .alter_isr(&self.image, TOPIC, 0, state, &isr, &POLICY)
            }
            IsrChange::Remove(rs) => {
                isr.retain(|r| !rs.contains(r));
                self.controller
                    .alter_isr(&self.image, TOPIC, 0, state, &isr, &POLICY)
            }
            IsrChange::Resign => {
                self.controller
                    .resign_leadership(&self.image, TOPIC, 0, state, &POLICY)
            }
        };
        let committed = match result {
            Ok(records) if records.is_empty() => false,
            Ok(records) => {
                if matches!(change, IsrChange::Resign) {
                    self.handovers += 1;
                }
                self.commit(records);
                true
            }
            Err(_) => false,
        };
        self.wire.push(Msg::AlterAnswer {
            to: from,
            inc,
            token,
            change,
            epoch,
            partition_epoch,
            committed,
        });
    }

    /// acks=all waits (`Partition::wait_replicated`), each polled once: an acknowledgement,
    /// a refusal, or still waiting.
    fn check_waiters(&mut self) {
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            let Some(part) = self.alive(w.node, w.inc) else {
                continue; // the connection went with the broker
            };
            // Polled once: resolved, or still waiting.
            let _rt = self.rt.enter();
            let wait = part.wait_replicated(w.end, MIN_ISR, w.epoch, Duration::from_secs(3600));
            match wait.now_or_never() {
                None => self.waiters.push(w),
                Some(Ok(())) => {
                    let before = self.acked.insert(w.base, w.value);
                    assert!(
                        before.is_none(),
                        "offset {} acknowledged for {} and for {before:?}",
                        w.base,
                        w.value
                    );
                }
                Some(Err(ReplicationWait::Timeout)) => panic!("an hour passed"),
                Some(Err(_)) => {}
            }
        }
    }

    /// The leader's ISR ticker: followers that did not catch up for `LAG_MS` leave.
    fn isr_tick(&mut self, id: i32) {
        let Some(part) = self.part(id) else { return };
        if let Some(keep) = part.shrunk_isr(self.now, LAG_MS) {
            let removed: Vec<i32> = part
                .role()
                .isr
                .into_iter()
                .filter(|r| !keep.contains(r))
                .collect();
            self.propose(id, IsrChange::Remove(removed));
        }
    }

    /// `kill -9`: the process and its connections go (what it had sent stays on the wire);
    /// the controller fences it once its session expires. With `power_loss` (durable mode)
    /// the machine goes too: every segment file is put back to what is on its disk, and
    /// sometimes zeros stand where lost bytes went past it (a size that reached the disk
    /// before the data).
    fn crash(&mut self, id: i32, power_loss: Option<&mut Rng>) {
        let Some(part) = self.node(id).part.take() else {
            return;
        };
        drop(part.take_log());
        if let Some(rng) = power_loss {
            self.power_losses += 1;
            for (path, durable) in &self.nodes[&id].disk {
                let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
                    continue;
                };
                std::fs::write(path, durable).unwrap();
                let durable = durable.len() as u64;
                if len > durable && rng.below(2) == 0 {
                    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                    f.set_len(durable + 1 + rng.below(len - durable)).unwrap();
                }
            }
        }
        let n = self.node(id);
        n.inc += 1;
        n.follow = None;
        n.busy = false;
        let recs = self.controller.fence_broker(&self.image, id, &POLICY);
        self.commit(recs);
    }

    fn restart(&mut self, id: i32) {
        if self.nodes[&id].part.is_some() {
            return;
        }
        self.open(id);
        let recs = self.controller.unfence_broker(&self.image, id, &POLICY);
        self.commit(recs);
    }

    fn check(&self, seed: u64, step: usize) {
        let leader = self.state().leader;
        for (id, n) in &self.nodes {
            let Some(part) = &n.part else { continue };
            let log = contents(part);
            for w in log.windows(2) {
                assert!(
                    w[0].1 <= w[1].1,
                    "seed {seed} step {step}: broker {id} holds a batch of epoch {} at {} after epoch {} at {}",
                    w[1].1,
                    w[1].0,
                    w[0].1,
                    w[0].0
                );
            }
            // Each record lies within its epoch as the epoch cache (OffsetForLeaderEpoch)
            // answers it: a batch of an old epoch appended after a new one began does not.
            for (offset, epoch, _) in &log {
                let (found, end) = part.end_offset_for_epoch(*epoch).unwrap();
                assert!(
                    found == *epoch && *offset < end,
                    "seed {seed} step {step}: broker {id} holds epoch {epoch} at {offset}, but its epoch cache answers {found} ending at {end}"
                );
            }
            if *id != leader {
                continue;
            }
            let values: BTreeMap<i64, u64> = log.iter().map(|(o, _, v)| (*o, *v)).collect();
            for (o, v) in &self.acked {
                assert_eq!(
                    values.get(o),
                    Some(v),
                    "seed {seed} step {step}: acknowledged offset {o} lost or changed on leader {leader}"
                );
            }
        }
    }

    fn trace(&self, what: &str) {
        if std::env::var("SIM_TRACE").is_err() {
            return;
        }
        let p = self.state();
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let part = n.part.as_ref();
                (
                    *id,
                    part.map(|p| (p.log_end_offset(), p.high_watermark())),
                    part.map(|p| {
                        let r = p.role();
                        (r.leader_epoch, r.partition_epoch, r.isr)
                    }),
                    n.follow,
                    n.phase,
                )
            })
            .collect();
        eprintln!(
            "{what}: leader={} epoch={} pepoch={} isr={:?} elr={:?} last={:?} nodes={nodes:?} wire={} acked={:?}",
            p.leader,
            p.leader_epoch,
            p.partition_epoch,
            p.isr,
            p.elr,
            p.last_known_elr,
            self.wire.len(),
            self.acked.keys().collect::<Vec<_>>()
        );
    }

    fn step(&mut self, rng: &mut Rng) {
        self.now += STEP_MS;
        let b = 1 + rng.below(BROKERS as u64) as i32;
        match rng.below(1000) {
            0..100 => self.send_produce(),
            100..600 => {
                if !self.wire.is_empty() {
                    let i = rng.below(self.wire.len() as u64) as usize;
                    let msg = self.wire.swap_remove(i);
                    self.trace(&format!("deliver {msg:?}"));
                    self.deliver(msg);
                }
            }
            600..850 => self.fetcher_step(b),
            850..930 => self.apply_metadata(b, false),
            930..950 => self.isr_tick(b),
            950..958 => {
                // Keep a majority of brokers alive most of the time.
                let alive = self.nodes.values().filter(|n| n.part.is_some()).count();
                if self.durable && rng.below(8) == 0 {
                    // The power goes everywhere at once (a data centre's outage).
                    self.trace("power loss everywhere");
                    for id in 1..=BROKERS {
                        self.crash(id, Some(&mut *rng));
                    }
                } else if alive > 1 {
                    let power_loss = self.durable && rng.below(2) == 0;
                    self.trace(&format!("crash {b} (power loss: {power_loss})"));
                    self.crash(b, power_loss.then_some(&mut *rng))
                }
            }
            958..985 => {
                self.trace(&format!("restart {b}"));
                self.restart(b)
            }
            985..987 => self.node(b).disk_full = true,
            _ => self.node(b).disk_full = false,
        }
        if self.durable {
            for id in 1..=BROKERS {
                if rng.below(FLUSH_ONE_IN) == 0 {
                    self.flush(id);
                }
            }
        }
        self.check_waiters();
    }

    /// Everyone back with room on their disks, every message delivered, every broker on the
    /// latest metadata, followers fetching until nothing changes: every log equals the
    /// leader's and every replica is in the ISR.
    fn converge(&mut self, seed: u64) {
        for b in 1..=BROKERS {
            self.node(b).disk_full = false;
            self.restart(b);
        }
        for _ in 0..2_000 {
            self.now += STEP_MS;
            for msg in std::mem::take(&mut self.wire) {
                self.deliver(msg);
            }
            for b in 1..=BROKERS {
                self.apply_metadata(b, false);
                self.fetcher_step(b);
                self.isr_tick(b);
                if self.durable {
                    self.flush(b);
                }
            }
            self.check_waiters();
            let p = self.state();
            let ends: Vec<i64> = (1..=BROKERS)
                .map(|b| self.part(b).unwrap().log_end_offset())
                .collect();
            if p.leader > 0 && p.isr.len() == BROKERS as usize && ends.iter().all(|e| *e == ends[0])
            {
                break;
            }
        }
        let p = self.state();
        assert!(p.leader > 0, "seed {seed}: no leader at the end: {p:?}");
        assert_eq!(
            p.isr.len(),
            BROKERS as usize,
            "seed {seed}: replicas left out of the ISR: {p:?}"
        );
        let want = contents(&self.part(p.leader).unwrap());
        for b in 1..=BROKERS {
            assert_eq!(
                contents(&self.part(b).unwrap()),
                want,
                "seed {seed}: broker {b} differs from leader {}",
                p.leader
            );
        }
    }
}

/// Runs one schedule (durable mode for odd seeds); returns (records acknowledged, leaderships
/// handed over, late answers the role guard kept out, power losses).
fn run(seed: u64, steps: usize) -> (usize, usize, usize, usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut sim = Sim::new(seed % 2 == 1);
    for step in 0..steps {
        sim.step(&mut rng);
        sim.check(seed, step);
    }
    sim.converge(seed);
    sim.check(seed, steps);
    (
        sim.acked.len(),
        sim.handovers,
        sim.stale_refused,
        sim.power_losses,
    )
}

#[test]
fn random_fault_schedules_lose_no_acknowledged_record() {
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let only: Option<u64> = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok());
    let steps: usize = std::env::var("SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_500);
    let (mut acked, mut handovers, mut refused, mut power_losses) = (0, 0, 0, 0);
    let list: Vec<u64> = match only {
        Some(o) => vec![o],
        None => (0..seeds).collect(),
    };
    for seed in list {
        let (a, h, r, p) = run(seed, steps);
        acked += a;
        handovers += h;
        refused += r;
        power_losses += p;
    }
    eprintln!(
        "{acked} records acknowledged, {handovers} handovers by leaders that could not write, \
         {refused} late answers kept out of a log, {power_losses} power losses"
    );
    if only.is_none() && seeds >= 20 {
        // The schedules reach what they are meant to test.
        assert!(acked > 0, "nothing was acknowledged");
        assert!(handovers > 0, "no leader handed over");
        assert!(
            refused > 0,
            "no answer arrived after its replica's role changed"
        );
        assert!(power_losses > 0, "no crash lost what was not fsynced");
    }
}

/// KIP-101's double failover: a follower that had appended beyond what the new leader has
/// must truncate by leader epoch, not keep its divergent tail nor cut to its high watermark.
#[test]
fn kip101_double_failover_truncates_the_divergent_tail() {
    let mut sim = Sim::new(false);
    let leader = sim.state().leader;
    let others: Vec<i32> = (1..=BROKERS).filter(|b| *b != leader).collect();
    // Two records replicated everywhere and acknowledged.
    for _ in 0..2 {
        sim.send_produce();
        sim.settle(&others);
    }
    assert_eq!(sim.acked.len(), 2);
    // The leader appends a third record only it has, then dies.
    sim.send_produce();
    sim.deliver_all();
    assert_eq!(sim.part(leader).unwrap().log_end_offset(), 3);
    sim.crash(leader, None);
    let new_leader = sim.state().leader;
    assert!(others.contains(&new_leader));
    // The new leader writes different data at the same offset; the third broker follows.
    let third = *others.iter().find(|b| **b != new_leader).unwrap();
    sim.send_produce();
    sim.settle(&others);
    assert_eq!(sim.acked.len(), 3);
    // The old leader comes back: its record at offset 2 (never acknowledged) must go.
    sim.restart(leader);
    sim.settle(&[leader, third]);
    let old = contents(&sim.part(leader).unwrap());
    let now = contents(&sim.part(new_leader).unwrap());
    assert_eq!(old, now);
    assert!(
        !old.iter().any(|(_, _, v)| *v == 2),
        "the divergent record survived"
    );
    sim.check(0, 0);
}

/// The election race: a fetch answer of the old leader that arrives after its follower was
/// elected is not appended (its old-epoch batch would sit inside the new epoch, and
/// OffsetForLeaderEpoch would then answer an end before data the log holds), nor is a
/// truncation answered by the old leader applied.
#[test]
fn an_answer_of_the_old_leader_arriving_after_the_election_stays_out_of_the_log() {
    let mut sim = Sim::new(false);
    let leader = sim.state().leader;
    let others: Vec<i32> = (1..=BROKERS).filter(|b| *b != leader).collect();
    sim.send_produce();
    sim.settle(&others);
    assert_eq!(sim.acked.len(), 1);
    // More records at the leader, and fetch answers carrying them on their way to both
    // followers.
    sim.send_produce();
    sim.deliver_all();
    let mut answers = Vec::new();
    for f in &others {
        sim.fetcher_step(*f);
        let fetch = sim.wire.pop().expect("a fetch");
        sim.deliver(fetch);
        let answer = sim.wire.pop().expect("a fetch answer");
        assert!(matches!(answer, Msg::FetchAnswer { to, answer: Some(_), .. } if to == *f));
        answers.push(answer);
    }
    // The leader steps down (its disk filled up) in favour of a follower; every broker applies
    // the new metadata before the answers arrive.
    sim.node(leader).disk_full = true;
    sim.send_produce();
    sim.deliver_all();
    let new_leader = sim.state().leader;
    assert!(others.contains(&new_leader), "a follower took over");
    for b in 1..=BROKERS {
        sim.apply_metadata(b, false);
    }
    let ends: Vec<i64> = others
        .iter()
        .map(|f| sim.part(*f).unwrap().log_end_offset())
        .collect();
    for answer in answers {
        sim.deliver(answer);
    }
    assert_eq!(sim.stale_refused, 2);
    let after: Vec<i64> = others
        .iter()
        .map(|f| sim.part(*f).unwrap().log_end_offset())
        .collect();
    assert_eq!(after, ends, "a late answer reached a log");
    sim.node(leader).disk_full = false;
    let third = *others.iter().find(|b| **b != new_leader).unwrap();
    sim.send_produce();
    sim.settle(&[leader, third]);
    sim.check(0, 0);
    let want = contents(&sim.part(new_leader).unwrap());
    for b in 1..=BROKERS {
        assert_eq!(contents(&sim.part(b).unwrap()), want, "broker {b}");
    }
}

/// Durable mode (Strom's default): a record is acknowledged only once every replica in the ISR
/// has fsynced it — a follower's fetches count only up to its durable end — so a power loss of
/// every broker at once loses nothing acknowledged.
#[test]
fn durable_mode_acknowledges_only_fsynced_records_and_they_survive_a_power_loss_of_all() {
    let mut sim = Sim::new(true);
    let leader = sim.state().leader;
    let others: Vec<i32> = (1..=BROKERS).filter(|b| *b != leader).collect();
    // A record on the leader's disk and in both followers' page caches: they fetch past it,
    // reporting durable ends before it.
    sim.send_produce();
    sim.deliver_all();
    sim.flush(leader);
    sim.settle(&others);
    for f in &others {
        let part = sim.part(*f).unwrap();
        assert_eq!(part.log_end_offset(), 1, "follower {f} has the record");
        assert_eq!(part.durable_end(), 0, "follower {f} did not fsync it");
    }
    assert!(
        sim.acked.is_empty(),
        "acknowledged before the followers fsynced it"
    );
    // Once they fsync it, their next fetches acknowledge it.
    for f in &others {
        sim.flush(*f);
    }
    sim.settle(&others);
    assert_eq!(sim.acked.len(), 1);
    // A second record, fsynced by the leader only, then the power goes everywhere: every
    // file back to what its disk has (zeros past it on some).
    sim.send_produce();
    sim.deliver_all();
    sim.flush(leader);
    sim.settle(&others);
    assert_eq!(sim.acked.len(), 1);
    let mut rng = Rng(7);
    for b in 1..=BROKERS {
        sim.crash(b, Some(&mut rng));
    }
    // Each recovers what its disk has: the leader both records, the followers the first.
    for b in 1..=BROKERS {
        sim.restart(b);
        let want = if b == leader { 2 } else { 1 };
        assert_eq!(sim.part(b).unwrap().log_end_offset(), want, "broker {b}");
    }
    // With the flusher running: the acknowledged record is on every replica, in the same logs
    // everywhere.
    sim.converge(0);
    sim.check(0, 0);
    for b in 1..=BROKERS {
        let log = contents(&sim.part(b).unwrap());
        assert_eq!(
            log.first().map(|(o, _, v)| (*o, *v)),
            Some((0, 0)),
            "broker {b}"
        );
    }
}

impl Sim {
    /// Delivers what is on the wire and what that sends, in order, for a few rounds (an
    /// answer its leader cannot take yet goes back on the wire).
    fn deliver_all(&mut self) {
        for _ in 0..20 {
            if self.wire.is_empty() {
                break;
            }
            for msg in std::mem::take(&mut self.wire) {
                self.deliver(msg);
            }
        }
        self.check_waiters();
    }

    /// Every broker on the latest metadata, the followers `fs` fetching until nothing moves.
    fn settle(&mut self, fs: &[i32]) {
        for _ in 0..50 {
            self.now += STEP_MS;
            for b in 1..=BROKERS {
                self.apply_metadata(b, false);
            }
            for f in fs {
                self.fetcher_step(*f);
            }
            self.deliver_all();
        }
    }
}
