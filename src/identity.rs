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
use shoal_transport::join::{JoinReply, JoinRequest, Rotation, RotationReply};
use shoal_transport::tls::{ClusterCa, JoinToken, NodeCredentials};
use shoal_transport::{Incoming, QuicTransport, Responder, Transport};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::credentials;

/// How long a joining node waits for each seed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The CAs a node holds: the one it issues with and, during a rotation, the
/// next one (trusted, not yet used) or the previous one (still trusted).
#[derive(Clone)]
struct Cas {
    current: ClusterCa,
    next: Option<ClusterCa>,
    previous: Option<Vec<u8>>,
}

/// `<data-dir>/cluster-ca.next`: the CA a rotation will switch to.
const NEXT_CA_FILE: &str = "cluster-ca.next";
/// `<data-dir>/cluster-ca.previous`: the certificate of the CA a rotation
/// switched from, trusted until the rotation ends.
const PREVIOUS_CA_FILE: &str = "cluster-ca.previous";

/// How many times the rotating member sends each step to a member.
const ROTATION_ATTEMPTS: usize = 3;
/// How long it waits for each answer.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(2);

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}

/// This node's credentials. Shared by the agent's tasks.
pub struct Identity {
    data_dir: PathBuf,
    name: String,
    lifetime: Duration,
    /// Validity of the join tokens written to the data dir.
    token_ttl: Duration,
    /// The node's key pair (PKCS#8), fixed for the run: certificates are
    /// renewed for the same key.
    key_der: Vec<u8>,
    cas: Mutex<Cas>,
    /// A rotation runs from this node.
    rotating: std::sync::atomic::AtomicBool,
    /// Held while credentials are made and given to the transport, so a
    /// renewal made from the CAs before a rotation step cannot be installed
    /// after it (found in review).
    install: Mutex<()>,
}

impl Identity {
    /// The identity of node `name` holding `ca`, with a new key pair, and
    /// its first credentials.
    pub fn new(
        data_dir: &Path,
        name: &str,
        lifetime: Duration,
        token_ttl: Duration,
        ca: ClusterCa,
    ) -> Result<(Arc<Identity>, NodeCredentials)> {
        // A rotation this node took part in before it stopped.
        let next = std::fs::read_to_string(data_dir.join(NEXT_CA_FILE))
            .ok()
            .and_then(|s| ClusterCa::decode(&s).ok())
            .filter(|n| n.cluster_id == ca.cluster_id && n.cert_der != ca.cert_der);
        let previous = std::fs::read_to_string(data_dir.join(PREVIOUS_CA_FILE))
            .ok()
            .and_then(|s| unb64(s.trim()))
            .filter(|p| *p != ca.cert_der);
        let id = Arc::new(Identity {
            data_dir: data_dir.to_path_buf(),
            name: name.to_string(),
            lifetime,
            token_ttl,
            key_der: shoal_transport::tls::new_node_key()?,
            cas: Mutex::new(Cas {
                current: ca,
                next,
                previous,
            }),
            rotating: Default::default(),
            install: Mutex::new(()),
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
        creds.also_trusted = cas
            .previous
            .into_iter()
            .chain(cas.next.map(|n| n.cert_der))
            .collect();
        Ok(creds)
    }

    /// Carries out one rotation step on this node and gives the transport
    /// its new credentials. Idempotent: a step already taken is `Ok`.
    pub fn apply(&self, step: &Rotation, transport: &QuicTransport) -> Result<(), String> {
        {
            let mut cas = self.cas.lock().unwrap_or_else(|p| p.into_inner());
            match step {
                Rotation::Trust { ca } => {
                    let next = ClusterCa::decode(ca).map_err(|e| e.to_string())?;
                    if next.cluster_id != cas.current.cluster_id {
                        return Err("the new CA is for another cluster".into());
                    }
                    if next.cert_der == cas.current.cert_der
                        || cas
                            .next
                            .as_ref()
                            .is_some_and(|n| n.cert_der == next.cert_der)
                    {
                        return Ok(());
                    }
                    // One rotation at a time: trusting a third CA while one
                    // is pending would leave members that switched to the
                    // pending one distrusted by this node.
                    if cas.next.is_some() || cas.previous.is_some() {
                        return Err("a rotation to another CA is pending on this node: run \
                             `shoal ca rotate` again, which finishes it"
                            .into());
                    }
                    // A CA that cannot issue must not be kept (every later
                    // renewal and start would fail).
                    next.issue_node_for(&self.name, Duration::from_secs(60))
                        .map_err(|e| format!("the new CA cannot issue certificates: {e}"))?;
                    credentials::write_private(&self.data_dir.join(NEXT_CA_FILE), ca)
                        .map_err(|e| format!("{e:#}"))?;
                    cas.next = Some(next);
                }
                Rotation::Switch { ca_cert_der } => {
                    if cas.current.cert_der == *ca_cert_der {
                        return Ok(());
                    }
                    let next = match &cas.next {
                        Some(n) if n.cert_der == *ca_cert_der => n.clone(),
                        _ => {
                            return Err("this node was not told to trust that CA first \
                                 (it missed the rotation's first step)"
                                .into())
                        }
                    };
                    credentials::write_private(
                        &self.data_dir.join(PREVIOUS_CA_FILE),
                        &b64(&cas.current.cert_der),
                    )
                    .map_err(|e| format!("{e:#}"))?;
                    credentials::save_ca(&self.data_dir, &next).map_err(|e| format!("{e:#}"))?;
                    let _ = std::fs::remove_file(self.data_dir.join(NEXT_CA_FILE));
                    cas.previous = Some(cas.current.cert_der.clone());
                    cas.current = next;
                    cas.next = None;
                }
                Rotation::Drop { ca_cert_der } => {
                    if cas.current.cert_der != *ca_cert_der {
                        return Err("this node has not switched to that CA".into());
                    }
                    let _ = std::fs::remove_file(self.data_dir.join(PREVIOUS_CA_FILE));
                    cas.previous = None;
                }
            }
        }
        self.install(transport).map_err(|e| format!("{e:#}"))?;
        // The join token file is made with the current CA.
        if matches!(step, Rotation::Switch { .. }) {
            if let Err(e) = self.write_token_file() {
                warn!(error = %format!("{e:#}"), "cannot rewrite the join token file");
            }
        }
        Ok(())
    }

    /// Makes this node's credentials from the CAs it holds now and gives
    /// them to the transport.
    pub fn install(&self, transport: &QuicTransport) -> Result<()> {
        let _held = self.install.lock().unwrap_or_else(|p| p.into_inner());
        let creds = self.credentials()?;
        transport.set_credentials(&creds)?;
        Ok(())
    }

    /// A join token valid for `ttl`.
    pub fn join_token(&self, ttl: Duration) -> Result<JoinToken> {
        Ok(self.ca().join_token(ttl, SystemTime::now())?)
    }

    /// Writes a fresh join token (valid for `--join-token-ttl`) to
    /// `<data-dir>/join-token` (0600) and returns it.
    pub fn write_token_file(&self) -> Result<JoinToken> {
        let token = self.join_token(self.token_ttl)?;
        credentials::write_private(
            &self.data_dir.join(credentials::TOKEN_FILE),
            &token.encode(),
        )?;
        Ok(token)
    }

    /// Checks a join request's token and name (whether the name is free
    /// is the scheduler's to say).
    fn check(&self, req: &JoinRequest) -> Result<ClusterCa, String> {
        let token = JoinToken::parse(&req.token).map_err(|e| e.to_string())?;
        let cas = self.cas();
        // A node admitted now would hold one CA of two in use.
        if cas.next.is_some() || cas.previous.is_some() {
            return Err(
                "a CA rotation is in progress: try again once `shoal ca rotate` \
                 has finished (run it again to finish one that stopped)"
                    .into(),
            );
        }
        cas.current.check_token(&token, SystemTime::now())?;
        if !shoal_membership::record::valid_node_name(&req.name) {
            return Err(format!(
                "`{}` is not a valid node name: use 1 to 128 letters, digits, '.', '_' or '-'",
                req.name
            ));
        }
        Ok(cas.current)
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
    transport: QuicTransport,
    mut joins: mpsc::Receiver<Incoming>,
    claims: mpsc::Sender<Incoming>,
) {
    while let Some(msg) = joins.recv().await {
        let Some(reply) = msg.reply else { continue };
        // From a member (its certificate names it): a rotation step.
        if let Some(peer) = &msg.peer {
            let answer = match serde_json::from_slice::<Rotation>(&msg.body) {
                Ok(step) => match identity.apply(&step, &transport) {
                    Ok(()) => {
                        info!(from = %peer, step = step.name(), "took a step of a CA rotation");
                        RotationReply::Done
                    }
                    Err(why) => {
                        warn!(from = %peer, step = step.name(), %why, "refused a step of a CA rotation");
                        RotationReply::Refused(why)
                    }
                },
                Err(e) => RotationReply::Refused(format!("undecodable rotation step: {e}")),
            };
            reply.respond(serde_json::to_vec(&answer).unwrap_or_default());
            continue;
        }
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
    let req = match JoinRequest::decode(body) {
        Ok(r) => r,
        Err(why) => return JoinReply::Refused(why),
    };
    let ca = match identity.check(&req) {
        Ok(ca) => ca,
        Err(why) => return JoinReply::Refused(why),
    };
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
                ca: ca.encode(),
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
pub async fn maintain(identity: Arc<Identity>, transport: QuicTransport) {
    let token_ttl = identity.token_ttl;
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
            match identity.install(&transport) {
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
            match identity.write_token_file() {
                Ok(_) => token_written = now,
                Err(e) => warn!(error = %format!("{e:#}"), "cannot rewrite the join token file"),
            }
        }
    }
}

/// What `shoal ca rotate` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationReport {
    /// `done`: every member presents the new CA's certificates and the old
    /// CA is trusted nowhere; `partial`: some members did not take a step
    /// (see `missed`), and the old CA stays trusted so that nobody is cut
    /// off.
    pub outcome: String,
    /// The members asked (this node included).
    pub members: Vec<String>,
    /// Members that did not take a step, with why.
    pub missed: Vec<(String, String)>,
    /// The step the rotation stopped after.
    pub reached: String,
}

/// Replaces the cluster CA without downtime, from this node: every member
/// first trusts the new CA beside the old one, then issues its certificate
/// with it, then (once all have) stops trusting the old one. Open
/// connections keep working throughout; each step waits until every
/// member took the previous one, so no two members ever fail to trust each
/// other. A member that cannot be reached stops the rotation where it is:
/// nothing is cut off, and running the command again (once it is back, or
/// gone) starts over with another CA.
pub async fn rotate(
    identity: &Identity,
    transport: &QuicTransport,
    members: Vec<(String, SocketAddr)>,
) -> Result<RotationReport> {
    use std::sync::atomic::Ordering;
    if identity.rotating.swap(true, Ordering::SeqCst) {
        bail!("a rotation is already running from this node");
    }
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let _done = Done(&identity.rotating);
    // A rotation that stopped is finished, not replaced: a third CA would
    // leave members that switched distrusted by those that did not.
    let cas = identity.cas();
    let next = match (cas.next, cas.previous) {
        (Some(pending), _) => pending,
        (None, Some(_)) => cas.current,
        (None, None) => ClusterCa::generate(&cas.current.cluster_id)?,
    };
    let cert = next.cert_der.clone();
    let steps = [
        Rotation::Trust { ca: next.encode() },
        Rotation::Switch {
            ca_cert_der: cert.clone(),
        },
        Rotation::Drop { ca_cert_der: cert },
    ];
    let mut names: Vec<String> = vec![identity.name.clone()];
    names.extend(members.iter().map(|(n, _)| n.clone()));
    let mut reached = "none";
    for step in &steps {
        let mut missed = Vec::new();
        if let Err(why) = identity.apply(step, transport) {
            missed.push((identity.name.clone(), why));
        }
        let body = serde_json::to_vec(step)?;
        let calls = members.iter().map(|(name, addr)| {
            let body = body.clone();
            async move {
                let mut last = String::new();
                for _ in 0..ROTATION_ATTEMPTS {
                    match transport
                        .request(
                            *addr,
                            shoal_transport::Service::Join,
                            body.clone(),
                            ROTATION_TIMEOUT,
                        )
                        .await
                    {
                        Ok(bytes) => match serde_json::from_slice::<RotationReply>(&bytes) {
                            Ok(RotationReply::Done) => return None,
                            Ok(RotationReply::Refused(why)) => return Some((name.clone(), why)),
                            Err(e) => last = format!("undecodable answer: {e}"),
                        },
                        Err(e) => last = e.to_string(),
                    }
                }
                Some((name.clone(), last))
            }
        });
        missed.extend(
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .flatten(),
        );
        if !missed.is_empty() {
            warn!(
                step = step.name(),
                ?missed,
                "a CA rotation stopped: some members did not take a step"
            );
            return Ok(RotationReport {
                outcome: "partial".into(),
                members: names,
                missed,
                reached: reached.into(),
            });
        }
        info!(
            step = step.name(),
            members = names.len(),
            "every member took a step of the CA rotation"
        );
        reached = step.name();
    }
    Ok(RotationReport {
        outcome: "done".into(),
        members: names,
        missed: Vec::new(),
        reached: reached.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_transport::QuicConfig;

    #[tokio::test]
    async fn a_pending_rotation_is_finished_not_replaced_and_holds_joins() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("c").unwrap();
        let (id, creds) = Identity::new(
            dir.path(),
            "n0",
            shoal_transport::tls::CERT_LIFETIME,
            Duration::from_secs(3600),
            ca.clone(),
        )
        .unwrap();
        let (transport, _inbox) = QuicTransport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &creds,
            QuicConfig::default(),
        )
        .await
        .unwrap();
        let join = |ca: &ClusterCa| JoinRequest {
            token: ca
                .join_token(Duration::from_secs(60), SystemTime::now())
                .unwrap()
                .encode(),
            name: "n5".into(),
            address: "127.0.0.5:4700".parse().unwrap(),
        };
        assert!(id.check(&join(&ca)).is_ok());

        // A rotation stopped after its first step here.
        let next = ClusterCa::generate("c").unwrap();
        id.apply(&Rotation::Trust { ca: next.encode() }, &transport)
            .unwrap();
        // A third CA is refused while one is pending, and joins wait.
        let third = ClusterCa::generate("c").unwrap();
        let err = id
            .apply(&Rotation::Trust { ca: third.encode() }, &transport)
            .unwrap_err();
        assert!(err.contains("pending"), "{err}");
        let err = id.check(&join(&ca)).unwrap_err();
        assert!(err.contains("rotation is in progress"), "{err}");

        // Running it again finishes it with the pending CA.
        let report = rotate(&id, &transport, Vec::new()).await.unwrap();
        assert_eq!(report.outcome, "done");
        assert_eq!(id.ca(), next);
        assert_eq!(
            ClusterCa::decode(
                &std::fs::read_to_string(dir.path().join(credentials::CA_FILE)).unwrap()
            )
            .unwrap(),
            next
        );
        assert!(!dir.path().join(NEXT_CA_FILE).exists());
        assert!(!dir.path().join(PREVIOUS_CA_FILE).exists());
        // Joins are admitted again, with tokens of the new CA only.
        assert!(id.check(&join(&next)).is_ok());
        assert!(id.check(&join(&ca)).is_err());
    }
}
