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
        },
        env: BTreeMap::from([("SHOAL_SLOT".to_string(), slot.to_string())]),
    }
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
    let dir = tempfile::tempdir().unwrap();
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let mut events = d.events().unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let d = ExecDriver::new(dir.path().to_path_buf(), common::BIN.into()).unwrap();
    let mut events = d.events().unwrap();
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
    let group = std::path::Path::new(shoal::driver::supervise::CGROUP_ROOT).join(s.id.to_string());
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
