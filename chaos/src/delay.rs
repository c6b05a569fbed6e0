//! Packet delay with jitter between network namespaces, on a kernel without
//! `sch_netem` and without NFQUEUE: a userspace relay.
//!
//! Each host gets a TUN device (`shdly`) created inside its namespace. While
//! a delay fault lasts, every host routes its peers' addresses (one /32 route
//! per peer) into its TUN device instead of the bridge; the relay reads each
//! IP packet there, holds it for `base ± jitter` and writes it, unchanged,
//! into the destination host's TUN device. Addresses, ports and payloads are
//! untouched, so QUIC, SWIM and the agents see a slow, reordering network and
//! nothing else. Without the routes the relay carries nothing.
//!
//! Why a relay and not `tbf` (which this kernel has): a token bucket only
//! delays packets that exceed its rate, so the delay depends on the traffic
//! and cannot be set; a relay gives a chosen delay and jitter to every packet.
//! Why not a socket shim inside the agent: the agent under test would run
//! code the production agent does not.
//!
//! Bounded: at most [`QUEUE_MAX`] packets held at once (more are dropped and
//! counted), packets of at most [`PACKET_MAX`] bytes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::netns::ip;

/// Name of the TUN device in every host.
pub const DEVICE: &str = "shdly";
/// Packets held at once; beyond it the relay drops (and counts) packets.
pub const QUEUE_MAX: usize = 65_536;
/// Largest packet read (the device's MTU is 1500).
pub const PACKET_MAX: usize = 65_536;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A packet waiting for its time: (due, arrival order, destination host,
/// bytes); the heap pops the earliest.
type Held = Reverse<(Instant, u64, usize, Vec<u8>)>;

#[derive(Default)]
struct Shared {
    queue: Mutex<(BinaryHeap<Held>, u64)>,
    ready: Condvar,
    /// (base, jitter) in microseconds.
    delay: Mutex<(u64, u64)>,
    stop: AtomicBool,
    relayed: AtomicU64,
    dropped: AtomicU64,
}

/// The relay: one TUN device per host, threads that carry packets between
/// them. Stops its threads on drop.
pub struct Relay {
    shared: Arc<Shared>,
    namespaces: Vec<String>,
    subnet: [u8; 3],
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Opens a TUN device named [`DEVICE`] inside namespace `ns`.
fn open_tun_in(ns: &str) -> Result<File> {
    let path = format!("/run/netns/{ns}");
    let ns = ns.to_string();
    // setns changes the calling thread's namespace only: do it on a thread
    // of its own; the device, once created, stays in that namespace.
    std::thread::spawn(move || -> Result<File> {
        let nsfile = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {ns}: {}", std::io::Error::last_os_error());
        }
        // Packets arrive on the device but the route back to their source
        // is the bridge: strict reverse-path filtering would drop them.
        // (/proc/sys/net is the opening thread's namespace's.)
        let rp_filter = |key: &str| {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{key}/rp_filter"), "0")
                .with_context(|| format!("cannot turn off rp_filter ({key}) in {ns}"))
        };
        rp_filter("all")?;
        rp_filter("default")?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("cannot open /dev/net/tun")?;
        // struct ifreq: 16 bytes of name, then the flags.
        let mut ifr = [0u8; 40];
        ifr[..DEVICE.len()].copy_from_slice(DEVICE.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
            bail!("TUNSETIFF in {ns}: {}", std::io::Error::last_os_error());
        }
        rp_filter(DEVICE)?;
        Ok(tun)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TUN thread panicked"))?
}

impl Relay {
    /// Creates the devices in namespaces `namespaces[i]` (host `i` has
    /// address `subnet.(i+1)`) and starts the relay, carrying nothing until
    /// [`Relay::delay`].
    pub fn start(namespaces: &[String], subnet: [u8; 3], seed: u64) -> Result<Relay> {
        let shared = Arc::new(Shared::default());
        let mut devices = Vec::new();
        for ns in namespaces {
            let tun = open_tun_in(ns)?;
            ip(&["-n", ns, "link", "set", DEVICE, "up"])?;
            devices.push(Arc::new(tun));
        }
        let mut relay = Relay {
            shared: shared.clone(),
            namespaces: namespaces.to_vec(),
            subnet,
            threads: Vec::new(),
        };
        for (i, dev) in devices.iter().enumerate() {
            let shared = shared.clone();
            let dev = dev.clone();
            let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
            let n = devices.len();
            relay.threads.push(std::thread::spawn(move || {
                read_loop(&dev, &shared, subnet, n, &mut rng)
            }));
        }
        let sh = shared.clone();
        let devs = devices.clone();
        relay
            .threads
            .push(std::thread::spawn(move || write_loop(&devs, &sh)));
        Ok(relay)
    }

    /// Routes every host's traffic to its peers through the relay, each
    /// packet held `base` ± `jitter`.
    pub fn delay(&self, base: Duration, jitter: Duration) -> Result<()> {
        *self.shared.delay.lock().expect("lock") =
            (base.as_micros() as u64, jitter.as_micros() as u64);
        self.routes("replace")
    }

    /// Back to the bridge; packets still held are delivered.
    pub fn clear(&self) -> Result<()> {
        self.routes("del")
    }

    fn routes(&self, verb: &str) -> Result<()> {
        let [a, b, c] = self.subnet;
        let mut errors = Vec::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            for j in (0..self.namespaces.len()).filter(|j| *j != i) {
                let to = format!("{}/32", Ipv4Addr::new(a, b, c, j as u8 + 1));
                if let Err(e) = ip(&["-n", ns, "route", verb, &to, "dev", DEVICE]) {
                    errors.push(e.to_string());
                }
            }
        }
        if verb != "del" && !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(())
    }

    /// Packets relayed and dropped (queue full) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.relayed.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_loop(dev: &File, shared: &Shared, subnet: [u8; 3], n: usize, rng: &mut StdRng) {
    let mut buf = vec![0u8; PACKET_MAX];
    let fd = dev.as_raw_fd();
    let mut reader: &File = dev;
    while !shared.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Wake every 200 ms to notice `stop`.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let Ok(len) = reader.read(&mut buf) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let p = &buf[..len];
        // IPv4 only; the destination decides the host.
        if len < 20 || p[0] >> 4 != 4 || p[16..19] != subnet {
            continue;
        }
        let host = p[19] as usize;
        if host == 0 || host > n {
            continue;
        }
        let (base, jitter) = *shared.delay.lock().expect("lock");
        let lo = base.saturating_sub(jitter);
        let hi = base.saturating_add(jitter);
        let us = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            base
        };
        let mut q = shared.queue.lock().expect("lock");
        if q.0.len() >= QUEUE_MAX {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        q.1 += 1;
        let seq = q.1;
        let due = Instant::now() + Duration::from_micros(us);
        q.0.push(Reverse((due, seq, host - 1, p.to_vec())));
        shared.ready.notify_one();
    }
}

fn write_loop(devices: &[Arc<File>], shared: &Shared) {
    let mut q = shared.queue.lock().expect("lock");
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        match q.0.peek() {
            Some(Reverse((due, ..))) if *due <= now => {
                let Reverse((_, _, to, bytes)) = q.0.pop().expect("peeked");
                drop(q);
                let mut dev: &File = &devices[to];
                if dev.write_all(&bytes).is_ok() {
                    shared.relayed.fetch_add(1, Ordering::Relaxed);
                }
                q = shared.queue.lock().expect("lock");
            }
            Some(Reverse((due, ..))) => {
                let wait = *due - now;
                q = shared.ready.wait_timeout(q, wait).expect("lock").0;
            }
            None => {
                q = shared
                    .ready
                    .wait_timeout(q, Duration::from_millis(200))
                    .expect("lock")
                    .0;
            }
        }
    }
}
