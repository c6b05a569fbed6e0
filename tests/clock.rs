//! Clock skew on real agents: one agent runs an hour fast under libfaketime
//! (Debian's `faketime`, which `.ci/run` installs).

mod common;

use std::path::Path;

use common::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const HOUR_MS: i64 = 3_600_000;

fn get(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = call(agent.request("GET", path), None);
    (code, serde_json::from_str(&body).unwrap_or_default())
}

fn offset_of(agent: &Agent, name: &str) -> Option<i64> {
    let (_, nodes) = get(agent, "/v1/nodes");
    nodes
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)?
        .get("clock_offset_ms")?
        .as_i64()
}

/// The #11 probe: a node one hour fast moved every node's clock an hour
/// ahead. Now its peers measure its offset and refuse its versions; it
/// sees that it is the odd one out, says so on `/v1/health`, and refuses
/// writes with the reason; the others' writes keep their real time.
#[test]
fn a_node_an_hour_fast_is_reported_and_refuses_writes() {
    if !Path::new(LIBFAKETIME).exists() {
        panic!("{LIBFAKETIME} is missing: install Debian's faketime (.ci/run does)");
    }
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 2);
    let seed = agents[0].quic();
    let token = agents[0].token_file();
    agents.push(Agent::start_env(
        root.path(),
        "n2",
        Some(&seed),
        Some(&token),
        &[],
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", "+1h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_NO_CACHE", "1"),
        ],
    ));
    wait_until("every node sees three alive", || {
        agents.iter().all(|a| {
            a.nodes()
                .is_some_and(|n| n.iter().filter(|m| m.state == "alive").count() == 3)
        })
    });
    // The healthy nodes measure n2 about an hour ahead.
    wait_until("n0 measures n2's offset", || {
        offset_of(&agents[0], "n2").is_some_and(|ms| (ms - HOUR_MS).abs() < 5_000)
    });
    // n2 sees itself an hour off both peers: degraded, and says why.
    wait_until("n2 reports its own skew", || {
        let (code, body) = get(&agents[2], "/v1/health");
        code == 503 && body["problems"].to_string().contains("ahead of")
    });
    let job = job_file(
        root.path(),
        "web",
        "name = \"web\"\ntype = \"service\"\nreplicas = 1\n[task]\ncommand = \"sleep\"\nargs = [\"60\"]\n",
    );
    let job = job.to_str().unwrap();
    let (ok, _, err) = cli(&agents[2], &["run", "--detach", job]);
    assert!(!ok, "a skewed node accepted a write");
    assert!(err.contains("time sync"), "{err}");
    // A healthy node takes it, at its own time, not an hour ahead.
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (ok, _, err) = cli(&agents[0], &["run", "--detach", job]);
    assert!(ok, "{err}");
    let version = agents[0].job("web").expect("the job").hlc;
    let wall_ms: u64 = version
        .split(['.', '@'])
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("version `{version}`"));
    assert!(
        wall_ms < before_ms + 60_000,
        "the write's version {version} is ahead of real time ({before_ms})"
    );
    wait_until("web runs", || agents[1].count("web", "running", None) == 1);
    for a in &mut agents {
        a.stop(libc::SIGTERM);
    }
    for a in &agents {
        kill_instances(&a.dir);
    }
}
