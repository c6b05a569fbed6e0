//! Cron jobs with real agent processes on 127.0.0.1: each scheduled time
//! runs once, also when the node ranked to fire it is killed at that time.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn cron_job(name: &str, log: &Path, extra: &str) -> String {
    format!(
        r#"name = "{name}"
type = "cron"

[cron]
schedule = "*/10 * * * * *"
history = 2
{extra}

[task]
driver = "exec"
command = "sh"
args = ["-c", "echo $SHOAL_JOB $SHOAL_NODE >> {log}"]

[task.resources]
cpu = 50
memory = 16
"#,
        log = log.display()
    )
}

/// Runs written to the log: run name -> how many times it ran.
fn ran(log: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some(run) = line.split_whitespace().next() {
            *out.entry(run.to_string()).or_default() += 1;
        }
    }
    out
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The runs of `job` listed by `/v1/jobs` (batch jobs with `parent`).
fn listed_runs(agent: &Agent, job: &str) -> Vec<(String, String)> {
    let jobs: Vec<serde_json::Value> = agent
        .request("GET", "/v1/jobs")
        .call()
        .ok()
        .and_then(|r| r.into_json().ok())
        .unwrap_or_default();
    jobs.iter()
        .filter(|j| j["parent"].as_str() == Some(job))
        .map(|j| {
            (
                j["name"].as_str().unwrap_or_default().to_string(),
                j["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_cron_job_runs_each_time_once_even_when_the_firing_node_dies() {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    // Tasks may run as another user (nobody, under a root agent).
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = shared.join("runs.log");
    let mut agents = cluster(root.path(), 4);
    wait_all_alive(&agents);

    // Bad schedules and zones are refused with what to write.
    let bad = job_file(
        root.path(),
        "bad",
        &cron_job("bad", &log, "").replace("*/10 * * * * *", "every minute"),
    );
    let (ok, _, err) = cli(&agents[0], &["run", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("5 fields"), "{err}");
    let bad = job_file(
        root.path(),
        "bad",
        &cron_job("bad", &log, "time_zone = \"Mars/Olympus\""),
    );
    let (ok, _, err) = cli(&agents[0], &["run", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("IANA"), "{err}");

    // A service resubmitted as a cron job stops its copies: a cron job has
    // no slots (found in review).
    let service = job_file(
        root.path(),
        "tick",
        "name = \"tick\"\ntype = \"service\"\nreplicas = 2\n[task]\ncommand = \"sleep\"\nargs = [\"100000\"]\n[task.resources]\ncpu = 50\nmemory = 16\n",
    );
    let (ok, out, err) = cli(
        &agents[1],
        &["run", service.to_str().unwrap(), "--timeout", "30"],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(processes_once_started(root.path(), "tick", 2), 2);
    let file = job_file(root.path(), "tick", &cron_job("tick", &log, ""));
    let (ok, out, err) = cli(&agents[1], &["run", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("next run"), "{out}");
    wait_until("the service's copies stop", || {
        processes_of(root.path(), "tick") == 0
    });
    let (ok, out, err) = cli(&agents[2], &["cron", "next", "tick", "-n", "3"]);
    assert!(ok, "{out}{err}");
    let times: Vec<&str> = out.lines().collect();
    assert_eq!(times.len(), 3, "{out}");
    let parsed: Vec<i64> = times
        .iter()
        .map(|t| {
            humantime::parse_rfc3339(t)
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        })
        .collect();
    assert!(parsed.windows(2).all(|w| w[1] - w[0] == 10), "{out}");
    assert!(parsed.iter().all(|t| t % 10 == 0), "{out}");

    // Two scheduled times run, each once, as batch jobs named JOB@t.
    wait_until("two runs", || ran(&log).len() >= 2);
    let runs = ran(&log);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    for run in runs.keys() {
        let t: i64 = run.strip_prefix("tick@").unwrap().parse().unwrap();
        assert_eq!(t % 10, 0, "{run}");
    }
    wait_until("the runs listed as batch jobs with their parent", || {
        let listed = listed_runs(&agents[3], "tick");
        runs.keys()
            .all(|r| listed.iter().any(|(n, ty)| n == r && ty == "batch"))
    });

    // Kill the node ranked first for the next time, 1 s before it: the
    // time still runs once, by the next in rank.
    let next = (now_s() / 10 + 1) * 10;
    let next = if next - now_s() < 3 { next + 10 } else { next };
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let first = names
        .iter()
        .position(|n| {
            shoal_core::cron::fire_rank("tick", next, n, names.iter().map(String::as_str))
                == Some(0)
        })
        .unwrap();
    while now_s() < next - 1 {
        std::thread::sleep(Duration::from_millis(50));
    }
    agents[first].signal(9);
    let victim = agents[first].name.clone();
    eprintln!("killed {victim}, ranked first for tick@{next}");
    let survivor = (first + 1) % agents.len();
    let run = format!("tick@{next}");
    wait_until("the killed node's time ran", || {
        ran(&log).contains_key(&run)
    });
    let line = std::fs::read_to_string(&log).unwrap();
    assert!(
        !line.contains(&format!("{run} {victim}")),
        "ran on the dead node: {line}"
    );
    // The next time after it runs too, once.
    let after = format!("tick@{}", next + 10);
    wait_until("the time after it ran", || ran(&log).contains_key(&after));

    // A forced run starts now, whatever the schedule.
    let (ok, out, err) = cli(&agents[survivor], &["cron", "force", "tick"]);
    assert!(ok, "{out}{err}");
    let forced = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    assert!(forced.starts_with("tick@"), "{out}");
    wait_until("the forced run ran", || ran(&log).contains_key(&forced));

    // Each time ran once; history keeps two finished runs.
    let runs = ran(&log);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    wait_until("history keeps 2 finished runs", || {
        agents[survivor]
            .request("GET", "/v1/jobs/tick")
            .call()
            .ok()
            .and_then(|r| r.into_json::<serde_json::Value>().ok())
            .is_some_and(|s| {
                let runs = s["runs"].as_array().cloned().unwrap_or_default();
                let finished = runs.iter().filter(|r| r["state"] != "running").count();
                finished <= 2 && runs.iter().any(|r| r["state"] == "succeeded")
            })
    });
    let (ok, out, err) = cli(&agents[survivor], &["status", "tick"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("schedule */10 * * * * *"), "{out}");
    assert!(out.contains("succeeded"), "{out}");

    // Disabled: no scheduled run (a forced one still runs).
    let disabled = job_file(
        root.path(),
        "tick",
        &cron_job("tick", &log, "enabled = false"),
    );
    let (ok, out, err) = cli(&agents[survivor], &["run", disabled.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("disabled"), "{out}");
    // Times after the write do not run (one due as it was written may).
    let disabled_at = now_s();
    let until = (disabled_at / 10 + 2) * 10 + 2;
    while now_s() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    let late: Vec<String> = ran(&log)
        .into_keys()
        .filter(|r| r != &forced)
        .filter(|r| r["tick@".len()..].parse::<i64>().unwrap() > disabled_at)
        .collect();
    assert!(late.is_empty(), "a disabled job ran: {late:?}");

    // Stopping it removes its runs.
    let (ok, out, err) = cli(&agents[survivor], &["stop", "tick"]);
    assert!(ok, "{out}{err}");
    wait_until("its runs are gone", || {
        listed_runs(&agents[survivor], "tick").is_empty()
    });
    for a in agents.iter_mut() {
        if a.child.is_some() {
            a.stop(15);
        }
    }
    kill_instances(root.path());
}

#[test]
fn forbid_skips_a_time_while_a_run_runs_and_replace_stops_it() {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = shared.join("runs.log");
    let agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    // Each run takes 15 s, and a time comes every 10 s.
    let slow = |name: &str, concurrency: &str| {
        format!(
            r#"name = "{name}"
type = "cron"

[cron]
schedule = "*/10 * * * * *"
concurrency = "{concurrency}"

[task]
driver = "exec"
command = "sh"
args = ["-c", "echo $SHOAL_JOB start >> {log}; sleep 15"]
kill_timeout = "1s"

[task.resources]
cpu = 50
memory = 16
"#,
            log = log.display()
        )
    };
    for (name, c) in [("forbid", "forbid"), ("replace", "replace")] {
        let file = job_file(root.path(), name, &slow(name, c));
        let (ok, out, err) = cli(&agents[0], &["run", file.to_str().unwrap()]);
        assert!(ok, "{out}{err}");
    }
    let times = |job: &str| -> Vec<i64> {
        ran(&log)
            .into_keys()
            .filter_map(|r| r.strip_prefix(&format!("{job}@"))?.parse().ok())
            .collect()
    };
    // Both jobs' runs are in the log (they fire on one 10 s grid, so
    // replace's third and forbid's second run come at the same time).
    // The third time comes 20 to 30 s after the submission, by the
    // clock: the usual deadline leaves no room for a loaded machine
    // (seen failing in CI at 30 s).
    wait_until_within(
        Duration::from_secs(60),
        "three runs of replace and two of forbid",
        || times("replace").len() >= 3 && times("forbid").len() >= 2,
    );
    // forbid: the time 10 s after a run started found it running and was
    // skipped, so its runs are 20 s apart.
    let forbid = times("forbid");
    assert!(forbid.len() >= 2, "{forbid:?}");
    assert!(forbid.windows(2).all(|w| w[1] - w[0] >= 20), "{forbid:?}");
    // replace: every time ran, 10 s apart, each stopping the one before:
    // at most one run of it runs (a sleep of 15 s would otherwise overlap).
    let replace = times("replace");
    assert!(replace.windows(2).all(|w| w[1] - w[0] == 10), "{replace:?}");
    // 3 s into an interval a run without `replace` would still overlap
    // the one before (15 s each, 10 s apart): with it, one sleeps.
    while now_s() % 10 != 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let sleeping: usize = times("replace")
        .iter()
        .map(|t| processes_of(root.path(), &format!("replace@{t}")))
        .sum();
    assert_eq!(sleeping, 1, "{replace:?}");
    let mut agents = agents;
    for a in agents.iter_mut() {
        a.stop(15);
    }
    kill_instances(root.path());
}
