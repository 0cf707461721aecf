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
    /// A task could not run to its end.
    #[error("internal task failed: {0}")]
    Task(String),
}
