//! Replication support: the leader epoch cache.

use super::*;
use strom_proto::batch::compute_crc;

const CHECKPOINT: &str = "leader-epoch-checkpoint";

/// The same batch marked as a control batch (transaction marker), CRC fixed.
fn control(mut b: Vec<u8>) -> Vec<u8> {
    let attrs = i16::from_be_bytes([b[21], b[22]]) | 0x20;
    b[21..23].copy_from_slice(&attrs.to_be_bytes());
    let crc = compute_crc(&b);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

fn checkpoint_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(CHECKPOINT)).unwrap()
}

/// A leader log with batches in epochs 1, 1, 3 (a control batch), 3, 6, 6, ... rolling segments.
fn leader_with_epochs(dir: &Path) -> Log {
    let mut log = Log::open(dir, small_config(), true).unwrap();
    let epochs = [1, 1, 3, 3, 3, 6, 6, 6, 6, 9, 9, 9, 9, 9, 9];
    for (i, &epoch) in epochs.iter().enumerate() {
        let mut b = if i == 2 {
            control(batch(1, 1000 + i as i64, 5))
        } else {
            batch(3, 1000 + i as i64, 120)
        };
        log.append(&mut b, epoch, 0).unwrap();
    }
    log
}

#[test]
fn leader_appends_start_epochs_durably_and_they_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.latest_epoch(), None);
    assert!(!dir.path().join(CHECKPOINT).exists(), "nothing to say yet");
    log.append(&mut batch(2, 0, 10), 0, 0).unwrap();
    log.append(&mut batch(2, 0, 10), 0, 0).unwrap();
    // A new leader's first batch is a transaction marker: it starts the epoch.
    log.append(&mut control(batch(1, 0, 1)), 4, 0).unwrap();
    log.append(&mut batch(3, 0, 10), 4, 0).unwrap();
    // A stale leader's epoch does not go back in time.
    log.append(&mut batch(1, 0, 10), 2, 0).unwrap();
    log.append(&mut batch(1, 0, 10), 7, 0).unwrap();
    let expected = vec![(0, 0), (4, 4), (7, 9)];
    assert_eq!(log.epoch_entries(), expected);
    assert_eq!(log.latest_epoch(), Some(7));
    assert_eq!(
        checkpoint_text(dir.path()),
        "0\n3\n0 0\n4 4\n7 9\n",
        "written with the append, before any close"
    );
    drop(log); // unclean
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.epoch_entries(), expected);
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.epoch_entries(), expected);
    assert_eq!(log.end_offset_for_epoch(4), (4, 9));
    assert_eq!(log.end_offset_for_epoch(7), (7, 10));
}

#[test]
fn end_offset_for_epoch_answers_as_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.end_offset_for_epoch(0), (-1, -1), "empty cache");
    assert_eq!(log.end_offset_for_epoch(-1), (-1, -1));
    // Epoch 2 at 0..=4, epoch 5 at 5..=6, epoch 8 at 7..=9; log end 10.
    for (epoch, n) in [(2, 5), (5, 2), (8, 3)] {
        log.append(&mut batch(n, 0, 1), epoch, 0).unwrap();
    }
    let table = [
        (-1, (-1, -1)),
        (0, (0, 0)),
        (1, (1, 0)),
        (2, (2, 5)),
        (3, (2, 5)),
        (4, (2, 5)),
        (5, (5, 7)),
        (7, (5, 7)),
        (8, (8, 10)),
        (9, (-1, -1)),
        (i32::MAX, (-1, -1)),
    ];
    for (requested, expected) in table {
        assert_eq!(log.end_offset_for_epoch(requested), expected, "{requested}");
    }
}

#[test]
fn a_torn_tail_after_a_new_epoch_drops_that_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
    for _ in 0..5 {
        log.append(&mut batch(2, 0, 30), 1, 0).unwrap();
    }
    log.append(&mut batch(2, 0, 30), 3, 0).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (3, 10)]);
    drop(log); // kill -9 before the last batch reached the disk whole
    let path = dir.path().join("00000000000000000000.log");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), false).unwrap();
    assert_eq!(log.log_end_offset(), 10);
    assert_eq!(log.epoch_entries(), vec![(1, 0)]);
    assert_eq!(checkpoint_text(dir.path()), "0\n1\n1 0\n", "rewritten");
    assert_eq!(log.end_offset_for_epoch(1), (1, 10));
    assert_eq!(log.end_offset_for_epoch(3), (-1, -1));
    log.append(&mut batch(1, 0, 3), 4, 0).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 10)]);
}

#[test]
fn recovery_adds_epochs_of_a_rescanned_tail_missing_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
    log.append(&mut batch(2, 0, 30), 1, 0).unwrap();
    log.append(&mut batch(2, 0, 30), 2, 0).unwrap();
    log.append(&mut batch(2, 0, 30), 5, 0).unwrap();
    drop(log);
    // A checkpoint that lags the data (as a crash between the two could leave).
    std::fs::write(dir.path().join(CHECKPOINT), "0\n1\n1 0\n").unwrap();
    let log = Log::open(dir.path(), LogConfig::default(), false).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (2, 2), (5, 4)]);
    assert_eq!(checkpoint_text(dir.path()), "0\n3\n1 0\n2 2\n5 4\n");
}

#[test]
fn a_missing_or_damaged_checkpoint_is_rebuilt_from_batch_headers() {
    let dir = tempfile::tempdir().unwrap();
    let log = leader_with_epochs(dir.path());
    let expected = log.epoch_entries();
    assert_eq!(expected, vec![(1, 0), (3, 6), (6, 13), (9, 25)]);
    assert!(log.segments.len() > 2);
    drop(log);
    for (damage, clean) in [("missing", false), ("garbage", false), ("missing", true)] {
        let path = dir.path().join(CHECKPOINT);
        match damage {
            "missing" => std::fs::remove_file(&path).unwrap(),
            _ => std::fs::write(&path, "0\n9\n1 0\n").unwrap(),
        }
        let log = Log::open(dir.path(), small_config(), clean).unwrap();
        assert_eq!(log.epoch_entries(), expected, "{damage} clean={clean}");
        assert_eq!(
            EpochCache::read(dir.path()).unwrap().unwrap().entries(),
            &expected[..],
            "written back ({damage})"
        );
        drop(log);
    }
}

#[test]
fn truncate_to_forgets_epochs_from_the_new_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = leader_with_epochs(dir.path());
    log.truncate_to(26).unwrap();
    assert_eq!(log.log_end_offset(), 25, "the batch holding 26 goes whole");
    assert_eq!(log.epoch_entries(), vec![(1, 0), (3, 6), (6, 13)]);
    log.truncate_to(13).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (3, 6)]);
    assert_eq!(log.end_offset_for_epoch(3), (3, 13));
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (3, 6)]);
}

#[test]
fn a_moving_log_start_cuts_the_epoch_cache_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = leader_with_epochs(dir.path());
    let leo = log.log_end_offset();
    // Inside epoch 1: it stays, starting at the new log start.
    log.delete_records_before(4, leo).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 4), (3, 6), (6, 13), (9, 25)]);
    // Exactly at an epoch start: the older epoch goes.
    log.delete_records_before(6, leo).unwrap();
    assert_eq!(log.epoch_entries(), vec![(3, 6), (6, 13), (9, 25)]);
    log.delete_records_before(20, leo).unwrap();
    assert_eq!(log.epoch_entries(), vec![(6, 20), (9, 25)]);
    assert_eq!(log.end_offset_for_epoch(3), (3, 20));
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.epoch_entries(), vec![(6, 20), (9, 25)]);

    // Retention deleting whole segments moves it too.
    let dir = tempfile::tempdir().unwrap();
    let mut log = leader_with_epochs(dir.path());
    log.config.retention_bytes = 1500;
    assert!(log.apply_retention(0).unwrap() > 0);
    let start = log.log_start_offset();
    let entries = log.epoch_entries();
    assert_eq!(entries[0].1, start, "{entries:?}");
    assert!(entries.iter().all(|e| e.1 >= start));
    assert_eq!(
        EpochCache::read(dir.path()).unwrap().unwrap().entries(),
        &entries[..]
    );
}
