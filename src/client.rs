//! The HTTP client every client command uses to talk to an agent's API,
//! and the table printer of their output.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::api::ApiError;

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// URL of the agent to ask.
    #[arg(long, env = "SHOAL_ADDR", default_value = "http://127.0.0.1:4701")]
    pub addr: String,
    /// Token the agent's API requires [default: read from the local
    /// agent's <data-dir>/api-token, if this user may read it].
    #[arg(long, env = "SHOAL_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Data dir of the agent on this machine, where its API token is read
    /// from when no token is given.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "/var/lib/shoal")]
    pub data_dir: std::path::PathBuf,
}

impl ClientArgs {
    /// The token to present: the one given, else the local agent's, and
    /// that one only to an agent on this machine (it must not travel to
    /// whatever address `--addr` names; found in review).
    pub fn token(&self) -> Option<String> {
        let given = self.http_token.clone().filter(|t| !t.is_empty());
        if given.is_some() || !is_loopback_url(&self.addr) {
            return given;
        }
        std::fs::read_to_string(self.data_dir.join(crate::credentials::API_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }
}

/// Whether `addr` (a URL, or host:port) names this machine's loopback.
pub fn is_loopback_url(addr: &str) -> bool {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `args.addr`.
    pub fn new(args: &ClientArgs) -> Client {
        let base = args.addr.trim_end_matches('/').to_string();
        let base = if base.contains("://") {
            base
        } else {
            format!("http://{base}")
        };
        Client {
            base,
            token: args.token(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    /// The agent's URL (`http://ADDR`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET a JSON resource.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.call("GET", path, None)?;
        resp.into_json()
            .with_context(|| format!("the agent at {} sent an unreadable answer", self.base))
    }

    /// Sends a request with an optional body; the error says what failed.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<ureq::Response> {
        self.send(&self.agent, method, path, body)
    }

    /// GETs a stream (`/v1/events`): no time limit on the whole answer,
    /// only on each read (the agent sends a heartbeat every 10 s).
    pub fn stream(&self, path: &str) -> Result<impl std::io::BufRead + Send> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(crate::events::HEARTBEAT * 3)
            .build();
        let resp = self.send(&agent, "GET", path, None)?;
        Ok(std::io::BufReader::new(resp.into_reader()))
    }

    fn send(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<ureq::Response> {
        let mut req = agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp.into_json::<ApiError>().map(|e| e.error).unwrap_or_default();
                if (400..500).contains(&code) && !msg.is_empty() {
                    bail!("{msg}")
                }
                bail!("the agent at {} answered {code}: {msg}", self.base)
            }
            Err(e) => bail!(
                "cannot reach the shoal agent at {}: {e}\nIs `shoal agent` running there? Point to another with --addr or SHOAL_ADDR.",
                self.base
            ),
        }
    }
}

/// Prints rows under a header, columns aligned.
pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_address_gets_the_local_token() {
        for local in [
            "http://127.0.0.1:4701",
            "127.0.0.2:80",
            "http://localhost:1/x",
            "http://[::1]:4701",
        ] {
            assert!(is_loopback_url(local), "{local}");
        }
        for remote in [
            "http://10.0.0.2:4701",
            "http://example.com",
            "http://127.0.0.1.evil.com:1",
            "[2001:db8::1]:1",
        ] {
            assert!(!is_loopback_url(remote), "{remote}");
        }
    }
}
