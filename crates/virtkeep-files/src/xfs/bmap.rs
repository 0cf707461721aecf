//! The block map of an inode's data fork: an extent list in the inode, or a B+tree
//! whose root is in the inode and whose nodes and leaves are blocks. The tree is
//! untrusted: its depth, record counts and total extents are bounded, a block met twice
//! is a loop, and the extents must be sorted and must not overlap.

use std::collections::HashSet;
use std::io::{Read, Seek};

use super::inode::{Format, Inode};
use super::sb::{Dev, Res, Sb, be16, be32, be64, corrupt};

/// One mapping: file blocks `off..off+len` are filesystem blocks `block..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) off: u64,
    pub(crate) block: u64,
    pub(crate) len: u64,
    /// Preallocated, never written: reads as zeros.
    pub(crate) unwritten: bool,
}

/// Most extents of one file (32 bytes each in memory).
pub(crate) const MAX_EXTENTS: u64 = 1 << 21;
/// Deepest block-map B+tree (XFS itself stays below 10 levels).
const MAX_LEVEL: u16 = 10;
const BMAP_MAGIC: u32 = 0x424d_4150; // "BMAP", v4
const BMA3_MAGIC: u32 = 0x424d_4133; // "BMA3", v5

/// Decodes a 16-byte packed extent record.
fn record(b: &[u8]) -> Extent {
    let l0 = be64(b, 0);
    let l1 = be64(b, 8);
    Extent {
        off: (l0 & ((1 << 63) - 1)) >> 9,
        block: ((l0 & 0x1ff) << 43) | (l1 >> 21),
        len: l1 & ((1 << 21) - 1),
        unwritten: l0 >> 63 != 0,
    }
}

fn records(b: &[u8], n: usize, out: &mut Vec<Extent>) -> Res<()> {
    if out.len() as u64 + n as u64 > MAX_EXTENTS {
        return corrupt(format!("more than {MAX_EXTENTS} extents"));
    }
    let Some(recs) = b.get(..n * 16) else {
        return corrupt("extent records beyond their block");
    };
    out.extend(recs.chunks_exact(16).map(record));
    Ok(())
}

/// The extents of `inode`'s data fork, sorted by file offset and checked.
pub(crate) fn extents<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    inode: &Inode,
) -> Res<Vec<Extent>> {
    let mut out = Vec::new();
    match inode.format {
        Format::Extents => {
            if inode.nextents > (inode.fork.len() / 16) as u64 {
                return corrupt(format!("inode {}: too many extents", inode.ino));
            }
            records(&inode.fork, inode.nextents as usize, &mut out)?;
        }
        Format::Btree => btree(dev, sb, inode, &mut out)?,
        Format::Local | Format::Dev => {}
    }
    check(&out, inode.ino)?;
    Ok(out)
}

fn check(ext: &[Extent], ino: u64) -> Res<()> {
    let mut next = 0u64;
    for e in ext {
        if e.len == 0 || e.off < next {
            return corrupt(format!("inode {ino}: extents overlap or are out of order"));
        }
        next = e.off + e.len;
    }
    Ok(())
}

/// The B+tree's root in the inode: level, then keys and pointers sized by the fork.
fn btree<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    inode: &Inode,
    out: &mut Vec<Extent>,
) -> Res<()> {
    let f = &inode.fork;
    if f.len() < 4 + 16 {
        return corrupt(format!("inode {}: B+tree root too small", inode.ino));
    }
    let (level, n) = (be16(f, 0), usize::from(be16(f, 2)));
    let maxrecs = (f.len() - 4) / 16;
    if level == 0 || level > MAX_LEVEL || n == 0 || n > maxrecs {
        return corrupt(format!("inode {}: bad B+tree root", inode.ino));
    }
    let mut seen = HashSet::new();
    for i in 0..n {
        let ptr = be64(f, 4 + maxrecs * 8 + i * 8);
        walk(dev, sb, inode.ino, ptr, level - 1, &mut seen, out)?;
    }
    Ok(())
}

/// Appends the extents under B+tree block `fsbno`, which must be at `level`.
fn walk<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    ino: u64,
    fsbno: u64,
    level: u16,
    seen: &mut HashSet<u64>,
    out: &mut Vec<Extent>,
) -> Res<()> {
    let bad = |what: &str| corrupt(format!("inode {ino}: block map block {fsbno}: {what}"));
    if !seen.insert(fsbno) {
        return bad("met twice (the B+tree loops)");
    }
    let at = sb.block_byte(fsbno)?;
    let mut b = vec![0u8; sb.block_size as usize];
    dev.read_at(at, &mut b)?;
    let (magic, hdr) = if sb.v5 {
        (BMA3_MAGIC, 72)
    } else {
        (BMAP_MAGIC, 24)
    };
    if be32(&b, 0) != magic {
        return bad("bad magic");
    }
    // v5 blocks name their own address (512-byte units) and owner.
    if sb.v5 && (be64(&b, 24) != at >> 9 || be64(&b, 56) != ino) {
        return bad("belongs elsewhere");
    }
    let (blevel, n) = (be16(&b, 4), usize::from(be16(&b, 6)));
    let maxrecs = (b.len() - hdr) / 16;
    if blevel != level || n > maxrecs {
        return bad("bad level or record count");
    }
    if level == 0 {
        return records(&b[hdr..], n, out);
    }
    for i in 0..n {
        let ptr = be64(&b, hdr + maxrecs * 8 + i * 8);
        walk(dev, sb, ino, ptr, level - 1, seen, out)?;
    }
    Ok(())
}

/// Fills `buf` from byte `pos` of the file mapped by `ext`: holes and unwritten
/// extents read as zeros. The caller bounds `pos + buf.len()` by the file's size.
pub(crate) fn read_mapped<R: Read + Seek>(
    dev: &mut Dev<R>,
    sb: &Sb,
    ext: &[Extent],
    pos: u64,
    buf: &mut [u8],
) -> Res<()> {
    let bs = u64::from(sb.block_size);
    let mut done = 0usize;
    while done < buf.len() {
        let p = pos + done as u64;
        let fb = p >> sb.blocklog;
        let i = ext.partition_point(|e| e.off + e.len <= fb);
        let rest = (buf.len() - done) as u64;
        let n = match ext.get(i) {
            Some(e) if e.off <= fb => {
                let end = (e.off + e.len).saturating_mul(bs);
                let n = rest.min(end - p) as usize;
                if e.unwritten {
                    buf[done..done + n].fill(0);
                } else {
                    let at = sb.block_byte(e.block + (fb - e.off))? + (p & (bs - 1));
                    // An extent may cross AGs only in a corrupt map: check its last block too.
                    sb.block_byte(e.block + ((p + n as u64 - 1) >> sb.blocklog) - e.off)?;
                    dev.read_at(at, &mut buf[done..done + n])?;
                }
                n
            }
            // A hole up to the next extent or the end.
            next => {
                let n = match next {
                    Some(e) => rest.min(e.off.saturating_mul(bs) - p) as usize,
                    None => rest as usize,
                };
                buf[done..done + n].fill(0);
                n
            }
        };
        if n == 0 {
            return corrupt("block map does not advance");
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_records_decode() {
        // off 5, block 0x1234_5678_9, len 7, unwritten.
        let (off, block, len) = (5u64, 0x1_2345_6789u64, 7u64);
        let l0 = (1u64 << 63) | (off << 9) | (block >> 43);
        let l1 = (block << 21) | len;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&l0.to_be_bytes());
        b[8..].copy_from_slice(&l1.to_be_bytes());
        assert_eq!(
            record(&b),
            Extent {
                off,
                block,
                len,
                unwritten: true
            }
        );
        assert!(check(&[record(&b), record(&b)], 1).is_err());
    }
}
