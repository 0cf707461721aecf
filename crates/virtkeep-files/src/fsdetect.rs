//! What a partition holds, by its superblock magic (like blkid, for the few kinds a VM
//! disk usually has). Reads at most [`PROBE_BYTES`] from the start of the range.

use std::io::{Read, Seek};

use serde::Serialize;

use crate::partition::read_at;

/// Bytes read from the start of a range to recognise it.
pub const PROBE_BYTES: u64 = 68 << 10;

/// A recognised filesystem or volume signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    /// `ext2`, `ext3`, `ext4`, `xfs`, `vfat`, `ntfs`, `btrfs`, `LVM2_member`, `swap`.
    pub kind: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

fn text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

fn uuid(b: &[u8]) -> Option<String> {
    if b.iter().all(|c| *c == 0) {
        return None;
    }
    let h: String = b.iter().map(|c| format!("{c:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn info(kind: &str, label: Option<String>, uuid: Option<String>) -> Option<FsInfo> {
    Some(FsInfo {
        kind: kind.into(),
        label,
        uuid,
    })
}

/// Recognise the filesystem in the first bytes of a range (`b`, any length).
pub fn detect_bytes(b: &[u8]) -> Option<FsInfo> {
    if b.len() >= 2048 && le16(b, 1024 + 56) == 0xEF53 {
        let sb = &b[1024..2048];
        let (compat, incompat) = (le32(sb, 0x5C), le32(sb, 0x60));
        // extents, 64bit, flex_bg or huge files make it ext4; a journal ext3.
        let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return info(kind, text(&sb[0x78..0x88]), uuid(&sb[0x68..0x78]));
    }
    if b.len() >= 120 && &b[..4] == b"XFSB" {
        return info("xfs", text(&b[108..120]), uuid(&b[32..48]));
    }
    if b.len() >= 512 && &b[3..11] == b"NTFS    " {
        return info("ntfs", None, None);
    }
    if b.len() >= 512 && b[510..512] == [0x55, 0xAA] {
        if &b[82..87] == b"FAT32" {
            return info("vfat", text(&b[71..82]).filter(|l| l != "NO NAME"), None);
        }
        if &b[54..59] == b"FAT12" || &b[54..59] == b"FAT16" {
            return info("vfat", text(&b[43..54]).filter(|l| l != "NO NAME"), None);
        }
    }
    for s in 0..4usize {
        let o = s * 512;
        if b.len() >= o + 32 && &b[o..o + 8] == b"LABELONE" && &b[o + 24..o + 32] == b"LVM2 001" {
            let pv = b
                .get(o + 32..o + 64)
                .map(|u| String::from_utf8_lossy(u).to_string());
            return info("LVM2_member", None, pv);
        }
    }
    if b.len() >= 4096 && (&b[4086..4096] == b"SWAPSPACE2" || &b[4086..4096] == b"SWAP-SPACE") {
        return info("swap", text(&b[0x41c..0x42c]), uuid(&b[0x40c..0x41c]));
    }
    if b.len() >= 0x1022b && &b[0x10040..0x10048] == b"_BHRfS_M" {
        return info(
            "btrfs",
            text(&b[0x1012b..0x1022b]),
            uuid(&b[0x10020..0x10030]),
        );
    }
    None
}

/// Recognise the filesystem at `start..start+len` of a disk of `size` bytes.
pub fn detect<R: Read + Seek>(
    r: &mut R,
    size: u64,
    start: u64,
    len: u64,
) -> std::io::Result<Option<FsInfo>> {
    let n = len.min(PROBE_BYTES).min(size.saturating_sub(start));
    Ok(read_at(r, size, start, n)?.and_then(|b| detect_bytes(&b)))
}
