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

use super::envelope::{clamp_share, mix64, push_i64, push_timestamp_field, push_u64, Envelope, Shape};
pub use super::envelope::{EventKind, GeneratedEvent, MalformedKind};

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

/// Deterministic click-event generator; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ClickGenerator {
    settings: ClickGeneratorSettings,
    rng: ChaCha8Rng,
    envelope: Envelope,
    next_seq: u64,
    /// Pages in turn (`seq % pages`) instead of at random; see [`ClickGenerator::with_sequential_pages`].
    sequential_pages: bool,
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
            envelope: Envelope::new(settings.disorder_ms, settings.late_share, settings.late_by_ms, settings.malformed_share),
            settings,
            next_seq: 0,
            sequential_pages: false,
        }
    }

    /// Pages in turn instead of at random: the first `pages` events name `pages` distinct
    /// pages, so a load test fills an exact number of group keys (`page_url`). Every other
    /// field, and the random stream, stay as they would be.
    pub fn with_sequential_pages(mut self) -> Self {
        self.sequential_pages = true;
        self
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
        let kind_draw = self.envelope.draw_kind(&mut self.rng);
        let user = self.rng.random_range(0..s.users);
        let drawn_page = self.rng.random_range(0..s.pages);
        let page = if self.sequential_pages {
            (self.next_seq % u64::from(s.pages)) as u32
        } else {
            drawn_page
        };
        let action_draw = self.rng.random_range(0..100u32);
        let jitter_ms = self.envelope.draw_jitter_ms(&mut self.rng);
        let arrival = self.envelope.arrive(kind_draw, jitter_ms, base_time_ms);

        let user_traits = mix64(s.seed ^ u64::from(user));
        let fields = ClickFields {
            user,
            page,
            action: pick_weighted(&ACTIONS, action_draw),
            event_time_ms: arrival.event_time_ms,
            session: base_time_ms.div_euclid(SESSION_SPAN_MS),
            device: pick_weighted(&DEVICES, (user_traits % 100) as u32),
            geo: GEOS[((user_traits >> 32) % GEOS.len() as u64) as usize],
        };

        event.key.clear();
        event.key.push(b'u');
        push_u64(&mut event.key, u64::from(user));
        event.payload.clear();
        fields.write(&mut event.payload, arrival.shape);
        arrival.finish(event);
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
}

/// `draw` in `0..100` against cumulative percentages.
fn pick_weighted(table: &[(&'static str, u32)], draw: u32) -> &'static str {
    table
        .iter()
        .find(|(_, cumulative)| draw < *cumulative)
        .map_or(table[table.len() - 1].0, |(name, _)| name)
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
            Shape::WithoutField => {}
            Shape::NumericField => {
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
        push_timestamp_field(out, shape, self.event_time_ms);
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

/// Purchases for the demo's join: `{order_id, user_id, product_id, price, timestamp}`, by the
/// same users as the clicks (`u0` … `u{users-1}`), stamped with the base time. Clean events
/// only; seeded like the click generator. Keyed by `user_id`.
#[derive(Debug, Clone)]
pub struct PurchaseGenerator {
    users: u32,
    rng: ChaCha8Rng,
    next_seq: u64,
}

impl PurchaseGenerator {
    pub fn new(seed: u64, users: u32) -> Self {
        PurchaseGenerator {
            users: users.max(1),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_b006),
            next_seq: 0,
        }
    }

    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        let user = self.rng.random_range(0..self.users);
        let product = self.rng.random_range(0..1_000u32);
        let cents = self.rng.random_range(99..50_000u32);
        event.key.clear();
        event.key.push(b'u');
        push_u64(&mut event.key, u64::from(user));
        let out = &mut event.payload;
        out.clear();
        out.extend_from_slice(b"{\"order_id\":\"o-");
        push_u64(out, self.next_seq);
        out.extend_from_slice(b"\",\"user_id\":\"");
        out.extend_from_slice(&event.key);
        out.extend_from_slice(b"\",\"product_id\":\"p");
        push_u64(out, u64::from(product));
        out.extend_from_slice(b"\",\"price\":");
        push_u64(out, u64::from(cents / 100));
        out.push(b'.');
        out.push(b'0' + (cents / 10 % 10) as u8);
        out.push(b'0' + (cents % 10) as u8);
        push_timestamp_field(out, Shape::Valid, base_time_ms);
        out.push(b'}');
        event.kind = EventKind::Valid;
        event.event_time_ms = base_time_ms;
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
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

    #[test]
    fn sequential_pages_name_each_page_once_per_round_and_keep_the_rest() {
        let clean = ClickGeneratorSettings {
            pages: 1_000,
            late_share: 0.0,
            malformed_share: 0.0,
            ..settings(5)
        };
        let mut random = ClickGenerator::new(clean.clone());
        let mut sequential = ClickGenerator::new(clean).with_sequential_pages();
        let page = |event: &GeneratedEvent| -> String {
            let json: Value = serde_json::from_slice(&event.payload).unwrap();
            json["page_url"].as_str().unwrap().to_owned()
        };
        let mut seen = std::collections::HashSet::new();
        for seq in 0..1_000 {
            let (a, b) = (random.next_event(START_MS + seq), sequential.next_event(START_MS + seq));
            assert_eq!(page(&b), format!("/products/{seq}"));
            assert!(seen.insert(page(&b)));
            // Same key, same timestamp: only the page differs.
            assert_eq!((a.key, a.kind), (b.key, b.kind));
        }
        assert_eq!(page(&sequential.next_event(START_MS)), "/products/0", "the next round starts over");
    }

    #[test]
    fn purchases_are_json_of_the_click_users() {
        let mut g = PurchaseGenerator::new(7, 3);
        let mut event = GeneratedEvent::default();
        for seq in 0..50 {
            g.next_event_into(1_795_392_000_123, &mut event);
            let v: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
            assert_eq!(v["order_id"], format!("o-{seq}"));
            assert!(["u0", "u1", "u2"].contains(&v["user_id"].as_str().unwrap()), "{v}");
            assert_eq!(v["user_id"].as_str().unwrap().as_bytes(), &event.key[..]);
            assert!(v["price"].as_f64().unwrap() >= 0.99);
            assert_eq!(v["timestamp"], "2026-11-23T00:00:00.123Z");
        }
    }
}
