//! XFS images made by the real mkfs.xfs, filled through a kernel mount (v5) or a
//! protofile (v4, which this kernel no longer mounts), read through the generic
//! `GuestFs` walkers and compared with what the kernel's read-only mount shows: names,
//! types, sizes, modes, owners, mtimes, inode numbers, link counts, targets and bytes.
//! Damaged images give errors, never panics or hangs.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use virtkeep_files::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// mkfs.xfs refuses filesystems under 300 MB unless run by the XFS test suite.
fn mkfs(img: &Path, size_mib: u64, args: &[&str]) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    run(Command::new("mkfs.xfs")
        .env("TEST_DIR", "1")
        .env("TEST_DEV", "1")
        .env("QA_CHECK_FS", "1")
        .args(["-q", "-f", "-L", "data"])
        .args(args)
        .arg(img));
}

/// A loop mount, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(img: &Path, at: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        // mount(8) picks a free loop device and then binds it; a test beside this one
        // may take the same device in between ("already mounted or mount point busy").
        for _ in 0..20 {
            let out = Command::new("mount")
                .args(["-o", opts])
                .arg(img)
                .arg(at)
                .output()
                .unwrap();
            if out.status.success() {
                return Mounted(at.to_path_buf());
            }
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("busy"),
                "{out:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{}: every loop device taken", img.display())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn touch(p: &Path, secs: u64) {
    run(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{secs}.123456789"))
        .arg(p));
}

/// Fills a mounted filesystem: a short, a leaf and a node directory, a file of 300
/// extents (a B+tree data fork) with holes, an unwritten range, short and long
/// symlinks, a hard link, owners, modes and unicode names.
fn fill(root: &Path) {
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("sub")).unwrap();
    std::fs::write(etc.join("hostname"), "xfs-test\n").unwrap();
    std::fs::write(etc.join("ünï cödé.txt"), "x").unwrap();
    std::fs::write(etc.join("sub/empty"), "").unwrap();
    std::fs::hard_link(etc.join("hostname"), etc.join("hard")).unwrap();
    std::os::unix::fs::symlink("hostname", etc.join("link")).unwrap();
    std::os::unix::fs::symlink("/".to_string() + &"long/".repeat(150), etc.join("longlink"))
        .unwrap();
    let f = std::fs::File::create(etc.join("sparse")).unwrap();
    for i in 0..300u64 {
        let block: Vec<u8> = (0..4096u64).map(|j| ((i * 31 + j) % 251) as u8).collect();
        f.write_all_at(&block, i * 8192).unwrap();
    }
    f.sync_all().unwrap();
    run(Command::new("fallocate")
        .args(["-o", "4M", "-l", "1M"])
        .arg(etc.join("sparse")));
    std::fs::set_permissions(etc.join("sparse"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(etc.join("sparse"), Some(1000), Some(1001)).unwrap();
    for (dir, n) in [("leaf", 200), ("node", 3000)] {
        std::fs::create_dir(root.join(dir)).unwrap();
        for i in 0..n {
            let name = format!("entry-{i:05}-with-a-longer-name-ü");
            std::fs::write(root.join(dir).join(name), i.to_string()).unwrap();
        }
    }
    for (i, p) in ["etc/hostname", "etc/link", "etc/sparse", "etc/sub", "etc"]
        .iter()
        .enumerate()
    {
        touch(&root.join(p), 1_600_000_000 + i as u64 * 86_400);
    }
}

/// A v5 image filled through a read-write kernel mount; returns it with its directory.
fn v5_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    mkfs(&img, 64, &[]);
    {
        let m = Mounted::new(&img, &dir.path().join("rw"), "loop");
        fill(&m.0);
    }
    (dir, img)
}

fn open(bytes: &[u8]) -> Result<Box<dyn GuestFs>, FilesError> {
    let len = bytes.len() as u64;
    open_fs(FsType::Xfs, Cursor::new(bytes.to_vec()), len)
}

/// Everything the reader says about `path` (recursively) equals the kernel's view at
/// `local`; the number of nodes compared.
fn compare(fs: &mut dyn GuestFs, path: &str, local: &Path) -> usize {
    let m = std::fs::symlink_metadata(local).unwrap();
    let n = fs.stat(path.as_bytes()).unwrap();
    let what = format!("{path}: {n:?} vs {m:?}");
    assert_eq!(
        (
            n.size,
            u32::from(n.mode),
            n.uid,
            n.gid,
            n.ino,
            u64::from(n.nlink)
        ),
        (
            m.size(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.ino(),
            m.nlink()
        ),
        "{what}"
    );
    assert_eq!(
        (n.mtime, i64::from(n.mtime_nsec)),
        (m.mtime(), m.mtime_nsec()),
        "{what}"
    );
    if m.is_symlink() {
        assert_eq!(n.kind, EntryKind::Symlink, "{what}");
        let t = fs.read_link(path.as_bytes()).unwrap();
        assert_eq!(
            t,
            std::fs::read_link(local)
                .unwrap()
                .as_os_str()
                .as_encoded_bytes()
        );
        return 1;
    }
    if m.is_file() {
        assert_eq!(n.kind, EntryKind::File, "{what}");
        let mut buf = vec![0u8; m.size() as usize];
        let mut at = 0;
        // Odd-sized reads cross extent and hole boundaries.
        while at < buf.len() {
            let end = (at + 12_345).min(buf.len());
            let k = fs
                .read(path.as_bytes(), at as u64, &mut buf[at..end])
                .unwrap();
            assert!(k > 0, "{what}");
            at += k;
        }
        assert!(buf == std::fs::read(local).unwrap(), "{path}: bytes differ");
        return 1;
    }
    assert_eq!(n.kind, EntryKind::Dir, "{what}");
    let (entries, more) = fs.read_dir(path.as_bytes(), usize::MAX).unwrap();
    assert!(!more);
    let mut names: Vec<Vec<u8>> = entries.iter().map(|e| e.name.clone()).collect();
    names.sort();
    let mut want: Vec<Vec<u8>> = std::fs::read_dir(local)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_encoded_bytes().to_vec())
        .collect();
    want.sort();
    assert_eq!(names, want, "{path}");
    let mut count = 1;
    for name in names {
        let sub = format!(
            "{}/{}",
            path.trim_end_matches('/'),
            String::from_utf8(name.clone()).unwrap()
        );
        count += compare(fs, &sub, &local.join(String::from_utf8(name).unwrap()));
    }
    count
}

#[test]
fn xfs_v5_equals_the_kernels_read_only_mount() {
    let (dir, img) = v5_image();
    let bytes = std::fs::read(&img).unwrap();
    // At an offset, as a partition of a disk.
    let info = detect_bytes(&bytes).unwrap();
    assert_eq!(
        (info.kind.as_str(), info.label.as_deref()),
        ("xfs", Some("data"))
    );
    let ro = Mounted::new(&img, &dir.path().join("ro"), "ro,loop");
    let mut fs = open(&bytes).unwrap();
    let n = compare(fs.as_mut(), "/", &ro.0);
    assert!(n > 3200, "{n}");
    // The test meant what it says: a B+tree data fork, leaf and node directories.
    let ino = |p: &str| std::fs::symlink_metadata(ro.0.join(p)).unwrap().ino();
    let core = |p: &str| {
        let out = Command::new("xfs_db")
            .args([
                "-r",
                "-c",
                &format!("inode {}", ino(p)),
                "-c",
                "print core.format core.nextents",
            ])
            .arg(&img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        core("etc/sparse").contains("3 (btree)"),
        "{}",
        core("etc/sparse")
    );
    assert!(core("node").contains("3 (btree)") || core("node").contains("2 (extents)"));
    assert!(core("etc/sub").contains("1 (local)"), "{}", core("etc/sub"));
    assert!(
        core("etc/longlink").contains("2 (extents)"),
        "{}",
        core("etc/longlink")
    );
    // files get copies the tree with links, modes and mtimes; find sees every file.
    let to = tempfile::tempdir().unwrap();
    let s = get_fs(fs.as_mut(), "/etc", to.path(), GetOptions::default()).unwrap();
    assert!(s.files >= 4, "{s:?}");
    let got = to.path().join("etc");
    assert_eq!(
        std::fs::read(got.join("sparse")).unwrap(),
        std::fs::read(ro.0.join("etc/sparse")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(got.join("hard")).unwrap().ino(),
        std::fs::metadata(got.join("hostname")).unwrap().ino()
    );
    let found = find_fs(fs.as_mut(), "/node", "entry-00299*").unwrap();
    assert_eq!(found.matches.len(), 1);
}

/// A v4 filesystem (no CRCs, 8 KiB directory blocks: two filesystem blocks each) made
/// from a protofile, compared with the protofile's sources.
#[test]
fn xfs_v4_from_a_protofile_equals_its_sources() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let big: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("small"), "small\n").unwrap();
    let mut proto = String::from("boot\n0 0\nd--755 0 0\n");
    proto += &format!("big ---600 7 8 {}\n", src.join("big").display());
    proto += "link l--777 0 0 big\nmany d--750 0 0\n";
    for i in 0..400 {
        proto += &format!("f{i:04}-ünï ---644 0 0 {}\n", src.join("small").display());
    }
    proto += "$\n$\n";
    let pf = dir.path().join("proto");
    std::fs::write(&pf, proto).unwrap();
    let img = dir.path().join("v4.img");
    let pfs = pf.display().to_string();
    mkfs(&img, 32, &["-m", "crc=0", "-n", "size=8192", "-p", &pfs]);
    let bytes = std::fs::read(&img).unwrap();
    let mut fs = open(&bytes).unwrap();
    let n = fs.stat(b"/big").unwrap();
    assert_eq!(
        (n.kind, n.size, n.mode, n.uid, n.gid),
        (EntryKind::File, big.len() as u64, 0o600, 7, 8)
    );
    assert_eq!(fs.read_link(b"/link").unwrap(), b"big");
    let (entries, _) = fs.read_dir(b"/many", usize::MAX).unwrap();
    assert_eq!(entries.len(), 400);
    assert!(entries.iter().any(|e| e.name == "f0399-ünï".as_bytes()));
    assert_eq!(fs.stat(b"/many").unwrap().mode, 0o750);
    let to = tempfile::tempdir().unwrap();
    get_fs(fs.as_mut(), "/", to.path(), GetOptions::default()).unwrap();
    let got = to.path();
    assert_eq!(
        std::fs::read(got.join("many/f0123-ünï")).unwrap(),
        b"small\n"
    );
    assert_eq!(std::fs::read(got.join("big")).unwrap(), big);
}

#[test]
fn damaged_xfs_images_fail_cleanly() {
    let (_dir, img) = v5_image();
    let bytes = std::fs::read(&img).unwrap();
    assert!(open(&bytes[..256]).is_err());
    assert!(open(&vec![0u8; 1 << 20]).is_err());
    // Truncated: the superblock reads, what lies beyond the end does not. Which of the
    // two ways that shows depends on where the kernel put the inodes: data beyond the
    // end fails the copy; an inode beyond it leaves its entry named as unreadable (as
    // one damaged inode must not hide its directory). Never a silent success.
    if let Ok(mut fs) = open(&bytes[..1 << 20]) {
        let to = tempfile::tempdir().unwrap();
        if let Ok(s) = get_fs(fs.as_mut(), "/", to.path(), GetOptions::default()) {
            let unreadable = s.skipped.iter().filter(|s| s.contains("unreadable"));
            assert!(unreadable.count() > 0, "{s:?}");
        }
    }
    // Absurd geometry is refused by name.
    let mut bad = bytes.clone();
    bad[4..8].copy_from_slice(&3000u32.to_be_bytes());
    let err = open(&bad).err().unwrap().to_string();
    assert!(err.contains("geometry"), "{err}");
    let mut fs = open(&bytes).unwrap();
    // A block map whose root points twice at one leaf (written by xfs_db) is a loop.
    let ino = fs.stat(b"/etc/sparse").unwrap().ino;
    let db = |cmd: &str| {
        let out = Command::new("xfs_db")
            .args(["-x", "-c", &format!("inode {ino}"), "-c", cmd])
            .arg(&img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ptrs = db("print u3.bmbt.ptrs");
    let first = ptrs
        .split("1:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(db(&format!("write u3.bmbt.ptrs[2] {first}")).contains(first));
    let looped = std::fs::read(&img).unwrap();
    let mut lfs = open(&looped).unwrap();
    let err = lfs
        .read(b"/etc/sparse", 0, &mut [0u8; 16])
        .unwrap_err()
        .to_string();
    assert!(err.contains("met twice"), "{err}");
    assert!(fs.stat(b"/nothing").is_err());
    assert!(fs.read_link(b"/etc/hostname").is_err());
    assert!(fs.read_dir(b"/etc/hostname", 10).is_err());
}

/// One damaged inode (its magic overwritten by xfs_db) is listed as unreadable, with
/// why; the rest of its directory is listed, found and copied as before.
#[test]
fn a_damaged_inode_does_not_hide_its_directory() {
    let (_dir, img) = v5_image();
    let ino = open(&std::fs::read(&img).unwrap())
        .unwrap()
        .stat("/etc/ünï cödé.txt".as_bytes())
        .unwrap()
        .ino;
    let out = Command::new("xfs_db")
        .args([
            "-x",
            "-c",
            &format!("inode {ino}"),
            "-c",
            "write -d core.magic 0",
        ])
        .arg(&img)
        .output()
        .unwrap();
    // xfs_db exits 0 even when a write fails: check what it says.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("core.magic = 0"),
        "{out:?}"
    );
    let mut fs = open(&std::fs::read(&img).unwrap()).unwrap();
    let l = list_fs(fs.as_mut(), "/etc").unwrap();
    let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "hard",
            "hostname",
            "link",
            "longlink",
            "sparse",
            "sub",
            "ünï cödé.txt"
        ]
    );
    let bad = &l.entries[6];
    assert_eq!(bad.kind, EntryKind::Unknown);
    let why = bad.error.as_deref().unwrap_or_default();
    assert!(why.contains(&format!("inode {ino}")), "{why}");
    let ok: Vec<_> = l.entries[..6]
        .iter()
        .filter(|e| e.error.is_some())
        .collect();
    assert!(ok.is_empty(), "{ok:?}");
    assert_eq!(l.entries[1].kind, EntryKind::File);
    let json = serde_json::to_value(&l).unwrap();
    assert_eq!(json["entries"][6]["kind"], "unknown");
    assert!(json["entries"][1].get("error").is_none(), "{json}");
    // get copies the rest and names the damaged entry among the skipped.
    let to = tempfile::tempdir().unwrap();
    let sum = get_fs(fs.as_mut(), "/etc", to.path(), GetOptions::default()).unwrap();
    assert_eq!(sum.skipped.len(), 1, "{:?}", sum.skipped);
    assert!(sum.skipped[0].contains("ünï cödé.txt"), "{:?}", sum.skipped);
    assert_eq!(
        std::fs::read(to.path().join("etc/hostname")).unwrap(),
        b"xfs-test\n"
    );
    let found = find_fs(fs.as_mut(), "/etc", "*.txt").unwrap();
    assert_eq!(found.matches.len(), 1);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]
        /// Metadata of a real image (the first MiB of each AG: headers, inodes,
        /// directories, the block map) with random damage never panics any walker.
        #[test]
        fn mutated_images_never_panic(
            edits in proptest::collection::vec((0usize..1 << 20, any::<bool>(), any::<u8>()), 1..64)
        ) {
            static IMG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let img = IMG.get_or_init(|| {
                let (_dir, img) = v5_image();
                std::fs::read(img).unwrap()
            });
            let mut bytes = img.clone();
            for (at, second_ag, b) in edits {
                bytes[at + if second_ag { 32 << 20 } else { 0 }] = b;
            }
            // find stats every node; get reads the files of /etc (not the 3200 small ones).
            if let Ok(mut fs) = open(&bytes) {
                let _ = find_fs(fs.as_mut(), "/", "*");
                let to = tempfile::tempdir().unwrap();
                let _ = get_fs(fs.as_mut(), "/etc", to.path(), GetOptions::default());
            }
        }
    }
}
