//! File-level access to filesystems other than ext (issue 19): FAT made with mkfs.fat
//! and mtools, on partitions of a lab VM's disk, backed up through the normal path
//! into an encrypted repository, then `files ls/get/find` checked against the source.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

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

/// vda: GPT with a FAT32 EFI system partition (1).
fn fixture_vm(content: &Path) -> TestVm {
    let vm = TestVm::builder("files-fs")
        .raw_disk(64 * MIB)
        .running(false)
        .build();
    let vda = vm.disk("vda").path.clone().expect("vda file");
    sh(Command::new("sgdisk")
        .args(["-n", "1:2048:+40M", "-t", "1:ef00", "-c", "1:esp"])
        .arg(&vda));
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fat.img");
    fat_image(&img, content, 40);
    put(&img, &vda, 1);
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
