//! Read-only ext2/3/4 directory listing through the pure-Rust `ext4-view` crate, over
//! one partition of a disk view. The filesystem is untrusted: reads are confined to
//! the partition, a listing stops at [`MAX_DIR_ENTRIES`].

use std::io::{Read, Seek, SeekFrom};

use serde::Serialize;

use crate::error::FilesError;

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

/// `start..start+len` of a disk as the filesystem's whole device.
pub(crate) struct PartReader<R> {
    inner: R,
    start: u64,
    len: u64,
}

impl<R> PartReader<R> {
    pub(crate) fn new(inner: R, start: u64, len: u64) -> Self {
        PartReader { inner, start, len }
    }
}

impl<R: Read + Seek> ext4_view::Ext4Read for PartReader<R> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(format!(
                "read of {} bytes at {start_byte} beyond the partition's {} bytes",
                dst.len(),
                self.len
            )
            .into());
        }
        self.inner.seek(SeekFrom::Start(self.start + start_byte))?;
        self.inner.read_exact(dst)?;
        Ok(())
    }
}

pub(crate) fn kind(t: ext4_view::FileType) -> EntryKind {
    if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else if t.is_block_dev() {
        EntryKind::BlockDevice
    } else if t.is_char_dev() {
        EntryKind::CharDevice
    } else if t.is_fifo() {
        EntryKind::Fifo
    } else if t.is_socket() {
        EntryKind::Socket
    } else {
        EntryKind::File
    }
}

pub(crate) fn fs_err(path: &str, e: impl std::fmt::Display) -> FilesError {
    FilesError::Filesystem {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

/// List directory `path` of the ext2/3/4 filesystem at `start..start+len` of `r`
/// (synchronous: run it on a blocking thread).
pub fn list_ext4<R: Read + Seek + 'static>(
    r: R,
    start: u64,
    len: u64,
    path: &str,
) -> Result<DirListing, FilesError> {
    if path.len() > MAX_PATH || !path.starts_with('/') {
        return Err(FilesError::InvalidPath(path.chars().take(200).collect()));
    }
    let reader = PartReader {
        inner: r,
        start,
        len,
    };
    let fs = ext4_view::Ext4::load(Box::new(reader)).map_err(|e| fs_err("/", e))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    for e in fs.read_dir(path).map_err(|e| fs_err(path, e))? {
        let e = e.map_err(|e| fs_err(path, e))?;
        let name = e.file_name().display().to_string();
        if name == "." || name == ".." {
            continue;
        }
        if entries.len() >= MAX_DIR_ENTRIES {
            truncated = true;
            break;
        }
        let full = e.path();
        let m = e
            .metadata()
            .map_err(|err| fs_err(&full.display().to_string(), err))?;
        let k = kind(m.file_type());
        let target = if k == EntryKind::Symlink {
            let t = fs.read_link(&full).map_err(|err| fs_err(&name, err))?;
            Some(t.display().to_string())
        } else {
            None
        };
        entries.push(DirEntryInfo {
            name,
            kind: k,
            size: m.len(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.modified().seconds(),
            target,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DirListing {
        path: path.to_string(),
        entries,
        truncated,
    })
}
