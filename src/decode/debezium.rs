//! Debezium JSON change events → the changed row, its operation and its source position.
//!
//! A message is the change-event envelope `{"before": {...}, "after": {...}, "source": {...},
//! "op": "u", "ts_ms": ...}`, or the same wrapped as `{"schema": {...}, "payload": {...}}` (the
//! JSON converter with `schemas.enable = true`). The row a change carries is `after` for
//! `c` (create), `u` (update) and `r` (snapshot read), `before` for `d` (delete); it fills the
//! decoder's slots exactly as a JSON row does, typed by the source's schema. In `after` every
//! schema field must be present (JSON `null` is a database NULL); in `before` of a delete the
//! fields other than the primary key may be missing (Postgres' default replica identity
//! sends only the key).
//!
//! Event time is `source.ts_ms` (when the change happened in the database), else the
//! envelope's `ts_ms` (when the connector saw it), both epoch milliseconds.
//!
//! The position orders the changes of one key: the values of the configured fields
//! (`source.lsn` by default), each an integer or a string, encoded so that comparing the
//! encodings byte-wise compares the values in order (integers numerically, strings
//! byte-wise, an integer before any string) — see [`encode_position_int`].
//!
//! Parsing is one pass of serde over the message with the decoder's reused buffers; no
//! allocation per message in the steady state.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::{DecodeError, RowSeed, Slot};
use crate::config::PositionField;
use crate::types::{DeadLetterReason, EventTime, FieldType, TimeFormat};

/// What a change event does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// `c`: a row was inserted.
    Create,
    /// `u`: a row was updated.
    Update,
    /// `d`: a row was deleted.
    Delete,
    /// `r`: a row read by the connector's initial snapshot.
    Read,
}

impl ChangeOp {
    fn parse(op: &str) -> Option<ChangeOp> {
        Some(match op {
            "c" => ChangeOp::Create,
            "u" => ChangeOp::Update,
            "d" => ChangeOp::Delete,
            "r" => ChangeOp::Read,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Create => "c",
            ChangeOp::Update => "u",
            ChangeOp::Delete => "d",
            ChangeOp::Read => "r",
        }
    }
}

/// Appends the order-preserving encoding of an integer position component.
pub fn encode_position_int(out: &mut Vec<u8>, v: i64) {
    out.push(0x01);
    out.extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
}

/// Appends the order-preserving encoding of a string position component: its bytes with 0x00
/// escaped as 0x00 0xFF, then 0x00 0x01, so a prefix sorts before its extensions and the
/// components after it do not disturb the order.
pub fn encode_position_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(0x02);
    for &b in s {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// A scalar read from the envelope (a position component or a `ts_ms`), encoded as a position
/// component into the buffer it was read with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    Missing,
    Null,
    Int(i64),
    Str,
    /// Neither an integer nor a string: what it was.
    Bad(&'static str),
}

/// The decoder's Debezium state, reused for every message.
pub(super) struct ChangeDecoder {
    position_fields: Vec<PositionField>,
    /// Slots of `before`, parallel to the decoder's slots (which take `after`).
    before: Vec<Slot>,
    /// Per position field: what was found, and its encoding.
    parts: Vec<(Scalar, Vec<u8>)>,
    /// `ts_ms` of `source` and of the envelope.
    source_ts_ms: Scalar,
    ts_ms: Scalar,
    op: OpSeen,
    /// The op text when it is not a row change (for the error message).
    op_text: String,
    /// Whether `before` / `after` were objects.
    has_before: bool,
    has_after: bool,
    /// The message was the wrapper with `"payload": null`.
    null_payload: bool,
    /// The last decoded change.
    pub(super) change: Option<ChangeOp>,
    pub(super) position: Vec<u8>,
    scratch_ts: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpSeen {
    Missing,
    Known(ChangeOp),
    Unknown,
    NotAString(&'static str),
}

impl ChangeDecoder {
    pub(super) fn new(position_fields: Vec<PositionField>, fields: usize) -> ChangeDecoder {
        ChangeDecoder {
            parts: position_fields.iter().map(|_| (Scalar::Missing, Vec::with_capacity(16))).collect(),
            position_fields,
            before: vec![Slot::Missing; fields],
            source_ts_ms: Scalar::Missing,
            ts_ms: Scalar::Missing,
            op: OpSeen::Missing,
            op_text: String::new(),
            has_before: false,
            has_after: false,
            null_payload: false,
            change: None,
            position: Vec::with_capacity(32),
            scratch_ts: Vec::with_capacity(16),
        }
    }

    fn reset(&mut self) {
        self.before.iter_mut().for_each(|s| *s = Slot::Missing);
        for (scalar, bytes) in &mut self.parts {
            *scalar = Scalar::Missing;
            bytes.clear();
        }
        self.source_ts_ms = Scalar::Missing;
        self.ts_ms = Scalar::Missing;
        self.op = OpSeen::Missing;
        self.op_text.clear();
        self.has_before = false;
        self.has_after = false;
        self.null_payload = false;
        self.change = None;
        self.position.clear();
    }
}

fn schema_error(message: String) -> DecodeError {
    DecodeError {
        reason: DeadLetterReason::Schema,
        message,
    }
}

impl super::SourceDecoder {
    /// Decodes one Debezium change event into the slots (the row), the change op and the
    /// position. Called by [`super::SourceDecoder::decode`] for Debezium sources.
    pub(super) fn decode_change(&mut self, payload: &[u8]) -> Result<EventTime, DecodeError> {
        let Some(cdc) = self.change.as_deref_mut() else {
            return Err(schema_error("internal error: not a Debezium source".into()));
        };
        cdc.reset();
        if payload.iter().all(u8::is_ascii_whitespace) || payload.trim_ascii() == b"null" {
            return Err(tombstone());
        }
        let mut de = serde_json::Deserializer::from_slice(payload);
        let seed = MessageSeed {
            names: &self.names,
            types: &self.types,
            after: &mut self.slots,
            scratch: &mut self.scratch,
            base: payload.as_ptr() as usize,
            cdc,
            wrapped: false,
        };
        if let Err(e) = seed.deserialize(&mut de).and_then(|()| de.end()) {
            return Err(DecodeError {
                reason: DeadLetterReason::Decode,
                message: format!("invalid JSON: {e}; each message must be one Debezium change event (a JSON object)"),
            });
        }
        if cdc.null_payload {
            return Err(tombstone());
        }
        let op = match cdc.op {
            OpSeen::Known(op) => op,
            OpSeen::Missing => {
                return Err(schema_error(
                    "the message has no \"op\": not a Debezium change event (expected {\"before\", \"after\", \"source\", \"op\", \"ts_ms\"}, \
                     optionally wrapped as {\"schema\", \"payload\"})"
                        .into(),
                ))
            }
            OpSeen::Unknown => {
                return Err(schema_error(format!(
                    "op \"{}\" is not a row change; only c (create), u (update), d (delete) and r (snapshot read) are applied",
                    cdc.op_text
                )))
            }
            OpSeen::NotAString(found) => return Err(schema_error(format!("\"op\" must be a string (c, u, d or r), found {found}"))),
        };
        // The row: `after`, or `before` of a delete (copied into the slots).
        if op == ChangeOp::Delete {
            if !cdc.has_before {
                return Err(schema_error(
                    "a delete (op \"d\") needs the deleted row's key in \"before\", which is null or missing; \
                     set REPLICA IDENTITY (Postgres) or binlog_row_image (MySQL) so deletes carry the key"
                        .into(),
                ));
            }
            self.slots.copy_from_slice(&cdc.before);
        } else if !cdc.has_after {
            return Err(schema_error(format!(
                "op \"{}\" needs the new row in \"after\", which is null or missing",
                op.as_str()
            )));
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let problem = match slot {
                Slot::Missing if op != ChangeOp::Delete => "is missing".to_string(),
                Slot::Bad(found) => format!("must be {}, found {found}", super::type_phrase(self.types[i])),
                _ => continue,
            };
            let row = if op == ChangeOp::Delete { "before" } else { "after" };
            return Err(schema_error(format!(
                "field \"{}\" of \"{row}\" {problem}; the source schema requires it",
                self.names[i]
            )));
        }
        for (field, (scalar, bytes)) in cdc.position_fields.iter().zip(&cdc.parts) {
            match scalar {
                Scalar::Int(_) | Scalar::Str => cdc.position.extend_from_slice(bytes),
                Scalar::Missing | Scalar::Null => {
                    return Err(schema_error(format!(
                        "position field \"{field}\" is {}; set the source's position to the fields ordering this connector's changes \
                         (Postgres: [\"source.lsn\"], MySQL: [\"source.file\", \"source.pos\", \"source.row\"])",
                        if *scalar == Scalar::Null { "null" } else { "missing" }
                    )))
                }
                Scalar::Bad(found) => {
                    return Err(schema_error(format!(
                        "position field \"{field}\" must be an integer or a string, found {found}"
                    )));
                }
            }
        }
        let ts = match (cdc.source_ts_ms, cdc.ts_ms) {
            (Scalar::Int(ms), _) | (_, Scalar::Int(ms)) => ms.checked_mul(1000),
            _ => None,
        };
        let Some(event_time) = ts else {
            return Err(DecodeError {
                reason: DeadLetterReason::EventTime,
                message: "the change event has no valid \"source.ts_ms\" or \"ts_ms\" (epoch milliseconds) to take its event time from".into(),
            });
        };
        cdc.change = Some(op);
        Ok(event_time)
    }
}

fn tombstone() -> DecodeError {
    DecodeError {
        reason: DeadLetterReason::Tombstone,
        message: "Kafka tombstone (empty value): Debezium writes one after each delete so log compaction can drop the key; \
                  the delete itself was the change event before it, so there is nothing to apply"
            .into(),
    }
}

/// The whole message: the envelope, or `{"schema": ..., "payload": <envelope>}`.
struct MessageSeed<'a> {
    names: &'a [Box<str>],
    types: &'a [FieldType],
    after: &'a mut [Slot],
    scratch: &'a mut String,
    base: usize,
    cdc: &'a mut ChangeDecoder,
    /// Inside the wrapper's `payload`.
    wrapped: bool,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// What a key of the envelope is.
enum EnvelopeKey {
    Before,
    After,
    Op,
    TsMs,
    Source,
    /// `payload` or `schema` of the wrapper (outside it only).
    Payload,
    Schema,
    /// A top-level position field (by index).
    Position(usize),
    /// An object holding position fields (the index of one of them).
    Object(usize),
    Other,
}

struct EnvelopeKeySeed<'a> {
    fields: &'a [PositionField],
    wrapped: bool,
}

impl<'de> DeserializeSeed<'de> for EnvelopeKeySeed<'_> {
    type Value = EnvelopeKey;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<EnvelopeKey, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeKeySeed<'_> {
    type Value = EnvelopeKey;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvelopeKey, E> {
        Ok(match v {
            "before" => EnvelopeKey::Before,
            "after" => EnvelopeKey::After,
            "op" => EnvelopeKey::Op,
            "ts_ms" => EnvelopeKey::TsMs,
            "source" => EnvelopeKey::Source,
            "payload" if !self.wrapped => EnvelopeKey::Payload,
            "schema" if !self.wrapped => EnvelopeKey::Schema,
            _ => {
                if let Some(i) = self.fields.iter().position(|f| f.object.is_none() && f.field == v) {
                    EnvelopeKey::Position(i)
                } else if let Some(i) = self.fields.iter().position(|f| f.object.as_deref() == Some(v)) {
                    EnvelopeKey::Object(i)
                } else {
                    EnvelopeKey::Other
                }
            }
        })
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Debezium change event (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let MessageSeed {
            names,
            types,
            after,
            scratch,
            base,
            cdc,
            wrapped,
        } = self;
        while let Some(key) = map.next_key_seed(EnvelopeKeySeed {
            fields: &cdc.position_fields,
            wrapped,
        })? {
            match key {
                EnvelopeKey::Before | EnvelopeKey::After => {
                    let is_after = matches!(key, EnvelopeKey::After);
                    let slots: &mut [Slot] = if is_after { &mut *after } else { &mut cdc.before };
                    let row = OrNull {
                        seed: RowSeed {
                            names,
                            types,
                            time_format: TimeFormat::Auto,
                            slots,
                            scratch,
                            base,
                        },
                        what: "a row object",
                    };
                    let present = map.next_value_seed(row)?;
                    if is_after {
                        cdc.has_after = present;
                    } else {
                        cdc.has_before = present;
                    }
                }
                EnvelopeKey::Op => {
                    cdc.op = map.next_value_seed(OpSeed(&mut cdc.op_text))?;
                }
                EnvelopeKey::TsMs => {
                    // The envelope's ts_ms may also be a position field.
                    match cdc.position_fields.iter().position(|f| f.object.is_none() && f.field == "ts_ms") {
                        Some(i) => {
                            let (scalar, bytes) = &mut cdc.parts[i];
                            *scalar = map.next_value_seed(ScalarSeed(bytes))?;
                            cdc.ts_ms = *scalar;
                        }
                        None => {
                            cdc.scratch_ts.clear();
                            cdc.ts_ms = map.next_value_seed(ScalarSeed(&mut cdc.scratch_ts))?;
                        }
                    }
                }
                EnvelopeKey::Source => map.next_value_seed(ObjectSeed { object: None, cdc })?,
                EnvelopeKey::Object(i) => map.next_value_seed(ObjectSeed { object: Some(i), cdc })?,
                EnvelopeKey::Position(i) => {
                    let (scalar, bytes) = &mut cdc.parts[i];
                    *scalar = map.next_value_seed(ScalarSeed(bytes))?;
                }
                EnvelopeKey::Payload => {
                    let inner = MessageSeed {
                        names,
                        types,
                        after: &mut *after,
                        scratch: &mut *scratch,
                        base,
                        cdc: &mut *cdc,
                        wrapped: true,
                    };
                    if !map.next_value_seed(OrNull {
                        seed: inner,
                        what: "a change event object",
                    })? {
                        cdc.null_payload = true;
                    }
                }
                EnvelopeKey::Schema | EnvelopeKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A value read by `seed` (a row object, the wrapper's payload), or `null`: returns whether it
/// was there. `what` names the expected value in errors.
struct OrNull<S> {
    seed: S,
    what: &'static str,
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for OrNull<S> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for OrNull<S> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} or null", self.what)
    }
    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        self.seed.deserialize(d).map(|()| true)
    }
}

/// An object of the envelope holding position fields: `source` (`None`; it also holds
/// `ts_ms`), or the object of position field `Some(i)`.
struct ObjectSeed<'a> {
    object: Option<usize>,
    cdc: &'a mut ChangeDecoder,
}

impl ObjectSeed<'_> {
    fn name(&self) -> &str {
        match self.object {
            None => "source",
            Some(i) => self.cdc.position_fields[i].object.as_deref().unwrap_or_default(),
        }
    }
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A key of such an object: the position field it is (by index), and whether it is
/// `source.ts_ms`.
struct ObjectKeySeed<'a> {
    object: &'a str,
    fields: &'a [PositionField],
}

impl<'de> DeserializeSeed<'de> for ObjectKeySeed<'_> {
    type Value = (Option<usize>, bool);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for ObjectKeySeed<'_> {
    type Value = (Option<usize>, bool);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let position = self.fields.iter().position(|f| f.object.as_deref() == Some(self.object) && f.field == v);
        Ok((position, self.object == "source" && v == "ts_ms"))
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an object \"{}\"", self.name())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(()) // its fields count as missing
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let object = self.object;
        let cdc = self.cdc;
        loop {
            let name = match object {
                None => "source",
                Some(i) => cdc.position_fields[i].object.as_deref().unwrap_or_default(),
            };
            let Some((position, is_ts)) = map.next_key_seed(ObjectKeySeed {
                object: name,
                fields: &cdc.position_fields,
            })?
            else {
                break;
            };
            match position {
                Some(i) => {
                    let (scalar, bytes) = &mut cdc.parts[i];
                    *scalar = map.next_value_seed(ScalarSeed(bytes))?;
                    if is_ts {
                        cdc.source_ts_ms = *scalar;
                    }
                }
                None if is_ts => {
                    cdc.scratch_ts.clear();
                    cdc.source_ts_ms = map.next_value_seed(ScalarSeed(&mut cdc.scratch_ts))?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
}

/// An integer or string, encoded as a position component into the buffer.
struct ScalarSeed<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_> {
    type Value = Scalar;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed<'_> {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer or a string")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        encode_position_int(self.0, v);
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Ok(Scalar::Bad("an integer above 2^63 - 1")),
        }
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Bad("a fractional number"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        encode_position_str(self.0, v.as_bytes());
        Ok(Scalar::Str)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bad("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Bad("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Bad("an array"))
    }
}

/// `"op"`: a string, kept when it is not a row change.
struct OpSeed<'a>(&'a mut String);

impl<'de> DeserializeSeed<'de> for OpSeed<'_> {
    type Value = OpSeen;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<OpSeen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OpSeed<'_> {
    type Value = OpSeen;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an op string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<OpSeen, E> {
        Ok(match ChangeOp::parse(v) {
            Some(op) => OpSeen::Known(op),
            None => {
                self.0.clear();
                self.0.extend(v.chars().take(32));
                OpSeen::Unknown
            }
        })
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<OpSeen, E> {
        Ok(OpSeen::NotAString("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<OpSeen, E> {
        Ok(OpSeen::NotAString("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<OpSeen, E> {
        Ok(OpSeen::NotAString("a number"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<OpSeen, E> {
        Ok(OpSeen::NotAString("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<OpSeen, E> {
        Ok(OpSeen::NotAString("null"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OpSeen, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(OpSeen::NotAString("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OpSeen, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(OpSeen::NotAString("an array"))
    }
}

#[cfg(test)]
mod tests;
