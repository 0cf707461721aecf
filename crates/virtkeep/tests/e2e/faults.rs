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

/// SIGCONTs a process when dropped (also after a failed assertion).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Sets a per-host setting of the node's lab host in its config file.
fn set_host_option(node: &Node, line: &str) {
    let cfg = std::fs::read_to_string(node.config()).expect("config");
    let section = format!("[hosts.{HOST}]\n");
    assert!(cfg.contains(&section), "{cfg}");
    let cfg = cfg.replacen(&section, &format!("{section}{line}\n"), 1);
    std::fs::write(node.config(), cfg).expect("config");
}

/// qemu-nbd processes (not the shell that starts one) whose command line contains
/// `needle`: (pid, command line).
fn qemu_nbd_with(needle: &str) -> Vec<(u32, String)> {
    let out = Command::new("pgrep")
        .args(["-ax", "qemu-nbd"])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let (pid, cmd) = l.split_once(' ')?;
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = state
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            (!zombie).then(|| Some((pid.parse().ok()?, cmd.to_string())))?
        })
        .collect()
}

/// The restore's temporary beside `disk` (`NAME.vkrestore-…`), once it holds data
/// (4 MiB: `qemu-img create` already allocates its first block).
fn written_temporary(disk: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let base = disk.file_name()?.to_string_lossy().into_owned();
    std::fs::read_dir(disk.parent()?)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.contains(".vkrestore-")
                && n.contains(&base)
                && std::fs::metadata(p).is_ok_and(|m| m.blocks() * 512 >= 4 * MIB)
        })
}

/// An in-place restore whose destination stops taking writes (the host's qemu-nbd is
/// SIGSTOPped once data arrived in the temporary) fails within the host's
/// `data_stall_timeout_secs`, not never: the original disk and definition are
/// untouched, no temporary and no export is left, and the next restore works.
#[test]
fn a_hung_restore_write_fails_in_bounded_time() {
    let node = Node::new();
    set_host_option(&node, "data_stall_timeout_secs = 5");
    let vm = TestVm::builder("hung-write")
        .raw_disk(256 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x71, 0, 192 * MIB);
    let sum = vm.disk_checksum("vda");
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    vm.write_pattern("vda", 0x72, 0, MIB);
    let disk = vm.disk("vda").path.clone().expect("path");
    let before = virtkeep_lab::file_checksum(&disk, "raw");
    let inactive = inactive_xml(&vm);

    let log = node.dir.path().join("restore.log");
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .args(["restore", &id, "--to", HOST, "--force", "--parallel", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn virtkeep");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let (temp, pid) = loop {
        if let Some(t) = written_temporary(&disk)
            && let Some((pid, _)) = qemu_nbd_with(&t.display().to_string()).first()
        {
            break (t, *pid);
        }
        assert!(std::time::Instant::now() < deadline, "no data arrived");
        assert!(child.try_wait().expect("wait").is_none(), "restore ended");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    sh(&format!("kill -STOP {pid}"));
    let _cont = Continue(pid);
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if stopped.elapsed() > std::time::Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the restore still runs 90 s after its destination stopped");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let took = stopped.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("no progress within data_stall_timeout_secs"),
        "{stderr}"
    );
    eprintln!(
        "the hung restore ended {:.1} s after the stop",
        took.as_secs_f64()
    );
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
    assert_eq!(virtkeep_lab::file_checksum(&disk, "raw"), before);
    assert!(!temp.exists(), "{} left", temp.display());
    assert_eq!(
        qemu_nbd_with(&temp.display().to_string()),
        vec![],
        "export left"
    );
    assert_eq!(inactive_xml(&vm), inactive);
    drop(_cont);

    node.ok(&["restore", &id, "--to", HOST, "--force"]);
    assert_eq!(vm.disk_checksum("vda"), sum);
    node.ok(&["verify", "--all"]);
}
