//! Keys and values of `__consumer_offsets` records, in Kafka's own binary schemas so that tools
//! reading that topic directly (Burrow, kafka-console-consumer with the offsets formatter) work
//! unchanged. Keys: offset commit (versions 0-1: group, topic, partition) and group metadata
//! (version 2: group). Values: offset commit versions 0-3 and group metadata versions 0-3; Strom
//! writes offset commit v3 and group metadata v3. A null value is a tombstone. Decoding checks
//! every length against the input: garbage is an error, never a panic.

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
            _ => Err(DecodeError("unknown key version")),
        }
    }

    pub fn group(&self) -> &str {
        match self {
            RecordKey::Offset { group, .. } | RecordKey::Group { group } => group,
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

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = RecordKey::decode(&b);
            let _ = OffsetValue::decode(&b);
            let _ = GroupValue::decode(&b);
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
