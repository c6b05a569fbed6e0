//! Cron jobs: a batch run on a schedule.
//!
//! A cron job has no slots of its own. At each scheduled time `t` it gets
//! one child, a batch job named `JOB@t` (`t` in Unix seconds) whose spec is
//! the cron job's with `type = "batch"` and `parent` set. Once written, a
//! child is an ordinary batch job: placed, run and completed by the batch
//! rules (a completed slot never runs again).
//!
//! **Exactly once.** The child's record is the same whichever node writes
//! it ([`child_record`]): its version is the scheduled time and the
//! parent's version, so two nodes that both fire `t` write one record, and
//! last-writer-wins keeps it once everywhere. Who writes is a rendezvous
//! of (job, t) over the alive members ([`fire_rank`]): the first fires at
//! `t`, the k-th `k` × [`FALLBACK`] later if it has not seen the child by
//! then, and a member declared dead drops out of the ranking, so the next
//! one fires as soon as failure detection has spoken. A time is fired only
//! within `starting_deadline` of it, only the latest due time is ever
//! pending (after an outage, at most the latest missed time runs), and only
//! times after the cron job's current version was written count (a job
//! submitted or re-enabled does not run the times before it).
//!
//! **Time zones.** A schedule is matched against the wall clock of its
//! `time_zone` ([`Schedule`]): a local time that does not exist (the hour
//! skipped when clocks go forward) does not run, and a local time that
//! happens twice (clocks go back) runs once, at its first instant.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, Version};
use crate::job::{JobSpec, JobType};
use crate::records::JobRecord;

/// How long the k-th ranked member waits after the (k-1)-th before it
/// fires a time itself.
pub const FALLBACK: Duration = Duration::from_secs(1);
/// Longest `starting_deadline`: well inside the time a child's tombstone
/// is kept (`job_gc_after`, a day by default), so a time is never fired
/// again after its child was collected.
pub const STARTING_DEADLINE_MAX: Duration = Duration::from_secs(3600);
/// Most finished runs a cron job keeps.
pub const HISTORY_MAX: u32 = 100;
/// Most runs of one cron job running at once (`concurrency = "allow"`):
/// a time due beyond it is skipped, so runs that never end cannot pile up.
pub const RUNNING_MAX: usize = 20;
/// Shortest interval between two scheduled times: each time is a record
/// replicated to every node and kept for a day after it is collected.
pub const INTERVAL_MIN: Duration = Duration::from_secs(10);
/// Longest time zone name.
const TIME_ZONE_LEN_MAX: usize = 64;
/// Longest schedule.
const SCHEDULE_LEN_MAX: usize = 128;

/// What a due time does while an earlier run of the job still runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Concurrency {
    /// Start it anyway (the default, as in Kubernetes).
    #[default]
    Allow,
    /// Skip it.
    Forbid,
    /// Stop the running ones and start it.
    Replace,
}

/// A cron job's `[cron]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronSpec {
    /// 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first; or `@hourly`, `@daily`, `@weekly`, `@monthly`,
    /// `@yearly`.
    pub schedule: String,
    /// IANA time zone the schedule is read in (`Europe/Paris`).
    #[serde(default = "utc", skip_serializing_if = "is_utc")]
    pub time_zone: String,
    /// `allow`, `forbid` or `replace`.
    #[serde(default, skip_serializing_if = "is_allow")]
    pub concurrency: Concurrency,
    /// A time not started within this of it is skipped.
    #[serde(default = "default_deadline", with = "crate::job::humantime_serde_str")]
    pub starting_deadline: Duration,
    /// Finished runs kept (older ones are removed).
    #[serde(default = "default_history")]
    pub history: u32,
    /// `false` pauses the schedule (`shoal cron force` still runs it).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn utc() -> String {
    "UTC".into()
}
fn is_utc(s: &str) -> bool {
    s == "UTC"
}
fn is_allow(c: &Concurrency) -> bool {
    *c == Concurrency::Allow
}
fn default_deadline() -> Duration {
    Duration::from_secs(60)
}
fn default_history() -> u32 {
    5
}
fn yes() -> bool {
    true
}

impl CronSpec {
    /// Checks every field; the error names it (paths start with `cron.`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let schedule = Schedule::new(&self.schedule, &self.time_zone)?;
        schedule
            .check_interval()
            .map_err(|e| ("cron.schedule".to_string(), e))?;
        if self.starting_deadline < Duration::from_secs(1)
            || self.starting_deadline > STARTING_DEADLINE_MAX
        {
            return Err((
                "cron.starting_deadline".into(),
                format!(
                    "must be between 1s and {}",
                    humantime::format_duration(STARTING_DEADLINE_MAX)
                ),
            ));
        }
        if self.history > HISTORY_MAX {
            return Err((
                "cron.history".into(),
                format!("at most {HISTORY_MAX} finished runs are kept"),
            ));
        }
        Ok(())
    }
}

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `schedule` read in `time_zone`; the error is (field, why).
    pub fn new(schedule: &str, time_zone: &str) -> Result<Schedule, (String, String)> {
        if time_zone.len() > TIME_ZONE_LEN_MAX {
            return Err(("cron.time_zone".into(), "too long".into()));
        }
        let tz = Tz::from_str(time_zone).map_err(|_| {
            (
                "cron.time_zone".to_string(),
                format!(
                    "`{time_zone}` is not an IANA time zone; write one such as `UTC`, `Europe/Paris` or `America/New_York`"
                ),
            )
        })?;
        if schedule.len() > SCHEDULE_LEN_MAX {
            return Err(("cron.schedule".into(), "too long".into()));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(schedule)
            .map_err(|e| {
                (
                    "cron.schedule".to_string(),
                    format!(
                        "`{schedule}` is not a cron schedule ({e}); write 5 fields (minute hour day-of-month month day-of-week, e.g. `*/5 * * * *`), 6 with seconds first, or @hourly, @daily, @weekly, @monthly, @yearly"
                    ),
                )
            })?;
        Ok(Schedule { cron, tz })
    }

    /// The instant of a local wall-clock time: none in a gap, the first
    /// of two in a fold.
    fn instant(&self, local: NaiveDateTime) -> Option<i64> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.timestamp()),
            LocalResult::Ambiguous(first, _) => Some(first.timestamp()),
            LocalResult::None => None,
        }
    }

    fn local(&self, unix_s: i64) -> Option<NaiveDateTime> {
        DateTime::<Utc>::from_timestamp(unix_s, 0).map(|t| t.with_timezone(&self.tz).naive_local())
    }

    /// The UTC offset at `unix_s`, seconds.
    fn offset_s(&self, unix_s: i64) -> i64 {
        use chrono::Offset;
        DateTime::<Utc>::from_timestamp(unix_s, 0)
            .map(|t| i64::from(t.with_timezone(&self.tz).offset().fix().local_minus_utc()))
            .unwrap_or(0)
    }

    /// The first scheduled time strictly after `after_s` (Unix seconds).
    pub fn next_after(&self, after_s: i64) -> Option<i64> {
        let mut local = self.local(after_s)?;
        // Local times before `after_s`'s own map to earlier instants (a
        // fold's second pass maps to its first), so the walk starts there;
        // bounded, in case a zone's rules are odd.
        for _ in 0..10_000 {
            let next = self.cron.find_next_occurrence(&local, false).ok()?;
            if let Some(t) = self.instant(next) {
                if t > after_s {
                    return Some(t);
                }
            }
            local = next;
        }
        None
    }

    /// The latest scheduled time at or before `at_s`.
    pub fn latest_at_or_before(&self, at_s: i64) -> Option<i64> {
        // Inside a fold's second pass, the rest of the repeated hour has
        // happened already (on its first pass): the walk back starts at
        // the fold's end.
        let back = (self.offset_s(at_s.saturating_sub(7200)) - self.offset_s(at_s)).clamp(0, 7200);
        let mut local = self.local(at_s.saturating_add(back))?;
        let mut inclusive = true;
        for _ in 0..10_000 {
            let prev = self.cron.find_previous_occurrence(&local, inclusive).ok()?;
            inclusive = false;
            if let Some(t) = self.instant(prev) {
                if t <= at_s {
                    return Some(t);
                }
            }
            local = prev;
        }
        None
    }

    /// The next `n` scheduled times after `after_s`.
    pub fn upcoming(&self, after_s: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_s;
        while out.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }

    /// Refuses a schedule whose times come closer than [`INTERVAL_MIN`]
    /// (checked over its next few hundred times from a fixed date, and a
    /// pattern's seconds field).
    fn check_interval(&self) -> Result<(), String> {
        // 2025-01-01, a fixed start: validation must not depend on today.
        let times = self.upcoming(1_735_689_600, 300);
        if times.is_empty() {
            return Err("this schedule never runs".into());
        }
        let min = INTERVAL_MIN.as_secs() as i64;
        if times.windows(2).any(|w| w[1] - w[0] < min) {
            return Err(format!(
                "runs more often than every {}s; each run is a job replicated to every node, so shoal runs a cron job at most that often",
                INTERVAL_MIN.as_secs()
            ));
        }
        Ok(())
    }

    /// `unix_s` as the schedule's local time, for people.
    pub fn show(&self, unix_s: i64) -> String {
        DateTime::<Utc>::from_timestamp(unix_s, 0)
            .map(|t| {
                t.with_timezone(&self.tz)
                    .format("%Y-%m-%d %H:%M:%S %Z")
                    .to_string()
            })
            .unwrap_or_else(|| unix_s.to_string())
    }
}

/// The name of a cron job's run at `t`.
pub fn child_name(parent: &str, t: i64) -> String {
    format!("{parent}@{t}")
}

/// A child's (parent, scheduled time), if `name` is a child's.
pub fn parse_child(name: &str) -> Option<(&str, i64)> {
    let (parent, t) = name.split_once('@')?;
    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) || t.starts_with('0')
    {
        return None;
    }
    Some((parent, t.parse().ok()?))
}

/// The child spec of `parent` at `t`: its spec as a batch job.
pub fn child_spec(parent: &JobSpec, t: i64) -> JobSpec {
    let mut s = parent.clone();
    s.name = child_name(&parent.name, t);
    s.job_type = JobType::Batch;
    s.cron = None;
    // The policy is the cron job's (read from it when a time fires); a
    // batch job takes none (found in review: runs of a cron job that set
    // one failed validation on every peer).
    s.partition = None;
    s.parent = Some(parent.name.clone());
    s
}

/// The record of `parent`'s run at `t`, the same whichever node writes it:
/// at the scheduled time's clock, by `!cron-` and the parent version's
/// clock, zero-padded, then its writer (so runs of two versions of the
/// parent are two versions, and the newer parent's wins everywhere, found
/// in review; a user's stop of the run, at a later clock, beats both).
pub fn child_record(parent: &JobRecord, t: i64) -> Option<JobRecord> {
    let spec = parent.spec.as_ref()?;
    let ms = u64::try_from(t).ok()?.checked_mul(1000)?;
    let version = Version {
        hlc: Hlc {
            wall_ms: ms,
            logical: 0,
        },
        node: format!(
            "!cron-{:015}.{:010}-{}",
            parent.version.hlc.wall_ms, parent.version.hlc.logical, parent.version.node
        ),
    };
    let mut r = JobRecord::new(
        child_name(&parent.name, t),
        version,
        Some(child_spec(spec, t)),
    );
    r.seq = 1;
    Some(r)
}

/// The tombstone that removes `child` (a finished run beyond `history`, a
/// running one that `replace` stops, a run whose cron job is gone), the
/// same whichever node writes it: at `at` (the clock of the time being
/// fired, or of the cron job's stop; never before the child's own) with
/// the child's writer and `~why` ('~' sorts after every character of a
/// name). Not at the child's own clock: a run days old would get a
/// tombstone collected at once, and a node that missed it could hand the
/// run back (found in review).
pub fn child_tombstone(child: &JobRecord, at: Hlc, why: &str) -> JobRecord {
    let version = Version {
        hlc: at.max(child.version.hlc),
        node: format!("{}~{why}", child.version.node),
    };
    JobRecord::new(child.name.clone(), version, None)
}

/// The clock of scheduled time `t` (the version of its run).
pub fn clock_of(t: i64) -> Hlc {
    Hlc {
        wall_ms: u64::try_from(t).unwrap_or(0).saturating_mul(1000),
        logical: 0,
    }
}

/// How a run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Some slot has not finished.
    Running,
    /// Every slot completed.
    Succeeded,
    /// Every slot finished and one failed for good.
    Failed,
    /// Stopped before it finished (by `replace`, a user or the parent's
    /// stop).
    Stopped,
}

/// The rank of `me` among `alive` for firing `job`'s time `t` (0 fires
/// first), or `None` if `me` is not among them. Rendezvous hashing: every
/// node that sees the same members agrees, and a member's death moves up
/// only those it ranked above.
pub fn fire_rank<'a>(
    job: &str,
    t: i64,
    me: &str,
    alive: impl IntoIterator<Item = &'a str>,
) -> Option<usize> {
    let key = shoal_placement::hrw::node_hash(job) ^ (t as u64).rotate_left(17);
    let score = |n: &str| shoal_placement::hrw::pair_hash(shoal_placement::hrw::node_hash(n), key);
    let mine = score(me);
    let mut rank = 0usize;
    let mut found = false;
    for n in alive {
        if n == me {
            found = true;
            continue;
        }
        let s = score(n);
        if (s, n) > (mine, me) {
            rank += 1;
        }
    }
    found.then_some(rank)
}

/// One cron job's clock on one node: which scheduled time is due.
#[derive(Debug, Clone)]
pub struct CronClock {
    /// The parent version it was built for.
    pub version: Version,
    schedule: Schedule,
    /// The first scheduled time not yet looked at.
    next_s: Option<i64>,
    /// The latest due time, until it is fired, found written, or past its
    /// deadline.
    pub pending: Option<i64>,
}

impl CronClock {
    /// The clock of a cron job written at `version` (times before the
    /// write do not run).
    pub fn new(spec: &CronSpec, version: Version) -> Option<CronClock> {
        let schedule = Schedule::new(&spec.schedule, &spec.time_zone).ok()?;
        let written_s = i64::try_from(version.hlc.wall_ms / 1000).ok()?;
        // A time in the write's own second counts if at or after it.
        let next_s = schedule
            .next_after(written_s.saturating_sub(1))
            .filter(|t| t.saturating_mul(1000) >= version.hlc.wall_ms as i64)
            .or_else(|| schedule.next_after(written_s));
        Some(CronClock {
            version,
            schedule,
            next_s,
            pending: None,
        })
    }

    /// Moves the clock to `now_ms`: the latest scheduled time at or before
    /// it becomes pending (an older pending one is dropped: only the
    /// latest missed time runs).
    pub fn advance(&mut self, now_ms: u64) {
        let Ok(now_s) = i64::try_from(now_ms / 1000) else {
            return;
        };
        let Some(next) = self.next_s else { return };
        if next > now_s {
            return;
        }
        let latest = match self.schedule.next_after(next) {
            Some(after) if after <= now_s => {
                self.schedule.latest_at_or_before(now_s).unwrap_or(next)
            }
            _ => next,
        };
        self.pending = Some(latest.max(next));
        self.next_s = self.schedule.next_after(latest.max(next));
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
}

/// A run of a cron job as the parent's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The child job's name.
    pub job: String,
    /// Its scheduled time, Unix seconds.
    pub time: i64,
    /// How it went.
    pub state: RunState,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn five_and_six_fields_parse_and_bad_ones_say_why() {
        let s = Schedule::new("*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        let s = Schedule::new("30 * * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:00:30Z"))
        );
        // Sunday is 0 as in crontab(5): 2026-01-04 is a Sunday.
        let s = Schedule::new("0 12 * * 0", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-04T12:00:00Z"))
        );
        let (field, why) = Schedule::new("61 * * * *", "UTC").unwrap_err();
        assert_eq!(field, "cron.schedule");
        assert!(why.contains("5 fields"), "{why}");
        let (field, why) = Schedule::new("* * * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(field, "cron.time_zone");
        assert!(why.contains("IANA"), "{why}");
    }

    #[test]
    fn schedules_more_often_than_the_minimum_are_refused() {
        let s = Schedule::new("* * * * * *", "UTC").unwrap();
        assert!(s.check_interval().unwrap_err().contains("every 10s"));
        let s = Schedule::new("*/10 * * * * *", "UTC").unwrap();
        assert!(s.check_interval().is_ok());
        let s = Schedule::new("0 0 30 2 *", "UTC").unwrap();
        assert!(s.check_interval().unwrap_err().contains("never"));
    }

    #[test]
    fn the_skipped_hour_does_not_run_and_the_repeated_hour_runs_once() {
        // Europe/Paris: 2026-03-29 02:00 -> 03:00; 2026-10-25 03:00 -> 02:00.
        let s = Schedule::new("30 2 * * *", "Europe/Paris").unwrap();
        let spring = s.upcoming(at("2026-03-27T12:00:00Z"), 3);
        assert_eq!(
            spring,
            vec![
                at("2026-03-28T01:30:00Z"),
                // 03-29 02:30 does not exist.
                at("2026-03-30T00:30:00Z"),
                at("2026-03-31T00:30:00Z"),
            ]
        );
        let autumn = s.upcoming(at("2026-10-24T12:00:00Z"), 2);
        // 02:30 happens twice on 10-25 (CEST, then CET): once, the first.
        assert_eq!(
            autumn,
            vec![at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")]
        );
        // Every 15 minutes through the repeated hour: each local time once.
        let s = Schedule::new("*/15 2 * * *", "Europe/Paris").unwrap();
        let times = s.upcoming(at("2026-10-24T23:00:00Z"), 5);
        assert_eq!(
            times,
            vec![
                at("2026-10-25T00:00:00Z"),
                at("2026-10-25T00:15:00Z"),
                at("2026-10-25T00:30:00Z"),
                at("2026-10-25T00:45:00Z"),
                at("2026-10-26T01:00:00Z"),
            ]
        );
        // Looking back from the second pass finds the first pass's latest.
        assert_eq!(
            s.latest_at_or_before(at("2026-10-25T01:20:00Z")),
            Some(at("2026-10-25T00:45:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-10-25T00:20:00Z")),
            Some(at("2026-10-25T00:15:00Z"))
        );
    }

    #[test]
    fn a_clock_makes_only_the_latest_missed_time_pending() {
        let s = CronSpec {
            schedule: "* * * * *".into(),
            time_zone: "UTC".into(),
            concurrency: Concurrency::Allow,
            starting_deadline: Duration::from_secs(60),
            history: 5,
            enabled: true,
        };
        let written = at("2026-01-01T00:00:30Z") as u64 * 1000;
        let v = Version {
            hlc: Hlc {
                wall_ms: written,
                logical: 0,
            },
            node: "n".into(),
        };
        let mut c = CronClock::new(&s, v).unwrap();
        c.advance(written + 10_000);
        assert_eq!(c.pending, None, "the time before the write does not run");
        c.advance(at("2026-01-01T00:01:00Z") as u64 * 1000);
        assert_eq!(c.pending, Some(at("2026-01-01T00:01:00Z")));
        // Ten minutes away: only the latest is pending.
        c.advance(at("2026-01-01T00:11:30Z") as u64 * 1000);
        assert_eq!(c.pending, Some(at("2026-01-01T00:11:00Z")));
        c.pending = None;
        c.advance(at("2026-01-01T00:11:59Z") as u64 * 1000);
        assert_eq!(c.pending, None);
    }

    #[test]
    fn a_run_record_is_the_same_on_every_node_and_its_tombstone_beats_it() {
        let spec = JobSpec::parse(
            "name = \"nightly\"\ntype = \"cron\"\n[cron]\nschedule = \"0 3 * * *\"\n[task]\ncommand = \"true\"\n",
        )
        .unwrap();
        let v = Version {
            hlc: Hlc {
                wall_ms: 5_000,
                logical: 2,
            },
            node: "n1".into(),
        };
        let parent = JobRecord::new("nightly", v, Some(spec));
        let a = child_record(&parent, 86_400).unwrap();
        let b = child_record(&parent, 86_400).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.name, "nightly@86400");
        let child = a.spec.as_ref().unwrap();
        assert_eq!(child.job_type, JobType::Batch);
        assert_eq!(child.parent.as_deref(), Some("nightly"));
        a.validate().unwrap();
        assert_eq!(parse_child(&a.name), Some(("nightly", 86_400)));
        let gone = child_tombstone(&a, clock_of(86_400 * 30), "history");
        assert_eq!(gone.version.hlc.wall_ms, 86_400 * 30 * 1000);
        assert!(gone.version > a.version);
        gone.validate().unwrap();
        assert_eq!(parse_child("nightly@0123"), None);
        // A run of a cron job with a partition policy is a valid batch job
        // (found in review: it carried the policy, which batch jobs refuse).
        let with_policy = JobSpec::parse(
            "name = \"nightly\"\ntype = \"cron\"\npartition = \"replace\"\n[cron]\nschedule = \"0 3 * * *\"\n[task]\ncommand = \"true\"\n",
        )
        .unwrap();
        let p = JobRecord::new("nightly", parent.version.clone(), Some(with_policy));
        child_record(&p, 86_400).unwrap().validate().unwrap();
        // The run of a newer version of the cron job wins, whoever wrote
        // either (found in review: the writer's name decided).
        let newer = JobRecord::new(
            "nightly",
            Version {
                hlc: Hlc {
                    wall_ms: 50_000,
                    logical: 0,
                },
                node: "a".into(),
            },
            parent.spec.clone(),
        );
        assert!(child_record(&newer, 86_400).unwrap().version > a.version);
        assert_eq!(parse_child("nightly"), None);
    }

    #[test]
    fn fire_ranks_are_a_permutation_every_node_agrees_on() {
        let nodes = ["a", "b", "c", "d", "e"];
        for t in 0..50 {
            let mut ranks: Vec<usize> = nodes
                .iter()
                .map(|n| fire_rank("job", t, n, nodes.iter().copied()).unwrap())
                .collect();
            ranks.sort();
            assert_eq!(ranks, vec![0, 1, 2, 3, 4]);
        }
        assert_eq!(fire_rank("job", 1, "z", nodes.iter().copied()), None);
    }

    /// A model of the firing protocol over a simulated year of minutely
    /// times (in a time zone with daylight saving), with the pure pieces
    /// the scheduler uses ([`CronClock`], [`fire_rank`],
    /// [`child_record`]): 5 nodes with clocks ±500 ms off, the node ranked
    /// first killed at the time (2%), a minority cut off (2%), both at once,
    /// and the job disabled for a day now and then. Each time fires at
    /// least once on a side that sees a majority and only there, every
    /// node that fires it writes the same record (one run), and nothing
    /// fires while the job is disabled.
    #[test]
    fn a_year_of_minutely_times_fires_once_on_a_majority_and_never_while_disabled() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(2026);
        let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        let spec = |enabled| CronSpec {
            schedule: "* * * * *".into(),
            time_zone: "Europe/Paris".into(),
            concurrency: Concurrency::Allow,
            starting_deadline: Duration::from_secs(60),
            history: 5,
            enabled,
        };
        let start = at("2026-01-01T00:00:00Z");
        let end = start + 365 * 86_400;
        let version = |ms: u64, enabled: bool| Version {
            hlc: Hlc {
                wall_ms: ms,
                logical: u32::from(enabled),
            },
            node: "n0".into(),
        };
        // The job's versions: enabled, then a day off every ~30 days.
        let mut versions = vec![(start as u64 * 1000 - 10_000, true)];
        let mut w = start;
        while w < end {
            w += rng.random_range(20..40) * 86_400 + rng.random_range(0..86_400);
            versions.push((w as u64 * 1000, false));
            w += 86_400;
            versions.push((w as u64 * 1000, true));
        }
        let current = |ms: u64| versions.iter().rev().find(|(at, _)| *at <= ms).copied();
        let schedule = Schedule::new("* * * * *", "Europe/Paris").unwrap();
        let mut skew: Vec<i64> = names.iter().map(|_| rng.random_range(-500..=500)).collect();
        let (mut fired, mut due, mut cut, mut killed) = (0u64, 0u64, 0u64, 0u64);
        let job = JobSpec::parse(
            "name = \"job\"\ntype = \"cron\"\n[cron]\nschedule = \"* * * * *\"\n[task]\ncommand = \"true\"\n",
        )
        .unwrap();
        let mut clocks: std::collections::BTreeMap<u64, CronClock> = Default::default();
        let mut guaranteed = 0u64;
        let mut t = schedule.next_after(start).unwrap();
        while t < end {
            if t % 86_400 == 0 {
                skew = names.iter().map(|_| rng.random_range(-500..=500)).collect();
            }
            let t_ms = t as u64 * 1000;
            // Who is up, who is cut off until when, who was killed.
            let all: Vec<&str> = names.iter().map(String::as_str).collect();
            let first = (0..5)
                .find(|&i| fire_rank("job", t, all[i], all.iter().copied()) == Some(0))
                .unwrap();
            let kill = rng.random_bool(0.02).then_some(first);
            let minority: Vec<usize> = if rng.random_bool(0.02) {
                let k = rng.random_range(1..=2);
                (0..5).filter(|i| (i + t as usize) % 5 < k).collect()
            } else {
                Vec::new()
            };
            let heal_ms = t_ms + rng.random_range(0..90_000);
            let detect_ms = t_ms + 700;
            cut += u64::from(!minority.is_empty());
            killed += u64::from(kill.is_some());
            // The members node i sees alive at real time r.
            let view = |i: usize, r: u64| -> Vec<usize> {
                (0..5)
                    .filter(|&j| !(Some(j) == kill && r >= detect_ms))
                    .filter(|j| r >= heal_ms || minority.contains(j) == minority.contains(&i))
                    .collect()
            };
            let on = |v: Option<(u64, bool)>| v.is_some_and(|(_, e)| e);
            // Each node's first moment to fire t, if any (phases between
            // the view's changes).
            let mut fires: Vec<(u64, usize)> = Vec::new();
            for i in 0..5 {
                if Some(i) == kill {
                    continue;
                }
                let mut edges = [t_ms.saturating_sub(1000), detect_ms, heal_ms, t_ms + 60_000];
                edges.sort();
                for p in edges.windows(2) {
                    let (from, to) = (p[0], p[1]);
                    if from >= to {
                        continue;
                    }
                    let v = view(i, from);
                    // A minority fires nothing.
                    if v.len() * 2 < 5 {
                        continue;
                    }
                    let vn: Vec<&str> = v.iter().map(|&j| all[j]).collect();
                    let rank = fire_rank("job", t, all[i], vn.iter().copied()).unwrap() as u64;
                    let local_due = t_ms + rank * 1000;
                    let r = ((local_due as i64 - skew[i]) as u64).max(from);
                    if r >= to {
                        continue;
                    }
                    // The version the node knows (it learns a write within
                    // 2 s) and its clock at that moment.
                    let Some((v_ms, enabled)) = current(r.saturating_sub(2_000)) else {
                        break;
                    };
                    if !enabled {
                        break;
                    }
                    let mut clock = clocks
                        .entry(v_ms)
                        .or_insert_with(|| {
                            CronClock::new(&spec(true), version(v_ms, true)).unwrap()
                        })
                        .clone();
                    clock.advance((r as i64 + skew[i]) as u64);
                    if clock.pending == Some(t) {
                        fires.push((r, i));
                    }
                    break;
                }
            }
            fires.sort();
            // Nodes that had not yet heard of the first firer's run fire too
            // (20 ms to reach its side).
            let writers: Vec<usize> = match fires.first() {
                None => Vec::new(),
                Some(&(r0, i0)) => fires
                    .iter()
                    .filter(|(r, i)| *i == i0 || *r < r0 + 20 || !view(i0, *r).contains(i))
                    .map(|(_, i)| *i)
                    .collect(),
            };
            let enabled_then =
                on(current(t_ms.saturating_sub(3_000))) && on(current(t_ms + 60_000));
            let disabled_then = !on(current(t_ms.saturating_sub(3_000))) && !on(current(t_ms));
            if disabled_then {
                assert!(writers.is_empty(), "t={t} fired while disabled");
            }
            if enabled_then {
                due += 1;
                // A side saw a majority once the kill was detected, or the
                // partition healed well before the next time was due.
                let killed_on_majority = kill.is_some_and(|k| !minority.contains(&k));
                let majority = 5 - minority.len() - usize::from(killed_on_majority);
                let majority_side = majority * 2 >= 5 || heal_ms <= t_ms + 50_000;
                if majority_side {
                    guaranteed += 1;
                    assert!(
                        !writers.is_empty(),
                        "t={t} ({}) never fired",
                        schedule.show(t)
                    );
                }
            }
            if !writers.is_empty() {
                fired += 1;
                let v_ms = current(t_ms).map_or(0, |(m, _)| m);
                let parent = JobRecord::new("job", version(v_ms, true), Some(job.clone()));
                let records: Vec<JobRecord> = writers
                    .iter()
                    .map(|_| child_record(&parent, t).unwrap())
                    .collect();
                assert!(records.windows(2).all(|w| w[0] == w[1]), "t={t}: two runs");
            }
            t = schedule.next_after(t).unwrap();
        }
        // Daylight saving: one hour skipped in March, so a year of
        // minutes less 60 (the repeated hour in October runs once).
        assert!(due > 500_000, "{due}");
        assert!(cut > 5_000 && killed > 5_000, "{cut} {killed}");
        assert!(
            fired >= guaranteed && guaranteed + 100 > due,
            "{fired} {guaranteed} {due}"
        );
    }
}
