//! Signatures on what a node publishes for others to relay.
//!
//! The transport proves who sent a frame, but gossip is relayed: a value
//! about node X usually arrives from some other node. So X signs what it
//! publishes with the private key of its certificate, publishes the
//! certificate beside it, and every reader checks that the certificate
//! chains to a cluster CA it trusts and names X, then checks the value's
//! signature with that certificate's key. A member can relay X's values
//! but cannot make one up.
//!
//! The key is the node's transport key (ECDSA P-256): certificates are
//! renewed and re-issued by a CA rotation for the same key, so one key
//! signs for the node's whole run.

use std::sync::{Arc, RwLock};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use crate::tls::{peer_name, public_key, NodeCredentials};
use crate::TransportError;

/// Longest certificate accepted from gossip, bytes (a node certificate is
/// about 500).
pub const CERT_LEN_MAX: usize = 8 * 1024;

/// Longest signature accepted, bytes (a DER ECDSA P-256 signature is at
/// most 72).
pub const SIGNATURE_LEN_MAX: usize = 80;

struct Keys {
    cert_der: Vec<u8>,
    key: EcdsaKeyPair,
    verifier: Arc<dyn ClientCertVerifier>,
    /// Moves whenever the credentials are replaced.
    epoch: u64,
}

/// This node's signing key and the CAs it trusts, kept current with the
/// transport's credentials (renewal and CA rotation replace them). Cheap
/// to clone.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<RwLock<Keys>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

fn keys(creds: &NodeCredentials, epoch: u64) -> Result<Keys, TransportError> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &creds.key_der, &rng)
        .map_err(|e| TransportError::Credentials(format!("node key cannot sign: {e}")))?;
    Ok(Keys {
        cert_der: creds.cert_der.clone(),
        key,
        verifier: creds.client_verifier()?,
        epoch,
    })
}

impl Signer {
    /// A signer for `creds`.
    pub fn new(creds: &NodeCredentials) -> Result<Signer, TransportError> {
        Ok(Signer {
            keys: Arc::new(RwLock::new(keys(creds, 0)?)),
            rng: SystemRandom::new(),
        })
    }

    /// Takes new credentials (a renewed certificate, or the CAs of a
    /// rotation step).
    pub fn update(&self, creds: &NodeCredentials) -> Result<(), TransportError> {
        let mut held = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let epoch = held.epoch.wrapping_add(1);
        *held = keys(creds, epoch)?;
        Ok(())
    }

    /// Moves whenever [`Signer::update`] replaced the credentials: the
    /// certificate to publish may have changed.
    pub fn epoch(&self) -> u64 {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).epoch
    }

    /// This node's certificate (DER), to publish beside what it signs.
    pub fn certificate(&self) -> Vec<u8> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert_der
            .clone()
    }

    /// Signs `message` with this node's key (DER-encoded ECDSA).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let held = self.keys.read().unwrap_or_else(|p| p.into_inner());
        match held.key.sign(&self.rng, message) {
            Ok(sig) => sig.as_ref().to_vec(),
            // ring fails only when the system RNG does; an empty signature
            // verifies nowhere, so the value is simply not believed. Said
            // loudly: peers will stop believing this node's news.
            Err(_) => {
                tracing::error!("signing failed (the system random number generator failed): peers will not believe this value");
                Vec::new()
            }
        }
    }

    /// The public key of `cert_der` if it is a certificate of node `name`
    /// issued by a CA this node trusts and valid now; why not otherwise.
    pub fn check_certificate(&self, name: &str, cert_der: &[u8]) -> Result<PublicKey, String> {
        if cert_der.len() > CERT_LEN_MAX {
            return Err(format!("certificate over {CERT_LEN_MAX} bytes"));
        }
        let verifier = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verifier
            .clone();
        verifier
            .verify_client_cert(&CertificateDer::from(cert_der), &[], UnixTime::now())
            .map_err(|e| format!("certificate not trusted: {e}"))?;
        match peer_name(cert_der) {
            Some(n) if n == name => {}
            Some(n) => return Err(format!("certificate names {n:?}, not {name:?}")),
            None => return Err("certificate names no node".into()),
        }
        public_key(cert_der)
            .map(PublicKey)
            .ok_or_else(|| "certificate has no readable public key".into())
    }
}

/// A node's public key, taken from a certificate that
/// [`Signer::check_certificate`] accepted.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(Vec<u8>);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} bytes)", self.0.len())
    }
}

impl PublicKey {
    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature.len() <= SIGNATURE_LEN_MAX
            && UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.0)
                .verify(message, signature)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ClusterCa;

    #[test]
    fn a_signature_verifies_only_with_the_signers_certificate_of_its_name() {
        let ca = ClusterCa::generate("c1").unwrap();
        let a = ca.issue_node("a").unwrap();
        let b = ca.issue_node("b").unwrap();
        let signer_a = Signer::new(&a).unwrap();
        let signer_b = Signer::new(&b).unwrap();
        let sig = signer_a.sign(b"hello");

        let key_a = signer_b.check_certificate("a", &a.cert_der).unwrap();
        assert!(key_a.verify(b"hello", &sig));
        assert!(!key_a.verify(b"hellO", &sig));
        assert!(!key_a.verify(b"hello", &signer_b.sign(b"hello")));
        assert!(!key_a.verify(b"hello", &[]));

        // A's certificate does not speak for b.
        let err = signer_b.check_certificate("b", &a.cert_der).unwrap_err();
        assert!(err.contains("names \"a\""), "{err}");
        // Another cluster's certificate is not trusted.
        let other = ClusterCa::generate("c2").unwrap().issue_node("a").unwrap();
        assert!(signer_b.check_certificate("a", &other.cert_der).is_err());
        assert!(signer_b.check_certificate("a", b"junk").is_err());
    }

    #[test]
    fn an_update_changes_the_epoch_and_the_published_certificate_but_not_the_key() {
        let ca = ClusterCa::generate("c1").unwrap();
        let a = ca.issue_node("a").unwrap();
        let renewed = ca
            .issue_node_keyed("a", std::time::Duration::from_secs(3600), Some(&a.key_der))
            .unwrap();
        let signer = Signer::new(&a).unwrap();
        let before = signer.epoch();
        signer.update(&renewed).unwrap();
        assert_ne!(signer.epoch(), before);
        assert_eq!(signer.certificate(), renewed.cert_der);
        let key = signer.check_certificate("a", &a.cert_der).unwrap();
        assert!(key.verify(b"m", &signer.sign(b"m")));
    }
}
