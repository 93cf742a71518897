//! What the stored state was built for, checked against the config at every start.
//!
//! The state store keeps, per query, the parts of its config its state and its table depend
//! on (sources read, window, keys, aggregates and their input types, join and detector shape,
//! output mode), its `allowed_lateness`, and whether it was present in the last run; per
//! source, what it reads. At start:
//!
//! - a query whose state-shaping config changed is refused, naming the change and the fix
//!   (restore it, or start the query under a new name with a new sink);
//! - `allowed_lateness` may change: windows closed under the old value stay closed (the
//!   store hands the old value to the operators, see [`crate::window`]); a lower value closes
//!   the windows it newly covers at the next epoch, emitting them;
//! - a query removed in an earlier run and now back is refused: its state and table missed
//!   the events read while it was gone;
//! - a source renamed (same topic or directory, new name) is refused: positions of file
//!   sources and the queries' records are kept by name.
//!
//! A query that is new to the store starts with empty state at the sources' current positions.

use std::collections::{BTreeMap, HashMap};

use crate::config::{Config, QueryConfig, QueryKind};
use crate::state::{StateError, StateStore};

/// Refusals at start; each names what changed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("query \"{query}\": its {what} changed from {old} to {new}, but its stored state and its table were built for the old one. Restore the old value, or give the query a new name and a new sink (it then starts with empty state at the sources' current positions)")]
    Changed { query: String, what: String, old: String, new: String },
    #[error("query \"{query}\" was removed from the pipeline at epoch {removed_at} and is back at epoch {now}: its state and its table missed the events read in between. Give it a new name and a new sink to start it afresh")]
    Readded { query: String, removed_at: u64, now: u64 },
    #[error("source \"{new}\" reads {what}, which the state knows as source \"{old}\": renaming a source loses its stored positions and the records of the queries reading it. Rename it back to \"{old}\"")]
    SourceRenamed { new: String, old: String, what: String },
    #[error("the stored record of {what} is unreadable ({detail}); the state directory is damaged or from an unknown version")]
    Unreadable { what: String, detail: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// A query's stored record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueryRecord {
    /// What the state depends on: aspect → canonical text.
    pub shape: BTreeMap<String, String>,
    /// µs.
    pub allowed_lateness_us: i64,
    /// The epoch the store had reached when the query was last found missing from the config.
    pub removed_at: Option<u64>,
}

/// What a query's state and table depend on, as aspect → text.
pub fn query_shape(q: &QueryConfig, config: &Config) -> BTreeMap<String, String> {
    let mut shape = BTreeMap::new();
    let source = &config.sources[q.source_index];
    let field_type = |name: &str| {
        source
            .schema
            .iter()
            .find(|f| f.name == name)
            .map_or_else(|| "?".to_string(), |f| format!("{:?}", f.ty))
    };
    let mut put = |k: &str, v: String| {
        shape.insert(k.to_string(), v);
    };
    put("source", q.from.clone());
    put("output mode", q.output.as_str().to_string());
    let keys = || q.group_by.iter().map(|g| format!("{g}: {}", field_type(g))).collect::<Vec<_>>().join(", ");
    match &q.kind {
        QueryKind::Stateless => put("kind", "stateless".into()),
        QueryKind::Aggregate => {
            put("kind", "aggregation".into());
            put("window", format!("{:?}", q.window));
            put("group_by", format!("[{}]", keys()));
            let aggs: Vec<String> = q
                .aggregates
                .iter()
                .map(|a| {
                    let input = match (&a.field, &a.expr) {
                        (Some(f), _) => field_type(f),
                        (None, Some(e)) => format!("{:?}", e.expr.output_type()),
                        (None, None) => "rows".into(),
                    };
                    format!("{} = {:?}({input})", a.name, a.func)
                })
                .collect();
            put("aggregates", format!("[{}]", aggs.join(", ")));
        }
        QueryKind::Join(j) => {
            let right = &config.sources[j.source_index];
            let names = |s: &crate::config::SourceConfig, idx: &[usize]| idx.iter().map(|&i| s.schema[i].name.clone()).collect::<Vec<_>>().join(", ");
            put("kind", "join".into());
            put(
                "join",
                format!("{:?} join with \"{}\" between {}µs and {}µs", j.join_type, j.source, j.lower, j.upper),
            );
            put("join keys", format!("[{}] = [{}]", names(source, &j.left_keys), names(right, &j.right_keys)));
            put(
                "columns the join keeps",
                format!("[{}] and [{}]", names(source, &j.left_fields), names(right, &j.right_fields)),
            );
        }
        QueryKind::Apply(a) => {
            put("kind", "change apply".into());
            let keys: Vec<String> = a.primary_key.iter().map(|k| format!("{k}: {}", field_type(k))).collect();
            put("primary key", format!("[{}]", keys.join(", ")));
        }
        QueryKind::Anomaly(a) => {
            put("kind", "anomaly detection".into());
            put("window", format!("{:?}", q.window));
            put("group_by", format!("[{}]", keys()));
            put("anomaly field", format!("{}: {}", a.field, field_type(&a.field)));
            put("anomaly judge", format!("{:?}", a.judge));
        }
    }
    shape
}

/// What a source reads, for spotting renames.
fn source_reads(s: &crate::config::SourceConfig) -> String {
    match &s.files {
        Some(files) => format!("directory {}", files.path.display()),
        None => format!("topic \"{}\"", s.topic),
    }
}

/// Checks the config against the stored records (see the module doc) and stores the new
/// ones. Returns each query's stored `allowed_lateness` (µs) by name, for the operators.
pub fn check_and_record(config: &Config, store: &StateStore, epoch: u64) -> Result<HashMap<String, i64>, FingerprintError> {
    let stored_queries = store.query_records()?;
    let stored_sources = store.source_records()?;
    let mut records: HashMap<String, QueryRecord> = HashMap::new();
    for (name, bytes) in stored_queries {
        let r: QueryRecord = serde_json::from_slice(&bytes).map_err(|e| FingerprintError::Unreadable {
            what: format!("query \"{name}\""),
            detail: e.to_string(),
        })?;
        records.insert(name, r);
    }
    for s in &config.sources {
        let reads = source_reads(s);
        let renamed_from = stored_sources
            .iter()
            .find(|(old, what)| *what == reads && *old != s.name && !config.sources.iter().any(|c| &c.name == old));
        if let Some((old, _)) = renamed_from {
            if !stored_sources.iter().any(|(n, _)| n == &s.name) {
                return Err(FingerprintError::SourceRenamed {
                    new: s.name.clone(),
                    old: old.clone(),
                    what: reads,
                });
            }
        }
    }
    let mut lateness = HashMap::new();
    for q in &config.queries {
        let shape = query_shape(q, config);
        if let Some(old) = records.get(&q.name) {
            if let Some(removed_at) = old.removed_at.filter(|r| *r < epoch) {
                return Err(FingerprintError::Readded {
                    query: q.name.clone(),
                    removed_at,
                    now: epoch,
                });
            }
            for (what, new) in &shape {
                let before = old.shape.get(what).cloned().unwrap_or_else(|| "(none)".into());
                if &before != new {
                    return Err(FingerprintError::Changed {
                        query: q.name.clone(),
                        what: what.clone(),
                        old: before,
                        new: new.clone(),
                    });
                }
            }
            if let Some(what) = old.shape.keys().find(|k| !shape.contains_key(*k)) {
                return Err(FingerprintError::Changed {
                    query: q.name.clone(),
                    what: what.clone(),
                    old: old.shape[what].clone(),
                    new: "(none)".into(),
                });
            }
            lateness.insert(q.name.clone(), old.allowed_lateness_us);
            let new_lateness = q.allowed_lateness.as_micros() as i64;
            if new_lateness != old.allowed_lateness_us {
                tracing::info!(
                    query = %q.name,
                    old_us = old.allowed_lateness_us,
                    new_us = new_lateness,
                    "allowed_lateness changed: windows closed under the old value stay closed; the new value applies to the windows still open"
                );
            }
        }
        records.insert(
            q.name.clone(),
            QueryRecord {
                shape,
                allowed_lateness_us: q.allowed_lateness.as_micros() as i64,
                removed_at: None,
            },
        );
    }
    for (name, r) in records.iter_mut() {
        if !config.queries.iter().any(|q| &q.name == name) && r.removed_at.is_none() {
            r.removed_at = Some(epoch);
        }
    }
    let queries: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|(n, r)| (n.clone(), serde_json::to_vec(r).expect("a record serializes")))
        .collect();
    let sources: Vec<(String, String)> = config.sources.iter().map(|s| (s.name.clone(), source_reads(s))).collect();
    store.put_records(&queries, &sources)?;
    Ok(lateness)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    const BASE: &str = include_str!("../tests/data/minimal.toml");

    fn run(dir: &std::path::Path, text: &str, epoch: u64) -> Result<HashMap<String, i64>, FingerprintError> {
        let config = parse_config(text).unwrap();
        let plan = crate::plan::Plan::new(&config).unwrap();
        let store = StateStore::open(dir, 1, &plan.layout.names).unwrap();
        check_and_record(&config, &store, epoch)
    }

    #[test]
    fn state_shaping_changes_are_refused_lateness_changes_allowed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(run(dir.path(), BASE, 0).unwrap().is_empty(), "nothing stored yet");
        // The same config again, and a where clause added: fine.
        run(dir.path(), BASE, 3).unwrap();
        let filtered = BASE.replace("window = {", "where = \"value > 0\"\nwindow = {");
        run(dir.path(), &filtered, 3).unwrap();
        // More lateness: allowed; the old value is handed to the operators.
        let later = BASE.replace("sink = \"out\"", "allowed_lateness = \"1m\"\nsink = \"out\"");
        assert_eq!(run(dir.path(), &later, 4).unwrap()["q"], 0);
        assert_eq!(run(dir.path(), BASE, 5).unwrap()["q"], 60_000_000);
        for (changed, what) in [
            (BASE.replace("tumbling = \"10s\"", "tumbling = \"20s\""), "window"),
            (BASE.replace("group_by = [\"key\"]", "group_by = [\"key\", \"value\"]"), "group_by"),
            (BASE.replace("fn = \"count\"", "fn = \"sum\", field = \"value\""), "aggregates"),
            (BASE.replace("sink = \"out\"", "output = \"update\"\nsink = \"out\""), "output mode"),
        ] {
            let err = run(dir.path(), &changed, 6).unwrap_err().to_string();
            assert!(err.starts_with(&format!("query \"q\": its {what} changed from")), "{err}");
            assert!(err.contains("give the query a new name and a new sink"), "{err}");
        }
        // Refusals store nothing: the original config still starts.
        run(dir.path(), BASE, 6).unwrap();
    }

    #[test]
    fn a_query_back_after_removal_is_refused_and_a_renamed_source_too() {
        let dir = tempfile::tempdir().unwrap();
        let two = format!(
            "{BASE}\n[[queries]]\nname = \"q2\"\nfrom = \"events\"\nwindow = {{ tumbling = \"1m\" }}\naggregates = [ {{ name = \"n\", fn = \"count\" }} ]\nsink = \"out2\"\n[[sinks]]\nname = \"out2\"\nkind = \"delta\"\npath = \"x\"\n"
        );
        run(dir.path(), &two, 0).unwrap();
        run(dir.path(), BASE, 2).unwrap(); // q2 removed at epoch 2
        run(dir.path(), BASE, 5).unwrap();
        let err = run(dir.path(), &two, 7).unwrap_err().to_string();
        assert!(
            err.contains("query \"q2\" was removed from the pipeline at epoch 2 and is back at epoch 7"),
            "{err}"
        );
        let renamed = BASE
            .replace("name = \"events\"", "name = \"evts\"")
            .replace("from = \"events\"", "from = \"evts\"");
        let err = run(dir.path(), &renamed, 7).unwrap_err().to_string();
        assert!(
            err.contains("source \"evts\" reads topic \"events\", which the state knows as source \"events\""),
            "{err}"
        );
    }
}
