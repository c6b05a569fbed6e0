//! The `docker` driver against the real Docker Engine of this machine, with
//! real agent processes on 127.0.0.1. No registry is reachable: the test
//! image is made locally by `scripts/test-image.sh` (`docker import` of a
//! tarball holding Debian's static busybox; `.ci/run` installs
//! busybox-static).
//!
//! Skips, saying why, only where no Docker Engine answers.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use common::*;

const IMAGE: &str = "shoal-test/busybox:1";

/// `docker <args>`: (success, stdout).
fn docker(args: &[&str]) -> (bool, String) {
    match Command::new("docker").args(args).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Whether an Engine answers; prints why not.
fn engine() -> bool {
    let (ok, out) = docker(&["version", "--format", "{{.Server.Version}}"]);
    if !ok {
        eprintln!("SKIPPED: no Docker Engine answers here: {}", out.trim());
    }
    ok
}

/// Makes the test image once per test binary if it is missing
/// (`scripts/test-image.sh`).
fn ensure_image() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-image.sh");
        let out = Command::new(&script)
            .arg(IMAGE)
            .output()
            .expect("run test-image.sh");
        assert!(
            out.status.success(),
            "cannot make {IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Containers of `job` (label filter) as (slot, node, run, running).
fn containers(job: &str) -> Vec<(u32, String, String, bool)> {
    let (ok, out) = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=shoal.job={job}"),
        "--format",
        "{{.Label \"shoal.slot\"}} {{.Label \"shoal.node\"}} {{.Label \"shoal.run\"}} {{.State}}",
    ]);
    assert!(ok, "docker ps: {out}");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.to_string(),
                f.get(2)?.to_string(),
                *f.get(3)? == "running",
            ))
        })
        .collect()
}

fn running_containers(job: &str) -> Vec<(u32, String, String)> {
    containers(job)
        .into_iter()
        .filter(|c| c.3)
        .map(|(s, n, r, _)| (s, n, r))
        .collect()
}

/// Removes every container of these jobs (also when a test fails).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for job in &self.0 {
            let (_, ids) = docker(&["ps", "-aq", "--filter", &format!("label=shoal.job={job}")]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                docker(&args);
            }
        }
    }
}

/// Every slot of `job` runs as exactly one container, the API of `agent`
/// agrees, and no slot runs on `not_on`.
fn one_container_per_slot(agent: &Agent, job: &str, replicas: u32, not_on: Option<&str>) -> bool {
    let running = running_containers(job);
    let mut per_slot: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (slot, node, _) in &running {
        per_slot.entry(*slot).or_default().push(node);
    }
    per_slot.len() == replicas as usize
        && per_slot.values().all(|nodes| nodes.len() == 1)
        && per_slot
            .values()
            .all(|nodes| not_on.is_none_or(|n| nodes[0] != n))
        && agent.count(job, "running", not_on) == replicas as usize
}

/// The issue's minimal file, as it is.
const CWEB: &str = r#"name = "cweb"
type = "service"
replicas = 3

[task]
driver = "docker"
image = "shoal-test/busybox:1"
command = "sleep"
args = ["100000"]
"#;

/// A job only node n1 may run (so it waits for n1 while n1 is down).
const PINNED: &str = r#"name = "cpinned"
type = "service"
replicas = 1

[task]
driver = "docker"
image = "shoal-test/busybox:1"
command = "sh"
args = ["-c", "echo hello from slot $SHOAL_SLOT; sleep 100000"]

[[constraints]]
label = "pin"
op = "="
value = "yes"
"#;

fn docker_cluster(root: &Path) -> Vec<Agent> {
    let first = Agent::start(root, "n0", None, None, &[]);
    let seed = first.quic();
    let token = first.token_file();
    let n1 = Agent::start(
        root,
        "n1",
        Some(&seed),
        Some(&token),
        &["--label", "pin=yes"],
    );
    let n2 = Agent::start(root, "n2", Some(&seed), Some(&token), &[]);
    let agents = vec![first, n1, n2];
    wait_until("3 alive with docker", || {
        agents.iter().all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.iter().filter(|n| n.state == "alive").count() == 3)
        })
    });
    agents
}

#[test]
fn containers_run_move_on_agent_kill_and_are_adopted_or_removed_on_restart() {
    if !engine() {
        return;
    }
    ensure_image();
    let _cleanup = Cleanup(vec!["cweb".into(), "cpinned".into()]);
    let root = tempfile::tempdir().unwrap();
    let mut agents = docker_cluster(root.path());

    // The minimal file runs as 3 containers, one per slot.
    let file = job_file(root.path(), "cweb", CWEB);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", file.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    let pinned = job_file(root.path(), "cpinned", PINNED);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", pinned.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    wait_until("3 cweb containers and 1 cpinned on n1", || {
        one_container_per_slot(&agents[0], "cweb", 3, None)
            && one_container_per_slot(&agents[0], "cpinned", 1, None)
    });
    assert!(running_containers("cpinned").iter().all(|c| c.1 == "n1"));

    // Logs come through the Engine API, from any node.
    let (ok, out, err) = cli(&agents[2], &["logs", "cpinned", "--slot", "0"]);
    assert!(ok && out.contains("hello from slot 0"), "{out}{err}");

    // SIGKILL n1's agent alone: its containers keep running, its cweb
    // slots start as containers elsewhere.
    let victim = "n1";
    let pinned_before = running_containers("cpinned");
    let had_cweb = running_containers("cweb").iter().any(|c| c.1 == victim);
    agents[1].stop(libc::SIGKILL);
    wait_until("n1 dead and its cweb slots running elsewhere", || {
        all_see(&agents, victim, "dead")
            && agents[0].count("cweb", "running", Some(victim)) == 3
            && running_containers("cweb")
                .iter()
                .filter(|c| c.1 != victim)
                .count()
                == 3
    });
    // The pinned job has nowhere else to go.
    assert_eq!(agents[0].count("cpinned", "running", Some(victim)), 0);

    // Restart n1 with the same data dir: its stale cweb containers are
    // removed, the still-desired cpinned container is adopted (the same
    // container, not a new one), and nothing is duplicated.
    let seed = agents[0].quic();
    let token = agents[0].token_file();
    agents[1] = Agent::start(
        root.path(),
        "n1",
        Some(&seed),
        Some(&token),
        &["--label", "pin=yes"],
    );
    wait_until("n1 back, one container per slot, pinned adopted", || {
        one_container_per_slot(&agents[0], "cweb", 3, None)
            && running_containers("cweb").len() == 3
            && one_container_per_slot(&agents[0], "cpinned", 1, None)
    });
    if had_cweb {
        assert!(
            running_containers("cweb").iter().all(|c| c.1 != victim),
            "n1's stale containers must go: {:?}",
            running_containers("cweb")
        );
    }
    assert_eq!(
        running_containers("cpinned"),
        pinned_before,
        "the pinned container is adopted, not replaced"
    );

    // Stopping the job removes its containers.
    let (ok, out, err) = cli(&agents[0], &["stop", "cweb"]);
    assert!(ok, "{out}{err}");
    wait_until("no cweb container left", || containers("cweb").is_empty());
}

#[test]
fn a_failing_container_restarts_by_policy_and_a_missing_image_fails_clearly() {
    if !engine() {
        return;
    }
    ensure_image();
    let _cleanup = Cleanup(vec!["cfail".into(), "cmissing".into()]);
    let root = tempfile::tempdir().unwrap();
    let agents = [Agent::start(root.path(), "n0", None, None, &[])];

    let failing = r#"name = "cfail"
type = "service"
replicas = 1

[task]
driver = "docker"
image = "shoal-test/busybox:1"
command = "sh"
args = ["-c", "sleep 0.2; exit 3"]

[restart]
delay = "100ms"
max_delay = "200ms"
"#;
    let file = job_file(root.path(), "cfail", failing);
    let (ok, out, err) = cli(&agents[0], &["run", file.to_str().unwrap(), "--detach"]);
    assert!(ok, "{out}{err}");
    wait_until("the failing container restarted at least twice", || {
        agents[0].restarts("cfail", 0) >= 2
    });
    // Restarts are new containers; the ended ones are removed, so at most
    // the current run and the one being replaced exist.
    assert!(containers("cfail").len() <= 2, "{:?}", containers("cfail"));

    let missing = r#"name = "cmissing"
type = "service"
replicas = 1

[task]
driver = "docker"
image = "shoal-test/not-here:1"
command = "true"
"#;
    let file = job_file(root.path(), "cmissing", missing);
    let (ok, out, err) = cli(&agents[0], &["run", file.to_str().unwrap(), "--detach"]);
    assert!(ok, "{out}{err}");
    wait_until("the slot fails with a message about the image", || {
        agents[0].job("cmissing").is_some_and(|j| {
            j.instances.iter().any(|i| {
                i.state == "failed"
                    && i.reason.as_deref().is_some_and(|m| {
                        m.contains("shoal-test/not-here:1") && m.contains("cannot be pulled")
                    })
            })
        })
    });
    let (ok, out, err) = cli(&agents[0], &["status", "cmissing"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("cannot be pulled"), "status shows why: {out}");
    assert!(containers("cmissing").is_empty());
}

/// Docker's API cannot stop an exec; a check that overruns its timeout is
/// killed by the agent, so checks never pile up in the container.
#[test]
fn an_overrunning_docker_exec_check_is_killed() {
    if !engine() {
        return;
    }
    ensure_image();
    let _cleanup = Cleanup(vec!["cslow".into()]);
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path(), "n0", None, None, &[]);
    let job = r#"name = "cslow"
type = "service"
replicas = 1

[task]
driver = "docker"
image = "shoal-test/busybox:1"
command = "sleep"
args = ["100000"]

[[task.check]]
type = "exec"
command = "sleep"
args = ["4321"]
interval = "200ms"
timeout = "200ms"
grace = "0s"
failures = 1
"#;
    let file = job_file(root.path(), "cslow", job);
    let (ok, out, err) = cli(&agent, &["run", file.to_str().unwrap(), "--detach"]);
    assert!(ok, "{out}{err}");
    let overrun = |agent: &Agent| {
        agent
            .request("GET", "/v1/jobs/cslow")
            .call()
            .ok()
            .and_then(|r| r.into_json::<serde_json::Value>().ok())
            .is_some_and(|v| {
                v["instances"].as_array().is_some_and(|is| {
                    is.iter().any(|i| {
                        i["health"] == "critical"
                            && i["check"].as_str().is_some_and(|c| c.contains("timed out"))
                    })
                })
            })
    };
    wait_until("the check times out", || overrun(&agent));
    // Watched over 15 more checks: at most the current one runs.
    let sleeps = || {
        let (_, ids) = docker(&["ps", "-q", "--filter", "label=shoal.job=cslow"]);
        let id = ids
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let (_, top) = docker(&["top", &id]);
        top.lines().filter(|l| l.contains("sleep 4321")).count()
    };
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    while std::time::Instant::now() < until {
        most = most.max(sleeps());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(most <= 2, "overrunning checks piled up: {most} at once");
    assert!(overrun(&agent), "still critical");
}
