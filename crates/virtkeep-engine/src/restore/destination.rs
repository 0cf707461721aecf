//! The shape every restore destination has (a file, an LV, an RBD image: one module
//! each): checked before anything is written, written under a temporary name, then
//! swapped in (committed) or removed (rolled back).
//!
//! The restore calls these in this order for every disk: [`check_names`], then for all
//! disks together the clash and running-domain checks ([`key`], [`in_use_names`]), then
//! [`check`]; once every disk is checked: [`staged`] (recorded on the host), [`write`];
//! once every disk is written: [`commit`] for each, or [`roll_back`] for each on a
//! failure. `virtkeep cleanup` rebuilds a destination from the host's record and calls
//! [`temp_exists`] and [`commit`] or [`roll_back`].
//!
//! [`check_names`]: Destination::check_names
//! [`key`]: Destination::key
//! [`in_use_names`]: Destination::in_use_names
//! [`check`]: Destination::check
//! [`staged`]: Destination::staged
//! [`write`]: Destination::write
//! [`commit`]: Destination::commit
//! [`roll_back`]: Destination::roll_back
//! [`temp_exists`]: Destination::temp_exists

use async_trait::async_trait;
use virtkeep_libvirt::NewSource;

use super::context::{DiskCheck, DiskWrite, WriteCtx};
use super::staged::Staged;
use crate::error::Result;
use crate::host::Host;

/// Where a destination takes its room from, for the free-space check before anything
/// is written (several disks into one place add up).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Room {
    /// A file in this directory (it may not exist yet).
    Dir(String),
    /// A thick LV: extents of this volume group.
    Vg(String),
    /// A thin LV: data space of this pool (`VG`, `POOL`).
    ThinPool(String, String),
}

#[async_trait]
pub trait Destination: Send + Sync + std::fmt::Debug {
    /// The lexical checks of the names virtkeep chose (no host access): a canonical
    /// path, LVM or RBD names from a safe character set.
    fn check_names(&self) -> Result<()>;

    /// Names the destination: equal for two disks that would share it.
    fn key(&self) -> String;

    /// The destination in a message (`/path`, `logical volume VG/NAME`, …).
    fn describe(&self) -> String;

    /// The disk's format at this destination.
    fn format(&self, m: &virtkeep_repo::ManifestDisk) -> String;

    /// Every name under which a running domain would use this destination (paths
    /// resolved on the host, `POOL/IMAGE`).
    async fn in_use_names(&self, host: &Host) -> Result<Vec<String>>;

    /// The checks on the host before anything is written: refuses what must not be
    /// written to (a symlink, a missing libvirt secret, …); returns whether the
    /// destination exists, and so would be replaced (which needs `--force`).
    async fn check(&self, host: &Host, disk: &DiskCheck<'_>) -> Result<bool>;

    /// How to avoid replacing an existing destination (the hint without `--force`).
    fn replace_hint(&self) -> &'static str;

    /// The temporary the disk is written to first (`tag`: the restore's job tag).
    fn staged(&self, tag: &str) -> Staged;

    /// Creates the temporary `disk.staged` and writes the disk into it; returns the
    /// data bytes written.
    async fn write(&self, ctx: &WriteCtx<'_>, disk: &DiskWrite<'_>) -> Result<u64>;

    /// Whether the temporary `s` exists on the host.
    async fn temp_exists(&self, host: &Host, s: &Staged) -> Result<bool>;

    /// Replaces the destination with the temporary `s` (the old data goes only now).
    async fn commit(&self, host: &Host, s: &Staged) -> Result<()>;

    /// Removes the temporary `s`; the destination is left as it was.
    async fn roll_back(&self, host: &Host, s: &Staged) -> Result<()>;

    /// Creates the destination itself, empty, of the disk's size (a live restore
    /// mirrors into it while the guest runs). The caller checked that it did not exist.
    async fn create_empty(
        &self,
        host: &Host,
        m: &virtkeep_repo::ManifestDisk,
        owner: &(String, String),
    ) -> Result<()>;

    /// Removes a destination [`create_empty`](Self::create_empty) made.
    async fn remove_created(&self, host: &Host) -> Result<()>;

    /// What `restore` reports: the backend and the path (stable in `--json`).
    fn report(&self) -> (virtkeep_repo::Storage, String);

    /// The disk's new source in the domain XML.
    fn new_source(&self, format: &str) -> NewSource;

    /// Where the temporary takes its room and whether all of the disk's size is taken
    /// (a thick LV) or only its data; `None`: not checked (Ceph allocates thinly and
    /// refuses on its own).
    fn room(&self) -> Option<(Room, bool)> {
        None
    }
}
