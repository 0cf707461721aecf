//! An XFS inode (v1/v2 cores of v4 filesystems, v3 of v5): what a file is, and its data
//! fork (inline bytes, an extent list, or the root of a block-map B+tree).

use std::io::{Read, Seek};

use super::sb::{Dev, Res, Sb, XfsError, be16, be32, be64, corrupt};

/// How the data fork is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Device numbers (device files, fifos, sockets): no data.
    Dev,
    /// The data is in the inode (short directories and symlinks).
    Local,
    Extents,
    Btree,
}

/// The parts of an inode the reader needs.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    pub(crate) ino: u64,
    pub(crate) mode: u16,
    pub(crate) format: Format,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) nlink: u32,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    /// Extent records of the data fork (for `Extents`).
    pub(crate) nextents: u64,
    /// Data on the realtime device, which a backup of one partition does not have.
    pub(crate) realtime: bool,
    /// The data fork's bytes.
    pub(crate) fork: Vec<u8>,
}

const DIFLAG_REALTIME: u16 = 0x1;
const DIFLAG2_BIGTIME: u64 = 0x8;
const DIFLAG2_NREXT64: u64 = 0x10;
/// Seconds from 1901-12-13 (bigtime's zero) to the Unix epoch.
const BIGTIME_EPOCH_OFFSET: i64 = 1 << 31;

pub(crate) const S_IFMT: u16 = 0o170000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFREG: u16 = 0o100000;

/// `sec`, `nsec` of the timestamp at `at` (bigtime: nanoseconds since 1901).
fn time(b: &[u8], at: usize, bigtime: bool) -> (i64, u32) {
    if bigtime {
        let ns = be64(b, at);
        let secs = (ns / 1_000_000_000) as i64 - BIGTIME_EPOCH_OFFSET;
        (secs, (ns % 1_000_000_000) as u32)
    } else {
        let secs = i64::from(be32(b, at) as i32);
        (secs, be32(b, at + 4).min(999_999_999))
    }
}

/// Parses inode `ino` from its `sb.inode_size` bytes.
pub(crate) fn parse(sb: &Sb, ino: u64, b: &[u8]) -> Res<Inode> {
    let bad = |what: &str| corrupt(format!("inode {ino}: {what}"));
    if b.len() < sb.inode_size as usize || be16(b, 0) != 0x494e {
        return bad("bad magic");
    }
    let version = b[4];
    let v3 = version == 3;
    if v3 != sb.v5 || version == 0 || version > 3 {
        return bad("bad version");
    }
    if v3 && be64(b, 152) != ino {
        return bad("holds another inode's number");
    }
    let flags2 = if v3 { be64(b, 120) } else { 0 };
    let core = if v3 { 176 } else { 100 };
    let forkoff = usize::from(b[82]) * 8;
    let end = if forkoff == 0 {
        sb.inode_size as usize
    } else {
        core + forkoff
    };
    if end > sb.inode_size as usize {
        return bad("attribute fork offset beyond the inode");
    }
    let format = match b[5] {
        0 => Format::Dev,
        1 => Format::Local,
        2 => Format::Extents,
        3 => Format::Btree,
        f => {
            return Err(XfsError::Unsupported(format!(
                "inode {ino}: data fork format {f}"
            )));
        }
    };
    let (mtime, mtime_nsec) = time(b, 40, v3 && flags2 & DIFLAG2_BIGTIME != 0);
    let nextents = if v3 && flags2 & DIFLAG2_NREXT64 != 0 {
        be64(b, 24)
    } else {
        u64::from(be32(b, 76))
    };
    Ok(Inode {
        ino,
        mode: be16(b, 2),
        format,
        uid: be32(b, 8),
        gid: be32(b, 12),
        nlink: if version == 1 {
            u32::from(be16(b, 6))
        } else {
            be32(b, 16)
        },
        size: be64(b, 56),
        mtime,
        mtime_nsec,
        nextents,
        realtime: be16(b, 90) & DIFLAG_REALTIME != 0,
        fork: b[core..end].to_vec(),
    })
}

/// Reads and parses inode `ino`.
pub(crate) fn read<R: Read + Seek>(dev: &mut Dev<R>, sb: &Sb, ino: u64) -> Res<Inode> {
    let at = sb.inode_byte(ino)?;
    let mut b = vec![0u8; sb.inode_size as usize];
    dev.read_at(at, &mut b)?;
    parse(sb, ino, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigtime_and_classic_times() {
        let mut b = [0u8; 8];
        let ns = (BIGTIME_EPOCH_OFFSET as u64 + 1_600_000_000) * 1_000_000_000 + 7;
        b.copy_from_slice(&ns.to_be_bytes());
        assert_eq!(time(&b, 0, true), (1_600_000_000, 7));
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&(-5i32).to_be_bytes());
        c[4..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(time(&c, 0, false), (-5, 9));
    }
}
