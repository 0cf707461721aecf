//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the repository layer.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The key (passphrase or key file) does not unwrap the repository master key.
    #[error("wrong key for repository {location}: {hint}")]
    WrongKey { location: String, hint: String },
    /// The repository is encrypted but no key was given (or the other way round).
    #[error("repository {location}: {message}")]
    KeyRequired { location: String, message: String },
    /// An unencrypted repository of format v2 authenticates its manifests and indexes
    /// with a key file kept on the node, and none was given.
    #[error(
        "repository {location} authenticates its metadata with a key file kept on the node, \
         and none was given"
    )]
    AuthKeyRequired { location: String },
    /// `init` found an existing repository.
    #[error("a repository already exists at {0}")]
    AlreadyExists(String),
    /// `open` found no repository config.
    #[error("no virtkeep repository at {0} (run `virtkeep repo init` first)")]
    NotARepository(String),
    /// A location string that cannot be parsed.
    #[error("invalid repository location {0:?}: {1}")]
    InvalidLocation(String, String),
    /// Invalid argument from the caller (chunk size, disk name, chunk index...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored chunk is missing.
    #[error("chunk {digest} is missing")]
    ChunkMissing { digest: String },
    /// A stored chunk fails its checks (CRC, authentication, decompression, digest).
    #[error("chunk {digest} is corrupt: {reason}")]
    ChunkCorrupt { digest: String, reason: String },
    /// A metadata object (config, key file, index, manifest, lease) is malformed or fails
    /// authentication.
    #[error("{object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    /// The on-disk format version is not supported by this build.
    #[error("{object}: unsupported format ({reason})")]
    UnsupportedFormat { object: String, reason: String },
    /// No such backup.
    #[error("backup {0} not found")]
    SnapshotNotFound(String),
    /// No such disk in a backup.
    #[error("backup {id} has no disk {disk:?}")]
    DiskNotFound { id: String, disk: String },
    /// The backup is protected and cannot be forgotten.
    #[error("backup {0} is protected (unprotect it first)")]
    Protected(String),
    /// The backup is the base of a running backup and cannot be forgotten now.
    #[error("backup {id} is in use as the base of running backup {lease}")]
    InUse { id: String, lease: String },
    /// GC found a backup whose manifest or index cannot be read: it sweeps nothing, as
    /// the chunks only that backup uses cannot be told from garbage.
    #[error(
        "backup {id} cannot be read ({reason}); garbage collection sweeps nothing while it \
         exists: check it with `virtkeep verify {id}`, and if it cannot be repaired remove \
         it with `virtkeep forget {id}`"
    )]
    UnreadableBackup { id: String, reason: String },
    /// Another garbage collection holds the GC lease.
    #[error("garbage collection already running (lease {lease}, refreshed {age_secs} s ago)")]
    GcRunning { lease: String, age_secs: u64 },
    /// The writer's lease went stale (not refreshed in time): GC may have run without
    /// honouring it, so the backup is not published.
    #[error("backup lease {0} expired; the backup was not published, run it again")]
    LeaseExpired(String),
    /// A chunk the backup relies on vanished while it ran (concurrent forget + GC).
    #[error("chunk {digest} disappeared while the backup ran ({reason}); run the backup again")]
    ChunkVanished { digest: String, reason: String },
    /// The writer was used incorrectly (finished twice, aborted...).
    #[error("writer state: {0}")]
    WriterState(String),
    /// S3 Object Lock: the object is under retention and cannot be deleted yet.
    #[error("{key} is under object lock retention until {until}")]
    Retained { key: String, until: String },
    /// Storage backend error.
    #[error("storage error on {key}: {message}")]
    Backend { key: String, message: String },
    /// Local I/O error.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// JSON (de)serialisation error of a metadata object.
    #[error("{object}: invalid JSON: {source}")]
    Json {
        object: String,
        #[source]
        source: serde_json::Error,
    },
    /// A background task panicked or was cancelled.
    #[error("internal task failure: {0}")]
    Task(String),
}

/// Result alias.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

impl RepoError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RepoError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        RepoError::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn backend(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        RepoError::Backend {
            key: key.into(),
            message: message.to_string(),
        }
    }
    pub(crate) fn json(object: impl Into<String>, source: serde_json::Error) -> Self {
        RepoError::Json {
            object: object.into(),
            source,
        }
    }
}

impl From<tokio::task::JoinError> for RepoError {
    fn from(e: tokio::task::JoinError) -> Self {
        RepoError::Task(e.to_string())
    }
}
