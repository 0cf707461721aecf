//! A read-only guest filesystem, whatever its type: each type is a backend behind
//! [`GuestFs`], and `files ls/get/find` and `mount` are written once against it.
//!
//! Paths are absolute byte strings (`/etc/hostname`): guest names need not be UTF-8.
//! Every backend reads an untrusted image: it bounds what it reads and returns
//! [`FilesError::Filesystem`] for what it cannot make sense of, never panics.

use serde::Serialize;

use crate::error::FilesError;

/// Longest symlink target returned.
pub const MAX_LINK: usize = 4096;

/// What a filesystem says about one file, directory or link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsNode {
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch, and nanoseconds.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Identifies the node in its filesystem (equal for hard links); 0 when unknown.
    pub ino: u64,
    /// Link count (hard links share `ino`); 1 when unknown.
    pub nlink: u32,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    pub name: Vec<u8>,
    pub node: FsNode,
    /// Why the entry's own metadata (its inode) could not be read: `node` is then
    /// [`FsEntry::unreadable`]'s placeholder of kind [`EntryKind::Unknown`]. One damaged
    /// inode does not hide the rest of its directory.
    pub error: Option<String>,
}

impl FsEntry {
    pub(crate) fn new(name: Vec<u8>, node: FsNode) -> FsEntry {
        FsEntry {
            name,
            node,
            error: None,
        }
    }

    /// An entry whose inode could not be read, with the reason.
    pub(crate) fn unreadable(name: Vec<u8>, e: impl std::fmt::Display) -> FsEntry {
        let mut reason = e.to_string();
        reason.truncate(reason.floor_char_boundary(1024));
        FsEntry {
            name,
            node: FsNode {
                kind: EntryKind::Unknown,
                size: 0,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                ino: 0,
                nlink: 1,
            },
            error: Some(reason),
        }
    }
}

/// A read-only guest filesystem (synchronous: used on a blocking thread).
pub trait GuestFs {
    /// Metadata of `path`, not following a final symlink.
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError>;
    /// Entries of directory `path`, without `.` and `..`: at most `max`, and whether
    /// there were more.
    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError>;
    /// Fills `buf` from file `path` at `offset` as far as the file goes; 0 at its end.
    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError>;
    /// The target of symlink `path` (at most [`MAX_LINK`] bytes).
    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError>;
}

/// Most entries one directory listing returns.
pub const MAX_DIR_ENTRIES: usize = 100_000;
/// Longest path accepted.
pub const MAX_PATH: usize = 4096;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
    /// The entry's inode could not be read (see the entry's `error`).
    Unknown,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirEntryInfo {
    /// The name (invalid UTF-8 replaced).
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// A symlink's target.
    pub target: Option<String>,
    /// Why this entry could not be read (its kind is then `unknown`, or a symlink's
    /// target is missing); the rest of the directory is listed all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirListing {
    pub path: String,
    /// Sorted by name, without `.` and `..`.
    pub entries: Vec<DirEntryInfo>,
    /// True when the directory had more than [`MAX_DIR_ENTRIES`] entries.
    pub truncated: bool,
}

pub(crate) fn fs_err(path: &str, e: impl std::fmt::Display) -> FilesError {
    FilesError::Filesystem {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

/// Whether `e` is the disk (the repository under it) failing rather than a damaged
/// filesystem: those end a listing instead of marking one entry, so that an outage, a
/// missing chunk or one failing authentication is not shown as a damaged guest.
/// Reads past the partition (`UnexpectedEof`) and loop budgets (`InvalidData`) are damage.
pub(crate) fn disk_failure(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
    )
}

/// Checks a path from the user: absolute, bounded, no NUL.
pub(crate) fn check_path(path: &str) -> Result<(), FilesError> {
    if path.len() > MAX_PATH || !path.starts_with('/') || path.contains('\0') {
        return Err(FilesError::InvalidPath(path.chars().take(200).collect()));
    }
    Ok(())
}

/// `dir/name` as a path.
pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A path for messages (invalid UTF-8 replaced).
pub(crate) fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Reads until `buf` is full or the file ends; the number of bytes read.
pub(crate) fn read_full(
    fs: &mut dyn GuestFs,
    path: &[u8],
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, FilesError> {
    let mut n = 0;
    while n < buf.len() {
        let k = fs.read(path, offset + n as u64, &mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}
