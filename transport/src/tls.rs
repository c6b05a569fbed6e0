//! Cluster credentials: the cluster CA, join tokens and per-node certificates,
//! and the rustls configurations that enforce mutual TLS with them.
//!
//! Every node certificate is signed by the cluster CA and names its node
//! (the subject's common name). Both ends of every QUIC connection present
//! one and verify the other's against the CA, so a peer holding another
//! cluster's credentials (or none) fails the handshake, and each side knows
//! the name the other may speak for ([`peer_name`]).
//!
//! A join token ([`JoinToken`], `shoal2-...`) does not carry the CA key: it
//! carries the CA certificate (so the joining node can authenticate the
//! member it asks), an expiry, and a MAC under a key derived from the CA
//! key, which any member can check and nobody without the CA key can forge.
//! The member that checks it hands the joining node its credentials over
//! that authenticated connection (see `shoal`'s agent).

use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use crate::TransportError;

/// The TLS server name every node certificate carries; nodes are addressed by
/// IP, so the name identifies "a member of this cluster", not a host.
pub const CLUSTER_SERVER_NAME: &str = "shoal-node";

/// ALPN protocol id of shoal's node-to-node protocol (version 1).
pub const ALPN: &[u8] = b"shoal/1";

/// ALPN protocol id of a join: a node without credentials, holding a join
/// token, asks a member for them. Such a connection carries one
/// `Service::Join` exchange and nothing else.
pub const JOIN_ALPN: &[u8] = b"shoal-join/1";

/// How long a node certificate is valid. A node issues itself a new one
/// at every start and once two thirds of it have passed (see
/// `renew_after`), so a certificate that leaks stops working within weeks.
pub const CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// How far back a certificate's validity starts: a peer whose clock is
/// behind (by less than this) still accepts it.
pub const CERT_BACKDATE: std::time::Duration = std::time::Duration::from_secs(86_400);

/// When a certificate of `lifetime` issued now should be replaced: after
/// two thirds of it.
pub fn renew_after(lifetime: std::time::Duration) -> std::time::Duration {
    lifetime / 3 * 2
}

/// Prefix of an encoded CA (certificate and key), the format of
/// `<data-dir>/cluster-ca` and of the join tokens of releases before
/// `shoal2-` tokens, which were the CA itself.
const CA_PREFIX: &str = "shoal1-";

/// Prefix of a join token; the digit is the token format version.
const TOKEN_PREFIX: &str = "shoal2-";

/// Longest join token or encoded CA accepted (characters). A real one is
/// ~700; the bound keeps a decoder of untrusted input from allocating on a
/// whim.
pub const TOKEN_LEN_MAX: usize = 8 * 1024;

/// How long a join token is valid unless asked otherwise, as kubeadm's
/// bootstrap tokens: long enough to add machines today, short enough that a
/// token found in a shell history or a CI log next week is worthless.
pub const JOIN_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Longest validity a join token may be given.
pub const JOIN_TOKEN_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// A credential that admits a node: a join token, or (from releases before
/// them) the CA itself.
#[derive(Debug, Clone)]
pub enum Admission {
    /// A `shoal2-` join token: the node asks a member for its credentials.
    Token(JoinToken),
    /// A `shoal1-` token of an earlier release: the CA with its key.
    Ca(ClusterCa),
}

impl Admission {
    /// Decodes what `--token` holds; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Admission, TransportError> {
        let text = text.trim();
        if text.starts_with(CA_PREFIX) {
            return ClusterCa::decode(text).map(Admission::Ca);
        }
        JoinToken::parse(text).map(Admission::Token)
    }

    /// The cluster the credential admits to.
    pub fn cluster_id(&self) -> &str {
        match self {
            Admission::Token(t) => &t.cluster_id,
            Admission::Ca(ca) => &ca.cluster_id,
        }
    }
}

/// A join token: admits a node to the cluster until it expires.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinToken {
    /// The cluster.
    pub cluster_id: String,
    /// The CA certificate (DER): the joining node trusts the member that
    /// answers only if the member's certificate is signed by it.
    pub ca_cert_der: Vec<u8>,
    /// Valid until then (seconds since the Unix epoch).
    pub expires_s: u64,
    /// Random, so that two tokens made in one second differ.
    pub nonce: [u8; 16],
    /// HMAC-SHA256 of the fields above under a key derived from the CA key.
    pub mac: Vec<u8>,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("cluster_id", &self.cluster_id)
            .field("expires_s", &self.expires_s)
            .finish_non_exhaustive()
    }
}

/// The bytes a token's MAC covers: every field but the MAC, in a fixed
/// layout.
fn token_signed_bytes(
    cluster_id: &str,
    ca_cert_der: &[u8],
    expires_s: u64,
    nonce: &[u8; 16],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + cluster_id.len() + ca_cert_der.len());
    b.extend_from_slice(b"shoal join token v2\0");
    b.extend_from_slice(&(cluster_id.len() as u64).to_be_bytes());
    b.extend_from_slice(cluster_id.as_bytes());
    b.extend_from_slice(&(ca_cert_der.len() as u64).to_be_bytes());
    b.extend_from_slice(ca_cert_der);
    b.extend_from_slice(&expires_s.to_be_bytes());
    b.extend_from_slice(nonce);
    b
}

fn unix_s(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl JoinToken {
    /// Decodes a join token; the error says what is wrong with it. Only
    /// the format is checked here: the MAC needs the CA key
    /// ([`ClusterCa::check_token`]).
    pub fn parse(token: &str) -> Result<JoinToken, TransportError> {
        let token: JoinToken = decode_prefixed(
            token,
            TOKEN_PREFIX,
            "copy it whole from a member's `<data-dir>/join-token` file or from `shoal token create`",
        )?;
        if token.mac.len() != 32 {
            return Err(TransportError::BadToken(
                "token is corrupt (its MAC)".into(),
            ));
        }
        Ok(token)
    }

    /// Encodes the token (`shoal2-<base64url>`).
    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("in-memory encoding cannot fail");
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// Whether the token has expired at `now`.
    pub fn expired(&self, now: std::time::SystemTime) -> bool {
        unix_s(now) >= self.expires_s
    }

    /// rustls client config of a join: trusts a server certified by the
    /// token's CA and presents no certificate (the node has none yet).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_cert_der.clone()))
            .map_err(|e| {
                TransportError::BadToken(format!("token holds an unusable CA certificate: {e}"))
            })?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![JOIN_ALPN.to_vec()];
        Ok(config)
    }
}

/// A new node key pair (ECDSA P-256, PKCS#8 DER), for
/// [`ClusterCa::issue_node_keyed`].
pub fn new_node_key() -> Result<Vec<u8>, TransportError> {
    Ok(KeyPair::generate().map_err(tls_err)?.serialize_der())
}

/// The name a node certificate speaks for (its subject's common name), or
/// `None` if the certificate does not parse or names nothing valid.
pub fn peer_name(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// The public key (SubjectPublicKeyInfo's key bits) of a certificate.
pub fn public_key(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// The cluster's certificate authority: whoever holds it can issue node
/// certificates, so it is the cluster's join credential.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterCa {
    /// Cluster identifier, random at bootstrap; part of the CA's name.
    pub cluster_id: String,
    /// The CA certificate (DER).
    pub cert_der: Vec<u8>,
    /// The CA private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

fn ca_params(cluster_id: &str) -> Result<CertificateParams, TransportError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("shoal cluster CA {cluster_id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Credentials(e.to_string())
}

impl ClusterCa {
    /// Creates a new CA for a new cluster.
    pub fn generate(cluster_id: &str) -> Result<Self, TransportError> {
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = ca_params(cluster_id)?.self_signed(&key).map_err(tls_err)?;
        Ok(ClusterCa {
            cluster_id: cluster_id.to_string(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Issues a certificate for one node, valid for [`CLUSTER_SERVER_NAME`]
    /// for [`CERT_LIFETIME`].
    pub fn issue_node(&self, node_name: &str) -> Result<NodeCredentials, TransportError> {
        self.issue_node_for(node_name, CERT_LIFETIME)
    }

    /// Issues a certificate for one node valid from [`CERT_BACKDATE`] ago
    /// (a peer whose clock is behind still accepts it) until `lifetime`
    /// from now.
    pub fn issue_node_for(
        &self,
        node_name: &str,
        lifetime: std::time::Duration,
    ) -> Result<NodeCredentials, TransportError> {
        self.issue_node_keyed(node_name, lifetime, None)
    }

    /// As [`ClusterCa::issue_node_for`], for the key pair `key_der`
    /// (PKCS#8) when given, else a new one. A node keeps its key across
    /// renewals: what it signed stays verifiable under its new certificate.
    pub fn issue_node_keyed(
        &self,
        node_name: &str,
        lifetime: std::time::Duration,
        key_der: Option<&[u8]>,
    ) -> Result<NodeCredentials, TransportError> {
        let ca_key = KeyPair::try_from(self.key_der.as_slice()).map_err(tls_err)?;
        let issuer = Issuer::new(ca_params(&self.cluster_id)?, ca_key);
        let mut params =
            CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()]).map_err(tls_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::from(std::time::SystemTime::now());
        let lifetime = time::Duration::try_from(lifetime).map_err(tls_err)?;
        let backdate = time::Duration::try_from(CERT_BACKDATE).map_err(tls_err)?;
        params.not_before = now
            .checked_sub(backdate)
            .ok_or_else(|| tls_err("the clock is out of range"))?;
        params.not_after = now
            .checked_add(lifetime)
            .ok_or_else(|| tls_err("the certificate lifetime is out of range"))?;
        let key = match key_der {
            Some(der) => KeyPair::try_from(der).map_err(tls_err)?,
            None => KeyPair::generate().map_err(tls_err)?,
        };
        let cert = params.signed_by(&key, &issuer).map_err(tls_err)?;
        Ok(NodeCredentials {
            also_trusted: Vec::new(),
            ca_cert_der: self.cert_der.clone(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Encodes the CA, key included (`shoal1-<base64url>`): the format of
    /// `<data-dir>/cluster-ca`. Never a join token.
    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("in-memory encoding cannot fail");
        format!(
            "{CA_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// A join token valid for `ttl` from `now` (at most
    /// [`JOIN_TOKEN_TTL_MAX`]).
    pub fn join_token(
        &self,
        ttl: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<JoinToken, TransportError> {
        if ttl.is_zero() || ttl > JOIN_TOKEN_TTL_MAX {
            return Err(TransportError::BadToken(format!(
                "a join token's validity must be between 1 s and {} days",
                JOIN_TOKEN_TTL_MAX.as_secs() / 86_400
            )));
        }
        let expires_s = unix_s(now)
            .checked_add(ttl.as_secs().max(1))
            .ok_or_else(|| TransportError::BadToken("the clock is out of range".into()))?;
        let nonce: [u8; 16] = {
            let mut n = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
                .map_err(|_| tls_err("no randomness"))?;
            n
        };
        let signed = token_signed_bytes(&self.cluster_id, &self.cert_der, expires_s, &nonce);
        let mac = ring::hmac::sign(&self.mac_key(), &signed).as_ref().to_vec();
        Ok(JoinToken {
            cluster_id: self.cluster_id.clone(),
            ca_cert_der: self.cert_der.clone(),
            expires_s,
            nonce,
            mac,
        })
    }

    /// The key of join tokens' MACs: derived from the CA key and a label,
    /// so it is never the CA key itself and means nothing anywhere else.
    fn mac_key(&self) -> ring::hmac::Key {
        let mut material = b"shoal join token mac key\0".to_vec();
        material.extend_from_slice(&self.key_der);
        let derived = ring::digest::digest(&ring::digest::SHA256, &material);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
    }

    /// Checks that `token` was made by a holder of this CA and has not
    /// expired; the error says why not.
    pub fn check_token(&self, token: &JoinToken, now: std::time::SystemTime) -> Result<(), String> {
        if token.cluster_id != self.cluster_id {
            return Err(format!(
                "the token is for cluster {}, this is cluster {}",
                token.cluster_id, self.cluster_id
            ));
        }
        let signed = token_signed_bytes(
            &token.cluster_id,
            &token.ca_cert_der,
            token.expires_s,
            &token.nonce,
        );
        // ring compares the MAC in constant time.
        if ring::hmac::verify(&self.mac_key(), &signed, &token.mac).is_err() {
            return Err(
                "the token was not made by this cluster (or its CA was rotated since): \
                 create a new one with `shoal token create` on a member"
                    .into(),
            );
        }
        if token.expired(now) {
            return Err(
                "the token has expired: create a new one with `shoal token create` on a member"
                    .into(),
            );
        }
        Ok(())
    }

    /// Decodes an encoded CA; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<Self, TransportError> {
        let ca: ClusterCa = decode_prefixed(text, CA_PREFIX, "it is what `cluster-ca` holds")?;
        // Prove the key works before anyone relies on it.
        KeyPair::try_from(ca.key_der.as_slice())
            .map_err(|e| TransportError::BadToken(format!("token holds an unusable key: {e}")))?;
        Ok(ca)
    }
}

/// Decodes `<prefix><base64url of postcard>` from untrusted text, bounded
/// by [`TOKEN_LEN_MAX`]; `hint` says where a good one comes from.
fn decode_prefixed<T: serde::de::DeserializeOwned>(
    text: &str,
    prefix: &str,
    hint: &str,
) -> Result<T, TransportError> {
    let text = text.trim();
    if text.len() > TOKEN_LEN_MAX {
        return Err(TransportError::BadToken(format!(
            "token is {} characters long, more than the {TOKEN_LEN_MAX} a shoal token can be",
            text.len()
        )));
    }
    let body = text.strip_prefix(prefix).ok_or_else(|| {
        TransportError::BadToken(format!("it should start with `{prefix}`: {hint}"))
    })?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|e| TransportError::BadToken(format!("token is not valid base64url: {e}")))?;
    postcard::from_bytes(&bytes)
        .map_err(|e| TransportError::BadToken(format!("token is truncated or corrupt: {e}")))
}

/// What a node needs to talk to its cluster: the CA certificate to verify
/// peers, and its own certificate and key to be verified.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeCredentials {
    /// The cluster CA certificate (DER).
    pub ca_cert_der: Vec<u8>,
    /// Other CA certificates whose certificates peers may present: during a
    /// CA rotation, the other of the old and the new CA.
    #[serde(default)]
    pub also_trusted: Vec<Vec<u8>>,
    /// This node's certificate, signed by the CA (DER).
    pub cert_der: Vec<u8>,
    /// This node's private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeCredentials {
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        for der in std::iter::once(&self.ca_cert_der).chain(&self.also_trusted) {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(tls_err)?;
        }
        Ok(Arc::new(roots))
    }

    fn chain_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![CertificateDer::from(self.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
        )
    }

    /// Verifies a peer's certificate against the CAs these credentials
    /// trust (the cluster CA, and during a rotation the other one).
    pub fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TransportError> {
        rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(tls_err)
    }

    /// rustls server config: presents this node's certificate and verifies
    /// a client certificate against the cluster CA. A client may present
    /// none only to join (ALPN [`JOIN_ALPN`]): the transport closes a
    /// [`ALPN`] connection without a client certificate at once, and
    /// serves a join connection one `Service::Join` exchange.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(tls_err)?;
        let (chain, key) = self.chain_and_key();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN.to_vec(), JOIN_ALPN.to_vec()];
        Ok(config)
    }

    /// rustls client config: verifies the server against the cluster CA and
    /// presents this node's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        let (chain, key) = self.chain_and_key();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_encoding_roundtrip_and_rejections() {
        let ca = ClusterCa::generate("c1").unwrap();
        let text = ca.encode();
        assert_eq!(ClusterCa::decode(&text).unwrap(), ca);
        assert!(matches!(
            ClusterCa::decode("nope"),
            Err(TransportError::BadToken(_))
        ));
        let truncated = &text[..text.len() / 2];
        assert!(matches!(
            ClusterCa::decode(truncated),
            Err(TransportError::BadToken(_))
        ));
        let long = format!("{CA_PREFIX}{}", "A".repeat(TOKEN_LEN_MAX));
        assert!(matches!(
            ClusterCa::decode(&long),
            Err(TransportError::BadToken(_))
        ));
    }

    #[test]
    fn a_join_token_admits_until_it_expires_and_holds_no_key() {
        let ca = ClusterCa::generate("c1").unwrap();
        let now = std::time::SystemTime::now();
        let token = ca
            .join_token(std::time::Duration::from_secs(3600), now)
            .unwrap();
        let text = token.encode();
        assert!(text.starts_with(TOKEN_PREFIX), "{text}");
        let parsed = match Admission::parse(&text).unwrap() {
            Admission::Token(t) => t,
            Admission::Ca(_) => panic!("a join token decoded as a CA"),
        };
        assert_eq!(parsed, token);
        assert!(text.len() < 1200, "token of {} characters", text.len());
        // The CA key is nowhere in it.
        let bytes = postcard::to_stdvec(&parsed).unwrap();
        assert!(!bytes
            .windows(ca.key_der.len())
            .any(|w| w == ca.key_der.as_slice()));
        ca.check_token(&parsed, now).unwrap();
        let later = now + std::time::Duration::from_secs(3601);
        assert!(ca
            .check_token(&parsed, later)
            .unwrap_err()
            .contains("expired"));
        // Forged expiry: the MAC no longer matches.
        let mut forged = parsed.clone();
        forged.expires_s += 86_400;
        assert!(ca
            .check_token(&forged, later)
            .unwrap_err()
            .contains("not made by"));
        // Another CA of the same cluster id (a rotated one) refuses it.
        let other = ClusterCa::generate("c1").unwrap();
        assert!(other.check_token(&parsed, now).is_err());
        // An old-style token is the CA itself.
        assert!(matches!(Admission::parse(&ca.encode()).unwrap(), Admission::Ca(c) if c == ca));
        assert!(ca
            .join_token(JOIN_TOKEN_TTL_MAX + std::time::Duration::from_secs(1), now)
            .is_err());
    }

    #[test]
    fn a_certificate_names_its_node_and_keeps_its_key_when_renewed() {
        let ca = ClusterCa::generate("c1").unwrap();
        let first = ca.issue_node("n7").unwrap();
        assert_eq!(peer_name(&first.cert_der).as_deref(), Some("n7"));
        let renewed = ca
            .issue_node_keyed("n7", CERT_LIFETIME, Some(&first.key_der))
            .unwrap();
        assert_ne!(renewed.cert_der, first.cert_der);
        assert_eq!(public_key(&renewed.cert_der), public_key(&first.cert_der));
        let fresh = ca.issue_node("n7").unwrap();
        assert_ne!(public_key(&fresh.cert_der), public_key(&first.cert_der));
        assert_eq!(peer_name(b"garbage"), None);
    }

    #[test]
    fn node_certificates_expire() {
        let ca = ClusterCa::generate("c1").unwrap();
        let node = ca
            .issue_node_for("n1", std::time::Duration::from_secs(3600))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            node.roots().unwrap(),
            provider(),
        )
        .build()
        .unwrap();
        let cert = CertificateDer::from(node.cert_der.clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = |offset: i64| {
            rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                (now + offset) as u64,
            ))
        };
        let ok = |offset| verifier.verify_client_cert(&cert, &[], at(offset)).is_ok();
        assert!(ok(0));
        assert!(ok(3_500), "valid for its lifetime");
        assert!(!ok(3_700), "expired after it");
        assert!(ok(-23 * 3600), "valid for a peer whose clock is behind");
        assert!(!ok(-25 * 3600), "but not from the start of time");
    }

    #[test]
    fn issued_credentials_build_configs() {
        let ca = ClusterCa::generate("c1").unwrap();
        let node = ca.issue_node("n1").unwrap();
        node.server_config().unwrap();
        node.client_config().unwrap();
    }
}
