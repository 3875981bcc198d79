//! Keys and values of `__consumer_offsets` records, in Kafka's own binary schemas so that tools
//! reading that topic directly (Burrow, kafka-console-consumer with the offsets formatter) work
//! unchanged. Keys: offset commit (versions 0-1: group, topic, partition) and group metadata
//! (version 2: group). Values: offset commit versions 0-3 and group metadata versions 0-3; Strom
//! writes offset commit v3 and group metadata v3. KIP-848 consumer groups use Kafka's record
//! types 3 (group epoch), 5 (member metadata), 6 and 7 (target assignment) and 8 (current member
//! assignment), with flexible (compact, tagged-field) values at version 0. A null value is a
//! tombstone. Decoding checks every length against the input: garbage is an error, never a
//! panic.

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKey {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
    /// KIP-848: the group epoch (type 3).
    ConsumerGroup {
        group: String,
    },
    /// KIP-848: a member's subscription and identity (type 5).
    ConsumerMember {
        group: String,
        member: String,
    },
    /// KIP-848: the epoch of the target assignment (type 6).
    TargetAssignment {
        group: String,
    },
    /// KIP-848: one member's target assignment (type 7).
    TargetMember {
        group: String,
        member: String,
    },
    /// KIP-848: one member's current assignment and epochs (type 8).
    CurrentAssignment {
        group: String,
        member: String,
    },
}

/// Partitions by topic id, as KIP-848 records list them.
pub type TopicPartitions = Vec<([u8; 16], Vec<i32>)>;

/// Value of `RecordKey::ConsumerMember`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerMemberValue {
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed: Vec<String>,
    pub rebalance_timeout_ms: i32,
    pub server_assignor: Option<String>,
}

/// Value of `RecordKey::CurrentAssignment`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CurrentAssignmentValue {
    pub member_epoch: i32,
    pub previous_epoch: i32,
    /// 0 unrevoked partitions, 1 unreleased partitions, 2 stable.
    pub state: i8,
    pub assigned: TopicPartitions,
    pub pending_revocation: TopicPartitions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberValue {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub current_state_timestamp: i64,
    pub members: Vec<MemberValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed __consumer_offsets record: {0}")]
pub struct DecodeError(pub &'static str);

// ---- encoding ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.extend_from_slice(&(b.len().min(i16::MAX as usize) as i16).to_be_bytes());
    out.extend_from_slice(&b[..b.len().min(i16::MAX as usize)]);
}

fn put_nullable_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(&(-1i16).to_be_bytes()),
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
    out.extend_from_slice(b);
}

impl RecordKey {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            RecordKey::Offset {
                group,
                topic,
                partition,
            } => {
                out.extend_from_slice(&1i16.to_be_bytes());
                put_str(&mut out, group);
                put_str(&mut out, topic);
                out.extend_from_slice(&partition.to_be_bytes());
            }
            RecordKey::Group { group } => {
                out.extend_from_slice(&2i16.to_be_bytes());
                put_str(&mut out, group);
            }
            RecordKey::ConsumerGroup { group } | RecordKey::TargetAssignment { group } => {
                let t: i16 = if matches!(self, RecordKey::ConsumerGroup { .. }) {
                    3
                } else {
                    6
                };
                out.extend_from_slice(&t.to_be_bytes());
                put_str(&mut out, group);
            }
            RecordKey::ConsumerMember { group, member }
            | RecordKey::TargetMember { group, member }
            | RecordKey::CurrentAssignment { group, member } => {
                let t: i16 = match self {
                    RecordKey::ConsumerMember { .. } => 5,
                    RecordKey::TargetMember { .. } => 7,
                    _ => 8,
                };
                out.extend_from_slice(&t.to_be_bytes());
                put_str(&mut out, group);
                put_str(&mut out, member);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<RecordKey, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        match r.i16()? {
            0 | 1 => Ok(RecordKey::Offset {
                group: r.string()?,
                topic: r.string()?,
                partition: r.i32()?,
            }),
            2 => Ok(RecordKey::Group { group: r.string()? }),
            3 => Ok(RecordKey::ConsumerGroup { group: r.string()? }),
            6 => Ok(RecordKey::TargetAssignment { group: r.string()? }),
            5 => Ok(RecordKey::ConsumerMember {
                group: r.string()?,
                member: r.string()?,
            }),
            7 => Ok(RecordKey::TargetMember {
                group: r.string()?,
                member: r.string()?,
            }),
            8 => Ok(RecordKey::CurrentAssignment {
                group: r.string()?,
                member: r.string()?,
            }),
            _ => Err(DecodeError("unknown key version")),
        }
    }

    pub fn group(&self) -> &str {
        match self {
            RecordKey::Offset { group, .. }
            | RecordKey::Group { group }
            | RecordKey::ConsumerGroup { group }
            | RecordKey::TargetAssignment { group }
            | RecordKey::ConsumerMember { group, .. }
            | RecordKey::TargetMember { group, .. }
            | RecordKey::CurrentAssignment { group, .. } => group,
        }
    }
}

impl OffsetValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&3i16.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.leader_epoch.to_be_bytes());
        put_str(&mut out, &self.metadata);
        out.extend_from_slice(&self.commit_timestamp.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<OffsetValue, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.i16()?;
        if !(0..=4).contains(&version) {
            return Err(DecodeError("unknown offset value version"));
        }
        if version == 4 {
            // Flexible version: compact strings and tagged fields.
            let offset = r.i64()?;
            let leader_epoch = r.i32()?;
            let metadata = r.compact_string()?;
            let commit_timestamp = r.i64()?;
            return Ok(OffsetValue {
                offset,
                leader_epoch,
                metadata,
                commit_timestamp,
            });
        }
        let offset = r.i64()?;
        let leader_epoch = if version >= 3 { r.i32()? } else { -1 };
        let metadata = r.string()?;
        let commit_timestamp = r.i64()?;
        if version == 1 {
            r.i64()?; // expire timestamp, no longer used
        }
        Ok(OffsetValue {
            offset,
            leader_epoch,
            metadata,
            commit_timestamp,
        })
    }
}

impl GroupValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&3i16.to_be_bytes());
        put_str(&mut out, &self.protocol_type);
        out.extend_from_slice(&self.generation.to_be_bytes());
        put_nullable_str(&mut out, self.protocol.as_deref());
        put_nullable_str(&mut out, self.leader.as_deref());
        out.extend_from_slice(&self.current_state_timestamp.to_be_bytes());
        out.extend_from_slice(&(self.members.len() as i32).to_be_bytes());
        for m in &self.members {
            put_str(&mut out, &m.member_id);
            put_nullable_str(&mut out, m.group_instance_id.as_deref());
            put_str(&mut out, &m.client_id);
            put_str(&mut out, &m.client_host);
            out.extend_from_slice(&m.rebalance_timeout_ms.to_be_bytes());
            out.extend_from_slice(&m.session_timeout_ms.to_be_bytes());
            put_bytes(&mut out, &m.subscription);
            put_bytes(&mut out, &m.assignment);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<GroupValue, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.i16()?;
        if !(0..=3).contains(&version) {
            return Err(DecodeError("unknown group value version"));
        }
        let protocol_type = r.string()?;
        let generation = r.i32()?;
        let protocol = r.nullable_string()?;
        let leader = r.nullable_string()?;
        let current_state_timestamp = if version >= 2 { r.i64()? } else { -1 };
        let count = r.i32()?;
        if count < 0 {
            return Err(DecodeError("negative member count"));
        }
        // Each member takes at least 20 bytes: a count beyond that is garbage.
        if count as usize > r.remaining() / 20 {
            return Err(DecodeError("member count beyond the record"));
        }
        let mut members = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let member_id = r.string()?;
            let group_instance_id = if version >= 3 {
                r.nullable_string()?
            } else {
                None
            };
            let client_id = r.string()?;
            let client_host = r.string()?;
            let rebalance_timeout_ms = if version >= 1 { r.i32()? } else { -1 };
            let session_timeout_ms = r.i32()?;
            let rebalance_timeout_ms = if version >= 1 {
                rebalance_timeout_ms
            } else {
                session_timeout_ms
            };
            let subscription = Bytes::copy_from_slice(r.bytes()?);
            let assignment = Bytes::copy_from_slice(r.bytes()?);
            members.push(MemberValue {
                member_id,
                group_instance_id,
                client_id,
                client_host,
                rebalance_timeout_ms,
                session_timeout_ms,
                subscription,
                assignment,
            });
        }
        Ok(GroupValue {
            protocol_type,
            generation,
            protocol,
            leader,
            current_state_timestamp,
            members,
        })
    }
}

// ---- flexible (compact) encoding for the KIP-848 values ----

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_compact_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_uvarint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn put_topic_partitions(out: &mut Vec<u8>, tps: &TopicPartitions) {
    put_uvarint(out, tps.len() as u64 + 1);
    for (id, ps) in tps {
        out.extend_from_slice(id);
        put_uvarint(out, ps.len() as u64 + 1);
        for p in ps {
            out.extend_from_slice(&p.to_be_bytes());
        }
        out.push(0); // no tagged fields
    }
}

/// A KIP-848 value: version 0, the fields, no tagged fields.
fn flexible_value(fields: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = vec![0, 0];
    fields(&mut out);
    out.push(0);
    out
}

/// The group epoch (type 3 value) and the target-assignment epoch (type 6 value).
pub fn encode_epoch_value(epoch: i32) -> Vec<u8> {
    flexible_value(|o| o.extend_from_slice(&epoch.to_be_bytes()))
}

pub fn decode_epoch_value(buf: &[u8]) -> Result<i32, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    r.flexible_version()?;
    r.i32()
}

pub fn encode_target_member_value(tps: &TopicPartitions) -> Vec<u8> {
    flexible_value(|o| put_topic_partitions(o, tps))
}

pub fn decode_target_member_value(buf: &[u8]) -> Result<TopicPartitions, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    r.flexible_version()?;
    r.topic_partitions()
}

impl ConsumerMemberValue {
    pub fn encode(&self) -> Vec<u8> {
        flexible_value(|o| {
            put_compact_str(o, self.instance_id.as_deref());
            put_compact_str(o, self.rack_id.as_deref());
            put_compact_str(o, Some(&self.client_id));
            put_compact_str(o, Some(&self.client_host));
            put_uvarint(o, self.subscribed.len() as u64 + 1);
            for t in &self.subscribed {
                put_compact_str(o, Some(t));
            }
            put_compact_str(o, None); // subscribed topic regex
            o.extend_from_slice(&self.rebalance_timeout_ms.to_be_bytes());
            put_compact_str(o, self.server_assignor.as_deref());
        })
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        r.flexible_version()?;
        let instance_id = r.compact_nullable_string()?;
        let rack_id = r.compact_nullable_string()?;
        let client_id = r.compact_string()?;
        let client_host = r.compact_string()?;
        let n = r.compact_len()?;
        let mut subscribed = Vec::with_capacity(n.min(r.remaining()));
        for _ in 0..n {
            subscribed.push(r.compact_string()?);
        }
        let _regex = r.compact_nullable_string()?;
        let rebalance_timeout_ms = r.i32()?;
        let server_assignor = r.compact_nullable_string()?;
        Ok(ConsumerMemberValue {
            instance_id,
            rack_id,
            client_id,
            client_host,
            subscribed,
            rebalance_timeout_ms,
            server_assignor,
        })
    }
}

impl CurrentAssignmentValue {
    pub fn encode(&self) -> Vec<u8> {
        flexible_value(|o| {
            o.extend_from_slice(&self.member_epoch.to_be_bytes());
            o.extend_from_slice(&self.previous_epoch.to_be_bytes());
            o.push(self.state as u8);
            put_topic_partitions(o, &self.assigned);
            put_topic_partitions(o, &self.pending_revocation);
        })
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        r.flexible_version()?;
        Ok(CurrentAssignmentValue {
            member_epoch: r.i32()?,
            previous_epoch: r.i32()?,
            state: r.take(1)?[0] as i8,
            assigned: r.topic_partitions()?,
            pending_revocation: r.topic_partitions()?,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| DecodeError("string is not UTF-8"))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        self.nullable_string()?
            .ok_or(DecodeError("null where a string is required"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.i32()?;
        if len < 0 {
            return Ok(&[]);
        }
        self.take(len as usize)
    }
    fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint too long"))
    }
    /// The value version of a KIP-848 record: only 0 is known.
    fn flexible_version(&mut self) -> Result<(), DecodeError> {
        match self.i16()? {
            0 => Ok(()),
            _ => Err(DecodeError("unknown KIP-848 value version")),
        }
    }
    /// A compact array or string length (the wire stores length + 1; 0 is null, read as 0).
    fn compact_len(&mut self) -> Result<usize, DecodeError> {
        let n = self.uvarint()?;
        let len = n.saturating_sub(1) as usize;
        if len > self.remaining() {
            return Err(DecodeError("length beyond the record"));
        }
        Ok(len)
    }
    fn compact_nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let n = self.uvarint()?;
        if n == 0 {
            return Ok(None);
        }
        let b = self.take((n - 1) as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| DecodeError("string is not UTF-8"))
    }
    /// Skips a struct's tagged fields.
    fn tagged_fields(&mut self) -> Result<(), DecodeError> {
        let n = self.uvarint()?;
        for _ in 0..n {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.take(size)?;
        }
        Ok(())
    }
    fn topic_partitions(&mut self) -> Result<TopicPartitions, DecodeError> {
        let n = self.compact_len()?;
        let mut out = Vec::with_capacity(n.min(self.remaining() / 17));
        for _ in 0..n {
            let mut id = [0u8; 16];
            id.copy_from_slice(self.take(16)?);
            let count = self.compact_len()?;
            let mut ps = Vec::with_capacity(count.min(self.remaining() / 4));
            for _ in 0..count {
                ps.push(self.i32()?);
            }
            self.tagged_fields()?;
            out.push((id, ps));
        }
        Ok(out)
    }
    fn compact_string(&mut self) -> Result<String, DecodeError> {
        let n = self.uvarint()?;
        if n == 0 {
            return Err(DecodeError("null where a string is required"));
        }
        let b = self.take((n - 1) as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = RecordKey::Offset {
            group: "g".into(),
            topic: "t".into(),
            partition: 7,
        };
        assert_eq!(RecordKey::decode(&k.encode()).unwrap(), k);
        let k = RecordKey::Group { group: "g2".into() };
        assert_eq!(RecordKey::decode(&k.encode()).unwrap(), k);
    }

    #[test]
    fn offset_key_matches_kafkas_layout() {
        // version 1, "g", "t", partition 2 — as Kafka's OffsetCommitKey writes it.
        let k = RecordKey::Offset {
            group: "g".into(),
            topic: "t".into(),
            partition: 2,
        };
        assert_eq!(k.encode(), [0, 1, 0, 1, b'g', 0, 1, b't', 0, 0, 0, 2]);
    }

    #[test]
    fn values_round_trip() {
        let v = OffsetValue {
            offset: 42,
            leader_epoch: 3,
            metadata: "m".into(),
            commit_timestamp: 1000,
        };
        assert_eq!(OffsetValue::decode(&v.encode()).unwrap(), v);
        let g = GroupValue {
            protocol_type: "consumer".into(),
            generation: 5,
            protocol: Some("range".into()),
            leader: Some("m1".into()),
            current_state_timestamp: 9,
            members: vec![MemberValue {
                member_id: "m1".into(),
                group_instance_id: Some("i1".into()),
                client_id: "c".into(),
                client_host: "/127.0.0.1".into(),
                rebalance_timeout_ms: 300000,
                session_timeout_ms: 45000,
                subscription: Bytes::from_static(b"sub"),
                assignment: Bytes::from_static(b"asg"),
            }],
        };
        assert_eq!(GroupValue::decode(&g.encode()).unwrap(), g);
    }

    #[test]
    fn old_offset_value_versions_decode() {
        // v1: offset, metadata, commit ts, expire ts.
        let mut b = vec![0, 1];
        b.extend_from_slice(&5i64.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&7i64.to_be_bytes());
        b.extend_from_slice(&8i64.to_be_bytes());
        let v = OffsetValue::decode(&b).unwrap();
        assert_eq!((v.offset, v.leader_epoch, v.commit_timestamp), (5, -1, 7));
    }

    #[test]
    fn kip848_records_round_trip() {
        let k = RecordKey::CurrentAssignment {
            group: "g".into(),
            member: "m".into(),
        };
        assert_eq!(RecordKey::decode(&k.encode()).unwrap(), k);
        assert_eq!(&k.encode()[..2], &[0, 8]);
        let m = ConsumerMemberValue {
            instance_id: Some("i".into()),
            rack_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            subscribed: vec!["a".into(), "b".into()],
            rebalance_timeout_ms: 300000,
            server_assignor: Some("uniform".into()),
        };
        assert_eq!(ConsumerMemberValue::decode(&m.encode()).unwrap(), m);
        let a = CurrentAssignmentValue {
            member_epoch: 4,
            previous_epoch: 3,
            state: 2,
            assigned: vec![([1; 16], vec![0, 2]), ([2; 16], vec![1])],
            pending_revocation: vec![([3; 16], vec![5])],
        };
        assert_eq!(CurrentAssignmentValue::decode(&a.encode()).unwrap(), a);
        assert_eq!(decode_epoch_value(&encode_epoch_value(9)).unwrap(), 9);
        let t = vec![([4; 16], vec![1, 2, 3])];
        assert_eq!(
            decode_target_member_value(&encode_target_member_value(&t)).unwrap(),
            t
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = RecordKey::decode(&b);
            let _ = OffsetValue::decode(&b);
            let _ = GroupValue::decode(&b);
            let _ = ConsumerMemberValue::decode(&b);
            let _ = CurrentAssignmentValue::decode(&b);
            let _ = decode_target_member_value(&b);
        }
    }

    #[test]
    fn hostile_member_count_is_refused() {
        let mut b = vec![0, 3, 0, 0];
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&[255, 255, 255, 255]);
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(GroupValue::decode(&b).is_err());
    }
}
