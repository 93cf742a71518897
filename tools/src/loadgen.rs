//! `tidemark-tools loadgen`: produce one [event family](crate::families) into any Kafka broker
//! at a target rate or flat out, and measure the rate achieved.
//!
//! The producing itself is the library's one paced loop,
//! [`produce_events`](tidemark::source::producer::produce_events) (the daemon's built-in
//! generator runs the same loop with the click family): a token bucket scheduled against the
//! start instant, a full local producer queue waited out, never dropped. Here delivery
//! failures are counted, not fatal, and reported at the end; this module words the progress
//! and summary lines.

use tidemark::source::producer::{ProduceProgress, ProduceReport};

use crate::families::Family;

/// `loadgen: <family> <n> events in <s> s = <rate> events/s (<MB/s>), target <N|max>`.
pub fn summary_line(family: Family, report: &ProduceReport) -> String {
    format!(
        "loadgen: {family} {} events in {:.2} s = {:.0} events/s ({:.1} MB/s), target {}",
        report.produced,
        report.elapsed.as_secs_f64(),
        report.events_per_second(),
        report.megabytes_per_second(),
        report.target
    )
}

/// `loadgen: <valid> valid, <late> very late, <malformed> malformed`.
pub fn kinds_line(report: &ProduceReport) -> String {
    format!(
        "loadgen: {} valid, {} very late, {} malformed",
        report.valid, report.very_late, report.malformed
    )
}

/// The line printed every `--report-every`: the recent and the overall rate.
pub fn progress_line(family: Family, p: &ProduceProgress) -> String {
    let seconds = p.elapsed.as_secs_f64().max(1e-9);
    format!(
        "loadgen: {family} {} events in {:.1} s, now {:.0} events/s, overall {:.0} events/s ({:.1} MB/s), {} delivery failures",
        p.produced,
        p.elapsed.as_secs_f64(),
        p.recent_rate,
        p.produced as f64 / seconds,
        p.bytes as f64 / 1e6 / seconds,
        p.delivery_failures
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::{FamilyGenerator, FamilySettings};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use tidemark::broker::EmbeddedBroker;
    use tidemark::source::producer::{produce_events, EventProducer, ProduceSettings, Rate};

    fn run(family: Family, settings: ProduceSettings, topic: &str) -> (ProduceReport, Vec<ProduceProgress>) {
        let broker = EmbeddedBroker::start(&[(topic.to_owned(), 4)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let mut generator = FamilyGenerator::new(family, &FamilySettings::default());
        let mut progress = Vec::new();
        let report = produce_events(&producer, topic, &mut generator, &settings, &AtomicBool::new(false), |p| progress.push(*p)).unwrap();
        assert_eq!(producer.delivered_count(), report.produced);
        (report, progress)
    }

    #[test]
    fn paced_run_takes_count_over_rate_and_reports_progress() {
        let settings = ProduceSettings {
            rate: Rate::PerSecond(2_000),
            count: Some(1_000),
            duration: None,
            progress_every: Some(Duration::from_millis(100)),
            stop_on_failure: false,
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
        let line = summary_line(Family::Sensor, &report);
        assert!(
            line.starts_with("loadgen: sensor 1000 events in ") && line.ends_with(" MB/s), target 2000"),
            "{line}"
        );
        assert_eq!(kinds_line(&report), "loadgen: 1000 valid, 0 very late, 0 malformed");
        let line = progress_line(Family::Sensor, middle);
        assert!(line.starts_with("loadgen: sensor ") && line.ends_with(", 0 delivery failures"), "{line}");
    }

    #[test]
    fn duration_stops_a_flat_out_run() {
        let settings = ProduceSettings {
            rate: Rate::Max,
            count: None,
            duration: Some(Duration::from_millis(300)),
            progress_every: Some(Duration::from_secs(10)),
            stop_on_failure: false,
        };
        let (report, progress) = run(Family::Purchase, settings, "timed");
        assert!(report.produced > 1_000, "{report:?}");
        assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
        assert!(progress.is_empty(), "no report due within 300 ms: {progress:?}");
        assert!(summary_line(Family::Purchase, &report).ends_with("target max"));
    }
}
