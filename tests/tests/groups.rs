//! Consumer groups with real clients: librdkafka members in their own processes (so one can be
//! `kill -9`ed), committed offsets across broker and consumer restarts, kcat `-G`, and
//! pause/resume without a rebalance.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_topic, produce_all, producer, rec};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use strom_tests::{wait_for, StromProcess};

/// Broker settings for group tests: a short initial rebalance delay keeps tests quick while
/// still exercising it.
const GROUP_SETS: &[&str] = &["group.initial.rebalance.delay.ms=300"];

/// One `group-consumer` process and the events it printed.
struct Member {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Member {
    fn start(bootstrap: &str, group: &str, topic: &str, extra: &[&str]) -> Member {
        let mut child = Command::new(env!("CARGO_BIN_EXE_group-consumer"))
            .arg(bootstrap)
            .arg(group)
            .arg(topic)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn group-consumer");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Member { child, lines }
    }

    /// The partitions it owns now (`None` while it owns nothing).
    fn assignment(&self) -> Option<Vec<i32>> {
        let lines = self.lines.lock().unwrap();
        let last = lines.iter().rev().find(|l| l.starts_with("OWN"))?;
        let ps: Vec<i32> = last[3..]
            .trim()
            .split(',')
            .filter_map(|p| p.parse().ok())
            .collect();
        (!ps.is_empty()).then_some(ps)
    }

    fn messages(&self) -> Vec<(i32, i64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let mut it = l.strip_prefix("MSG ")?.split(' ');
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect()
    }

    fn rebalances(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("ASSIGN"))
            .count()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The members' assignments when every one of them owns partitions, they are disjoint and
/// together cover `0..partitions`.
fn balanced(members: &[&Member], partitions: i32) -> Option<Vec<Vec<i32>>> {
    let asg: Vec<Vec<i32>> = members
        .iter()
        .map(|m| m.assignment())
        .collect::<Option<_>>()?;
    let mut all: Vec<i32> = asg.iter().flatten().copied().collect();
    all.sort();
    (all == (0..partitions).collect::<Vec<_>>() && asg.iter().all(|a| !a.is_empty())).then_some(asg)
}

async fn produce_n(bootstrap: &str, topic: &str, from: u64, n: u64, partitions: i32) {
    let p = producer(bootstrap, &[]);
    let recs: Vec<_> = (from..from + n).map(|i| rec(i, 20)).collect();
    produce_all(&p, topic, &recs, |i| (i as i32) % partitions).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_share_six_partitions_and_survive_a_kill9() {
    share_and_survive_a_kill9(GROUP_SETS, &[]).await;
}

/// The classic protocol with librdkafka's incremental cooperative-sticky assignor.
#[tokio::test(flavor = "multi_thread")]
async fn cooperative_sticky_members_share_six_partitions_and_survive_a_kill9() {
    share_and_survive_a_kill9(
        GROUP_SETS,
        &["partition.assignment.strategy=cooperative-sticky"],
    )
    .await;
}

/// The same with the KIP-848 consumer protocol: server-side assignment, incremental
/// reconciliation, the session kept by the broker (`group.consumer.session.timeout.ms`).
#[tokio::test(flavor = "multi_thread")]
async fn kip848_members_share_six_partitions_and_survive_a_kill9() {
    share_and_survive_a_kill9(
        &[
            "group.consumer.session.timeout.ms=6000",
            "group.consumer.heartbeat.interval.ms=300",
        ],
        &["group.protocol=consumer"],
    )
    .await;
}

async fn share_and_survive_a_kill9(broker_sets: &[&str], client: &[&str]) {
    let s = StromProcess::start(broker_sets);
    let b = s.bootstrap();
    create_topic(&b, "grp6", 6, &[]).await;
    produce_n(&b, "grp6", 0, 600, 6).await;

    let mut members: Vec<Member> = (0..3)
        .map(|_| Member::start(&b, "g6", "grp6", client))
        .collect();
    let asg = wait_for(
        Duration::from_secs(60),
        "3 members with 2 partitions each",
        || {
            let refs: Vec<&Member> = members.iter().collect();
            balanced(&refs, 6).filter(|a| a.iter().all(|p| p.len() == 2))
        },
    );
    println!("assignments: {asg:?}");
    wait_for(
        Duration::from_secs(30),
        "first 600 records consumed",
        || {
            let seen: HashSet<(i32, i64)> = members.iter().flat_map(|m| m.messages()).collect();
            (seen.len() == 600).then_some(())
        },
    );

    let mut victim = members.remove(0);
    victim.kill9();
    let killed_at = Instant::now();
    let consumed_by_victim: HashSet<(i32, i64)> = victim.messages().into_iter().collect();
    produce_n(&b, "grp6", 600, 600, 6).await;
    let asg = wait_for(
        Duration::from_secs(60),
        "2 survivors own all 6 partitions",
        || {
            let refs: Vec<&Member> = members.iter().collect();
            balanced(&refs, 6).filter(|a| a.iter().all(|p| p.len() == 3))
        },
    );
    println!(
        "survivors own {asg:?} {:?} after the kill (session.timeout.ms 6000)",
        killed_at.elapsed()
    );
    wait_for(Duration::from_secs(60), "all 1200 records consumed", || {
        let seen: HashSet<(i32, i64)> = members
            .iter()
            .flat_map(|m| m.messages())
            .chain(consumed_by_victim.iter().copied())
            .collect();
        (seen.len() == 1200).then_some(())
    });
    // No record went to two live members: the survivors commit on revoke, so only the dead
    // member's uncommitted tail may be delivered again.
    let mut count: HashMap<(i32, i64), usize> = HashMap::new();
    for m in &members {
        for po in m.messages() {
            *count.entry(po).or_default() += 1;
        }
    }
    let dup: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dup.is_empty(),
        "records consumed twice by survivors: {dup:?}"
    );
    let redelivered = count
        .keys()
        .filter(|po| consumed_by_victim.contains(po))
        .count();
    println!("records of the killed member delivered again: {redelivered}");
}

struct CountingContext {
    assigns: AtomicUsize,
}
impl ClientContext for CountingContext {}
impl ConsumerContext for CountingContext {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if matches!(r, Rebalance::Assign(_)) {
            self.assigns.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn group_consumer(
    bootstrap: &str,
    group: &str,
    extra: &[(&str, &str)],
) -> BaseConsumer<CountingContext> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    // With the KIP-848 protocol the broker owns session and heartbeat timing.
    if !extra.contains(&("group.protocol", "consumer")) {
        c.set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
    }
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create_with_context(CountingContext {
        assigns: AtomicUsize::new(0),
    })
    .unwrap()
}

fn poll_n(c: &BaseConsumer<CountingContext>, n: usize, timeout: Duration) -> Vec<(i32, i64)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push((m.partition(), m.offset())),
            // Transient while a broker restarts (all brokers down, transport errors).
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_survive_broker_and_consumer_restart() {
    let mut s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "resume", 3, &[]).await;
    produce_n(&b, "resume", 0, 90, 3).await;

    let first: Vec<(i32, i64)> = {
        let c = group_consumer(&b, "rg", &[]);
        c.subscribe(&["resume"]).unwrap();
        let got = poll_n(&c, 60, Duration::from_secs(30));
        assert_eq!(got.len(), 60);
        c.commit_consumer_state(CommitMode::Sync).unwrap();
        let committed = c.committed(Duration::from_secs(10)).unwrap();
        let total: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 60, "committed offsets add up to what was consumed");
        got
    };

    // The broker dies without a clean shutdown; what was committed is durable.
    s.kill9();
    s.restart();
    produce_n(&b, "resume", 90, 30, 3).await;

    let c = group_consumer(&b, "rg", &[]);
    c.subscribe(&["resume"]).unwrap();
    let second = poll_n(&c, 60, Duration::from_secs(60));
    // Nothing more arrives.
    let extra = poll_n(&c, 1, Duration::from_secs(2));
    assert!(
        extra.is_empty(),
        "re-delivered beyond the remaining records: {extra:?}"
    );
    let a: HashSet<_> = first.iter().copied().collect();
    let bset: HashSet<_> = second.iter().copied().collect();
    assert_eq!(second.len(), 60, "every remaining record once");
    assert_eq!(bset.len(), 60);
    assert!(a.is_disjoint(&bset), "no committed record delivered again");
    assert_eq!(a.len() + bset.len(), 120, "no record lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_seek_within_a_session() {
    let s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "pz", 2, &[]).await;
    let c = group_consumer(&b, "pg", &[("max.poll.interval.ms", "20000")]);
    c.subscribe(&["pz"]).unwrap();
    wait_for(Duration::from_secs(30), "assignment", || {
        let _ = c.poll(Duration::from_millis(50));
        (c.assignment().ok()?.count() == 2).then_some(())
    });
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("pz", 0);
    c.pause(&tpl).unwrap();
    produce_n(&b, "pz", 0, 40, 2).await;
    // Poll past a whole session timeout while paused: heartbeats go on, no rebalance.
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            got.push((m.partition(), m.offset()));
        }
    }
    assert_eq!(got.len(), 20, "only the unpaused partition: {got:?}");
    assert!(got.iter().all(|(p, _)| *p == 1));
    assert_eq!(
        c.context().assigns.load(Ordering::SeqCst),
        1,
        "no rebalance"
    );
    c.resume(&tpl).unwrap();
    let rest = poll_n(&c, 20, Duration::from_secs(20));
    let mut p0: Vec<i64> = rest
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, o)| *o)
        .collect();
    p0.sort();
    assert_eq!(
        p0,
        (0..20).collect::<Vec<_>>(),
        "resumed partition from where it stopped"
    );
    // seek() within the session: partition 1 is read again from offset 5.
    c.seek("pz", 1, Offset::Offset(5), Duration::from_secs(10))
        .unwrap();
    let again = poll_n(&c, 15, Duration::from_secs(20));
    let p1: Vec<i64> = again
        .iter()
        .filter(|(p, _)| *p == 1)
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(p1, (5..20).collect::<Vec<_>>(), "re-read after seek");
    assert_eq!(
        c.context().assigns.load(Ordering::SeqCst),
        1,
        "still no rebalance"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_member_restarting_within_its_session_causes_no_rebalance() {
    let s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "st", 4, &[]).await;
    let steady = Member::start(&b, "sg", "st", &["group.instance.id=steady"]);
    let mut bouncing = Member::start(&b, "sg", "st", &["group.instance.id=bouncer"]);
    let before = wait_for(
        Duration::from_secs(60),
        "two static members balanced",
        || balanced(&[&steady, &bouncing], 4).filter(|a| a.iter().all(|p| p.len() == 2)),
    );
    let steady_rebalances = steady.rebalances();
    bouncing.kill9();
    let bouncing = Member::start(&b, "sg", "st", &["group.instance.id=bouncer"]);
    let after = wait_for(
        Duration::from_secs(30),
        "restarted static member assigned",
        || bouncing.assignment().filter(|a| !a.is_empty()),
    );
    assert_eq!(after, before[1], "the same partitions come back");
    // Give a rebalance every chance to show up.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        steady.rebalances(),
        steady_rebalances,
        "the other member saw no rebalance"
    );
    assert_eq!(steady.assignment(), Some(before[0].clone()));
}

fn kcat(args: &[&str]) -> String {
    let out = Command::new("kcat")
        .args(args)
        .output()
        .expect("kcat is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// kcat as a group member: reads to the end of every partition (from the committed offsets,
/// else the earliest), commits on exit, prints `partition offset` lines.
fn kcat_group_read(bootstrap: &str, group: &str, topic: &str) -> String {
    kcat(&[
        "-b",
        bootstrap,
        "-G",
        group,
        "-X",
        "auto.offset.reset=earliest",
        "-e",
        "-q",
        "-f",
        "%p %o\\n",
        topic,
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn kcat_balanced_consumer_commits_and_resumes() {
    let s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "kg", 2, &[]).await;
    produce_n(&b, "kg", 0, 50, 2).await;
    let group_read = || kcat_group_read(&b, "kcat-group", "kg");
    let first = group_read();
    assert_eq!(first.lines().count(), 50, "{first}");
    let second = group_read();
    assert_eq!(second.lines().count(), 0, "committed on exit: {second}");
    produce_n(&b, "kg", 50, 10, 2).await;
    let third = group_read();
    let got: HashSet<&str> = third.lines().collect();
    assert_eq!(got.len(), 10, "{third}");
    assert!(third.lines().all(|l| {
        let o: i64 = l.split(' ').nth(1).unwrap().parse().unwrap();
        o >= 25
    }));
}

fn strom_group(bootstrap: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["group"];
    all.extend_from_slice(args);
    strom_tests::strom_cli(bootstrap, &all)
}

/// The CURRENT-OFFSET column of `strom group describe` for (topic, partition).
fn described_offset(text: &str, topic: &str, partition: i32) -> Option<String> {
    text.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() >= 5 && cols[0] == topic && cols[1] == partition.to_string())
            .then(|| cols[2].to_string())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn strom_group_cli_lists_describes_resets_and_deletes() {
    let s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "cli", 2, &[]).await;
    produce_n(&b, "cli", 0, 40, 2).await;
    let read_all = || kcat_group_read(&b, "cli-group", "cli");
    assert_eq!(read_all().lines().count(), 40);

    let (ok, text) = strom_group(&b, &["describe", "cli-group"]);
    assert!(ok, "{text}");
    assert!(text.contains("state Empty"), "{text}");
    assert_eq!(
        described_offset(&text, "cli", 0).as_deref(),
        Some("20"),
        "{text}"
    );
    assert_eq!(
        described_offset(&text, "cli", 1).as_deref(),
        Some("20"),
        "{text}"
    );

    // A dry run changes nothing.
    let (ok, text) = strom_group(
        &b,
        &[
            "reset-offsets",
            "cli-group",
            "--topic",
            "cli",
            "--to-earliest",
        ],
    );
    assert!(ok && text.contains("dry run"), "{text}");
    assert_eq!(read_all().lines().count(), 0);
    // Executed: the next consumer starts over on partition 0 only, 5 back on partition 1.
    let (ok, text) = strom_group(
        &b,
        &[
            "reset-offsets",
            "cli-group",
            "--topic",
            "cli:0",
            "--to-earliest",
            "--execute",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = strom_group(
        &b,
        &[
            "reset-offsets",
            "cli-group",
            "--topic",
            "cli:1",
            "--shift-by",
            "-5",
            "--execute",
        ],
    );
    assert!(ok, "{text}");
    let (_, text) = strom_group(&b, &["describe", "cli-group"]);
    assert_eq!(
        described_offset(&text, "cli", 0).as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        described_offset(&text, "cli", 1).as_deref(),
        Some("15"),
        "{text}"
    );
    let again = read_all();
    let mut got: Vec<(i32, i64)> = again
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(i32, i64)> = (0..20)
        .map(|o| (0, o))
        .chain((15..20).map(|o| (1, o)))
        .collect();
    assert_eq!(got, want);

    // With an active member: listed as Stable, reset and delete are refused.
    let mut m = Member::start(&b, "cli-group", "cli", &[]);
    wait_for(Duration::from_secs(30), "member assigned", || {
        m.assignment().filter(|a| a.len() == 2)
    });
    let (ok, text) = strom_group(&b, &["list"]);
    assert!(
        ok && text
            .lines()
            .any(|l| l.starts_with("cli-group") && l.contains("Stable")),
        "{text}"
    );
    let (ok, text) = strom_group(
        &b,
        &[
            "reset-offsets",
            "cli-group",
            "--topic",
            "cli",
            "--to-latest",
            "--execute",
        ],
    );
    assert!(!ok && text.contains("inactive"), "{text}");
    let (ok, text) = strom_group(&b, &["describe", "cli-group"]);
    assert!(
        ok && text.contains("state Stable") && text.contains("1 member"),
        "{text}"
    );
    let (ok, text) = strom_group(&b, &["delete", "cli-group"]);
    assert!(!ok && text.contains("NonEmptyGroup"), "{text}");
    // Once the member is gone (its session expires), the group can be deleted.
    m.kill9();
    wait_for(Duration::from_secs(30), "group empty", || {
        let (_, text) = strom_group(&b, &["list", "--state", "Empty"]);
        text.lines()
            .any(|l| l.starts_with("cli-group"))
            .then_some(())
    });
    let (ok, text) = strom_group(&b, &["delete", "cli-group"]);
    assert!(ok, "{text}");
    let (_, text) = strom_group(&b, &["list"]);
    assert!(!text.contains("cli-group"), "{text}");
    let (ok, text) = strom_group(&b, &["delete", "cli-group"]);
    assert!(!ok && text.contains("GroupIdNotFound"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_do_not_outlive_their_topic() {
    let s = StromProcess::start(GROUP_SETS);
    let b = s.bootstrap();
    create_topic(&b, "reborn", 1, &[]).await;
    produce_n(&b, "reborn", 0, 10, 1).await;
    let c = group_consumer(&b, "rb", &[]);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("reborn", 0, Offset::Offset(10))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
    let committed = |c: &BaseConsumer<CountingContext>| {
        let mut q = TopicPartitionList::new();
        q.add_partition("reborn", 0);
        c.committed_offsets(q, Duration::from_secs(10))
            .unwrap()
            .find_partition("reborn", 0)
            .unwrap()
            .offset()
    };
    assert_eq!(committed(&c), Offset::Offset(10));
    let admin = common::admin(&b);
    let opts = rdkafka::admin::AdminOptions::new();
    for r in admin.delete_topics(&["reborn"], &opts).await.unwrap() {
        r.unwrap();
    }
    create_topic(&b, "reborn", 1, &[]).await;
    assert_eq!(
        committed(&c),
        Offset::Invalid,
        "no offset carried into the new topic"
    );
}

/// A KIP-848 member whose coordinator restarts carries on: the group's epochs, members and
/// assignments are stored in `__consumer_offsets` and reloaded.
#[tokio::test(flavor = "multi_thread")]
async fn kip848_member_carries_on_across_a_broker_restart() {
    let mut s = StromProcess::start(&[
        "group.consumer.session.timeout.ms=6000",
        "group.consumer.heartbeat.interval.ms=300",
    ]);
    let b = s.bootstrap();
    create_topic(&b, "k848", 2, &[]).await;
    produce_n(&b, "k848", 0, 20, 2).await;
    let c = group_consumer(&b, "kg", &[("group.protocol", "consumer")]);
    c.subscribe(&["k848"]).unwrap();
    let first = poll_n(&c, 20, Duration::from_secs(30));
    assert_eq!(first.len(), 20);
    c.commit_consumer_state(CommitMode::Sync).unwrap();
    s.kill9();
    s.restart();
    produce_n(&b, "k848", 20, 10, 2).await;
    // Its membership (epoch, assignment) was stored and reloaded: it carries on where it was,
    // without rejoining, so nothing is delivered twice.
    let mut second = poll_n(&c, 10, Duration::from_secs(60));
    let extra = poll_n(&c, 100, Duration::from_secs(3));
    assert!(extra.is_empty(), "delivered again: {extra:?}");
    second.sort();
    let want: Vec<(i32, i64)> = (10..15)
        .map(|o| (0, o))
        .chain((10..15).map(|o| (1, o)))
        .collect();
    assert_eq!(second, want);
    assert_eq!(
        c.context().assigns.load(Ordering::SeqCst),
        1,
        "no new assignment"
    );
}
