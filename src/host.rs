//! Facts about the machine the agent runs on.

use std::fs;

/// CPU capacity in millicores: the cores this process may use.
pub fn cpu_millis() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64 * 1000)
        .unwrap_or(1000)
}

/// Memory capacity in MiB, from `/proc/meminfo` (MemTotal).
pub fn memory_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo_total_kib(&s))
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

fn parse_meminfo_total_kib(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Whether this process can create cgroup v2 groups with CPU and memory
/// controllers (to enforce instance limits).
pub fn cgroup_v2_writable() -> bool {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) else {
        return false;
    };
    if !(controllers.contains("cpu") && controllers.contains("memory")) {
        return false;
    }
    let probe = root.join(format!("shoal-probe-{}", std::process::id()));
    let ok = fs::create_dir(&probe).is_ok();
    let _ = fs::remove_dir(&probe);
    ok
}

/// Whether exec instances' CPU and memory limits can be enforced here: a
/// writable cgroup v2, or writable cgroup v1 memory and cpu hierarchies
/// (where this process's own groups take sub-groups).
pub fn cgroup_limits_writable() -> bool {
    if cgroup_v2_writable() {
        return true;
    }
    let probe = std::path::Path::new("/shoal-probe").join(std::process::id().to_string());
    let Some(v1) = crate::driver::contain::V1Limits::for_instance(&probe) else {
        return false;
    };
    let ok = v1.paths().all(|g| {
        let made = fs::create_dir_all(g).is_ok();
        let _ = fs::remove_dir(g);
        made
    });
    ok
}

/// This process's resident memory, KiB (VmRSS).
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// A process's resident memory, KiB (VmRSS); `pid` is a number or "self".
pub fn rss_kib_of(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The host name, for the default node name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "shoal-node".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo() {
        let s = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        assert_eq!(super::parse_meminfo_total_kib(s), Some(24_576_000));
        assert_eq!(super::parse_meminfo_total_kib("junk"), None);
        assert!(super::cpu_millis() >= 1000);
    }
}
