//! Second pass: resolve references between tables and check what needs more
//! than one table to check (unique names, query fields and expressions against
//! the source schema, output columns, sink usage).
//!
//! The result is only handed out when no error was reported, so missing
//! values may be filled with placeholders here without escaping.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use super::error::{ConfigError, Diagnostics};
use super::model::{
    AggFn, AggregateConfig, AnomalyConfig, AnomalyJudge, ApplyConfig, Bootstrap, Config, DerivedColumn, EventTimeConfig, FieldDef, FieldType, Format,
    GeneratorConfig, GeneratorFamily, JoinConfig, KafkaConfig, KafkaSinkConfig, OutputMode, PipelineConfig, PurchasesConfig, QueryConfig, QueryKind,
    Repartition, ScaleConfig, SinkConfig, SinkKind, SourceConfig, Sql, WindowConfig,
};
use super::raw::{RawAggregate, RawAnomaly, RawApply, RawConfig, RawDerived, RawGenerator, RawJoin, RawQuery, RawScale, RawSink, RawSource, RawWindow};
use super::reader::At;
use crate::expr::{Expr, ExprError};

/// Columns of a dead-letter table, in order.
const DEAD_LETTER_COLUMNS: [&str; 7] = ["reason", "topic", "partition", "offset", "payload", "error", "routed_at"];
/// The only column a dead-letter table may be partitioned by.
const DEAD_LETTER_PARTITION_COLUMN: &str = "reason";

pub(crate) fn compile(raw: RawConfig, diag: &Diagnostics) -> Config {
    let name = raw.pipeline.name.unwrap_or_default();
    let pipeline = PipelineConfig {
        state_dir: raw.pipeline.state_dir.unwrap_or_else(|| PathBuf::from(format!("./data/state/{name}"))),
        commit_interval: raw.pipeline.commit_interval,
        shards: raw.pipeline.shards,
        progress_interval: raw.pipeline.progress_interval,
        exchange_batch: raw.pipeline.exchange_batch,
        exchange_capacity: raw.pipeline.exchange_capacity,
        max_epoch_bytes: raw.pipeline.max_epoch_bytes,
        name: name.clone(),
    };
    let kafka = KafkaConfig {
        bootstrap_servers: raw.kafka.bootstrap_servers,
        group_id: raw.kafka.group_id.unwrap_or(name.clone()),
        options: raw.kafka.options,
        metadata_refresh: raw.kafka.metadata_refresh,
    };

    check_unique(diag, "source", raw.sources.iter().map(|s| s.name.as_ref()));
    check_unique(diag, "query", raw.queries.iter().map(|q| q.name.as_ref()));
    check_unique(diag, "sink", raw.sinks.iter().map(|s| s.name.as_ref()));
    check_one_source_per_topic(diag, &raw.sources);
    let source_names = Names::new(raw.sources.iter().map(|s| s.name.as_ref()));
    let sink_names = Names::new(raw.sinks.iter().map(|s| s.name.as_ref()));

    let mut warnings = Vec::new();
    // Sink index → the query writing to it, with that query's output column names.
    let mut query_sinks: HashMap<usize, QueryOutput> = HashMap::new();
    let refs = Refs {
        raw_sources: &raw.sources,
        sources: &source_names,
        sinks: &sink_names,
    };
    let query_at: Vec<(String, Option<usize>)> = raw
        .queries
        .iter()
        .map(|q| q.name.as_ref().map_or(("queries".to_string(), None), |n| (n.path.clone(), n.line)))
        .collect();
    let queries: Vec<QueryConfig> = raw
        .queries
        .into_iter()
        .map(|q| compile_query(q, &refs, &mut query_sinks, &mut warnings, diag))
        .collect();

    // Sink indices receiving dead letters.
    let mut dead_letter_sinks = HashSet::new();
    let sources: Vec<SourceConfig> = raw
        .sources
        .into_iter()
        .map(|s| compile_source(s, &sink_names, &query_sinks, &mut dead_letter_sinks, diag))
        .collect();

    let sinks = raw
        .sinks
        .into_iter()
        .enumerate()
        .map(|(i, s)| compile_sink(s, query_sinks.get(&i), dead_letter_sinks.contains(&i), diag))
        .collect();

    let generator = raw.generator.map(|g| compile_generator(g, &source_names, &sources, diag));
    let scale = raw.scale.map(|scale| {
        let shape = ScaleShape {
            kafka: &kafka,
            sources: &sources,
            queries: &queries,
            generator: generator.is_some(),
            query_at: &query_at,
        };
        compile_scale(scale, &name, &shape, diag)
    });

    Config {
        pipeline,
        kafka,
        sources,
        queries,
        sinks,
        generator,
        metrics: raw.metrics,
        log: raw.log,
        scale,
        task: None,
        warnings,
    }
}

/// What the `[scale]` checks look at.
struct ScaleShape<'a> {
    kafka: &'a KafkaConfig,
    sources: &'a [SourceConfig],
    queries: &'a [QueryConfig],
    generator: bool,
    /// Per query: where its name is written.
    query_at: &'a [(String, Option<usize>)],
}

/// Checks that the pipeline can run as tasks (one per partition number of its sources) on
/// several processes: every keyed query sees all rows of a key in one task, and nothing
/// belongs to one process only.
fn compile_scale(raw: RawScale, pipeline: &str, shape: &ScaleShape, diag: &Diagnostics) -> ScaleConfig {
    let at = |message: String| diag.report(raw.at.path.clone(), raw.at.line, message);
    if shape.kafka.bootstrap_servers == Bootstrap::Embedded {
        at(
            "[scale] needs a Kafka cluster that every process reaches: set [kafka] bootstrap_servers (the embedded broker lives inside one process)"
                .to_string(),
        );
    }
    if shape.generator {
        at("[scale] and [generator] do not go together: every process would generate its own events. Remove [generator] and produce the events with `tidemark-tools loadgen`".to_string());
    }
    for s in shape.sources.iter().filter(|s| s.files.is_some()) {
        at(format!(
            "file source \"{}\" is local to one machine and cannot be shared by a [scale] pipeline; read a Kafka topic instead",
            s.name
        ));
    }
    let names = |source: &SourceConfig, indexes: &[usize]| -> Vec<String> { indexes.iter().map(|&i| source.schema[i].name.clone()).collect() };
    // Per source: the fields a join partitions it by; the keys of its other stateful queries;
    // whether its messages are keyed so that one task holds whole keys (if not, it is
    // repartitioned).
    let count = shape.sources.len();
    let mut joined_on: Vec<Option<Vec<String>>> = vec![None; count];
    let mut keyed_by: Vec<Vec<Vec<String>>> = vec![Vec::new(); count];
    let mut repartition = vec![false; count];
    let mut join_sides: Vec<(usize, usize)> = Vec::new();
    for (q, (path, line)) in shape.queries.iter().zip(shape.query_at) {
        let report = |message: String| diag.report(path.clone(), *line, format!("query \"{}\": {message}", q.name));
        if q.output == OutputMode::Complete {
            report("output = \"complete\" rewrites the whole table each epoch, which no one task can do when several share the pipeline; use \"update\" (a view upserted per key) or \"append\"".to_string());
        }
        let Some(source) = shape.sources.get(q.source_index) else { continue };
        let key = match &q.kind {
            QueryKind::Stateless => continue,
            QueryKind::Aggregate | QueryKind::Anomaly(_) => q.group_by.clone(),
            QueryKind::Apply(a) => a.primary_key.clone(),
            QueryKind::Join(j) => {
                let Some(right) = shape.sources.get(j.source_index) else { continue };
                let (left_on, right_on) = (names(source, &j.left_keys), names(right, &j.right_keys));
                for (side, on) in [(q.source_index, &left_on), (j.source_index, &right_on)] {
                    match &joined_on[side] {
                        Some(other) if other != on => report(format!(
                            "joins \"{}\" on [{}], but another join uses [{}]: a [scale] pipeline partitions each source one way; join it on the same fields everywhere",
                            shape.sources[side].name,
                            on.join(", "),
                            other.join(", ")
                        )),
                        _ => joined_on[side] = Some(on.clone()),
                    }
                }
                // The two topics are partitioned alike when each side's message key is made of
                // join-key fields paired with each other; otherwise both are repartitioned.
                let paired = !source.key.is_empty()
                    && source.key.len() == right.key.len()
                    && source
                        .key
                        .iter()
                        .zip(&right.key)
                        .all(|(l, r)| left_on.iter().position(|f| f == l).is_some_and(|i| &right_on[i] == r));
                if !paired {
                    repartition[q.source_index] = true;
                    repartition[j.source_index] = true;
                }
                join_sides.push((q.source_index, j.source_index));
                continue;
            }
        };
        if source.key.is_empty() || source.key.iter().any(|k| !key.contains(k)) {
            repartition[q.source_index] = true;
        }
        keyed_by[q.source_index].push(key);
    }
    // Both sides of a join are partitioned by the same rule: one repartitioned, both are.
    while let Some(&(l, r)) = join_sides.iter().find(|(l, r)| repartition[*l] != repartition[*r]) {
        repartition[l] = true;
        repartition[r] = true;
    }
    let mut plans = Vec::new();
    for (si, source) in shape.sources.iter().enumerate().filter(|(si, s)| repartition[*si] && s.files.is_none()) {
        let key: Vec<String> = match &joined_on[si] {
            Some(on) => {
                if let Some(other) = keyed_by[si].iter().find(|k| on.iter().any(|f| !k.contains(f))) {
                    at(format!(
                        "\"{}\" is joined on [{}] but also keeps state by [{}]: a [scale] pipeline partitions each source one way, by fields every stateful query on it keeps state by",
                        source.name,
                        on.join(", "),
                        other.join(", ")
                    ));
                }
                on.clone()
            }
            None => {
                let first = keyed_by[si].first().cloned().unwrap_or_default();
                first.into_iter().filter(|f| keyed_by[si].iter().all(|k| k.contains(f))).collect()
            }
        };
        if key.is_empty() {
            let keys: Vec<String> = keyed_by[si].iter().map(|k| format!("[{}]", k.join(", "))).collect();
            at(format!(
                "the queries on \"{}\" keep state by {} with no field in common: a [scale] pipeline partitions each source by fields every stateful query on it keeps state by. Split the pipeline",
                source.name,
                keys.join(" and ")
            ));
            continue;
        }
        let topic_name: String = source
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
            .collect();
        plans.push(Repartition {
            source: si,
            topic: format!("{pipeline}-repartition-{topic_name}"),
            key: key.iter().filter_map(|f| source.field_index(f)).collect(),
        });
    }
    ScaleConfig {
        changelog_topic: raw.changelog_topic.unwrap_or_else(|| format!("{pipeline}-changelog")),
        changelog_replication: raw.changelog_replication,
        session_timeout: raw.session_timeout,
        standby: raw.standby,
        repartition: plans,
    }
}

/// What a query writes into its sink.
struct QueryOutput {
    query: String,
    /// Output column names in order (window columns, keys, aggregates, derived).
    columns: Vec<String>,
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
/// correctly. Several queries can share one source instead. File sources have no topic.
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

fn compile_source(
    s: RawSource,
    sinks: &Names,
    query_sinks: &HashMap<usize, QueryOutput>,
    dead_letter_sinks: &mut HashSet<usize>,
    diag: &Diagnostics,
) -> SourceConfig {
    let source_name = display_name(s.name.as_ref());
    for on_error in &s.on_error {
        let subject = format!("source \"{source_name}\" sends dead letters to");
        if let Some(index) = sinks.resolve(diag, on_error, &subject, "sink", "sinks") {
            dead_letter_sinks.insert(index);
            if let Some(output) = query_sinks.get(&index) {
                diag.report(
                    on_error.path.clone(),
                    on_error.line,
                    format!(
                        "sink \"{}\" already receives the results of query \"{}\" and cannot also take dead letters; add a separate sink for them",
                        on_error.value, output.query
                    ),
                );
            }
        }
    }
    let key: Vec<String> = s
        .key
        .into_iter()
        .filter(|k| {
            let known = s.schema.as_ref().is_none_or(|schema| schema.iter().any(|f| f.name == k.value));
            if !known {
                diag.report(
                    k.path.clone(),
                    k.line,
                    format!(
                        "key field \"{}\" of source \"{source_name}\" is not in its schema; name the schema fields the messages are keyed by",
                        k.value
                    ),
                );
            }
            known
        })
        .map(|k| k.value)
        .collect();
    SourceConfig {
        name: s.name.map(|n| n.value).unwrap_or_default(),
        topic: s.topic.map(|t| t.value).unwrap_or_default(),
        files: s.files,
        partitions: s.partitions,
        format: s.format,
        schema: s.schema.unwrap_or_default(),
        event_time: EventTimeConfig {
            field: s.event_time_field.unwrap_or_default(),
            format: s.event_time_format,
        },
        watermark: s.watermark,
        starting_offsets: s.starting_offsets,
        on_error: s.on_error.into_iter().map(|e| e.value).collect(),
        on_gap: s.on_gap,
        key,
        repartitioned: None,
    }
}

/// What queries may refer to.
struct Refs<'a> {
    raw_sources: &'a [RawSource],
    sources: &'a Names,
    sinks: &'a Names,
}

/// An output column of a query; `ty` is `None` when it could not be worked out (the reason
/// has been reported), so expressions reading it are not checked.
struct Column {
    name: String,
    ty: Option<FieldType>,
}

fn compile_query(q: RawQuery, refs: &Refs<'_>, query_sinks: &mut HashMap<usize, QueryOutput>, warnings: &mut Vec<String>, diag: &Diagnostics) -> QueryConfig {
    let query_name = display_name(q.name.as_ref());
    let source_index = q.from.as_ref().and_then(|from| {
        let subject = format!("query \"{query_name}\" reads from");
        refs.sources.resolve(diag, from, &subject, "source", "sources")
    });
    // Field checks need the source's schema; skip them when it is unknown
    // (the reason has been reported already).
    let source = source_index.and_then(|i| {
        let s = &refs.raw_sources[i];
        Some((display_name(s.name.as_ref()), s.schema.as_deref()?))
    });
    let schema_columns: Option<Vec<Column>> = source.as_ref().map(|(_, schema)| columns_of(schema));
    let expressions = Expressions { query: &query_name, diag };

    let filter = match (&q.filter, &schema_columns) {
        (Some(filter), Some(columns)) => Some(expressions.check(filter, "where", columns, true)),
        (Some(filter), None) => Some(Sql::unusable(&filter.value)),
        (None, _) => None,
    };
    let key_fields = match &source {
        Some((source_name, schema)) => check_group_by(&q.group_by, source_name, schema, diag),
        None => Vec::new(),
    };
    let shape = check_query_shape(&q, &query_name, diag);
    if let (Some(from), Some(i)) = (&q.from, source_index) {
        check_change_events(&query_name, from, &refs.raw_sources[i], shape == Shape::Apply, diag);
    }
    let raw_aggregates = q.aggregates.as_deref().unwrap_or_default();
    let aggregates: Vec<AggregateConfig> = raw_aggregates
        .iter()
        .map(|a| compile_aggregate(a, source.as_ref().map(|(n, s)| (n.as_str(), *s)), schema_columns.as_deref(), &expressions, diag))
        .collect();

    // Output columns in row order; derived expressions see the ones before them.
    let window = q.window.as_ref().and_then(|w| w.config);
    let mut kind = QueryKind::Aggregate;
    let mut select = Vec::new();
    let mut columns: Vec<Column> = Vec::new();
    let mut derive = Vec::new();
    match shape {
        Shape::Aggregate => {
            check_output_names(&q, diag);
            columns.extend(q.window.as_ref().map_or(&[][..], |w| w.columns).iter().map(|&name| window_column(name)));
            for key in &q.group_by {
                let ty = source
                    .as_ref()
                    .and_then(|(_, schema)| schema.iter().find(|d| d.name == key.value))
                    .map(|d| d.ty);
                columns.push(Column { name: key.value.clone(), ty });
            }
            for (raw, compiled) in raw_aggregates.iter().zip(&aggregates) {
                let Some(name) = &raw.name else { continue };
                let input = match (&compiled.expr, compiled.field_index) {
                    (Some(expr), _) => expr.is_usable().then(|| expr.expr.output_type()),
                    (None, Some(i)) => source.as_ref().map(|(_, schema)| schema[i].ty),
                    (None, None) => None,
                };
                let ty = match (&raw.func, input) {
                    (Some(func), Some(input)) => Some(agg_output_type(func.value, Some(input))),
                    (Some(func), None) if raw.field.is_none() && raw.expr.is_none() => Some(agg_output_type(func.value, None)),
                    _ => None,
                };
                columns.push(Column { name: name.value.clone(), ty });
            }
            for d in &q.derive {
                let expr = match (&d.name, &d.expr) {
                    (Some(name), Some(expr)) => expressions.check(expr, &format!("derived column \"{}\": expr", name.value), &columns, false),
                    (None, Some(expr)) => Sql::unusable(&expr.value),
                    (_, None) => Sql::unusable(""),
                };
                if let Some(name) = &d.name {
                    columns.push(Column {
                        name: name.value.clone(),
                        ty: expr.is_usable().then(|| expr.expr.output_type()),
                    });
                }
                derive.push(DerivedColumn {
                    name: d.name.as_ref().map(|n| n.value.clone()).unwrap_or_default(),
                    expr,
                });
            }
            if let Some((raw_window, window)) = q.window.as_ref().zip(window) {
                check_output_mode(&q, &query_name, raw_window, window, warnings, diag);
            }
        }
        Shape::Stateless => {
            kind = QueryKind::Stateless;
            if let Some((_, schema)) = &source {
                let mut input = columns_of(schema);
                input.extend(METADATA_COLUMNS.iter().map(|(name, ty)| Column {
                    name: name.to_string(),
                    ty: Some(*ty),
                }));
                select = match &q.select {
                    Some(raw) => compile_select(raw, &input, &expressions, diag),
                    None => schema
                        .iter()
                        .map(|d| DerivedColumn {
                            name: d.name.clone(),
                            expr: expressions.check(
                                &At {
                                    value: format!("\"{}\"", d.name.replace('"', "\"\"")),
                                    path: format!("{}.select", q.at.path),
                                    line: q.at.line,
                                },
                                "select",
                                &input,
                                false,
                            ),
                        })
                        .collect(),
                };
            }
            columns = select_columns(&select);
        }
        Shape::Join => {
            let raw = q.join.as_ref().expect("a join shape has a join table");
            if let Some((left_name, left_schema)) = &source {
                if let Some(join) = compile_join(raw, (left_name, left_schema), q.select.as_deref(), refs, &expressions, diag) {
                    if let (Some(right), Some(at)) = (refs.raw_sources.get(join.0.source_index), &raw.source) {
                        check_change_events(&query_name, at, right, false, diag);
                    }
                    select = join.1;
                    kind = QueryKind::Join(Box::new(join.0));
                }
            }
            columns = select_columns(&select);
        }
        Shape::Apply => {
            let raw = q.apply.as_ref().expect("an apply shape has an apply table");
            if let Some((source_name, schema)) = &source {
                if let Some(apply) = compile_apply(raw, &query_name, source_name, schema, diag) {
                    columns = apply
                        .key_fields
                        .iter()
                        .chain(&apply.value_fields)
                        .map(|&i| Column {
                            name: schema[i].name.clone(),
                            ty: Some(schema[i].ty),
                        })
                        .collect();
                    kind = QueryKind::Apply(apply);
                }
            }
        }
        Shape::Anomaly => {
            let raw = q.anomaly.as_ref().expect("an anomaly shape has an anomaly table");
            if let Some((source_name, schema)) = &source {
                if let Some(anomaly) = compile_anomaly(raw, &q, window, source_name, schema, diag) {
                    let event_time = refs.raw_sources[source_index.unwrap_or(0)].event_time_field.as_deref();
                    columns = anomaly_columns(&anomaly, &q.group_by, schema, event_time);
                    check_unique_columns(&query_name, &columns, &q.at, diag);
                    kind = QueryKind::Anomaly(anomaly);
                }
            }
        }
    }

    let column_names: Vec<String> = columns.into_iter().map(|c| c.name).collect();
    let sink_indexes: Vec<usize> = q
        .sink
        .iter()
        .flatten()
        .filter_map(|sink| {
            let subject = format!("query \"{query_name}\" writes to");
            let index = refs.sinks.resolve(diag, sink, &subject, "sink", "sinks")?;
            if let Some(first) = query_sinks.get(&index) {
                let message = if first.query == query_name {
                    format!("sink \"{}\" is listed twice; list each sink once", sink.value)
                } else {
                    format!(
                        "sink \"{}\" already receives the results of query \"{}\"; give each query its own sink",
                        sink.value, first.query
                    )
                };
                diag.report(sink.path.clone(), sink.line, message);
            } else {
                let output = QueryOutput {
                    query: query_name.clone(),
                    columns: column_names.clone(),
                };
                query_sinks.insert(index, output);
            }
            Some(index)
        })
        .collect();

    QueryConfig {
        name: q.name.map(|n| n.value).unwrap_or_default(),
        from: q.from.map(|f| f.value).unwrap_or_default(),
        source_index: source_index.unwrap_or(0),
        filter,
        kind,
        select,
        window: window.unwrap_or(WindowConfig::Tumbling {
            size: std::time::Duration::ZERO,
            offset: std::time::Duration::ZERO,
        }),
        group_by: q.group_by.into_iter().map(|g| g.value).collect(),
        key_fields,
        aggregates,
        derive,
        output: if shape == Shape::Apply {
            OutputMode::Update
        } else {
            q.output.map_or(OutputMode::Append, |o| o.value)
        },
        allowed_lateness: q.allowed_lateness,
        sinks: q.sink.into_iter().flatten().map(|s| s.value).collect(),
        sink_indexes,
    }
}

/// Columns a stateless query's `select` may read besides the schema fields: where each event
/// was read from (for a file source: the file name, -1, the byte offset of its line).
pub const METADATA_COLUMNS: [(&str, FieldType); 3] = [("_topic", FieldType::String), ("_partition", FieldType::Int), ("_offset", FieldType::Int)];

fn columns_of(schema: &[FieldDef]) -> Vec<Column> {
    schema
        .iter()
        .map(|d| Column {
            name: d.name.clone(),
            ty: Some(d.ty),
        })
        .collect()
}

fn select_columns(select: &[DerivedColumn]) -> Vec<Column> {
    select
        .iter()
        .map(|s| Column {
            name: s.name.clone(),
            ty: s.expr.is_usable().then(|| s.expr.expr.output_type()),
        })
        .collect()
}

/// What a query computes, from the keys it has; reports the keys that do not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Aggregate,
    Stateless,
    Join,
    Anomaly,
    Apply,
}

fn check_query_shape(q: &RawQuery, query_name: &str, diag: &Diagnostics) -> Shape {
    let shape = if q.apply.is_some() {
        Shape::Apply
    } else if q.join.is_some() {
        Shape::Join
    } else if q.anomaly.is_some() {
        Shape::Anomaly
    } else if q.window_written {
        Shape::Aggregate
    } else {
        Shape::Stateless
    };
    let report = |key: &str, message: String| diag.report(format!("{}.{key}", q.at.path), q.at.line, format!("query \"{query_name}\": {message}"));
    let what = match shape {
        Shape::Aggregate => "a windowed aggregation",
        Shape::Stateless => "a stateless query (no window)",
        Shape::Join => "a join",
        Shape::Anomaly => "an anomaly detector",
        Shape::Apply => "a change-applying query (apply)",
    };
    let forbid = |written: bool, key: &str, instead: &str| {
        if written {
            report(key, format!("{what} has no {key}; {instead}"));
        }
    };
    match shape {
        Shape::Aggregate => {
            if q.aggregates.is_none() {
                report(
                    "aggregates",
                    "missing required key \"aggregates\"; a windowed query needs them, e.g. aggregates = [{ name = \"events\", fn = \"count\" }] (or remove window for a stateless query)".to_string(),
                );
            }
            forbid(q.select.is_some(), "select", "its columns are the window's, group_by, aggregates and derive");
        }
        Shape::Stateless => {
            let instead = "add a window to aggregate, or remove it to pass events through with select";
            forbid(q.aggregates.is_some(), "aggregates", instead);
            forbid(!q.group_by.is_empty(), "group_by", instead);
            forbid(!q.derive.is_empty(), "derive", "compute columns in select = [{ name, expr }]");
        }
        Shape::Join => {
            forbid(q.window_written, "window", "its time bounds are join.between");
            forbid(q.anomaly.is_some(), "anomaly", "detect anomalies in a query of its own");
            forbid(q.aggregates.is_some(), "aggregates", "aggregate the joined rows in a query reading their table");
            forbid(!q.group_by.is_empty(), "group_by", "its keys are join.on");
            forbid(!q.derive.is_empty(), "derive", "compute columns in select = [{ name, expr }]");
            if q.select.is_none() {
                report(
                    "select",
                    "missing required key \"select\"; a join names its output columns, e.g. select = [{ name = \"user_id\", expr = \"c.user_id\" }]"
                        .to_string(),
                );
            }
        }
        Shape::Anomaly => {
            if !q.window_written {
                report(
                    "window",
                    "missing required key \"window\"; an anomaly detector needs the window of its statistics, e.g. window = { sliding = \"15m\", slide = \"1m\" }".to_string(),
                );
            }
            forbid(
                q.aggregates.is_some(),
                "aggregates",
                "its statistics are fixed (mean, standard deviation, count)",
            );
            forbid(q.select.is_some(), "select", "its columns are fixed");
            forbid(!q.derive.is_empty(), "derive", "its columns are fixed");
        }
        Shape::Apply => {
            let columns = "its columns are the source's schema fields, the primary key first";
            forbid(q.window_written, "window", "it keeps the latest row per primary key");
            forbid(q.join.is_some(), "join", "join the table's rows in a query of their own");
            forbid(q.anomaly.is_some(), "anomaly", "detect anomalies in a query of its own");
            forbid(q.aggregates.is_some(), "aggregates", columns);
            forbid(!q.group_by.is_empty(), "group_by", "its key is apply.primary_key");
            forbid(q.select.is_some(), "select", columns);
            forbid(!q.derive.is_empty(), "derive", columns);
            if q.filter.is_some() {
                report(
                    "where",
                    format!("{what} applies every change of its source (a filter would keep rows whose later changes it drops); remove where"),
                );
            }
            if let Some(output) = q.output.as_ref().filter(|o| o.value != OutputMode::Update) {
                diag.report(
                    output.path.clone(),
                    output.line,
                    format!("query \"{query_name}\": {what} upserts and deletes rows by primary key; remove output (or set output = \"update\")"),
                );
            }
        }
    }
    if !matches!(shape, Shape::Aggregate | Shape::Apply) {
        if let Some(output) = q.output.as_ref().filter(|o| o.value != OutputMode::Append) {
            diag.report(
                output.path.clone(),
                output.line,
                format!("query \"{query_name}\": {what} appends its rows; remove output (or set output = \"append\")"),
            );
        }
    }
    if shape != Shape::Aggregate && !q.allowed_lateness.is_zero() {
        report(
            "allowed_lateness",
            format!("{what} takes no allowed_lateness; raise the source's watermark.delay to accept later events"),
        );
    }
    shape
}

/// Debezium change events are read only by `apply` queries, and `apply` reads only them.
fn check_change_events(query_name: &str, from: &At<String>, source: &RawSource, apply: bool, diag: &Diagnostics) {
    let debezium = matches!(source.format, Format::Debezium(_));
    let problem = match (apply, debezium) {
        (true, false) => format!(
            "query \"{query_name}\" applies change events, but source \"{}\" has format = \"json\"; set format = \"debezium\" on the source, or remove apply",
            from.value
        ),
        (false, true) => format!(
            "source \"{}\" carries Debezium change events (format = \"debezium\"), which only a query with apply = {{ primary_key = [...] }} reads; \
             apply them to a table and query that table, or read a JSON source",
            from.value
        ),
        _ => return,
    };
    diag.report(from.path.clone(), from.line, problem);
}

/// `apply = { primary_key = [...] }`: the key fields (in the schema, not float) and the rest.
fn compile_apply(raw: &RawApply, query_name: &str, source_name: &str, schema: &[FieldDef], diag: &Diagnostics) -> Option<ApplyConfig> {
    let mut key_fields = Vec::with_capacity(raw.primary_key.len());
    for key in &raw.primary_key {
        let index = find_field(key, "primary_key field", source_name, schema, diag)?;
        if schema[index].ty == FieldType::Float {
            diag.report(
                key.path.clone(),
                key.line,
                format!(
                    "query \"{query_name}\": primary_key field \"{}\" is a float, which does not identify a row reliably; use string, int, bool or timestamp fields",
                    key.value
                ),
            );
            return None;
        }
        if !key_fields.contains(&index) {
            key_fields.push(index);
        }
    }
    if key_fields.is_empty() {
        return None; // reported by the reader
    }
    let value_fields = (0..schema.len()).filter(|i| !key_fields.contains(i)).collect();
    Some(ApplyConfig {
        primary_key: raw.primary_key.iter().map(|k| k.value.clone()).collect(),
        key_fields,
        value_fields,
    })
}

/// `select = [{ name, expr }]` over `input`, with unique names.
fn compile_select(raw: &[RawDerived], input: &[Column], expressions: &Expressions<'_>, diag: &Diagnostics) -> Vec<DerivedColumn> {
    let mut out: Vec<DerivedColumn> = Vec::with_capacity(raw.len());
    for s in raw {
        let expr = match (&s.name, &s.expr) {
            (Some(name), Some(expr)) => expressions.check(expr, &format!("select \"{}\": expr", name.value), input, false),
            (None, Some(expr)) => Sql::unusable(&expr.value),
            (_, None) => Sql::unusable(""),
        };
        if let Some(name) = &s.name {
            if out.iter().any(|c| c.name == name.value) {
                diag.report(
                    name.path.clone(),
                    name.line,
                    format!("select column name \"{}\" is used twice; output column names must be unique", name.value),
                );
            }
        }
        out.push(DerivedColumn {
            name: s.name.as_ref().map(|n| n.value.clone()).unwrap_or_default(),
            expr,
        });
    }
    out
}

fn compile_aggregate(
    a: &RawAggregate,
    source: Option<(&str, &[FieldDef])>,
    schema_columns: Option<&[Column]>,
    expressions: &Expressions<'_>,
    diag: &Diagnostics,
) -> AggregateConfig {
    let name = a.name.as_ref().map_or_else(|| "(unnamed)".to_string(), |n| n.value.clone());
    let field_index = match (source, &a.field) {
        (Some((source_name, schema)), Some(field)) => find_field(field, "aggregate field", source_name, schema, diag),
        _ => None,
    };
    let expr = a.expr.as_ref().map(|text| match schema_columns {
        Some(columns) => expressions.check(text, &format!("aggregate \"{name}\": expr"), columns, false),
        None => Sql::unusable(&text.value),
    });
    if let (Some(field), Some(_)) = (&a.field, &a.expr) {
        diag.report(
            field.path.clone(),
            field.line,
            format!(
                "aggregate \"{name}\" has both field and expr; keep one (expr = \"{}\" computes the input from any fields)",
                field.value
            ),
        );
    }
    if let (Some(func), Some((_, schema))) = (&a.func, source) {
        let input = match (&expr, field_index) {
            (Some(e), _) => e.is_usable().then(|| (e.expr.output_type(), a.expr.as_ref().expect("expr written"))),
            (None, Some(i)) => Some((schema[i].ty, a.field.as_ref().expect("field written"))),
            (None, None) => None,
        };
        let written = a.field.is_some() || a.expr.is_some();
        check_aggregate_input(a.at.path.as_str(), a.at.line, func, written, input, diag);
    }
    let filter = a.filter.as_ref().map(|filter| match schema_columns {
        Some(columns) => expressions.check(filter, &format!("aggregate \"{name}\": filter"), columns, true),
        None => Sql::unusable(&filter.value),
    });
    AggregateConfig {
        name: a.name.as_ref().map(|n| n.value.clone()).unwrap_or_default(),
        func: a.func.as_ref().map_or(AggFn::Count, |f| f.value),
        field: a.field.as_ref().map(|f| f.value.clone()),
        field_index,
        expr,
        filter,
        percentile: a.percentile,
    }
}

/// The join table: the right source, keys, interval, aliases and the `select` over both
/// sides (compiled against the columns the sides carry).
fn compile_join(
    raw: &RawJoin,
    (left_name, left_schema): (&str, &[FieldDef]),
    select: Option<&[RawDerived]>,
    refs: &Refs<'_>,
    expressions: &Expressions<'_>,
    diag: &Diagnostics,
) -> Option<(JoinConfig, Vec<DerivedColumn>)> {
    let right_ref = raw.source.as_ref()?;
    let right_index = refs
        .sources
        .resolve(diag, right_ref, &format!("query \"{}\" joins", expressions.query), "source", "sources")?;
    let right = &refs.raw_sources[right_index];
    let right_name = display_name(right.name.as_ref());
    let right_schema = right.schema.as_deref()?;
    let left_as = raw.left_as.as_ref().map_or(left_name.to_string(), |a| a.value.clone());
    let right_as = raw.right_as.as_ref().map_or(right_name.clone(), |a| a.value.clone());
    if left_as == right_as {
        diag.report(
            raw.at.path.clone(),
            raw.at.line,
            format!(
                "query \"{}\": both sides of the join are called \"{left_as}\"; name them apart with left_as = \"l\" and right_as = \"r\"",
                expressions.query
            ),
        );
        return None;
    }
    if raw.on.is_empty() {
        diag.report(
            format!("{}.on", raw.at.path),
            raw.at.line,
            format!("query \"{}\": a join needs at least one key field, e.g. on = [\"user_id\"]", expressions.query),
        );
    }
    let right_on = raw.right_on.as_ref().unwrap_or(&raw.on);
    if right_on.len() != raw.on.len() {
        diag.report(
            format!("{}.right_on", raw.at.path),
            raw.at.line,
            format!(
                "query \"{}\": on names {} key fields and right_on {}; name the right side's field for each of on's, in order",
                expressions.query,
                raw.on.len(),
                right_on.len()
            ),
        );
    }
    let mut left_keys = Vec::new();
    let mut right_keys = Vec::new();
    for (l, r) in raw.on.iter().zip(right_on) {
        let li = find_field(l, "join key field", left_name, left_schema, diag);
        let ri = find_field(r, "join key field", &right_name, right_schema, diag);
        if let (Some(li), Some(ri)) = (li, ri) {
            let (lt, rt) = (left_schema[li].ty, right_schema[ri].ty);
            if lt != rt || lt == FieldType::Float {
                diag.report(
                    r.path.clone(),
                    r.line,
                    format!(
                        "query \"{}\": join key \"{}\" is {} on the left and \"{}\" is {} on the right; join on fields of one type, not float",
                        expressions.query,
                        l.value,
                        lt.as_str(),
                        r.value,
                        rt.as_str()
                    ),
                );
            }
            left_keys.push(li);
            right_keys.push(ri);
        }
    }
    let right_filter = raw.filter.as_ref().map(|f| expressions.check(f, "join.where", &columns_of(right_schema), true));
    let qualified = |alias: &str, schema: &[FieldDef]| -> Vec<Column> {
        schema
            .iter()
            .map(|d| Column {
                name: format!("{alias}.{}", d.name),
                ty: Some(d.ty),
            })
            .collect()
    };
    let mut combined = qualified(&left_as, left_schema);
    combined.extend(qualified(&right_as, right_schema));
    let full = compile_select(select.unwrap_or_default(), &combined, expressions, diag);
    // Each side carries only the fields the select reads; compile again over those.
    let mut read: Vec<usize> = full.iter().flat_map(|c| c.expr.expr.columns()).collect();
    read.sort_unstable();
    read.dedup();
    let left_fields: Vec<usize> = read.iter().copied().filter(|&i| i < left_schema.len()).collect();
    let right_fields: Vec<usize> = read.iter().filter(|&&i| i >= left_schema.len()).map(|&i| i - left_schema.len()).collect();
    let carried: Vec<Column> = read
        .iter()
        .map(|&i| Column {
            name: combined[i].name.clone(),
            ty: combined[i].ty,
        })
        .collect();
    let typed: Vec<(&str, FieldType)> = carried.iter().filter_map(|c| Some((c.name.as_str(), c.ty?))).collect();
    let select = full
        .into_iter()
        .map(|c| {
            let expr = if c.expr.is_usable() {
                Expr::compile(c.expr.text(), &typed).map_or_else(|_| Sql::unusable(c.expr.text()), Sql::checked)
            } else {
                c.expr
            };
            DerivedColumn { name: c.name, expr }
        })
        .collect();
    let (lower, upper) = raw.between?;
    Some((
        JoinConfig {
            source: right_name,
            source_index: right_index,
            join_type: raw.join_type,
            left_keys,
            right_keys,
            lower,
            upper,
            left_as,
            right_as,
            right_filter,
            left_fields,
            right_fields,
        },
        select,
    ))
}

/// The anomaly table over the query's sliding window.
fn compile_anomaly(
    raw: &RawAnomaly,
    q: &RawQuery,
    window: Option<WindowConfig>,
    source_name: &str,
    schema: &[FieldDef],
    diag: &Diagnostics,
) -> Option<AnomalyConfig> {
    let query = display_name(q.name.as_ref());
    let field = raw.field.as_ref()?;
    let field_index = find_field(field, "anomaly field", source_name, schema, diag)?;
    if !matches!(schema[field_index].ty, FieldType::Int | FieldType::Float) {
        diag.report(
            field.path.clone(),
            field.line,
            format!(
                "query \"{query}\": anomaly field \"{}\" is {}; readings must be an int or float field",
                field.value,
                schema[field_index].ty.as_str()
            ),
        );
    }
    let window_ok = match window? {
        WindowConfig::Sliding { size, slide, offset } => offset.is_zero() && size.as_micros() % slide.as_micros() == 0,
        WindowConfig::Tumbling { offset, .. } => offset.is_zero(),
        _ => false,
    };
    if !window_ok {
        let at = q.window.as_ref().expect("a window was compiled");
        diag.report(
            at.path.clone(),
            at.line,
            format!(
                "query \"{query}\": an anomaly detector's statistics need a sliding window whose size is a multiple of its slide, without offset, e.g. window = {{ sliding = \"15m\", slide = \"1m\" }} (or a tumbling one)"
            ),
        );
        return None;
    }
    if q.group_by.iter().any(|g| g.value == field.value) {
        diag.report(
            field.path.clone(),
            field.line,
            format!(
                "query \"{query}\": the anomaly field \"{}\" is also a group_by field; group by the series' identifiers, not its readings",
                field.value
            ),
        );
    }
    Some(AnomalyConfig {
        field: field.value.clone(),
        field_index,
        threshold: raw.threshold,
        min_count: raw.min_count,
        judge: raw.judge,
    })
}

/// Output columns of an anomaly detector, in row order.
fn anomaly_columns(a: &AnomalyConfig, group_by: &[At<String>], schema: &[FieldDef], event_time: Option<&str>) -> Vec<Column> {
    let mut columns = Vec::new();
    let col = |name: &str, ty: FieldType| Column {
        name: name.to_string(),
        ty: Some(ty),
    };
    if a.judge == AnomalyJudge::Containing {
        columns.push(col("window_start", FieldType::Timestamp));
        columns.push(col("window_end", FieldType::Timestamp));
    }
    for g in group_by {
        columns.push(Column {
            name: g.value.clone(),
            ty: schema.iter().find(|d| d.name == g.value).map(|d| d.ty),
        });
    }
    columns.push(col(&a.field, FieldType::Float));
    columns.push(col(event_time.unwrap_or("timestamp"), FieldType::Timestamp));
    for name in ANOMALY_STAT_COLUMNS {
        columns.push(col(name, FieldType::Float));
    }
    columns
}

/// The statistics columns of an anomaly detector's rows.
pub const ANOMALY_STAT_COLUMNS: [&str; 3] = ["expected_value", "expected_stddev", "z_score"];

fn check_unique_columns(query: &str, columns: &[Column], at: &At<()>, diag: &Diagnostics) {
    for (i, c) in columns.iter().enumerate() {
        if columns[..i].iter().any(|d| d.name == c.name) {
            diag.report(
                at.path.clone(),
                at.line,
                format!(
                    "query \"{query}\": output column \"{}\" appears twice; rename the source field or group by another one",
                    c.name
                ),
            );
        }
    }
}

/// Name and type of a window column (see [`WindowConfig::columns`]).
fn window_column(name: &str) -> Column {
    let ty = if name == "duration" { FieldType::Float } else { FieldType::Timestamp };
    Column {
        name: name.to_string(),
        ty: Some(ty),
    }
}

/// Type of an aggregate's output column, given the type of its input field.
pub(crate) fn agg_output_type(func: AggFn, input: Option<FieldType>) -> FieldType {
    match func {
        AggFn::Count | AggFn::CountDistinct | AggFn::ApproxCountDistinct => FieldType::Int,
        AggFn::Avg | AggFn::VarSamp | AggFn::VarPop | AggFn::StddevSamp | AggFn::StddevPop | AggFn::ApproxPercentile => FieldType::Float,
        AggFn::Sum if input == Some(FieldType::Float) => FieldType::Float,
        AggFn::Sum => FieldType::Int,
        AggFn::Min | AggFn::Max | AggFn::First | AggFn::Last => input.unwrap_or(FieldType::Int),
    }
}

/// `append` needs windows that close; `complete` with windows that close keeps them all.
fn check_output_mode(q: &RawQuery, query_name: &str, at: &RawWindow, window: WindowConfig, warnings: &mut Vec<String>, diag: &Diagnostics) {
    if !q.output_valid {
        return; // reported
    }
    match (q.output_mode(), window.closes()) {
        (OutputMode::Append, false) => {
            let (path, line, default) = match &q.output {
                Some(output) => (output.path.clone(), output.line, ""),
                None => (at.path.clone(), at.line, " (the default)"),
            };
            diag.report(
                path,
                line,
                format!(
                    "query \"{query_name}\": a global window without reset never closes, so output = \"append\"{default} would never write a row; \
                     set output = \"update\" or \"complete\", or add reset = \"day\" (or hour, week, month, year)"
                ),
            );
        }
        (OutputMode::Update, false) if q.group_by.is_empty() => {
            let output = q.output.as_ref().expect("update is written");
            diag.report(
                output.path.clone(),
                output.line,
                format!(
                    "query \"{query_name}\": a global window without reset and without group_by has one row and no column to upsert it on, \
                     so output = \"update\" cannot write it; use output = \"complete\" (the row is replaced each epoch it changes), or add group_by"
                ),
            );
        }
        (OutputMode::Complete, true) if matches!(window, WindowConfig::Sliding { .. }) => {
            let output = q.output.as_ref().expect("complete is written");
            diag.report(
                output.path.clone(),
                output.line,
                format!(
                    "query \"{query_name}\": output = \"complete\" is not supported with sliding windows (a closed window would change when \
                     its panes take later events for the windows still open); use output = \"update\": the table holds the same rows, upserted"
                ),
            );
        }
        (OutputMode::Complete, true) => {
            let output = q.output.as_ref().expect("complete is written");
            let warning = ConfigError {
                path: output.path.clone(),
                line: output.line,
                message: format!(
                    "query \"{query_name}\": output = \"complete\" keeps and rewrites every window ever seen; the table grows without bound — \
                     use update, or global without reset"
                ),
            };
            warnings.push(warning.to_string());
        }
        _ => {}
    }
}

/// Checks the SQL expressions of one query and reports their problems.
struct Expressions<'a> {
    query: &'a str,
    diag: &'a Diagnostics,
}

impl Expressions<'_> {
    /// Type-checks `text` (written as `key = "text"`) against `columns`; a condition must be
    /// boolean. Returns the compiled expression, or an unusable one when it is broken (reported)
    /// or reads a column whose type is unknown (not reported again: that column's own error
    /// says why).
    fn check(&self, text: &At<String>, key: &str, columns: &[Column], condition: bool) -> Sql {
        let typed: Vec<(&str, FieldType)> = columns.iter().filter_map(|c| Some((c.name.as_str(), c.ty?))).collect();
        let compiled = if condition {
            Expr::compile_predicate(&text.value, &typed)
        } else {
            Expr::compile(&text.value, &typed)
        };
        match compiled {
            Ok(expr) => Sql::checked(expr),
            Err(ExprError::UnknownColumn { name, .. }) if columns.iter().any(|c| c.ty.is_none() && c.name.eq_ignore_ascii_case(&name)) => {
                Sql::unusable(&text.value)
            }
            Err(problem) => {
                self.diag.report(
                    text.path.clone(),
                    text.line,
                    format!("query \"{}\": {key} = \"{}\": {problem}", self.query, text.value),
                );
                Sql::unusable(&text.value)
            }
        }
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

/// Reports problems of `group_by`; returns the schema indexes of its fields.
fn check_group_by(group_by: &[At<String>], source_name: &str, schema: &[FieldDef], diag: &Diagnostics) -> Vec<usize> {
    let mut indexes = Vec::with_capacity(group_by.len());
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
        indexes.push(index);
    }
    indexes
}

/// Which input field types an aggregate function takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InputTypes {
    /// int or float
    Numbers,
    /// int, float or timestamp
    Ordered,
    Any,
}

impl InputTypes {
    fn of(func: AggFn) -> InputTypes {
        match func {
            AggFn::Sum | AggFn::Avg | AggFn::VarSamp | AggFn::VarPop | AggFn::StddevSamp | AggFn::StddevPop | AggFn::ApproxPercentile => InputTypes::Numbers,
            AggFn::Min | AggFn::Max => InputTypes::Ordered,
            AggFn::Count | AggFn::CountDistinct | AggFn::ApproxCountDistinct | AggFn::First | AggFn::Last => InputTypes::Any,
        }
    }

    fn accepts(self, ty: FieldType) -> bool {
        match self {
            InputTypes::Numbers => matches!(ty, FieldType::Int | FieldType::Float),
            InputTypes::Ordered => matches!(ty, FieldType::Int | FieldType::Float | FieldType::Timestamp),
            InputTypes::Any => true,
        }
    }

    /// "an int or float" (field)
    fn describe(self) -> &'static str {
        match self {
            InputTypes::Numbers => "an int or float",
            InputTypes::Ordered => "an int, float or timestamp",
            InputTypes::Any => "a",
        }
    }
}

/// The input of an aggregate: `input` is its type and where it is written (field or expr)
/// when known; `written` whether either is.
fn check_aggregate_input(path: &str, line: Option<usize>, func: &At<AggFn>, written: bool, input: Option<(FieldType, &At<String>)>, diag: &Diagnostics) {
    let name = func.value.as_str();
    if func.value == AggFn::Count {
        return; // any type may be counted, and the input is optional
    }
    let inputs = InputTypes::of(func.value);
    if !written {
        let placeholder = match inputs {
            InputTypes::Numbers => "<int or float field>",
            InputTypes::Ordered => "<int, float or timestamp field>",
            InputTypes::Any => "<field>",
        };
        diag.report(
            format!("{path}.field"),
            line,
            format!("fn \"{name}\" needs a field; add field = \"{placeholder}\" (or expr = \"<SQL expression>\")"),
        );
        return;
    }
    let Some((ty, at)) = input else { return };
    if !inputs.accepts(ty) {
        let hint = if inputs == InputTypes::Ordered && ty == FieldType::String {
            "; for strings use fn = \"first\" or \"last\""
        } else {
            ""
        };
        let what = if at.path.ends_with(".expr") { "expression" } else { "field" };
        diag.report(
            at.path.clone(),
            at.line,
            format!(
                "fn \"{name}\" needs {} {what}, but \"{}\" is {}{hint}",
                inputs.describe(),
                at.value,
                ty.as_str()
            ),
        );
    }
}

/// Output column names must be unique: window columns, keys, aggregates, derived columns.
fn check_output_names(q: &RawQuery, diag: &Diagnostics) {
    let window_columns = q.window.as_ref().map_or(&[][..], |w| w.columns);
    let window_clash = |name: &str| window_columns.contains(&name).then(|| format!("the window column \"{name}\""));
    for key in &q.group_by {
        if let Some(clash) = window_clash(&key.value) {
            diag.report(
                key.path.clone(),
                key.line,
                format!("group_by field \"{}\" clashes with {clash}; output column names must be unique", key.value),
            );
        }
    }
    // A value column clashing with a window column or a group key.
    let leading_clash =
        |name: &str| window_clash(name).or_else(|| q.group_by.iter().any(|k| k.value == name).then(|| format!("the group_by field \"{name}\"")));
    let aggregate_names: Vec<&At<String>> = q.aggregates.iter().flatten().filter_map(|a| a.name.as_ref()).collect();
    for (i, name) in aggregate_names.iter().enumerate() {
        let clash = leading_clash(&name.value).or_else(|| {
            aggregate_names[..i]
                .iter()
                .find(|n| n.value == name.value)
                .map(|n| format!("another aggregate ({})", n.path.trim_end_matches(".name")))
        });
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
    let derived_names: Vec<&At<String>> = q.derive.iter().filter_map(|d| d.name.as_ref()).collect();
    for (i, name) in derived_names.iter().enumerate() {
        let clash = leading_clash(&name.value)
            .or_else(|| {
                aggregate_names
                    .iter()
                    .find(|n| n.value == name.value)
                    .map(|n| format!("the aggregate {}", n.path.trim_end_matches(".name")))
            })
            .or_else(|| {
                derived_names[..i]
                    .iter()
                    .find(|n| n.value == name.value)
                    .map(|n| format!("another derived column ({})", n.path.trim_end_matches(".name")))
            });
        if let Some(clash) = clash {
            diag.report(
                name.path.clone(),
                name.line,
                format!(
                    "derived column name \"{}\" clashes with {clash}; output column names must be unique, so pick another name",
                    name.value
                ),
            );
        }
    }
}

fn compile_sink(s: RawSink, fed_by_query: Option<&QueryOutput>, dead_letters: bool, diag: &Diagnostics) -> SinkConfig {
    let sink_name = display_name(s.name.as_ref());
    for column in &s.partition_by {
        if let Some(output) = fed_by_query {
            if !output.columns.contains(&column.value) {
                diag.report(
                    column.path.clone(),
                    column.line,
                    format!(
                        "sink \"{sink_name}\": partition_by column \"{}\" is not an output column of query \"{}\"; its columns: {}",
                        column.value,
                        output.query,
                        output.columns.join(", ")
                    ),
                );
            }
        } else if dead_letters && column.value != DEAD_LETTER_PARTITION_COLUMN {
            diag.report(
                column.path.clone(),
                column.line,
                format!(
                    "sink \"{sink_name}\" holds dead letters, which can be partitioned only by \"{DEAD_LETTER_PARTITION_COLUMN}\" (its columns: {})",
                    DEAD_LETTER_COLUMNS.join(", ")
                ),
            );
        }
    }
    let kafka = s.kafka.map(|k| {
        for column in &k.key {
            let known = match fed_by_query {
                Some(output) => output.columns.contains(&column.value),
                None => !dead_letters || DEAD_LETTER_COLUMNS.contains(&column.value.as_str()),
            };
            if !known {
                let columns = fed_by_query.map_or_else(|| DEAD_LETTER_COLUMNS.join(", "), |o| o.columns.join(", "));
                diag.report(
                    column.path.clone(),
                    column.line,
                    format!(
                        "sink \"{sink_name}\": key column \"{}\" is not a column of the rows it receives; its columns: {columns}",
                        column.value
                    ),
                );
            }
        }
        KafkaSinkConfig {
            topic: k.topic.unwrap_or_default(),
            key: k.key.into_iter().map(|c| c.value).collect(),
            bootstrap_servers: k.bootstrap_servers,
            options: k.options,
        }
    });
    SinkConfig {
        kafka,
        name: s.name.map(|n| n.value).unwrap_or_default(),
        kind: s.kind.unwrap_or(SinkKind::Delta),
        path: s.path.unwrap_or_default(),
        partition_by: s.partition_by.into_iter().map(|c| c.value).collect(),
        target_file_size_bytes: s.target_file_size_bytes,
        compact_every: s.compact_every,
        compact_min_files: s.compact_min_files,
        checkpoint_interval: s.checkpoint_interval,
        log_retention: s.log_retention,
        vacuum_retention: s.vacuum_retention,
    }
}

fn compile_generator(g: RawGenerator, source_names: &Names, sources: &[SourceConfig], diag: &Diagnostics) -> GeneratorConfig {
    let source_index = g
        .source
        .as_ref()
        .and_then(|source| source_names.resolve(diag, source, "the generator produces into", "source", "sources"));
    if let (Some(source), Some(index)) = (&g.source, source_index) {
        if sources[index].files.is_some() {
            diag.report(
                source.path.clone(),
                source.line,
                format!(
                    "the generator produces into a Kafka topic, but source \"{}\" reads files (kind = \"files\"); point it at a Kafka source",
                    source.value
                ),
            );
        }
    }
    if let (Some(source), Some(index)) = (&g.source, source_index) {
        let debezium = matches!(sources[index].format, Format::Debezium(_));
        let name = &source.value;
        let problem = match (g.orders.is_some(), debezium) {
            (true, false) => Some(format!(
                "family = \"orders\" produces Debezium change events, but source \"{name}\" has format = \"json\"; point it at a source with format = \"debezium\""
            )),
            (false, true) => Some(format!(
                "the click family produces JSON clicks, but source \"{name}\" has format = \"debezium\"; set family = \"orders\" or point it at a JSON source"
            )),
            _ => None,
        };
        if let Some(problem) = problem {
            diag.report(source.path.clone(), source.line, problem);
        }
    }
    let purchases = g.purchases.map(|p| {
        let index = p.source.as_ref().and_then(|source| {
            let index = source_names.resolve(diag, source, "the generator produces purchases into", "source", "sources")?;
            if sources[index].files.is_some() || Some(index) == source_index {
                diag.report(
                    source.path.clone(),
                    source.line,
                    format!(
                        "the generator produces purchases into a Kafka topic of their own, but source \"{}\" reads files or the clicks; point it at another Kafka source",
                        source.value
                    ),
                );
            }
            Some(index)
        });
        PurchasesConfig {
            source: p.source.map(|s| s.value).unwrap_or_default(),
            source_index: index.unwrap_or(0),
            rate: p.rate,
        }
    });
    GeneratorConfig {
        family: g.orders.map_or(GeneratorFamily::Click, GeneratorFamily::Orders),
        purchases,
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
