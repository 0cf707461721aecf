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

/// The UEFI variable store of the restored domain.
pub struct NvramPlan {
    /// The store written (the domain's `<nvram>`, or the renamed copy's own).
    pub dest: String,
    /// The temporary the backup's bytes are written to before the swap.
    pub temp: String,
    /// The backup's bytes (`None`: a backup made before virtkeep kept the store).
    pub bytes: Option<Vec<u8>>,
    /// The original's store (copied for a renamed copy when the backup has none).
    pub copy_from: String,
    /// The new `<nvram>` path of a renamed copy.
    pub rewrite: Option<String>,
}

impl NvramPlan {
    /// The record of its temporary (a file swapped in like a file disk).
    pub fn staged(&self) -> Option<Staged> {
        self.bytes.as_ref().map(|_| Staged {
            kind: super::staged::Kind::File,
            temp: self.temp.clone(),
            dest: self.dest.clone(),
        })
    }
}

/// A restore that passed every check.
pub struct Checked<'a> {
    pub plan: Vec<Planned<'a>>,
    /// What happens to the UEFI variable store.
    pub nvram: Option<NvramPlan>,
    /// The restore's job id (names its temporaries and job directory).
    pub job_id: String,
}
