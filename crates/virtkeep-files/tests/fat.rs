//! FAT images made by the real mkfs.fat and mtools, read through the generic
//! `GuestFs` walkers; damaged images give errors, never panics or hangs.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use virtkeep_files::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// A FAT image of `fat_bits` (12, 16, 32) holding `etc/` with a unicode name, a
/// subdirectory and a 300 KiB file, copied in by mcopy with their mtimes.
fn image(fat_bits: &str, size_mib: u64) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("src/etc");
    std::fs::create_dir_all(etc.join("sub")).unwrap();
    std::fs::write(etc.join("hostname"), "files-test\n").unwrap();
    std::fs::write(etc.join("ünï cödé.txt"), "x").unwrap();
    let big: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(etc.join("sub/big.bin"), &big).unwrap();
    for (i, p) in ["hostname", "ünï cödé.txt", "sub/big.bin"]
        .iter()
        .enumerate()
    {
        run(Command::new("touch")
            .arg("-d")
            .arg(format!("@{}", 1_600_000_000 + i as u64 * 86_400))
            .arg(etc.join(p)));
    }
    let img = dir.path().join("fat.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    run(Command::new("mkfs.fat")
        .args(["-F", fat_bits, "-n", "ESP"])
        .arg(&img));
    run(Command::new("mcopy")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(&img)
        .arg(&etc)
        .arg("::/"));
    let bytes = std::fs::read(&img).unwrap();
    (dir, bytes)
}

fn open(bytes: &[u8]) -> Result<Box<dyn GuestFs>, FilesError> {
    let len = bytes.len() as u64;
    open_fs(FsType::Fat, Cursor::new(bytes.to_vec()), len)
}

#[test]
fn fat_12_16_32_list_find_and_get_equal_the_source() {
    for (bits, mib) in [("12", 4), ("16", 20), ("32", 40)] {
        let (dir, bytes) = image(bits, mib);
        let info = detect_bytes(&bytes).unwrap();
        assert_eq!(
            (info.kind.as_str(), info.label.as_deref()),
            ("vfat", Some("ESP"))
        );
        let mut fs = open(&bytes).unwrap();
        let l = list_fs(fs.as_mut(), "/etc").unwrap();
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["hostname", "sub", "ünï cödé.txt"], "FAT{bits}");
        let h = &l.entries[0];
        assert_eq!(
            (h.kind, h.size, h.mode, h.mtime),
            (EntryKind::File, 11, 0o644, 1_600_000_000)
        );
        assert_eq!(l.entries[1].kind, EntryKind::Dir);
        let f = find_fs(fs.as_mut(), "/", "*.bin").unwrap();
        let paths: Vec<&str> = f.matches.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/etc/sub/big.bin"]);

        let out = dir.path().join("out");
        let s = get_fs(fs.as_mut(), "/etc", &out, GetOptions::default()).unwrap();
        assert_eq!((s.files, s.dirs), (3, 2), "{s:?}");
        for p in ["hostname", "ünï cödé.txt", "sub/big.bin"] {
            let (a, b) = (dir.path().join("src/etc").join(p), out.join("etc").join(p));
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{p}"
            );
            let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
            assert_eq!(ma.mtime(), mb.mtime(), "{p}");
        }
        // Lookups are case-insensitive, as on FAT; missing names are clear errors.
        assert_eq!(list_fs(fs.as_mut(), "/ETC/SUB").unwrap().entries.len(), 1);
        let e = list_fs(fs.as_mut(), "/etc/nope").unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
    }
}

#[test]
fn damaged_fat_images_fail_cleanly() {
    let (_dir, bytes) = image("16", 20);
    // Truncated inside the 300 KiB file: copying it fails with an error.
    let short = bytes[..256 * 1024].to_vec();
    let mut fs = open(&short).unwrap();
    let to = tempfile::tempdir().unwrap();
    let e = get_fs(fs.as_mut(), "/etc/sub", to.path(), GetOptions::default());
    let e = e.unwrap_err().to_string();
    assert!(e.contains("/etc/sub/big.bin"), "{e}");
    assert!(open(&bytes[..100]).is_err());
    // Every FAT entry pointing at cluster 2: directory and file chains loop.
    let mut looped = bytes.clone();
    let reserved = usize::from(u16::from_le_bytes([bytes[14], bytes[15]])) * 512;
    let fat_len = usize::from(u16::from_le_bytes([bytes[22], bytes[23]])) * 512;
    for i in (reserved + 4..reserved + fat_len).step_by(2) {
        looped[i..i + 2].copy_from_slice(&2u16.to_le_bytes());
    }
    let start = std::time::Instant::now();
    let mut fs = open(&looped).unwrap();
    let _ = find_fs(fs.as_mut(), "/", "*");
    let to = tempfile::tempdir().unwrap();
    let _ = get_fs(fs.as_mut(), "/", to.path(), GetOptions::default());
    assert!(start.elapsed() < std::time::Duration::from_secs(60));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Bytes of a real image with random damage never panic any walker.
        #[test]
        fn mutated_images_never_panic(
            edits in proptest::collection::vec((0usize..96 * 1024, any::<u8>()), 1..64)
        ) {
            let (_dir, mut bytes) = image("12", 4);
            for (at, b) in edits {
                bytes[at] = b;
            }
            if let Ok(mut fs) = open(&bytes) {
                let _ = find_fs(fs.as_mut(), "/", "*");
                let _ = list_fs(fs.as_mut(), "/etc");
                let to = tempfile::tempdir().unwrap();
                let _ = get_fs(fs.as_mut(), "/", to.path(), GetOptions::default());
            }
        }
    }
}
