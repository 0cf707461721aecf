//! Restore treats the repository as untrusted and never destroys before it has written:
//! destinations virtkeep chose and checked, no clash between disks, no overwrite of a
//! running domain's disk, in-place restores that leave the original intact on failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

/// CRC-32 (IEEE), as the repository's unencrypted meta blobs carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The payload of an unencrypted meta blob (after magic, CRC and, in format v2, the
/// 32-byte MAC).
fn meta_payload(path: &Path) -> (Vec<u8>, Vec<u8>) {
    let blob = std::fs::read(path).expect("read meta blob");
    assert!(blob.len() > 12);
    let crc = u32::from_le_bytes(blob[8..12].try_into().expect("crc"));
    assert_eq!(
        crc,
        crc32(&blob[12..]),
        "test CRC differs from the repository's"
    );
    let skip = if blob[..8] == *virtkeep_repo::MAGIC_META_AUTH {
        12 + 32
    } else {
        12
    };
    (blob[..8].to_vec(), blob[skip..].to_vec())
}

/// Edits a backup's manifest as a writer holding the node's key file would (changed
/// JSON, MAC and CRC recomputed): what the destination checks must refuse even when
/// the metadata authenticates (without the key, authentication refuses it first — see
/// auth.rs).
fn tamper_manifest(node: &Node, id: &str, edit: impl FnOnce(&mut Value)) {
    let path = node.repo().join("snapshots").join(id).join("manifest");
    let (magic, payload) = meta_payload(&path);
    let mut m: Value = serde_json::from_slice(&payload).expect("manifest JSON");
    edit(&mut m);
    let payload = serde_json::to_vec_pretty(&m).expect("json");
    let object = format!("snapshots/{id}/manifest");
    let body = crate::auth::mac_meta(node, &magic, &object, &payload);
    let mut blob = magic;
    blob.extend_from_slice(&crc32(&body).to_le_bytes());
    blob.extend_from_slice(&body);
    std::fs::write(&path, blob).expect("write manifest");
}

/// Deletes one stored chunk of disk `target` of backup `id` (local repository);
/// returns its path and bytes, to put it back.
fn delete_a_chunk_of(node: &Node, id: &str, target: &str) -> (PathBuf, Vec<u8>) {
    let snap = node.repo().join("snapshots").join(id);
    let (_, manifest) = meta_payload(&snap.join("manifest"));
    let m: Value = serde_json::from_slice(&manifest).expect("manifest");
    let name = m["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .find(|d| d["target"] == target)
        .and_then(|d| d["name"].as_str())
        .expect("disk name")
        .to_string();
    let (_, index) = meta_payload(&snap.join(format!("{name}.fidx")));
    let digest = index[64..]
        .chunks(32)
        .find(|d| d.iter().any(|b| *b != 0))
        .expect("a stored chunk");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let chunk = node.repo().join("chunks").join(&hex[..3]).join(&hex);
    let bytes = std::fs::read(&chunk).expect("read chunk");
    std::fs::remove_file(&chunk).expect("remove chunk");
    (chunk, bytes)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Restore's temporaries (and anything else of ours) beside `path`.
fn temporaries_beside(path: &Path) -> Vec<PathBuf> {
    let dir = path.parent().expect("dir");
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            let base = path.file_name().unwrap_or_default().to_string_lossy();
            n.contains(".vkrestore-") && n.contains(base.as_ref())
        })
        .collect()
}

/// A manifest whose disk source climbs out with `..` (CRC recomputed) is refused
/// before anything is written: no directory made, no file, no domain.
#[test]
fn tampered_manifest_path_is_refused_and_nothing_written() {
    let node = Node::new();
    let vm = TestVm::builder("tamper")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x41, 0, MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let escape = unique_name("escape");
    let evil = format!("{}/../{escape}/x.raw", node.lab.pool_dir.display());
    tamper_manifest(&node, &id, |m| {
        m["disks"][0]["source"] = Value::from(evil.clone())
    });
    // The tampered manifest still reads as valid (its writer held the key).
    assert!(
        node.json(&["snapshots"])
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s["id"] == id.as_str())
    );

    let new_name = unique_name("tamper-restored");
    let restored = TestVm::adopt(&new_name);
    let out = node.run(&[
        "restore", &id, "--to", HOST, "--name", &new_name, "--define",
    ]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "tampered restore succeeded");
    assert!(stderr.contains("not canonical"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    let outside = node.lab.pool_dir.parent().expect("parent").join(&escape);
    assert!(!outside.exists(), "{} was created", outside.display());
    assert!(
        node.lab
            .try_virsh(&["domuuid", "--domain", &new_name])
            .is_err(),
        "refused restore defined the domain"
    );
    drop(restored);
}

/// `--storage file:DIR` through a symlinked directory is refused: virtkeep never
/// writes where a symlink points.
#[test]
fn symlinked_destination_directory_is_refused() {
    let node = Node::new();
    let vm = TestVm::builder("symlink")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x42, 0, MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let real = node.lab.pool_dir.join(unique_name("real"));
    let link = node.lab.pool_dir.join(unique_name("link"));
    std::fs::create_dir(&real).expect("mkdir");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let storage = format!("file:{}", link.display());
    let out = node.run(&["restore", &id, "--to", HOST, "--storage", &storage]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "restore through a symlink succeeded");
    assert!(stderr.contains("symlink"), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(&real).expect("ls").collect();
    assert!(
        written.is_empty(),
        "written through the symlink: {written:?}"
    );
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_dir_all(&real);
}

/// Two disks whose stored files share a basename (/a/disk.raw, /b/disk.raw) would land
/// on one file under `--storage file:DIR`: refused before anything is written; with
/// `--name` each gets its own file.
#[test]
fn two_disks_on_one_destination_are_refused() {
    let node = Node::new();
    let vm = TestVm::builder("clash")
        .raw_disk(8 * MIB)
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x43, 0, MIB);
    vm.write_pattern("vdb", 0x44, 0, MIB);
    let sums = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    tamper_manifest(&node, &id, |m| {
        m["disks"][0]["source"] = Value::from("/ssd/vm1/disk.raw");
        m["disks"][1]["source"] = Value::from("/hdd/vm1/disk.raw");
    });
    let dir = node.lab.pool_dir.join(unique_name("clash-dir"));
    let storage = format!("file:{}", dir.display());
    let out = node.run(&["restore", &id, "--to", HOST, "--storage", &storage]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "clashing restore succeeded");
    assert!(stderr.contains("would both be restored"), "{stderr}");
    assert!(!dir.exists(), "the refused restore wrote {}", dir.display());

    let new_name = unique_name("clash-restored");
    let r = node.json(&[
        "restore",
        &id,
        "--to",
        HOST,
        "--storage",
        &storage,
        "--name",
        &new_name,
    ]);
    let paths: Vec<&str> = r["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["path"].as_str().expect("path"))
        .collect();
    assert_ne!(paths[0], paths[1]);
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(restored_checksum(p, "raw"), sums[i]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A running domain's disk is never a destination, with or without --force, however the
/// destination is spelled (`--storage file:` its own directory).
#[test]
fn running_domains_disk_is_never_overwritten() {
    let node = Node::new();
    let vm = TestVm::builder("busy")
        .raw_disk(8 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x45, 0, MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x46, 0, MIB);
    let disk = vm.disk("vda").path.clone().expect("path");
    let before = std::fs::read(&disk).expect("disk bytes");
    let storage = format!("file:{}", disk.parent().expect("dir").display());
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["restore", id.as_str(), "--to", HOST, "--storage", &storage];
        args.extend_from_slice(extra);
        let out = node.run(&args);
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{extra:?}: overwrote a running disk");
        assert!(stderr.contains("running domain"), "{extra:?}: {stderr}");
        assert!(vm.is_running());
        assert_eq!(std::fs::read(&disk).expect("disk"), before, "{extra:?}");
        assert!(temporaries_beside(&disk).is_empty());
    }
}

/// An in-place restore with --force that fails (a chunk of the second disk is missing)
/// leaves both original disks byte for byte and the definition as they were, and no
/// temporary; `--dry-run` shows the plan and writes nothing.
#[test]
fn failed_in_place_restore_leaves_the_original() {
    let node = Node::new();
    let vm = TestVm::builder("atomic")
        .raw_disk(8 * MIB)
        .qcow2_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x47, 0, 2 * MIB);
    vm.write_pattern("vdb", 0x48, MIB, 2 * MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x49, 0, MIB);
    vm.write_pattern("vdb", 0x4a, 0, MIB);
    let disks: Vec<PathBuf> = ["vda", "vdb"]
        .iter()
        .map(|t| vm.disk(t).path.clone().expect("path"))
        .collect();
    let before: Vec<Vec<u8>> = disks
        .iter()
        .map(|d| std::fs::read(d).expect("read"))
        .collect();
    let xml = node.lab.virsh(&["dumpxml", "--inactive", &vm.name]);

    delete_a_chunk_of(&node, &id, "vdb");
    for extra in [&[][..], &["--define"][..]] {
        let mut args = vec!["restore", id.as_str(), "--to", HOST, "--force"];
        args.extend_from_slice(extra);
        let out = node.run(&args);
        assert!(
            !out.status.success(),
            "restore with a missing chunk succeeded"
        );
        assert!(stderr_of(&out).contains("missing"), "{}", stderr_of(&out));
        for (d, b) in disks.iter().zip(&before) {
            assert!(
                std::fs::read(d).expect("read") == *b,
                "{} changed",
                d.display()
            );
            assert!(
                temporaries_beside(d).is_empty(),
                "{:?}",
                temporaries_beside(d)
            );
        }
        assert_eq!(node.lab.virsh(&["dumpxml", "--inactive", &vm.name]), xml);
    }

    // The plan of the same restore (a dry run reads no chunk); it writes nothing.
    let plan = node.json(&[
        "restore",
        &id,
        "--to",
        HOST,
        "--define",
        "--force",
        "--dry-run",
    ]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["replaces"], serde_json::json!(["vda", "vdb"]));
    assert_eq!(plan["disks"][0]["path"], disks[0].display().to_string());
    assert!(
        plan["xml_changes"]
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c
                .as_str()
                .is_some_and(|c| c.starts_with("disk vdb: source file"))),
        "{plan}"
    );
    for (d, b) in disks.iter().zip(&before) {
        assert!(
            std::fs::read(d).expect("read") == *b,
            "{} changed",
            d.display()
        );
    }
}

/// A restore killed (SIGKILL) while writing in place: the original disk is intact, and
/// `cleanup` stops its writable export and removes its temporary; the next restore works.
#[test]
fn killed_in_place_restore_then_cleanup() {
    let node = Node::new();
    let vm = TestVm::builder("kill-restore")
        .raw_disk(512 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x4b, 0, 384 * MIB);
    let sum = vm.disk_checksum("vda");
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x4c, 0, MIB);
    let disk = vm.disk("vda").path.clone().expect("path");
    let before = virtkeep_lab::file_checksum(&disk, "raw");

    kill_mid_restore(
        &node,
        &["restore", &id, "--to", HOST, "--force", "--parallel", "1"],
    );
    let temp = temporaries_beside(&disk)
        .into_iter()
        .next()
        .expect("the restore was killed while writing its temporary");
    assert_eq!(virtkeep_lab::file_checksum(&disk, "raw"), before);

    node.json(&["cleanup", HOST]);
    assert!(!temp.exists(), "cleanup left {}", temp.display());
    assert!(temporaries_beside(&disk).is_empty());
    let nbd = Command::new("pgrep")
        .args(["-af", "qemu-nbd"])
        .output()
        .expect("pgrep");
    let temp_s = temp.display().to_string();
    assert!(
        !String::from_utf8_lossy(&nbd.stdout).contains(&temp_s),
        "export of {temp_s} still running"
    );
    assert_eq!(virtkeep_lab::file_checksum(&disk, "raw"), before);

    node.ok(&["restore", &id, "--to", HOST, "--force"]);
    assert_eq!(vm.disk_checksum("vda"), sum);
}

/// Restore takes the lock of its target VM, as backup does: held on the host, the
/// restore waits for it.
#[test]
fn restore_waits_for_the_vm_lock() {
    let node = Node::new();
    let vm = TestVm::builder("lock")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x4d, 0, MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let uuid = node.lab.virsh(&["domuuid", "--domain", &vm.name]);
    let lock = format!("/run/virtkeep/locks/{}.lock", uuid.trim());
    let hold = Duration::from_secs(4);
    let mut holder = Command::new("flock")
        .args(["-x", &lock, "sleep", &hold.as_secs().to_string()])
        .spawn()
        .expect("flock");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    node.ok(&["restore", &id, "--to", HOST, "--force"]);
    let took = started.elapsed();
    let _ = holder.wait();
    assert!(
        took >= hold - Duration::from_millis(800),
        "restore did not wait for the VM lock (took {took:?})"
    );
}

/// A backup whose XML carries QEMU passthrough is defined only with
/// --allow-qemu-passthrough.
#[test]
fn qemu_passthrough_needs_an_explicit_flag() {
    let node = Node::new();
    let vm = TestVm::builder("qemu-ns")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    tamper_manifest(&node, &id, |m| {
        let xml = m["domain_xml"].as_str().expect("xml").to_string();
        let xml = xml.replacen(
            "<domain type=",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' type=",
            1,
        );
        let xml = xml.replacen(
            "</domain>",
            "<qemu:commandline><qemu:arg value='-no-user-config'/></qemu:commandline></domain>",
            1,
        );
        m["domain_xml"] = Value::from(xml);
    });
    let new_name = unique_name("qemu-ns-restored");
    let restored = TestVm::adopt(&new_name);
    let out = node.run(&[
        "restore", &id, "--to", HOST, "--name", &new_name, "--define",
    ]);
    let stderr = stderr_of(&out);
    assert!(
        !out.status.success(),
        "passthrough defined without the flag"
    );
    assert!(stderr.contains("--allow-qemu-passthrough"), "{stderr}");
    assert!(
        node.lab
            .try_virsh(&["domuuid", "--domain", &new_name])
            .is_err()
    );
    node.ok(&[
        "restore",
        &id,
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
        "--allow-qemu-passthrough",
    ]);
    let xml = node.lab.virsh(&["dumpxml", "--inactive", &new_name]);
    assert!(xml.contains("qemu:commandline"), "{xml}");
    drop(restored);
}

/// HOST/VM@latest and unique id prefixes name backups (restore, verify); an ambiguous
/// prefix lists the candidates; --to-file writes one disk on the node, sparse raw or
/// qcow2, refusing an existing file without --force.
#[test]
fn snapshot_names_and_restore_to_a_local_file() {
    let node = Node::new();
    let vm = TestVm::builder("tofile")
        .qcow2_disk(32 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x4e, 4 * MIB, 2 * MIB);
    let first = node.backup(&vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x4f, 20 * MIB, MIB);
    let sum = vm.disk_checksum("vda");
    let latest = node.backup(&vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let spec = format!("{HOST}/{}@latest", vm.name);

    // Both ids start with the year: ambiguous, and both are listed.
    let out = node.run(&["verify", &first[..4]]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains(&first) && stderr.contains(&latest),
        "{stderr}"
    );
    let v = node.json(&["verify", &latest[..latest.len() - 2]]);
    assert_eq!(v["snapshots_checked"], 1, "{v}");

    let dir = tempfile::tempdir().expect("tmp");
    let raw = dir.path().join("vda.raw");
    let raw_s = raw.display().to_string();
    let r = node.json(&["restore", &spec, "--disk", "vda", "--to-file", &raw_s]);
    assert_eq!(r["snapshot"], latest.as_str());
    assert_eq!(restored_checksum(&raw_s, "raw"), sum);
    let md = std::fs::metadata(&raw).expect("stat");
    assert_eq!(md.len(), 32 * MIB);
    {
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 < 8 * MIB,
            "not sparse: {} blocks",
            md.blocks()
        );
    }
    let out = node.run(&["restore", &spec, "--disk", "vda", "--to-file", &raw_s]);
    assert!(!out.status.success(), "overwrote without --force");
    assert!(stderr_of(&out).contains("exists"));
    let prefix = &first[..first.len() - 3];
    node.ok(&[
        "restore",
        prefix,
        "--disk",
        "vda",
        "--to-file",
        &raw_s,
        "--force",
    ]);
    assert_ne!(
        restored_checksum(&raw_s, "raw"),
        sum,
        "--force wrote the older backup"
    );

    let q = dir.path().join("vda.qcow2");
    let q_s = q.display().to_string();
    node.ok(&[
        "restore",
        &spec,
        "--disk",
        "vda",
        "--to-file",
        &q_s,
        "--format",
        "qcow2",
    ]);
    assert_eq!(restored_checksum(&q_s, "qcow2"), sum);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".vkrestore-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An RBD disk restored in place with --force: a failed restore (missing chunk) leaves
/// the image as it was — no `snap purge`/`rbd rm` before the new data is written — and
/// no temporary image; a good one replaces it.
#[test]
fn rbd_in_place_restore_replaces_only_after_writing() {
    let node = Node::new();
    let vm = TestVm::builder("rbd-swap")
        .rbd_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x51, 0, 2 * MIB);
    let first_sum = vm.disk_checksum("vda");
    let first = node.backup(&vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x52, 0, MIB);
    let broken = node.backup(&vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    delete_a_chunk_of(&node, &broken, "vda");
    vm.write_pattern("vda", 0x53, 0, MIB);
    let current = vm.disk_checksum("vda");
    let snaps = vm.leftovers().rbd_snapshots;
    let pool = &node.lab.ceph_pool;

    let out = node.run(&["restore", &broken, "--to", HOST, "--force"]);
    assert!(
        !out.status.success(),
        "restore with a missing chunk succeeded"
    );
    assert_eq!(vm.disk_checksum("vda"), current, "the image changed");
    assert_eq!(vm.leftovers().rbd_snapshots, snaps, "its snapshots changed");
    let ours = || {
        node.lab
            .rbd(&["ls", pool])
            .lines()
            .filter(|i| i.starts_with(&vm.name) && i.contains(".vkrestore-"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(ours().is_empty(), "temporary left: {:?}", ours());

    node.ok(&["restore", &first, "--to", HOST, "--force"]);
    assert_eq!(vm.disk_checksum("vda"), first_sum);
    assert!(ours().is_empty(), "temporary left: {:?}", ours());
}

/// LVM disks restored in place with --force (thick and thin): a failed restore (missing
/// chunk of the second disk) leaves both LVs as they were and no temporary LV; with the
/// chunk back, the restore replaces them, the thin one thin again.
#[test]
fn lvm_in_place_restore_replaces_only_after_writing() {
    use virtkeep_lab::hvm::{LvmTestVm, hvm};
    let h = hvm();
    let node = crate::lvm_host::lvm_node();
    let vm = LvmTestVm::builder("lvswap")
        .thick_disk(8 * MIB)
        .thin_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x54, 0, MIB);
    vm.write_pattern("vdb", 0x55, MIB, MIB);
    let sums = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    let id = node.backup_on("lvmhv", &vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (chunk, bytes) = delete_a_chunk_of(&node, &id, "vdb");
    vm.write_pattern("vda", 0x57, 0, MIB);
    vm.write_pattern("vdb", 0x57, 0, MIB);
    let current = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    let vg = vm.disks[0].vg.clone();
    let temporaries = || {
        h.lvs(&vg)
            .into_iter()
            .filter(|(n, _, _)| {
                vm.disks
                    .iter()
                    .any(|d| n.starts_with(&format!("{}.vkrestore-", d.lv)))
            })
            .collect::<Vec<_>>()
    };

    let out = node.run(&["restore", &id, "--to", "lvmhv", "--force"]);
    assert!(
        !out.status.success(),
        "restore with a missing chunk succeeded"
    );
    let now = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    assert_eq!(now, current, "an LV changed");
    assert!(temporaries().is_empty(), "{:?}", temporaries());

    std::fs::write(&chunk, bytes).expect("put the chunk back");
    node.ok(&["restore", &id, "--to", "lvmhv", "--force"]);
    let now = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    assert_eq!(now, sums);
    assert!(temporaries().is_empty(), "{:?}", temporaries());
    let thin = &vm.disks[1];
    let attr = h
        .lvs(&thin.vg)
        .into_iter()
        .find(|(n, _, _)| *n == thin.lv)
        .map(|(_, a, _)| a)
        .expect("thin LV still there");
    assert!(attr.starts_with('V'), "restored vdb is not thin: {attr}");
    // The old thin LV's kept incremental base (of data the LV no longer holds) went
    // with it.
    assert!(
        vm.leftover_snapshots().is_empty(),
        "{:?}",
        vm.leftover_snapshots()
    );
}

/// Runs `virtkeep ARGS` with failpoint `restore-chunk-written` switched on, and kills it
/// (SIGKILL) where it stops: a data chunk is in the temporary and nothing is swapped yet.
/// (Polling for the temporary and killing a moment later raced the restore: a small disk
/// could be written and committed first, and cleanup then rightly finished the swap.)
fn kill_mid_restore(node: &Node, args: &[&str]) {
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_FAILPOINT", "restore-chunk-written")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn virtkeep");
    let trigger = crate::daemon::failpoint_reached("restore-chunk-written");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if line.contains(&trigger) {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        seen.push(line);
    }
    let _ = child.wait();
    panic!("restore ended before {trigger:?}: {seen:?}");
}

/// No qemu-nbd of this machine serves a path or image containing `needle`.
fn assert_no_export_of(needle: &str) {
    let nbd = Command::new("pgrep")
        .args(["-af", "qemu-nbd"])
        .output()
        .expect("pgrep");
    let list = String::from_utf8_lossy(&nbd.stdout);
    assert!(
        !list.lines().any(|l| l.contains(needle)),
        "export still running: {list}"
    );
}

/// SIGKILL of the node while an in-place `--force` restore writes an RBD image's
/// temporary: the image is untouched, and after `cleanup` no temporary image or export
/// is left, the image and its snapshots are as they were, and the next restore succeeds.
#[test]
fn rbd_killed_in_place_restore_then_cleanup() {
    let node = Node::new();
    let vm = TestVm::builder("rbd-kill")
        .rbd_disk(256 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x4b, 0, 160 * MIB);
    let sum = vm.disk_checksum("vda");
    let id = node.backup(&vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x4c, 0, MIB);
    let before = vm.disk_checksum("vda");
    let snaps = vm.leftovers().rbd_snapshots;
    let pool = node.lab.ceph_pool.clone();
    let temps = || {
        node.lab
            .rbd(&["ls", &pool])
            .lines()
            .filter(|i| i.starts_with(&vm.name) && i.contains(".vkrestore-"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let args = ["restore", &id, "--to", HOST, "--force", "--parallel", "1"];
    kill_mid_restore(&node, &args);
    assert!(!temps().is_empty(), "killed mid write, yet no temporary");
    assert_eq!(vm.disk_checksum("vda"), before);

    node.json(&["cleanup", HOST]);
    assert!(temps().is_empty(), "cleanup left {:?}", temps());
    assert_no_export_of(&format!("{}.vkrestore-", vm.name));
    assert_eq!(vm.disk_checksum("vda"), before);
    assert_eq!(vm.leftovers().rbd_snapshots, snaps);

    node.ok(&["restore", &id, "--to", HOST, "--force"]);
    assert_eq!(vm.disk_checksum("vda"), sum);
    assert!(temps().is_empty(), "{:?}", temps());
}

/// SIGKILL of the node while an in-place `--force` restore writes a thick LV's
/// temporary on the LVM hypervisor: the LV is untouched, and after `cleanup` no
/// temporary LV or export is left, the LV is as it was, and the next restore succeeds.
#[test]
fn lvm_killed_in_place_restore_then_cleanup() {
    use virtkeep_lab::hvm::{LvmTestVm, hvm};
    let h = hvm();
    let node = crate::lvm_host::lvm_node();
    // The failpoint stops the restore after its first data chunk whatever the size; data
    // through the TCG hypervisor moves at a few MiB/s, so three 4 MiB chunks are enough.
    let vm = LvmTestVm::builder("lvkill")
        .thick_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x4b, 0, 12 * MIB);
    let sum = vm.disk_checksum("vda");
    let id = node.backup_on("lvmhv", &vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x4c, 0, MIB);
    let before = vm.disk_checksum("vda");
    let (vg, lv) = (vm.disks[0].vg.clone(), vm.disks[0].lv.clone());
    let marker = format!("{lv}.vkrestore-");
    let temps = || {
        h.lvs(&vg)
            .into_iter()
            .filter(|(n, _, _)| n.starts_with(&marker))
            .collect::<Vec<_>>()
    };
    let args = [
        "restore",
        &id,
        "--to",
        "lvmhv",
        "--force",
        "--parallel",
        "1",
    ];
    kill_mid_restore(&node, &args);
    assert!(!temps().is_empty(), "killed mid write, yet no temporary");
    assert_eq!(vm.disk_checksum("vda"), before);

    node.json(&["cleanup", "lvmhv"]);
    assert!(temps().is_empty(), "cleanup left {:?}", temps());
    let nbd = h.ssh("pgrep -af qemu-nbd || true");
    assert!(!nbd.contains(&marker), "export still running: {nbd}");
    assert_eq!(vm.disk_checksum("vda"), before);

    node.ok(&["restore", &id, "--to", "lvmhv", "--force"]);
    assert_eq!(vm.disk_checksum("vda"), sum);
    assert!(temps().is_empty(), "{:?}", temps());
}
