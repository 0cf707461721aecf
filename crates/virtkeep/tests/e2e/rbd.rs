//! Ceph RBD disks on the lab's Ceph: rbd snapshots, export-diff fulls and incrementals,
//! snapshot housekeeping, import-diff restores, and a VM mixing a file and an RBD disk.

use virtkeep_lab::{TestVm, rbd_checksum, remove_rbd_image, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

fn virtkeep_snaps(vm: &TestVm) -> Vec<String> {
    vm.leftovers()
        .rbd_snapshots
        .into_iter()
        .filter(|s| s.contains("@virtkeep-") || s.starts_with("virtkeep-"))
        .collect()
}

use crate::harness::restore_sums;

#[test]
fn rbd_full_incremental_and_snapshot_housekeeping() {
    let node = Node::new();
    let vm = TestVm::builder("rbd")
        .rbd_disk(32 * MIB)
        .rbd_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x71, 0, 4 * MIB);
    vm.write_pattern("vdb", 0x72, 8 * MIB, 2 * MIB);
    let first = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];

    let full = node.backup(&vm.name, &[]);
    assert_eq!(full["mode"], "full", "{full}");
    assert_eq!(
        virtkeep_snaps(&vm).len(),
        2,
        "one kept snapshot per image: {:?}",
        vm.leftovers()
    );
    let full_read: u64 = full["disks"]
        .as_array()
        .expect("d")
        .iter()
        .map(|d| d["bytes_read"].as_u64().expect("n"))
        .sum();
    assert!(
        (6 * MIB..16 * MIB).contains(&full_read),
        "export-diff sends only allocated data: {full_read}"
    );

    vm.write_pattern("vda", 0x73, 20 * MIB, MIB);
    let second = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];
    let inc = node.backup(&vm.name, &[]);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    let inc_read: u64 = inc["disks"]
        .as_array()
        .expect("d")
        .iter()
        .map(|d| d["bytes_read"].as_u64().expect("n"))
        .sum();
    assert!(
        (MIB..=4 * MIB + MIB).contains(&inc_read),
        "incremental read {inc_read}"
    );
    let snaps = virtkeep_snaps(&vm);
    assert_eq!(
        snaps.len(),
        2,
        "still exactly one virtkeep snapshot per image: {snaps:?}"
    );

    assert_eq!(
        restore_sums(&node, inc["id"].as_str().expect("id"), &[]),
        second
    );
    assert_eq!(
        restore_sums(&node, full["id"].as_str().expect("id"), &[]),
        first
    );

    // A full is a full read, not a break of the chain: its snapshots stay as the base.
    let full2 = node.backup(&vm.name, &["--mode", "full"]);
    assert_eq!(full2["mode"], "full");
    assert_eq!(virtkeep_snaps(&vm).len(), 2, "{:?}", vm.leftovers());
    vm.write_pattern("vdb", 0x74, 4 * MIB, MIB);
    let third = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];
    let inc2 = node.backup(&vm.name, &["--mode", "incremental"]);
    assert_eq!(inc2["mode"], "incremental", "{}", inc2["reason"]);
    let inc2_read: u64 = inc2["disks"]
        .as_array()
        .expect("d")
        .iter()
        .map(|d| d["bytes_read"].as_u64().expect("n"))
        .sum();
    assert!(
        (MIB..=4 * MIB + MIB).contains(&inc2_read),
        "incremental after a full read {inc2_read}"
    );
    assert_eq!(
        restore_sums(&node, inc2["id"].as_str().expect("id"), &[]),
        third
    );

    // Asked to leave nothing: no snapshot, and the next backup says why it is a full.
    node.backup(&vm.name, &["--mode", "full", "--no-keep-base"]);
    assert!(virtkeep_snaps(&vm).is_empty(), "{:?}", vm.leftovers());
    let again = node.backup(&vm.name, &[]);
    assert_eq!(again["mode"], "full");
    assert!(
        again["reason"]
            .as_str()
            .is_some_and(|r| r.contains("left no base")),
        "{}",
        again["reason"]
    );
}

#[test]
fn qcow2_and_rbd_disks_share_one_instant_and_restore() {
    let node = Node::new();
    let vm = TestVm::builder("mixed")
        .qcow2_disk(16 * MIB)
        .rbd_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x81, 0, 2 * MIB);
    vm.write_pattern("vdb", 0x82, MIB, 2 * MIB);
    let sums = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["method"], "live_snapshot");
    assert!(vm.is_running());
    let l = vm.leftovers();
    assert!(
        l.overlay_files.is_empty() && l.snapshots.is_empty(),
        "{l:?}"
    );
    // Restored under a new name into the pool, the VM with its RBD disk starts.
    let new_name = unique_name("mixed-restored");
    let restored = TestVm::adopt(&new_name);
    let out = node.json(&[
        "restore",
        r["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--start",
    ]);
    assert_eq!(out["started"], true);
    let mut got = Vec::new();
    let mut images = Vec::new();
    for d in out["disks"].as_array().expect("disks") {
        let path = d["path"].as_str().expect("p");
        let sum = match path.strip_prefix("rbd:") {
            Some(spec) => {
                let image = spec
                    .split_once('/')
                    .map(|(_, i)| i)
                    .unwrap_or(spec)
                    .to_string();
                images.push(image.clone());
                rbd_checksum(&image)
            }
            None => restored_checksum(path, d["format"].as_str().expect("f")),
        };
        got.push((d["target"].as_str().expect("t").to_string(), sum));
    }
    assert_eq!(got, sums);
    let xml = node.lab.virsh(&["dumpxml", &new_name]);
    assert!(
        xml.contains(&node.lab.ceph_secret_uuid),
        "auth secret kept:\n{xml}"
    );
    drop(restored);
    for image in images {
        remove_rbd_image(node.lab, &image);
    }
}

#[test]
fn rbd_killed_mid_export_then_cleanup_keeps_only_the_base() {
    let node = Node::new();
    let vm = TestVm::builder("rbd-kill")
        .rbd_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x91, 0, 2 * MIB);
    node.backup(&vm.name, &[]);
    let base = virtkeep_snaps(&vm);
    assert_eq!(base.len(), 1);
    vm.write_pattern("vda", 0x92, 8 * MIB, 40 * MIB);
    crate::failures::kill_backup_at(
        &node,
        &format!("{HOST}/{}", vm.name),
        &[],
        "export-chunk-written",
    );
    node.json(&["cleanup", HOST]);
    assert_eq!(
        virtkeep_snaps(&vm),
        base,
        "cleanup keeps the recorded base only"
    );
    assert!(vm.is_running());
    let sum = vec![("vda".to_string(), vm.disk_checksum("vda"))];
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["mode"], "incremental", "{}", r["reason"]);
    assert_eq!(restore_sums(&node, r["id"].as_str().expect("id"), &[]), sum);
}
