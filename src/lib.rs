//! tidemark — a real-time analytics daemon: Kafka in, event-time windows with watermarks,
//! exactly-once Delta Lake out, on a thread-per-core shared-nothing runtime.
//!
//! Modules in the order one event flows through them:
//!
//! - [`types`]     the leaf every stage shares: event time, field types, time formats,
//!   dead-letter reasons, typed values, the group-key encoding and key groups
//! - [`config`]    parse the TOML pipeline strictly, compile and check it (all errors at once)
//! - [`plan`]      the checked config compiled once: routes source → (operator, port), output
//!   shapes, sink plans, state tables; `validate` and `run` build the same plan
//! - [`expr`]      SQL expressions of `where`, aggregate `filter` and `derive`: parse, type-check, evaluate
//! - [`broker`]    the embedded Kafka-protocol broker for demos and tests
//! - [`source`]    partition ownership, Kafka consumer set-up and gap checks; the file-drop
//!   source; the click generator of the `[generator]` section, the event envelope every
//!   generated family shares, the producer with the one paced producing loop, and the record
//!   format of repartition topics
//! - [`time`]      event-time parsing (RFC 3339, epoch numbers)
//! - [`decode`]    bytes → typed row (JSON rows, Debezium change events); bad records become
//!   dead letters
//! - [`watermark`] per-partition clocks, min-combining, idleness
//! - [`shard`]     one core's event loop: sources → routing by key group → operators → epoch barriers
//! - [`operator`]  the interface the shard drives: restore, ports, lateness, epochs, state tables
//! - [`window`]    window assignment (tumbling, sliding panes, sessions, global), keyed window operators
//! - [`join`]      the stream-stream interval join (inner, left, right, full outer)
//! - [`anomaly`]   rolling statistics over sliding windows and anomaly detection
//! - [`apply`]     change events (Debezium) applied per primary key, ordered by source position
//! - [`agg`]       mergeable accumulators: exact aggregates, HyperLogLog, percentile sketch
//! - [`state`]     RocksDB: named tables split by key group, one atomic write batch per epoch
//! - [`fingerprint`] what the stored state was built for, checked against the config at start
//! - [`commit`]    the committer: flush the epoch, Delta commits tagged txn(appId, epoch), recovery
//! - [`sink`]      sink plans, Arrow conversion, the Delta table writer
//! - [`telemetry`] per-shard counters, progress, logging set-up
//! - [`metrics`]   the HTTP endpoint: `/metrics` (Prometheus text, merged at scrape), `/healthz`, `/readyz`
//! - [`changelog`] a scaled-out task's state in its partition of a compacted Kafka topic, one
//!   transaction per epoch, the previous owner fenced
//! - [`daemon`]    `start(config, shutdown)`: used by `main.rs` and by the tests
//! - [`scale`]     scale-out: a process's membership in the pipeline's consumer group, the
//!   tasks (one engine per partition number) it is given, and their repartitioners
//!
//! Tooling lives in its own crate, `tools/` (`tidemark-tools`, not published): the load
//! generator's other event families, `loadgen`, and the end-to-end `loadtest`, which drives
//! `tidemark run` as a child process. It builds on [`source::producer`] and
//! [`source::envelope`] rather than a copy of them.

pub mod agg;
pub mod anomaly;
pub mod apply;
pub mod broker;
pub mod changelog;
pub mod commit;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod expr;
pub mod fingerprint;
pub mod join;
pub mod metrics;
pub mod operator;
pub mod plan;
pub mod scale;
pub mod shard;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod time;
pub mod types;
pub mod watermark;
pub mod window;
