//! `tidemark loadgen`: produce one [event family](super::families) into any Kafka broker at a
//! target rate or flat out, and measure the rate achieved.
//!
//! Pacing is a token bucket scheduled against the start instant ([`Pacer`]): event *n* is
//! due at *n* / rate, so sleeping never accumulates drift; after a stall the loop catches up
//! in a burst of at most one second's worth of events, and forfeits the rest rather than
//! flooding the broker. A full local producer queue is waited out (poll, retry), never
//! dropped; delivery failures are counted, not fatal, and reported at the end.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::envelope::{EventKind, GeneratedEvent};
use super::families::{Family, FamilyGenerator};
use super::producer::{wall_clock_ms, EventProducer, ProducerError, FINAL_FLUSH_TIMEOUT};

/// Events generated and queued between checks of the clock, the stop flag and the limits.
const MAX_BATCH: u64 = 1_024;
/// The loop sleeps at most this long at a time, so it notices `stop` quickly.
const MAX_PACING_SLEEP: Duration = Duration::from_millis(50);

/// A target rate: events per second, or as fast as the broker takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Max,
    PerSecond(u64),
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Rate::Max),
            _ => match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Rate::PerSecond(n)),
                _ => Err(format!("rate `{s}` must be a positive number of events per second, or `max`")),
            },
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::PerSecond(n) => write!(f, "{n}"),
        }
    }
}

/// Token bucket against a fixed start: `rate` tokens a second, the first at the start, at
/// most `burst` saved up. Tokens beyond `burst` (after a stall) are forfeited.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rate: u64,
    burst: u64,
    forfeited: u64,
}

impl Pacer {
    pub fn new(start: Instant, rate: u64, burst: u64) -> Self {
        Pacer {
            start,
            rate: rate.max(1),
            burst: burst.max(1),
            forfeited: 0,
        }
    }

    /// How many more events may be sent at `now`, when `sent` have been sent.
    pub fn available(&mut self, sent: u64, now: Instant) -> u64 {
        let elapsed_ns = now.saturating_duration_since(self.start).as_nanos();
        let earned = u64::try_from(elapsed_ns * u128::from(self.rate) / 1_000_000_000).unwrap_or(u64::MAX);
        let available = earned.saturating_add(1).saturating_sub(self.forfeited).saturating_sub(sent);
        if available > self.burst {
            self.forfeited += available - self.burst;
            return self.burst;
        }
        available
    }

    /// When the next token arrives, once `sent` events have been sent.
    pub fn next_due(&self, sent: u64) -> Instant {
        let ns = u128::from(sent + self.forfeited) * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// What to produce and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSettings {
    pub rate: Rate,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Call the progress callback this often.
    pub report_every: Duration,
}

/// Progress so far, handed to the callback every `report_every`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadProgress {
    pub produced: u64,
    /// Key + payload bytes queued.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Events per second since the previous report.
    pub recent_rate: f64,
    pub delivery_failures: u64,
}

/// What [`run_loadgen`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub family: Family,
    pub target: Rate,
    /// Events queued (each delivered or counted in `failed`).
    pub produced: u64,
    pub valid: u64,
    pub very_late: u64,
    pub malformed: u64,
    /// Key + payload bytes.
    pub bytes: u64,
    /// Until everything was delivered (the final flush included).
    pub elapsed: Duration,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl LoadReport {
    pub fn events_per_second(&self) -> f64 {
        self.produced as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `loadgen: <family> <n> events in <s> s = <rate> events/s (<MB/s>), target <N|max>`.
    pub fn summary_line(&self) -> String {
        format!(
            "loadgen: {} {} events in {:.2} s = {:.0} events/s ({:.1} MB/s), target {}",
            self.family,
            self.produced,
            self.elapsed.as_secs_f64(),
            self.events_per_second(),
            self.megabytes_per_second(),
            self.target
        )
    }
}

/// Produces events of `generator`'s family into `topic` (keys = the family's natural key,
/// partitions by key hash), event time = wall clock, until `count`, `duration` or `stop`.
/// Calls `on_progress` every `report_every`. Returns once everything is delivered or failed
/// (the final flush waits up to 30 s); errors only when a message cannot be queued at all or
/// the flush times out.
pub fn run_loadgen(
    producer: &EventProducer,
    topic: &str,
    generator: &mut FamilyGenerator,
    settings: &LoadSettings,
    stop: &AtomicBool,
    mut on_progress: impl FnMut(&LoadProgress),
) -> Result<LoadReport, ProducerError> {
    let start = Instant::now();
    let mut pacer = match settings.rate {
        Rate::Max => None,
        Rate::PerSecond(rate) => Some(Pacer::new(start, rate, rate)),
    };
    let report_every = settings.report_every.max(Duration::from_millis(10));
    let mut next_report = start + report_every;
    let (mut last_report_at, mut last_report_produced) = (start, 0);
    let mut report = LoadReport {
        family: generator.family(),
        target: settings.rate,
        produced: 0,
        valid: 0,
        very_late: 0,
        malformed: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    let mut event = GeneratedEvent::default();
    loop {
        let now = Instant::now();
        if now >= next_report {
            let since = now - last_report_at;
            on_progress(&LoadProgress {
                produced: report.produced,
                bytes: report.bytes,
                elapsed: now - start,
                recent_rate: (report.produced - last_report_produced) as f64 / since.as_secs_f64().max(1e-9),
                delivery_failures: producer.unreported_failures(),
            });
            (last_report_at, last_report_produced) = (now, report.produced);
            // Skip reports missed during a stall instead of printing them all at once.
            while next_report <= now {
                next_report += report_every;
            }
        }
        let remaining = settings.count.map_or(u64::MAX, |count| count - report.produced);
        if remaining == 0 || stop.load(Ordering::Relaxed) || settings.duration.is_some_and(|d| now - start >= d) {
            break;
        }
        let mut batch = remaining.min(MAX_BATCH);
        if let Some(pacer) = &mut pacer {
            batch = batch.min(pacer.available(report.produced, now));
            if batch == 0 {
                // Keep serving delivery reports while waiting for the next token.
                producer.poll(Duration::ZERO);
                let mut wake = pacer.next_due(report.produced).min(next_report);
                if let Some(duration) = settings.duration {
                    wake = wake.min(start + duration);
                }
                std::thread::sleep(wake.saturating_duration_since(Instant::now()).min(MAX_PACING_SLEEP));
                continue;
            }
        }
        for _ in 0..batch {
            generator.next_event_into(wall_clock_ms(), &mut event);
            producer.send(topic, None, &event.key, &event.payload)?;
            report.produced += 1;
            report.bytes += (event.key.len() + event.payload.len()) as u64;
            match event.kind {
                EventKind::Valid => report.valid += 1,
                EventKind::VeryLate => report.very_late += 1,
                EventKind::Malformed(_) => report.malformed += 1,
            }
        }
    }
    match producer.flush(FINAL_FLUSH_TIMEOUT) {
        Ok(()) => {}
        Err(ProducerError::DeliveryFailed { failed, first_error }) => {
            report.failed = failed;
            report.first_error = Some(first_error);
        }
        Err(other) => return Err(other),
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::source::families::FamilySettings;

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("2500".parse::<Rate>(), Ok(Rate::PerSecond(2_500)));
        for bad in ["0", "-3", "fast", ""] {
            assert!(bad.parse::<Rate>().unwrap_err().contains("or `max`"), "{bad}");
        }
        assert_eq!(Rate::PerSecond(7).to_string(), "7");
    }

    #[test]
    fn pacer_schedules_against_the_start_and_caps_bursts() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 1_000, 100);
        assert_eq!(pacer.available(0, start), 1, "the first event is due at once");
        assert_eq!(pacer.available(1, start), 0);
        assert_eq!(pacer.next_due(1), start + Duration::from_millis(1));
        // 50 ms in: 51 tokens earned in total, whatever the sleeps in between did.
        assert_eq!(pacer.available(1, start + Duration::from_millis(50)), 50);
        assert_eq!(pacer.next_due(51), start + Duration::from_millis(51));
        // After a 2 s stall only the burst is available; the rest is forfeited and the
        // schedule continues from there.
        let late = start + Duration::from_millis(2_051);
        assert_eq!(pacer.available(51, late), 100);
        assert_eq!(pacer.available(151, late), 0);
        assert_eq!(pacer.next_due(151), late + Duration::from_millis(1));
        assert_eq!(pacer.available(151, late + Duration::from_millis(10)), 10);
    }

    fn run(family: Family, settings: LoadSettings, topic: &str) -> (LoadReport, Vec<LoadProgress>) {
        let broker = EmbeddedBroker::start(&[(topic.to_owned(), 4)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let mut generator = FamilyGenerator::new(family, &FamilySettings::default());
        let mut progress = Vec::new();
        let report = run_loadgen(&producer, topic, &mut generator, &settings, &AtomicBool::new(false), |p| progress.push(*p)).unwrap();
        assert_eq!(producer.delivered_count(), report.produced);
        (report, progress)
    }

    #[test]
    fn paced_run_takes_count_over_rate_and_reports_progress() {
        let settings = LoadSettings {
            rate: Rate::PerSecond(2_000),
            count: Some(1_000),
            duration: None,
            report_every: Duration::from_millis(100),
        };
        let (report, progress) = run(Family::Sensor, settings, "paced");
        assert_eq!((report.produced, report.valid, report.failed), (1_000, 1_000, 0));
        // The last event is due at 499.5 ms.
        assert!(report.elapsed >= Duration::from_millis(495), "{report:?}");
        assert!(report.elapsed < Duration::from_secs(4), "{report:?}");
        assert!(progress.len() >= 3, "{progress:?}");
        let middle = &progress[progress.len() / 2];
        assert!((1_000.0..3_000.0).contains(&middle.recent_rate), "{progress:?}");
        assert!(report.bytes > 1_000 * 60);
        let line = report.summary_line();
        assert!(
            line.starts_with("loadgen: sensor 1000 events in ") && line.ends_with(" MB/s), target 2000"),
            "{line}"
        );
    }

    #[test]
    fn duration_stops_a_flat_out_run() {
        let settings = LoadSettings {
            rate: Rate::Max,
            count: None,
            duration: Some(Duration::from_millis(300)),
            report_every: Duration::from_secs(10),
        };
        let (report, _) = run(Family::Purchase, settings, "timed");
        assert!(report.produced > 1_000, "{report:?}");
        assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
        assert!(report.summary_line().ends_with("target max"));
    }
}
