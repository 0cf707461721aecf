//! The repository: config, keys, snapshots, leases, verify, forget, GC.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::backend::{ChunkBackend, Location, LockMode, ObjectInfo, ObjectLock, PutOutcome};
use crate::crypto::{self, EncryptionConfig, KeySource};
use crate::error::{RepoError, Result};
use crate::format::{Codec, Digest, FixedIndex, ZERO_DIGEST, chunk_key};
use crate::manifest::{Manifest, SnapshotSummary};
use crate::progress::{QuietProgress, RepoProgress};

/// Default chunk size (4 MiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
pub(crate) const CONFIG_KEY: &str = "config";
const CONFIG_FORMAT: &str = "virtkeep-repo";
/// The repository format this build writes (docs/format.md); it reads 1 to 3.
pub const FORMAT_VERSION: u32 = 2;
/// The format of a repository with S3 Object Lock: v2 plus the `object_lock` section.
/// Only locked repositories are written as v3, so builds that know nothing of the lock
/// refuse them (they would write without retention) and still open all others.
pub const LOCKED_FORMAT_VERSION: u32 = 3;
/// Longest Object Lock retention `repo init` accepts (10 years).
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86400);
pub(crate) const GC_LOCK: &str = "locks/gc";
pub(crate) const LEASE_PREFIX: &str = "locks/backup-";

/// Options for [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size, a power of two between 64 KiB and 16 MiB (default 4 MiB).
    pub chunk_size: u64,
    /// zstd level; 0 disables compression (default 1).
    pub zstd_level: i32,
    /// `Some` = encrypted repository.
    pub encryption: Option<KeySource>,
    /// Minimum GC grace period; also how recent an existing chunk must be for a backup to
    /// reuse it without re-uploading it (default 1 h). See docs/format.md.
    pub min_gc_grace: Duration,
    /// Unencrypted repositories: the key file that authenticates manifests and indexes,
    /// kept on the node, never in the repository (created when it does not exist).
    /// Required when `encryption` is `None`.
    pub auth_key_file: Option<PathBuf>,
    /// Format to write: [`FORMAT_VERSION`]; 1 only to build an old repository in tests.
    /// [`LOCKED_FORMAT_VERSION`] whatever this says when `object_lock` is set.
    pub format_version: u32,
    /// S3 Object Lock: per-object retention of chunks, indexes and manifests.
    pub object_lock: Option<ObjectLock>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
            encryption: None,
            min_gc_grace: Duration::from_secs(3600),
            auth_key_file: None,
            format_version: FORMAT_VERSION,
            object_lock: None,
        }
    }
}

/// The `config` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConfigFile {
    pub format: String,
    pub version: u32,
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    pub chunk_size: u64,
    pub zstd_level: i32,
    pub digest: String,
    pub min_gc_grace_secs: u64,
    /// hex; only in unencrypted repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
    /// Unencrypted format v2: which key file authenticates the metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthKeyConfig>,
    /// Format v3: S3 Object Lock retention of chunks, indexes and manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLockConfig>,
    /// hex keyed-BLAKE3 over the immutable fields; in encrypted repositories and in
    /// unencrypted ones of format v2 and v3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The `auth` section of an unencrypted v2 config: `{"type": "key-file", "fingerprint"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct AuthKeyConfig {
    #[serde(rename = "type")]
    pub kind: String,
    /// hex, first 8 bytes of `derive_key("virtkeep key fingerprint v1", key)`.
    pub fingerprint: String,
}

/// The `object_lock` section of a v3 config: `{"mode": "GOVERNANCE", "retain_secs"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ObjectLockConfig {
    pub mode: String,
    pub retain_secs: u64,
}

impl ObjectLockConfig {
    fn lock(&self) -> Result<ObjectLock> {
        let mode = LockMode::parse(&self.mode).ok_or_else(|| RepoError::UnsupportedFormat {
            object: CONFIG_KEY.into(),
            reason: format!("object lock mode {:?}", self.mode),
        })?;
        Ok(ObjectLock {
            mode,
            retain: Duration::from_secs(self.retain_secs),
        })
    }
}

impl ConfigFile {
    /// The repository's Object Lock, checked against its version.
    fn object_lock(&self) -> Result<Option<ObjectLock>> {
        match (&self.object_lock, self.version >= LOCKED_FORMAT_VERSION) {
            (Some(l), true) => l.lock().map(Some),
            (None, false) => Ok(None),
            _ => Err(RepoError::UnsupportedFormat {
                object: CONFIG_KEY.into(),
                reason: format!(
                    "format v{} {} an object_lock section",
                    self.version,
                    if self.object_lock.is_some() {
                        "with"
                    } else {
                        "without"
                    }
                ),
            }),
        }
    }

    fn mac_input(&self) -> String {
        let v1 = format!(
            "{}\0{}\0{}\0{}\0{}\0{}",
            self.id,
            self.created.unix_timestamp(),
            self.chunk_size,
            self.zstd_level,
            self.digest,
            self.min_gc_grace_secs
        );
        if self.version < 2 {
            return format!("virtkeep config v1\0{v1}");
        }
        // v2 also binds the id key, the cipher and KDF parameters and the auth key's
        // fingerprint: nothing in the config can be changed without the key.
        let v2 = format!(
            "virtkeep config v2\0{v1}\0{}\0{}\0{}",
            self.id_key.as_deref().unwrap_or(""),
            self.encryption
                .as_ref()
                .map(crypto::kdf_binding)
                .unwrap_or_default(),
            self.auth
                .as_ref()
                .map(|a| a.fingerprint.as_str())
                .unwrap_or("")
        );
        if self.version < LOCKED_FORMAT_VERSION {
            return v2;
        }
        // v3 binds the lock too: removing or shortening it needs the key.
        let (mode, secs) = self
            .object_lock
            .as_ref()
            .map(|l| (l.mode.as_str(), l.retain_secs))
            .unwrap_or(("", 0));
        format!("virtkeep config v3\0{v2}\0{mode}\0{secs}")
    }

    /// The config MAC under `mac_key`.
    pub(crate) fn compute_mac(&self, mac_key: &[u8; 32]) -> String {
        blake3::keyed_hash(mac_key, self.mac_input().as_bytes())
            .to_hex()
            .to_string()
    }

    /// Checks the stored MAC (constant time).
    fn check_mac(&self, mac_key: &[u8; 32]) -> Result<()> {
        let want = blake3::keyed_hash(mac_key, self.mac_input().as_bytes());
        let got = self
            .mac
            .as_deref()
            .and_then(|h| blake3::Hash::from_hex(h).ok());
        if got != Some(want) {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                "config authentication failed (modified outside virtkeep: restore it from a \
                 copy; `virtkeep repo key export` writes one)",
            ));
        }
        Ok(())
    }
}

/// The config MAC key of an unencrypted v2 repository, from its authentication key.
pub(crate) fn auth_config_mac_key(auth_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("virtkeep 2026 config mac key v2", auth_key)
}

/// The secrets an open repository holds (never stored in it).
#[derive(Default, Clone)]
pub(crate) struct Keys {
    /// Encrypted: the master key and the key-encryption key that wraps it.
    pub master: Option<[u8; 32]>,
    pub kek: Option<[u8; 32]>,
    /// Unencrypted v2: the authentication key, and the file it came from.
    pub auth_key: Option<[u8; 32]>,
    pub key_file: Option<PathBuf>,
}

/// Lease timing (how often a running backup/GC refreshes its lease, when a lease counts as
/// stale).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// Refresh interval (default 60 s).
    pub refresh: Duration,
    /// A lease not refreshed for this long is ignored (default 15 min).
    pub stale_after: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            refresh: Duration::from_secs(60),
            stale_after: Duration::from_secs(900),
        }
    }
}

/// Lease object content (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseFile {
    pub kind: String,
    pub lease: String,
    #[serde(default)]
    pub snapshot: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub vm: String,
    pub pid: u32,
    /// Start in the storage clock (ms since the epoch).
    pub started_ms: u64,
    /// Snapshots this writer reuses chunks from (forget/prune refuse them).
    #[serde(default)]
    pub pins: Vec<String>,
}

pub(crate) struct RepoInner {
    pub backend: Arc<dyn ChunkBackend>,
    pub location: Location,
    pub config: ConfigFile,
    pub codec: Arc<Codec>,
    pub master: Option<[u8; 32]>,
    pub keys: Keys,
    pub timing: std::sync::Mutex<LeaseTiming>,
    pub workers: std::sync::atomic::AtomicUsize,
    pub warnings: Vec<String>,
}

/// An open repository. Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<RepoInner>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.location.to_string())
            .field("id", &self.inner.config.id)
            .field("encrypted", &self.inner.master.is_some())
            .finish()
    }
}

pub(crate) fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn from_ms(m: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(m)
}

/// Check a user-supplied name used inside object keys.
pub(crate) fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::InvalidArgument(format!(
            "{what} {s:?} must be 1-128 chars of [A-Za-z0-9._-] not starting with '.'"
        )))
    }
}

pub(crate) fn manifest_key(id: &str) -> String {
    format!("snapshots/{id}/manifest")
}
pub(crate) fn index_key(id: &str, disk: &str) -> String {
    format!("snapshots/{id}/{disk}.fidx")
}
fn protected_key(id: &str) -> String {
    format!("snapshots/{id}/protected")
}

pub(crate) fn parse_chunk_key(key: &str) -> Option<Digest> {
    let name = key.rsplit('/').next()?;
    let v = hex::decode(name).ok()?;
    v.try_into().ok()
}

impl Repository {
    /// Create a new repository at `location` (fails if one exists).
    pub async fn init(location: Location, opts: InitOptions) -> Result<Repository> {
        Self::init_inner(location, opts, None).await
    }

    /// [`Repository::init`] with the chunk-id key and the encryption key of `source`
    /// (`repo init --copy-keys-from`): chunk digests and blobs agree, so a sync between
    /// the two copies chunks as they are stored. Both must be encrypted or both not, with
    /// the same chunk size; the new repository has its own password or key file.
    pub async fn init_with_keys_of(
        location: Location,
        opts: InitOptions,
        source: &Repository,
    ) -> Result<Repository> {
        if opts.encryption.is_some() != source.is_encrypted() {
            return Err(RepoError::InvalidArgument(if source.is_encrypted() {
                format!(
                    "{} is encrypted: a repository sharing its keys must be encrypted too",
                    source.location()
                )
            } else {
                format!(
                    "{} is not encrypted: a repository sharing its keys cannot be encrypted",
                    source.location()
                )
            }));
        }
        if opts.chunk_size != source.chunk_size() {
            return Err(RepoError::InvalidArgument(format!(
                "{} has {} byte chunks: a repository sharing its keys must use the same size",
                source.location(),
                source.chunk_size()
            )));
        }
        Self::init_inner(location, opts, Some(source)).await
    }

    async fn init_inner(
        location: Location,
        opts: InitOptions,
        source: Option<&Repository>,
    ) -> Result<Repository> {
        check_init_options(&opts)?;
        let backend = location.backend()?;
        if opts.object_lock.is_some() {
            // Before anything is written: the bucket may have to be created for it.
            backend.prepare_object_lock().await?;
        }
        if backend.head(CONFIG_KEY).await?.is_some() {
            return Err(RepoError::AlreadyExists(location.to_string()));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let mut cfg = ConfigFile {
            format: CONFIG_FORMAT.into(),
            version: if opts.object_lock.is_some() {
                LOCKED_FORMAT_VERSION
            } else {
                opts.format_version
            },
            id: id.clone(),
            created: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            chunk_size: opts.chunk_size,
            zstd_level: opts.zstd_level,
            digest: "blake3-keyed".into(),
            min_gc_grace_secs: opts.min_gc_grace.as_secs(),
            id_key: None,
            encryption: None,
            auth: None,
            object_lock: opts.object_lock.map(|l| ObjectLockConfig {
                mode: l.mode.as_s3().into(),
                retain_secs: l.retain.as_secs(),
            }),
            mac: None,
        };
        let keys = match &opts.encryption {
            Some(src) => {
                let master = match source.and_then(|r| r.inner.master) {
                    Some(m) => m,
                    None => crypto::random::<32>()?,
                };
                let src = src.clone();
                let (kek, kdf) =
                    tokio::task::spawn_blocking(move || crypto::new_kek(&src)).await??;
                cfg.set_wrapped(&kek, &master, kdf)?;
                Keys {
                    master: Some(master),
                    kek: Some(kek),
                    ..Keys::default()
                }
            }
            None => {
                let id_key = match source {
                    Some(r) => r.inner.codec.id_key,
                    None => crypto::random::<32>()?,
                };
                cfg.id_key = Some(hex::encode(id_key));
                match (&opts.auth_key_file, cfg.version) {
                    (_, 1) => Keys::default(),
                    (Some(path), _) => {
                        let key = read_key_blocking(path.clone(), true).await?;
                        cfg.set_auth(&key);
                        Keys {
                            auth_key: Some(key),
                            key_file: Some(path.clone()),
                            ..Keys::default()
                        }
                    }
                    (None, _) => {
                        return Err(RepoError::InvalidArgument(
                            "an unencrypted repository needs a key file that authenticates \
                             its metadata"
                                .into(),
                        ));
                    }
                }
            }
        };
        let data = serde_json::to_vec_pretty(&cfg).map_err(|e| RepoError::json(CONFIG_KEY, e))?;
        // Object Lock: the config (the keys of everything else) is written retained too.
        let writer = match opts.object_lock {
            Some(lock) => backend.clone().with_object_lock(lock)?,
            None => backend.clone(),
        };
        if writer.put_if_absent(CONFIG_KEY, Bytes::from(data)).await? == PutOutcome::Existed {
            return Err(RepoError::AlreadyExists(location.to_string()));
        }
        Self::build(backend, location, cfg, keys)
    }

    pub(crate) fn build(
        backend: Arc<dyn ChunkBackend>,
        location: Location,
        config: ConfigFile,
        keys: Keys,
    ) -> Result<Repository> {
        let codec = make_codec(&config, &keys)?;
        let backend = match config.object_lock()? {
            Some(lock) => backend.with_object_lock(lock)?,
            None => backend,
        };
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(Repository {
            inner: Arc::new(RepoInner {
                backend,
                location,
                config,
                codec: Arc::new(codec),
                master: keys.master,
                keys,
                timing: std::sync::Mutex::new(LeaseTiming::default()),
                workers: std::sync::atomic::AtomicUsize::new(workers),
                warnings: Vec::new(),
            }),
        })
    }

    /// Open an existing repository. Encrypted: `key` unlocks it (a wrong one is
    /// [`RepoError::WrongKey`] and nothing is written). Unencrypted format v2: `key` is
    /// the key file that authenticates its metadata ([`RepoError::AuthKeyRequired`]
    /// without it). Format v1 opens with a warning (`virtkeep repo upgrade`).
    pub async fn open(location: Location, key: Option<KeySource>) -> Result<Repository> {
        Self::open_inner(location, key, false).await
    }

    /// [`Repository::open`] for `repo upgrade`: an unencrypted v1 repository opens even
    /// when a key file is given (the one the upgrade will use).
    pub async fn open_for_upgrade(
        location: Location,
        key: Option<KeySource>,
    ) -> Result<Repository> {
        Self::open_inner(location, key, true).await
    }

    async fn open_inner(
        location: Location,
        key: Option<KeySource>,
        upgrading: bool,
    ) -> Result<Repository> {
        let backend = location.backend()?;
        let loc = location.to_string();
        let raw = backend
            .get(CONFIG_KEY)
            .await?
            .ok_or_else(|| RepoError::NotARepository(loc.clone()))?;
        let cfg: ConfigFile =
            serde_json::from_slice(&raw).map_err(|e| RepoError::json(CONFIG_KEY, e))?;
        if cfg.format != CONFIG_FORMAT || !(1..=LOCKED_FORMAT_VERSION).contains(&cfg.version) {
            return Err(RepoError::UnsupportedFormat {
                object: CONFIG_KEY.into(),
                reason: format!("{} v{}", cfg.format, cfg.version),
            });
        }
        let keys = match &cfg.encryption {
            Some(enc) => unlock_encrypted(&cfg, enc, key, &loc).await?,
            None => unlock_plain(&cfg, key, &loc, upgrading).await?,
        };
        let mut warnings: Vec<String> = location.access_warning().into_iter().collect();
        if cfg.version < FORMAT_VERSION {
            warnings.push(format!(
                "repository {loc} has format v{}: {}; run `virtkeep repo upgrade`",
                cfg.version,
                if cfg.encryption.is_some() {
                    "its key derivation parameters are not authenticated"
                } else {
                    "its manifests and indexes are not authenticated (anyone who can write \
                     to it can change what a restore writes where)"
                }
            ));
        }
        let mut repo = Self::build(backend, location, cfg, keys)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        if let Some(inner) = Arc::get_mut(&mut repo.inner) {
            inner.warnings = warnings;
        }
        Ok(repo)
    }

    /// Warnings found at `open` (a repository other users can read, an old format), for
    /// the caller to show; also logged.
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    /// The repository's S3 Object Lock retention (`repo init --object-lock`).
    pub fn object_lock(&self) -> Option<ObjectLock> {
        self.inner.config.object_lock().ok().flatten()
    }

    /// The format version of the repository's config.
    pub fn format_version(&self) -> u32 {
        self.inner.config.version
    }

    /// Unencrypted v2: the key file that authenticates the metadata, as opened.
    pub fn auth_key_file(&self) -> Option<&std::path::Path> {
        self.inner.keys.key_file.as_deref()
    }

    /// Re-wrap the master key with a new passphrase or key file. Rewrites only `config`.
    pub async fn change_passphrase(&self, new: KeySource) -> Result<()> {
        let master = self.inner.master.ok_or_else(|| RepoError::KeyRequired {
            location: self.inner.location.to_string(),
            message: "the repository is not encrypted".into(),
        })?;
        let (kek, kdf) = tokio::task::spawn_blocking(move || crypto::new_kek(&new)).await??;
        let mut cfg = self.inner.config.clone();
        cfg.set_wrapped(&kek, &master, kdf)?;
        self.write_config(&cfg).await
    }

    pub(crate) async fn write_config(&self, cfg: &ConfigFile) -> Result<()> {
        let data = serde_json::to_vec_pretty(cfg).map_err(|e| RepoError::json(CONFIG_KEY, e))?;
        self.inner.backend.put(CONFIG_KEY, Bytes::from(data)).await
    }

    /// The storage backend (for tools and tests).
    pub fn backend(&self) -> &Arc<dyn ChunkBackend> {
        &self.inner.backend
    }
    /// Location.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }
    /// Chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.inner.config.chunk_size
    }
    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.master.is_some()
    }
    /// Repository id.
    pub fn id(&self) -> &str {
        &self.inner.config.id
    }
    /// Override lease timing (tests, or tuning for slow object stores).
    pub fn set_lease_timing(&self, t: LeaseTiming) {
        if let Ok(mut g) = self.inner.timing.lock() {
            *g = t;
        }
    }
    /// CPU parallelism for hashing/compression/encryption (default: available cores).
    /// A disk writer keeps at most `2 × n + 2` chunks in flight.
    pub fn set_parallelism(&self, n: usize) {
        self.inner
            .workers
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }
    /// Current CPU parallelism.
    pub fn parallelism(&self) -> usize {
        self.inner
            .workers
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    pub(crate) fn timing(&self) -> LeaseTiming {
        self.inner.timing.lock().map(|g| *g).unwrap_or_default()
    }
    pub(crate) fn min_grace(&self) -> Duration {
        Duration::from_secs(self.inner.config.min_gc_grace_secs)
    }

    // -- metadata objects ---------------------------------------------------------------

    pub(crate) async fn put_meta(&self, key: &str, payload: Vec<u8>, create: bool) -> Result<()> {
        let codec = self.inner.codec.clone();
        let k = key.to_string();
        let blob = tokio::task::spawn_blocking(move || codec.encode_meta(&k, &payload)).await??;
        if create {
            match self
                .inner
                .backend
                .put_if_absent(key, Bytes::from(blob))
                .await?
            {
                PutOutcome::Created => Ok(()),
                PutOutcome::Existed => Err(RepoError::backend(key, "object already exists")),
            }
        } else {
            self.inner.backend.put(key, Bytes::from(blob)).await
        }
    }

    pub(crate) async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(b) = self.inner.backend.get(key).await? else {
            return Ok(None);
        };
        let codec = self.inner.codec.clone();
        let k = key.to_string();
        Ok(Some(
            tokio::task::spawn_blocking(move || codec.decode_meta(&k, b)).await??,
        ))
    }

    /// The manifest of backup `id` (with the live protected flag).
    pub async fn manifest(&self, id: &str) -> Result<Manifest> {
        let mut m = self.read_manifest(id).await?;
        m.protected = self.inner.backend.head(&protected_key(id)).await?.is_some();
        Ok(m)
    }

    /// The fixed index of one disk of a backup.
    pub async fn fixed_index(&self, id: &str, disk: &str) -> Result<FixedIndex> {
        check_name("backup id", id)?;
        check_name("disk name", disk)?;
        let key = index_key(id, disk);
        let b = self
            .get_meta(&key)
            .await?
            .ok_or_else(|| RepoError::DiskNotFound {
                id: id.into(),
                disk: disk.into(),
            })?;
        let mut ix = FixedIndex::decode(&key, &b)?;
        ix.snapshot = Some(id.into());
        Ok(ix)
    }

    pub(crate) async fn snapshot_ids(&self) -> Result<(Vec<String>, HashSet<String>)> {
        let mut ids = Vec::new();
        let mut protected = HashSet::new();
        let mut s = self.inner.backend.list("snapshots/");
        while let Some(o) = s.try_next().await? {
            let mut parts = o.key.split('/');
            if let (Some("snapshots"), Some(id), Some(leaf), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                match leaf {
                    "manifest" => ids.push(id.to_string()),
                    "protected" => {
                        protected.insert(id.to_string());
                    }
                    _ => {}
                }
            }
        }
        Ok((ids, protected))
    }

    /// All published backups whose manifest can be read, oldest first. Unreadable
    /// manifests are left out and logged; [`Repository::list_snapshots`] names them.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotSummary>> {
        let listing = self.list_snapshots().await?;
        log_unreadable(&listing.unreadable);
        Ok(listing.snapshots)
    }

    /// All published backups, oldest first, and the backups whose manifest cannot be
    /// read (one corrupt manifest must not hide every other backup).
    pub async fn list_snapshots(&self) -> Result<SnapshotListing> {
        let (manifests, unreadable) = self.manifests_checked().await?;
        Ok(SnapshotListing {
            snapshots: manifests.iter().map(summary).collect(),
            unreadable,
        })
    }

    /// All manifests that can be read, oldest first (unreadable ones are logged and left
    /// out; see [`Repository::list_snapshots`]).
    pub async fn manifests(&self) -> Result<Vec<Manifest>> {
        let (manifests, unreadable) = self.manifests_checked().await?;
        log_unreadable(&unreadable);
        Ok(manifests)
    }

    /// Every readable manifest (oldest first) and every unreadable one. A manifest
    /// forgotten while this runs is in neither list.
    pub async fn manifests_checked(&self) -> Result<(Vec<Manifest>, Vec<UnreadableManifest>)> {
        let (ids, protected) = self.snapshot_ids().await?;
        let results: Vec<(String, Result<Manifest>)> = futures::stream::iter(ids)
            .map(|id| async move {
                let m = self.read_manifest(&id).await;
                (id, m)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for (id, res) in results {
            match res {
                Ok(mut m) => {
                    m.protected = protected.contains(&m.id);
                    out.push(m);
                }
                Err(RepoError::SnapshotNotFound(_)) => {}
                // The storage itself failing is not one bad manifest: fail the listing.
                Err(
                    e @ (RepoError::Backend { .. } | RepoError::Io { .. } | RepoError::Task(_)),
                ) => {
                    return Err(e);
                }
                Err(e) => unreadable.push(UnreadableManifest {
                    id,
                    error: e.to_string(),
                }),
            }
        }
        out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
        unreadable.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, unreadable))
    }

    /// Reads and checks one manifest (without the live protected flag).
    async fn read_manifest(&self, id: &str) -> Result<Manifest> {
        check_name("backup id", id)?;
        let key = manifest_key(id);
        let b = self
            .get_meta(&key)
            .await?
            .ok_or_else(|| RepoError::SnapshotNotFound(id.into()))?;
        let m: Manifest = serde_json::from_slice(&b).map_err(|e| RepoError::json(&key, e))?;
        if m.id != id {
            return Err(RepoError::corrupt(
                key,
                format!("manifest names backup {}", m.id),
            ));
        }
        Ok(m)
    }

    /// Set or clear the protected flag.
    pub async fn set_protected(&self, id: &str, on: bool) -> Result<()> {
        self.manifest(id).await?;
        if on {
            self.inner
                .backend
                .put(&protected_key(id), Bytes::from_static(b"1"))
                .await
        } else {
            self.inner.backend.delete(&protected_key(id)).await
        }
    }

    /// Remove a backup (manifest first, so it disappears atomically; then its indexes).
    /// Chunks are freed by a later GC. Refuses protected backups and backups a running
    /// backup reuses chunks from. Works on a backup whose manifest cannot be read, and
    /// deletes only keys under `snapshots/<id>/` that it lists itself, never a key a
    /// manifest names (a crafted manifest could name `config`).
    pub async fn forget(&self, id: &str) -> Result<()> {
        check_name("backup id", id)?;
        let be = &self.inner.backend;
        if be.head(&manifest_key(id)).await?.is_none() {
            return Err(RepoError::SnapshotNotFound(id.into()));
        }
        if be.head(&protected_key(id)).await?.is_some() {
            return Err(RepoError::Protected(id.into()));
        }
        let now = self.storage_now().await?;
        for (lease, l) in self.live_leases(now).await? {
            if l.pins.iter().any(|p| p == id) {
                return Err(RepoError::InUse {
                    id: id.into(),
                    lease,
                });
            }
        }
        be.delete(&manifest_key(id)).await?;
        let prefix = format!("snapshots/{id}/");
        let objs: Vec<ObjectInfo> = be.list(&prefix).try_collect().await?;
        for o in objs {
            let leaf = o.key.strip_prefix(&prefix).unwrap_or_default();
            if leaf.ends_with(".fidx") && !leaf.contains('/') {
                be.delete(&o.key).await?;
            }
        }
        Ok(())
    }

    // -- leases -------------------------------------------------------------------------

    /// Current time in the storage's clock (write, stat and delete a probe object).
    pub(crate) async fn storage_now(&self) -> Result<SystemTime> {
        let key = format!("locks/clock-{}", uuid::Uuid::new_v4().simple());
        self.inner
            .backend
            .put(&key, Bytes::from_static(b""))
            .await?;
        let h = self.inner.backend.head(&key).await?;
        self.inner.backend.delete(&key).await?;
        h.map(|h| h.modified)
            .ok_or_else(|| RepoError::backend(key, "probe object vanished"))
    }

    /// Live backup leases (refreshed within `stale_after` of `now`).
    pub(crate) async fn live_leases(&self, now: SystemTime) -> Result<Vec<(String, LeaseFile)>> {
        let stale = self.timing().stale_after;
        let infos: Vec<_> = self.inner.backend.list("locks/").try_collect().await?;
        let mut out = Vec::new();
        for o in infos {
            if !o.key.starts_with(LEASE_PREFIX) {
                continue;
            }
            if o.modified + stale < now {
                continue; // stale: ignored
            }
            let Some(b) = self.inner.backend.get(&o.key).await? else {
                continue;
            };
            let l: LeaseFile =
                serde_json::from_slice(&b).map_err(|e| RepoError::json(&o.key, e))?;
            out.push((o.key.clone(), l));
        }
        Ok(out)
    }

    /// Fetch and decode one chunk by digest (all-zero digest → `None` is not allowed here).
    pub async fn read_chunk_by_digest(&self, d: &Digest) -> Result<Bytes> {
        let key = chunk_key(d);
        let blob = self
            .inner
            .backend
            .get(&key)
            .await?
            .ok_or_else(|| RepoError::ChunkMissing {
                digest: hex::encode(d),
            })?;
        let codec = self.inner.codec.clone();
        let d = *d;
        tokio::task::spawn_blocking(move || codec.decode_chunk(&d, blob)).await?
    }

    // -- GC -------------------------------------------------------------------------------

    /// Mark and sweep. See docs/format.md for the rules.
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        self.gc_reporting(opts, &QuietProgress).await
    }

    /// [`Repository::gc`], reporting its stages (mark, sweep) to `progress`.
    pub async fn gc_reporting(
        &self,
        opts: GcOptions,
        progress: &dyn RepoProgress,
    ) -> Result<GcReport> {
        let be = self.inner.backend.clone();
        let timing = self.timing();
        let lease_id = uuid::Uuid::new_v4().to_string();
        // 1. exclusive GC lease
        if let Some(h) = be.head(GC_LOCK).await? {
            let now = self.storage_now().await?;
            let age = now.duration_since(h.modified).unwrap_or_default();
            if age < timing.stale_after {
                return Err(RepoError::GcRunning {
                    lease: GC_LOCK.into(),
                    age_secs: age.as_secs(),
                });
            }
            be.delete(GC_LOCK).await?;
        }
        let body = serde_json::to_vec(&LeaseFile {
            kind: "gc".into(),
            lease: lease_id.clone(),
            snapshot: String::new(),
            host: String::new(),
            vm: String::new(),
            pid: std::process::id(),
            started_ms: 0,
            pins: vec![],
        })
        .map_err(|e| RepoError::json(GC_LOCK, e))?;
        let body = Bytes::from(body);
        if be.put_if_absent(GC_LOCK, body.clone()).await? == PutOutcome::Existed {
            return Err(RepoError::GcRunning {
                lease: GC_LOCK.into(),
                age_secs: 0,
            });
        }
        // Guard against stores that ignore create-only puts: the lock must be ours.
        if be.get(GC_LOCK).await?.as_deref() != Some(&body[..]) {
            return Err(RepoError::GcRunning {
                lease: GC_LOCK.into(),
                age_secs: 0,
            });
        }
        let refresher = {
            let be = be.clone();
            let body = body.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(timing.refresh).await;
                    let _ = be.put(GC_LOCK, body.clone()).await;
                }
            })
        };
        let res = self.gc_locked(&opts, progress).await;
        refresher.abort();
        let _ = refresher.await;
        if be.get(GC_LOCK).await?.as_deref() == Some(&body[..]) {
            be.delete(GC_LOCK).await?;
        }
        res
    }

    /// GC's mark phase: the chunks and index objects of every published backup. An
    /// unreadable manifest or index stops GC (its chunks would be swept).
    async fn gc_mark(
        &self,
        report: &mut GcReport,
        progress: &dyn RepoProgress,
    ) -> Result<(HashSet<Digest>, HashSet<String>)> {
        let mut marked: HashSet<Digest> = HashSet::new();
        let mut index_keys: HashSet<String> = HashSet::new();
        let (manifests, unreadable) = self.manifests_checked().await?;
        if let Some(u) = unreadable.into_iter().next() {
            return Err(RepoError::UnreadableBackup {
                id: u.id,
                reason: u.error,
            });
        }
        progress.stage("reading indexes", Some(manifests.len() as u64));
        for m in manifests {
            report.snapshots += 1;
            for d in &m.disks {
                let ix = self.fixed_index(&m.id, &d.spec.name).await.map_err(|e| {
                    RepoError::UnreadableBackup {
                        id: m.id.clone(),
                        reason: e.to_string(),
                    }
                })?;
                index_keys.insert(index_key(&m.id, &d.spec.name));
                marked.extend(ix.digests.iter().filter(|d| **d != ZERO_DIGEST));
            }
            let unreadable = |e: RepoError| RepoError::UnreadableBackup {
                id: m.id.clone(),
                reason: e.to_string(),
            };
            if let Some(ix) = self.nvram_index(&m).await.map_err(unreadable)? {
                index_keys.insert(
                    m.nvram
                        .as_ref()
                        .map(|n| n.index.clone())
                        .unwrap_or_default(),
                );
                marked.extend(ix.digests.iter().filter(|d| **d != ZERO_DIGEST));
            }
            progress.advance(1);
        }
        report.chunks_referenced = marked.len() as u64;
        Ok((marked, index_keys))
    }

    async fn gc_locked(&self, opts: &GcOptions, progress: &dyn RepoProgress) -> Result<GcReport> {
        let be = &self.inner.backend;
        let gc_start = be
            .head(GC_LOCK)
            .await?
            .map(|h| h.modified)
            .ok_or_else(|| RepoError::backend(GC_LOCK, "GC lease vanished"))?;
        let grace = opts.grace.max(self.min_grace());
        // 2. leases → cutoff
        let leases = self.live_leases(gc_start).await?;
        let oldest = leases
            .iter()
            .map(|(_, l)| from_ms(l.started_ms))
            .min()
            .unwrap_or(gc_start)
            .min(gc_start);
        let cutoff = oldest.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut report = GcReport {
            dry_run: opts.dry_run,
            live_leases: leases.len() as u64,
            ..Default::default()
        };
        // 3. mark: every published backup's indexes
        let (marked, index_keys) = self.gc_mark(&mut report, progress).await?;
        // orphan index objects (crashed backups): remove when older than the cutoff
        let objs: Vec<_> = be.list("snapshots/").try_collect().await?;
        for o in objs {
            if o.key.ends_with(".fidx") && !index_keys.contains(&o.key) && o.modified < cutoff {
                if !opts.dry_run && !delete_unless_retained(be, &o.key, &mut report).await? {
                    continue;
                }
                report.orphan_indexes_removed += 1;
            }
        }
        // temp files of writes that died half-way (fs backend): older than the cutoff,
        // no write that is still running can own them
        let temps: Vec<_> = be.list_temp("").try_collect().await?;
        for o in temps {
            if o.modified < cutoff {
                report.temp_removed += 1;
                if !opts.dry_run {
                    be.delete(&o.key).await?;
                }
            }
        }
        // 4. sweep
        progress.stage("sweeping chunks", None);
        let mut s = be.list("chunks/");
        while let Some(o) = s.try_next().await? {
            progress.advance(1);
            let Some(d) = parse_chunk_key(&o.key) else {
                continue;
            };
            if marked.contains(&d) {
                report.chunks_kept += 1;
                report.bytes_kept += o.size;
                continue;
            }
            if o.modified >= cutoff {
                report.chunks_too_recent += 1;
                report.bytes_kept += o.size;
                continue;
            }
            if !opts.dry_run {
                // re-check: a backup may have refreshed it since the listing
                match be.head(&o.key).await? {
                    Some(h) if h.modified < cutoff => {
                        if !delete_unless_retained(be, &o.key, &mut report).await? {
                            continue;
                        }
                    }
                    Some(_) => {
                        report.chunks_too_recent += 1;
                        continue;
                    }
                    None => continue,
                }
            }
            report.chunks_removed += 1;
            report.bytes_freed += o.size;
        }
        Ok(report)
    }
}

/// Delete `key` unless Object Lock retention still holds it (counted, not an error:
/// a later GC removes it). `false`: kept.
async fn delete_unless_retained(
    be: &Arc<dyn ChunkBackend>,
    key: &str,
    report: &mut GcReport,
) -> Result<bool> {
    match be.delete(key).await {
        Ok(()) => Ok(true),
        Err(RepoError::Retained { .. }) => {
            report.objects_retained += 1;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn check_init_options(opts: &InitOptions) -> Result<()> {
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(64 << 10..=16 << 20).contains(&cs) {
        return Err(RepoError::InvalidArgument(format!(
            "chunk size {cs} must be a power of two between 64 KiB and 16 MiB"
        )));
    }
    if !(-7..=22).contains(&opts.zstd_level) {
        return Err(RepoError::InvalidArgument(format!(
            "zstd level {} out of range",
            opts.zstd_level
        )));
    }
    if let Some(l) = &opts.object_lock
        && (l.retain < opts.min_gc_grace || l.retain > MAX_RETENTION)
    {
        return Err(RepoError::InvalidArgument(format!(
            "object lock retention {} s must be between the GC grace period ({} s) and \
             {} days: a chunk a backup reuses is retained at least that long from the \
             backup's start minus the grace period",
            l.retain.as_secs(),
            opts.min_gc_grace.as_secs(),
            MAX_RETENTION.as_secs() / 86400
        )));
    }
    if !(1..=FORMAT_VERSION).contains(&opts.format_version) {
        return Err(RepoError::InvalidArgument(format!(
            "format version {} is not 1..={FORMAT_VERSION}",
            opts.format_version
        )));
    }
    Ok(())
}

impl ConfigFile {
    /// Wrap `master` under `kek` with the config's format, and (re)compute the MAC.
    pub(crate) fn set_wrapped(
        &mut self,
        kek: &[u8; 32],
        master: &[u8; 32],
        kdf: crypto::Kdf,
    ) -> Result<()> {
        let mut enc = EncryptionConfig {
            cipher: "aes-256-gcm".into(),
            kdf,
            wrapped_key: String::new(),
        };
        let binding = (self.version >= 2).then(|| crypto::kdf_binding(&enc));
        enc.wrapped_key = crypto::wrap(kek, master, &self.id, binding.as_deref())?;
        self.encryption = Some(enc);
        self.mac = Some(self.compute_mac(&crypto::subkeys(master).mac_key));
        Ok(())
    }

    /// Name the authentication key of an unencrypted v2 repository and MAC the config.
    pub(crate) fn set_auth(&mut self, auth_key: &[u8; 32]) {
        self.auth = Some(AuthKeyConfig {
            kind: "key-file".into(),
            fingerprint: crypto::fingerprint(auth_key),
        });
        self.mac = Some(self.compute_mac(&auth_config_mac_key(auth_key)));
    }
}

pub(crate) async fn read_key_blocking(path: PathBuf, create: bool) -> Result<[u8; 32]> {
    tokio::task::spawn_blocking(move || crypto::read_key_file(&path, create)).await?
}

pub(crate) fn make_codec(config: &ConfigFile, keys: &Keys) -> Result<Codec> {
    let (id_key, aead) = match &keys.master {
        Some(m) => {
            let sk = crypto::subkeys(m);
            (sk.id_key, Some(crypto::aead_key(&sk.enc_key)?))
        }
        None => {
            let hx = config
                .id_key
                .as_deref()
                .ok_or_else(|| RepoError::corrupt(CONFIG_KEY, "missing id_key"))?;
            let k: [u8; 32] = hex::decode(hx)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| RepoError::corrupt(CONFIG_KEY, "bad id_key"))?;
            (k, None)
        }
    };
    Ok(Codec {
        id_key,
        aead,
        zstd_level: config.zstd_level,
        chunk_size: usize::try_from(config.chunk_size)
            .map_err(|_| RepoError::corrupt(CONFIG_KEY, "chunk size"))?,
        meta_mac: keys.auth_key.as_ref().map(crate::format::meta_mac_key),
    })
}

/// Unwraps the master key of an encrypted repository and checks the config's MAC.
async fn unlock_encrypted(
    cfg: &ConfigFile,
    enc: &EncryptionConfig,
    key: Option<KeySource>,
    loc: &str,
) -> Result<Keys> {
    let Some(src) = key else {
        return Err(RepoError::KeyRequired {
            location: loc.into(),
            message: "the repository is encrypted; give its passphrase or key file".into(),
        });
    };
    let (enc, id, l, v) = (enc.clone(), cfg.id.clone(), loc.to_string(), cfg.version);
    let (master, kek) =
        tokio::task::spawn_blocking(move || crypto::unwrap_master(&src, &enc, &id, &l, v))
            .await??;
    cfg.check_mac(&crypto::subkeys(&master).mac_key)?;
    Ok(Keys {
        master: Some(master),
        kek: Some(kek),
        ..Keys::default()
    })
}

/// The authentication key of an unencrypted repository (v2), or none (v1).
async fn unlock_plain(
    cfg: &ConfigFile,
    key: Option<KeySource>,
    loc: &str,
    upgrading: bool,
) -> Result<Keys> {
    let not_encrypted = || RepoError::KeyRequired {
        location: loc.into(),
        message: "the repository is not encrypted, but a password was given (its metadata \
                  is authenticated with a key file)"
            .into(),
    };
    match (cfg.version, key) {
        (_, Some(KeySource::Passphrase(_))) => Err(not_encrypted()),
        (1, None) => Ok(Keys::default()),
        (1, Some(KeySource::KeyFile(_))) if upgrading => Ok(Keys::default()),
        (1, Some(KeySource::KeyFile(path))) => Err(RepoError::corrupt(
            CONFIG_KEY,
            format!(
                "the config says format v1 (metadata not authenticated), but this node \
                 holds the key file {} for it: the config was changed outside virtkeep \
                 (restore it from a copy) — unless a `virtkeep repo upgrade` failed just \
                 before writing it: then run that again (it refuses a repository whose \
                 metadata is already authenticated)",
                path.display()
            ),
        )),
        (_, None) => Err(RepoError::AuthKeyRequired {
            location: loc.into(),
        }),
        (_, Some(KeySource::KeyFile(path))) => {
            let key = read_key_blocking(path.clone(), false).await?;
            let want = cfg.auth.as_ref().map(|a| a.fingerprint.as_str());
            let got = crypto::fingerprint(&key);
            if want != Some(got.as_str()) {
                return Err(RepoError::WrongKey {
                    location: loc.into(),
                    hint: format!(
                        "key file {} has fingerprint {got}, the repository expects {}",
                        path.display(),
                        want.unwrap_or("none")
                    ),
                });
            }
            cfg.check_mac(&auth_config_mac_key(&key))?;
            Ok(Keys {
                auth_key: Some(key),
                key_file: Some(path),
                ..Keys::default()
            })
        }
    }
}

/// GC options.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Unreferenced chunks younger than (oldest running backup start or now) − grace
    /// are kept. Raised to the repository's `min_gc_grace`.
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600),
            dry_run: false,
        }
    }
}

/// What GC did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    /// Dry run (nothing deleted).
    pub dry_run: bool,
    /// Published backups marked.
    pub snapshots: u64,
    /// Running backups seen.
    pub live_leases: u64,
    /// Distinct referenced chunks.
    pub chunks_referenced: u64,
    /// Chunks kept because referenced.
    pub chunks_kept: u64,
    /// Unreferenced chunks kept because too recent.
    pub chunks_too_recent: u64,
    /// Chunks removed (or that would be).
    pub chunks_removed: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Bytes still stored.
    pub bytes_kept: u64,
    /// Index objects of unpublished (crashed) backups removed.
    pub orphan_indexes_removed: u64,
    /// Stale `.tmp-*` objects of interrupted writes removed.
    pub temp_removed: u64,
    /// Unreferenced chunks and orphan indexes kept because they are under S3 Object
    /// Lock retention (removed by a GC after it ends).
    pub objects_retained: u64,
}

/// A backup whose manifest cannot be read (corrupt, failing authentication, of an
/// unknown version). Listing and prune skip it and name it; GC refuses to sweep while
/// it exists; [`Repository::forget`] removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadableManifest {
    /// Backup id.
    pub id: String,
    /// Why it cannot be read.
    pub error: String,
}

/// Result of [`Repository::list_snapshots`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotListing {
    /// Readable backups, oldest first.
    pub snapshots: Vec<SnapshotSummary>,
    /// Backups whose manifest cannot be read.
    pub unreadable: Vec<UnreadableManifest>,
}

fn summary(m: &Manifest) -> SnapshotSummary {
    SnapshotSummary {
        id: m.id.clone(),
        time: m.time,
        host: m.host.clone(),
        vm: m.vm.clone(),
        mode: m.mode,
        disks: m.disks.iter().map(|d| d.spec.name.clone()).collect(),
        size: m.disks.iter().map(|d| d.spec.size).sum(),
        bytes_new: m.stats.totals.bytes_stored,
        protected: m.protected,
    }
}

pub(crate) fn log_unreadable(unreadable: &[UnreadableManifest]) {
    for u in unreadable {
        tracing::warn!(
            "backup {} is left out: its manifest cannot be read ({}); `virtkeep forget {}` removes it",
            u.id,
            u.error,
            u.id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 config (the previous format, as written by builds without Object Lock)
    /// still opens with no lock; v3 binds the lock into the MAC, and a version that does
    /// not match the presence of the section is refused.
    #[test]
    fn v2_config_opens_and_v3_binds_the_lock() {
        let v2_json = r#"{"format":"virtkeep-repo","version":2,"id":"a","created":
            "2026-11-26T21:00:00Z","chunk_size":4194304,"zstd_level":1,
            "digest":"blake3-keyed","min_gc_grace_secs":3600,"id_key":"00",
            "auth":{"type":"key-file","fingerprint":"0011"}}"#;
        let mut cfg: ConfigFile = serde_json::from_str(v2_json).expect("v2 config");
        let key = [7u8; 32];
        assert_eq!(cfg.object_lock().expect("v2"), None);
        let v2_mac = cfg.compute_mac(&key);
        assert!(cfg.mac_input().starts_with("virtkeep config v2\0"));

        cfg.version = LOCKED_FORMAT_VERSION;
        assert!(cfg.object_lock().is_err(), "v3 without object_lock");
        cfg.object_lock = Some(ObjectLockConfig {
            mode: "GOVERNANCE".into(),
            retain_secs: 86400,
        });
        let lock = cfg.object_lock().expect("v3").expect("lock");
        assert_eq!(lock.mode, LockMode::Governance);
        assert_eq!(lock.retain, Duration::from_secs(86400));
        let v3_mac = cfg.compute_mac(&key);
        assert_ne!(v3_mac, v2_mac);
        cfg.object_lock = Some(ObjectLockConfig {
            mode: "GOVERNANCE".into(),
            retain_secs: 60,
        });
        assert_ne!(
            cfg.compute_mac(&key),
            v3_mac,
            "a shortened lock keeps the MAC"
        );
        cfg.version = 2;
        assert!(cfg.object_lock().is_err(), "v2 with object_lock");
    }
}
