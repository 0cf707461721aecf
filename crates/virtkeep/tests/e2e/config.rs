//! The configuration file as a person keeps it: `host add` changes only what it is
//! given and leaves comments and order alone; `host remove`.

use std::os::unix::fs::PermissionsExt;

use crate::harness::{HOST, Node};

fn read(node: &Node) -> (String, toml::Table) {
    let text = std::fs::read_to_string(node.config()).expect("config");
    let table = toml::from_str(&text).expect("toml");
    (text, table)
}

#[test]
fn host_add_keeps_comments_order_and_settings_it_is_not_given() {
    let node = Node::new();
    let (text, _) = read(&node);
    // Hand edits: a header, a comment on a section and one after a value, the
    // repository moved below the hosts.
    let start = text.find("[repository]").expect("repo");
    let end = text[start..]
        .find("\n[")
        .map_or(text.len(), |e| start + e + 1);
    let repo_part = &text[start..end];
    let hosts_part = text.replacen(repo_part, "", 1);
    let mut edited = String::from("# Backup node of the ops team. Ask Kim before changing.\n");
    edited.push_str(
        &hosts_part
            .replace(
                &format!("[hosts.{HOST}]"),
                &format!("# the lab hypervisor\n[hosts.{HOST}]"),
            )
            .replacen(
                "libvirt_uri = \"qemu:///system\"",
                "libvirt_uri = \"qemu:///system\" # the system instance",
                1,
            ),
    );
    edited.push_str(&format!("\n# where backups go\n{repo_part}"));
    std::fs::write(node.config(), &edited).expect("write");
    std::fs::set_permissions(node.config(), std::fs::Permissions::from_mode(0o640)).expect("chmod");

    // --sudo, then a re-run with only --ssh: sudo and the Ceph settings stay.
    node.ok(&["host", "add", HOST, "--sudo"]);
    let (_, t) = read(&node);
    assert_eq!(t["hosts"][HOST]["sudo"].as_bool(), Some(true));
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
    node.ok(&["host", "add", HOST, "--ssh", &ssh]);
    let (text, t) = read(&node);
    let host = &t["hosts"][HOST];
    assert_eq!(host["sudo"].as_bool(), Some(true), "{text}");
    assert_eq!(
        host["ceph"]["id"].as_str(),
        Some(lab.ceph_id.as_str()),
        "{text}"
    );
    assert!(host["identity"].as_str().is_some(), "{text}");
    for comment in [
        "# Backup node of the ops team. Ask Kim before changing.\n",
        "# the lab hypervisor\n",
        "# the system instance",
        "# where backups go\n[repository]",
    ] {
        assert!(text.contains(comment), "lost {comment:?}:\n{text}");
    }
    assert!(
        text.find("[hosts.").expect("hosts") < text.find("[repository]").expect("repo"),
        "order changed:\n{text}"
    );
    let mode = std::fs::metadata(node.config())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "mode kept");

    // A new host goes in beside the others, the rest unchanged; removing it restores
    // the file exactly.
    let before = text;
    node.ok(&["host", "add", "other", "--ssh", "root@192.0.2.7", "--agent"]);
    let (text, t) = read(&node);
    assert_eq!(t["hosts"]["other"]["address"].as_str(), Some("192.0.2.7"));
    let mut lines = text.lines();
    for line in before.lines() {
        assert!(lines.any(|l| l == line), "{line:?} moved or lost:\n{text}");
    }
    node.ok(&["host", "remove", "other"]);
    assert_eq!(read(&node).0, before);
    // --no-sudo undoes --sudo; nothing else moves.
    node.ok(&["host", "add", HOST, "--no-sudo"]);
    let (text, t) = read(&node);
    assert_eq!(t["hosts"][HOST]["sudo"].as_bool(), Some(false));
    assert_eq!(text.lines().count(), before.lines().count());

    // Usage errors: an unknown host to remove, a new host without --ssh.
    let out = node.run(&["host", "remove", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host list"));
    let out = node.run(&["host", "add", "fresh", "--agent"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ssh"));
}

/// The node-wide known_hosts file sits beside the config file, as documented.
#[test]
fn known_hosts_beside_the_config_file() {
    let node = Node::new();
    let lab = node.lab;
    let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
    let key = lab.ssh_key.display().to_string();
    node.ok(&["host", "add", "plain", "--ssh", &ssh, "--identity", &key]);
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&lab.hostkey_ed25519_pub)
        .output()
        .expect("ssh-keygen");
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();
    let out = node.ok(&["host", "trust", "plain", "--fingerprint", &fp]);
    let beside = node.dir.path().join("known_hosts");
    assert!(out.contains(&beside.display().to_string()), "{out}");
    assert!(beside.is_file());
    node.ok(&["vm", "list", "plain"]);
}

/// Root uses the daemon's file, whatever its XDG directories say (read-only check: an
/// unknown host names the file it was looked up in).
#[test]
fn root_uses_the_system_configuration_file() {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").expect("proc").uid() == 0;
    let home = tempfile::tempdir().expect("tempdir");
    let out = assert_cmd::Command::cargo_bin("virtkeep")
        .expect("bin")
        .args(["host", "remove", "vkt-no-such-host"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("VIRTKEEP_CONFIG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = if root {
        "/etc/virtkeep/config.toml".to_string()
    } else {
        home.path()
            .join("virtkeep/config.toml")
            .display()
            .to_string()
    };
    assert!(err.contains(&expected), "{err}");
}

/// The packaging's sysusers.d and tmpfiles.d files, applied to an empty root: the
/// service user exists and owns the directories the unit reads and writes.
#[test]
fn packaging_creates_the_service_user_and_its_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let packaging = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging");
    for (kind, dir) in [
        ("sysusers.d", "usr/lib/sysusers.d"),
        ("tmpfiles.d", "usr/lib/tmpfiles.d"),
    ] {
        std::fs::create_dir_all(r.join(dir)).expect("mkdir");
        std::fs::copy(
            packaging.join(kind).join("virtkeep.conf"),
            r.join(dir).join("virtkeep.conf"),
        )
        .expect("copy");
    }
    std::fs::create_dir_all(r.join("etc")).expect("etc");
    let root_arg = format!("--root={}", r.display());
    let st = std::process::Command::new("systemd-sysusers")
        .arg(&root_arg)
        .status();
    assert!(st.expect("systemd-sysusers").success());
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).expect("passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("virtkeep:"))
        .unwrap_or_else(|| panic!("no virtkeep user: {passwd}"));
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields[5], "/var/lib/virtkeep", "{line}");
    let uid: u32 = fields[2].parse().expect("uid");
    let st = std::process::Command::new("systemd-tmpfiles")
        .args([&root_arg, "--create"])
        .status();
    assert!(st.expect("systemd-tmpfiles").success());
    for dir in ["etc/virtkeep", "etc/virtkeep/keys", "var/lib/virtkeep"] {
        let m = std::fs::metadata(r.join(dir)).expect(dir);
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o777),
            (uid, 0o700),
            "{dir}"
        );
    }
    let unit = std::fs::read_to_string(packaging.join("virtkeep.service")).expect("unit");
    assert!(unit.contains("User=virtkeep") && !unit.contains("\nConfigurationDirectory="));
}
