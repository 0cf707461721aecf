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
pub(crate) fn marker_sector(marker: &str) -> Vec<u8> {
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
pub(crate) fn sector_vm(tag: &str, sector: &[u8]) -> TestVm {
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

pub(crate) fn write_sector(vm: &TestVm, sector: &[u8]) {
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
pub(crate) fn repo_state(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
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
pub(crate) fn verify_boot(node: &Node, id: &str, extra: &[&str]) -> (i32, Value) {
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
pub(crate) fn assert_nothing_left(report: &Value) {
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
pub(crate) fn source_state(vm: &TestVm) -> (String, String) {
    (
        lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]),
        vm.disk_checksum("vda"),
    )
}

/// Redefines the stopped `vm` with devices that hand a guest things of the host: a 9p
/// share of `dir` (holding a marker file), a macvtap NIC on a host device that does
/// not exist (libvirt would refuse to start the domain), and a unix channel bound in
/// `dir`.
fn add_host_devices(vm: &TestVm, dir: &Path) {
    std::fs::write(dir.join("host-marker"), "host only").expect("marker");
    let devices = format!(
        "<filesystem type='mount' accessmode='passthrough'><source dir='{d}'/><target dir='hostshare'/></filesystem>\
         <interface type='direct'><source dev='{NO_DEV}' mode='bridge'/><model type='virtio'/></interface>\
         <channel type='unix'><source mode='bind' path='{d}/chan.sock'/><target type='virtio' name='vk.host'/></channel></devices>",
        d = dir.display()
    );
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml.replacen("</devices>", &devices, 1)).expect("xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
}

/// The host device of [`add_host_devices`]' macvtap NIC: none.
const NO_DEV: &str = "vkt-nodev0";

/// QEMU got neither the share nor the channel of [`add_host_devices`] (its command
/// line in libvirt's log of the verification domain), and its NIC is a plain tap.
fn assert_no_host_devices(report: &Value, dir: &Path) {
    let dom = report["domain"].as_str().expect("domain");
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{dom}.log")).expect("log");
    let d = dir.display().to_string();
    assert!(
        !log.contains(&d) && !log.contains(NO_DEV) && !log.contains("fsdev"),
        "{log}"
    );
    assert!(log.contains("virtio-net-pci"), "the NIC was removed: {log}");
    assert!(!dir.join("chan.sock").exists(), "the channel was bound");
}

/// A backup taken after the marker was written boots and prints it: exit 0, a report
/// with the serial log and a screenshot; the backup taken before (no boot sector) fails
/// with exit 1 and the reason. Neither leaves anything on the host, writes to the
/// repository or touches the source VM. The VM has a share of a host directory, a
/// macvtap NIC and a unix channel: the verification domain gets none of them.
#[test]
fn verify_boot_passes_with_the_marker_and_fails_without() {
    let node = Node::new();
    let vm = sector_vm("vboot", &[0u8; 512]);
    let host_dir = tempfile::tempdir().expect("tempdir");
    add_host_devices(&vm, host_dir.path());
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
    assert_no_host_devices(&r, host_dir.path());
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

/// Adds a serial port logged to `log` to the (stopped) domain `name`.
fn add_serial_file(name: &str, log: &Path) {
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", name]);
    let serial = format!(
        "<serial type='file'><source path='{}'/><target port='0'/></serial></devices>",
        log.display()
    );
    let xml = xml.replacen("</devices>", &serial, 1);
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
}

pub(crate) fn live_job_dirs() -> Vec<String> {
    std::fs::read_dir("/run/virtkeep/jobs")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("live-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `restore --live` of a VM with a raw file (the boot disk), a qcow2 file and an RBD
/// image: held at the failpoint after the start, the new domain already runs from the
/// repository (its marker is on the serial port while the guest still runs on overlays
/// over the NBD export) and the guest's disks take writes; released, the
/// copy completes (`blockcopy` into a new qcow2 file, a new raw file and a new RBD
/// image): every disk equals the backup plus those writes, none has a backing
/// file, the domain refers to nothing of the node, and no overlay, job directory
/// (socket) or extra image is left.
#[test]
fn live_restore_runs_before_the_copy_and_ends_on_its_own_disk() {
    let node = Node::new();
    let marker = unique_name("VK-LIVE");
    let vm = TestVm::builder("vlive")
        .raw_disk(MIB)
        .qcow2_disk(2 * MIB)
        .rbd_disk(2 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&marker));
    vm.write_pattern("vda", 0x5A, 256 * 1024, 512 * 1024);
    vm.write_pattern("vdb", 0x5B, 64 * 1024, 1024 * 1024);
    vm.write_pattern("vdc", 0x5C, 512 * 1024, 1024 * 1024);
    let log = lab().pool_dir.join(format!("{}-serial.log", vm.name));
    let _ = std::fs::remove_file(&log);
    add_serial_file(&vm.name, &log);
    let b = node.backup(&vm.name, &[]);
    live_restore_refuses_an_existing_destination(&node, &b);
    live_restore_spares_what_appears_meanwhile(&node, &b);
    cleanup_after_a_killed_live_restore(&node, &b);
    // What the guest writes during the copy, written to the source too: the restored
    // disks must end equal to the source's.
    let writes = [
        ("vda", 0xA1u8, 4096u64, 8192u64),
        ("vdb", 0xB1, MIB, 64 * 1024),
        ("vdc", 0xC1, 0, 128 * 1024),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb", "vdc"]
        .iter()
        .map(|t| vm.disk_checksum(t))
        .collect();
    let new_name = unique_name("vlive-new");
    let restored = TestVm::adopt(&new_name);

    let (child, reader) = live_restore_held(
        &node,
        b["id"].as_str().expect("id"),
        &new_name,
        "live-restore-running",
    );
    let dest = |t: &str, ext: &str| lab().pool_dir.join(format!("{new_name}-{t}.{ext}"));
    let info = |p: &Path| {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(p)
            .output()
            .expect("qemu-img info");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The qcow2 destination exists, empty (no backing); the guest runs on an overlay
    // over the export beside it.
    let vdb = info(&dest("vdb", "qcow2"));
    assert!(
        vdb.contains("\"format\": \"qcow2\"") && !vdb.contains("backing"),
        "the destination is not an empty qcow2: {vdb}"
    );
    // The marker sector ran from the backup: the CPU halted right after printing it.
    // (The serial port is a pty now: the backup's file is the source VM's log.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let regs = lab().virsh(&[
            "qemu-monitor-command",
            "--domain",
            &new_name,
            "--hmp",
            "info registers",
        ]);
        if regs.contains("EIP=00007c15") && regs.contains("HLT=1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the boot sector did not run: {regs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let running = TestVm::adopt(&new_name);
    for (t, p, off, len) in writes {
        running.write_pattern(t, p, off, len);
    }
    let (out, err) = release_held(child, reader);
    assert!(out.status.success(), "live restore failed:\n{err}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(r["vm"], new_name.as_str(), "{r:#}");
    let (run, copied) = (
        r["time_to_running_secs"].as_f64().expect("running"),
        r["time_to_copied_secs"].as_f64().expect("copied"),
    );
    assert!(run > 0.0 && run < copied, "{r:#}");
    let image = format!("{new_name}-vdc");
    let formats: Vec<(String, String)> = r["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap_or("").to_string(),
                d["format"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        formats,
        [
            (dest("vda", "img").display().to_string(), "raw".into()),
            (dest("vdb", "qcow2").display().to_string(), "qcow2".into()),
            (format!("rbd:{}", lab().rbd_spec(&image)), "raw".into()),
        ],
        "{r:#}"
    );

    assert!(restored.is_running(), "the restored VM does not run");
    // QEMU caches qcow2 metadata: the image is complete on disk once it stopped.
    restored.stop();
    let got = [
        virtkeep_lab::file_checksum(&dest("vda", "img"), "raw"),
        virtkeep_lab::file_checksum(&dest("vdb", "qcow2"), "qcow2"),
        virtkeep_lab::rbd_checksum(&image),
    ];
    assert_eq!(
        got.as_slice(),
        want.as_slice(),
        "the restored disks differ from backup + writes"
    );
    for p in [dest("vda", "img"), dest("vdb", "qcow2")] {
        let i = info(&p);
        assert!(!i.contains("backing"), "still has a backing file: {i}");
    }
    for inactive in [false, true] {
        let mut args = vec!["dumpxml", "--domain", new_name.as_str()];
        if inactive {
            args.push("--inactive");
        }
        let xml = lab().virsh(&args);
        assert!(
            !xml.contains("nbd") && !xml.contains("/run/virtkeep") && !xml.contains(".vkrestore-"),
            "the domain still refers to the node or an overlay:\n{xml}"
        );
    }
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    let temps: Vec<String> = std::fs::read_dir(&lab().pool_dir)
        .expect("pool dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&new_name) && n.contains(".vkrestore-"))
        .collect();
    assert!(temps.is_empty(), "overlays left: {temps:?}");
    let images = lab().rbd(&["ls", &lab().ceph_pool]);
    let ours: Vec<&str> = images.lines().filter(|l| l.contains(&new_name)).collect();
    assert_eq!(ours, [image.as_str()], "RBD images");
    drop(running);
    drop(restored);
    assert!(
        !log.exists(),
        "the restored domain wrote into the source VM's serial log {}",
        log.display()
    );
}

/// `restore --live` of disks that are mostly holes: a 256 MiB qcow2 disk and a
/// 256 MiB raw disk (both mirrored), each with 1 MiB of data at three known offsets. The
/// guest writes into the holes while held before the copy. The restored disks equal the
/// source (backup + those writes, zeros elsewhere), and the copy did not read the holes
/// over NBD: the node served less than a tenth of the disks' virtual size (the data
/// chunks, the guest's boot reads), where reading every range would serve all of it.
#[test]
fn live_restore_copies_the_data_not_the_holes() {
    let node = Node::new();
    let vm = TestVm::builder("vholes")
        .raw_disk(MIB)
        .qcow2_disk(256 * MIB)
        .raw_disk(256 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-HOLES")));
    for (t, p) in [("vdb", 0x6Bu8), ("vdc", 0x6C)] {
        for off in [0, 100 * MIB, 255 * MIB] {
            vm.write_pattern(t, p, off, MIB);
        }
    }
    let b = node.backup(&vm.name, &[]);
    // The guest's writes during the copy, into the holes (written to the source too).
    let writes = [
        ("vdb", 0xB7u8, 50 * MIB, 64 * 1024),
        ("vdc", 0xC7, 200 * MIB + 4096, 8192),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb", "vdc"]
        .iter()
        .map(|t| vm.disk_checksum(t))
        .collect();
    let new_name = unique_name("vholes-new");
    let restored = TestVm::adopt(&new_name);
    let id = b["id"].as_str().expect("id");
    let (child, reader) = live_restore_held(&node, id, &new_name, "live-restore-running");
    let running = TestVm::adopt(&new_name);
    for (t, p, off, len) in writes {
        running.write_pattern(t, p, off, len);
    }
    let (out, err) = release_held(child, reader);
    assert!(out.status.success(), "live restore failed:\n{err}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let served = r["served_bytes"].as_u64().expect("served_bytes");
    assert!(
        served > 0 && served < 50 * MIB,
        "served {served} bytes for 6 MiB of data in 512 MiB: {r:#}"
    );
    restored.stop();
    assert_pool_disks(
        &new_name,
        &[("vda", "raw"), ("vdb", "qcow2"), ("vdc", "raw")],
        &want,
    );
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    drop(running);
    drop(restored);
}

/// A boot sector that reads sector 2 of the boot disk (BIOS int 13h) every 100 ms
/// (int 15h wait), forever: a guest that keeps reading its disk.
pub(crate) fn reader_sector() -> Vec<u8> {
    let mut s = vec![
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0x8E, 0xC0, // mov es, ax
        0xB8, 0x01, 0x02, // again: mov ax, 0x0201 (read one sector)
        0xB9, 0x02, 0x00, // mov cx, 0x0002 (cylinder 0, sector 2)
        0xBA, 0x80, 0x00, // mov dx, 0x0080 (head 0, first hard disk)
        0xBB, 0x00, 0x7E, // mov bx, 0x7e00 (the buffer, es:bx)
        0xCD, 0x13, // int 0x13
        0xB4, 0x86, // mov ah, 0x86 (wait cx:dx microseconds)
        0xB9, 0x01, 0x00, // mov cx, 0x0001
        0xBA, 0xA0, 0x86, // mov dx, 0x86a0 (0x186a0 = 100 000)
        0xCD, 0x15, // int 0x15
        0xEB, 0xE6, // jmp again
    ];
    assert_eq!(s.len(), 32);
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// The node's SSH connection cut (`ss -K`) while `restore --live` copies: held at
/// `live-restore-copying` with its block jobs started at 4 KiB/s (mid-copy, no race),
/// the cut closes the forwarded NBD socket on the host, and the guest, which reads its
/// disk in a loop, pauses on an I/O error (`rerror=stop`). Released, the node
/// reconnects, serves the backup on the same socket again, resumes the guest and
/// restarts a job that failed: the restore succeeds (one reconnect), the VM runs, its
/// disks (a raw file and a qcow2 file, mirrored) equal the backup plus what the
/// guest wrote during the copy, and nothing of the node is left.
#[test]
fn live_restore_survives_a_lost_link_during_the_copy() {
    let node = Node::new();
    let vm = TestVm::builder("vlink")
        .raw_disk(2 * MIB)
        .qcow2_disk(2 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &reader_sector());
    vm.write_pattern("vda", 0x5A, 256 * 1024, 512 * 1024);
    vm.write_pattern("vdb", 0x5B, 64 * 1024, 1024 * 1024);
    let b = node.backup(&vm.name, &[]);
    let writes = [
        ("vda", 0xA2u8, MIB, 64 * 1024),
        ("vdb", 0xB2, MIB + 4096, 8192),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb"].iter().map(|t| vm.disk_checksum(t)).collect();
    let new_name = unique_name("vlink-new");
    let restored = TestVm::adopt(&new_name);
    let (child, reader) = live_restore_held_on(
        &node,
        HOST,
        b["id"].as_str().expect("id"),
        &new_name,
        "live-restore-copying",
        &[("VIRTKEEP_LIVE_COPY_BYTES_PER_SEC", "4096")],
    );
    let running = TestVm::adopt(&new_name);
    for (t, p, off, len) in writes {
        running.write_pattern(t, p, off, len);
    }
    assert!(
        crate::failures::cut_links_of(child.id()) > 0,
        "no SSH connection of the node to cut"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let state = lab().virsh(&["domstate", "--reason", "--domain", &new_name]);
        if state.contains("I/O error") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not pause on the lost link: {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (out, err) = release_held(child, reader);
    assert!(out.status.success(), "live restore failed:\n{err}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(r["reconnects"], 1, "{r:#}\n{err}");
    assert!(err.contains("reconnected"), "{err}");
    assert!(
        err.contains("resuming it"),
        "the guest was not resumed:\n{err}"
    );
    assert_eq!(
        lab()
            .virsh(&["domstate", "--reason", "--domain", &new_name])
            .trim(),
        "running (unpaused)",
        "{err}"
    );
    restored.stop();
    assert_pool_disks(&new_name, &[("vda", "raw"), ("vdb", "qcow2")], &want);
    let dest = |t: &str, ext: &str| lab().pool_dir.join(format!("{new_name}-{t}.{ext}"));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(dest("vdb", "qcow2"))
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        !info.contains("backing"),
        "still has a backing file: {info}"
    );
    for args in [vec!["dumpxml"], vec!["dumpxml", "--inactive"]] {
        let mut args = args;
        args.extend(["--domain", new_name.as_str()]);
        let xml = lab().virsh(&args);
        assert!(
            !xml.contains("nbd") && !xml.contains("/run/virtkeep") && !xml.contains(".vkrestore-"),
            "the domain still refers to the node or an overlay:\n{xml}"
        );
    }
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    let temps: Vec<String> = std::fs::read_dir(&lab().pool_dir)
        .expect("pool dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&new_name) && n.contains(".vkrestore-"))
        .collect();
    assert!(temps.is_empty(), "overlays left: {temps:?}");
    drop(running);
    drop(restored);
}

/// The guest-visible checksums of `vm`'s restored files in the lab's pool directory
/// (`VM-TARGET.img` raw, `VM-TARGET.qcow2`) equal `want`, in order.
pub(crate) fn assert_pool_disks(vm: &str, disks: &[(&str, &str)], want: &[String]) {
    let got: Vec<String> = disks
        .iter()
        .map(|(t, format)| {
            let ext = if *format == "raw" { "img" } else { "qcow2" };
            let path = lab().pool_dir.join(format!("{vm}-{t}.{ext}"));
            virtkeep_lab::file_checksum(&path, format)
        })
        .collect();
    assert_eq!(got, want, "the restored disks differ from backup + writes");
}

/// Releases a `restore --live` held at a failpoint (a line on its stdin) and waits for
/// it: its output, and its stderr.
pub(crate) fn release_held(
    mut child: std::process::Child,
    reader: std::thread::JoinHandle<String>,
) -> (std::process::Output, String) {
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("release");
    let out = child.wait_with_output().expect("wait");
    (out, reader.join().expect("stderr"))
}

/// Runs `restore ID --live --name NEW --json` held at `failpoint`: returns once it is
/// reached, with the process (a line on its stdin releases it) and its stderr reader.
fn live_restore_held(
    node: &Node,
    id: &str,
    new_name: &str,
    failpoint: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    live_restore_held_on(node, HOST, id, new_name, failpoint, &[])
}

/// [`live_restore_held`] onto `host`, with more environment variables.
pub(crate) fn live_restore_held_on(
    node: &Node,
    host: &str,
    id: &str,
    new_name: &str,
    failpoint: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    live_restore_held_with(node, (host, id, new_name), failpoint, env, &[])
}

/// [`live_restore_held_on`] with more arguments (`--storage …`); `(host, id, new_name)`.
pub(crate) fn live_restore_held_with(
    node: &Node,
    (host, id, new_name): (&str, &str, &str),
    failpoint: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_LOG", "info")
        .env("VIRTKEEP_FAILPOINT", failpoint)
        .envs(env.iter().copied())
        .args(["--json", "restore", id, "--to", host])
        .args(["--live", "--name", new_name])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn virtkeep");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reached = format!("failpoint {failpoint} reached");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line.contains(&reached) {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Generous: on the LVM test hypervisor (nested TCG) the plan alone takes a while.
    if rx
        .recv_timeout(std::time::Duration::from_secs(600))
        .is_err()
    {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!(
            "never reached the failpoint:\n{}\nstdout: {}",
            reader.join().expect("stderr"),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    (child, reader)
}

/// A domain of the new name and a file at a destination, both made by someone else
/// after `restore --live` checked (held at its failpoint): the restore fails, the file
/// keeps its bytes and the other domain stays defined with its own UUID; what the
/// restore had created (the first disk) is removed, and no job directory is left.
fn live_restore_spares_what_appears_meanwhile(node: &Node, b: &Value) {
    let new_name = unique_name("vlivey-new");
    let (child, reader) = live_restore_held(
        node,
        b["id"].as_str().expect("id"),
        &new_name,
        "live-restore-planned",
    );
    let xml = format!(
        "<domain type='qemu'><name>{new_name}</name><memory unit='KiB'>65536</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    let theirs = TestVm::adopt(&new_name);
    let uuid = lab().virsh(&["domuuid", "--domain", &new_name]);
    let taken = lab().pool_dir.join(format!("{new_name}-vdb.qcow2"));
    std::fs::write(&taken, b"not yours").expect("write");
    let (out, err) = release_held(child, reader);
    let kept = std::fs::read(&taken).expect("read");
    let _ = std::fs::remove_file(&taken);
    assert!(!out.status.success(), "{err}");
    assert_eq!(kept, b"not yours", "the file was overwritten or removed");
    assert_eq!(
        lab().try_virsh(&["domuuid", "--domain", &new_name]).ok(),
        Some(uuid),
        "the other domain was undefined or replaced:\n{err}"
    );
    let first = lab().pool_dir.join(format!("{new_name}-vda.img"));
    assert!(!first.exists(), "{} was left", first.display());
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    drop(theirs);
}

/// `host check` tries the forwarding `restore --live` and `verify --boot` need: as root,
/// and as a sudo user (sshd then creates the socket as that user); it leaves no job
/// directory behind.
#[test]
fn host_check_tries_unix_socket_forwarding() {
    let node = Node::new();
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.password_user, lab.ssh_host, lab.ssh_port);
    let known = lab.known_hosts.display().to_string();
    node.ok(&[
        "host",
        "add",
        "pw",
        "--ssh",
        &ssh,
        "--password-env",
        "VK_TEST_PW",
        "--known-hosts",
        &known,
        "--sudo",
    ]);
    for host in [HOST, "pw"] {
        let out = node
            .cmd()
            .args(["--json", "host", "check", host])
            .env("VK_TEST_PW", &lab.password)
            .output()
            .expect("run");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let item = v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == "unix-socket forwarding")
            .cloned()
            .unwrap_or_else(|| panic!("no forwarding check: {v:#}"));
        assert_eq!(item["ok"], true, "{host}: {item:#}");
    }
    // Other tests' `host check`s make short-lived probe directories: wait them out.
    let check_dirs = || -> Vec<String> {
        std::fs::read_dir("/run/virtkeep/jobs")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("check-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check_dirs().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left: {:?}",
            check_dirs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `restore --live` never writes over a file in its way: it refuses, the file keeps its
/// bytes, no domain is defined and no job directory is left. (Called from the other
/// live-restore test: the job directories are counted, so the two never run at once.)
fn live_restore_refuses_an_existing_destination(node: &Node, b: &Value) {
    let new_name = unique_name("vlivex-new");
    let dest = lab().pool_dir.join(format!("{new_name}-vda.img"));
    std::fs::write(&dest, b"not yours").expect("write");
    let out = node.run(&[
        "restore",
        b["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--live",
        "--name",
        &new_name,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let kept = std::fs::read(&dest).expect("read");
    let _ = std::fs::remove_file(&dest);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("exists"), "{err}");
    assert_eq!(kept, b"not yours", "the file was overwritten");
    assert!(
        lab()
            .try_virsh(&["domstate", "--domain", &new_name])
            .is_err(),
        "a domain {new_name} was defined"
    );
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
}

/// SIGTERM during `verify --boot` destroys the domain and removes its job directory
/// before the command exits (as interrupted, not as a failed verification).
#[test]
fn verify_boot_interrupted_leaves_nothing() {
    let node = Node::new();
    let marker = unique_name("VK-TERM");
    let vm = sector_vm("vterm", &marker_sector(&marker));
    let b = node.backup(&vm.name, &[]);
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .args(["--json", "verify", b["id"].as_str().expect("id"), "--boot"])
        .args(["--to", HOST, "--timeout", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn virtkeep");
    // Ours is the verification domain whose serial log has this test's marker (other
    // tests may verify at the same time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dom = loop {
        let ours = std::fs::read_dir("/run/virtkeep/jobs")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("virtkeep-verify-"))
            .find(|n| {
                let log = Path::new("/run/virtkeep/jobs").join(n).join("serial.log");
                std::fs::read_to_string(log).is_ok_and(|t| t.contains(&marker))
            });
        if let Some(d) = ours {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no verification domain"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let out = child.wait_with_output().expect("wait");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(!out.status.success(), "{v:#}");
    assert!(v["error"].is_object(), "{v:#}");
    assert_nothing_left(&serde_json::json!({ "domain": dom }));
}

/// A backup whose XML passes arguments to QEMU (`<qemu:commandline>`) is neither booted
/// by `verify --boot` nor by `restore --live`: both run the backup's XML as it is, and a
/// plain restore defines it only with `--allow-qemu-passthrough`. Nothing is left.
#[test]
fn booting_refuses_qemu_passthrough() {
    let node = Node::new();
    let vm = sector_vm("vqpass", &marker_sector("VKT-QPASS"));
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let xml = xml
        .replacen(
            "<domain type=",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' type=",
            1,
        )
        .replacen(
            "</devices>",
            "</devices><qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>",
            1,
        );
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    let b = node.backup(&vm.name, &[]);
    let id = b["id"].as_str().expect("id");

    let out = node.run(&["verify", id, "--boot", "--to", HOST, "--timeout", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("passthrough"), "{err}");

    let new_name = unique_name("vqpass-new");
    let out = node.run(&["restore", id, "--to", HOST, "--live", "--name", &new_name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("passthrough"), "{err}");
    assert!(
        lab()
            .try_virsh(&["domstate", "--domain", &new_name])
            .is_err(),
        "{new_name} was defined"
    );
    let dest = lab().pool_dir.join(format!("{new_name}-vda.img"));
    assert!(!dest.exists(), "{} was created", dest.display());
}

/// The node SIGKILLed during two live restores: one held after it created its
/// destinations and overlays but before its domain was defined, one whose domain runs
/// on the backup. `cleanup` removes the first one's job directory and what it created
/// (a raw file with its overlay beside it, an RBD image) except a destination replaced
/// meanwhile by a look-alike of the same name (kept, byte for byte, and reported as
/// left); the second's domain (the guest wrote into its overlays) stays defined with
/// its overlays and job directory, reported as left to the user.
fn cleanup_after_a_killed_live_restore(node: &Node, b: &Value) {
    let id = b["id"].as_str().expect("id");
    let killed = |name: &str, failpoint: &str| {
        let (mut child, reader) = live_restore_held(node, id, name, failpoint);
        child.kill().expect("SIGKILL the node");
        let _ = child.wait();
        let _ = reader.join();
    };
    let early = unique_name("vlivek-new");
    killed(&early, "live-restore-created");
    let early_dir = live_job_dirs();
    assert_eq!(early_dir.len(), 1, "{early_dir:?}");
    let pool = lab().pool_dir.clone();
    let in_pool = |vm: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&pool)
            .expect("pool")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(vm))
            .collect();
        v.sort();
        v
    };
    let early_image = format!("{early}-vdc");
    let rbd_has = |image: &str| {
        lab()
            .rbd(&["ls", &lab().ceph_pool])
            .lines()
            .any(|l| l == image)
    };
    let made = in_pool(&early);
    // Both destinations (created empty) and both overlays beside them.
    assert_eq!(made.len(), 4, "the killed restore's files: {made:?}");
    assert!(rbd_has(&early_image), "no RBD image {early_image}");
    // Someone replaced one destination with a file of the same name: not the job's.
    let early_vdb = pool.join(format!("{early}-vdb.qcow2"));
    std::fs::remove_file(&early_vdb).expect("remove vdb");
    std::fs::write(&early_vdb, b"not yours").expect("look-alike");
    let ran = unique_name("vlivek-new");
    killed(&ran, "live-restore-running");
    let ran_dir: Vec<String> = live_job_dirs()
        .into_iter()
        .filter(|d| !early_dir.contains(d))
        .collect();
    assert_eq!(ran_dir.len(), 1, "{ran_dir:?}");
    let vdb = pool.join(format!("{ran}-vdb.qcow2"));
    let r = node.json(&["cleanup", HOST]);
    let actions = |dir: &str| {
        r["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .find(|v| v["vm"] == format!("live restore job {dir}").as_str())
            .map(|v| v["actions"].to_string())
    };
    // Another test's `cleanup` may have removed the early one's directory first.
    let early_actions =
        actions(&early_dir[0]).unwrap_or_else(|| "removed the job directory".into());
    let ran_actions = actions(&ran_dir[0]).unwrap_or_else(|| panic!("not reported: {r:#}"));
    let left = live_job_dirs();
    let ran_defined = lab().try_virsh(&["domstate", "--domain", &ran]);
    let vdb_overlay = format!(".{ran}-vdb.qcow2.vkrestore-live-");
    let vdb_kept = vdb.exists()
        && std::fs::read_dir(&pool)
            .expect("pool")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&vdb_overlay));
    let early_left = in_pool(&early);
    let look_alike = std::fs::read(&early_vdb).ok();
    let early_rbd_left = rbd_has(&early_image);
    // Tear down the one left to the user before asserting (the test's job-dir counts).
    let _ = lab().try_virsh(&["destroy", "--domain", &ran]);
    let _ = lab().try_virsh(&["undefine", "--domain", &ran]);
    for e in std::fs::read_dir(&pool).expect("pool").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.contains(&ran) || n.contains(&early) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    for vm in [&ran, &early] {
        let _ = lab().try_rbd(&["rm", &format!("{}/{vm}-vdc", lab().ceph_pool)]);
    }
    let _ = std::fs::remove_dir_all(Path::new("/run/virtkeep/jobs").join(&ran_dir[0]));
    assert!(early_actions.contains("removed the job directory"), "{r:#}");
    // Unless another test's `cleanup` took the early job, its report names what it did.
    if actions(&early_dir[0]).is_some() {
        let pool = pool.display().to_string();
        for done in [
            format!("removed {pool}/{early}-vda.img"),
            format!("removed {pool}/.{early}-vda.img.vkrestore-live-"),
            format!("removed {pool}/.{early}-vdb.qcow2.vkrestore-live-"),
            format!("removed RBD image {}/{early}-vdc", lab().ceph_pool),
            format!("left: {} (kept:", early_vdb.display()),
        ] {
            assert!(early_actions.contains(&done), "{done} not reported: {r:#}");
        }
    }
    assert_eq!(
        early_left,
        [format!("{early}-vdb.qcow2")],
        "cleanup left what the killed restore created, or removed the look-alike: {r:#}"
    );
    assert_eq!(
        look_alike.as_deref(),
        Some(&b"not yours"[..]),
        "the look-alike changed"
    );
    assert!(!early_rbd_left, "the RBD image it created was left: {r:#}");
    assert_eq!(left, ran_dir, "{r:#}");
    assert!(ran_actions.contains("left as is"), "{r:#}");
    let resume = format!("virtkeep restore --resume {} --to {HOST}", ran_dir[0]);
    assert!(ran_actions.contains(&resume), "{resume} not named: {r:#}");
    assert!(
        ran_defined.is_ok(),
        "the domain that ran was removed: {r:#}"
    );
    assert!(vdb_kept, "the overlay the guest wrote into was removed");
    assert!(
        lab().try_virsh(&["domstate", "--domain", &early]).is_err(),
        "{early} defined"
    );
}
