//! Cluster credentials on disk: bootstrap a new cluster, or join one with
//! a token.
//!
//! `<data-dir>/cluster-ca` (0600) holds the cluster CA, key included: a
//! node restarted with the same data dir needs no flag to rejoin, and can
//! admit others. `<data-dir>/join-token` (0600) holds a join token the node
//! rewrites before it expires (see `identity`); the token holds no key.
//! Data dirs of earlier releases kept the CA in `join-token`; it moves to
//! `cluster-ca` at start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shoal_transport::tls::{Admission, ClusterCa, JoinToken};

/// Name of the join token file in the data dir.
pub const TOKEN_FILE: &str = "join-token";

/// Name of the CA file in the data dir.
pub const CA_FILE: &str = "cluster-ca";

/// Where the credentials came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// A new cluster was created.
    Bootstrapped,
    /// The CA came from a `shoal1-` token of an earlier release (it is the
    /// CA itself).
    Given,
    /// The CA came from an earlier run's data dir.
    DataDir,
    /// A member admitted this node with a join token.
    Joined,
}

/// How a node starts.
#[derive(Debug)]
pub enum Start {
    /// It holds the cluster CA.
    Member(ClusterCa, Origin),
    /// It must ask a member with this token; if none admits it, it runs
    /// with the data dir's CA when there is one.
    Join(JoinToken, Option<ClusterCa>),
}

/// Writes `contents` to `path` with mode 0600, atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Name of the API token file in the data dir.
pub const API_TOKEN_FILE: &str = "api-token";

/// Shortest API token accepted from `--http-token` (a guessable token is
/// no protection).
pub const API_TOKEN_LEN_MIN: usize = 16;

/// The token this node's API accepts: `given` (from `--http-token`), else
/// the one an earlier run wrote, else a new random one (32 bytes,
/// base64url). Written to `<data-dir>/api-token` (0600) either way, so
/// that the CLI of a user who can read it (root, the agent's user) finds
/// it and nobody else can call the API.
pub fn api_token(data_dir: &Path, given: Option<&str>) -> Result<String> {
    let path = data_dir.join(API_TOKEN_FILE);
    let token = match given {
        Some(t) => {
            if t.len() < API_TOKEN_LEN_MIN || t.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                bail!(
                    "--http-token: use at least {API_TOKEN_LEN_MIN} characters without spaces \
                     (or give none: the agent then makes one and writes it to {})",
                    path.display()
                );
            }
            t.to_string()
        }
        None => match fs::read_to_string(&path) {
            Ok(t) if t.trim().len() >= API_TOKEN_LEN_MIN => t.trim().to_string(),
            _ => {
                use base64::Engine;
                let bytes: [u8; 32] = rand::random();
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            }
        },
    };
    write_private(&path, &token)?;
    Ok(token)
}

/// Reads the CA this data dir holds, moving an earlier release's (kept in
/// `join-token`) to `cluster-ca`.
fn stored_ca(data_dir: &Path) -> Result<Option<ClusterCa>> {
    let ca_path = data_dir.join(CA_FILE);
    match fs::read_to_string(&ca_path) {
        Ok(s) => {
            return ClusterCa::decode(&s).map(Some).with_context(|| {
                format!(
                    "{} is corrupt; remove it (and join again with a token from a member)",
                    ca_path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", ca_path.display())),
    }
    let token_path = data_dir.join(TOKEN_FILE);
    match fs::read_to_string(&token_path) {
        Ok(s) if s.trim().starts_with("shoal1-") => {
            let ca = ClusterCa::decode(&s).with_context(|| {
                format!(
                    "{} is corrupt; remove it to start over",
                    token_path.display()
                )
            })?;
            write_private(&ca_path, &ca.encode())?;
            // The old token file is the CA key: gone; the agent writes a
            // join token in its place.
            fs::remove_file(&token_path)?;
            Ok(Some(ca))
        }
        _ => Ok(None),
    }
}

/// Finds, creates or asks for the cluster CA of this node.
///
/// - `token`: from `--token` or the contents of `--token-file`.
/// - `joining`: whether `--join` was given (then a token is required
///   unless the data dir holds the CA).
pub fn load_or_bootstrap(data_dir: &Path, token: Option<&str>, joining: bool) -> Result<Start> {
    let stored = stored_ca(data_dir)?;
    let ca_path = data_dir.join(CA_FILE);
    if let Some(token) = token {
        let given = Admission::parse(token)?;
        if let Some(old) = &stored {
            if old.cluster_id != given.cluster_id() {
                bail!(
                    "data dir {} belongs to cluster {} but the token is for cluster {}; use another --data-dir or remove {}",
                    data_dir.display(),
                    old.cluster_id,
                    given.cluster_id(),
                    ca_path.display()
                );
            }
        }
        return match (given, stored) {
            // This data dir's CA, of this cluster, wins over a token left
            // in a unit file: after a rotation the token's CA is the old
            // one (found in review: it replaced the new CA, or failed the
            // start).
            (Admission::Ca(_), Some(ca)) => {
                tracing::warn!("--token ignored: this data dir holds the cluster's CA");
                Ok(Start::Member(ca, Origin::DataDir))
            }
            (Admission::Ca(ca), None) => {
                tracing::warn!("this token is an earlier release's, which is the cluster CA itself (key included): \
                     anyone who saw it can admit nodes. Use join tokens (`shoal token create`) from now on, \
                     and rotate the CA (`shoal ca rotate`) if it may have leaked");
                save_ca(data_dir, &ca)?;
                Ok(Start::Member(ca, Origin::Given))
            }
            (Admission::Token(t), Some(ca)) if ca.cert_der == t.ca_cert_der => {
                Ok(Start::Member(ca, Origin::DataDir))
            }
            // Another CA of this cluster: an old token (the CA was rotated
            // since), or this node missed a rotation. An expired token
            // cannot tell; a valid one is tried, and the data dir's CA
            // used if it does not admit.
            (Admission::Token(t), Some(ca)) => {
                if t.expired(std::time::SystemTime::now()) || !joining {
                    tracing::warn!("--token ignored: it is for another CA of this cluster than this data dir's, and expired");
                    Ok(Start::Member(ca, Origin::DataDir))
                } else {
                    Ok(Start::Join(t, Some(ca)))
                }
            }
            (Admission::Token(t), None) => {
                if !joining {
                    bail!(
                        "a join token admits through a member: give --join SEED (a member's QUIC address) too"
                    );
                }
                if t.expired(std::time::SystemTime::now()) {
                    bail!("the join token has expired: create a new one with `shoal token create` on a member");
                }
                Ok(Start::Join(t, None))
            }
        };
    }
    if let Some(ca) = stored {
        return Ok(Start::Member(ca, Origin::DataDir));
    }
    if joining {
        bail!(
            "--join needs a join token: pass --token TOKEN or --token-file PATH \
             (a member keeps a current one in <its data dir>/{TOKEN_FILE}; \
             `shoal token create` on a member makes another)"
        );
    }
    let cluster_id = format!("{:016x}", rand::random::<u64>());
    let ca = ClusterCa::generate(&cluster_id)?;
    save_ca(data_dir, &ca)?;
    Ok(Start::Member(ca, Origin::Bootstrapped))
}

/// Stores the CA a member handed this node.
pub fn save_ca(data_dir: &Path, ca: &ClusterCa) -> Result<()> {
    write_private(&data_dir.join(CA_FILE), &ca.encode())
}

/// Reads a token file given by `--token-file`.
pub fn read_token_file(path: &PathBuf) -> Result<String> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot read token file {}", path.display()))?;
    if meta.len() > shoal_transport::tls::TOKEN_LEN_MAX as u64 {
        bail!("{} is too large to be a shoal join token", path.display());
    }
    Ok(fs::read_to_string(path)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(start: Start) -> (ClusterCa, Origin) {
        match start {
            Start::Member(ca, origin) => (ca, origin),
            Start::Join(..) => panic!("asked to join"),
        }
    }

    #[test]
    fn bootstrap_then_reuse_then_refuse_foreign_token() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, origin) = member(load_or_bootstrap(dir.path(), None, false).unwrap());
        assert_eq!(origin, Origin::Bootstrapped);
        let mode = fs::metadata(dir.path().join(CA_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = member(load_or_bootstrap(dir.path(), None, false).unwrap());
        assert_eq!((again, origin), (ca.clone(), Origin::DataDir));
        let other = ClusterCa::generate("other")
            .unwrap()
            .join_token(
                std::time::Duration::from_secs(60),
                std::time::SystemTime::now(),
            )
            .unwrap()
            .encode();
        let err = load_or_bootstrap(dir.path(), Some(&other), true).unwrap_err();
        assert!(err.to_string().contains("belongs to cluster"), "{err}");
        // Its own cluster's token, still in a unit file: no join needed.
        let own = ca
            .join_token(
                std::time::Duration::from_secs(60),
                std::time::SystemTime::now(),
            )
            .unwrap()
            .encode();
        let (again, origin) = member(load_or_bootstrap(dir.path(), Some(&own), true).unwrap());
        assert_eq!((again, origin), (ca.clone(), Origin::DataDir));
        // After a rotation: an earlier release's token (the old CA) never
        // replaces the data dir's CA, and an old join token that expired is
        // ignored.
        let mut old = ClusterCa::generate(&ca.cluster_id).unwrap();
        let (again, _) = member(load_or_bootstrap(dir.path(), Some(&old.encode()), true).unwrap());
        assert_eq!(again, ca);
        assert_eq!(
            ClusterCa::decode(&fs::read_to_string(dir.path().join(CA_FILE)).unwrap()).unwrap(),
            ca
        );
        let expired = old
            .join_token(
                std::time::Duration::from_secs(1),
                std::time::SystemTime::now() - std::time::Duration::from_secs(10),
            )
            .unwrap();
        let (again, _) =
            member(load_or_bootstrap(dir.path(), Some(&expired.encode()), true).unwrap());
        assert_eq!(again, ca);
        // A valid one is tried, with the data dir's CA to fall back on.
        old.cluster_id = ca.cluster_id.clone();
        let valid = old
            .join_token(
                std::time::Duration::from_secs(60),
                std::time::SystemTime::now(),
            )
            .unwrap();
        match load_or_bootstrap(dir.path(), Some(&valid.encode()), true).unwrap() {
            Start::Join(_, Some(fallback)) => assert_eq!(fallback, ca),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fresh_node_with_a_token_asks_a_member() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("c").unwrap();
        let token = ca
            .join_token(
                std::time::Duration::from_secs(60),
                std::time::SystemTime::now(),
            )
            .unwrap();
        match load_or_bootstrap(dir.path(), Some(&token.encode()), true).unwrap() {
            Start::Join(t, fallback) => {
                assert_eq!(t, token);
                assert!(fallback.is_none());
            }
            Start::Member(..) => panic!("a token made a member without asking"),
        }
        assert!(!dir.path().join(CA_FILE).exists());
        let err = load_or_bootstrap(dir.path(), Some(&token.encode()), false).unwrap_err();
        assert!(err.to_string().contains("--join"), "{err}");
    }

    #[test]
    fn an_earlier_releases_data_dir_moves_its_ca_out_of_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("c").unwrap();
        write_private(&dir.path().join(TOKEN_FILE), &ca.encode()).unwrap();
        let (got, origin) = member(load_or_bootstrap(dir.path(), None, false).unwrap());
        assert_eq!((got, origin), (ca, Origin::DataDir));
        assert!(
            !dir.path().join(TOKEN_FILE).exists(),
            "the CA key stayed in join-token"
        );
        assert!(dir.path().join(CA_FILE).exists());
    }

    #[test]
    fn join_without_token_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_bootstrap(dir.path(), None, true).unwrap_err();
        assert!(err.to_string().contains("--token"), "{err}");
        assert!(!dir.path().join(CA_FILE).exists());
    }
}
