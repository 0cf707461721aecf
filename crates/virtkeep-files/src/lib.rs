//! virtkeep-files: file-level access to backups without restoring them (issue 19).
//!
//! ```text
//! Repository ─ disk_view ─▶ DiskView ─┬─ DiskExport ─▶ virtkeep_nbd::NbdServer (serve-nbd)
//!                                     └─ BlockingDiskView ─▶ read_table / detect ─▶ DiskLayout (files ls)
//! ```
//!
//! Everything read here comes from a guest and is untrusted: the parsers bound every
//! length and loop and report what they skip as warnings.

mod browse;
mod error;
mod export;
mod ext4;
mod ext4raw;
mod fat;
mod find;
mod fs;
mod fsdetect;
mod get;
mod layout;
mod lvm;
mod mount;
mod mounttree;
mod ntfs;
mod open;
mod partition;
mod walk;
mod xfs;

pub use browse::{FileStream, FileTarget, STREAM_PIECE, find, get, list_dir, stream_file};
pub use error::FilesError;
pub use export::{DiskExport, backup_server, serve_backup};
pub use ext4::{list_ext4, list_fs};
pub use find::{
    FindResult, FoundEntry, MAX_FIND_MATCHES, MAX_FIND_VISITS, MAX_PATTERN, find_ext4, find_fs,
    glob_match,
};
pub use fs::{
    DirEntryInfo, DirListing, EntryKind, FsEntry, FsNode, GuestFs, MAX_DIR_ENTRIES, MAX_LINK,
    MAX_PATH,
};
pub use fsdetect::{FsInfo, PROBE_BYTES, detect, detect_bytes};
pub use get::{DEFAULT_MAX_ENTRIES, GetOptions, GetSummary, get_ext4, get_fs};
pub use layout::{DiskLayout, LvLayout, PartitionLayout, backup_layout, disk_layout, read_layout};
pub use lvm::{LogicalVolume, LvExtent, LvmError, MAX_METADATA, Mapped, read_pv};
pub use mount::mount_backup;
pub use open::{FsType, open_fs};
pub use partition::{
    MAX_GPT_ENTRY_BYTES, MAX_LOGICAL, Partition, PartitionTable, SECTOR, TableKind, guid,
    read_table,
};
pub use walk::{DEFAULT_GET_TIMEOUT, DEFAULT_WALK_TIMEOUT, TimedFs, WalkOptions};
