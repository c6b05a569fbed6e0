//! Each node's durable copy of the desired state: jobs (versioned,
//! last-writer-wins, stops as tombstones) and batch completions, in an
//! embedded redb database under the data dir.

use std::path::Path;

use anyhow::{bail, Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const COMPLETIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("completions");
/// The remembered membership (see `shoal_core::seen`): one key per member,
/// when it was last seen live as the value (ms since the epoch, 8 bytes
/// little-endian).
const MEMBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("members");

/// Longest stored record decoded, bytes (a job file is at most 1 MiB).
const RECORD_LEN_MAX: usize = 2 * 1024 * 1024;

pub use shoal_core::records::{Completion, JobRecord};

/// The store. Cheap to share behind an `Arc`; redb serialises writers.
pub struct Store {
    db: Database,
    path: std::path::PathBuf,
}

/// The store's health as the writer last saw it: `None` when the last
/// write (or reopen) succeeded, else what failed. Shared with the API and
/// published in gossip, so `/v1/health` and `shoal nodes` show it.
pub type StoreHealth = std::sync::Arc<std::sync::Mutex<Option<String>>>;

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    if bytes.len() > RECORD_LEN_MAX {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

impl Store {
    /// Opens the store at `path` at an agent's start: a store that cannot
    /// be opened (corrupt; redb may even panic on some garbage) is an error
    /// that says what to do, never a crash loop.
    /// Returns the store with every job record, completion and remembered
    /// member it holds.
    pub fn open_at_start(path: &Path) -> Result<Opened> {
        let opened = std::panic::catch_unwind(|| Store::open(path));
        let why = match opened {
            Ok(Ok(store)) => {
                // Every record must be readable too: a corrupt one would
                // silently drop its job here. What is read is what the
                // agent starts from (one pass over the store).
                match store
                    .jobs()
                    .and_then(|j| Ok((j, store.completions()?, store.members()?)))
                {
                    Ok((jobs, completions, members)) => {
                        return Ok(Opened {
                            store,
                            jobs,
                            completions,
                            members,
                        })
                    }
                    Err(e) => format!("{e:#}"),
                }
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the database library panicked".into()),
        };
        bail!(
            "the state database {} cannot be used ({why}). Every node holds the whole desired \
             state: restart with --recover-from-peers (and --join SEED) to move it aside and \
             refill it from the cluster, or restore it from a backup",
            path.display()
        )
    }

    /// Moves the store at `path` aside (to `<path>.<why>-<unix ms>`, `why`
    /// being `corrupt` or `stale`) and returns where it went; the agent
    /// then starts empty and catches up.
    pub fn move_aside(path: &Path, why: &str) -> Result<std::path::PathBuf> {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let to = path.with_extension(format!("redb.{why}-{ms}"));
        if path.exists() {
            std::fs::rename(path, &to)
                .with_context(|| format!("cannot move {} aside", path.display()))?;
        }
        Ok(to)
    }

    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)
            .with_context(|| format!("cannot open the state database {}", path.display()))?;
        let w = db.begin_write()?;
        w.open_table(JOBS)?;
        w.open_table(COMPLETIONS)?;
        w.open_table(MEMBERS)?;
        w.commit()?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Closes and opens the database again. After an I/O error (a full
    /// disk) redb refuses every later write until it is reopened, which
    /// also repairs it from its last commit.
    pub fn reopen(self) -> std::result::Result<Store, (String, std::path::PathBuf)> {
        let path = self.path.clone();
        drop(self);
        Store::open(&path).map_err(|e| (format!("{e:#}"), path))
    }

    /// Stores `record` if it is newer than what the store holds for its job
    /// (last writer wins). Returns whether it was stored; durable on return.
    pub fn apply(&self, record: &JobRecord) -> Result<bool> {
        let w = self.db.begin_write()?;
        let stored = {
            let mut t = w.open_table(JOBS)?;
            let current: Option<JobRecord> =
                t.get(record.name.as_str())?.and_then(|v| decode(v.value()));
            if current.is_some_and(|c| c.version >= record.version) {
                false
            } else {
                let bytes = serde_json::to_vec(record)?;
                t.insert(record.name.as_str(), bytes.as_slice())?;
                true
            }
        };
        w.commit()?;
        Ok(stored)
    }

    /// Applies many records and completions in one transaction (one
    /// fsync): each record if newer than the stored one, each completion if
    /// the slot has none. Durable when it returns `Ok`.
    pub fn write(
        &self,
        records: &[std::sync::Arc<JobRecord>],
        completions: &[Completion],
    ) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(JOBS)?;
            for record in records {
                let current: Option<JobRecord> =
                    t.get(record.name.as_str())?.and_then(|v| decode(v.value()));
                if current.is_none_or(|c| c.version < record.version) {
                    let bytes = serde_json::to_vec(&**record)?;
                    t.insert(record.name.as_str(), bytes.as_slice())?;
                }
            }
        }
        {
            let mut t = w.open_table(COMPLETIONS)?;
            for c in completions {
                if t.get((c.job.as_str(), c.slot))?.is_none() {
                    let bytes = serde_json::to_vec(c)?;
                    t.insert((c.job.as_str(), c.slot), bytes.as_slice())?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Deletes collected jobs in one transaction: each record if it is
    /// still at the given version (`None`: none is held), and the job's
    /// completions when no record is left.
    pub fn forget(&self, jobs: &[(String, Option<shoal_core::hlc::Version>)]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(JOBS)?;
            let mut ct = w.open_table(COMPLETIONS)?;
            for (name, version) in jobs {
                let current: Option<JobRecord> =
                    t.get(name.as_str())?.and_then(|v| decode(v.value()));
                let gone = match (&current, version) {
                    (Some(c), Some(v)) if c.version == *v => {
                        t.remove(name.as_str())?;
                        true
                    }
                    (None, _) => true,
                    _ => false,
                };
                if gone {
                    let slots: Vec<u32> = ct
                        .range((name.as_str(), 0)..=(name.as_str(), u32::MAX))?
                        .filter_map(|e| e.ok().map(|(k, _)| k.value().1))
                        .collect();
                    for slot in slots {
                        ct.remove((name.as_str(), slot))?;
                    }
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Applies many records in one transaction; returns those stored.
    pub fn apply_all(&self, records: &[JobRecord]) -> Result<Vec<JobRecord>> {
        let w = self.db.begin_write()?;
        let mut stored = Vec::new();
        {
            let mut t = w.open_table(JOBS)?;
            for record in records {
                let current: Option<JobRecord> =
                    t.get(record.name.as_str())?.and_then(|v| decode(v.value()));
                if current.is_none_or(|c| c.version < record.version) {
                    let bytes = serde_json::to_vec(record)?;
                    t.insert(record.name.as_str(), bytes.as_slice())?;
                    stored.push(record.clone());
                }
            }
        }
        w.commit()?;
        Ok(stored)
    }

    /// One job's record (including tombstones).
    pub fn get(&self, name: &str) -> Result<Option<JobRecord>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(JOBS)?;
        Ok(t.get(name)?.and_then(|v| decode(v.value())))
    }

    /// Every job record (including tombstones), by name; an error names
    /// the first that does not decode.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(JOBS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match decode(v.value()) {
                Some(rec) => out.push(rec),
                None => bail!(
                    "the record of job `{}` does not decode",
                    k.value().escape_debug()
                ),
            }
        }
        Ok(out)
    }

    /// Records a completion; returns false if the slot had one already.
    pub fn complete(&self, c: &Completion) -> Result<bool> {
        let w = self.db.begin_write()?;
        let stored = {
            let mut t = w.open_table(COMPLETIONS)?;
            if t.get((c.job.as_str(), c.slot))?.is_some() {
                false
            } else {
                let bytes = serde_json::to_vec(c)?;
                t.insert((c.job.as_str(), c.slot), bytes.as_slice())?;
                true
            }
        };
        w.commit()?;
        Ok(stored)
    }

    /// Every completion; an error names the first that does not decode.
    pub fn completions(&self) -> Result<Vec<Completion>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(COMPLETIONS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match decode(v.value()) {
                Some(c) => out.push(c),
                None => {
                    let (job, slot) = k.value();
                    bail!(
                        "the completion of `{}` slot {slot} does not decode",
                        job.escape_debug()
                    )
                }
            }
        }
        Ok(out)
    }
}

impl Store {
    /// The remembered membership: each member with when it was last seen
    /// live (ms since the epoch; 0: never, or not recorded).
    pub fn members(&self) -> Result<Vec<(String, u64)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MEMBERS)?;
        let mut out = Vec::new();
        for item in t.iter()?.take(shoal_core::seen::REMEMBERED_MAX) {
            let (k, v) = item?;
            let at = <[u8; 8]>::try_from(v.value()).map_or(0, u64::from_le_bytes);
            out.push((k.value().to_string(), at));
        }
        Ok(out)
    }

    /// Replaces the remembered membership (one transaction).
    pub fn remember(&self, members: &[(String, u64)]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(MEMBERS)?;
            t.retain(|_, _| false)?;
            for (m, at) in members {
                t.insert(m.as_str(), at.to_le_bytes().as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }
}

/// What [`Store::open_at_start`] found.
pub struct Opened {
    /// The store.
    pub store: Store,
    /// Every job record (tombstones included).
    pub jobs: Vec<JobRecord>,
    /// Every completion.
    pub completions: Vec<Completion>,
    /// The remembered membership, with when each was last seen live.
    pub members: Vec<(String, u64)>,
}

/// Depth of the queue in front of the store's writer.
pub const WRITES_QUEUED_MAX: usize = 1024;

/// A write for the store's writer thread.
pub struct WriteJob {
    /// Reported back with the result.
    pub id: u64,
    /// Records.
    pub jobs: Vec<std::sync::Arc<JobRecord>>,
    /// Completions.
    pub completions: Vec<Completion>,
    /// Collected jobs to delete (see [`Store::forget`]).
    pub forget: Vec<(String, Option<shoal_core::hlc::Version>)>,
    /// A new remembered membership (see [`Store::remember`]).
    pub members: Option<Vec<(String, u64)>>,
}

/// Starts the store's writer: one blocking thread that commits writes in
/// the order they come (so the last write of a job is the last committed)
/// and reports each result on `done`. Writes never run on the event loop: a
/// slow disk delays answers, not the node.
///
/// A failed write is reported (the core answers the API 507 and retries
/// what peers and completions brought), marks the store unhealthy in
/// `health`, and makes the writer reopen the database before the next
/// write: after an I/O error redb refuses every write until reopened, so a
/// disk that fills up and is freed again heals without a restart.
pub fn spawn_writer(
    store: Store,
    health: StoreHealth,
    done: tokio::sync::mpsc::Sender<(u64, Result<(), String>)>,
) -> std::sync::mpsc::SyncSender<WriteJob> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(WRITES_QUEUED_MAX);
    std::thread::Builder::new()
        .name("shoal-store".into())
        .spawn(move || {
            let mut store: std::result::Result<Store, (String, std::path::PathBuf)> = Ok(store);
            let set = |h: Option<String>| *health.lock().unwrap_or_else(|p| p.into_inner()) = h;
            while let Ok(job) = rx.recv() {
                if let Err((_, path)) = &store {
                    // The last reopen failed (the disk was still full): try
                    // again before this write, so the first write after the
                    // disk is freed succeeds (found in review).
                    let path = path.clone();
                    store = Store::open(&path).map_err(|e| (format!("{e:#}"), path));
                }
                let result = match &store {
                    Ok(s) if job.members.is_some() => s
                        .remember(job.members.as_deref().unwrap_or_default())
                        .map_err(|e| format!("{e:#}")),
                    Ok(s) if !job.forget.is_empty() => {
                        s.forget(&job.forget).map_err(|e| format!("{e:#}"))
                    }
                    Ok(s) => s
                        .write(&job.jobs, &job.completions)
                        .map_err(|e| format!("{e:#}")),
                    Err((why, _)) => Err(format!("the store could not be reopened: {why}")),
                };
                match &result {
                    Ok(()) => set(None),
                    Err(e) => {
                        set(Some(format!(
                            "the last write to the store failed ({e}); writes are refused here \
                             until it works again (a full disk: free space in the data dir)"
                        )));
                        store = match store {
                            Ok(s) => s.reopen(),
                            Err((_, path)) => {
                                Store::open(&path).map_err(|e| (format!("{e:#}"), path))
                            }
                        };
                    }
                }
                if done.blocking_send((job.id, result)).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the store writer");
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::hlc::{Hlc, Version};
    use shoal_core::job::JobSpec;

    fn rec(name: &str, ms: u64, node: &str, replicas: Option<u32>) -> JobRecord {
        let spec = replicas.map(|r| {
            let mut s =
                JobSpec::parse("name = \"x\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\n")
                    .unwrap();
            s.name = name.into();
            s.replicas = r;
            s
        });
        JobRecord {
            name: name.into(),
            version: Version {
                hlc: Hlc {
                    wall_ms: ms,
                    logical: 0,
                },
                node: node.into(),
            },
            spec,
            seq: 1,
            history: Vec::new(),
            reverted_from: None,
            promoted: false,
            deployment: None,
            node: None,
            claim: None,
        }
    }

    #[test]
    fn the_remembered_membership_is_replaced_whole_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let s = Store::open(&path).unwrap();
        let m = |n: &str, at| (n.to_string(), at);
        s.remember(&[m("a", 1), m("b", 2), m("c", 3)]).unwrap();
        s.remember(&[m("a", 1), m("c", 4)]).unwrap();
        drop(s);
        let opened = Store::open_at_start(&path).unwrap();
        assert_eq!(opened.members, [m("a", 1), m("c", 4)]);
    }

    #[test]
    fn last_writer_wins_and_tombstones_stick() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.redb")).unwrap();
        assert!(s.apply(&rec("web", 10, "a", Some(3))).unwrap());
        assert!(
            !s.apply(&rec("web", 9, "b", Some(5))).unwrap(),
            "older write lost"
        );
        assert!(
            s.apply(&rec("web", 10, "b", Some(4))).unwrap(),
            "same time: higher node wins"
        );
        assert!(s.apply(&rec("web", 11, "a", None)).unwrap(), "stop");
        assert!(
            !s.apply(&rec("web", 10, "c", Some(9))).unwrap(),
            "a late write does not resurrect it"
        );
        assert_eq!(s.get("web").unwrap().unwrap().spec, None);
    }

    #[test]
    fn forgetting_a_job_deletes_its_tombstone_at_that_version_and_its_completions() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.redb")).unwrap();
        let gone = rec("gone", 10, "a", None);
        let kept = rec("kept", 10, "a", None);
        s.apply_all(&[gone.clone(), kept.clone(), rec("other", 1, "a", Some(1))])
            .unwrap();
        for (job, slot) in [("gone", 0), ("gone", 7), ("kept", 0), ("other", 0)] {
            s.complete(&Completion {
                job: job.into(),
                slot,
                job_version: gone.version.clone(),
                node: "a".into(),
                exit_code: 0,
            })
            .unwrap();
        }
        // `kept` was written again since: the older version does not match.
        let newer = rec("kept", 11, "a", None);
        s.apply(&newer).unwrap();
        s.forget(&[
            ("gone".into(), Some(gone.version.clone())),
            ("kept".into(), Some(kept.version.clone())),
        ])
        .unwrap();
        let names: Vec<String> = s.jobs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["kept".to_string(), "other".to_string()]);
        let left: Vec<(String, u32)> = s
            .completions()
            .unwrap()
            .into_iter()
            .map(|c| (c.job, c.slot))
            .collect();
        assert_eq!(left, vec![("kept".into(), 0), ("other".into(), 0)]);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            let stored = s
                .apply_all(&[rec("a", 1, "n", Some(1)), rec("b", 1, "n", Some(2))])
                .unwrap();
            assert_eq!(stored.len(), 2);
            let c = Completion {
                job: "b".into(),
                slot: 1,
                job_version: rec("b", 1, "n", None).version,
                node: "n".into(),
                exit_code: 0,
            };
            assert!(s.complete(&c).unwrap());
            assert!(!s.complete(&c).unwrap());
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.jobs().unwrap().len(), 2);
        assert_eq!(s.get("b").unwrap().unwrap().spec.unwrap().replicas, 2);
        assert_eq!(s.completions().unwrap().len(), 1);
    }
}
