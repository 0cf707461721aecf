//! virtkeep-repo: a deduplicating, compressed, optionally encrypted store of fixed-size
//! chunks, with per-backup fixed indexes and manifests, on a local directory or S3.
//!
//! The on-disk format and the locking model are specified in `docs/format.md`.
//!
//! ```text
//! Repository::init/open ─ begin_backup ─▶ BackupWriter ─ disk() ─▶ DiskWriter / ExtentSink
//!                                              └─ finish(extra) ─▶ Manifest (published)
//! snapshots / manifest / fixed_index / disk_reader ─▶ DiskReader::extents()
//! verify / prune / forget / set_protected / gc
//! ```

mod backend;
mod crypto;
mod disk_view;
mod error;
mod format;
mod manifest;
mod nvram;
mod progress;
mod prune;
mod reader;
mod repo;
mod sync;
mod upgrade;
mod verify;
mod writer;

pub use backend::{
    ChunkBackend, FsBackend, Location, LockMode, LockedS3Backend, ObjectInfo, ObjectLock,
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, PutOutcome, S3Backend, S3Options,
};
pub use crypto::{EncryptionConfig, Kdf, KeySource};
pub use disk_view::{
    Allocation, BlockingDiskView, DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD_CHUNKS, DiskView,
    DiskViewOptions, MAX_READ, ViewStats,
};
pub use error::{RepoError, Result};
pub use format::{
    Digest, FixedIndex, MAGIC_CHUNK_ENC, MAGIC_CHUNK_ENC_ZSTD, MAGIC_CHUNK_PLAIN, MAGIC_CHUNK_ZSTD,
    MAGIC_FIXED_INDEX, MAGIC_META_AUTH, MAGIC_META_ENC, MAGIC_META_PLAIN, ZERO_DIGEST, chunk_key,
    is_all_zero,
};
pub use manifest::{
    BackupMeta, BackupMode, BackupStats, DiskSpec, DiskStats, Manifest, ManifestDisk,
    ManifestNvram, SnapshotSummary, Storage,
};
pub use nvram::{MAX_NVRAM_SIZE, NVRAM_ARTEFACT};
pub use progress::{QuietProgress, RepoProgress};
pub use prune::{KeepPolicy, PruneDecision, PruneReport, compute_prune, compute_prune_within};
pub use reader::{DiskReader, Extent, MIN_ZERO_RUN, split_zero_runs};
pub use repo::{
    DEFAULT_CHUNK_SIZE, FORMAT_VERSION, GcOptions, GcReport, InitOptions, LOCKED_FORMAT_VERSION,
    LeaseTiming, Repository, SnapshotListing, UnreadableManifest,
};
pub use sync::{CopyObserver, CopyStats, DigestMap, QuietCopy};
pub use upgrade::{UpgradeFailure, UpgradeReport};
pub use verify::{ChunkProblem, VerifyOptions, VerifyReport, VerifySelection};
pub use writer::{BackupWriter, DiskWriter, ExtentSink};
