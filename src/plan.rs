//! The plan: a checked [`Config`] compiled once into what the engine runs. `validate` and
//! `run` build the same plan, so what `validate` accepts starts; no part of the engine
//! compiles an expression again or looks a name up at start-up.
//!
//! - routes: per source, the operators (and input ports) its events feed, with the compiled
//!   `where`, the group-key fields and each aggregate's input;
//! - per query, its output shape (aggregate specs, key and value types, derived expressions);
//! - the sinks: what feeds each, its Arrow schema, its txn application id;
//! - the state tables of the operators.

use crate::config::Config;
use crate::expr::Expr;
use crate::operator::StateLayout;
use crate::sink::{plan_sinks, PlanError, SinkPlan, SinkRole};
use crate::window::{input_kind, InputKind, OutputShape};

/// What the engine runs, compiled from a configuration.
pub struct Plan {
    /// Per source (by index): the operator inputs its events feed, in query order.
    pub routes: Vec<Vec<Route>>,
    /// Per query (operator index).
    pub shapes: Vec<OutputShape>,
    pub sinks: Vec<SinkPlan>,
    /// Per query: index into `sinks` of the sink it writes to.
    pub query_sink: Vec<usize>,
    /// Per source: index into `sinks` of its dead-letter sink, if any.
    pub source_dlq: Vec<Option<usize>>,
    pub layout: StateLayout,
}

/// Events of one source feeding one input port of one operator.
pub struct Route {
    pub operator: usize,
    pub port: usize,
    /// The query's `where`.
    pub filter: Option<Expr>,
    /// Schema indexes of the group-key fields, in key order.
    pub key_fields: Vec<usize>,
    pub inputs: Vec<AggInput>,
}

/// How one aggregate's input is read from an event.
pub struct AggInput {
    pub kind: InputKind,
    /// Schema index of the aggregate's field.
    pub field: Option<usize>,
    pub filter: Option<Expr>,
}

impl Plan {
    /// Compiles a checked configuration. Fails only on what spans several parts of it (one
    /// sink fed twice).
    pub fn new(config: &Config) -> Result<Plan, PlanError> {
        let shapes: Vec<OutputShape> = config.queries.iter().map(|q| OutputShape::new(q, &config.sources[q.source_index])).collect();
        let sinks = plan_sinks(config, &shapes)?;
        let query_sink = (0..config.queries.len())
            .map(|q| {
                sinks
                    .iter()
                    .position(|p| matches!(p.role, SinkRole::Windows { query, .. } if query == q))
                    .ok_or_else(|| PlanError::NoSink {
                        query: config.queries[q].name.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let source_dlq = config
            .sources
            .iter()
            .map(|s| s.on_error.as_ref().and_then(|n| sinks.iter().position(|p| &p.name == n)))
            .collect();
        let routes = (0..config.sources.len())
            .map(|si| {
                config
                    .queries
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.source_index == si)
                    .map(|(qi, q)| Route {
                        operator: qi,
                        port: 0,
                        filter: q.filter.as_ref().map(|f| f.expr.clone()),
                        key_fields: q.key_fields.clone(),
                        inputs: q
                            .aggregates
                            .iter()
                            .map(|a| AggInput {
                                kind: input_kind(a),
                                field: a.field_index,
                                filter: a.filter.as_ref().map(|f| f.expr.clone()),
                            })
                            .collect(),
                    })
                    .collect()
            })
            .collect();
        Ok(Plan {
            routes,
            shapes,
            sinks,
            query_sink,
            source_dlq,
            layout: StateLayout::new(&config.queries),
        })
    }
}
