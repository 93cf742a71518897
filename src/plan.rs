//! The plan: a checked [`Config`] compiled once into what the engine runs. `validate` and
//! `run` build the same plan, so what `validate` accepts starts; no part of the engine
//! compiles an expression again or looks a name up at start-up.
//!
//! - routes: per source, the operators (and input ports) its events feed, with the compiled
//!   `where`, the key fields and what each record carries (aggregate inputs, a join side's
//!   fields, a reading, or the output row of a stateless query);
//! - per query, the operator it runs and its output shape (column names and types);
//! - the sinks: what feeds each, its Arrow schema, its txn application id;
//! - the state tables of the operators.

use crate::anomaly::{AnomalyMode, AnomalySpec};
use crate::apply::ApplySpec;
use crate::config::{AnomalyJudge, Config, FieldType, JoinType, QueryConfig, QueryKind, WindowConfig, ANOMALY_STAT_COLUMNS};
use crate::expr::Expr;
use crate::join::{JoinKind, JoinSpec, LEFT, RIGHT};
use crate::operator::{OperatorSpec, StateLayout};
use crate::sink::{plan_sinks, PlanError, SinkPlan, SinkRole};
use crate::window::{input_kind, InputKind, OutputShape};

/// What the engine runs, compiled from a configuration.
pub struct Plan {
    /// Per source (by index): the operator inputs its events feed, in query order.
    pub routes: Vec<Vec<Route>>,
    /// Per query (operator index): what its operator is.
    pub operators: Vec<OperatorSpec>,
    /// Per query (operator index).
    pub shapes: Vec<OutputShape>,
    pub sinks: Vec<SinkPlan>,
    /// Per query: index into `sinks` of the (first) sink it writes to; the committer copies
    /// its rows to the query's other sinks.
    pub query_sink: Vec<usize>,
    /// Per source: index into `sinks` of its (first) dead-letter sink, if any.
    pub source_dlq: Vec<Option<usize>>,
    pub layout: StateLayout,
}

/// Events of one source feeding one input port of one operator.
pub struct Route {
    pub operator: usize,
    pub port: usize,
    /// The query's `where` (for a join's right side, the join's `where`).
    pub filter: Option<Expr>,
    /// Schema indexes of the key fields (group or join key), in key order.
    pub key_fields: Vec<usize>,
    pub action: RouteAction,
}

/// What a record carries to its operator.
pub enum RouteAction {
    /// One input per aggregate.
    Aggregate(Vec<AggInput>),
    /// A stateless query's output columns, evaluated at the source and emitted there.
    Emit(Vec<Expr>),
    /// A join side's fields (schema indexes), encoded as one value list.
    Carry(Vec<usize>),
    /// An anomaly detector's reading: the schema index of its field.
    Reading(usize),
    /// A change event for an apply query: the schema indexes of the value columns (the row
    /// outside the primary key), carried with the op and the source position.
    Apply(Vec<usize>),
}

/// How one aggregate's input is read from an event.
pub struct AggInput {
    pub kind: InputKind,
    /// Schema index of the aggregate's field.
    pub field: Option<usize>,
    /// The aggregate's `expr`, read instead of a field.
    pub expr: Option<Expr>,
    pub filter: Option<Expr>,
}

impl Plan {
    /// Compiles a checked configuration. Fails only on what spans several parts of it (one
    /// sink fed twice).
    pub fn new(config: &Config) -> Result<Plan, PlanError> {
        let shapes: Vec<OutputShape> = config.queries.iter().map(|q| shape_of(q, config)).collect();
        let sinks = plan_sinks(config, &shapes)?;
        let query_sink = (0..config.queries.len())
            .map(|q| {
                sinks
                    .iter()
                    .position(|p| p.copy_from.is_none() && matches!(p.role, SinkRole::Windows { query, .. } if query == q))
                    .ok_or_else(|| PlanError::NoSink {
                        query: config.queries[q].name.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let source_dlq = config
            .sources
            .iter()
            .map(|s| s.on_error.first().and_then(|n| sinks.iter().position(|p| &p.name == n)))
            .collect();
        let mut routes: Vec<Vec<Route>> = config.sources.iter().map(|_| Vec::new()).collect();
        for (qi, q) in config.queries.iter().enumerate() {
            let filter = q.filter.as_ref().map(|f| f.expr.clone());
            match &q.kind {
                QueryKind::Aggregate => routes[q.source_index].push(Route {
                    operator: qi,
                    port: 0,
                    filter,
                    key_fields: q.key_fields.clone(),
                    action: RouteAction::Aggregate(
                        q.aggregates
                            .iter()
                            .map(|a| AggInput {
                                kind: input_kind(a),
                                field: a.field_index,
                                expr: a.expr.as_ref().map(|e| e.expr.clone()),
                                filter: a.filter.as_ref().map(|f| f.expr.clone()),
                            })
                            .collect(),
                    ),
                }),
                QueryKind::Stateless => routes[q.source_index].push(Route {
                    operator: qi,
                    port: 0,
                    filter,
                    key_fields: Vec::new(),
                    action: RouteAction::Emit(q.select.iter().map(|s| s.expr.expr.clone()).collect()),
                }),
                QueryKind::Join(j) => {
                    routes[q.source_index].push(Route {
                        operator: qi,
                        port: LEFT,
                        filter,
                        key_fields: j.left_keys.clone(),
                        action: RouteAction::Carry(j.left_fields.clone()),
                    });
                    routes[j.source_index].push(Route {
                        operator: qi,
                        port: RIGHT,
                        filter: j.right_filter.as_ref().map(|f| f.expr.clone()),
                        key_fields: j.right_keys.clone(),
                        action: RouteAction::Carry(j.right_fields.clone()),
                    });
                }
                QueryKind::Anomaly(a) => routes[q.source_index].push(Route {
                    operator: qi,
                    port: 0,
                    filter,
                    key_fields: q.key_fields.clone(),
                    action: RouteAction::Reading(a.field_index),
                }),
                QueryKind::Apply(a) => routes[q.source_index].push(Route {
                    operator: qi,
                    port: 0,
                    filter,
                    key_fields: a.key_fields.clone(),
                    action: RouteAction::Apply(a.value_fields.clone()),
                }),
            }
        }
        Ok(Plan {
            routes,
            operators: config.queries.iter().map(operator_spec).collect(),
            shapes,
            sinks,
            query_sink,
            source_dlq,
            layout: StateLayout::new(&config.queries),
        })
    }
}

fn operator_spec(q: &QueryConfig) -> OperatorSpec {
    match &q.kind {
        QueryKind::Aggregate => OperatorSpec::Window,
        QueryKind::Stateless => OperatorSpec::Stateless,
        QueryKind::Join(j) => OperatorSpec::Join(JoinSpec {
            kind: match j.join_type {
                JoinType::Inner => JoinKind::Inner,
                JoinType::Left => JoinKind::Left,
                JoinType::Right => JoinKind::Right,
                JoinType::Full => JoinKind::Full,
            },
            lower: j.lower,
            upper: j.upper,
            left_width: j.left_fields.len(),
            right_width: j.right_fields.len(),
            select: q.select.iter().map(|s| s.expr.expr.clone()).collect(),
        }),
        QueryKind::Anomaly(a) => {
            let (size, slide) = match q.window {
                WindowConfig::Sliding { size, slide, .. } => (size, slide),
                WindowConfig::Tumbling { size, .. } => (size, size),
                // The configuration compiler accepts only sliding and tumbling windows here.
                _ => (std::time::Duration::from_secs(60), std::time::Duration::from_secs(60)),
            };
            OperatorSpec::Anomaly(AnomalySpec {
                mode: match a.judge {
                    AnomalyJudge::Trailing => AnomalyMode::Trailing,
                    AnomalyJudge::Containing => AnomalyMode::Containing,
                },
                size: size.as_micros() as i64,
                slide: slide.as_micros() as i64,
                threshold: a.threshold,
                min_count: a.min_count,
            })
        }
        QueryKind::Apply(a) => OperatorSpec::Apply(ApplySpec {
            value_width: a.value_fields.len(),
        }),
    }
}

/// The output shape of a query: for an aggregation its aggregates and derived columns after
/// the window columns and keys; for the others every column, as values.
fn shape_of(q: &QueryConfig, config: &Config) -> OutputShape {
    let source = &config.sources[q.source_index];
    let columns: Vec<(String, FieldType)> = match &q.kind {
        QueryKind::Aggregate => return OutputShape::new(q, source),
        // The primary key is the rows' key; the other fields are their values.
        QueryKind::Apply(a) => {
            let mut shape = OutputShape::columns(a.value_fields.iter().map(|&i| (source.schema[i].name.clone(), source.schema[i].ty)).collect());
            shape.key_types = a.key_fields.iter().map(|&i| source.schema[i].ty).collect();
            return shape;
        }
        QueryKind::Stateless | QueryKind::Join(_) => q.select.iter().map(|s| (s.name.clone(), s.expr.expr.output_type())).collect(),
        QueryKind::Anomaly(a) => {
            let mut columns = Vec::new();
            if a.judge == AnomalyJudge::Containing {
                columns.push(("window_start".to_string(), FieldType::Timestamp));
                columns.push(("window_end".to_string(), FieldType::Timestamp));
            }
            columns.extend(q.key_fields.iter().map(|&i| (source.schema[i].name.clone(), source.schema[i].ty)));
            columns.push((a.field.clone(), FieldType::Float));
            columns.push((source.event_time.field.clone(), FieldType::Timestamp));
            columns.extend(ANOMALY_STAT_COLUMNS.iter().map(|c| (c.to_string(), FieldType::Float)));
            columns
        }
    };
    OutputShape::columns(columns)
}
