//! A full disk (the #11 probe: with the data dir on a full 2 MiB tmpfs, 80
//! of 80 submissions got 200 and 30 were stored; after one I/O error redb
//! refused every write until restart while `/v1/health` said ok).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "cannot mount a tmpfs on {} (the test needs root)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with `dir/filler`.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

fn submit(agent: &Agent, i: usize) -> (u16, String) {
    let body = format!(
        "name = \"job{i}\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nargs = [\"1000\"]\n\
         [task.env]\nPADDING = \"{}\"\n",
        "x".repeat(2000)
    );
    call(agent.request("POST", "/v1/jobs"), Some(&body))
}

fn health(agent: &Agent) -> (u16, String) {
    call(agent.request("GET", "/v1/health"), None)
}

#[test]
fn a_full_disk_refuses_writes_says_so_and_heals_when_freed() {
    let root = tempfile::tempdir().unwrap();
    let _disk = Tmpfs::mount(&root.path().join("n0"), "8m");
    let agent = Agent::start(root.path(), "n0", None, None, &[]);
    let filler = fill(&agent.dir);

    // Every write either is stored (200) or says it was not (507).
    let mut stored = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        match submit(&agent, i) {
            (200, _) => stored.push(i),
            (507, body) => {
                assert!(body.contains("could not be stored"), "{body}");
                refused += 1;
            }
            (code, body) => panic!("job{i}: {code} {body}\n{}", agent.stderr()),
        }
    }
    assert!(refused > 0, "the disk was full, yet every write succeeded");
    let (code, body) = health(&agent);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store"), "{body}");
    wait_until("shoal nodes shows the store's problem", || {
        let (_, out, _) = cli(&agent, &["nodes"]);
        out.contains("problem: n0: store")
    });

    // Space again: the store heals without a restart.
    std::fs::remove_file(&filler).unwrap();
    // The very first write after the disk is freed is stored (the writer
    // reopens the store before it, not after a failure).
    let (code, body) = submit(&agent, 100);
    assert_eq!(code, 200, "{body}");
    stored.push(100);
    let (code, body) = health(&agent);
    assert_eq!(code, 200, "{body}");

    // What was answered 200 is there, also after a restart.
    let mut agent = agent;
    agent.stop(libc::SIGTERM);
    let agent = Agent::start(root.path(), "n0", None, None, &[]);
    for i in &stored {
        assert!(
            agent.job(&format!("job{i}")).is_some(),
            "job{i} was answered 200 but is gone"
        );
    }
    drop(agent);
}

/// The #11 probe: a store with 4 KiB of garbage made the agent crash-loop
/// (a panic inside redb), and a corrupt store refused to start without
/// saying what to do. Now the start fails with the way out, and
/// `--recover-from-peers` moves the store aside and refills it from the
/// cluster.
#[test]
fn a_corrupt_store_says_what_to_do_and_recovers_from_peers() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 2);
    wait_until("2 alive", || all_see(&agents, "n1", "alive"));
    let web = job_file(
        root.path(),
        "web",
        "name = \"web\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nargs = [\"1000\"]\n",
    );
    let (ok, _, err) = cli(&agents[0], &["run", "--detach", web.to_str().unwrap()]);
    assert!(ok, "{err}");
    wait_until("n1 holds the job", || agents[1].job("web").is_some());
    let seed = agents[0].quic();
    let mut n1 = agents.pop().unwrap();
    n1.stop(libc::SIGTERM);

    // Garbage over the first 4 KiB of n1's store.
    let store = n1.dir.join("state.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = 0xAB;
    }
    std::fs::write(&store, &bytes).unwrap();

    let out = Command::new(BIN)
        .args([
            "agent",
            "--name",
            "n1",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&n1.dir)
        .args(["--join", &seed])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an agent started on a corrupt store");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state database") && err.contains("--recover-from-peers"),
        "{err}"
    );

    drop(n1);
    let recovering =
        |root: &Path| Agent::start(root, "n1", Some(&seed), None, &["--recover-from-peers"]);
    let asides = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.redb.corrupt-")
            })
            .count()
    };
    let mut n1 = recovering(root.path());
    wait_until("the recovered node holds the job again", || {
        n1.job("web").is_some()
    });
    assert_eq!(asides(&n1.dir), 1, "the corrupt store was not kept aside");

    // The flag left in place does not throw a healthy store away.
    n1.stop(libc::SIGTERM);
    let n1 = recovering(root.path());
    let asides = asides(&n1.dir);
    assert_eq!(asides, 1, "a healthy store was moved aside");
    assert!(n1.job("web").is_some());
}

fn known(agent: &Agent, job: &str) -> u16 {
    call(agent.request("GET", &format!("/v1/jobs/{job}")), None).0
}

/// Stopped jobs are forgotten by every node after `--job-gc-after`, on
/// disk too (the #11 probe: stopped jobs were never deleted, so the job
/// count never shrank).
#[test]
fn stopped_jobs_are_forgotten_everywhere_after_the_retention() {
    let root = tempfile::tempdir().unwrap();
    let gc = ["--job-gc-after", "2s"];
    let a = Agent::start(root.path(), "n0", None, None, &gc);
    let mut b = Agent::start(
        root.path(),
        "n1",
        Some(&a.quic()),
        Some(&a.token_file()),
        &gc,
    );
    wait_until("2 alive", || {
        a.state_of("n1").as_deref() == Some("alive") && b.state_of("n0").as_deref() == Some("alive")
    });
    for i in 0..3 {
        let (code, body) = submit(&a, i);
        assert_eq!(code, 200, "{body}");
    }
    for i in 0..2 {
        let (code, body) = call(a.request("DELETE", &format!("/v1/jobs/job{i}")), None);
        assert_eq!(code, 200, "{body}");
    }
    // Stopped, the jobs are still known for a while (their tombstones)...
    assert_eq!(known(&a, "job0"), 200);
    // ... and then forgotten by both nodes; the live one stays.
    wait_until("both nodes forget the stopped jobs", || {
        [&a, &b]
            .iter()
            .all(|n| known(n, "job0") == 404 && known(n, "job1") == 404)
    });
    assert_eq!(known(&a, "job2"), 200);
    assert_eq!(known(&b, "job2"), 200);
    // Gone from the disk: a restarted node does not bring them back.
    b.stop(libc::SIGTERM);
    let b = Agent::start(root.path(), "n1", Some(&a.quic()), None, &gc);
    wait_until("n1 serves again", || known(&b, "job2") == 200);
    assert_eq!(known(&b, "job0"), 404);
    assert_eq!(known(&a, "job0"), 404);
}

/// Writes `dir/in-touch` as an agent does (its last anti-entropy
/// exchange), `ago_ms` before now.
fn in_touch(dir: &Path, ago_ms: u128) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(dir.join("in-touch"), (now_ms - ago_ms).to_string()).unwrap();
}

fn moved_aside_stale(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.redb.stale-")
        })
}

/// A node out of touch for longer than `--job-gc-after` does not bring back
/// a job that was stopped and forgotten meanwhile: its seed has been in
/// touch, so its store is moved aside and refilled from the cluster.
/// (Without that, its store's live copy of the job went to every node
/// again: the others no longer had the tombstone that would have beaten
/// it.)
#[test]
fn a_node_away_longer_than_the_retention_does_not_bring_back_a_forgotten_job() {
    let root = tempfile::tempdir().unwrap();
    // Longer than an anti-entropy exchange can take to give up (3 call
    // timeouts): the seed must count as in touch when n1 comes back.
    let gc = ["--job-gc-after", "10s"];
    let a = Agent::start(root.path(), "n0", None, None, &gc);
    let (seed, token) = (a.quic(), a.token_file());
    let mut b = Agent::start(root.path(), "n1", Some(&seed), Some(&token), &gc);
    let c = Agent::start(root.path(), "n2", Some(&seed), Some(&token), &gc);
    wait_until("3 alive", || {
        ["n1", "n2"]
            .iter()
            .all(|n| a.state_of(n).as_deref() == Some("alive"))
    });
    let (code, body) = submit(&a, 7);
    assert_eq!(code, 200, "{body}");
    wait_until("n1 has the job", || known(&b, "job7") == 200);
    b.stop(libc::SIGTERM);
    in_touch(&b.dir, 0);
    let (code, body) = call(a.request("DELETE", "/v1/jobs/job7"), None);
    assert_eq!(code, 200, "{body}");
    wait_until("n0 and n2 forget the stopped job", || {
        known(&a, "job7") == 404 && known(&c, "job7") == 404
    });
    // More than --job-gc-after later, n1 comes back; n0 and n2 kept in
    // touch meanwhile.
    let b = Agent::start(root.path(), "n1", Some(&seed), None, &gc);
    wait_until("n1 is alive again", || {
        a.state_of("n1").as_deref() == Some("alive")
    });
    assert!(
        moved_aside_stale(&b.dir),
        "n1's store is moved aside: {}",
        b.stderr()
    );
    // Give anti-entropy time to hand the job back, were it held anywhere.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < until {
        for n in [&a, &b, &c] {
            assert_eq!(
                known(n, "job7"),
                404,
                "the forgotten job came back at {}",
                n.name
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A whole cluster down for longer than `--job-gc-after` (a weekend) keeps
/// its jobs: no seed has been in touch, so no node moves its store aside
/// (found in review: every node did, and the cluster came back empty).
#[test]
fn a_cluster_down_longer_than_the_retention_keeps_its_jobs() {
    let root = tempfile::tempdir().unwrap();
    let gc = ["--job-gc-after", "2s"];
    let mut a = Agent::start(root.path(), "n0", None, None, &gc);
    let (seed_dir, token) = (a.dir.clone(), a.token_file());
    let mut b = Agent::start(root.path(), "n1", Some(&a.quic()), Some(&token), &gc);
    wait_until("2 alive", || a.state_of("n1").as_deref() == Some("alive"));
    let (code, body) = submit(&a, 3);
    assert_eq!(code, 200, "{body}");
    wait_until("n1 has the job", || known(&b, "job3") == 200);
    b.stop(libc::SIGTERM);
    a.stop(libc::SIGTERM);
    // Both were last in touch 10 s ago: longer than --job-gc-after.
    in_touch(&seed_dir, 10_000);
    in_touch(&b.dir, 10_000);
    let a = Agent::start(root.path(), "n0", None, None, &gc);
    let b = Agent::start(root.path(), "n1", Some(&a.quic()), None, &gc);
    wait_until("both know the job again", || {
        known(&a, "job3") == 200 && known(&b, "job3") == 200
    });
    assert!(!moved_aside_stale(&a.dir) && !moved_aside_stale(&b.dir));
    assert!(b.stderr().contains("keeps its store"), "{}", b.stderr());
}

/// A job record stamped far ahead of the clock, stored by an earlier
/// release (the #11 probe: one record with the maximum version blocked
/// every later write to its job, for good, across restarts), is deleted by
/// `--drop-future-records`; the job can be submitted again.
#[test]
fn drop_future_records_clears_a_record_stamped_far_ahead() {
    use shoal::hlc::{Hlc, Version};
    use shoal::job::JobSpec;
    use shoal::store::{JobRecord, Store};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n0");
    std::fs::create_dir_all(&dir).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let record = |name: &str, wall_ms: u64| {
        let text = format!("name = \"{name}\"\ntype = \"batch\"\n[task]\ncommand = \"true\"\n");
        JobRecord {
            name: name.into(),
            version: Version {
                hlc: Hlc {
                    wall_ms,
                    logical: 0,
                },
                node: "old".into(),
            },
            spec: Some(JobSpec::parse(&text).unwrap()),
            seq: 1,
            history: Vec::new(),
            reverted_from: None,
            promoted: false,
            deployment: None,
            node: None,
            claim: None,
        }
    };
    {
        let store = Store::open(&dir.join("state.redb")).unwrap();
        store
            .apply_all(&[
                record("stuck", now_ms + 10 * 365 * 86_400_000),
                record("fine", now_ms - 60_000),
            ])
            .unwrap();
    }
    // A new version of it (the same spec would be answered `unchanged`,
    // writing nothing).
    let resubmit = |a: &Agent| {
        call(
            a.request("POST", "/v1/jobs"),
            Some("name = \"stuck\"\ntype = \"batch\"\nreplicas = 2\n[task]\ncommand = \"true\"\n"),
        )
    };
    let mut a = Agent::start(root.path(), "n0", None, None, &[]);
    let (code, body) = resubmit(&a);
    assert_eq!(code, 503, "the future record blocks its job: {body}");
    assert!(body.contains("--drop-future-records"), "{body}");
    a.stop(libc::SIGTERM);
    let a = Agent::start(root.path(), "n0", None, None, &["--drop-future-records"]);
    assert!(
        a.stderr().contains("deleted a job record stamped ahead"),
        "{}",
        a.stderr()
    );
    assert_eq!(known(&a, "fine"), 200);
    let (code, body) = resubmit(&a);
    assert_eq!(code, 200, "{body}");
}
