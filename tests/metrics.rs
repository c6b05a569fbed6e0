//! `GET /metrics` on real agents, read with a Prometheus text-format
//! parser that is not shoal's encoder (prometheus-parse).

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;

use common::*;
use prometheus_parse::{Scrape, Value};

/// Scrapes `agent`: (content type, the parsed samples).
fn scrape(agent: &Agent) -> (String, Scrape) {
    let resp = agent
        .request("GET", "/metrics")
        .call()
        .expect("GET /metrics");
    let kind = resp.header("content-type").unwrap_or_default().to_string();
    let text = resp.into_string().unwrap();
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition: {text}"
    );
    let scrape = Scrape::parse(std::io::Cursor::new(text).lines()).expect("parses");
    (kind, scrape)
}

/// The sum over `agents` of `metric` with exactly `labels`.
fn total(agents: &[Agent], metric: &str, labels: &[(&str, &str)]) -> f64 {
    agents
        .iter()
        .filter_map(|a| value(&scrape(a).1, metric, labels))
        .sum()
}

/// The value of `metric` with exactly `labels`, if present.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == metric
                && labels.len() == x.labels.len()
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_describe_the_node_in_the_prometheus_format() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_all_alive(&agents);
    let job = "name = \"app\"\ntype = \"service\"\nreplicas = 3\n\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n\n[task.resources]\ncpu = 10\nmemory = 8\n";
    let f = job_file(root.path(), "app", job);
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // A request without the token is refused, and counted.
    let (code, _) = call(ureq::get(&format!("{}/metrics", agents[0].http())), None);
    assert_eq!(code, 401);

    // Each node counts its own instances; together, the job's three.
    let mut running = 0.0;
    wait_until("the nodes' metrics show 3 running instances of app", || {
        running = agents
            .iter()
            .map(|a| {
                value(
                    &scrape(a).1,
                    "shoal_instances",
                    &[("job", "app"), ("state", "running")],
                )
                .unwrap_or(0.0)
            })
            .sum();
        running == 3.0
    });
    let (kind, s) = scrape(&agents[0]);
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert_eq!(value(&s, "shoal_members", &[("state", "alive")]), Some(2.0));
    assert_eq!(value(&s, "shoal_members", &[("state", "dead")]), Some(0.0));
    let posted = value(
        &s,
        "shoal_api_requests_total",
        &[("method", "POST"), ("route", "/v1/jobs"), ("status", "200")],
    );
    assert!(
        posted >= Some(1.0),
        "the submission was counted: {posted:?}"
    );
    let refused = value(
        &s,
        "shoal_api_requests_total",
        &[("method", "GET"), ("route", "/metrics"), ("status", "401")],
    );
    assert_eq!(refused, Some(1.0));
    assert!(value(&s, "shoal_reconcile_passes_total", &[]) > Some(0.0));
    assert!(value(&s, "shoal_reconcile_pass_duration_seconds_count", &[]) > Some(0.0));
    assert!(value(&s, "shoal_store_bytes", &[]) > Some(0.0));
    assert!(value(&s, "shoal_transport_sent_bytes_total", &[]) > Some(0.0));
    // By service: the failure detector's probes and the gossip both talk.
    for service in ["probe", "gossip"] {
        for direction in ["sent", "received"] {
            assert!(
                value(
                    &s,
                    "shoal_transport_service_bytes_total",
                    &[("service", service), ("direction", direction)]
                ) > Some(0.0),
                "{service} {direction}"
            );
        }
    }
    assert_eq!(
        value(&s, "shoal_notifications_total", &[("outcome", "sent")]),
        Some(0.0)
    );
    // A batch copy that ends well is an exit with success.
    let once = "name = \"once\"\ntype = \"batch\"\nreplicas = 1\n\n[task]\ncommand = \"true\"\n\n[task.resources]\ncpu = 10\nmemory = 8\n";
    let (code, body) = call(agents[0].request("POST", "/v1/jobs"), Some(once));
    assert_eq!(code, 200, "{body}");
    wait_until("a successful exit counted", || {
        total(
            &agents,
            "shoal_instance_exits_total",
            &[("outcome", "success")],
        ) == 1.0
    });
    assert!(
        value(&s, "shoal_swim_probes_total", &[]) > Some(0.0),
        "the nodes probe each other"
    );
    assert_eq!(value(&s, "shoal_swim_refutations_total", &[]), Some(0.0));
    assert!(value(&s, "shoal_process_resident_memory_bytes", &[]) > Some(1e6));
    assert_eq!(value(&s, "shoal_jobs", &[]), Some(1.0));
    // Conventions: the prefix on every name, `_total` on every counter.
    let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
    for x in &s.samples {
        assert!(x.metric.starts_with("shoal_"), "{}", x.metric);
        if matches!(x.value, Value::Counter(_)) {
            assert!(x.metric.ends_with("_total"), "{}", x.metric);
        }
        kinds.insert(&x.metric, "");
    }
    assert!(kinds.len() >= 15, "{kinds:?}");

    // A copy whose user does not exist cannot be started: a driver error.
    let bad = "name = \"nouser\"\ntype = \"service\"\nreplicas = 1\n\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\nuser = \"shoal-no-such-user\"\n\n[task.resources]\ncpu = 10\nmemory = 8\n";
    let (code, body) = call(agents[0].request("POST", "/v1/jobs"), Some(bad));
    assert_eq!(code, 200, "{body}");
    wait_until("a driver error counted", || {
        total(
            &agents,
            "shoal_driver_errors_total",
            &[("driver", "exec"), ("op", "start")],
        ) >= 1.0
    });
}
