//! The core path: running and stopped VMs, file disks, restore under a new name.

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

fn restored_disk<'a>(r: &'a serde_json::Value, target: &str) -> (&'a str, &'a str) {
    let d = r["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .find(|d| d["target"] == target)
        .expect("disk in result");
    (
        d["path"].as_str().expect("path"),
        d["format"].as_str().expect("format"),
    )
}

/// Multi-disk running VM: data written while it runs, backup, more writes, restore under
/// a new name: every restored disk equals the snapshot instant, the VM starts, and the
/// host keeps no overlay while the original VM runs on its own files again.
#[test]
fn running_vm_backup_and_restore_at_snapshot_instant() {
    let node = Node::new();
    let vm = TestVm::builder("run")
        .qcow2_disk(64 * MIB)
        .raw_disk(32 * MIB)
        .running(true)
        .build();
    let before_sources = vm.current_sources();
    vm.write_pattern("vda", 0xab, 0, 4 * MIB);
    vm.write_pattern("vda", 0xcd, 40 * MIB, 3 * MIB + 4096);
    vm.write_pattern("vdb", 0x5a, 8 * MIB, MIB);
    let at_snapshot = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];

    let result = node.backup(&vm.name, &["--mode", "full"]);
    assert_eq!(result["method"], "live_snapshot");
    assert_eq!(result["mode"], "full");
    let id = result["id"].as_str().expect("id").to_string();
    // Only allocated data crossed the wire: about 8 MiB, not the 96 MiB of both disks.
    let read: u64 = result["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["bytes_read"].as_u64().expect("n"))
        .sum();
    assert!((8 * MIB..16 * MIB).contains(&read), "bytes read {read}");

    // The VM is back on its own files, nothing left behind, and it keeps running.
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), before_sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());

    // Writes after the backup must not show in the restore.
    vm.write_pattern("vda", 0xee, 0, MIB);
    vm.write_pattern("vdb", 0xee, 8 * MIB, MIB);
    assert_ne!(vm.disk_checksum("vda"), at_snapshot[0]);

    let snaps = node.json(&["snapshots"]);
    let listed = snaps
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("backup listed");
    assert_eq!(listed["vm"], vm.name.as_str());
    assert_eq!(listed["host"], HOST);
    assert!(listed["time"].as_str().is_some_and(|t| t.contains('T')));

    let new_name = unique_name("run-restored");
    let restored = TestVm::adopt(&new_name);
    let r = node.json(&["restore", &id, "--to", HOST, "--name", &new_name, "--start"]);
    assert_eq!(r["started"], true);
    for (i, target) in ["vda", "vdb"].iter().enumerate() {
        let (path, format) = restored_disk(&r, target);
        assert_eq!(
            restored_checksum(path, format),
            at_snapshot[i],
            "disk {target} differs from the snapshot instant"
        );
    }
    assert_eq!(restored_disk(&r, "vda").1, "qcow2");
    assert_eq!(restored_disk(&r, "vdb").1, "raw");
    assert!(restored.is_running());
    // A fresh identity: other UUID, other MACs, its own files.
    let xml = node.lab.virsh(&["dumpxml", &new_name]);
    let orig = node.lab.virsh(&["dumpxml", &vm.name]);
    let uuid = |x: &str| {
        x.split("<uuid>")
            .nth(1)
            .and_then(|s| s.split("</uuid>").next())
            .map(str::to_string)
    };
    assert_ne!(uuid(&xml), uuid(&orig));
    for (_, src) in restored.current_sources() {
        assert!(
            !before_sources.iter().any(|(_, s)| *s == src),
            "restored VM shares {src} with the original"
        );
    }
}

/// A stopped VM is frozen with qemu-img overlays; the restore equals its disks, the
/// definition returns to the original files, and restoring onto an existing file or
/// domain is refused without --force.
#[test]
fn stopped_vm_backup_restore_and_refusals() {
    let node = Node::new();
    let vm = TestVm::builder("stop")
        .qcow2_disk(32 * MIB)
        .raw_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x11, MIB, 2 * MIB);
    vm.write_pattern("vdb", 0x22, 0, 512 * 1024);
    let sums = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    let before = vm.current_sources();

    let result = node.backup(&vm.name, &[]);
    assert_eq!(result["method"], "offline_overlay");
    assert!(result["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(!vm.is_running());
    assert_eq!(vm.current_sources(), before);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    let inactive = node.lab.virsh(&["dumpxml", "--inactive", &vm.name]);
    assert!(
        !inactive.contains(".virtkeep-"),
        "definition still names an overlay"
    );
    let id = result["id"].as_str().expect("id");

    // Restoring over the VM's own files or domain is refused.
    let out = node.run(&["restore", id, "--to", HOST, "--define"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exists"), "stderr: {stderr}");
    assert!(stderr.contains("hint:"), "no hint: {stderr}");

    // Single-disk restore into the existing VM's own path (stopped VM, --force).
    vm.write_pattern("vdb", 0x99, 0, MIB);
    assert_ne!(vm.disk_checksum("vdb"), sums[1]);
    node.ok(&["restore", id, "--to", HOST, "--disk", "vdb", "--force"]);
    assert_eq!(vm.disk_checksum("vdb"), sums[1]);
    assert_eq!(vm.disk_checksum("vda"), sums[0]);

    // Restore into another directory under a new name.
    let dir = node.lab.pool_dir.join(unique_name("dir"));
    let new_name = unique_name("stop-restored");
    let restored = TestVm::adopt(&new_name);
    let storage = format!("file:{}", dir.display());
    let r = node.json(&[
        "restore",
        id,
        "--to",
        HOST,
        "--name",
        &new_name,
        "--storage",
        &storage,
        "--define",
    ]);
    for (i, target) in ["vda", "vdb"].iter().enumerate() {
        let (path, format) = restored_disk(&r, target);
        assert!(path.starts_with(&dir.display().to_string()));
        assert_eq!(restored_checksum(path, format), sums[i]);
    }
    restored.start();
    assert!(restored.is_running());
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}

/// --exclude-disk leaves a disk out (and the restored definition drops it); pre and
/// post commands run on the host around the snapshot.
#[test]
fn excluded_disk_and_hooks() {
    let node = Node::new();
    let vm = TestVm::builder("excl")
        .qcow2_disk(16 * MIB)
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x33, 0, MIB);
    let marker = node.lab.pool_dir.join(unique_name("hook"));
    let marker_s = marker.display().to_string();
    let pre = format!("echo \"pre $VIRTKEEP_VM\" >> '{marker_s}'");
    let post = format!("echo post >> '{marker_s}'");
    let result = node.backup(
        &vm.name,
        &[
            "--exclude-disk",
            "vdb",
            "--pre-snapshot",
            &pre,
            "--post-snapshot",
            &post,
        ],
    );
    let disks: Vec<&str> = result["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["target"].as_str().expect("t"))
        .collect();
    assert_eq!(disks, ["vda"]);
    assert_eq!(result["skipped"][0]["target"], "vdb");
    let log = std::fs::read_to_string(&marker).expect("hooks ran");
    assert_eq!(log, format!("pre {}\npost\n", vm.name));
    let _ = std::fs::remove_file(&marker);
    crate::harness::assert_only_incremental_base(&vm);

    let new_name = unique_name("excl-restored");
    let restored = TestVm::adopt(&new_name);
    let r = node.json(&[
        "restore",
        result["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
    ]);
    assert!(
        r["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("vdb")))
    );
    let xml = node.lab.virsh(&["dumpxml", &new_name]);
    assert!(!xml.contains("dev='vdb'"), "excluded disk still defined");
    drop(restored);
}

/// `--transport netcat` (NBD on plain TCP) and `--transport stream` (dd through SSH)
/// give the same bytes; the stream refuses qcow2 with what to do.
#[test]
fn netcat_and_stream_transports() {
    let node = Node::new();
    let vm = TestVm::builder("transport")
        .qcow2_disk(16 * MIB)
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x61, 2 * MIB, MIB);
    vm.write_pattern("vdb", 0x62, 5 * MIB, 2 * MIB);
    let sums = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];

    let r = node.backup(&vm.name, &["--transport", "netcat"]);
    let id = r["id"].as_str().expect("id").to_string();
    crate::harness::assert_only_incremental_base(&vm);

    let spec = format!("{HOST}/{}", vm.name);
    let out = node.run(&["backup", &spec, "--transport", "stream"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-nbd"));
    crate::harness::assert_only_incremental_base(&vm);

    let s = node.backup(
        &vm.name,
        &["--transport", "stream", "--exclude-disk", "vda"],
    );
    assert_eq!(
        s["disks"][0]["bytes_read"],
        16 * MIB,
        "the stream reads every byte"
    );
    crate::harness::assert_only_incremental_base(&vm);

    for (backup, targets) in [
        (id.as_str(), vec!["vda", "vdb"]),
        (s["id"].as_str().expect("id"), vec!["vdb"]),
    ] {
        let new_name = unique_name("transport-restored");
        let restored = TestVm::adopt(&new_name);
        let out = node.json(&[
            "restore", backup, "--to", HOST, "--name", &new_name, "--define",
        ]);
        for t in targets {
            let (path, format) = restored_disk(&out, t);
            let i = if t == "vda" { 0 } else { 1 };
            assert_eq!(restored_checksum(path, format), sums[i], "{backup} {t}");
        }
        drop(restored);
    }
}

/// A linked clone (disk backed by a shared template): the backup commits its overlay into
/// the VM's own disk, never into the template, and the restore is flattened.
#[test]
fn linked_clone_template_is_never_written() {
    let node = Node::new();
    let vm = TestVm::builder("clone")
        .qcow2_disk(32 * MIB)
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    let disk = vm.disk("vda").path.clone().expect("path");
    let template = node
        .lab
        .pool_dir
        .join(format!("{}-template.qcow2", vm.name));
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &template.display().to_string(),
        "32M",
    ]);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5e 0 8M"])
        .arg(&template)
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &template.display().to_string(),
        "-F",
        "qcow2",
        &disk.display().to_string(),
    ]);
    let chown = format!("{}:{}", node.lab.qemu_user, node.lab.qemu_group);
    for p in [&template, &disk] {
        assert!(
            std::process::Command::new("chown")
                .arg(&chown)
                .arg(p)
                .status()
                .expect("chown")
                .success()
        );
    }
    vm.start();
    vm.write_pattern("vda", 0x6f, 4 * MIB, MIB);
    let template_sum = virtkeep_lab::file_checksum(&template, "qcow2");
    let sum = vm.disk_checksum("vda");
    let before = vm.current_sources();

    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["method"], "live_snapshot");
    assert_eq!(
        virtkeep_lab::file_checksum(&template, "qcow2"),
        template_sum,
        "the template was written"
    );
    assert_eq!(vm.current_sources(), before);
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(vm.disk_checksum("vda"), sum);

    let new_name = unique_name("clone-restored");
    let restored = TestVm::adopt(&new_name);
    let out = node.json(&[
        "restore",
        r["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
    ]);
    let (path, format) = restored_disk(&out, "vda");
    assert_eq!(restored_checksum(path, format), sum);
    drop(restored);
    drop(vm);
    let _ = std::fs::remove_file(&template);
}

/// Undefines UEFI domains with their NVRAM files (libvirt refuses a plain undefine of
/// a domain with `<nvram>`); declared after the `TestVm`s, so it runs before their Drop.
struct UndefineWithNvram<'a>(&'a Node, Vec<String>);

impl Drop for UndefineWithNvram<'_> {
    fn drop(&mut self) {
        for name in &self.1 {
            let _ = self.0.lab.try_virsh(&[
                "undefine",
                "--domain",
                name,
                "--nvram",
                "--checkpoints-metadata",
            ]);
        }
    }
}

/// A UEFI VM restored under a new name gets a variable store of its own (a copy of the
/// original's), never the original's file: two domains on one NVRAM file overwrite each
/// other's boot entries. An existing store of that name is refused without --force.
#[test]
fn renamed_uefi_vm_gets_its_own_nvram() {
    let node = Node::new();
    // Raw and stopped: the offline method, which never starts the VM (the lab has no
    // OVMF firmware to start it with).
    let vm = TestVm::builder("uefi")
        .raw_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x3c, 0, MIB);
    let sum = vm.disk_checksum("vda");
    let nvram_dir = std::path::Path::new("/var/lib/libvirt/qemu/nvram");
    std::fs::create_dir_all(nvram_dir).expect("nvram dir");
    let original = nvram_dir.join(format!("{}_VARS.fd", vm.name));
    let vars: Vec<u8> = (0..128 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&original, &vars).expect("write nvram");
    let xml = node.lab.virsh(&["dumpxml", "--inactive", &vm.name]);
    let os = format!(
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
         <nvram>{}</nvram></os>\n  <features><acpi/></features>",
        original.display()
    );
    assert!(
        xml.contains("</os>") && !xml.contains("<features>"),
        "{xml}"
    );
    let file = node.dir.path().join("uefi.xml");
    std::fs::write(&file, xml.replacen("</os>", &os, 1)).expect("write xml");
    let new_name = unique_name("uefi-restored");
    let restored = TestVm::adopt(&new_name);
    node.lab.virsh(&["define", &file.display().to_string()]);
    let _undefine = UndefineWithNvram(&node, vec![vm.name.clone(), new_name.clone()]);

    let r = node.backup(&vm.name, &[]);
    let id = r["id"].as_str().expect("id");
    let own = nvram_dir.join(format!("{new_name}_VARS.fd"));
    std::fs::write(&own, b"someone else's").expect("write");
    let refused = node.run(&["restore", id, "--to", HOST, "--name", &new_name, "--define"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("NVRAM file"), "{stderr}");
    assert!(
        node.lab
            .try_virsh(&["domuuid", "--domain", &new_name])
            .is_err(),
        "refused restore defined the domain"
    );
    assert_eq!(std::fs::read(&own).expect("kept"), b"someone else's");
    std::fs::remove_file(&own).expect("rm");

    let out = node.json(&["restore", id, "--to", HOST, "--name", &new_name, "--define"]);
    let (path, format) = restored_disk(&out, "vda");
    assert_eq!(restored_checksum(path, format), sum);
    let restored_xml = node.lab.virsh(&["dumpxml", "--inactive", &new_name]);
    assert!(
        restored_xml.contains(&format!("<nvram>{}</nvram>", own.display())),
        "{restored_xml}"
    );
    assert!(!restored_xml.contains(&original.display().to_string()));
    assert_eq!(std::fs::read(&own).expect("own nvram"), vars);
    assert_eq!(std::fs::read(&original).expect("original nvram"), vars);
    assert!(
        out["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("UEFI variables"))),
        "{out}"
    );
    drop(restored);
}
