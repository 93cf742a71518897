//! A deterministic generator of Debezium change events for an `orders` table.
//!
//! [`OrdersCdcGenerator`] keeps a model database — `orders(order_id, customer_id, status,
//! amount, updated_at)` — and changes it one row at a time: it inserts orders (op `c`), moves
//! them through `pending → paid → shipped → delivered` or changes their amount (op `u`), and
//! deletes some (op `d`, followed by a Kafka tombstone: an empty value with the order's key,
//! as Debezium writes for log compaction). Every change gets the next, strictly increasing
//! Postgres-style LSN (`source.lsn`) and the base time as `source.ts_ms`.
//!
//! Besides the changes themselves it mixes in what a change stream delivers in practice:
//! - duplicates (`duplicate_share`): the change just sent, sent again (an at-least-once redelivery);
//! - replays (`replay_share`): an older change of some order, sent again after newer ones
//!   (out of order: a consumer must not apply it over the newer state);
//! - malformed events (`malformed_share`): a broken copy of the change just sent, cycling
//!   through truncated JSON, a missing `source.lsn`, a string `amount` and no `ts_ms` at all.
//!
//! So the model is always the state a correct consumer reaches: per order, the change with the
//! highest LSN. [`OrdersCdcGenerator::table`] hands it out for tests. Message keys are the
//! Debezium key `{"order_id":N}`, so all changes of an order land in one partition.
//!
//! Same seed and same base times → byte-identical events.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::envelope::{clamp_share, push_fixed2, push_rfc3339_millis, push_u64, EventKind, GeneratedEvent, MalformedKind, MALFORMED_CYCLE};

/// What to generate. Shares are clamped to `[0, 1]`, `orders` to at least 1.
#[derive(Debug, Clone, PartialEq)]
pub struct OrdersCdcSettings {
    pub seed: u64,
    /// Orders live at once, about: inserts outnumber deletes until there are this many.
    pub orders: u32,
    /// Share of changes sent twice in a row.
    pub duplicate_share: f64,
    /// Share of changes followed by a replay of an older change.
    pub replay_share: f64,
    /// Share of changes followed by a malformed copy.
    pub malformed_share: f64,
    /// The LSN before the first change. The daemon's generator starts from the wall clock
    /// (ms × 1000), so a run after a restart writes positions above the previous run's.
    pub first_lsn: u64,
}

impl Default for OrdersCdcSettings {
    fn default() -> Self {
        OrdersCdcSettings {
            seed: 42,
            orders: 1000,
            duplicate_share: 0.0,
            replay_share: 0.0,
            malformed_share: 0.0,
            first_lsn: DEFAULT_FIRST_LSN,
        }
    }
}

/// One row of the model `orders` table.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRow {
    pub order_id: u64,
    pub customer_id: String,
    pub status: &'static str,
    pub amount_cents: i64,
    pub updated_at_ms: i64,
}

const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "delivered"];
/// The LSN before the first change unless set; each change advances it by 1..=64.
pub const DEFAULT_FIRST_LSN: u64 = 24_000_000;
/// Changes kept for replays.
const HISTORY: usize = 512;

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct OrdersCdcGenerator {
    settings: OrdersCdcSettings,
    rng: ChaCha8Rng,
    /// Live orders, in no particular order.
    live: Vec<OrderRow>,
    next_order_id: u64,
    lsn: u64,
    tx_id: u64,
    /// Events due before the next change: (key, payload, kind).
    queue: VecDeque<(Vec<u8>, Vec<u8>, EventKind)>,
    /// Recent changes (key, payload), for replays.
    history: VecDeque<(Vec<u8>, Vec<u8>)>,
    malformed_count: u64,
    next_seq: u64,
}

impl OrdersCdcGenerator {
    pub fn new(settings: OrdersCdcSettings) -> Self {
        let mut settings = settings;
        settings.orders = settings.orders.max(1);
        settings.duplicate_share = clamp_share(settings.duplicate_share);
        settings.replay_share = clamp_share(settings.replay_share);
        settings.malformed_share = clamp_share(settings.malformed_share);
        OrdersCdcGenerator {
            rng: ChaCha8Rng::seed_from_u64(settings.seed ^ 0x0cdc_0cdc),
            lsn: settings.first_lsn,
            settings,
            live: Vec::new(),
            next_order_id: 1,
            tx_id: 700,
            queue: VecDeque::new(),
            history: VecDeque::with_capacity(HISTORY),
            malformed_count: 0,
            next_seq: 0,
        }
    }

    /// The model table as of the changes generated so far, by order id.
    pub fn table(&self) -> Vec<OrderRow> {
        let mut rows = self.live.clone();
        rows.sort_by_key(|r| r.order_id);
        rows
    }

    /// The next event; a change's events (it, a duplicate, a malformed copy, a replay, a
    /// tombstone after a delete) all carry the `base_time_ms` of the change.
    pub fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        if self.queue.is_empty() {
            self.change(base_time_ms);
        }
        let (key, payload, kind) = self.queue.pop_front().expect("a change queues at least one event");
        event.key = key;
        event.payload = payload;
        event.kind = kind;
        event.event_time_ms = base_time_ms;
        event.seq = self.next_seq;
        self.next_seq += 1;
    }

    /// Makes one change of the model and queues its events.
    fn change(&mut self, now_ms: i64) {
        let draw: f64 = self.rng.random();
        let (duplicate, replay, malformed): (f64, f64, f64) = (self.rng.random(), self.rng.random(), self.rng.random());
        self.lsn += self.rng.random_range(1..=64);
        self.tx_id += 1;
        let target = self.settings.orders as usize;
        let (op, before, after) = if self.live.is_empty() || (draw < 0.35 && self.live.len() < target) || self.live.len() < target / 4 {
            let row = OrderRow {
                order_id: self.next_order_id,
                customer_id: format!("c{}", self.rng.random_range(0..(target as u32 * 2).max(1))),
                status: STATUSES[0],
                amount_cents: self.rng.random_range(500..50_000),
                updated_at_ms: now_ms,
            };
            self.next_order_id += 1;
            self.live.push(row.clone());
            ("c", None, Some(row))
        } else {
            let i = self.rng.random_range(0..self.live.len());
            if draw < 0.45 || (draw < 0.6 && self.live.len() > target) {
                let row = self.live.swap_remove(i);
                ("d", Some(row), None)
            } else {
                let before = self.live[i].clone();
                let row = &mut self.live[i];
                let next = STATUSES.iter().position(|s| *s == row.status).map_or(0, |p| p + 1);
                if next < STATUSES.len() && draw < 0.8 {
                    row.status = STATUSES[next];
                } else {
                    row.amount_cents = (row.amount_cents + self.rng.random_range(-2_000..2_000)).max(100);
                }
                row.updated_at_ms = now_ms;
                ("u", Some(before), Some(row.clone()))
            }
        };
        let order_id = before.as_ref().or(after.as_ref()).map_or(0, |r| r.order_id);
        let mut key = b"{\"order_id\":".to_vec();
        push_u64(&mut key, order_id);
        key.push(b'}');
        let payload = self.envelope(op, before.as_ref(), after.as_ref(), now_ms, Broken::No);
        self.queue.push_back((key.clone(), payload.clone(), EventKind::Valid));
        if duplicate < self.settings.duplicate_share {
            self.queue.push_back((key.clone(), payload.clone(), EventKind::Valid));
        }
        if malformed < self.settings.malformed_share {
            let kind = MALFORMED_CYCLE[(self.malformed_count % 4) as usize];
            self.malformed_count += 1;
            let broken = self.envelope(op, before.as_ref(), after.as_ref(), now_ms, Broken::As(kind));
            self.queue.push_back((key.clone(), broken, EventKind::Malformed(kind)));
        }
        if replay < self.settings.replay_share && !self.history.is_empty() {
            let (k, p) = self.history[self.rng.random_range(0..self.history.len())].clone();
            self.queue.push_back((k, p, EventKind::Valid));
        }
        if op == "d" {
            self.queue.push_back((key.clone(), Vec::new(), EventKind::Valid));
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((key, payload));
    }

    fn envelope(&self, op: &str, before: Option<&OrderRow>, after: Option<&OrderRow>, now_ms: i64, broken: Broken) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"before\":");
        push_row(&mut out, before, broken);
        out.extend_from_slice(b",\"after\":");
        push_row(&mut out, after, broken);
        out.extend_from_slice(b",\"source\":{\"version\":\"2.7.0.Final\",\"connector\":\"postgresql\",\"name\":\"shop\"");
        if broken != Broken::As(MalformedKind::BadTimestamp) {
            out.extend_from_slice(b",\"ts_ms\":");
            push_u64(&mut out, now_ms.max(0) as u64);
        }
        out.extend_from_slice(b",\"snapshot\":\"false\",\"db\":\"shop\",\"schema\":\"public\",\"table\":\"orders\",\"txId\":");
        push_u64(&mut out, self.tx_id);
        if broken != Broken::As(MalformedKind::MissingField) {
            out.extend_from_slice(b",\"lsn\":");
            push_u64(&mut out, self.lsn);
        }
        out.extend_from_slice(b"},\"op\":\"");
        out.extend_from_slice(op.as_bytes());
        out.push(b'"');
        if broken != Broken::As(MalformedKind::BadTimestamp) {
            out.extend_from_slice(b",\"ts_ms\":");
            push_u64(&mut out, now_ms.max(0) as u64 + 3);
        }
        out.push(b'}');
        if broken == Broken::As(MalformedKind::NotJson) {
            out.truncate(out.len() / 2);
        }
        out
    }
}

/// Whether (and how) an envelope is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    No,
    As(MalformedKind),
}

fn push_row(out: &mut Vec<u8>, row: Option<&OrderRow>, broken: Broken) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.extend_from_slice(b"{\"order_id\":");
    push_u64(out, row.order_id);
    out.extend_from_slice(b",\"customer_id\":\"");
    out.extend_from_slice(row.customer_id.as_bytes());
    out.extend_from_slice(b"\",\"status\":\"");
    out.extend_from_slice(row.status.as_bytes());
    out.extend_from_slice(b"\",\"amount\":");
    if broken == Broken::As(MalformedKind::WrongType) {
        out.extend_from_slice(b"\"a lot\"");
    } else {
        push_fixed2(out, row.amount_cents as f64 / 100.0);
    }
    out.extend_from_slice(b",\"updated_at\":\"");
    push_rfc3339_millis(out, row.updated_at_ms);
    out.extend_from_slice(b"\"}");
}

impl super::producer::EventGenerator for OrdersCdcGenerator {
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        OrdersCdcGenerator::next_event_into(self, base_time_ms, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The table a correct consumer builds: per order, the change with the highest LSN.
    fn apply_by_lsn(events: &[GeneratedEvent]) -> BTreeMap<u64, serde_json::Value> {
        let mut latest: BTreeMap<u64, (u64, serde_json::Value)> = BTreeMap::new();
        for e in events {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.payload) else {
                continue;
            };
            let Some(lsn) = v["source"]["lsn"].as_u64() else { continue };
            if v["source"]["ts_ms"].is_null() || v["after"]["amount"].is_string() {
                continue;
            }
            let row = if v["op"] == "d" { &v["before"] } else { &v["after"] };
            let id = row["order_id"].as_u64().unwrap();
            if latest.get(&id).is_none_or(|(l, _)| lsn > *l) {
                latest.insert(id, (lsn, v.clone()));
            }
        }
        latest
            .into_iter()
            .filter(|(_, (_, v))| v["op"] != "d")
            .map(|(id, (_, v))| (id, v["after"].clone()))
            .collect()
    }

    #[test]
    fn the_model_is_what_applying_by_lsn_gives() {
        let mut g = OrdersCdcGenerator::new(OrdersCdcSettings {
            seed: 3,
            orders: 50,
            duplicate_share: 0.1,
            replay_share: 0.2,
            malformed_share: 0.05,
            ..OrdersCdcSettings::default()
        });
        let mut events = Vec::new();
        for i in 0..5_000 {
            let mut e = GeneratedEvent::default();
            g.next_event_into(1_795_392_000_000 + i * 10, &mut e);
            events.push(e);
        }
        let table = apply_by_lsn(&events);
        let model = g.table();
        assert!(model.len() >= 20, "{}", model.len());
        assert_eq!(table.keys().copied().collect::<Vec<_>>(), model.iter().map(|r| r.order_id).collect::<Vec<_>>());
        for row in &model {
            let got = &table[&row.order_id];
            assert_eq!(got["status"], row.status);
            assert_eq!(got["customer_id"], row.customer_id.as_str());
            assert_eq!((got["amount"].as_f64().unwrap() * 100.0).round() as i64, row.amount_cents);
        }
        let tombstones = events.iter().filter(|e| e.payload.is_empty()).count();
        let deletes = events.iter().filter(|e| e.payload.windows(8).any(|w| w == b"\"op\":\"d\"")).count();
        assert!(tombstones > 100 && deletes >= tombstones, "{tombstones} tombstones, {deletes} deletes");
        let malformed = events.iter().filter(|e| matches!(e.kind, EventKind::Malformed(_))).count();
        assert!(malformed > 50, "{malformed}");
        // Replays make some changes arrive after a newer change of the same order.
        let mut last_lsn: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        let mut older = 0;
        for e in &events {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.payload) else {
                continue;
            };
            let Some(lsn) = v["source"]["lsn"].as_u64() else { continue };
            let last = last_lsn.entry(e.key.clone()).or_default();
            older += usize::from(lsn <= *last);
            *last = (*last).max(lsn);
        }
        assert!(older > 500, "{older} duplicates or replays");
    }

    #[test]
    fn same_seed_same_events() {
        let run = || {
            let mut g = OrdersCdcGenerator::new(OrdersCdcSettings {
                replay_share: 0.1,
                ..OrdersCdcSettings::default()
            });
            let mut e = GeneratedEvent::default();
            (0..500)
                .map(|i| {
                    g.next_event_into(i, &mut e);
                    (e.key.clone(), e.payload.clone())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
