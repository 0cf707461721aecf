//! Inode numbers of directory entries, read straight from an ext2/3/4 filesystem.
//!
//! `ext4-view` does not expose inode numbers or link counts, which `files get` needs to
//! keep hard links. This reads just enough on its own: the superblock, a group
//! descriptor, an inode, its block map (extents or indirect blocks) and the linear
//! directory entries (htree interior blocks look like empty entries and are skipped).
//! Everything is untrusted: each read stays inside the partition, each count is bounded,
//! and a directory it cannot read yields an error the caller treats as "no link data".

use std::io::{Read, Seek, SeekFrom};

/// Most blocks of one directory read here (256 MiB of entries at 4 KiB blocks).
const MAX_DIR_BLOCKS: u64 = 65_536;
/// ext4 allows an extent tree of depth 5 at most.
const MAX_EXTENT_DEPTH: u16 = 5;
const EXTENTS_FL: u32 = 0x0008_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const INCOMPAT_64BIT: u32 = 0x80;

fn corrupt(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// An ext2/3/4 filesystem at `start..start+len` of `r`.
pub(crate) struct RawExt<R> {
    r: R,
    start: u64,
    len: u64,
    block_size: u64,
    /// Blocks one `dir_entries` call may still read (a corrupt tree cannot loop).
    budget: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    desc_table: u64,
}

impl<R: Read + Seek> RawExt<R> {
    pub(crate) fn open(mut r: R, start: u64, len: u64) -> std::io::Result<Self> {
        let mut sb = [0u8; 1024];
        read_in(&mut r, start, len, 1024, &mut sb)?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(corrupt("no ext superblock"));
        }
        let log = le32(&sb, 0x18);
        if log > 6 {
            return Err(corrupt("block size"));
        }
        let block_size = 1024u64 << log;
        let is64 = le32(&sb, 0x60) & INCOMPAT_64BIT != 0;
        let desc_size = if is64 { u64::from(le16(&sb, 0xFE)) } else { 32 };
        let inode_size = if le32(&sb, 0x4C) == 0 {
            128
        } else {
            u64::from(le16(&sb, 0x58))
        };
        let inodes_per_group = le32(&sb, 0x28);
        if !(32..=1024).contains(&desc_size)
            || !(128..=block_size).contains(&inode_size)
            || inodes_per_group == 0
        {
            return Err(corrupt("superblock geometry"));
        }
        let first_data_block = u64::from(le32(&sb, 0x14));
        Ok(RawExt {
            r,
            start,
            len,
            block_size,
            budget: 0,
            inodes_count: le32(&sb, 0x0),
            inodes_per_group,
            inode_size,
            desc_size,
            desc_table: (first_data_block + 1) * block_size,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        read_in(&mut self.r, self.start, self.len, offset, buf)
    }

    fn block(&mut self, n: u64) -> std::io::Result<Vec<u8>> {
        if n == 0 || self.budget == 0 {
            return Err(corrupt("block number out of range, or too many blocks"));
        }
        self.budget -= 1;
        let mut b = vec![0u8; self.block_size as usize];
        let off = n
            .checked_mul(self.block_size)
            .ok_or_else(|| corrupt("block"))?;
        self.read(off, &mut b)?;
        Ok(b)
    }

    /// The raw inode `ino` (at least 128 bytes).
    fn inode(&mut self, ino: u32) -> std::io::Result<Vec<u8>> {
        if ino == 0 || ino > self.inodes_count {
            return Err(corrupt("inode number out of range"));
        }
        let group = u64::from((ino - 1) / self.inodes_per_group);
        let index = u64::from((ino - 1) % self.inodes_per_group);
        let mut d = vec![0u8; self.desc_size as usize];
        self.read(self.desc_table + group * self.desc_size, &mut d)?;
        let mut table = u64::from(le32(&d, 0x8));
        if self.desc_size >= 64 {
            table |= u64::from(le32(&d, 0x28)) << 32;
        }
        let off = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * self.inode_size))
            .ok_or_else(|| corrupt("inode table"))?;
        let mut i = vec![0u8; self.inode_size as usize];
        self.read(off, &mut i)?;
        Ok(i)
    }

    /// The link count of inode `ino`.
    pub(crate) fn links(&mut self, ino: u32) -> std::io::Result<u16> {
        Ok(le16(&self.inode(ino)?, 0x1A))
    }

    /// `(name, inode)` of each entry of directory inode `ino`, `.` and `..` included.
    pub(crate) fn dir_entries(&mut self, ino: u32) -> std::io::Result<Vec<(Vec<u8>, u32)>> {
        let inode = self.inode(ino)?;
        if le16(&inode, 0) & 0xF000 != 0x4000 {
            return Err(corrupt("not a directory"));
        }
        let flags = le32(&inode, 0x20);
        if flags & INLINE_DATA_FL != 0 {
            return Err(corrupt("inline-data directory"));
        }
        let size = u64::from(le32(&inode, 0x4)) | (u64::from(le32(&inode, 0x6C)) << 32);
        let nblocks = size.div_ceil(self.block_size);
        if nblocks > MAX_DIR_BLOCKS {
            return Err(corrupt("directory too large"));
        }
        self.budget = 2 * MAX_DIR_BLOCKS;
        let mut blocks = Vec::new();
        let iblock = &inode[0x28..0x28 + 60];
        if flags & EXTENTS_FL != 0 {
            self.extent_blocks(iblock, MAX_EXTENT_DEPTH, nblocks, &mut blocks)?;
        } else {
            self.indirect_blocks(iblock, nblocks, &mut blocks)?;
        }
        let mut out = Vec::new();
        for b in blocks {
            let data = self.block(b)?;
            parse_dirents(&data, &mut out);
        }
        Ok(out)
    }

    /// Physical blocks of logical blocks `0..nblocks` mapped by the extent node `node`
    /// (holes skipped: a directory has none that matter).
    fn extent_blocks(
        &mut self,
        node: &[u8],
        depth_left: u16,
        nblocks: u64,
        out: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        if node.len() < 12 || le16(node, 0) != 0xF30A {
            return Err(corrupt("extent header"));
        }
        let entries = usize::from(le16(node, 2));
        let depth = le16(node, 6);
        if depth > depth_left || 12 + entries * 12 > node.len() {
            return Err(corrupt("extent node"));
        }
        for e in (0..entries).map(|i| &node[12 + i * 12..24 + i * 12]) {
            if out.len() as u64 >= nblocks {
                break;
            }
            if depth > 0 {
                let child = u64::from(le32(e, 4)) | (u64::from(le16(e, 8)) << 32);
                let data = self.block(child)?;
                self.extent_blocks(&data, depth - 1, nblocks, out)?;
            } else {
                let logical = u64::from(le32(e, 0));
                let raw_len = le16(e, 4);
                let n = u64::from(if raw_len > 32768 {
                    raw_len - 32768
                } else {
                    raw_len
                });
                let phys = u64::from(le32(e, 8)) | (u64::from(le16(e, 6)) << 32);
                for k in 0..n {
                    if logical + k >= nblocks || out.len() as u64 >= nblocks {
                        break;
                    }
                    out.push(phys + k);
                }
            }
        }
        Ok(())
    }

    /// Physical blocks of logical blocks `0..nblocks` through ext2/3 block pointers.
    fn indirect_blocks(
        &mut self,
        iblock: &[u8],
        nblocks: u64,
        out: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        for i in 0..15 {
            if out.len() as u64 >= nblocks {
                break;
            }
            let p = u64::from(le32(iblock, i * 4));
            let level = i.saturating_sub(11) as u32;
            self.pointer_tree(p, level, nblocks, out)?;
        }
        Ok(())
    }

    fn pointer_tree(
        &mut self,
        p: u64,
        level: u32,
        nblocks: u64,
        out: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        if out.len() as u64 >= nblocks || p == 0 {
            return Ok(());
        }
        if level == 0 {
            out.push(p);
            return Ok(());
        }
        let data = self.block(p)?;
        for q in data.chunks_exact(4) {
            let q = u64::from(u32::from_le_bytes([q[0], q[1], q[2], q[3]]));
            self.pointer_tree(q, level - 1, nblocks, out)?;
        }
        Ok(())
    }
}

/// Appends the live entries of one linear directory block.
fn parse_dirents(data: &[u8], out: &mut Vec<(Vec<u8>, u32)>) {
    let mut o = 0usize;
    while o + 8 <= data.len() {
        let ino = le32(data, o);
        let rec_len = usize::from(le16(data, o + 4));
        let name_len = usize::from(data[o + 6]);
        if rec_len < 8 || o + rec_len > data.len() {
            break;
        }
        if ino != 0 && 8 + name_len <= rec_len {
            out.push((data[o + 8..o + 8 + name_len].to_vec(), ino));
        }
        o += rec_len;
    }
}

fn read_in<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let end = offset.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > len) {
        return Err(corrupt("read beyond the partition"));
    }
    r.seek(SeekFrom::Start(start + offset))?;
    r.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes as a filesystem never panic, whatever inode is asked for.
        #[test]
        fn garbage_never_panics(mut img in proptest::collection::vec(any::<u8>(), 0..16384),
                                ino in 0u32..64) {
            if img.len() > 1024 + 0x3A {
                img[1024 + 0x38] = 0x53;
                img[1024 + 0x39] = 0xEF;
            }
            let len = img.len() as u64;
            if let Ok(mut fs) = RawExt::open(std::io::Cursor::new(img), 0, len) {
                let _ = fs.dir_entries(ino);
                let _ = fs.links(ino);
            }
        }

        #[test]
        fn dirents_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut out = Vec::new();
            parse_dirents(&data, &mut out);
        }
    }
}
