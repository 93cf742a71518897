//! Debezium sources, apply queries and the orders generator in the configuration.

use super::*;

const CDC: &str = r#"
[pipeline]
name = "cdc"

[[sources]]
name = "orders_cdc"
topic = "shop.public.orders"
format = "debezium"
schema = { order_id = "int", customer_id = "string", status = "string", amount = "float", updated_at = "timestamp" }
on_error = "dead_letters"

[[queries]]
name = "orders"
from = "orders_cdc"
apply = { primary_key = ["order_id"] }
sink = "orders"

[[sinks]]
name = "orders"
kind = "delta"
path = "./data/orders"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "./data/dead_letters"

[generator]
family = "orders"
source = "orders_cdc"
rate = 20
orders = 300
duplicate_share = 0.05
replay_share = 0.1
malformed_share = 0.01
"#;

fn errors_of(text: &str) -> Vec<ConfigError> {
    match parse_config(text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors.0,
    }
}

/// The one error at `path`; its message contains `text`; its line is the one containing `line_of`.
fn expect_error(text: &str, path: &str, line_of: &str, message: &str) {
    let errors = errors_of(text);
    let found: Vec<_> = errors.iter().filter(|e| e.path == path).collect();
    assert_eq!(found.len(), 1, "errors at {path:?} in {errors:#?}");
    assert!(found[0].message.contains(message), "{}", found[0].message);
    let line = text.lines().position(|l| l.contains(line_of)).expect("line text") + 1;
    assert_eq!(found[0].line, Some(line), "{}", found[0]);
}

#[test]
fn a_debezium_source_and_an_apply_query_compile() {
    let config = parse_config(CDC).unwrap_or_else(|e| panic!("{e}"));
    let source = &config.sources[0];
    assert_eq!(
        source.format,
        Format::Debezium(DebeziumFormat {
            position: vec![PositionField {
                object: Some("source".into()),
                field: "lsn".into()
            }]
        })
    );
    let query = &config.queries[0];
    assert_eq!(
        query.kind,
        QueryKind::Apply(ApplyConfig {
            primary_key: vec!["order_id".into()],
            key_fields: vec![0],
            value_fields: vec![1, 2, 3, 4],
        })
    );
    assert_eq!(query.output, OutputMode::Update);
    let generator = config.generator.unwrap();
    assert_eq!(
        generator.family,
        GeneratorFamily::Orders(OrdersGeneratorConfig {
            orders: 300,
            duplicate_share: 0.05,
            replay_share: 0.1,
        })
    );
    assert_eq!(generator.malformed_share, 0.01);
    assert!(config.warnings.is_empty());
}

#[test]
fn a_mysql_position_and_a_composite_key_compile_in_order() {
    let text = CDC
        .replace(
            "format = \"debezium\"",
            "format = \"debezium\"\nposition = [\"source.file\", \"source.pos\", \"source.row\"]",
        )
        .replace("primary_key = [\"order_id\"]", "primary_key = [\"customer_id\", \"order_id\"]");
    let config = parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
    let Format::Debezium(format) = &config.sources[0].format else {
        panic!("not debezium")
    };
    let paths: Vec<String> = format.position.iter().map(ToString::to_string).collect();
    assert_eq!(paths, ["source.file", "source.pos", "source.row"]);
    let QueryKind::Apply(apply) = &config.queries[0].kind else {
        panic!("not apply")
    };
    assert_eq!((apply.key_fields.clone(), apply.value_fields.clone()), (vec![1, 0], vec![2, 3, 4]));
}

#[test]
fn position_fields_are_checked() {
    for (position, message) in [
        ("[]", "list at least one envelope field"),
        ("[\"source.a.b\"]", "is not a field path"),
        ("[\".lsn\"]", "is not a field path"),
        ("[\"after.order_id\"]", "names the row or the operation"),
        ("[\"source.lsn\", \"source.lsn\"]", "listed twice"),
    ] {
        let text = CDC.replace("format = \"debezium\"", &format!("format = \"debezium\"\nposition = {position}"));
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].path.starts_with("sources[0].position"), "{}", errors[0]);
        assert!(errors[0].message.contains(message), "{position}: {}", errors[0]);
        assert_eq!(errors[0].line, Some(text.lines().position(|l| l.starts_with("position")).unwrap() + 1));
    }
    let json = CDC.replace(
        "format = \"debezium\"",
        "format = \"json\"\nposition = [\"source.lsn\"]\nevent_time = { field = \"updated_at\" }",
    );
    let errors = errors_of(&json);
    let position = errors.iter().find(|e| e.path == "sources[0].position").expect("a position error");
    assert!(position.message.contains("add format = \"debezium\""), "{position}");
}

#[test]
fn a_debezium_source_takes_no_event_time() {
    let text = CDC.replace("format = \"debezium\"", "format = \"debezium\"\nevent_time = { field = \"updated_at\" }");
    expect_error(&text, "sources[0].event_time", "event_time =", "source.ts_ms");
}

#[test]
fn apply_queries_and_change_events_go_together() {
    // A window over change events.
    let text = CDC.replace(
        "apply = { primary_key = [\"order_id\"] }",
        "window = { tumbling = \"1m\" }\naggregates = [{ name = \"n\", fn = \"count\" }]",
    );
    expect_error(&text, "queries[0].from", "from = \"orders_cdc\"", "only a query with apply");
    // apply over JSON rows.
    let text = CDC
        .replace("format = \"debezium\"", "format = \"json\"\nevent_time = { field = \"updated_at\" }")
        .replace("[generator]\nfamily = \"orders\"", "[generator]\nfamily = \"click\"")
        .replace("orders = 300\nduplicate_share = 0.05\nreplay_share = 0.1\n", "");
    expect_error(&text, "queries[0].from", "from = \"orders_cdc\"", "set format = \"debezium\"");
}

#[test]
fn apply_keys_and_options_are_checked() {
    let cases = [
        ("[\"id\"]", "queries[0].apply.primary_key[0]", "is not in the schema"),
        ("[\"amount\"]", "queries[0].apply.primary_key[0]", "is a float"),
        ("[]", "queries[0].apply.primary_key", "list the fields identifying a row"),
        ("[\"order_id\", \"order_id\"]", "queries[0].apply.primary_key[1]", "more than once"),
    ];
    for (key, path, message) in cases {
        let text = CDC.replace("primary_key = [\"order_id\"]", &format!("primary_key = {key}"));
        expect_error(&text, path, "apply =", message);
    }
    let text = CDC.replace("apply = { primary_key = [\"order_id\"] }", "apply = { }");
    expect_error(&text, "queries[0].apply.primary_key", "apply =", "missing");
    for (extra, path, message) in [
        ("where = \"amount > 1\"", "queries[0].where", "remove where"),
        ("output = \"append\"", "queries[0].output", "set output = \"update\""),
        ("group_by = [\"status\"]", "queries[0].group_by", "apply.primary_key"),
        ("allowed_lateness = \"1m\"", "queries[0].allowed_lateness", "no allowed_lateness"),
        ("select = [{ name = \"a\", expr = \"amount\" }]", "queries[0].select", "schema fields"),
    ] {
        let text = CDC.replace("apply = {", &format!("{extra}\napply = {{"));
        let errors = errors_of(&text);
        let found = errors.iter().find(|e| e.path == path).unwrap_or_else(|| panic!("{extra}: {errors:#?}"));
        assert!(found.message.contains(message), "{extra}: {found}");
    }
    let update = CDC.replace("apply = {", "output = \"update\"\napply = {");
    assert!(parse_config(&update).is_ok());
}

#[test]
fn the_generator_family_must_fit_the_source_and_its_keys() {
    let text = CDC.replace("family = \"orders\"", "family = \"click\"");
    let errors = errors_of(&text);
    for key in ["orders", "duplicate_share", "replay_share"] {
        let e = errors
            .iter()
            .find(|e| e.path == format!("generator.{key}"))
            .unwrap_or_else(|| panic!("{errors:#?}"));
        assert!(e.message.contains("applies only to family = \"orders\""), "{e}");
    }
    let source = errors.iter().find(|e| e.path == "generator.source").unwrap_or_else(|| panic!("{errors:#?}"));
    assert!(source.message.contains("set family = \"orders\""), "{source}");

    let text = CDC.replace("rate = 20", "rate = 20\npages = 3");
    expect_error(&text, "generator.pages", "pages = 3", "applies only to the click family");
    let text = CDC.replace("family = \"orders\"", "family = \"nexmark\"");
    let errors = errors_of(&text);
    assert!(errors.iter().any(|e| e.path == "generator.family"), "{errors:#?}");
}
