//! GPT and MBR partition tables (with extended/logical partitions), parsed from
//! untrusted disk bytes.
//!
//! Every read is bounded by the disk size and a fixed cap, the GPT entry array is at
//! most [`MAX_GPT_ENTRY_BYTES`], the EBR chain at most [`MAX_LOGICAL`] links and a link
//! seen twice ends it: a hostile table yields warnings, never a panic or a hang.
//! MBR sectors are 512 bytes (what libvirt disks present to guests by default); a GPT
//! is looked for with 512-byte sectors first, then with 4096-byte ones (disks with a
//! 4K logical block size, e.g. `<blockio logical_block_size='4096'/>`).

use std::io::{Read, Seek, SeekFrom};

use serde::Serialize;

/// Logical sector size assumed for partition tables.
pub const SECTOR: u64 = 512;
/// The other logical sector size a GPT may use.
const SECTOR_4K: u64 = 4096;
/// Upper bound of a GPT partition entry array read.
pub const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;
/// Upper bound of logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: usize = 128;

const GPT_SIG: &[u8; 8] = b"EFI PART";

/// Which kind of table the disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
    None,
}

/// One partition, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based number as Linux names it (MBR logical partitions from 5).
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// GPT type GUID (upper case) or MBR type byte (`0x83`).
    pub type_id: String,
    /// A readable name for well-known types.
    pub type_name: Option<&'static str>,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT unique partition GUID.
    pub guid: Option<String>,
    /// MBR: a logical partition inside the extended one.
    pub logical: bool,
}

/// A parsed table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// GPT disk GUID.
    pub disk_guid: Option<String>,
    pub partitions: Vec<Partition>,
    /// What was wrong and skipped (bad CRC, entries outside the disk, EBR loops).
    pub warnings: Vec<String>,
}

/// Reads `len` bytes at `off`, or `None` when the range is not inside `size`.
pub(crate) fn read_at<R: Read + Seek>(
    r: &mut R,
    size: u64,
    off: u64,
    len: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    match off.checked_add(len) {
        Some(end) if end <= size && len <= MAX_GPT_ENTRY_BYTES => {}
        _ => return Ok(None),
    }
    r.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A GUID in its usual text form (the first three fields are little-endian).
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn gpt_type_name(g: &str) -> Option<&'static str> {
    Some(match g {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => return None,
    })
}

fn mbr_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x05 | 0x0f | 0x85 => "Extended",
        0x07 => "NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xee => "GPT protective",
        0xef => "EFI system",
        0xfd => "Linux RAID",
        _ => return None,
    })
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// Parse the partition table of a disk of `size` bytes read through `r`.
pub fn read_table<R: Read + Seek>(r: &mut R, size: u64) -> std::io::Result<PartitionTable> {
    let mut t = PartitionTable {
        kind: TableKind::None,
        disk_guid: None,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let Some(mbr) = read_at(r, size, 0, SECTOR)? else {
        return Ok(t);
    };
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(t);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xee) {
        gpt(r, size, &mut t)?;
        if t.kind == TableKind::Gpt {
            return Ok(t);
        }
        t.warnings
            .push("protective MBR without a valid GPT header".into());
    }
    // A FAT or NTFS boot sector also ends in 55 AA: it is not a table.
    if &mbr[3..11] == b"NTFS    "
        || &mbr[54..59] == b"FAT12"
        || &mbr[54..59] == b"FAT16"
        || &mbr[82..87] == b"FAT32"
    {
        return Ok(t);
    }
    t.kind = TableKind::Mbr;
    mbr_partitions(r, size, &entries, &mut t)?;
    Ok(t)
}

fn mbr_partitions<R: Read + Seek>(
    r: &mut R,
    size: u64,
    entries: &[&[u8]],
    t: &mut PartitionTable,
) -> std::io::Result<()> {
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let (ty, start, len) = (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if ty == 0 || len == 0 {
            continue;
        }
        if is_extended(ty) {
            if extended.is_none() {
                extended = Some((start, len));
            } else {
                t.warnings
                    .push(format!("second extended partition {} ignored", i + 1));
            }
        }
        push_mbr(t, size, i as u32 + 1, ty, start, len, false);
    }
    if let Some((ext_start, ext_len)) = extended {
        ebr_chain(r, size, ext_start, ext_len, t)?;
    }
    Ok(())
}

fn push_mbr(
    t: &mut PartitionTable,
    size: u64,
    number: u32,
    ty: u8,
    start: u64,
    len: u64,
    logical: bool,
) {
    let (start_b, size_b) = (start * SECTOR, len * SECTOR);
    if start == 0 || start_b.saturating_add(size_b) > size {
        t.warnings.push(format!(
            "partition {number} (sectors {start}+{len}) lies outside the disk; ignored"
        ));
        return;
    }
    t.partitions.push(Partition {
        number,
        start: start_b,
        size: size_b,
        type_id: format!("0x{ty:02x}"),
        type_name: mbr_type_name(ty),
        name: None,
        guid: None,
        logical,
    });
}

/// Follow the extended partition's chain of EBRs: each holds one logical partition
/// (relative to itself) and a link to the next EBR (relative to the extended start).
fn ebr_chain<R: Read + Seek>(
    r: &mut R,
    size: u64,
    ext_start: u64,
    ext_len: u64,
    t: &mut PartitionTable,
) -> std::io::Result<()> {
    let mut seen = Vec::new();
    let mut rel = 0u64;
    let mut number = 5u32;
    loop {
        if seen.contains(&rel) {
            t.warnings.push(format!(
                "EBR chain loops back to sector {}",
                ext_start + rel
            ));
            return Ok(());
        }
        if seen.len() >= MAX_LOGICAL {
            t.warnings.push(format!(
                "more than {MAX_LOGICAL} logical partitions; rest ignored"
            ));
            return Ok(());
        }
        seen.push(rel);
        let lba = ext_start + rel;
        if rel >= ext_len {
            t.warnings.push(format!(
                "EBR at sector {lba} lies outside the extended partition"
            ));
            return Ok(());
        }
        let Some(ebr) = read_at(r, size, lba * SECTOR, SECTOR)? else {
            t.warnings
                .push(format!("EBR at sector {lba} lies outside the disk"));
            return Ok(());
        };
        if ebr[510..512] != [0x55, 0xAA] {
            t.warnings
                .push(format!("EBR at sector {lba} has no signature"));
            return Ok(());
        }
        let (e0, e1) = (&ebr[446..462], &ebr[462..478]);
        let (ty, start, len) = (e0[4], u64::from(le32(e0, 8)), u64::from(le32(e0, 12)));
        if ty != 0 && len != 0 {
            let abs = lba + start;
            if start + len > ext_len - rel {
                t.warnings.push(format!(
                    "logical partition {number} exceeds the extended partition"
                ));
            } else {
                push_mbr(t, size, number, ty, abs, len, true);
            }
            number += 1;
        }
        let next = u64::from(le32(e1, 8));
        if !is_extended(e1[4]) || next == 0 {
            return Ok(());
        }
        rel = next;
    }
}

/// The GPT with 512-byte sectors, else with 4096-byte ones; the warnings of the
/// 4096-byte attempt are only kept when neither size finds a header (a 512-byte disk
/// has no header at byte 4096, which is no news).
fn gpt<R: Read + Seek>(r: &mut R, size: u64, t: &mut PartitionTable) -> std::io::Result<()> {
    let mut first = Vec::new();
    for sector in [SECTOR, SECTOR_4K] {
        let mut warnings = Vec::new();
        let last_lba = (size / sector).saturating_sub(1);
        for (which, lba) in [("primary", 1), ("backup", last_lba)] {
            match gpt_header(r, size, sector, lba)? {
                Ok(h) => {
                    if which == "backup" {
                        warnings.push("primary GPT header invalid; used the backup".into());
                    }
                    t.warnings.append(&mut warnings);
                    return gpt_entries(r, size, &h, t);
                }
                Err(why) => warnings.push(format!("{which} GPT header: {why}")),
            }
        }
        if first.is_empty() {
            first = warnings;
        }
    }
    t.warnings.append(&mut first);
    Ok(())
}

struct GptHeader {
    /// Logical sector size the header was found with: every LBA is in these units.
    sector: u64,
    disk_guid: String,
    entries_lba: u64,
    count: u64,
    entry_size: u64,
    entries_crc: u32,
}

fn gpt_header<R: Read + Seek>(
    r: &mut R,
    size: u64,
    sector: u64,
    lba: u64,
) -> std::io::Result<Result<GptHeader, String>> {
    let Some(h) = read_at(r, size, lba * sector, sector)? else {
        return Ok(Err("outside the disk".into()));
    };
    if &h[..8] != GPT_SIG {
        return Ok(Err("no signature".into()));
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=sector as usize).contains(&hsize) {
        return Ok(Err(format!("header size {hsize}")));
    }
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != le32(&h, 16) {
        return Ok(Err("header CRC mismatch".into()));
    }
    let (count, entry_size) = (u64::from(le32(&h, 80)), u64::from(le32(&h, 84)));
    if entry_size < 128 || !entry_size.is_power_of_two() || count * entry_size > MAX_GPT_ENTRY_BYTES
    {
        return Ok(Err(format!("{count} entries of {entry_size} bytes")));
    }
    Ok(Ok(GptHeader {
        sector,
        disk_guid: guid(&h[56..72]),
        entries_lba: le64(&h, 72),
        count,
        entry_size,
        entries_crc: le32(&h, 88),
    }))
}

fn gpt_entries<R: Read + Seek>(
    r: &mut R,
    size: u64,
    h: &GptHeader,
    t: &mut PartitionTable,
) -> std::io::Result<()> {
    let off = h.entries_lba.saturating_mul(h.sector);
    let Some(arr) = read_at(r, size, off, h.count * h.entry_size)? else {
        t.warnings.push("GPT entry array outside the disk".into());
        return Ok(());
    };
    if crc32fast::hash(&arr) != h.entries_crc {
        t.warnings
            .push("GPT entry array CRC mismatch; entries read anyway".into());
    }
    t.kind = TableKind::Gpt;
    t.disk_guid = Some(h.disk_guid.clone());
    let sectors = size / h.sector;
    for (i, e) in arr.chunks_exact(h.entry_size as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let number = i as u32 + 1;
        if first == 0 || first > last || last >= sectors {
            t.warnings.push(format!(
                "GPT partition {number} (sectors {first}..{last}) lies outside the disk; ignored"
            ));
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        let type_id = guid(&e[..16]);
        t.partitions.push(Partition {
            number,
            start: first * h.sector,
            size: (last - first + 1) * h.sector,
            type_name: gpt_type_name(&type_id),
            type_id,
            name: Some(String::from_utf16_lossy(&units)).filter(|n| !n.is_empty()),
            guid: Some(guid(&e[16..32])),
            logical: false,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S4: usize = 4096;

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    /// 8 MiB disk with 4096-byte sectors as sgdisk writes it on such a disk: header
    /// at LBA 1 (byte 4096), entries at LBA 2, partition 1 at LBAs 256..=511.
    fn gpt_4k() -> Vec<u8> {
        let mut img = vec![0u8; 2048 * S4];
        let e = 446;
        img[e + 4] = 0xee;
        put(&mut img, e + 8, &1u32.to_le_bytes());
        put(&mut img, e + 12, &2047u32.to_le_bytes());
        img[510] = 0x55;
        img[511] = 0xAA;
        let arr = 2 * S4;
        put(
            &mut img,
            arr,
            &[0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47],
        );
        put(
            &mut img,
            arr + 8,
            &[0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
        );
        img[arr + 16] = 7;
        put(&mut img, arr + 32, &256u64.to_le_bytes());
        put(&mut img, arr + 40, &511u64.to_le_bytes());
        let arr_crc = crc32fast::hash(&img[arr..arr + 128 * 128]);
        let h = S4;
        put(&mut img, h, b"EFI PART");
        put(&mut img, h + 8, &0x0001_0000u32.to_le_bytes());
        put(&mut img, h + 12, &92u32.to_le_bytes());
        put(&mut img, h + 24, &1u64.to_le_bytes());
        put(&mut img, h + 32, &2047u64.to_le_bytes());
        put(&mut img, h + 40, &6u64.to_le_bytes());
        put(&mut img, h + 48, &2041u64.to_le_bytes());
        img[h + 56] = 0x42;
        put(&mut img, h + 72, &2u64.to_le_bytes());
        put(&mut img, h + 80, &128u32.to_le_bytes());
        put(&mut img, h + 84, &128u32.to_le_bytes());
        put(&mut img, h + 88, &arr_crc.to_le_bytes());
        let crc = crc32fast::hash(&img[h..h + 92]);
        put(&mut img, h + 16, &crc.to_le_bytes());
        img
    }

    #[test]
    fn gpt_with_4096_byte_sectors() {
        let img = gpt_4k();
        let t = read_table(&mut std::io::Cursor::new(&img), img.len() as u64).unwrap();
        assert_eq!(t.kind, TableKind::Gpt, "{:?}", t.warnings);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let p = &t.partitions[0];
        assert_eq!(t.partitions.len(), 1);
        assert_eq!((p.number, p.start, p.size), (1, 1 << 20, 1 << 20));
        assert_eq!(p.type_name, Some("Linux filesystem"));
    }

    #[test]
    fn gpt_4k_entries_past_the_disk_are_refused() {
        let mut img = gpt_4k();
        // Partition 1 now ends past the disk: in 4096-byte sectors, not 512-byte ones.
        let arr = 2 * S4;
        img[arr + 40..arr + 48].copy_from_slice(&2048u64.to_le_bytes());
        let arr_crc = crc32fast::hash(&img[arr..arr + 128 * 128]);
        img[S4 + 88..S4 + 92].copy_from_slice(&arr_crc.to_le_bytes());
        img[S4 + 16..S4 + 20].fill(0);
        let crc = crc32fast::hash(&img[S4..S4 + 92]);
        img[S4 + 16..S4 + 20].copy_from_slice(&crc.to_le_bytes());
        let t = read_table(&mut std::io::Cursor::new(&img), img.len() as u64).unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert!(t.partitions.is_empty(), "{:?}", t.partitions);
        assert!(
            t.warnings.iter().any(|w| w.contains("outside")),
            "{:?}",
            t.warnings
        );
    }
}
