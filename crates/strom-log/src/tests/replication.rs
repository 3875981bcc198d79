//! Replication support: the leader epoch cache, follower appends, truncation of either end.

use super::*;
use proptest::prelude::*;
use strom_proto::batch::{compute_crc, set_base_offset, BatchIter};

const CHECKPOINT: &str = "leader-epoch-checkpoint";

/// The same batch marked as a control batch (transaction marker), CRC fixed.
fn control(mut b: Vec<u8>) -> Vec<u8> {
    let attrs = i16::from_be_bytes([b[21], b[22]]) | 0x20;
    b[21..23].copy_from_slice(&attrs.to_be_bytes());
    let crc = compute_crc(&b);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

fn read_all(log: &Log) -> Vec<u8> {
    log.read(log.log_start_offset(), usize::MAX, i64::MAX, true)
        .unwrap()
}

fn checkpoint_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(CHECKPOINT)).unwrap()
}

/// A leader log with batches in epochs 1, 1, 3 (a control batch), 3, 6, 6, ... rolling segments.
fn leader_with_epochs(dir: &Path) -> Log {
    let mut log = Log::open(dir, small_config(), true).unwrap();
    let epochs = [1, 1, 3, 3, 3, 6, 6, 6, 6, 9, 9, 9, 9, 9, 9];
    for (i, &epoch) in epochs.iter().enumerate() {
        let b = if i == 2 {
            control(batch(1, 1000 + i as i64, 5))
        } else {
            batch(3, 1000 + i as i64, 120)
        };
        log.append(&b, epoch, 0).unwrap();
    }
    log
}

#[test]
fn leader_appends_start_epochs_durably_and_they_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.latest_epoch(), None);
    assert!(!dir.path().join(CHECKPOINT).exists(), "nothing to say yet");
    log.append(&batch(2, 0, 10), 0, 0).unwrap();
    log.append(&batch(2, 0, 10), 0, 0).unwrap();
    // A new leader's first batch is a transaction marker: it starts the epoch.
    log.append(&control(batch(1, 0, 1)), 4, 0).unwrap();
    log.append(&batch(3, 0, 10), 4, 0).unwrap();
    // A stale leader's epoch does not go back in time.
    log.append(&batch(1, 0, 10), 2, 0).unwrap();
    log.append(&batch(1, 0, 10), 7, 0).unwrap();
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
        log.append(&batch(n, 0, 1), epoch, 0).unwrap();
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
        log.append(&batch(2, 0, 30), 1, 0).unwrap();
    }
    log.append(&batch(2, 0, 30), 3, 0).unwrap();
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
    log.append(&batch(1, 0, 3), 4, 0).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 10)]);
}

#[test]
fn recovery_adds_epochs_of_a_rescanned_tail_missing_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
    log.append(&batch(2, 0, 30), 1, 0).unwrap();
    log.append(&batch(2, 0, 30), 2, 0).unwrap();
    log.append(&batch(2, 0, 30), 5, 0).unwrap();
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

#[test]
fn a_follower_stores_the_leaders_batches_byte_for_byte() {
    let leader_dir = tempfile::tempdir().unwrap();
    let mut leader = leader_with_epochs(leader_dir.path());
    let p = ProducerInfo {
        producer_id: 77,
        producer_epoch: 0,
        base_sequence: 0,
    };
    leader
        .append(&batch_with(2, 5, 10, Compression::Zstd, p), 9, 0)
        .unwrap();
    let data = read_all(&leader);
    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = Log::open(follower_dir.path(), small_config(), true).unwrap();
    let out = follower.append_replicated(&data).unwrap();
    assert_eq!(out.appended_batches, 16);
    assert_eq!(out.bytes_consumed, data.len());
    assert_eq!(out.first_offset, Some(0));
    assert_eq!(out.last_offset, Some(leader.log_end_offset() - 1));
    assert_eq!(out.log_end_offset, leader.log_end_offset());
    assert_eq!(read_all(&follower), data);
    assert_eq!(follower.epoch_entries(), leader.epoch_entries());
    assert_eq!(follower.producer_state(), leader.producer_state());
    assert!(follower.segments.len() > 2, "rolled by the same rules");
    assert!(
        follower.unflushed_messages() > 0,
        "no fsync per append: the flush path makes it durable"
    );
    // Fetching the same range again appends nothing.
    let again = follower.append_replicated(&data).unwrap();
    assert_eq!(again.appended_batches, 0);
    assert_eq!(again.bytes_consumed, data.len());
    assert_eq!((again.first_offset, again.last_offset), (None, None));
    // The follower's copy survives an unclean restart intact.
    let t = follower.flush_target().unwrap().unwrap();
    t.sync().unwrap();
    assert!(follower.mark_flushed(&t));
    drop(follower);
    let follower = Log::open(follower_dir.path(), small_config(), false).unwrap();
    assert_eq!(read_all(&follower), data);
    assert_eq!(follower.epoch_entries(), leader.epoch_entries());
    assert_eq!(follower.producer_state(), leader.producer_state());
}

#[test]
fn a_follower_takes_what_the_leader_has_without_sequence_checks() {
    // The leader's producer state expired (or it was a different producer lineage): a sequence
    // the follower would refuse from a client is taken from the leader.
    let p = |seq| ProducerInfo {
        producer_id: 5,
        producer_epoch: 0,
        base_sequence: seq,
    };
    let mut data = batch_with(2, 0, 1, Compression::None, p(0));
    let mut gap = batch_with(1, 0, 1, Compression::None, p(10));
    set_base_offset(&mut gap, 2);
    data.extend_from_slice(&gap);
    let dir = tempfile::tempdir().unwrap();
    let mut follower = Log::open(dir.path(), small_config(), true).unwrap();
    let out = follower.append_replicated(&data).unwrap();
    assert_eq!(out.appended_batches, 2);
    let last = follower.producer_state().producers[&5]
        .batches
        .back()
        .copied();
    assert_eq!(last.map(|b| b.first_seq), Some(10));
}

#[test]
fn a_partial_trailing_batch_is_left_for_the_next_fetch() {
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = leader_with_epochs(leader_dir.path());
    let data = read_all(&leader);
    let sizes: Vec<usize> = BatchIter::new(&data).map(|b| b.unwrap().1.len()).collect();
    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = Log::open(follower_dir.path(), small_config(), true).unwrap();
    // Cut inside the 3rd batch's length field, then inside its header, then in its records.
    let cuts = [sizes[0] + sizes[1] + 5, sizes[0] + sizes[1] + 30];
    for cut in cuts {
        let out = follower.append_replicated(&data[..cut]).unwrap();
        assert_eq!(out.bytes_consumed, sizes[0] + sizes[1], "cut at {cut}");
    }
    assert_eq!(follower.log_end_offset(), 6);
    assert_eq!(follower.epoch_entries(), vec![(1, 0)]);
    let out = follower
        .append_replicated(&data[sizes[0] + sizes[1]..data.len() - 1])
        .unwrap();
    assert_eq!(out.first_offset, Some(6));
    assert_eq!(
        out.bytes_consumed,
        data.len() - sizes[0] - sizes[1] - sizes[14]
    );
    let out = follower
        .append_replicated(&data[data.len() - sizes[14]..])
        .unwrap();
    assert_eq!(out.appended_batches, 1);
    assert_eq!(read_all(&follower), data);
    assert_eq!(follower.epoch_entries(), leader.epoch_entries());
    // Nothing at all, or less than a length field: nothing to do.
    for tiny in [&data[..0], &data[..11]] {
        let out = follower.append_replicated(tiny).unwrap();
        assert_eq!((out.appended_batches, out.bytes_consumed), (0, 0));
    }
}

#[test]
fn overlapping_corrupt_and_absurd_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    let mut first = batch(3, 0, 1);
    set_base_offset(&mut first, 0);
    log.append_replicated(&first).unwrap();
    assert_eq!(log.log_end_offset(), 3);
    // 1..=3 overlaps the end at 3; nothing after it is taken either.
    let mut overlap = batch(3, 0, 1);
    set_base_offset(&mut overlap, 1);
    let mut next = batch(1, 0, 1);
    set_base_offset(&mut next, 4);
    let mut data = overlap.clone();
    data.extend_from_slice(&next);
    assert!(matches!(
        log.append_replicated(&data),
        Err(LogError::Corrupt(_))
    ));
    assert_eq!(log.log_end_offset(), 3);
    // A flipped bit.
    let mut bad = next.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        log.append_replicated(&bad),
        Err(LogError::Batch(BatchError::CorruptCrc { .. }))
    ));
    // Absurd or negative lengths stop everything after the good batches before them.
    for length in [-1i32, 0, 48, (1 << 30) + 1, i32::MAX] {
        let mut data = next.clone();
        let mut junk = vec![0u8; 70];
        junk[8..12].copy_from_slice(&length.to_be_bytes());
        data.extend_from_slice(&junk);
        let mut after = batch(1, 0, 1);
        set_base_offset(&mut after, 5);
        data.extend_from_slice(&after);
        assert!(
            matches!(log.append_replicated(&data), Err(LogError::Corrupt(_))),
            "{length}"
        );
        assert_eq!(log.log_end_offset(), 5, "the batch before it went in");
    }
    // Offsets that overflow.
    let mut huge = batch(2, 0, 1);
    set_base_offset(&mut huge, i64::MAX);
    assert!(log.append_replicated(&huge).is_err());
    assert_eq!(read_all(&log).len(), first.len() + next.len());
}

#[test]
fn gaps_between_a_compacted_leaders_batches_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    let mut data = Vec::new();
    // Batches at 0..=1, 10..=11 and, far away, 5_000_000_000..=5_000_000_001.
    for base in [0i64, 10, 5_000_000_000] {
        let mut b = batch(2, 0, 1);
        set_base_offset(&mut b, base);
        batch::set_partition_leader_epoch(&mut b, 2);
        data.extend_from_slice(&b);
    }
    let out = log.append_replicated(&data).unwrap();
    assert_eq!(out.appended_batches, 3);
    assert_eq!(log.log_end_offset(), 5_000_000_002);
    assert_eq!(
        log.segments.last().unwrap().base_offset,
        5_000_000_000,
        "offsets past i32 from the segment base roll a new segment"
    );
    assert_eq!(read_all(&log), data);
    assert_eq!(
        offsets_of(&log.read(5, 1 << 20, i64::MAX, true).unwrap())[0],
        (10, 11)
    );
    assert_eq!(
        offsets_of(&log.read(12, 1 << 20, i64::MAX, true).unwrap()),
        vec![(5_000_000_000, 5_000_000_001)]
    );
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(read_all(&log), data);
    assert_eq!(log.epoch_entries(), vec![(2, 0)]);

    // An empty log whose first batch is far past its base moves its empty segment up.
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    let out = log.append_replicated(&data[data.len() / 3 * 2..]).unwrap();
    assert_eq!(out.first_offset, Some(5_000_000_000));
    assert_eq!(log.segments.len(), 1);
    assert_eq!(log.segments[0].base_offset, 5_000_000_000);
    assert_eq!(log.log_start_offset(), 5_000_000_000);
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.log_start_offset(), 5_000_000_000);
    assert_eq!(log.log_end_offset(), 5_000_000_002);
}

#[test]
fn a_follower_truncates_a_divergent_tail_and_takes_the_new_leaders_history() {
    // Leader A wrote epoch 1 (0..=5) and epoch 2 (6..=11); the follower copied all of it.
    // Leader B never saw epoch 2: it has epoch 1 (0..=5) and then epoch 3 from 6.
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = Log::open(a_dir.path(), small_config(), true).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = Log::open(b_dir.path(), small_config(), true).unwrap();
    for i in 0..3 {
        let rec = batch(2, i, 40);
        a.append(&rec.clone(), 1, 0).unwrap();
        b.append(&rec.clone(), 1, 0).unwrap();
    }
    for i in 0..3 {
        a.append(&batch(2, 100 + i, 40), 2, 0).unwrap();
    }
    for i in 0..5 {
        b.append(&batch(3, 200 + i, 40), 3, 0).unwrap();
    }
    let f_dir = tempfile::tempdir().unwrap();
    let mut f = Log::open(f_dir.path(), small_config(), true).unwrap();
    f.append_replicated(&read_all(&a)).unwrap();
    assert_eq!(f.epoch_entries(), vec![(1, 0), (2, 6)]);
    // OffsetsForLeaderEpoch to B for the follower's latest epoch.
    let (epoch, end) = b.end_offset_for_epoch(f.latest_epoch().unwrap());
    assert_eq!((epoch, end), (1, 6));
    f.truncate_to(end).unwrap();
    assert_eq!(f.log_end_offset(), 6);
    assert_eq!(f.epoch_entries(), vec![(1, 0)]);
    let tail = b.read(end, usize::MAX, i64::MAX, true).unwrap();
    f.append_replicated(&tail).unwrap();
    assert_eq!(read_all(&f), read_all(&b));
    assert_eq!(f.epoch_entries(), b.epoch_entries());
    assert_eq!(f.epoch_entries(), vec![(1, 0), (3, 6)]);
    drop(f);
    let f = Log::open(f_dir.path(), small_config(), false).unwrap();
    assert_eq!(read_all(&f), read_all(&b));
    assert_eq!(f.epoch_entries(), vec![(1, 0), (3, 6)]);
}

#[test]
fn truncate_fully_and_start_at_leaves_an_empty_log_that_takes_appends() {
    let f_dir = tempfile::tempdir().unwrap();
    let mut f = leader_with_epochs(f_dir.path());
    assert!(f.segments.len() > 1);
    let p = ProducerInfo {
        producer_id: 9,
        producer_epoch: 0,
        base_sequence: 0,
    };
    f.append(&batch_with(1, 0, 1, Compression::None, p), 9, 0)
        .unwrap();
    f.truncate_fully_and_start_at(1000).unwrap();
    assert_eq!(f.log_start_offset(), 1000);
    assert_eq!(f.log_end_offset(), 1000);
    assert!(f.epoch_entries().is_empty());
    assert!(f.producer_state().producers.is_empty());
    assert_eq!(f.segments.len(), 1);
    assert!(read_all(&f).is_empty());
    assert_eq!(checkpoint_text(f_dir.path()), "0\n0\n");
    let logs: Vec<_> = std::fs::read_dir(f_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".log"))
        .collect();
    assert_eq!(logs, vec!["00000000000000001000.log".to_string()]);
    assert!(matches!(
        f.read(999, 100, i64::MAX, true),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    // A leader whose log starts at 1000 feeds it.
    let l_dir = tempfile::tempdir().unwrap();
    let mut l = Log::open(l_dir.path(), small_config(), true).unwrap();
    l.truncate_fully_and_start_at(1000).unwrap();
    for epoch in [11, 11, 12] {
        l.append(&batch(2, 0, 30), epoch, 0).unwrap();
    }
    let out = f.append_replicated(&read_all(&l)).unwrap();
    assert_eq!(out.first_offset, Some(1000));
    assert_eq!(f.epoch_entries(), vec![(11, 1000), (12, 1004)]);
    assert_eq!(read_all(&f), read_all(&l));
    // Unclean restart: still starts at 1000 with the new history only.
    drop(f);
    let f = Log::open(f_dir.path(), small_config(), false).unwrap();
    assert_eq!(f.log_start_offset(), 1000);
    assert_eq!(f.log_end_offset(), 1006);
    assert_eq!(f.epoch_entries(), vec![(11, 1000), (12, 1004)]);
    assert_eq!(read_all(&f), read_all(&l));
    assert!(f.producer_state().producers.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever sizes the leader's fetch responses are cut to, a follower that re-fetches from
    /// its log end ends up with the leader's bytes and epochs.
    #[test]
    fn any_fetch_cuts_converge_to_the_leaders_log(
        epochs in proptest::collection::vec(0i32..4, 1..25),
        cuts in proptest::collection::vec(1usize..700, 1..200),
    ) {
        let leader_dir = tempfile::tempdir().unwrap();
        let mut leader = Log::open(leader_dir.path(), small_config(), true).unwrap();
        let mut epoch = 0;
        for (i, step) in epochs.iter().enumerate() {
            epoch += step;
            let n = 1 + i % 3;
            leader.append(&batch(n, i as i64, 50 + 13 * i), epoch, 0).unwrap();
        }
        let follower_dir = tempfile::tempdir().unwrap();
        let mut follower = Log::open(follower_dir.path(), small_config(), true).unwrap();
        let leo = leader.log_end_offset();
        let mut cuts = cuts.into_iter().cycle();
        let mut rounds = 0;
        while follower.log_end_offset() < leo {
            rounds += 1;
            prop_assert!(rounds < 10_000);
            // As a fetch: from the follower's end, whole batches up to a byte limit, the last
            // one cut. Starting inside a batch returns all of it (it is skipped as known).
            let from = follower.log_end_offset();
            let full = leader.read(from, usize::MAX, i64::MAX, true).unwrap();
            let limit = cuts.next().unwrap_or(1).min(full.len());
            let out = follower.append_replicated(&full[..limit]).unwrap();
            prop_assert!(out.bytes_consumed <= limit);
            if limit == full.len() {
                prop_assert_eq!(out.bytes_consumed, full.len());
            }
            if out.bytes_consumed == 0 {
                // A cut inside the first batch: a real follower asks for more next time.
                let first = BatchIter::new(&full).next().unwrap().unwrap().1.len();
                follower.append_replicated(&full[..first]).unwrap();
            }
        }
        prop_assert_eq!(read_all(&follower), read_all(&leader));
        prop_assert_eq!(follower.epoch_entries(), leader.epoch_entries());
        prop_assert_eq!(follower.producer_state(), leader.producer_state());
    }
}

#[test]
fn a_new_leader_records_its_epoch_at_election_and_answers_older_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    log.append(&batch(3, 0, 10), 1, 0).unwrap();
    // Elected in epoch 4 with nothing new written: a follower that last wrote in epoch 3
    // learns that everything up to here (epoch 1's end) is shared.
    log.start_leader_epoch(4).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 3)]);
    assert_eq!(log.end_offset_for_epoch(3), (1, 3));
    assert_eq!(log.end_offset_for_epoch(4), (4, 3));
    // Idempotent, and an older epoch changes nothing.
    log.start_leader_epoch(4).unwrap();
    log.start_leader_epoch(2).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 3)]);
    // The first append of the epoch does not add a second entry.
    log.append(&batch(1, 0, 10), 4, 0).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 3)]);
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(
        log.epoch_entries(),
        vec![(1, 0), (4, 3)],
        "persisted at election"
    );
}

#[test]
fn truncating_at_the_end_forgets_an_epoch_that_wrote_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    log.append(&batch(3, 0, 10), 1, 0).unwrap();
    log.start_leader_epoch(4).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0), (4, 3)]);
    log.truncate_to(3).unwrap();
    assert_eq!(
        log.epoch_entries(),
        vec![(1, 0)],
        "epoch 4 started at 3 and wrote nothing"
    );
    assert_eq!(log.log_end_offset(), 3);
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.epoch_entries(), vec![(1, 0)]);
}

/// A leader log with several epochs (in its own directory, kept by the caller) and all of
/// its data.
fn leader_and_data() -> (tempfile::TempDir, Log, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let leader = leader_with_epochs(dir.path());
    let data = read_all(&leader);
    (dir, leader, data)
}

/// The `.log` files of a directory by name, with their lengths.
fn log_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Replicated data in fetch-sized pieces cut at batch boundaries (3, 1, 4, 1, 5 batches, ...).
fn fetches(data: &[u8]) -> Vec<&[u8]> {
    let sizes: Vec<usize> = BatchIter::new(data).map(|b| b.unwrap().1.len()).collect();
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    for n in [3, 1, 4, 1, 5, 9, 2, 6].iter().cycle() {
        if i >= sizes.len() {
            break;
        }
        let len: usize = sizes[i..(i + n).min(sizes.len())].iter().sum();
        out.push(&data[at..at + len]);
        at += len;
        i += n;
    }
    out
}

#[test]
fn direct_replica_writes_leave_the_files_page_cache_writes_leave() {
    let (_leader_dir, leader, data) = leader_and_data();
    let open = |dir: &Path, direct: bool, clean: bool| {
        let config = LogConfig {
            direct_replica_writes: direct,
            ..small_config()
        };
        Log::open(dir, config, clean).unwrap()
    };
    let (direct_dir, cached_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut direct = open(direct_dir.path(), true, true);
    let mut cached = open(cached_dir.path(), false, true);
    for piece in fetches(&data) {
        let a = direct.append_replicated(piece).unwrap();
        let b = cached.append_replicated(piece).unwrap();
        assert_eq!(a, b);
        assert_eq!(read_all(&direct), read_all(&cached));
        let active = direct.segments.last().unwrap();
        let len = active.file.metadata().unwrap().len();
        if active.direct_refused {
            // A file system without O_DIRECT: written through the page cache instead.
            assert_eq!(len, active.size);
        } else {
            // Written to the next block boundary, the rest zeros until the next write.
            assert_eq!(len, active.size.next_multiple_of(4096), "direct write");
        }
        // Rolled segments are cut back to their size before they count as finished, and
        // keep no descriptor for direct writes.
        for s in &direct.segments[..direct.segments.len() - 1] {
            assert_eq!(s.file.metadata().unwrap().len(), s.size);
            assert!(s.direct.is_none());
        }
    }
    assert!(direct.segments.len() > 2, "rolled while writing directly");
    assert_eq!(read_all(&direct), data);
    assert_eq!(direct.epoch_entries(), leader.epoch_entries());
    // A clean close leaves the same files as page cache writes, and a clean open trusts them.
    direct.close().unwrap();
    cached.close().unwrap();
    assert_eq!(log_files(direct_dir.path()), log_files(cached_dir.path()));
    let direct = open(direct_dir.path(), true, true);
    assert_eq!(read_all(&direct), data);
}

#[test]
fn after_a_crash_the_zeros_of_a_direct_write_go_like_any_torn_tail() {
    let (_leader_dir, leader, data) = leader_and_data();
    let pieces = fetches(&data);
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for piece in &pieces {
        log.append_replicated(piece).unwrap();
    }
    let t = log.flush_target().unwrap().unwrap();
    t.sync().unwrap();
    // kill -9: no close, the active file still ends with zeros up to a block boundary.
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(read_all(&log), data);
    assert_eq!(log.epoch_entries(), leader.epoch_entries());
    let active = log.segments.last().unwrap();
    assert_eq!(active.file.metadata().unwrap().len(), active.size);
}

#[test]
fn direct_writes_follow_truncation_and_leadership_in_turn() {
    let (_leader_dir, leader, data) = leader_and_data();
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config.clone(), true).unwrap();
    let pieces = fetches(&data);
    for piece in &pieces[..3] {
        log.append_replicated(piece).unwrap();
    }
    // A divergent tail goes; replication continues from the cut with direct writes.
    let cut = log.log_end_offset() - 5;
    log.truncate_to(cut).unwrap();
    let end = log.log_end_offset();
    assert!(end <= cut);
    let rest = leader.read(end, usize::MAX, i64::MAX, true).unwrap();
    log.append_replicated(&rest).unwrap();
    assert_eq!(read_all(&log), data);
    // Leader now: appends through the page cache after the direct writes, and back.
    let own = log.append(&batch(2, 0, 33), 11, 0).unwrap();
    assert_eq!(own.base_offset, leader.log_end_offset());
    let written = read_all(&log);
    assert_eq!(&written[..data.len()], &data[..]);
    let mut more = batch(3, 0, 77);
    set_base_offset(&mut more, own.last_offset + 1);
    // Written by a later leader (epoch 12): header fields outside the CRC.
    more[12..16].copy_from_slice(&12i32.to_be_bytes());
    log.append_replicated(&more).unwrap();
    let all = read_all(&log);
    assert_eq!(&all[..written.len()], &written[..]);
    assert_eq!(&all[written.len()..], &more[..]);
    log.close().unwrap();
    let log = Log::open(dir.path(), config, true).unwrap();
    assert_eq!(read_all(&log), all);
}

#[test]
fn a_replicated_write_that_fails_takes_back_its_batches_and_the_log_goes_on() {
    let (_leader_dir, leader, data) = leader_and_data();
    let pieces = fetches(&data);
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    let mut at = 0;
    while log.segments.len() < 2 || log.active().size == 0 {
        log.append_replicated(pieces[at]).unwrap();
        at += 1;
    }
    let (before, epochs, leo) = (read_all(&log), log.epoch_entries(), log.log_end_offset());
    crate::segment::FAIL_STAGED_WRITES.with(|f| f.set(true));
    let err = log.append_replicated(pieces[at]).unwrap_err();
    crate::segment::FAIL_STAGED_WRITES.with(|f| f.set(false));
    assert!(matches!(err, LogError::Io(_)), "{err}");
    // Nothing of the failed write counts: not in memory, not in the file, not in the epochs.
    assert_eq!(log.log_end_offset(), leo);
    assert_eq!(read_all(&log), before);
    assert_eq!(log.epoch_entries(), epochs);
    let active = log.active();
    assert_eq!(active.file.metadata().unwrap().len(), active.size);
    // The fetcher asks again from the same offset, and replication goes on.
    for piece in &pieces[at..] {
        log.append_replicated(piece).unwrap();
    }
    assert_eq!(read_all(&log), data);
    assert_eq!(log.epoch_entries(), leader.epoch_entries());
    drop(log);
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(read_all(&log), data);
}

#[test]
fn only_large_replicated_appends_go_past_the_page_cache() {
    let (_leader_dir, _, data) = leader_and_data();
    let pieces = fetches(&data);
    let big = pieces.iter().map(|p| p.len()).max().unwrap();
    assert!(
        pieces.iter().any(|p| p.len() < big / 4),
        "pieces of mixed sizes"
    );
    let config = LogConfig {
        direct_replica_min_bytes: big,
        ..small_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), config.clone(), true).unwrap();
    let (mut direct, mut buffered) = (0, 0);
    for piece in &pieces {
        let was_direct = log.active().writes_directly();
        log.append_replicated(piece).unwrap();
        let expected = piece.len() >= big || (was_direct && piece.len() >= big / 4);
        if log.active().direct_refused {
            continue; // a file system without O_DIRECT
        }
        assert_eq!(
            log.active().writes_directly(),
            expected,
            "{} bytes",
            piece.len()
        );
        if expected {
            direct += 1;
        } else {
            buffered += 1;
        }
    }
    assert!(
        direct > 0 && buffered > 0,
        "{direct} direct, {buffered} buffered"
    );
    assert_eq!(read_all(&log), data);
    drop(log);
    let log = Log::open(dir.path(), config, false).unwrap();
    assert_eq!(read_all(&log), data);
}

/// `piece` alone in a shared buffer, at an address congruent to `pos` modulo the block size.
fn placed(piece: &[u8], pos: u64) -> bytes::Bytes {
    let mut v = Vec::with_capacity(piece.len() + 8192);
    let pad = (pos as usize).wrapping_sub(v.as_ptr() as usize) % 4096;
    v.resize(pad, 0);
    v.extend_from_slice(piece);
    let b = bytes::Bytes::from(v).slice(pad..);
    assert_eq!(b.as_ptr() as usize % 4096, pos as usize % 4096);
    b
}

/// Batch `i` of records whose values have `sizes` and bytes that differ from position to
/// position (a block written in the wrong place shows).
fn varied_batch(i: usize, sizes: &[usize]) -> Vec<u8> {
    let recs: Vec<NewRecord> = sizes
        .iter()
        .enumerate()
        .map(|(r, size)| NewRecord {
            key: None,
            value: Some(
                (0..*size)
                    .map(|j| (i * 31 + r * 7 + j * 13 + j / 4096) as u8)
                    .collect(),
            ),
            headers: vec![],
            timestamp: 1000 + i as i64,
        })
        .collect();
    encode_batch(&recs, Compression::None, ProducerInfo::default()).unwrap()
}

/// A leader log of batches of 1–12 KiB whose values differ from byte to byte, rolling every
/// 64 KiB, and all of its data.
fn leader_with_big_batches(dir: &Path) -> (Log, Vec<u8>) {
    let config = LogConfig {
        segment_bytes: 64 << 10,
        ..small_config()
    };
    let mut log = Log::open(dir, config, true).unwrap();
    for i in 0..60usize {
        let sizes: Vec<usize> = (0..3).map(|r| (1 + (i * 7 + r) % 12) * 1024).collect();
        log.append(&varied_batch(i, &sizes), 1 + i as i32 / 20, 0)
            .unwrap();
    }
    let data = read_all(&log);
    (log, data)
}

#[test]
fn a_fetch_answer_placed_at_its_file_position_is_written_from_where_it_lies() {
    let leader_dir = tempfile::tempdir().unwrap();
    let (leader, data) = leader_with_big_batches(leader_dir.path());
    let config = LogConfig {
        segment_bytes: 64 << 10,
        direct_replica_writes: true,
        ..small_config()
    };
    let (shared_dir, copied_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut shared = Log::open(shared_dir.path(), config.clone(), true).unwrap();
    let mut copied = Log::open(copied_dir.path(), config.clone(), true).unwrap();
    let sizes: Vec<usize> = BatchIter::new(&data).map(|b| b.unwrap().1.len()).collect();
    let (mut at, mut i, mut gathered) = (0, 0, 0);
    // Fetch answers of 1–5 batches; every third one misplaced (copied as before).
    for (round, n) in [3, 1, 4, 1, 5, 2].iter().cycle().enumerate() {
        if i >= sizes.len() {
            break;
        }
        let len: usize = sizes[i..(i + n).min(sizes.len())].iter().sum();
        let piece = &data[at..at + len];
        (at, i) = (at + len, i + n);
        let pos = shared.append_position() + if round % 3 == 2 { 8 } else { 0 };
        let before = crate::direct::GATHERED.with(|g| g.get());
        let a = shared
            .append_replicated_shared(&placed(piece, pos))
            .unwrap();
        let b = copied.append_replicated(piece).unwrap();
        assert_eq!(a, b);
        assert_eq!(read_all(&shared), read_all(&copied));
        let active = shared.segments.last().unwrap();
        if active.direct_refused {
            return; // a file system without O_DIRECT: nothing to show here
        }
        assert_eq!(active.direct.as_ref().unwrap().tail(), {
            let mut t = vec![0u8; (active.size % 4096) as usize];
            let from = active.size - t.len() as u64;
            active.file.read_exact_at(&mut t, from).unwrap();
            t
        });
        gathered += crate::direct::GATHERED.with(|g| g.get()) - before;
    }
    assert!(
        gathered >= 5,
        "only {gathered} writes gathered from the answer"
    );
    assert!(shared.segments.len() > 2, "rolled");
    assert_eq!(read_all(&shared), data);
    assert_eq!(shared.epoch_entries(), leader.epoch_entries());
    shared.close().unwrap();
    copied.close().unwrap();
    assert_eq!(log_files(shared_dir.path()), log_files(copied_dir.path()));
}

#[test]
fn a_failed_write_of_a_placed_answer_takes_back_its_batches_too() {
    let leader_dir = tempfile::tempdir().unwrap();
    let (_leader, data) = leader_with_big_batches(leader_dir.path());
    let config = LogConfig {
        segment_bytes: 1 << 20,
        direct_replica_writes: true,
        ..small_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), config.clone(), true).unwrap();
    let half = BatchIter::new(&data)
        .map(|b| b.unwrap().1.len())
        .scan(0, |s, l| {
            *s += l;
            Some(*s)
        })
        .find(|s| *s > data.len() / 2)
        .unwrap();
    let (first, second) = (&data[..half], &data[half..]);
    log.append_replicated_shared(&placed(first, log.append_position()))
        .unwrap();
    let (before, leo) = (read_all(&log), log.log_end_offset());
    crate::segment::FAIL_STAGED_WRITES.with(|f| f.set(true));
    let err = log
        .append_replicated_shared(&placed(second, log.append_position()))
        .unwrap_err();
    crate::segment::FAIL_STAGED_WRITES.with(|f| f.set(false));
    assert!(matches!(err, LogError::Io(_)), "{err}");
    assert_eq!(log.log_end_offset(), leo);
    assert_eq!(read_all(&log), before);
    log.append_replicated_shared(&placed(second, log.append_position()))
        .unwrap();
    assert_eq!(read_all(&log), data);
    drop(log);
    let log = Log::open(dir.path(), config, false).unwrap();
    assert_eq!(read_all(&log), data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever the batch sizes, fetch cuts, rolls and truncations, a follower writing fetch
    /// answers placed at their file position (some misplaced) leaves exactly the files of one
    /// that copies every answer, and reopens to the leader's log.
    #[test]
    fn placed_answers_leave_the_files_copied_ones_leave(
        values in proptest::collection::vec(1usize..24_000, 2..40),
        cuts in proptest::collection::vec(1usize..200_000, 1..60),
        misplaced in proptest::collection::vec(0usize..4, 1..60),
        segment_kib in 24u64..400,
        truncate_by in 0i64..6,
    ) {
        let leader_dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: segment_kib << 10,
            direct_replica_writes: true,
            ..small_config()
        };
        let mut leader = Log::open(leader_dir.path(), config.clone(), true).unwrap();
        for (i, v) in values.iter().enumerate() {
            let sizes = vec![*v; 1 + i % 3];
            leader.append(&varied_batch(i, &sizes), 1 + i as i32 / 7, 0).unwrap();
        }
        let leo = leader.log_end_offset();
        let (shared_dir, copied_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut shared = Log::open(shared_dir.path(), config.clone(), true).unwrap();
        let mut copied = Log::open(copied_dir.path(), config.clone(), true).unwrap();
        let mut cuts = cuts.into_iter().cycle();
        let mut misplaced = misplaced.into_iter().cycle();
        let (mut rounds, mut truncated) = (0, truncate_by == 0);
        while shared.log_end_offset() < leo {
            rounds += 1;
            prop_assert!(rounds < 10_000);
            if !truncated && shared.log_end_offset() > leo / 2 {
                // A divergent tail cut on both, replication going on from the cut.
                let to = shared.log_end_offset() - truncate_by;
                shared.truncate_to(to).unwrap();
                copied.truncate_to(to).unwrap();
                truncated = true;
            }
            let from = shared.log_end_offset();
            prop_assert_eq!(from, copied.log_end_offset());
            let full = leader.read(from, usize::MAX, i64::MAX, true).unwrap();
            let first = BatchIter::new(&full).next().unwrap().unwrap().1.len();
            let limit = cuts.next().unwrap_or(1).clamp(first, full.len());
            let answer = &full[..limit];
            // Most answers placed where they go, one in four a few bytes off.
            let off = match misplaced.next().unwrap_or(0) { 0 => 8, _ => 0 };
            let pos = shared.append_position() + off;
            let a = shared.append_replicated_shared(&placed(answer, pos)).unwrap();
            let b = copied.append_replicated(answer).unwrap();
            prop_assert_eq!(a, b);
            prop_assert_eq!(read_all(&shared), read_all(&copied));
        }
        prop_assert_eq!(read_all(&shared), read_all(&leader));
        prop_assert_eq!(shared.epoch_entries(), leader.epoch_entries());
        shared.close().unwrap();
        copied.close().unwrap();
        prop_assert_eq!(log_files(shared_dir.path()), log_files(copied_dir.path()));
        let shared = Log::open(shared_dir.path(), config, true).unwrap();
        prop_assert_eq!(read_all(&shared), read_all(&leader));
    }
}
