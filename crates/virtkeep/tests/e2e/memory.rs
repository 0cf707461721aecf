//! Peak memory of a backup: a full and an incremental of a disk of random data stay
//! under a bound (issue 14: peak RSS ≤ 128 MiB). The child's peak RSS is measured by
//! `/usr/bin/time -f %M` around the real `virtkeep backup` process, so nothing races
//! the child's exit.

use std::process::Command;

use virtkeep_lab::TestVm;

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;
/// Issue 14 asks for ≤ 128 MiB. This debug build of a 256 MiB disk peaked at 118 MiB
/// for the full before the malloc arenas were capped and 86 MiB after
/// (bench/results/rss-20261206.md): the bound sits between, so a regression fails.
const PEAK_RSS_LIMIT_KIB: u64 = 100 * 1024;

/// Runs `virtkeep --json backup HOST/vm` under `/usr/bin/time` and returns the
/// backup's JSON result and the child's peak RSS in KiB.
fn backup_peak_rss(node: &Node, vm: &str) -> (serde_json::Value, u64) {
    let report = node.dir.path().join("rss.txt");
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let spec = format!("{HOST}/{vm}");
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&report)
        .arg(&bin)
        .arg("--config")
        .arg(node.config())
        .args(["--json", "backup", &spec, "--repo"])
        .arg(node.dir.path().join("enc"))
        .args(["--passphrase-env", "VK_PASS"])
        .env("VK_PASS", "memory test")
        .env("HOME", node.dir.path())
        // The binary's own allocator setting is what is measured.
        .env_remove("MALLOC_ARENA_MAX")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env("VIRTKEEP_LOG", "info")
        .output()
        .expect("run /usr/bin/time virtkeep backup");
    assert!(
        out.status.success(),
        "backup failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup JSON");
    let first = v.as_array().and_then(|a| a.first()).cloned().expect("one");
    assert!(first.get("error").is_none(), "backup failed: {first}");
    let text = std::fs::read_to_string(&report).expect("time report");
    let kib = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no peak RSS in {text:?}"));
    (first, kib)
}

/// Fills the stopped VM's qcow2 disk `target` with random bytes (every cluster
/// allocated, nothing compresses).
fn fill_random(vm: &TestVm, target: &str, size: u64, dir: &std::path::Path) {
    let raw = dir.join("random.raw");
    let st = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none", "iflag=fullblock"])
        .arg(format!("of={}", raw.display()))
        .arg(format!("count={}", size / MIB))
        .status()
        .expect("dd");
    assert!(st.success());
    let path = vm.disk(target).path.clone().expect("qcow2 path");
    let st = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&path)
        .status()
        .expect("qemu-img convert");
    assert!(st.success(), "filling {} failed", path.display());
    std::fs::remove_file(&raw).expect("rm random.raw");
}

#[test]
fn backup_peak_rss_stays_bounded() {
    let node = Node::new();
    // An encrypted repository: every chunk is hashed, compressed and encrypted.
    let enc = node.dir.path().join("enc").display().to_string();
    node.cmd()
        .env("VK_PASS", "memory test")
        .args(["repo", "init", &enc, "--encryption", "aes-256-gcm"])
        .args(["--passphrase-env", "VK_PASS"])
        .assert()
        .success();
    let size = 256 * MIB;
    let vm = TestVm::builder("rss")
        .qcow2_disk(size)
        .running(false)
        .build();
    fill_random(&vm, "vda", size, node.dir.path());

    let (full, full_kib) = backup_peak_rss(&node, &vm.name);
    assert_eq!(full["mode"], "full");
    let read: u64 = full["disks"][0]["bytes_read"].as_u64().expect("bytes_read");
    assert_eq!(read, size, "the full reads the whole random disk");

    // 64 MiB changed in 8 ranges of 8 MiB, as the benchmark does.
    for i in 0..8u64 {
        vm.write_pattern("vda", 0x50 + i as u8, i * 32 * MIB, 8 * MIB);
    }
    let (inc, inc_kib) = backup_peak_rss(&node, &vm.name);
    assert_eq!(inc["mode"], "incremental", "{}", inc["reason"]);
    eprintln!("peak RSS: full {full_kib} KiB, incremental {inc_kib} KiB");
    assert!(
        full_kib <= PEAK_RSS_LIMIT_KIB,
        "full backup peak RSS {full_kib} KiB > {PEAK_RSS_LIMIT_KIB} KiB"
    );
    assert!(
        inc_kib <= PEAK_RSS_LIMIT_KIB,
        "incremental backup peak RSS {inc_kib} KiB > {PEAK_RSS_LIMIT_KIB} KiB"
    );
}
