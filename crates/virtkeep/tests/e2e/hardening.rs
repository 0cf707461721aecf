//! Hardening (issue 17): a backup never changes a VM's definition, names are names,
//! RBD names never become options.

use std::time::Duration;

use virtkeep_lab::TestVm;

use crate::failures::kill_backup_when;
use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// The persistent definition with its secrets, as `virsh define` would get it back.
fn secure_inactive_xml(node: &Node, name: &str) -> String {
    node.lab
        .virsh(&["dumpxml", "--domain", name, "--inactive", "--security-info"])
}

/// A stopped VM with a VNC password (libvirt's QEMU driver takes at most 8 characters)
/// goes through the offline-overlay method (raw disk: no backup API), which redefines
/// it on overlays and back; then through a killed backup healed by `cleanup`. Its
/// definition, password included, must come out byte for byte as it was.
#[test]
fn offline_backup_and_heal_keep_the_vnc_password() {
    let node = Node::new();
    let vm = TestVm::builder("vncpw")
        .raw_disk(16 * MIB)
        .running(false)
        .build();
    let xml = secure_inactive_xml(&node, &vm.name);
    let with_vnc = xml.replacen(
        "</devices>",
        "  <graphics type='vnc' port='-1' autoport='yes' passwd='s3cr3t'/>\n  </devices>",
        1,
    );
    let file = node.dir.path().join("vnc.xml");
    std::fs::write(&file, with_vnc).expect("write xml");
    node.lab
        .virsh(&["define", "--file", &file.display().to_string()]);
    let before = secure_inactive_xml(&node, &vm.name);
    assert!(before.contains("passwd='s3cr3t'"), "{before}");

    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["method"], "offline_overlay", "{r}");
    assert_eq!(
        secure_inactive_xml(&node, &vm.name),
        before,
        "backup changed it"
    );

    // A node killed on the overlays: `cleanup` commits them and redefines the VM.
    kill_backup_when(
        &node,
        &vm.name,
        &["--post-snapshot", "sleep 60"],
        "phase=\"post-snapshot\"",
    );
    std::thread::sleep(Duration::from_secs(1));
    node.json(&["cleanup", HOST, "--vm", &vm.name]);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(
        secure_inactive_xml(&node, &vm.name),
        before,
        "heal changed it"
    );
    assert!(!vm.is_running());
}

/// A domain named after the numeric id of another, running domain is backed up itself,
/// never the domain that has that id.
#[test]
fn a_numeric_name_is_a_name_not_an_id() {
    let node = Node::new();
    let running = TestVm::builder("idvictim")
        .raw_disk(8 * MIB)
        .running(true)
        .build();
    let id = node
        .lab
        .virsh(&["domid", "--domain", &running.name])
        .trim()
        .to_string();
    assert!(id.parse::<u32>().is_ok(), "domid: {id:?}");
    let named = TestVm::builder("idname")
        .name(&id)
        .raw_disk(24 * MIB)
        .running(false)
        .build();
    let r = node.backup(&id, &[]);
    assert_eq!(r["vm"], id.as_str(), "{r}");
    assert_eq!(
        r["disks"][0]["size"],
        24 * MIB,
        "backed up the wrong domain: {r}"
    );
    assert_eq!(r["method"], "offline_overlay", "{r}");
    assert!(running.is_running());
    assert!(named.leftovers().is_empty(), "{:?}", named.leftovers());
    assert!(running.leftovers().is_empty(), "{:?}", running.leftovers());
    // The guards address domains with `--domain NAME` too: once the running one is gone
    // its id no longer shadows the name.
    drop(running);
    drop(named);
}

/// An RBD disk whose pool name would be an `rbd` option is refused with the disk and
/// the name before anything is frozen; the VM and the repository are left as they were.
#[test]
fn an_rbd_name_that_looks_like_an_option_is_refused() {
    let node = Node::new();
    let vm = TestVm::builder("rbdopt")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    let lab = node.lab;
    let (mon_host, mon_port) = lab.ceph_mon.rsplit_once(':').expect("mon host:port");
    let disk = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='rbd' name='--keyring=/tmp/evil/img'>\
         <host name='{mon_host}' port='{mon_port}'/></source>\
         <auth username='{}'><secret type='ceph' uuid='{}'/></auth>\
         <target dev='vdb' bus='virtio'/></disk>\n  </devices>",
        lab.ceph_id, lab.ceph_secret_uuid
    );
    let xml = secure_inactive_xml(&node, &vm.name).replacen("</devices>", &disk, 1);
    let file = node.dir.path().join("rbd.xml");
    std::fs::write(&file, xml).expect("write xml");
    lab.virsh(&["define", "--file", &file.display().to_string()]);
    let before = secure_inactive_xml(&node, &vm.name);

    let out = node.run(&["--json", "backup", &format!("{HOST}/{}", vm.name)]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("disk vdb: RBD pool name") && stdout.contains("--exclude-disk vdb"),
        "{stdout}"
    );
    assert_eq!(secure_inactive_xml(&node, &vm.name), before);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(0));
    // Left out, the rest of the VM backs up.
    let r = node.backup(&vm.name, &["--exclude-disk", "vdb"]);
    assert_eq!(r["disks"].as_array().map(Vec::len), Some(1), "{r}");
}
