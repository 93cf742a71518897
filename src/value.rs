//! Typed values, aggregate inputs and the binary group-key encoding.
//!
//! A group key is encoded once at the source shard into a compact byte string; that string is
//! hashed to pick the owning shard, used as the in-memory map key and as the suffix of the
//! RocksDB key, and decoded back into columns only when a closed window is written out.

use serde::{Deserialize, Serialize};

/// Event time and window bounds: microseconds since the Unix epoch, UTC.
pub type EventTime = i64;

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

/// Stable 64-bit hash of a group key. Stable across runs and builds (xxh3 is a fixed
/// algorithm), because the key → shard mapping decides which shard's state holds the key.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The shard that owns `key` among `shards`.
pub fn shard_for_key(key: &[u8], shards: usize) -> usize {
    (key_hash(key) % shards as u64) as usize
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
        for n in 1..8 {
            let s = shard_for_key(b"\x01\x03\0\0\0abc", n);
            assert!(s < n);
            assert_eq!(s, shard_for_key(b"\x01\x03\0\0\0abc", n));
        }
    }
}
