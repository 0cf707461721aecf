//! A restore whose destination cannot hold the disk is refused before anything is
//! written, with what is needed and what is free.

use std::path::PathBuf;
use std::process::Command;

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// A small tmpfs (the lab host is this machine), unmounted and removed on drop.
struct SmallMount(PathBuf);

impl SmallMount {
    fn new(node: &Node, mib: u64) -> SmallMount {
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
