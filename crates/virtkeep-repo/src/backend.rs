//! Storage backends: one small async trait, a hand-written local filesystem store and an
//! S3 store through `object_store`.

use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{RepoError, Result};

mod group_sync;
mod s3_lock;
use group_sync::GroupSync;
pub use s3_lock::LockedS3Backend;
use s3_lock::{BucketLock, RawS3};

/// Metadata of one stored object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Key relative to the repository root (`chunks/abc/abc…`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time in the storage's clock (mtime / S3 LastModified).
    pub modified: SystemTime,
}

/// Result of [`ChunkBackend::put_if_absent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was created by this call.
    Created,
    /// An object with that key already existed; nothing was written.
    Existed,
}

/// S3 Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete or shorten.
    Governance,
    /// Nobody can delete a version before its retention ends.
    Compliance,
}

impl LockMode {
    /// The S3 name (`GOVERNANCE`, `COMPLIANCE`), also the one in the repository config.
    pub fn as_s3(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }

    /// Parse the S3 name (any case).
    pub fn parse(s: &str) -> Option<LockMode> {
        match s.to_ascii_uppercase().as_str() {
            "GOVERNANCE" => Some(LockMode::Governance),
            "COMPLIANCE" => Some(LockMode::Compliance),
            _ => None,
        }
    }
}

/// Per-object retention of an Object Lock repository: chunks, indexes and manifests are
/// retained `retain` from when they are written or last extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub retain: std::time::Duration,
}

/// The narrow storage interface the repository needs. Keys are `/`-separated and relative
/// to the repository root. Every write is atomic: readers see the old object, the new
/// object or nothing, never a partial one.
#[async_trait]
pub trait ChunkBackend: Send + Sync + Debug + 'static {
    /// Create-only write. Returns [`PutOutcome::Existed`] (and writes nothing) when the key
    /// exists.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome>;
    /// [`ChunkBackend::put_if_absent`] of a chunk (content-addressed). Its name may be lost
    /// in a crash until the next write that is not a chunk has returned, but never exists
    /// without its bytes (deduplication trusts existing names). Lets a backend make many
    /// chunks durable at once.
    async fn put_chunk(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        self.put_if_absent(key, data).await
    }
    /// Atomic overwrite (metadata, leases, and refreshing a chunk's modification time).
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Read a whole object; `None` when missing.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// Object metadata; `None` when missing.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// All objects whose key starts with `prefix` (a directory-like prefix ending in `/`).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>>;
    /// Temporary objects of writes in progress or interrupted (`.tmp-*` names, left
    /// out of [`ChunkBackend::list`]) under `prefix` (`""`: everywhere), for GC.
    fn list_temp<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>>;
    /// Delete an object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Human readable location.
    fn describe(&self) -> String;
    /// Object Lock: move an existing object's retention to `retain` from now without
    /// rewriting it; `false` when it is gone. Without Object Lock there is nothing to do.
    async fn extend_retention(&self, key: &str) -> Result<bool> {
        let _ = key;
        Ok(true)
    }
    /// `repo init --object-lock`: make sure objects can be given retention — S3 creates
    /// a missing bucket with Object Lock enabled and refuses one without it.
    async fn prepare_object_lock(&self) -> Result<()> {
        Err(object_lock_unsupported(&self.describe()))
    }
    /// This backend writing chunks, indexes and manifests with `lock`'s retention.
    fn with_object_lock(self: Arc<Self>, lock: ObjectLock) -> Result<Arc<dyn ChunkBackend>> {
        let _ = lock;
        Err(object_lock_unsupported(&self.describe()))
    }
}

fn object_lock_unsupported(location: &str) -> RepoError {
    RepoError::InvalidLocation(
        location.to_string(),
        "object lock needs an S3 repository (s3://bucket/prefix)".into(),
    )
}

// ---------------------------------------------------------------------------------------
// Local filesystem

/// Mode of every directory the filesystem backend creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every object file the filesystem backend writes.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Local filesystem backend: one file per object, temp file + rename (or hard link for
/// create-only), optional fsync. Chunks are made durable in groups (`group_sync.rs`).
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: PathBuf,
    fsync: bool,
    durability: Arc<GroupSync<Pending>>,
}

/// What the next group barrier makes durable (see `group_sync.rs`).
#[derive(Debug, Default)]
struct Pending {
    /// Chunk files written without fsync, still open.
    files: Vec<std::fs::File>,
    /// Directories that got a chunk's name since the last barrier.
    dirs: std::collections::BTreeSet<PathBuf>,
}

impl Pending {
    /// Writes back every file at once (so one journal commit covers their blocks), waits
    /// for each, then syncs the directories. On failure, what is left is retried by the
    /// next barrier: the directories not yet synced, never a file (after a failed
    /// writeback Linux may mark the lost pages clean, so a second fdatasync would report
    /// success; the file's writer fails instead, see `GroupSync::barrier`).
    fn sync(&mut self) -> std::io::Result<()> {
        let files = std::mem::take(&mut self.files);
        for f in &files {
            // POSIX_FADV_DONTNEED starts the writeback of the dirty pages without waiting
            // (dirty pages are not dropped).
            let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
        }
        for f in &files {
            f.sync_data()?;
        }
        while let Some(d) = self.dirs.first() {
            std::fs::File::open(d)?.sync_all()?;
            self.dirs.pop_first();
        }
        Ok(())
    }
}

impl group_sync::Work for Pending {
    fn put_back(&mut self, undone: Self) {
        self.files.extend(undone.files);
        self.dirs.extend(undone.dirs);
    }
}

impl FsBackend {
    /// A backend rooted at `root` (created when missing).
    pub fn new(root: impl Into<PathBuf>, fsync: bool) -> Self {
        FsBackend {
            root: root.into(),
            fsync,
            durability: Arc::default(),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(RepoError::InvalidArgument(format!(
                "bad object key {key:?}"
            )));
        }
        Ok(self.root.join(key))
    }

    /// Write `data` next to `path` under a temporary name; `sync`: fsync it.
    fn write_temp(&self, path: &Path, data: &[u8], sync: bool) -> Result<(PathBuf, std::fs::File)> {
        let dir = path
            .parent()
            .ok_or_else(|| RepoError::InvalidArgument(format!("no parent for {path:?}")))?;
        // Private whatever the umask (as restic and borg do): backups hold whole disks
        // and domain XML with its secrets. The umask can only take bits away.
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            dirs.mode(PRIVATE_DIR_MODE);
            opts.mode(PRIVATE_FILE_MODE);
        }
        dirs.create(dir).map_err(|e| RepoError::io(dir, e))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("obj"),
            uuid::Uuid::new_v4().simple()
        ));
        let mut f = opts.open(&tmp).map_err(|e| RepoError::io(&tmp, e))?;
        let res = f
            .write_all(data)
            .and_then(|()| if sync { f.sync_all() } else { Ok(()) });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(RepoError::io(&tmp, e));
        }
        Ok((tmp, f))
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        if self.fsync
            && let Some(dir) = path.parent()
        {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| RepoError::io(dir, e))?;
        }
        Ok(())
    }

    /// A group barrier (with fsync on): the pending work added before the call is
    /// durable after it.
    fn barrier(&self, since: group_sync::Ticket) -> Result<()> {
        if !self.fsync {
            return Ok(());
        }
        self.durability
            .barrier(since, Pending::sync)
            .map_err(|e| RepoError::io(&self.root, e))
    }

    /// A barrier for a write that is not a chunk: the chunk names it may refer to are
    /// durable before it is.
    fn barrier_now(&self) -> Result<()> {
        self.barrier(self.durability.now())
    }

    /// Create-only link of a written temporary file; removes the temporary file.
    fn link_new(tmp: &Path, path: &Path) -> Result<PutOutcome> {
        // link(2) fails with EEXIST when the target exists: create-only semantics.
        let res = std::fs::hard_link(tmp, path);
        let _ = std::fs::remove_file(tmp);
        match res {
            Ok(()) => Ok(PutOutcome::Created),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(PutOutcome::Existed),
            Err(e) => Err(RepoError::io(path, e)),
        }
    }
}

async fn io_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[async_trait]
impl ChunkBackend for FsBackend {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        let path = self.path(key)?;
        let this = self.clone();
        io_blocking(move || {
            if path.exists() {
                return Ok(PutOutcome::Existed);
            }
            this.barrier_now()?;
            let (tmp, _) = this.write_temp(&path, &data, this.fsync)?;
            let outcome = Self::link_new(&tmp, &path)?;
            if outcome == PutOutcome::Created {
                this.sync_dir(&path)?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn put_chunk(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        let path = self.path(key)?;
        let this = self.clone();
        io_blocking(move || {
            if path.exists() {
                return Ok(PutOutcome::Existed);
            }
            let (tmp, file) = this.write_temp(&path, &data, false)?;
            let since = this.durability.add(|p| {
                if this.fsync {
                    p.files.push(file);
                }
            });
            if let Err(e) = this.barrier(since) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            let outcome = Self::link_new(&tmp, &path)?;
            if this.fsync
                && outcome == PutOutcome::Created
                && let Some(dir) = path.parent()
            {
                // Durable with the next barrier: every object that may name it takes one.
                this.durability.add(|p| {
                    p.dirs.insert(dir.to_path_buf());
                });
            }
            Ok(outcome)
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let this = self.clone();
        io_blocking(move || {
            this.barrier_now()?;
            let (tmp, _) = this.write_temp(&path, &data, this.fsync)?;
            if let Err(e) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(RepoError::io(&path, e));
            }
            this.sync_dir(&path)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        io_blocking(move || match std::fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        let key = key.to_string();
        io_blocking(move || match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(ObjectInfo {
                key,
                size: m.len(),
                modified: m.modified().map_err(|e| RepoError::io(&path, e))?,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.walk(prefix, false)
    }

    fn list_temp<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.walk(prefix, true)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        io_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

impl FsBackend {
    /// Objects under `prefix`, or (`temp`) only the `.tmp-*` files.
    fn walk<'a>(&'a self, prefix: &'a str, temp: bool) -> BoxStream<'a, Result<ObjectInfo>> {
        // Walk directory by directory so memory stays bounded by one directory listing.
        let root = self.root.clone();
        let start = root.join(prefix.trim_end_matches('/'));
        let state = vec![start];
        futures::stream::unfold(state, move |mut stack| {
            let root = root.clone();
            async move {
                let dir = stack.pop()?;
                let res = tokio::task::spawn_blocking(move || list_dir(&root, &dir, temp)).await;
                let (items, subdirs) = match res {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => return Some((vec![Err(e)], stack)),
                    Err(e) => return Some((vec![Err(e.into())], stack)),
                };
                stack.extend(subdirs);
                Some((items.into_iter().map(Ok).collect::<Vec<_>>(), stack))
            }
        })
        .flat_map(futures::stream::iter)
        .boxed()
    }
}

/// Files directly in `dir` (`temp`: only `.tmp-*` ones, else all others) and its
/// subdirectories.
fn list_dir(root: &Path, dir: &Path, temp: bool) -> Result<(Vec<ObjectInfo>, Vec<PathBuf>)> {
    let mut items = Vec::new();
    let mut subdirs = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((items, subdirs)),
        Err(e) => return Err(RepoError::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| RepoError::io(dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let ft = ent.file_type().map_err(|e| RepoError::io(ent.path(), e))?;
        if ft.is_dir() {
            subdirs.push(ent.path());
        } else if ft.is_file() && name.starts_with(".tmp-") == temp {
            let md = match ent.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io(ent.path(), e)),
            };
            let rel = ent
                .path()
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            items.push(ObjectInfo {
                key: rel,
                size: md.len(),
                modified: md.modified().map_err(|e| RepoError::io(ent.path(), e))?,
            });
        }
    }
    Ok((items, subdirs))
}

// ---------------------------------------------------------------------------------------
// S3

/// S3 connection settings; every field falls back to the standard `AWS_*` variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:7480` for Ceph RGW. `None`: AWS.
    pub endpoint: Option<String>,
    /// Region (`us-east-1` when neither set nor in the environment).
    pub region: Option<String>,
    /// Access key id.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
    /// Allow plain HTTP endpoints.
    pub allow_http: bool,
    /// Without credentials (static keys, web identity, container credentials), ask the
    /// cloud instance metadata service (169.254.169.254) for them. Off by default: a
    /// node that is not a cloud instance would wait on that address and fail confusingly.
    pub instance_metadata: bool,
}

/// Refuses a builder that would fall back to the instance metadata service for its
/// credentials when `opts` does not ask for it — before any network call.
fn check_s3_credentials(
    b: &object_store::aws::AmazonS3Builder,
    opts: &S3Options,
    location: &str,
) -> Result<()> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let has = |k: K| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let credentials = has(K::AccessKeyId)
        || has(K::SecretAccessKey)
        || (has(K::WebIdentityTokenFile) && has(K::RoleArn))
        || has(K::ContainerCredentialsRelativeUri)
        || has(K::ContainerCredentialsFullUri)
        || b.get_config_value(&K::SkipSignature)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if credentials || opts.instance_metadata {
        return Ok(());
    }
    Err(RepoError::InvalidLocation(
        location.to_string(),
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a web \
         identity or container credentials through AWS_WEB_IDENTITY_TOKEN_FILE + \
         AWS_ROLE_ARN, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI), or, on a cloud instance, \
         `s3_instance_metadata = true` in the repository's configuration to take them from \
         the instance metadata service"
            .into(),
    ))
}

/// S3 (or S3-compatible: Ceph RGW, MinIO) backend through `object_store`.
#[derive(Debug)]
pub struct S3Backend {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    /// Signed raw requests for Object Lock, which `object_store` cannot express.
    raw: RawS3,
}

impl S3Backend {
    /// Connect (lazily) to `bucket`, storing everything under `prefix`.
    pub fn new(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self> {
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &opts.region {
            b = b.with_region(r);
        } else if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(k) = &opts.access_key {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &opts.secret_key {
            b = b.with_secret_access_key(s);
        }
        if opts.allow_http {
            b = b.with_allow_http(true);
        }
        check_s3_credentials(&b, opts, &format!("s3://{bucket}/{prefix}"))?;
        let raw = raw_s3(&b, bucket, prefix.trim_matches('/'));
        let store = b.build().map_err(|e| {
            RepoError::InvalidLocation(format!("s3://{bucket}/{prefix}"), e.to_string())
        })?;
        Ok(S3Backend {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            raw,
        })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn rel(&self, p: &object_store::path::Path) -> String {
        let s: &str = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }
}

/// The raw-request side of an S3 backend, from the builder's settings (path-style).
fn raw_s3(b: &object_store::aws::AmazonS3Builder, bucket: &str, prefix: &str) -> RawS3 {
    use object_store::aws::AmazonS3ConfigKey as K;
    let get = |k: K| b.get_config_value(&k).filter(|v| !v.is_empty());
    let region = get(K::Region).unwrap_or_else(|| "us-east-1".into());
    let base = get(K::Endpoint).unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let mut raw = RawS3::new(base, bucket, prefix, region);
    raw.allow_http = get(K::Client(object_store::ClientConfigKey::AllowHttp))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    raw.credential = match (get(K::AccessKeyId), get(K::SecretAccessKey)) {
        (Some(key_id), Some(secret_key)) => Some(object_store::aws::AwsCredential {
            key_id,
            secret_key,
            token: get(K::Token),
        }),
        _ => None,
    };
    raw
}

fn meta_info(rel: String, m: &object_store::ObjectMeta) -> ObjectInfo {
    let ts = m.last_modified.timestamp_millis();
    let modified = if ts >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ts.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    };
    ObjectInfo {
        key: rel,
        size: m.size,
        modified,
    }
}

#[async_trait]
impl ChunkBackend for S3Backend {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::Existed),
            Err(e) => Err(RepoError::backend(key, e)),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| RepoError::backend(key, e))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(|e| RepoError::backend(key, e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(RepoError::backend(key, e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(meta_info(key.to_string(), &m))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(RepoError::backend(key, e)),
        }
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.walk(prefix, false)
    }

    fn list_temp<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.walk(prefix, true)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(RepoError::backend(key, e)),
        }
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn prepare_object_lock(&self) -> Result<()> {
        match self.raw.bucket_lock().await? {
            BucketLock::Enabled => Ok(()),
            BucketLock::Missing => self.raw.create_locked_bucket().await,
            BucketLock::NotEnabled => Err(RepoError::InvalidLocation(
                self.describe(),
                format!(
                    "bucket {} exists without Object Lock, which (on Ceph RGW before 20) can \
                     only be enabled when a bucket is created: give a bucket name that does \
                     not exist yet, and `repo init --object-lock` creates it with Object Lock",
                    self.bucket
                ),
            )),
        }
    }

    fn with_object_lock(self: Arc<Self>, lock: ObjectLock) -> Result<Arc<dyn ChunkBackend>> {
        Ok(Arc::new(LockedS3Backend::new(self, lock)))
    }
}

impl S3Backend {
    /// Delete the current version of `key` for good, as any client holding these
    /// credentials could — no retention check (`bypass_governance`: with
    /// `x-amz-bypass-governance-retention`). For tests and administrators' cleanup; the
    /// repository never calls it. Ok when there is no such object.
    pub async fn delete_current_version(&self, key: &str, bypass_governance: bool) -> Result<()> {
        let Some(h) = self.raw.head(key).await? else {
            return Ok(());
        };
        match self
            .raw
            .delete_version(key, h.version.as_deref(), bypass_governance)
            .await?
        {
            s3_lock::Deleted::Done => Ok(()),
            s3_lock::Deleted::Refused(why) => Err(RepoError::backend(key, why)),
        }
    }

    /// Objects under `prefix`, or (`temp`) only those named `.tmp-*` (virtkeep writes
    /// none to S3; they are treated as on the filesystem, for one rule on both).
    fn walk<'a>(&'a self, prefix: &'a str, temp: bool) -> BoxStream<'a, Result<ObjectInfo>> {
        let p = self.path(prefix.trim_end_matches('/'));
        self.store
            .list(Some(&p))
            .map(move |r| match r {
                Ok(m) => Ok(meta_info(self.rel(&m.location), &m)),
                Err(e) => Err(RepoError::backend(prefix, e)),
            })
            .try_filter(move |o| {
                let leaf = o.key.rsplit('/').next().unwrap_or_default();
                futures::future::ready(leaf.starts_with(".tmp-") == temp)
            })
            .boxed()
    }
}

// ---------------------------------------------------------------------------------------
// Location

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory; `fsync` syncs every written file and its directory (default on).
    Local { path: PathBuf, fsync: bool },
    /// An S3 bucket and key prefix.
    S3 {
        bucket: String,
        prefix: String,
        options: S3Options,
    },
}

impl Location {
    /// Parse `/path/to/repo` (or any relative path) or `s3://bucket[/prefix]`.
    pub fn parse(s: &str) -> Result<Location> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(RepoError::InvalidLocation(
                    s.into(),
                    "missing bucket".into(),
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
                options: S3Options::default(),
            });
        }
        if s.contains("://") {
            return Err(RepoError::InvalidLocation(
                s.into(),
                "only directories and s3://bucket/prefix are supported".into(),
            ));
        }
        if s.is_empty() {
            return Err(RepoError::InvalidLocation(s.into(), "empty".into()));
        }
        Ok(Location::Local {
            path: PathBuf::from(s),
            fsync: true,
        })
    }

    /// Replace the S3 options (no effect on local locations).
    pub fn with_s3_options(mut self, opts: S3Options) -> Self {
        if let Location::S3 { options, .. } = &mut self {
            *options = opts;
        }
        self
    }

    /// Set the fsync policy (no effect on S3).
    pub fn with_fsync(mut self, on: bool) -> Self {
        if let Location::Local { fsync, .. } = &mut self {
            *fsync = on;
        }
        self
    }

    /// A warning when a local repository's directory lets other users in (repositories
    /// made before they were private, or opened up by hand); `None` for S3.
    pub fn access_warning(&self) -> Option<String> {
        let Location::Local { path, .. } = self else {
            return None;
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Some(format!(
                    "repository {} is open to other users (mode {mode:o}): its backups and \
                     their domain XML can be read by them; run `chmod -R go-rwx {}`",
                    path.display(),
                    path.display()
                ));
            }
        }
        None
    }

    /// Build the backend.
    pub fn backend(&self) -> Result<Arc<dyn ChunkBackend>> {
        Ok(match self {
            Location::Local { path, fsync } => Arc::new(FsBackend::new(path.clone(), *fsync)),
            Location::S3 {
                bucket,
                prefix,
                options,
            } => Arc::new(S3Backend::new(bucket, prefix, options)?),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local { path, .. } => write!(f, "{}", path.display()),
            Location::S3 { bucket, prefix, .. } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}
