use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const FULL: &str = r#"
[pipeline]
name = "clickstream"
state_dir = "/var/lib/tidemark"
commit_interval = "500ms"
shards = 2
progress_interval = "1m30s"
max_epoch_bytes = "64MiB"

[kafka]
bootstrap_servers = "localhost:9092"
group_id = "tidemark-clicks"
metadata_refresh = "10s"

[kafka.options]
"security.protocol" = "plaintext"
"fetch.min.bytes" = 1024
"enable.auto.commit" = false

[[sources]]
name = "clicks"
topic = "clicks"
partitions = 8
format = "json"
schema = { user_id = "string", page = "string", ts = "timestamp", amount = "float", bot = "bool", n = "int" }
event_time = { field = "ts", format = "rfc3339" }
watermark = { delay = "10s", idle_timeout = "1m" }
starting_offsets = "latest"
on_error = "dead_letters"
on_gap = "skip"

[[queries]]
name = "views_per_page"
from = "clicks"
window = { tumbling = "5m", offset = "30s" }
group_by = ["page", "user_id"]
aggregates = [
  { name = "views", fn = "count" },
  { name = "total", fn = "sum", field = "amount" },
  { name = "smallest", fn = "min", field = "n" },
  { name = "largest", fn = "max", field = "amount" },
  { name = "mean", fn = "avg", field = "n" },
  { name = "with_bot", fn = "count", field = "bot" },
]
output = "append"
allowed_lateness = "1h"
sink = "page_views"

[[sinks]]
name = "page_views"
kind = "delta"
path = "./data/delta/page_views"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "./data/delta/dead_letters"

[generator]
source = "clicks"
rate = 5000
seed = 7
users = 10
pages = 3
disorder = "2s"
late_share = 0.01
late_by = "2h"
malformed_share = 0
"#;

const MINIMAL: &str = r#"
[pipeline]
name = "mini"

[[sources]]
name = "events"
topic = "events"
schema = { ts = "int", kind = "string" }
event_time = { field = "ts" }

[[queries]]
name = "per_kind"
from = "events"
window = { tumbling = "1m" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out"

[[sinks]]
name = "out"
kind = "delta"
path = "out"
"#;

fn errors_of(text: &str) -> Vec<ConfigError> {
    match parse_config(text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors.0,
    }
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_containing(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
        + 1
}

/// A Delta sink with every table option at its default.
fn default_sink(name: &str, path: &str) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind: SinkKind::Delta,
        path: PathBuf::from(path),
        partition_by: vec![],
        target_file_size_bytes: 128 * 1024 * 1024,
        compact_every: 10,
        compact_min_files: 4,
        checkpoint_interval: 10,
        vacuum_retention: None,
        log_retention: Duration::from_secs(3_600),
        kafka: None,
    }
}

/// The single error at `path`, failing with the full list otherwise.
fn error_at<'e>(errors: &'e [ConfigError], path: &str) -> &'e ConfigError {
    let found: Vec<_> = errors.iter().filter(|e| e.path == path).collect();
    assert_eq!(found.len(), 1, "errors at {path:?} in {errors:#?}");
    found[0]
}

#[test]
fn full_config_parses_into_expected_values() {
    let config = parse_config(FULL).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(
        config.pipeline,
        PipelineConfig {
            name: "clickstream".into(),
            state_dir: PathBuf::from("/var/lib/tidemark"),
            commit_interval: Duration::from_millis(500),
            shards: 2,
            progress_interval: Duration::from_secs(90),
            exchange_batch: 1024,
            exchange_capacity: 16,
            max_epoch_bytes: 64 * 1024 * 1024,
        }
    );
    assert_eq!(
        config.kafka,
        KafkaConfig {
            bootstrap_servers: Bootstrap::Servers("localhost:9092".into()),
            group_id: "tidemark-clicks".into(),
            options: BTreeMap::from([
                ("security.protocol".to_string(), "plaintext".to_string()),
                ("fetch.min.bytes".to_string(), "1024".to_string()),
                ("enable.auto.commit".to_string(), "false".to_string()),
            ]),
            metadata_refresh: Duration::from_secs(10),
        }
    );

    assert_eq!(config.sources.len(), 1);
    let source = &config.sources[0];
    let field = |name: &str, ty| FieldDef { name: name.into(), ty };
    assert_eq!(
        *source,
        SourceConfig {
            name: "clicks".into(),
            topic: "clicks".into(),
            files: None,
            partitions: 8,
            format: Format::Json,
            // File order, not alphabetical.
            schema: vec![
                field("user_id", FieldType::String),
                field("page", FieldType::String),
                field("ts", FieldType::Timestamp),
                field("amount", FieldType::Float),
                field("bot", FieldType::Bool),
                field("n", FieldType::Int),
            ],
            event_time: EventTimeConfig {
                field: "ts".into(),
                format: TimeFormat::Rfc3339,
            },
            watermark: WatermarkConfig {
                delay: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_future: Some(Duration::from_secs(86_400)),
            },
            starting_offsets: StartingOffsets::Latest,
            on_error: vec!["dead_letters".into()],
            on_gap: GapPolicy::Skip,
            key: Vec::new(),
            repartitioned: None,
        }
    );
    assert_eq!(source.event_time_index(), Some(2));

    assert_eq!(config.queries.len(), 1);
    let query = &config.queries[0];
    let agg = |name: &str, func, field: Option<(&str, usize)>| AggregateConfig {
        name: name.into(),
        func,
        field: field.map(|(f, _)| f.to_string()),
        field_index: field.map(|(_, i)| i),
        expr: None,
        filter: None,
        percentile: None,
    };
    assert_eq!(
        *query,
        QueryConfig {
            name: "views_per_page".into(),
            from: "clicks".into(),
            source_index: 0,
            filter: None,
            kind: QueryKind::Aggregate,
            select: vec![],
            window: WindowConfig::Tumbling {
                size: Duration::from_secs(300),
                offset: Duration::from_secs(30),
            },
            group_by: vec!["page".into(), "user_id".into()],
            key_fields: vec![1, 0],
            aggregates: vec![
                agg("views", AggFn::Count, None),
                agg("total", AggFn::Sum, Some(("amount", 3))),
                agg("smallest", AggFn::Min, Some(("n", 5))),
                agg("largest", AggFn::Max, Some(("amount", 3))),
                agg("mean", AggFn::Avg, Some(("n", 5))),
                agg("with_bot", AggFn::Count, Some(("bot", 4))),
            ],
            derive: vec![],
            output: OutputMode::Append,
            allowed_lateness: Duration::from_secs(3600),
            sinks: vec!["page_views".into()],
            sink_indexes: vec![0],
        }
    );
    assert_eq!(query.key_fields(), ["page", "user_id"]);
    assert_eq!(query.window_columns(), ["window_start", "window_end"]);

    assert_eq!(
        config.sinks,
        vec![
            default_sink("page_views", "./data/delta/page_views"),
            default_sink("dead_letters", "./data/delta/dead_letters"),
        ]
    );
    assert_eq!(config.sink("dead_letters").map(|s| s.name.as_str()), Some("dead_letters"));

    assert_eq!(
        config.generator,
        Some(GeneratorConfig {
            family: GeneratorFamily::Click,
            source: "clicks".into(),
            source_index: 0,
            rate: 5000,
            seed: 7,
            users: 10,
            pages: 3,
            disorder: Duration::from_secs(2),
            late_share: 0.01,
            late_by: Duration::from_secs(7200),
            malformed_share: 0.0,
            purchases: None,
        })
    );
}

#[test]
fn defaults_are_applied() {
    let config = parse_config(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.pipeline,
        PipelineConfig {
            name: "mini".into(),
            state_dir: PathBuf::from("./data/state/mini"),
            commit_interval: Duration::from_secs(1),
            shards: 0,
            progress_interval: Duration::from_secs(5),
            exchange_batch: 1024,
            exchange_capacity: 16,
            max_epoch_bytes: 128 * 1024 * 1024,
        }
    );
    assert_eq!(
        config.kafka,
        KafkaConfig {
            bootstrap_servers: Bootstrap::Embedded,
            group_id: "mini".into(),
            options: BTreeMap::new(),
            metadata_refresh: Duration::from_secs(30),
        }
    );
    let source = &config.sources[0];
    assert_eq!(source.partitions, 4);
    assert_eq!(source.format, Format::Json);
    assert_eq!(source.event_time.format, TimeFormat::Auto);
    assert_eq!(
        source.watermark,
        WatermarkConfig {
            delay: Duration::ZERO,
            idle_timeout: Duration::from_secs(30),
            max_future: Some(Duration::from_secs(86_400)),
        }
    );
    assert_eq!(source.starting_offsets, StartingOffsets::Earliest);
    assert!(source.on_error.is_empty());
    assert_eq!(source.on_gap, GapPolicy::Fail);
    let query = &config.queries[0];
    assert_eq!(
        query.window,
        WindowConfig::Tumbling {
            size: Duration::from_secs(60),
            offset: Duration::ZERO,
        }
    );
    assert!(query.group_by.is_empty());
    assert_eq!(query.output, OutputMode::Append);
    assert_eq!(query.allowed_lateness, Duration::ZERO);
    assert!(query.filter.is_none() && query.derive.is_empty());
    assert_eq!(config.sinks, vec![default_sink("out", "out")]);
    assert!(config.warnings.is_empty());
    assert_eq!(config.generator, None);

    let with_generator = format!("{MINIMAL}\n[generator]\nsource = \"events\"\n");
    let generator = parse_config(&with_generator).unwrap().generator.unwrap();
    assert_eq!(
        generator,
        GeneratorConfig {
            family: GeneratorFamily::Click,
            source: "events".into(),
            source_index: 0,
            rate: 1000,
            seed: 42,
            users: 1000,
            pages: 50,
            disorder: Duration::ZERO,
            late_share: 0.0,
            late_by: Duration::from_secs(3600),
            malformed_share: 0.0,
            purchases: None,
        }
    );
}

#[test]
fn embedded_bootstrap_is_recognised() {
    let text = MINIMAL.replace("[pipeline]", "[kafka]\nbootstrap_servers = \"embedded\"\n\n[pipeline]");
    let config = parse_config(&text).unwrap();
    assert_eq!(config.kafka.bootstrap_servers, Bootstrap::Embedded);
}

#[test]
fn inline_and_header_forms_are_equivalent() {
    let text = r#"
pipeline.name = "p"

[[sources]]
name = "s"
topic = "t"
event_time.field = "ts"
[sources.schema]
ts = "timestamp"
[sources.watermark]
delay = "5s"

[[sinks]]
name = "k"
kind = "delta"
path = "k"

[[queries]]
name = "q"
from = "s"
sink = "k"
[queries.window]
tumbling = "10s"
[[queries.aggregates]]
name = "n"
fn = "count"
"#;
    let config = parse_config(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.pipeline.name, "p");
    assert_eq!(config.sources[0].watermark.delay, Duration::from_secs(5));
    assert_eq!(
        config.queries[0].window,
        WindowConfig::Tumbling {
            size: Duration::from_secs(10),
            offset: Duration::ZERO
        }
    );
    assert_eq!(config.queries[0].aggregates[0].func, AggFn::Count);
}

/// Many independent mistakes, each of which must be reported with its path
/// and line.
const MISTAKES: &str = r#"[pipeline]
name = "bad name!"
commit_interval = "5ms"
colour = "blue"

[kafka.options]
"linger.ms" = 1.5

[[sources]]
name = "clicks"
topic = "clicks"
partitions = 0
schema = { user_id = "string", ts = "timestamp", amount = "float" }
event_time = { field = "ts", format = "iso" }
watermark = { delay = "10x", delay_ms = 5 }
on_error = "dlq"

[[sources]]
name = "clicks"
topic = 7
schema = { at = "int", flag = "bool" }
event_time = { field = "flag" }

[[sources]]
name = "other"
topic = "other"
schema = { ts = "timestamp", page = "strng" }
event_time = { field = "ts" }

[[queries]]
name = "q1"
from = "clikcs"
window = { tumbling = "5m" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out"

[[queries]]
name = "q2"
from = "clicks"
window = { tumbling = "1m", offset = "2m" }
group_by = ["user_id", "amount", "nope", "user_id"]
aggregates = [
  { name = "total", fn = "sum" },
  { name = "total", fn = "median", field = "amount" },
  { name = "user_id", fn = "max", field = "user_id" },
  { name = "window_end", fn = "count" },
]
output = "upsert"
sink = "missing_sink"

[[queries]]
window = { sliding = "5m" }
aggregates = []

[[sinks]]
name = "out"
kind = "parquet"

[generator]
source = "nowhere"
late_share = 1.5
rate = 0
"#;

#[test]
fn reports_every_mistake_with_path_and_line() {
    let errors = errors_of(MISTAKES);
    let line = |needle| Some(line_containing(MISTAKES, needle));
    let expect = |path: &str, at: Option<usize>, fragment: &str| {
        let error = error_at(&errors, path);
        assert_eq!(error.line, at, "line of {error}");
        assert!(error.message.contains(fragment), "{path}: {:?} should contain {fragment:?}", error.message);
    };

    expect("pipeline.name", Some(2), "use only letters, digits");
    expect("pipeline.commit_interval", Some(3), "at least 10ms");
    expect(
        "pipeline.colour",
        Some(4),
        "unknown key \"colour\" in pipeline; allowed keys: name, state_dir, commit_interval, shards, progress_interval, exchange_batch, exchange_capacity",
    );
    expect("kafka.options.\"linger.ms\"", Some(7), "found float");

    expect("sources[0].partitions", Some(12), "at least 1");
    expect(
        "sources[0].event_time.format",
        Some(14),
        "unknown value \"iso\"; use one of \"auto\", \"rfc3339\"",
    );
    expect(
        "sources[0].watermark.delay",
        Some(15),
        "invalid duration \"10x\": write a number followed by ms, s, m, h or d (e.g. \"10s\")",
    );
    expect(
        "sources[0].watermark.delay_ms",
        Some(15),
        "unknown key \"delay_ms\" in sources[0].watermark; allowed keys: delay, idle_timeout",
    );
    expect(
        "sources[0].on_error",
        Some(16),
        "source \"clicks\" sends dead letters to sink \"dlq\", which is not defined; defined sinks: out",
    );

    expect("sources[1].name", Some(19), "duplicate source name \"clicks\": sources[0] already uses it");
    expect("sources[1].topic", Some(20), "expected a string, found integer");
    expect("sources[1].event_time.field", Some(22), "is a bool");
    expect(
        "sources[2].schema.page",
        line("\"strng\""),
        "unknown field type \"strng\"; use one of string, int, float, bool, timestamp",
    );

    expect(
        "queries[0].from",
        line("\"clikcs\""),
        "query \"q1\" reads from source \"clikcs\", which is not defined; defined sources: clicks, other",
    );

    expect("queries[1].window.offset", line("offset = \"2m\""), "must be smaller than the window size (1m)");
    let group_by_line = line("group_by = [\"user_id\"");
    expect("queries[1].group_by[1]", group_by_line, "cannot group by float field \"amount\"");
    expect("queries[1].group_by[2]", group_by_line, "\"nope\" is not in the schema of source \"clicks\"");
    expect("queries[1].group_by[3]", group_by_line, "appears more than once");
    expect("queries[1].aggregates[0].field", line("fn = \"sum\" }"), "fn \"sum\" needs a field");
    expect(
        "queries[1].aggregates[1].fn",
        line("\"median\""),
        "unknown value \"median\"; use one of \"count\", \"sum\", \"min\", \"max\", \"avg\"",
    );
    // The clash with the first "total" is reported even though this aggregate is otherwise broken.
    expect(
        "queries[1].aggregates[1].name",
        line("\"median\""),
        "clashes with another aggregate (queries[1].aggregates[0])",
    );
    let user_id_agg = line("name = \"user_id\"");
    expect(
        "queries[1].aggregates[2].field",
        user_id_agg,
        "needs an int, float or timestamp field, but \"user_id\" is string; for strings use fn = \"first\" or \"last\"",
    );
    expect("queries[1].aggregates[2].name", user_id_agg, "clashes with the group_by field \"user_id\"");
    expect(
        "queries[1].aggregates[3].name",
        line("\"window_end\""),
        "clashes with the window column \"window_end\"",
    );
    expect(
        "queries[1].output",
        line("\"upsert\""),
        "unknown value \"upsert\"; use one of \"append\", \"update\", \"complete\"",
    );
    expect(
        "queries[1].sink",
        line("\"missing_sink\""),
        "query \"q2\" writes to sink \"missing_sink\", which is not defined; defined sinks: out",
    );

    // A table missing keys: each missing key is reported at the table's header.
    let third_query = Some(line_containing(MISTAKES, "sliding") - 1);
    for key in ["name", "from", "sink"] {
        expect(&format!("queries[2].{key}"), third_query, &format!("missing required key \"{key}\""));
    }
    expect("queries[2].window.slide", line("sliding"), "missing required key \"slide\"");
    expect("queries[2].aggregates", line("aggregates = []"), "at least one aggregate is required");

    let sink_header = Some(line_containing(MISTAKES, "name = \"out\"") - 1);
    expect("sinks[0].kind", line("\"parquet\""), "unknown value \"parquet\"; use one of \"delta\"");
    expect("sinks[0].path", sink_header, "missing required key \"path\"");

    expect(
        "generator.source",
        line("\"nowhere\""),
        "the generator produces into source \"nowhere\", which is not defined; defined sources: clicks, other",
    );
    expect("generator.late_share", line("late_share"), "between 0 and 1");
    expect("generator.rate", line("rate = 0"), "at least 1");

    // Nothing else: every error above is expected, and none is repeated.
    assert_eq!(errors.len(), 36, "{errors:#?}");
    // Errors come in file order.
    let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn errors_display_one_per_line() {
    let errors = parse_config(&MINIMAL.replace("tumbling = \"1m\"", "tumbling = \"1m\", size = 3")).unwrap_err();
    let line = line_containing(MINIMAL, "tumbling");
    assert_eq!(
        errors.to_string(),
        format!("line {line}: queries[0].window.size: unknown key \"size\" in queries[0].window; allowed keys: tumbling, offset")
    );

    let two = parse_config(
        &MINIMAL
            .replace("name = \"mini\"", "name = \"mini\"\nextra = 1")
            .replace("kind = \"delta\"", "kind = \"delta\"\nextra = 2"),
    )
    .unwrap_err();
    assert_eq!(two.len(), 2);
    assert_eq!(two.to_string().lines().count(), 2);
    assert!(two.to_string().starts_with("line 4: pipeline.extra: unknown key"));
}

#[test]
fn missing_sections_are_reported_together() {
    let errors = errors_of("[pipeline]\nname = \"\"\n");
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["sources", "queries", "sinks", "pipeline.name"]);
    assert!(errors[0].message.contains("at least one source is required; add a [[sources]] table"));
    assert_eq!(errors[3].line, Some(2));
    assert_eq!(errors[3].message, "must not be empty");

    let errors = errors_of("");
    let error = error_at(&errors, "pipeline.name");
    assert_eq!(error.line, None);
    assert_eq!(error.message, "missing required key \"name\"; add name = ... to pipeline");
}

#[test]
fn wrong_types_name_what_was_found() {
    let text = MINIMAL
        .replace("topic = \"events\"", "topic = \"events\"\npartitions = \"4\"")
        .replace("window = { tumbling = \"1m\" }", "window = { tumbling = 60 }")
        .replace("aggregates = [{ name = \"n\", fn = \"count\" }]", "aggregates = { name = \"n\" }");
    let errors = errors_of(&text);
    assert_eq!(error_at(&errors, "sources[0].partitions").message, "expected an integer, found string");
    assert!(error_at(&errors, "queries[0].window.tumbling")
        .message
        .starts_with("expected a duration string with a unit"));
    assert_eq!(error_at(&errors, "queries[0].aggregates").message, "expected an array of tables, found table");
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn sinks_are_not_shared() {
    let text = format!(
        "{}\n{}",
        MINIMAL.replace("event_time = { field = \"ts\" }", "event_time = { field = \"ts\" }\non_error = \"out\""),
        r#"
[[queries]]
name = "again"
from = "events"
window = { tumbling = "1m" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out"
"#
    );
    let errors = errors_of(&text);
    assert!(error_at(&errors, "queries[1].sink")
        .message
        .contains("already receives the results of query \"per_kind\""));
    assert!(error_at(&errors, "sources[0].on_error").message.contains("cannot also take dead letters"));
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

#[test]
fn syntax_error_is_one_error_with_a_line() {
    let text = "[pipeline]\nname = \"p\"\n\n[[sources]]\nname = \"s\nschema = {}\n";
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "");
    assert_eq!(errors[0].line, Some(5));
    assert!(errors[0].message.starts_with("invalid TOML: "), "{}", errors[0]);

    let errors = errors_of("[pipeline]\nname = \"p\"\nname = \"q\"\n");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(3));
    assert!(errors[0].message.contains("duplicate key"), "{}", errors[0]);
}

#[test]
fn load_config_reports_unreadable_file() {
    let missing = Path::new("/nonexistent/tidemark/config.toml");
    let errors = load_config(missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors.0[0].line, None);
    assert!(errors.to_string().starts_with("cannot read config file /nonexistent/tidemark/config.toml: "));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    assert_eq!(load_config(&path).unwrap().pipeline.name, "mini");
}

#[test]
fn event_time_must_be_a_usable_schema_field() {
    let text = MINIMAL.replace("{ field = \"ts\" }", "{ field = \"when\" }");
    let errors = errors_of(&text);
    assert_eq!(
        error_at(&errors, "sources[0].event_time.field").message,
        "event-time field \"when\" is not in the schema; schema fields: ts, kind"
    );

    let text = MINIMAL.replace("{ field = \"ts\" }", "{ field = \"ts\", format = \"rfc3339\" }");
    let errors = errors_of(&text);
    assert!(error_at(&errors, "sources[0].event_time.format")
        .message
        .contains("needs a string or timestamp field, but \"ts\" is int"));

    for format in ["epoch_seconds", "epoch_millis", "epoch_micros", "auto"] {
        let text = MINIMAL.replace("{ field = \"ts\" }", &format!("{{ field = \"ts\", format = \"{format}\" }}"));
        assert!(parse_config(&text).is_ok(), "{format}");
    }
}

#[test]
fn shipped_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no {} directory; nothing to check", dir.display());
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(errors) = load_config(&path) {
                panic!("{} is invalid:\n{errors}", path.display());
            }
        }
    }
}

#[test]
fn min_and_max_accept_timestamps_but_sum_does_not() {
    let base = include_str!("../../tests/data/minimal.toml");
    let ok = base.replace(
        r#"{ name = "n", fn = "count" }"#,
        r#"{ name = "n", fn = "count" }, { name = "first", fn = "min", field = "ts" }"#,
    );
    assert_ne!(ok, base);
    assert!(parse_config(&ok).is_ok());
    let bad = base.replace(r#"{ name = "n", fn = "count" }"#, r#"{ name = "total", fn = "sum", field = "ts" }"#);
    let errs = parse_config(&bad).unwrap_err();
    assert!(
        errs.to_string().contains("fn \"sum\" needs an int or float field, but \"ts\" is timestamp"),
        "{errs}"
    );
}

#[test]
fn a_topic_is_read_by_one_source() {
    let base = include_str!("../../tests/data/minimal.toml");
    let second = "\n[[sources]]\nname = \"again\"\ntopic = \"events\"\nevent_time = { field = \"ts\" }\nschema = { ts = \"timestamp\" }\n";
    let errs = parse_config(&format!("{base}{second}")).unwrap_err();
    let e = errs.0.iter().find(|e| e.path == "sources[1].topic").unwrap_or_else(|| panic!("{errs}"));
    assert!(e.message.contains("topic \"events\" is already read by source \"events\""), "{}", e.message);
    assert_eq!(e.line, Some(base.lines().count() + 4));
}

/// Every construct added with the second issue, valid.
const FEATURES: &str = r#"
[pipeline]
name = "features"

[[sources]]
name = "clicks"
topic = "clicks"
schema = { user_id = "string", page = "string", action = "string", latency_ms = "int", amount = "float", ts = "timestamp" }
event_time = { field = "ts" }
on_error = "dead_letters"

[[sources]]
name = "drops"
kind = "files"
path = "./inbox"
settle = "2s"
format = "json"
schema = { user_id = "string", ts = "timestamp" }
event_time = { field = "ts", format = "rfc3339" }
watermark = { delay = "1m" }
on_error = "dead_letters"

[[queries]]
name = "sliding"
from = "clicks"
where = "action IN ('view', 'click')"
window = { sliding = "10m", slide = "4m", offset = "1m" }
group_by = ["page"]
aggregates = [
  { name = "views", fn = "count", filter = "action = 'view'" },
  { name = "clicks", fn = "count", filter = "action = 'click'" },
  { name = "users", fn = "approx_count_distinct", field = "user_id" },
  { name = "p99", fn = "approx_percentile", field = "latency_ms", percentile = 0.99 },
]
derive = [
  { name = "ctr", expr = "clicks / views" },
  { name = "window_date", expr = "CAST(window_start AS DATE)" },
]
output = "update"
allowed_lateness = "1m"
sink = "sliding_out"

[[queries]]
name = "sessions"
from = "drops"
window = { session = "30m" }
group_by = ["user_id"]
aggregates = [{ name = "events", fn = "count" }]
output = "complete"
sink = "sessions_out"

[[queries]]
name = "running"
from = "clicks"
window = { global = true }
aggregates = [{ name = "total", fn = "sum", field = "amount" }]
output = "complete"
sink = "running_out"

[[queries]]
name = "daily"
from = "clicks"
window = { global = true, reset = "day" }
group_by = ["page"]
aggregates = [{ name = "first_action", fn = "first", field = "action" }]
sink = "daily_out"

[[sinks]]
name = "sliding_out"
kind = "delta"
path = "./out/sliding"
partition_by = ["window_date", "page"]
target_file_size = "64MiB"
compact_every = 0
compact_min_files = 2
checkpoint_interval = 1
vacuum_retention = "7d"

[[sinks]]
name = "sessions_out"
kind = "delta"
path = "./out/sessions"

[[sinks]]
name = "running_out"
kind = "delta"
path = "./out/running"
target_file_size = 1000

[[sinks]]
name = "daily_out"
kind = "delta"
path = "./out/daily"
target_file_size = "1GB"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "./out/dead_letters"
partition_by = ["reason"]
"#;

#[test]
fn file_source_parses() {
    let config = parse_config(FEATURES).unwrap_or_else(|e| panic!("{e}"));
    let field = |name: &str, ty| FieldDef { name: name.into(), ty };
    assert_eq!(
        config.sources[1],
        SourceConfig {
            name: "drops".into(),
            topic: String::new(),
            files: Some(FileSourceConfig {
                path: PathBuf::from("./inbox"),
                settle: Duration::from_secs(2),
            }),
            partitions: 4,
            format: Format::Json,
            schema: vec![field("user_id", FieldType::String), field("ts", FieldType::Timestamp)],
            event_time: EventTimeConfig {
                field: "ts".into(),
                format: TimeFormat::Rfc3339,
            },
            watermark: WatermarkConfig {
                delay: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(30),
                max_future: Some(Duration::from_secs(86_400)),
            },
            starting_offsets: StartingOffsets::Earliest,
            on_error: vec!["dead_letters".into()],
            on_gap: GapPolicy::Fail,
            key: Vec::new(),
            repartitioned: None,
        }
    );
    assert_eq!(config.sources[0].files, None);

    // settle defaults to 5s.
    let text = FEATURES.replace("settle = \"2s\"\n", "");
    let config = parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sources[1].files.as_ref().map(|f| f.settle), Some(Duration::from_secs(5)));
}

#[test]
fn sliding_query_with_filters_percentile_and_derived_columns_parses() {
    let config = parse_config(FEATURES).unwrap_or_else(|e| panic!("{e}"));
    let agg = |name: &str, func, field: Option<(&str, usize)>, filter: Option<&str>, percentile| AggregateConfig {
        name: name.into(),
        func,
        field: field.map(|(f, _)| f.to_string()),
        field_index: field.map(|(_, i)| i),
        expr: None,
        filter: filter.map(Sql::from),
        percentile,
    };
    let derived = |name: &str, expr: &str| DerivedColumn {
        name: name.into(),
        expr: expr.into(),
    };
    assert_eq!(
        config.queries[0],
        QueryConfig {
            name: "sliding".into(),
            from: "clicks".into(),
            source_index: 0,
            filter: Some("action IN ('view', 'click')".into()),
            kind: QueryKind::Aggregate,
            select: vec![],
            window: WindowConfig::Sliding {
                size: Duration::from_secs(600),
                slide: Duration::from_secs(240),
                offset: Duration::from_secs(60),
            },
            group_by: vec!["page".into()],
            key_fields: vec![1],
            aggregates: vec![
                agg("views", AggFn::Count, None, Some("action = 'view'"), None),
                agg("clicks", AggFn::Count, None, Some("action = 'click'"), None),
                agg("users", AggFn::ApproxCountDistinct, Some(("user_id", 0)), None, None),
                agg("p99", AggFn::ApproxPercentile, Some(("latency_ms", 3)), None, Some(0.99)),
            ],
            derive: vec![derived("ctr", "clicks / views"), derived("window_date", "CAST(window_start AS DATE)")],
            output: OutputMode::Update,
            allowed_lateness: Duration::from_secs(60),
            sinks: vec!["sliding_out".into()],
            sink_indexes: vec![0],
        }
    );
    assert_eq!(config.queries[0].window_columns(), ["window_start", "window_end"]);
}

#[test]
fn session_and_global_windows_parse() {
    let config = parse_config(FEATURES).unwrap_or_else(|e| panic!("{e}"));
    let sessions = &config.queries[1];
    assert_eq!(
        sessions.window,
        WindowConfig::Session {
            gap: Duration::from_secs(1800)
        }
    );
    assert_eq!(sessions.window_columns(), ["session_start", "session_end", "duration"]);
    assert_eq!((sessions.source_index, sessions.output), (1, OutputMode::Complete));

    let running = &config.queries[2];
    assert_eq!(running.window, WindowConfig::Global { reset: None });
    assert!(running.window_columns().is_empty());
    assert_eq!(running.output, OutputMode::Complete);

    let daily = &config.queries[3];
    assert_eq!(
        daily.window,
        WindowConfig::Global {
            reset: Some(CalendarUnit::Day)
        }
    );
    assert_eq!(daily.output, OutputMode::Append);
    assert_eq!(daily.aggregates[0].func, AggFn::First);

    for unit in [
        CalendarUnit::Hour,
        CalendarUnit::Day,
        CalendarUnit::Week,
        CalendarUnit::Month,
        CalendarUnit::Year,
    ] {
        let text = FEATURES.replace("reset = \"day\"", &format!("reset = \"{}\"", unit.as_str()));
        let config = parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.queries[3].window, WindowConfig::Global { reset: Some(unit) });
    }
}

#[test]
fn sink_table_options_parse() {
    let config = parse_config(FEATURES).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.sinks[0],
        SinkConfig {
            name: "sliding_out".into(),
            kind: SinkKind::Delta,
            path: PathBuf::from("./out/sliding"),
            partition_by: vec!["window_date".into(), "page".into()],
            target_file_size_bytes: 64 * 1024 * 1024,
            compact_every: 0,
            compact_min_files: 2,
            checkpoint_interval: 1,
            vacuum_retention: Some(Duration::from_secs(7 * 86_400)),
            log_retention: Duration::from_secs(3_600),
            kafka: None,
        }
    );
    assert_eq!(config.sinks[1], default_sink("sessions_out", "./out/sessions"));
    assert_eq!(config.sinks[2].target_file_size_bytes, 1000);
    assert_eq!(config.sinks[3].target_file_size_bytes, 1_000_000_000);
    assert_eq!(config.sinks[4].partition_by, ["reason"]);
}

#[test]
fn sizes_take_decimal_and_binary_units() {
    let size_of = |written: &str| {
        let text = MINIMAL.replace("path = \"out\"", &format!("path = \"out\"\ntarget_file_size = {written}"));
        parse_config(&text).map(|c| c.sinks[0].target_file_size_bytes).map_err(|e| e.to_string())
    };
    assert_eq!(size_of("\"512B\""), Ok(512));
    assert_eq!(size_of("\"2KB\""), Ok(2_000));
    assert_eq!(size_of("\"2KiB\""), Ok(2_048));
    assert_eq!(size_of("\"128MB\""), Ok(128_000_000));
    assert_eq!(size_of("\"128MiB\""), Ok(134_217_728));
    assert_eq!(size_of("\"3GB\""), Ok(3_000_000_000));
    assert_eq!(size_of("\"3GiB\""), Ok(3 << 30));
    assert_eq!(size_of("4096"), Ok(4096));
    for junk in ["\"128\"", "\"128 MB\"", "\"1.5GB\"", "\"MB\"", "\"128mb\"", "\"-1MB\"", "\"128TB\""] {
        let err = size_of(junk).expect_err(junk);
        assert!(err.contains("write a whole number followed by B, KB, MB, GB, KiB, MiB or GiB"), "{junk}: {err}");
    }
    assert!(size_of("\"99999999999GiB\"").unwrap_err().contains("too large"));
    assert!(size_of("0").unwrap_err().contains("must be greater than 0 bytes"));
    assert!(size_of("-5").unwrap_err().contains("must be at least 0"));
    assert!(size_of("true").unwrap_err().contains("expected a size such as \"128MiB\""));
}

#[test]
fn every_aggregate_fn_is_accepted_with_a_suitable_field() {
    for func in AggFn::ALL {
        let (field, extra) = match func {
            AggFn::Count => ("", ""),
            AggFn::ApproxPercentile => (", field = \"value\"", ", percentile = 0.5"),
            AggFn::First | AggFn::Last | AggFn::CountDistinct | AggFn::ApproxCountDistinct => (", field = \"key\"", ""),
            _ => (", field = \"value\"", ""),
        };
        let base = include_str!("../../tests/data/minimal.toml");
        let text = base.replace(
            r#"{ name = "n", fn = "count" }"#,
            &format!(r#"{{ name = "a", fn = "{}"{field}{extra} }}"#, func.as_str()),
        );
        assert_ne!(text, base);
        let config = parse_config(&text).unwrap_or_else(|e| panic!("{}: {e}", func.as_str()));
        assert_eq!(config.queries[0].aggregates[0].func, func);
        assert_eq!(config.queries[0].aggregates[0].percentile, (func == AggFn::ApproxPercentile).then_some(0.5));
    }
}

#[test]
fn aggregate_output_types() {
    use super::compile::agg_output_type;
    use FieldType::{Float, Int, String as Str, Timestamp};
    let cases = [
        (AggFn::Count, None, Int),
        (AggFn::Count, Some(Str), Int),
        (AggFn::CountDistinct, Some(Str), Int),
        (AggFn::ApproxCountDistinct, Some(Float), Int),
        (AggFn::Sum, Some(Int), Int),
        (AggFn::Sum, Some(Float), Float),
        (AggFn::Avg, Some(Int), Float),
        (AggFn::VarSamp, Some(Int), Float),
        (AggFn::VarPop, Some(Float), Float),
        (AggFn::StddevSamp, Some(Int), Float),
        (AggFn::StddevPop, Some(Int), Float),
        (AggFn::ApproxPercentile, Some(Int), Float),
        (AggFn::Min, Some(Timestamp), Timestamp),
        (AggFn::Max, Some(Int), Int),
        (AggFn::First, Some(Str), Str),
        (AggFn::Last, Some(FieldType::Bool), FieldType::Bool),
    ];
    for (func, input, expected) in cases {
        assert_eq!(agg_output_type(func, input), expected, "{func:?} over {input:?}");
    }
}

#[test]
fn aggregate_field_types_are_checked_per_fn() {
    let base = include_str!("../../tests/data/minimal.toml");
    let with = |aggregate: &str| {
        let text = base.replace(r#"{ name = "n", fn = "count" }"#, aggregate);
        assert_ne!(text, base);
        parse_config(&text).map(|_| ()).map_err(|e| e.to_string())
    };
    // key: string, value: int, ts: timestamp
    for func in ["sum", "avg", "var_samp", "var_pop", "stddev_samp", "stddev_pop"] {
        assert_eq!(with(&format!(r#"{{ name = "a", fn = "{func}", field = "value" }}"#)), Ok(()), "{func}");
        let err = with(&format!(r#"{{ name = "a", fn = "{func}", field = "ts" }}"#)).unwrap_err();
        assert!(
            err.contains(&format!("fn \"{func}\" needs an int or float field, but \"ts\" is timestamp")),
            "{err}"
        );
        let err = with(&format!(r#"{{ name = "a", fn = "{func}" }}"#)).unwrap_err();
        assert!(
            err.contains(&format!("fn \"{func}\" needs a field; add field = \"<int or float field>\"")),
            "{err}"
        );
    }
    let err = with(r#"{ name = "a", fn = "approx_percentile", field = "key", percentile = 0.5 }"#).unwrap_err();
    assert!(err.contains("needs an int or float field, but \"key\" is string"), "{err}");
    let err = with(r#"{ name = "a", fn = "min", field = "key" }"#).unwrap_err();
    assert!(
        err.contains("fn \"min\" needs an int, float or timestamp field, but \"key\" is string; for strings use fn = \"first\" or \"last\""),
        "{err}"
    );
    let err = with(r#"{ name = "a", fn = "max" }"#).unwrap_err();
    assert!(err.contains("add field = \"<int, float or timestamp field>\""), "{err}");
    for func in ["count_distinct", "approx_count_distinct", "first", "last"] {
        for field in ["key", "value", "ts"] {
            assert_eq!(
                with(&format!(r#"{{ name = "a", fn = "{func}", field = "{field}" }}"#)),
                Ok(()),
                "{func}({field})"
            );
        }
        let err = with(&format!(r#"{{ name = "a", fn = "{func}" }}"#)).unwrap_err();
        assert!(err.contains(&format!("fn \"{func}\" needs a field; add field = \"<field>\"")), "{err}");
    }
}

#[test]
fn complete_output_warns_when_windows_close() {
    let config = parse_config(FEATURES).unwrap_or_else(|e| panic!("{e}"));
    // The session query warns; the global one without reset (query "running") does not.
    let line = line_containing(FEATURES, "output = \"complete\"");
    assert_eq!(
        config.warnings,
        [format!(
            "line {line}: queries[1].output: query \"sessions\": output = \"complete\" keeps and rewrites every window ever seen; \
             the table grows without bound — use update, or global without reset"
        )]
    );

    // Sliding windows refuse complete output altogether.
    let sliding = MINIMAL
        .replace("{ tumbling = \"1m\" }", "{ sliding = \"1m\", slide = \"30s\" }")
        .replace("sink = \"out\"", "output = \"complete\"\nsink = \"out\"");
    let err = parse_config(&sliding).unwrap_err().to_string();
    assert!(
        err.contains("output = \"complete\" is not supported with sliding windows") && err.contains("use output = \"update\""),
        "{err}"
    );
    for window in ["{ tumbling = \"1m\" }", "{ global = true, reset = \"hour\" }"] {
        let text = MINIMAL
            .replace("{ tumbling = \"1m\" }", window)
            .replace("sink = \"out\"", "output = \"complete\"\nsink = \"out\"");
        let config = parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.warnings.len(), 1, "{window}");
        assert!(config.warnings[0].contains("query \"per_kind\": output = \"complete\" keeps"), "{window}");
    }
    for output in ["append", "update"] {
        let text = MINIMAL.replace("sink = \"out\"", &format!("output = \"{output}\"\nsink = \"out\""));
        assert!(parse_config(&text).unwrap().warnings.is_empty(), "{output}");
    }
}

#[test]
fn append_needs_a_window_that_closes() {
    let global = MINIMAL.replace("{ tumbling = \"1m\" }", "{ global = true }");
    let errors = errors_of(&global);
    let error = error_at(&errors, "queries[0].window");
    assert_eq!(error.line, Some(line_containing(&global, "global = true")));
    assert_eq!(
        error.message,
        "query \"per_kind\": a global window without reset never closes, so output = \"append\" (the default) would never write a row; \
         set output = \"update\" or \"complete\", or add reset = \"day\" (or hour, week, month, year)"
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");

    let explicit = global.replace("sink = \"out\"", "output = \"append\"\nsink = \"out\"");
    let errors = errors_of(&explicit);
    let error = error_at(&errors, "queries[0].output");
    assert_eq!(error.line, Some(line_containing(&explicit, "output = \"append\"")));
    assert!(error.message.contains("so output = \"append\" would never write a row"), "{}", error.message);

    for output in ["update", "complete"] {
        let text = global
            .replace("sink = \"out\"", &format!("output = \"{output}\"\nsink = \"out\""))
            .replace("aggregates = [", "group_by = [\"kind\"]\naggregates = [");
        let config = parse_config(&text).unwrap_or_else(|e| panic!("{output}: {e}"));
        assert!(config.warnings.is_empty());
    }
}

#[test]
fn partition_by_names_output_columns() {
    let bad = FEATURES
        .replace(
            "partition_by = [\"window_date\", \"page\"]",
            "partition_by = [\"window_dat\", \"page\", \"page\"]",
        )
        .replace("partition_by = [\"reason\"]", "partition_by = [\"reason\", \"topic\"]");
    let errors = errors_of(&bad);
    let line = Some(line_containing(&bad, "window_dat\""));
    let error = error_at(&errors, "sinks[0].partition_by[0]");
    assert_eq!(error.line, line);
    assert_eq!(
        error.message,
        "sink \"sliding_out\": partition_by column \"window_dat\" is not an output column of query \"sliding\"; \
         its columns: window_start, window_end, page, views, clicks, users, p99, ctr, window_date"
    );
    assert!(error_at(&errors, "sinks[0].partition_by[2]")
        .message
        .contains("\"page\" appears more than once in partition_by"));
    let error = error_at(&errors, "sinks[4].partition_by[1]");
    assert_eq!(error.line, Some(line_containing(&bad, "\"reason\", \"topic\"")));
    assert_eq!(
        error.message,
        "sink \"dead_letters\" holds dead letters, which can be partitioned only by \"reason\" \
         (its columns: reason, topic, partition, offset, payload, error, routed_at)"
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");

    // Session windows have their own columns.
    let text = FEATURES.replace(
        "path = \"./out/sessions\"",
        "path = \"./out/sessions\"\npartition_by = [\"session_start\", \"window_start\"]",
    );
    let errors = errors_of(&text);
    assert!(error_at(&errors, "sinks[1].partition_by[1]")
        .message
        .ends_with("its columns: session_start, session_end, duration, user_id, events"));
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn file_sources_take_only_their_keys() {
    let text = FEATURES.replace(
        "kind = \"files\"\npath = \"./inbox\"",
        "kind = \"files\"\npath = \"./inbox\"\ntopic = \"drops\"\npartitions = 2\nstarting_offsets = \"latest\"\non_gap = \"skip\"",
    );
    let errors = errors_of(&text);
    for (key, written) in [
        ("topic", "topic = \"drops\""),
        ("partitions", "partitions = 2"),
        ("starting_offsets", "starting_offsets = \"latest\""),
        ("on_gap", "on_gap = \"skip\""),
    ] {
        let error = error_at(&errors, &format!("sources[1].{key}"));
        assert_eq!(error.line, Some(line_containing(&text, written)));
        assert_eq!(
            error.message,
            format!("\"{key}\" applies only to Kafka sources, and this one has kind = \"files\"; remove it")
        );
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");

    let text = FEATURES.replace("topic = \"clicks\"", "topic = \"clicks\"\npath = \"./x\"\nsettle = \"1s\"");
    let errors = errors_of(&text);
    assert_eq!(
        error_at(&errors, "sources[0].path").message,
        "\"path\" applies only to file sources; add kind = \"files\" to read a directory, or remove it"
    );
    assert!(error_at(&errors, "sources[0].settle")
        .message
        .starts_with("\"settle\" applies only to file sources"));
    assert_eq!(errors.len(), 2, "{errors:#?}");

    let text = FEATURES.replace("path = \"./inbox\"\n", "");
    let errors = errors_of(&text);
    let header = line_containing(&text, "name = \"drops\"") - 1;
    let error = error_at(&errors, "sources[1].path");
    assert_eq!(
        (error.line, error.message.as_str()),
        (Some(header), "missing required key \"path\"; add path = ... to sources[1]")
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");

    // Two file sources have no topic to share; the generator needs a Kafka source.
    let second = "\n[[sources]]\nname = \"more\"\nkind = \"files\"\npath = \"./more\"\nschema = { ts = \"timestamp\" }\nevent_time = { field = \"ts\" }\n";
    let text = format!("{FEATURES}{second}\n[generator]\nsource = \"drops\"\n");
    let errors = errors_of(&text);
    let error = error_at(&errors, "generator.source");
    assert_eq!(
        error.message,
        "the generator produces into a Kafka topic, but source \"drops\" reads files (kind = \"files\"); point it at a Kafka source"
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");

    let errors = errors_of(&FEATURES.replace("kind = \"files\"", "kind = \"s3\""));
    assert_eq!(
        error_at(&errors, "sources[1].kind").message,
        "unknown value \"s3\"; use one of \"kafka\", \"files\""
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

/// Many independent mistakes in the new constructs, each reported with its path and line.
const NEW_MISTAKES: &str = r#"[pipeline]
name = "p"

[[sources]]
name = "clicks"
topic = "clicks"
schema = { user_id = "string", page = "string", latency_ms = "int", ts = "timestamp" }
event_time = { field = "ts" }
settle = "1s"
on_error = "dead_letters"

[[sources]]
name = "drops"
kind = "files"
topic = "drops"
schema = { ts = "timestamp" }
event_time = { field = "ts" }

[[queries]]
name = "slides"
from = "clicks"
window = { sliding = "5m", slide = "10m" }
aggregates = [
  { name = "p", fn = "approx_percentile", field = "latency_ms" },
  { name = "c", fn = "count", percentile = 0.5 },
  { name = "q", fn = "approx_percentile", field = "latency_ms", percentile = 1.5 },
]
derive = [{ name = "p", expr = "p * 2" }, { expr = "1" }]
sink = "out1"

[[queries]]
name = "sessions"
from = "clicks"
window = { session = "0s", offset = "1m" }
aggregates = [{ name = "duration", fn = "count" }]
sink = "out2"

[[queries]]
name = "forever"
from = "clicks"
window = { global = true, reset = "fortnight" }
aggregates = [{ name = "n", fn = "count" }]
output = "update"
sink = "out3"

[[queries]]
name = "never"
from = "clicks"
window = { global = false }
aggregates = [{ name = "n", fn = "count" }]
sink = "out4"

[[queries]]
name = "appends"
from = "clicks"
window = { global = true }
aggregates = [{ name = "n", fn = "count" }]
output = "append"
sink = "out5"

[[queries]]
name = "two"
from = "clicks"
window = { tumbling = "1m", session = "5m", reset = "day" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out6"

[[queries]]
name = "nokind"
from = "clicks"
window = { offset = "1m", size = "1m" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out7"

[[queries]]
name = "offsets"
from = "clicks"
window = { sliding = "10m", slide = "5m", offset = "5m" }
aggregates = [{ name = "n", fn = "count" }]
sink = "out8"

[[sinks]]
name = "out1"
kind = "delta"
path = "o1"
partition_by = ["page"]
target_file_size = "12 parsecs"
compact_min_files = 1
checkpoint_interval = 0
vacuum_retention = "7 days"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "dl"
partition_by = ["payload"]

[[sinks]]
name = "out2"
kind = "delta"
path = "o2"

[[sinks]]
name = "out3"
kind = "delta"
path = "o3"

[[sinks]]
name = "out4"
kind = "delta"
path = "o4"

[[sinks]]
name = "out5"
kind = "delta"
path = "o5"

[[sinks]]
name = "out6"
kind = "delta"
path = "o6"

[[sinks]]
name = "out7"
kind = "delta"
path = "o7"

[[sinks]]
name = "out8"
kind = "delta"
path = "o8"
"#;

#[test]
fn reports_every_mistake_in_new_constructs_with_path_and_line() {
    let errors = errors_of(NEW_MISTAKES);
    let line = |needle| Some(line_containing(NEW_MISTAKES, needle));
    let expect = |path: &str, at: Option<usize>, message: &str| {
        let error = error_at(&errors, path);
        assert_eq!(error.line, at, "line of {error}");
        assert_eq!(error.message, message, "at {path}");
    };

    expect(
        "sources[0].settle",
        line("settle = \"1s\""),
        "\"settle\" applies only to file sources; add kind = \"files\" to read a directory, or remove it",
    );
    expect(
        "sources[1].topic",
        line("topic = \"drops\""),
        "\"topic\" applies only to Kafka sources, and this one has kind = \"files\"; remove it",
    );
    expect(
        "sources[1].path",
        Some(line_containing(NEW_MISTAKES, "name = \"drops\"") - 1),
        "missing required key \"path\"; add path = ... to sources[1]",
    );

    expect(
        "queries[0].window.slide",
        line("slide = \"10m\""),
        "the slide (10m) must not be longer than the window size (5m); for gaps between windows use a shorter size",
    );
    expect(
        "queries[0].aggregates[0].percentile",
        line("{ name = \"p\", fn = \"approx_percentile\""),
        "fn \"approx_percentile\" needs the percentile to estimate; add percentile = 0.99 (a number between 0 and 1)",
    );
    expect(
        "queries[0].aggregates[1].percentile",
        line("percentile = 0.5"),
        "percentile applies only to fn = \"approx_percentile\", not \"count\"; remove it",
    );
    expect(
        "queries[0].aggregates[2].percentile",
        line("percentile = 1.5"),
        "must be a number between 0 and 1 (e.g. 0.99 for the 99th percentile), found 1.5",
    );
    let derive_line = line("derive = [");
    expect(
        "queries[0].derive[0].name",
        derive_line,
        "derived column name \"p\" clashes with the aggregate queries[0].aggregates[0]; output column names must be unique, so pick another name",
    );
    expect(
        "queries[0].derive[1].name",
        derive_line,
        "missing required key \"name\"; add name = ... to queries[0].derive[1]",
    );

    expect("queries[1].window.session", line("session = \"0s\""), "the session gap must be greater than 0s");
    expect(
        "queries[1].window.offset",
        line("session = \"0s\""),
        "\"offset\" applies only to tumbling and sliding windows; remove it",
    );
    // The window's parameters are broken, but its kind still names its columns.
    expect(
        "queries[1].aggregates[0].name",
        line("name = \"duration\""),
        "aggregate name \"duration\" clashes with the window column \"duration\"; output column names must be unique, so pick another name",
    );

    expect(
        "queries[2].window.reset",
        line("\"fortnight\""),
        "unknown value \"fortnight\"; use one of \"hour\", \"day\", \"week\", \"month\", \"year\"",
    );
    expect(
        "queries[3].window.global",
        line("global = false"),
        "global = false does not make a window; remove it and use another kind, or set global = true",
    );
    expect(
        "queries[4].output",
        line("output = \"append\""),
        "query \"appends\": a global window without reset never closes, so output = \"append\" would never write a row; \
         set output = \"update\" or \"complete\", or add reset = \"day\" (or hour, week, month, year)",
    );
    let two = line("session = \"5m\"");
    expect(
        "queries[5].window.session",
        two,
        "a window has one kind and this one is tumbling; remove session (or tumbling)",
    );
    expect("queries[5].window.reset", two, "\"reset\" applies only to global windows; remove it");
    let no_kind = line("size = \"1m\"");
    expect(
        "queries[6].window",
        no_kind,
        "missing window kind; write one of tumbling = \"5m\", sliding = \"10m\" with slide = \"5m\", session = \"30m\" or global = true",
    );
    expect(
        "queries[6].window.size",
        no_kind,
        "unknown key \"size\" in queries[6].window; allowed keys: tumbling, sliding, session, global",
    );
    expect(
        "queries[7].window.offset",
        line("offset = \"5m\""),
        "the offset (5m) must be smaller than the slide (5m)",
    );

    expect(
        "sinks[0].partition_by[0]",
        line("partition_by = [\"page\"]"),
        "sink \"out1\": partition_by column \"page\" is not an output column of query \"slides\"; its columns: window_start, window_end, p, c, q, p",
    );
    expect(
        "sinks[0].target_file_size",
        line("parsecs"),
        "invalid size \"12 parsecs\": write a whole number followed by B, KB, MB, GB, KiB, MiB or GiB (e.g. \"128MiB\"), or an integer number of bytes",
    );
    expect("sinks[0].compact_min_files", line("compact_min_files"), "must be at least 2, found 1");
    expect("sinks[0].checkpoint_interval", line("checkpoint_interval"), "must be at least 1, found 0");
    expect(
        "sinks[0].vacuum_retention",
        line("vacuum_retention"),
        "invalid duration \"7 days\": write a number followed by ms, s, m, h or d (e.g. \"10s\")",
    );
    expect(
        "sinks[1].partition_by[0]",
        line("partition_by = [\"payload\"]"),
        "sink \"dead_letters\" holds dead letters, which can be partitioned only by \"reason\" (its columns: reason, topic, partition, offset, payload, error, routed_at)",
    );

    // Nothing else: every error above is expected, and none is repeated.
    assert_eq!(errors.len(), 26, "{errors:#?}");
    let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

const EXPRESSIONS: &str = r#"[pipeline]
name = "p"

[[sources]]
name = "events"
topic = "events"
event_time = { field = "ts" }
schema = { key = "string", value = "int", ts = "timestamp" }

[[queries]]
name = "ok"
from = "events"
where = "key LIKE 'a%' AND value BETWEEN 1 AND 10"
window = { session = "1m" }
group_by = ["key"]
aggregates = [
  { name = "n", fn = "count", filter = "value > 0" },
  { name = "total", fn = "sum", field = "value" },
  { name = "last_ts", fn = "last", field = "ts" },
]
derive = [
  { name = "mean", expr = "total / n" },
  { name = "slow", expr = "mean > 2.5 AND duration > 60" },
  { name = "day", expr = "CAST(session_start AS DATE) || ' ' || key" },
  { name = "lag_us", expr = "session_end - last_ts" },
]
output = "update"
sink = "ok_out"

[[queries]]
name = "q"
from = "events"
where = "pag_url = 'x'"
window = { tumbling = "1m" }
aggregates = [
  { name = "n", fn = "count", filter = "value + 1" },
  { name = "m", fn = "count", filter = "n > 1" },
  { name = "broken", fn = "sum", field = "nope" },
]
derive = [
  { name = "a", expr = "b + 1" },
  { name = "b", expr = "n * 2" },
  { name = "c", expr = "b AND TRUE" },
  { name = "d", expr = "broken + 1" },
  { name = "e", expr = "window_start +" },
]
sink = "q_out"

[[sinks]]
name = "ok_out"
kind = "delta"
path = "ok"
partition_by = ["day"]

[[sinks]]
name = "q_out"
kind = "delta"
path = "q"
"#;

#[test]
fn expressions_are_type_checked_against_the_columns_they_read() {
    let valid = EXPRESSIONS.split("[[queries]]\nname = \"q\"").next().unwrap().to_string() + "[[sinks]]\nname = \"ok_out\"\nkind = \"delta\"\npath = \"ok\"\n";
    let config = parse_config(&valid).unwrap_or_else(|e| panic!("{e}"));
    let query = &config.queries[0];
    assert_eq!(query.filter.as_deref(), Some("key LIKE 'a%' AND value BETWEEN 1 AND 10"));
    assert_eq!(query.derive.len(), 4);

    let errors = errors_of(EXPRESSIONS);
    let line = |needle| Some(line_containing(EXPRESSIONS, needle));
    let expect = |path: &str, at: Option<usize>, start: &str| {
        let error = error_at(&errors, path);
        assert_eq!(error.line, at, "line of {error}");
        assert!(error.message.starts_with(start), "{path}: {:?} should start with {start:?}", error.message);
    };
    expect(
        "queries[1].where",
        line("pag_url"),
        "query \"q\": where = \"pag_url = 'x'\": unknown column \"pag_url\" (columns: key, value, ts)",
    );
    expect(
        "queries[1].aggregates[0].filter",
        line("\"value + 1\""),
        "query \"q\": aggregate \"n\": filter = \"value + 1\": a filter must be a boolean condition, but `value + 1` is int",
    );
    // Filters read the source's fields, not the query's outputs.
    expect(
        "queries[1].aggregates[1].filter",
        line("\"n > 1\""),
        "query \"q\": aggregate \"m\": filter = \"n > 1\": unknown column \"n\" (columns: key, value, ts)",
    );
    expect(
        "queries[1].aggregates[2].field",
        line("\"nope\""),
        "aggregate field \"nope\" is not in the schema of source \"events\"",
    );
    // Derived columns see only the columns before them.
    expect(
        "queries[1].derive[0].expr",
        line("\"b + 1\""),
        "query \"q\": derived column \"a\": expr = \"b + 1\": unknown column \"b\" (columns: window_start, window_end, n, m)",
    );
    expect(
        "queries[1].derive[2].expr",
        line("\"b AND TRUE\""),
        "query \"q\": derived column \"c\": expr = \"b AND TRUE\": AND needs a boolean operand, but int \"b\" is not boolean",
    );
    expect(
        "queries[1].derive[4].expr",
        line("\"window_start +\""),
        "query \"q\": derived column \"e\": expr = \"window_start +\": syntax error",
    );
    // "d" reads the broken aggregate, whose own error is enough; "c" is checked although the
    // derived column "a" before it is broken.
    assert_eq!(errors.len(), 7, "{errors:#?}");
}

#[test]
fn metrics_listen_defaults_parses_and_turns_off() {
    let config = parse_config(MINIMAL).unwrap();
    assert_eq!(config.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(config.metrics, MetricsConfig::default());

    let ephemeral = format!("{MINIMAL}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    assert_eq!(parse_config(&ephemeral).unwrap().metrics.listen, Some("127.0.0.1:0".parse().unwrap()));
    let v6 = format!("{MINIMAL}\n[metrics]\nlisten = \"[::]:9000\"\n");
    assert_eq!(parse_config(&v6).unwrap().metrics.listen, Some("[::]:9000".parse().unwrap()));
    let off = format!("{MINIMAL}\n[metrics]\nlisten = \"off\"\n");
    assert_eq!(parse_config(&off).unwrap().metrics.listen, None);
}

#[test]
fn log_level_is_optional_and_checked() {
    assert_eq!(parse_config(MINIMAL).unwrap().log.level, None);
    let debug = format!("{MINIMAL}\n[log]\nlevel = \"info,tidemark=debug\"\n");
    assert_eq!(parse_config(&debug).unwrap().log.level.as_deref(), Some("info,tidemark=debug"));
    let text = format!("{MINIMAL}\n[log]\nlevel = \"info,tidemark=loudest\"\n");
    let errors = errors_of(&text);
    let error = error_at(&errors, "log.level");
    assert_eq!(error.line, Some(line_containing(&text, "level = ")));
    assert!(error.message.starts_with("invalid log level \"info,tidemark=loudest\""), "{}", error.message);
}

#[test]
fn bad_metrics_listen_is_located() {
    let text = format!("{MINIMAL}\n[metrics]\nlisten = \"localhost\"\nport = 1\n");
    let errors = errors_of(&text);
    let error = error_at(&errors, "metrics.listen");
    assert_eq!(error.line, Some(line_containing(&text, "listen = ")));
    assert!(error.message.starts_with("invalid listen address \"localhost\""), "{}", error.message);
    assert!(errors.iter().any(|e| e.path.starts_with("metrics.port")), "{errors:#?}");
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

const TWO_SOURCES: &str = r#"[pipeline]
name = "p"
[[sources]]
name = "clicks"
topic = "clicks"
event_time = { field = "ts" }
schema = { user_id = "string", page = "string", ts = "timestamp" }
[[sources]]
name = "purchases"
topic = "purchases"
event_time = { field = "ts" }
schema = { buyer = "string", amount = "float", n = "int", ts = "timestamp" }
"#;

fn with_two_sources(queries: &str) -> String {
    format!("{TWO_SOURCES}{queries}\n[[sinks]]\nname = \"out\"\nkind = \"delta\"\npath = \"/tmp/out\"\n")
}

#[test]
fn a_join_compiles_its_keys_interval_and_carried_fields() {
    let config = parse_config(&with_two_sources(
        r#"[[queries]]
name = "j"
from = "clicks"
join = { source = "purchases", type = "left", on = ["user_id"], right_on = ["buyer"], between = ["-5m", "30m"], left_as = "c", right_as = "p", where = "amount > 0" }
select = [
  { name = "user_id", expr = "c.user_id" },
  { name = "amount", expr = "p.amount" },
  { name = "seconds", expr = "(p.ts - c.ts) / 1000000.0" },
]
sink = "out""#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let q = &config.queries[0];
    let QueryKind::Join(j) = &q.kind else { panic!("{:?}", q.kind) };
    assert_eq!((j.source_index, j.join_type), (1, JoinType::Left));
    assert_eq!((j.left_keys.clone(), j.right_keys.clone()), (vec![0], vec![0]));
    assert_eq!((j.lower, j.upper), (-300_000_000, 1_800_000_000));
    // Only what select reads travels: c.user_id, c.ts; p.amount, p.ts.
    assert_eq!((j.left_fields.clone(), j.right_fields.clone()), (vec![0, 2], vec![1, 3]));
    assert_eq!(
        q.select.iter().map(|s| s.expr.expr.output_type()).collect::<Vec<_>>(),
        [FieldType::String, FieldType::Float, FieldType::Float]
    );
    assert!(j.right_filter.is_some());
}

#[test]
fn join_mistakes_are_reported_with_the_fix() {
    let errors = errors_of(&with_two_sources(
        r#"[[queries]]
name = "j"
from = "clicks"
window = { tumbling = "1m" }
join = { source = "purchases", on = ["user_id"], between = ["30m", "0s"] }
sink = "out""#,
    ));
    let text = format!("{errors:?}");
    for needle in [
        "a join has no window",
        "missing required key \\\"select\\\"",
        "lower bound is after the upper bound",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    let errors = errors_of(&with_two_sources(
        r#"[[queries]]
name = "j"
from = "clicks"
join = { source = "purchases", on = ["user_id"], right_on = ["n"], between = ["0s", "1m"] }
select = [{ name = "x", expr = "clicks.user_id" }, { name = "y", expr = "user_id" }]
sink = "out""#,
    ));
    let text = format!("{errors:?}");
    for needle in [
        "join key \\\"user_id\\\" is string on the left and \\\"n\\\" is int",
        "unknown column \\\"user_id\\\"",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
}

#[test]
fn anomaly_and_stateless_queries_compile_and_refuse_what_does_not_fit() {
    let config = parse_config(&with_two_sources(
        r#"[[queries]]
name = "a"
from = "purchases"
window = { sliding = "15m", slide = "1m" }
group_by = ["buyer"]
anomaly = { field = "amount", min_count = 10, judge = "containing" }
sink = "out""#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let QueryKind::Anomaly(a) = &config.queries[0].kind else { panic!() };
    assert_eq!((a.field_index, a.min_count, a.threshold, a.judge), (1, 10, 3.0, AnomalyJudge::Containing));

    let errors = errors_of(&with_two_sources(
        r#"[[queries]]
name = "a"
from = "purchases"
window = { sliding = "15m", slide = "2m" }
anomaly = { field = "buyer" }
output = "update"
sink = "out""#,
    ));
    let text = format!("{errors:?}");
    for needle in ["readings must be an int or float field", "size is a multiple of its slide", "appends its rows"] {
        assert!(text.contains(needle), "{needle} in {text}");
    }

    let config = parse_config(&with_two_sources(
        r#"[[queries]]
name = "s"
from = "clicks"
where = "page <> ''"
select = [{ name = "page", expr = "UPPER(page)" }, { name = "offset", expr = "_offset" }]
sink = "out""#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.queries[0].kind, QueryKind::Stateless);
    assert_eq!(config.queries[0].select[1].expr.expr.output_type(), FieldType::Int);

    let errors = errors_of(&with_two_sources(
        r#"[[queries]]
name = "s"
from = "clicks"
group_by = ["page"]
aggregates = [{ name = "n", fn = "count" }]
sink = "out""#,
    ));
    assert!(format!("{errors:?}").contains("a stateless query (no window) has no aggregates"), "{errors:?}");
}

#[test]
fn an_aggregate_takes_an_expression_of_the_right_type() {
    let config = parse_config(&with_two_sources(
        r#"[[queries]]
name = "r"
from = "clicks"
window = { tumbling = "1m" }
aggregates = [{ name = "rate", fn = "avg", expr = "CASE WHEN page = '/buy' THEN 1 ELSE 0 END" }]
sink = "out""#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.queries[0].aggregates[0].expr.as_ref().map(|e| e.text()),
        Some("CASE WHEN page = '/buy' THEN 1 ELSE 0 END")
    );
    let errors = errors_of(&with_two_sources(
        r#"[[queries]]
name = "r"
from = "clicks"
window = { tumbling = "1m" }
aggregates = [{ name = "s", fn = "sum", expr = "UPPER(page)" }, { name = "t", fn = "sum", field = "user_id", expr = "1" }]
sink = "out""#,
    ));
    let text = format!("{errors:?}");
    for needle in ["needs an int or float expression, but \\\"UPPER(page)\\\" is string", "has both field and expr"] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
}

/// MINIMAL with the query writing to `out` and a Kafka sink `alerts` (the extra keys given).
fn with_kafka_sink(sink_list: &str, kafka_keys: &str) -> String {
    format!(
        "{}\n[[sinks]]\nname = \"alerts\"\nkind = \"kafka\"\n{kafka_keys}\n",
        MINIMAL.replace("sink = \"out\"", &format!("sink = {sink_list}"))
    )
}

#[test]
fn a_query_writes_to_a_delta_table_and_a_kafka_topic() {
    let text = with_kafka_sink(
        r#"["out", "alerts"]"#,
        "topic = \"alerts\"\nkey = [\"kind\"]\nbootstrap_servers = \"k:9092\"\noptions = { \"linger.ms\" = 20 }",
    )
    .replace("aggregates = [", "group_by = [\"kind\"]\naggregates = [");
    let config = parse_config(&text).unwrap();
    assert_eq!(config.queries[0].sinks, vec!["out".to_string(), "alerts".to_string()]);
    assert_eq!(config.queries[0].sink_indexes, vec![0, 1]);
    let kafka = config.sinks[1].kafka.as_ref().expect("a Kafka sink");
    assert_eq!(config.sinks[1].kind, SinkKind::Kafka);
    assert_eq!(kafka.topic, "alerts");
    assert_eq!(kafka.key, vec!["kind".to_string()]);
    assert_eq!(kafka.bootstrap_servers.as_deref(), Some("k:9092"));
    assert_eq!(kafka.options.get("linger.ms").map(String::as_str), Some("20"));
    // The plan feeds the Delta table from the shards and copies its rows to the topic.
    let plan = crate::plan::Plan::new(&config).unwrap();
    assert_eq!(plan.query_sink, vec![0]);
    assert_eq!((plan.sinks[0].copy_from, plan.sinks[1].copy_from), (None, Some(0)));
}

#[test]
fn kafka_sink_mistakes_are_named() {
    let errors = errors_of(&with_kafka_sink(
        r#"["out", "alerts", "out"]"#,
        "path = \"x\"\nkey = [\"nope\"]\npartition_by = [\"kind\"]",
    ));
    assert!(
        error_at(&errors, "sinks[1].topic").message.contains("missing required key \"topic\""),
        "{errors:#?}"
    );
    assert!(error_at(&errors, "sinks[1].path").message.contains("applies only to kind = \"delta\""));
    assert!(error_at(&errors, "sinks[1].partition_by").message.contains("applies only to kind = \"delta\""));
    assert!(error_at(&errors, "sinks[1].key[0]").message.contains("key column \"nope\" is not a column"));
    assert!(error_at(&errors, "queries[0].sink[2]").message.contains("is listed twice"));
    assert_eq!(errors.len(), 5, "{errors:#?}");
    let errors = errors_of(&with_kafka_sink("[]", "topic = \"t\""));
    assert!(error_at(&errors, "queries[0].sink").message.contains("is empty"), "{errors:#?}");
}

#[test]
fn sources_sharing_dead_letters_list_the_same_sinks() {
    let text = format!(
        "{}\n{}",
        with_kafka_sink("\"out\"", "topic = \"dead\"").replace("event_time = { field = \"ts\" }", "event_time = { field = \"ts\" }\non_error = [\"dlq\", \"alerts\"]"),
        "[[sinks]]\nname = \"dlq\"\nkind = \"delta\"\npath = \"dlq\"\n\n[[sources]]\nname = \"more\"\ntopic = \"more\"\nschema = { ts = \"int\" }\nevent_time = { field = \"ts\" }\non_error = \"dlq\"\n"
    );
    let config = parse_config(&text).unwrap();
    assert_eq!(config.sources[0].on_error, vec!["dlq".to_string(), "alerts".to_string()]);
    let err = crate::plan::Plan::new(&config).err().expect("different dead-letter lists are refused");
    let text_of = err.to_string();
    assert!(
        text_of.contains("sources \"events\" and \"more\" share a dead-letter sink but list different ones"),
        "{text_of}"
    );
    let same = text.replace("on_error = \"dlq\"", "on_error = [\"dlq\", \"alerts\"]");
    let plan = crate::plan::Plan::new(&parse_config(&same).unwrap()).unwrap();
    let alerts = plan.sinks.iter().find(|p| p.name == "alerts").unwrap();
    assert_eq!(alerts.copy_of.as_deref(), Some("dlq"));
}

#[test]
fn a_keyless_global_window_cannot_be_upserted() {
    let text = MINIMAL.replace("window = { tumbling = \"1m\" }", "window = { global = true }\noutput = \"update\"");
    let errors = errors_of(&text);
    assert!(
        error_at(&errors, "queries[0].output").message.contains("use output = \"complete\""),
        "{errors:#?}"
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let complete = text.replace("output = \"update\"", "output = \"complete\"");
    assert!(parse_config(&complete).is_ok());
    let keyed = text.replace("aggregates = [", "group_by = [\"kind\"]\naggregates = [");
    assert!(parse_config(&keyed).is_ok());
}

#[test]
fn max_future_takes_a_duration_or_off() {
    let with = |w: &str| {
        MINIMAL.replace(
            "event_time = { field = \"ts\" }",
            &format!("event_time = {{ field = \"ts\" }}\nwatermark = {{ {w} }}"),
        )
    };
    let parsed = |w: &str| parse_config(&with(w)).unwrap().sources[0].watermark.max_future;
    assert_eq!(
        parse_config(MINIMAL).unwrap().sources[0].watermark.max_future,
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(parsed("max_future = \"2h\""), Some(Duration::from_secs(7_200)));
    assert_eq!(parsed("max_future = \"off\""), None);
    let errors = errors_of(&with("max_future = \"soon\""));
    assert!(error_at(&errors, "sources[0].watermark.max_future").message.contains("soon"), "{errors:#?}");
}

#[test]
fn a_metadata_refresh_below_100ms_is_refused() {
    let text = FULL.replace("metadata_refresh = \"10s\"", "metadata_refresh = \"10ms\"");
    let errors = parse_config(&text).unwrap_err();
    let e = error_at(&errors.0, "kafka.metadata_refresh");
    assert!(e.message.contains("at least 100ms"), "{}", e.message);
}

/// A pipeline that can run as tasks on several processes: every keyed query's key holds
/// the sources' message key, the join pairs the two keys, no local-only parts.
const SCALED: &str = r#"
[pipeline]
name = "scaled"

[kafka]
bootstrap_servers = "kafka:9092"

[scale]
session_timeout = "8s"

[[sources]]
name = "clicks"
topic = "clicks"
key = ["user_id"]
schema = { user_id = "string", page = "string", ts = "timestamp" }
event_time = { field = "ts" }

[[sources]]
name = "buys"
topic = "buys"
key = "buyer"
schema = { buyer = "string", amount = "float", ts = "timestamp" }
event_time = { field = "ts" }

[[queries]]
name = "per_user_page"
from = "clicks"
window = { tumbling = "1m" }
group_by = ["page", "user_id"]
aggregates = [{ name = "n", fn = "count" }]
output = "update"
sink = "per_user_page"

[[queries]]
name = "attribution"
from = "clicks"
join = { source = "buys", on = ["user_id"], right_on = ["buyer"], between = ["0s", "10m"] }
select = [{ name = "user_id", expr = "clicks.user_id" }, { name = "amount", expr = "buys.amount" }]
sink = "attribution"

[[queries]]
name = "raw"
from = "clicks"
select = [{ name = "page", expr = "page" }]
sink = "raw"

[[sinks]]
name = "per_user_page"
kind = "delta"
path = "a"

[[sinks]]
name = "attribution"
kind = "delta"
path = "b"

[[sinks]]
name = "raw"
kind = "delta"
path = "c"
"#;

#[test]
fn scale_reads_with_defaults_and_source_keys() {
    let config = parse_config(SCALED).unwrap_or_else(|e| panic!("{e}"));
    let scale = config.scale.expect("[scale] is on");
    assert_eq!(scale.changelog_topic, "scaled-changelog");
    assert_eq!(scale.changelog_replication, -1);
    assert_eq!(scale.session_timeout, Duration::from_secs(8));
    assert!(!scale.standby, "no standby copies unless asked");
    let warm = parse_config(&SCALED.replace("session_timeout = \"8s\"", "standby = true")).unwrap_or_else(|e| panic!("{e}"));
    assert!(warm.scale.unwrap().standby);
    assert_eq!(config.sources[0].key, vec!["user_id".to_string()]);
    assert_eq!(config.sources[1].key, vec!["buyer".to_string()]);
    assert_eq!(config.task, None);
    let off = parse_config(&SCALED.replace("session_timeout = \"8s\"", "enabled = false")).unwrap();
    assert_eq!(off.scale, None);
}

#[test]
fn scale_repartitions_sources_not_keyed_by_what_their_queries_keep_state_by() {
    let keyed = parse_config(SCALED).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        keyed.scale.unwrap().repartition,
        vec![],
        "both topics are keyed by the join key: read as they are"
    );

    // Unkeyed purchases: the join needs both sides partitioned alike, so both are rewritten,
    // each by its own join-key field.
    let unkeyed = parse_config(&SCALED.replace("key = \"buyer\"\n", "")).unwrap_or_else(|e| panic!("{e}"));
    let plans = unkeyed.scale.unwrap().repartition;
    assert_eq!(
        plans,
        vec![
            Repartition {
                source: 0,
                topic: "scaled-repartition-clicks".into(),
                key: vec![0]
            },
            Repartition {
                source: 1,
                topic: "scaled-repartition-buys".into(),
                key: vec![0]
            },
        ]
    );

    // Clicks keyed by page: per_user_page could use them as they are, the join cannot.
    let by_page = parse_config(&SCALED.replace("key = [\"user_id\"]", "key = [\"page\"]")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        by_page.scale.unwrap().repartition.iter().map(|r| r.key.clone()).collect::<Vec<_>>(),
        vec![vec![0], vec![0]]
    );

    // A stateful query whose key lacks the join key: no one partitioning serves both.
    let errors = errors_of(&SCALED.replace("group_by = [\"page\", \"user_id\"]", "group_by = [\"page\"]"));
    let e = error_at(&errors, "scale");
    assert!(
        e.message.contains("\"clicks\" is joined on [user_id] but also keeps state by [page]"),
        "{}",
        e.message
    );
}

#[test]
fn scale_refuses_what_one_task_cannot_compute() {
    let complete = SCALED.replace("output = \"update\"", "output = \"complete\"");
    assert!(error_at(&errors_of(&complete), "queries[0].name").message.contains("output = \"complete\""));

    let embedded = SCALED.replace("bootstrap_servers = \"kafka:9092\"", "bootstrap_servers = \"embedded\"");
    let errors = errors_of(&embedded);
    assert!(error_at(&errors, "scale").message.contains("set [kafka] bootstrap_servers"), "{errors:#?}");
    assert_eq!(error_at(&errors, "scale").line, Some(line_containing(&embedded, "[scale]")));

    let typo = SCALED.replace("key = [\"user_id\"]", "key = [\"user\"]");
    let errors = errors_of(&typo);
    assert!(
        error_at(&errors, "sources[0].key[0]")
            .message
            .contains("key field \"user\" of source \"clicks\" is not in its schema"),
        "{errors:#?}"
    );
}
