//! bytes → typed row. One [`SourceDecoder`] per source per shard, reused for every message.
//!
//! Decoding fills a fixed slot per schema field; strings are kept as byte ranges into the
//! payload (or into a scratch buffer when JSON escapes force a copy), so the steady state
//! allocates nothing per event. Anything that does not fit the schema becomes a
//! [`DecodeError`] whose [`DeadLetterReason`] says which stage rejected it.

mod debezium;

use std::fmt;

pub use debezium::{encode_position_int, encode_position_str, ChangeOp};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::config::{Format, SourceConfig};
use crate::time::{epoch_int_to_micros, epoch_number_to_micros, parse_rfc3339_micros};
use crate::types::{encode_key_str, encode_key_value, DeadLetterReason, EventTime, Num, Value};
use crate::types::{FieldType, TimeFormat};

/// A record that does not fit its source's schema. The message names the field and the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub reason: DeadLetterReason,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Missing,
    Null,
    /// Byte range into the payload (`owned == false`) or into the scratch buffer.
    Str {
        owned: bool,
        start: u32,
        end: u32,
    },
    Int(i64),
    Float(f64),
    Bool(bool),
    Time(EventTime),
    /// The JSON value had the wrong type; the text says what was found.
    Bad(&'static str),
}

pub struct SourceDecoder {
    names: Vec<Box<str>>,
    types: Vec<FieldType>,
    /// JSON rows: the schema index of the event-time field (`None` for change events, whose
    /// time is in the envelope).
    event_time_field: Option<usize>,
    time_format: TimeFormat,
    slots: Vec<Slot>,
    scratch: String,
    /// Debezium sources: the envelope's state and the last change's op and position.
    change: Option<Box<debezium::ChangeDecoder>>,
}

/// 0001-01-01T00:00:00Z in µs since the Unix epoch: the earliest event time accepted.
pub const MIN_EVENT_TIME: EventTime = -62_135_596_800_000_000;
/// 9999-12-31T23:59:59.999999Z: the latest. Window arithmetic (alignment, ends, calendar
/// periods) stays far from i64's limits in between.
pub const MAX_EVENT_TIME: EventTime = 253_402_300_799_999_999;

impl SourceDecoder {
    /// Panics only if the config was not compiled (event-time field missing from the schema
    /// of a JSON source), which the config compiler rules out.
    pub fn new(source: &SourceConfig) -> Self {
        let names: Vec<Box<str>> = source.schema.iter().map(|f| f.name.as_str().into()).collect();
        let (event_time_field, change) = match &source.format {
            Format::Json => {
                let field = names
                    .iter()
                    .position(|n| **n == *source.event_time.field)
                    .expect("config compiler checks that the event-time field is in the schema");
                (Some(field), None)
            }
            Format::Debezium(d) => (None, Some(Box::new(debezium::ChangeDecoder::new(d.position.clone(), names.len())))),
        };
        SourceDecoder {
            types: source.schema.iter().map(|f| f.ty).collect(),
            slots: vec![Slot::Missing; names.len()],
            names,
            event_time_field,
            time_format: source.event_time.format,
            scratch: String::new(),
            change,
        }
    }

    /// The op and the encoded source position of the last decoded change event (Debezium
    /// sources; `None` for JSON rows or after a decode error).
    pub fn change(&self) -> Option<(ChangeOp, &[u8])> {
        let cdc = self.change.as_deref()?;
        Some((cdc.change?, &cdc.position))
    }

    /// Whether field `idx` of the last decoded row is null or missing.
    pub fn is_null(&self, idx: usize) -> bool {
        matches!(self.slots[idx], Slot::Missing | Slot::Null)
    }

    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| **n == *name)
    }

    /// Decodes `payload`; on success the row's fields are readable until the next call.
    pub fn decode(&mut self, payload: &[u8]) -> Result<EventTime, DecodeError> {
        self.slots.iter_mut().for_each(|s| *s = Slot::Missing);
        self.scratch.clear();
        if self.change.is_some() {
            return self.decode_change(payload);
        }
        let mut de = serde_json::Deserializer::from_slice(payload);
        let seed = RowSeed {
            names: &self.names,
            types: &self.types,
            time_format: self.time_format,
            slots: &mut self.slots,
            scratch: &mut self.scratch,
            base: payload.as_ptr() as usize,
        };
        let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(DecodeError {
                reason: DeadLetterReason::Decode,
                message: format!("invalid JSON: {e}; each message must be one JSON object"),
            });
        }
        let event_time = self.event_time(payload)?;
        for (i, slot) in self.slots.iter().enumerate() {
            let problem = match slot {
                Slot::Missing => "is missing".to_string(),
                Slot::Null => "is null".to_string(),
                Slot::Bad(found) => format!("must be {}, found {found}", type_phrase(self.types[i])),
                _ => continue,
            };
            if Some(i) == self.event_time_field {
                continue;
            }
            return Err(DecodeError {
                reason: DeadLetterReason::Schema,
                message: format!("field \"{}\" {problem}; the source schema requires it", self.names[i]),
            });
        }
        Ok(event_time)
    }

    fn event_time(&self, payload: &[u8]) -> Result<EventTime, DecodeError> {
        let Some(field) = self.event_time_field else {
            return Err(DecodeError {
                reason: DeadLetterReason::EventTime,
                message: "internal error: a JSON source without an event-time field".into(),
            });
        };
        let name = &self.names[field];
        let t = match self.slots[field] {
            Slot::Time(t) => Some(t),
            Slot::Int(v) => epoch_int_to_micros(v, self.time_format),
            Slot::Float(v) => epoch_number_to_micros(v, self.time_format),
            // A field declared "string" (or a number written as a string): RFC 3339, or digits
            // read as an epoch number in the configured unit.
            Slot::Str { owned, start, end } => std::str::from_utf8(self.str_bytes(payload, owned, start, end)).ok().and_then(|text| {
                parse_rfc3339_micros(text).or_else(|| {
                    let v: i64 = text.trim().parse().ok()?;
                    epoch_int_to_micros(v, self.time_format)
                })
            }),
            Slot::Missing | Slot::Null => {
                return Err(DecodeError {
                    reason: DeadLetterReason::EventTime,
                    message: format!("event-time field \"{name}\" is missing or null"),
                });
            }
            _ => None,
        };
        if let Some(t) = t.filter(|t| !(MIN_EVENT_TIME..=MAX_EVENT_TIME).contains(t)) {
            return Err(DecodeError {
                reason: DeadLetterReason::EventTime,
                message: format!(
                    "event-time field \"{name}\" is {t} µs since 1970, outside the years 1 to 9999 that windows can be computed for; fix the producer (or the event_time format: epoch seconds, millis or micros)"
                ),
            });
        }
        t.ok_or_else(|| DecodeError {
            reason: DeadLetterReason::EventTime,
            message: format!(
                "event-time field \"{name}\" is not a valid time: expected an RFC 3339 string (e.g. \"2026-11-23T20:00:00Z\") or epoch seconds/millis/micros"
            ),
        })
    }

    fn str_bytes<'a>(&'a self, payload: &'a [u8], owned: bool, start: u32, end: u32) -> &'a [u8] {
        let range = start as usize..end as usize;
        if owned {
            &self.scratch.as_bytes()[range]
        } else {
            &payload[range]
        }
    }

    /// Appends field `idx` of the last decoded row to a group key.
    pub fn write_key_component(&self, payload: &[u8], idx: usize, out: &mut Vec<u8>) {
        match self.slots[idx] {
            Slot::Str { owned, start, end } => encode_key_str(out, self.str_bytes(payload, owned, start, end)),
            slot => encode_key_value(out, &slot_value(slot)),
        }
    }

    /// Field `idx` of the last decoded row as an aggregate input.
    pub fn num(&self, idx: usize) -> Num {
        match self.slots[idx] {
            Slot::Int(v) => Num::Int(v),
            Slot::Float(v) => Num::Float(v),
            Slot::Time(v) => Num::Int(v),
            _ => Num::Null,
        }
    }

    /// The last decoded row, readable by SQL expressions (`where`, aggregate filters) without
    /// allocating.
    pub fn row<'a>(&'a self, payload: &'a [u8]) -> DecodedRow<'a> {
        DecodedRow { decoder: self, payload }
    }

    /// Field `idx` of the last decoded row as an owned value (tests and slow paths).
    pub fn value(&self, payload: &[u8], idx: usize) -> Value {
        match self.slots[idx] {
            Slot::Str { owned, start, end } => Value::Str(String::from_utf8_lossy(self.str_bytes(payload, owned, start, end)).into_owned()),
            slot => slot_value(slot),
        }
    }
}

fn slot_value(slot: Slot) -> Value {
    match slot {
        Slot::Int(v) => Value::Int(v),
        Slot::Float(v) => Value::Float(v),
        Slot::Bool(v) => Value::Bool(v),
        Slot::Time(v) => Value::Time(v),
        _ => Value::Null,
    }
}

fn type_phrase(ty: FieldType) -> &'static str {
    match ty {
        FieldType::String => "a string",
        FieldType::Int => "an integer",
        FieldType::Float => "a number",
        FieldType::Bool => "a boolean",
        FieldType::Timestamp => "a timestamp (RFC 3339 string or epoch number)",
    }
}

struct RowSeed<'a> {
    names: &'a [Box<str>],
    types: &'a [FieldType],
    time_format: TimeFormat,
    slots: &'a mut [Slot],
    scratch: &'a mut String,
    base: usize,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(idx) = map.next_key_seed(KeySeed(self.names))? {
            match idx {
                Some(i) => {
                    let seed = FieldSeed {
                        ty: self.types[i],
                        time_format: self.time_format,
                        scratch: self.scratch,
                        base: self.base,
                    };
                    self.slots[i] = map.next_value_seed(seed)?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Resolves an object key to a schema field index without allocating.
struct KeySeed<'a>(&'a [Box<str>]);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| **n == *v))
    }
}

struct FieldSeed<'a> {
    ty: FieldType,
    time_format: TimeFormat,
    scratch: &'a mut String,
    base: usize,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Slot;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Slot;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot, E> {
        match self.ty {
            FieldType::String => {
                let start = v.as_ptr() as usize - self.base;
                Ok(Slot::Str {
                    owned: false,
                    start: start as u32,
                    end: (start + v.len()) as u32,
                })
            }
            _ => self.visit_str(v),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot, E> {
        Ok(match self.ty {
            FieldType::String => {
                let start = self.scratch.len();
                self.scratch.push_str(v);
                Slot::Str {
                    owned: true,
                    start: start as u32,
                    end: self.scratch.len() as u32,
                }
            }
            FieldType::Timestamp => match parse_rfc3339_micros(v) {
                Some(t) => Slot::Time(t),
                None => Slot::Bad("an unparseable time string"),
            },
            _ => Slot::Bad("a string"),
        })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot, E> {
        Ok(match self.ty {
            FieldType::Int => Slot::Int(v),
            FieldType::Float => Slot::Float(v as f64),
            FieldType::Timestamp => epoch_int_to_micros(v, self.time_format).map_or(Slot::Bad("an out-of-range epoch number"), Slot::Time),
            _ => Slot::Bad("a number"),
        })
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => self.visit_f64(v as f64),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Slot, E> {
        Ok(match self.ty {
            FieldType::Float => Slot::Float(v),
            FieldType::Timestamp => epoch_number_to_micros(v, self.time_format).map_or(Slot::Bad("an out-of-range epoch number"), Slot::Time),
            FieldType::Int => Slot::Bad("a fractional number"),
            _ => Slot::Bad("a number"),
        })
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Slot, E> {
        Ok(match self.ty {
            FieldType::Bool => Slot::Bool(v),
            _ => Slot::Bad("a boolean"),
        })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Slot, E> {
        Ok(Slot::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Slot, E> {
        Ok(Slot::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Slot::Bad("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Slot::Bad("an array"))
    }
}

/// The last row a [`SourceDecoder`] decoded, as an expression input; columns are schema fields.
pub struct DecodedRow<'a> {
    decoder: &'a SourceDecoder,
    payload: &'a [u8],
}

impl crate::expr::Row for DecodedRow<'_> {
    fn get(&self, column: usize) -> crate::expr::Val<'_> {
        use crate::expr::Val;
        match self.decoder.slots.get(column) {
            Some(Slot::Str { owned, start, end }) => {
                let bytes = self.decoder.str_bytes(self.payload, *owned, *start, *end);
                // serde_json hands out valid UTF-8; the fallback only guards against misuse.
                Val::Str(std::borrow::Cow::Borrowed(std::str::from_utf8(bytes).unwrap_or_default()))
            }
            Some(Slot::Int(v)) => Val::Int(*v),
            Some(Slot::Float(v)) => Val::Float(*v),
            Some(Slot::Bool(v)) => Val::Bool(*v),
            Some(Slot::Time(v)) => Val::Time(*v),
            _ => Val::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn decoder() -> SourceDecoder {
        let cfg = parse_config(
            r#"
[pipeline]
name = "t"
[[sources]]
name = "clicks"
topic = "clicks"
event_time = { field = "timestamp" }
schema = { user_id = "string", page_url = "string", n = "int", x = "float", ok = "bool", timestamp = "timestamp" }
[[queries]]
name = "q"
from = "clicks"
window = { tumbling = "1m" }
aggregates = [ { name = "c", fn = "count" } ]
sink = "s"
[[sinks]]
name = "s"
kind = "delta"
path = "/tmp/x"
"#,
        )
        .unwrap();
        SourceDecoder::new(&cfg.sources[0])
    }

    #[test]
    fn decodes_typed_fields_and_ignores_extra_keys() {
        let mut d = decoder();
        let p = br#"{"user_id":"u\"1","page_url":"/a","n":3,"x":2,"ok":true,"extra":{"deep":[1]},"timestamp":"1970-01-01T00:00:01Z"}"#;
        assert_eq!(d.decode(p), Ok(1_000_000));
        assert_eq!(d.value(p, 0), Value::Str("u\"1".into()));
        assert_eq!(d.value(p, 1), Value::Str("/a".into()));
        assert_eq!(d.num(2), Num::Int(3));
        assert_eq!(d.num(3), Num::Float(2.0));
        assert_eq!(d.value(p, 4), Value::Bool(true));
        let mut k = Vec::new();
        d.write_key_component(p, 1, &mut k);
        assert_eq!(crate::types::decode_key(&k).unwrap(), vec![Value::Str("/a".into())]);
    }

    /// An event-time field declared "string" decodes like a timestamp one, whether or not its
    /// text has escapes (borrowed or copied by the parser), and digits as an epoch number.
    #[test]
    fn string_typed_event_time_decodes() {
        let text = "[pipeline]\nname = \"p\"\n[[sources]]\nname = \"s\"\ntopic = \"t\"\nschema = { ts = \"string\" }\nevent_time = { field = \"ts\" }\n[[queries]]\nname = \"q\"\nfrom = \"s\"\nwindow = { tumbling = \"1m\" }\naggregates = [{ name = \"n\", fn = \"count\" }]\nsink = \"s\"\n[[sinks]]\nname = \"s\"\nkind = \"delta\"\npath = \"/tmp/x\"\n";
        let cfg = crate::config::parse_config(text).unwrap();
        let mut d = SourceDecoder::new(&cfg.sources[0]);
        assert_eq!(d.decode(br#"{"ts":"1970-01-01T00:00:01Z"}"#), Ok(1_000_000));
        assert_eq!(d.decode(br#"{"ts":"1970-01-01T00:00:02\u005a"}"#), Ok(2_000_000));
        assert_eq!(d.decode(br#"{"ts":"1700000000123"}"#), Ok(1_700_000_000_123_000));
        assert_eq!(d.decode(br#"{"ts":"soon"}"#).unwrap_err().reason, DeadLetterReason::EventTime);
    }

    /// Times windows cannot be computed for are dead letters, never an overflow.
    #[test]
    fn event_times_beyond_the_year_9999_are_refused() {
        let mut d = decoder();
        let p = br#"{"user_id":"u","page_url":"/a","n":3,"x":2.5,"ok":false,"timestamp":9223372036854775807}"#;
        let e = d.decode(p).unwrap_err();
        assert_eq!(e.reason, DeadLetterReason::EventTime);
        assert!(e.message.contains("outside the years 1 to 9999"), "{}", e.message);
        let p = br#"{"user_id":"u","page_url":"/a","n":3,"x":2.5,"ok":false,"timestamp":"9999-12-31T23:59:59Z"}"#;
        assert_eq!(d.decode(p), Ok(253_402_300_799_000_000));
    }

    #[test]
    fn epoch_number_event_time() {
        let mut d = decoder();
        let p = br#"{"user_id":"u","page_url":"/a","n":3,"x":2.5,"ok":false,"timestamp":1700000000123}"#;
        assert_eq!(d.decode(p), Ok(1_700_000_000_123_000));
    }

    #[test]
    fn bad_input_is_classified() {
        let mut d = decoder();
        let cases: [(&[u8], DeadLetterReason, &str); 7] = [
            (b"{\"user_id\":", DeadLetterReason::Decode, "invalid JSON"),
            (b"[1,2]", DeadLetterReason::Decode, "invalid JSON"),
            (
                br#"{"user_id":"u","page_url":"/a","n":3,"x":1,"ok":true}"#,
                DeadLetterReason::EventTime,
                "missing",
            ),
            (
                br#"{"user_id":"u","page_url":"/a","n":3,"x":1,"ok":true,"timestamp":"yesterday"}"#,
                DeadLetterReason::EventTime,
                "not a valid time",
            ),
            (
                br#"{"user_id":"u","page_url":17,"n":3,"x":1,"ok":true,"timestamp":1}"#,
                DeadLetterReason::Schema,
                "\"page_url\" must be a string, found a number",
            ),
            (
                br#"{"user_id":"u","n":3,"x":1,"ok":true,"timestamp":1}"#,
                DeadLetterReason::Schema,
                "\"page_url\" is missing",
            ),
            (
                br#"{"user_id":"u","page_url":"/a","n":3.5,"x":1,"ok":true,"timestamp":1}"#,
                DeadLetterReason::Schema,
                "\"n\" must be an integer",
            ),
        ];
        for (payload, reason, text) in cases {
            let err = d.decode(payload).unwrap_err();
            assert_eq!(err.reason, reason, "{}", String::from_utf8_lossy(payload));
            assert!(err.message.contains(text), "{} -> {}", String::from_utf8_lossy(payload), err.message);
        }
        // A good row after bad ones decodes cleanly (no state leaks between rows).
        assert!(d.decode(br#"{"user_id":"u","page_url":"/a","n":3,"x":1,"ok":true,"timestamp":1}"#).is_ok());
    }
}
