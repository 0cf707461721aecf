//! What the destinations of a restore are given: the disk to check or write and the
//! job it belongs to.
//!
//! This module imports nothing of the restore but [`super::staged`].

use std::sync::Arc;

use super::staged::Staged;
use crate::host::Host;
use crate::progress::Progress;

/// What writing a disk needs besides the disk.
pub struct WriteCtx<'a> {
    pub host: &'a Host,
    /// The domain name restored to (for progress).
    pub vm: &'a str,
    pub repo: &'a virtkeep_repo::Repository,
    /// The backup restored.
    pub id: &'a str,
    /// Owner (`user`, `group`) of restored files.
    pub owner: &'a (String, String),
    /// NBD connections per disk.
    pub parallel: usize,
    pub progress: &'a Arc<dyn Progress>,
}

/// One disk to write into its temporary.
pub struct DiskWrite<'a> {
    pub m: &'a virtkeep_repo::ManifestDisk,
    /// Its format at the destination.
    pub format: &'a str,
    pub staged: &'a Staged,
    /// The restore's job directory on the host (sockets, pid files).
    pub job_dir: &'a str,
    /// The disk's place in the restore (names its socket and pid file).
    pub index: usize,
}

/// One disk whose destination is checked before anything is written.
pub struct DiskCheck<'a> {
    pub m: &'a virtkeep_repo::ManifestDisk,
    /// The backup's domain (the disk's definition in it).
    pub domain: &'a virtkeep_libvirt::Domain,
    /// The restore defines the domain (`--define`).
    pub define: bool,
}
