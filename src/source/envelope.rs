//! What every generated event family shares: the envelope of clean and dirty events.
//!
//! A family (clicks here; sensor readings, purchases and Nexmark in the load generator of the
//! tools crate, which builds on this module) decides *what* an event says; the
//! [`Envelope`] decides *how* it arrives: its event time (the base time jittered backwards by up
//! to `disorder_ms`, or `late_by_ms` behind for very-late events) and whether the payload is
//! malformed, and how ([`MalformedKind`], cycled so all four appear equally often). The hand
//! written JSON helpers here are allocation-free once the output buffer has grown.

use crate::time::civil_from_days;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// What kind of event was generated, i.e. what a correct pipeline should do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EventKind {
    /// Well-formed, event time within `disorder_ms` of the base time.
    #[default]
    Valid,
    /// Well-formed but `late_by_ms` (plus jitter) behind the base time.
    VeryLate,
    /// Not a valid event of its family; see the [`MalformedKind`].
    Malformed(MalformedKind),
}

/// How a malformed payload is broken. The generator cycles through them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedKind {
    /// A truncated JSON object, e.g. `{"user_id":"u1","page_url":"/pro`.
    NotJson,
    /// Valid JSON without `"timestamp"` or (alternating) without the family's checked field
    /// (`page_url` for clicks).
    MissingField,
    /// The family's checked string field is a number, e.g. `"page_url":17`.
    WrongType,
    /// `"timestamp":"yesterday"`.
    BadTimestamp,
}

pub(crate) const MALFORMED_CYCLE: [MalformedKind; 4] = [
    MalformedKind::NotJson,
    MalformedKind::MissingField,
    MalformedKind::WrongType,
    MalformedKind::BadTimestamp,
];

/// One generated event. The buffers are reused by the generators' `next_event_into`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GeneratedEvent {
    /// The message value (JSON, or broken JSON for malformed events).
    pub payload: Vec<u8>,
    /// The message key: the family's natural key, e.g. the user id `u123` for clicks.
    pub key: Vec<u8>,
    pub kind: EventKind,
    /// The event time the payload carries (for malformed events: the one it would carry).
    pub event_time_ms: i64,
    /// Position in this generator's sequence, from 0.
    pub seq: u64,
}

/// Disorder, very-late and malformed settings, clamped like the click generator's: shares to
/// `[0, 1]` (`late_share` to what `malformed_share` leaves), times to `>= 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    disorder_ms: i64,
    late_share: f64,
    late_by_ms: i64,
    malformed_share: f64,
    malformed_count: u64,
}

/// How a family writes its payload for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// All fields, correctly typed (also the base of a `NotJson` payload, truncated after).
    Valid,
    WithoutTimestamp,
    /// Without the family's checked field.
    WithoutField,
    /// The family's checked string field written as a number.
    NumericField,
    /// `"timestamp":"yesterday"`.
    WordTimestamp,
}

/// What the envelope decided for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub kind: EventKind,
    pub event_time_ms: i64,
    pub shape: Shape,
}

impl Envelope {
    pub fn new(disorder_ms: i64, late_share: f64, late_by_ms: i64, malformed_share: f64) -> Self {
        let malformed_share = clamp_share(malformed_share);
        Envelope {
            disorder_ms: disorder_ms.max(0),
            late_share: clamp_share(late_share).min(1.0 - malformed_share),
            late_by_ms: late_by_ms.max(0),
            malformed_share,
            malformed_count: 0,
        }
    }

    pub fn disorder_ms(&self) -> i64 {
        self.disorder_ms
    }
    pub fn late_share(&self) -> f64 {
        self.late_share
    }
    pub fn late_by_ms(&self) -> i64 {
        self.late_by_ms
    }
    pub fn malformed_share(&self) -> f64 {
        self.malformed_share
    }

    /// Draws the kind, then (after the family's own draws, if it wants a fixed draw order) the
    /// jitter: [`draw_kind`](Self::draw_kind) + [`draw_jitter_ms`](Self::draw_jitter_ms) +
    /// [`arrive`](Self::arrive) in one call.
    pub fn draw(&mut self, rng: &mut ChaCha8Rng, base_time_ms: i64) -> Arrival {
        let kind_draw = self.draw_kind(rng);
        let jitter_ms = self.draw_jitter_ms(rng);
        self.arrive(kind_draw, jitter_ms, base_time_ms)
    }

    pub fn draw_kind(&self, rng: &mut ChaCha8Rng) -> f64 {
        rng.random()
    }

    pub fn draw_jitter_ms(&self, rng: &mut ChaCha8Rng) -> i64 {
        rng.random_range(0..=self.disorder_ms)
    }

    /// Turns the two draws into the event's kind, event time and payload shape.
    pub fn arrive(&mut self, kind_draw: f64, jitter_ms: i64, base_time_ms: i64) -> Arrival {
        let (kind, shape) = if kind_draw < self.malformed_share {
            let malformed = MALFORMED_CYCLE[(self.malformed_count % 4) as usize];
            self.malformed_count += 1;
            let shape = match malformed {
                MalformedKind::NotJson => Shape::Valid,
                // Alternate what is missing, round by round of the cycle.
                MalformedKind::MissingField if (self.malformed_count / 4) % 2 == 1 => Shape::WithoutTimestamp,
                MalformedKind::MissingField => Shape::WithoutField,
                MalformedKind::WrongType => Shape::NumericField,
                MalformedKind::BadTimestamp => Shape::WordTimestamp,
            };
            (EventKind::Malformed(malformed), shape)
        } else if kind_draw < self.malformed_share + self.late_share {
            (EventKind::VeryLate, Shape::Valid)
        } else {
            (EventKind::Valid, Shape::Valid)
        };
        let event_time_ms = match kind {
            EventKind::VeryLate => base_time_ms.saturating_sub(self.late_by_ms).saturating_sub(jitter_ms),
            _ => base_time_ms.saturating_sub(jitter_ms),
        };
        Arrival { kind, event_time_ms, shape }
    }
}

impl Arrival {
    /// Fills in `event`'s kind and time, and breaks a `NotJson` payload: any proper prefix of
    /// a JSON object lacks its closing brace, so is invalid.
    pub fn finish(&self, event: &mut GeneratedEvent) {
        if self.kind == EventKind::Malformed(MalformedKind::NotJson) {
            let cut = event.payload.len() / 2;
            event.payload.truncate(cut);
        }
        event.kind = self.kind;
        event.event_time_ms = self.event_time_ms;
    }
}

/// Appends `,"timestamp":"…"` as `shape` says (nothing for `WithoutTimestamp`).
pub fn push_timestamp_field(out: &mut Vec<u8>, shape: Shape, event_time_ms: i64) {
    match shape {
        Shape::WithoutTimestamp => {}
        Shape::WordTimestamp => out.extend_from_slice(b",\"timestamp\":\"yesterday\""),
        _ => {
            out.extend_from_slice(b",\"timestamp\":\"");
            push_rfc3339_millis(out, event_time_ms);
            out.push(b'"');
        }
    }
}

/// Appends the family's checked field as `shape` says: `,"name":"…"` (the string written by
/// `write_string`), absent for `WithoutField`, the bare number `,"name":<number>` for
/// `NumericField`.
pub fn push_checked_field(out: &mut Vec<u8>, shape: Shape, name: &str, number: u64, write_string: impl FnOnce(&mut Vec<u8>)) {
    match shape {
        Shape::WithoutField => {}
        Shape::NumericField => {
            push_key(out, name);
            push_u64(out, number);
        }
        _ => {
            push_key(out, name);
            out.push(b'"');
            write_string(out);
            out.push(b'"');
        }
    }
}

/// Appends `,"name":` (the comma is skipped right after the opening brace).
pub fn push_key(out: &mut Vec<u8>, name: &str) {
    if out.last().is_some_and(|&b| b != b'{') {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends `,"name":"value"`; `value` must need no escaping (ASCII, no quotes or backslashes).
pub fn push_str_field(out: &mut Vec<u8>, name: &str, value: &str) {
    push_key(out, name);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// Appends `,"name":n`.
pub fn push_int_field(out: &mut Vec<u8>, name: &str, n: i64) {
    push_key(out, name);
    push_i64(out, n);
}

/// Appends `,"name":x` with exactly two decimals, e.g. `21.50`, `-0.05`.
pub fn push_fixed2_field(out: &mut Vec<u8>, name: &str, x: f64) {
    push_key(out, name);
    push_fixed2(out, x);
}

/// Appends `x` rounded to two decimals (always written with both, so JSON reads a float).
pub fn push_fixed2(out: &mut Vec<u8>, x: f64) {
    let hundredths = if x.is_finite() { (x * 100.0).round() as i64 } else { 0 };
    if hundredths < 0 {
        out.push(b'-');
    }
    let abs = hundredths.unsigned_abs();
    push_u64(out, abs / 100);
    out.push(b'.');
    push_padded(out, (abs % 100) as u32, 2);
}

pub(crate) fn clamp_share(share: f64) -> f64 {
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// SplitMix64 finalizer: stable per-key traits (device, geo, prices) without per-key state.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

pub(crate) fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// Appends exactly `width` (at most 4) digits of `n` (zero-padded; `n` must fit).
pub fn push_padded(out: &mut Vec<u8>, n: u32, width: usize) {
    let mut digits = [b'0'; 4];
    let mut rest = n;
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// Earliest and latest instants with a four-digit year, which RFC 3339 requires.
const MIN_RFC3339_MS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00.000Z
const MAX_RFC3339_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z

/// Appends `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), clamped to the
/// years 0000..=9999.
pub fn push_rfc3339_millis(out: &mut Vec<u8>, ms: i64) {
    let ms = ms.clamp(MIN_RFC3339_MS, MAX_RFC3339_MS);
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000) as u32;
    let (year, month, day) = civil_from_days(days);
    push_padded(out, year as u32, 4);
    out.push(b'-');
    push_padded(out, month, 2);
    out.push(b'-');
    push_padded(out, day, 2);
    out.push(b'T');
    push_padded(out, ms_of_day / 3_600_000, 2);
    out.push(b':');
    push_padded(out, ms_of_day / 60_000 % 60, 2);
    out.push(b':');
    push_padded(out, ms_of_day / 1_000 % 60, 2);
    out.push(b'.');
    push_padded(out, ms_of_day % 1_000, 3);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rfc3339_formatting_matches_chrono() {
        let samples = [
            0,
            1,
            999,
            -1,
            -86_400_001,
            1_795_464_000_123,
            951_782_400_000,    // 2000-02-29
            4_107_542_399_999,  // 2100-02-28T23:59:59.999
            -2_208_988_800_000, // 1900-01-01
            MIN_RFC3339_MS,
            MAX_RFC3339_MS,
        ];
        let mut x = 0x1234_5678_9abc_def0_u64;
        let random = (0..10_000).map(|_| {
            x = mix64(x);
            (x % (MAX_RFC3339_MS - MIN_RFC3339_MS) as u64) as i64 + MIN_RFC3339_MS
        });
        for ms in samples.into_iter().chain(random) {
            let mut out = Vec::new();
            push_rfc3339_millis(&mut out, ms);
            let ours = String::from_utf8(out).unwrap();
            let expected = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(ours, expected, "ms={ms}");
        }
        let mut out = Vec::new();
        push_rfc3339_millis(&mut out, i64::MAX);
        assert_eq!(out, b"9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn fixed2_is_a_json_float_with_two_decimals() {
        for (x, want) in [
            (0.0, "0.00"),
            (21.5, "21.50"),
            (-0.05, "-0.05"),
            (-0.004, "0.00"),
            (1234.567, "1234.57"),
            (-3.0, "-3.00"),
        ] {
            let mut out = Vec::new();
            push_fixed2(&mut out, x);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{x}");
        }
        let mut out = b"{".to_vec();
        push_fixed2_field(&mut out, "v", 2.25);
        push_int_field(&mut out, "n", -7);
        push_str_field(&mut out, "s", "x");
        out.push(b'}');
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json, serde_json::json!({"v": 2.25, "n": -7, "s": "x"}));
        assert!(json["v"].is_f64());
    }

    #[test]
    fn arrivals_follow_the_shares_and_cycle_the_malformed_kinds() {
        let mut envelope = Envelope::new(1_000, 0.2, 60_000, 0.1);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut kinds = std::collections::HashMap::new();
        let mut shapes = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let arrival = envelope.draw(&mut rng, 1_000_000);
            *kinds.entry(arrival.kind).or_insert(0) += 1;
            shapes.insert(arrival.shape);
            let behind = 1_000_000 - arrival.event_time_ms;
            match arrival.kind {
                EventKind::VeryLate => assert!((60_000..=61_000).contains(&behind)),
                _ => assert!((0..=1_000).contains(&behind)),
            }
        }
        assert!((3_700..=4_300).contains(&kinds[&EventKind::VeryLate]), "{kinds:?}");
        for kind in MALFORMED_CYCLE {
            assert!((420..=580).contains(&kinds[&EventKind::Malformed(kind)]), "{kinds:?}");
        }
        assert_eq!(shapes.len(), 5, "every shape appears: {shapes:?}");
    }
}
