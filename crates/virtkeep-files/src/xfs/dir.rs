//! XFS directories (format 2/3): shortform in the inode, or data blocks in the data
//! fork. Block, leaf and node directories keep their entries in data blocks of one
//! format below the 32 GiB leaf offset, so all three are read by walking those blocks
//! (the hash indexes above that offset only speed up lookups and are not needed).

use std::io::{Read, Seek};

use super::bmap::{Extent, read_mapped};
use super::inode::{Format, Inode};
use super::sb::{Dev, Res, Sb, be16, be32, be64, corrupt};

/// One directory entry: name and inode number.
pub(crate) type DirEnt = (Vec<u8>, u64);

/// Most entries read from one directory.
pub(crate) const MAX_DIR_READ: usize = 4 << 20;
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
    match dir.format {
        Format::Local => shortform(sb, dir),
        Format::Extents | Format::Btree => blocks(dev, sb, dir, ext),
        Format::Dev => corrupt(format!("directory inode {} has no data", dir.ino)),
    }
}

/// A short directory in the inode: a header, then name length, a 2-byte offset, the
/// name, the file type (with ftype) and a 4- or 8-byte inode number per entry.
fn shortform(sb: &Sb, dir: &Inode) -> Res<Vec<DirEnt>> {
    let bad = || corrupt(format!("directory inode {}: bad short form", dir.ino));
    let f = &dir.fork;
    let size = usize::try_from(dir.size).unwrap_or(usize::MAX);
    if f.len() < 6 || size > f.len() {
        return bad();
    }
    let f = &f[..size];
    let (count, i8count) = (usize::from(f[0]), f[1]);
    let inolen = if i8count == 0 { 4 } else { 8 };
    let mut pos = 2 + inolen;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(&n) = f.get(pos) else { return bad() };
        let n = usize::from(n);
        let name_at = pos + 3;
        let ino_at = name_at + n + usize::from(sb.ftype);
        let Some(ino_b) = f.get(ino_at..ino_at + inolen) else {
            return bad();
        };
        if n == 0 {
            return bad();
        }
        let ino = if inolen == 4 {
            u64::from(be32(ino_b, 0))
        } else {
            be64(ino_b, 0)
        };
        out.push((f[name_at..name_at + n].to_vec(), ino));
        pos = ino_at + inolen;
    }
    Ok(out)
}

/// Walks every data block below the leaf offset.
fn blocks<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    dir: &Inode,
    ext: &[Extent],
) -> Res<Vec<DirEnt>> {
    let dbs = sb.dir_block_size();
    let mut out = Vec::new();
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
            data_block(sb, dir.ino, &buf, db * dbs, &mut out)?;
        }
    }
    Ok(out)
}

/// Appends the entries of one data block (at byte `at` of directory `ino`).
fn data_block(sb: &Sb, ino: u64, b: &[u8], at: u64, out: &mut Vec<DirEnt>) -> Res<()> {
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
    while pos + 8 <= end {
        if be16(b, pos) == 0xffff {
            let len = usize::from(be16(b, pos + 2));
            if len < 8 || len % 8 != 0 || pos + len > end {
                return bad("bad free space entry");
            }
            pos += len;
            continue;
        }
        let n = usize::from(b[pos + 8]);
        let len = (8 + 1 + n + usize::from(sb.ftype) + 2).next_multiple_of(8);
        if n == 0 || pos + len > end {
            return bad("bad entry");
        }
        let name = &b[pos + 9..pos + 9 + n];
        if name != b"." && name != b".." {
            if out.len() >= MAX_DIR_READ {
                return bad("too many entries");
            }
            out.push((name.to_vec(), be64(b, pos)));
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
