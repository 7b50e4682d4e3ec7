//! The deploy files ask only for metrics the gateway exports: every query of the Grafana
//! dashboard (`deploy/grafana/flashgate-sale.json`), of the alert rules
//! (`deploy/prometheus/alerts.yml`) and every series their promtool tests
//! (`alerts_test.yml`) feed in. Also: each panel has a query, each alert has a severity,
//! a summary, a description and both a firing and a quiet promtool case. promtool itself
//! runs in `scripts/dev rules` (a step of `.ci/run`). No YAML parser among the
//! dependencies: the YAML files are read line by line, as they are written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const DASHBOARD: &str = "deploy/grafana/flashgate-sale.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts_test.yml";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the gateway exports, found the way `every_metric_is_documented` (tests/api)
/// finds it: every `"flashgate_..."` string literal under src/ (the names given to
/// `counter!`/`gauge!`/`histogram!`/`describe_*!`, and the per-SKU families rendered by
/// hand). `histograms`: names given to `histogram!(` or `describe_histogram!(`, which
/// Prometheus sees as `_bucket`, `_sum` and `_count` series.
struct Exported {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

fn exported() -> Exported {
    let mut exported = Exported {
        names: BTreeSet::new(),
        histograms: BTreeSet::new(),
    };
    let mut sources = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(path) = sources.pop() {
        if path.is_dir() {
            sources.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for piece in source.split("\"flashgate_").skip(1) {
            let name = name_chars(piece);
            if piece[name.len()..].starts_with('"') {
                exported.names.insert(format!("flashgate_{name}"));
            }
        }
        // `histogram!(` also ends `describe_histogram!(`.
        for piece in source.split("histogram!(").skip(1) {
            if let Some(rest) = piece.trim_start().strip_prefix("\"flashgate_") {
                let name = name_chars(rest);
                if rest[name.len()..].starts_with('"') {
                    exported.histograms.insert(format!("flashgate_{name}"));
                }
            }
        }
    }
    assert!(
        exported.names.len() >= 15 && !exported.histograms.is_empty(),
        "found the exported metrics: {:?}, histograms {:?}",
        exported.names,
        exported.histograms
    );
    exported
}

fn name_chars(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// Every `flashgate_[a-z0-9_]+` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("flashgate_") {
        let start = from + at;
        let rest = &expr[start + "flashgate_".len()..];
        let name = name_chars(rest);
        let inside_a_word = expr[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !name.is_empty() && !inside_a_word {
            names.push(format!("flashgate_{name}"));
        }
        from = start + "flashgate_".len() + name.len();
    }
    names
}

/// The names `queries` ask for that the gateway does not export, as `where: name`.
fn unexported(queries: &[(String, String)], exported: &Exported) -> Vec<String> {
    let mut missing = Vec::new();
    for (place, expr) in queries {
        for name in metric_names(expr) {
            let histogram_series = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .any(|base| exported.histograms.contains(base));
            if !exported.names.contains(&name) && !histogram_series {
                missing.push(format!("{place}: {name}"));
            }
        }
    }
    missing
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// The dashboard's panels, those inside rows included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut found = Vec::new();
    let mut todo: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels")
        .iter()
        .collect();
    while let Some(panel) = todo.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            todo.extend(inner);
        }
        if panel["type"] != "row" {
            found.push(panel);
        }
    }
    found
}

/// Every `expr` anywhere in the dashboard, and the queries of its query variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(value: &serde_json::Value, place: &str, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("expr", serde_json::Value::String(expr)) => {
                            out.push((place.to_owned(), expr.clone()))
                        }
                        _ => walk(inner, place, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, place, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        let place = format!(
            "{DASHBOARD} panel {:?}",
            panel["title"].as_str().unwrap_or("?")
        );
        walk(panel, &place, &mut queries);
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = &variable["query"];
            let text = query["query"].as_str().or(query.as_str());
            let text = text.expect("a query variable has its query");
            let place = format!(
                "{DASHBOARD} variable {:?}",
                variable["name"].as_str().unwrap_or("?")
            );
            queries.push((place, text.to_owned()));
        }
    }
    queries
}

/// The rules of alerts.yml: name → the rule's text (from its `- alert:` line to the next).
fn alert_rules(yaml: &str) -> BTreeMap<String, String> {
    let mut rules = BTreeMap::new();
    for chunk in yaml.split("- alert:").skip(1) {
        let name = chunk
            .split_whitespace()
            .next()
            .expect("an alert has a name");
        let previous = rules.insert(name.to_owned(), chunk.to_owned());
        assert!(previous.is_none(), "alert {name} is defined twice");
    }
    rules
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Every `expr:` of a YAML text: on its line, or the block (`|`, `>`) indented below it.
fn yaml_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > indent(line))
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                exprs.push(block.join(" ").trim().to_owned());
            } else {
                exprs.push(rest.trim_matches(|c| c == '\'' || c == '"').to_owned());
            }
        }
        i += 1;
    }
    exprs
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "found the queries: {queries:?}");
    let missing = unexported(&queries, &exported());
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics the gateway does not export (names in src/telemetry.rs \
         and docs/monitoring.md's metrics table):\n{}",
        missing.join("\n")
    );
}

#[test]
fn dashboard_panels_have_queries_on_the_datasource_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let panels = panels(&dashboard);
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel has an id")),
            "panel {title:?}: its id is taken"
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?}"
        );
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no target");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?}: a target without expr"
            );
            assert!(
                ref_ids.insert(target["refId"].as_str().unwrap_or_default()),
                "panel {title:?}: refIds repeat"
            );
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title:?}"
            );
        }
    }
}

#[test]
fn alert_rules_query_only_exported_metrics() {
    let alerts = read(ALERTS);
    let exprs = yaml_exprs(&alerts);
    assert_eq!(
        exprs.len(),
        alert_rules(&alerts).len(),
        "one expr per alert: {exprs:?}"
    );
    let mut queries: Vec<(String, String)> =
        exprs.into_iter().map(|e| (ALERTS.to_owned(), e)).collect();
    // The series the promtool tests feed in: a made-up one would test nothing real.
    for line in read(ALERT_TESTS).lines() {
        if let Some(series) = line.trim_start().strip_prefix("- series:") {
            queries.push((ALERT_TESTS.to_owned(), series.trim().to_owned()));
        }
    }
    let missing = unexported(&queries, &exported());
    assert!(
        missing.is_empty(),
        "the alert rules ask for metrics the gateway does not export (names in \
         src/telemetry.rs and docs/monitoring.md's metrics table):\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_alert_is_labelled_annotated_and_tested() {
    let rules = alert_rules(&read(ALERTS));
    assert!(rules.len() >= 9, "found the alerts: {:?}", rules.keys());
    for (name, rule) in &rules {
        for field in [
            "expr:",
            "labels:",
            "annotations:",
            "summary:",
            "description:",
        ] {
            assert!(rule.contains(field), "alert {name} has no {field}");
        }
        let severity = rule
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'));
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "alert {name}: severity {severity:?}"
        );
    }
    // Each `alertname:` case of alerts_test.yml: quiet (`exp_alerts: []`) or firing
    // (expected alerts with their labels and annotations).
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in read(ALERT_TESTS).split("alertname:").skip(1) {
        let name = case.split_whitespace().next().unwrap().to_owned();
        assert!(
            rules.contains_key(&name),
            "{ALERT_TESTS} tests {name}, which is no alert"
        );
        let expected = case
            .split_once("exp_alerts:")
            .unwrap_or_else(|| panic!("a case of {name} without exp_alerts"))
            .1;
        if expected.lines().next().unwrap().trim() == "[]" {
            quiet.insert(name);
        } else {
            assert!(
                expected.contains("exp_labels:") && expected.contains("exp_annotations:"),
                "a firing case of {name} without exp_labels and exp_annotations"
            );
            firing.insert(name);
        }
    }
    for name in rules.keys() {
        assert!(
            firing.contains(name),
            "{ALERT_TESTS} has no case where {name} fires"
        );
        assert!(
            quiet.contains(name),
            "{ALERT_TESTS} has no case where {name} stays quiet"
        );
    }
}

#[test]
fn a_made_up_metric_is_caught() {
    let queries = [(
        "here".to_owned(),
        "histogram_quantile(0.99, rate(flashgate_request_duration_seconds_bucket[5m])) \
         + flashgate_made_up_total + rate(flashgate_requests_total_bucket[1m]) \
         + flashgate_outbox_backlog + x_flashgate_other"
            .to_owned(),
    )];
    assert_eq!(
        unexported(&queries, &exported()),
        [
            "here: flashgate_made_up_total",
            "here: flashgate_requests_total_bucket"
        ],
        "a made-up name, and a histogram suffix on a counter"
    );
}
