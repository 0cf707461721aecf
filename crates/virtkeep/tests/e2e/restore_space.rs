//! A restore whose destination cannot hold the disk is refused before anything is
//! written, with what is needed and what is free.

use std::path::PathBuf;
use std::process::Command;

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// A small tmpfs (the lab host is this machine), unmounted and removed on drop.
pub(crate) struct SmallMount(pub(crate) PathBuf);

impl SmallMount {
    pub(crate) fn new(node: &Node, mib: u64) -> SmallMount {
        let dir = node.lab.pool_dir.join(unique_name("small"));
        std::fs::create_dir(&dir).expect("mkdir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "vkt-small",
            ])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        SmallMount(dir)
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// 12 MiB of data into an 8 MiB file system: refused, nothing written, no domain; a
/// disk whose data fits (1 MiB of 64, one 4 MiB chunk) is restored there (sparse: its
/// size does not count).
#[test]
fn file_restore_without_room_is_refused_before_writing() {
    let node = Node::new();
    let big = TestVm::builder("space-big")
        .raw_disk(32 * MIB)
        .running(false)
        .build();
    big.write_pattern("vda", 0x61, 0, 12 * MIB);
    let small = TestVm::builder("space-small")
        .raw_disk(64 * MIB)
        .running(false)
        .build();
    small.write_pattern("vda", 0x62, 0, MIB);
    let id_big = node.backup(&big.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let id_small = node.backup(&small.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mnt = SmallMount::new(&node, 8);
    let storage = format!("file:{}", mnt.0.display());

    let name = unique_name("space-big-copy");
    let guard = TestVm::adopt(&name);
    let out = node.run(&[
        "restore",
        &id_big,
        "--to",
        HOST,
        "--name",
        &name,
        "--storage",
        &storage,
        "--define",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restore into a full directory succeeded"
    );
    assert!(stderr.contains("not enough free space"), "{stderr}");
    assert!(stderr.contains("MiB needed"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(&mnt.0).expect("ls").collect();
    assert!(written.is_empty(), "written: {written:?}");
    assert!(node.lab.try_virsh(&["domuuid", "--domain", &name]).is_err());
    drop(guard);

    let name = unique_name("space-small-copy");
    let guard = TestVm::adopt(&name);
    node.ok(&[
        "restore",
        &id_small,
        "--to",
        HOST,
        "--name",
        &name,
        "--storage",
        &storage,
    ]);
    let written: Vec<_> = std::fs::read_dir(&mnt.0).expect("ls").collect();
    assert_eq!(written.len(), 1, "{written:?}");
    for f in written {
        let _ = std::fs::remove_file(f.expect("entry").path());
    }
    drop(guard);
}

/// A thick LV restored in place needs its whole size in free extents (the old LV stays
/// until the swap): refused before anything is made, the LV and the VG's free space as
/// they were.
#[test]
fn lvm_thick_restore_without_extents_is_refused_before_writing() {
    use virtkeep_lab::hvm::{LvmTestVm, ScratchVg, hvm};
    let h = hvm();
    let node = crate::lvm_host::lvm_node();
    let vg = ScratchVg::new("rspace", 128 * MIB);
    let vm = LvmTestVm::builder("rspace")
        .vg(&vg.name)
        .thick_disk(40 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x63, 0, MIB);
    let id = node.backup_on("lvmhv", &vm.name, &["--mode", "full"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x64, 0, MIB);
    // the backup's snapshot needed room; now the VG has less than the LV's size free
    h.ssh(&format!("lvcreate -q -y -L 64m -n vkt-filler {}", vg.name));
    let before = vm.disk_checksum("vda");
    let free = vg.free();
    assert!(free < 40 * MIB, "scratch VG has {free} bytes free");
    let lvs = h.lvs(&vg.name);

    let out = node.run(&["restore", &id, "--to", "lvmhv", "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restore without room succeeded");
    assert!(stderr.contains("not enough free space"), "{stderr}");
    assert!(
        stderr.contains(&format!("volume group {}", vg.name)),
        "{stderr}"
    );
    assert!(stderr.contains("vgextend"), "{stderr}");
    assert_eq!(vm.disk_checksum("vda"), before);
    assert_eq!(h.lvs(&vg.name), lvs, "an LV was made or removed");
    assert_eq!(vg.free(), free);
}
