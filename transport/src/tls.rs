//! Cluster credentials: the cluster CA, join tokens and per-node certificates,
//! and the rustls configurations that enforce mutual TLS with them.
//!
//! Every node certificate is signed by the cluster CA. Both ends of every QUIC
//! connection present one and verify the other's against the CA, so a peer
//! holding another cluster's credentials (or none) fails the handshake.

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

/// Prefix of a join token; the digit is the token format version.
const TOKEN_PREFIX: &str = "shoal1-";

/// Longest join token accepted (characters). A real one is ~700; the bound
/// keeps a decoder of untrusted input from allocating on a whim.
pub const TOKEN_LEN_MAX: usize = 8 * 1024;

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
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(tls_err)?;
        Ok(NodeCredentials {
            ca_cert_der: self.cert_der.clone(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Encodes the CA as a join token (`shoal1-<base64url>`).
    pub fn to_token(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("in-memory encoding cannot fail");
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// Decodes a join token; the error says what is wrong with it.
    pub fn from_token(token: &str) -> Result<Self, TransportError> {
        let token = token.trim();
        if token.len() > TOKEN_LEN_MAX {
            return Err(TransportError::BadToken(format!(
                "token is {} characters long, more than the {TOKEN_LEN_MAX} a shoal token can be",
                token.len()
            )));
        }
        let body = token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            TransportError::BadToken(format!(
                "a shoal join token starts with `{TOKEN_PREFIX}`; copy it whole from the first node's `join-token` file"
            ))
        })?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TransportError::BadToken(format!("token is not valid base64url: {e}")))?;
        let ca: ClusterCa = postcard::from_bytes(&bytes)
            .map_err(|e| TransportError::BadToken(format!("token is truncated or corrupt: {e}")))?;
        // Prove the key works before anyone relies on it.
        KeyPair::try_from(ca.key_der.as_slice())
            .map_err(|e| TransportError::BadToken(format!("token holds an unusable key: {e}")))?;
        Ok(ca)
    }
}

/// What a node needs to talk to its cluster: the CA certificate to verify
/// peers, and its own certificate and key to be verified.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeCredentials {
    /// The cluster CA certificate (DER).
    pub ca_cert_der: Vec<u8>,
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
        roots
            .add(CertificateDer::from(self.ca_cert_der.clone()))
            .map_err(tls_err)?;
        Ok(Arc::new(roots))
    }

    fn chain_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![CertificateDer::from(self.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
        )
    }

    /// rustls server config: presents this node's certificate and requires a
    /// client certificate signed by the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(tls_err)?;
        let (chain, key) = self.chain_and_key();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
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
    fn token_roundtrip_and_rejections() {
        let ca = ClusterCa::generate("c1").unwrap();
        let token = ca.to_token();
        assert_eq!(ClusterCa::from_token(&token).unwrap(), ca);
        assert!(matches!(
            ClusterCa::from_token("nope"),
            Err(TransportError::BadToken(_))
        ));
        let truncated = &token[..token.len() / 2];
        assert!(matches!(
            ClusterCa::from_token(truncated),
            Err(TransportError::BadToken(_))
        ));
        let long = format!("{TOKEN_PREFIX}{}", "A".repeat(TOKEN_LEN_MAX));
        assert!(matches!(
            ClusterCa::from_token(&long),
            Err(TransportError::BadToken(_))
        ));
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
