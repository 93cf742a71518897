//! The small types every stage shares, in a leaf module that imports nothing of ours: event
//! time, field types and time formats of a schema, dead-letter reasons, typed values, aggregate
//! inputs, the binary group-key encoding and key groups.
//!
//! A group key is encoded once at the source shard into a compact byte string; that string is
//! hashed to pick the owning shard, used as the in-memory map key and as the suffix of the
//! RocksDB key, and decoded back into columns only when a closed window is written out.

use serde::{Deserialize, Serialize};

/// Event time and window bounds: microseconds since the Unix epoch, UTC.
pub type EventTime = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Int,
    Float,
    Bool,
    Timestamp,
}

impl FieldType {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
        }
    }
}

/// How the event-time field is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// Detected from each value.
    Auto,
    Rfc3339,
    EpochSeconds,
    EpochMillis,
    EpochMicros,
}

/// Why a record went to the dead-letter sink (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeadLetterReason {
    Decode,
    Schema,
    EventTime,
    Late,
    Sink,
    /// A Kafka tombstone (empty value) on a change-event source: Debezium writes one after
    /// each delete for log compaction; it carries no change to apply.
    Tombstone,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 6] = [Self::Decode, Self::Schema, Self::EventTime, Self::Late, Self::Sink, Self::Tombstone];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Schema => "schema",
            Self::EventTime => "event_time",
            Self::Late => "late",
            Self::Sink => "sink",
            Self::Tombstone => "tombstone",
        }
    }
}

/// A typed column value as written to a sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Str(String),
    Int(i64),
    /// Stored by its bits: JSON (the pending-output encoding) has no inf or NaN, and a float
    /// sum can overflow to inf. Unreadable pending output would block recovery.
    Float(#[serde(with = "f64_bits")] f64),
    Bool(bool),
    /// Microseconds since the Unix epoch, UTC.
    Time(i64),
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// A numeric aggregate input. `Copy` and 16 bytes, so records carry inputs without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Null,
    Int(i64),
    Float(f64),
}

const TAG_NULL: u8 = 0;
const TAG_STR: u8 = 1;
const TAG_INT: u8 = 2;
const TAG_BOOL: u8 = 3;
const TAG_TIME: u8 = 4;
const TAG_FLOAT: u8 = 5;

/// Appends one group-key component to `out`.
pub fn encode_key_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(TAG_STR);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

pub fn encode_key_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(TAG_NULL),
        Value::Str(s) => encode_key_str(out, s.as_bytes()),
        Value::Int(i) => {
            out.push(TAG_INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(TAG_FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Bool(b) => {
            out.push(TAG_BOOL);
            out.push(*b as u8);
        }
        Value::Time(t) => {
            out.push(TAG_TIME);
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
}

/// Length of the encoded value at the start of `bytes` and whether it is NULL, without decoding
/// it; `None` when `bytes` does not start with a whole value made by [`encode_key_value`].
pub fn encoded_value_len(bytes: &[u8]) -> Option<(usize, bool)> {
    let (&tag, rest) = bytes.split_first()?;
    let body = match tag {
        TAG_NULL => 0,
        TAG_STR => 4 + u32::from_le_bytes(*rest.first_chunk::<4>()?) as usize,
        TAG_INT | TAG_TIME | TAG_FLOAT => 8,
        TAG_BOOL => 1,
        _ => return None,
    };
    (rest.len() >= body).then_some((1 + body, tag == TAG_NULL))
}

/// Error for a key that was not produced by [`encode_key_value`]: state corruption, an internal bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt group key encoding at byte {0} (internal error: the state store holds a key this version cannot read)")]
pub struct KeyDecodeError(pub usize);

/// Decodes a key made by the `encode_key_*` functions back into its values.
pub fn decode_key(mut bytes: &[u8]) -> Result<Vec<Value>, KeyDecodeError> {
    let total = bytes.len();
    let mut values = Vec::new();
    let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>, KeyDecodeError> {
        if b.len() < n {
            return Err(KeyDecodeError(total - b.len()));
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Ok(head.to_vec())
    };
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        let at = total - bytes.len();
        let value = match tag {
            TAG_NULL => Value::Null,
            TAG_STR => {
                let len = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().unwrap()) as usize;
                let raw = take(&mut bytes, len)?;
                Value::Str(String::from_utf8(raw).map_err(|_| KeyDecodeError(at))?)
            }
            TAG_INT => Value::Int(i64::from_le_bytes(take(&mut bytes, 8)?.try_into().unwrap())),
            TAG_FLOAT => Value::Float(f64::from_le_bytes(take(&mut bytes, 8)?.try_into().unwrap())),
            TAG_TIME => Value::Time(i64::from_le_bytes(take(&mut bytes, 8)?.try_into().unwrap())),
            TAG_BOOL => Value::Bool(take(&mut bytes, 1)?[0] != 0),
            _ => return Err(KeyDecodeError(at - 1)),
        };
        values.push(value);
    }
    Ok(values)
}

/// A time as an 8-byte key prefix that sorts like the time (big endian, sign bit flipped), so
/// entries up to a time are one key range.
pub fn encode_time_key(t: EventTime) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn decode_time_key(b: [u8; 8]) -> EventTime {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// Stable 64-bit hash of a group key. Stable across runs and builds (xxh3 is a fixed
/// algorithm), because the key → shard mapping decides which shard's state holds the key.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Keyed state is split into a fixed number of key groups, chosen when the state is created
/// and stored with it; a shard owns a contiguous range of them. Changing the shard count
/// between runs only moves whole groups between shards, so the state written by any shard
/// count can be read back by any other (at most `count` shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyGroups {
    count: u32,
}

impl KeyGroups {
    /// The number of key groups of a new state store.
    pub const DEFAULT: KeyGroups = KeyGroups { count: 256 };

    /// `None` for 0 or more than 65,536 groups.
    pub fn new(count: u32) -> Option<KeyGroups> {
        (1..=1 << 16).contains(&count).then_some(KeyGroups { count })
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// The key group of an encoded group key.
    #[inline]
    pub fn group_of(self, key: &[u8]) -> u32 {
        (key_hash(key) % self.count as u64) as u32
    }

    /// The shard that owns key group `group` among `shards` (≤ `count`): shard `i` owns groups
    /// `[ceil(i·count/shards), ceil((i+1)·count/shards))`.
    #[inline]
    pub fn owner(self, group: u32, shards: usize) -> usize {
        (group as u64 * shards as u64 / self.count as u64) as usize
    }

    /// The shard that owns `key` among `shards`.
    #[inline]
    pub fn shard_for_key(self, key: &[u8], shards: usize) -> usize {
        self.owner(self.group_of(key), shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            ".{0,20}".prop_map(Value::Str),
            any::<i64>().prop_map(Value::Int),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Time),
            (-1e12f64..1e12).prop_map(Value::Float),
        ]
    }

    proptest! {
        #[test]
        fn key_round_trips(values in proptest::collection::vec(arb_value(), 0..6)) {
            let mut buf = Vec::new();
            for v in &values { encode_key_value(&mut buf, v); }
            prop_assert_eq!(decode_key(&buf).unwrap(), values);
        }

        #[test]
        fn distinct_values_encode_distinctly(a in arb_value(), b in arb_value()) {
            let (mut ka, mut kb) = (Vec::new(), Vec::new());
            encode_key_value(&mut ka, &a);
            encode_key_value(&mut kb, &b);
            prop_assert_eq!(ka == kb, a == b);
        }
    }

    #[test]
    fn every_float_survives_the_pending_encoding() {
        for f in [0.1, -0.0, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN_POSITIVE] {
            let json = serde_json::to_string(&Value::Float(f)).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), Value::Float(f), "{json}");
        }
        let nan = serde_json::to_string(&Value::Float(f64::NAN)).unwrap();
        assert!(matches!(serde_json::from_str::<Value>(&nan).unwrap(), Value::Float(x) if x.is_nan()));
    }

    #[test]
    fn truncated_key_is_an_error() {
        let mut buf = Vec::new();
        encode_key_str(&mut buf, b"hello");
        assert!(decode_key(&buf[..buf.len() - 1]).is_err());
        assert!(decode_key(&[9]).is_err());
    }

    #[test]
    fn shard_for_key_is_in_range_and_stable() {
        let groups = KeyGroups::DEFAULT;
        for n in 1..8 {
            let s = groups.shard_for_key(b"\x01\x03\0\0\0abc", n);
            assert!(s < n);
            assert_eq!(s, groups.shard_for_key(b"\x01\x03\0\0\0abc", n));
        }
    }

    #[test]
    fn key_groups_bounds() {
        assert_eq!(KeyGroups::new(0), None);
        assert_eq!(KeyGroups::new((1 << 16) + 1), None);
        assert_eq!(KeyGroups::new(256), Some(KeyGroups::DEFAULT));
    }

    proptest! {
        /// Every shard count splits the groups into contiguous, non-empty, ordered ranges that
        /// cover them all, and a key stays in its group whatever the shard count.
        #[test]
        fn shards_own_contiguous_ranges_of_key_groups(count in 1u32..600, shards in 1usize..64, key in proptest::collection::vec(any::<u8>(), 0..20)) {
            prop_assume!(shards as u32 <= count);
            let groups = KeyGroups::new(count).unwrap();
            let owners: Vec<usize> = (0..count).map(|g| groups.owner(g, shards)).collect();
            prop_assert_eq!(owners[0], 0);
            prop_assert_eq!(*owners.last().unwrap(), shards - 1);
            for w in owners.windows(2) {
                prop_assert!(w[1] == w[0] || w[1] == w[0] + 1, "ranges are contiguous and none is empty: {:?}", w);
            }
            let g = groups.group_of(&key);
            prop_assert!(g < count);
            prop_assert_eq!(groups.shard_for_key(&key, shards), owners[g as usize]);
        }
    }
}
