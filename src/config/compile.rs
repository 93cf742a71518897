//! Second pass: resolve references between tables and check what needs more
//! than one table to check (unique names, query fields against the source
//! schema, sink usage).
//!
//! The result is only handed out when no error was reported, so missing
//! values may be filled with placeholders here without escaping.

use std::collections::HashMap;
use std::path::PathBuf;

use super::error::Diagnostics;
use super::model::{
    AggFn, AggregateConfig, Config, EventTimeConfig, FieldDef, FieldType, GeneratorConfig, KafkaConfig, PipelineConfig, QueryConfig, SinkConfig, SinkKind,
    SourceConfig, WindowConfig,
};
use super::raw::{RawConfig, RawGenerator, RawQuery, RawSource};
use super::reader::At;

/// Output columns every query produces besides its keys and aggregates.
const WINDOW_COLUMNS: [&str; 2] = ["window_start", "window_end"];

pub(crate) fn compile(raw: RawConfig, diag: &Diagnostics) -> Config {
    let name = raw.pipeline.name.unwrap_or_default();
    let pipeline = PipelineConfig {
        state_dir: raw.pipeline.state_dir.unwrap_or_else(|| PathBuf::from(format!("./data/state/{name}"))),
        commit_interval: raw.pipeline.commit_interval,
        shards: raw.pipeline.shards,
        progress_interval: raw.pipeline.progress_interval,
        exchange_batch: raw.pipeline.exchange_batch,
        exchange_capacity: raw.pipeline.exchange_capacity,
        name: name.clone(),
    };
    let kafka = KafkaConfig {
        bootstrap_servers: raw.kafka.bootstrap_servers,
        group_id: raw.kafka.group_id.unwrap_or(name),
        options: raw.kafka.options,
    };

    check_unique(diag, "source", raw.sources.iter().map(|s| s.name.as_ref()));
    check_unique(diag, "query", raw.queries.iter().map(|q| q.name.as_ref()));
    check_unique(diag, "sink", raw.sinks.iter().map(|s| s.name.as_ref()));
    check_one_source_per_topic(diag, &raw.sources);
    let source_names = Names::new(raw.sources.iter().map(|s| s.name.as_ref()));
    let sink_names = Names::new(raw.sinks.iter().map(|s| s.name.as_ref()));

    // Sink index → name of the query writing to it.
    let mut query_sinks: HashMap<usize, String> = HashMap::new();
    let refs = Refs {
        raw_sources: &raw.sources,
        sources: &source_names,
        sinks: &sink_names,
    };
    let queries: Vec<QueryConfig> = raw.queries.into_iter().map(|q| compile_query(q, &refs, &mut query_sinks, diag)).collect();

    let sources: Vec<SourceConfig> = raw.sources.into_iter().map(|s| compile_source(s, &sink_names, &query_sinks, diag)).collect();

    let sinks = raw
        .sinks
        .into_iter()
        .map(|s| SinkConfig {
            name: s.name.map(|n| n.value).unwrap_or_default(),
            kind: s.kind.unwrap_or(SinkKind::Delta),
            path: s.path.unwrap_or_default(),
        })
        .collect();

    let generator = raw.generator.map(|g| compile_generator(g, &source_names, diag));

    Config {
        pipeline,
        kafka,
        sources,
        queries,
        sinks,
        generator,
    }
}

/// The defined names of one kind of table, for resolving references.
struct Names {
    names: Vec<Option<String>>,
}

impl Names {
    fn new<'a>(names: impl Iterator<Item = Option<&'a At<String>>>) -> Self {
        Names {
            names: names.map(|n| n.map(|n| n.value.clone())).collect(),
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n.as_deref() == Some(name))
    }

    fn list(&self) -> String {
        let mut defined: Vec<&str> = Vec::new();
        for name in self.names.iter().flatten() {
            if !defined.contains(&name.as_str()) {
                defined.push(name);
            }
        }
        if defined.is_empty() {
            "(none)".to_string()
        } else {
            defined.join(", ")
        }
    }

    /// Index of the referenced name, or reports that it is not defined.
    /// `subject` reads like `query "x" reads from`.
    fn resolve(&self, diag: &Diagnostics, reference: &At<String>, subject: &str, kind: &str, plural: &str) -> Option<usize> {
        let index = self.index_of(&reference.value);
        if index.is_none() {
            diag.report(
                reference.path.clone(),
                reference.line,
                format!(
                    "{subject} {kind} \"{}\", which is not defined; defined {plural}: {}",
                    reference.value,
                    self.list()
                ),
            );
        }
        index
    }
}

/// Reports every repeated name at its second and later uses.
fn check_unique<'a>(diag: &Diagnostics, kind: &str, names: impl Iterator<Item = Option<&'a At<String>>>) {
    let mut first_use: HashMap<&str, &At<String>> = HashMap::new();
    for name in names.flatten() {
        match first_use.get(name.value.as_str()) {
            Some(first) => diag.report(
                name.path.clone(),
                name.line,
                format!(
                    "duplicate {kind} name \"{}\": {} already uses it; give each {kind} its own name",
                    name.value,
                    first.path.trim_end_matches(".name")
                ),
            ),
            None => {
                first_use.insert(&name.value, name);
            }
        }
    }
}

/// Partitions are assigned per topic: a topic read by two sources would be read by neither
/// correctly. Several queries can share one source instead.
fn check_one_source_per_topic(diag: &Diagnostics, sources: &[RawSource]) {
    let mut first_use: HashMap<&str, &RawSource> = HashMap::new();
    for s in sources {
        let Some(topic) = s.topic.as_ref() else { continue };
        match first_use.get(topic.value.as_str()) {
            Some(first) => diag.report(
                topic.path.clone(),
                topic.line,
                format!(
                    "topic \"{}\" is already read by source \"{}\"; read each topic with one source and point several queries at it",
                    topic.value,
                    display_name(first.name.as_ref())
                ),
            ),
            None => {
                first_use.insert(&topic.value, s);
            }
        }
    }
}

fn display_name(name: Option<&At<String>>) -> String {
    name.map_or_else(|| "(unnamed)".to_string(), |n| n.value.clone())
}

fn compile_source(s: RawSource, sinks: &Names, query_sinks: &HashMap<usize, String>, diag: &Diagnostics) -> SourceConfig {
    let source_name = display_name(s.name.as_ref());
    if let Some(on_error) = &s.on_error {
        let subject = format!("source \"{source_name}\" sends dead letters to");
        if let Some(index) = sinks.resolve(diag, on_error, &subject, "sink", "sinks") {
            if let Some(query) = query_sinks.get(&index) {
                diag.report(
                    on_error.path.clone(),
                    on_error.line,
                    format!(
                        "sink \"{}\" already receives the results of query \"{query}\" and cannot also take dead letters; add a separate sink for them",
                        on_error.value
                    ),
                );
            }
        }
    }
    SourceConfig {
        name: s.name.map(|n| n.value).unwrap_or_default(),
        topic: s.topic.map(|t| t.value).unwrap_or_default(),
        partitions: s.partitions,
        format: s.format,
        schema: s.schema.unwrap_or_default(),
        event_time: EventTimeConfig {
            field: s.event_time_field.unwrap_or_default(),
            format: s.event_time_format,
        },
        watermark: s.watermark,
        starting_offsets: s.starting_offsets,
        on_error: s.on_error.map(|e| e.value),
        on_gap: s.on_gap,
    }
}

/// What queries may refer to.
struct Refs<'a> {
    raw_sources: &'a [RawSource],
    sources: &'a Names,
    sinks: &'a Names,
}

fn compile_query(q: RawQuery, refs: &Refs<'_>, query_sinks: &mut HashMap<usize, String>, diag: &Diagnostics) -> QueryConfig {
    let query_name = display_name(q.name.as_ref());
    let source_index = q.from.as_ref().and_then(|from| {
        let subject = format!("query \"{query_name}\" reads from");
        refs.sources.resolve(diag, from, &subject, "source", "sources")
    });
    let sink_index = q.sink.as_ref().and_then(|sink| {
        let subject = format!("query \"{query_name}\" writes to");
        let index = refs.sinks.resolve(diag, sink, &subject, "sink", "sinks")?;
        if let Some(first) = query_sinks.get(&index) {
            diag.report(
                sink.path.clone(),
                sink.line,
                format!(
                    "sink \"{}\" already receives the results of query \"{first}\"; give each query its own sink",
                    sink.value
                ),
            );
        } else {
            query_sinks.insert(index, query_name.clone());
        }
        Some(index)
    });
    // Field checks need the source's schema; skip them when it is unknown
    // (the reason has been reported already).
    let source = source_index.and_then(|i| {
        let s = &refs.raw_sources[i];
        Some((display_name(s.name.as_ref()), s.schema.as_deref()?))
    });
    if let Some((source_name, schema)) = &source {
        check_group_by(&q.group_by, source_name, schema, diag);
    }
    let aggregates = q
        .aggregates
        .iter()
        .map(|a| {
            let field_index = match (&source, &a.field) {
                (Some((source_name, schema)), Some(field)) => find_field(field, "aggregate field", source_name, schema, diag),
                _ => None,
            };
            if let (Some(func), Some((_, schema))) = (&a.func, &source) {
                check_aggregate_field(a.at.path.as_str(), a.at.line, func, a.field.as_ref(), field_index.map(|i| &schema[i]), diag);
            }
            AggregateConfig {
                name: a.name.as_ref().map(|n| n.value.clone()).unwrap_or_default(),
                func: a.func.as_ref().map_or(AggFn::Count, |f| f.value),
                field: a.field.as_ref().map(|f| f.value.clone()),
                field_index,
            }
        })
        .collect();
    check_output_names(&q, diag);

    QueryConfig {
        name: q.name.map(|n| n.value).unwrap_or_default(),
        from: q.from.map(|f| f.value).unwrap_or_default(),
        source_index: source_index.unwrap_or(0),
        window: q.window.unwrap_or(WindowConfig::Tumbling {
            size: std::time::Duration::ZERO,
            offset: std::time::Duration::ZERO,
        }),
        group_by: q.group_by.into_iter().map(|g| g.value).collect(),
        aggregates,
        output: q.output,
        allowed_lateness: q.allowed_lateness,
        sink: q.sink.map(|s| s.value).unwrap_or_default(),
        sink_index: sink_index.unwrap_or(0),
    }
}

/// Index of `field` in the schema, or reports that it is missing.
fn find_field(field: &At<String>, role: &str, source_name: &str, schema: &[FieldDef], diag: &Diagnostics) -> Option<usize> {
    let index = schema.iter().position(|d| d.name == field.value);
    if index.is_none() {
        let names: Vec<&str> = schema.iter().map(|d| d.name.as_str()).collect();
        diag.report(
            field.path.clone(),
            field.line,
            format!(
                "{role} \"{}\" is not in the schema of source \"{source_name}\"; schema fields: {}",
                field.value,
                names.join(", ")
            ),
        );
    }
    index
}

fn check_group_by(group_by: &[At<String>], source_name: &str, schema: &[FieldDef], diag: &Diagnostics) {
    for (i, key) in group_by.iter().enumerate() {
        if group_by[..i].iter().any(|k| k.value == key.value) {
            diag.report(
                key.path.clone(),
                key.line,
                format!("\"{}\" appears more than once in group_by; list each field once", key.value),
            );
            continue;
        }
        let Some(index) = find_field(key, "group_by field", source_name, schema, diag) else {
            continue;
        };
        if schema[index].ty == FieldType::Float {
            diag.report(
                key.path.clone(),
                key.line,
                format!("cannot group by float field \"{}\"; group by string, int, bool or timestamp fields", key.value),
            );
        }
    }
}

fn check_aggregate_field(path: &str, line: Option<usize>, func: &At<AggFn>, field: Option<&At<String>>, def: Option<&FieldDef>, diag: &Diagnostics) {
    let name = func.value.as_str();
    if func.value == AggFn::Count {
        return; // any field type may be counted, and the field is optional
    }
    let Some(field) = field else {
        diag.report(
            format!("{path}.field"),
            line,
            format!("fn \"{name}\" needs a field; add field = \"<int or float field>\""),
        );
        return;
    };
    if let Some(def) = def {
        // min/max also order timestamps (first/last seen); sums and averages need numbers.
        let timestamp_ok = matches!(func.value, AggFn::Min | AggFn::Max) && def.ty == FieldType::Timestamp;
        if !matches!(def.ty, FieldType::Int | FieldType::Float) && !timestamp_ok {
            let wanted = if matches!(func.value, AggFn::Min | AggFn::Max) {
                "an int, float or timestamp"
            } else {
                "an int or float"
            };
            diag.report(
                field.path.clone(),
                field.line,
                format!("fn \"{name}\" needs {wanted} field, but \"{}\" is {}", field.value, def.ty.as_str()),
            );
        }
    }
}

/// Output column names must be unique: window bounds, keys, aggregates.
fn check_output_names(q: &RawQuery, diag: &Diagnostics) {
    for key in &q.group_by {
        if WINDOW_COLUMNS.contains(&key.value.as_str()) {
            diag.report(
                key.path.clone(),
                key.line,
                format!(
                    "group_by field \"{}\" clashes with the output column of the same name that holds the window bound",
                    key.value
                ),
            );
        }
    }
    let names: Vec<&At<String>> = q.aggregates.iter().filter_map(|a| a.name.as_ref()).collect();
    for (i, name) in names.iter().enumerate() {
        let clash = if WINDOW_COLUMNS.contains(&name.value.as_str()) {
            Some("the window bound column of the same name".to_string())
        } else if q.group_by.iter().any(|k| k.value == name.value) {
            Some(format!("the group_by field \"{}\"", name.value))
        } else {
            names[..i]
                .iter()
                .find(|n| n.value == name.value)
                .map(|n| format!("another aggregate ({})", n.path.trim_end_matches(".name")))
        };
        if let Some(clash) = clash {
            diag.report(
                name.path.clone(),
                name.line,
                format!(
                    "aggregate name \"{}\" clashes with {clash}; output column names must be unique, so pick another name",
                    name.value
                ),
            );
        }
    }
}

fn compile_generator(g: RawGenerator, sources: &Names, diag: &Diagnostics) -> GeneratorConfig {
    let source_index = g
        .source
        .as_ref()
        .and_then(|source| sources.resolve(diag, source, "the generator produces into", "source", "sources"));
    GeneratorConfig {
        source: g.source.map(|s| s.value).unwrap_or_default(),
        source_index: source_index.unwrap_or(0),
        rate: g.rate,
        seed: g.seed,
        users: g.users,
        pages: g.pages,
        disorder: g.disorder,
        late_share: g.late_share,
        late_by: g.late_by,
        malformed_share: g.malformed_share,
    }
}
