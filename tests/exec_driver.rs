//! The exec driver with real processes under `shoal supervise`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use shoal::driver::exec::ExecDriver;
use shoal::driver::{Driver, DriverEvent, InstanceId, InstanceSpec, InstanceState};
use shoal::hlc::Version;
use shoal::job::{ResourceSpec, TaskSpec};

fn spec(slot: u32, command: &str, args: &[&str]) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId {
            job: "t".into(),
            slot,
            run: 1000 + slot as u64,
        },
        job_version: Version::default(),
        seq: 1,
        task: TaskSpec {
            driver: "exec".into(),
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
            resources: ResourceSpec::default(),
            ports: BTreeMap::new(),
            image: None,
            container_ports: BTreeMap::new(),
            pull: Default::default(),
            user: None,
            kill_signal: None,
            kill_timeout: None,
            shutdown_delay: None,
            checks: Vec::new(),
        },
        env: BTreeMap::from([("SHOAL_SLOT".to_string(), slot.to_string())]),
        ports: BTreeMap::new(),
    }
}

/// A driver over a new directory, and its events.
fn driver() -> (
    tempfile::TempDir,
    ExecDriver,
    tokio::sync::mpsc::Receiver<DriverEvent>,
) {
    let dir = tempfile::tempdir().unwrap();
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let events = d.events().unwrap();
    (dir, d, events)
}

async fn next_end(
    rx: &mut tokio::sync::mpsc::Receiver<DriverEvent>,
) -> (InstanceId, InstanceState) {
    let ev = tokio::time::timeout(common::DEADLINE, rx.recv())
        .await
        .expect("an event in time")
        .expect("open");
    let DriverEvent::Ended { id, state } = ev;
    (id, state)
}

fn alive(pid_group_of: &std::path::Path) -> bool {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pid_group_of.join("instance.json")).unwrap())
            .unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(-pid, 0) == 0 }
}

#[tokio::test]
async fn runs_records_exit_env_and_logs() {
    let (_dir, d, mut events) = driver();
    let s = spec(
        7,
        "sh",
        &[
            "-c",
            "echo $GREETING slot $SHOAL_SLOT; echo oops >&2; exit 3",
        ],
    );
    d.start(&s).await.unwrap();
    let (id, state) = next_end(&mut events).await;
    assert_eq!(id, s.id);
    match state {
        InstanceState::Exited(st) => assert_eq!(st.code, Some(3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.logs(&s.id, "stdout", 1024).await.unwrap(), b"hi slot 7\n");
    assert_eq!(d.logs(&s.id, "stderr", 1024).await.unwrap(), b"oops\n");
    assert_eq!(
        d.logs(&s.id, "stdout", 3).await.unwrap(),
        b" 7\n",
        "the tail of the output"
    );
    assert!(
        d.start(&s).await.is_err(),
        "the same instance is never started twice"
    );
}

#[tokio::test]
async fn stop_ends_the_whole_process_tree() {
    let (dir, d, mut events) = driver();
    // a shell that ignores TERM, with a child: the kill after the grace period gets both
    let s = spec(1, "sh", &["-c", "trap '' TERM; sleep 1000 & wait"]);
    d.start(&s).await.unwrap();
    let idir = dir.path().join(s.id.to_string());
    common::wait_until("the instance runs", || {
        idir.join("instance.json").exists() && alive(&idir)
    });
    d.stop(&s.id, Duration::from_millis(300)).await.unwrap();
    let (id, _) = next_end(&mut events).await;
    assert_eq!(id, s.id);
    common::wait_until("the process group is gone", || !alive(&idir));
}

#[tokio::test]
async fn stop_sends_the_tasks_kill_signal() {
    let (dir, d, mut events) = driver();
    // A task that says which signal reached it, and ignores TERM: only its
    // kill_signal (INT) makes it write the file before the grace ends.
    let said = dir.path().join(format!("said-{}", std::process::id()));
    let ready = dir.path().join(format!("ready-{}", std::process::id()));
    let script = format!(
        "trap 'echo int > {p}; exit 0' INT; trap 'echo term > {p}' TERM; touch {r}; while :; do sleep 0.05; done",
        p = said.display(),
        r = ready.display()
    );
    let mut s = spec(2, "sh", &["-c", &script]);
    s.task.kill_signal = Some("SIGINT".into());
    d.start(&s).await.unwrap();
    common::wait_until("the task has set its traps", || ready.exists());
    d.stop(&s.id, Duration::from_secs(5)).await.unwrap();
    let (id, _) = next_end(&mut events).await;
    assert_eq!(id, s.id);
    assert_eq!(std::fs::read_to_string(&said).unwrap_or_default(), "int\n");
}

#[tokio::test]
async fn stop_reaches_an_instance_the_driver_does_not_watch() {
    let dir = tempfile::tempdir().unwrap();
    let first = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let s = spec(4, "sleep", &["1000"]);
    first.start(&s).await.unwrap();
    let idir = dir.path().join(s.id.to_string());
    common::wait_until("the instance runs", || {
        idir.join("instance.json").exists() && alive(&idir)
    });
    // Another driver over the same directory (no recover, so it watches
    // nothing) stops it from the record on disk.
    let other = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    other.stop(&s.id, Duration::from_millis(300)).await.unwrap();
    common::wait_until("the process group is gone", || !alive(&idir));
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_instances_and_learns_their_exit() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(2, "sleep", &["1000"]);
    {
        let first = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
        first.start(&s).await.unwrap();
        // the agent "crashes": the driver goes away, the instance does not
    }
    let idir = dir.path().join(s.id.to_string());
    common::wait_until("the instance runs", || {
        idir.join("instance.json").exists() && alive(&idir)
    });
    let second = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let mut events = second.events().unwrap();
    let found = second.recover().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0.id, s.id);
    assert_eq!(found[0].1, InstanceState::Running);
    // The task is killed behind the agent's back: the adopted instance's
    // end is still seen, with how it ended.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idir.join("instance.json")).unwrap()).unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    let children = format!("/proc/{pid}/task/{pid}/children");
    common::wait_until("the supervisor started the task", || {
        std::fs::read_to_string(&children).is_ok_and(|c| !c.trim().is_empty())
    });
    let child: i32 = std::fs::read_to_string(&children)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    unsafe { libc::kill(child, libc::SIGKILL) };
    let (id, state) = next_end(&mut events).await;
    assert_eq!(id, s.id);
    assert!(
        matches!(&state, InstanceState::Exited(st) if st.signal == Some(libc::SIGKILL)),
        "{state:?}"
    );
    // Ended instances are reported as such by the next recovery, and can be removed.
    let again = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let found = again.recover().await.unwrap();
    assert!(matches!(found[0].1, InstanceState::Exited(_)));
    again.remove(&s.id).await.unwrap();
    assert!(again.recover().await.unwrap().is_empty());
}

#[tokio::test]
async fn limits_are_enforced_where_cgroup_v2_is_writable() {
    if !shoal::host::cgroup_v2_writable() {
        eprintln!("skipped: this machine has no writable cgroup v2 (the node reports it in `shoal nodes`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let mut s = spec(9, "sleep", &["1000"]);
    s.task.resources = ResourceSpec {
        cpu: 250,
        memory: 48,
    };
    d.start(&s).await.unwrap();
    let group = shoal::driver::contain::Cgroup::for_instance(&dir.path().join(s.id.to_string()))
        .unwrap()
        .path()
        .to_path_buf();
    common::wait_until("the instance's cgroup has its task", || {
        std::fs::read_to_string(group.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    });
    assert_eq!(
        std::fs::read_to_string(group.join("cpu.max"))
            .unwrap()
            .trim(),
        "25000 100000"
    );
    assert_eq!(
        std::fs::read_to_string(group.join("memory.max"))
            .unwrap()
            .trim(),
        (48u64 << 20).to_string()
    );
    d.stop(&s.id, Duration::from_millis(200)).await.unwrap();
}

/// On cgroup v1 (this project's CI machines) the limits go to the memory
/// and cpu hierarchies: a task over its memory is killed, and its CPU quota
/// is set (before, limits were enforced on cgroup v2 only).
#[tokio::test]
async fn limits_are_enforced_on_cgroup_v1() {
    let probe = std::path::Path::new("/probe");
    if shoal::driver::contain::V1Limits::for_instance(probe).is_none()
        || !shoal::host::cgroup_limits_writable()
    {
        eprintln!("skipped: this machine has no writable cgroup v1 memory and cpu hierarchies");
        return;
    }
    let (dir, d, mut events) = driver();
    // `tail` keeps a whole line: 300 MB without a newline does not fit in
    // 32 MiB. Without the limit it finishes and says so.
    let mut hog = spec(
        3,
        "sh",
        &["-c", "head -c 300000000 /dev/zero | tail -n 1 | wc -c"],
    );
    hog.task.resources = ResourceSpec {
        cpu: 250,
        memory: 32,
    };
    d.start(&hog).await.unwrap();
    let (_, state) = next_end(&mut events).await;
    let InstanceState::Exited(exit) = state else {
        panic!("{state:?}");
    };
    // The OOM killer picks `tail` (then `wc` prints 0) or the shell (then
    // nothing is printed and the task ends by SIGKILL); without the limit
    // `wc` prints all 300,000,000 bytes and the task exits 0.
    let out = String::from_utf8_lossy(&d.logs(&hog.id, "stdout", 1024).await.unwrap()).to_string();
    assert!(
        out.trim() == "0" || (out.is_empty() && exit.signal == Some(libc::SIGKILL)),
        "the task went past its 32 MiB: {out:?}, {exit:?}"
    );
    let err = String::from_utf8_lossy(&d.logs(&hog.id, "stderr", 4096).await.unwrap()).to_string();
    assert!(!err.contains("cannot be set"), "{err}");
    // A running instance's groups hold its limits, and go with it.
    let mut s = spec(4, "sleep", &["1000"]);
    s.task.resources = ResourceSpec {
        cpu: 250,
        memory: 48,
    };
    d.start(&s).await.unwrap();
    let v1 =
        shoal::driver::contain::V1Limits::for_instance(&dir.path().join(s.id.to_string())).unwrap();
    let groups: Vec<std::path::PathBuf> = v1.paths().map(|p| p.to_path_buf()).collect();
    common::wait_until("the task is in its memory group", || {
        std::fs::read_to_string(groups[0].join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    });
    let read = |g: &std::path::Path, f: &str| std::fs::read_to_string(g.join(f)).unwrap();
    assert_eq!(
        read(&groups[0], "memory.limit_in_bytes").trim(),
        (48u64 << 20).to_string()
    );
    assert_eq!(read(&groups[1], "cpu.cfs_quota_us").trim(), "25000");
    assert_eq!(read(&groups[1], "cpu.cfs_period_us").trim(), "100000");
    d.stop(&s.id, Duration::from_millis(200)).await.unwrap();
    let _ = next_end(&mut events).await;
    common::wait_until("the groups are removed", || {
        groups.iter().all(|g| !g.exists())
    });
}

/// Whether `pid` is a live process (a zombie is not).
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

fn pid_in(file: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The #11 probe: a task that daemonizes (`setsid`) left one orphan per
/// restart, surviving `shoal stop`. Its instance's cgroup (the freezer
/// hierarchy on cgroup v1, this machine's) holds it, and a stop kills it.
#[tokio::test]
async fn a_daemon_that_left_the_session_is_stopped_with_its_instance() {
    let (dir, d, mut events) = driver();
    let s = spec(
        5,
        "sh",
        &[
            "-c",
            "setsid sh -c 'echo $$ > daemon.pid; exec sleep 1000' & sleep 1000",
        ],
    );
    let idir = dir.path().join(s.id.to_string());
    assert!(
        shoal::driver::contain::Cgroup::for_instance(&idir).is_some(),
        "this machine has no cgroup hierarchy to contain instances in"
    );
    d.start(&s).await.unwrap();
    let pidfile = idir.join("work/daemon.pid");
    common::wait_until("the daemon runs", || {
        pid_in(&pidfile).is_some_and(process_alive)
    });
    let daemon = pid_in(&pidfile).unwrap();
    // It really left the instance's session.
    let sid = |pid: i32| unsafe { libc::getsid(pid) };
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idir.join("instance.json")).unwrap()).unwrap();
    assert_ne!(sid(daemon), record["pid"].as_i64().unwrap() as i32);
    d.stop(&s.id, Duration::from_millis(300)).await.unwrap();
    let _ = next_end(&mut events).await;
    common::wait_until("the daemon is gone", || !process_alive(daemon));
}

/// The #11 probe: a task that started a child in the background and exited
/// left the supervisor waiting on the pipes the child held, and the slot
/// `running` forever. The instance now ends with the task's exit code and
/// the child is killed.
#[tokio::test]
async fn a_task_that_exits_leaving_a_child_ends_and_the_child_is_killed() {
    let (dir, d, mut events) = driver();
    let s = spec(6, "sh", &["-c", "sleep 1000 & echo $! > child.pid; exit 3"]);
    d.start(&s).await.unwrap();
    let (id, state) = next_end(&mut events).await;
    assert_eq!(id, s.id);
    match state {
        InstanceState::Exited(e) => assert_eq!(e.code, Some(3), "{e:?}"),
        other => panic!("{other:?}"),
    }
    let child = pid_in(&dir.path().join(s.id.to_string()).join("work/child.pid")).unwrap();
    common::wait_until("the background child is gone", || !process_alive(child));
}

/// A task runs as the user its job names, else as the node's task user;
/// `root` opts back into the agent's own user. Its work dir is its own.
#[tokio::test]
async fn a_task_runs_as_its_jobs_user_or_the_nodes_task_user() {
    let (nobody_uid, _) = shoal::driver::exec::lookup_user("nobody").expect("a nobody user");
    let dir = tempfile::tempdir().unwrap();
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into())
        .unwrap()
        .with_task_user(Some("nobody".into()));
    let mut events = d.events().unwrap();
    let uid_of = |s: &InstanceSpec| -> u32 {
        std::fs::read_to_string(dir.path().join(s.id.to_string()).join("work/uid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // No user in the job: the node's task user.
    let by_default = spec(9, "sh", &["-c", "id -u > uid"]);
    d.start(&by_default).await.unwrap();
    let _ = next_end(&mut events).await;
    assert_eq!(uid_of(&by_default), nobody_uid);
    // `root` in the job: the agent's user.
    let mut as_root = spec(10, "sh", &["-c", "id -u > uid"]);
    as_root.task.user = Some("root".into());
    d.start(&as_root).await.unwrap();
    let _ = next_end(&mut events).await;
    assert_eq!(uid_of(&as_root), unsafe { libc::geteuid() });
    // A user the node does not have: the start fails and says so.
    let mut unknown = spec(11, "true", &[]);
    unknown.task.user = Some("no-such-user-here".into());
    let err = d.start(&unknown).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no user `no-such-user-here`"),
        "{err:#}"
    );
}

/// On a full disk a start fails and leaves no process behind (the chaos
/// suite's full-disk fault found one orphan task per retry: the supervisor
/// was spawned before its record failed to write).
#[tokio::test]
async fn a_start_on_a_full_disk_fails_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs (run as root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    // Fill it.
    let filler = vec![b'x'; 4096];
    let mut f = std::fs::File::create(dir.path().join("filler")).unwrap();
    while std::io::Write::write_all(&mut f, &filler).is_ok() {}
    // A marker in the task's environment finds its processes.
    let marker = format!("full-disk-{}", std::process::id());
    let s = InstanceSpec {
        env: BTreeMap::from([("MARKER".to_string(), marker.clone())]),
        ..spec(0, "sleep", &["100000"])
    };
    let err = d.start(&s).await.expect_err("no room for the record");
    assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    let supervisors = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("environ")).ok())
        .filter(|env| {
            env.split(|b| *b == 0)
                .any(|kv| kv == format!("MARKER={marker}").as_bytes())
        })
        .count();
    assert_eq!(supervisors, 0, "a process of the failed start runs");
}

#[tokio::test]
async fn exec_checks_run_beside_the_task_bounded_in_time_and_output() {
    let (dir, d, _events) = driver();
    let s = spec(4, "sleep", &["1000"]);
    d.start(&s).await.unwrap();
    let idir = dir.path().join(s.id.to_string());
    common::wait_until("the instance runs", || {
        idir.join("instance.json").exists() && alive(&idir) && idir.join("work").exists()
    });
    let cmd = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let t = Duration::from_secs(2);
    // Exit 0 passes; the task's environment is there.
    assert_eq!(
        d.exec_check(&s.id, &cmd(&["sh", "-c", "test \"$SHOAL_SLOT\" = 4"]), t)
            .await,
        Ok(())
    );
    // A failure says its exit and the start of its output, on one line.
    let e = d
        .exec_check(
            &s.id,
            &cmd(&["sh", "-c", "echo not ready; echo really >&2; exit 3"]),
            t,
        )
        .await
        .unwrap_err();
    assert!(e.starts_with("exit 3: not ready"), "{e}");
    // Endless output: only its start is kept, and the timeout ends it.
    let started = std::time::Instant::now();
    let e = d
        .exec_check(&s.id, &cmd(&["yes"]), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(e.contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // What it starts in the background dies with it.
    let pidfile = dir.path().join("bg.pid");
    let script = format!("sleep 1000 & echo $! > {}; exit 1", pidfile.display());
    assert!(d
        .exec_check(&s.id, &cmd(&["sh", "-c", &script]), t)
        .await
        .is_err());
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    common::wait_until("the check's background process is gone", || {
        // Gone, or a zombie of nobody's waiting (reaped by init).
        std::fs::read_to_string(format!("/proc/{bg}/stat"))
            .map(|st| st.contains(") Z "))
            .unwrap_or(true)
    });
    // An instance it does not have.
    let mut other = s.id.clone();
    other.slot = 9;
    assert!(d.exec_check(&other, &cmd(&["true"]), t).await.is_err());
    d.stop(&s.id, Duration::from_millis(300)).await.unwrap();
}
