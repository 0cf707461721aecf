//! Partition tables built byte by byte: GPT, MBR with an extended chain, loops and
//! hostile values; property tests that arbitrary and mutated images never panic,
//! finish quickly and only ever report partitions inside the disk.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use virtkeep_files::*;

const S: usize = 512;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A boot record at sector `lba` with up to 4 (type, start, len) entries.
fn boot_record(img: &mut [u8], lba: usize, entries: &[(u8, u32, u32)]) {
    let b = &mut img[lba * S..(lba + 1) * S];
    for (i, (t, start, len)) in entries.iter().enumerate() {
        let e = 446 + 16 * i;
        b[e + 4] = *t;
        put32(b, e + 8, *start);
        put32(b, e + 12, *len);
    }
    b[510] = 0x55;
    b[511] = 0xAA;
}

/// 4 MiB: primary 1 (Linux, ext4 superblock), extended 2 with logicals 5 (Linux) and 6 (swap).
fn mbr_image() -> Vec<u8> {
    let mut img = vec![0u8; 8192 * S];
    boot_record(&mut img, 0, &[(0x83, 2048, 2048), (0x05, 4096, 4000)]);
    boot_record(&mut img, 4096, &[(0x83, 63, 500), (0x05, 1000, 600)]);
    boot_record(&mut img, 5096, &[(0x82, 63, 500)]);
    // ext4 superblock in partition 1, swap signature in partition 6.
    let sb = 2048 * S + 1024;
    img[sb + 56] = 0x53;
    img[sb + 57] = 0xEF;
    put32(&mut img, sb + 0x60, 0x40);
    img[sb + 0x78..sb + 0x7c].copy_from_slice(b"root");
    let sw = (5096 + 63) * S;
    img[sw + 4086..sw + 4096].copy_from_slice(b"SWAPSPACE2");
    img
}

fn guid_bytes(s: &str) -> [u8; 16] {
    let h: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&s.replace('-', "")[i * 2..i * 2 + 2], 16).unwrap())
        .take(16)
        .collect();
    let mut g = [0u8; 16];
    g.copy_from_slice(&h);
    g[..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const EFI: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// Rewrite the GPT header CRCs at LBA 1 (after a deliberate change).
fn gpt_fix_crcs(img: &mut [u8]) {
    let arr = crc32fast::hash(&img[2 * S..2 * S + 128 * 128]);
    put32(img, S + 88, arr);
    put32(img, S + 16, 0);
    let h = crc32fast::hash(&img[S..S + 92]);
    put32(img, S + 16, h);
}

/// 4 MiB GPT: 1 "root" Linux 2048..4095 (xfs magic), 2 "esp" EFI 4096..6143.
fn gpt_image() -> Vec<u8> {
    let mut img = vec![0u8; 8192 * S];
    boot_record(&mut img, 0, &[(0xee, 1, 8191)]);
    let h = &mut img[S..2 * S];
    h[..8].copy_from_slice(b"EFI PART");
    put32(h, 8, 0x0001_0000);
    put32(h, 12, 92);
    put64(h, 24, 1);
    put64(h, 32, 8191);
    put64(h, 40, 34);
    put64(h, 48, 8158);
    h[56..72].copy_from_slice(&guid_bytes("11111111-2222-3333-4444-555555555555"));
    put64(h, 72, 2);
    put32(h, 80, 128);
    put32(h, 84, 128);
    for (i, (t, first, last, name)) in [
        (LINUX_FS, 2048u64, 4095u64, "root"),
        (EFI, 4096, 6143, "esp"),
    ]
    .iter()
    .enumerate()
    {
        let e = &mut img[2 * S + 128 * i..2 * S + 128 * (i + 1)];
        e[..16].copy_from_slice(&guid_bytes(t));
        e[16] = i as u8 + 1;
        put64(e, 32, *first);
        put64(e, 40, *last);
        for (j, u) in name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    img[2048 * S..2048 * S + 4].copy_from_slice(b"XFSB");
    gpt_fix_crcs(&mut img);
    img
}

fn layout(img: &[u8]) -> DiskLayout {
    read_layout(&mut Cursor::new(img), "vda", img.len() as u64).unwrap()
}

#[test]
fn mbr_with_extended_chain() {
    let l = layout(&mbr_image());
    assert_eq!(l.table, TableKind::Mbr);
    let got: Vec<(u32, u64, u64, &str, bool)> = l
        .partitions
        .iter()
        .map(|p| {
            let q = &p.partition;
            (q.number, q.start, q.size, q.type_id.as_str(), q.logical)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 2048 * 512, 2048 * 512, "0x83", false),
            (2, 4096 * 512, 4000 * 512, "0x05", false),
            (5, 4159 * 512, 500 * 512, "0x83", true),
            (6, 5159 * 512, 500 * 512, "0x82", true),
        ]
    );
    let fs = l.partitions[0].filesystem.as_ref().unwrap();
    assert_eq!(
        (fs.kind.as_str(), fs.label.as_deref()),
        ("ext4", Some("root"))
    );
    assert_eq!(l.partitions[3].filesystem.as_ref().unwrap().kind, "swap");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn ebr_loop_is_detected() {
    let mut img = mbr_image();
    // The second EBR (relative sector 1000) links to itself.
    boot_record(&mut img, 5096, &[(0x82, 63, 500), (0x05, 1000, 600)]);
    let l = layout(&img);
    assert_eq!(l.partitions.len(), 4);
    assert!(
        l.warnings.iter().any(|w| w.contains("loops")),
        "{:?}",
        l.warnings
    );
}

#[test]
fn gpt_entries_names_and_guids() {
    let l = layout(&gpt_image());
    assert_eq!(l.table, TableKind::Gpt);
    assert_eq!(
        l.disk_guid.as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    let p: Vec<_> = l.partitions.iter().map(|p| &p.partition).collect();
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0].number, p[0].start, p[0].size),
        (1, 2048 * 512, 2048 * 512)
    );
    assert_eq!(p[0].type_id, LINUX_FS);
    assert_eq!(p[0].type_name, Some("Linux filesystem"));
    assert_eq!(p[0].name.as_deref(), Some("root"));
    assert_eq!(p[1].type_name, Some("EFI system"));
    assert_eq!(l.partitions[0].filesystem.as_ref().unwrap().kind, "xfs");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn gpt_bad_crc_falls_back_and_absurd_counts_are_refused() {
    let mut img = gpt_image();
    img[S + 60] ^= 1; // primary header CRC now wrong, no backup header
    let l = layout(&img);
    assert_ne!(l.table, TableKind::Gpt);
    assert!(
        l.warnings.iter().any(|w| w.contains("CRC")),
        "{:?}",
        l.warnings
    );
    let mut img = gpt_image();
    put32(&mut img, S + 80, u32::MAX); // 4 G entries
    gpt_fix_crcs(&mut img);
    let l = layout(&img);
    // Only the protective MBR entry remains (as fdisk shows it).
    assert!(
        l.partitions.iter().all(|p| p.partition.type_id == "0xee"),
        "{l:?}"
    );
    assert!(
        l.warnings.iter().any(|w| w.contains("entries")),
        "{:?}",
        l.warnings
    );
}

fn check_sane(img: &[u8]) {
    let t = Instant::now();
    let l = layout(img);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    for p in &l.partitions {
        assert!(
            p.partition.start + p.partition.size <= img.len() as u64,
            "{p:?}"
        );
    }
    assert!(l.partitions.len() <= 128 + 4 + 1024);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(img in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        check_sane(&img);
    }

    #[test]
    fn mutated_tables_never_panic(
        gpt in any::<bool>(),
        fix_crc in any::<bool>(),
        muts in proptest::collection::vec((0usize..(3 * S + 512), any::<u8>()), 1..24),
        ebr_muts in proptest::collection::vec((0usize..S, any::<u8>()), 0..8),
    ) {
        let mut img = if gpt { gpt_image() } else { mbr_image() };
        for (at, v) in &muts {
            img[*at] = *v;
        }
        // Mutations inside the EBRs exercise the chain walk.
        for (at, v) in &ebr_muts {
            img[4096 * S + at] = *v;
        }
        if gpt && fix_crc {
            gpt_fix_crcs(&mut img);
        }
        check_sane(&img);
    }
}

/// Signatures the lab cannot make here (no mkfs.vfat, no pvcreate on a file, no mkntfs).
#[test]
fn detects_fat_ntfs_lvm_and_btrfs_signatures() {
    let mut fat32 = vec![0u8; 4096];
    fat32[510] = 0x55;
    fat32[511] = 0xAA;
    fat32[71..82].copy_from_slice(b"EFI        ");
    fat32[82..90].copy_from_slice(b"FAT32   ");
    let f = detect_bytes(&fat32).unwrap();
    assert_eq!((f.kind.as_str(), f.label.as_deref()), ("vfat", Some("EFI")));
    let mut fat16 = vec![0u8; 4096];
    fat16[510] = 0x55;
    fat16[511] = 0xAA;
    fat16[43..54].copy_from_slice(b"NO NAME    ");
    fat16[54..62].copy_from_slice(b"FAT16   ");
    let f = detect_bytes(&fat16).unwrap();
    assert_eq!((f.kind.as_str(), f.label), ("vfat", None));
    let mut ntfs = vec![0u8; 4096];
    ntfs[3..11].copy_from_slice(b"NTFS    ");
    assert_eq!(detect_bytes(&ntfs).unwrap().kind, "ntfs");
    let mut pv = vec![0u8; 4096];
    pv[512..520].copy_from_slice(b"LABELONE");
    pv[536..544].copy_from_slice(b"LVM2 001");
    assert_eq!(detect_bytes(&pv).unwrap().kind, "LVM2_member");
    let mut btrfs = vec![0u8; 0x11000];
    btrfs[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
    assert_eq!(detect_bytes(&btrfs).unwrap().kind, "btrfs");
    assert_eq!(detect_bytes(&[0u8; 70000]), None);
    // A FAT boot sector at LBA 0 is a whole-disk filesystem, not an MBR.
    let mut disk = fat32.clone();
    disk.resize(1 << 20, 0);
    let l = layout(&disk);
    assert_eq!(l.table, TableKind::None);
    assert_eq!(l.filesystem.unwrap().kind, "vfat");
}
