//! Health checks and job versions on real agents and real processes: an
//! HTTP server (busybox httpd) on a dynamic port, checked over HTTP and by
//! an exec check; a copy whose checks fail turns critical on every node
//! and is restarted; identical re-submits write nothing; history, revert
//! and compare-and-set writes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The instances of `job` as `agent` shows them.
fn instances(agent: &Agent, job: &str) -> Vec<serde_json::Value> {
    agent
        .request("GET", &format!("/v1/jobs/{job}"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
        .and_then(|v| v["instances"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn failing_checks_turn_a_copy_critical_everywhere_and_restart_it() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("both agents see each other", || {
        agents
            .iter()
            .all(|a| a.nodes().is_some_and(|n| n.len() == 2))
    });
    let site = Site::new("health");
    std::fs::write(site.path().join("ok"), "ok\n").unwrap();
    let ok = site.path().join("ok");
    let job = format!(
        r#"name = "web"
type = "service"
replicas = 2

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{site}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
type = "http"
port = "http"
path = "/ok"
interval = "200ms"
timeout = "150ms"
grace = "0s"
failures = 8
restart = true

[[task.check]]
name = "file"
type = "exec"
command = "/bin/busybox"
args = ["test", "-f", "{ok}"]
interval = "200ms"
timeout = "150ms"
grace = "0s"
failures = 2

[restart]
delay = "200ms"
max_delay = "1s"
"#,
        site = site.path().display(),
        ok = ok.display(),
    );
    let file = job_file(root.path(), "web", &job);
    // `shoal run` returns once every slot runs the version and passes.
    let (ok_run, out, err) = cli(&agents[0], &["run", file.to_str().unwrap()]);
    assert!(ok_run, "{out}{err}");
    assert!(out.contains("passing"), "{out}");
    for a in &agents {
        wait_until("both copies pass, seen from each agent", || {
            let slots = instances(a, "web");
            slots.len() == 2
                && slots
                    .iter()
                    .all(|s| s["health"] == "passing" && s["version"] == "v1")
        });
    }
    let (ok_status, out, err) = cli(&agents[1], &["status", "web"]);
    assert!(ok_status, "{err}");
    assert!(out.contains("HEALTH") && out.contains("passing"), "{out}");

    // The page the check asks for goes away: 404 for the http check, and
    // the exec check's file is missing. Each copy turns critical (seen
    // from the other agent too, by gossip), with why, and is restarted.
    let restarts_before: u32 = (0..2).map(|s| agents[0].restarts("web", s)).sum();
    std::fs::remove_file(site.path().join("ok")).unwrap();
    for a in &agents {
        wait_until("a copy shows critical with the reason", || {
            instances(a, "web").iter().any(|s| {
                s["health"] == "critical"
                    && s["check"]
                        .as_str()
                        .is_some_and(|c| c.contains("404") || c.contains("check file"))
            })
        });
    }
    wait_until("a critical copy is restarted", || {
        (0..2).map(|s| agents[0].restarts("web", s)).sum::<u32>() > restarts_before
    });

    // Back: the copies pass again.
    std::fs::write(site.path().join("ok"), "ok\n").unwrap();
    wait_until("both copies pass again", || {
        let slots = instances(&agents[1], "web");
        slots.len() == 2
            && slots
                .iter()
                .all(|s| s["health"] == "passing" && s["state"] == "running")
    });
    let (ok_stop, _, err) = cli(&agents[0], &["stop", "web"]);
    assert!(ok_stop, "{err}");
    for a in &agents {
        wait_until("no copy runs", || a.count("web", "running", None) == 0);
    }
}

#[test]
fn resubmits_history_revert_and_check_version() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 1);
    let a = &agents[0];
    let spec = |arg: &str, replicas: u32| {
        format!(
            "name = \"app\"\ntype = \"service\"\nreplicas = {replicas}\n\n[task]\ncommand = \"sleep\"\nargs = [\"{arg}\"]\n\n[task.resources]\ncpu = 10\nmemory = 8\n"
        )
    };
    let one = job_file(root.path(), "one", &spec("1000", 1));
    let two = job_file(root.path(), "two", &spec("2000", 2));
    let (ok, out, err) = cli(a, &["run", one.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("version v1"), "{out}");
    let run_before = instances(a, "app")[0]["node"].clone();
    // The same spec again: nothing written, the copy untouched.
    let (ok, out, err) = cli(a, &["run", "--detach", one.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("unchanged") && out.contains("v1"), "{out}");
    assert_eq!(a.job("app").unwrap().version, "v1");
    assert_eq!(instances(a, "app")[0]["node"], run_before);

    // A dry run first: exit 0 for the running spec, 1 for a change (with
    // what changes and where the new slot goes), 255 for a bad file.
    let plan = |file: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["plan", file.to_str().unwrap()])
            .env("SHOAL_ADDR", a.http())
            .env("SHOAL_DATA_DIR", &a.dir)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = plan(&one);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no change"), "{out}");
    let (code, out) = plan(&two);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("replicas") && out.contains("task.args"),
        "{out}"
    );
    assert!(out.contains("1 start, 1 replace"), "{out}");
    let bad = job_file(
        root.path(),
        "bad",
        "name = \"app\"\ntype = \"service\"\nreplicas = 0\n[task]\ncommand = \"sleep\"\n",
    );
    let (code, out) = plan(&bad);
    assert_eq!(code, Some(255), "{out}");
    assert!(out.contains("replicas"), "{out}");
    assert_eq!(
        a.job("app").unwrap().version,
        "v1",
        "a plan wrote something"
    );

    let (ok, out, err) = cli(a, &["run", two.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("version v2"), "{out}");
    // The history lists both, newest first, with what changed.
    let (ok, out, err) = cli(a, &["job", "history", "app"]);
    assert!(ok, "{err}");
    let v2 = out.find("v2").expect("v2 listed");
    let v1 = out.find("v1").expect("v1 listed");
    assert!(v2 < v1, "{out}");
    assert!(
        out.contains("replicas") && out.contains("task.args"),
        "{out}"
    );
    let versions: serde_json::Value = a
        .request("GET", "/v1/jobs/app/versions")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(versions[0]["version"], "v2");
    assert_eq!(versions[0]["current"], true);
    assert_eq!(versions[1]["spec"]["task"]["args"][0], "1000");

    // Back to v1's spec, as v3; the submitted spec reads back.
    let (ok, out, err) = cli(a, &["job", "revert", "app", "v1"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("v3"), "{out}");
    let job: serde_json::Value = a
        .request("GET", "/v1/jobs/app?spec=true")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(job["version"], "v3");
    assert_eq!(job["spec"]["task"]["args"][0], "1000");
    assert_eq!(job["spec"]["replicas"], 1);
    wait_until("v3 runs", || {
        let slots = instances(a, "app");
        slots.len() == 1 && slots[0]["version"] == "v3" && slots[0]["state"] == "running"
    });
    // A version it does not keep.
    let (ok, _, err) = cli(a, &["job", "revert", "app", "v99"]);
    assert!(!ok && err.contains("v99") && err.contains("v3"), "{err}");

    // Compare-and-set: refused when the job moved on, written when not.
    let (ok, _, err) = cli(
        a,
        &[
            "run",
            "--detach",
            "--check-version",
            "v2",
            two.to_str().unwrap(),
        ],
    );
    assert!(!ok, "a write against v2 went through at v3");
    assert!(err.contains("v3") && err.contains("moved on"), "{err}");
    assert_eq!(a.job("app").unwrap().version, "v3");
    let (ok, out, err) = cli(
        a,
        &[
            "run",
            "--detach",
            "--check-version",
            "v3",
            two.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("v4"), "{out}");
    let (code, body) = call(
        a.request("POST", "/v1/jobs?check_version=v3"),
        Some(&spec("5", 1)),
    );
    assert_eq!(code, 409, "{body}");
    let (ok, _, err) = cli(a, &["stop", "app"]);
    assert!(ok, "{err}");
}

/// Slots with a copy that runs and passes, per `/v1/instances` of `agent`,
/// and the versions of the live copies.
fn serving(agent: &Agent, job: &str) -> (usize, Vec<String>) {
    let all: Vec<serde_json::Value> = agent
        .request("GET", "/v1/instances")
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_json().ok())
        .unwrap_or_default();
    let mine: Vec<&serde_json::Value> = all.iter().filter(|i| i["job"] == job).collect();
    let slots: std::collections::BTreeSet<u64> = mine
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "passing")
        .filter_map(|i| i["slot"].as_u64())
        .collect();
    let versions = mine
        .iter()
        .filter(|i| i["state"] == "running" || i["state"] == "starting")
        .map(|i| i["version"].as_str().unwrap_or("-").to_string())
        .collect();
    (slots.len(), versions)
}

/// Agents on 127.0.0.1, one per port range, once they all see each other.
/// They share the address: disjoint port ranges keep an old and a new copy
/// of a slot (on two agents) from choosing one port.
fn served_cluster(root: &Path, ranges: &[&str]) -> Vec<Agent> {
    let first = Agent::start(root, "n0", None, None, &["--port-range", ranges[0]]);
    let (seed, token) = (first.quic(), first.token_file());
    let mut agents = vec![first];
    for (i, range) in ranges.iter().enumerate().skip(1) {
        agents.push(Agent::start(
            root,
            &format!("n{i}"),
            Some(&seed),
            Some(&token),
            &["--port-range", range],
        ));
    }
    wait_until("the agents see each other", || {
        agents
            .iter()
            .all(|a| a.nodes().is_some_and(|n| n.len() == ranges.len()))
    });
    agents
}

/// A busybox httpd service serving `site` on a dynamic port, checked over
/// HTTP on `/ok`, at release `version` (its env), with `update` settings.
fn served_job(name: &str, replicas: u32, site: &Site, version: &str, update: &str) -> String {
    format!(
        r#"name = "{name}"
type = "service"
replicas = {replicas}

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{site}"]
env = {{ RELEASE = "{version}" }}
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
type = "http"
port = "http"
path = "/ok"
interval = "200ms"
grace = "0s"
failures = 2

[update]
{update}"#,
        site = site.path().display()
    )
}

#[test]
fn a_rolling_update_keeps_every_slot_serving() {
    let root = tempfile::tempdir().unwrap();
    let agents = served_cluster(root.path(), &["23100-23149", "23150-23199", "23200-23249"]);
    let site = Site::new("roll");
    std::fs::write(site.path().join("ok"), "ok\n").unwrap();
    let job = |version: &str| {
        served_job(
            "roll",
            4,
            &site,
            version,
            "max_parallel = 1\nmin_healthy_time = \"500ms\"\n",
        )
    };
    let one = job_file(root.path(), "one", &job("1"));
    let (ok, out, err) = cli(&agents[0], &["run", one.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    wait_until("four slots serve v1", || serving(&agents[1], "roll").0 == 4);
    let two = job_file(root.path(), "two", &job("2"));
    let (ok, out, err) = cli(&agents[0], &["run", "--detach", two.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // Every sample until the update ends: four slots serve.
    let mut samples = 0;
    wait_until("every slot serves v2 alone", || {
        let (n, versions) = serving(&agents[1], "roll");
        samples += 1;
        assert!(
            n >= 4,
            "only {n} slots served during the update ({versions:?})"
        );
        n == 4 && versions.len() == 4 && versions.iter().all(|v| v == "v2")
    });
    assert!(
        samples > 5,
        "the update was not watched ({samples} samples)"
    );
    let (ok, _, err) = cli(&agents[0], &["stop", "roll"]);
    assert!(ok, "{err}");
}

/// `shoal deployment status` on `agent`, as JSON.
fn deployment(agent: &Agent, job: &str) -> serde_json::Value {
    let (ok, out, err) = cli(agent, &["deployment", "status", job, "--json"]);
    assert!(ok, "{out}{err}");
    serde_json::from_str(&out).expect("deployment JSON")
}

#[test]
fn canaries_wait_for_promotion_and_each_deployment_is_recorded() {
    let root = tempfile::tempdir().unwrap();
    let agents = served_cluster(root.path(), &["23300-23349", "23350-23399"]);
    let site = Site::new("canary");
    std::fs::write(site.path().join("ok"), "ok\n").unwrap();
    let job = |version: &str| {
        served_job(
            "canary",
            3,
            &site,
            version,
            "canary = 1\nmin_healthy_time = \"300ms\"\n",
        )
    };
    // The first version has no canaries; its deployment ends successful,
    // seen from each agent.
    let one = job_file(root.path(), "one", &job("1"));
    let (ok, out, err) = cli(&agents[0], &["run", one.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    for a in &agents {
        wait_until("v1's deployment is successful", || {
            let d = deployment(a, "canary");
            d["current"]["version"] == "v1" && d["current"]["state"] == "successful"
        });
    }
    let (ok, out, err) = cli(&agents[1], &["deployment", "promote", "canary"]);
    assert!(!ok, "nothing to promote: {out}");
    assert!(err.contains("no canaries waiting"), "{err}");

    // v2: `shoal run` returns once the canary is ready, the update waits.
    let two = job_file(root.path(), "two", &job("2"));
    let (ok, out, err) = cli(&agents[0], &["run", two.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("waiting for `shoal deployment promote canary`"),
        "{out}"
    );
    let d = deployment(&agents[1], "canary");
    wait_until("the other agent sees it wait", || {
        deployment(&agents[1], "canary")["current"]["awaiting_promotion"] == true
    });
    assert_eq!(d["current"]["version"], "v2", "{d}");
    assert_eq!(d["current"]["state"], "running", "{d}");
    // Only the canary slot moved, and it stays the only one.
    for _ in 0..10 {
        let (n, versions) = serving(&agents[1], "canary");
        assert_eq!(n, 3, "{versions:?}");
        let on_v2 = versions.iter().filter(|v| *v == "v2").count();
        assert_eq!(
            on_v2, 1,
            "before promotion only the canary runs v2: {versions:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Promoted: the other slots follow, and the deployment ends
    // successful; v1's is kept in the record.
    let (ok, out, err) = cli(&agents[1], &["deployment", "promote", "canary"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("promoted"), "{out}");
    for a in &agents {
        wait_until("v2's deployment is successful", || {
            let d = deployment(a, "canary");
            d["current"]["version"] == "v2"
                && d["current"]["state"] == "successful"
                && d["current"]["promoted"] == true
                && d["past"][0]["version"] == "v1"
                && d["past"][0]["state"] == "successful"
        });
    }
    // The marking coordinator saw the old copies gone; the others learn
    // it by gossip.
    for a in &agents {
        wait_until("every slot serves v2 alone", || {
            let (n, versions) = serving(a, "canary");
            n == 3 && versions.len() == 3 && versions.iter().all(|v| v == "v2")
        });
    }
    let (ok, out, err) = cli(&agents[0], &["deployment", "status", "canary"]);
    assert!(ok, "{err}");
    assert!(out.contains("canary v2: successful"), "{out}");
    let (ok, _, err) = cli(&agents[0], &["stop", "canary"]);
    assert!(ok, "{err}");
}
