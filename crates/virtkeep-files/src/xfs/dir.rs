//! XFS directories (format 2/3): shortform in the inode, or data blocks in the data
//! fork. Block, leaf and node directories keep their entries in data blocks of one
//! format below the 32 GiB leaf offset, so all three are read by walking those blocks
//! (the hash indexes above that offset only speed up lookups and are not needed).

use std::io::{Read, Seek};

use super::bmap::{Extent, read_mapped};
use super::inode::{Format, Inode};
use super::sb::{Dev, Res, Sb, XfsError, be16, be32, be64, corrupt};

/// One directory entry: name and inode number.
pub(crate) type DirEnt = (Vec<u8>, u64);

/// Most entries read from one directory.
pub(crate) const MAX_DIR_READ: usize = 4 << 20;
/// Most memory one directory's entries may take (names plus [`ENTRY_COST`] each).
/// The entry count alone would let a hostile image of 255-byte names hold about 1 GiB
/// in one call; 64 MiB still lists a directory of a million typical names.
pub(crate) const MAX_DIR_BYTES: usize = 64 << 20;
/// Bytes an entry takes beside its name: the name's `Vec` and the inode number.
const ENTRY_COST: usize = 32;

/// The entries of one directory read so far, bounded in count and bytes.
pub(crate) struct Entries {
    ino: u64,
    list: Vec<DirEnt>,
    bytes: usize,
    max_bytes: usize,
}

impl Entries {
    pub(crate) fn new(ino: u64, max_bytes: usize) -> Self {
        Entries {
            ino,
            list: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn push(&mut self, name: &[u8], ino: u64) -> Res<()> {
        let bytes = self.bytes + name.len() + ENTRY_COST;
        if bytes > self.max_bytes || self.list.len() >= MAX_DIR_READ {
            return Err(XfsError::Limit(format!(
                "directory inode {} holds more than {MAX_DIR_READ} entries or {} MiB of \
                 names ({} entries read): too large to read",
                self.ino,
                self.max_bytes >> 20,
                self.list.len()
            )));
        }
        self.bytes = bytes;
        self.list.push((name.to_vec(), ino));
        Ok(())
    }
}
/// Directory data blocks live below this byte offset of the directory.
const LEAF_OFFSET: u64 = 32 << 30;
const XD2B: u32 = 0x5844_3242; // "XD2B": single-block directory, v4
const XD2D: u32 = 0x5844_3244; // "XD2D": data block, v4
const XDB3: u32 = 0x5844_4233; // "XDB3", v5
const XDD3: u32 = 0x5844_4433; // "XDD3", v5

/// The entries of directory `dir` (without `.` and `..`).
pub(crate) fn entries<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    dir: &Inode,
    ext: &[Extent],
) -> Res<Vec<DirEnt>> {
    let mut out = Entries::new(dir.ino, MAX_DIR_BYTES);
    match dir.format {
        Format::Local => shortform(sb, dir, &mut out)?,
        Format::Extents | Format::Btree => blocks(dev, sb, dir, ext, &mut out)?,
        Format::Dev => return corrupt(format!("directory inode {} has no data", dir.ino)),
    }
    Ok(out.list)
}

/// A short directory in the inode: a header, then name length, a 2-byte offset, the
/// name, the file type (with ftype) and a 4- or 8-byte inode number per entry.
fn shortform(sb: &Sb, dir: &Inode, out: &mut Entries) -> Res<()> {
    let bad = || corrupt(format!("directory inode {}: bad short form", dir.ino));
    let f = &dir.fork;
    let size = usize::try_from(dir.size).unwrap_or(usize::MAX);
    // The header (count, i8count, parent inode) must fit in the size, not just the fork.
    let Some(f) = f.get(..size).filter(|f| f.len() >= 6) else {
        return bad();
    };
    let (count, i8count) = (usize::from(f[0]), f[1]);
    let inolen = if i8count == 0 { 4 } else { 8 };
    let mut pos = 2 + inolen;
    if pos > f.len() {
        return bad();
    }
    for _ in 0..count {
        let Some(&n) = f.get(pos) else { return bad() };
        let n = usize::from(n);
        let name_at = pos + 3;
        let ino_at = name_at + n + usize::from(sb.ftype);
        let Some(ino_b) = f.get(ino_at..ino_at + inolen) else {
            return bad();
        };
        let name = &f[name_at..name_at + n];
        if !good_name(name) {
            return bad();
        }
        let ino = if inolen == 4 {
            u64::from(be32(ino_b, 0))
        } else {
            be64(ino_b, 0)
        };
        out.push(name, ino)?;
        pos = ino_at + inolen;
    }
    Ok(())
}

/// A name XFS's verifiers accept: not empty, no '/' and no NUL (paths are joined with '/').
fn good_name(name: &[u8]) -> bool {
    !name.is_empty() && !name.iter().any(|&c| c == b'/' || c == 0)
}

/// Walks every data block below the leaf offset.
fn blocks<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    dir: &Inode,
    ext: &[Extent],
    out: &mut Entries,
) -> Res<()> {
    let dbs = sb.dir_block_size();
    let mut buf = vec![0u8; dbs as usize];
    let mut last = None;
    let bs = u64::from(sb.block_size);
    for e in ext {
        let first = e.off.saturating_mul(bs);
        if first >= LEAF_OFFSET {
            break;
        }
        let start = first / dbs;
        let end = (e.off + e.len)
            .saturating_mul(bs)
            .min(LEAF_OFFSET)
            .div_ceil(dbs);
        for db in start..end {
            // With multi-block directory blocks two extents may share one.
            if last == Some(db) {
                continue;
            }
            last = Some(db);
            read_mapped(dev, sb, ext, db * dbs, &mut buf)?;
            data_block(sb, dir.ino, &buf, db * dbs, out)?;
        }
    }
    Ok(())
}

/// Appends the entries of one data block (at byte `at` of directory `ino`).
fn data_block(sb: &Sb, ino: u64, b: &[u8], at: u64, out: &mut Entries) -> Res<()> {
    let bad = |what: &str| corrupt(format!("directory inode {ino}, block at {at}: {what}"));
    let magic = be32(b, 0);
    let (block, hdr) = match (sb.v5, magic) {
        (false, XD2B) => (true, 16),
        (false, XD2D) => (false, 16),
        (true, XDB3) => (true, 64),
        (true, XDD3) => (false, 64),
        _ => return bad("bad magic"),
    };
    if sb.v5 && be64(b, 40) != ino {
        return bad("belongs to another inode");
    }
    let mut end = b.len();
    if block {
        // A single-block directory ends with its hash leaf and a count/stale tail.
        let count = be32(b, end - 8) as usize;
        match count.checked_mul(8).and_then(|l| end.checked_sub(8 + l)) {
            Some(e) if e >= hdr => end = e,
            _ => return bad("bad leaf count"),
        }
    }
    let mut pos = hdr;
    // `end` is the block's length for a data block: every access stays below it.
    while pos + 8 <= end {
        if be16(b, pos) == 0xffff {
            let len = usize::from(be16(b, pos + 2));
            if len < 8 || len % 8 != 0 || pos + len > end {
                return bad("bad free space entry");
            }
            pos += len;
            continue;
        }
        // The smallest entry (a 1-byte name) takes 16 bytes.
        if pos + 16 > end {
            return bad("bad entry");
        }
        let n = usize::from(b[pos + 8]);
        let len = (8 + 1 + n + usize::from(sb.ftype) + 2).next_multiple_of(8);
        if n == 0 || pos + len > end {
            return bad("bad entry");
        }
        let name = &b[pos + 9..pos + 9 + n];
        if name != b"." && name != b".." {
            if !good_name(name) {
                return bad("bad name");
            }
            out.push(name, be64(b, pos))?;
        }
        pos += len;
    }
    Ok(())
}

/// The target of symlink `link` (at most 1024 bytes in XFS).
pub(crate) fn symlink<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    link: &Inode,
    ext: &[Extent],
) -> Res<Vec<u8>> {
    const MAXLEN: u64 = 1024;
    let bad = |what: &str| corrupt(format!("symlink inode {}: {what}", link.ino));
    if link.size == 0 || link.size > MAXLEN {
        return bad("bad size");
    }
    let size = link.size as usize;
    if link.format == Format::Local {
        return match link.fork.get(..size) {
            Some(t) => Ok(t.to_vec()),
            None => bad("longer than the inode"),
        };
    }
    if !sb.v5 {
        let mut t = vec![0u8; size];
        read_mapped(dev, sb, ext, 0, &mut t)?;
        return Ok(t);
    }
    // v5: each block starts with a 56-byte header naming the bytes it holds.
    let bs = u64::from(sb.block_size);
    let mut out = Vec::with_capacity(size);
    let mut blk = vec![0u8; bs as usize];
    let mut fb = 0u64;
    while out.len() < size {
        if fb > MAXLEN {
            return bad("blocks hold too little");
        }
        read_mapped(dev, sb, ext, fb * bs, &mut blk)?;
        if &blk[..4] != b"XSLM" || be32(&blk, 4) as usize != out.len() {
            return bad("bad block header");
        }
        let n = (be32(&blk, 8) as usize).min(size - out.len());
        match blk.get(56..56 + n) {
            Some(t) if n > 0 => out.extend_from_slice(t),
            _ => return bad("bad block length"),
        }
        fb += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xfs::sb::tests::sb;

    fn shortform_dir(fork: Vec<u8>, size: u64) -> Inode {
        Inode {
            ino: 128,
            mode: 0o040755,
            format: Format::Local,
            uid: 0,
            gid: 0,
            nlink: 2,
            size,
            mtime: 0,
            mtime_nsec: 0,
            nextents: 0,
            realtime: false,
            fork,
        }
    }

    /// A short-form fork: header (4-byte inodes, parent 128), then each entry.
    fn shortform_fork(names: &[&[u8]]) -> Vec<u8> {
        let mut f = vec![names.len() as u8, 0, 0, 0, 0, 128];
        for (i, n) in names.iter().enumerate() {
            f.extend_from_slice(&[n.len() as u8, 0, 0x60]);
            f.extend_from_slice(n);
            f.push(1); // ftype
            f.extend_from_slice(&(200 + i as u32).to_be_bytes());
        }
        f
    }

    #[test]
    fn shortform_reads_and_refuses_short_sizes() {
        let f = shortform_fork(&[b"etc", b"usr"]);
        let len = f.len() as u64;
        let mut got = any();
        shortform(&sb(), &shortform_dir(f.clone(), len), &mut got).expect("two entries");
        assert_eq!(
            got.list,
            vec![(b"etc".to_vec(), 200), (b"usr".to_vec(), 201)]
        );
        for size in [0, 1, 5] {
            assert!(shortform(&sb(), &shortform_dir(f.clone(), size), &mut any()).is_err());
        }
    }

    #[test]
    fn names_with_slash_or_nul_are_corrupt() {
        for bad in [&b"a/b"[..], b"a\0b", b"/"] {
            let f = shortform_fork(&[b"ok", bad]);
            let len = f.len() as u64;
            assert!(shortform(&sb(), &shortform_dir(f, len), &mut any()).is_err());
            let mut b = data_block_v4();
            entry(&mut b, 16, bad);
            assert!(data_block(&sb(), 128, &b, 0, &mut any()).is_err());
        }
    }

    /// Room for any test's entries.
    fn any() -> Entries {
        Entries::new(128, MAX_DIR_BYTES)
    }

    /// A v4 data block holding 14 entries with 255-byte names (272 bytes each).
    fn long_names_block(first: u8) -> Vec<u8> {
        let mut b = data_block_v4();
        for (k, at) in (16..4096 - 272).step_by(272).enumerate() {
            entry(&mut b, at, &[b'a' + first + k as u8; 255]);
        }
        b
    }

    #[test]
    fn names_beyond_the_byte_cap_are_refused() {
        // 14 entries of 255 + 32 bytes per block: two blocks pass a cap of 9 000 bytes
        // (8 036), the third does not, with an error saying why.
        let mut out = Entries::new(131, 9_000);
        for k in 0..2 {
            data_block(&sb(), 131, &long_names_block(k * 14), 0, &mut out).expect("fits");
        }
        assert_eq!(out.list.len(), 28);
        let e =
            data_block(&sb(), 131, &long_names_block(0), 8192, &mut out).expect_err("over the cap");
        let msg = e.to_string();
        assert!(
            msg.contains("directory inode 131") && msg.contains("too large"),
            "{msg}"
        );
        assert!(out.bytes <= 9_000);
        // The real cap holds far more than one block of the longest names.
        let mut out = any();
        data_block(&sb(), 131, &long_names_block(0), 0, &mut out).expect("fits");
        assert_eq!(out.bytes, 14 * (255 + ENTRY_COST));
    }

    /// An empty v4 data block: one free entry over all of it.
    fn data_block_v4() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(&XD2D.to_be_bytes());
        free(&mut b, 16, 4096 - 16);
        b
    }

    fn free(b: &mut [u8], at: usize, len: usize) {
        b[at..at + 2].copy_from_slice(&[0xff, 0xff]);
        b[at + 2..at + 4].copy_from_slice(&(len as u16).to_be_bytes());
    }

    /// Writes an entry for inode 300 at `at` and a free entry after it to the end.
    fn entry(b: &mut [u8], at: usize, name: &[u8]) {
        b[at..at + 8].copy_from_slice(&300u64.to_be_bytes());
        b[at + 8] = name.len() as u8;
        b[at + 9..at + 9 + name.len()].copy_from_slice(name);
        let len = (8 + 1 + name.len() + 1 + 2).next_multiple_of(8);
        free(b, at + len, b.len() - at - len);
    }

    #[test]
    fn data_block_ending_in_a_short_entry_is_corrupt() {
        let mut b = data_block_v4();
        entry(&mut b, 16, b"passwd");
        let mut out = any();
        data_block(&sb(), 128, &b, 0, &mut out).expect("one entry");
        assert_eq!(out.list, vec![(b"passwd".to_vec(), 300)]);
        // The free space stops 8 bytes short of the end: those bytes are no entry.
        free(&mut b, 40, 4096 - 40 - 8);
        b[4088..].fill(0);
        assert!(data_block(&sb(), 128, &b, 0, &mut any()).is_err());
    }
}
