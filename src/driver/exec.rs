//! The `exec` driver: each instance is a process tree under its own
//! `shoal supervise` process, in its own session, with its own directory
//! under `<data-dir>/instances/`.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::supervise::{self, exit_of, rotated};
use super::{Driver, DriverEvent, InstanceId, InstanceSpec, InstanceState, DRIVER_EVENTS_LEN};

/// The first 4 KiB of a check's output stream; the rest is read and
/// dropped.
async fn read_start(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    const KEPT: usize = 4096;
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else { return kept };
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// What the driver records in each instance directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: InstanceSpec,
    /// Supervisor pid (its process group and session id too).
    pid: u32,
    /// The supervisor's start time in clock ticks since boot, from
    /// /proc/<pid>/stat: tells the supervisor from a later process that
    /// reused its pid.
    start_ticks: u64,
}

/// The exec driver.
pub struct ExecDriver {
    root: PathBuf,
    exe: PathBuf,
    /// Running instances: id -> supervisor pid.
    running: Mutex<HashMap<InstanceId, u32>>,
    events_tx: mpsc::Sender<DriverEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<DriverEvent>>>,
    /// Put each instance in cgroups with its CPU and memory limits (v2, or
    /// the v1 memory and cpu hierarchies).
    enforce_limits: bool,
    /// The user tasks run as unless their job names one (`None`: the
    /// agent's).
    task_user: Option<String>,
}

/// The uid and gid of user `name` on this machine.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, which outlive the
    // call; `out` is null or points at `pwd`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// The user tasks run as by default: `nobody` where the agent runs as root
/// and the machine has one, else the agent's own.
pub fn default_task_user() -> Option<String> {
    (unsafe { libc::geteuid() } == 0 && lookup_user("nobody").is_some())
        .then(|| "nobody".to_string())
}

/// The start time of a live (not zombie) process, in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, start
    // time field 22.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z") | Some("X") | None) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn pidfd(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just opened by pidfd_open and is owned here only.
    unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd as i32)) }.ok()
}

impl ExecDriver {
    /// A driver keeping instances under `root`; `exe` is the shoal binary
    /// (for `shoal supervise`).
    pub fn new(root: PathBuf, exe: PathBuf) -> Result<ExecDriver> {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let (events_tx, events_rx) = mpsc::channel(super::DRIVER_EVENTS_LEN);
        let _ = DRIVER_EVENTS_LEN;
        Ok(ExecDriver {
            root,
            exe,
            running: Mutex::new(HashMap::new()),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            enforce_limits: crate::host::cgroup_limits_writable(),
            task_user: None,
        })
    }

    /// Tasks whose job names no user run as `user` (`None`, or `root`:
    /// the agent's own user).
    pub fn with_task_user(mut self, user: Option<String>) -> ExecDriver {
        self.task_user = user;
        self
    }

    /// The uid and gid a task runs as (`None`: the agent's own).
    fn task_ids(&self, spec: &InstanceSpec) -> Result<Option<(u32, u32)>> {
        let user = spec.task.user.clone().or_else(|| self.task_user.clone());
        Ok(match user.as_deref() {
            None | Some("root") => None,
            Some(u) => {
                let (uid, gid) = lookup_user(u).with_context(|| {
                    format!("no user `{u}` on this node: create it, or set task.user to another")
                })?;
                let me = unsafe { libc::geteuid() };
                if uid == me && gid == unsafe { libc::getegid() } {
                    // Already the agent's user: nothing to change (and an
                    // unprivileged agent could not drop its groups).
                    None
                } else if me != 0 {
                    bail!("cannot run the task as `{u}`: the agent does not run as root");
                } else {
                    Some((uid, gid))
                }
            }
        })
    }

    fn dir(&self, id: &InstanceId) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn ended(dir: &Path) -> InstanceState {
        match exit_of(dir) {
            Some(status) => InstanceState::Exited(status),
            None => InstanceState::Lost,
        }
    }

    /// Watches a supervisor that is not our child (adopted after a restart).
    fn watch_adopted(&self, id: InstanceId, pid: u32) {
        let tx = self.events_tx.clone();
        let dir = self.dir(&id);
        let Some(fd) = pidfd(pid) else {
            let state = Self::ended(&dir);
            tokio::spawn(async move {
                let _ = tx.send(DriverEvent::Ended { id, state }).await;
            });
            return;
        };
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let state = Self::ended(&dir);
            let _ = tx.send(DriverEvent::Ended { id, state }).await;
        });
    }

    fn signal_group(pid: u32, sig: i32) {
        // The supervisor leads its own session and process group.
        unsafe { libc::kill(-(pid as i32), sig) };
    }
}

#[async_trait::async_trait]
impl Driver for ExecDriver {
    fn name(&self) -> &'static str {
        "exec"
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<()> {
        let dir = self.dir(&spec.id);
        if dir.exists() {
            bail!("instance {} already exists", spec.id);
        }
        let ids = self.task_ids(spec)?;
        std::fs::create_dir_all(&dir)?;
        // The record is written before the process starts (a full disk or
        // an I/O error then starts nothing) and completed with its pid
        // after; a process whose record cannot be written is killed.
        let tmp = dir.join("instance.json.tmp");
        let placeholder = Record {
            spec: spec.clone(),
            pid: u32::MAX,
            start_ticks: u64::MAX,
        };
        if let Err(e) = std::fs::write(&tmp, serde_json::to_vec(&placeholder)?) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e).with_context(|| format!("cannot write the record of {}", spec.id));
        }
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("supervise").arg("--dir").arg(&dir);
        if let Some((uid, gid)) = ids {
            cmd.arg("--uid")
                .arg(uid.to_string())
                .arg("--gid")
                .arg(gid.to_string());
        }
        if self.enforce_limits {
            cmd.arg("--cpu-millis")
                .arg(spec.task.resources.cpu.to_string())
                .arg("--memory-mib")
                .arg(spec.task.resources.memory.to_string());
        }
        let task = spec.resolved();
        supervise::task_env(cmd.as_std_mut(), spec);
        cmd.arg("--")
            .arg(&task.command)
            .args(&task.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        unsafe {
            // A session of its own: survives the agent, and one signal to
            // the group reaches the whole task tree.
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the supervisor of {}", spec.id))?;
        let pid = child.id().context("supervisor exited at once")?;
        let record = Record {
            spec: spec.clone(),
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
        };
        let written = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, dir.join("instance.json")));
        if let Err(e) = written {
            // Unrecorded, the process would run on unseen by any agent
            // (the chaos suite's full disk left one per retry): kill its
            // whole group and forget it.
            ExecDriver::signal_group(pid, libc::SIGKILL);
            let _ = child.wait().await;
            destroy_cgroup(dir.clone()).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e).with_context(|| format!("cannot write the record of {}", spec.id));
        }
        self.running
            .lock()
            .expect("lock")
            .insert(spec.id.clone(), pid);
        let tx = self.events_tx.clone();
        let id = spec.id.clone();
        tokio::spawn(async move {
            // Our child: waiting also reaps it.
            let _ = child.wait().await;
            let state = ExecDriver::ended(&dir);
            let _ = tx.send(DriverEvent::Ended { id, state }).await;
        });
        debug!(instance = %spec.id, pid, "started");
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<()> {
        let pid = self.running.lock().expect("lock").remove(id);
        let record: Option<Record> = std::fs::read(self.dir(id).join("instance.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // Not watched (yet, or any more): the record on disk still names
        // the supervisor, if it is the same process.
        let pid = pid.or_else(|| {
            let record = record.as_ref()?;
            (start_ticks(record.pid) == Some(record.start_ticks)).then_some(record.pid)
        });
        let signal = record
            .as_ref()
            .and_then(|r| r.spec.task.kill_signal.as_deref())
            .map_or(libc::SIGTERM, signal_number);
        let dir = self.dir(id);
        if let Some(pid) = pid {
            ExecDriver::signal_group(pid, signal);
            let deadline = tokio::time::Instant::now() + grace;
            // Bounded wait for the group to go; then kill what is left.
            while tokio::time::Instant::now() < deadline {
                if unsafe { libc::kill(-(pid as i32), 0) } != 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ExecDriver::signal_group(pid, libc::SIGKILL);
        }
        // What left the session (a daemon) is still in the instance's
        // cgroup.
        destroy_cgroup(dir).await;
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<(InstanceSpec, InstanceState)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let dir = entry?.path();
            let Some(record) = std::fs::read(dir.join("instance.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                // A start that never got as far as recording itself (the
                // agent died between the spawn and the record's rename):
                // its task may run, in the instance's cgroups and in the
                // supervisor's process group; both go first (found in
                // review: the directory went and the task ran on).
                warn!(dir = %dir.display(), "removing an instance directory without a record");
                if let Some(pid) = std::fs::read(dir.join("instance.json.tmp"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                    .filter(|r| start_ticks(r.pid) == Some(r.start_ticks))
                    .map(|r| r.pid)
                {
                    ExecDriver::signal_group(pid, libc::SIGKILL);
                }
                destroy_cgroup(dir.clone()).await;
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let alive = start_ticks(record.pid).is_some_and(|t| t == record.start_ticks)
                && exit_of(&dir).is_none();
            let state = if alive {
                self.running
                    .lock()
                    .expect("lock")
                    .insert(record.spec.id.clone(), record.pid);
                self.watch_adopted(record.spec.id.clone(), record.pid);
                InstanceState::Running
            } else {
                ExecDriver::ended(&dir)
            };
            out.push((record.spec, state));
        }
        Ok(out)
    }

    async fn remove(&self, id: &InstanceId) -> Result<()> {
        self.running.lock().expect("lock").remove(id);
        let dir = self.dir(id);
        destroy_cgroup(dir.clone()).await;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }

    async fn logs(&self, id: &InstanceId, stream: &str, max_bytes: u64) -> Result<Vec<u8>> {
        Ok(self
            .log_range(id, stream, max_bytes, None, max_bytes)
            .await?
            .bytes)
    }

    async fn log_range(
        &self,
        id: &InstanceId,
        stream: &str,
        tail: u64,
        from: Option<u64>,
        chunk: u64,
    ) -> Result<super::LogRange> {
        if stream != "stdout" && stream != "stderr" {
            bail!("unknown stream `{stream}`; use stdout or stderr");
        }
        let path = self.dir(id).join(format!("{stream}.log"));
        let mut files: Vec<PathBuf> = (1..=super::supervise::LOG_FILES_KEPT)
            .rev()
            .map(|i| rotated(&path, i))
            .collect();
        files.push(path);
        tokio::task::spawn_blocking(move || read_range(&files, tail, from, chunk))
            .await
            .context("log reader failed")?
    }

    async fn exec_check(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let dir = self.dir(id);
        let record: Record = std::fs::read(dir.join("instance.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("no instance {id} on this node"))?;
        let spec = &record.spec;
        let ids = self.task_ids(spec).map_err(|e| format!("{e:#}"))?;
        let (program, args) = command.split_first().ok_or("no command")?;
        let mut cmd = tokio::process::Command::new(program);
        supervise::task_env(cmd.as_std_mut(), spec);
        supervise::enter_as(cmd.as_std_mut(), &dir.join("work"), ids)
            .map_err(|e| format!("{e:#}"))?;
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // A group of its own: a timeout kills whatever it started.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run `{program}`: {e}"))?;
        let group = child.id();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // Output is read as it comes (a full pipe would stall the check),
        // keeping only its start.
        let run = async { tokio::join!(read_start(stdout), read_start(stderr), child.wait()) };
        let result = tokio::time::timeout(timeout, run).await;
        if let Some(pgid) = group {
            // Whatever it left behind (or all of it, on a timeout).
            unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
        }
        match result {
            Err(_) => Err(super::check_timed_out(timeout)),
            Ok((_, _, Err(e))) => Err(format!("cannot wait for `{program}`: {e}")),
            Ok((_, _, Ok(status))) if status.success() => Ok(()),
            Ok((out, err, Ok(status))) => Err(super::check_failure(
                status.code(),
                &[out.as_slice(), err.as_slice()].concat(),
            )),
        }
    }

    fn events(&self) -> Option<mpsc::Receiver<DriverEvent>> {
        self.events_rx.lock().expect("lock").take()
    }
}

/// Up to `chunk` bytes from offset `from` (default: the start of the last
/// `tail` bytes) of the concatenation of `files` (oldest first; missing ones
/// are empty), read by offset: appends do not move earlier bytes (a
/// rotation does; a fetch across one can show a seam).
fn read_range(
    files: &[PathBuf],
    tail: u64,
    from: Option<u64>,
    chunk: u64,
) -> Result<super::LogRange> {
    use std::io::{Read, Seek, SeekFrom};
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .collect();
    let end = sizes.iter().fold(0u64, |a, s| a.saturating_add(*s));
    let start = from.unwrap_or(end.saturating_sub(tail)).min(end);
    let stop = start.saturating_add(chunk).min(end);
    let mut out = Vec::with_capacity((stop - start) as usize);
    let mut base = 0u64;
    for (file, size) in files.iter().zip(&sizes) {
        let (lo, hi) = (base, base.saturating_add(*size));
        base = hi;
        if hi <= start || lo >= stop {
            continue;
        }
        let from_here = start.max(lo) - lo;
        let want = stop.min(hi) - lo - from_here;
        let mut f =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        f.seek(SeekFrom::Start(from_here))?;
        f.take(want).read_to_end(&mut out)?;
    }
    Ok(super::LogRange {
        start,
        end,
        bytes: out,
    })
}

/// Kills what is left in the cgroup of the instance in `dir` and removes
/// it (off the event loop: a kill waits, boundedly, for the members to go).
async fn destroy_cgroup(dir: PathBuf) {
    if let Some(cg) = super::contain::Cgroup::for_instance(&dir) {
        if cg.path().exists() {
            let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
        }
    }
    // The cgroup v1 limit groups the supervisor listed, if it could not
    // remove them itself.
    if let Ok(listed) = std::fs::read_to_string(dir.join(super::contain::V1_LIMITS_FILE)) {
        let groups: Vec<PathBuf> = listed
            .lines()
            .map(PathBuf::from)
            .filter(|p| p.starts_with("/sys/fs/cgroup/"))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            super::contain::remove_groups(groups.iter().map(PathBuf::as_path))
        })
        .await;
    }
}

/// Kills every exec instance (supervisor process group) whose directory is
/// under `dir`, as if the machine had gone down with its agent. For the
/// demo, tests and fault injection: exec instances outlive their agent by
/// design.
pub fn kill_instances_under(dir: &Path) {
    signal_instances_under(dir, libc::SIGKILL);
    // And what left their sessions.
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Some(cg) = super::contain::Cgroup::for_instance(&e.path()) {
            cg.destroy();
        }
    }
}

/// Sends `sig` to the process group of every instance supervisor started
/// under `dir` (tests and benchmarks: kill a node's processes, freeze
/// them as a hung machine).
pub fn signal_instances_under(dir: &Path, sig: i32) {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" supervise ") && cmd.contains(&needle) {
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

/// The number of a stop signal named in a job (`KILL_SIGNALS`; validation
/// admits no other, and anything else is SIGTERM).
pub fn signal_number(name: &str) -> i32 {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGWINCH" => libc::SIGWINCH,
        _ => libc::SIGTERM,
    }
}
