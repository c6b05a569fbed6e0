//! Services and the catalog on real agents and real processes: a job
//! serving HTTP (busybox httpd on dynamic ports) under two service names,
//! one gated by a check and one not; the catalog on every node, its
//! filters and its watch; `uses`; and a killed node's instances leaving
//! every catalog.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// `GET /v1/services/{name}{query}` on `agent`: (status, JSON).
fn service(agent: &Agent, name: &str, query: &str) -> (u16, serde_json::Value) {
    let (code, body) = call(
        agent
            .request("GET", &format!("/v1/services/{name}{query}"))
            .timeout(Duration::from_secs(90)),
        None,
    );
    (code, serde_json::from_str(&body).unwrap_or_default())
}

/// The (node, host:port) of each instance `agent` lists for `name`.
fn listed(agent: &Agent, name: &str, query: &str) -> BTreeSet<(String, String)> {
    let (_, v) = service(agent, name, query);
    v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["node"].as_str().unwrap_or_default().to_string(),
                format!(
                    "{}:{}",
                    i["address"].as_str().unwrap_or_default(),
                    i["port"].as_u64().unwrap_or_default()
                ),
            )
        })
        .collect()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_string()
        .ok()
}

#[test]
fn the_catalog_lists_the_passing_instances_everywhere_and_follows_them() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    let site = Site::new("services");
    std::fs::set_permissions(
        site.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    std::fs::write(site.path().join("ok"), "ok\n").unwrap();
    let dir = site.path().display().to_string();
    // Bad service definitions are refused with what to do.
    for (bad, says) in [
        (
            "[[service]]\nname = \"web\"\nport = \"grpc\"\n",
            "names no port of task.ports (known: http)",
        ),
        (
            "[[service]]\nname = \"Web\"\nport = \"http\"\n",
            "DNS label",
        ),
        (
            "[[service]]\nname = \"web\"\nport = \"http\"\nchecks = [\"nope\"]\n",
            "the task has no checks",
        ),
    ] {
        let text = format!(
            "name = \"bad\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = {{ http = 0 }}\n{bad}"
        );
        let f = job_file(root.path(), "bad", &text);
        let (ok, out, err) = cli(&agents[0], &["validate", f.to_str().unwrap()]);
        assert!(
            !ok && format!("{out}{err}").contains(says),
            "{bad}: {out}{err}"
        );
    }
    let job = format!(
        r#"name = "site"
type = "service"
replicas = 3
distinct_hosts = true

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{dir}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
name = "up"
type = "exec"
command = "/bin/busybox"
args = ["sh", "-c", "test ! -f {dir}/down-$SHOAL_NODE"]
interval = "200ms"
timeout = "150ms"
grace = "0s"
failures = 1

[[service]]
name = "web"
port = "http"
tags = ["v1", "public"]

[[service]]
name = "web-any"
port = "http"
checks = []
"#
    );
    let f = job_file(root.path(), "site", &job);
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // Every node lists the same three instances, and each serves.
    wait_until("every node lists 3 passing web instances", || {
        agents.iter().all(|a| listed(a, "web", "").len() == 3)
    });
    let web = listed(&agents[0], "web", "");
    for a in &agents[1..] {
        assert_eq!(listed(a, "web", ""), web);
    }
    let nodes: BTreeSet<&str> = web.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["n0", "n1", "n2"]));
    for (_, addr) in &web {
        assert_eq!(http_get(addr, "/ok").as_deref(), Some("ok\n"), "{addr}");
    }
    let (_, v) = service(&agents[0], "web", "");
    assert_eq!(
        v["instances"][0]["tags"],
        serde_json::json!(["v1", "public"])
    );
    // ?near puts the named node's instance first.
    for n in ["n0", "n1", "n2"] {
        let (_, v) = service(&agents[0], "web", &format!("?near={n}"));
        assert_eq!(v["instances"][0]["node"], n, "{v}");
    }
    let (ok, out, err) = cli(&agents[1], &["service", "list"]);
    assert!(
        ok && out.contains("web") && out.contains("3/3"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(&agents[1], &["service", "show", "web"]);
    assert!(
        ok && out.contains("web.service.shoal") && out.contains("passing"),
        "{out}{err}"
    );

    // A watch: blocked until n1's copy turns critical, then answered with
    // the two passing and a new index.
    let (_, v) = service(&agents[2], "web", "");
    let index = v["index"].as_u64().unwrap();
    let watcher = {
        let http = agents[2].http();
        let token = agents[2].api_token();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let resp = ureq::get(&format!("{http}/v1/services/web?index={index}&wait=60s"))
                .set("Authorization", &format!("Bearer {token}"))
                .timeout(Duration::from_secs(90))
                .call()
                .unwrap();
            let v: serde_json::Value = resp.into_json().unwrap();
            (started.elapsed(), v)
        })
    };
    // The watch is waiting (not answered at once with the same index).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !watcher.is_finished(),
        "the watch answered without a change"
    );
    std::fs::write(site.path().join("down-n1"), "").unwrap();
    let (took, v) = watcher.join().unwrap();
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_ne!(v["index"].as_u64(), Some(index), "{v}");
    let watched: BTreeSet<&str> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(watched, BTreeSet::from(["n0", "n2"]), "{v}");
    // Every node drops it from `web`, lists it as critical with
    // ?passing=false, and keeps it in `web-any` (gated by no check).
    wait_until("every node drops n1 from web", || {
        agents.iter().all(|a| listed(a, "web", "").len() == 2)
    });
    let (_, all) = service(&agents[0], "web", "?passing=false");
    let critical: Vec<&str> = all["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["health"] == "critical")
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(critical, ["n1"], "{all}");
    assert!(agents.iter().all(|a| listed(a, "web-any", "").len() == 3));

    // `uses`: a copy gets a passing instance's address.
    let client = format!(
        r#"name = "client"
type = "service"
uses = ["web"]

[task]
command = "/bin/busybox"
args = ["sh", "-c", "echo $SHOAL_SERVICE_WEB $SHOAL_SERVICE_WEB_DNS > {dir}/client.out; exec sleep 100000"]

[task.resources]
cpu = 10
memory = 8
"#
    );
    let f = job_file(root.path(), "client", &client);
    let (ok, out, err) = cli(&agents[0], &["run", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let out_file = site.path().join("client.out");
    wait_until("the client wrote its environment", || {
        std::fs::read_to_string(&out_file).is_ok_and(|s| s.ends_with('\n'))
    });
    let written = std::fs::read_to_string(&out_file).unwrap();
    let mut parts = written.split_whitespace();
    let addr = parts.next().unwrap_or_default().to_string();
    assert_eq!(parts.next(), Some("web.service.shoal"), "{written}");
    let passing: BTreeSet<String> = listed(&agents[0], "web", "")
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert!(passing.contains(&addr), "{addr} not in {passing:?}");

    // Errors are JSON and say what to do.
    let (code, v) = service(&agents[0], "nosuch", "");
    assert_eq!(code, 404);
    assert!(
        v["error"].as_str().unwrap().contains("shoal service list"),
        "{v}"
    );
    let (code, v) = service(&agents[0], "No_Such", "");
    assert_eq!(code, 400, "{v}");
    let (code, v) = service(&agents[0], "web", "?index=1&wait=soon");
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("wait"), "{v}");

    // A killed node's instances leave every other catalog once it is
    // declared dead (its process keeps running: the agent died, not the
    // machine).
    std::fs::remove_file(site.path().join("down-n1")).unwrap();
    wait_until("n1 passes again", || {
        listed(&agents[0], "web", "").len() == 3
    });
    agents[2].stop(libc::SIGKILL);
    wait_until("n0 and n1 drop n2's instances", || {
        agents[..2].iter().all(|a| {
            a.state_of("n2").as_deref() == Some("dead")
                && listed(a, "web-any", "").iter().all(|(n, _)| n != "n2")
        })
    });
    kill_instances(&agents[2].dir);
}
