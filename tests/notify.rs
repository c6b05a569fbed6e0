//! Failure notifications on real agents: a slot failing for good and a
//! node dying are each POSTed once (by one node of three) to the agents'
//! webhook, a job's own webhook gets what is about the job, and a webhook
//! that fails at first is retried.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A webhook receiver on loopback: every POST's path and JSON body. It
/// answers the first requests with `fail_first` (status lines, in order),
/// then 200.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Hook {
    fn start(fail_first: &'static [&'static str]) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            let mut failed = 0;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let status = if failed < fail_first.len() {
                    failed += 1;
                    fail_first[failed - 1]
                } else {
                    seen.lock()
                        .unwrap()
                        .push((path, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Hook { url, got }
    }

    /// The notifications received of `kind`.
    fn of(&self, kind: &str) -> Vec<(String, Value)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["event"]["kind"] == kind)
            .cloned()
            .collect()
    }
}

/// Whether every agent's event log holds an event of `kind`.
fn all_saw(agents: &[&Agent], kind: &str) -> bool {
    agents.iter().all(|a| {
        a.request("GET", "/v1/events?follow=false")
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .is_some_and(|t| t.contains(&format!("\"kind\":\"{kind}\"")))
    })
}

/// A counter of `agent`'s /metrics (0 if absent).
fn counter(agent: &Agent, line_start: &str) -> f64 {
    let text = agent
        .request("GET", "/metrics")
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn failures_are_posted_once_by_one_node_and_retried() {
    // The first delivery is refused, the next redirected (a redirect is
    // not followed, so it delivered nothing): both are retried.
    let hook = Hook::start(&["503 Service Unavailable", "301 Moved Permanently"]);
    let root = tempfile::tempdir().unwrap();
    let webhook = format!("{}/cluster", hook.url);
    let mut agents = cluster_with(root.path(), 3, |_| {
        vec!["--notify-webhook".into(), webhook.clone()]
    });
    wait_all_alive(&agents);
    wait_streaming(&agents.iter().collect::<Vec<_>>());

    // A batch slot that fails for good, in a job with its own webhook.
    let job = format!(
        "name = \"bad\"\ntype = \"batch\"\nreplicas = 1\nnotify = [\"{}/job\"]\n\n[task]\ncommand = \"false\"\n\n[restart]\nattempts = 0\n\n[task.resources]\ncpu = 10\nmemory = 8\n",
        hook.url
    );
    let (code, body) = call(agents[0].request("POST", "/v1/jobs"), Some(&job));
    assert_eq!(code, 200, "{body}");
    wait_until("the failure posted to both webhooks", || {
        hook.of("instance.failed").len() >= 2
    });
    // Every node saw the failure; give a second node's send the time it
    // would take, then count: one per webhook, not one per node.
    let all: Vec<&Agent> = agents.iter().collect();
    wait_until("every node saw the failure", || {
        all_saw(&all, "instance.failed")
    });
    std::thread::sleep(Duration::from_secs(1));
    let failed = hook.of("instance.failed");
    let mut paths: Vec<&str> = failed.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/cluster", "/job"], "once per webhook: {failed:?}");
    let (_, n) = &failed[0];
    assert_eq!(n["event"]["job"], "bad");
    assert!(
        n["text"].as_str().unwrap().contains("failed for good"),
        "{n}"
    );
    let sender = n["sent_by"].as_str().unwrap().to_string();
    assert_eq!(failed[1].1["sent_by"], sender.as_str());
    let sender_agent = agents.iter().find(|a| a.name == sender).unwrap();
    assert!(
        counter(
            sender_agent,
            "shoal_notifications_total{outcome=\"retried\"}"
        ) >= 2.0,
        "the refused and the redirected attempts were retried"
    );
    assert_eq!(
        counter(sender_agent, "shoal_notifications_total{outcome=\"sent\"}"),
        2.0
    );

    // A node dies: told once, by a live node.
    agents[2].stop(libc::SIGKILL);
    kill_instances(&agents[2].dir);
    wait_until("n2's death posted", || !hook.of("node.dead").is_empty());
    let live: Vec<&Agent> = agents[..2].iter().collect();
    wait_until("both live nodes saw n2 die", || all_saw(&live, "node.dead"));
    std::thread::sleep(Duration::from_secs(1));
    let dead = hook.of("node.dead");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1["event"]["node"], "n2");
    assert_ne!(dead[0].1["sent_by"], "n2");

    // A bad webhook is refused at start, saying why.
    let out = agent_output(
        &root.path().join("x"),
        "x",
        &agents[0].quic(),
        &["--notify-webhook", "ftp://example"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--notify-webhook") && err.contains("http"),
        "{err}"
    );
}
