//! Incremental fetch sessions (KIP-227). A client that opens a session (epoch 0) sends its
//! partition list once; later requests carry only partitions whose fetch position changed, and
//! responses only partitions with news (records, or a changed high watermark, log start offset
//! or error). The cache is bounded (`max.incremental.fetch.session.cache.slots`); when full,
//! the least recently used session is evicted and its client falls back to a full fetch.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

/// A partition in a session, keyed by topic id (v13+) or name, plus the partition index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub topic_id: [u8; 16],
    pub topic: String,
    pub partition: i32,
}

#[derive(Debug, Clone)]
pub struct SessionPartition {
    pub fetch_offset: i64,
    pub max_bytes: i32,
    /// What the last response said, to decide whether the next one must include it.
    pub last_hw: i64,
    pub last_log_start: i64,
    pub last_error: i16,
}

struct Session {
    next_epoch: i32,
    partitions: Vec<(SessionKey, SessionPartition)>,
    last_used: Instant,
}

pub struct FetchSessionCache {
    max_slots: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    sessions: HashMap<i32, Session>,
    next_id: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SessionError {
    NotFound,
    InvalidEpoch,
}

pub fn next_epoch(epoch: i32) -> i32 {
    if epoch == i32::MAX {
        1
    } else {
        epoch + 1
    }
}

impl FetchSessionCache {
    pub fn new(max_slots: usize) -> Self {
        FetchSessionCache {
            max_slots,
            inner: Mutex::new(Inner {
                sessions: HashMap::new(),
                next_id: 1,
            }),
        }
    }

    pub fn remove(&self, id: i32) {
        self.inner.lock().sessions.remove(&id);
    }

    /// Creates a session over `partitions`; returns its id, or 0 when sessions are disabled.
    pub fn create(&self, partitions: Vec<(SessionKey, SessionPartition)>) -> i32 {
        if self.max_slots == 0 {
            return 0;
        }
        let mut inner = self.inner.lock();
        if inner.sessions.len() >= self.max_slots {
            if let Some(oldest) = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id)
            {
                inner.sessions.remove(&oldest);
            }
        }
        let mut id = inner.next_id;
        while id <= 0 || inner.sessions.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        inner.next_id = id.wrapping_add(1);
        inner.sessions.insert(
            id,
            Session {
                next_epoch: 1,
                partitions,
                last_used: Instant::now(),
            },
        );
        id
    }

    /// Applies an incremental request: checks the epoch, adds or updates the partitions the
    /// request names, drops the forgotten ones, and returns the whole fetch set.
    pub fn update(
        &self,
        id: i32,
        epoch: i32,
        updates: Vec<(SessionKey, i64, i32)>,
        forgotten: &[SessionKey],
    ) -> Result<Vec<(SessionKey, SessionPartition)>, SessionError> {
        let mut inner = self.inner.lock();
        let session = inner.sessions.get_mut(&id).ok_or(SessionError::NotFound)?;
        if session.next_epoch != epoch {
            return Err(SessionError::InvalidEpoch);
        }
        session.next_epoch = next_epoch(epoch);
        session.last_used = Instant::now();
        session.partitions.retain(|(k, _)| !forgotten.contains(k));
        for (key, offset, max_bytes) in updates {
            match session.partitions.iter_mut().find(|(k, _)| *k == key) {
                Some((_, p)) => {
                    p.fetch_offset = offset;
                    p.max_bytes = max_bytes;
                }
                None => session.partitions.push((
                    key,
                    SessionPartition {
                        fetch_offset: offset,
                        max_bytes,
                        last_hw: -1,
                        last_log_start: -1,
                        last_error: -1,
                    },
                )),
            }
        }
        Ok(session.partitions.clone())
    }

    /// Records what a response told the client about each partition.
    pub fn record_sent(&self, id: i32, sent: &[(SessionKey, i64, i64, i16)]) {
        let mut inner = self.inner.lock();
        let Some(session) = inner.sessions.get_mut(&id) else {
            return;
        };
        for (key, hw, log_start, error) in sent {
            if let Some((_, p)) = session.partitions.iter_mut().find(|(k, _)| k == key) {
                p.last_hw = *hw;
                p.last_log_start = *log_start;
                p.last_error = *error;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> SessionKey {
        SessionKey {
            topic_id: [1; 16],
            topic: "t".into(),
            partition: p,
        }
    }

    fn part(offset: i64) -> SessionPartition {
        SessionPartition {
            fetch_offset: offset,
            max_bytes: 100,
            last_hw: -1,
            last_log_start: -1,
            last_error: -1,
        }
    }

    #[test]
    fn epochs_updates_and_forgotten_partitions() {
        let cache = FetchSessionCache::new(10);
        let id = cache.create(vec![(key(0), part(0)), (key(1), part(0))]);
        assert!(id > 0);
        assert_eq!(
            cache.update(id, 2, vec![], &[]).unwrap_err(),
            SessionError::InvalidEpoch
        );
        let set = cache
            .update(id, 1, vec![(key(0), 5, 100)], &[key(1)])
            .unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].1.fetch_offset, 5);
        let set = cache.update(id, 2, vec![(key(2), 7, 100)], &[]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(
            cache.update(999, 1, vec![], &[]).unwrap_err(),
            SessionError::NotFound
        );
    }

    #[test]
    fn cache_is_bounded() {
        let cache = FetchSessionCache::new(2);
        let a = cache.create(vec![]);
        let _b = cache.create(vec![]);
        let _c = cache.create(vec![]);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.update(a, 1, vec![], &[]).unwrap_err(),
            SessionError::NotFound
        );
        assert_eq!(FetchSessionCache::new(0).create(vec![]), 0);
    }
}
