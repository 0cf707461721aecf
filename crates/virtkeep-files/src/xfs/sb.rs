//! The XFS superblock, the geometry it gives (where a block or an inode is), and the
//! device every read goes through: confined to the partition and to a per-call budget.

use std::io::{Read, Seek, SeekFrom};

/// What went wrong reading an XFS filesystem (mapped to `FilesError` with the path).
#[derive(Debug, thiserror::Error)]
pub(crate) enum XfsError {
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    /// Beyond a memory bound of this reader (a huge or hostile directory).
    #[error("{0}")]
    Limit(String),
    #[error("reading the disk failed: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) type Res<T> = Result<T, XfsError>;

pub(crate) fn corrupt<T>(what: impl Into<String>) -> Res<T> {
    Err(XfsError::Corrupt(what.into()))
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Bytes one call may read beyond what it returns: a directory or B+tree that loops
/// ends with an error instead of hanging.
pub(crate) const READ_BUDGET: u64 = 256 << 20;

/// The partition, refusing reads past its end or beyond the call's budget.
pub(crate) struct Dev<R> {
    r: R,
    len: u64,
    pub(crate) budget: u64,
}

impl<R: Read + Seek> Dev<R> {
    pub(crate) fn new(r: R, len: u64) -> Self {
        Dev {
            r,
            len,
            budget: READ_BUDGET,
        }
    }

    /// Fills `buf` from byte `at` of the partition.
    pub(crate) fn read_at(&mut self, at: u64, buf: &mut [u8]) -> Res<()> {
        let n = buf.len() as u64;
        if at.checked_add(n).is_none_or(|e| e > self.len) {
            return corrupt(format!(
                "read of {n} bytes at {at} beyond the partition's {} bytes (truncated?)",
                self.len
            ));
        }
        if n > self.budget {
            return Err(XfsError::Limit(
                "read too much: the directory or block map loops".into(),
            ));
        }
        self.budget -= n;
        self.r.seek(SeekFrom::Start(at))?;
        self.r.read_exact(buf)?;
        Ok(())
    }
}

/// `versionnum`: directory format 2 (the only one read; every XFS since 1990s has it).
const VERSION_DIRV2: u16 = 0x2000;
/// `features2` of v4: directory entries carry the file type.
const FEATURES2_FTYPE: u32 = 0x200;
/// v5 incompatible features understood: ftype, sparse inodes, meta UUID, bigtime,
/// needsrepair, 64-bit extent counters, exchange-range, parent pointers.
const INCOMPAT_KNOWN: u32 = 0xff;
const INCOMPAT_FTYPE: u32 = 0x1;

/// The parts of the superblock the reader needs, checked for sanity.
#[derive(Debug, Clone)]
pub(crate) struct Sb {
    pub(crate) v5: bool,
    pub(crate) ftype: bool,
    pub(crate) block_size: u32,
    pub(crate) blocklog: u32,
    pub(crate) agblocks: u64,
    pub(crate) agblklog: u32,
    pub(crate) agcount: u64,
    pub(crate) inode_size: u32,
    pub(crate) inodelog: u32,
    pub(crate) inopblog: u32,
    pub(crate) rootino: u64,
    /// log2 of fs blocks per directory block.
    pub(crate) dirblklog: u32,
}

fn log2_exact(v: u64) -> Option<u32> {
    v.is_power_of_two().then(|| v.trailing_zeros())
}

impl Sb {
    /// Parses and checks the primary superblock (the first 512 bytes of the partition).
    pub(crate) fn parse(b: &[u8]) -> Res<Sb> {
        if b.len() < 512 || &b[..4] != b"XFSB" {
            return corrupt("not an XFS filesystem (no XFSB magic)");
        }
        let version = be16(b, 100);
        let v5 = match version & 0xf {
            5 => true,
            4 => false,
            v => return Err(XfsError::Unsupported(format!("XFS superblock version {v}"))),
        };
        if !v5 && version & VERSION_DIRV2 == 0 {
            return Err(XfsError::Unsupported(
                "XFS with version 1 directories".into(),
            ));
        }
        let incompat = be32(b, 216);
        if v5 && incompat & !INCOMPAT_KNOWN != 0 {
            return Err(XfsError::Unsupported(format!(
                "XFS incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            )));
        }
        let ftype = if v5 {
            incompat & INCOMPAT_FTYPE != 0
        } else {
            be32(b, 200) & FEATURES2_FTYPE != 0
        };
        let sb = Sb {
            v5,
            ftype,
            block_size: be32(b, 4),
            blocklog: u32::from(b[120]),
            agblocks: u64::from(be32(b, 84)),
            agblklog: u32::from(b[124]),
            agcount: u64::from(be32(b, 88)),
            inode_size: u32::from(be16(b, 104)),
            inodelog: u32::from(b[122]),
            inopblog: u32::from(b[123]),
            rootino: be64(b, 56),
            dirblklog: u32::from(b[192]),
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Res<()> {
        let bs = u64::from(self.block_size);
        let ok = (512..=65536).contains(&bs)
            && log2_exact(bs) == Some(self.blocklog)
            && (256..=2048).contains(&self.inode_size)
            && log2_exact(u64::from(self.inode_size)) == Some(self.inodelog)
            && self.inodelog <= self.blocklog
            && self.inopblog == self.blocklog - self.inodelog
            && self.agcount >= 1
            && self.agblocks >= 1
            && self.agblklog <= 31
            && self.agblocks <= 1 << self.agblklog
            && self.blocklog + self.dirblklog <= 16
            // Every byte offset of the filesystem must fit in u64 (see `ag_byte`).
            && self.agcount.checked_mul(self.agblocks).and_then(|b| b.checked_mul(bs)).is_some();
        if !ok {
            return corrupt("XFS superblock geometry is inconsistent");
        }
        Ok(())
    }

    fn ag_byte(&self, agno: u64, agbno: u64) -> Option<u64> {
        if agno >= self.agcount || agbno >= self.agblocks {
            return None;
        }
        // `check` made agcount·agblocks·block_size fit in u64: this and the offsets
        // within a block added to it by callers cannot overflow.
        agno.checked_mul(self.agblocks)?
            .checked_add(agbno)?
            .checked_mul(u64::from(self.block_size))
    }

    /// Byte offset of filesystem block `fsbno` (AG number and block in the AG).
    pub(crate) fn block_byte(&self, fsbno: u64) -> Res<u64> {
        let agno = fsbno.checked_shr(self.agblklog).unwrap_or(u64::MAX);
        let agbno = fsbno & ((1u64 << self.agblklog) - 1);
        match self.ag_byte(agno, agbno) {
            Some(b) => Ok(b),
            None => corrupt(format!("block {fsbno} outside the filesystem")),
        }
    }

    /// Byte offset of inode `ino`.
    pub(crate) fn inode_byte(&self, ino: u64) -> Res<u64> {
        let bits = self.agblklog + self.inopblog;
        let agno = ino.checked_shr(bits).unwrap_or(u64::MAX);
        let agbno = (ino >> self.inopblog) & ((1u64 << self.agblklog) - 1);
        let slot = ino & ((1u64 << self.inopblog) - 1);
        match self.ag_byte(agno, agbno) {
            Some(b) => Ok(b + (slot << self.inodelog)),
            None => corrupt(format!("inode {ino} outside the filesystem")),
        }
    }

    /// Bytes of a directory block.
    pub(crate) fn dir_block_size(&self) -> u64 {
        u64::from(self.block_size) << self.dirblklog
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A consistent v4 geometry: 4 KiB blocks, 512-byte inodes, 4 AGs of 2^16 blocks.
    pub(crate) fn sb() -> Sb {
        Sb {
            v5: false,
            ftype: true,
            block_size: 4096,
            blocklog: 12,
            agblocks: 1 << 16,
            agblklog: 16,
            agcount: 4,
            inode_size: 512,
            inodelog: 9,
            inopblog: 3,
            rootino: 128,
            dirblklog: 0,
        }
    }

    #[test]
    fn geometry_beyond_u64_bytes_is_refused() {
        assert!(sb().check().is_ok());
        // 2^32-1 AGs of 2^31 64 KiB blocks: 2^79 bytes, whose offsets would wrap.
        let big = Sb {
            block_size: 65536,
            blocklog: 16,
            agblocks: 1 << 31,
            agblklog: 31,
            agcount: u64::from(u32::MAX),
            inopblog: 7,
            ..sb()
        };
        assert!(big.check().is_err());
        let last = (u64::from(u32::MAX) - 1) << 31 | ((1 << 31) - 1);
        assert!(big.block_byte(last).is_err());
        assert_eq!(
            sb().block_byte((1 << 16) | 5).expect("in range"),
            ((1 << 16) + 5) << 12
        );
    }
}
