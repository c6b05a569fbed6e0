//! `shoal validate FILE` checks a job file with the agent's own code,
//! without an agent.

mod common;

use std::process::Command;

fn validate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::BIN)
        .arg("validate")
        .args(args)
        .env_remove("SHOAL_ADDR")
        .output()
        .expect("run shoal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_job_file_is_checked_without_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::job_file(
        dir.path(),
        "good",
        "name = \"site\"\ntype = \"service\"\nreplicas = 2\n[task]\ncommand = \"httpd\"\nargs = [\"-p\", \"${SHOAL_PORT_HTTP}\"]\nports = { http = 0 }\n",
    );
    let (code, out, err) = validate(&[good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("job site (service, 2 replicas) is valid"),
        "{out}"
    );
    let (code, out, _) = validate(&["--json", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    let spec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(spec["task"]["ports"]["http"], 0);

    // The same mistakes the API refuses, with the line and the field.
    let bad = common::job_file(
        dir.path(),
        "bad",
        "name = \"site\"\ntype = \"service\"\n[task]\ncommand = \"httpd\"\nargs = [\"${SHOAL_PORT_HTPP}\"]\nports = { http = 0 }\n",
    );
    let (code, out, err) = validate(&[bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("line 5") && err.contains("task.args") && err.contains("SHOAL_PORT_HTPP"),
        "{err}"
    );
    let (code, out, _) = validate(&["--json", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (e["line"].as_u64(), e["field"].as_str()),
        (Some(5), Some("task.args")),
        "{e}"
    );

    // A file that is not there says so (and is not "valid").
    let (code, _, err) = validate(&[dir.path().join("nope.toml").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read"), "{err}");
}
