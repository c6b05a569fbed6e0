//! System jobs with real agent processes on 127.0.0.1: one copy on every
//! node that qualifies, decided by each node for itself.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::*;

fn system_job(name: &str, version: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
type = "system"
{extra}
[task]
driver = "exec"
command = "sleep"
args = ["100000"]
env = {{ VERSION = "{version}" }}

[task.resources]
cpu = 50
memory = 16
"#
    )
}

/// Per node, the state and version of `job`'s row, as `agent` shows it.
fn rows(agent: &Agent, job: &str) -> BTreeMap<String, (String, Option<String>)> {
    let Some(s) = agent
        .request("GET", &format!("/v1/jobs/{job}"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
    else {
        return BTreeMap::new();
    };
    s["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["node"].as_str()?.to_string(),
                (
                    i["state"].as_str().unwrap_or_default().to_string(),
                    i["reason"].as_str().map(str::to_string),
                ),
            ))
        })
        .collect()
}

/// Every running agent shows `job` running on exactly `nodes`.
fn runs_on(agents: &[Agent], job: &str, nodes: &[&str]) -> bool {
    agents.iter().filter(|a| a.child.is_some()).all(|a| {
        let r = rows(a, job);
        r.len() == nodes.len()
            && nodes
                .iter()
                .all(|n| r.get(*n).is_some_and(|(s, _)| s == "running"))
    })
}

#[test]
fn a_system_job_runs_once_on_every_node_that_qualifies_and_follows_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let zone = |z: &str| format!("zone={z}");
    let (za, zb) = (zone("a"), zone("b"));
    let first = Agent::start(root.path(), "n0", None, None, &["--label", &za]);
    let (seed, token) = (first.quic(), first.token_file());
    let mut agents = vec![first];
    for (name, z) in [("n1", &za), ("n2", &zb)] {
        agents.push(Agent::start(
            root.path(),
            name,
            Some(&seed),
            Some(&token),
            &["--label", z],
        ));
    }
    wait_until("3 alive", || {
        agents.iter().all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.iter().filter(|n| n.state == "alive").count() == 3)
        })
    });

    // One job on every node, one only where zone = a; `shoal run` waits
    // for every node that qualifies.
    let all = job_file(root.path(), "logship", &system_job("logship", "v1", ""));
    let (ok, out, err) = cli(
        &agents[0],
        &["run", all.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("running on 3 node(s)"), "{out}");
    let only_a = job_file(
        root.path(),
        "monitor",
        &system_job(
            "monitor",
            "v1",
            "[[constraints]]\nlabel = \"zone\"\nop = \"=\"\nvalue = \"a\"\n",
        ),
    );
    let (ok, out, err) = cli(
        &agents[2],
        &["run", only_a.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    wait_until("logship on every node, monitor on zone a", || {
        runs_on(&agents, "logship", &["n0", "n1", "n2"])
            && runs_on(&agents, "monitor", &["n0", "n1"])
    });
    assert_eq!(processes_once_started(root.path(), "logship", 3), 3);
    assert_eq!(processes_once_started(root.path(), "monitor", 2), 2);
    // A system job has no replicas to scale.
    let (code, body) = call(
        agents[0].request("POST", "/v1/jobs/logship/scale"),
        Some(r#"{"replicas": 5}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("system job"), "{body}");

    // A node that joins runs both (it is in zone a).
    let joined_at = Instant::now();
    agents.push(Agent::start(
        root.path(),
        "n3",
        Some(&seed),
        Some(&token),
        &["--label", &za],
    ));
    wait_until("n3 runs both", || {
        runs_on(&agents, "logship", &["n0", "n1", "n2", "n3"])
            && runs_on(&agents, "monitor", &["n0", "n1", "n3"])
    });
    eprintln!(
        "a joining node ran its system jobs {:.2} s after its agent started",
        joined_at.elapsed().as_secs_f64()
    );
    assert_eq!(processes_of(root.path(), "logship"), 4);

    // A job that fits no node: every node says why, visible at every node.
    let big = job_file(
        root.path(),
        "huge",
        &system_job("huge", "v1", "").replace("memory = 16", "memory = 60000000"),
    );
    let (ok, out, err) = cli(
        &agents[0],
        &["run", big.to_str().unwrap(), "--timeout", "30"],
    );
    assert!(!ok, "a system job no node can run is reported: {out}{err}");
    assert!(err.contains("cannot run it"), "{err}");
    wait_until("every node shows why huge runs nowhere", || {
        agents.iter().all(|a| {
            let r = rows(a, "huge");
            r.len() == 4
                && r.values().all(|(s, why)| {
                    s == "pending" && why.as_deref().is_some_and(|w| w.contains("memory"))
                })
        })
    });
    assert_eq!(processes_of(root.path(), "huge"), 0);

    // Logs: a system job's copies are all slot 0, so another node's copy
    // is asked for by node (this node's own is the default).
    let (ok, _, err) = cli(&agents[0], &["logs", "huge"]);
    assert!(!ok && err.contains("--node"), "{err}");
    let (ok, out, err) = cli(&agents[0], &["logs", "logship", "--node", "n3"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&agents[0], &["logs", "logship", "--node", "n9"]);
    assert!(!ok && err.contains("n9 holds no copy"), "{err}");

    // A new version rolls node by node, and every node ends on it.
    let v2 = job_file(root.path(), "logship-v2", &system_job("logship", "v2", ""));
    // The plan: every node replaces its copy (exit 1: something changes).
    let (ok, out, err) = cli(&agents[1], &["plan", v2.to_str().unwrap()]);
    assert!(!ok && err.is_empty(), "{out}{err}");
    assert!(
        out.contains("slots: 0 start, 4 replace, 0 stop, 0 keep"),
        "{out}"
    );
    let (ok, out, err) = cli(
        &agents[1],
        &["run", v2.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("v2 running on 4 node(s)"), "{out}");
    assert_eq!(processes_of(root.path(), "logship"), 4);

    // A version that fits no node stops max_parallel (1) old copies, not
    // every one: the node that stopped its copy and cannot run the new one
    // counts as down. Going back restarts it there at once.
    let v3 = job_file(
        root.path(),
        "logship-v3",
        &system_job("logship", "v3", "").replace("memory = 16", "memory = 60000000"),
    );
    let (ok, out, err) = cli(&agents[0], &["run", v3.to_str().unwrap(), "--detach"]);
    assert!(ok, "{out}{err}");
    wait_until("a node says v3 does not fit it", || {
        rows(&agents[0], "logship")
            .values()
            .any(|(s, why)| s == "pending" && why.as_deref().is_some_and(|w| w.contains("memory")))
    });
    // Watched for 3 s: no second old copy stops.
    let until = Instant::now() + std::time::Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            processes_of(root.path(), "logship"),
            3,
            "one old copy down at most"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (ok, out, err) = cli(&agents[0], &["job", "revert", "logship", "v2"]);
    assert!(ok, "{out}{err}");
    wait_until("logship back on 4 nodes", || {
        processes_of(root.path(), "logship") == 4
            && runs_on(&agents, "logship", &["n0", "n1", "n2", "n3"])
    });

    // A node that stops qualifying stops its copy: n1's agent killed (its
    // instances outlive it) and back in zone b stops the monitor it
    // adopted, and keeps logship.
    agents[1].stop(libc::SIGKILL);
    agents[1] = Agent::start(
        root.path(),
        "n1",
        Some(&seed),
        Some(&token),
        &["--label", &zb],
    );
    wait_until("monitor only on n0 and n3", || {
        runs_on(&agents, "monitor", &["n0", "n3"])
            && runs_on(&agents, "logship", &["n0", "n1", "n2", "n3"])
            && processes_of(root.path(), "monitor") == 2
    });
    assert_eq!(processes_of(root.path(), "logship"), 4);

    // A node killed: its copy goes with it, nobody replaces it.
    agents[2].stop(libc::SIGKILL);
    kill_instances(&agents[2].dir);
    wait_until("n2 gone from logship everywhere", || {
        runs_on(&agents, "logship", &["n0", "n1", "n3"])
    });

    // Stopped: gone from every node.
    let (ok, out, err) = cli(&agents[0], &["stop", "logship"]);
    assert!(ok, "{out}{err}");
    wait_until("logship stopped everywhere", || {
        processes_of(root.path(), "logship") == 0
    });
}
