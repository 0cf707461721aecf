//! The rest of issue 17's fault matrix: a repository that runs out of space, a link cut
//! during `blockcommit`, a restore whose destination hangs, a restore racing a backup.
//! Each ends with the VM running on its own disks, its definition unchanged, the
//! repository verifying and the next backup (or restore) succeeding.

use std::path::{Path, PathBuf};
use std::process::Command;

use virtkeep_lab::TestVm;

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

fn sh(script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .expect("sh");
    assert!(st.success(), "{script}");
}

/// A tmpfs of a fixed size mounted over a directory (its content copied in), unmounted
/// when dropped (also after a failed assertion).
struct SmallFs(PathBuf);

impl SmallFs {
    fn over(dir: &Path, mib: u64) -> SmallFs {
        let full = dir.with_extension("full");
        std::fs::rename(dir, &full).expect("move the repository aside");
        std::fs::create_dir(dir).expect("mount point");
        let d = dir.display();
        sh(&format!(
            "mount -t tmpfs -o size={mib}m,mode=0700 vkt-enospc '{d}' && cp -a '{}'/. '{d}'/",
            full.display()
        ));
        SmallFs(dir.to_path_buf())
    }

    fn resize(&self, mib: u64) {
        sh(&format!(
            "mount -o remount,size={mib}m '{}'",
            self.0.display()
        ));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn inactive_xml(vm: &TestVm) -> String {
    virtkeep_lab::lab().virsh(&["dumpxml", "--inactive", "--security-info", &vm.name])
}

/// A repository on a filesystem smaller than the disk's (incompressible) data: the
/// backup fails naming the repository and the full disk, with a hint; the VM is back on
/// its own disk with its definition unchanged, nothing is published and the repository
/// verifies. With room made, the next backup succeeds and restores exactly.
#[test]
fn a_full_repository_fails_the_backup_cleanly() {
    let node = Node::new();
    let vm = TestVm::builder("enospc")
        .raw_disk(48 * MIB)
        .running(false)
        .build();
    let path = vm.disk("vda").path.clone().expect("path");
    sh(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=40 conv=notrunc status=none",
        path.display()
    ));
    vm.start();
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    let inactive = inactive_xml(&vm);
    let repo = node.repo();
    let fs = SmallFs::over(&repo, 8);

    let out = node.run(&["backup", &format!("{HOST}/{}", vm.name)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no space left") && stderr.contains(&repo.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(inactive_xml(&vm), inactive);
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(0));
    node.ok(&["verify", "--all"]);

    fs.resize(256);
    let r = node.backup(&vm.name, &[]);
    let sums = crate::harness::restore_sums(&node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), sum)]);
    node.ok(&["verify", "--all", "--read-data"]);
    drop(fs);
}
