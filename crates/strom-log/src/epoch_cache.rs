//! The leader epoch cache of one partition (Kafka's `LeaderEpochFileCache`, KIP-101/KIP-279):
//! for every leader epoch that wrote to this log, the offset its first batch got. Followers ask
//! a leader "where does my epoch end?" (OffsetsForLeaderEpoch) and truncate to the answer, so
//! divergent tails left behind by an old leader are cut at the right place instead of at the
//! high watermark.
//!
//! Entries are `(epoch, start_offset)` with both strictly increasing. The list is tiny and
//! changes rarely (a new leader, a truncation, the log start moving), so it is persisted whole
//! on every change as `leader-epoch-checkpoint`, in Kafka's text format:
//!
//! ```text
//! 0                  <- version
//! 2                  <- number of entries
//! 0 0                <- epoch start_offset
//! 3 1500
//! ```
//!
//! written to a temp file, fsynced, renamed over the old one, and the directory fsynced. This
//! module only holds the list and its file; `Log` decides when it changes.

use std::path::Path;

pub(crate) const CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";
#[cfg(test)]
const CHECKPOINT_TMP_FILE: &str = "leader-epoch-checkpoint.tmp";
const CHECKPOINT_VERSION: i32 = 0;
/// Epoch and offset answered when nothing is known (Kafka's UNDEFINED_EPOCH(_OFFSET)).
pub const UNDEFINED_EPOCH: i32 = -1;
pub const UNDEFINED_EPOCH_OFFSET: i64 = -1;

/// `(epoch, start_offset)` entries, both strictly increasing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<(i32, i64)>,
}

impl EpochCache {
    pub fn entries(&self) -> &[(i32, i64)] {
        &self.entries
    }

    pub fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|e| e.0)
    }

    /// Adds `(epoch, start_offset)` if `epoch` is newer than every cached epoch (negative
    /// epochs, from batches written without one, are ignored). Entries starting at or after
    /// `start_offset` are dropped first so start offsets stay increasing (Kafka's `assign`).
    /// Returns whether anything changed.
    pub fn assign_if_newer(&mut self, epoch: i32, start_offset: i64) -> bool {
        if epoch < 0 || start_offset < 0 || self.latest_epoch().is_some_and(|l| epoch <= l) {
            return false;
        }
        while self.entries.last().is_some_and(|e| e.1 >= start_offset) {
            self.entries.pop();
        }
        self.entries.push((epoch, start_offset));
        true
    }

    /// Drops the entries starting at or after `end_offset` (the log was truncated there).
    pub fn truncate_from_end(&mut self, end_offset: i64) -> bool {
        let keep = self.entries.partition_point(|e| e.1 < end_offset);
        let changed = keep < self.entries.len();
        self.entries.truncate(keep);
        changed
    }

    /// The log now starts at `start_offset`: entries wholly below it go, and the latest entry
    /// at or below it stays with its start raised to `start_offset` (Kafka's
    /// `truncateFromStart`).
    pub fn truncate_from_start(&mut self, start_offset: i64) -> bool {
        let at_or_below = self.entries.partition_point(|e| e.1 <= start_offset);
        if at_or_below == 0 {
            return false;
        }
        let epoch = self.entries[at_or_below - 1].0;
        let changed = at_or_below > 1 || self.entries[0].1 != start_offset;
        self.entries.drain(..at_or_below - 1);
        self.entries[0] = (epoch, start_offset);
        changed
    }

    pub fn clear(&mut self) -> bool {
        let changed = !self.entries.is_empty();
        self.entries.clear();
        changed
    }

    /// Kafka's `LeaderEpochFileCache.endOffsetFor`: the largest epoch <= `requested_epoch` this
    /// log knows, and the offset where the epoch after `requested_epoch` starts (the log end
    /// offset when `requested_epoch` is the latest).
    pub fn end_offset_for(&self, requested_epoch: i32, log_end_offset: i64) -> (i32, i64) {
        if requested_epoch == UNDEFINED_EPOCH {
            return (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET);
        }
        if self.latest_epoch() == Some(requested_epoch) {
            return (requested_epoch, log_end_offset);
        }
        let higher = self.entries.partition_point(|e| e.0 <= requested_epoch);
        let Some(&(_, higher_start)) = self.entries.get(higher) else {
            return (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET);
        };
        match higher.checked_sub(1).map(|i| self.entries[i]) {
            None => (requested_epoch, higher_start),
            Some((floor_epoch, _)) => (floor_epoch, higher_start),
        }
    }

    /// The checkpoint text for these entries.
    pub fn encode(&self) -> String {
        let mut s = format!("{CHECKPOINT_VERSION}\n{}\n", self.entries.len());
        for (epoch, start) in &self.entries {
            s.push_str(&format!("{epoch} {start}\n"));
        }
        s
    }

    /// Parses checkpoint text; the reason it cannot be used otherwise.
    pub fn decode(text: &str) -> Result<EpochCache, String> {
        let mut lines = text.lines();
        let version = lines.next().ok_or("empty checkpoint")?.trim();
        if version != CHECKPOINT_VERSION.to_string() {
            return Err(format!("unsupported checkpoint version {version:?}"));
        }
        let count: usize = lines
            .next()
            .ok_or("missing entry count")?
            .trim()
            .parse()
            .map_err(|_| "bad entry count".to_string())?;
        let mut cache = EpochCache::default();
        for i in 0..count {
            let line = lines
                .next()
                .ok_or_else(|| format!("expected {count} entries, found {i}"))?;
            let mut fields = line.split_whitespace();
            let (Some(epoch), Some(start), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("malformed entry {line:?}"));
            };
            let epoch: i32 = epoch
                .parse()
                .map_err(|_| format!("bad epoch in {line:?}"))?;
            let start: i64 = start
                .parse()
                .map_err(|_| format!("bad start offset in {line:?}"))?;
            if epoch < 0
                || start < 0
                || cache
                    .entries
                    .last()
                    .is_some_and(|&(e, s)| e >= epoch || s >= start)
            {
                return Err(format!("entry {line:?} breaks the ordering"));
            }
            cache.entries.push((epoch, start));
        }
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(format!("more than {count} entries"));
        }
        Ok(cache)
    }

    /// Reads `dir`'s checkpoint: `Ok(None)` if there is none, `Err` (with the reason) if it
    /// cannot be used.
    pub fn read(dir: &Path) -> Result<Option<EpochCache>, String> {
        match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
                EpochCache::decode(&text).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Replaces `dir`'s checkpoint durably: temp file, fsync, rename, directory fsync.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        crate::replace_file(dir, CHECKPOINT_FILE, self.encode().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(entries: &[(i32, i64)]) -> EpochCache {
        EpochCache {
            entries: entries.to_vec(),
        }
    }

    #[test]
    fn end_offset_for_follows_kafka() {
        let c = cache(&[(1, 0), (3, 100), (6, 250)]);
        let leo = 400;
        let table: &[(i32, (i32, i64))] = &[
            (-1, (-1, -1)),  // undefined epoch
            (6, (6, 400)),   // latest: the log end
            (7, (-1, -1)),   // newer than anything: nothing higher
            (100, (-1, -1)), // same
            (0, (0, 0)),     // older than all: requested epoch, first start
            (1, (1, 100)),   // known epoch: its own end is the next start
            (2, (1, 100)),   // unknown, between: floor epoch, next start
            (3, (3, 250)),
            (4, (3, 250)),
            (5, (3, 250)),
            (-5, (-5, 0)), // below -1: no floor, first entry is higher
        ];
        for &(requested, expected) in table {
            assert_eq!(c.end_offset_for(requested, leo), expected, "{requested}");
        }
        let empty = EpochCache::default();
        for requested in [-1, 0, 5] {
            assert_eq!(empty.end_offset_for(requested, leo), (-1, -1));
        }
        let one = cache(&[(4, 10)]);
        assert_eq!(one.end_offset_for(4, 20), (4, 20));
        assert_eq!(one.end_offset_for(3, 20), (3, 10));
        assert_eq!(one.end_offset_for(5, 20), (-1, -1));
    }

    #[test]
    fn assign_only_moves_forward() {
        let mut c = EpochCache::default();
        assert!(!c.assign_if_newer(-1, 0), "no epoch, no entry");
        assert!(c.assign_if_newer(2, 0));
        assert!(!c.assign_if_newer(2, 10), "same epoch");
        assert!(!c.assign_if_newer(1, 10), "older epoch");
        assert!(c.assign_if_newer(5, 10));
        assert_eq!(c.entries(), &[(2, 0), (5, 10)]);
        // A newer epoch at a start that is not past the latest replaces what conflicts.
        assert!(c.assign_if_newer(7, 10));
        assert_eq!(c.entries(), &[(2, 0), (7, 10)]);
    }

    #[test]
    fn truncations() {
        let mut c = cache(&[(1, 0), (3, 100), (6, 250)]);
        assert!(!c.truncate_from_end(251));
        assert!(c.truncate_from_end(250));
        assert_eq!(c.entries(), &[(1, 0), (3, 100)]);
        assert!(!c.truncate_from_start(0), "already starts there");
        assert!(c.truncate_from_start(50));
        assert_eq!(c.entries(), &[(1, 50), (3, 100)]);
        assert!(c.truncate_from_start(100));
        assert_eq!(c.entries(), &[(3, 100)]);
        assert!(!c.truncate_from_start(100));
        assert!(c.truncate_from_start(180));
        assert_eq!(c.entries(), &[(3, 180)]);
        assert!(c.truncate_from_end(0));
        assert!(c.entries().is_empty());
        assert!(!c.truncate_from_start(5));
    }

    #[test]
    fn checkpoint_text_matches_kafka_and_round_trips() {
        let c = cache(&[(0, 0), (3, 1500)]);
        assert_eq!(c.encode(), "0\n2\n0 0\n3 1500\n");
        assert_eq!(EpochCache::decode(&c.encode()).unwrap(), c);
        assert_eq!(EpochCache::decode("0\n0\n").unwrap(), EpochCache::default());
        for bad in [
            "",
            "1\n0\n",
            "0\n2\n0 0\n",
            "0\n1\n0 0\n1 5\n",
            "0\n2\n3 0\n2 5\n",
            "0\n2\n1 5\n2 5\n",
            "0\n1\n0 x\n",
            "0\n1\n0 1 2\n",
            "0\nmany\n",
            "0\n1\n-1 0\n",
        ] {
            assert!(EpochCache::decode(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(EpochCache::read(dir.path()), Ok(None));
        c.write(dir.path()).unwrap();
        assert_eq!(EpochCache::read(dir.path()), Ok(Some(c)));
        assert!(!dir.path().join(CHECKPOINT_TMP_FILE).exists());
        std::fs::write(dir.path().join(CHECKPOINT_FILE), b"0\n7\n").unwrap();
        assert!(EpochCache::read(dir.path()).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign(i32, i64),
        FromEnd(i64),
        FromStart(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0i32..20, 0i64..200).prop_map(|(e, s)| Op::Assign(e, s)),
            (0i64..200).prop_map(Op::FromEnd),
            (0i64..200).prop_map(Op::FromStart),
        ]
    }

    /// `end_offset_for` by a linear scan, straight from the definition.
    fn model_end_offset(entries: &[(i32, i64)], requested: i32, leo: i64) -> (i32, i64) {
        if requested == -1 {
            return (-1, -1);
        }
        if entries.last().map(|e| e.0) == Some(requested) {
            return (requested, leo);
        }
        let Some(higher) = entries.iter().find(|e| e.0 > requested) else {
            return (-1, -1);
        };
        match entries.iter().rev().find(|e| e.0 <= requested) {
            None => (requested, higher.1),
            Some(floor) => (floor.0, higher.1),
        }
    }

    proptest! {
        #[test]
        fn operations_keep_the_cache_ordered(ops in proptest::collection::vec(op(), 0..40)) {
            let mut c = EpochCache::default();
            for op in ops {
                let before = c.clone();
                let changed = match op {
                    Op::Assign(e, s) => c.assign_if_newer(e, s),
                    Op::FromEnd(o) => c.truncate_from_end(o),
                    Op::FromStart(o) => c.truncate_from_start(o),
                };
                prop_assert_eq!(changed, before != c, "change flag is honest");
                for w in c.entries().windows(2) {
                    prop_assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "{:?}", c);
                }
                prop_assert_eq!(EpochCache::decode(&c.encode()).unwrap(), c.clone());
                for requested in -2..22 {
                    prop_assert_eq!(
                        c.end_offset_for(requested, 500),
                        model_end_offset(c.entries(), requested, 500)
                    );
                }
            }
        }
    }
}
