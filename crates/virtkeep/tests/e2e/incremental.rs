//! Incremental backups through libvirt's backup API (checkpoints, dirty bitmaps, pull
//! mode over the SSH-forwarded socket) and how broken chains heal themselves.

use virtkeep_lab::TestVm;

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;
/// Dirty bitmaps track 64 KiB clusters: a changed range costs at most one extra
/// cluster at each end.
const SLACK: u64 = 2 * 64 * 1024;

fn bytes_read(r: &serde_json::Value) -> u64 {
    r["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["bytes_read"].as_u64().expect("n"))
        .sum()
}

fn restore_and_sum(node: &Node, id: &str, targets: &[&str]) -> Vec<String> {
    let sums = crate::harness::restore_sums(node, id, &[]);
    targets
        .iter()
        .map(|t| {
            sums.iter()
                .find(|(target, _)| target == t)
                .map(|(_, s)| s.clone())
                .expect("restored disk")
        })
        .collect()
}

fn virtkeep_checkpoints(vm: &TestVm) -> Vec<String> {
    vm.leftovers()
        .checkpoints
        .into_iter()
        .filter(|c| c.starts_with("virtkeep-"))
        .collect()
}

#[test]
fn incremental_reads_only_changes_and_every_backup_restores_its_instant() {
    let node = Node::new();
    let vm = TestVm::builder("inc")
        .qcow2_disk(64 * MIB)
        .qcow2_disk(32 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x10, 0, 8 * MIB);
    vm.write_pattern("vdb", 0x20, 4 * MIB, 4 * MIB);
    let first = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];

    let full = node.backup(&vm.name, &[]);
    assert_eq!(full["method"], "backup_api");
    assert_eq!(full["mode"], "full");
    assert!(
        full["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no earlier backup")),
        "{}",
        full["reason"]
    );
    assert_eq!(virtkeep_checkpoints(&vm).len(), 1);

    // 1 MiB + 256 KiB change.
    vm.write_pattern("vda", 0x11, 10 * MIB, MIB);
    vm.write_pattern("vdb", 0x21, 20 * MIB, 256 * 1024);
    let second = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    let changed = MIB + 256 * 1024;

    let inc = node.backup(&vm.name, &[]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    let read = bytes_read(&inc);
    assert!(
        read >= changed && read <= changed + 2 * SLACK,
        "incremental read {read} bytes for {changed} changed"
    );
    // Only the chunks holding changes are new in the repository.
    let new_chunks: u64 = inc["disks"]
        .as_array()
        .expect("d")
        .iter()
        .map(|d| d["chunks_new"].as_u64().expect("n"))
        .sum();
    assert!(new_chunks <= 2, "new chunks {new_chunks}");
    let cps = virtkeep_checkpoints(&vm);
    assert_eq!(
        cps.len(),
        1,
        "older virtkeep checkpoints are deleted: {cps:?}"
    );
    let l = vm.leftovers();
    assert!(
        l.overlay_files.is_empty() && l.snapshots.is_empty(),
        "{l:?}"
    );
    assert!(vm.is_running());

    vm.write_pattern("vda", 0x12, 0, MIB);
    assert_eq!(
        restore_and_sum(&node, inc["id"].as_str().expect("id"), &["vda", "vdb"]),
        second
    );
    assert_eq!(
        restore_and_sum(&node, full["id"].as_str().expect("id"), &["vda", "vdb"]),
        first
    );
}

#[test]
fn broken_chains_fall_back_to_full_with_the_reason() {
    let node = Node::new();
    let vm = TestVm::builder("chain")
        .qcow2_disk(32 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x30, 0, 2 * MIB);
    node.backup(&vm.name, &[]);

    // Someone deleted our checkpoint.
    let cp = virtkeep_checkpoints(&vm).pop().expect("checkpoint");
    node.lab.virsh(&["checkpoint-delete", &vm.name, &cp]);
    let r = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(r["mode"], "full");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("no longer exists")),
        "{}",
        r["reason"]
    );

    // Another tool's checkpoint is left alone and does not disturb the chain.
    node.lab
        .virsh(&["checkpoint-create-as", &vm.name, "othertool-1"]);
    vm.write_pattern("vda", 0x31, 3 * MIB, MIB);
    let sum = vm.disk_checksum("vda");
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["mode"], "incremental", "{}", r["reason"]);
    assert!(
        vm.leftovers()
            .checkpoints
            .contains(&"othertool-1".to_string())
    );
    assert_eq!(
        restore_and_sum(&node, r["id"].as_str().expect("id"), &["vda"]),
        std::slice::from_ref(&sum)
    );

    // The bitmap vanished from the image (disk replaced while the VM was off).
    vm.stop();
    let cp = virtkeep_checkpoints(&vm).pop().expect("checkpoint");
    let path = vm.disk("vda").path.clone().expect("path");
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&path)
        .arg(&cp)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.start();
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["mode"], "full");
    assert!(
        r["reason"].as_str().is_some_and(|s| s.contains("unusable")),
        "{}",
        r["reason"]
    );
    assert_eq!(
        restore_and_sum(&node, r["id"].as_str().expect("id"), &["vda"]),
        [sum]
    );
}

#[test]
fn stopped_vm_incremental_and_vm_stays_off() {
    let node = Node::new();
    let vm = TestVm::builder("inc-off")
        .qcow2_disk(32 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x40, 0, 2 * MIB);
    let full = node.backup(&vm.name, &[]);
    assert_eq!(full["method"], "backup_api");
    assert!(
        !vm.is_running(),
        "the VM is shut off again after its backup"
    );
    vm.write_pattern("vda", 0x41, 16 * MIB, 512 * 1024);
    let sum = vm.disk_checksum("vda");
    let inc = node.backup(&vm.name, &[]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    assert!(bytes_read(&inc) <= 512 * 1024 + 2 * SLACK);
    assert!(!vm.is_running());
    // The full's checkpoint went while the VM still ran for the job (libvirt deletes no
    // checkpoint of a shut-off VM): only the newest stays, and nothing was warned.
    assert_eq!(inc["warnings"], serde_json::json!([]), "{inc}");
    let kept = virtkeep_checkpoints(&vm);
    let reason = inc["reason"].as_str().expect("reason");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        !reason.contains(&kept[0]),
        "the full's checkpoint (named in {reason:?}) is gone: {kept:?}"
    );
    assert_eq!(
        restore_and_sum(&node, inc["id"].as_str().expect("id"), &["vda"]),
        [sum]
    );
    // A job that fails once it runs in QEMU deletes its new checkpoint while the VM
    // still runs for it: the VM is off again, the kept checkpoint is the only one, and
    // the next incremental starts from it and holds what was written before the failure.
    vm.write_pattern("vda", 0x42, 24 * MIB, 256 * 1024);
    let spec = format!("{HOST}/{}", vm.name);
    crate::harness::backup_failing_at(&node, &spec, "export-fails");
    assert!(!vm.is_running());
    assert_eq!(
        virtkeep_checkpoints(&vm),
        kept,
        "the failed job's checkpoint"
    );
    assert_eq!(crate::failures::job_dirs(&vm), Vec::<String>::new());
    let sum = vm.disk_checksum("vda");
    let next = node.backup(&vm.name, &[]);
    assert_eq!(next["mode"], "incremental", "{}", next["reason"]);
    assert!(next["reason"].as_str().expect("reason").contains(&kept[0]));
    assert!(bytes_read(&next) >= 256 * 1024, "{next}");
    assert_eq!(
        restore_and_sum(&node, next["id"].as_str().expect("id"), &["vda"]),
        [sum]
    );
}

#[test]
fn node_killed_mid_incremental_next_run_is_correct() {
    let node = Node::new();
    let vm = TestVm::builder("inc-kill")
        .qcow2_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x50, 0, 4 * MIB);
    node.backup(&vm.name, &[]);
    vm.write_pattern("vda", 0x51, 30 * MIB, 24 * MIB);
    crate::failures::kill_backup_at(
        &node,
        &format!("{HOST}/{}", vm.name),
        &[],
        "export-chunk-written",
    );
    vm.write_pattern("vda", 0x52, 60 * MIB, MIB);
    let sum = vm.disk_checksum("vda");
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["mode"], "incremental", "{}", r["reason"]);
    assert!(vm.is_running());
    assert_eq!(virtkeep_checkpoints(&vm).len(), 1);
    assert_eq!(
        restore_and_sum(&node, r["id"].as_str().expect("id"), &["vda"]),
        [sum]
    );
}

/// Raw disks carry no dirty bitmap: with `--mode incremental` the seed's kept-snapshot
/// method keeps the newest overlay under the running VM, and the next backup reads only
/// what that overlay holds. `cleanup` leaves kept overlays alone; a backup in another
/// mode returns the VM to its own files.
#[test]
fn kept_overlay_incremental_for_raw_disks() {
    let node = Node::new();
    let vm = TestVm::builder("kept")
        .raw_disk(32 * MIB)
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    let own = vm.current_sources();
    vm.write_pattern("vda", 0x61, 0, 4 * MIB);
    vm.write_pattern("vdb", 0x62, 2 * MIB, MIB);
    let first = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];

    let full = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(full["mode"], "full");
    assert!(
        full["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no earlier backup")),
        "{}",
        full["reason"]
    );
    let on_overlay = vm.current_sources();
    assert!(
        on_overlay.iter().all(|(_, s)| s.contains(".virtkeep-")),
        "{on_overlay:?}"
    );
    assert!(vm.is_running());

    vm.write_pattern("vda", 0x63, 10 * MIB, MIB);
    let second = [vm.disk_checksum("vda"), vm.disk_checksum("vdb")];
    // cleanup keeps what the next incremental needs.
    node.json(&["cleanup", HOST]);
    assert_eq!(vm.current_sources(), on_overlay);

    let inc = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    let read = bytes_read(&inc);
    assert!(
        (MIB..=MIB + 2 * SLACK).contains(&read),
        "incremental read {read} bytes for 1 MiB changed"
    );
    let now = vm.current_sources();
    assert_ne!(now, on_overlay, "a new overlay is kept");
    assert_eq!(
        vm.leftovers().overlay_files.len(),
        2,
        "one kept overlay per disk: {:?}",
        vm.leftovers()
    );

    assert_eq!(
        restore_and_sum(&node, inc["id"].as_str().expect("id"), &["vda", "vdb"]),
        second
    );
    assert_eq!(
        restore_and_sum(&node, full["id"].as_str().expect("id"), &["vda", "vdb"]),
        first
    );

    // Any other mode returns the VM to its own files.
    let auto = node.backup(&vm.name, &[]);
    assert_eq!(auto["mode"], "full");
    assert_eq!(vm.current_sources(), own);
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!([vm.disk_checksum("vda"), vm.disk_checksum("vdb")], second);
}

/// A full is a full read, not a break of the chain (qcow2 with the backup API): the
/// checkpoint of `--mode full` stays, the next incremental reads only the writes and
/// restores their instant; `--no-keep-base` leaves no checkpoint and the next backup
/// says it is a full because of that, not because of the host.
#[test]
fn full_keeps_the_checkpoint_and_no_keep_base_leaves_nothing() {
    let node = Node::new();
    let vm = TestVm::builder("fullcp")
        .qcow2_disk(32 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x40, 0, 4 * MIB);
    let full = node.backup(&vm.name, &["--mode", "full"]);
    assert_eq!(full["mode"], "full");
    assert_eq!(full["method"], "backup_api");
    assert_eq!(virtkeep_checkpoints(&vm).len(), 1, "{:?}", vm.leftovers());
    for phase in [
        "lock_load_secs",
        "plan_secs",
        "freeze_secs",
        "data_secs",
        "heal_secs",
    ] {
        assert!(
            full["phases"][phase].as_f64().is_some_and(|s| s > 0.0),
            "{phase}: {}",
            full["phases"]
        );
    }

    // Writes at known offsets: 1 MiB and 512 KiB.
    vm.write_pattern("vda", 0x41, 8 * MIB, MIB);
    vm.write_pattern("vda", 0x42, 20 * MIB, 512 * 1024);
    let changed = MIB + 512 * 1024;
    let at_inc = vm.disk_checksum("vda");
    let inc = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    let read = bytes_read(&inc);
    assert!(
        (changed..=changed + 2 * SLACK).contains(&read),
        "incremental after a full read {read} bytes for {changed} changed"
    );
    vm.write_pattern("vda", 0x43, 0, MIB);
    assert_eq!(
        restore_and_sum(&node, inc["id"].as_str().expect("id"), &["vda"]),
        [at_inc]
    );

    // Asked to leave nothing on the host.
    node.backup(&vm.name, &["--mode", "full", "--no-keep-base"]);
    let l = vm.leftovers();
    assert!(l.is_empty(), "{l:?}");
    let next = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(next["mode"], "full");
    let reason = next["reason"].as_str().expect("reason");
    assert!(
        reason.contains("left no base") && !reason.contains("host rebuilt"),
        "{reason}"
    );
    assert_eq!(virtkeep_checkpoints(&vm).len(), 1, "the chain starts again");
}

/// The kept-overlay method (raw disks of a running VM): a full never starts the overlay
/// chain, but once an incremental has, `--mode full` reads the base whole and leaves its
/// overlay as the next incremental's base; `--no-keep-base` returns the VM to its own
/// files.
#[test]
fn full_of_raw_disks_keeps_an_overlay_for_the_next_incremental() {
    let node = Node::new();
    let vm = TestVm::builder("fullkept")
        .raw_disk(32 * MIB)
        .running(true)
        .build();
    let own = vm.current_sources();
    vm.write_pattern("vda", 0x64, 0, 4 * MIB);
    node.backup(&vm.name, &["--mode", "full"]);
    assert_eq!(vm.current_sources(), own, "a full starts no overlay chain");
    let first = node.backup(&vm.name, &["--mode", "incremental"]);
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.contains("left no overlay")),
        "{first}"
    );
    let full = node.backup(&vm.name, &["--mode", "full"]);
    assert_eq!(full["mode"], "full");
    assert!(
        vm.current_sources()
            .iter()
            .all(|(_, s)| s.contains(".virtkeep-")),
        "{:?}",
        vm.current_sources()
    );

    vm.write_pattern("vda", 0x65, 12 * MIB, MIB);
    vm.write_pattern("vda", 0x66, 24 * MIB, 256 * 1024);
    let changed = MIB + 256 * 1024;
    let at_inc = vm.disk_checksum("vda");
    let inc = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    let read = bytes_read(&inc);
    assert!(
        (changed..=changed + 4 * SLACK).contains(&read),
        "incremental after a full read {read} bytes for {changed} changed"
    );
    assert_eq!(
        restore_and_sum(&node, inc["id"].as_str().expect("id"), &["vda"]),
        std::slice::from_ref(&at_inc)
    );

    node.backup(&vm.name, &["--mode", "incremental", "--no-keep-base"]);
    assert_eq!(vm.current_sources(), own);
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(vm.disk_checksum("vda"), at_inc);
    let next = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(next["mode"], "full");
    assert!(
        next["reason"]
            .as_str()
            .is_some_and(|r| r.contains("left no base")),
        "{}",
        next["reason"]
    );
}
