//! The transmitter's signing keys, persisted in the hub's data directory.
//!
//! Layout under `<data_dir>/keys/` (directory mode 0700):
//!
//! * `<kid>.jwk.json`: one private JWK per key that is still in use, mode 0600;
//! * `keyring.json`: `[{"kid", "alg", "created_at", "state"}]`, the source of
//!   truth for which key signs (`active`, exactly one), which are only
//!   published so receivers can still verify SETs they already hold
//!   (`published`), and which are gone (`retired`).
//!
//! Every file is written to a temporary file in the same directory, fsynced,
//! renamed over the target and the directory fsynced, so a crash leaves either
//! the old or the new content, never half a key. A key file is always written
//! before the keyring that names it, so the keyring never points at a key that
//! does not exist.
//!
//! A retired key's private JWK is deleted: nothing may sign with it again and
//! receivers no longer accept it, so keeping it would only be a liability. Its
//! keyring entry stays, as a record.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use caep_schemas::jose::{Algorithm, JoseError, Jwks, SigningKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Name of the keyring file inside the keys directory.
const KEYRING_FILE: &str = "keyring.json";
/// Suffix of the private key files.
const KEY_SUFFIX: &str = ".jwk.json";
/// Prefix of temporary files; leftovers from a crash are removed on open.
const TMP_PREFIX: &str = ".tmp-";

/// Lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Signs new SETs and is published. Exactly one key is active.
    Active,
    /// No longer signs, still published so receivers can verify older SETs.
    Published,
    /// Neither signs nor is published; its private key has been deleted.
    Retired,
}

impl KeyState {
    /// The state as written in `keyring.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Published => "published",
            KeyState::Retired => "retired",
        }
    }
}

/// One entry of the keyring: public facts about a key, never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// RFC 7638 thumbprint of the public key, as published in the JWKS.
    pub kid: String,
    /// The algorithm the key signs with.
    pub alg: Algorithm,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Where the key is in its lifecycle.
    pub state: KeyState,
}

/// Errors of the key store.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a file of the key store failed.
    #[error("key store I/O error on {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A key could not be generated or loaded.
    #[error(transparent)]
    Key(#[from] JoseError),
    /// The keyring or a key file is inconsistent (edited by hand, damaged).
    #[error("key store is damaged: {0}")]
    Corrupt(String),
    /// No key with this kid exists.
    #[error("no key with kid {0:?}")]
    NotFound(String),
    /// The active key cannot be retired.
    #[error("key {0} is the active signing key; rotate to a new key before retiring it")]
    RetireActive(String),
    /// Another instance's JWKS was refused (not public, not usable, no kid).
    #[error("peer keys refused: {0}")]
    PeerKeys(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// What readers see; replaced wholesale on every change.
struct State {
    ring: Vec<KeyInfo>,
    active: Arc<SigningKey>,
    /// Active and published keys, by kid.
    keys: HashMap<String, Arc<SigningKey>>,
    /// Built once per change: the JWKS endpoint serves it on every request.
    jwks: Jwks,
}

impl State {
    fn build(ring: Vec<KeyInfo>, keys: HashMap<String, Arc<SigningKey>>) -> Result<Self, KeyError> {
        let mut active = None;
        for info in &ring {
            if info.state == KeyState::Active {
                if active.is_some() {
                    return Err(KeyError::Corrupt("more than one active key".into()));
                }
                active = Some(info.kid.as_str());
            }
        }
        let active_kid = active.ok_or_else(|| KeyError::Corrupt("no active key".into()))?;
        let active = keys
            .get(active_kid)
            .cloned()
            .ok_or_else(|| KeyError::Corrupt(format!("active key {active_kid} is not loaded")))?;
        // Keyring order (creation order) is also JWKS order.
        let published =
            ring.iter().filter(|info| info.state != KeyState::Retired).filter_map(|info| keys.get(&info.kid));
        let jwks = Jwks::from_keys(published.map(Arc::as_ref));
        Ok(State { ring, active, keys, jwks })
    }
}

/// The transmitter's persistent set of signing keys.
///
/// Reads ([`active`](Self::active), [`jwks`](Self::jwks)) take a read lock for
/// the time of an `Arc` clone. Changes are serialized by a separate mutex and
/// do their slow work (key generation, fsync) before taking the write lock
/// for a pointer swap, so signing never waits on the disk.
pub struct KeyStore {
    dir: PathBuf,
    default_alg: Algorithm,
    state: RwLock<State>,
    /// Held for the whole of a change, so a change computed from the current
    /// state is still based on the current state when it is swapped in.
    writer: Mutex<()>,
    /// Other instances' public keys (scale-out), by instance id. Kept apart
    /// from `state` because they come from the control log, not the disk.
    peers: RwLock<Peers>,
}

/// Other instances' published keys and the JWKS they make with ours.
#[derive(Default)]
struct Peers {
    /// instance id → its public JWKs, as validated.
    keys: BTreeMap<String, Vec<Value>>,
}

/// Members that only a private (or symmetric) JWK has: a peer's JWKS with
/// any of them is refused whole, so a key leak never gets republished.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Checks another instance's JWKS: every key a public EC, RSA or OKP key
/// with a `kid`, usable for verification, without private members. Returns
/// the keys as they will be published.
fn validate_peer_jwks(jwks: &Value) -> Result<Vec<Value>, KeyError> {
    let refuse = |reason: String| Err(KeyError::PeerKeys(reason));
    let Some(keys) = jwks.get("keys").and_then(Value::as_array) else {
        return refuse("not a JWKS (an object with a `keys` array)".into());
    };
    let mut valid = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(members) = key.as_object() else { return refuse("a key is not a JSON object".into()) };
        let kid = match members.get("kid").and_then(Value::as_str) {
            Some(kid) if !kid.is_empty() => kid,
            _ => return refuse("a key has no `kid`".into()),
        };
        // The kid is echoed in errors: keep it short and printable.
        let shown: String = kid.chars().take(64).filter(|c| !c.is_control()).collect();
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| members.contains_key(**m)) {
            return refuse(format!("key {shown:?} has the private member `{member}`"));
        }
        match members.get("kty").and_then(Value::as_str) {
            Some("EC" | "RSA" | "OKP") => {}
            _ => return refuse(format!("key {shown:?} is not an EC, RSA or OKP key")),
        }
        let single = serde_json::json!({ "keys": [key] });
        if Jwks::from_value(&single).map_or(true, |parsed| parsed.is_empty()) {
            return refuse(format!("key {shown:?} is not a usable verification key"));
        }
        valid.push(key.clone());
    }
    Ok(valid)
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .field("default_alg", &self.default_alg)
            .field("keys", &self.list())
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// A kid becomes part of a file name, so only the base64url alphabet a
/// thumbprint can contain is allowed: a hand-edited keyring must not be able
/// to point outside the keys directory.
fn check_kid(kid: &str) -> Result<(), KeyError> {
    let ok =
        !kid.is_empty() && kid.len() <= 128 && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyError::Corrupt(format!("invalid kid {:?} in keyring", kid.chars().take(64).collect::<String>())))
    }
}

fn key_file_name(kid: &str) -> String {
    format!("{kid}{KEY_SUFFIX}")
}

impl KeyStore {
    /// Opens (or creates) the key store in `<dir>/keys/`.
    ///
    /// Without a keyring, one active key of `default_alg` is generated. With
    /// one, the keys are loaded and checked; if the active key's algorithm is not
    /// `default_alg`, the store rotates to a new key of `default_alg` and keeps
    /// the old one published.
    pub fn open(dir: &Path, default_alg: Algorithm) -> Result<Self, KeyError> {
        let dir = dir.join("keys");
        DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        tighten_permissions(&dir, 0o700)?;
        remove_temp_files(&dir)?;

        let keyring_path = dir.join(KEYRING_FILE);
        let state = match fs::read(&keyring_path) {
            Ok(bytes) => load(&dir, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = SigningKey::generate(default_alg)?;
                let info =
                    KeyInfo { kid: key.kid().to_owned(), alg: default_alg, created_at: now(), state: KeyState::Active };
                write_key(&dir, &key)?;
                write_keyring(&dir, std::slice::from_ref(&info))?;
                tracing::info!(kid = %info.kid, alg = %default_alg, "generated the first signing key");
                let keys = HashMap::from([(info.kid.clone(), Arc::new(key))]);
                State::build(vec![info], keys)?
            }
            Err(e) => return Err(io_err(&keyring_path)(e)),
        };

        let store = KeyStore {
            dir,
            default_alg,
            state: RwLock::new(state),
            writer: Mutex::new(()),
            peers: RwLock::new(Peers::default()),
        };
        let active_alg = store.active().algorithm();
        if active_alg != default_alg {
            let info = store.rotate(Some(default_alg))?;
            tracing::warn!(
                from = %active_alg,
                to = %default_alg,
                kid = %info.kid,
                "configured signing algorithm changed: rotated to a new key; the previous key stays published"
            );
        }
        Ok(store)
    }

    /// The key that signs new SETs. Cheap: an `Arc` clone under a read lock.
    pub fn active(&self) -> Arc<SigningKey> {
        self.read().active.clone()
    }

    /// The JWKS to publish: the active key and every published key, never a
    /// retired one; then other instances' keys (scale-out), by instance id.
    pub fn jwks(&self) -> Jwks {
        let own = self.read().jwks.clone();
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        if peers.keys.is_empty() {
            return own;
        }
        // Only in scale-out mode: rebuilding per call costs a few key parses,
        // which keeps peer keys independent of our own rotation.
        let mut keys = match own.to_json().get_mut("keys").map(Value::take) {
            Some(Value::Array(keys)) => keys,
            _ => Vec::new(),
        };
        let own_kids: Vec<String> = own.kids().into_iter().map(str::to_owned).collect();
        for key in peers.keys.values().flatten() {
            // Never let a peer shadow one of our kids.
            if key.get("kid").and_then(Value::as_str).is_some_and(|kid| own_kids.iter().any(|own| own == kid)) {
                continue;
            }
            keys.push(key.clone());
        }
        Jwks::from_value(&serde_json::json!({ "keys": keys })).unwrap_or(own)
    }

    /// Our own public JWKS (no peer keys), as JSON: what this instance
    /// publishes to the others through the control log.
    pub fn public_jwks_json(&self) -> Value {
        self.read().jwks.to_json()
    }

    /// Publishes another instance's public keys beside ours (replacing what
    /// it published before; an empty set removes it). Refuses, whole, a set
    /// with a key that is not a usable public EC/RSA/OKP key with a `kid`, or
    /// that carries a private member such as `d`.
    pub fn set_peer_keys(&self, instance_id: &str, jwks: &Value) -> Result<(), KeyError> {
        if instance_id.is_empty() {
            return Err(KeyError::PeerKeys("the instance id is empty".into()));
        }
        let keys = validate_peer_jwks(jwks)?;
        let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        if keys.is_empty() {
            peers.keys.remove(instance_id);
        } else {
            peers.keys.insert(instance_id.to_owned(), keys);
        }
        tracing::info!(instance_id, keys = peers.keys.get(instance_id).map_or(0, Vec::len), "peer keys published");
        Ok(())
    }

    /// Every key the keyring knows, in creation order.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.read().ring.clone()
    }

    /// Makes a new key of `alg` (default: the store's configured algorithm) the
    /// active one; the previous active key stays published.
    pub fn rotate(&self, alg: Option<Algorithm>) -> Result<KeyInfo, KeyError> {
        let alg = alg.unwrap_or(self.default_alg);
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // Generated before any lock readers care about: RSA takes a while.
        let key = SigningKey::generate(alg)?;
        let info = KeyInfo { kid: key.kid().to_owned(), alg, created_at: now(), state: KeyState::Active };

        let (mut ring, mut keys) = {
            let state = self.read();
            (state.ring.clone(), state.keys.clone())
        };
        let previous = self.active().kid().to_owned();
        for entry in &mut ring {
            if entry.state == KeyState::Active {
                entry.state = KeyState::Published;
            }
        }
        ring.push(info.clone());
        keys.insert(info.kid.clone(), Arc::new(key));
        let new_state = State::build(ring, keys)?;

        // Key file first: the keyring must never name a key that is not on disk.
        if let Some(key) = new_state.keys.get(&info.kid) {
            write_key(&self.dir, key)?;
        }
        write_keyring(&self.dir, &new_state.ring)?;
        *self.write() = new_state;
        tracing::info!(kid = %info.kid, %alg, previous = %previous, "rotated the signing key");
        Ok(info)
    }

    /// Stops publishing a key and deletes its private key.
    ///
    /// Refuses the active key ([`KeyError::RetireActive`]: rotate first) and
    /// unknown kids ([`KeyError::NotFound`]). Retiring a retired key does nothing.
    pub fn retire(&self, kid: &str) -> Result<(), KeyError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut ring, mut keys) = {
            let state = self.read();
            (state.ring.clone(), state.keys.clone())
        };
        let entry = ring
            .iter_mut()
            .find(|info| info.kid == kid)
            .ok_or_else(|| KeyError::NotFound(kid.chars().take(64).collect()))?;
        match entry.state {
            KeyState::Active => return Err(KeyError::RetireActive(entry.kid.clone())),
            KeyState::Retired => return Ok(()),
            KeyState::Published => entry.state = KeyState::Retired,
        }
        let kid = entry.kid.clone();
        keys.remove(&kid);
        let new_state = State::build(ring, keys)?;

        // Keyring first: once it says "retired" the file is no longer needed,
        // and a crash before the removal only leaves a file open() ignores.
        write_keyring(&self.dir, &new_state.ring)?;
        *self.write() = new_state;
        remove_key_file(&self.dir, &kid)?;
        tracing::info!(%kid, "retired a signing key; it is no longer published");
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // The write section is a plain assignment and cannot panic, so a
        // poisoned lock still holds a consistent state.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parses and checks the keyring, then loads every key still in use.
fn load(dir: &Path, keyring: &[u8]) -> Result<State, KeyError> {
    let ring: Vec<KeyInfo> = serde_json::from_slice(keyring)
        .map_err(|e| KeyError::Corrupt(format!("{KEYRING_FILE} does not parse: {e}")))?;
    let mut keys = HashMap::new();
    for info in &ring {
        check_kid(&info.kid)?;
        if ring.iter().filter(|other| other.kid == info.kid).count() > 1 {
            return Err(KeyError::Corrupt(format!("kid {} is listed twice", info.kid)));
        }
        if info.state == KeyState::Retired {
            // A crash between the keyring write and the removal leaves the file.
            remove_key_file(dir, &info.kid)?;
            continue;
        }
        let path = dir.join(key_file_name(&info.kid));
        tighten_permissions(&path, 0o600)?;
        let json = fs::read_to_string(&path).map_err(io_err(&path))?;
        let key = SigningKey::from_private_jwk_json(&json)
            .map_err(|e| KeyError::Corrupt(format!("{}: {e}", path.display())))?;
        if key.kid() != info.kid || key.algorithm() != info.alg {
            return Err(KeyError::Corrupt(format!(
                "{} does not hold the {} key {}",
                path.display(),
                info.alg,
                info.kid
            )));
        }
        keys.insert(info.kid.clone(), Arc::new(key));
    }
    State::build(ring, keys)
}

/// Private key files and the keys directory must not be readable by others.
/// Looser permissions (someone copied the directory around) are tightened and
/// reported rather than refused, so the hub does not stop signing over it.
fn tighten_permissions(path: &Path, mode: u32) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "key store permissions were too open; restricting them");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    }
    Ok(())
}

fn remove_temp_files(dir: &Path) -> Result<(), KeyError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn remove_key_file(dir: &Path, kid: &str) -> Result<(), KeyError> {
    let path = dir.join(key_file_name(kid));
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_key(dir: &Path, key: &SigningKey) -> Result<(), KeyError> {
    write_atomic(dir, &key_file_name(key.kid()), key.to_private_jwk_json().as_bytes())
}

fn write_keyring(dir: &Path, ring: &[KeyInfo]) -> Result<(), KeyError> {
    let mut json =
        serde_json::to_vec_pretty(ring).map_err(|e| KeyError::Corrupt(format!("cannot serialize the keyring: {e}")))?;
    json.push(b'\n');
    write_atomic(dir, KEYRING_FILE, &json)
}

/// Writes a private file (0600) `name` in the private directory `dir`
/// (made 0700 if missing), atomically: see [`write_atomic`].
pub(crate) fn write_private_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
    write_atomic(dir, name, bytes)
}

/// Writes `name` in `dir` so that a crash leaves the old content or the new,
/// never a mix: temp file (0600, created exclusively so a planted symlink is
/// not followed), fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{name}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        // Best effort: a leftover is also removed by the next open().
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    let target = dir.join(name);
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&target)(e));
    }
    sync_dir(dir)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::{Map, Value};

    fn open(dir: &Path, alg: Algorithm) -> KeyStore {
        KeyStore::open(dir, alg).expect("open key store")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn reopening_publishes_the_same_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = open(dir.path(), Algorithm::Es256);
        let kids: Vec<String> = first.jwks().kids().into_iter().map(String::from).collect();
        assert_eq!(kids.len(), 1);
        assert_eq!(first.active().kid(), kids[0]);
        drop(first);
        let second = open(dir.path(), Algorithm::Es256);
        assert_eq!(second.jwks().kids(), kids);
        assert_eq!(second.active().kid(), kids[0]);
        assert_eq!(second.list().len(), 1);
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Algorithm::EdDsa);
        let keys_dir = dir.path().join("keys");
        assert_eq!(mode(&keys_dir), 0o700);
        let key_file = keys_dir.join(key_file_name(store.active().kid()));
        assert_eq!(mode(&key_file), 0o600);
        assert_eq!(mode(&keys_dir.join(KEYRING_FILE)), 0o600);
        // The key file really is the private key, and reloads to the same kid.
        let json = fs::read_to_string(&key_file).expect("read");
        assert_eq!(SigningKey::from_private_jwk_json(&json).expect("load").kid(), store.active().kid());
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(&keys_dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(TMP_PREFIX)), "{names:?}");
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn loose_permissions_are_tightened_and_temp_files_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kid = open(dir.path(), Algorithm::Es256).active().kid().to_owned();
        let keys_dir = dir.path().join("keys");
        let key_file = keys_dir.join(key_file_name(&kid));
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::set_permissions(&keys_dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(keys_dir.join(format!("{TMP_PREFIX}crashed")), b"{half a key").expect("write");
        let store = open(dir.path(), Algorithm::Es256);
        assert_eq!(store.active().kid(), kid);
        assert_eq!(mode(&key_file), 0o600);
        assert_eq!(mode(&keys_dir), 0o700);
        assert!(!keys_dir.join(format!("{TMP_PREFIX}crashed")).exists());
    }

    #[test]
    fn rotate_keeps_the_old_key_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Algorithm::Es256);
        let old = store.active().kid().to_owned();
        let info = store.rotate(None).expect("rotate");
        assert_eq!(info.alg, Algorithm::Es256);
        assert_eq!(info.state, KeyState::Active);
        assert_ne!(info.kid, old);
        assert_eq!(store.active().kid(), info.kid);
        assert_eq!(store.jwks().kids(), [old.as_str(), info.kid.as_str()]);
        let states: Vec<(String, KeyState)> = store.list().into_iter().map(|k| (k.kid, k.state)).collect();
        assert_eq!(states, [(old.clone(), KeyState::Published), (info.kid.clone(), KeyState::Active)]);

        // An explicit algorithm overrides the default.
        let ed = store.rotate(Some(Algorithm::EdDsa)).expect("rotate");
        assert_eq!(store.active().algorithm(), Algorithm::EdDsa);
        assert_eq!(store.jwks().len(), 3);

        // The rotation is on disk. (Reopening with the default ES256 would
        // rotate back, so reopen with the algorithm now active.)
        drop(store);
        let again = open(dir.path(), Algorithm::EdDsa);
        assert_eq!(again.active().kid(), ed.kid);
        assert_eq!(again.jwks().kids(), [old.as_str(), info.kid.as_str(), ed.kid.as_str()]);
    }

    #[test]
    fn retire_unpublishes_persistently_and_deletes_the_private_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Algorithm::Es256);
        let old = store.active().kid().to_owned();
        let new = store.rotate(None).expect("rotate").kid;

        assert!(matches!(store.retire(&new), Err(KeyError::RetireActive(_))));
        let err = store.retire(&new).expect_err("active").to_string();
        assert!(err.contains("rotate"), "{err}");
        assert!(matches!(store.retire("no-such-kid"), Err(KeyError::NotFound(_))));

        store.retire(&old).expect("retire");
        assert_eq!(store.jwks().kids(), [new.as_str()]);
        store.retire(&old).expect("retiring twice is a no-op");
        let key_file = dir.path().join("keys").join(key_file_name(&old));
        assert!(!key_file.exists(), "retired private key is deleted");
        drop(store);

        let again = open(dir.path(), Algorithm::Es256);
        assert_eq!(again.jwks().kids(), [new.as_str()]);
        assert!(!again.jwks().contains(&old));
        let retired = again.list().into_iter().find(|k| k.kid == old).expect("still listed");
        assert_eq!(retired.state, KeyState::Retired);
    }

    #[test]
    fn rs256_keys_are_at_least_2048_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Algorithm::Rs256);
        let doc = store.jwks().to_json();
        let key = &doc["keys"][0];
        assert_eq!(key["kty"], "RSA");
        assert_eq!(key["alg"], "RS256");
        let n =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key["n"].as_str().expect("n")).expect("base64url");
        assert!(n.len() >= 256, "modulus is {} bytes", n.len());
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(key.get(private).is_none());
        }
    }

    #[test]
    fn changing_the_default_algorithm_rotates_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open(dir.path(), Algorithm::Es256).active().kid().to_owned();
        let store = open(dir.path(), Algorithm::EdDsa);
        let active = store.active();
        assert_eq!(active.algorithm(), Algorithm::EdDsa);
        assert_ne!(active.kid(), old);
        assert_eq!(store.jwks().kids(), [old.as_str(), active.kid()]);
        assert_eq!(store.jwks().algorithm_of(&old), Some(Algorithm::Es256));
        // Opening again with the same setting does not rotate again.
        drop(store);
        let again = open(dir.path(), Algorithm::EdDsa);
        assert_eq!(again.active().kid(), active.kid());
        assert_eq!(again.list().len(), 2);
    }

    #[test]
    fn active_key_signs_tokens_the_jwks_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Algorithm::Es256);
        let token = store.active().sign("secevent+jwt", &Map::new()).expect("sign");
        store.rotate(None).expect("rotate");
        // Tokens signed before a rotation still verify afterwards.
        caep_schemas::jose::verify(&token, &store.jwks(), "secevent+jwt").expect("verify");
    }

    #[test]
    fn damaged_stores_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kid = open(dir.path(), Algorithm::Es256).active().kid().to_owned();
        let keys_dir = dir.path().join("keys");
        let ring_path = keys_dir.join(KEYRING_FILE);
        let good_ring = fs::read_to_string(&ring_path).expect("read");

        let mut ring: Vec<Value> = serde_json::from_str(&good_ring).expect("json");
        ring[0]["kid"] = Value::from("../../etc/passwd");
        fs::write(&ring_path, serde_json::to_vec(&ring).expect("json")).expect("write");
        assert!(matches!(KeyStore::open(dir.path(), Algorithm::Es256), Err(KeyError::Corrupt(_))));

        fs::write(&ring_path, b"not json").expect("write");
        assert!(matches!(KeyStore::open(dir.path(), Algorithm::Es256), Err(KeyError::Corrupt(_))));

        let mut ring: Vec<Value> = serde_json::from_str(&good_ring).expect("json");
        ring[0]["state"] = Value::from("published");
        fs::write(&ring_path, serde_json::to_vec(&ring).expect("json")).expect("write");
        assert!(matches!(KeyStore::open(dir.path(), Algorithm::Es256), Err(KeyError::Corrupt(_))));

        // A key file holding some other key.
        fs::write(&ring_path, &good_ring).expect("write");
        let other = SigningKey::generate(Algorithm::Es256).expect("generate");
        let key_file = keys_dir.join(key_file_name(&kid));
        fs::write(&key_file, other.to_private_jwk_json()).expect("write");
        let err = KeyStore::open(dir.path(), Algorithm::Es256).expect_err("foreign key");
        assert!(matches!(err, KeyError::Corrupt(_)));
        assert!(!err.to_string().contains(other.to_private_jwk_json().as_str()));

        // A missing key file.
        fs::remove_file(&key_file).expect("remove");
        assert!(matches!(KeyStore::open(dir.path(), Algorithm::Es256), Err(KeyError::Io { .. })));
    }
}
