//! `cleanup` after a node killed in the middle of `verify --boot`: the transient
//! domain, its overlays, job directory and socket are removed; the source VM is
//! untouched.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use virtkeep_lab::{lab, unique_name};

use crate::harness::{HOST, Node};
use crate::live::{assert_nothing_left, marker_sector, sector_vm};

const JOBS: &str = "/run/virtkeep/jobs";

/// The verification domains on the host now.
fn verify_domains() -> Vec<String> {
    lab()
        .virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("virtkeep-verify-"))
        .map(str::to_string)
        .collect()
}

/// The verification domain of this test: new since `before`, and its serial log shows
/// this test's marker (other tests may verify at the same time).
fn our_domain(before: &[String], marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for d in verify_domains().iter().filter(|d| !before.contains(d)) {
            let log = Path::new(JOBS).join(d).join("serial.log");
            if std::fs::read_to_string(log).is_ok_and(|t| t.contains(marker)) {
                return d.clone();
            }
        }
        assert!(Instant::now() < deadline, "no verification domain booted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node is SIGKILLed while the verification domain runs: the domain and its job
/// directory stay; `cleanup` destroys and removes them, and reports it.
#[test]
fn cleanup_removes_a_killed_boot_verification() {
    let node = Node::new();
    let marker = unique_name("VK-BOOT-KILL");
    let vm = sector_vm("vkill", &marker_sector(&marker));
    let b = node.backup(&vm.name, &[]);
    let source = || {
        (
            lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]),
            vm.disk_checksum("vda"),
        )
    };
    let before_src = source();
    let before = verify_domains();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_LOG", "info")
        .env("VIRTKEEP_FAILPOINT", "verify-boot-running")
        .args(["--json", "verify", b["id"].as_str().expect("id"), "--boot"])
        .args(["--to", HOST, "--timeout", "120"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn virtkeep");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("failpoint verify-boot-running reached") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        panic!(
            "never reached the failpoint:\n{}",
            reader.join().expect("err")
        );
    }
    let dom = our_domain(&before, &marker);
    child.kill().expect("SIGKILL the node");
    let _ = child.wait();
    let _ = reader.join();
    let dir = Path::new(JOBS).join(&dom);
    assert!(dir.join("disk0.qcow2").exists(), "no overlay left to clean");
    assert!(
        lab().try_virsh(&["domstate", "--domain", &dom]).is_ok(),
        "the killed node's domain is gone already"
    );

    let r = node.json(&["cleanup", HOST]);
    let entry = r["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["vm"] == format!("verify job {dom}").as_str())
        .unwrap_or_else(|| panic!("{dom} not reported: {r:#}"))
        .clone();
    let actions = entry["actions"].to_string();
    assert!(actions.contains("destroyed"), "{entry:#}");
    assert!(actions.contains("removed"), "{entry:#}");
    assert_nothing_left(&serde_json::json!({ "domain": dom }));
    assert_eq!(source(), before_src, "the source VM changed");
    assert!(!vm.is_running());
}
