//! The web page in a real browser: Debian's Chromium, headless, driven
//! through the DevTools protocol. It opens the URL `shoal ui` prints at one
//! agent of a 3-node cluster, waits for the nodes and the job to render,
//! kills a node and sees the page mark it dead without a reload, and saves
//! a screenshot under `target/`.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// A headless Chromium and one page of it, over the DevTools protocol.
struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1400,900",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (.ci/run installs Debian's `chromium`)");
        // Chromium writes the port it chose, and its browser target, here.
        let file = profile.join("DevToolsActivePort");
        let mut port = String::new();
        wait_until("chromium's DevTools port", || {
            std::fs::read_to_string(&file).is_ok_and(|t| {
                port = t.lines().next().unwrap_or("").to_string();
                !port.is_empty() && t.lines().count() >= 2
            })
        });
        let mut page = None;
        wait_until("chromium's first page", || {
            let Ok(resp) = ureq::get(&format!("http://127.0.0.1:{port}/json/list")).call() else {
                return false;
            };
            let list: Vec<Value> = resp.into_json().unwrap_or_default();
            page = list
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
            page.is_some()
        });
        let url = page.unwrap();
        let stream = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket");
        Browser {
            child,
            ws,
            next_id: 1,
        }
    }

    /// Calls a DevTools method; its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().expect("DevTools answer") else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its JSON value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    /// The page's nodes as it shows them: (name, state).
    fn nodes(&mut self) -> Vec<(String, String)> {
        let v = self.eval(
            "JSON.stringify([...document.querySelectorAll('[data-node]')].map(e => [e.dataset.node, e.dataset.state]))",
        );
        serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_page_shows_the_cluster_and_follows_a_node_death_live() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    wait_streaming(&agents.iter().collect::<Vec<_>>());
    let job = "name = \"web\"\ntype = \"service\"\nreplicas = 3\n\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n\n[task.resources]\ncpu = 100\nmemory = 64\n";
    let f = job_file(root.path(), "web", job);
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");

    // The URL `shoal ui` prints logs the browser in.
    let (ok, url, err) = cli(&agents[0], &["ui"]);
    assert!(ok, "{err}");
    let url = url.trim().to_string();
    assert!(
        url.starts_with(&agents[0].http()) && url.contains("/?token="),
        "{url}"
    );
    // Without it, the page says what to do (and gives nothing away).
    let (code, body) = call(ureq::get(&format!("{}/", agents[0].http())), None);
    assert_eq!(code, 401);
    assert!(body.contains("shoal ui"), "{body}");

    // The login answers with a cookie for this agent's port, good for
    // reads only: another page in the browser could send it with a form,
    // so it writes nothing.
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let (code, _) = call(agent.get(&url), None);
    assert_eq!(code, 303);
    let resp = match agent.get(&url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let cookie = resp.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let port = agents[0].http().rsplit(':').next().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("shoal_token_{port}=")),
        "{cookie}"
    );
    let with_cookie = |method: &str, path: &str| {
        ureq::request(method, &format!("{}{path}", agents[0].http())).set("Cookie", &cookie)
    };
    assert_eq!(call(with_cookie("GET", "/v1/jobs"), None).0, 200);
    assert_eq!(call(with_cookie("DELETE", "/v1/jobs/web"), None).0, 401);
    assert_eq!(call(with_cookie("POST", "/v1/jobs"), Some(job)).0, 401);

    let profile = tempfile::tempdir().unwrap();
    let mut browser = Browser::start(profile.path());
    browser.call("Page.enable", json!({}));
    browser.call("Page.navigate", json!({"url": url}));
    wait_until("the page renders the 3 nodes alive and the job", || {
        let nodes = browser.nodes();
        nodes.len() == 3
            && nodes.iter().all(|(_, s)| s == "alive")
            && browser.eval("document.querySelector('[data-job=web]') !== null") == json!(true)
    });
    // The token left the address bar for a cookie the API accepts on reads.
    assert_eq!(browser.eval("location.search"), json!(""));
    assert_eq!(
        browser.eval("document.querySelectorAll('[data-instance^=\"web/\"]').length"),
        json!(3),
        "the page shows web's 3 instances on their nodes"
    );
    wait_until("the page's event stream is live", || {
        browser.eval("document.getElementById('live').className") == json!("on")
    });
    // From here the page may only learn from its event stream: no timed
    // re-read, and a mark that a reload would wipe.
    browser.eval("window.shoalNoPoll = true; window.shoalMark = 1; 0");

    // n2 dies: the page marks it without being reloaded.
    let killed = Instant::now();
    agents[2].stop(libc::SIGKILL);
    kill_instances(&agents[2].dir);
    wait_until("the page shows n2 dead", || {
        browser
            .nodes()
            .iter()
            .any(|(n, s)| n == "n2" && s == "dead")
    });
    println!(
        "the page showed n2 dead {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        browser.eval("window.shoalMark"),
        json!(1),
        "the same page, not reloaded"
    );
    wait_until("the page's events list n2's death", || {
        browser.eval("document.querySelector('#events [data-kind=\"node.dead\"]') !== null")
            == json!(true)
    });

    let shot = browser.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshot.png");
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.display());
}
