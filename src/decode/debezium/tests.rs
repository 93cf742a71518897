use super::*;
use crate::config::parse_config;
use crate::decode::SourceDecoder;
use crate::types::{DeadLetterReason, Value};

const ORDERS: &str = r#"
[pipeline]
name = "t"
[[sources]]
name = "orders"
topic = "shop.public.orders"
format = "debezium"
POSITION
schema = { order_id = "int", customer_id = "string", amount = "float", paid = "bool", updated_at = "timestamp" }
[[queries]]
name = "orders"
from = "orders"
apply = { primary_key = ["order_id"] }
sink = "orders"
[[sinks]]
name = "orders"
kind = "delta"
path = "/tmp/orders"
"#;

fn decoder_with(position: &str) -> SourceDecoder {
    let cfg = parse_config(&ORDERS.replace("POSITION", position)).unwrap_or_else(|e| panic!("{e}"));
    SourceDecoder::new(&cfg.sources[0])
}

fn decoder() -> SourceDecoder {
    decoder_with("")
}

const ROW_1: &str = r#"{"order_id":1,"customer_id":"c\"7","amount":12.5,"paid":false,"updated_at":"2026-11-23T00:00:01Z"}"#;
const ROW_1_PAID: &str = r#"{"order_id":1,"customer_id":"c\"7","amount":12.5,"paid":true,"updated_at":"2026-11-23T00:00:02Z"}"#;

fn envelope(op: &str, before: &str, after: &str, lsn: &str) -> String {
    format!(
        r#"{{"before":{before},"after":{after},"source":{{"version":"2.7.0.Final","connector":"postgresql","name":"shop","ts_ms":1795392000123,"snapshot":"false","db":"shop","sequence":"[null,\"1\"]","schema":"public","table":"orders","txId":777,"lsn":{lsn},"xmin":null}},"op":"{op}","ts_ms":1795392000456,"transaction":null}}"#
    )
}

fn position_of(parts: &[Result<i64, &str>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            Ok(i) => encode_position_int(&mut out, *i),
            Err(s) => encode_position_str(&mut out, s.as_bytes()),
        }
    }
    out
}

fn row(d: &SourceDecoder, payload: &[u8]) -> Vec<Value> {
    (0..5).map(|i| d.value(payload, i)).collect()
}

#[test]
fn each_op_gives_its_row_op_position_and_event_time() {
    let mut d = decoder();
    for (op, before, after, want) in [
        ("c", "null", ROW_1, ChangeOp::Create),
        ("r", "null", ROW_1, ChangeOp::Read),
        ("u", ROW_1, ROW_1_PAID, ChangeOp::Update),
        ("d", ROW_1_PAID, "null", ChangeOp::Delete),
    ] {
        let payload = envelope(op, before, after, "24023128");
        let t = d.decode(payload.as_bytes()).unwrap_or_else(|e| panic!("{op}: {e:?}"));
        // source.ts_ms, not the envelope's ts_ms.
        assert_eq!(t, 1_795_392_000_123_000, "{op}");
        let (got_op, position) = d.change().unwrap();
        assert_eq!(got_op, want);
        assert_eq!(position, position_of(&[Ok(24_023_128)]).as_slice());
        let values = row(&d, payload.as_bytes());
        assert_eq!(values[0], Value::Int(1));
        assert_eq!(values[1], Value::Str("c\"7".into()), "escaped strings are unescaped");
        assert_eq!(values[2], Value::Float(12.5));
        let paid = !matches!(op, "c" | "r");
        assert_eq!(values[3], Value::Bool(paid), "{op}: the row is after, or before for a delete");
        assert_eq!(values[4], Value::Time(1_795_392_000_000_000 + if paid { 2_000_000 } else { 1_000_000 }));
    }
}

#[test]
fn the_schema_payload_wrapper_is_accepted() {
    let mut d = decoder();
    let inner = envelope("u", ROW_1, ROW_1_PAID, "99");
    let schema = r#"{"type":"struct","fields":[{"type":"struct","fields":[{"type":"int64","optional":false,"field":"order_id"}],"optional":true,"name":"shop.public.orders.Value","field":"before"}],"optional":false,"name":"shop.public.orders.Envelope"}"#;
    for wrapped in [
        format!(r#"{{"schema":{schema},"payload":{inner}}}"#),
        format!(r#"{{"payload":{inner},"schema":{schema}}}"#),
    ] {
        assert_eq!(d.decode(wrapped.as_bytes()), Ok(1_795_392_000_123_000));
        assert_eq!(d.change().unwrap().0, ChangeOp::Update);
        assert_eq!(d.change().unwrap().1, position_of(&[Ok(99)]).as_slice());
        assert_eq!(row(&d, wrapped.as_bytes())[3], Value::Bool(true));
    }
}

#[test]
fn tombstones_are_dead_letters_of_their_own() {
    let mut d = decoder();
    for payload in [&b""[..], b"null", b"  \n", br#"{"schema":null,"payload":null}"#] {
        let err = d.decode(payload).unwrap_err();
        assert_eq!(err.reason, DeadLetterReason::Tombstone, "{:?}", String::from_utf8_lossy(payload));
        assert!(err.message.contains("tombstone"), "{}", err.message);
        assert_eq!(d.change(), None);
    }
}

#[test]
fn bad_change_events_are_classified_with_a_reason() {
    let mut d = decoder();
    let no_ts = r#"{"before":null,"after":ROW,"source":{"lsn":5},"op":"c"}"#.replace("ROW", ROW_1);
    let cases: Vec<(String, DeadLetterReason, &str)> = vec![
        (envelope("c", "null", ROW_1, "1")[..40].to_string(), DeadLetterReason::Decode, "invalid JSON"),
        ("[1,2]".into(), DeadLetterReason::Decode, "invalid JSON"),
        (r#"{"order_id":1}"#.into(), DeadLetterReason::Schema, "no \"op\""),
        (envelope("t", "null", "null", "1"), DeadLetterReason::Schema, "op \"t\" is not a row change"),
        (envelope("c", "null", "null", "1"), DeadLetterReason::Schema, "needs the new row in \"after\""),
        (
            envelope("d", "null", "null", "1"),
            DeadLetterReason::Schema,
            "needs the deleted row's key in \"before\"",
        ),
        (
            envelope("c", "null", ROW_1, "null"),
            DeadLetterReason::Schema,
            "position field \"source.lsn\" is null",
        ),
        (
            envelope("c", "null", ROW_1, "1").replace(r#","lsn":1"#, ""),
            DeadLetterReason::Schema,
            "position field \"source.lsn\" is missing",
        ),
        (
            envelope("c", "null", ROW_1, "1.5"),
            DeadLetterReason::Schema,
            "must be an integer or a string, found a fractional",
        ),
        (
            envelope("c", "null", &ROW_1.replace("12.5", "\"12.5\""), "1"),
            DeadLetterReason::Schema,
            "field \"amount\" of \"after\" must be a number",
        ),
        (
            envelope("u", ROW_1, &ROW_1.replace(r#","paid":false"#, ""), "1"),
            DeadLetterReason::Schema,
            "field \"paid\" of \"after\" is missing",
        ),
        (no_ts, DeadLetterReason::EventTime, "source.ts_ms"),
        (
            envelope("c", "null", ROW_1, "1").replace(r#""op":"c""#, r#""op":7"#),
            DeadLetterReason::Schema,
            "\"op\" must be a string",
        ),
    ];
    for (payload, reason, text) in cases {
        let err = d.decode(payload.as_bytes()).unwrap_err();
        assert_eq!(err.reason, reason, "{payload}: {}", err.message);
        assert!(err.message.contains(text), "{payload} -> {}", err.message);
        assert_eq!(d.change(), None, "no change is left from a bad event");
    }
    // A good event after bad ones decodes cleanly.
    assert!(d.decode(envelope("c", "null", ROW_1, "2").as_bytes()).is_ok());
}

#[test]
fn nulls_in_rows_are_database_nulls_and_a_delete_needs_only_the_key() {
    let mut d = decoder();
    let with_null = ROW_1.replace(r#""amount":12.5"#, r#""amount":null"#);
    let payload = envelope("c", "null", &with_null, "3");
    assert!(d.decode(payload.as_bytes()).is_ok());
    assert_eq!(row(&d, payload.as_bytes())[2], Value::Null);
    assert!(d.is_null(2) && !d.is_null(0));
    // Postgres' default replica identity: only the key in before.
    let payload = envelope("d", r#"{"order_id":1}"#, "null", "4");
    assert!(d.decode(payload.as_bytes()).is_ok());
    assert_eq!(d.change().unwrap().0, ChangeOp::Delete);
    assert_eq!(row(&d, payload.as_bytes())[0], Value::Int(1));
    assert!(d.is_null(1));
    // A key that is null is the shard's to refuse (it knows the primary key): decoded as null.
    let payload = envelope("c", "null", &ROW_1.replace(r#""order_id":1"#, r#""order_id":null"#), "5");
    assert!(d.decode(payload.as_bytes()).is_ok());
    assert!(d.is_null(0));
}

#[test]
fn mysql_positions_of_several_fields_compare_in_order() {
    let mut d = decoder_with(r#"position = ["source.file", "source.pos", "source.row"]"#);
    let event = |file: &str, pos: i64, row: i64| {
        format!(
            r#"{{"before":null,"after":{ROW_1},"source":{{"connector":"mysql","ts_ms":1795392000000,"file":"{file}","pos":{pos},"row":{row},"server_id":1}},"op":"c","ts_ms":1}}"#
        )
    };
    let mut positions = Vec::new();
    // In binlog order: file names, then positions numerically (not textually), then rows.
    for (file, pos, row) in [
        ("mysql-bin.000003", 9, 0),
        ("mysql-bin.000003", 10, 0),
        ("mysql-bin.000003", 10, 1),
        ("mysql-bin.000003", 154, 0),
        ("mysql-bin.000004", 4, 0),
    ] {
        d.decode(event(file, pos, row).as_bytes()).unwrap();
        let position = d.change().unwrap().1.to_vec();
        assert_eq!(position, position_of(&[Err(file), Ok(pos), Ok(row)]));
        positions.push(position);
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let err = d.decode(event("mysql-bin.000003", 9, 0).replace(r#","row":0"#, "").as_bytes()).unwrap_err();
    assert!(err.message.contains("\"source.row\" is missing"), "{}", err.message);
}

#[test]
fn a_top_level_position_field_and_another_object_are_read() {
    let mut d = decoder_with(r#"position = ["transaction.total_order", "ts_ms"]"#);
    let payload = envelope("c", "null", ROW_1, "1").replace(r#""transaction":null"#, r#""transaction":{"id":"x","total_order":3}"#);
    d.decode(payload.as_bytes()).unwrap();
    assert_eq!(d.change().unwrap().1, position_of(&[Ok(3), Ok(1_795_392_000_456)]).as_slice());
}

#[test]
fn position_encodings_order_like_the_values() {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let strings = ["", "a", "a\0", "a\0b", "ab", "b", "mysql-bin.000010", "mysql-bin.00002"];
    for _ in 0..20_000 {
        let (a, b) = (next() as i64 >> (next() % 64), next() as i64 >> (next() % 64));
        let (s, t) = (strings[(next() % 8) as usize], strings[(next() % 8) as usize]);
        let (x, y) = (next() as i64 % 3, next() as i64 % 3);
        let enc = |i: i64, s: &str, k: i64| position_of(&[Ok(i), Err(s), Ok(k)]);
        assert_eq!(
            enc(a, s, x).cmp(&enc(b, t, y)),
            (a, s.as_bytes(), x).cmp(&(b, t.as_bytes(), y)),
            "{a} {s:?} {x} / {b} {t:?} {y}"
        );
    }
}
