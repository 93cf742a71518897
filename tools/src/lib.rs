//! tidemark-tools — the tooling around the tidemark daemon, kept out of the daemon library so
//! its code and dependencies stay out of the product (not published).
//!
//! - [`families`] the load generator's event families: clicks (the daemon's own
//!   [click generator](tidemark::source::generator)), sensor readings, purchases, Nexmark
//! - [`loadgen`]  `tidemark-tools loadgen`: one family into any broker, paced or flat out, by
//!   the library's one producing loop ([`tidemark::source::producer::produce_events`])
//! - [`loadtest`] `tidemark-tools loadtest`: the end-to-end load test, with `tidemark run` as a
//!   child process; its prefill, pipeline file and baseline also serve `benches/throughput.rs`
//! - [`lag`]      `tidemark-tools lag`: a consumer group's committed offsets against the topics'
//!   ends (how the scale-out demo times a catch-up)

pub mod families;
pub mod lag;
pub mod loadgen;
pub mod loadtest;
