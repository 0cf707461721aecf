//! UEFI VMs: the NVRAM variable store is kept with every backup and restored with it,
//! in place (same file, atomically, owner and mode kept) and under a new name (a store
//! of the copy's own).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use virtkeep_lab::{TestVm, lab, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";

/// Undefines a UEFI domain with its store before its [`TestVm`] guard drops (the lab's
/// plain `undefine` is refused for a domain with NVRAM); removes the given files.
struct UefiGuard {
    name: String,
    files: Vec<PathBuf>,
}

impl Drop for UefiGuard {
    fn drop(&mut self) {
        let _ = lab().try_virsh(&["destroy", "--domain", &self.name]);
        let _ = lab().try_virsh(&["undefine", "--domain", &self.name, "--nvram"]);
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Known bytes of an OVMF-sized store (528 KiB), different for each `seed`.
fn store_bytes(seed: u8) -> Vec<u8> {
    (0..540_672u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect()
}

/// Redefines `name` (shut off) as a UEFI domain whose store is `nvram`.
fn make_uefi(name: &str, nvram: &Path) {
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", name]);
    assert!(!xml.contains("<features>"), "{xml}");
    // OVMF needs ACPI.
    let fw = format!(
        "<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader><nvram>{}</nvram></os>\n  <features><acpi/></features>",
        nvram.display()
    );
    let xml = xml.replacen("</os>", &fw, 1);
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
}

fn nvram_of(name: &str) -> String {
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", name]);
    let start = xml.find("<nvram").expect("<nvram>");
    let start = start + xml[start..].find('>').expect(">") + 1;
    let end = start + xml[start..].find("</nvram>").expect("</nvram>");
    xml[start..end].to_string()
}

/// Back up a UEFI VM, change its store, restore in place: the store has the backup's
/// bytes again (owner and mode kept, no temporary left); restore under a new name: the
/// copy gets a store of its own with the backup's bytes and the original is untouched.
#[test]
fn uefi_nvram_is_backed_up_and_restored() {
    let node = Node::new();
    let vm = TestVm::builder("uefi")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x55, 0, MIB);
    let store = lab().pool_dir.join(format!("{}_VARS.fd", vm.name));
    let new_name = unique_name("uefi-copy");
    let new_store = store.with_file_name(format!("{new_name}_VARS.fd"));
    let copy = TestVm::adopt(&new_name);
    let _copy_guard = UefiGuard {
        name: new_name.clone(),
        files: vec![new_store.clone()],
    };
    let _guard = UefiGuard {
        name: vm.name.clone(),
        files: vec![store.clone()],
    };
    std::fs::write(&store, store_bytes(1)).expect("write store");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    make_uefi(&vm.name, &store);

    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let index = node.repo().join("snapshots").join(&id).join(".nvram.fidx");
    assert!(index.exists(), "no NVRAM index in the backup");
    node.ok(&["verify", "--read-data"]);

    std::fs::write(&store, store_bytes(2)).expect("change store");
    node.ok(&["restore", &id, "--to", HOST, "--force"]);
    assert!(
        std::fs::read(&store).expect("store") == store_bytes(1),
        "in place: not the backup's bytes"
    );
    let mode = std::fs::metadata(&store)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "in place: mode not kept");
    let dir = std::fs::read_dir(store.parent().expect("dir")).expect("ls");
    let temps: Vec<_> = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.contains(".vkrestore-") && n.contains(&vm.name)
        })
        .collect();
    assert!(temps.is_empty(), "temporaries left: {temps:?}");

    // `--disk` puts back that disk only
    std::fs::write(&store, store_bytes(3)).expect("change store");
    node.ok(&["restore", &id, "--to", HOST, "--force", "--disk", "vda"]);
    assert!(
        std::fs::read(&store).expect("store") == store_bytes(3),
        "--disk replaced the store"
    );

    node.ok(&[
        "restore", &id, "--to", HOST, "--name", &new_name, "--define",
    ]);
    assert!(
        std::fs::read(&new_store).expect("new store") == store_bytes(1),
        "copy: not the backup's bytes"
    );
    assert!(
        std::fs::read(&store).expect("store") == store_bytes(3),
        "original store changed"
    );
    assert_eq!(nvram_of(&new_name), new_store.display().to_string());
    assert_eq!(nvram_of(&vm.name), store.display().to_string());
    drop(copy);
}

/// A VM without a store: its backups hold none, and restoring one writes none.
#[test]
fn vm_without_nvram_has_none_in_its_backup() {
    let node = Node::new();
    let vm = TestVm::builder("no-uefi")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let index = node.repo().join("snapshots").join(&id).join(".nvram.fidx");
    assert!(!index.exists());
    let out = node.ok(&["restore", &id, "--to", HOST, "--force"]);
    assert!(!out.contains("UEFI"), "{out}");
}
