//! Cluster credentials on disk: bootstrap a new cluster or join one by token.
//!
//! The join token is the cluster CA (certificate and key): a node holding it
//! issues itself a node certificate, and peers accept exactly the
//! certificates the CA signed. The token is written to
//! `<data-dir>/join-token` with mode 0600 and reused on restart, so a node
//! restarted with the same data dir needs no flag to rejoin.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shoal_transport::tls::ClusterCa;

/// Name of the token file in the data dir.
pub const TOKEN_FILE: &str = "join-token";

/// Where the credentials came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// A new cluster was created.
    Bootstrapped,
    /// The token came from a flag.
    Given,
    /// The token came from an earlier run's data dir.
    DataDir,
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

/// Finds or creates the cluster CA for this node.
///
/// - `token`: from `--token` or the contents of `--token-file`.
/// - `joining`: whether `--join` was given (then a token is required).
pub fn load_or_bootstrap(
    data_dir: &Path,
    token: Option<&str>,
    joining: bool,
) -> Result<(ClusterCa, Origin)> {
    let token_path = data_dir.join(TOKEN_FILE);
    let stored = match fs::read_to_string(&token_path) {
        Ok(s) => Some(ClusterCa::from_token(&s).with_context(|| {
            format!(
                "{} is corrupt; remove it to start over",
                token_path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", token_path.display())),
    };
    if let Some(token) = token {
        let ca = ClusterCa::from_token(token)?;
        if let Some(old) = &stored {
            if old.cluster_id != ca.cluster_id {
                bail!(
                    "data dir {} belongs to cluster {} but the token is for cluster {}; use another --data-dir or remove {}",
                    data_dir.display(),
                    old.cluster_id,
                    ca.cluster_id,
                    token_path.display()
                );
            }
        }
        write_private(&token_path, &ca.to_token())?;
        return Ok((ca, Origin::Given));
    }
    if let Some(ca) = stored {
        return Ok((ca, Origin::DataDir));
    }
    if joining {
        bail!(
            "--join needs the cluster's join token: pass --token TOKEN or --token-file PATH \
             (the first node of the cluster wrote it to <its data dir>/{TOKEN_FILE})"
        );
    }
    let cluster_id = format!("{:016x}", rand::random::<u64>());
    let ca = ClusterCa::generate(&cluster_id)?;
    write_private(&token_path, &ca.to_token())?;
    Ok((ca, Origin::Bootstrapped))
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

    #[test]
    fn bootstrap_then_reuse_then_refuse_foreign_token() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, origin) = load_or_bootstrap(dir.path(), None, false).unwrap();
        assert_eq!(origin, Origin::Bootstrapped);
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = load_or_bootstrap(dir.path(), None, false).unwrap();
        assert_eq!((again, origin), (ca.clone(), Origin::DataDir));
        let other = ClusterCa::generate("other").unwrap().to_token();
        let err = load_or_bootstrap(dir.path(), Some(&other), true).unwrap_err();
        assert!(err.to_string().contains("belongs to cluster"), "{err}");
    }

    #[test]
    fn join_without_token_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_bootstrap(dir.path(), None, true).unwrap_err();
        assert!(err.to_string().contains("--token"), "{err}");
        assert!(!dir.path().join(TOKEN_FILE).exists());
    }
}
