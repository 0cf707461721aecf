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

/// A backup of `vm` running in the background, held by a sleeping post-snapshot hook.
struct HeldBackup {
    child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
}

impl HeldBackup {
    /// Starts it and returns once it sits in its post-snapshot hook (holding the VM lock).
    fn start(node: &Node, vm: &TestVm, hold_secs: u64) -> HeldBackup {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
            .arg("--config")
            .arg(node.config())
            .env("HOME", node.dir.path())
            .env("VIRTKEEP_LOG", "info")
            .env_remove("VIRTKEEP_FAILPOINT")
            .args(["--json", "backup", &format!("{HOST}/{}", vm.name)])
            .args(["--post-snapshot", &format!("sleep {hold_secs}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn virtkeep");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap_or_default();
                if line.contains("phase=\"post-snapshot\"") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        rx.recv_timeout(std::time::Duration::from_secs(120))
            .expect("the backup reached its post-snapshot hook");
        HeldBackup { child, stderr }
    }

    /// Waits for it; returns its JSON result (asserting success).
    fn finish(self) -> serde_json::Value {
        let out = self.child.wait_with_output().expect("wait");
        let stderr = self.stderr.join().expect("stderr reader");
        assert!(out.status.success(), "backup failed: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup JSON");
        let first = v[0].clone();
        assert!(first.get("error").is_none(), "backup failed: {first}");
        first
    }
}

/// An in-place restore started while a backup of the same VM runs waits for the VM
/// lock instead of writing under the backup: the backup holds what the disk held at its
/// snapshot, the restore then puts the older backup back, the definition and the disk
/// sources are unchanged, the repository verifies and the next backup holds the
/// restored content.
#[test]
fn a_restore_racing_a_backup_waits_for_it() {
    let node = Node::new();
    let vm = TestVm::builder("race")
        .raw_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x61, 0, 2 * MIB);
    let old_sum = vm.disk_checksum("vda");
    let old = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x62, MIB, 2 * MIB);
    let new_sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    let inactive = inactive_xml(&vm);

    let hold = 6;
    let backup = HeldBackup::start(&node, &vm, hold);
    let started = std::time::Instant::now();
    let restored = node.json(&["restore", &old, "--to", HOST, "--force"]);
    let waited = started.elapsed();
    let r = backup.finish();
    assert!(
        waited >= std::time::Duration::from_secs(hold - 1),
        "the restore did not wait for the backup's VM lock ({waited:?}): {restored}"
    );
    assert_eq!(vm.disk_checksum("vda"), old_sum, "the restore's content");
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(inactive_xml(&vm), inactive);
    let sums = crate::harness::restore_sums(&node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), new_sum)], "the backup's content");
    node.ok(&["verify", "--all"]);
    let next = node.backup(&vm.name, &[]);
    let sums = crate::harness::restore_sums(&node, next["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), old_sum)]);
}
