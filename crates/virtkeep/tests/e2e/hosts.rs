//! Host settings, trust and inventory through the CLI.

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

fn fingerprint(pub_file: &std::path::Path) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_file)
        .output()
        .expect("ssh-keygen");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

/// An unknown host key is refused; `host trust` pins only the expected fingerprint.
#[test]
fn host_trust_is_explicit() {
    let node = Node::new();
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
    let known = node.dir.path().join("fresh_known_hosts");
    let known_s = known.display().to_string();
    let key = lab.ssh_key.display().to_string();
    node.ok(&[
        "host",
        "add",
        "fresh",
        "--ssh",
        &ssh,
        "--identity",
        &key,
        "--known-hosts",
        &known_s,
    ]);

    let out = node.run(&["vm", "list", "fresh"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("host trust"), "no guidance: {stderr}");

    // No terminal and no --fingerprint: refused, nothing pinned.
    let out = node.run(&["host", "trust", "fresh"]);
    assert!(!out.status.success());
    assert!(
        !known.exists()
            || std::fs::read_to_string(&known)
                .unwrap_or_default()
                .trim()
                .is_empty()
    );

    // A wrong fingerprint: refused.
    let out = node.run(&[
        "host",
        "trust",
        "fresh",
        "--fingerprint",
        "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was pinned"));

    // The right one (the server's preferred key is ed25519).
    let fp = fingerprint(&lab.hostkey_ed25519_pub);
    let v = node.json(&["host", "trust", "fresh", "--fingerprint", &fp]);
    assert_eq!(v["fingerprint"], fp.as_str());
    node.ok(&["vm", "list", "fresh"]);
}

/// Password login through a variable (never stored), and the sudo mode.
#[test]
fn password_and_sudo_host() {
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
    let config = std::fs::read_to_string(node.config()).expect("config");
    assert!(
        !config.contains(&lab.password),
        "password written into the config"
    );
    let out = node
        .cmd()
        .args(["--json", "host", "check", "pw"])
        .env("VK_TEST_PW", &lab.password)
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    let out = node
        .cmd()
        .args(["host", "check", "pw"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing password variable is a config error"
    );
}

/// `vm list` shows every domain with its disks and the method that applies.
#[test]
fn vm_list_shows_disks_and_methods() {
    let node = Node::new();
    let vm = TestVm::builder("list")
        .qcow2_disk(8 << 20)
        .raw_disk(4 << 20)
        .running(false)
        .build();
    let list = node.json(&["vm", "list", HOST]);
    let entry = list
        .as_array()
        .expect("list")
        .iter()
        .find(|v| v["name"] == vm.name.as_str())
        .expect("listed");
    assert_eq!(entry["state"], "shut_off");
    let disks = entry["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["backend"], "qcow2-file");
    assert_eq!(disks[0]["virtual_size"], 8 << 20);
    assert_eq!(disks[1]["backend"], "raw-file");
    assert!(
        disks[0]["method"]
            .as_str()
            .is_some_and(|m| m.contains("qemu-img overlay"))
    );
    let _ = unique_name("unused");
}

/// Bad input: malformed HOST/VM, unknown host, unknown VM → clear errors, right codes.
#[test]
fn bad_input_gets_clear_errors() {
    let node = Node::new();
    let out = node.run(&["backup", "no-slash"]);
    assert_eq!(out.status.code(), Some(2));
    let out = node.run(&["backup", "nohost/vm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host add"));
    let out = node.run(&["backup", &format!("{HOST}/{}", unique_name("missing"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vm list"));
}

/// RBD disks are listed from the XML (pool/image, monitors, auth, secret) plus
/// `rbd info` run on the host with the host's Ceph settings passed explicitly.
#[test]
fn vm_list_shows_rbd_details() {
    let node = Node::new();
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
    let (known, key) = (
        lab.known_hosts.display().to_string(),
        lab.ssh_key.display().to_string(),
    );
    let (conf, keyring) = (
        lab.ceph_conf.display().to_string(),
        lab.ceph_keyring.display().to_string(),
    );
    node.ok(&[
        "host",
        "add",
        "ceph",
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
    let vm = TestVm::builder("rbdlist")
        .rbd_disk(16 << 20)
        .running(false)
        .build();
    let list = node.json(&["vm", "list", "ceph"]);
    let entry = list
        .as_array()
        .expect("list")
        .iter()
        .find(|v| v["name"] == vm.name.as_str())
        .expect("listed");
    let disk = &entry["disks"][0];
    let image = vm.disks[0].rbd_image.clone().expect("rbd image");
    assert_eq!(disk["backend"], format!("rbd:{}/{image}", lab.ceph_pool));
    assert_eq!(disk["details"]["size"], 16 << 20, "{disk}");
    assert_eq!(
        disk["details"]["secret_uuid"],
        lab.ceph_secret_uuid.as_str()
    );
    assert!(
        disk["details"]["monitors"]
            .as_array()
            .expect("mons")
            .iter()
            .any(|m| m.as_str().is_some_and(|m| m.starts_with("127.0.0.1")))
    );
    assert!(disk["method"].as_str().is_some_and(|m| m.contains("rbd")));
    // `host check` reaches the cluster with the host's Ceph settings.
    let check = node.json(&["host", "check", "ceph"]);
    let rbd = check["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == "rbd + Ceph auth")
        .expect("rbd check");
    assert_eq!(rbd["ok"], true, "{rbd}");
}

/// A requirement that fails is named with its fix, and the exit code says so.
#[test]
fn host_check_names_what_fails() {
    let node = Node::new();
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.password_user, lab.ssh_host, lab.ssh_port);
    let known = lab.known_hosts.display().to_string();
    // Without sudo, the unprivileged user cannot reach qemu:///system nor /run/virtkeep.
    node.ok(&[
        "host",
        "add",
        "nosudo",
        "--ssh",
        &ssh,
        "--password-env",
        "VK_TEST_PW",
        "--known-hosts",
        &known,
    ]);
    let out = node
        .cmd()
        .args(["--json", "host", "check", "nosudo"])
        .env("VK_TEST_PW", &lab.password)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let failed: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert!(
        failed
            .iter()
            .any(|c| c["check"] == "virsh" && c["fix"].as_str().is_some()),
        "{v}"
    );
    assert!(
        v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .any(|c| c["check"] == "qemu-nbd" && c["ok"] == true)
    );
    let root = check(&v, "root");
    assert_eq!(root["ok"], false, "{v}");
    assert!(
        root["fix"]
            .as_str()
            .is_some_and(|f| f.contains("NOPASSWD: ALL") && f.contains("--sudo")),
        "{v}"
    );
}

/// `virsh domcapabilities` (seconds on some hosts) is asked once per libvirt/QEMU
/// installation, not on every backup: the answer is kept on the host, and `host check`
/// asks again. Read from virtkeep's own debug log of the commands it ran.
#[test]
fn backup_api_probe_is_cached_and_host_check_refreshes_it() {
    let node = Node::new();
    let vm = TestVm::builder("caps")
        .qcow2_disk(16 << 20)
        .running(true)
        .build();
    let commands_of = |args: &[&str]| -> String {
        let out = node
            .cmd()
            .env("VIRTKEEP_LOG", "virtkeep_engine=debug")
            .args(args)
            .output()
            .expect("virtkeep");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let spec = format!("{HOST}/{}", vm.name);
    // The first run may have to ask (another test or host may have changed the answer).
    commands_of(&["backup", &spec]);
    let second = commands_of(&["--json", "backup", &spec]);
    assert!(
        !second.contains("domcapabilities"),
        "the second backup asked libvirt again:\n{second}"
    );
    assert!(second.contains("caps-backup-api"), "{second}");
    let check = commands_of(&["host", "check", HOST]);
    assert!(check.contains("domcapabilities"), "{check}");
}

/// The lab user whose sudo covers only virsh, qemu-img and qemu-nbd (lab/lib.sh
/// `ALLOWLIST_USER`; same password as the password user).
const ALLOWLIST_USER: &str = "vkallow";

/// Adds host `name` for `user` (password login, `--sudo`) and returns its `host check`.
fn sudo_host_check(node: &Node, name: &str, user: &str) -> (Option<i32>, serde_json::Value) {
    let lab = node.lab;
    let ssh = format!("{user}@{}:{}", lab.ssh_host, lab.ssh_port);
    let known = lab.known_hosts.display().to_string();
    node.ok(&[
        "host",
        "add",
        name,
        "--ssh",
        &ssh,
        "--password-env",
        "VK_TEST_PW",
        "--known-hosts",
        &known,
        "--sudo",
    ]);
    let out = node
        .cmd()
        .args(["--json", "host", "check", name])
        .env("VK_TEST_PW", &lab.password)
        .output()
        .expect("run");
    let v = serde_json::from_slice(&out.stdout).expect("json");
    (out.status.code(), v)
}

fn check<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name:?}: {v}"))
}

/// Every command line runs as `sudo -n -- sh -c '…'`, so sudo limited to some binaries
/// cannot work: `host check` fails the sudo check saying that sudo for every command
/// is required (never suggesting a per-binary rule), and passes it for full sudo.
#[test]
fn host_check_requires_sudo_for_every_command() {
    let node = Node::new();
    let (code, v) = sudo_host_check(&node, "allow", ALLOWLIST_USER);
    assert_eq!(code, Some(1), "{v}");
    let sudo = check(&v, "sudo -n");
    assert_eq!(sudo["ok"], false, "{v}");
    assert_eq!(sudo["required"], true, "{v}");
    let fix = sudo["fix"].as_str().expect("fix");
    assert!(
        fix.contains(&format!("{ALLOWLIST_USER} ALL=(root) NOPASSWD: ALL"))
            && fix.contains("sudo -n -- sh -c"),
        "{fix}"
    );
    for c in v["checks"].as_array().expect("checks") {
        let fix = c["fix"].as_str().unwrap_or("");
        assert!(
            !fix.contains("sudo for virsh"),
            "a per-binary rule suggested: {c}"
        );
    }

    let (code, v) = sudo_host_check(&node, "full", &node.lab.password_user);
    assert_eq!(code, Some(0), "{v}");
    let sudo = check(&v, "sudo -n");
    assert_eq!(sudo["ok"], true, "{v}");
    assert_eq!(sudo["detail"], "`sudo -n` runs any command as root", "{v}");
}
