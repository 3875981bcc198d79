//! Idempotent-producer state of one partition (Kafka's ProducerStateManager): per producer id
//! its epoch and the last five batches' sequence ranges and offsets, so that a retried batch is
//! answered with its original offsets and a gap in sequences is refused. Snapshotted to a file
//! on segment roll and clean close, and rebuilt from batch headers past the snapshot on open.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;

use strom_proto::batch::{increment_sequence, BatchHeader};

/// Batches remembered per producer (Kafka's `NUM_BATCHES_TO_RETAIN`).
pub const BATCHES_TO_RETAIN: usize = 5;
/// Upper bound on producers in a snapshot we are willing to load.
const MAX_SNAPSHOT_PRODUCERS: usize = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append it.
    Accept,
    /// Already appended: answer with these offsets and write nothing.
    Duplicate(BatchMeta),
    OutOfOrder {
        expected: i32,
        got: i32,
    },
    StaleEpoch {
        current: i16,
        got: i16,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerState {
    pub producers: HashMap<i64, ProducerEntry>,
}

impl ProducerState {
    pub fn check(&self, h: &BatchHeader) -> SequenceCheck {
        if h.producer_id < 0 || h.base_sequence < 0 {
            return SequenceCheck::Accept;
        }
        let Some(entry) = self.producers.get(&h.producer_id) else {
            // Unknown producer (new, or its state expired): any sequence starts it (KIP-360).
            return SequenceCheck::Accept;
        };
        if h.producer_epoch < entry.epoch {
            return SequenceCheck::StaleEpoch {
                current: entry.epoch,
                got: h.producer_epoch,
            };
        }
        if h.producer_epoch > entry.epoch {
            return if h.base_sequence == 0 {
                SequenceCheck::Accept
            } else {
                SequenceCheck::OutOfOrder {
                    expected: 0,
                    got: h.base_sequence,
                }
            };
        }
        let last_seq = h.last_sequence();
        if let Some(b) = entry
            .batches
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq)
        {
            return SequenceCheck::Duplicate(*b);
        }
        match entry.batches.back() {
            None => SequenceCheck::Accept,
            Some(last) => {
                let expected = increment_sequence(last.last_seq, 1);
                if h.base_sequence == expected {
                    SequenceCheck::Accept
                } else {
                    SequenceCheck::OutOfOrder {
                        expected,
                        got: h.base_sequence,
                    }
                }
            }
        }
    }

    /// Records an appended batch (its base offset already assigned).
    pub fn update(&mut self, h: &BatchHeader) {
        if h.producer_id < 0 || h.base_sequence < 0 {
            return;
        }
        let entry = self.producers.entry(h.producer_id).or_default();
        if h.producer_epoch != entry.epoch {
            entry.epoch = h.producer_epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(BatchMeta {
            first_seq: h.base_sequence,
            last_seq: h.last_sequence(),
            first_offset: h.base_offset,
            last_offset: h.last_offset(),
        });
        while entry.batches.len() > BATCHES_TO_RETAIN {
            entry.batches.pop_front();
        }
    }

    /// Snapshot file: `[next_offset i64][count u32]` then per producer
    /// `[pid i64][epoch i16][n u8]` + n × `[first_seq i32][last_seq i32][first_off i64][last_off i64]`,
    /// then a CRC-32C of everything before it. Written to a temp file, fsynced, renamed.
    pub fn write_snapshot(&self, path: &Path, next_offset: i64) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(16 + self.producers.len() * 64);
        b.extend_from_slice(&next_offset.to_be_bytes());
        b.extend_from_slice(&(self.producers.len() as u32).to_be_bytes());
        for (pid, e) in &self.producers {
            b.extend_from_slice(&pid.to_be_bytes());
            b.extend_from_slice(&e.epoch.to_be_bytes());
            b.push(e.batches.len() as u8);
            for m in &e.batches {
                b.extend_from_slice(&m.first_seq.to_be_bytes());
                b.extend_from_slice(&m.last_seq.to_be_bytes());
                b.extend_from_slice(&m.first_offset.to_be_bytes());
                b.extend_from_slice(&m.last_offset.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&b)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Loads a snapshot; `None` if missing or damaged (the caller then replays the log).
    pub fn read_snapshot(path: &Path) -> Option<(ProducerState, i64)> {
        let b = std::fs::read(path).ok()?;
        if b.len() < 16 {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut pos = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = body.get(pos..pos + n)?;
            pos += n;
            Some(s)
        };
        let next_offset = i64::from_be_bytes(take(8)?.try_into().ok()?);
        let count = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        if count > MAX_SNAPSHOT_PRODUCERS {
            return None;
        }
        let mut state = ProducerState::default();
        for _ in 0..count {
            let pid = i64::from_be_bytes(take(8)?.try_into().ok()?);
            let epoch = i16::from_be_bytes(take(2)?.try_into().ok()?);
            let n = take(1)?[0] as usize;
            let mut batches = VecDeque::with_capacity(n.min(BATCHES_TO_RETAIN));
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    first_seq: i32::from_be_bytes(take(4)?.try_into().ok()?),
                    last_seq: i32::from_be_bytes(take(4)?.try_into().ok()?),
                    first_offset: i64::from_be_bytes(take(8)?.try_into().ok()?),
                    last_offset: i64::from_be_bytes(take(8)?.try_into().ok()?),
                });
            }
            state
                .producers
                .insert(pid, ProducerEntry { epoch, batches });
        }
        Some((state, next_offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pid: i64, epoch: i16, seq: i32, n: i32, base: i64) -> BatchHeader {
        BatchHeader {
            base_offset: base,
            batch_length: 0,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: n - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: n,
        }
    }

    #[test]
    fn sequence_rules() {
        let mut s = ProducerState::default();
        assert_eq!(
            s.check(&h(1, 0, 7, 3, 0)),
            SequenceCheck::Accept,
            "unknown producer starts anywhere"
        );
        s.update(&h(1, 0, 0, 3, 0));
        assert_eq!(s.check(&h(1, 0, 3, 2, 3)), SequenceCheck::Accept);
        s.update(&h(1, 0, 3, 2, 3));
        assert!(matches!(
            s.check(&h(1, 0, 0, 3, 99)),
            SequenceCheck::Duplicate(BatchMeta {
                first_offset: 0,
                ..
            })
        ));
        assert_eq!(
            s.check(&h(1, 0, 9, 1, 9)),
            SequenceCheck::OutOfOrder {
                expected: 5,
                got: 9
            }
        );
        assert!(matches!(
            s.check(&h(1, 1, 4, 1, 9)),
            SequenceCheck::OutOfOrder { .. }
        ));
        assert_eq!(s.check(&h(1, 1, 0, 1, 9)), SequenceCheck::Accept);
        s.update(&h(1, 1, 0, 1, 9));
        assert!(matches!(
            s.check(&h(1, 0, 5, 1, 9)),
            SequenceCheck::StaleEpoch { .. }
        ));
        for i in 0..10 {
            s.update(&h(1, 1, 1 + i, 1, 10 + i as i64));
        }
        assert_eq!(s.producers[&1].batches.len(), BATCHES_TO_RETAIN);
    }

    #[test]
    fn sequences_wrap() {
        let mut s = ProducerState::default();
        s.update(&h(2, 0, i32::MAX - 1, 2, 0));
        assert_eq!(s.check(&h(2, 0, 0, 1, 2)), SequenceCheck::Accept);
    }

    #[test]
    fn snapshot_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("producer-state");
        let mut s = ProducerState::default();
        s.update(&h(1, 3, 0, 3, 0));
        s.update(&h(5, 0, 10, 1, 3));
        s.write_snapshot(&path, 4).unwrap();
        assert_eq!(ProducerState::read_snapshot(&path), Some((s, 4)));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(ProducerState::read_snapshot(&path), None);
    }
}
