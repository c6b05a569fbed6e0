//! Containment of an exec instance: everything its task starts is killed
//! with it, even a process that left the task's session (`setsid`,
//! daemonizing).
//!
//! A process group catches a task's ordinary children, but a daemon makes
//! a session of its own and escapes it. A cgroup cannot be left without
//! privileges, so each instance's task runs in a cgroup of its own:
//! - cgroup v1 (this project's CI machines): the `freezer` hierarchy,
//!   `/sys/fs/cgroup/freezer/shoal/<instance>`; a kill freezes the group
//!   (so nothing in it can fork meanwhile), SIGKILLs every member and
//!   thaws it;
//! - cgroup v2: `/sys/fs/cgroup/shoal/<instance>` (where the CPU and memory
//!   limits are set too); a kill writes `cgroup.kill` (Linux 5.14), or
//!   SIGKILLs the members until none is left.
//!
//! On cgroup v1 the CPU and memory limits go to groups of the `memory` and
//! `cpu` hierarchies ([`V1Limits`]), entered the same way.
//!
//! The supervisor enters the cgroup, starts the task (which inherits it)
//! and moves itself back out, so that killing the group never kills the
//! process that records the task's exit. Where no cgroup can be written
//! (no root, a read-only cgroupfs) containment falls back to the process
//! group, and the node says so in its notes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup v1 freezer hierarchy is mounted.
const FREEZER: &str = "/sys/fs/cgroup/freezer";
/// The cgroup v2 mount.
const UNIFIED: &str = "/sys/fs/cgroup";
/// Longest wait for a freeze, or for killed members to go.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// An instance's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    v1: bool,
}

/// A name for the instance in `dir` that no other instance on this machine
/// shares (two agents on one machine may hold instances of the same name):
/// its directory name and a hash of its full path.
fn name_for(dir: &Path) -> String {
    let full = dir.to_string_lossy();
    let leaf: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(100)
        .collect();
    format!("{leaf}-{:016x}", shoal_core::job::fnv1a(full.as_bytes()))
}

impl Cgroup {
    /// The cgroup of the instance in `dir` on this machine's hierarchy
    /// (it may not exist yet), or `None` where there is no cgroupfs.
    pub fn for_instance(dir: &Path) -> Option<Cgroup> {
        let name = name_for(dir);
        if Path::new(UNIFIED).join("cgroup.controllers").exists() {
            Some(Cgroup {
                path: Path::new(super::supervise::CGROUP_ROOT).join(name),
                v1: false,
            })
        } else if Path::new(FREEZER).join("cgroup.procs").exists() {
            Some(Cgroup {
                path: Path::new(FREEZER).join("shoal").join(name),
                v1: true,
            })
        } else {
            None
        }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates it.
    pub fn create(&self) -> std::io::Result<()> {
        fs::create_dir_all(&self.path)
    }

    /// The pids in it.
    pub fn members(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Moves process `pid` (0: the caller) into it.
    pub fn enter(&self, pid: u32) -> std::io::Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    /// Moves the calling process back to the cgroup it was in before
    /// (`original`, from [`Cgroup::current`]).
    pub fn leave(&self, original: &Path) -> std::io::Result<()> {
        fs::write(
            original.join("cgroup.procs"),
            std::process::id().to_string(),
        )
    }

    /// The calling process's cgroup directory on the same hierarchy.
    pub fn current(&self) -> Option<PathBuf> {
        own_group(self.v1.then_some("freezer"))
    }

    /// Kills every process in it; returns how many were left after the
    /// bounded wait (0 when it is empty).
    pub fn kill_all(&self) -> usize {
        if !self.path.exists() {
            return 0;
        }
        if self.v1 {
            // Frozen, nothing in it can fork a process the kill would miss.
            let state = self.path.join("freezer.state");
            let _ = fs::write(&state, "FROZEN");
            let deadline = Instant::now() + KILL_WAIT;
            while Instant::now() < deadline
                && fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FREEZING")
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            for pid in self.members() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = fs::write(&state, "THAWED");
        } else if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for pid in self.members() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left = self.members();
            if left.is_empty() || Instant::now() >= deadline {
                return left.len();
            }
            for pid in &left {
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills what is in it and removes it.
    pub fn destroy(&self) {
        self.kill_all();
        let _ = fs::remove_dir(&self.path);
    }
}

/// The instance's cgroups on the cgroup v1 `memory` and `cpu` hierarchies,
/// where its limits are enforced on a v1 machine (the freezer hierarchy
/// holds no limits). They are nested under the caller's own cgroups there,
/// so that limits set above it (a systemd slice, a container) still hold.
/// The task inherits them from the supervisor, which moves itself back out
/// once the task has started, like the freezer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Limits {
    /// (the instance's group, the caller's group it is nested in), memory
    /// first, then cpu.
    groups: Vec<(PathBuf, PathBuf)>,
}

/// Where the supervisor lists the v1 limit groups of its instance, so that
/// the agent removes them if the supervisor could not.
pub const V1_LIMITS_FILE: &str = "cgroups-v1";

impl V1Limits {
    /// The groups for the instance in `dir`, or `None` unless this machine
    /// has the cgroup v1 memory and cpu hierarchies (and no cgroup v2).
    pub fn for_instance(dir: &Path) -> Option<V1Limits> {
        if Path::new(UNIFIED).join("cgroup.controllers").exists() {
            return None;
        }
        let name = name_for(dir);
        let mut groups = Vec::new();
        for controller in ["memory", "cpu"] {
            if !Path::new(UNIFIED)
                .join(controller)
                .join("cgroup.procs")
                .exists()
            {
                return None;
            }
            let current = own_group(Some(controller))?;
            groups.push((current.join("shoal").join(&name), current));
        }
        Some(V1Limits { groups })
    }

    /// The instance's groups.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.groups.iter().map(|(g, _)| g.as_path())
    }

    /// Creates the groups with the limits (a CFS quota of `quota_us` per
    /// `period_us`, `memory_bytes` of memory and, where swap is accounted,
    /// no swap beyond it) and moves the caller into them.
    pub fn enter(&self, quota_us: u64, period_us: u64, memory_bytes: u64) -> std::io::Result<()> {
        for (g, _) in &self.groups {
            fs::create_dir_all(g)?;
        }
        let (memory, cpu) = (&self.groups[0].0, &self.groups[1].0);
        fs::write(
            memory.join("memory.limit_in_bytes"),
            memory_bytes.to_string(),
        )?;
        let _ = fs::write(
            memory.join("memory.memsw.limit_in_bytes"),
            memory_bytes.to_string(),
        );
        fs::write(cpu.join("cpu.cfs_period_us"), period_us.to_string())?;
        fs::write(cpu.join("cpu.cfs_quota_us"), quota_us.to_string())?;
        for (g, _) in &self.groups {
            fs::write(g.join("cgroup.procs"), std::process::id().to_string())?;
        }
        Ok(())
    }

    /// Moves the caller back to the groups it came from.
    pub fn leave(&self) -> std::io::Result<()> {
        for (_, from) in &self.groups {
            fs::write(from.join("cgroup.procs"), std::process::id().to_string())?;
        }
        Ok(())
    }
}

/// Removes cgroups that should be empty: what is left in them is killed
/// first (bounded), then each directory is removed.
pub fn remove_groups<'a>(groups: impl IntoIterator<Item = &'a Path>) {
    for g in groups {
        if !g.exists() {
            continue;
        }
        let members = || -> Vec<i32> {
            fs::read_to_string(g.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left = members();
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in left {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = fs::remove_dir(g);
    }
}

/// The calling process's cgroup directory: on the cgroup v1 hierarchy of
/// `controller` (mounted at `/sys/fs/cgroup/<controller>`), or on cgroup
/// v2 for `None`.
fn own_group(controller: Option<&str>) -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let line = own.lines().find(|l| match controller {
        Some(c) => l
            .split(':')
            .nth(1)
            .is_some_and(|cs| cs.split(',').any(|x| x == c)),
        None => l.starts_with("0::"),
    })?;
    let rel = line.splitn(3, ':').nth(2)?.trim_start_matches('/');
    let mount = match controller {
        Some(c) => Path::new(UNIFIED).join(c),
        None => PathBuf::from(UNIFIED),
    };
    Some(mount.join(rel))
}

/// Kills every process in process group `pgid` but the caller.
pub fn kill_group_but_me(pgid: i32) {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, pgrp.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if rest
            .split_whitespace()
            .nth(2)
            .and_then(|g| g.parse::<i32>().ok())
            == Some(pgid)
        {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_by_path_and_keep_the_instance_name() {
        let a = name_for(Path::new("/a/instances/web.0.1"));
        let b = name_for(Path::new("/b/instances/web.0.1"));
        assert_ne!(a, b);
        assert!(a.starts_with("web.0.1-"), "{a}");
        assert!(name_for(Path::new("/x/../..")).len() <= 120);
    }
}
