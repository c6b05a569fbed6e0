//! `partition = "never"` and `shoal node forget` with real agent processes
//! on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;

const SOLO: &str = r#"name = "solo"
type = "service"
partition = "never"

[task]
driver = "exec"
command = "sleep"
args = ["100000"]

[task.resources]
cpu = 50
memory = 16
"#;

/// The node holding solo's slot, as `agent` shows it, once it runs.
fn holder(agent: &Agent) -> Option<String> {
    agent
        .job("solo")?
        .instances
        .into_iter()
        .find(|i| i.state == "running")?
        .node
}

#[test]
fn a_never_slot_waits_for_its_node_and_moves_only_once_it_is_forgotten() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    let seed = agents[0].quic();
    let token = agents[0].token_file();
    let f = job_file(root.path(), "solo", SOLO);
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap(), "--detach"]);
    assert!(ok, "{out}{err}");
    wait_until("solo runs", || holder(&agents[0]).is_some());
    let h = holder(&agents[0]).unwrap();
    let hi: usize = h.trim_start_matches('n').parse().unwrap();
    let other = (hi + 1) % 3;
    wait_until("its process runs", || {
        processes_of(root.path(), "solo") == 1
    });

    // Its node cut off (frozen): the others see it dead and do not
    // replace the slot; they say why.
    agents[hi].signal(libc::SIGSTOP);
    wait_until("the others see the holder dead", || {
        agents[other].state_of(&h).as_deref() == Some("dead")
    });
    wait_until("the slot says it waits for its holder", || {
        agents[other].job("solo").is_some_and(|j| {
            j.instances.iter().any(|i| {
                i.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("never") && r.contains(&h))
            })
        })
    });
    // An observation window, not a synchronisation: a `replace` service
    // runs elsewhere within about a second of its node's death.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        processes_of(root.path(), "solo"),
        1,
        "started a second copy"
    );

    // Back: it still holds the slot, one copy; forgetting it now (alive)
    // is refused.
    agents[hi].signal(libc::SIGCONT);
    wait_until("the others see the holder alive", || {
        agents[other].state_of(&h).as_deref() == Some("alive")
    });
    let (ok, out, err) = cli(&agents[other], &["node", "forget", &h]);
    assert!(!ok, "forgot a live node: {out}");
    assert!(err.contains("alive"), "{err}");
    wait_until("the others show the holder's copy again", || {
        holder(&agents[other]).as_deref() == Some(h.as_str())
    });
    assert_eq!(processes_of(root.path(), "solo"), 1);

    // Gone for good (the agent and its copy): the slot waits, until the
    // node is forgotten, then runs elsewhere.
    agents[hi].stop(libc::SIGKILL);
    kill_instances(&agents[hi].dir);
    wait_until("the others see the holder dead", || {
        agents[other].state_of(&h).as_deref() == Some("dead")
    });
    assert_eq!(processes_of(root.path(), "solo"), 0);
    let (ok, out, err) = cli(&agents[other], &["node", "forget", &h]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("forgotten"), "{out}");
    wait_until("solo runs elsewhere", || {
        holder(&agents[other]).is_some_and(|n| n != h)
    });
    let moved = holder(&agents[other]).unwrap();
    wait_until("its process runs", || {
        processes_of(root.path(), "solo") == 1
    });
    let (ok, out, _) = cli(&agents[other], &["nodes"]);
    assert!(ok && out.contains("forgotten"), "{out}");

    // The forgotten node comes back: it starts nothing of the slot (its
    // claim is older than the forget), and the slot stays where it went.
    agents[hi] = Agent::start(root.path(), &h, Some(&seed), Some(&token), &[]);
    wait_until("the node is back", || {
        agents[other].state_of(&h).as_deref() == Some("alive")
            && agents[hi].state_of(&agents[other].name).as_deref() == Some("alive")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holder(&agents[hi]).as_deref(), Some(moved.as_str()));
    assert_eq!(processes_of(root.path(), "solo"), 1);
}

#[test]
fn never_jobs_refuse_start_first_updates_and_system_jobs() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path(), "n0", None, None, &[]);
    let f = job_file(
        root.path(),
        "solo",
        &format!("{SOLO}\n[update]\norder = \"start-first\"\n"),
    );
    let (ok, out, err) = cli(&agent, &["run", f.to_str().unwrap(), "--detach"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("update.order") && err.contains("stop-first"),
        "{err}"
    );
    let f = job_file(
        root.path(),
        "sys",
        "name = \"sys\"\ntype = \"system\"\npartition = \"never\"\n[task]\ncommand = \"sleep\"\nargs = [\"100000\"]\n",
    );
    let (ok, out, err) = cli(&agent, &["run", f.to_str().unwrap(), "--detach"]);
    assert!(!ok, "{out}");
    assert!(err.contains("partition"), "{err}");
}
