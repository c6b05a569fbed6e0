//! The scheduling core with real agent processes on 127.0.0.1.

mod common;

use common::*;

const WEB: &str = r#"name = "web"
type = "service"
replicas = 5

[task]
driver = "exec"
command = "sleep"
args = ["100000"]

[task.resources]
cpu = 100
memory = 32
"#;

fn running_everywhere(agents: &[Agent], job: &str, n: usize, not_on: Option<&str>) -> bool {
    agents
        .iter()
        .filter(|a| a.child.is_some())
        .all(|a| a.count(job, "running", not_on) == n)
}

#[test]
fn service_runs_survives_a_node_kill_scales_and_stops() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 5);
    wait_all_alive(&agents);

    // Submitted at A, every replica runs (and `shoal run` waits for it).
    let file = job_file(root.path(), "web", WEB);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", file.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("all 5 slots running"), "{out}");
    wait_until("every node sees 5 running", || {
        running_everywhere(&agents, "web", 5, None)
    });

    // SIGKILL a node holding replicas (not the seed): they run elsewhere.
    let job = agents[0].job("web").unwrap();
    let victim = job
        .instances
        .iter()
        .filter_map(|i| i.node.clone())
        .find(|n| n != "n0")
        .unwrap();
    let vi = agents.iter().position(|a| a.name == victim).unwrap();
    agents[vi].stop(libc::SIGKILL);
    kill_instances(&agents[vi].dir); // the machine went with it
    wait_until("the lost slots run elsewhere", || {
        running_everywhere(&agents, "web", 5, Some(&victim))
    });

    // Submit at another node while the first is dead.
    agents[0].stop(libc::SIGKILL);
    kill_instances(&agents[0].dir);
    let other = agents.iter().position(|a| a.child.is_some()).unwrap();
    let batchy = WEB
        .replace("name = \"web\"", "name = \"web2\"")
        .replace("replicas = 5", "replicas = 3");
    let file2 = job_file(root.path(), "web2", &batchy);
    let (ok, out, err) = cli(
        &agents[other],
        &["run", file2.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    wait_until("web2 runs, web recovered again", || {
        running_everywhere(&agents, "web2", 3, None)
            && running_everywhere(&agents, "web", 5, Some("n0"))
    });

    // Scale up and down.
    let (ok, out, err) = cli(&agents[other], &["scale", "web", "8"]);
    assert!(ok, "{out}{err}");
    wait_until("8 running", || running_everywhere(&agents, "web", 8, None));
    let (ok, out, err) = cli(&agents[other], &["scale", "web", "2"]);
    assert!(ok, "{out}{err}");
    wait_until("2 running, the rest stopped", || {
        agents.iter().filter(|a| a.child.is_some()).all(|a| {
            a.job("web").is_some_and(|j| {
                j.replicas == 2
                    && j.instances.len() == 2
                    && j.instances.iter().all(|i| i.state == "running")
            })
        })
    });
    wait_until("2 processes of web left", || {
        processes_of(root.path(), "web") == 2
    });

    // Stop: no copy anywhere.
    let (ok, out, err) = cli(&agents[other], &["stop", "web"]);
    assert!(ok, "{out}{err}");
    wait_until("web stopped everywhere", || {
        agents.iter().filter(|a| a.child.is_some()).all(|a| {
            a.job("web")
                .is_some_and(|j| j.replicas == 0 && j.instances.is_empty())
        })
    });
    // ... and no process left behind.
    wait_until("no process of web left", || {
        processes_of(root.path(), "web") == 0
    });
    let (ok, _, err) = cli(&agents[other], &["stop", "web"]);
    assert!(!ok && err.contains("no job named"), "{err}");
}

#[test]
fn batch_runs_each_slot_once_and_state_survives_a_full_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    let runs = root.path().join("runs.log");
    let batch = format!(
        "name = \"crunch\"\ntype = \"batch\"\nreplicas = 6\n[task]\ncommand = \"sh\"\nargs = [\"-c\", \"echo $SHOAL_SLOT >> {}; sleep 0.2\"]\n# It writes into the test's own directory.\nuser = \"root\"\n",
        runs.display()
    );
    let file = job_file(root.path(), "crunch", &batch);
    let (ok, out, err) = cli(
        &agents[1],
        &["run", file.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("6 of 6 slots completed"), "{out}");
    let web = job_file(
        root.path(),
        "web",
        &WEB.replace("replicas = 5", "replicas = 3"),
    );
    let (ok, out, err) = cli(
        &agents[2],
        &["run", web.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    wait_until("every node knows the completions", || {
        agents
            .iter()
            .all(|a| a.count("crunch", "completed", None) == 6)
    });

    // Each slot ran exactly once.
    let mut slots: Vec<u32> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    slots.sort();
    if slots != (0..6).collect::<Vec<_>>() {
        for a in &agents {
            eprintln!(
                "---- {}\n{}",
                a.name,
                a.stderr()
                    .lines()
                    .filter(|l| !l.contains("member state"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert_eq!(slots, (0..6).collect::<Vec<_>>());

    // Restart every node (graceful stop, same data dirs): jobs and
    // completions are still there, the service runs again, and no batch
    // slot runs again.
    for a in agents.iter_mut() {
        a.stop(libc::SIGTERM);
    }
    let seed_dir_token = root.path().join("n0").join("join-token");
    let mut restarted = vec![Agent::start(root.path(), "n0", None, None, &[])];
    let seed = restarted[0].quic();
    for i in 1..3 {
        restarted.push(Agent::start(
            root.path(),
            &format!("n{i}"),
            Some(&seed),
            Some(&seed_dir_token),
            &[],
        ));
    }
    wait_until("the service runs again after the restart", || {
        running_everywhere(&restarted, "web", 3, None)
    });
    wait_until("completions survived", || {
        restarted
            .iter()
            .all(|a| a.count("crunch", "completed", None) == 6)
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        6,
        "a completed batch slot ran again"
    );
}

#[test]
fn bad_job_files_are_refused_and_concurrent_submissions_converge() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    wait_all_alive(&agents);

    let bad = job_file(
        root.path(),
        "bad",
        &WEB.replace("replicas = 5", "replicas = 0"),
    );
    let (ok, _, err) = cli(&agents[0], &["run", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("line 3") && err.contains("replicas"), "{err}");
    let typed = job_file(
        root.path(),
        "typed",
        &WEB.replace("replicas = 5", "replicas = \"three\""),
    );
    let (ok, _, err) = cli(&agents[0], &["run", typed.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("line 3: replicas: expected an integer, found the string \"three\""),
        "a type error names the line and the field: {err}"
    );
    let typo = job_file(root.path(), "typo", &WEB.replace("command =", "comand ="));
    let (ok, _, err) = cli(&agents[0], &["run", typo.to_str().unwrap()]);
    assert!(!ok && err.contains("comand"), "{err}");
    let (ok, out, _) = cli(&agents[0], &["status", "--json"]);
    assert!(ok);
    assert_eq!(out.trim(), "[]", "a refused file changed nothing");

    // The same job submitted at two nodes at once, with different replica
    // counts: every node ends on one version.
    let a = job_file(
        root.path(),
        "a",
        &WEB.replace("replicas = 5", "replicas = 2"),
    );
    let b = job_file(
        root.path(),
        "b",
        &WEB.replace("replicas = 5", "replicas = 4"),
    );
    let (pa, pb) = (
        a.to_str().unwrap().to_string(),
        b.to_str().unwrap().to_string(),
    );
    let (h0, h1) = (agents[0].http(), agents[1].http());
    let (d0, d1) = (agents[0].dir.clone(), agents[1].dir.clone());
    let t1 = std::thread::spawn(move || {
        std::process::Command::new(BIN)
            .args(["run", "--detach", &pa])
            .env("SHOAL_ADDR", h0)
            .env("SHOAL_DATA_DIR", d0)
            .output()
            .unwrap()
    });
    let t2 = std::thread::spawn(move || {
        std::process::Command::new(BIN)
            .args(["run", "--detach", &pb])
            .env("SHOAL_ADDR", h1)
            .env("SHOAL_DATA_DIR", d1)
            .output()
            .unwrap()
    });
    assert!(t1.join().unwrap().status.success());
    assert!(t2.join().unwrap().status.success());
    wait_until("one version everywhere, and it runs", || {
        let jobs: Vec<JobStatus> = agents.iter().filter_map(|a| a.job("web")).collect();
        jobs.len() == 3
            && jobs
                .iter()
                .all(|j| j.hlc == jobs[0].hlc && j.replicas == jobs[0].replicas)
            && running_everywhere(&agents, "web", jobs[0].replicas as usize, None)
    });
}

#[test]
fn a_node_frozen_until_declared_dead_gives_up_its_replaced_copies() {
    let root = tempfile::tempdir().unwrap();

    let mut agents = cluster(root.path(), 3);
    wait_until("3 alive", || {
        all_see(&agents, "n1", "alive") && all_see(&agents, "n2", "alive")
    });
    let text = WEB
        .replace("name = \"web\"", "name = \"frozen\"")
        .replace("replicas = 5", "replicas = 6");
    let file = job_file(root.path(), "frozen", &text);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", file.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    let victim = agents[0]
        .job("frozen")
        .unwrap()
        .instances
        .iter()
        .filter_map(|i| i.node.clone())
        .find(|n| n != "n0")
        .unwrap();
    let vi = agents.iter().position(|a| a.name == victim).unwrap();

    // Freeze it (agent only: its processes keep running) until the others
    // declare it dead and run its slots themselves.
    agents[vi].signal(libc::SIGSTOP);
    wait_until("the frozen node's slots run elsewhere", || {
        all_see(&agents, &victim, "dead")
            && agents[0].count("frozen", "running", Some(&victim)) == 6
    });
    // Long enough for the node to notice it was stalled.
    std::thread::sleep(std::time::Duration::from_secs(4));
    agents[vi].signal(libc::SIGCONT);

    // Back: its old copies go, the replacements stay, one process a slot.
    wait_until("one copy a slot, none on the frozen node", || {
        processes_of(root.path(), "frozen") == 6
            && agents
                .iter()
                .all(|a| a.count("frozen", "running", Some(&victim)) == 6)
    });
}

/// The slot views of `job` at every agent, if every agent has it.
fn views_everywhere(agents: &[Agent], job: &str) -> Option<Vec<JobStatus>> {
    let v: Vec<JobStatus> = agents.iter().filter_map(|a| a.job(job)).collect();
    (v.len() == agents.len()).then_some(v)
}

#[test]
fn job_rules_hold_and_a_slot_that_cannot_be_placed_says_why_at_every_node() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    wait_all_alive(&agents);

    // A write is answered once a second node has it on its disk: with
    // every peer up that takes a round trip, not the 2 s after which a
    // write is answered without a peer's confirmation.
    let started = std::time::Instant::now();
    agents[2]
        .post(
            "/v1/jobs",
            &WEB.replace("name = \"web\"", "name = \"quick\"")
                .replace("replicas = 5", "replicas = 1"),
        )
        .expect("accepted");
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(1500),
        "a write waited {took:?}: its second copy was never confirmed"
    );

    // Distinct hosts, 4 replicas, 3 nodes: three run on three nodes, the
    // fourth waits and every node says why.
    let distinct = WEB
        .replace("name = \"web\"", "name = \"spread\"")
        .replace("replicas = 5", "replicas = 4\ndistinct_hosts = true");
    let file = job_file(root.path(), "spread", &distinct);
    let (ok, out, err) = cli(&agents[1], &["run", "--detach", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    wait_until(
        "3 of 4 running on 3 nodes, the last pending with its reason everywhere",
        || {
            views_everywhere(&agents, "spread").is_some_and(|views| {
                views.iter().all(|v| {
                    let running: Vec<&SlotView> = v
                        .instances
                        .iter()
                        .filter(|i| i.state == "running")
                        .collect();
                    let nodes: std::collections::BTreeSet<_> =
                        running.iter().filter_map(|i| i.node.clone()).collect();
                    let pending: Vec<&SlotView> = v
                        .instances
                        .iter()
                        .filter(|i| i.state == "pending")
                        .collect();
                    running.len() == 3
                        && nodes.len() == 3
                        && pending.len() == 1
                        && pending[0]
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.contains("distinct_hosts"))
                })
            })
        },
    );
    // It backs off: attempts grow slowly, not several times a second.
    let attempts = |a: &Agent| {
        a.job("spread")
            .and_then(|j| {
                j.instances
                    .iter()
                    .find(|i| i.state == "pending")
                    .map(|i| i.attempts)
            })
            .unwrap_or(0)
    };
    let before = agents.iter().map(attempts).max().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let after = agents.iter().map(attempts).max().unwrap();
    assert!(before >= 1, "the pending slot shows its attempts");
    assert!(
        after - before <= 3,
        "a slot that cannot be placed is retried with backoff: {before} then {after} attempts in 4 s"
    );
    assert_eq!(
        processes_of(root.path(), "spread"),
        3,
        "three copies, one per node"
    );

    // A host port taken on every node by another job: the new job waits
    // with the port named, at every node.
    let holder = WEB
        .replace("name = \"web\"", "name = \"porter\"")
        .replace("replicas = 5", "replicas = 3")
        .replace(
            "args = [\"100000\"]",
            "args = [\"100000\"]\nports = { http = 18080 }",
        );
    let file = job_file(root.path(), "porter", &holder);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", file.to_str().unwrap(), "--timeout", "30"],
    );
    assert!(ok, "{out}{err}");
    let late = holder
        .replace("name = \"porter\"", "name = \"late\"")
        .replace("replicas = 3", "replicas = 1");
    let file = job_file(root.path(), "late", &late);
    let (ok, out, err) = cli(&agents[2], &["run", "--detach", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    wait_until("the late job waits for port 18080, everywhere", || {
        views_everywhere(&agents, "late").is_some_and(|views| {
            views.iter().all(|v| {
                v.instances.len() == 1
                    && v.instances[0].state == "pending"
                    && v.instances[0]
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains("port 18080"))
            })
        })
    });
    assert_eq!(processes_of(root.path(), "late"), 0);

    // A program that cannot start: failed, with why, at every node.
    let broken = WEB
        .replace("name = \"web\"", "name = \"broken\"")
        .replace("replicas = 5", "replicas = 1")
        .replace("command = \"sleep\"", "command = \"/no/such/program\"");
    let file = job_file(root.path(), "broken", &broken);
    let (ok, out, err) = cli(&agents[0], &["run", "--detach", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    wait_until(
        "the broken job shows failed with its reason everywhere",
        || {
            views_everywhere(&agents, "broken").is_some_and(|views| {
                views.iter().all(|v| {
                    v.instances.len() == 1
                        && v.instances[0].state == "failed"
                        && v.instances[0]
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.contains("/no/such/program"))
                })
            })
        },
    );
}

/// A 1 MiB log fetch from another node's instance arrives whole, in chunks
/// (one answer of it would exceed the 4 MiB frame: it used to fail with
/// "stream reset").
#[test]
fn a_mebibyte_of_another_nodes_logs_arrives_whole() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("2 alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });
    // 2.1 MB of letters from d on (digits spelled d-m, lines ended by z):
    // JSON spends four bytes on each (`100,` and up), so a 1 MiB answer in
    // one piece would not fit the 4 MiB frame (found in review: a-c take
    // three, and the test passed without chunks). Two replicas: a fetch
    // from each node.
    let job = "name = \"chatty\"\ntype = \"service\"\nreplicas = 2\n[task]\ncommand = \"sh\"\nargs = [\"-c\", \"seq -w 1 300000 | tr '0-9\\\\n' d-mz; exec sleep 100000\"]\n[task.resources]\ncpu = 600\nmemory = 32\n";
    agents[0].post("/v1/jobs", job).expect("submitted");
    let all: String = (1..=300_000)
        .map(|i| {
            let digits = format!("{i:06}");
            let letters: String = digits.bytes().map(|d| (d - b'0' + b'd') as char).collect();
            letters + "z"
        })
        .collect();
    let tail = &all.as_bytes()[all.len() - 1024 * 1024..];
    let fetch = |a: &Agent, slot: u32| {
        call(
            a.request(
                "GET",
                &format!("/v1/jobs/chatty/logs?slot={slot}&max_bytes=1048576"),
            ),
            None,
        )
    };
    for slot in 0..2u32 {
        let mut holder = String::new();
        wait_until("the slot runs", || {
            let h = agents[0].job("chatty").and_then(|j| {
                j.instances
                    .iter()
                    .find(|i| i.slot == slot && i.state == "running")
                    .and_then(|i| i.node.clone())
            });
            h.map(|h| holder = h).is_some()
        });
        let (local, remote) = if holder == "n0" {
            (&agents[0], &agents[1])
        } else {
            (&agents[1], &agents[0])
        };
        // The other node learns where the slot runs by gossip, a few
        // hundred ms later at most: it needs that to fetch from the holder.
        wait_until("the other node knows where the slot runs", || {
            remote.job("chatty").is_some_and(|j| {
                j.instances.iter().any(|i| {
                    i.slot == slot && i.state == "running" && i.node.as_deref() == Some(&holder)
                })
            })
        });
        wait_until("the instance printed everything", || {
            fetch(local, slot).1.ends_with("gdddddz")
        });
        let (code, body) = fetch(remote, slot);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body.len(), tail.len());
        assert!(body.as_bytes() == tail, "the fetched tail differs");
    }
}
