//! Health checks as the shell runs them: one task per copy with checks,
//! probing each check every its interval and reporting each result to the
//! core ([`shoal_core::Scheduler::handle_check`]), which keeps the streaks
//! and decides the copy's health.
//!
//! Bounds: at most [`CHECKS_MAX`](shoal_core::health::CHECKS_MAX) checks per
//! copy (the job file's limit), every probe within its `timeout`, at most
//! [`EXEC_CHECKS_MAX`] exec checks running at once on the node (a probe
//! that finds them all busy waits its turn, within its timeout), an HTTP
//! answer's head only (its body is never read).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_core::health::{CheckKind, Probe};
use shoal_core::instance::InstanceId;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::driver::Driver;

/// Exec checks running at once on a node, at most.
pub const EXEC_CHECKS_MAX: usize = 16;

/// Results waiting for the loop, at most (a full queue slows the probes).
pub const RESULTS_LEN: usize = 1024;

/// One probe's result.
#[derive(Debug)]
pub struct CheckResult {
    /// The copy.
    pub id: InstanceId,
    /// The check's index in its task.
    pub index: usize,
    /// Passed, or why not.
    pub result: Result<(), String>,
}

/// The copies whose checks run.
pub struct Watcher {
    running: HashMap<InstanceId, JoinSet<()>>,
    tx: mpsc::Sender<CheckResult>,
    execs: Arc<Semaphore>,
}

impl Watcher {
    /// A watcher and the receiver of its results.
    pub fn new() -> (Watcher, mpsc::Receiver<CheckResult>) {
        let (tx, rx) = mpsc::channel(RESULTS_LEN);
        (
            Watcher {
                running: HashMap::new(),
                tx,
                execs: Arc::new(Semaphore::new(EXEC_CHECKS_MAX)),
            },
            rx,
        )
    }

    /// Copies whose checks run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no copy's checks run.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Runs `probes` of copy `id` (replacing any it ran).
    pub fn watch(&mut self, driver: Arc<dyn Driver>, id: InstanceId, probes: Vec<Probe>) {
        let mut set = JoinSet::new();
        for probe in probes {
            let (tx, id, driver, execs) = (
                self.tx.clone(),
                id.clone(),
                driver.clone(),
                self.execs.clone(),
            );
            set.spawn(async move {
                let mut tick = tokio::time::interval(probe.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = run(&probe, &id, driver.as_ref(), &execs).await;
                    let r = CheckResult {
                        id: id.clone(),
                        index: probe.index,
                        result,
                    };
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
            });
        }
        // Dropping a JoinSet aborts its tasks.
        self.running.insert(id, set);
    }

    /// Stops the checks of copy `id`.
    pub fn unwatch(&mut self, id: &InstanceId) {
        self.running.remove(id);
    }
}

/// One probe, bounded by its timeout.
async fn run(
    probe: &Probe,
    id: &InstanceId,
    driver: &dyn Driver,
    execs: &Semaphore,
) -> Result<(), String> {
    let timeout = probe.timeout;
    let timed_out = || format!("timed out after {}", humantime::format_duration(timeout));
    match probe.kind {
        CheckKind::Tcp => {
            let addr = probe.addr.ok_or("the port has no host port")?;
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Err(_) => Err(timed_out()),
                Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
                Ok(Ok(_)) => Ok(()),
            }
        }
        CheckKind::Http => {
            let addr = probe.addr.ok_or("the port has no host port")?;
            tokio::time::timeout(timeout, http_get(addr, &probe.path))
                .await
                .unwrap_or_else(|_| Err(timed_out()))
        }
        CheckKind::Exec => {
            let started = tokio::time::Instant::now();
            let Ok(Ok(_permit)) = tokio::time::timeout(timeout, execs.acquire()).await else {
                return Err(format!(
                    "{EXEC_CHECKS_MAX} exec checks already run on this node; {}",
                    timed_out()
                ));
            };
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            driver.exec_check(id, &probe.command, left).await
        }
    }
}

/// `GET path` on `addr`: passes on a 2xx or 3xx status.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP handshake with {addr} failed: {e}"))?;
    // The connection is driven beside the request and dropped with it.
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "shoal-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("bad request for `{path}`: {e}"))?;
    let answer = sender.send_request(request).await;
    conn.abort();
    let status = answer
        .map_err(|e| format!("GET {path} on {addr} failed: {e}"))?
        .status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(kind: CheckKind, addr: std::net::SocketAddr, path: &str) -> Probe {
        Probe {
            index: 0,
            name: "t".into(),
            kind,
            addr: Some(addr),
            path: path.into(),
            command: Vec::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }

    /// A one-connection-at-a-time HTTP server answering `status` to
    /// every request.
    async fn server(status: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_and_tcp_probes_tell_up_from_down() {
        let driver = crate::driver::hollow::HollowDriver::default();
        let execs = Semaphore::new(1);
        let id = InstanceId {
            job: "j".into(),
            slot: 0,
            run: 1,
        };
        let ok = server("204 No Content").await;
        let moved = server("302 Found").await;
        let bad = server("503 Service Unavailable").await;
        assert_eq!(
            run(&probe(CheckKind::Http, ok, "/"), &id, &driver, &execs).await,
            Ok(())
        );
        assert_eq!(
            run(&probe(CheckKind::Http, moved, "/x"), &id, &driver, &execs).await,
            Ok(())
        );
        let e = run(
            &probe(CheckKind::Http, bad, "/health"),
            &id,
            &driver,
            &execs,
        )
        .await
        .unwrap_err();
        assert!(e.contains("503"), "{e}");
        assert_eq!(
            run(&probe(CheckKind::Tcp, ok, "/"), &id, &driver, &execs).await,
            Ok(())
        );
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(
            run(&probe(CheckKind::Tcp, closed, "/"), &id, &driver, &execs)
                .await
                .is_err()
        );
        assert!(
            run(&probe(CheckKind::Http, closed, "/"), &id, &driver, &execs)
                .await
                .is_err()
        );
        // A server that accepts and never answers: the timeout decides.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = run(
            &probe(CheckKind::Http, silent.local_addr().unwrap(), "/"),
            &id,
            &driver,
            &execs,
        )
        .await
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }
}
