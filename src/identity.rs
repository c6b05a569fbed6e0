//! This node's place in the cluster's trust: the cluster CA it holds, its
//! own certificate (renewed before it expires, always for the same key),
//! the join tokens it makes, the joins it answers, and CA rotation.
//!
//! Every member holds the CA key (`<data-dir>/cluster-ca`, 0600): shoal has
//! no privileged nodes, so any member must be able to admit a new one. The
//! key never travels in a token: a join token only lets its holder ask a
//! member, over TLS authenticated by the CA certificate the token carries,
//! for the cluster's credentials, and only until it expires. The member
//! checks the token's MAC (keyed by a hash of the CA key) and that the
//! name is free (no live member of that name at another address) before
//! it answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shoal_transport::tls::{ClusterCa, JoinToken, NodeCredentials};
use shoal_transport::{Incoming, QuicTransport, Responder};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::credentials;

/// Longest join request accepted (bytes): a token, a name and an address.
pub const JOIN_REQUEST_LEN_MAX: usize = 16 * 1024;

/// How long a joining node waits for each seed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a node without credentials sends a member (JSON, on a join
/// connection).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token, as given to the joining node.
    pub token: String,
    /// The name the node will run under.
    pub name: String,
    /// The address it will advertise (its IP decides whether the name is
    /// free; the port may still be unknown, 0).
    pub address: SocketAddr,
}

/// A member's answer to a [`JoinRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinReply {
    /// Welcome: the cluster CA (encoded, key included), and whether the
    /// member has been in touch with its cluster lately (see
    /// `Response::Claimed`).
    Joined {
        /// `ClusterCa::encode`.
        ca: String,
        /// The member completed an anti-entropy exchange lately.
        in_touch: bool,
    },
    /// Refused, and why (an expired or foreign token, a taken name).
    Refused(String),
}

/// The CAs a node holds: the one it issues with, and during a rotation the
/// one it still trusts.
#[derive(Clone)]
struct Cas {
    current: ClusterCa,
    previous: Option<Vec<u8>>,
}

/// This node's credentials. Shared by the agent's tasks.
pub struct Identity {
    data_dir: PathBuf,
    name: String,
    lifetime: Duration,
    /// The node's key pair (PKCS#8), fixed for the run: certificates are
    /// renewed for the same key.
    key_der: Vec<u8>,
    cas: Mutex<Cas>,
}

impl Identity {
    /// The identity of node `name` holding `ca`, with a new key pair, and
    /// its first credentials.
    pub fn new(
        data_dir: &Path,
        name: &str,
        lifetime: Duration,
        ca: ClusterCa,
    ) -> Result<(Arc<Identity>, NodeCredentials)> {
        let first = ca.issue_node_for(name, lifetime)?;
        let id = Arc::new(Identity {
            data_dir: data_dir.to_path_buf(),
            name: name.to_string(),
            lifetime,
            key_der: first.key_der.clone(),
            cas: Mutex::new(Cas {
                current: ca,
                previous: None,
            }),
        });
        let creds = id.credentials()?;
        Ok((id, creds))
    }

    fn cas(&self) -> Cas {
        self.cas.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The CA this node issues with.
    pub fn ca(&self) -> ClusterCa {
        self.cas().current
    }

    /// A new certificate for this node's key, trusting the CAs it trusts.
    pub fn credentials(&self) -> Result<NodeCredentials> {
        let cas = self.cas();
        let mut creds =
            cas.current
                .issue_node_keyed(&self.name, self.lifetime, Some(&self.key_der))?;
        creds.also_trusted = cas.previous.into_iter().collect();
        Ok(creds)
    }

    /// A join token valid for `ttl`.
    pub fn join_token(&self, ttl: Duration) -> Result<JoinToken> {
        Ok(self.ca().join_token(ttl, SystemTime::now())?)
    }

    /// Writes a fresh join token valid for `ttl` to `<data-dir>/join-token`
    /// (0600) and returns it.
    pub fn write_token_file(&self, ttl: Duration) -> Result<JoinToken> {
        let token = self.join_token(ttl)?;
        credentials::write_private(
            &self.data_dir.join(credentials::TOKEN_FILE),
            &token.encode(),
        )?;
        Ok(token)
    }

    /// Answers one join request: `Ok(in_touch question)` is left to the
    /// caller (the name check needs the scheduler); here the token.
    fn check(&self, req: &JoinRequest) -> Result<(), String> {
        let token = JoinToken::parse(&req.token).map_err(|e| e.to_string())?;
        self.ca().check_token(&token, SystemTime::now())?;
        if !shoal_membership::record::valid_node_name(&req.name) {
            return Err(format!(
                "`{}` is not a valid node name: use 1 to 128 letters, digits, '.', '_' or '-'",
                req.name
            ));
        }
        Ok(())
    }
}

/// Asks the seeds, one after the other, to admit this node with `token`;
/// returns the cluster CA and whether the seed that answered has been in
/// touch with its cluster. A refusal (bad token, taken name) ends the
/// attempt: every member would say the same.
pub async fn join(
    seeds: &[SocketAddr],
    token: &JoinToken,
    name: &str,
    address: SocketAddr,
) -> Result<(ClusterCa, bool)> {
    let body = serde_json::to_vec(&JoinRequest {
        token: token.encode(),
        name: name.to_string(),
        address,
    })?;
    let mut failures = Vec::new();
    for seed in seeds {
        let bytes = match shoal_transport::quic::join_call(*seed, token, body.clone(), JOIN_TIMEOUT)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let e = e.to_string();
                if e.contains("UnknownIssuer") || e.contains("invalid peer certificate") {
                    failures.push(format!(
                        "{seed} is not certified by the token's CA: the token is for another \
                             cluster, or the cluster's CA was rotated since it was made ({e})"
                    ));
                } else {
                    failures.push(format!("{seed}: {e}"));
                }
                continue;
            }
        };
        match serde_json::from_slice::<JoinReply>(&bytes) {
            Ok(JoinReply::Joined { ca, in_touch }) => {
                let ca = ClusterCa::decode(&ca)
                    .with_context(|| format!("{seed} answered the join with an unusable CA"))?;
                if ca.cert_der != token.ca_cert_der || ca.cluster_id != token.cluster_id {
                    bail!("{seed} answered the join with another CA than the token's");
                }
                return Ok((ca, in_touch));
            }
            Ok(JoinReply::Refused(why)) => {
                let why = why
                    .strip_prefix(shoal_core::wire::NAME_TAKEN)
                    .map(str::trim)
                    .unwrap_or(&why);
                bail!("{seed} refused to admit this node: {why}")
            }
            Err(e) => failures.push(format!("{seed}: undecodable answer: {e}")),
        }
    }
    bail!(
        "cannot join: no seed answered ({}). Check --join and that the seeds run; \
         a token older than this release's seeds cannot join through them",
        failures.join("; ")
    )
}

/// Answers join requests from the transport's join queue. The name check
/// goes to the scheduler as a `Request::Claim` on `claims` (the RPC queue
/// of the node's loop), made for the name being claimed.
pub async fn serve_joins(
    identity: Arc<Identity>,
    mut joins: mpsc::Receiver<Incoming>,
    claims: mpsc::Sender<Incoming>,
) {
    while let Some(msg) = joins.recv().await {
        let Some(reply) = msg.reply else { continue };
        let identity = identity.clone();
        let claims = claims.clone();
        // Concurrency is bounded by the transport's join connections.
        tokio::spawn(async move {
            let answer = answer_join(&identity, msg.from, &msg.body, &claims).await;
            if let JoinReply::Refused(why) = &answer {
                warn!(from = %msg.from, %why, "refused a join");
            }
            reply.respond(serde_json::to_vec(&answer).unwrap_or_default());
        });
    }
}

async fn answer_join(
    identity: &Identity,
    from: SocketAddr,
    body: &[u8],
    claims: &mpsc::Sender<Incoming>,
) -> JoinReply {
    if body.len() > JOIN_REQUEST_LEN_MAX {
        return JoinReply::Refused(format!("a join request of {} bytes", body.len()));
    }
    let req: JoinRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return JoinReply::Refused(format!("undecodable join request: {e}")),
    };
    if let Err(why) = identity.check(&req) {
        return JoinReply::Refused(why);
    }
    use shoal_core::wire::{Request, Response};
    let (responder, rx) = Responder::channel();
    let claim = Incoming {
        from,
        peer: Some(Arc::from(req.name.as_str())),
        body: Request::Claim {
            name: req.name.clone(),
            address: req.address,
        }
        .encode(),
        reply: Some(responder),
    };
    if claims.try_send(claim).is_err() {
        return JoinReply::Refused("this member is overloaded; try again or another seed".into());
    }
    let answer = match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
        Ok(Ok(bytes)) => Response::decode(&bytes),
        _ => Err("this member did not check the name in time".to_string()),
    };
    match answer {
        Ok(Response::Claimed { in_touch }) => {
            info!(node = %req.name, from = %from, "admitted a node with a join token");
            JoinReply::Joined {
                ca: identity.ca().encode(),
                in_touch,
            }
        }
        Ok(Response::Error(e)) => JoinReply::Refused(e),
        Ok(other) => JoinReply::Refused(format!("unexpected answer to the name check: {other:?}")),
        Err(e) => JoinReply::Refused(e),
    }
}

/// Keeps this node's credentials fresh: issues it a new certificate (same
/// key) once two thirds of the current one's lifetime have passed by the
/// wall clock, and rewrites `<data-dir>/join-token` once half of its
/// validity has passed. Checked every minute at most, so a suspended
/// machine catches up when it wakes; a failure is tried again at the next
/// check.
pub async fn maintain(identity: Arc<Identity>, transport: QuicTransport, token_ttl: Duration) {
    let renew = shoal_transport::tls::renew_after(identity.lifetime);
    let check = (renew / 4)
        .min(token_ttl / 4)
        .min(Duration::from_secs(60))
        .max(Duration::from_millis(100));
    let mut issued = SystemTime::now();
    let mut token_written = SystemTime::now();
    loop {
        tokio::time::sleep(check).await;
        let now = SystemTime::now();
        if now.duration_since(issued).is_ok_and(|age| age >= renew) {
            match identity
                .credentials()
                .and_then(|c| Ok(transport.set_credentials(&c)?))
            {
                Ok(()) => {
                    issued = now;
                    info!(valid_for = ?identity.lifetime, "renewed this node's certificate");
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot renew this node's certificate; trying again shortly")
                }
            }
        }
        if now
            .duration_since(token_written)
            .is_ok_and(|age| age >= token_ttl / 2)
        {
            match identity.write_token_file(token_ttl) {
                Ok(_) => token_written = now,
                Err(e) => warn!(error = %format!("{e:#}"), "cannot rewrite the join token file"),
            }
        }
    }
}
