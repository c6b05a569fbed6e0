//! `shoal supervise`: the small process that runs one exec instance.
//!
//! The agent starts it in a new session; it starts the task, copies the
//! task's stdout and stderr into size-capped rotated files, and writes the
//! exit status to `exit.json` when the task ends. Because it outlives an
//! agent crash, a restarted agent finds every instance it started and
//! learns how each one ended: no orphan, no double start, no lost exit code
//! (a batch completion depends on it).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::contain::{self, Cgroup};

/// Size of one log file before it rotates.
pub const LOG_FILE_LEN_MAX: u64 = 4 * 1024 * 1024;
/// Rotated files kept per stream (besides the live one).
pub const LOG_FILES_KEPT: usize = 2;

pub use shoal_core::instance::ExitStatus;

/// A log file that rotates at [`LOG_FILE_LEN_MAX`].
struct RotatingLog {
    path: PathBuf,
    file: File,
    len: u64,
}

impl RotatingLog {
    fn open(path: PathBuf) -> Result<RotatingLog> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(RotatingLog { path, file, len })
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        if self.len + buf.len() as u64 > LOG_FILE_LEN_MAX {
            for i in (1..LOG_FILES_KEPT).rev() {
                let _ = fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1));
            }
            fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.len = 0;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

/// Makes `cmd`'s child start in `work` as the task's user `ids` (uid, gid),
/// or as the agent's when none. The task's user cannot traverse the data
/// dir (0700): the child enters its work dir while still privileged, then
/// drops to the user (supplementary groups first, then the group, then the
/// uid). Shared by the task (here) and its exec checks (the exec driver).
pub fn enter_as(cmd: &mut Command, work: &Path, ids: Option<(u32, u32)>) -> Result<()> {
    let Some((uid, gid)) = ids else {
        cmd.current_dir(work);
        return Ok(());
    };
    use std::os::unix::process::CommandExt;
    let work_c =
        std::ffi::CString::new(work.as_os_str().as_encoded_bytes()).context("work dir path")?;
    unsafe {
        cmd.pre_exec(move || {
            if libc::chdir(work_c.as_ptr()) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Gives `cmd` the task's environment and nothing of the agent's but
/// `PATH`: the job's `env` over the task's (interpolated) one.
pub fn task_env(cmd: &mut Command, spec: &shoal_core::instance::InstanceSpec) {
    let task = spec.resolved();
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(&task.env)
        .envs(&spec.env);
}

/// `stdout.log` -> `stdout.log.1`.
pub fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// Copies `from` into the rotating log `to` until end of file; says so on
/// `done`.
fn pump(mut from: impl Read + Send + 'static, to: PathBuf, done: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        if let Ok(mut log) = RotatingLog::open(to) {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || log.write(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        let _ = done.send(());
    });
}

/// After the task ends, its output is copied for at most this long: a
/// process that outlived it and still holds the pipes (killed below, but
/// one that escaped every containment) cannot keep the slot running.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `command args` in `dir/work`, logging to `dir/{stdout,stderr}.log`,
/// and records the exit in `dir/exit.json`. Returns the task's exit code.
/// `ids`: the uid and gid the task runs as (its work dir becomes theirs);
/// `None`, this process's.
pub fn run(
    dir: &Path,
    command: &str,
    args: &[String],
    limits: Option<Limits>,
    ids: Option<(u32, u32)>,
) -> Result<i32> {
    let work = dir.join("work");
    fs::create_dir_all(&work)?;
    if let Some((uid, gid)) = ids {
        // Only the work dir is the task's: the instance's records and logs
        // stay the agent's (0600).
        std::os::unix::fs::chown(&work, Some(uid), Some(gid))
            .context("cannot give the work dir to the task's user")?;
    }
    // The task starts inside the instance's cgroup (it inherits this
    // process's), and this process leaves it right after: everything the
    // task starts, daemons included, is killed with the group.
    let cgroup = Cgroup::for_instance(dir);
    let mut original = None;
    if let Some(cg) = &cgroup {
        match enter_cgroup(cg, limits) {
            Ok(from) => original = Some(from),
            Err(e) => {
                let mut log = RotatingLog::open(dir.join("stderr.log"))?;
                log.write(
                    format!("shoal: no cgroup for this instance ({e:#}): what the task starts in a session of its own is not stopped with it\n")
                        .as_bytes(),
                )?;
            }
        }
    }
    // cgroup v1: the limits live on other hierarchies than the freezer's.
    let mut v1_limits = match (limits, contain::V1Limits::for_instance(dir)) {
        (Some(l), Some(v1)) => {
            let (quota, period) = cfs_quota(l);
            let listed = v1
                .paths()
                .map(|p| p.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("\n");
            let entered = fs::write(dir.join(contain::V1_LIMITS_FILE), listed)
                .and_then(|()| v1.enter(quota, period, l.memory_mib.saturating_mul(1 << 20)));
            match entered {
                Ok(()) => Some(v1),
                Err(e) => {
                    let _ = v1.leave();
                    contain::remove_groups(v1.paths());
                    let mut log = RotatingLog::open(dir.join("stderr.log"))?;
                    log.write(
                        format!("shoal: the CPU and memory limits cannot be set ({e}); the task runs without them\n")
                            .as_bytes(),
                    )?;
                    None
                }
            }
        }
        _ => None,
    };
    let mut cmd = Command::new(command);
    enter_as(&mut cmd, &work, ids)?;
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    unsafe {
        use std::os::unix::process::CommandExt;
        // The agent runs with umask 077 (its files are private); the task
        // gets the usual one.
        cmd.pre_exec(|| {
            libc::umask(0o022);
            // Nor does it inherit signals ignored above it (an agent
            // started with `nohup`, or in the background of a script,
            // ignores HUP, or INT and QUIT; a shell cannot even trap a
            // signal ignored on entry), so its kill_signal reaches it.
            for sig in [
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGUSR1,
                libc::SIGUSR2,
                libc::SIGWINCH,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn();
    if let Some(v1) = &v1_limits {
        // The task holds the limits; this process must not (its own memory
        // would count against the task's).
        if let Err(e) = v1.leave() {
            // Still inside: removing the groups at the end would kill this
            // process too (found in review), so they are left to the
            // agent's removal of the instance.
            v1_limits = None;
            let mut log = RotatingLog::open(dir.join("stderr.log"))?;
            log.write(
                format!("shoal: cannot leave the instance's limit cgroups: {e}\n").as_bytes(),
            )?;
        }
    }
    if let (Some(cg), Some(from)) = (&cgroup, &original) {
        if let Err(e) = cg.leave(from) {
            // Still inside: a kill of the group would take this process
            // too, so the group is only emptied by the agent's stop.
            original = None;
            let mut log = RotatingLog::open(dir.join("stderr.log"))?;
            log.write(format!("shoal: cannot leave the instance cgroup: {e}\n").as_bytes())?;
        }
    }
    let status = match &mut child {
        Ok(child) => {
            let (done_tx, done) = std::sync::mpsc::channel();
            pump(
                child.stdout.take().expect("piped"),
                dir.join("stdout.log"),
                done_tx.clone(),
            );
            pump(
                child.stderr.take().expect("piped"),
                dir.join("stderr.log"),
                done_tx,
            );
            let status = child.wait()?;
            // The task is over: so is everything it started. Its process
            // group (this process's: the agent made it a session leader)
            // first, then the cgroup, which holds what left the session.
            // Only when this process leads the group (the agent starts it
            // in a session of its own; a direct call, as in a unit test,
            // shares its caller's group, which is not the task's to kill).
            let pgrp = unsafe { libc::getpgrp() };
            if pgrp == std::process::id() as i32 {
                contain::kill_group_but_me(pgrp);
            }
            if let (Some(cg), Some(_)) = (&cgroup, &original) {
                cg.kill_all();
            }
            let deadline = std::time::Instant::now() + DRAIN_WAIT;
            for _ in 0..2 {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if done.recv_timeout(left).is_err() {
                    break;
                }
            }
            use std::os::unix::process::ExitStatusExt;
            ExitStatus {
                code: status.code(),
                signal: status.signal(),
                error: None,
            }
        }
        Err(e) => {
            let why = format!("cannot start `{command}`: {e}");
            let mut log = RotatingLog::open(dir.join("stderr.log"))?;
            log.write(format!("shoal: {why}\n").as_bytes())?;
            // 127: the shell's "command not found"; the reason travels with
            // the exit so the slot shows why it failed.
            ExitStatus {
                code: Some(127),
                signal: None,
                error: Some(why),
            }
        }
    };
    if let (Some(cg), Some(_)) = (&cgroup, &original) {
        cg.destroy();
    }
    if let Some(v1) = &v1_limits {
        contain::remove_groups(v1.paths());
        let _ = fs::remove_file(dir.join(contain::V1_LIMITS_FILE));
    }
    let tmp = dir.join("exit.json.tmp");
    fs::write(&tmp, serde_json::to_vec(&status)?)?;
    fs::rename(&tmp, dir.join("exit.json")).context("cannot record the exit status")?;
    Ok(status.code.unwrap_or(128 + status.signal.unwrap_or(0)))
}

/// CPU and memory limits of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU, millicores (enforced as a CFS quota per 100 ms period).
    pub cpu_millis: u64,
    /// Memory, MiB (enforced as `memory.max`).
    pub memory_mib: u64,
}

/// Root of the cgroups shoal creates.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/shoal";

/// The CFS quota and period for `limits`, microseconds: 1000 millicores
/// is one full period of 100 ms (at least 1 ms per period).
pub fn cfs_quota(limits: Limits) -> (u64, u64) {
    let period = 100_000u64;
    let quota = (limits.cpu_millis.saturating_mul(period) / 1000).max(1000);
    (quota, period)
}

/// cgroup v2 files for `limits`: (`cpu.max`, `memory.max`) contents.
pub fn cgroup_values(limits: Limits) -> (String, String) {
    let (quota, period) = cfs_quota(limits);
    (
        format!("{quota} {period}"),
        limits.memory_mib.saturating_mul(1024 * 1024).to_string(),
    )
}

/// Creates the instance's cgroup, sets the limits where the hierarchy
/// takes them (cgroup v2), and moves this process into it; returns the
/// cgroup it came from.
fn enter_cgroup(cg: &Cgroup, limits: Option<Limits>) -> Result<PathBuf> {
    let from = cg.current().context("cannot tell this process's cgroup")?;
    if let (Some(l), false) = (limits, cg.path().starts_with("/sys/fs/cgroup/freezer")) {
        let root = Path::new(CGROUP_ROOT);
        if !root.exists() {
            fs::create_dir_all(root).context("cannot create the shoal cgroup")?;
            // Let children of the shoal group use the controllers.
            fs::write(
                root.parent()
                    .expect("has a parent")
                    .join("cgroup.subtree_control"),
                "+cpu +memory",
            )
            .ok();
            fs::write(root.join("cgroup.subtree_control"), "+cpu +memory")
                .context("cannot enable cpu and memory controllers")?;
        }
        cg.create()?;
        let (cpu, mem) = cgroup_values(l);
        fs::write(cg.path().join("cpu.max"), cpu).context("cannot set cpu.max")?;
        fs::write(cg.path().join("memory.max"), mem).context("cannot set memory.max")?;
    } else {
        cg.create()
            .with_context(|| format!("cannot create {}", cg.path().display()))?;
    }
    cg.enter(std::process::id())
        .with_context(|| format!("cannot join {}", cg.path().display()))?;
    Ok(from)
}

/// The recorded exit of the instance in `dir`, if it ended.
pub fn exit_of(dir: &Path) -> Option<ExitStatus> {
    let bytes = fs::read(dir.join("exit.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_values_follow_the_request() {
        assert_eq!(
            cgroup_values(Limits {
                cpu_millis: 500,
                memory_mib: 64
            }),
            ("50000 100000".into(), "67108864".into())
        );
        assert_eq!(
            cgroup_values(Limits {
                cpu_millis: 2000,
                memory_mib: 1
            })
            .0,
            "200000 100000"
        );
        // a tiny request still gets a usable quota
        assert_eq!(
            cgroup_values(Limits {
                cpu_millis: 1,
                memory_mib: 1
            })
            .0,
            "1000 100000"
        );
    }

    #[test]
    fn records_exit_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let code = run(
            dir.path(),
            "sh",
            &["-c".into(), "echo out; echo err >&2; exit 3".into()],
            None,
            None,
        )
        .unwrap();
        assert_eq!(code, 3);
        assert_eq!(
            exit_of(dir.path()),
            Some(ExitStatus {
                code: Some(3),
                signal: None,
                error: None,
            })
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("stdout.log")).unwrap(),
            "out\n"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("stderr.log")).unwrap(),
            "err\n"
        );
    }

    #[test]
    fn a_missing_program_is_an_exit_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            run(dir.path(), "/no/such/program", &[], None, None).unwrap(),
            127
        );
        let exit = exit_of(dir.path()).unwrap();
        assert!(
            exit.error
                .as_deref()
                .is_some_and(|e| e.contains("/no/such/program")),
            "{exit:?}"
        );
        assert!(fs::read_to_string(dir.path().join("stderr.log"))
            .unwrap()
            .contains("cannot start"));
    }

    #[test]
    fn logs_rotate_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingLog::open(path.clone()).unwrap();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..10 {
            log.write(&chunk).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= LOG_FILE_LEN_MAX);
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "older files are dropped");
    }
}
