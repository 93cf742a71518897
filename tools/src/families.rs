//! The load generator's event families: clicks, sensor readings, purchases, Nexmark, and
//! Debezium change events of an orders table.
//!
//! Every family is a seeded, allocation-free generator like the
//! [click generator](tidemark::source::generator) (which *is* the click family): one `ChaCha8Rng` per
//! generator, hand-written JSON into the reused buffers of a [`GeneratedEvent`], and the
//! shared [`Envelope`] for disorder, very-late and malformed events. The message key is the
//! family's natural key, so partitions get a stable spread:
//!
//! | family     | key                                   | checked field (malformed events) |
//! |------------|---------------------------------------|----------------------------------|
//! | `click`    | `user_id`                             | `page_url`                       |
//! | `sensor`   | `device_id`                           | `sensor_type`                    |
//! | `purchase` | `user_id`                             | `product_id`                     |
//! | `nexmark`  | auction id (person id for persons)    | `name` / `item_name` / `channel` |
//!
//! The `orders` family is the library's [orders change-event generator](tidemark::source::cdc_generator):
//! its own duplicates, replays and tombstones instead of the envelope's disorder and lateness
//! (only `malformed_share` applies), keyed by the Debezium key `{"order_id":N}`.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use tidemark::source::cdc_generator::{OrdersCdcGenerator, OrdersCdcSettings, DEFAULT_FIRST_LSN};
use tidemark::source::envelope::{
    mix64, push_checked_field, push_fixed2_field, push_int_field, push_key, push_padded, push_rfc3339_millis, push_str_field, push_timestamp_field, push_u64,
    Envelope, GeneratedEvent,
};
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings};
use tidemark::source::producer::EventGenerator;

/// One of the event families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Click,
    Sensor,
    Purchase,
    Nexmark,
    /// Debezium change events of an orders table.
    Orders,
}

impl Family {
    pub const ALL: [Family; 5] = [Family::Click, Family::Sensor, Family::Purchase, Family::Nexmark, Family::Orders];
    /// The families whose events arrive through the shared [`Envelope`] (disorder, very-late
    /// and malformed events).
    pub const ENVELOPED: [Family; 4] = [Family::Click, Family::Sensor, Family::Purchase, Family::Nexmark];

    pub fn name(self) -> &'static str {
        match self {
            Family::Click => "click",
            Family::Sensor => "sensor",
            Family::Purchase => "purchase",
            Family::Nexmark => "nexmark",
            Family::Orders => "orders",
        }
    }

    /// The topic `tidemark-tools loadgen` produces to unless told otherwise.
    pub fn default_topic(self) -> &'static str {
        match self {
            Family::Click => "click-events",
            Family::Sensor => "sensor-events",
            Family::Purchase => "purchase-events",
            Family::Nexmark => "nexmark-events",
            Family::Orders => "orders-events",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Family::ALL
            .into_iter()
            .find(|family| family.name() == s)
            .ok_or_else(|| format!("unknown event family `{s}`: use click, sensor, purchase, nexmark or orders"))
    }
}

/// What any family needs: the seed, the number of distinct keys and the envelope settings
/// (same meaning and clamping as [`ClickGeneratorSettings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FamilySettings {
    pub seed: u64,
    /// Distinct keys: users (click, purchase), devices (sensor), open auctions bids go to (nexmark).
    pub keys: u32,
    /// Distinct pages of the click family (`page_url`); the other families have no pages.
    pub click_pages: u32,
    pub disorder_ms: i64,
    pub late_share: f64,
    pub late_by_ms: i64,
    pub malformed_share: f64,
    /// Orders family: share of changes sent twice, and followed by a replay of an older one.
    pub duplicate_share: f64,
    pub replay_share: f64,
}

impl Default for FamilySettings {
    fn default() -> Self {
        FamilySettings {
            seed: 42,
            keys: 1_000,
            click_pages: 500,
            disorder_ms: 0,
            late_share: 0.0,
            late_by_ms: 3_600_000,
            malformed_share: 0.0,
            duplicate_share: 0.0,
            replay_share: 0.0,
        }
    }
}

impl FamilySettings {
    fn envelope(&self) -> Envelope {
        Envelope::new(self.disorder_ms, self.late_share, self.late_by_ms, self.malformed_share)
    }
}

/// A generator of any family; [`EventGenerator::next_event_into`] dispatches without boxing.
#[derive(Debug, Clone)]
pub enum FamilyGenerator {
    Click(ClickGenerator),
    Sensor(SensorGenerator),
    Purchase(PurchaseGenerator),
    Nexmark(NexmarkGenerator),
    Orders(OrdersCdcGenerator),
}

impl FamilyGenerator {
    pub fn new(family: Family, settings: &FamilySettings) -> Self {
        match family {
            Family::Click => FamilyGenerator::Click(ClickGenerator::new(ClickGeneratorSettings {
                seed: settings.seed,
                users: settings.keys,
                pages: settings.click_pages,
                disorder_ms: settings.disorder_ms,
                late_share: settings.late_share,
                late_by_ms: settings.late_by_ms,
                malformed_share: settings.malformed_share,
            })),
            Family::Sensor => FamilyGenerator::Sensor(SensorGenerator::new(settings)),
            Family::Purchase => FamilyGenerator::Purchase(PurchaseGenerator::new(settings)),
            Family::Nexmark => FamilyGenerator::Nexmark(NexmarkGenerator::new(settings)),
            Family::Orders => FamilyGenerator::Orders(OrdersCdcGenerator::new(OrdersCdcSettings {
                seed: settings.seed,
                orders: settings.keys,
                duplicate_share: settings.duplicate_share,
                replay_share: settings.replay_share,
                malformed_share: settings.malformed_share,
                first_lsn: DEFAULT_FIRST_LSN,
            })),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            FamilyGenerator::Click(_) => Family::Click,
            FamilyGenerator::Sensor(_) => Family::Sensor,
            FamilyGenerator::Purchase(_) => Family::Purchase,
            FamilyGenerator::Nexmark(_) => Family::Nexmark,
            FamilyGenerator::Orders(_) => Family::Orders,
        }
    }
}

impl EventGenerator for FamilyGenerator {
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        match self {
            FamilyGenerator::Click(g) => g.next_event_into(base_time_ms, event),
            FamilyGenerator::Sensor(g) => g.next_event_into(base_time_ms, event),
            FamilyGenerator::Purchase(g) => g.next_event_into(base_time_ms, event),
            FamilyGenerator::Nexmark(g) => g.next_event_into(base_time_ms, event),
            FamilyGenerator::Orders(g) => g.next_event_into(base_time_ms, event),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sensor

const SENSOR_TYPES: [(&str, f64, f64); 4] = [
    // (type, starting value, random-walk step)
    ("temperature", 21.0, 0.2),
    ("humidity", 45.0, 0.5),
    ("pressure", 1013.0, 0.8),
    ("co2", 600.0, 5.0),
];
const FIRMWARE: [&str; 4] = ["1.4.2", "1.5.0", "2.0.1", "2.1.0-rc1"];
/// Battery percent lost per reading; a device is recharged to 100 when it falls below 5.
const BATTERY_DRAIN: f64 = 0.01;

/// Sensor readings: `{device_id, sensor_type, value, battery, firmware, timestamp}`, each
/// device's value a random walk from its type's typical value. Keyed by `device_id`.
#[derive(Debug, Clone)]
pub struct SensorGenerator {
    seed: u64,
    rng: ChaCha8Rng,
    envelope: Envelope,
    /// Per device: (value, battery). Allocated once, so readings allocate nothing.
    devices: Vec<(f64, f64)>,
    next_seq: u64,
}

impl SensorGenerator {
    pub fn new(settings: &FamilySettings) -> Self {
        let devices = (0..settings.keys.max(1))
            .map(|device| {
                let traits = mix64(settings.seed ^ u64::from(device));
                let (_, start, _) = SENSOR_TYPES[(traits % SENSOR_TYPES.len() as u64) as usize];
                (start, 50.0 + (traits >> 40) as f64 % 50.0)
            })
            .collect();
        SensorGenerator {
            seed: settings.seed,
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            envelope: settings.envelope(),
            devices,
            next_seq: 0,
        }
    }

    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        let kind_draw = self.envelope.draw_kind(&mut self.rng);
        let device = self.rng.random_range(0..self.devices.len() as u32);
        let step_draw: f64 = self.rng.random_range(-1.0..=1.0);
        let jitter_ms = self.envelope.draw_jitter_ms(&mut self.rng);
        let arrival = self.envelope.arrive(kind_draw, jitter_ms, base_time_ms);

        let traits = mix64(self.seed ^ u64::from(device));
        let type_index = (traits % SENSOR_TYPES.len() as u64) as usize;
        let (sensor_type, _, step) = SENSOR_TYPES[type_index];
        let firmware = FIRMWARE[((traits >> 8) % FIRMWARE.len() as u64) as usize];
        let (value, battery) = &mut self.devices[device as usize];
        *value += step_draw * step;
        *battery -= BATTERY_DRAIN;
        if *battery < 5.0 {
            *battery = 100.0;
        }

        event.key.clear();
        event.key.extend_from_slice(b"d-");
        push_u64(&mut event.key, u64::from(device));
        let out = &mut event.payload;
        out.clear();
        out.push(b'{');
        push_key(out, "device_id");
        out.push(b'"');
        out.extend_from_slice(&event.key);
        out.push(b'"');
        push_checked_field(out, arrival.shape, "sensor_type", type_index as u64, |out| {
            out.extend_from_slice(sensor_type.as_bytes())
        });
        push_fixed2_field(out, "value", *value);
        push_fixed2_field(out, "battery", *battery);
        push_str_field(out, "firmware", firmware);
        push_timestamp_field(out, arrival.shape, arrival.event_time_ms);
        out.push(b'}');
        arrival.finish(event);
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// purchase

const PRODUCTS: u32 = 10_000;
const CATEGORIES: [&str; 8] = ["electronics", "books", "home", "garden", "toys", "fashion", "sports", "grocery"];
const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];
/// Quantities 1..=5 as cumulative percentages: most orders are of one item.
const QUANTITIES: [u32; 5] = [60, 85, 95, 98, 100];

/// Purchases: `{order_id, user_id, product_id, category, quantity, price, currency, timestamp}`.
/// A product's category and unit price and a user's currency are stable. Keyed by `user_id`.
#[derive(Debug, Clone)]
pub struct PurchaseGenerator {
    seed: u64,
    users: u32,
    rng: ChaCha8Rng,
    envelope: Envelope,
    next_seq: u64,
}

impl PurchaseGenerator {
    pub fn new(settings: &FamilySettings) -> Self {
        PurchaseGenerator {
            seed: settings.seed,
            users: settings.keys.max(1),
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            envelope: settings.envelope(),
            next_seq: 0,
        }
    }

    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        let kind_draw = self.envelope.draw_kind(&mut self.rng);
        let user = self.rng.random_range(0..self.users);
        let product = self.rng.random_range(0..PRODUCTS);
        let quantity_draw = self.rng.random_range(0..100u32);
        let jitter_ms = self.envelope.draw_jitter_ms(&mut self.rng);
        let arrival = self.envelope.arrive(kind_draw, jitter_ms, base_time_ms);

        let product_traits = mix64(self.seed ^ (u64::from(product) << 32));
        let category = CATEGORIES[(product_traits % CATEGORIES.len() as u64) as usize];
        // Unit price 0.99 .. 500.98, two decimals.
        let unit_price_cents = 99 + (product_traits >> 16) % 50_000;
        let quantity = QUANTITIES.iter().position(|&cumulative| quantity_draw < cumulative).unwrap_or(4) as u64 + 1;
        let currency = CURRENCIES[(mix64(self.seed ^ u64::from(user)) % CURRENCIES.len() as u64) as usize];

        event.key.clear();
        event.key.push(b'u');
        push_u64(&mut event.key, u64::from(user));
        let out = &mut event.payload;
        out.clear();
        out.push(b'{');
        push_key(out, "order_id");
        out.extend_from_slice(b"\"o-");
        push_u64(out, self.next_seq);
        out.push(b'"');
        push_key(out, "user_id");
        out.push(b'"');
        out.extend_from_slice(&event.key);
        out.push(b'"');
        push_checked_field(out, arrival.shape, "product_id", u64::from(product), |out| {
            out.push(b'p');
            push_u64(out, u64::from(product));
        });
        push_str_field(out, "category", category);
        push_int_field(out, "quantity", quantity as i64);
        push_fixed2_field(out, "price", (unit_price_cents * quantity) as f64 / 100.0);
        push_str_field(out, "currency", currency);
        push_timestamp_field(out, arrival.shape, arrival.event_time_ms);
        out.push(b'}');
        arrival.finish(event);
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// nexmark

/// Of every 50 events, Nexmark's generator makes 1 person, then 3 auctions, then 46 bids.
pub const NEXMARK_PERSON_PROPORTION: u64 = 1;
pub const NEXMARK_AUCTION_PROPORTION: u64 = 3;
pub const NEXMARK_BID_PROPORTION: u64 = 46;
const NEXMARK_TOTAL_PROPORTION: u64 = NEXMARK_PERSON_PROPORTION + NEXMARK_AUCTION_PROPORTION + NEXMARK_BID_PROPORTION;
/// Nexmark's first ids.
pub const NEXMARK_FIRST_PERSON_ID: u64 = 1_000;
pub const NEXMARK_FIRST_AUCTION_ID: u64 = 1_000;
const NEXMARK_FIRST_CATEGORY_ID: u64 = 10;
const NEXMARK_CATEGORIES: u64 = 5;
/// Sellers and bidders are drawn from the most recent this many people.
const NEXMARK_ACTIVE_PEOPLE: u64 = 1_000;
/// Half the bids go to a "hot" auction, a quarter of sellers and bidders are "hot" people.
const NEXMARK_HOT_AUCTION_RATIO: u64 = 2;
const NEXMARK_HOT_PERSON_RATIO: u64 = 4;
const NEXMARK_FIRST_NAMES: [&str; 11] = ["Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter"];
const NEXMARK_LAST_NAMES: [&str; 9] = ["Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris"];
const NEXMARK_CITIES: [&str; 10] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const NEXMARK_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const NEXMARK_ADJECTIVES: [&str; 8] = ["vintage", "rare", "signed", "antique", "mint", "used", "handmade", "limited"];
const NEXMARK_NOUNS: [&str; 8] = ["lamp", "guitar", "watch", "print", "camera", "chair", "vase", "bicycle"];
const NEXMARK_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];
/// Auctions run 10 s .. 1 h after they are created.
const NEXMARK_AUCTION_LENGTH_MS: std::ops::RangeInclusive<i64> = 10_000..=3_600_000;

/// Which of Nexmark's three event kinds event number `n` is: a fixed interleaving, so every 50
/// consecutive events (from a multiple of 50) hold exactly 1 person, 3 auctions and 46 bids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NexmarkKind {
    Person,
    Auction,
    Bid,
}

impl NexmarkKind {
    pub fn of_event(n: u64) -> Self {
        let offset = n % NEXMARK_TOTAL_PROPORTION;
        if offset < NEXMARK_PERSON_PROPORTION {
            NexmarkKind::Person
        } else if offset < NEXMARK_PERSON_PROPORTION + NEXMARK_AUCTION_PROPORTION {
            NexmarkKind::Auction
        } else {
            NexmarkKind::Bid
        }
    }
}

/// The Nexmark benchmark's people, auctions and bids on one topic, each with an `event_type`
/// and Nexmark's fields. Ids are consistent: an auction's seller and a bid's bidder are people
/// generated before it, a bid's auction an auction generated before it (the `keys` most recent
/// ones, or a hot one). Keyed by auction id (person id for people).
#[derive(Debug, Clone)]
pub struct NexmarkGenerator {
    open_auctions: u64,
    rng: ChaCha8Rng,
    envelope: Envelope,
    /// People and auctions generated so far (their ids are the first ids plus 0..n).
    people: u64,
    auctions: u64,
    next_seq: u64,
}

impl NexmarkGenerator {
    pub fn new(settings: &FamilySettings) -> Self {
        NexmarkGenerator {
            open_auctions: u64::from(settings.keys.max(1)),
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            envelope: settings.envelope(),
            people: 0,
            auctions: 0,
            next_seq: 0,
        }
    }

    /// A recent person: a hot one (a multiple of the hot ratio) or one of the active ones.
    fn existing_person(&mut self) -> u64 {
        let last = self.people - 1;
        let base0 = if self.rng.random_range(0..NEXMARK_HOT_PERSON_RATIO) == 0 {
            last / NEXMARK_HOT_PERSON_RATIO * NEXMARK_HOT_PERSON_RATIO
        } else {
            self.rng.random_range(last.saturating_sub(NEXMARK_ACTIVE_PEOPLE - 1)..=last)
        };
        NEXMARK_FIRST_PERSON_ID + base0
    }

    fn existing_auction(&mut self) -> u64 {
        let last = self.auctions - 1;
        let base0 = if self.rng.random_range(0..NEXMARK_HOT_AUCTION_RATIO) == 0 {
            last / NEXMARK_HOT_AUCTION_RATIO * NEXMARK_HOT_AUCTION_RATIO
        } else {
            self.rng.random_range(last.saturating_sub(self.open_auctions - 1)..=last)
        };
        NEXMARK_FIRST_AUCTION_ID + base0
    }

    /// Nexmark's price distribution: 1 .. 1,000,000 (in cents), log-uniform.
    fn price(&mut self) -> i64 {
        (10f64.powf(self.rng.random::<f64>() * 6.0) * 100.0).round() as i64
    }

    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        let kind_draw = self.envelope.draw_kind(&mut self.rng);
        let jitter_ms = self.envelope.draw_jitter_ms(&mut self.rng);
        let arrival = self.envelope.arrive(kind_draw, jitter_ms, base_time_ms);
        let shape = arrival.shape;
        event.key.clear();
        let out = &mut event.payload;
        out.clear();
        out.push(b'{');
        match NexmarkKind::of_event(self.next_seq) {
            NexmarkKind::Person => {
                let id = NEXMARK_FIRST_PERSON_ID + self.people;
                self.people += 1;
                let first = NEXMARK_FIRST_NAMES[self.rng.random_range(0..NEXMARK_FIRST_NAMES.len())];
                let last = NEXMARK_LAST_NAMES[self.rng.random_range(0..NEXMARK_LAST_NAMES.len())];
                let city = NEXMARK_CITIES[self.rng.random_range(0..NEXMARK_CITIES.len())];
                let state = NEXMARK_STATES[self.rng.random_range(0..NEXMARK_STATES.len())];
                let card: [u32; 4] = [0; 4].map(|_| self.rng.random_range(0..10_000));
                push_u64(&mut event.key, id);
                push_str_field(out, "event_type", "person");
                push_int_field(out, "id", id as i64);
                push_checked_field(out, shape, "name", id, |out| {
                    out.extend_from_slice(first.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(last.as_bytes());
                });
                push_key(out, "email_address");
                out.push(b'"');
                push_lowercase(out, first);
                out.push(b'.');
                push_lowercase(out, last);
                push_u64(out, id);
                out.extend_from_slice(b"@nexmark.example\"");
                push_key(out, "credit_card");
                out.push(b'"');
                for (i, group) in card.iter().enumerate() {
                    if i > 0 {
                        out.push(b' ');
                    }
                    push_padded(out, *group, 4);
                }
                out.push(b'"');
                push_str_field(out, "city", city);
                push_str_field(out, "state", state);
            }
            NexmarkKind::Auction => {
                let id = NEXMARK_FIRST_AUCTION_ID + self.auctions;
                self.auctions += 1;
                let seller = self.existing_person();
                let adjective = NEXMARK_ADJECTIVES[self.rng.random_range(0..NEXMARK_ADJECTIVES.len())];
                let noun = NEXMARK_NOUNS[self.rng.random_range(0..NEXMARK_NOUNS.len())];
                let initial_bid = self.price();
                let reserve = initial_bid + self.price();
                let expires_ms = arrival.event_time_ms.saturating_add(self.rng.random_range(NEXMARK_AUCTION_LENGTH_MS));
                let category = NEXMARK_FIRST_CATEGORY_ID + self.rng.random_range(0..NEXMARK_CATEGORIES);
                push_u64(&mut event.key, id);
                push_str_field(out, "event_type", "auction");
                push_int_field(out, "id", id as i64);
                push_checked_field(out, shape, "item_name", id, |out| {
                    out.extend_from_slice(adjective.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(noun.as_bytes());
                });
                push_key(out, "description");
                out.push(b'"');
                out.extend_from_slice(b"A ");
                out.extend_from_slice(adjective.as_bytes());
                out.push(b' ');
                out.extend_from_slice(noun.as_bytes());
                out.extend_from_slice(b", lot ");
                push_u64(out, id);
                out.push(b'"');
                push_int_field(out, "initial_bid", initial_bid);
                push_int_field(out, "reserve", reserve);
                push_key(out, "expires");
                out.push(b'"');
                push_rfc3339_millis(out, expires_ms);
                out.push(b'"');
                push_int_field(out, "seller", seller as i64);
                push_int_field(out, "category", category as i64);
            }
            NexmarkKind::Bid => {
                let auction = self.existing_auction();
                let bidder = self.existing_person();
                let price = self.price();
                let channel_index = self.rng.random_range(0..NEXMARK_CHANNELS.len());
                let channel = NEXMARK_CHANNELS[channel_index];
                let query = self.rng.random_range(0..1_000u64);
                push_u64(&mut event.key, auction);
                push_str_field(out, "event_type", "bid");
                push_int_field(out, "auction", auction as i64);
                push_int_field(out, "bidder", bidder as i64);
                push_int_field(out, "price", price);
                push_checked_field(out, shape, "channel", channel_index as u64, |out| out.extend_from_slice(channel.as_bytes()));
                push_key(out, "url");
                out.extend_from_slice(b"\"https://www.nexmark.com/");
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(b"/item.htm?query=");
                push_u64(out, query);
                out.extend_from_slice(b"&channel_id=");
                push_u64(out, channel_index as u64);
                out.push(b'"');
            }
        }
        push_timestamp_field(out, shape, arrival.event_time_ms);
        out.push(b'}');
        arrival.finish(event);
        event.seq = self.next_seq;
        self.next_seq += 1;
    }
}

fn push_lowercase(out: &mut Vec<u8>, word: &str) {
    out.extend(word.bytes().map(|b| b.to_ascii_lowercase()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};
    use std::collections::{HashMap, HashSet};
    use tidemark::source::envelope::{EventKind, MalformedKind};

    const START_MS: i64 = 1_795_464_000_000; // 2026-11-23T20:00:00Z
    const STEP_MS: i64 = 3;

    fn settings(seed: u64) -> FamilySettings {
        FamilySettings {
            seed,
            keys: 300,
            click_pages: 40,
            disorder_ms: 2_000,
            late_share: 0.05,
            late_by_ms: 3_600_000,
            malformed_share: 0.02,
            duplicate_share: 0.0,
            replay_share: 0.0,
        }
    }

    fn generate(family: Family, settings: &FamilySettings, n: u64) -> Vec<GeneratedEvent> {
        let mut generator = FamilyGenerator::new(family, settings);
        assert_eq!(generator.family(), family);
        let mut event = GeneratedEvent::default();
        (0..n)
            .map(|seq| {
                generator.next_event_into(START_MS + seq as i64 * STEP_MS, &mut event);
                event.clone()
            })
            .collect()
    }

    fn parse(event: &GeneratedEvent) -> Map<String, Value> {
        match serde_json::from_slice::<Value>(&event.payload) {
            Ok(Value::Object(object)) => object,
            other => panic!("{other:?}: {}", String::from_utf8_lossy(&event.payload)),
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Type {
        Str,
        Int,
        Float,
        Timestamp,
    }

    /// Exactly `fields` with their types; returns the object.
    fn check_fields(event: &GeneratedEvent, fields: &[(&str, Type)]) -> Map<String, Value> {
        let object = parse(event);
        let names: HashSet<&str> = object.keys().map(String::as_str).collect();
        let expected: HashSet<&str> = fields.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, expected, "{object:?}");
        for (name, ty) in fields {
            let value = &object[*name];
            let ok = match ty {
                Type::Str => value.is_string(),
                Type::Int => value.is_i64(),
                Type::Float => value.is_f64(),
                Type::Timestamp => value.as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()).is_some(),
            };
            assert!(ok, "{name} should be {ty:?}: {value}");
        }
        let timestamp = object["timestamp"].as_str().unwrap();
        assert_eq!(timestamp.len(), "2026-11-23T20:00:00.123Z".len());
        assert_eq!(chrono::DateTime::parse_from_rfc3339(timestamp).unwrap().timestamp_millis(), event.event_time_ms);
        object
    }

    fn well_formed(events: &[GeneratedEvent]) -> impl Iterator<Item = &GeneratedEvent> {
        events.iter().filter(|e| matches!(e.kind, EventKind::Valid | EventKind::VeryLate))
    }

    const SENSOR_FIELDS: [(&str, Type); 6] = [
        ("device_id", Type::Str),
        ("sensor_type", Type::Str),
        ("value", Type::Float),
        ("battery", Type::Float),
        ("firmware", Type::Str),
        ("timestamp", Type::Timestamp),
    ];
    const PURCHASE_FIELDS: [(&str, Type); 8] = [
        ("order_id", Type::Str),
        ("user_id", Type::Str),
        ("product_id", Type::Str),
        ("category", Type::Str),
        ("quantity", Type::Int),
        ("price", Type::Float),
        ("currency", Type::Str),
        ("timestamp", Type::Timestamp),
    ];
    const PERSON_FIELDS: [(&str, Type); 8] = [
        ("event_type", Type::Str),
        ("id", Type::Int),
        ("name", Type::Str),
        ("email_address", Type::Str),
        ("credit_card", Type::Str),
        ("city", Type::Str),
        ("state", Type::Str),
        ("timestamp", Type::Timestamp),
    ];
    const AUCTION_FIELDS: [(&str, Type); 10] = [
        ("event_type", Type::Str),
        ("id", Type::Int),
        ("item_name", Type::Str),
        ("description", Type::Str),
        ("initial_bid", Type::Int),
        ("reserve", Type::Int),
        ("expires", Type::Timestamp),
        ("seller", Type::Int),
        ("category", Type::Int),
        ("timestamp", Type::Timestamp),
    ];
    const BID_FIELDS: [(&str, Type); 7] = [
        ("event_type", Type::Str),
        ("auction", Type::Int),
        ("bidder", Type::Int),
        ("price", Type::Int),
        ("channel", Type::Str),
        ("url", Type::Str),
        ("timestamp", Type::Timestamp),
    ];

    #[test]
    fn sensor_payloads_have_the_documented_fields_and_walk_per_device() {
        let events = generate(Family::Sensor, &settings(1), 20_000);
        let mut last_value: HashMap<String, (String, f64)> = HashMap::new();
        for event in well_formed(&events) {
            let object = check_fields(event, &SENSOR_FIELDS);
            let device = object["device_id"].as_str().unwrap().to_owned();
            assert_eq!(device.as_bytes(), event.key.as_slice());
            let sensor_type = object["sensor_type"].as_str().unwrap().to_owned();
            let (_, _, step) = SENSOR_TYPES.iter().find(|(name, _, _)| *name == sensor_type).unwrap();
            let value = object["value"].as_f64().unwrap();
            let battery = object["battery"].as_f64().unwrap();
            assert!((5.0..=100.0).contains(&battery), "{battery}");
            assert!(FIRMWARE.contains(&object["firmware"].as_str().unwrap()));
            // A random walk: consecutive readings of a device differ by at most a few steps
            // (malformed readings in between also step), and its type never changes.
            if let Some((previous_type, previous)) = last_value.insert(device, (sensor_type.clone(), value)) {
                assert_eq!(previous_type, sensor_type);
                assert!((value - previous).abs() <= step * 8.0 + 0.01, "{previous} → {value}");
            }
        }
        assert_eq!(last_value.len(), 300, "every device reports");
    }

    #[test]
    fn purchase_payloads_have_the_documented_fields_and_stable_products() {
        let events = generate(Family::Purchase, &settings(2), 20_000);
        let mut products: HashMap<String, (String, f64)> = HashMap::new();
        let mut order_ids = HashSet::new();
        for event in well_formed(&events) {
            let object = check_fields(event, &PURCHASE_FIELDS);
            assert_eq!(object["user_id"].as_str().unwrap().as_bytes(), event.key.as_slice());
            assert!(order_ids.insert(object["order_id"].as_str().unwrap().to_owned()), "order ids are unique");
            let quantity = object["quantity"].as_i64().unwrap();
            assert!((1..=5).contains(&quantity));
            assert!(CURRENCIES.contains(&object["currency"].as_str().unwrap()));
            let unit_price = object["price"].as_f64().unwrap() / quantity as f64;
            let product = (object["category"].as_str().unwrap().to_owned(), (unit_price * 100.0).round());
            assert_eq!(
                products.entry(object["product_id"].as_str().unwrap().to_owned()).or_insert(product.clone()),
                &product
            );
        }
    }

    #[test]
    fn nexmark_payloads_have_the_documented_fields_per_event_type() {
        let events = generate(Family::Nexmark, &settings(3), 20_000);
        let mut seen = HashSet::new();
        for event in well_formed(&events) {
            let event_type = parse(event)["event_type"].as_str().unwrap().to_owned();
            let object = match event_type.as_str() {
                "person" => check_fields(event, &PERSON_FIELDS),
                "auction" => check_fields(event, &AUCTION_FIELDS),
                "bid" => check_fields(event, &BID_FIELDS),
                other => panic!("event_type {other}"),
            };
            let key = match event_type.as_str() {
                "bid" => object["auction"].as_i64().unwrap(),
                _ => object["id"].as_i64().unwrap(),
            };
            assert_eq!(key.to_string().as_bytes(), event.key.as_slice());
            seen.insert(event_type);
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn nexmark_interleaves_exactly_1_3_46_with_consistent_ids() {
        let mut s = settings(4);
        s.malformed_share = 0.0;
        s.keys = 20;
        let events = generate(Family::Nexmark, &s, 50 * 400);
        let (mut people, mut auctions) = (HashSet::new(), HashSet::new());
        let mut sellers = HashSet::new();
        for (block, chunk) in events.chunks(50).enumerate() {
            let mut counts: HashMap<String, u64> = HashMap::new();
            for event in chunk {
                let object = parse(event);
                let event_type = object["event_type"].as_str().unwrap();
                *counts.entry(event_type.to_owned()).or_default() += 1;
                match event_type {
                    "person" => assert!(people.insert(object["id"].as_u64().unwrap())),
                    "auction" => {
                        assert!(auctions.insert(object["id"].as_u64().unwrap()));
                        let seller = object["seller"].as_u64().unwrap();
                        assert!(people.contains(&seller), "auction by unknown seller {seller}");
                        sellers.insert(seller);
                        let expires = chrono::DateTime::parse_from_rfc3339(object["expires"].as_str().unwrap()).unwrap();
                        assert!(expires.timestamp_millis() > event.event_time_ms);
                        assert!(object["reserve"].as_i64().unwrap() > object["initial_bid"].as_i64().unwrap());
                    }
                    _ => {
                        let (auction, bidder) = (object["auction"].as_u64().unwrap(), object["bidder"].as_u64().unwrap());
                        assert!(auctions.contains(&auction), "bid on unknown auction {auction}");
                        assert!(people.contains(&bidder), "bid by unknown person {bidder}");
                        // Bids go to the `keys` most recent auctions (or a hot one).
                        assert!(auction + 20 > *auctions.iter().max().unwrap());
                    }
                }
            }
            let expected = [("person", 1), ("auction", 3), ("bid", 46)].map(|(k, v)| (k.to_owned(), v)).into();
            assert_eq!(counts, expected, "block {block}");
        }
        assert_eq!(people.len(), 400);
        assert_eq!(auctions.len(), 1_200);
        assert_eq!(*people.iter().min().unwrap(), NEXMARK_FIRST_PERSON_ID);
        assert_eq!(*auctions.iter().max().unwrap(), NEXMARK_FIRST_AUCTION_ID + 1_199);
        assert!(sellers.len() > 100, "sellers spread over the people: {}", sellers.len());
    }

    #[test]
    fn same_seed_gives_identical_events_and_another_seed_does_not() {
        for family in Family::ALL {
            let a = generate(family, &settings(7), 3_000);
            assert_eq!(a, generate(family, &settings(7), 3_000), "{family}");
            assert_ne!(a, generate(family, &settings(8), 3_000), "{family}");
        }
    }

    #[test]
    fn shares_are_close_to_configured_and_malformed_payloads_fail_as_stated() {
        let mut s = settings(9);
        s.late_share = 0.1;
        s.malformed_share = 0.05;
        for family in Family::ENVELOPED {
            let events = generate(family, &s, 20_000);
            let late = events.iter().filter(|e| e.kind == EventKind::VeryLate).count();
            assert!((1_800..=2_200).contains(&late), "{family}: late {late}");
            let mut malformed: HashMap<MalformedKind, usize> = HashMap::new();
            for event in &events {
                let EventKind::Malformed(kind) = event.kind else {
                    let behind = START_MS + event.seq as i64 * STEP_MS - event.event_time_ms;
                    let lateness = if event.kind == EventKind::VeryLate { s.late_by_ms } else { 0 };
                    assert!((lateness..=lateness + s.disorder_ms).contains(&behind), "{family}: {behind}");
                    continue;
                };
                *malformed.entry(kind).or_default() += 1;
                let parsed = serde_json::from_slice::<Value>(&event.payload);
                match kind {
                    MalformedKind::NotJson => assert!(parsed.is_err(), "{family}"),
                    MalformedKind::MissingField => {
                        let object = parsed.unwrap();
                        let all_strings_present = object.get("timestamp").is_some_and(Value::is_string)
                            && ["page_url", "sensor_type", "product_id", "name", "item_name", "channel"]
                                .iter()
                                .filter(|f| object.get(**f).is_some())
                                .count()
                                >= 1;
                        assert!(!all_strings_present, "{family}: {object}");
                    }
                    MalformedKind::WrongType => {
                        let object = parsed.unwrap();
                        let numeric = ["page_url", "sensor_type", "product_id", "name", "item_name", "channel"]
                            .iter()
                            .any(|f| object.get(*f).is_some_and(Value::is_u64));
                        assert!(numeric, "{family}: {object}");
                    }
                    MalformedKind::BadTimestamp => assert_eq!(parsed.unwrap()["timestamp"], "yesterday", "{family}"),
                }
            }
            let total: usize = malformed.values().sum();
            assert!((850..=1_150).contains(&total), "{family}: malformed {total}");
            assert_eq!(malformed.len(), 4, "{family}: {malformed:?}");
            for count in malformed.values() {
                assert!(count.abs_diff(total / 4) <= 1, "{family}: {malformed:?}");
            }
        }
    }

    #[test]
    fn click_family_has_keys_users_and_click_pages_pages() {
        let events = generate(Family::Click, &settings(5), 20_000);
        let (mut users, mut pages) = (HashSet::new(), HashSet::new());
        for event in well_formed(&events) {
            let object = parse(event);
            assert_eq!(object["user_id"].as_str().unwrap().as_bytes(), event.key.as_slice());
            users.insert(object["user_id"].as_str().unwrap().to_owned());
            pages.insert(object["page_url"].as_str().unwrap().to_owned());
        }
        assert_eq!((users.len(), pages.len()), (300, 40));
    }

    #[test]
    fn orders_family_is_debezium_change_events_keyed_by_order() {
        let mut s = settings(11);
        s.duplicate_share = 0.1;
        s.replay_share = 0.1;
        let events = generate(Family::Orders, &s, 5_000);
        let mut ops: HashMap<String, usize> = HashMap::new();
        for event in events.iter().filter(|e| e.kind == EventKind::Valid && !e.payload.is_empty()) {
            let object = parse(event);
            let op = object["op"].as_str().unwrap().to_owned();
            let row = if op == "d" { &object["before"] } else { &object["after"] };
            assert_eq!(event.key, format!("{{\"order_id\":{}}}", row["order_id"]).into_bytes());
            assert!(object["source"]["lsn"].is_u64() && object["source"]["ts_ms"].is_u64(), "{object:?}");
            *ops.entry(op).or_default() += 1;
        }
        assert!(["c", "u", "d"].iter().all(|op| ops.get(*op).is_some_and(|n| *n > 100)), "{ops:?}");
        let tombstones = events.iter().filter(|e| e.payload.is_empty()).count();
        assert!(tombstones >= ops["d"] / 2, "{tombstones} tombstones for {} deletes", ops["d"]);
    }

    #[test]
    fn family_names_parse_and_have_default_topics() {
        for family in Family::ALL {
            assert_eq!(family.name().parse::<Family>(), Ok(family));
            assert_eq!(family.default_topic(), format!("{family}-events"));
        }
        assert!("clicks".parse::<Family>().unwrap_err().contains("click, sensor, purchase, nexmark or orders"));
    }
}
