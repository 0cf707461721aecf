//! What `restore --define`, `verify --boot` and `restore --live` keep of the backup's
//! XML besides the disks: an emulator other than the one libvirt reports on the target
//! host is replaced by that one, and under a new name the chardevs written to files no
//! longer name the original's files.

use virtkeep_lab::{TestVm, lab, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// Removes the symlink when the test ends.
struct Link(std::path::PathBuf);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The backup names an emulator (a symlink to QEMU) and logs its serial and parallel
/// ports to files. `restore --define` while the symlink exists (an executable, but not
/// the emulator libvirt reports) defines the host's QEMU (from `virsh
/// domcapabilities`) and pty ports, not the original's log files; once the symlink is
/// gone, `verify --boot` passes and `restore --live` runs the VM: neither writes to
/// the source's log files.
#[test]
fn restore_replaces_a_missing_emulator_and_file_chardevs() {
    let node = Node::new();
    let vm = TestVm::builder("vemu").raw_disk(MIB).running(false).build();
    let real = "/usr/bin/qemu-system-x86_64";
    let link = Link(std::path::PathBuf::from(format!(
        "/usr/local/bin/{}",
        unique_name("vkt-emu")
    )));
    std::os::unix::fs::symlink(real, &link.0).expect("symlink");
    let log = lab().pool_dir.join(format!("{}-serial.log", vm.name));
    let plog = lab().pool_dir.join(format!("{}-parallel.log", vm.name));
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let start = xml.find("<emulator>").expect("emulator");
    let end = xml.find("</emulator>").expect("emulator end") + "</emulator>".len();
    let xml = format!(
        "{}<emulator>{}</emulator>{}",
        &xml[..start],
        link.0.display(),
        &xml[end..]
    )
    .replacen(
        "</devices>",
        &format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial><parallel type='file'><source path='{}'/><target port='0'/></parallel></devices>",
            log.display(),
            plog.display()
        ),
        1,
    );
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    let b = node.backup(&vm.name, &[]);

    let new_name = unique_name("vemu-new");
    let restored = TestVm::adopt(&new_name);
    let out = node.run(&[
        "restore",
        b["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed: {err}");
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &new_name]);
    assert!(
        xml.contains(&format!("<emulator>{real}</emulator>")),
        "{xml}"
    );
    assert!(
        !xml.contains(&log.display().to_string()) && xml.contains("<serial type='pty'>"),
        "{xml}"
    );
    drop(restored);
    drop(link);

    let id = b["id"].as_str().expect("id");
    let (code, r) = crate::live::verify_boot(&node, id, &["--timeout", "2"]);
    assert_eq!(code, 0, "{r:#}");
    crate::live::assert_nothing_left(&r);
    let live_name = unique_name("vemu-live");
    let out = node.run(&["restore", id, "--to", HOST, "--live", "--name", &live_name]);
    let live = TestVm::adopt(&live_name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "live restore failed: {err}");
    assert!(live.is_running(), "the live-restored VM does not run");
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &live_name]);
    assert!(
        xml.contains(&format!("<emulator>{real}</emulator>")),
        "{xml}"
    );
    drop(live);
    for p in [&log, &plog] {
        assert!(!p.exists(), "{} was written", p.display());
    }
}
