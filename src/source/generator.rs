//! A deterministic generator of click events, clean and dirty.
//!
//! [`ClickGenerator`] draws every random choice from one `ChaCha8Rng` seeded from
//! [`ClickGeneratorSettings::seed`], so the same settings and the same sequence of base times
//! give byte-identical events: tests replay them, demos show the same traffic every run.
//!
//! Besides well-formed events it mixes in the things a real pipeline has to survive:
//! out-of-order events (event time jittered backwards by up to `disorder_ms`), very late
//! events (`late_by_ms` behind, meant to miss their window) and malformed payloads of four
//! kinds. [`GeneratedEvent::kind`] says which one each event is, so tests know the expected
//! outcome without parsing.
//!
//! Generation is allocation-free in steady state when you use
//! [`ClickGenerator::next_event_into`] with a reused [`GeneratedEvent`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What to generate. Out-of-range values are clamped by [`ClickGenerator::new`]: shares to
/// `[0, 1]` (and `late_share` to what `malformed_share` leaves), times to `>= 0`, counts to
/// `>= 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClickGeneratorSettings {
    /// Seed of the random stream; same seed + same base times → identical events.
    pub seed: u64,
    /// Number of distinct users (`u0` … `u{users-1}`); also the number of distinct keys.
    pub users: u32,
    /// Number of distinct pages (`/products/0` … `/products/{pages-1}`).
    pub pages: u32,
    /// Event time is jittered backwards uniformly in `[0, disorder_ms]` from the base time.
    pub disorder_ms: i64,
    /// Share of very-late events.
    pub late_share: f64,
    /// Very-late events have event time = base − `late_by_ms` − jitter.
    pub late_by_ms: i64,
    /// Share of malformed payloads.
    pub malformed_share: f64,
}

impl Default for ClickGeneratorSettings {
    fn default() -> Self {
        ClickGeneratorSettings {
            seed: 42,
            users: 10_000,
            pages: 500,
            disorder_ms: 2_000,
            late_share: 0.01,
            late_by_ms: 120_000,
            malformed_share: 0.001,
        }
    }
}

/// What kind of event was generated, i.e. what a correct pipeline should do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EventKind {
    /// Well-formed, event time within `disorder_ms` of the base time.
    #[default]
    Valid,
    /// Well-formed but `late_by_ms` (plus jitter) behind the base time.
    VeryLate,
    /// Not a valid click event; see the [`MalformedKind`].
    Malformed(MalformedKind),
}

/// How a malformed payload is broken. The generator cycles through them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedKind {
    /// A truncated JSON object, e.g. `{"user_id":"u1","page_url":"/pro`.
    NotJson,
    /// Valid JSON without `"timestamp"` or (alternating) without `"page_url"`.
    MissingField,
    /// `"page_url"` is a number: `"page_url":17`.
    WrongType,
    /// `"timestamp":"yesterday"`.
    BadTimestamp,
}

const MALFORMED_CYCLE: [MalformedKind; 4] = [
    MalformedKind::NotJson,
    MalformedKind::MissingField,
    MalformedKind::WrongType,
    MalformedKind::BadTimestamp,
];

/// One generated event. The buffers are reused by [`ClickGenerator::next_event_into`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GeneratedEvent {
    /// The message value (JSON, or broken JSON for malformed events).
    pub payload: Vec<u8>,
    /// The message key: the user id, e.g. `u123`.
    pub key: Vec<u8>,
    pub kind: EventKind,
    /// The event time the payload carries (for malformed events: the one it would carry).
    pub event_time_ms: i64,
    /// Position in this generator's sequence, from 0.
    pub seq: u64,
}

/// Deterministic click-event generator; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ClickGenerator {
    settings: ClickGeneratorSettings,
    rng: ChaCha8Rng,
    next_seq: u64,
    malformed_count: u64,
}

/// Weighted actions, as cumulative percentages: views are the common case.
const ACTIONS: [(&str, u32); 4] = [("view", 60), ("click", 85), ("scroll", 95), ("purchase", 100)];
const DEVICES: [(&str, u32); 3] = [("mobile", 55), ("desktop", 90), ("tablet", 100)];
const GEOS: [&str; 10] = ["US", "DE", "GB", "FR", "IN", "BR", "JP", "CA", "AU", "NL"];
/// Sessions are the user plus a 30-minute bucket of the base time.
const SESSION_SPAN_MS: i64 = 30 * 60 * 1000;

impl ClickGenerator {
    pub fn new(settings: ClickGeneratorSettings) -> Self {
        let mut settings = settings;
        settings.users = settings.users.max(1);
        settings.pages = settings.pages.max(1);
        settings.disorder_ms = settings.disorder_ms.max(0);
        settings.late_by_ms = settings.late_by_ms.max(0);
        settings.malformed_share = clamp_share(settings.malformed_share);
        settings.late_share = clamp_share(settings.late_share).min(1.0 - settings.malformed_share);
        ClickGenerator {
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            settings,
            next_seq: 0,
            malformed_count: 0,
        }
    }

    /// The settings in effect (after clamping).
    pub fn settings(&self) -> &ClickGeneratorSettings {
        &self.settings
    }

    /// Next event whose (pre-jitter) event time is `base_time_ms`. Callers pass wall-clock
    /// ms for live demos, or a synthetic clock (start + seq*step) for tests.
    pub fn next_event(&mut self, base_time_ms: i64) -> GeneratedEvent {
        let mut event = GeneratedEvent::default();
        self.next_event_into(base_time_ms, &mut event);
        event
    }

    /// Like [`next_event`](Self::next_event) but overwrites `event`, reusing its buffers.
    /// Produces exactly the same sequence as `next_event`.
    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        let s = &self.settings;
        // Draw every random value, in a fixed order, before branching on them: the stream
        // position then depends only on how many events were generated.
        let kind_draw: f64 = self.rng.random();
        let user = self.rng.random_range(0..s.users);
        let page = self.rng.random_range(0..s.pages);
        let action_draw = self.rng.random_range(0..100u32);
        let jitter_ms = self.rng.random_range(0..=s.disorder_ms);

        let kind = if kind_draw < s.malformed_share {
            let malformed = MALFORMED_CYCLE[(self.malformed_count % 4) as usize];
            self.malformed_count += 1;
            EventKind::Malformed(malformed)
        } else if kind_draw < s.malformed_share + s.late_share {
            EventKind::VeryLate
        } else {
            EventKind::Valid
        };
        let event_time_ms = match kind {
            EventKind::VeryLate => base_time_ms.saturating_sub(s.late_by_ms).saturating_sub(jitter_ms),
            _ => base_time_ms.saturating_sub(jitter_ms),
        };

        let user_traits = mix64(s.seed ^ u64::from(user));
        let fields = ClickFields {
            user,
            page,
            action: pick_weighted(&ACTIONS, action_draw),
            event_time_ms,
            session: base_time_ms.div_euclid(SESSION_SPAN_MS),
            device: pick_weighted(&DEVICES, (user_traits % 100) as u32),
            geo: GEOS[((user_traits >> 32) % GEOS.len() as u64) as usize],
        };

        event.key.clear();
        event.key.push(b'u');
        push_u64(&mut event.key, u64::from(user));
        event.payload.clear();
        match kind {
            EventKind::Valid | EventKind::VeryLate => fields.write(&mut event.payload, Shape::Valid),
            EventKind::Malformed(MalformedKind::NotJson) => {
                fields.write(&mut event.payload, Shape::Valid);
                // Any proper prefix of a JSON object lacks its closing brace, so is invalid.
                let cut = event.payload.len() / 2;
                event.payload.truncate(cut);
            }
            EventKind::Malformed(MalformedKind::MissingField) => {
                let shape = if (self.malformed_count / 4) % 2 == 1 {
                    Shape::WithoutTimestamp
                } else {
                    Shape::WithoutPageUrl
                };
                fields.write(&mut event.payload, shape);
            }
            EventKind::Malformed(MalformedKind::WrongType) => fields.write(&mut event.payload, Shape::NumericPageUrl),
            EventKind::Malformed(MalformedKind::BadTimestamp) => fields.write(&mut event.payload, Shape::WordTimestamp),
        }
        event.kind = kind;
        event.event_time_ms = event_time_ms;
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
}

fn clamp_share(share: f64) -> f64 {
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// `draw` in `0..100` against cumulative percentages.
fn pick_weighted(table: &[(&'static str, u32)], draw: u32) -> &'static str {
    table
        .iter()
        .find(|(_, cumulative)| draw < *cumulative)
        .map_or(table[table.len() - 1].0, |(name, _)| name)
}

/// SplitMix64 finalizer: stable per-user traits (device, geo) without per-user state.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Valid,
    WithoutTimestamp,
    WithoutPageUrl,
    NumericPageUrl,
    WordTimestamp,
}

struct ClickFields {
    user: u32,
    page: u32,
    action: &'static str,
    event_time_ms: i64,
    session: i64,
    device: &'static str,
    geo: &'static str,
}

impl ClickFields {
    /// Writes the JSON object by hand: every string is ASCII without quotes or
    /// backslashes, so no escaping is needed, and nothing allocates once `out` has grown.
    fn write(&self, out: &mut Vec<u8>, shape: Shape) {
        out.extend_from_slice(b"{\"user_id\":\"u");
        push_u64(out, u64::from(self.user));
        out.push(b'"');
        match shape {
            Shape::WithoutPageUrl => {}
            Shape::NumericPageUrl => {
                out.extend_from_slice(b",\"page_url\":");
                push_u64(out, u64::from(self.page));
            }
            _ => {
                out.extend_from_slice(b",\"page_url\":\"/products/");
                push_u64(out, u64::from(self.page));
                out.push(b'"');
            }
        }
        out.extend_from_slice(b",\"action\":\"");
        out.extend_from_slice(self.action.as_bytes());
        out.push(b'"');
        match shape {
            Shape::WithoutTimestamp => {}
            Shape::WordTimestamp => out.extend_from_slice(b",\"timestamp\":\"yesterday\""),
            _ => {
                out.extend_from_slice(b",\"timestamp\":\"");
                push_rfc3339_millis(out, self.event_time_ms);
                out.push(b'"');
            }
        }
        out.extend_from_slice(b",\"session_id\":\"s-u");
        push_u64(out, u64::from(self.user));
        out.push(b'-');
        push_i64(out, self.session);
        out.extend_from_slice(b"\",\"device_type\":\"");
        out.extend_from_slice(self.device.as_bytes());
        out.extend_from_slice(b"\",\"geo_location\":\"");
        out.extend_from_slice(self.geo.as_bytes());
        out.extend_from_slice(b"\"}");
    }
}

/// Appends the decimal digits of `n`.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
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

fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// Appends exactly `width` digits of `n` (zero-padded; `n` must fit).
fn push_padded(out: &mut Vec<u8>, n: u32, width: usize) {
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
pub(crate) fn push_rfc3339_millis(out: &mut Vec<u8>, ms: i64) {
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

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashMap;

    const START_MS: i64 = 1_795_464_000_000; // 2026-11-23T20:00:00Z
    const STEP_MS: i64 = 7;

    fn settings(seed: u64) -> ClickGeneratorSettings {
        ClickGeneratorSettings {
            seed,
            users: 1_000,
            pages: 50,
            disorder_ms: 3_000,
            late_share: 0.1,
            late_by_ms: 600_000,
            malformed_share: 0.05,
        }
    }

    fn generate(settings: ClickGeneratorSettings, n: u64) -> Vec<GeneratedEvent> {
        let mut generator = ClickGenerator::new(settings);
        (0..n).map(|seq| generator.next_event(START_MS + seq as i64 * STEP_MS)).collect()
    }

    fn parse_timestamp_ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("bad timestamp {text}: {e}"))
            .timestamp_millis()
    }

    #[test]
    fn same_seed_gives_identical_events_and_another_seed_does_not() {
        let a = generate(settings(7), 2_000);
        let b = generate(settings(7), 2_000);
        assert_eq!(a, b);
        let c = generate(settings(8), 2_000);
        assert_ne!(a, c);
    }

    #[test]
    fn next_event_into_matches_next_event_with_reused_buffers() {
        let expected = generate(settings(3), 500);
        let mut generator = ClickGenerator::new(settings(3));
        let mut event = GeneratedEvent::default();
        for (seq, want) in expected.iter().enumerate() {
            generator.next_event_into(START_MS + seq as i64 * STEP_MS, &mut event);
            assert_eq!(&event, want);
        }
    }

    #[test]
    fn shares_are_close_to_configured() {
        let events = generate(settings(11), 10_000);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut malformed_kinds: HashMap<MalformedKind, usize> = HashMap::new();
        let mut actions: HashMap<String, usize> = HashMap::new();
        for event in &events {
            let name = match event.kind {
                EventKind::Valid => "valid",
                EventKind::VeryLate => "late",
                EventKind::Malformed(kind) => {
                    *malformed_kinds.entry(kind).or_default() += 1;
                    "malformed"
                }
            };
            *counts.entry(name).or_default() += 1;
            if event.kind != EventKind::Valid {
                continue;
            }
            let json: Value = serde_json::from_slice(&event.payload).unwrap();
            *actions.entry(json["action"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        let malformed = counts["malformed"];
        let late = counts["late"];
        assert!((400..=600).contains(&malformed), "malformed {malformed}");
        assert!((850..=1_150).contains(&late), "late {late}");
        assert_eq!(counts["valid"] + malformed + late, 10_000);
        // The malformed kinds are cycled, so all four appear in equal numbers (±1).
        assert_eq!(malformed_kinds.len(), 4);
        for count in malformed_kinds.values() {
            assert!(count.abs_diff(malformed / 4) <= 1, "{malformed_kinds:?}");
        }
        let valid = counts["valid"] as f64;
        let view_share = actions["view"] as f64 / valid;
        assert!((0.55..0.65).contains(&view_share), "view share {view_share}");
        assert!(actions["purchase"] > 0 && actions["scroll"] > 0 && actions["click"] > 0);
    }

    #[test]
    fn zero_shares_give_only_valid_events() {
        let mut s = settings(5);
        s.late_share = 0.0;
        s.malformed_share = 0.0;
        assert!(generate(s, 2_000).iter().all(|e| e.kind == EventKind::Valid));
    }

    #[test]
    fn valid_payloads_have_all_fields_and_the_event_time() {
        let events = generate(settings(13), 5_000);
        let fields = ["user_id", "page_url", "action", "timestamp", "session_id", "device_type", "geo_location"];
        let mut checked = 0;
        for event in events.iter().filter(|e| matches!(e.kind, EventKind::Valid | EventKind::VeryLate)) {
            let json: Value = serde_json::from_slice(&event.payload).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&event.payload)));
            let object = json.as_object().unwrap();
            assert_eq!(object.len(), 7);
            for field in fields {
                assert!(object[field].is_string(), "{field} in {json}");
            }
            let user_id = object["user_id"].as_str().unwrap();
            assert_eq!(user_id.as_bytes(), event.key.as_slice());
            assert!(object["page_url"].as_str().unwrap().starts_with("/products/"));
            assert!(["view", "click", "scroll", "purchase"].contains(&object["action"].as_str().unwrap()));
            assert!(["mobile", "desktop", "tablet"].contains(&object["device_type"].as_str().unwrap()));
            assert!(GEOS.contains(&object["geo_location"].as_str().unwrap()));
            assert!(object["session_id"].as_str().unwrap().starts_with(&format!("s-{user_id}-")));
            let timestamp = object["timestamp"].as_str().unwrap();
            assert_eq!(timestamp.len(), "2026-11-23T20:00:00.123Z".len());
            assert_eq!(parse_timestamp_ms(timestamp), event.event_time_ms);
            checked += 1;
        }
        assert!(checked > 4_000);
    }

    #[test]
    fn malformed_payloads_fail_in_the_stated_way() {
        let events = generate(settings(17), 10_000);
        let mut seen_missing_timestamp = false;
        let mut seen_missing_page = false;
        for event in &events {
            let EventKind::Malformed(kind) = event.kind else {
                continue;
            };
            let parsed = serde_json::from_slice::<Value>(&event.payload);
            match kind {
                MalformedKind::NotJson => {
                    assert!(parsed.is_err());
                    assert!(event.payload.starts_with(b"{\"user_id\":\"u"));
                }
                MalformedKind::MissingField => {
                    let json = parsed.unwrap();
                    let object = json.as_object().unwrap();
                    assert_eq!(object.len(), 6);
                    let has_timestamp = object.contains_key("timestamp");
                    let has_page = object.contains_key("page_url");
                    assert!(has_timestamp != has_page, "{json}");
                    seen_missing_timestamp |= !has_timestamp;
                    seen_missing_page |= !has_page;
                }
                MalformedKind::WrongType => {
                    let json = parsed.unwrap();
                    assert!(json["page_url"].is_u64(), "{json}");
                    assert!(json["timestamp"].is_string());
                }
                MalformedKind::BadTimestamp => {
                    let json = parsed.unwrap();
                    assert_eq!(json["timestamp"], "yesterday");
                    assert!(json["page_url"].is_string());
                }
            }
        }
        assert!(seen_missing_timestamp && seen_missing_page);
    }

    #[test]
    fn disorder_and_lateness_are_bounded() {
        let s = settings(19);
        let events = generate(s.clone(), 10_000);
        for (seq, event) in events.iter().enumerate() {
            let base = START_MS + seq as i64 * STEP_MS;
            assert_eq!(event.seq, seq as u64);
            let behind = base - event.event_time_ms;
            match event.kind {
                EventKind::VeryLate => {
                    assert!((s.late_by_ms..=s.late_by_ms + s.disorder_ms).contains(&behind))
                }
                _ => assert!((0..=s.disorder_ms).contains(&behind), "{behind}"),
            }
        }
        let mut no_disorder = settings(19);
        no_disorder.disorder_ms = 0;
        no_disorder.late_share = 0.0;
        for (seq, event) in generate(no_disorder, 1_000).iter().enumerate() {
            assert_eq!(event.event_time_ms, START_MS + seq as i64 * STEP_MS);
        }
    }

    #[test]
    fn per_user_traits_are_stable() {
        let mut s = settings(23);
        s.malformed_share = 0.0;
        s.users = 20;
        let mut traits: HashMap<String, (String, String)> = HashMap::new();
        for event in generate(s, 2_000) {
            let json: Value = serde_json::from_slice(&event.payload).unwrap();
            let value = (
                json["device_type"].as_str().unwrap().to_owned(),
                json["geo_location"].as_str().unwrap().to_owned(),
            );
            let user = json["user_id"].as_str().unwrap().to_owned();
            assert_eq!(traits.entry(user).or_insert_with(|| value.clone()), &value);
        }
        assert_eq!(traits.len(), 20);
    }

    #[test]
    fn rfc3339_formatting_matches_chrono() {
        let samples = [
            0,
            1,
            999,
            -1,
            -86_400_001,
            START_MS + 123,
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
    fn out_of_range_settings_are_clamped() {
        let generator = ClickGenerator::new(ClickGeneratorSettings {
            seed: 1,
            users: 0,
            pages: 0,
            disorder_ms: -5,
            late_share: 0.9,
            late_by_ms: -1,
            malformed_share: f64::NAN,
        });
        let s = generator.settings();
        assert_eq!((s.users, s.pages, s.disorder_ms, s.late_by_ms), (1, 1, 0, 0));
        assert_eq!(s.malformed_share, 0.0);
        assert_eq!(s.late_share, 0.9);
        let generator = ClickGenerator::new(ClickGeneratorSettings {
            late_share: 0.9,
            malformed_share: 0.5,
            ..ClickGeneratorSettings::default()
        });
        assert_eq!(generator.settings().late_share, 0.5);
    }
}
