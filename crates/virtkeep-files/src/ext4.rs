//! Read-only ext2/3/4 directory listing through the pure-Rust `ext4-view` crate, over
//! one partition of a disk view. The filesystem is untrusted: reads are confined to
//! the partition, a listing stops at [`MAX_DIR_ENTRIES`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::rc::Rc;

use crate::error::FilesError;
use crate::ext4raw::RawExt;
use crate::fs::{
    DirEntryInfo, DirListing, EntryKind, FsEntry, FsNode, GuestFs, MAX_DIR_ENTRIES, MAX_LINK,
    check_path, disk_failure, fs_err, join, show,
};

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

/// An `ext4-view` error at `path`: the disk failing becomes [`FilesError::Io`] (with the
/// repository's message), anything else [`FilesError::Filesystem`].
fn ext_err(path: &[u8], e: ext4_view::Ext4Error) -> FilesError {
    match &e {
        ext4_view::Ext4Error::Io(inner) => match inner.downcast_ref::<std::io::Error>() {
            Some(io) if disk_failure(io) => {
                FilesError::Io(std::io::Error::new(io.kind(), io.to_string()))
            }
            _ => fs_err(&show(path), e),
        },
        _ => fs_err(&show(path), e),
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
    check_path(path)?;
    let mut fs = ExtFs::open(r, start, len)?;
    list_fs(&mut fs, path)
}

/// List directory `path` of `fs`, sorted by name, symlink targets read.
pub fn list_fs(fs: &mut dyn GuestFs, path: &str) -> Result<DirListing, FilesError> {
    check_path(path)?;
    let (found, truncated) = fs.read_dir(path.as_bytes(), MAX_DIR_ENTRIES)?;
    let mut entries = Vec::with_capacity(found.len());
    for e in found {
        let n = e.node;
        let mut error = e.error;
        let target = if n.kind == EntryKind::Symlink {
            match fs.read_link(&join(path.as_bytes(), &e.name)) {
                Ok(t) => Some(String::from_utf8_lossy(&t).into_owned()),
                // A walk past its deadline or a failing disk ends the listing; a
                // damaged link does not.
                Err(
                    e @ (FilesError::TimedOut { .. } | FilesError::Repo(_) | FilesError::Io(_)),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    error = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        entries.push(DirEntryInfo {
            name: String::from_utf8_lossy(&e.name).into_owned(),
            kind: n.kind,
            size: n.size,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            mtime: n.mtime,
            target,
            error,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DirListing {
        path: path.to_string(),
        entries,
        truncated,
    })
}

/// One reader shared by `ext4-view` and [`RawExt`] (both on this thread).
struct Shared<R>(Rc<RefCell<R>>);

impl<R: Read> Read for Shared<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<R: Seek> Seek for Shared<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.borrow_mut().seek(pos)
    }
}

/// Most directory inode numbers remembered by path (then forgotten all at once).
const MAX_DIR_INOS: usize = 65_536;

/// ext2/3/4 as a [`GuestFs`]: `ext4-view` for everything but inode numbers and link
/// counts, which [`RawExt`] reads (hard links need them; without it none are kept).
pub(crate) struct ExtFs<R> {
    fs: ext4_view::Ext4,
    raw: Option<RawExt<Shared<R>>>,
    /// Inode numbers of directories met by `read_dir` (saves walking from the root).
    dir_inos: HashMap<Vec<u8>, u32>,
    /// The file last read, kept open for the next read of it.
    open: Option<(Vec<u8>, ext4_view::File)>,
}

impl<R: Read + Seek + 'static> ExtFs<R> {
    pub(crate) fn open(r: R, start: u64, len: u64) -> Result<Self, FilesError> {
        let shared = Rc::new(RefCell::new(r));
        let reader = PartReader::new(Shared(shared.clone()), start, len);
        let fs = ext4_view::Ext4::load(Box::new(reader)).map_err(|e| ext_err(b"/", e))?;
        let raw = RawExt::open(Shared(shared), start, len).ok();
        Ok(ExtFs {
            fs,
            raw,
            dir_inos: HashMap::new(),
            open: None,
        })
    }
}

impl<R: Read + Seek> ExtFs<R> {
    /// The inode of directory `path` through the raw reader, when it can tell.
    fn dir_ino(&mut self, path: &[u8]) -> Option<u32> {
        if let Some(i) = self.dir_inos.get(path) {
            return Some(*i);
        }
        let raw = self.raw.as_mut()?;
        let mut ino = 2; // the root directory
        for comp in path.split(|c| *c == b'/').filter(|s| !s.is_empty()) {
            let entries = raw.dir_entries(ino).ok()?;
            ino = entries
                .into_iter()
                .find(|(n, _)| n == comp)
                .map(|(_, i)| i)?;
        }
        Some(ino)
    }

    fn node(&mut self, m: &ext4_view::Metadata, ino: Option<u32>) -> FsNode {
        let k = kind(m.file_type());
        let nlink = match (ino, self.raw.as_mut()) {
            (Some(i), Some(raw)) if k == EntryKind::File => raw.links(i).map_or(1, u32::from),
            _ => 1,
        };
        let t = m.modified();
        FsNode {
            kind: k,
            size: m.len(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: t.seconds(),
            mtime_nsec: t.nanoseconds().min(999_999_999),
            ino: ino.map_or(0, u64::from),
            nlink,
        }
    }
}

fn ext_path(path: &[u8]) -> Result<ext4_view::Path<'_>, FilesError> {
    ext4_view::Path::try_from(path).map_err(|e| fs_err(&show(path), e))
}

impl<R: Read + Seek> GuestFs for ExtFs<R> {
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError> {
        let m = self
            .fs
            .symlink_metadata(ext_path(path)?)
            .map_err(|e| ext_err(path, e))?;
        let (parent, name) = match path.iter().rposition(|c| *c == b'/') {
            Some(i) => (&path[..i.max(1)], &path[i + 1..]),
            None => (&b"/"[..], path),
        };
        let ino = if name.is_empty() {
            self.dir_ino(b"/")
        } else {
            let dir = self.dir_ino(parent);
            match (dir, self.raw.as_mut()) {
                (Some(d), Some(raw)) => raw
                    .dir_entries(d)
                    .ok()
                    .and_then(|es| es.into_iter().find(|(n, _)| n == name).map(|(_, i)| i)),
                _ => None,
            }
        };
        Ok(self.node(&m, ino))
    }

    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError> {
        let p = ext_path(path)?;
        let iter = self.fs.read_dir(p).map_err(|e| ext_err(path, e))?;
        let inodes: HashMap<Vec<u8>, u32> = match (self.dir_ino(path), self.raw.as_mut()) {
            (Some(i), Some(raw)) => raw.dir_entries(i).unwrap_or_default(),
            _ => Vec::new(),
        }
        .into_iter()
        .collect();
        let mut out = Vec::new();
        for e in iter {
            let e = e.map_err(|e| ext_err(path, e))?;
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= max {
                return Ok((out, true));
            }
            let m = match e.metadata() {
                Ok(m) => m,
                Err(err) => match ext_err(&join(path, &name), err) {
                    e @ FilesError::Io(_) => return Err(e),
                    err => {
                        out.push(FsEntry::unreadable(name, err));
                        continue;
                    }
                },
            };
            let ino = inodes.get(&name).copied();
            let node = self.node(&m, ino);
            if let (EntryKind::Dir, Some(i)) = (node.kind, ino) {
                if self.dir_inos.len() >= MAX_DIR_INOS {
                    self.dir_inos.clear();
                }
                self.dir_inos.insert(join(path, &name), i);
            }
            out.push(FsEntry::new(name, node));
        }
        Ok((out, false))
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError> {
        let err = |e| ext_err(path, e);
        let f = match &mut self.open {
            Some((p, f)) if p == path => f,
            _ => {
                let f = self.fs.open(ext_path(path)?).map_err(err)?;
                &mut self.open.insert((path.to_vec(), f)).1
            }
        };
        if offset >= f.metadata().len() {
            return Ok(0);
        }
        if f.position() != offset {
            f.seek_to(offset).map_err(err)?;
        }
        f.read_bytes(buf).map_err(err)
    }

    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError> {
        let t = self
            .fs
            .read_link(ext_path(path)?)
            .map_err(|e| ext_err(path, e))?;
        let t = t.as_ref();
        if t.len() > MAX_LINK {
            return Err(fs_err(&show(path), "symlink target too long"));
        }
        Ok(t.to_vec())
    }
}
