/// Errors of file-level access to backups.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Reading the backup failed.
    #[error(transparent)]
    Repo(#[from] virtkeep_repo::RepoError),
    /// Reading through the disk view failed (I/O adapter).
    #[error("reading the disk failed: {0}")]
    Io(#[from] std::io::Error),
    /// Serving NBD failed.
    #[error(transparent)]
    Nbd(#[from] virtkeep_nbd::NbdError),
    /// The filesystem could not be read (corrupt, unsupported, or no such path).
    #[error("{path}: {reason}")]
    Filesystem { path: String, reason: String },
    /// A `DISK[:PART]:/PATH` that does not name a directory of a readable filesystem.
    #[error("invalid path {0:?} (expected DISK:PART:/PATH or DISK:/PATH)")]
    InvalidPath(String),
    /// The backup has no such disk or partition.
    #[error("{0}")]
    NotFound(String),
    /// The partition holds no filesystem this version reads.
    #[error("{what} holds {found}; only ext2/3/4, XFS, FAT (vfat) and NTFS can be read so far")]
    Unsupported { what: String, found: String },
    /// Writing the local copy failed.
    #[error("{path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
    /// The local copy would replace an existing file.
    #[error("{0} exists (--overwrite replaces it)")]
    Exists(String),
    /// A walk met more entries than allowed.
    #[error("more than {0} entries")]
    TooManyEntries(u64),
    /// A walk ran past its time limit (a huge or damaged filesystem).
    #[error(
        "{what} took longer than its limit of {secs} s; hint: name a smaller path, or raise the limit (--timeout SECS)"
    )]
    TimedOut { what: String, secs: f64 },
    /// Guest LVM metadata could not be read.
    #[error(transparent)]
    Lvm(#[from] crate::lvm::LvmError),
    /// A task could not run to its end.
    #[error("internal task failed: {0}")]
    Task(String),
}
