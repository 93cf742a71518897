//! The library's modules import each other without cycles, and `src/lib.rs` lists every one
//! of them in its module map. Read from the sources: a module `a` depends on `b` when code of
//! `a` (outside its tests) names `crate::b`, or, within `sink/`, `super::b`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to: its top-level module, or `sink/<file>` inside `sink/`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    match parts.as_slice() {
        [one] if one == "lib" || one == "main" => None,
        [one] => Some(one.clone()),
        [dir, file] if dir == "sink" && file != "mod" => Some(format!("sink/{file}")),
        [dir, ..] => Some(dir.clone()),
        [] => None,
    }
}

/// The code of a file without its test modules and comments.
fn code_without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            // Skip the item that follows: up to its closing brace at the same indentation, or
            // a one-line `mod tests;`.
            let indent = line.len() - trimmed.len();
            let Some(item) = lines.next() else { break };
            if item.trim_end().ends_with(';') {
                continue;
            }
            for rest in lines.by_ref() {
                if rest.len() - rest.trim_start().len() == indent && rest.trim_start().starts_with('}') {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
        // `use crate::{a, b::c}`: every name at the top of the braces.
        if let Some(braced) = rest.strip_prefix('{') {
            let group: String = braced.chars().take_while(|c| *c != '}').collect();
            for item in group.split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = module_of(&src, file) else { continue };
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let code = code_without_tests(&std::fs::read_to_string(file).unwrap());
        let mut deps: BTreeSet<String> = names_after(&code, "crate::").into_iter().filter(|m| modules.contains(m)).collect();
        if from.starts_with("sink/") {
            deps.extend(
                names_after(&code, "super::")
                    .into_iter()
                    .map(|m| format!("sink/{m}"))
                    .filter(|m| modules.contains(m)),
            );
        }
        let top = from.split('/').next().unwrap().to_string();
        graph.get_mut(&from).unwrap().extend(deps.into_iter().filter(|d| *d != from && *d != top));
    }
    graph
}

/// A cycle through `node`, if the graph has one reachable from it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>, node: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|p| p == node) {
        let mut cycle = path[at..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in &graph[node] {
        if let Some(cycle) = find_cycle(graph, next, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn the_module_graph_has_no_cycles() {
    let graph = module_graph();
    assert!(
        graph.contains_key("types") && graph.contains_key("sink/delta"),
        "modules found: {:?}",
        graph.keys()
    );
    assert!(graph["types"].is_empty(), "the shared types are a leaf: types imports {:?}", graph["types"]);
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("a".into(), ["b".to_string()].into());
    graph.insert("b".into(), ["c".to_string()].into());
    graph.insert("c".into(), ["a".to_string()].into());
    let cycle = find_cycle(&graph, "a", &mut Vec::new(), &mut BTreeSet::new()).expect("a cycle");
    assert_eq!(cycle, ["a", "b", "c", "a"]);
    let code = "use crate::{config::Config, expr};\nfn f() { crate::time::now() }\n#[cfg(test)]\nmod tests {\n    use crate::daemon;\n}\n";
    assert_eq!(
        names_after(&code_without_tests(code), "crate::"),
        ["config", "expr", "time"].map(String::from).into()
    );
}

#[test]
fn the_module_map_names_every_module() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib.lines().filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';')).collect();
    assert!(!declared.is_empty());
    for module in declared {
        assert!(
            lib.contains(&format!("[`{module}`]")),
            "src/lib.rs declares `{module}` but its module map does not describe it"
        );
    }
}
