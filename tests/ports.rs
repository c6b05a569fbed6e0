//! Dynamic ports on real agents and real processes: replicas of one job
//! on one machine each get their own free port from the node's range, the
//! task's arguments name it through `${SHOAL_ADDR_HTTP}`, `status` shows it,
//! and the process serves on it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// The host ports of every running slot of `job`, per agent 0, with their
/// holders; `None` until all `n` run.
fn running_ports(agent: &Agent, job: &str, n: usize) -> Option<Vec<(String, u16)>> {
    let v: serde_json::Value = agent
        .request("GET", &format!("/v1/jobs/{job}"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()?
        .into_json()
        .ok()?;
    let slots = v["instances"].as_array()?;
    let running: Vec<(String, u16)> = slots
        .iter()
        .filter(|s| s["state"] == "running")
        .filter_map(|s| {
            Some((
                s["node"].as_str()?.to_string(),
                s["ports"]["http"].as_u64()? as u16,
            ))
        })
        .collect();
    (running.len() == n).then_some(running)
}

#[test]
fn replicas_on_one_machine_get_their_own_dynamic_ports_and_serve_on_them() {
    let root = tempfile::tempdir().unwrap();
    // Two agents sharing one IP, with disjoint ranges so that the ports
    // say which node chose them.
    let first = Agent::start(
        root.path(),
        "n0",
        None,
        None,
        &["--port-range", "23000-23049"],
    );
    let seed = first.quic();
    let token = first.token_file();
    let second = Agent::start(
        root.path(),
        "n1",
        Some(&seed),
        Some(&token),
        &["--port-range", "23050-23099"],
    );
    wait_until("both agents see each other", || {
        first.nodes().is_some_and(|n| n.len() == 2) && second.nodes().is_some_and(|n| n.len() == 2)
    });

    // What the servers serve: a directory every task user can read.
    let site = Site::new("ports");
    std::fs::write(site.path().join("index.html"), "hello from shoal\n").unwrap();
    let job = format!(
        r#"name = "web"
type = "service"
replicas = 6

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8
"#,
        site.path().display()
    );
    let file = job_file(root.path(), "web", &job);
    let (ok, out, err) = cli(&first, &["run", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");

    let mut ports = Vec::new();
    wait_until("six copies run with their ports", || {
        match running_ports(&first, "web", 6) {
            Some(p) => {
                ports = p;
                true
            }
            None => false,
        }
    });
    // Distinct, and each from its holder's range.
    let distinct: BTreeSet<u16> = ports.iter().map(|(_, p)| *p).collect();
    assert_eq!(distinct.len(), 6, "{ports:?}");
    for (node, port) in &ports {
        let range = if node == "n0" {
            23000..=23049
        } else {
            23050..=23099
        };
        assert!(range.contains(port), "{node} chose {port}: {ports:?}");
    }
    // Every copy serves on its port (the address came through
    // ${SHOAL_ADDR_HTTP} in its arguments).
    for (_, port) in &ports {
        let url = format!("http://127.0.0.1:{port}/index.html");
        let mut body = String::new();
        wait_until(&format!("{url} answers"), || {
            match ureq::get(&url).timeout(Duration::from_secs(2)).call() {
                Ok(r) => {
                    body = r.into_string().unwrap_or_default();
                    true
                }
                Err(_) => false,
            }
        });
        assert_eq!(body, "hello from shoal\n");
    }
    // The other agent shows the same ports (once gossip brought them).
    ports.sort();
    wait_until("the other agent shows the same ports", || {
        running_ports(&second, "web", 6).is_some_and(|mut seen| {
            seen.sort();
            seen == ports
        })
    });
    // `shoal status web` prints them.
    let (ok, out, err) = cli(&first, &["status", "web"]);
    assert!(ok, "{err}");
    for (_, port) in &ports {
        assert!(out.contains(&format!("http={port}")), "{out}");
    }
    let (ok, _, err) = cli(&first, &["stop", "web"]);
    assert!(ok, "{err}");
    wait_until("every server is gone", || {
        ports
            .iter()
            .all(|(_, p)| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
    });
}
