//! File-level access to filesystems other than ext (issue 19): FAT made with mkfs.fat
//! and mtools, NTFS made with mkntfs and filled through ntfs-3g, XFS made with mkfs.xfs
//! and filled through a kernel loop mount, on partitions of a lab VM's disk, backed up through the normal path
//! into an encrypted repository, then `files ls/get/find` checked against the source.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use virtkeep_lab::TestVm;

use crate::harness::Node;

const MIB: u64 = 1 << 20;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The source tree: a unicode name, a subdirectory, a 3 MiB file, even mtimes (FAT
/// keeps two-second steps).
fn make_content(root: &Path) {
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("sub")).expect("content dir");
    std::fs::write(etc.join("hostname"), "files-fs-test\n").expect("content");
    std::fs::write(etc.join("ünï cödé.txt"), "ü").expect("content");
    let big: Vec<u8> = (0..3 * MIB as u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(etc.join("sub/big.bin"), big).expect("content");
    for (i, p) in ["hostname", "ünï cödé.txt", "sub/big.bin"]
        .iter()
        .enumerate()
    {
        sh(Command::new("touch")
            .arg("-d")
            .arg(format!("@{}", 1_600_000_000 + i as u64 * 86_400))
            .arg(etc.join(p)));
    }
}

/// A FAT32 image of `size_mib` holding `content/etc`, copied in by mcopy with mtimes.
fn fat_image(img: &Path, content: &Path, size_mib: u64) {
    std::fs::File::create(img)
        .and_then(|f| f.set_len(size_mib * MIB))
        .expect("fs image");
    sh(Command::new("mkfs.fat")
        .args(["-F", "32", "-n", "ESP"])
        .arg(img));
    sh(Command::new("mcopy")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(img)
        .arg(content.join("etc"))
        .arg("::/"));
}

fn put(img: &Path, disk: &Path, offset_mib: u64) {
    sh(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={offset_mib}")));
}

/// A 16 MiB NTFS image holding `content/etc` plus a symlink and a hard link, copied in
/// with `cp -a` through an ntfs-3g mount (FUSE, as root).
fn ntfs_image(img: &Path, content: &Path) {
    std::fs::File::create(img)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("fs image");
    sh(Command::new("mkntfs")
        .args(["-q", "-F", "-Q", "-L", "WIN"])
        .arg(img));
    let mnt = img.with_extension("mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    sh(Command::new("ntfs-3g").arg(img).arg(&mnt));
    let cp = Command::new("cp")
        .arg("-a")
        .arg(content.join("etc"))
        .arg(&mnt)
        .output()
        .expect("cp");
    let etc = mnt.join("etc");
    let linked = std::os::unix::fs::symlink("hostname", etc.join("link"))
        .and_then(|()| std::fs::hard_link(etc.join("sub/big.bin"), etc.join("hard")));
    sh(Command::new("umount").arg(&mnt));
    assert!(cp.status.success() && linked.is_ok(), "{cp:?} {linked:?}");
}

/// Size of `etc/large` on the XFS partition: over 256 MiB, not a multiple of a block.
const LARGE: u64 = 260 * MIB + 123;

/// Writes `etc/large`, a sparse file of [`LARGE`] bytes holding a different non-zero MiB
/// at its start, in its middle (across a 4 MiB chunk boundary of the disk view) and at
/// its end, so a wrong offset anywhere changes its sha256. The rest is holes: the
/// fixture stays small and its backup fast.
fn make_large(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p)?;
    f.set_len(LARGE)?;
    for (k, at) in [0, 130 * MIB - MIB / 2, LARGE - MIB]
        .into_iter()
        .enumerate()
    {
        let piece: Vec<u8> = (0..MIB)
            .map(|i| ((i * 13 + k as u64 * 101) % 255 + 1) as u8)
            .collect();
        f.write_all_at(&piece, at)?;
    }
    Ok(())
}

/// A 16 MiB XFS (v5, mkfs.xfs's defaults) holding `content/etc` copied with `cp -a`
/// through a kernel loop mount, plus a symlink, a hard link, a sparse file, a large
/// file and a mode.
fn xfs_image(img: &Path, content: &Path) {
    std::fs::File::create(img)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("fs image");
    // mkfs.xfs makes filesystems under 300 MB only for the XFS test suite.
    sh(Command::new("mkfs.xfs")
        .envs([("TEST_DIR", "1"), ("TEST_DEV", "1"), ("QA_CHECK_FS", "1")])
        .args(["-q", "-f", "-L", "rhel"])
        .arg(img));
    let mnt = img.with_extension("mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    // mount(8) picks a free loop device and then binds it; a test beside this one may
    // take the same device in between ("already mounted or mount point busy").
    let mounted = (0..20).any(|_| {
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(img)
            .arg(&mnt)
            .output()
            .expect("mount");
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        assert!(out.status.success() || busy, "{out:?}");
        if busy {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        out.status.success()
    });
    assert!(mounted, "{}: every loop device taken", img.display());
    let cp = Command::new("cp")
        .arg("-a")
        .arg(content.join("etc"))
        .arg(&mnt)
        .output()
        .expect("cp");
    let etc = mnt.join("etc");
    let filled = std::os::unix::fs::symlink("hostname", etc.join("link"))
        .and_then(|()| std::fs::hard_link(etc.join("sub/big.bin"), etc.join("hard")))
        .and_then(|()| {
            use std::os::unix::fs::{FileExt, PermissionsExt};
            let f = std::fs::File::create(etc.join("sparse"))?;
            f.write_all_at(b"end", 4 * MIB)?;
            make_large(&etc.join("large"))?;
            std::fs::set_permissions(etc.join("hostname"), std::fs::Permissions::from_mode(0o600))
        });
    sh(Command::new("umount").arg(&mnt));
    assert!(cp.status.success() && filled.is_ok(), "{cp:?} {filled:?}");
}

/// vda: GPT with a FAT32 EFI system partition (1), an NTFS partition (2), a small
/// ext4 (3) and an XFS (4).
fn fixture_vm(content: &Path) -> TestVm {
    let vm = TestVm::builder("files-fs")
        .raw_disk(80 * MIB)
        .running(false)
        .build();
    let vda = vm.disk("vda").path.clone().expect("vda file");
    sh(Command::new("sgdisk")
        .args(["-n", "1:2048:+40M", "-t", "1:ef00", "-c", "1:esp"])
        .args(["-n", "2:0:+16M", "-t", "2:0700", "-c", "2:win"])
        .args(["-n", "3:0:+5M", "-t", "3:8300", "-c", "3:linux"])
        .args(["-n", "4:0:+16M", "-t", "4:8300", "-c", "4:xfs"])
        .arg(&vda));
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fat.img");
    fat_image(&img, content, 40);
    put(&img, &vda, 1);
    let img = dir.path().join("ntfs.img");
    ntfs_image(&img, content);
    put(&img, &vda, 41);
    let img = dir.path().join("ext4.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(5 * MIB))
        .expect("fs image");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(content)
        .arg(&img));
    put(&img, &vda, 57);
    let img = dir.path().join("xfs.img");
    xfs_image(&img, content);
    put(&img, &vda, 62);
    vm
}

fn sha256(p: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap_or("?").to_string()
}

/// Relative path → (sha256 or "dir", mtime) of each entry under `root`.
fn tree(root: &Path) -> std::collections::BTreeMap<String, (String, i64)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).expect("under").display().to_string();
            let m = std::fs::symlink_metadata(&p).expect("metadata");
            if m.is_dir() {
                stack.push(p.clone());
                out.insert(rel, ("dir".to_string(), 0));
            } else {
                out.insert(rel, (sha256(&p), m.mtime()));
            }
        }
    }
    out
}

/// `files ls/get/find` read a FAT32 EFI system partition of a backup in an encrypted
/// repository: names (unicode too), sizes and mtimes listed, copies equal to the source
/// by sha256 with their mtimes, globs found.
#[test]
fn files_read_fat_partitions() {
    let node = Node::new();
    let src = node.dir.path().join("src");
    make_content(&src);
    let vm = fixture_vm(&src);
    let (repo, key) = (node.dir.path().join("enc"), node.dir.path().join("enc.key"));
    let (repo, key) = (repo.display().to_string(), key.display().to_string());
    node.ok(&["repo", "init", &repo, "--key-file", &key]);
    let enc = ["--repo", repo.as_str(), "--key-file", key.as_str()];
    let id = node.backup(&vm.name, &enc)["id"]
        .as_str()
        .expect("id")
        .to_string();
    let args =
        |a: &[&str]| -> Vec<String> { a.iter().chain(enc.iter()).map(|s| s.to_string()).collect() };
    let json = |a: &[&str]| -> Value {
        let a = args(a);
        node.json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let v = json(&["files", "ls", &id]);
    let p = &v["disks"][0]["partitions"][0];
    assert_eq!(
        (
            p["filesystem"]["kind"].as_str(),
            p["filesystem"]["label"].as_str()
        ),
        (Some("vfat"), Some("ESP")),
        "{v}"
    );

    let l = json(&["files", "ls", &id, "vda:1:/etc"]);
    let entries: Vec<(String, String, u64, i64)> = l["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("?").to_string(),
                e["kind"].as_str().unwrap_or("?").to_string(),
                e["size"].as_u64().unwrap_or(0),
                e["mtime"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        entries[0],
        ("hostname".into(), "file".into(), 14, 1_600_000_000),
        "{l}"
    );
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["hostname", "sub", "ünï cödé.txt"]);

    let out = node.dir.path().join("out");
    let outs = out.display().to_string();
    let v = json(&["files", "get", &id, "vda:1:/etc", "--to", &outs]);
    assert_eq!(
        (v["files"].as_u64(), v["dirs"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    let mut want = tree(&src.join("etc"));
    // FAT keeps no directory mtimes worth comparing.
    want.insert("sub".into(), ("dir".into(), 0));
    assert_eq!(tree(&out.join("etc")), want);
    let mode = std::fs::metadata(out.join("etc/hostname"))
        .expect("copy")
        .mode();
    assert_eq!(mode & 0o7777, 0o644);

    let a = args(&["files", "find", &id, "vda:1", "*.bin"]);
    let text = node.ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(text, "/etc/sub/big.bin\n");
}

/// `files ls/get` read an NTFS partition of a backup: names, mtimes, a symlink (an
/// ntfs-3g reparse point) and a hard link kept, copies equal to the source by sha256;
/// NTFS's own metadata files are not listed.
#[test]
fn files_read_ntfs_partitions() {
    let node = Node::new();
    let src = node.dir.path().join("src");
    make_content(&src);
    let vm = fixture_vm(&src);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let v = node.json(&["files", "ls", &id]);
    let p = &v["disks"][0]["partitions"][1];
    assert_eq!(p["filesystem"]["kind"].as_str(), Some("ntfs"), "{v}");
    assert_eq!(node.ok(&["files", "ls", &id, "vda:2:/"]), "etc/\n");
    let text = node.ok(&["files", "ls", &id, "vda:2:/etc"]);
    assert_eq!(text, "hard\nhostname\nlink\nsub/\nünï cödé.txt\n");

    let out = node.dir.path().join("out");
    let outs = out.display().to_string();
    let v = node.json(&["files", "get", &id, "vda:2:/etc", "--to", &outs]);
    assert_eq!(
        (
            v["files"].as_u64(),
            v["hard_links"].as_u64(),
            v["symlinks"].as_u64()
        ),
        (Some(3), Some(1), Some(1)),
        "{v}"
    );
    let got = tree(&out.join("etc"));
    let want = tree(&src.join("etc"));
    for (k, w) in &want {
        if w.0 != "dir" {
            assert_eq!(got.get(k), Some(w), "{k}");
        }
    }
    assert_eq!(got["hard"], want["sub/big.bin"]);
    let (a, b) = (out.join("etc/hard"), out.join("etc/sub/big.bin"));
    assert_eq!(
        std::fs::metadata(a).expect("hard").ino(),
        std::fs::metadata(b).expect("big").ino()
    );
    let link = std::fs::read_link(out.join("etc/link")).expect("symlink");
    assert_eq!(link, Path::new("hostname"));
}

/// `files ls/get/find` read an XFS partition of a backup: names, modes, mtimes, a
/// symlink, a hard link and a sparse file kept, copies equal to the source by sha256.
#[test]
fn files_read_xfs_partitions() {
    let node = Node::new();
    let src = node.dir.path().join("src");
    make_content(&src);
    let vm = fixture_vm(&src);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let v = node.json(&["files", "ls", &id]);
    let fs = &v["disks"][0]["partitions"][3]["filesystem"];
    assert_eq!(
        (fs["kind"].as_str(), fs["label"].as_str()),
        (Some("xfs"), Some("rhel")),
        "{v}"
    );
    let text = node.ok(&["files", "ls", &id, "vda:4:/etc"]);
    assert_eq!(
        text,
        "hard\nhostname\nlarge\nlink\nsparse\nsub/\nünï cödé.txt\n"
    );

    let out = node.dir.path().join("out");
    let outs = out.display().to_string();
    let v = node.json(&["files", "get", &id, "vda:4:/etc", "--to", &outs]);
    assert_eq!(
        (
            v["files"].as_u64(),
            v["hard_links"].as_u64(),
            v["symlinks"].as_u64()
        ),
        (Some(5), Some(1), Some(1)),
        "{v}"
    );
    let got = tree(&out.join("etc"));
    let want = tree(&src.join("etc"));
    let large = node.dir.path().join("large");
    make_large(&large).expect("large file");
    assert_eq!(got["large"].0, sha256(&large));
    let copy = std::fs::metadata(out.join("etc/large")).expect("large copy");
    assert!(copy.blocks() * 512 < 16 * MIB, "not sparse: {copy:?}");
    for (k, w) in &want {
        assert_eq!(got.get(k).map(|g| &g.0), Some(&w.0), "{k}");
        if w.0 != "dir" {
            assert_eq!(got.get(k), Some(w), "{k}");
        }
    }
    let meta = |p: &str| std::fs::symlink_metadata(out.join("etc").join(p)).expect(p);
    assert_eq!(meta("hard").ino(), meta("sub/big.bin").ino());
    assert_eq!(meta("hostname").mode() & 0o7777, 0o600);
    let sparse = meta("sparse");
    assert_eq!(sparse.len(), 4 * MIB + 3);
    assert!(sparse.blocks() * 512 < MIB, "not sparse: {sparse:?}");
    let link = std::fs::read_link(out.join("etc/link")).expect("symlink");
    assert_eq!(link, Path::new("hostname"));
    let text = node.ok(&["files", "find", &id, "vda:4", "*.bin"]);
    assert_eq!(text, "/etc/sub/big.bin\n");
}

/// Runs `virtkeep --json mount ID DIR`; returns the child once its ready line is out.
fn mount_bg(node: &Node, id: &str, dir: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .args(["--json", "mount", id])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mount");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    assert!(line.contains("vda.img"), "{line}");
    child
}

fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let d = dir.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(d.as_str()))
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("mount did not end");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `mount` shows `DIR/DISK/PART/…` for the FAT, NTFS, ext4 and XFS partitions beside
/// `DIR/DISK.img`: files equal to the source by sha256 with their mtimes, symlinks
/// readable, nothing writable; Ctrl-C leaves nothing mounted.
#[test]
fn mount_browses_partitions() {
    let node = Node::new();
    let src = node.dir.path().join("src");
    make_content(&src);
    let vm = fixture_vm(&src);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let dir = node.dir.path().join("mnt");
    std::fs::create_dir(&dir).expect("mnt");
    let mut child = mount_bg(&node, &id, &dir);
    assert!(mounted(&dir));
    assert_eq!(names(&dir), ["vda", "vda.img"]);
    assert_eq!(names(&dir.join("vda")), ["1", "2", "3", "4"]);
    let want = tree(&src.join("etc"));
    for part in ["1", "2", "3", "4"] {
        let etc = dir.join("vda").join(part).join("etc");
        let got = tree(&etc);
        for (k, w) in &want {
            if w.0 != "dir" {
                assert_eq!(got.get(k), Some(w), "vda/{part}/etc/{k}");
            }
        }
    }
    // The large file, read through the XFS reader.
    let large = node.dir.path().join("large");
    make_large(&large).expect("large file");
    assert_eq!(sha256(&dir.join("vda/4/etc/large")), sha256(&large));
    for part in ["2", "4"] {
        let link = std::fs::read_link(dir.join("vda").join(part).join("etc/link"));
        assert_eq!(link.expect("symlink"), Path::new("hostname"));
    }
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("vda/3/etc/hostname"));
    assert!(w.is_err(), "opened for writing");
    assert!(!dir.join("vda/1/etc/nope").exists());

    sh(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let status = wait_exit(&mut child);
    assert!(status.success(), "mount exit {status}");
    assert!(!mounted(&dir), "left mounted after Ctrl-C");
}
