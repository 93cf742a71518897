//! tidemark — a real-time analytics daemon: Kafka in, event-time windows with watermarks,
//! exactly-once Delta Lake out, on a thread-per-core shared-nothing runtime.
//!
//! Modules in the order one event flows through them:
//!
//! - [`config`]    parse the TOML pipeline strictly, compile and check it (all errors at once)
//! - [`expr`]      SQL expressions of `where`, aggregate `filter` and `derive`: type-checked, compiled
//! - [`broker`]    the embedded Kafka-protocol broker for demos and tests
//! - [`source`]    partition ownership, Kafka consumer set-up and gap checks; the file-drop
//!   source; the click generator of the `[generator]` section, the event envelope every
//!   generated family shares, and the producer with the one paced producing loop
//! - [`decode`]    bytes → typed row; bad records become dead letters
//! - [`expr`]      SQL expressions (`where`, aggregate filters, derived columns): parse, type-check, evaluate
//! - [`time`]      event-time parsing (RFC 3339, epoch numbers)
//! - [`watermark`] per-partition clocks, min-combining, idleness
//! - [`value`]     typed values and the group-key encoding that routes a row to its shard
//! - [`shard`]     one core's event loop: sources → routing → window operators → epoch barriers
//! - [`window`]    window assignment (tumbling, sliding panes, sessions, global), keyed operators
//! - [`agg`]       mergeable accumulators: exact aggregates, HyperLogLog, percentile sketch
//! - [`state`]     RocksDB column families, key encoding, one atomic write batch per epoch
//! - [`commit`]    the committer: flush the epoch, Delta commits tagged txn(appId, epoch), recovery
//! - [`sink`]      sink plans, Arrow conversion, the Delta table writer
//! - [`telemetry`] per-shard counters, progress, logging set-up
//! - [`metrics`]   the HTTP endpoint: `/metrics` (Prometheus text, merged at scrape), `/healthz`, `/readyz`
//! - [`daemon`]    `start(config, shutdown)`: used by `main.rs` and by the tests
//!
//! Tooling lives in its own crate, `tools/` (`tidemark-tools`, not published): the load
//! generator's other event families, `loadgen`, and the end-to-end `loadtest`, which drives
//! `tidemark run` as a child process. It builds on [`source::producer`] and
//! [`source::envelope`] rather than a copy of them.

pub mod agg;
pub mod broker;
pub mod commit;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod expr;
pub mod metrics;
pub mod shard;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod time;
pub mod value;
pub mod watermark;
pub mod window;
