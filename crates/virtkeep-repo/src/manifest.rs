//! Backup manifests and the caller-facing metadata types.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How the backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Every allocated byte was read.
    Full,
    /// Only changed extents were read; the rest reuses the previous index.
    Incremental,
}

impl std::fmt::Display for BackupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupMode::Full => "full",
            BackupMode::Incremental => "incremental",
        })
    }
}

/// Where a disk lives on the hypervisor. Recorded in each manifest's disk spec as its
/// lowercase name (`file`, `lvm`, `rbd`, the strings of every format version so far);
/// a manifest naming another one is refused when it is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// A qcow2 or raw image file.
    #[default]
    File,
    /// An LVM logical volume (thick or thin).
    Lvm,
    /// A Ceph RBD image.
    Rbd,
}

impl Storage {
    pub fn as_str(self) -> &'static str {
        match self {
            Storage::File => "file",
            Storage::Lvm => "lvm",
            Storage::Rbd => "rbd",
        }
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the engine knows when a backup begins.
#[derive(Debug, Clone)]
pub struct BackupMeta {
    /// Hypervisor host name (as configured).
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// Full or incremental.
    pub mode: BackupMode,
    /// Why this mode (e.g. "no previous backup", "dirty bitmap present").
    pub reason: String,
    /// Id of the backup the indexes are seeded from.
    pub parent: Option<String>,
    /// The domain XML (kept verbatim).
    pub domain_xml: String,
    /// Backup time; `None` = now.
    pub time: Option<OffsetDateTime>,
}

/// One disk of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Name inside the backup (the target dev, e.g. `vda`); `[A-Za-z0-9._-]`, ≤ 64 bytes.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Storage backend on the hypervisor.
    pub backend: Storage,
    /// Image format (`raw`, `qcow2`).
    pub format: String,
    /// Target device (`vda`).
    pub target: String,
    /// Source path or volume name on the hypervisor.
    pub source: String,
}

/// Per-disk statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Bytes handed to the writer as data (not counting zero chunks).
    pub bytes_read: u64,
    /// Plaintext bytes of chunks uploaded by this backup.
    pub bytes_new: u64,
    /// Stored (compressed, encrypted) bytes uploaded by this backup.
    pub bytes_stored: u64,
    /// Chunks uploaded by this backup.
    pub chunks_new: u64,
    /// Chunks already in the repository (previous index or existing object).
    pub chunks_reused: u64,
    /// All-zero chunks (never stored).
    pub chunks_zero: u64,
    /// Chunks taken unchanged from the previous index without being written.
    pub chunks_unchanged: u64,
}

impl DiskStats {
    pub(crate) fn add(&mut self, o: &DiskStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_new += o.bytes_new;
        self.bytes_stored += o.bytes_stored;
        self.chunks_new += o.chunks_new;
        self.chunks_reused += o.chunks_reused;
        self.chunks_zero += o.chunks_zero;
        self.chunks_unchanged += o.chunks_unchanged;
    }
}

/// Whole-backup statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Sum over disks.
    #[serde(flatten)]
    pub totals: DiskStats,
    /// Wall time from begin_backup to finish, seconds.
    pub duration_secs: f64,
}

/// A disk entry in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The disk as described by the engine.
    #[serde(flatten)]
    pub spec: DiskSpec,
    /// Chunk size of its index.
    pub chunk_size: u64,
    /// Object key of the index (relative to the repository root).
    pub index: String,
    /// Statistics.
    pub stats: DiskStats,
}

/// The per-backup manifest (JSON, wrapped in a meta blob).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version (1).
    pub version: u32,
    /// Backup id.
    pub id: String,
    /// Host.
    pub host: String,
    /// VM.
    pub vm: String,
    /// Backup time (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Mode.
    pub mode: BackupMode,
    /// Why that mode.
    pub reason: String,
    /// Parent backup id.
    pub parent: Option<String>,
    /// Protected flag (the live value comes from the `protected` marker object).
    pub protected: bool,
    /// Domain XML.
    pub domain_xml: String,
    /// Disks.
    pub disks: Vec<ManifestDisk>,
    /// Statistics.
    pub stats: BackupStats,
    /// Free-form data from the engine.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The UEFI variable store, when the VM has one (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<ManifestNvram>,
}

/// The NVRAM entry of a manifest (absent in manifests written before it existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestNvram {
    /// Object key of its fixed index.
    pub index: String,
    /// Size in bytes.
    pub size: u64,
    /// The `<nvram>` path it was read from on the host (information only: a restore
    /// chooses where it writes).
    pub source: String,
}

/// One line of `snapshots`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// Backup id.
    pub id: String,
    /// Time.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Host.
    pub host: String,
    /// VM.
    pub vm: String,
    /// Mode.
    pub mode: BackupMode,
    /// Disk names.
    pub disks: Vec<String>,
    /// Sum of disk sizes.
    pub size: u64,
    /// Stored bytes uploaded by this backup.
    pub bytes_new: u64,
    /// Protected.
    pub protected: bool,
}
