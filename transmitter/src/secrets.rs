//! Secrets at rest: values a receiver gives the hub to present back to it
//! (a push stream's `authorization_header`) are sealed with an AEAD
//! (XChaCha20-Poly1305) before they are written to the database or travel
//! through a shared log, and opened only in memory.
//!
//! The key lives outside the database: `CAEP_HUB_SECRET_KEY` (base64url of
//! 32 bytes; every instance of a scaled-out hub must share it), or else the
//! file `keys/secret.key` in the data directory (mode 0600), made on first
//! start. A copied database alone reveals no receiver's credentials.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// What a sealed value starts with: versioned, so the scheme can change.
const SEALED_PREFIX: &str = "sealed.v1.";
const KEY_FILE: &str = "secret.key";
const NONCE_LEN: usize = 24;

/// Why a secret or the key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key must be the base64url encoding of exactly 32 bytes")]
    BadKey,
    #[error("cannot read or write the secret key file {path}: {source}")]
    KeyFile { path: String, source: io::Error },
    /// The value was sealed under another key (instances must share
    /// `CAEP_HUB_SECRET_KEY`), for another context, or was altered.
    #[error("a sealed secret cannot be opened with this key (do all instances share CAEP_HUB_SECRET_KEY?)")]
    Unopenable,
}

/// Seals and opens secrets with the hub's key. `Debug` shows no key.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox(<redacted>)")
    }
}

impl SecretBox {
    /// The configured key (base64url), or the key file in `data_dir/keys`,
    /// made on first use.
    pub fn load_or_create(data_dir: &Path, configured: Option<&str>) -> Result<Self, SecretError> {
        if let Some(encoded) = configured {
            return Self::from_encoded(encoded.trim());
        }
        let dir = data_dir.join("keys");
        let path = dir.join(KEY_FILE);
        let file_error = |source| SecretError::KeyFile { path: path.display().to_string(), source };
        match fs::read_to_string(&path) {
            Ok(encoded) => Self::from_encoded(encoded.trim()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                crate::keys::write_private_file(&dir, KEY_FILE, URL_SAFE_NO_PAD.encode(key).as_bytes())
                    .map_err(|e| file_error(io::Error::other(e.to_string())))?;
                tracing::info!("generated the secret key that seals receivers' credentials at rest");
                Ok(Self::from_bytes(&key))
            }
            Err(error) => Err(file_error(error)),
        }
    }

    /// A new random key, base64url-encoded: a value for `CAEP_HUB_SECRET_KEY`.
    pub fn generate_key() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        URL_SAFE_NO_PAD.encode(key)
    }

    /// A key that lives only as long as the process: for tests and tools
    /// that never reopen what they sealed.
    pub fn ephemeral() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self::from_bytes(&key)
    }

    fn from_encoded(encoded: &str) -> Result<Self, SecretError> {
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| SecretError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
        Ok(Self::from_bytes(&key))
    }

    fn from_bytes(key: &[u8; 32]) -> Self {
        SecretBox { cipher: XChaCha20Poly1305::new(key.into()) }
    }

    /// `plaintext` sealed for `context` (e.g. the stream id: a sealed value
    /// moved to another stream does not open).
    pub fn seal(&self, plaintext: &str, context: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload { msg: plaintext.as_bytes(), aad: context.as_bytes() };
        // Encryption of an in-memory buffer cannot fail for this cipher.
        let sealed = self.cipher.encrypt(&XNonce::from(nonce), payload).unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Opens what [`seal`](Self::seal) made for `context`. A value that is
    /// not sealed (written before sealing existed) is returned as it is.
    pub fn open(&self, value: &str, context: &str) -> Result<String, SecretError> {
        let Some(encoded) = value.strip_prefix(SEALED_PREFIX) else { return Ok(value.to_owned()) };
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| SecretError::Unopenable)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Unopenable);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretError::Unopenable)?;
        let payload = Payload { msg: sealed, aad: context.as_bytes() };
        let plain = self.cipher.decrypt(&XNonce::from(nonce), payload).map_err(|_| SecretError::Unopenable)?;
        String::from_utf8(plain).map_err(|_| SecretError::Unopenable)
    }

    /// Whether `value` is sealed (what storage and the shared log hold).
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(SEALED_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_key_and_context() {
        let secrets = SecretBox::ephemeral();
        let sealed = secrets.seal("Bearer rp-secret", "stream-1");
        assert!(SecretBox::is_sealed(&sealed) && !sealed.contains("rp-secret"));
        assert_ne!(sealed, secrets.seal("Bearer rp-secret", "stream-1"), "a fresh nonce each time");
        assert_eq!(secrets.open(&sealed, "stream-1").expect("opens"), "Bearer rp-secret");
        assert!(matches!(secrets.open(&sealed, "stream-2"), Err(SecretError::Unopenable)), "bound to its stream");
        assert!(matches!(SecretBox::ephemeral().open(&sealed, "stream-1"), Err(SecretError::Unopenable)));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(secrets.open(&tampered, "stream-1"), Err(SecretError::Unopenable)));
        assert_eq!(secrets.open("Bearer legacy", "stream-1").expect("unsealed"), "Bearer legacy");
    }

    #[test]
    fn the_key_is_made_once_kept_private_or_configured() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let first = SecretBox::load_or_create(dir.path(), None).expect("made");
        let sealed = first.seal("x", "c");
        let again = SecretBox::load_or_create(dir.path(), None).expect("loaded");
        assert_eq!(again.open(&sealed, "c").expect("same key"), "x");
        let mode = fs::metadata(dir.path().join("keys").join(KEY_FILE)).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let configured = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let shared = SecretBox::load_or_create(dir.path(), Some(&configured)).expect("configured");
        assert!(shared.open(&sealed, "c").is_err(), "the configured key wins over the file");
        assert!(matches!(SecretBox::load_or_create(dir.path(), Some("short")), Err(SecretError::BadKey)));
        assert_eq!(format!("{first:?}"), "SecretBox(<redacted>)");
    }
}
