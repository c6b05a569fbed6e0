//! The state machine driven by hand: inputs in, effects out, no IO.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::{NodeRecord, NodeState};

use super::*;
use crate::view::{ClusterView, MemberView, Members};

const WEB: &str = "name = \"web\"\ntype = \"service\"\nreplicas = 2\n[task]\ncommand = \"sleep\"\n";

/// The origin of a test's virtual time (an `Instant` can only come from
/// the clock; everything after it is `origin + virtual ms`).
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

fn now(base: Instant, ms: u64) -> Now {
    Now {
        mono: base + Duration::from_millis(ms),
        wall_ms: 1_700_000_000_000 + ms,
    }
}

fn member(name: &str) -> MemberView {
    MemberView {
        name: Arc::from(name),
        generation: 1,
        state: NodeState::Alive,
        record: Arc::new(NodeRecord {
            name: name.into(),
            address: format!("127.0.0.1:{}", 7000 + name.len()).parse().unwrap(),
            labels: Default::default(),
            capacity: shoal_membership::Capacity {
                cpu_millis: 4000,
                memory_mib: 4096,
            },
            drivers: vec!["exec".into()],
            version: "t".into(),
            http: None,
            notes: Vec::new(),
        }),
    }
}

fn view(names: &[&str]) -> ClusterView {
    ClusterView {
        members: Arc::new(Members::new(names.iter().map(|n| member(n)))),
        ..ClusterView::default()
    }
}

fn scheduler(me: &str, joining: bool, base: Instant) -> Scheduler {
    Scheduler::new(
        SchedulerConfig::local_test(),
        me,
        BTreeSet::from(["exec".to_string()]),
        7,
        Vec::new(),
        Vec::new(),
        Vec::new(),
        joining,
        now(base, 0),
    )
}

fn record(version_ms: u64) -> Arc<JobRecord> {
    Arc::new(JobRecord {
        name: "web".into(),
        version: Version {
            hlc: crate::hlc::Hlc {
                wall_ms: 1_700_000_000_000 + version_ms,
                logical: 0,
            },
            node: "n0".into(),
        },
        spec: Some(JobSpec::parse(WEB).unwrap()),
        seq: 1,
        history: Vec::new(),
        reverted_from: None,
        promoted: false,
        deployment: None,
        node: None,
        claim: None,
    })
}

/// The call of the anti-entropy exchange these effects begin, if any.
fn sync_call(effects: &[Effect]) -> Option<u64> {
    effects.iter().find_map(|e| match e {
        Effect::Send {
            request: Request::SyncHash { .. },
            call,
            ..
        } => *call,
        _ => None,
    })
}

fn started(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(|e| matches!(e, Effect::StartInstance { .. }))
        .count()
}

fn reply(effects: &[Effect]) -> Option<&Response> {
    effects.iter().find_map(|e| match e {
        Effect::Reply { response, .. } => Some(response),
        _ => None,
    })
}

#[test]
fn an_api_write_is_answered_only_once_durable() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let effects = s.handle_api(
        1,
        ApiRequest::Submit {
            text: WEB.into(),
            check_version: None,
        },
        now(base, 2),
    );
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Answer { .. })),
        "no answer before the disk has it"
    );
    let write = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { write, jobs, .. } if jobs.len() == 1 => Some(*write),
            _ => None,
        })
        .expect("a write to persist");
    assert!(
        s.desired().get("web").is_none(),
        "not applied before it is durable"
    );
    let effects = s.handle_persisted(write, Ok(()), now(base, 3));
    assert!(s.desired().get("web").is_some(), "applied once durable");
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Answer { .. })),
        "no answer before a peer has it on its disk too"
    );
    let push = effects
        .iter()
        .find_map(|e| match e {
            Effect::Send {
                request: Request::PutJobs(_),
                call: Some(c),
                ..
            } => Some(*c),
            _ => None,
        })
        .expect("the write pushed to the peer, awaiting its answer");
    let effects = s.handle_reply(push, Ok(Response::Ok), now(base, 4));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Answer {
            token: 1,
            answer: ApiAnswer::Written(_)
        }
    )));

    // The peer's side: it answers the push once the record is durable.
    let mut peer = scheduler("n1", false, base);
    peer.handle_view(view(&["n0", "n1"]), now(base, 1));
    let effects = peer.handle_request(5, Request::PutJobs(vec![record(9)]), now(base, 5));
    assert!(
        reply(&effects).is_none(),
        "no answer before the disk has it"
    );
    let w = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { write, .. } => Some(*write),
            _ => None,
        })
        .unwrap();
    let effects = peer.handle_persisted(w, Ok(()), now(base, 6));
    assert!(matches!(reply(&effects), Some(Response::Ok)));

    // A write the disk refuses is answered with the storage error, and
    // nothing is applied or pushed.
    let effects = s.handle_api(
        2,
        ApiRequest::Scale {
            name: "web".into(),
            replicas: 5,
        },
        now(base, 4),
    );
    let write = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { write, .. } => Some(*write),
            _ => None,
        })
        .unwrap();
    let effects = s.handle_persisted(write, Err("No space left on device".into()), now(base, 8));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Answer { token: 2, answer: ApiAnswer::Failed(ApiError::Storage(m)) } if m.contains("No space")
    )));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Send { .. })));
    assert_eq!(s.desired().spec("web").unwrap().replicas, 2);
}

#[test]
fn a_joining_node_starts_nothing_until_it_has_caught_up() {
    let base = origin();
    let mut s = scheduler("n1", true, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let start = Request::Start {
        job: record(1),
        slots: vec![0],
        sent_ms: now(base, 2).wall_ms,
    };
    let effects = s.handle_request(9, start.clone(), now(base, 2));
    assert_eq!(started(&effects), 0);
    assert!(matches!(
        reply(&effects),
        Some(Response::Started { refused }) if refused.len() == 1 && refused[0].1.contains("catching up")
    ));
    // It asks a peer; the peer is in sync: caught up.
    let effects = s.handle_timer(now(base, 10));
    let call = sync_call(&effects).expect("an anti-entropy exchange");
    s.handle_reply(call, Ok(Response::InSync), now(base, 11));
    assert!(s.caught_up());
    let start = Request::Start {
        job: record(1),
        slots: vec![0],
        sent_ms: now(base, 12).wall_ms,
    };
    let effects = s.handle_request(10, start, now(base, 12));
    assert_eq!(started(&effects), 1, "caught up, it starts");
}

#[test]
fn a_node_that_was_frozen_catches_up_again_before_starting_anything() {
    // Chaos seed 166239: a node resumed from a 4.5 s SIGSTOP and started a
    // batch slot that had completed elsewhere while it was frozen. Its
    // first input after the freeze was not the timer.
    let base = origin();
    let mut s = scheduler("n1", false, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    s.handle_timer(now(base, 2));
    assert!(s.caught_up());
    let frozen_until = 2 + s.config.stall.as_millis() as u64 + 1_000;
    let start = Request::Start {
        job: record(1),
        slots: vec![0],
        sent_ms: now(base, frozen_until).wall_ms,
    };
    // A fresh Start (a peer's, sent just now) is the first input.
    let effects = s.handle_request(9, start, now(base, frozen_until));
    assert_eq!(started(&effects), 0, "a frozen node started a slot at once");
    assert!(matches!(
        reply(&effects),
        Some(Response::Started { refused }) if refused[0].1.contains("catching up")
    ));
    assert_eq!(s.counters().stalls, 1);
    // It asks a peer at once; in sync, it is caught up again and starts.
    let effects = s.handle_timer(now(base, frozen_until + 10));
    let call = sync_call(&effects).expect("an anti-entropy exchange right after the freeze");
    s.handle_reply(call, Ok(Response::InSync), now(base, frozen_until + 11));
    assert!(s.caught_up());
    let start = Request::Start {
        job: record(1),
        slots: vec![0],
        sent_ms: now(base, frozen_until + 12).wall_ms,
    };
    let effects = s.handle_request(10, start, now(base, frozen_until + 12));
    assert_eq!(started(&effects), 1, "caught up again, it starts");
}

#[test]
fn a_start_that_arrives_after_the_coordinator_may_have_moved_on_is_refused() {
    let base = origin();
    let mut s = scheduler("n1", false, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let late = Request::Start {
        job: record(1),
        slots: vec![0],
        sent_ms: now(base, 2).wall_ms,
    };
    let effects = s.handle_request(1, late, now(base, 2 + 4_000));
    assert_eq!(started(&effects), 0);
    assert!(matches!(
        reply(&effects),
        Some(Response::Started { refused }) if refused[0].1.contains("after it was sent")
    ));
}

#[test]
fn a_holder_refuses_what_breaks_a_rule_it_can_check_itself() {
    let base = origin();
    let mut s = scheduler("n1", false, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let mut spec = JobSpec::parse(WEB).unwrap();
    spec.distinct_hosts = true;
    let job = Arc::new(JobRecord {
        spec: Some(spec),
        ..(*record(1)).clone()
    });
    let effects = s.handle_request(
        1,
        Request::Start {
            job: job.clone(),
            slots: vec![0, 1],
            sent_ms: now(base, 2).wall_ms,
        },
        now(base, 2),
    );
    assert_eq!(
        started(&effects),
        1,
        "one copy of a distinct-hosts job per node"
    );
    assert!(matches!(
        reply(&effects),
        Some(Response::Started { refused }) if refused == &vec![(1, "it already runs a replica of the job (distinct_hosts)".to_string())]
    ));
}

#[test]
fn a_node_that_has_not_caught_up_and_holds_nothing_teaches_nothing() {
    let base = origin();
    let mut fresh = scheduler("n2", true, base);
    fresh.handle_view(view(&["n0", "n1", "n2"]), now(base, 1));
    let effects = fresh.handle_request(
        1,
        Request::SyncHash {
            jobs: 0,
            completions: 0,
            clock: true,
        },
        now(base, 2),
    );
    assert!(
        matches!(reply(&effects), Some(Response::Error(e)) if e.contains("catching up")),
        "two empty joining nodes must not count each other as caught up"
    );
    // A peer's garbage range is answered, not a panic.
    let mut s = scheduler("n0", false, base);
    let effects = s.handle_request(
        2,
        Request::SyncJobs {
            after: Some("z".into()),
            until: Some("a".into()),
            digest: Vec::new(),
        },
        now(base, 3),
    );
    assert!(matches!(
        reply(&effects),
        Some(Response::SyncedJobs { newer, want, more: false }) if newer.is_empty() && want.is_empty()
    ));
}

#[test]
fn api_writes_wait_until_the_node_has_caught_up() {
    let base = origin();
    let mut s = scheduler("n1", true, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let effects = s.handle_api(
        7,
        ApiRequest::Submit {
            text: WEB.into(),
            check_version: None,
        },
        now(base, 2),
    );
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Persist { .. } | Effect::Answer { .. })),
        "held, not written nor answered"
    );
    // Never caught up: refused after the bound.
    let effects = s.handle_timer(now(base, 2 + 10_100));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Answer {
            token: 7,
            answer: ApiAnswer::Failed(ApiError::Unavailable(_))
        }
    )));
}

/// The #11 probe: one job record with the largest version pinned every
/// node's clock there, and every later write was answered and never
/// applied. A peer's record more than `max_clock_offset` ahead is now
/// refused, says why, and leaves the clock alone.
#[test]
fn a_record_from_the_future_is_refused_and_does_not_move_the_clock() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let mut far = (*record(0)).clone();
    far.version.hlc = crate::hlc::Hlc {
        wall_ms: u64::MAX,
        logical: u32::MAX,
    };
    let effects = s.handle_request(3, Request::PutJobs(vec![Arc::new(far)]), now(base, 2));
    assert!(
        matches!(reply(&effects), Some(Response::Error(m)) if m.starts_with(crate::wire::CLOCK_REFUSAL) && m.contains("ahead of this node's clock")),
        "{effects:?}"
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::Persist { .. })));
    assert!(s.desired().get("web").is_none());
    assert_eq!(s.counters().future_records, 1);
    // Within the bound (300 ms ahead) is taken.
    let near = record(2 + 300);
    let effects = s.handle_request(4, Request::PutJobs(vec![near]), now(base, 2));
    assert!(effects.iter().any(|e| matches!(e, Effect::Persist { .. })));
    // A local write's version is still near the wall clock.
    let effects = s.handle_api(
        1,
        ApiRequest::Submit {
            text: WEB.into(),
            check_version: None,
        },
        now(base, 1_000),
    );
    let version = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { jobs, .. } => jobs.first().map(|j| j.version.clone()),
            _ => None,
        })
        .expect("the write is persisted");
    assert_eq!(version.hlc.wall_ms, now(base, 1_000).wall_ms);
}

/// A job whose record is ahead of this node's clock (stored when a clock
/// ran fast) cannot be overwritten by an older version: the write is
/// refused with the reason instead of answered and lost.
#[test]
fn a_write_that_would_lose_to_a_future_version_is_refused() {
    let base = origin();
    let stored = JobRecord {
        version: Version {
            hlc: crate::hlc::Hlc {
                wall_ms: now(base, 0).wall_ms + 3_600_000,
                logical: 0,
            },
            node: "n9".into(),
        },
        ..(*record(0)).clone()
    };
    let mut s = Scheduler::new(
        SchedulerConfig::local_test(),
        "n0",
        BTreeSet::from(["exec".to_string()]),
        7,
        vec![stored],
        Vec::new(),
        Vec::new(),
        false,
        now(base, 0),
    );
    assert_eq!(
        s.counters().future_records,
        1,
        "the disk's record did not move the clock"
    );
    s.handle_view(view(&["n0"]), now(base, 1));
    let effects = s.handle_api(1, ApiRequest::Stop { name: "web".into() }, now(base, 2));
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Answer { token: 1, answer: ApiAnswer::Failed(ApiError::Unavailable(m)) }
                if m.contains("ahead of this node's clock") && m.contains("n9")
        )),
        "{effects:?}"
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::Persist { .. })));
    assert_eq!(s.counters().skew_refusals, 1);
}

/// A node whose clock is an hour behind two of its two peers (measured on
/// anti-entropy round trips) says so and refuses writes; one peer alone
/// does not make it the skewed one.
#[test]
fn a_node_whose_clock_is_off_most_peers_refuses_writes() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    s.handle_view(view(&["n0", "n1", "n2"]), now(base, 1));
    let hour = 3_600_000;
    let mut t = 10;
    for _ in 0..20 {
        let effects = s.handle_timer(now(base, t));
        if let Some(call) = sync_call(&effects) {
            let wall_ms = now(base, t).wall_ms + hour;
            s.handle_reply(call, Ok(Response::InSyncAt { wall_ms }), now(base, t + 2));
        }
        if s.clock_offsets().iter().count() == 2 {
            break;
        }
        t += 300;
    }
    assert_eq!(s.clock_offsets().iter().count(), 2, "both peers measured");
    let skew = s.clock_skew(now(base, t).mono).expect("skewed");
    assert!((skew.peers_ahead_ms - hour as i64).abs() <= 2, "{skew:?}");
    let effects = s.handle_api(
        1,
        ApiRequest::Submit {
            text: WEB.into(),
            check_version: None,
        },
        now(base, t + 5),
    );
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Answer { token: 1, answer: ApiAnswer::Failed(ApiError::Unavailable(m)) }
                if m.contains("behind") && m.contains("time sync")
        )),
        "{effects:?}"
    );
}

#[test]
fn run_ids_only_grow_even_when_the_clock_saturates() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    let far = Now {
        mono: base,
        wall_ms: u64::MAX - 1,
    };
    let a = s.run_id(far);
    let b = s.run_id(far);
    assert!(b > a, "{a} {b}");
}

/// A stopped job is forgotten, with its completions, `job_gc_after` after
/// its stop (on disk too: `Effect::Forget`), and a peer that still holds
/// its tombstone cannot hand it back; a late tombstone still stops an older
/// live copy of its job.
#[test]
fn stopped_jobs_are_collected_after_job_gc_after_and_not_taken_back() {
    let base = origin();
    let config = SchedulerConfig {
        job_gc_after: Duration::from_secs(10),
        ..SchedulerConfig::local_test()
    };
    let mut stopped = (*record(0)).clone();
    stopped.name = "old".into();
    stopped.spec = None;
    let done = Completion {
        job: "old".into(),
        slot: 0,
        job_version: stopped.version.clone(),
        node: "n0".into(),
        exit_code: 0,
    };
    let live = (*record(0)).clone();
    let mut s = Scheduler::new(
        config,
        "n0",
        BTreeSet::from(["exec".to_string()]),
        7,
        vec![stopped.clone(), live.clone()],
        vec![done.clone()],
        Vec::new(),
        false,
        now(base, 0),
    );
    s.handle_view(view(&["n0", "n1"]), now(base, 1));
    let forgot = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Forget { jobs } => Some(jobs.clone()),
            _ => None,
        })
    };
    // Before the horizon: kept.
    assert_eq!(forgot(&s.handle_timer(now(base, 5_000))), None);
    assert!(s.desired().get("old").is_some());
    // After it: gone from memory and, by the effect, from the disk.
    let jobs = forgot(&s.handle_timer(now(base, 11_000))).expect("collected");
    assert_eq!(
        jobs,
        vec![("old".to_string(), Some(stopped.version.clone()))]
    );
    assert!(s.desired().get("old").is_none());
    assert!(!s.desired().is_completed("old", 0));
    assert_eq!(s.counters().jobs_collected, 1);
    // The fingerprints anti-entropy compares are those of what is left.
    let left = DesiredState::from_stored(vec![live.clone()], Vec::new());
    assert_eq!(s.desired().fingerprints(), left.fingerprints());
    // A peer that has not collected yet hands back the tombstone and its
    // completion: neither is taken.
    let e = s.handle_request(
        3,
        Request::PutJobs(vec![Arc::new(stopped)]),
        now(base, 12_000),
    );
    assert!(
        !e.iter().any(|e| matches!(e, Effect::Persist { .. })),
        "{e:?}"
    );
    let e = s.handle_request(4, Request::PutCompletions(vec![done]), now(base, 12_000));
    assert!(
        !e.iter().any(|e| matches!(e, Effect::Persist { .. })),
        "{e:?}"
    );
    // A tombstone as old, of a job held live here, is taken: it stops it.
    let mut stop_web = (*record(1)).clone();
    stop_web.spec = None;
    let e = s.handle_request(
        5,
        Request::PutJobs(vec![Arc::new(stop_web)]),
        now(base, 12_000),
    );
    assert!(
        e.iter().any(|e| matches!(e, Effect::Persist { .. })),
        "{e:?}"
    );
}

/// A node with an empty disk catches up with a peer holding 100,000 jobs:
/// every anti-entropy message fits a frame (the #11 probe: at ~25,000 jobs
/// a wiped node's sync request exceeded the 4 MiB frame and it stopped
/// catching up, with nothing logged).
#[test]
fn an_empty_node_catches_up_with_100_000_jobs_in_messages_that_fit_a_frame() {
    const JOBS: usize = 100_000;
    let base = origin();
    let spec = JobSpec::parse(WEB).unwrap();
    let stored: Vec<JobRecord> = (0..JOBS)
        .map(|i| {
            let name = format!("job-{i:06}");
            JobRecord {
                name: name.clone(),
                version: record(i as u64 % 1_000).version.clone(),
                spec: Some(JobSpec {
                    name,
                    ..spec.clone()
                }),
                seq: 1,
                history: Vec::new(),
                reverted_from: None,
                promoted: false,
                deployment: None,
                node: None,
                claim: None,
            }
        })
        .collect();
    let drivers = BTreeSet::from(["exec".to_string()]);
    let config = SchedulerConfig::local_test();
    let mut full = Scheduler::new(
        config.clone(),
        "n0",
        drivers.clone(),
        1,
        stored,
        Vec::new(),
        Vec::new(),
        false,
        now(base, 0),
    );
    let mut empty = Scheduler::new(
        config,
        "n1",
        drivers,
        2,
        Vec::new(),
        Vec::new(),
        Vec::new(),
        true,
        now(base, 0),
    );
    let v = view(&["n0", "n1"]);
    full.handle_view(v.clone(), now(base, 1));
    empty.handle_view(v, now(base, 1));
    let mut largest = 0usize;
    let mut messages = 0usize;
    // Every message on the wire: counted, and within the frame bound.
    let mut sent = |body: Vec<u8>| {
        largest = largest.max(body.len());
        messages += 1;
        assert!(
            body.len() <= crate::wire::BODY_LEN_MAX,
            "a message of {} bytes",
            body.len()
        );
        body
    };
    let mut t = 2u64;
    while empty.desired().len() < JOBS {
        assert!(
            t < 600_000,
            "not caught up after 10 virtual minutes: {} jobs",
            empty.desired().len()
        );
        t += 50;
        let mut effects = empty.handle_timer(now(base, t));
        // Carry out the empty node's effects until none is left: its calls
        // to the full node, answered at once, and its writes, durable at once.
        while !effects.is_empty() {
            let mut next = Vec::new();
            for e in effects {
                match e {
                    Effect::Send {
                        request,
                        call: Some(call),
                        ..
                    } => {
                        let request = Request::decode(&sent(request.encode())).unwrap();
                        let answer = full.handle_request(call, request, now(base, t));
                        let response = reply(&answer).cloned().expect("answered at once");
                        let response = Response::decode(&sent(response.encode())).unwrap();
                        next.extend(empty.handle_reply(call, Ok(response), now(base, t)));
                    }
                    Effect::Persist { write, .. } => {
                        next.extend(empty.handle_persisted(write, Ok(()), now(base, t)));
                    }
                    _ => {}
                }
            }
            effects = next;
        }
    }
    assert!(empty.caught_up() || empty.desired().len() == JOBS);
    assert_eq!(
        empty.desired().fingerprints(),
        full.desired().fingerprints()
    );
    println!("caught up with {JOBS} jobs in {messages} messages, the largest {largest} bytes, {t} virtual ms");
}

#[test]
fn checks_decide_a_copys_health_and_restart_it_when_critical() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    let text = "name = \"web\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = { http = 0 }\n\
                [[task.check]]\ntype = \"tcp\"\nport = \"http\"\ninterval = \"1s\"\ngrace = \"0s\"\nfailures = 2\nrestart = true\n";
    let (spec, t) = start_alone(&mut s, base, text);
    let port = spec.ports["http"];
    let health = |s: &Scheduler| s.local().iter().next().unwrap().published().health;
    assert_eq!(health(&s), crate::health::Health::Unknown, "starting");
    // Running: its checks are handed to the shell, probing the copy's port.
    let effects = s.handle_started(spec.id.clone(), Ok(()), now(base, t + 1));
    let probes = effects
        .iter()
        .find_map(|e| match e {
            Effect::WatchChecks { id, probes, .. } if *id == spec.id => Some(probes.clone()),
            _ => None,
        })
        .expect("its checks watched");
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].addr.unwrap().port(), port);
    assert_eq!(health(&s), crate::health::Health::Unknown, "no result yet");
    s.handle_check(spec.id.clone(), 0, Ok(()), now(base, t + 2));
    assert_eq!(health(&s), crate::health::Health::Passing);
    // A result for another run (an old one) changes nothing.
    let mut old = spec.id.clone();
    old.run -= 1;
    s.handle_check(old, 0, Err("refused".into()), now(base, t + 3));
    s.handle_check(spec.id.clone(), 0, Err("refused".into()), now(base, t + 3));
    assert_eq!(
        health(&s),
        crate::health::Health::Passing,
        "one failure of two"
    );
    let effects = s.handle_check(spec.id.clone(), 0, Err("refused".into()), now(base, t + 4));
    assert_eq!(health(&s), crate::health::Health::Critical);
    let copy = s.local().iter().next().unwrap().published();
    assert!(
        copy.check.as_deref().is_some_and(|c| c.contains("refused")),
        "{copy:?}"
    );
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::UnwatchChecks { id } if *id == spec.id)));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::StopInstance { id, .. } if *id == spec.id)),
        "a critical check with restart = true stops the copy"
    );
    assert_eq!(s.counters().health_restarts, 1);
    // A result already on its way changes nothing: one stop per turn.
    let effects = s.handle_check(spec.id.clone(), 0, Err("refused".into()), now(base, t + 4));
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::StopInstance { .. })));
    assert_eq!(s.counters().health_restarts, 1);
    // Its end takes the restart policy's path: a new run of the slot.
    s.handle_driver(
        DriverEvent::Ended {
            id: spec.id.clone(),
            state: InstanceState::Exited(ExitStatus {
                code: None,
                signal: Some(15),
                error: None,
            }),
        },
        now(base, t + 5),
    );
    let mut restarted = None;
    for dt in 1..100 {
        let effects = s.handle_timer(now(base, t + 5 + dt * 100));
        restarted = effects.iter().find_map(|e| match e {
            Effect::StartInstance { spec, .. } => Some(spec.clone()),
            _ => None,
        });
        if restarted.is_some() {
            break;
        }
    }
    let again = restarted.expect("restarted");
    assert_eq!((again.id.slot, again.ports["http"]), (spec.id.slot, port));
    assert!(again.id.run > spec.id.run);
    assert_eq!(s.local().iter().next().unwrap().restarts, 1);
}

#[test]
fn an_identical_resubmit_writes_nothing_and_check_version_guards_writes() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    s.handle_view(view(&["n0"]), now(base, 1));
    let mut t = 1;
    let mut submit = |s: &mut Scheduler, text: &str, check: Option<u64>| {
        t += 10;
        let effects = s.handle_api(
            t,
            ApiRequest::Submit {
                text: text.into(),
                check_version: check,
            },
            now(base, t),
        );
        let write = effects.iter().find_map(|e| match e {
            Effect::Persist { write, .. } => Some(*write),
            _ => None,
        });
        let mut effects = effects.clone();
        if let Some(w) = write {
            effects = s.handle_persisted(w, Ok(()), now(base, t + 1));
        }
        effects
            .into_iter()
            .find_map(|e| match e {
                Effect::Answer { answer, .. } => Some(answer),
                _ => None,
            })
            .expect("answered")
    };
    assert!(matches!(submit(&mut s, WEB, None), ApiAnswer::Written(r) if r.seq == 1));
    assert!(matches!(submit(&mut s, WEB, None), ApiAnswer::Unchanged(r) if r.seq == 1));
    let other = WEB.replace("replicas = 2", "replicas = 3");
    assert!(matches!(
        submit(&mut s, &other, Some(5)),
        ApiAnswer::Failed(ApiError::Conflict(_))
    ));
    assert!(matches!(submit(&mut s, &other, Some(1)), ApiAnswer::Written(r) if r.seq == 2));
    let r = s.desired().get("web").unwrap();
    assert_eq!(r.history.len(), 1);
    assert_eq!(r.spec_of(1).unwrap().replicas, 2);
    assert_eq!(r.spec_of(2).unwrap().replicas, 3);
    // A name with no live job: only `0` passes.
    let fresh = WEB.replace("\"web\"", "\"api\"");
    assert!(matches!(
        submit(&mut s, &fresh, Some(1)),
        ApiAnswer::Failed(ApiError::Conflict(_))
    ));
    assert!(matches!(
        submit(&mut s, &fresh, Some(0)),
        ApiAnswer::Written(_)
    ));
}

/// Submits `text` to a lone node and returns the spec of the copy it
/// starts, with the time reached (ms).
fn start_alone(s: &mut Scheduler, base: Instant, text: &str) -> (Box<InstanceSpec>, u64) {
    s.handle_view(view(&["n0"]), now(base, 1));
    let effects = s.handle_api(
        1,
        ApiRequest::Submit {
            text: text.into(),
            check_version: None,
        },
        now(base, 2),
    );
    let write = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { write, .. } => Some(*write),
            _ => None,
        })
        .expect("the write");
    s.handle_persisted(write, Ok(()), now(base, 3));
    let mut t = 3;
    loop {
        t += 100;
        assert!(t < 10_000, "never started");
        let effects = s.handle_timer(now(base, t));
        if let Some(spec) = effects.iter().find_map(|e| match e {
            Effect::StartInstance { spec, .. } => Some(spec.clone()),
            _ => None,
        }) {
            return (spec, t);
        }
    }
}

#[test]
fn a_stopping_copy_is_shown_stopping_for_its_shutdown_delay_before_the_signal() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    let text = "name = \"web\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nshutdown_delay = \"2s\"\n";
    let (spec, t) = start_alone(&mut s, base, text);
    s.handle_started(spec.id.clone(), Ok(()), now(base, t + 1));
    let effects = s.handle_api(2, ApiRequest::Stop { name: "web".into() }, now(base, t + 2));
    let write = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist { write, .. } => Some(*write),
            _ => None,
        })
        .unwrap();
    s.handle_persisted(write, Ok(()), now(base, t + 3));
    let mut signalled = None;
    let mut shown_stopping_at = None;
    for dt in 1..50u64 {
        let at = t + 3 + dt * 100;
        let effects = s.handle_timer(now(base, at));
        if shown_stopping_at.is_none() {
            let published = effects.iter().any(
                |e| matches!(e, Effect::Publish { value: Some(v), .. } if v.contains("\"x\":true")),
            );
            if published {
                shown_stopping_at = Some(at);
            }
        }
        if effects
            .iter()
            .any(|e| matches!(e, Effect::StopInstance { id, .. } if *id == spec.id))
        {
            signalled = Some(at);
            break;
        }
    }
    let shown = shown_stopping_at.expect("published as stopping");
    let signalled = signalled.expect("signalled in the end");
    assert!(
        signalled >= shown + 2_000,
        "the signal ({signalled} ms) came before the delay after it was shown stopping ({shown} ms)"
    );
    assert!(
        signalled <= shown + 2_200,
        "late signal: {signalled} vs {shown}"
    );
}

#[test]
fn an_end_reported_before_the_start_leaves_the_restart_watched() {
    let base = origin();
    let mut s = scheduler("n0", false, base);
    let text =
        "name = \"web\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = { http = 0 }\n\
                [[task.check]]\ntype = \"tcp\"\nport = \"http\"\n\n[restart]\ndelay = \"100ms\"\n";
    let (spec, t) = start_alone(&mut s, base, text);
    // The task exits at once; its end overtakes the start's result.
    s.handle_driver(
        DriverEvent::Ended {
            id: spec.id.clone(),
            state: InstanceState::Exited(ExitStatus::code(1)),
        },
        now(base, t + 1),
    );
    let effects = s.handle_started(spec.id.clone(), Ok(()), now(base, t + 2));
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::WatchChecks { .. })),
        "a run that ended is not watched"
    );
    let mut again = None;
    for dt in 1..50 {
        let effects = s.handle_timer(now(base, t + 2 + dt * 50));
        again = effects.iter().find_map(|e| match e {
            Effect::StartInstance { spec, .. } => Some(spec.clone()),
            _ => None,
        });
        if again.is_some() {
            break;
        }
    }
    let again = again.expect("restarted");
    let effects = s.handle_started(again.id.clone(), Ok(()), now(base, t + 3_000));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::WatchChecks { id, .. } if *id == again.id)),
        "the restarted run is watched"
    );
}
