//! XFS as a [`GuestFs`]: a bounded, read-only reader written here, because no kept
//! pure-Rust XFS crate exists.
//!
//! It reads v5 (CRC, the mkfs.xfs default since 2014) and v4 superblocks, inodes in all
//! three data fork formats (inline, extent list, block-map B+tree), directories in all
//! four forms (shortform, block, leaf, node: their entries are in data blocks of one
//! format) and symlinks (inline and in blocks). Holes and unwritten extents read as
//! zeros. Metadata CRCs are not verified (no CRC32c here, and a torn log-less write
//! should not make the rest of a backup unreadable): magic numbers, the block and
//! owner numbers of v5 blocks and every length are checked instead, and each call may
//! read at most [`sb::READ_BUDGET`] bytes beyond what it returns, so a corrupt image
//! gives an error, never a panic or a hang. The log is not replayed: a backup of a
//! running guest reads as after a crash without recovery (the guest agent's freeze, when
//! used, flushes it). Files on a realtime device are refused.

mod bmap;
mod dir;
mod inode;
mod sb;

use std::collections::HashMap;
use std::io::{Read, Seek};

use crate::error::FilesError;
use crate::fs::{EntryKind, FsEntry, FsNode, GuestFs, MAX_LINK, fs_err, show};
use bmap::Extent;
use inode::{Format, Inode, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use sb::{Dev, READ_BUDGET, Res, Sb, XfsError};

/// Most paths whose inode number is remembered (then forgotten all at once).
const MAX_CACHED_PATHS: usize = 65_536;
/// Most bytes of remembered paths: paths may be 4 KiB long, and 64 Ki of them would
/// hold 256 MiB.
const MAX_CACHED_PATH_BYTES: usize = 16 << 20;
/// Bytes a remembered path takes beside its own (its `Vec`, the inode number, the
/// table's slot).
const PATH_COST: usize = 48;

/// Inode numbers of paths, bounded in count and bytes: when full, it is emptied (a
/// walk reads directories in order, so old paths are rarely asked for again).
struct PathCache {
    map: HashMap<Vec<u8>, u64>,
    bytes: usize,
    max_bytes: usize,
}

impl PathCache {
    fn new(max_bytes: usize) -> Self {
        PathCache {
            map: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn get(&self, path: &[u8]) -> Option<u64> {
        self.map.get(path).copied()
    }

    fn insert(&mut self, path: Vec<u8>, ino: u64) {
        let cost = path.len() + PATH_COST;
        if self.map.len() >= MAX_CACHED_PATHS || self.bytes + cost > self.max_bytes {
            self.map = HashMap::new();
            self.bytes = 0;
        }
        if self.map.insert(path, ino).is_none() {
            self.bytes += cost;
        }
    }
}

/// An XFS filesystem spanning a whole reader.
pub(crate) struct XfsFs<R> {
    dev: Dev<R>,
    sb: Sb,
    /// Inode numbers of paths met (saves walking from the root for each file).
    inos: PathCache,
    /// The directory last searched by name, and its entries.
    dir: Option<(u64, HashMap<Vec<u8>, u64>)>,
    /// The file last read, with its block map, kept for the next read of it.
    open: Option<(Vec<u8>, Inode, Vec<Extent>)>,
}

fn err(path: &[u8], e: XfsError) -> FilesError {
    fs_err(&show(path), e)
}

fn kind(mode: u16) -> EntryKind {
    match mode & S_IFMT {
        S_IFDIR => EntryKind::Dir,
        S_IFLNK => EntryKind::Symlink,
        0o060000 => EntryKind::BlockDevice,
        0o020000 => EntryKind::CharDevice,
        0o010000 => EntryKind::Fifo,
        0o140000 => EntryKind::Socket,
        _ => EntryKind::File,
    }
}

fn node(i: &Inode) -> FsNode {
    let k = kind(i.mode);
    FsNode {
        kind: k,
        size: if matches!(k, EntryKind::File | EntryKind::Dir | EntryKind::Symlink) {
            i.size
        } else {
            0
        },
        mode: i.mode & 0o7777,
        uid: i.uid,
        gid: i.gid,
        mtime: i.mtime,
        mtime_nsec: i.mtime_nsec,
        ino: i.ino,
        nlink: i.nlink.max(1),
    }
}

impl<R: Read + Seek> XfsFs<R> {
    pub(crate) fn open(r: R, len: u64) -> Result<Self, FilesError> {
        let mut dev = Dev::new(r, len);
        let mut b = vec![0u8; 512];
        let sb = dev
            .read_at(0, &mut b)
            .and_then(|()| Sb::parse(&b))
            .map_err(|e| err(b"/", e))?;
        let mut fs = XfsFs {
            dev,
            sb,
            inos: PathCache::new(MAX_CACHED_PATH_BYTES),
            dir: None,
            open: None,
        };
        let root = fs.inode(fs.sb.rootino).map_err(|e| err(b"/", e))?;
        if root.mode & S_IFMT != S_IFDIR {
            return Err(err(
                b"/",
                XfsError::Corrupt("root is not a directory".into()),
            ));
        }
        Ok(fs)
    }

    fn inode(&mut self, ino: u64) -> Res<Inode> {
        inode::read(&mut self.dev, &self.sb, ino)
    }

    fn extents(&mut self, i: &Inode) -> Res<Vec<Extent>> {
        if i.realtime && i.mode & S_IFMT == S_IFREG {
            return Err(XfsError::Unsupported(
                "file on the XFS realtime device (not in this partition)".into(),
            ));
        }
        bmap::extents(&mut self.dev, &self.sb, i)
    }

    fn dir_entries(&mut self, d: &Inode) -> Res<Vec<dir::DirEnt>> {
        let ext = self.extents(d)?;
        dir::entries(&mut self.dev, &self.sb, d, &ext)
    }

    fn remember(&mut self, path: Vec<u8>, ino: u64) {
        self.inos.insert(path, ino);
    }

    /// The inode number of `path` in directory `d`'s entries.
    fn find(&mut self, d: &Inode, name: &[u8]) -> Res<Option<u64>> {
        if self.dir.as_ref().is_none_or(|(ino, _)| *ino != d.ino) {
            let map = self.dir_entries(d)?.into_iter().collect();
            self.dir = Some((d.ino, map));
        }
        Ok(self.dir.as_ref().and_then(|(_, m)| m.get(name).copied()))
    }

    /// The inode of `path` (a final symlink not followed; symlinks on the way refused).
    fn lookup(&mut self, path: &[u8]) -> Result<Inode, FilesError> {
        let e = |e| err(path, e);
        let nf = || fs_err(&show(path), "no such file or directory");
        if let Some(ino) = self.inos.get(path) {
            return self.inode(ino).map_err(e);
        }
        let mut cur = self.inode(self.sb.rootino).map_err(e)?;
        let mut walked = Vec::with_capacity(path.len());
        for comp in path.split(|c| *c == b'/').filter(|c| !c.is_empty()) {
            if cur.mode & S_IFMT != S_IFDIR {
                return Err(fs_err(&show(path), "not a directory"));
            }
            walked.push(b'/');
            walked.extend_from_slice(comp);
            let ino = match self.inos.get(&walked) {
                Some(i) => i,
                None => self.find(&cur, comp).map_err(e)?.ok_or_else(nf)?,
            };
            cur = self.inode(ino).map_err(e)?;
            self.remember(walked.clone(), ino);
        }
        Ok(cur)
    }
}

impl<R: Read + Seek> GuestFs for XfsFs<R> {
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError> {
        self.dev.budget = READ_BUDGET;
        Ok(node(&self.lookup(path)?))
    }

    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError> {
        self.dev.budget = READ_BUDGET;
        let d = self.lookup(path)?;
        if d.mode & S_IFMT != S_IFDIR {
            return Err(fs_err(&show(path), "not a directory"));
        }
        let found = self.dir_entries(&d).map_err(|e| err(path, e))?;
        let mut out = Vec::with_capacity(found.len().min(max));
        for (name, ino) in found {
            if out.len() >= max {
                return Ok((out, true));
            }
            let p = crate::fs::join(path, &name);
            match self.inode(ino) {
                Ok(i) => {
                    self.remember(p, ino);
                    out.push(FsEntry::new(name, node(&i)));
                }
                // A damaged inode is shown as such; a spent budget or a failing disk
                // ends the listing.
                Err(e @ (XfsError::Corrupt(_) | XfsError::Unsupported(_))) => {
                    out.push(FsEntry::unreadable(name, e));
                }
                Err(e) => return Err(err(&p, e)),
            }
        }
        Ok((out, false))
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError> {
        self.dev.budget = READ_BUDGET.saturating_add(buf.len() as u64);
        if self.open.as_ref().is_none_or(|(p, _, _)| p != path) {
            let i = self.lookup(path)?;
            if i.mode & S_IFMT != S_IFREG {
                return Err(fs_err(&show(path), "not a regular file"));
            }
            let ext = self.extents(&i).map_err(|e| err(path, e))?;
            self.open = Some((path.to_vec(), i, ext));
        }
        let Some((_, i, ext)) = &self.open else {
            return Ok(0);
        };
        if offset >= i.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(i.size - offset) as usize;
        let r = if i.format == Format::Local {
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            match i.fork.get(at..at.saturating_add(n)) {
                Some(s) => {
                    buf[..n].copy_from_slice(s);
                    Ok(())
                }
                None => Err(XfsError::Corrupt("inline data beyond the inode".into())),
            }
        } else {
            bmap::read_mapped(&mut self.dev, &self.sb, ext, offset, &mut buf[..n])
        };
        r.map_err(|e| err(path, e))?;
        Ok(n)
    }

    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError> {
        self.dev.budget = READ_BUDGET;
        let i = self.lookup(path)?;
        if i.mode & S_IFMT != S_IFLNK {
            return Err(fs_err(&show(path), "not a symlink"));
        }
        let t = self
            .extents(&i)
            .and_then(|ext| dir::symlink(&mut self.dev, &self.sb, &i, &ext))
            .map_err(|e| err(path, e))?;
        if t.len() > MAX_LINK {
            return Err(fs_err(&show(path), "symlink target too long"));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_cache_stays_within_its_bytes() {
        let mut c = PathCache::new(100 * (4096 + PATH_COST));
        for k in 0..1_000u64 {
            let mut p = vec![b'a'; 4096];
            p.extend_from_slice(k.to_string().as_bytes());
            c.insert(p, k);
            assert!(c.bytes <= c.max_bytes, "{} bytes after {k}", c.bytes);
            assert_eq!(
                c.bytes,
                c.map.keys().map(|p| p.len() + PATH_COST).sum::<usize>()
            );
        }
        // Emptied when full, the newest path is still there; a repeat costs nothing.
        assert!(c.map.len() < 100);
        let newest = [&[b'a'; 4096][..], b"999"].concat();
        assert_eq!(c.get(&newest), Some(999));
        let before = c.bytes;
        c.insert(newest, 999);
        assert_eq!(c.bytes, before);
    }
}
