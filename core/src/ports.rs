//! Host ports of an instance: static ones from the job file, dynamic ones
//! (`http = 0`) chosen by the node that runs the copy from the range it
//! owns, and the `${SHOAL_...}` variables the task's command, arguments and
//! environment may refer to.
//!
//! A dynamic port is chosen by the holder, not by the coordinator: only
//! the holder knows which ports its copies bind at the moment of the start
//! (including copies still stopping), so two copies on one node never get
//! the same port, and no placement needs to wait for one.

use std::collections::{BTreeMap, BTreeSet};

/// Default range of dynamic ports a node owns (as Nomad's 20000-32000).
pub const DEFAULT_RANGE: (u16, u16) = (20_000, 32_000);

/// Longest port name.
pub const PORT_NAME_LEN_MAX: usize = 32;

/// The variables every instance gets besides its ports.
pub const BASE_VARS: [&str; 3] = ["SHOAL_JOB", "SHOAL_SLOT", "SHOAL_NODE"];

/// Whether `name` can name a port: 1 to 32 letters, digits, '_' or '-',
/// starting with a letter (it becomes part of an environment variable).
pub fn valid_port_name(name: &str) -> bool {
    (1..=PORT_NAME_LEN_MAX).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// `SHOAL_PORT_<NAME>`: the variable holding port `name`'s host port.
pub fn port_var(name: &str) -> String {
    format!("SHOAL_PORT_{}", suffix(name))
}

/// `SHOAL_ADDR_<NAME>`: the variable holding `ip:port` of port `name`.
pub fn addr_var(name: &str) -> String {
    format!("SHOAL_ADDR_{}", suffix(name))
}

/// The `SHOAL_` variables an instance of a task with these port names
/// gets.
pub fn known_vars<'a>(port_names: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
    let mut vars: BTreeSet<String> = BASE_VARS.iter().map(|v| v.to_string()).collect();
    for name in port_names {
        vars.insert(port_var(name));
        vars.insert(addr_var(name));
    }
    vars
}

/// The `${SHOAL_...}` references in `text`, in order (other `${...}` are
/// the shell's, left alone).
pub fn references(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${SHOAL_") {
        let after = &rest[at + 2..];
        match after.find('}') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// The `SHOAL_` variables of copy `id` on node `node` with these host
/// ports (`ip`: the node's address, 127.0.0.1 when unknown).
pub fn instance_env(
    id: &crate::instance::InstanceId,
    node: &str,
    ports: &BTreeMap<String, u16>,
    ip: Option<std::net::IpAddr>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("SHOAL_JOB".to_string(), id.job.clone()),
        ("SHOAL_SLOT".to_string(), id.slot.to_string()),
        ("SHOAL_NODE".to_string(), node.to_string()),
    ]);
    let ip = ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    for (name, port) in ports {
        env.insert(port_var(name), port.to_string());
        env.insert(
            addr_var(name),
            std::net::SocketAddr::new(ip, *port).to_string(),
        );
    }
    env
}

/// `text` with every `${SHOAL_...}` naming one of `vars` replaced by its
/// value; anything else is kept as written.
pub fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> String {
    if !text.contains("${SHOAL_") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${SHOAL_") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find('}') {
            Some(end) => {
                match vars.get(&after[..end]) {
                    Some(value) => out.push_str(value),
                    None => out.push_str(&rest[at..at + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[at..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Chooses a host port for each dynamic port (`0`) in `wanted` from
/// `range`, avoiding `used` and each other; static ports are kept. The
/// search starts at a point derived from `seed` (the instance), so copies
/// started together spread over the range instead of probing from its
/// start. `None` when the range has too few free ports.
pub fn assign(
    wanted: &BTreeMap<String, u16>,
    range: (u16, u16),
    used: &BTreeSet<u16>,
    seed: u64,
) -> Option<BTreeMap<String, u16>> {
    let (lo, hi) = (range.0.min(range.1), range.0.max(range.1));
    let len = u64::from(hi - lo) + 1;
    let mut taken = used.clone();
    let mut out = BTreeMap::new();
    let mut next = seed % len;
    for (name, port) in wanted {
        if *port != 0 {
            out.insert(name.clone(), *port);
            continue;
        }
        let mut found = None;
        for i in 0..len {
            let candidate = lo + ((next + i) % len) as u16;
            if !taken.contains(&candidate) {
                found = Some(candidate);
                next = (next + i + 1) % len;
                break;
            }
        }
        let port = found?;
        taken.insert(port);
        out.insert(name.clone(), port);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_ports_are_free_distinct_and_in_range_and_static_ones_kept() {
        let wanted = BTreeMap::from([
            ("a".to_string(), 0),
            ("b".to_string(), 0),
            ("s".to_string(), 8080),
        ]);
        let used = BTreeSet::from([20_000, 20_001, 20_002]);
        for seed in 0..50 {
            let got = assign(&wanted, (20_000, 20_010), &used, seed).unwrap();
            assert_eq!(got["s"], 8080);
            assert_ne!(got["a"], got["b"]);
            for p in [got["a"], got["b"]] {
                assert!((20_003..=20_010).contains(&p), "{p}");
            }
        }
        // Exactly enough, then one short.
        let full: BTreeSet<u16> = (20_000..20_009).collect();
        assert!(assign(&wanted, (20_000, 20_010), &full, 3).is_some());
        let fuller: BTreeSet<u16> = (20_000..20_010).collect();
        assert_eq!(assign(&wanted, (20_000, 20_010), &fuller, 3), None);
        // A one-port range, and the top of the port space.
        let one = BTreeMap::from([("a".to_string(), 0)]);
        assert_eq!(
            assign(&one, (65_535, 65_535), &BTreeSet::new(), u64::MAX).unwrap()["a"],
            65_535
        );
    }

    #[test]
    fn shoal_references_are_replaced_and_everything_else_kept() {
        let vars = BTreeMap::from([
            ("SHOAL_PORT_HTTP".to_string(), "20001".to_string()),
            ("SHOAL_SLOT".to_string(), "3".to_string()),
        ]);
        assert_eq!(
            interpolate("-p ${SHOAL_PORT_HTTP} slot=${SHOAL_SLOT}", &vars),
            "-p 20001 slot=3"
        );
        assert_eq!(
            interpolate("${HOME} $SHOAL_SLOT", &vars),
            "${HOME} $SHOAL_SLOT"
        );
        assert_eq!(interpolate("${SHOAL_NOPE}x", &vars), "${SHOAL_NOPE}x");
        assert_eq!(interpolate("tail ${SHOAL_SLOT", &vars), "tail ${SHOAL_SLOT");
        assert_eq!(interpolate("é${SHOAL_SLOT}ü", &vars), "é3ü");
        assert_eq!(
            references("a ${SHOAL_X} ${HOME} ${SHOAL_PORT_HTTP}"),
            vec!["SHOAL_X", "SHOAL_PORT_HTTP"]
        );
        assert_eq!(port_var("web-ui"), "SHOAL_PORT_WEB_UI");
        assert!(valid_port_name("http") && valid_port_name("Web-2"));
        assert!(!valid_port_name("2x") && !valid_port_name("") && !valid_port_name("a b"));
    }
}
