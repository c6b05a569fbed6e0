//! `GET /v1/events` and `shoal events` on real agents: a job written at one
//! node is streamed by another, instances and a node's death are events
//! everywhere, and a cursor resumes with no gap and no repeat.

mod common;

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use shoal::events::Event;

/// Follows `agent`'s stream from now on (filtered by `query`), each event
/// with when it arrived, on a channel.
fn follow(agent: &Agent, query: &str) -> mpsc::Receiver<(Instant, Event)> {
    let resp = agent
        .request("GET", &format!("/v1/events?since=now&{query}"))
        .call()
        .expect("GET /v1/events");
    assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { return };
            let e: Event = match serde_json::from_str(&line) {
                Ok(e) => e,
                Err(_) => {
                    assert_eq!(line, "{}", "a line is an event or a heartbeat");
                    continue;
                }
            };
            if tx.send((Instant::now(), e)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for an event that `want` accepts; returns it, and when it came.
fn expect(
    rx: &mpsc::Receiver<(Instant, Event)>,
    what: &str,
    mut want: impl FnMut(&Event) -> bool,
) -> (Instant, Event) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, e)) if want(&e) => return (at, e),
            Ok(_) => {}
            Err(_) => panic!("no event: {what}"),
        }
    }
}

/// Every event `agent` keeps after `since` (or all), not following.
fn kept(agent: &Agent, since: Option<&str>) -> Vec<Event> {
    let path = match since {
        Some(c) => format!("/v1/events?follow=false&since={c}"),
        None => "/v1/events?follow=false".to_string(),
    };
    let text = agent
        .request("GET", &path)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn cursors(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.cursor.clone()).collect()
}

#[test]
fn events_of_the_whole_cluster_reach_every_node_and_resume_without_gaps() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    wait_streaming(&agents.iter().collect::<Vec<_>>());
    // n1 streams what n0 is asked to do.
    let web = follow(&agents[1], "topic=job:web");
    let n2 = follow(&agents[1], "topic=node:n2");
    let job = "name = \"web\"\ntype = \"service\"\nreplicas = 3\n\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n\n[task.resources]\ncpu = 10\nmemory = 8\n";
    let (code, body) = call(agents[0].request("POST", "/v1/jobs"), Some(job));
    assert_eq!(code, 200, "{body}");
    let written = Instant::now();
    let (at, e) = expect(&web, "web submitted, at n1", |e| e.kind == "job.submitted");
    let took = at.saturating_duration_since(written);
    println!("a job written at n0 was streamed by n1 {took:?} after n0 answered");
    assert!(
        took <= Duration::from_secs(2),
        "a write at one node reaches another's stream within 2 s: {took:?}"
    );
    assert_eq!(
        (e.job.as_deref(), e.version.as_deref()),
        (Some("web"), Some("v1"))
    );
    // Every copy's start, wherever it runs, is seen at n1.
    let mut started = std::collections::BTreeSet::new();
    while started.len() < 3 {
        let (_, e) = expect(&web, "the 3 copies of web started", |e| {
            e.kind == "instance.started"
        });
        started.insert(e.slot.unwrap());
    }
    let (_, placed) = expect(&n2, "a copy placed on n2", |e| e.kind == "instance.started");
    assert_eq!(placed.node.as_deref(), Some("n2"));
    assert_eq!(placed.job.as_deref(), Some("web"), "n2's topic");

    // Resume: what n1 kept so far, then a scale written at n2 while no
    // stream is open; since the last cursor seen, exactly the new events.
    let before = kept(&agents[1], None);
    let last = before.last().unwrap().cursor.clone();
    let (code, body) = call(
        agents[2].request("POST", "/v1/jobs/web/scale"),
        Some("{\"replicas\":4}"),
    );
    assert_eq!(code, 200, "{body}");
    let (_, e) = expect(&web, "web scaled", |e| e.kind == "job.scaled");
    assert!(e.message.contains("from 3 to 4"), "{}", e.message);
    expect(&web, "the fourth copy started", |e| {
        e.kind == "instance.started" && e.slot == Some(3)
    });
    let after = kept(&agents[1], Some(&last));
    assert!(after.iter().any(|e| e.kind == "job.scaled"));
    let all = kept(&agents[1], None);
    let mut joined = cursors(&before);
    joined.extend(cursors(&after));
    assert_eq!(
        cursors(&all)[..joined.len()],
        joined[..],
        "since the last cursor: no gap, no repeat"
    );
    // Any cursor in the middle resumes right after it.
    let mid = all.len() / 2;
    assert_eq!(
        cursors(&kept(&agents[1], Some(&all[mid].cursor)))[..all.len() - mid - 1],
        cursors(&all[mid + 1..])[..]
    );
    // A browser resuming sends the last id it saw: that wins over the
    // `since=now` of the URL it reconnects to.
    let text = agents[1]
        .request("GET", "/v1/events?since=now&follow=false")
        .set("Last-Event-ID", &all[mid].cursor)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let resumed: Vec<Event> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        cursors(&resumed)[..all.len() - mid - 1],
        cursors(&all[mid + 1..])[..]
    );
    // A cursor of another run of the agent starts with `lost`; a bad one
    // is refused with what to give.
    let foreign = format!("{:08x}-1", 0x5eed_u32);
    let resumed = kept(&agents[1], Some(&foreign));
    assert_eq!(resumed[0].kind, "lost", "{resumed:?}");
    let (code, body) = call(agents[1].request("GET", "/v1/events?since=x"), None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("cursor"), "{body}");
    let (code, body) = call(agents[1].request("GET", "/v1/events?topic=pod:x"), None);
    assert_eq!(code, 400, "{body}");

    // Server-Sent Events for the page: the cursor is the event's id.
    let resp = agents[1]
        .request("GET", "/v1/events?follow=false&format=sse")
        .call()
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let text = resp.into_string().unwrap();
    assert!(text.starts_with("id: "), "{text}");
    assert!(text.contains("\ndata: {\"cursor\""), "{text}");
    assert!(text.contains("\"kind\":\"job.submitted\""), "{text}");

    // The CLI prints the same events.
    let (ok, out, err) = cli(&agents[1], &["events", "--topic", "job:web"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("job.submitted") && out.contains("job.scaled"),
        "{out}"
    );

    // n2 dies: n1 says so, and why its copy of web stopped.
    let mut agents = agents;
    let all_nodes = follow(&agents[1], "topic=node:n2");
    agents[2].stop(libc::SIGKILL);
    kill_instances(&agents[2].dir);
    expect(&all_nodes, "n2 dead", |e| e.kind == "node.dead");
    let (_, e) = expect(&n2, "n2's copy stopped", |e| e.kind == "instance.stopped");
    assert!(
        e.message.contains("node n2 is"),
        "the copy stopped because its node died: {}",
        e.message
    );

    // Stopped: the job and every copy.
    let (code, body) = call(agents[0].request("DELETE", "/v1/jobs/web"), None);
    assert_eq!(code, 200, "{body}");
    expect(&web, "web stopped", |e| e.kind == "job.stopped");
    let (_, e) = expect(&web, "a copy stopped with the job", |e| {
        e.kind == "instance.stopped" && e.message.ends_with("the job was stopped")
    });
    assert_eq!(e.job.as_deref(), Some("web"));
}

#[test]
fn shoal_run_shows_progress_from_the_event_stream() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_all_alive(&agents);
    wait_streaming(&[&agents[0]]);
    let f = job_file(
        root.path(),
        "app",
        "name = \"app\"\ntype = \"service\"\nreplicas = 2\n\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n\n[task.resources]\ncpu = 10\nmemory = 8\n",
    );
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("all 2 slots running"), "{out}");
    // Each copy's start, as the stream told it (not a poll's summary).
    assert!(
        err.contains("instance.started"),
        "the run printed the copies' starts from the stream: {err}"
    );
    assert!(err.contains("app[0] on n"), "{err}");
}
