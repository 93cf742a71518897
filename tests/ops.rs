//! The operations files in `config/`: the Prometheus alert rules pass `promtool check rules`
//! and their own unit tests (`promtool test rules`); the Grafana dashboard is valid JSON whose
//! panels tile the grid and all query something; the dashboard and the alerts name only metric
//! families listed in `config/prometheus/metric_families.txt` (the scrape test holds the daemon
//! to that list), and the dashboard shows every one of them.
//!
//! promtool comes from Debian's `prometheus` package (`scripts/test.sh` installs it). Without
//! it these tests fail rather than skip: unchecked alert rules are how alerting silently breaks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ALERTS: &str = "config/prometheus/alerts.yml";
const ALERT_TESTS: &str = "config/prometheus/alerts_test.yml";
const FAMILIES: &str = "config/prometheus/metric_families.txt";
const DASHBOARD: &str = "config/grafana/tidemark.json";

const PROMTOOL_MISSING: &str = "promtool not found: run ./scripts/test.sh (it installs Debian's prometheus package) or apt-get install prometheus";

/// A file of the repository, by its path from the repository root.
fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    let file = repo_file(path);
    match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) => panic!("read {}: {e}", file.display()),
    }
}

/// Runs `promtool ARGS FILE`; fails the test with promtool's output unless it succeeds.
fn promtool(args: &[&str], file: &str) {
    let path = repo_file(file);
    let output = match Command::new("promtool").args(args).arg(&path).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{PROMTOOL_MISSING}"),
        Err(e) => panic!("could not run promtool: {e}"),
    };
    assert!(
        output.status.success(),
        "`promtool {} {}` failed ({}):\n{}{}",
        args.join(" "),
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check() {
    promtool(&["check", "rules"], ALERTS);
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    // The test file names alerts.yml relative to itself: the working directory does not matter.
    promtool(&["test", "rules"], ALERT_TESTS);
}

/// The families in `metric_families.txt`: one name a line; `#` comments, blank lines ignored.
fn exported_families() -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    for line in read(FAMILIES).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let valid = line.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        assert!(valid, "{FAMILIES}: {line:?} is not a metric family name");
        assert!(families.insert(line.to_string()), "{FAMILIES}: {line} is listed twice");
    }
    assert!(!families.is_empty(), "{FAMILIES} lists no families");
    families
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Every `tidemark_*` and `process_*` metric name in a text (a PromQL expression, a rules file).
fn metric_names(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_name = i == 0 || !is_name_byte(bytes[i - 1]);
        let rest = &bytes[i..];
        if starts_name && (rest.starts_with(b"tidemark_") || rest.starts_with(b"process_")) {
            let end = i + rest.iter().take_while(|&&c| is_name_byte(c)).count();
            names.push(&text[i..end]);
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// The family a sample name belongs to: the name itself, or the histogram family of a
/// `_bucket`, `_sum` or `_count` series. A name of no listed family comes back unchanged.
fn family_of<'a>(name: &'a str, families: &BTreeSet<String>) -> &'a str {
    if families.contains(name) {
        return name;
    }
    let mut bases = HISTOGRAM_SUFFIXES.into_iter().filter_map(|suffix| name.strip_suffix(suffix));
    bases.find(|base| families.contains(*base)).unwrap_or(name)
}

fn load_dashboard() -> Value {
    match serde_json::from_str(&read(DASHBOARD)) {
        Ok(dashboard) => dashboard,
        Err(e) => panic!("{DASHBOARD} is not valid JSON: {e}"),
    }
}

fn top_level_panels(dashboard: &Value) -> &Vec<Value> {
    let panels = dashboard["panels"].as_array();
    panels.unwrap_or_else(|| panic!("{DASHBOARD} has no panels array"))
}

/// The dashboard's panels, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in top_level_panels(dashboard) {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

/// Every PromQL query of the dashboard: panel targets and template variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.to_string());
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] != "query" {
            continue;
        }
        // A string, or (newer Grafana) an object holding it under "query".
        let query = &variable["query"];
        let text = match query.as_str().or_else(|| query["query"].as_str()) {
            Some(text) => text,
            None => panic!("template variable {} has no query", variable["name"]),
        };
        queries.push(text.to_string());
    }
    queries
}

#[test]
fn dashboard_is_valid_and_uses_only_exported_metrics() {
    let dashboard = load_dashboard();
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 36, "schemaVersion {schema}: expected 36 or newer (Grafana 9+)");
    let mut variables = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        variables.extend(variable["name"].as_str());
    }
    for name in ["datasource", "instance"] {
        assert!(variables.contains(&name), "no template variable ${name} (have {variables:?})");
    }

    // Layout: the top-level panels (rows included) tile the 24-column grid without overlapping.
    let mut cells = BTreeSet::new();
    for panel in top_level_panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            let value = grid[k].as_u64();
            value.unwrap_or_else(|| panic!("panel {title:?}: gridPos.{k} is missing"))
        });
        assert!(w > 0 && h > 0 && x + w <= 24, "panel {title:?}: gridPos {grid} is off the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panel {title:?} overlaps another at x={cx} y={cy}");
            }
        }
    }

    // Every panel has a unique id; every panel but a row, the templated data source and queries.
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("panel {title:?} has no numeric id"));
        assert!(ids.insert(id), "panel id {id} is used twice (again by {title:?})");
        if panel["type"] == "row" {
            continue;
        }
        let source = &panel["datasource"]["uid"];
        assert_eq!(source, "${datasource}", "panel {title:?} must use the $datasource variable");
        let no_targets = Vec::new();
        let targets = panel["targets"].as_array().unwrap_or(&no_targets);
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "panel {title:?}: a target has no expr");
        }
    }

    // Metric names: those the dashboard queries, and every one the alert rules and their tests
    // mention (expressions, annotations, input series) must belong to a listed family.
    let families = exported_families();
    let mut used = BTreeMap::new(); // family -> where it is first used
    for query in dashboard_queries(&dashboard) {
        for name in metric_names(&query) {
            let family = family_of(name, &families).to_string();
            used.entry(family).or_insert_with(|| format!("{DASHBOARD}: {query}"));
        }
    }
    for file in [ALERTS, ALERT_TESTS] {
        let text = read(file);
        for name in metric_names(&text) {
            let family = family_of(name, &families).to_string();
            used.entry(family).or_insert_with(|| file.to_string());
        }
    }
    assert!(used.contains_key("tidemark_ready"), "the scan found no metric names: {used:?}");
    let mut unknown = Vec::new();
    for (family, place) in &used {
        if !families.contains(family) {
            unknown.push(format!("{family} (in {place})"));
        }
    }
    assert!(
        unknown.is_empty(),
        "not in {FAMILIES} (a typo, or a metric the daemon does not export):\n  {}",
        unknown.join("\n  ")
    );
}

#[test]
fn dashboard_shows_every_exported_family() {
    let families = exported_families();
    let queries = dashboard_queries(&load_dashboard());
    let mut shown = BTreeSet::new();
    for query in &queries {
        for name in metric_names(query) {
            shown.insert(family_of(name, &families));
        }
    }
    let missing: Vec<&String> = families.iter().filter(|f| !shown.contains(f.as_str())).collect();
    assert!(missing.is_empty(), "exported but on no panel of {DASHBOARD}: {missing:?}");
}

#[test]
fn metric_names_are_found_whole_and_mapped_to_families() {
    let families = BTreeSet::from(["tidemark_up", "tidemark_commit_seconds"].map(String::from));
    let expr = r#"histogram_quantile(0.9, rate(tidemark_commit_seconds_bucket{job=~".*tidemark.*"}[5m]))
        + on() my_tidemark_x + tidemark_up"#;
    let names = metric_names(expr);
    assert_eq!(names, ["tidemark_commit_seconds_bucket", "tidemark_up"]);
    assert_eq!(family_of(names[0], &families), "tidemark_commit_seconds");
    assert_eq!(family_of("tidemark_up", &families), "tidemark_up");
    assert_eq!(family_of("tidemark_nope_sum", &families), "tidemark_nope_sum");
}
