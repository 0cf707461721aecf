//! ext2/3/4 listings of images made by the real mkfs (`-d`), at an offset inside a
//! larger "disk"; targets parsed; damaged images give errors, never panics or hangs.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::process::Command;
use std::time::{Duration, Instant};

use virtkeep_files::*;

const OFFSET: usize = 1 << 20;

/// A 1 MiB gap, then an ext filesystem made by `mkfs` (e.g. mkfs.ext4) from a tree.
fn image(mkfs: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/sub")).unwrap();
    std::fs::write(root.join("etc/hostname"), "files-test\n").unwrap();
    std::fs::write(root.join("etc/ünïcödé.txt"), "x").unwrap();
    std::fs::set_permissions(
        root.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    symlink("hostname", root.join("etc/link")).unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{mkfs}: {out:?}");
    let mut disk = vec![0u8; OFFSET];
    disk.extend(std::fs::read(&img).unwrap());
    disk
}

fn list(disk: &[u8], path: &str) -> Result<DirListing, FilesError> {
    let len = (disk.len() - OFFSET) as u64;
    list_ext4(Cursor::new(disk.to_vec()), OFFSET as u64, len, path)
}

#[test]
fn lists_directories_of_ext4_and_ext2() {
    for mkfs in ["mkfs.ext4", "mkfs.ext2"] {
        let disk = image(mkfs);
        let l = list(&disk, "/etc").unwrap();
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["hostname", "link", "sub", "ünïcödé.txt"], "{mkfs}");
        let h = &l.entries[0];
        assert_eq!((h.kind, h.size, h.mode), (EntryKind::File, 11, 0o640));
        assert!(h.mtime > 1_600_000_000, "{h:?}");
        assert_eq!(l.entries[1].kind, EntryKind::Symlink);
        assert_eq!(l.entries[1].target.as_deref(), Some("hostname"));
        assert_eq!(l.entries[2].kind, EntryKind::Dir);
        assert!(!l.truncated);
        let root = list(&disk, "/").unwrap();
        assert!(root.entries.iter().any(|e| e.name == "lost+found"));
        assert!(matches!(
            list(&disk, "/nope"),
            Err(FilesError::Filesystem { .. })
        ));
        assert!(matches!(
            list(&disk, "/etc/hostname"),
            Err(FilesError::Filesystem { .. })
        ));
        assert!(matches!(
            list(&disk, "etc"),
            Err(FilesError::InvalidPath(_))
        ));
    }
}

#[test]
fn targets_parse_and_refuse_nonsense() {
    let t: FileTarget = "vda:1:/etc".parse().unwrap();
    assert_eq!(
        (t.disk.as_str(), t.partition, t.path.as_str()),
        ("vda", Some(1), "/etc")
    );
    let t: FileTarget = "vdb:/".parse().unwrap();
    assert_eq!((t.partition, t.path.as_str()), (None, "/"));
    for bad in [
        "vda",
        "vda:1",
        "vda:x:/etc",
        ":1:/",
        "vda:1:etc",
        "-o:1:/",
        "vda:-1:/",
    ] {
        assert!(bad.parse::<FileTarget>().is_err(), "{bad} accepted");
    }
}

#[test]
fn damaged_images_fail_cleanly() {
    let disk = image("mkfs.ext4");
    // Truncated: the reader refuses reads past the partition.
    let short = &disk[..OFFSET + 64 * 1024];
    let r = list_ext4(
        Cursor::new(short.to_vec()),
        OFFSET as u64,
        64 * 1024,
        "/etc",
    );
    assert!(r.is_err());
    // Deterministic mutations of the metadata area: errors are fine, panics and hangs not.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..200 {
        let mut d = disk.clone();
        for _ in 0..16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = OFFSET + (x as usize % (256 * 1024));
            d[at] = (x >> 40) as u8;
        }
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| list(&d, "/etc").map(|l| l.entries.len()));
        assert!(r.is_ok(), "ext4 listing panicked on a mutated image");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
}

/// One damaged inode (cleared by debugfs) is listed as unreadable, with why; the rest
/// of its directory is listed as before.
#[test]
fn a_damaged_inode_does_not_hide_its_directory() {
    let disk = image("mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::write(&img, &disk[OFFSET..]).unwrap();
    let out = Command::new("debugfs")
        .args(["-w", "-R", "clri /etc/ünïcödé.txt"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut damaged = disk[..OFFSET].to_vec();
    damaged.extend(std::fs::read(&img).unwrap());
    let l = list(&damaged, "/etc").unwrap();
    let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["hostname", "link", "sub", "ünïcödé.txt"]);
    assert_eq!(l.entries[3].kind, EntryKind::Unknown);
    assert!(l.entries[3].error.is_some(), "{l:?}");
    assert!(l.entries[..3].iter().all(|e| e.error.is_none()), "{l:?}");
    assert_eq!(
        (l.entries[0].kind, l.entries[0].size),
        (EntryKind::File, 11)
    );
}

#[path = "common/failing_disk.rs"]
mod failing_disk;
use failing_disk::FailingDisk;

/// A repository read failing under an inode ends the listing with an I/O error (the
/// storage is at fault, not the guest): it is not shown as a damaged entry.
#[test]
fn a_failing_disk_fails_the_listing() {
    // `ext4-view` reads the inode table 32 KiB at a time: 150 files in `/many` put
    // inodes past the first 32 KiB (128 inodes of 256 bytes), read only for entries.
    let dir = tempfile::tempdir().unwrap();
    let many = dir.path().join("root/many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..150 {
        std::fs::write(many.join(format!("f{i:03}")), "").unwrap();
    }
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-I", "256", "-d"])
        .arg(dir.path().join("root"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let fs = std::fs::read(&img).unwrap();
    let le32 = |o: usize| u64::from(u32::from_le_bytes(fs[o..o + 4].try_into().unwrap()));
    let block = 1024u64 << le32(1024 + 24);
    // Group 0's descriptor follows the superblock's block; its inode table at +8.
    let gdt = (le32(1024 + 20) + 1) * block;
    let table = le32(gdt as usize + 8) * block;
    let ok = list_ext4(Cursor::new(fs.clone()), 0, fs.len() as u64, "/many").unwrap();
    assert_eq!(ok.entries.len(), 150);
    let r = FailingDisk {
        inner: Cursor::new(fs.clone()),
        bad: table + 128 * 256..table + 1024 * 256,
    };
    match list_ext4(r, 0, fs.len() as u64, "/many") {
        Err(FilesError::Io(e)) => assert!(e.to_string().contains("authentication"), "{e}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

/// Every walk has a time limit: past it, `get`, `find` and `ls` stop with an error
/// that says so (a zero limit has passed before the first read), and a generous
/// limit changes nothing.
#[test]
fn walks_stop_at_their_time_limit() {
    let disk = image("mkfs.ext4");
    let len = (disk.len() - OFFSET) as u64;
    let fs_img = disk[OFFSET..].to_vec();
    let to = tempfile::tempdir().unwrap();
    let zero = GetOptions {
        timeout: Duration::ZERO,
        ..GetOptions::default()
    };
    let e = get_ext4(
        Cursor::new(disk.clone()),
        OFFSET as u64,
        len,
        "/etc",
        to.path(),
        zero,
    )
    .unwrap_err();
    assert!(matches!(e, FilesError::TimedOut { .. }), "{e}");
    assert!(e.to_string().contains("files get took longer"), "{e}");
    assert!(e.to_string().contains("--timeout"), "{e}");
    let mut fs = open_fs(FsType::Ext, Cursor::new(fs_img), len).unwrap();
    let mut timed = TimedFs::new(fs.as_mut(), Duration::ZERO, "files find");
    let e = find_fs(&mut timed, "/", "*").unwrap_err();
    assert!(matches!(e, FilesError::TimedOut { .. }), "{e}");
    let e = list_fs(&mut timed, "/etc").unwrap_err();
    assert!(matches!(e, FilesError::TimedOut { .. }), "{e}");
    let mut timed = TimedFs::new(fs.as_mut(), Duration::from_secs(3600), "files find");
    assert_eq!(find_fs(&mut timed, "/", "host*").unwrap().matches.len(), 1);
    let s = get_fs(fs.as_mut(), "/etc", to.path(), GetOptions::default()).unwrap();
    assert_eq!(s.files, 2);
    let copied = std::fs::read(to.path().join("etc/hostname")).unwrap();
    assert_eq!(copied, b"files-test\n");
}
