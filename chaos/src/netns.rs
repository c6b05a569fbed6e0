//! Network namespaces joined by a private bridge, each a test host with its
//! own address; random packet loss on each host's interface (nftables).
//! Everything is removed on drop, and leftovers of an interrupted run are
//! removed on creation.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const IPTABLES: [&str; 2] = ["iptables", "iptables-legacy"];

/// The nftables table holding a host's fault rules.
const TABLE: &str = "shoal_chaos";

/// Runs `ip ARGS`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A set of namespaces `<prefix>-<i>` on bridge `<prefix>br`.
pub struct Hosts {
    prefix: String,
    count: usize,
    subnet: [u8; 3],
}

impl Hosts {
    /// Creates `count` hosts with addresses `subnet.1`, `subnet.2`, ...
    /// The bridge has no address: traffic stays among the namespaces.
    pub fn create(prefix: &str, count: usize, subnet: [u8; 3]) -> Result<Hosts> {
        let hosts = Hosts {
            prefix: prefix.into(),
            count,
            subnet,
        };
        hosts.remove_all();
        let br = hosts.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        // Docker sets the FORWARD policy to DROP and has bridged traffic
        // filtered by iptables; let ours through.
        for tool in IPTABLES {
            let _ = Command::new(tool)
                .args(["-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])
                .output();
        }
        for i in 0..count {
            let ns = hosts.ns(i);
            let veth = format!("{}v{i}", hosts.prefix);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", hosts.addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// Namespace name of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Address of host `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, i as u8 + 1)
    }

    /// A command that runs `program` inside host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i)]).arg(program);
        cmd
    }

    /// Drops `percent`% of host `i`'s outgoing packets at random, with
    /// nftables (works on kernels without the netem qdisc, such as this
    /// project's CI machines).
    pub fn loss(&self, i: usize, percent: u32) -> Result<()> {
        self.faults(i, percent, &[])
    }

    /// Sets host `i`'s network faults, replacing earlier ones: `percent`%
    /// of its outgoing packets dropped at random, and every packet to the
    /// `blocked` addresses dropped (a partition, one-way unless the other
    /// side blocks too). Nothing at all clears them. One nftables table,
    /// loaded in one transaction.
    pub fn faults(&self, i: usize, percent: u32, blocked: &[Ipv4Addr]) -> Result<()> {
        self.clear_loss(i);
        if percent == 0 && blocked.is_empty() {
            return Ok(());
        }
        let mut rules = String::new();
        for addr in blocked {
            rules.push_str(&format!("    ip daddr {addr} counter drop\n"));
        }
        if percent > 0 {
            rules.push_str(&format!(
                "    oifname \"eth0\" numgen random mod 100 < {percent} counter drop\n"
            ));
        }
        let script = format!(
            "table inet {TABLE} {{\n  chain out {{\n    type filter hook output priority 0;\n{rules}  }}\n}}\n"
        );
        let mut child = self
            .command(i, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft on {}: {}",
                self.ns(i),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Gives the bridge the address `subnet.254`, so that this (the root)
    /// namespace reaches every host — for a harness reading their APIs.
    /// Faults between hosts are unaffected.
    pub fn reach_from_root(&self) -> Result<Ipv4Addr> {
        let [a, b, c] = self.subnet;
        let addr = Ipv4Addr::new(a, b, c, 254);
        ip(&["addr", "add", &format!("{addr}/24"), "dev", &self.bridge()])?;
        Ok(addr)
    }

    /// Packets host `i`'s fault rules dropped so far.
    pub fn dropped(&self, i: usize) -> u64 {
        let text = self
            .command(i, "nft")
            .args(["list", "table", "inet", TABLE])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Removes host `i`'s fault rules.
    pub fn clear_loss(&self, i: usize) {
        let _ = self
            .command(i, "nft")
            .args(["delete", "table", "inet", TABLE])
            .output();
    }

    fn remove_all(&self) {
        for i in 0..self.count.max(64) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{}v{i}", self.prefix)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
        let br = self.bridge();
        for tool in IPTABLES {
            while Command::new(tool)
                .args(["-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])
                .output()
                .is_ok_and(|o| o.status.success())
            {}
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove_all();
    }
}
