//! NTFS as a [`GuestFs`], through the pure-Rust, read-only `ntfs` crate.
//!
//! NTFS keeps Windows ACLs, not Unix modes: files show as `0644` (`0444` read-only),
//! directories `0755`, owned by 0:0. The MFT record number is the inode (hard links share
//! it). Symlinks are reparse points with the symlink tag (as Windows makes them) or
//! Interix symlinks (as ntfs-3g makes them by default); other reparse points are files. The metadata files (`$MFT`, …, records
//! below 16) and DOS 8.3 alias names are not listed. Names are looked up through the
//! directory's B-tree, case-insensitively as Windows does. Every call may read at most
//! [`READ_BUDGET`] bytes beyond what it returns: an index or run list that loops ends
//! with an error instead of hanging.

use std::io::{Read, Seek, SeekFrom};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsAttributeType, NtfsFile, NtfsReadSeek, NtfsTime};

use crate::error::FilesError;
use crate::fs::{
    EntryKind, FsEntry, FsNode, GuestFs, MAX_DIR_ENTRIES, MAX_LINK, disk_failure, fs_err, show,
};

const READ_BUDGET: u64 = 256 << 20;
/// MFT records below this are the filesystem's own metadata files.
const FIRST_USER_RECORD: u64 = 16;
const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
/// Largest reparse point read (the format allows 16 KiB).
const MAX_REPARSE: u64 = 16 << 10;

/// The partition, refusing reads past its end or beyond the call's budget.
struct Dev<R> {
    r: R,
    len: u64,
    pos: u64,
    budget: u64,
}

impl<R: Read + Seek> Read for Dev<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end of the partition (truncated?)",
            ));
        }
        if self.budget == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "read too much: the index or run lists loop",
            ));
        }
        let want = (buf.len() as u64).min(self.len - self.pos).min(self.budget) as usize;
        self.r.seek(SeekFrom::Start(self.pos))?;
        let n = self.r.read(&mut buf[..want])?;
        self.pos += n as u64;
        self.budget = self.budget.saturating_sub(n as u64);
        Ok(n)
    }
}

impl<R> Seek for Dev<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let p = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// An NTFS filesystem spanning a whole reader.
pub(crate) struct NtfsFs<R> {
    ntfs: Ntfs,
    dev: Dev<R>,
}

impl<R: Read + Seek> NtfsFs<R> {
    pub(crate) fn open(r: R, len: u64) -> Result<Self, FilesError> {
        let mut dev = Dev {
            r,
            len,
            pos: 0,
            budget: READ_BUDGET,
        };
        let bad = |e| fs_err("/", format!("not a readable NTFS filesystem: {e}"));
        let mut ntfs = Ntfs::new(&mut dev).map_err(bad)?;
        // Name lookups compare through the upcase table (and panic without it).
        ntfs.read_upcase_table(&mut dev).map_err(bad)?;
        Ok(NtfsFs { ntfs, dev })
    }
}

/// An `ntfs` error at `path`: the disk failing becomes [`FilesError::Io`] (with the
/// repository's message), anything else [`FilesError::Filesystem`].
fn ntfs_err(path: &[u8], e: ntfs::NtfsError) -> FilesError {
    match e {
        ntfs::NtfsError::Io(e) if disk_failure(&e) => FilesError::Io(e),
        e => fs_err(&show(path), e),
    }
}

/// The file at `path`, walked through each directory's index.
fn lookup<'n, R: Read + Seek>(
    ntfs: &'n Ntfs,
    dev: &mut Dev<R>,
    path: &[u8],
) -> Result<NtfsFile<'n>, FilesError> {
    let err = |e: ntfs::NtfsError| ntfs_err(path, e);
    let mut file = ntfs.root_directory(dev).map_err(err)?;
    for comp in path.split(|c| *c == b'/').filter(|c| !c.is_empty()) {
        let name = std::str::from_utf8(comp)
            .map_err(|_| fs_err(&show(path), "no such file or directory"))?;
        if !file.is_directory() {
            return Err(fs_err(&show(path), "not a directory"));
        }
        let next = {
            let index = file.directory_index(dev).map_err(err)?;
            let mut finder = index.finder();
            let entry = NtfsFileNameIndex::find(&mut finder, ntfs, dev, name)
                .ok_or_else(|| fs_err(&show(path), "no such file or directory"))?
                .map_err(err)?;
            entry.to_file(ntfs, dev).map_err(err)?
        };
        file = next;
    }
    Ok(file)
}

/// Seconds and nanoseconds since the Unix epoch of an NTFS time (100 ns since 1601).
fn epoch(t: NtfsTime) -> (i64, u32) {
    const EPOCH_DIFF: i64 = 11_644_473_600;
    let ts = t.nt_timestamp();
    let secs = i64::try_from(ts / 10_000_000).unwrap_or(i64::MAX) - EPOCH_DIFF;
    (secs, ((ts % 10_000_000) * 100) as u32)
}

/// The target of an Interix symlink (ntfs-3g's default): a system file holding
/// `IntxLNK\x01` and the target in UTF-16.
fn interix_target<R: Read + Seek>(
    file: &NtfsFile<'_>,
    dev: &mut Dev<R>,
) -> Result<Option<Vec<u8>>, ntfs::NtfsError> {
    let Some(item) = file.data(dev, "") else {
        return Ok(None);
    };
    let item = item?;
    let a = item.to_attribute()?;
    let len = a.value_length();
    if !(8..=8 + 2 * MAX_LINK as u64).contains(&len) || len % 2 != 0 {
        return Ok(None);
    }
    let mut b = vec![0u8; len as usize];
    a.value(dev)?.read_exact(dev, &mut b)?;
    if &b[..8] != b"IntxLNK\x01" {
        return Ok(None);
    }
    let units: Vec<u16> = b[8..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(Some(String::from_utf16_lossy(&units).into_bytes()))
}

/// The symlink target of a reparse point with the symlink tag (its print name,
/// `/`-separated) or of an Interix symlink, if the file is one.
fn symlink_target<R: Read + Seek>(
    file: &NtfsFile<'_>,
    dev: &mut Dev<R>,
) -> Result<Option<Vec<u8>>, ntfs::NtfsError> {
    let flags = file.info()?.file_attributes();
    if flags.contains(NtfsFileAttributeFlags::SYSTEM)
        && !file.is_directory()
        && let Some(t) = interix_target(file, dev)?
    {
        return Ok(Some(t));
    }
    let mut attrs = file.attributes();
    while let Some(item) = attrs.next(dev) {
        let item = item?;
        let a = item.to_attribute()?;
        if a.ty()? != NtfsAttributeType::ReparsePoint {
            continue;
        }
        let len = a.value_length().min(MAX_REPARSE) as usize;
        let mut b = vec![0u8; len];
        a.value(dev)?.read_exact(dev, &mut b)?;
        let le16 = |o: usize| {
            b.get(o..o + 2)
                .map(|x| usize::from(u16::from_le_bytes([x[0], x[1]])))
        };
        let tag = b
            .get(..4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
        if tag != Some(IO_REPARSE_TAG_SYMLINK) {
            return Ok(None);
        }
        // Tag, length, reserved, then substitute and print name (offset, length), flags.
        let (Some(off), Some(n)) = (le16(12), le16(14)) else {
            return Ok(None);
        };
        let Some(name) = b.get(20 + off..20 + off + n) else {
            return Ok(None);
        };
        let units: Vec<u16> = name
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let t = String::from_utf16_lossy(&units).replace('\\', "/");
        return Ok(Some(t.into_bytes()));
    }
    Ok(None)
}

fn node<R: Read + Seek>(file: &NtfsFile<'_>, dev: &mut Dev<R>) -> Result<FsNode, ntfs::NtfsError> {
    let info = file.info()?;
    let flags = info.file_attributes();
    let (mtime, mtime_nsec) = epoch(info.modification_time());
    let ro = flags.contains(NtfsFileAttributeFlags::READ_ONLY);
    let (kind, mode, size) = if file.is_directory() {
        (EntryKind::Dir, 0o755, 0)
    } else if flags
        .intersects(NtfsFileAttributeFlags::REPARSE_POINT | NtfsFileAttributeFlags::SYSTEM)
        && symlink_target(file, dev)?.is_some()
    {
        (EntryKind::Symlink, 0o777, 0)
    } else {
        let size = match file.data(dev, "") {
            Some(item) => item?.to_attribute()?.value_length(),
            None => 0,
        };
        (EntryKind::File, if ro { 0o444 } else { 0o644 }, size)
    };
    Ok(FsNode {
        kind,
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime,
        mtime_nsec,
        ino: file.file_record_number(),
        nlink: u32::from(file.hard_link_count().max(1)),
    })
}

impl<R: Read + Seek> GuestFs for NtfsFs<R> {
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError> {
        self.dev.budget = READ_BUDGET;
        let file = lookup(&self.ntfs, &mut self.dev, path)?;
        node(&file, &mut self.dev).map_err(|e| ntfs_err(path, e))
    }

    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError> {
        self.dev.budget = READ_BUDGET;
        let err = |e: ntfs::NtfsError| ntfs_err(path, e);
        let dev = &mut self.dev;
        let dir = lookup(&self.ntfs, dev, path)?;
        let index = dir.directory_index(dev).map_err(err)?;
        let mut iter = index.entries();
        let mut out = Vec::new();
        let mut seen = 0usize;
        while let Some(entry) = iter.next(dev) {
            let entry = entry.map_err(err)?;
            seen += 1;
            if seen > 2 * MAX_DIR_ENTRIES {
                return Err(fs_err(&show(path), "directory index too large or looping"));
            }
            let Some(key) = entry.key() else { continue };
            let key = key.map_err(err)?;
            let record = entry.file_reference().file_record_number();
            // The root's own `.` entry is record 5, below the first user record too.
            if key.namespace() == NtfsFileNamespace::Dos || record < FIRST_USER_RECORD {
                continue;
            }
            if out.len() >= max.min(MAX_DIR_ENTRIES) {
                return Ok((out, true));
            }
            let name = key.name().to_string_lossy().into_bytes();
            // A damaged file record is shown as such; the directory is still listed.
            // A failing disk ends the listing.
            match entry
                .to_file(&self.ntfs, dev)
                .and_then(|file| node(&file, dev))
            {
                Ok(node) => out.push(FsEntry::new(name, node)),
                Err(ntfs::NtfsError::Io(e)) if disk_failure(&e) => {
                    return Err(FilesError::Io(e));
                }
                Err(e) => out.push(FsEntry::unreadable(name, e)),
            }
        }
        Ok((out, false))
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError> {
        self.dev.budget = READ_BUDGET.saturating_add(buf.len() as u64);
        let err = |e: ntfs::NtfsError| ntfs_err(path, e);
        let dev = &mut self.dev;
        let file = lookup(&self.ntfs, dev, path)?;
        let Some(item) = file.data(dev, "") else {
            return Ok(0);
        };
        let item = item.map_err(err)?;
        let attr = item.to_attribute().map_err(err)?;
        let len = attr.value_length();
        if offset >= len {
            return Ok(0);
        }
        let mut value = attr.value(dev).map_err(err)?;
        value.seek(dev, SeekFrom::Start(offset)).map_err(err)?;
        let want = (buf.len() as u64).min(len - offset) as usize;
        value.read_exact(dev, &mut buf[..want]).map_err(err)?;
        Ok(want)
    }

    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError> {
        self.dev.budget = READ_BUDGET;
        let file = lookup(&self.ntfs, &mut self.dev, path)?;
        let t = symlink_target(&file, &mut self.dev)
            .map_err(|e| ntfs_err(path, e))?
            .ok_or_else(|| fs_err(&show(path), "not a symlink"))?;
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
    fn ntfs_times_are_unix_seconds() {
        let t = NtfsTime::from(116_444_736_000_000_000u64 + 16_000_000_000_000_000 + 5);
        assert_eq!(epoch(t), (1_600_000_000, 500));
    }
}
