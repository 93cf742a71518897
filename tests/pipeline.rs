//! The whole pipeline in-process (exactly as `main` runs it) against the embedded broker:
//! 4 partitions, 2 shards, seeded events with disorder, malformed and very-late records.
//! The Delta tables read back must equal an independent oracle, row for row.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;

fn start(name: &str, bootstrap: &str, dir: &std::path::Path) -> tidemark::daemon::RunningPipeline {
    init_logs();
    let cfg = parse_config(&pipeline_toml(name, bootstrap, dir, 2)).expect("test config is valid");
    tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).expect("pipeline starts")
}

/// Waits until both tables hold exactly what the oracle says for `events`.
fn wait_for_oracle(dir: &std::path::Path, events: &[Sent]) {
    let expected = oracle(events, final_watermark_us(events));
    assert!(!expected.is_empty(), "the events must close some windows, or matching proves nothing");
    let expected_dlq = expected_dead_letters(events);
    wait_for("the tables to match the oracle", Duration::from_secs(90), || {
        as_rows(&read_views(&dir.join("views"))) == expected && read_dead_letters(&dir.join("dlq")) == expected_dlq
    });
}

fn assert_matches_oracle(dir: &std::path::Path, events: &[Sent]) {
    let wm = final_watermark_us(events);
    let got = as_rows(&read_views(&dir.join("views")));
    let expected = oracle(events, wm);
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "views table differs from the oracle");
    assert_eq!(read_dead_letters(&dir.join("dlq")), expected_dead_letters(events), "dead letters differ");
}

#[test]
fn end_to_end_equals_oracle_with_late_and_malformed_events() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    // Phase 1: disorder and malformed records; no very-late ones yet (with no watermark yet,
    // "late" would depend on timing).
    let mut events = plan(7, 0, 4000, 0.0, 0.03);
    produce(broker.bootstrap_servers(), &events);
    let running = start("e2e", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);
    let wm1 = running.stats().watermark.expect("a watermark after phase 1");
    assert_eq!(wm1, final_watermark_us(&events));

    // Phase 2: very-late events (an hour behind: their windows closed long ago) among new ones.
    let phase2 = plan(8, 4000, 2000, 0.05, 0.03);
    assert!(phase2.iter().any(|s| matches!(s.event.kind, tidemark::source::generator::EventKind::VeryLate)));
    produce(broker.bootstrap_servers(), &phase2);
    events.extend(phase2);
    wait_for_oracle(dir.path(), &events);
    let summary = running.stop().expect("graceful stop");
    assert_eq!(summary.stats.events_in, events.len() as u64);
    assert_eq!(summary.stats.dead_letters, expected_dead_letters(&events).len() as u64);
    assert_matches_oracle(dir.path(), &events);
}

#[test]
fn graceful_restart_continues_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let mut events = plan(11, 0, 3000, 0.0, 0.02);
    produce(broker.bootstrap_servers(), &events);
    let running = start("restart", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);
    let first = running.stop().expect("graceful stop");
    assert!(first.stats.committed_epoch > 0);

    // Same state dir, same broker: resumes at the stored offsets with the stored watermark.
    let phase2 = plan(12, 3000, 3000, 0.05, 0.02);
    produce(broker.bootstrap_servers(), &phase2);
    events.extend(phase2);
    let running = start("restart", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);
    let second = running.stop().expect("graceful stop");
    assert!(second.stats.committed_epoch > first.stats.committed_epoch, "epochs continue across restarts");
    // Only the new events were read again: offsets came from the state, not from the start.
    assert_eq!(second.stats.events_in, 3000);
    assert_matches_oracle(dir.path(), &events);

    // The positions are mirrored into the consumer group (for lag monitoring with Kafka tools).
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", "restart")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    (0..PARTITIONS).for_each(|p| tpl.add_partition(TOPIC, p).set_offset(rdkafka::Offset::Invalid).unwrap());
    let committed = group.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let total: i64 = committed.elements().iter().map(|e| e.offset().to_raw().unwrap_or(0)).sum();
    assert_eq!(total, events.len() as i64, "group offsets cover every event: {committed:?}");
    drop(group);

    // Losing the state while keeping the tables would make new epochs look like duplicates:
    // refused at start, with the way out in the message.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let cfg = parse_config(&pipeline_toml("restart", broker.bootstrap_servers(), dir.path(), 2)).unwrap();
    let err = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false)))
        .err()
        .expect("a table ahead of the state is refused");
    assert!(err.to_string().contains("the state_dir was reset while the table was kept"), "{err}");
    assert_matches_oracle(dir.path(), &events);
}

/// Retention deleted offsets we had not read: the restart must name the partition and the
/// lost range and stop, unless the source allows skipping gaps (then it is counted).
#[test]
fn a_retention_gap_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(31, 0, 4000, 0.0, 0.0);
    produce(broker.bootstrap_servers(), &events);
    let running = start("gap", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);
    assert_eq!(running.stop().unwrap().stats.events_in, 4000);

    // ~8 MB more into partition 0: the embedded broker keeps only the newest ~5 MB, so the
    // offsets right after our stored position are gone.
    let p = tidemark::source::producer::EventProducer::connect(broker.bootstrap_servers()).unwrap();
    let big = vec![b'x'; 10_000];
    for _ in 0..800 {
        p.send(TOPIC, Some(0), b"k", &big).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();

    let err = start("gap", broker.bootstrap_servers(), dir.path())
        .wait()
        .expect_err("a gap stops the pipeline");
    let text = err.to_string();
    assert!(text.contains("data loss on clicks[0]: offsets 1000.."), "{text}");
    assert!(text.contains("on_gap = \"skip\""), "the error names the way out: {text}");

    // Explicitly allowed: continue past the gap, and count it.
    let toml = pipeline_toml("gap", broker.bootstrap_servers(), dir.path(), 2).replace("on_error = \"dlq\"", "on_error = \"dlq\"\non_gap = \"skip\"");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("the gap to be counted", Duration::from_secs(30), || running.stats().gaps_skipped == 1);
    running.stop().unwrap();
}

/// `starting_offsets = "latest"` is resolved once and stored: events produced while the
/// daemon was down are read after a restart, not skipped by a new "latest".
#[test]
fn latest_start_is_stored_so_a_restart_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    produce(broker.bootstrap_servers(), &plan(41, 0, 200, 0.0, 0.0)); // before the first start: skipped by "latest"
    let toml =
        pipeline_toml("latest", broker.bootstrap_servers(), dir.path(), 2).replace("on_error = \"dlq\"", "on_error = \"dlq\"\nstarting_offsets = \"latest\"");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("a committed epoch", Duration::from_secs(30), || running.stats().committed_epoch >= 2);
    assert_eq!(running.stop().unwrap().stats.events_in, 0);

    produce(broker.bootstrap_servers(), &plan(42, 200, 300, 0.0, 0.0)); // while down
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("the events produced while down", Duration::from_secs(30), || running.stats().events_in >= 300);
    assert_eq!(running.stop().unwrap().stats.events_in, 300);
}

/// The same result with no mesh at all (1 shard) and with more shards than cores and an
/// uneven partition split (3 shards over 4 partitions, on this 2-core machine).
#[test]
fn one_and_three_shards_give_the_oracle_too() {
    for shards in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
        let events = plan(50 + shards as u64, 0, 3000, 0.0, 0.03);
        produce(broker.bootstrap_servers(), &events);
        init_logs();
        let cfg = parse_config(&pipeline_toml(&format!("shards{shards}"), broker.bootstrap_servers(), dir.path(), shards)).unwrap();
        let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).unwrap();
        assert_eq!(running.shards(), shards);
        wait_for_oracle(dir.path(), &events);
        running.stop().unwrap();
        assert_matches_oracle(dir.path(), &events);
    }
}

/// Tiny batches and one-batch channels: shards constantly find their peer's channel full and
/// must pause their sources. Nothing may be dropped or duplicated.
#[test]
fn backpressure_pauses_sources_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(61, 0, 8000, 0.0, 0.02);
    produce(broker.bootstrap_servers(), &events);
    init_logs();
    let toml =
        pipeline_toml("pressure", broker.bootstrap_servers(), dir.path(), 2).replace("shards = 2", "shards = 2\nexchange_batch = 4\nexchange_capacity = 1");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for_oracle(dir.path(), &events);
    let stats = running.stop().unwrap().stats;
    assert!(stats.backpressure_pauses > 0, "the test must actually fill the channels");
    assert_eq!(stats.events_in, events.len() as u64);
    assert_matches_oracle(dir.path(), &events);
}

/// On Apache Kafka with two million events (far beyond what the embedded broker retains):
/// the tables equal the oracle, and Kafka's own `kafka-consumer-groups` tool shows the
/// pipeline's group at the end of every partition (lag 0, offsets summing to every event).
#[test]
fn on_apache_kafka_millions_of_events_equal_the_oracle_and_the_group_shows_no_lag() {
    let addr = common::kafka::bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let (topic, name) = (common::kafka::unique("e2e-clicks"), common::kafka::unique("e2e"));
    common::kafka::create_topics(&addr, &[(topic.as_str(), PARTITIONS)]);
    let mut events = plan(71, 0, 2_000_000, 0.0, 0.01);
    produce_to(&addr, &topic, &events);
    init_logs();
    let cfg = parse_config(&pipeline_toml_on(&topic, &name, &addr, dir.path(), 2)).unwrap();
    let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).unwrap();
    wait_for_oracle(dir.path(), &events);

    let phase2 = plan(72, 2_000_000, 5_000, 0.05, 0.02);
    produce_to(&addr, &topic, &phase2);
    events.extend(phase2);
    wait_for_oracle(dir.path(), &events);
    let summary = running.stop().expect("graceful stop");
    assert_eq!(summary.stats.events_in, events.len() as u64);
    assert_matches_oracle(dir.path(), &events);

    let offsets = common::kafka::group_offsets(&addr, &name);
    assert_eq!(offsets.len(), PARTITIONS as usize, "one row per partition: {offsets:?}");
    assert!(offsets.iter().all(|(t, _, _, lag)| *t == topic && *lag == 0), "no lag left: {offsets:?}");
    let total: i64 = offsets.iter().map(|o| o.2).sum();
    assert_eq!(total, events.len() as i64, "committed offsets cover every event: {offsets:?}");
}

/// Epochs are bounded by bytes as well as time: with an hour between commits and 1 MiB per
/// epoch, ~3 MB of input still commits in several epochs, and the tables equal the oracle.
#[test]
fn epochs_end_early_at_max_epoch_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(81, 0, 20_000, 0.0, 0.0);
    let bytes: usize = events.iter().map(|s| s.event.payload.len()).sum();
    assert!(bytes > 2_500_000, "enough input for several epochs: {bytes} bytes");
    produce(broker.bootstrap_servers(), &events);
    init_logs();
    let toml = pipeline_toml("bytes", broker.bootstrap_servers(), dir.path(), 2)
        .replace("commit_interval = \"200ms\"", "commit_interval = \"1h\"\nmax_epoch_bytes = \"1MiB\"");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("the input to be read", Duration::from_secs(60), || {
        running.stats().events_in == events.len() as u64
    });
    wait_for("epochs committed by size", Duration::from_secs(30), || running.stats().committed_epoch >= 2);
    let stats = running.stop().unwrap().stats;
    assert!(stats.committed_epoch >= 3, "{} epochs for {bytes} bytes", stats.committed_epoch);
    assert_matches_oracle(dir.path(), &events);
}

/// Restarting a pipeline with a query whose window changed is refused with the change named;
/// a raised `allowed_lateness` is accepted and nothing already written is written again.
#[test]
fn a_changed_window_is_refused_at_restart_and_more_lateness_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(91, 0, 3000, 0.0, 0.0);
    produce(broker.bootstrap_servers(), &events);
    let running = start("changes", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);
    running.stop().unwrap();

    let toml = pipeline_toml("changes", broker.bootstrap_servers(), dir.path(), 2);
    let wider = toml.replace(&format!("tumbling = \"{WINDOW_MS}ms\""), "tumbling = \"10s\"");
    let err = tidemark::daemon::start(parse_config(&wider).unwrap(), Arc::new(AtomicBool::new(false)))
        .err()
        .expect("a changed window is refused");
    let text = err.to_string();
    assert!(text.contains("query \"views\": its window changed from"), "{text}");
    assert!(text.contains("give the query a new name and a new sink"), "{text}");

    let later = toml.replace("sink = \"views\"", "allowed_lateness = \"1h\"\nsink = \"views\"");
    let running = tidemark::daemon::start(parse_config(&later).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("an epoch after the restart", Duration::from_secs(30), || running.stats().committed_epoch >= 3);
    running.stop().unwrap();
    assert_matches_oracle(dir.path(), &events);
}

/// A second pipeline writing the same tables is refused while the first runs; a table
/// deleted behind the state's back is refused at start instead of being silently refilled
/// with only the newest rows.
#[test]
fn a_second_writer_and_a_deleted_table_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(95, 0, 3000, 0.0, 0.0);
    produce(broker.bootstrap_servers(), &events);
    let running = start("fenced", broker.bootstrap_servers(), dir.path());
    wait_for_oracle(dir.path(), &events);

    let toml = pipeline_toml("fenced", broker.bootstrap_servers(), dir.path(), 2);
    let other_state = toml.replace(
        &dir.path().join("state").display().to_string(),
        &dir.path().join("state2").display().to_string(),
    );
    let err = tidemark::daemon::start(parse_config(&other_state).unwrap(), Arc::new(AtomicBool::new(false)))
        .err()
        .expect("a second writer is refused");
    assert!(err.to_string().contains("is being written by another process"), "{err}");
    running.stop().unwrap();
    assert_matches_oracle(dir.path(), &events);

    std::fs::remove_dir_all(dir.path().join("views")).unwrap();
    let err = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false)))
        .err()
        .expect("a table behind the state is refused");
    let text = err.to_string();
    assert!(
        text.contains("sink \"views\"") && text.contains("holds epochs only up to 0, but it confirmed holding epoch"),
        "{text}"
    );
}

/// The metrics endpoint's text.
fn scrape(running: &tidemark::daemon::RunningPipeline) -> String {
    use std::io::{Read, Write};
    let address = running.metrics_address().expect("metrics are on");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// On Apache Kafka: a topic grows from 2 to 4 partitions while the pipeline runs. The new
/// partitions are found (metadata refreshed every 500 ms), dealt to the shards and read from
/// their start; the tables equal the oracle over every event, including those in the new
/// partitions. After a restart their positions come from the state: only the events produced
/// while the pipeline was down are read again.
#[test]
fn on_apache_kafka_partitions_added_while_running_are_read_and_restored() {
    let addr = common::kafka::bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let (topic, name) = (common::kafka::unique("grow-clicks"), common::kafka::unique("grow"));
    common::kafka::create_topics(&addr, &[(topic.as_str(), 2)]);
    // Phase 1 on the two partitions the topic starts with.
    let mut events: Vec<Sent> = plan(91, 0, 4_000, 0.0, 0.01)
        .into_iter()
        .enumerate()
        .map(|(i, s)| Sent {
            partition: (i % 2) as i32,
            ..s
        })
        .collect();
    produce_to(&addr, &topic, &events);
    init_logs();
    let toml = pipeline_toml_on(&topic, &name, &addr, dir.path(), 2).replace(
        &format!("group_id = \"{name}\"\n"),
        &format!("group_id = \"{name}\"\nmetadata_refresh = \"500ms\"\n"),
    );
    assert!(toml.contains("metadata_refresh"), "the [kafka] section changed");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("phase 1 to be read", Duration::from_secs(60), || {
        running.stats().events_in == events.len() as u64
    });

    common::kafka::tool(
        "kafka-topics",
        &[
            "--bootstrap-server",
            &addr,
            "--alter",
            "--topic",
            &topic,
            "--partitions",
            &PARTITIONS.to_string(),
        ],
    );
    // The new partitions are read (they show in the metrics) before anything is produced to
    // them, so none of their events can be judged late against a watermark they missed.
    wait_for("the new partitions to be assigned", Duration::from_secs(60), || {
        let text = scrape(&running);
        (2..PARTITIONS).all(|p| text.contains(&format!("tidemark_events_received_total{{source=\"clicks\",partition=\"{p}\"}}")))
    });
    let phase2 = plan(92, 4_000, 6_000, 0.0, 0.01);
    assert!((2..PARTITIONS).all(|p| phase2.iter().any(|s| s.partition == p)));
    produce_to(&addr, &topic, &phase2);
    events.extend(phase2);
    wait_for_oracle(dir.path(), &events);
    let first = running.stop().expect("graceful stop");
    assert_eq!(first.stats.events_in, events.len() as u64, "every event read once");
    assert_matches_oracle(dir.path(), &events);

    // Restart: the new partitions resume at their stored positions.
    let phase3 = plan(93, 10_000, 2_000, 0.0, 0.0);
    produce_to(&addr, &topic, &phase3);
    events.extend(phase3);
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for_oracle(dir.path(), &events);
    let second = running.stop().expect("graceful stop");
    assert_eq!(second.stats.events_in, 2_000, "only the events produced while down are read");
    assert_matches_oracle(dir.path(), &events);
}

/// A file source with an unreadable file first in line: the pipeline does not stop, the
/// files after it are read while it waits for its retries, and the metrics show the source's
/// progress and the failed reads. Then a finished file is replaced by a new one under the
/// same name: the new one is read too.
#[test]
fn a_file_source_reads_past_an_unreadable_file_and_reads_a_replaced_finished_file() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let events = plan(95, 0, 3_000, 0.0, 0.0);
    // Drops a file the way writers should: written under a hidden name, then renamed in. Its
    // modification time is an hour ago, so it counts as settled at once.
    let drop_file = |name: &str, chunk: &[Sent]| {
        let tmp = inbox.join(format!(".{name}"));
        let mut body = Vec::new();
        for s in chunk {
            body.extend_from_slice(&s.event.payload);
            body.push(b'\n');
        }
        std::fs::write(&tmp, body).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&tmp).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
        std::fs::rename(&tmp, inbox.join(name)).unwrap();
    };
    // Reads of this process's memory at address 0 fail with EIO, even for root.
    std::os::unix::fs::symlink("/proc/self/mem", inbox.join("bad.jsonl")).unwrap();
    drop_file("part-0000.jsonl", &events[..1_000]);
    drop_file("part-0001.jsonl", &events[1_000..2_000]);
    init_logs();
    let toml = file_pipeline_toml("file-errors", &inbox, dir.path(), 2);
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    let read = &events[..2_000];
    let expected = oracle(read, file_watermark_us(read));
    wait_for("the readable files in the tables", Duration::from_secs(60), || {
        as_rows(&read_views(&dir.path().join("views"))) == expected
    });
    let metric = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l[series.len() + 1..].parse().ok())
    };
    let text = scrape(&running);
    assert_eq!(metric(&text, r#"tidemark_file_source_files_done{source="clicks"}"#), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, r#"tidemark_file_source_files_queued{source="clicks"}"#),
        Some(1.0),
        "the unreadable file waits for its next attempt"
    );
    assert!(metric(&text, r#"tidemark_file_source_read_errors_total{source="clicks"}"#).unwrap() >= 1.0);

    // A new file renamed onto a finished name is a new file.
    drop_file("part-0000.jsonl", &events[2_000..]);
    let expected = oracle(&events, file_watermark_us(&events));
    wait_for("the replacing file in the tables", Duration::from_secs(60), || {
        as_rows(&read_views(&dir.path().join("views"))) == expected
    });
    let summary = running.stop().expect("the pipeline never stopped");
    assert_eq!(summary.stats.events_in, events.len() as u64);
}

/// Every event in the two partitions shard 0 reads, none for shard 1: shard 0 pauses at its
/// share of max_epoch_bytes (half of it), and the epoch must end then rather than wait an hour
/// for bytes shard 1 will never read.
#[test]
fn an_epoch_ends_once_a_shard_read_its_share_even_if_the_others_have_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    // ~7.5 MB: three shares of 2 MiB and more (a poll round reads well under 1 MiB, so the
    // paused shard alone never reaches max_epoch_bytes).
    let events: Vec<Sent> = plan(83, 0, 50_000, 0.0, 0.0)
        .into_iter()
        .map(|s| Sent {
            partition: if s.partition % 2 == 0 { 0 } else { 2 },
            ..s
        })
        .collect();
    assert_eq!(tidemark::source::partition_owner(0, 2, 2), 0, "partitions 0 and 2 are shard 0's");
    produce(broker.bootstrap_servers(), &events);
    init_logs();
    let toml = pipeline_toml("share", broker.bootstrap_servers(), dir.path(), 2)
        .replace("commit_interval = \"200ms\"", "commit_interval = \"1h\"\nmax_epoch_bytes = \"4MiB\"");
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    wait_for("the input to be read", Duration::from_secs(60), || {
        running.stats().events_in == events.len() as u64
    });
    wait_for("epochs committed by size", Duration::from_secs(30), || running.stats().committed_epoch >= 3);
    running.stop().unwrap();
}
