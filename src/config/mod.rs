//! Configuration: parse raw TOML → read strictly → compile → [`Config`].
//!
//! The file is parsed into a spanned TOML tree (so every key and value knows
//! its line), read table by table with a strict reader that reports unknown,
//! missing and mistyped keys (`reader`, `raw`), then compiled: names are
//! resolved and cross-checked (`compile`). Every problem found along the
//! way is collected, so the user sees all of them at once, each with its TOML
//! path and line. A TOML syntax error stops at the parse and is reported alone.

mod compile;
mod duration;
mod error;
mod model;
mod raw;
mod reader;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cdc;

use std::path::Path;

use toml::de::DeTable;

pub use compile::{ANOMALY_STAT_COLUMNS, METADATA_COLUMNS};
pub use duration::{format_duration, parse_duration};
pub use error::{ConfigError, ConfigErrors};
pub use model::DEFAULT_METRICS_LISTEN;
pub use model::{
    AggFn, AggregateConfig, AnomalyConfig, AnomalyJudge, ApplyConfig, Bootstrap, CalendarUnit, Config, DebeziumFormat, DerivedColumn, EventTimeConfig,
    FieldDef, FieldType, FileSourceConfig, Format, GapPolicy, GeneratorConfig, GeneratorFamily, JoinConfig, JoinType, KafkaConfig, KafkaSinkConfig, LogConfig,
    MetricsConfig, OrdersGeneratorConfig, OutputMode, PipelineConfig, PositionField, QueryConfig, QueryKind, Repartition, Repartitioned, ScaleConfig,
    SinkConfig, SinkKind, SourceConfig, Sql, StartingOffsets, TaskId, TimeFormat, WatermarkConfig, WindowConfig,
};

use error::Diagnostics;
use reader::Fields;

/// Parses and validates a configuration, reporting every problem found.
pub fn parse_config(text: &str) -> Result<Config, ConfigErrors> {
    let diag = Diagnostics::new(text);
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(err) => {
            let line = err.span().map(|span| diag.line_of(span.start));
            return Err(ConfigError {
                path: String::new(),
                line,
                message: format!("invalid TOML: {}", err.message()),
            }
            .into());
        }
    };
    let raw = raw::read_config(Fields::root(&diag, document.get_ref()));
    let config = compile::compile(raw, &diag);
    if diag.has_errors() {
        Err(diag.into_errors())
    } else {
        Ok(config)
    }
}

/// Reads and parses a configuration file. An unreadable file is reported as
/// a single error naming the path.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        path: String::new(),
        line: None,
        message: format!("cannot read config file {}: {err}", path.display()),
    })?;
    parse_config(&text)
}
