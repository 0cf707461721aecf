//! What the steps of a restore hand each other: the loaded backup ([`Job`]) and the
//! checked plan of each disk ([`Planned`]).
//!
//! This module imports nothing of the restore but the options, the destination trait
//! and the record of temporaries.

use super::destination::Destination;
use super::options::RestoredDisk;
use super::staged::Staged;

/// What a restore works from once the backup is loaded.
pub struct Job {
    pub manifest: virtkeep_repo::Manifest,
    pub domain: virtkeep_libvirt::Domain,
    /// The domain name restored to.
    pub name: String,
    /// The domain of that name on the host.
    pub existing_uuid: Option<String>,
    /// The key of the VM lock the restore takes.
    pub lock_key: String,
}

impl Job {
    pub fn renamed(&self) -> bool {
        self.name != self.domain.name
    }
}

/// One disk of the plan, decided and checked before anything is written.
pub struct Planned<'a> {
    pub m: &'a virtkeep_repo::ManifestDisk,
    pub dest: Box<dyn Destination>,
    /// Its format at the destination.
    pub format: String,
    /// Where it is written first.
    pub staged: Staged,
    /// The destination exists and is replaced.
    pub replaces: bool,
}

impl Planned<'_> {
    /// What `restore` reports of this disk.
    pub fn report(&self, bytes_written: u64) -> RestoredDisk {
        let (backend, path) = self.dest.report();
        RestoredDisk {
            target: self.m.spec.target.clone(),
            backend,
            path,
            format: self.format.clone(),
            size: self.m.spec.size,
            bytes_written,
        }
    }
}

/// A restore that passed every check.
pub struct Checked<'a> {
    pub plan: Vec<Planned<'a>>,
    /// The UEFI store of a renamed copy: (the original's, the copy's).
    pub nvram: Option<(String, String)>,
    /// The restore's job id (names its temporaries and job directory).
    pub job_id: String,
}
