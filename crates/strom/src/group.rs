//! `strom group`: list, describe, delete consumer groups and reset their committed offsets, in
//! the manner of `kafka-consumer-groups.sh` (resets are a dry run unless `--execute`, and are
//! refused while the group has members).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes};
use clap::{ArgGroup, Args, Subcommand};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    BrokerId, ConsumerProtocolAssignment, DeleteGroupsRequest, DescribeGroupsRequest,
    FindCoordinatorRequest, GroupId, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
    MetadataResponse, OffsetCommitRequest, OffsetFetchRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::client::{error_name, Conn};

#[derive(Args, Debug)]
pub struct GroupArgs {
    /// A broker to start from.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    cmd: GroupCmd,
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Every group of the cluster, with its state.
    List {
        /// Only groups in these states (Stable, Empty, PreparingRebalance, ...).
        #[arg(long)]
        state: Vec<String>,
    },
    /// Members and assignments, and per partition the committed offset, log end offset and lag.
    Describe { group: String },
    /// Deletes groups (only groups without members) and their committed offsets.
    Delete {
        #[arg(required = true)]
        groups: Vec<String>,
    },
    /// Moves a group's committed offsets. Prints the plan; `--execute` applies it.
    ResetOffsets(ResetArgs),
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_datetime", "to_offset", "shift_by"])))]
struct ResetArgs {
    group: String,
    /// TOPIC or TOPIC:P,P,... (repeatable).
    #[arg(long, required = true)]
    topic: Vec<String>,
    #[arg(long)]
    to_earliest: bool,
    #[arg(long)]
    to_latest: bool,
    /// The first offset at or after this time: YYYY-MM-DDTHH:MM:SS[.sss] (UTC) or epoch ms.
    #[arg(long)]
    to_datetime: Option<String>,
    #[arg(long)]
    to_offset: Option<i64>,
    /// Moves each committed offset by N (negative: back); clamped to the log.
    #[arg(long, allow_hyphen_values = true)]
    shift_by: Option<i64>,
    /// Apply the reset (without it, only print what would change).
    #[arg(long)]
    execute: bool,
}

pub fn run(args: GroupArgs) -> Result<()> {
    let mut cluster = Cluster::connect(&args.bootstrap)?;
    match args.cmd {
        GroupCmd::List { state } => list(&mut cluster, &state),
        GroupCmd::Describe { group } => describe(&mut cluster, &group),
        GroupCmd::Delete { groups } => delete(&mut cluster, &groups),
        GroupCmd::ResetOffsets(r) => reset(&mut cluster, r),
    }
}

/// Connections to the brokers of a cluster, by node id.
struct Cluster {
    bootstrap: Conn,
    brokers: BTreeMap<i32, String>,
    conns: HashMap<i32, Conn>,
}

impl Cluster {
    fn connect(bootstrap: &str) -> Result<Cluster> {
        let mut conn = Conn::connect(bootstrap)?;
        let md = conn.call(&MetadataRequest::default().with_topics(Some(vec![])), 9)?;
        let brokers = md
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
            .collect();
        Ok(Cluster {
            bootstrap: conn,
            brokers,
            conns: HashMap::new(),
        })
    }

    fn node(&mut self, id: i32) -> Result<&mut Conn> {
        if !self.conns.contains_key(&id) {
            let addr = self
                .brokers
                .get(&id)
                .with_context(|| format!("unknown broker {id}"))?;
            self.conns.insert(id, Conn::connect(addr)?);
        }
        Ok(self.conns.get_mut(&id).expect("just inserted"))
    }

    fn coordinator(&mut self, group: &str) -> Result<&mut Conn> {
        let req = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(group.to_string()))
            .with_key_type(0);
        let mut last = 0;
        for _ in 0..20 {
            let r = self.bootstrap.call(&req, 3)?;
            if r.error_code == 0 {
                return self.node(r.node_id.0);
            }
            last = r.error_code;
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        bail!("no coordinator for group {group}: {}", error_name(last))
    }

    fn metadata(&mut self, topics: &[String]) -> Result<MetadataResponse> {
        let req = MetadataRequest::default().with_topics(Some(
            topics
                .iter()
                .map(|t| {
                    kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                })
                .collect(),
        ));
        self.bootstrap.call(&req, 9)
    }

    /// ListOffsets for each (topic, partition) at `timestamp` (-1 latest, -2 earliest), asked
    /// of each partition's leader.
    fn list_offsets(
        &mut self,
        parts: &BTreeSet<(String, i32)>,
        timestamp: i64,
    ) -> Result<BTreeMap<(String, i32), i64>> {
        let topics: Vec<String> = parts
            .iter()
            .map(|(t, _)| t.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let md = self.metadata(&topics)?;
        let mut by_leader: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
        for t in &md.topics {
            let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
            for p in &t.partitions {
                if parts.contains(&(name.clone(), p.partition_index)) {
                    by_leader
                        .entry(p.leader_id.0)
                        .or_default()
                        .push((name.clone(), p.partition_index));
                }
            }
        }
        let mut out = BTreeMap::new();
        for (leader, ps) in by_leader {
            let mut topics: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (t, p) in ps {
                topics.entry(t).or_default().push(p);
            }
            let req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            ListOffsetsTopic::default()
                                .with_name(TopicName(StrBytes::from_string(t)))
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|p| {
                                            ListOffsetsPartition::default()
                                                .with_partition_index(p)
                                                .with_current_leader_epoch(-1)
                                                .with_timestamp(timestamp)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let resp = self.node(leader)?.call(&req, 7)?;
            for t in resp.topics {
                for p in t.partitions {
                    if p.error_code != 0 {
                        bail!(
                            "ListOffsets {}-{}: {}",
                            t.name.0,
                            p.partition_index,
                            error_name(p.error_code)
                        );
                    }
                    out.insert((t.name.0.to_string(), p.partition_index), p.offset);
                }
            }
        }
        Ok(out)
    }
}

fn list(cluster: &mut Cluster, states: &[String]) -> Result<()> {
    let req = ListGroupsRequest::default().with_states_filter(
        states
            .iter()
            .map(|s| StrBytes::from_string(s.clone()))
            .collect(),
    );
    let ids: Vec<i32> = cluster.brokers.keys().copied().collect();
    let mut rows = Vec::new();
    for id in ids {
        let r = cluster.node(id)?.call(&req, 4)?;
        if r.error_code != 0 {
            eprintln!("broker {id}: {}", error_name(r.error_code));
        }
        rows.extend(r.groups.into_iter().map(|g| {
            (
                g.group_id.0.to_string(),
                g.group_state.to_string(),
                g.protocol_type.to_string(),
            )
        }));
    }
    rows.sort();
    println!("{:<40} {:<20} PROTOCOL-TYPE", "GROUP", "STATE");
    for (g, s, p) in rows {
        println!("{g:<40} {s:<20} {p}");
    }
    Ok(())
}

struct MemberInfo {
    member_id: String,
    client_id: String,
    host: String,
    partitions: Vec<(String, i32)>,
}

struct GroupInfo {
    state: String,
    protocol: String,
    members: Vec<MemberInfo>,
}

fn decode_assignment(b: &Bytes) -> Vec<(String, i32)> {
    let mut b = b.clone();
    if b.remaining() < 2 {
        return Vec::new();
    }
    let version = b.get_i16().clamp(0, 3);
    ConsumerProtocolAssignment::decode(&mut b, version)
        .map(|a| {
            a.assigned_partitions
                .iter()
                .flat_map(|tp| tp.partitions.iter().map(|p| (tp.topic.0.to_string(), *p)))
                .collect()
        })
        .unwrap_or_default()
}

fn group_info(cluster: &mut Cluster, group: &str) -> Result<GroupInfo> {
    let req = DescribeGroupsRequest::default()
        .with_groups(vec![GroupId(StrBytes::from_string(group.to_string()))]);
    let r = cluster.coordinator(group)?.call(&req, 5)?;
    let g = r
        .groups
        .into_iter()
        .next()
        .context("empty DescribeGroups")?;
    if g.error_code != 0 {
        bail!("describe {group}: {}", error_name(g.error_code));
    }
    Ok(GroupInfo {
        state: g.group_state.to_string(),
        protocol: g.protocol_data.to_string(),
        members: g
            .members
            .iter()
            .map(|m| MemberInfo {
                member_id: m.member_id.to_string(),
                client_id: m.client_id.to_string(),
                host: m.client_host.to_string(),
                partitions: decode_assignment(&m.member_assignment),
            })
            .collect(),
    })
}

fn committed(cluster: &mut Cluster, group: &str) -> Result<BTreeMap<(String, i32), i64>> {
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_topics(None);
    let r = cluster.coordinator(group)?.call(&req, 7)?;
    if r.error_code != 0 {
        bail!("offsets of {group}: {}", error_name(r.error_code));
    }
    Ok(r.topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .filter(|p| p.committed_offset >= 0)
                .map(move |p| {
                    (
                        (t.name.0.to_string(), p.partition_index),
                        p.committed_offset,
                    )
                })
        })
        .collect())
}

fn describe(cluster: &mut Cluster, group: &str) -> Result<()> {
    let info = group_info(cluster, group)?;
    let offsets = committed(cluster, group)?;
    if info.state == "Dead" && offsets.is_empty() {
        bail!("group {group} does not exist");
    }
    let mut owner: BTreeMap<(String, i32), (String, String, String)> = BTreeMap::new();
    for m in &info.members {
        for tp in &m.partitions {
            owner.insert(
                tp.clone(),
                (m.member_id.clone(), m.host.clone(), m.client_id.clone()),
            );
        }
    }
    let parts: BTreeSet<(String, i32)> = offsets.keys().chain(owner.keys()).cloned().collect();
    let ends = cluster.list_offsets(&parts, -1)?;
    println!(
        "Group {group}: state {}, {} member(s){}",
        info.state,
        info.members.len(),
        if info.protocol.is_empty() {
            String::new()
        } else {
            format!(", assignor {}", info.protocol)
        }
    );
    println!(
        "{:<24} {:>9} {:>14} {:>14} {:>8}  {:<40} {:<16} CLIENT-ID",
        "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "CONSUMER-ID", "HOST"
    );
    for tp in &parts {
        let cur = offsets.get(tp);
        let end = ends.get(tp).copied();
        let lag = match (cur, end) {
            (Some(c), Some(e)) => (e - c).max(0).to_string(),
            _ => "-".into(),
        };
        let (id, host, client) =
            owner
                .get(tp)
                .cloned()
                .unwrap_or(("-".into(), "-".into(), "-".into()));
        println!(
            "{:<24} {:>9} {:>14} {:>14} {:>8}  {:<40} {:<16} {}",
            tp.0,
            tp.1,
            cur.map_or("-".into(), |c| c.to_string()),
            end.map_or("-".into(), |e| e.to_string()),
            lag,
            id,
            host,
            client
        );
    }
    Ok(())
}

fn delete(cluster: &mut Cluster, groups: &[String]) -> Result<()> {
    let mut failed = false;
    for g in groups {
        let req = DeleteGroupsRequest::default()
            .with_groups_names(vec![GroupId(StrBytes::from_string(g.clone()))]);
        let r = cluster.coordinator(g)?.call(&req, 2)?;
        for res in r.results {
            if res.error_code == 0 {
                println!("deleted group {}", res.group_id.0);
            } else {
                failed = true;
                eprintln!(
                    "cannot delete group {}: {}",
                    res.group_id.0,
                    error_name(res.error_code)
                );
            }
        }
    }
    if failed {
        bail!("some groups were not deleted");
    }
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.sss]` (UTC, optional trailing `Z`) or epoch milliseconds.
pub fn parse_datetime(s: &str) -> Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let s = s.trim_end_matches('Z');
    let (date, time) = s
        .split_once('T')
        .with_context(|| format!("{s}: expected YYYY-MM-DDTHH:MM:SS[.sss]"))?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad date {date}"))?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad time {time}"))?;
    if d.len() != 3 || t.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        bail!("{s}: expected YYYY-MM-DDTHH:MM:SS[.sss]");
    }
    let ms: i64 = format!("{frac:0<3}")[..3]
        .parse()
        .with_context(|| format!("bad fraction {frac}"))?;
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + ms)
}

fn reset(cluster: &mut Cluster, r: ResetArgs) -> Result<()> {
    let info = group_info(cluster, &r.group)?;
    if !matches!(info.state.as_str(), "Empty" | "Dead") {
        bail!(
            "assignments can only be reset if the group '{}' is inactive, but the current state is {}",
            r.group,
            info.state
        );
    }
    // The partitions to reset.
    let mut parts: BTreeSet<(String, i32)> = BTreeSet::new();
    let mut whole_topics = Vec::new();
    for spec in &r.topic {
        match spec.split_once(':') {
            Some((t, ps)) => {
                for p in ps.split(',') {
                    let p: i32 = p
                        .parse()
                        .with_context(|| format!("--topic {spec}: bad partition {p}"))?;
                    parts.insert((t.to_string(), p));
                }
            }
            None => whole_topics.push(spec.clone()),
        }
    }
    if !whole_topics.is_empty() {
        let md = cluster.metadata(&whole_topics)?;
        for t in md.topics {
            let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
            if t.error_code != 0 {
                bail!("topic {name}: {}", error_name(t.error_code));
            }
            for p in t.partitions {
                parts.insert((name.clone(), p.partition_index));
            }
        }
    }
    let earliest = cluster.list_offsets(&parts, -2)?;
    let latest = cluster.list_offsets(&parts, -1)?;
    let current = committed(cluster, &r.group)?;
    let by_time = match &r.to_datetime {
        Some(ts) => Some(cluster.list_offsets(&parts, parse_datetime(ts)?)?),
        None => None,
    };
    let mut plan: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for tp in &parts {
        let lo = earliest.get(tp).copied().unwrap_or(0);
        let hi = latest.get(tp).copied().unwrap_or(lo);
        let target = if r.to_earliest {
            lo
        } else if r.to_latest {
            hi
        } else if let Some(o) = r.to_offset {
            o
        } else if let Some(n) = r.shift_by {
            current.get(tp).copied().unwrap_or(hi) + n
        } else {
            // No record at or after the time: the end of the log.
            match by_time.as_ref().and_then(|m| m.get(tp)) {
                Some(o) if *o >= 0 => *o,
                _ => hi,
            }
        };
        plan.insert(tp.clone(), target.clamp(lo, hi));
    }
    println!("{:<24} {:>9} {:>14}", "TOPIC", "PARTITION", "NEW-OFFSET");
    for ((t, p), o) in &plan {
        println!("{t:<24} {p:>9} {o:>14}");
    }
    if !r.execute {
        println!("(dry run: add --execute to apply)");
        return Ok(());
    }
    let mut topics: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for ((t, p), o) in plan {
        topics.entry(t).or_default().push((p, o));
    }
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(r.group.clone())))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(StrBytes::from_static_str(""))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    OffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t)))
                        .with_partitions(
                            ps.into_iter()
                                .map(|(p, o)| {
                                    OffsetCommitRequestPartition::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(o)
                                        .with_committed_leader_epoch(-1)
                                        .with_committed_metadata(Some(StrBytes::from_static_str(
                                            "",
                                        )))
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let resp = cluster.coordinator(&r.group)?.call(&req, 8)?;
    let mut failed = Vec::new();
    for t in resp.topics {
        for p in t.partitions {
            if p.error_code != 0 {
                failed.push(format!(
                    "{}-{}: {}",
                    t.name.0,
                    p.partition_index,
                    error_name(p.error_code)
                ));
            }
        }
    }
    if !failed.is_empty() {
        bail!("reset failed: {}", failed.join(", "));
    }
    println!("offsets of group {} reset", r.group);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_datetime;

    #[test]
    fn datetimes() {
        assert_eq!(parse_datetime("0").unwrap(), 0);
        assert_eq!(parse_datetime("1970-01-01T00:00:00").unwrap(), 0);
        assert_eq!(
            parse_datetime("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert_eq!(
            parse_datetime("2000-03-01T00:00:01").unwrap(),
            951_868_801_000
        );
        assert!(parse_datetime("2023-13-01T00:00:00").is_err());
        assert!(parse_datetime("yesterday").is_err());
    }
}
