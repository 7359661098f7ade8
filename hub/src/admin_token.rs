//! The operator's bearer token for `/admin`.
//!
//! Only its SHA-256 digest is kept on disk (`admin-token.sha256`, mode 0600):
//! a leaked data directory does not leak the token. When the operator sets
//! `CAEP_HUB_ADMIN_TOKEN` that value is used as is and nothing is written.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

const DIGEST_FILE: &str = "admin-token.sha256";

/// Checks presented admin tokens without holding the token itself. A
/// token kept as a digest file is re-read whenever the file changes, so
/// `caep-hub admin-token rotate` takes effect in a running hub at once.
pub struct AdminToken {
    /// The digest file, when the token is not configured.
    file: Option<PathBuf>,
    current: Mutex<Loaded>,
}

#[derive(Clone, Copy)]
struct Loaded {
    digest: [u8; 32],
    /// The file version the digest was read from: (inode, modification time).
    version: Option<(u64, SystemTime)>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// A token minted now, to show the operator exactly once.
pub struct NewToken(pub String);

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewToken(<redacted>)")
    }
}

impl AdminToken {
    /// The configured token, or the stored digest, or a new token (returned so
    /// the caller can show it once).
    pub fn load_or_create(data_dir: &Path, configured: Option<&str>) -> std::io::Result<(Self, Option<NewToken>)> {
        if let Some(token) = configured {
            let current = Mutex::new(Loaded { digest: digest(token), version: None });
            return Ok((AdminToken { file: None, current }, None));
        }
        let path = digest_path(data_dir);
        match read_digest(&path) {
            Ok(loaded) => Ok((AdminToken { file: Some(path), current: Mutex::new(loaded) }, None)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let (token, new) = Self::rotate(data_dir)?;
                Ok((token, Some(new)))
            }
            Err(error) => Err(error),
        }
    }

    /// Mints a new token and replaces the stored digest.
    pub fn rotate(data_dir: &Path) -> std::io::Result<(Self, NewToken)> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let path = digest_path(data_dir);
        write_private(&path, hex(&digest(&token)).as_bytes())?;
        let loaded = read_digest(&path)?;
        Ok((AdminToken { file: Some(path), current: Mutex::new(loaded) }, NewToken(token)))
    }

    /// Whether `presented` is the admin token. Compares digests, so the time
    /// taken says nothing about the token's bytes.
    pub fn accepts(&self, presented: &str) -> bool {
        digest(presented) == self.current_digest()
    }

    /// Identifies the token in force (its digest): what a console session
    /// was opened with, so rotating the token ends those sessions.
    pub fn in_force(&self) -> [u8; 32] {
        self.current_digest()
    }

    /// The digest in force: the file's, re-read when it was replaced. A
    /// damaged file keeps the digest read before (and says so).
    fn current_digest(&self) -> [u8; 32] {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.file
            && version_of(path).ok() != current.version
        {
            match read_digest(path) {
                Ok(loaded) => {
                    tracing::info!("admin token digest reloaded");
                    *current = loaded;
                }
                Err(error) => tracing::warn!(%error, "cannot reload the admin token digest; keeping the one in force"),
            }
        }
        current.digest
    }
}

fn version_of(path: &Path) -> std::io::Result<(u64, SystemTime)> {
    let meta = fs::metadata(path)?;
    Ok((meta.ino(), meta.modified()?))
}

fn read_digest(path: &Path) -> std::io::Result<Loaded> {
    let version = version_of(path)?;
    let hex = fs::read_to_string(path)?;
    let digest = parse_hex(hex.trim())
        .ok_or_else(|| std::io::Error::other(format!("{DIGEST_FILE} is damaged; run `caep-hub admin-token rotate`")))?;
    Ok(Loaded { digest, version: Some(version) })
}

fn digest_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DIGEST_FILE)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes `bytes` to `path` with mode 0600 via a temporary file and rename, so
/// a crash leaves either the old file or the new one.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let temp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_then_only_its_digest_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, new) = AdminToken::load_or_create(dir.path(), None).expect("created");
        let NewToken(token) = new.expect("a new token is shown on first start");
        assert!(first.accepts(&token));
        assert!(!first.accepts("wrong"));

        let stored = fs::read_to_string(dir.path().join(DIGEST_FILE)).expect("digest file");
        assert!(!stored.contains(&token), "the token itself is never stored");
        let mode = fs::metadata(dir.path().join(DIGEST_FILE)).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let (again, new) = AdminToken::load_or_create(dir.path(), None).expect("loaded");
        assert!(new.is_none(), "shown only once");
        assert!(again.accepts(&token));

        let (rotated, NewToken(fresh)) = AdminToken::rotate(dir.path()).expect("rotated");
        assert!(rotated.accepts(&fresh) && !rotated.accepts(&token));
        // The token loaded before the rotation (a running hub) follows the file.
        assert!(again.accepts(&fresh), "a running hub takes the rotated token");
        assert!(!again.accepts(&token), "and stops taking the old one");
    }

    #[test]
    fn a_configured_token_wins_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (token, new) = AdminToken::load_or_create(dir.path(), Some("s3cret")).expect("configured");
        assert!(new.is_none() && token.accepts("s3cret"));
        assert!(!dir.path().join(DIGEST_FILE).exists());
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }
}
