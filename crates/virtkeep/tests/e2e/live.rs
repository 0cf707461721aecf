//! Booting backups from the repository (issue 20): `verify --boot` runs a transient
//! domain on qcow2 overlays over the node's NBD export, reached through a unix socket
//! the host's sshd forwards to the node. The guests are 512-byte boot sectors (SeaBIOS
//! boots them under TCG in well under a second).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use virtkeep_lab::{TestVm, lab, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// A boot sector that writes `marker` to COM1 (port 0x3f8) and halts.
fn marker_sector(marker: &str) -> Vec<u8> {
    assert!(marker.len() < 400 && !marker.contains('\0'));
    let mut s = vec![
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x17, 0x7C, // mov si, 0x7c17 (the marker, below)
        0xFC, // cld
        0xAC, // next: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp next
        0xFA, // done: cli
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    assert_eq!(s.len(), 0x17);
    s.extend_from_slice(marker.as_bytes());
    s.push(0);
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// A boot sector that loads an empty interrupt table and raises an interrupt: a
/// triple fault, i.e. the guest resets at once.
fn crash_sector() -> Vec<u8> {
    let mut s = vec![
        0xFA, // cli
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0x0F, 0x01, 0x1E, 0x20, 0x7C, // lidt [0x7c20] (limit 0, base 0: zeros below)
        0xCC, // int3
        0xF4, // hlt
    ];
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// A stopped VM with one raw disk starting with `sector`, and a VGA display (so a
/// screenshot can be taken).
fn sector_vm(tag: &str, sector: &[u8]) -> TestVm {
    let vm = TestVm::builder(tag).raw_disk(MIB).running(false).build();
    write_sector(&vm, sector);
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let xml = xml.replacen(
        "</devices>",
        "<video><model type='vga'/></video></devices>",
        1,
    );
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    vm
}

fn write_sector(vm: &TestVm, sector: &[u8]) {
    use std::io::{Seek, Write};
    let path = vm.disk("vda").path.clone().expect("file disk");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open disk");
    f.seek(std::io::SeekFrom::Start(0)).expect("seek");
    f.write_all(sector).expect("write sector");
    f.sync_all().expect("sync");
}

/// Every file of the repository with its size and modification time.
fn repo_state(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let k = e.path().display().to_string();
                out.insert(k, (m.len(), m.modified().expect("mtime")));
            }
        }
    }
    out
}

/// Runs `verify ID --boot` with `--json`; returns the exit code and the report.
fn verify_boot(node: &Node, id: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--json", "verify", id, "--boot", "--to", HOST];
    args.extend_from_slice(extra);
    let out = node.run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify --boot printed no report ({e}):\n{stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

/// Nothing of the verification is left on the host: no domain, no job directory
/// (overlays, socket, serial log).
fn assert_nothing_left(report: &Value) {
    let dom = report["domain"].as_str().expect("domain");
    assert!(dom.starts_with("virtkeep-verify-"), "{dom}");
    assert!(
        lab().try_virsh(&["domstate", "--domain", dom]).is_err(),
        "domain {dom} left on the host"
    );
    let dir = Path::new("/run/virtkeep/jobs").join(dom);
    assert!(!dir.exists(), "{} left on the host", dir.display());
}

/// The source VM's definition and disk are unchanged.
fn source_state(vm: &TestVm) -> (String, String) {
    (
        lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]),
        vm.disk_checksum("vda"),
    )
}

/// A backup taken after the marker was written boots and prints it: exit 0, a report
/// with the serial log and a screenshot; the backup taken before (no boot sector) fails
/// with exit 1 and the reason. Neither leaves anything on the host, writes to the
/// repository or touches the source VM.
#[test]
fn verify_boot_passes_with_the_marker_and_fails_without() {
    let node = Node::new();
    let vm = sector_vm("vboot", &[0u8; 512]);
    let old = node.backup(&vm.name, &[]);
    let marker = unique_name("VK-BOOT-OK");
    write_sector(&vm, &marker_sector(&marker));
    let new = node.backup(&vm.name, &[]);
    let before = source_state(&vm);
    let repo_before = repo_state(&node.repo());
    let reports = tempfile::tempdir().expect("tempdir");
    let report_dir = reports.path().join("r");
    let report_arg = report_dir.display().to_string();

    let (code, r) = verify_boot(
        &node,
        new["id"].as_str().expect("id"),
        &[
            "--timeout",
            "4",
            "--expect-serial",
            &marker,
            "--report-dir",
            &report_arg,
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["serial_matched"], true, "{r:#}");
    assert!(
        r["serial_log"].as_str().expect("log").contains(&marker),
        "{r:#}"
    );
    assert!(r["ran_secs"].as_f64().expect("ran") >= 3.5, "{r:#}");
    assert_nothing_left(&r);
    let saved: Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).expect("report"))
            .expect("report json");
    assert_eq!(saved["domain"], r["domain"]);
    let shot = std::fs::read_dir(&report_dir)
        .expect("report dir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("screenshot."))
        .unwrap_or_else(|| panic!("no screenshot: {r:#}"));
    assert!(std::fs::metadata(shot.path()).expect("shot").len() > 100);

    let (code, r) = verify_boot(
        &node,
        old["id"].as_str().expect("id"),
        &["--timeout", "3", "--expect-serial", &marker],
    );
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["passed"], false, "{r:#}");
    assert_eq!(r["serial_matched"], false, "{r:#}");
    let reason = r["reason"].as_str().expect("reason");
    assert!(reason.contains("did not match"), "{reason}");
    assert_nothing_left(&r);

    assert_eq!(source_state(&vm), before, "the source VM changed");
    assert!(!vm.is_running(), "the source VM was started");
    assert_eq!(
        repo_state(&node.repo()),
        repo_before,
        "the repository was written"
    );
}

/// A guest that crashes (triple fault) fails boot verification with exit 1 and says
/// it stopped; nothing is left behind.
#[test]
fn verify_boot_fails_for_a_crashing_guest() {
    let node = Node::new();
    let vm = sector_vm("vcrash", &crash_sector());
    let b = node.backup(&vm.name, &[]);
    let before = source_state(&vm);
    let (code, r) = verify_boot(&node, b["id"].as_str().expect("id"), &["--timeout", "5"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["passed"], false, "{r:#}");
    let reason = r["reason"].as_str().expect("reason");
    assert!(reason.contains("stopped"), "{reason}");
    assert!(r["ran_secs"].as_f64().expect("ran") < 4.5, "{r:#}");
    assert_nothing_left(&r);
    assert_eq!(source_state(&vm), before, "the source VM changed");
}
