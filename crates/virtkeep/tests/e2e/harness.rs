//! A node for one test: its own config file, repository and known_hosts, pointing at
//! the lab's sshd.

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use serde_json::Value;
use virtkeep_lab::{Lab, lab};

pub const HOST: &str = "lab";

pub struct Node {
    pub dir: tempfile::TempDir,
    pub lab: &'static Lab,
}

impl Node {
    /// A node with the lab host added (key auth, the lab's pinned known_hosts) and an
    /// initialised local repository.
    pub fn new() -> Node {
        let lab = lab();
        let dir = tempfile::Builder::new()
            .prefix("vk-node-")
            .tempdir()
            .expect("tempdir");
        let node = Node { dir, lab };
        let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
        let known = lab.known_hosts.to_string_lossy().to_string();
        let key = lab.ssh_key.to_string_lossy().to_string();
        let (conf, keyring) = (
            lab.ceph_conf.display().to_string(),
            lab.ceph_keyring.display().to_string(),
        );
        node.ok(&[
            "host",
            "add",
            HOST,
            "--ssh",
            &ssh,
            "--identity",
            &key,
            "--known-hosts",
            &known,
            "--ceph-conf",
            &conf,
            "--ceph-id",
            &lab.ceph_id,
            "--ceph-keyring",
            &keyring,
        ]);
        let repo = node.repo().to_string_lossy().to_string();
        node.ok(&["repo", "init", &repo, "--encryption", "none"]);
        node
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("virtkeep").expect("virtkeep binary");
        c.arg("--config").arg(self.config());
        c.env("HOME", self.dir.path());
        c.env_remove("XDG_CONFIG_HOME");
        c.env_remove("XDG_DATA_HOME");
        // VKT_CHILD_LOG=<filter> (e.g. `info,virtkeep_ssh=debug`): the children log at
        // that level and `ok` passes their stderr on (to profile a slow test).
        c.env("VIRTKEEP_LOG", child_log().unwrap_or("info"));
        c.timeout(std::time::Duration::from_secs(600));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run virtkeep")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "virtkeep {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if child_log().is_some() {
            eprintln!(
                "virtkeep {args:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs with `--json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// Backs up one VM and returns the backup's JSON result.
    pub fn backup(&self, vm: &str, extra: &[&str]) -> Value {
        self.backup_on(HOST, vm, extra)
    }

    /// Like [`Node::backup`] for a VM on another host of the node.
    pub fn backup_on(&self, host: &str, vm: &str, extra: &[&str]) -> Value {
        let spec = format!("{host}/{vm}");
        let mut args = vec!["backup", spec.as_str()];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        let first = v
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("one result");
        assert!(first.get("error").is_none(), "backup failed: {first}");
        first
    }
}

fn child_log() -> Option<&'static str> {
    static LOG: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| std::env::var("VKT_CHILD_LOG").ok())
        .as_deref()
}

/// Sha256 of a restored file disk (guest-visible content).
pub fn restored_checksum(path: &str, format: &str) -> String {
    virtkeep_lab::file_checksum(Path::new(path), format)
}

/// Nothing of a backup is left on the host but what the next incremental needs: at most
/// one virtkeep checkpoint (qcow2 with the backup API) or one virtkeep snapshot per RBD image.
pub fn assert_only_incremental_base(vm: &virtkeep_lab::TestVm) {
    let l = vm.leftovers();
    assert!(
        l.overlay_files.is_empty() && l.snapshots.is_empty(),
        "leftovers: {l:?}"
    );
    let ours: Vec<&String> = l
        .checkpoints
        .iter()
        .filter(|c| c.starts_with("virtkeep-"))
        .collect();
    assert!(ours.len() <= 1, "more than one virtkeep checkpoint: {l:?}");
}

/// Runs `virtkeep backup SPEC` with failpoint `name` switched on, one that makes the
/// backup fail rather than stop, and asserts that it failed there.
pub fn backup_failing_at(node: &Node, spec: &str, name: &str) {
    let out = node
        .cmd()
        .args(["backup", spec])
        .env("VIRTKEEP_FAILPOINT", name)
        .output()
        .expect("run virtkeep");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("failpoint {name}")), "{stderr}");
}

/// Restores backup `id` under a fresh name (`--define`, plus `extra`), returns the
/// guest-visible checksum of every restored disk by target, and removes what it made.
pub fn restore_sums(node: &Node, id: &str, extra: &[&str]) -> Vec<(String, String)> {
    let new_name = virtkeep_lab::unique_name("restored");
    let restored = virtkeep_lab::TestVm::adopt(&new_name);
    let mut args = vec![
        "restore",
        id,
        "--to",
        HOST,
        "--name",
        new_name.as_str(),
        "--define",
    ];
    args.extend_from_slice(extra);
    let out = node.json(&args);
    let mut sums = Vec::new();
    let mut images = Vec::new();
    for d in out["disks"].as_array().expect("disks") {
        let path = d["path"].as_str().expect("path");
        let sum = match path.strip_prefix("rbd:") {
            Some(spec) => {
                let image = spec
                    .split_once('/')
                    .map(|(_, i)| i)
                    .unwrap_or(spec)
                    .to_string();
                let s = virtkeep_lab::rbd_checksum(&image);
                images.push(image);
                s
            }
            None => restored_checksum(path, d["format"].as_str().expect("format")),
        };
        sums.push((d["target"].as_str().expect("target").to_string(), sum));
    }
    drop(restored);
    for image in images {
        virtkeep_lab::remove_rbd_image(node.lab, &image);
    }
    sums
}
