//! One partition as the broker sees it: the log (its single owner, behind a mutex held only for
//! an append or a read), the replica offsets (log end offset, high watermark, leader epoch), the
//! group commit that makes appends durable, and the notification that wakes long-poll fetches.
//!
//! Replication: the leader tracks each follower's log end offset (the offset of its fetches,
//! which followers send only for data they have fsynced) and the high watermark is the lowest
//! durable log end offset of the ISR. A follower's high watermark is the leader's, capped at
//! what it has itself made durable.
//!
//! Durability: with `flush.messages` = 1 (Strom's default) the high watermark is the flushed
//! offset, so a consumer never sees a record that a crash could take back, and an acks>=1
//! produce is answered only once its records are fsynced. Concurrent producers, on all
//! partitions, share each fsync through the broker's `Flusher`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use strom_log::cleaner::CleanTarget;
use strom_log::{AppendOutcome, FlushTarget, Log, LogConfig, LogError, ReadOut};
use tokio::sync::{watch, Notify};

use crate::flusher::Flusher;
use crate::replication::IsrChange;

/// The leader's high watermark: the lowest durable log end offset across the ISR (`None` while
/// an ISR follower has not fetched in this leader epoch, so nothing is known of its log).
pub fn leader_high_watermark(
    leader_durable: i64,
    leader: i32,
    isr: &[i32],
    followers: &HashMap<i32, FollowerState>,
) -> Option<i64> {
    let mut hw = leader_durable;
    for r in isr.iter().filter(|r| **r != leader) {
        match followers.get(r) {
            Some(s) if s.log_end_offset >= 0 => hw = hw.min(s.log_end_offset),
            _ => return None,
        }
    }
    Some(hw)
}

/// Why an acks=all produce was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationWait {
    NotLeader,
    NotEnoughReplicasAfterAppend,
    Timeout,
}

/// This replica's view of the partition's assignment, from the metadata image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaRole {
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    /// The topic's min.insync.replicas: below it the high watermark stands still (KIP-966).
    pub min_isr: usize,
}

/// What the leader knows of one follower.
#[derive(Debug, Clone, Copy)]
pub struct FollowerState {
    /// Offset of the follower's last fetch (-1 until it fetched in this leader epoch).
    pub log_end_offset: i64,
    /// Last time the follower's fetch reached the leader's log end offset.
    pub last_caught_up_ms: i64,
    /// The leader's log end offset and the time at the follower's previous fetch (Kafka's
    /// `lastFetchLeaderLogEndOffset`): a follower that reaches what the leader had then was
    /// caught up then, even if the leader has moved on since, as it always does under load.
    pub last_fetch_leader_leo: i64,
    pub last_fetch_ms: i64,
}

impl FollowerState {
    /// Nothing known of the follower's log yet; counted as caught up at `now_ms`.
    pub fn new(now_ms: i64) -> FollowerState {
        FollowerState {
            log_end_offset: -1,
            last_caught_up_ms: now_ms,
            last_fetch_leader_leo: -1,
            last_fetch_ms: now_ms,
        }
    }
}

pub struct Partition {
    pub topic: String,
    pub topic_id: [u8; 16],
    pub index: i32,
    /// `None` once the partition was closed or deleted; later calls fail cleanly.
    log: Mutex<Option<Log>>,
    /// The log was taken out (`take_log`): waiters check it without the log's lock, which an
    /// append of a large batch holds for a while.
    closed: AtomicBool,
    high_watermark: AtomicI64,
    log_end_offset: AtomicI64,
    log_start_offset: AtomicI64,
    leader_epoch: AtomicI32,
    /// 1 = durable mode (fsync before ack); larger = lazy flushing.
    flush_messages: AtomicI64,
    flush_ms: AtomicI64,
    /// (flushed offset, failed rounds): waiters watch it.
    flush_state: watch::Sender<(i64, u64)>,
    flush_queued: AtomicBool,
    flusher: Arc<Flusher>,
    /// Woken whenever the high watermark moves.
    pub hw_advanced: Notify,
    /// Segments below this offset were compacted since the broker started (dirty-ratio base).
    pub cleaned_through: AtomicI64,
    /// This broker's node id.
    local_id: i32,
    role: RwLock<ReplicaRole>,
    /// Leader: what each follower has fetched.
    followers: Mutex<HashMap<i32, FollowerState>>,
    /// Follower: the leader's high watermark from its last fetch response.
    leader_hw: AtomicI64,
    /// Leader: an ISR change is on its way to the controller (`begin_isr_change`).
    isr_change_pending: AtomicBool,
    /// Leader: the token of the ISR change on its way. A role change bumps it: the answer to
    /// a proposal it superseded then changes nothing (a later proposal may be on its way).
    isr_change_token: AtomicU64,
    /// Leader: the replica it asked the controller to add to the ISR (-1: none). Until the
    /// answer it counts toward the high watermark (KIP-497's "maximal ISR"): otherwise the
    /// high watermark could pass records the joining replica lacks, and once admitted it could
    /// be elected without them.
    pending_isr_add: AtomicI32,
    /// Leader: where its leader epoch began (its log end at the election). A follower joins
    /// the ISR only once it holds everything before it (Kafka's `leaderEpochStartOffset`).
    epoch_start_offset: AtomicI64,
    /// Woken on every append (replica fetches long-poll on it).
    pub appended: Notify,
    /// Woken when the role changes or the log is taken out: writes waiting for their fsync
    /// or replication re-check that they still may be acknowledged.
    role_changed: Notify,
    /// The last append to this log failed on its storage (a full or failing disk) and none
    /// has succeeded since. A follower says so in its fetches
    /// (`replication::WRITE_FAILED_TAG`): the leader keeps it out of the ISR meanwhile.
    write_failed: AtomicBool,
}

impl Partition {
    pub fn new(
        (topic, topic_id, index): (String, [u8; 16], i32),
        log: Log,
        local_id: i32,
        role: ReplicaRole,
        (flush_messages, flush_ms): (i64, i64),
        flusher: Arc<Flusher>,
    ) -> Self {
        let leader_epoch = role.leader_epoch;
        let leo = log.log_end_offset();
        let flushed = log.flushed_offset().min(leo);
        let lazy = flush_messages > 1;
        Partition {
            topic,
            topic_id,
            index,
            high_watermark: AtomicI64::new(if lazy { leo } else { flushed }),
            log_end_offset: AtomicI64::new(leo),
            log_start_offset: AtomicI64::new(log.log_start_offset()),
            leader_epoch: AtomicI32::new(leader_epoch),
            flush_messages: AtomicI64::new(flush_messages.max(1)),
            flush_ms: AtomicI64::new(flush_ms),
            flush_state: watch::channel((flushed, 0)).0,
            flush_queued: AtomicBool::new(false),
            flusher,
            hw_advanced: Notify::new(),
            cleaned_through: AtomicI64::new(0),
            local_id,
            followers: Mutex::new(HashMap::new()),
            role: RwLock::new(role),
            leader_hw: AtomicI64::new(-1),
            isr_change_pending: AtomicBool::new(false),
            isr_change_token: AtomicU64::new(0),
            pending_isr_add: AtomicI32::new(-1),
            epoch_start_offset: AtomicI64::new(leo),
            appended: Notify::new(),
            role_changed: Notify::new(),
            write_failed: AtomicBool::new(false),
            log: Mutex::new(Some(log)),
            closed: AtomicBool::new(false),
        }
    }

    pub fn role(&self) -> ReplicaRole {
        self.role.read().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.role.read().leader == self.local_id
    }

    /// Whether this replica leads in leader epoch `epoch`: then nothing it appended in that
    /// epoch was truncated (a leader never truncates; it must follow, in a later epoch, first).
    pub fn leads_in(&self, epoch: i32) -> bool {
        let role = self.role.read();
        role.leader == self.local_id && role.leader_epoch == epoch
    }

    /// The log was closed or deleted (`take_log`).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A replica of this partition that is not its leader.
    pub fn is_follower(&self) -> bool {
        let role = self.role.read();
        role.leader != self.local_id && role.replicas.contains(&self.local_id)
    }

    pub fn isr_len(&self) -> usize {
        self.role.read().isr.len()
    }

    /// A new assignment from the metadata image. Returns true when this replica's leadership
    /// changed (became leader or follower, or a new leader epoch), which the caller acts on.
    pub fn set_role(&self, role: ReplicaRole, now_ms: i64) -> bool {
        let mut current = self.role.write();
        if *current == role {
            return false;
        }
        let changed = current.leader != role.leader || current.leader_epoch != role.leader_epoch;
        if role.leader == self.local_id && changed {
            // Kafka records the new epoch's start at election (KIP-101/279).
            match self.with_log(|log| {
                log.start_leader_epoch(role.leader_epoch)?;
                Ok(log.log_end_offset())
            }) {
                Ok(start) => self.epoch_start_offset.store(start, Ordering::Release),
                Err(e) => {
                    tracing::error!(topic = %self.topic, partition = self.index, error = %e, "recording the leader epoch failed")
                }
            }
            // A new leader epoch starts with no knowledge of the followers (Kafka: -1) but
            // treats the ISR as caught up now, so nobody is dropped before it could fetch.
            let mut f = self.followers.lock();
            f.clear();
            for r in role.replicas.iter().filter(|r| **r != self.local_id) {
                f.insert(*r, FollowerState::new(now_ms));
            }
        }
        self.leader_epoch
            .store(role.leader_epoch, Ordering::Release);
        self.isr_change_pending.store(false, Ordering::Release);
        self.isr_change_token.fetch_add(1, Ordering::AcqRel);
        self.pending_isr_add.store(-1, Ordering::Release);
        *current = role;
        drop(current);
        self.maybe_advance_hw();
        // Waiters (acks=all, long polls) re-check their conditions under the new role.
        self.hw_advanced.notify_waiters();
        self.appended.notify_waiters();
        self.role_changed.notify_waiters();
        changed
    }

    /// Leader: a follower fetched and holds everything below `fetch_offset` durably (the
    /// fetch offset, or less when the fetch says its durable end lags: see
    /// `replication::DURABLE_END_TAG`). Returns the ISR change the leader should propose:
    /// adding a follower that caught up, or removing at once one that says it cannot write
    /// (`can_write` false: `replication::WRITE_FAILED_TAG`). What such a follower holds still
    /// counts toward the high watermark, but it is never caught up: it would hold every
    /// acks=all write back for `replica.lag.time.max.ms`.
    pub fn record_follower_fetch(
        &self,
        replica: i32,
        fetch_offset: i64,
        can_write: bool,
        now_ms: i64,
    ) -> Option<IsrChange> {
        {
            let role = self.role.read();
            if role.leader != self.local_id || !role.replicas.contains(&replica) {
                return None;
            }
        }
        let leo = self.log_end_offset();
        if fetch_offset > leo {
            // A follower that has not truncated its divergent tail yet: it proves nothing.
            return None;
        }
        {
            let mut f = self.followers.lock();
            let st = f.entry(replica).or_insert(FollowerState::new(0));
            st.log_end_offset = fetch_offset;
            if !can_write {
                // Not caught up, however far it got.
            } else if fetch_offset >= leo {
                st.last_caught_up_ms = now_ms;
            } else if st.last_fetch_leader_leo >= 0 && fetch_offset >= st.last_fetch_leader_leo {
                st.last_caught_up_ms = st.last_caught_up_ms.max(st.last_fetch_ms);
            }
            st.last_fetch_leader_leo = leo;
            st.last_fetch_ms = now_ms;
        }
        self.maybe_advance_hw();
        // KIP-497 / Kafka: a follower rejoins the ISR once it has caught up to the high
        // watermark and to the start of this leader epoch. The high watermark alone is not
        // enough: a new leader's may lag what its predecessor acknowledged (a follower learns
        // it a fetch late; after a restart it is a checkpoint's), and a follower admitted
        // without records acknowledged before the election could be elected next without them.
        let role = self.role.read();
        if !can_write {
            return role
                .isr
                .contains(&replica)
                .then(|| IsrChange::Remove(vec![replica]));
        }
        if !role.isr.contains(&replica)
            && fetch_offset >= self.high_watermark()
            && fetch_offset >= self.epoch_start_offset.load(Ordering::Acquire)
        {
            // From this decision on the replica counts toward the high watermark.
            let _ = self.pending_isr_add.compare_exchange(
                -1,
                replica,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return Some(IsrChange::Add(replica));
        }
        None
    }

    /// Leader: starts an ISR change, unless one is on its way; the token ends it
    /// (`end_isr_change`).
    pub fn begin_isr_change(&self) -> Option<u64> {
        let _role = self.role.read();
        if self.isr_change_pending.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(self.isr_change_token.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Leader: the ISR change `token` was answered (`added`: the replica it asked to add, which
    /// stops counting toward the high watermark unless the ISR has it now). Nothing happens if
    /// a role change superseded it: that dropped what it had pending, and a later proposal —
    /// for the same replica, say — may be on its way, whose pending expansion must keep counting
    /// until its own answer.
    pub fn end_isr_change(&self, token: u64, added: Option<i32>) {
        {
            let _role = self.role.read();
            if self.isr_change_token.load(Ordering::Acquire) != token {
                return;
            }
            if let Some(r) = added {
                self.forget_pending_add(r);
            }
            self.isr_change_pending.store(false, Ordering::Release);
        }
        self.maybe_advance_hw();
    }

    /// Leader: an ISR expansion it will not propose (the replica is fenced): the replica
    /// stops counting toward the high watermark unless the ISR has it.
    pub fn isr_add_answered(&self, replica: i32) {
        self.forget_pending_add(replica);
        self.maybe_advance_hw();
    }

    /// `replica` stops counting toward the high watermark as a pending ISR expansion (unless
    /// another replica's is pending now).
    fn forget_pending_add(&self, replica: i32) {
        let _ =
            self.pending_isr_add
                .compare_exchange(replica, -1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Leader: the ISR without followers that have not caught up for `lag_max_ms`.
    pub fn shrunk_isr(&self, now_ms: i64, lag_max_ms: i64) -> Option<Vec<i32>> {
        let role = self.role.read().clone();
        if role.leader != self.local_id {
            return None;
        }
        let f = self.followers.lock();
        let keep: Vec<i32> = role
            .isr
            .iter()
            .copied()
            .filter(|r| {
                *r == self.local_id
                    || f.get(r)
                        .is_some_and(|s| now_ms.saturating_sub(s.last_caught_up_ms) <= lag_max_ms)
            })
            .collect();
        (keep.len() < role.isr.len()).then_some(keep)
    }

    /// Follower: the leader's high watermark from a fetch response.
    pub fn set_leader_hw(&self, hw: i64) {
        self.leader_hw.fetch_max(hw, Ordering::AcqRel);
        self.maybe_advance_hw();
    }

    /// Moves the high watermark as far as the replicas allow: the leader takes the lowest
    /// durable log end of the ISR; a follower the leader's high watermark capped at its own
    /// durable end.
    pub fn maybe_advance_hw(&self) {
        let durable = self.durable_end();
        let role = self.role.read();
        if role.leader == self.local_id && role.isr.len() < role.min_isr {
            // KIP-966: what is written while the ISR is short is not committed, so replicas
            // that left the ISR (the ELR) keep everything committed and may lead.
            return;
        }
        let hw = if role.leader == self.local_id {
            let pending = self.pending_isr_add.load(Ordering::Acquire);
            let maximal;
            let isr = if pending >= 0 && !role.isr.contains(&pending) {
                maximal = role
                    .isr
                    .iter()
                    .copied()
                    .chain([pending])
                    .collect::<Vec<_>>();
                &maximal
            } else {
                &role.isr
            };
            match leader_high_watermark(durable, self.local_id, isr, &self.followers.lock()) {
                Some(hw) => hw,
                None => return,
            }
        } else {
            durable.min(self.leader_hw.load(Ordering::Acquire))
        };
        drop(role);
        if hw > self.high_watermark() {
            self.advance_hw(hw);
        }
    }

    /// A replica opened in a replicated cluster starts from its checkpointed high watermark
    /// (kept within its log), before anything waits on it.
    pub fn restart_high_watermark_at(&self, hw: i64) {
        let hw = hw.min(self.log_end_offset()).max(self.log_start_offset());
        self.high_watermark.store(hw, Ordering::Release);
    }

    /// acks=all: resolves once the high watermark covers `end_offset`, or fails when this
    /// replica stops being the leader, or the ISR fell below `min_isr` (Kafka's
    /// NOT_ENOUGH_REPLICAS_AFTER_APPEND), or the request timed out.
    pub async fn wait_replicated(
        &self,
        end_offset: i64,
        min_isr: usize,
        epoch: i32,
        timeout: std::time::Duration,
    ) -> Result<(), ReplicationWait> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.hw_advanced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Appended in `epoch`: a replica that stopped leading since may have truncated
            // the records and been given others at the same offsets (even if it leads again).
            if !self.leads_in(epoch) {
                return Err(ReplicationWait::NotLeader);
            }
            if self.high_watermark() >= end_offset {
                if self.isr_len() < min_isr {
                    return Err(ReplicationWait::NotEnoughReplicasAfterAppend);
                }
                return Ok(());
            }
            if self.is_closed() {
                return Err(ReplicationWait::NotLeader);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return Err(ReplicationWait::Timeout),
            }
        }
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }
    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset.load(Ordering::Acquire)
    }
    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.load(Ordering::Acquire)
    }
    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }
    /// The end of what this replica holds durably: fsynced, or (when the flush policy does
    /// not fsync every write) all of the log.
    pub fn durable_end(&self) -> i64 {
        if self.is_durable_mode() {
            self.flush_state.borrow().0
        } else {
            self.log_end_offset()
        }
        .min(self.log_end_offset())
    }

    pub fn is_durable_mode(&self) -> bool {
        self.flush_messages.load(Ordering::Relaxed) <= 1
    }

    pub fn set_flush_policy(&self, flush_messages: i64, flush_ms: i64) {
        self.flush_messages
            .store(flush_messages.max(1), Ordering::Relaxed);
        self.flush_ms.store(flush_ms, Ordering::Relaxed);
    }

    pub fn set_log_config(&self, config: LogConfig) {
        let _ = self.with_log(|log| {
            log.set_config(config);
            Ok(())
        });
    }

    /// Where the next replicated batch would start in its segment file; `None` for a closed
    /// log, or while another task holds the log (the fetcher reading an answer does not wait).
    pub fn append_position(&self) -> Option<u64> {
        self.log
            .try_lock()?
            .as_ref()
            .map(|log| log.append_position())
    }

    fn with_log<T>(&self, f: impl FnOnce(&mut Log) -> Result<T, LogError>) -> Result<T, LogError> {
        match self.log.lock().as_mut() {
            Some(log) => match f(log) {
                Err(LogError::SyncFailed(e)) => crate::flusher::halt_on_fsync_failure(&e),
                r => r,
            },
            None => Err(LogError::Failed),
        }
    }

    fn advance_hw(&self, to: i64) {
        let prev = self.high_watermark.fetch_max(to, Ordering::AcqRel);
        // Invariant: the high watermark never passes the log end offset.
        debug_assert!(to <= self.log_end_offset());
        if to > prev {
            self.hw_advanced.notify_waiters();
        }
    }

    /// Appends one produce request's records. Durability is awaited separately
    /// (`wait_durable`), so that the append itself happens in request order.
    /// It takes place only while this replica leads (`LogError::NotLeader` otherwise), with the
    /// role held: a produce that checked the leadership before an election must not append
    /// after it, under the old epoch, to a log that has started to follow (Kafka appends to a
    /// leader under its leader-and-ISR lock).
    pub fn append(
        self: &Arc<Self>,
        records: &[u8],
        now_ms: i64,
    ) -> Result<AppendOutcome, LogError> {
        let role = self.role.read();
        if role.leader != self.local_id {
            return Err(LogError::NotLeader);
        }
        let epoch = role.leader_epoch;
        let appended = self.with_log(|log| {
            let outcome = log.append(records, epoch, now_ms)?;
            Ok((outcome, log.log_end_offset(), log.unflushed_messages()))
        });
        // Released before anything that takes the role again (`maybe_advance_hw`).
        drop(role);
        let (outcome, leo, unflushed) = appended.inspect_err(|e| self.note_write_failure(e))?;
        if !outcome.duplicate {
            // A retried batch the log already had wrote nothing: it proves nothing.
            self.note_write_success();
        }
        self.log_end_offset.fetch_max(leo, Ordering::AcqRel);
        self.appended.notify_waiters();
        if !self.is_durable_mode() {
            self.maybe_advance_hw();
            if unflushed as i64 >= self.flush_messages.load(Ordering::Relaxed) {
                self.spawn_flush();
            }
        }
        Ok(outcome)
    }

    /// Resolves once every offset below `end_offset` is on disk (durable mode), or at once in
    /// lazy mode. A failed fsync fails every waiter of that round.
    /// `leading`: the leader epoch a leader appended these records in. The wait then ends
    /// with `NotLeader` as soon as the replica no longer leads in that epoch: as a follower it
    /// may truncate them, and what its log later holds at those offsets is not what was
    /// appended (Kafka completes a waiting produce with NOT_LEADER_OR_FOLLOWER when the
    /// leadership changes). Any wait ends once the log is closed or deleted (a reassignment
    /// moved it away): no fsync of it follows — a leader's with `NotLeader` too, any other with
    /// `Failed`.
    pub async fn wait_durable(
        self: &Arc<Self>,
        end_offset: i64,
        leading: Option<i32>,
    ) -> Result<(), LogError> {
        if !self.is_durable_mode() {
            return Ok(());
        }
        let mut rx = self.flush_state.subscribe();
        let failures_before = rx.borrow().1;
        if rx.borrow().0 >= end_offset && leading.is_none_or(|e| self.leads_in(e)) {
            return Ok(());
        }
        self.spawn_flush();
        loop {
            let role_changed = self.role_changed.notified();
            tokio::pin!(role_changed);
            role_changed.as_mut().enable();
            if leading.is_some_and(|e| !self.leads_in(e)) {
                return Err(LogError::NotLeader);
            }
            let (flushed, failures) = *rx.borrow_and_update();
            if flushed >= end_offset {
                return Ok(());
            }
            if failures != failures_before {
                return Err(LogError::Io(std::io::Error::other("fsync failed")));
            }
            if self.is_closed() {
                return Err(match leading {
                    Some(_) => LogError::NotLeader,
                    None => LogError::Failed,
                });
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(LogError::Failed);
                    }
                }
                _ = role_changed => {}
            }
        }
    }

    /// Queues this partition for the flusher's next round (at most once at a time).
    pub fn spawn_flush(self: &Arc<Self>) {
        if !self.flush_queued.swap(true, Ordering::AcqRel) {
            self.flusher.enqueue(self.clone());
        }
    }

    pub(crate) fn clear_queued(&self) {
        self.flush_queued.store(false, Ordering::Release);
    }

    pub(crate) fn flush_target(&self) -> Result<Option<FlushTarget>, LogError> {
        self.with_log(|log| log.flush_target())
    }

    /// The flusher's fsync of `target` succeeded (`None`: nothing was dirty). The durable end
    /// moves under the log's lock, so that a truncation that overtook the fsync (the log cut,
    /// then written again past the cut) is seen and nothing written since counts as durable.
    pub(crate) fn flush_done(&self, target: Option<FlushTarget>) {
        let _ = self.with_log(|log| {
            let durable = match &target {
                Some(t) if log.mark_flushed(t) => t.end_offset,
                _ => log.flushed_offset(),
            };
            self.flush_state.send_modify(|s| s.0 = s.0.max(durable));
            Ok(())
        });
        self.maybe_advance_hw();
    }

    /// The flusher's work for this partition, done at once on the calling thread: fsync what
    /// is written and move the durable end. For tests that play the flusher themselves (the
    /// replication simulation); the broker queues partitions for its flusher instead.
    #[doc(hidden)]
    pub fn flush_now(&self) -> Result<(), LogError> {
        let target = self.flush_target()?;
        if let Some(t) = &target {
            t.sync().map_err(LogError::SyncFailed)?;
        }
        self.flush_done(target);
        Ok(())
    }

    pub(crate) fn flush_failed(&self) {
        self.flush_state.send_modify(|s| s.1 += 1);
    }

    /// Lazy mode: flush when `flush.ms` has passed since the last flush. Called by a ticker.
    pub fn flush_if_due(self: &Arc<Self>, now_ms: i64) {
        if self.is_durable_mode() {
            return;
        }
        let Ok((unflushed, last)) =
            self.with_log(|log| Ok((log.unflushed_messages(), log.last_flush_ms())))
        else {
            return;
        };
        let flush_ms = self.flush_ms.load(Ordering::Relaxed);
        if unflushed > 0 && now_ms.saturating_sub(last) >= flush_ms {
            self.spawn_flush();
        }
    }

    /// Reads whole batches for a fetch: nothing at or above the high watermark. Reads of at
    /// least `copy_below` bytes come back as ranges of the segment files, sent from there.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one_batch: bool,
        copy_below: u64,
    ) -> Result<ReadOut, LogError> {
        let hw = self.high_watermark();
        self.with_log(|log| log.read_files(offset, max_bytes, hw, min_one_batch, copy_below))
    }

    /// A follower's fetch: whole batches up to the log end offset (followers replicate what
    /// is not yet committed).
    pub fn read_for_replica(
        &self,
        offset: i64,
        max_bytes: usize,
        copy_below: u64,
    ) -> Result<ReadOut, LogError> {
        self.with_log(|log| {
            let leo = log.log_end_offset();
            log.read_files(offset, max_bytes, leo, true, copy_below)
        })
    }

    /// Whether the last append failed on the storage (`write_failed`).
    pub fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
    }

    /// Clears `write_failed`, writing the shared flag only when it was set (every append
    /// passes here).
    fn note_write_success(&self) {
        if self.write_failed.load(Ordering::Relaxed) {
            self.write_failed.store(false, Ordering::Release);
        }
    }

    /// An append failed: on the storage (an i/o error, or a log offline for writes after one)
    /// — not a closed log (`Failed` too), nor the client's or the leader's data.
    fn note_write_failure(&self, e: &LogError) {
        let storage = match e {
            LogError::Io(_) => true,
            LogError::Failed => self.log.lock().is_some(),
            _ => false,
        };
        if storage {
            self.write_failed.store(true, Ordering::Release);
        }
    }

    /// Follower: a fetch found nothing more at the leader, and this log ends where the
    /// leader's does. Nothing is waiting to be written, so nothing failed: `write_failed`
    /// clears and the replica may rejoin the ISR (it holds everything); the next write decides
    /// again. Otherwise a replica whose failed write was cut off by a leader change, or that
    /// resigned the leadership and so has everything, stays out of the ISR for good whenever
    /// no data comes (acks=all refused while the ISR is below min.insync.replicas).
    pub fn follower_at_leader_end(&self, leader_log_end: i64) {
        if self.log_end_offset() >= leader_log_end {
            self.note_write_success();
        }
    }

    /// Follower: `f` runs only while this replica follows `leader` in leader epoch `epoch`,
    /// with the role held so that no other role takes effect meanwhile (Kafka appends and
    /// truncates as a follower under its leader-and-ISR lock). A fetch answer that arrives
    /// after this replica was elected, or moved to another leader or epoch, must not touch the
    /// log: a batch of epoch 3 appended after this replica started epoch 4 as leader would sit
    /// inside epoch 4, and OffsetForLeaderEpoch(3) would then answer an end before it (seen as
    /// a consumer going back over records it had). `None`: it no longer follows them. `f` must
    /// not take the role itself (no `maybe_advance_hw`).
    pub fn as_follower_of<T>(
        &self,
        leader: i32,
        epoch: i32,
        f: impl FnOnce(&Self) -> T,
    ) -> Option<T> {
        let role = self.role.read();
        if role.leader != leader || role.leader_epoch != epoch || leader == self.local_id {
            return None;
        }
        Some(f(self))
    }

    /// Follower: appends what the leader's fetch returned, keeping its offsets and epochs.
    /// Durability is awaited separately (`wait_durable`).
    /// A fetch answer placed at its file position (`append_position`) is written without a
    /// copy.
    pub fn append_replicated(
        &self,
        data: &bytes::Bytes,
    ) -> Result<strom_log::ReplicatedAppend, LogError> {
        let out = self
            .with_log(|log| log.append_replicated_shared(data))
            .inspect_err(|e| self.note_write_failure(e))?;
        if out.appended_batches > 0 {
            self.note_write_success();
        }
        self.log_end_offset
            .fetch_max(out.log_end_offset, Ordering::AcqRel);
        self.appended.notify_waiters();
        Ok(out)
    }

    /// Follower: drops everything at or after `offset` (a divergent tail, KIP-101).
    pub fn truncate_to(&self, offset: i64) -> Result<(), LogError> {
        // The offsets follow under the log's lock (see `flush_done`).
        self.with_log(|log| {
            log.truncate_to(offset)?;
            self.cut_offsets(log.log_end_offset());
            Ok(())
        })
    }

    /// Follower whose log ends below the leader's log start: start over at `offset`.
    pub fn truncate_fully_and_start_at(&self, offset: i64) -> Result<(), LogError> {
        self.with_log(|log| {
            log.truncate_fully_and_start_at(offset)?;
            self.log_start_offset.store(offset, Ordering::Release);
            self.cut_offsets(offset);
            self.high_watermark.store(offset, Ordering::Release);
            Ok(())
        })
    }

    fn cut_offsets(&self, leo: i64) {
        self.log_end_offset.store(leo, Ordering::Release);
        self.flush_state.send_modify(|s| s.0 = s.0.min(leo));
        let hw = self.high_watermark().min(leo);
        self.high_watermark.store(hw, Ordering::Release);
    }

    /// OffsetForLeaderEpoch (KIP-101/279): the largest epoch <= `epoch` and where it ends.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Result<(i32, i64), LogError> {
        self.with_log(|log| Ok(log.end_offset_for_epoch(epoch)))
    }

    pub fn latest_epoch(&self) -> Result<Option<i32>, LogError> {
        self.with_log(|log| Ok(log.latest_epoch()))
    }

    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<(i64, i64)>, LogError> {
        self.with_log(|log| log.offset_for_timestamp(ts_ms))
    }

    pub fn max_timestamp_and_offset(&self) -> Result<Option<(i64, i64)>, LogError> {
        self.with_log(|log| log.max_timestamp_and_offset())
    }

    /// Deletes the segments retention allows (a background check).
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize, LogError> {
        let (n, start) = self.with_log(|log| {
            let n = log.apply_retention(now_ms)?;
            Ok((n, log.log_start_offset()))
        })?;
        self.log_start_offset.fetch_max(start, Ordering::AcqRel);
        Ok(n)
    }

    /// Segments the cleaner may compact: not the active one, fully below the high watermark,
    /// newest record at least `min_lag_ms` old.
    pub fn clean_targets(
        &self,
        now_ms: i64,
        min_lag_ms: i64,
    ) -> Result<Vec<CleanTarget>, LogError> {
        let hw = self.high_watermark();
        let mut t = self.with_log(|log| Ok(log.clean_targets(now_ms, min_lag_ms)))?;
        t.retain(|s| s.next_offset <= hw);
        Ok(t)
    }

    /// Swaps in a cleaned segment (a short critical section: renames and an index walk).
    pub fn install_cleaned(
        &self,
        base_offset: i64,
        path: &std::path::Path,
    ) -> Result<bool, LogError> {
        self.with_log(|log| log.install_cleaned(base_offset, path))
    }

    /// DeleteRecords: records below `offset` (-1: the high watermark) become unreachable.
    /// Returns the new log start offset.
    pub fn delete_records(&self, offset: i64) -> Result<i64, LogError> {
        let hw = self.high_watermark();
        let offset = if offset == -1 { hw } else { offset };
        let start = self.with_log(|log| log.delete_records_before(offset, hw))?;
        self.log_start_offset.fetch_max(start, Ordering::AcqRel);
        Ok(start)
    }

    /// Takes the log out to close or delete it; every later call on this partition fails with
    /// a storage error, which requests still holding the partition report to their client.
    pub fn take_log(&self) -> Option<Log> {
        let log = self.log.lock().take();
        self.closed.store(true, Ordering::Release);
        // No fsync of it follows: writes waiting for one end now (`wait_durable`).
        self.role_changed.notify_waiters();
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use strom_proto::compression::Compression;
    use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};

    fn batch() -> Vec<u8> {
        let r = NewRecord {
            key: None,
            value: Some(b"v".to_vec()),
            headers: Vec::new(),
            timestamp: 1_700_000_000_000,
        };
        encode_batch(&[r], Compression::None, ProducerInfo::default()).unwrap()
    }

    /// A leader of [1, 2, 3] with ISR [1, 2] (lazy flushing, so its own end counts at once).
    fn leader(dir: &std::path::Path) -> Arc<Partition> {
        leader_flushing(dir, (i64::MAX, i64::MAX))
    }

    /// `leader` with the flush policy `(flush.messages, flush.ms)`.
    fn leader_flushing(dir: &std::path::Path, flush: (i64, i64)) -> Arc<Partition> {
        let log = Log::open(&dir.join("t-0"), LogConfig::default(), false).unwrap();
        let part = Arc::new(Partition::new(
            ("t".into(), [1; 16], 0),
            log,
            1,
            ReplicaRole::default(),
            flush,
            Flusher::new(dir).unwrap(),
        ));
        part.set_role(
            ReplicaRole {
                leader: 1,
                leader_epoch: 0,
                partition_epoch: 0,
                replicas: vec![1, 2, 3],
                isr: vec![1, 2],
                min_isr: 1,
            },
            0,
        );
        part
    }

    fn append(part: &Arc<Partition>, n: usize) {
        for _ in 0..n {
            part.append(&batch(), 0).unwrap();
        }
    }

    /// A replica that fsyncs every write: an fsync that a truncation overtook (the log cut and
    /// written again past the cut meanwhile) does not make the rewritten range durable.
    #[test]
    fn a_truncation_during_an_fsync_keeps_the_rewritten_range_out_of_the_durable_end() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader_flushing(dir.path(), (1, i64::MAX));
        assert!(part.is_durable_mode());
        append(&part, 10);
        let target = part.flush_target().unwrap().unwrap();
        part.truncate_to(3).unwrap();
        append(&part, 10);
        assert_eq!(part.log_end_offset(), 13);
        target.sync().unwrap();
        part.flush_done(Some(target));
        assert_eq!(part.durable_end(), 0);
        let again = part.flush_target().unwrap().unwrap();
        again.sync().unwrap();
        part.flush_done(Some(again));
        assert_eq!(part.durable_end(), 13);
    }

    #[test]
    fn a_replica_joining_the_isr_holds_the_high_watermark_until_answered() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        append(&part, 10);
        assert_eq!(part.record_follower_fetch(2, 10, true, 0), None);
        assert_eq!(part.high_watermark(), 10);
        // Replica 3 caught up: the leader proposes it for the ISR.
        assert_eq!(
            part.record_follower_fetch(3, 10, true, 0),
            Some(IsrChange::Add(3))
        );
        append(&part, 5);
        part.record_follower_fetch(2, 15, true, 0);
        assert_eq!(
            part.high_watermark(),
            10,
            "committed past what the joining replica holds"
        );
        part.record_follower_fetch(3, 15, true, 0);
        assert_eq!(part.high_watermark(), 15);
        // Proposed again, then refused: it stops counting.
        append(&part, 5);
        part.record_follower_fetch(3, 15, true, 0);
        part.record_follower_fetch(2, 20, true, 0);
        assert_eq!(part.high_watermark(), 15);
        part.isr_add_answered(3);
        assert_eq!(part.high_watermark(), 20);
    }

    /// The answer to an ISR expansion that a role change superseded (its task still on its
    /// way) must not end the next proposal for the same replica: that replica keeps counting
    /// toward the high watermark until its own answer, or the high watermark could pass
    /// records it lacks while the controller puts it in the ISR.
    #[test]
    fn the_answer_to_a_superseded_isr_change_leaves_the_next_one_counting() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path()); // ISR [1, 2] of replicas [1, 2, 3]
        append(&part, 10);
        part.record_follower_fetch(2, 10, true, 0);
        assert_eq!(
            part.record_follower_fetch(3, 10, true, 0),
            Some(IsrChange::Add(3))
        );
        let first = part.begin_isr_change().unwrap();
        assert_eq!(part.begin_isr_change(), None, "one change at a time");
        // The metadata moves on (another change: a new partition epoch, 3 still out).
        let mut moved = part.role();
        moved.partition_epoch += 1;
        part.set_role(moved, 0);
        assert_eq!(
            part.record_follower_fetch(3, 10, true, 0),
            Some(IsrChange::Add(3))
        );
        let second = part.begin_isr_change().unwrap();
        part.end_isr_change(first, Some(3));
        append(&part, 5);
        part.record_follower_fetch(2, 15, true, 0);
        assert_eq!(part.high_watermark(), 10, "3 stopped counting too early");
        assert_eq!(
            part.begin_isr_change(),
            None,
            "the second change is on its way"
        );
        part.end_isr_change(second, Some(3));
        assert_eq!(part.high_watermark(), 15);
    }

    /// A leader elected with a high watermark behind its log (a follower learns the leader's a
    /// fetch late; a restarted replica starts from its checkpoint) admits a follower to the ISR
    /// only once it reached the start of the new epoch: past the high watermark alone it could
    /// lack records acknowledged before the election, and be elected next without them.
    #[test]
    fn a_follower_joins_the_isr_only_past_the_start_of_the_leader_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        append(&part, 10);
        part.set_role(role(2, 1), 0);
        part.restart_high_watermark_at(5);
        let mut elected = role(1, 2);
        elected.isr = vec![1, 2];
        part.set_role(elected, 0);
        assert_eq!(part.high_watermark(), 5);
        assert_eq!(part.record_follower_fetch(3, 7, true, 0), None);
        assert_eq!(
            part.record_follower_fetch(3, 10, true, 0),
            Some(IsrChange::Add(3))
        );
    }

    /// Writes race elections: a produce that found this replica leading must not append once
    /// it follows (its old-epoch batch would sit in the middle of a log that then fetches past
    /// it), and a fetch answer of the leader it followed must not be appended, nor truncate
    /// anything, once it leads (the batch would sit inside its new epoch).
    #[test]
    fn the_log_takes_no_write_meant_for_a_role_the_replica_no_longer_has() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        append(&part, 10);
        part.set_role(role(2, 1), 0);
        assert!(matches!(part.append(&batch(), 0), Err(LogError::NotLeader)));
        assert_eq!(part.log_end_offset(), 10);
        assert!(part.as_follower_of(2, 1, |_| ()).is_some());
        assert!(
            part.as_follower_of(2, 0, |_| ()).is_none(),
            "an older epoch"
        );
        assert!(
            part.as_follower_of(3, 1, |_| ()).is_none(),
            "another leader"
        );
        // Elected in epoch 2: what the leader of epoch 1 sent stays out.
        part.set_role(role(1, 2), 0);
        let mut replicated = batch();
        replicated[..8].copy_from_slice(&10i64.to_be_bytes());
        let data = bytes::Bytes::from(replicated);
        assert!(part
            .as_follower_of(2, 1, |p| p.append_replicated(&data))
            .is_none());
        assert!(part.as_follower_of(2, 1, |p| p.truncate_to(5)).is_none());
        assert_eq!(part.log_end_offset(), 10);
        assert_eq!(part.end_offset_for_epoch(0).unwrap(), (0, 10));
        part.append(&batch(), 0).unwrap();
        assert_eq!(part.log_end_offset(), 11);
    }

    fn role(leader: i32, leader_epoch: i32) -> ReplicaRole {
        ReplicaRole {
            leader,
            leader_epoch,
            replicas: vec![1, 2, 3],
            isr: vec![1, 2, 3],
            min_isr: 1,
            ..ReplicaRole::default()
        }
    }

    /// Resolves `wait` or fails the test: a write that waits for ever holds its client's
    /// connection (an idempotent producer waits for it before it moves to a new leader).
    async fn ends<T>(wait: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the wait never ended")
            .unwrap()
    }

    /// A durable-mode write whose fsync is in a flusher round already, and a task waiting for
    /// it (`leading`: the epoch it was appended in, as a produce waits).
    async fn waiting_for_fsync(
        part: &Arc<Partition>,
        leading: Option<i32>,
    ) -> (FlushTarget, tokio::task::JoinHandle<Result<(), LogError>>) {
        append(part, 3);
        // The flusher's round has taken the partition off its queue and its target.
        part.flush_queued.store(true, Ordering::Release);
        let target = part.flush_target().unwrap().unwrap();
        let waiter = tokio::spawn({
            let part = part.clone();
            async move { part.wait_durable(3, leading).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        (target, waiter)
    }

    /// A partition reassigned away deletes its log while a write waits for its fsync: the
    /// round's fsync marks nothing on a log that is gone, so the wait must end by itself (it
    /// hung, and with it the old leader's answer to an idempotent producer, which then did not
    /// move to the new leader for a minute).
    #[tokio::test]
    async fn a_write_waiting_for_its_fsync_ends_when_its_log_is_deleted() {
        for (leading, deleted) in [(Some(0), "NotLeader"), (None, "Failed")] {
            let dir = tempfile::tempdir().unwrap();
            let part = leader_flushing(dir.path(), (1, i64::MAX));
            let (target, waiter) = waiting_for_fsync(&part, leading).await;
            let log = part.take_log().unwrap();
            target.sync().unwrap();
            part.flush_done(Some(target));
            let ended = ends(waiter).await;
            assert!(
                matches!(
                    (&ended, deleted),
                    (Err(LogError::NotLeader), "NotLeader") | (Err(LogError::Failed), "Failed")
                ),
                "{ended:?}"
            );
            log.delete().unwrap();
        }
    }

    /// A leader that loses its leadership while a write waits for its fsync answers
    /// NOT_LEADER_OR_FOLLOWER at once (as Kafka completes a waiting produce), rather than
    /// after an fsync of records it may have truncated as a follower by then.
    #[tokio::test]
    async fn a_write_waiting_for_its_fsync_is_refused_once_its_leader_epoch_ends() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader_flushing(dir.path(), (1, i64::MAX));
        let (_target, waiter) = waiting_for_fsync(&part, Some(0)).await;
        part.set_role(role(2, 1), 0);
        assert!(matches!(ends(waiter).await, Err(LogError::NotLeader)));
    }

    /// An acks=all write appended in epoch 0 is not acknowledged in epoch 2 even if the
    /// replica leads again and the high watermark passed its offsets: in between it followed,
    /// could truncate them and take the other leader's records at the same offsets.
    #[tokio::test]
    async fn a_replicated_write_is_not_acknowledged_by_a_later_leadership() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        let outcome = part.append(&batch(), 0).unwrap();
        assert_eq!(outcome.leader_epoch, 0);
        let end = outcome.last_offset + 1;
        let wait = Duration::from_secs(5);
        part.set_role(role(2, 1), 0);
        part.set_role(role(1, 2), 0);
        part.record_follower_fetch(2, end, true, 0);
        part.record_follower_fetch(3, end, true, 0);
        assert!(part.high_watermark() >= end);
        assert!(matches!(
            part.wait_replicated(end, 1, 0, wait).await,
            Err(ReplicationWait::NotLeader)
        ));
        assert_eq!(part.wait_replicated(end, 1, 2, wait).await, Ok(()));
    }

    #[test]
    fn a_follower_that_reaches_the_previous_log_end_stays_in_sync_under_load() {
        // Kafka's lastFetchLeaderLogEndOffset rule: under constant load every fetch is behind
        // the leader's current end, but each reaches what the leader had at the fetch before.
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        let lag_max = 1_000;
        let mut now = 0;
        let mut offset = 0;
        for _ in 0..50 {
            append(&part, 3);
            now += 100;
            part.record_follower_fetch(2, offset, true, now);
            offset = part.log_end_offset();
            append(&part, 1); // the leader moves on before the next fetch arrives
        }
        assert_eq!(part.shrunk_isr(now + 500, lag_max), None);
        // A follower that stops making progress falls out once the lag time has passed.
        for _ in 0..20 {
            append(&part, 1);
            now += 100;
            part.record_follower_fetch(2, offset, true, now);
        }
        assert_eq!(part.shrunk_isr(now, lag_max), Some(vec![1]));
    }

    #[test]
    fn a_follower_that_cannot_write_leaves_the_isr_at_once_and_is_proposed_again_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path()); // ISR [1, 2] of replicas [1, 2, 3]
        append(&part, 10);
        // Fully caught up, but its disk is full: out of the ISR now, not after the lag time.
        assert_eq!(
            part.record_follower_fetch(2, 10, false, 0),
            Some(IsrChange::Remove(vec![2]))
        );
        // What it holds still counts until the ISR changes.
        assert_eq!(part.high_watermark(), 10);
        // Such fetches do not count as caught up either: past the lag time it is dropped.
        assert_eq!(
            part.record_follower_fetch(2, 10, false, 5_000),
            Some(IsrChange::Remove(vec![2]))
        );
        assert_eq!(part.shrunk_isr(5_000, 1_000), Some(vec![1]));
        // Not in the ISR (replica 3), caught up but unable to write: it is not proposed.
        assert_eq!(part.record_follower_fetch(3, 10, false, 0), None);
        // It can write again: proposed as soon as it holds the high watermark.
        assert_eq!(
            part.record_follower_fetch(3, 10, true, 0),
            Some(IsrChange::Add(3))
        );
    }

    #[test]
    fn a_failed_write_is_remembered_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let part = leader(dir.path());
        append(&part, 1);
        assert!(!part.write_failed());
        part.note_write_failure(&LogError::MessageTooLarge { size: 2, max: 1 });
        assert!(!part.write_failed(), "the client's error, not the disk's");
        part.note_write_failure(&LogError::Io(std::io::Error::from_raw_os_error(28)));
        assert!(part.write_failed());
        append(&part, 1);
        assert!(!part.write_failed());

        // A follower at the leader's end has nothing waiting to be written: it clears; one
        // still behind does not.
        part.note_write_failure(&LogError::Failed);
        assert!(part.write_failed());
        part.follower_at_leader_end(part.log_end_offset() + 1);
        assert!(part.write_failed());
        part.follower_at_leader_end(part.log_end_offset());
        assert!(!part.write_failed());

        // A closed log is not a failed disk.
        let _log = part.take_log();
        part.note_write_failure(&LogError::Failed);
        assert!(!part.write_failed());
    }
}
