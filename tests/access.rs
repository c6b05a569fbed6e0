//! Local access to an agent: its API requires a token by default, and what
//! it writes is private to its user (the #11 probe: a job posted by
//! `nobody` over the open loopback API ran as root and read the join token;
//! `state.redb` and instance logs were world-readable).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_api_requires_the_token_the_agent_wrote_and_its_files_are_private() {
    let root = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(root.path(), "n0", None, None, &[]);
    let url = format!("{}/v1/nodes", agent.http());

    // No token, or a wrong one: 401 with what to do.
    let (code, body) = call(ureq::get(&url), None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("api-token"), "{body}");
    let wrong = format!("Bearer {}x", agent.api_token());
    let (code, _) = call(ureq::get(&url).set("Authorization", &wrong), None);
    assert_eq!(code, 401);
    // The token from <data-dir>/api-token works.
    let token = agent.api_token();
    assert!(token.len() >= 32, "a strong token: {token}");
    let (code, _) = call(agent.request("GET", "/v1/nodes"), None);
    assert_eq!(code, 200);

    // The CLI finds it in the data dir; without a readable one it says how.
    let (ok, out, err) = cli(&agent, &["nodes"]);
    assert!(ok, "{err}");
    assert!(out.contains("n0"), "{out}");
    let out = Command::new(BIN)
        .args(["nodes"])
        .env("SHOAL_ADDR", agent.http())
        .env("SHOAL_DATA_DIR", root.path().join("elsewhere"))
        .env_remove("SHOAL_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SHOAL_HTTP_TOKEN") && err.contains("api-token"),
        "{err}"
    );

    // A job's files are private too.
    let job = job_file(
        root.path(),
        "hello",
        "name = \"hello\"\ntype = \"batch\"\n[task]\ncommand = \"sh\"\nargs = [\"-c\", \"echo hi\"]\n",
    );
    let (ok, _, err) = cli(&agent, &["run", job.to_str().unwrap(), "--timeout", "30"]);
    assert!(ok, "{err}");
    let dir = agent.dir.clone();
    assert_eq!(mode(&dir), 0o700, "data dir");
    for f in ["api-token", "join-token", "state.redb"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let instance = std::fs::read_dir(dir.join("instances"))
        .unwrap()
        .flatten()
        .next()
        .expect("an instance dir")
        .path();
    assert_eq!(mode(&instance) & 0o077, 0, "{}", instance.display());
    for f in ["instance.json", "stdout.log", "exit.json"] {
        assert_eq!(mode(&instance.join(f)) & 0o077, 0, "{f}");
    }

    // A job cannot read the agent's secrets: it runs as `nobody`, which
    // cannot enter the data dir.
    let thief = job_file(
        root.path(),
        "thief",
        &format!(
            "name = \"thief\"\ntype = \"batch\"\n[restart]\nattempts = 0\n[task]\ncommand = \"cat\"\nargs = [\"{}\"]\n",
            dir.join("join-token").display()
        ),
    );
    let (ok, _, _) = cli(&agent, &["run", thief.to_str().unwrap(), "--timeout", "30"]);
    assert!(!ok, "a job read the join token");
    let (_, logs, _) = cli(&agent, &["logs", "thief", "--slot", "0", "--stderr"]);
    assert!(logs.contains("Permission denied"), "{logs}");

    // A restart keeps the token (a client that read it keeps working).
    agent.stop(libc::SIGTERM);
    let again = Agent::start(root.path(), "n0", None, None, &[]);
    assert_eq!(again.api_token(), token);
    let (code, _) = call(again.request("GET", "/v1/nodes"), None);
    assert_eq!(code, 200);
    drop(again);
}

#[test]
fn a_short_http_token_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "agent",
            "--name",
            "n0",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(root.path().join("n0"))
        .args(["--http-token", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--http-token") && err.contains("16"), "{err}");
}

/// Clients without a token cannot lock the API: idle and slow connections
/// are closed once the header timeout passes, and at most
/// `--http-connections-max` are served at once (before, idle connections
/// stayed open for ever and there was no cap).
#[test]
fn idle_and_slow_connections_cannot_lock_the_api_out() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        root.path(),
        "n0",
        None,
        None,
        &["--http-header-timeout", "1s", "--http-connections-max", "4"],
    );
    let addr = agent.http().trim_start_matches("http://").to_string();
    let opened = std::time::Instant::now();
    // Four connections that send nothing, or a request head byte by byte.
    let mut idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let mut slow = idle.pop().unwrap();
    let dribble = std::thread::spawn(move || {
        for b in b"GET /v1/health HTTP/1.1\r\nHost: x\r\n".iter() {
            if slow.write_all(&[*b]).is_err() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        // Every byte went through: the slow head was never cut.
        false
    });
    // A client with the token still gets its answer (the slot of a closed
    // connection frees).
    let (code, body) = call(
        agent
            .request("GET", "/v1/health")
            .timeout(std::time::Duration::from_secs(20)),
        None,
    );
    assert_eq!(code, 200, "{body}");
    for c in &mut idle {
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(c.read(&mut buf).unwrap(), 0, "an idle connection is closed");
    }
    assert!(opened.elapsed() < std::time::Duration::from_secs(10));
    assert!(dribble.join().unwrap(), "a slow request head is cut off");
    // A client without the token gets its 401 and loses the connection: it
    // cannot keep the slot by asking again and again.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_millis(900)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}
