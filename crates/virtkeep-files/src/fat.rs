//! FAT12/16/32 (EFI system partitions) as a [`GuestFs`], through the pure-Rust `fatfs`
//! crate over a reader that refuses every write.
//!
//! FAT has no owners, permissions, symlinks or hard links: files show as `0644`
//! (`0444` when read-only), directories `0755`, owned by 0:0, each its own inode.
//! Times are local time without a zone; they are taken as UTC. Paths are walked here
//! entry by entry with a bound, not by `fatfs`'s own lookup, so a directory whose
//! cluster chain loops cannot hang a lookup.

use std::cell::Cell;
use std::io::{Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use crate::error::FilesError;
use crate::fs::{EntryKind, FsEntry, FsNode, GuestFs, MAX_DIR_ENTRIES, fs_err, show};

/// Bytes of the device kept in memory (`fatfs` reads FAT entries a few bytes at a time).
const CACHE_BLOCK: u64 = 64 << 10;
/// Bytes one call may read beyond the data it returns: a cluster chain that loops
/// ends here instead of hanging.
const READ_BUDGET: u64 = 256 << 20;

/// A device that can only be read, with one cached block for small reads.
pub(crate) struct ReadOnly<R> {
    r: R,
    len: u64,
    pos: u64,
    cache: Option<(u64, Vec<u8>)>,
    /// Bytes left to read in this call (shared with [`FatFs`], which sets it).
    budget: Rc<Cell<u64>>,
}

impl<R: Read + Seek> ReadOnly<R> {
    fn block(&mut self, at: u64) -> std::io::Result<&[u8]> {
        let start = at - at % CACHE_BLOCK;
        if self.cache.as_ref().is_none_or(|(s, _)| *s != start) {
            let n = CACHE_BLOCK.min(self.len - start) as usize;
            let mut b = vec![0u8; n];
            self.r.seek(SeekFrom::Start(start))?;
            self.r.read_exact(&mut b)?;
            self.cache = Some((start, b));
        }
        let (s, b) = self.cache.as_ref().expect("just filled");
        Ok(&b[(at - s) as usize..])
    }
}

impl<R: Read + Seek> Read for ReadOnly<R> {
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
        let want = (buf.len() as u64).min(self.len - self.pos) as usize;
        let left = self.budget.get();
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "read too much: the cluster chains loop",
            ));
        }
        let want = want.min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = if want as u64 >= CACHE_BLOCK {
            self.r.seek(SeekFrom::Start(self.pos))?;
            self.r.read(&mut buf[..want])?
        } else {
            let b = self.block(self.pos)?;
            let n = want.min(b.len());
            buf[..n].copy_from_slice(&b[..n]);
            n
        };
        self.pos += n as u64;
        self.budget.set(left.saturating_sub(n as u64));
        Ok(n)
    }
}

impl<R> Seek for ReadOnly<R> {
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

impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the backup is read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Fat<R> = fatfs::FileSystem<ReadOnly<R>>;
type Entry<'a, R> = fatfs::DirEntry<'a, ReadOnly<R>>;

/// A FAT filesystem spanning a whole reader.
pub(crate) struct FatFs<R: Read + Seek> {
    fs: Fat<R>,
    /// Inode numbers handed out: FAT has none, so each entry met gets the next.
    next_ino: u64,
    budget: Rc<Cell<u64>>,
}

impl<R: Read + Seek> FatFs<R> {
    pub(crate) fn open(r: R, len: u64) -> Result<Self, FilesError> {
        let budget = Rc::new(Cell::new(READ_BUDGET));
        let dev = ReadOnly {
            r,
            len,
            pos: 0,
            cache: None,
            budget: budget.clone(),
        };
        let fs = fatfs::FileSystem::new(dev, fatfs::FsOptions::new())
            .map_err(|e| fs_err("/", format!("not a readable FAT filesystem: {e}")))?;
        Ok(FatFs {
            fs,
            next_ino: 2,
            budget,
        })
    }
}

/// The entry at `path` (`None`: the root), walked with a bound per directory.
fn lookup<'a, R: Read + Seek>(
    fs: &'a Fat<R>,
    path: &[u8],
) -> Result<Option<Entry<'a, R>>, FilesError> {
    let mut found: Option<Entry<'a, R>> = None;
    for comp in path.split(|c| *c == b'/').filter(|c| !c.is_empty()) {
        let dir = match &found {
            None => fs.root_dir(),
            Some(e) if e.is_dir() => e.to_dir(),
            Some(_) => return Err(fs_err(&show(path), "not a directory")),
        };
        let comp = String::from_utf8_lossy(comp);
        let mut hit = None;
        for e in dir.iter().take(MAX_DIR_ENTRIES) {
            let e = e.map_err(|e| fs_err(&show(path), e))?;
            let name = e.file_name();
            if name == comp || name.eq_ignore_ascii_case(&comp) {
                hit = Some(e);
                break;
            }
        }
        found = Some(hit.ok_or_else(|| fs_err(&show(path), "no such file or directory"))?);
    }
    Ok(found)
}

/// Seconds since the epoch of a FAT time, taken as UTC.
fn epoch(t: fatfs::DateTime) -> (i64, u32) {
    let (y, m, d) = (
        i64::from(t.date.year),
        i64::from(t.date.month),
        i64::from(t.date.day),
    );
    // Days from civil (Howard Hinnant), valid for FAT's 1980..2107.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400
        + i64::from(t.time.hour) * 3600
        + i64::from(t.time.min) * 60
        + i64::from(t.time.sec);
    (secs, u32::from(t.time.millis.min(999)) * 1_000_000)
}

fn node<R: Read + Seek>(e: Option<&Entry<'_, R>>, ino: u64) -> FsNode {
    let Some(e) = e else {
        return FsNode {
            kind: EntryKind::Dir,
            size: 0,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            ino: 1,
            nlink: 1,
        };
    };
    let ro = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
    let (kind, mode, size) = if e.is_dir() {
        (EntryKind::Dir, 0o755, 0)
    } else {
        (EntryKind::File, if ro { 0o444 } else { 0o644 }, e.len())
    };
    let (mtime, mtime_nsec) = epoch(e.modified());
    FsNode {
        kind,
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime,
        mtime_nsec,
        ino,
        nlink: 1,
    }
}

impl<R: Read + Seek> GuestFs for FatFs<R> {
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError> {
        self.budget.set(READ_BUDGET);
        self.next_ino += 1;
        Ok(node(lookup(&self.fs, path)?.as_ref(), self.next_ino))
    }

    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError> {
        self.budget.set(READ_BUDGET);
        let dir = match lookup(&self.fs, path)? {
            None => self.fs.root_dir(),
            Some(e) if e.is_dir() => e.to_dir(),
            Some(_) => return Err(fs_err(&show(path), "not a directory")),
        };
        let mut out = Vec::new();
        // The volume label is an entry too; `.` and `..` are not shown.
        for e in dir.iter() {
            let e = e.map_err(|e| fs_err(&show(path), e))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= max.min(MAX_DIR_ENTRIES) {
                return Ok((out, true));
            }
            self.next_ino += 1;
            out.push(FsEntry::new(
                name.into_bytes(),
                node(Some(&e), self.next_ino),
            ));
        }
        Ok((out, false))
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError> {
        self.budget
            .set(READ_BUDGET.saturating_add(buf.len() as u64));
        let e = lookup(&self.fs, path)?.ok_or_else(|| fs_err("/", "a directory"))?;
        if !e.is_file() {
            return Err(fs_err(&show(path), "not a file"));
        }
        if offset >= e.len() {
            return Ok(0);
        }
        let mut f = e.to_file();
        f.seek(SeekFrom::Start(offset))
            .map_err(|err| fs_err(&show(path), err))?;
        let mut n = 0;
        while n < buf.len() {
            let k = f
                .read(&mut buf[n..])
                .map_err(|err| fs_err(&show(path), err))?;
            if k == 0 {
                break;
            }
            n += k;
        }
        let want = (buf.len() as u64).min(e.len() - offset);
        if (n as u64) < want {
            return Err(fs_err(
                &show(path),
                "the file's clusters end before its size",
            ));
        }
        Ok(n)
    }

    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError> {
        Err(fs_err(&show(path), "FAT has no symlinks"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_times_are_utc_seconds() {
        let t = fatfs::DateTime {
            date: fatfs::Date {
                year: 2020,
                month: 9,
                day: 13,
            },
            time: fatfs::Time {
                hour: 12,
                min: 26,
                sec: 40,
                millis: 0,
            },
        };
        assert_eq!(epoch(t), (1_600_000_000, 0));
    }
}
