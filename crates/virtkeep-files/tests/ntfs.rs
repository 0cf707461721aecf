//! NTFS images made by the real mkntfs and filled through ntfs-3g, read through the
//! generic `GuestFs` walkers; damaged images give errors, never panics or hangs.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use virtkeep_files::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// `src/etc` with a unicode name, a symlink, a hard link, a subdirectory and a 1 MiB
/// file, mtimes of its own.
fn content(root: &Path) {
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("sub")).unwrap();
    std::fs::write(etc.join("hostname"), "files-test\n").unwrap();
    std::fs::write(etc.join("ünï cödé.txt"), "x").unwrap();
    let big: Vec<u8> = (0..1 << 20u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(etc.join("sub/big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("hostname", etc.join("link")).unwrap();
    std::fs::hard_link(etc.join("sub/big.bin"), etc.join("hard")).unwrap();
    for (i, p) in ["hostname", "ünï cödé.txt", "sub/big.bin"]
        .iter()
        .enumerate()
    {
        run(Command::new("touch")
            .arg("-d")
            .arg(format!("@{}", 1_600_000_001 + i as u64 * 86_400))
            .arg(etc.join(p)));
    }
}

/// An NTFS image of 16 MiB holding `src/etc`, copied in through an ntfs-3g mount.
pub fn image(dir: &Path) -> Vec<u8> {
    content(&dir.join("src"));
    let img = dir.join("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mkntfs")
        .args(["-q", "-F", "-Q", "-L", "DATA"])
        .arg(&img));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("ntfs-3g").arg(&img).arg(&mnt));
    let cp = Command::new("cp")
        .arg("-a")
        .arg(dir.join("src/etc"))
        .arg(&mnt)
        .output()
        .unwrap();
    run(Command::new("umount").arg(&mnt));
    assert!(cp.status.success(), "{cp:?}");
    std::fs::read(&img).unwrap()
}

fn open(bytes: &[u8]) -> Result<Box<dyn GuestFs>, FilesError> {
    let len = bytes.len() as u64;
    open_fs(FsType::Ntfs, Cursor::new(bytes.to_vec()), len)
}

#[test]
fn ntfs_list_find_and_get_equal_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = image(dir.path());
    assert_eq!(detect_bytes(&bytes).unwrap().kind, "ntfs");
    let mut fs = open(&bytes).unwrap();
    let l = list_fs(fs.as_mut(), "/etc").unwrap();
    let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["hard", "hostname", "link", "sub", "ünï cödé.txt"]);
    let h = &l.entries[1];
    assert_eq!(
        (h.kind, h.size, h.mode, h.mtime),
        (EntryKind::File, 11, 0o644, 1_600_000_001)
    );
    assert_eq!(l.entries[2].kind, EntryKind::Symlink);
    assert_eq!(l.entries[2].target.as_deref(), Some("hostname"));
    let root = list_fs(fs.as_mut(), "/").unwrap();
    let names: Vec<&str> = root.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["etc"], "metadata files are not listed");
    let f = find_fs(fs.as_mut(), "/", "*.bin").unwrap();
    let paths: Vec<&str> = f.matches.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(paths, ["/etc/sub/big.bin"]);

    let out = dir.path().join("out");
    let s = get_fs(fs.as_mut(), "/etc", &out, GetOptions::default()).unwrap();
    assert_eq!(
        (s.files, s.hard_links, s.symlinks, s.dirs),
        (3, 1, 1, 2),
        "{s:?}"
    );
    for p in ["hostname", "ünï cödé.txt", "sub/big.bin", "hard"] {
        let (a, b) = (dir.path().join("src/etc").join(p), out.join("etc").join(p));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{p}"
        );
        assert_eq!(
            a.metadata().unwrap().mtime(),
            b.metadata().unwrap().mtime(),
            "{p}"
        );
    }
    let (a, b) = (out.join("etc/hard"), out.join("etc/sub/big.bin"));
    assert_eq!(a.metadata().unwrap().ino(), b.metadata().unwrap().ino());
    assert_eq!(
        std::fs::read_link(out.join("etc/link")).unwrap(),
        Path::new("hostname")
    );
    let e = list_fs(fs.as_mut(), "/etc/nope").unwrap_err().to_string();
    assert!(e.contains("no such file"), "{e}");
}

#[path = "common/failing_disk.rs"]
mod failing_disk;
use failing_disk::FailingDisk;

/// The repository failing under the users' MFT records ends a listing with an I/O
/// error: not an "unreadable" entry (the guest is not at fault).
fn a_failing_disk_fails_the_listing(bytes: &[u8]) {
    let cluster =
        u64::from(u16::from_le_bytes([bytes[0x0B], bytes[0x0C]])) * u64::from(bytes[0x0D]);
    let mft = u64::from_le_bytes(bytes[0x30..0x38].try_into().unwrap()) * cluster;
    let per = bytes[0x40] as i8;
    let record = if per < 0 {
        1u64 << -per
    } else {
        per as u64 * cluster
    };
    // Records 64 and up: the users' files (etc); the metadata files still read.
    let r = FailingDisk {
        inner: Cursor::new(bytes.to_vec()),
        bad: mft + 64 * record..mft + 1024 * record,
    };
    let mut fs = open_fs(FsType::Ntfs, r, bytes.len() as u64).unwrap();
    match list_fs(fs.as_mut(), "/") {
        Err(FilesError::Io(e)) => assert!(e.to_string().contains("authentication"), "{e}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn damaged_ntfs_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = image(dir.path());
    a_failing_disk_fails_the_listing(&bytes);
    assert!(open(&bytes[..4096]).is_err());
    // Zeroed MFT records after the boot sector's: lookups fail with errors.
    let mut broken = bytes.clone();
    for b in &mut broken[4 << 20..12 << 20] {
        *b = 0xFF;
    }
    if let Ok(mut fs) = open(&broken) {
        let to = tempfile::tempdir().unwrap();
        let _ = get_fs(fs.as_mut(), "/", to.path(), GetOptions::default());
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Bytes of a real image with random damage never panic any walker.
        #[test]
        fn mutated_images_never_panic(
            edits in proptest::collection::vec((0usize..16 << 20, any::<u8>()), 1..256)
        ) {
            static IMG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let img = IMG.get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                image(dir.path())
            });
            let mut bytes = img.clone();
            for (at, b) in edits {
                bytes[at] = b;
            }
            if let Ok(mut fs) = open(&bytes) {
                let _ = find_fs(fs.as_mut(), "/", "*");
                let to = tempfile::tempdir().unwrap();
                let _ = get_fs(fs.as_mut(), "/", to.path(), GetOptions::default());
            }
        }
    }
}
