//! Smoke tests proving the lab is real: sshd with strict host keys, libvirt domains
//! over SSH, guest-visible writes and checksums, RBD-backed domains, S3 on radosgw,
//! and teardown that leaves nothing behind. No mocks.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use virtkeep_lab::{DiskKind, TestVm, file_checksum, lab, rbd_checksum, unique_name};

const MIB: u64 = 1024 * 1024;

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ssh_with_known_hosts(known_hosts: &Path, remote: &str) -> Output {
    let lab = lab();
    Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &lab.ssh_port.to_string()])
        .args(["-i", &lab.ssh_key.to_string_lossy()])
        .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
        ])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .arg(format!("root@{}", lab.ssh_host))
        .arg(remote)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh")
}

#[test]
fn ssh_key_login_with_strict_host_key_checking() {
    let lab = lab();
    let out = ssh_with_known_hosts(&lab.known_hosts, "id -u; printf '%s' \"$SSH_CONNECTION\"");
    let text = ok(&out, "ssh with the lab key");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"), "root login expected: {text}");
    let conn = lines.next().unwrap_or_default();
    assert!(
        conn.ends_with(&format!(" {}", lab.ssh_port)),
        "connected to the private sshd: {conn}"
    );
}

#[test]
fn ssh_both_host_keys_are_pinned() {
    let lab = lab();
    let known = std::fs::read_to_string(&lab.known_hosts).expect("read known_hosts");
    for (pubfile, algo) in [
        (&lab.hostkey_ed25519_pub, "ssh-ed25519"),
        (&lab.hostkey_rsa_pub, "rsa-sha2-512"),
    ] {
        let key = std::fs::read_to_string(pubfile).expect("read host key");
        let blob = key.split_whitespace().nth(1).expect("key blob");
        assert!(known.contains(blob), "{} not pinned", pubfile.display());
        // and the server really offers that key
        let out = Command::new("ssh")
            .args(lab.ssh_options())
            .args(["-o", &format!("HostKeyAlgorithms={algo}")])
            .arg(format!("root@{}", lab.ssh_host))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        ok(&out, &format!("ssh with host key algorithm {algo}"));
    }
}

#[test]
fn ssh_password_login_and_sudo_for_password_user() {
    let lab = lab();
    let out = Command::new("sshpass")
        .arg("-e")
        .arg("ssh")
        .args(["-F", "/dev/null", "-p", &lab.ssh_port.to_string()])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", lab.known_hosts.display()),
        ])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "PubkeyAuthentication=no", "-o", "IdentityAgent=none"])
        .args(["-o", "PreferredAuthentications=password"])
        .arg(format!("{}@{}", lab.password_user, lab.ssh_host))
        .arg("id -un; sudo -n id -u")
        .env("SSHPASS", &lab.password)
        .stdin(Stdio::null())
        .output()
        .expect("run sshpass");
    let text = ok(&out, "password login");
    assert_eq!(text, format!("{}\n0\n", lab.password_user));

    // a wrong password is refused
    let out = Command::new("sshpass")
        .args(["-p", "definitely-wrong", "ssh", "-F", "/dev/null"])
        .args(["-p", &lab.ssh_port.to_string()])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", lab.known_hosts.display()),
        ])
        .args(["-o", "PubkeyAuthentication=no", "-o", "IdentityAgent=none"])
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "NumberOfPasswordPrompts=1",
        ])
        .arg(format!("{}@{}", lab.password_user, lab.ssh_host))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("run sshpass");
    assert!(!out.status.success(), "a wrong password must be refused");
}

#[test]
fn ssh_wrong_pinned_host_key_is_refused() {
    let lab = lab();
    let dir = tempfile::tempdir().expect("tempdir");
    let other = dir.path().join("other");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .output()
        .expect("ssh-keygen");
    ok(&out, "ssh-keygen");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).expect("read pub");
    let other_rsa = dir.path().join("other_rsa");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&other_rsa)
        .output()
        .expect("ssh-keygen");
    ok(&out, "ssh-keygen");
    let other_rsa_pub = std::fs::read_to_string(other_rsa.with_extension("pub")).expect("read");
    let wrong = dir.path().join("known_hosts");
    let blob = |k: &str| k.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    std::fs::write(
        &wrong,
        format!(
            "[{h}]:{p} {}\n[{h}]:{p} {}\n",
            blob(&other_pub),
            blob(&other_rsa_pub),
            h = lab.ssh_host,
            p = lab.ssh_port
        ),
    )
    .expect("write known_hosts");
    let out = ssh_with_known_hosts(&wrong, "echo should-not-run");
    assert!(!out.status.success(), "a wrong pinned key must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HOST IDENTIFICATION HAS CHANGED")
            || stderr.contains("Host key verification failed"),
        "unexpected ssh error: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));

    // an empty known_hosts (unknown host) is refused too
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").expect("write");
    let out = ssh_with_known_hosts(&empty, "true");
    assert!(!out.status.success(), "an unknown host key must be refused");
}

#[test]
fn virsh_over_ssh_shows_running_test_domain() {
    let lab = lab();
    let vm = TestVm::builder("smoke-list").qcow2_disk(16 * MIB).build();
    let out = lab
        .ssh_command()
        .arg(format!(
            "virsh -c {} list --name --state-running",
            lab.libvirt_uri
        ))
        .output()
        .expect("run ssh");
    let text = ok(&out, "virsh list over ssh");
    assert!(
        text.lines().any(|l| l.trim() == vm.name),
        "{} not in running list over SSH: {text}",
        vm.name
    );
}

#[test]
fn pattern_writes_into_running_disks_change_checksums() {
    let vm = TestVm::builder("smoke-pattern")
        .qcow2_disk(32 * MIB)
        .raw_disk(16 * MIB)
        .build();
    assert!(vm.is_running());
    for target in ["vda", "vdb"] {
        let empty = vm.disk_checksum(target);
        assert_eq!(empty, vm.disk_checksum(target), "same state, same checksum");
        vm.write_pattern(target, 0xab, MIB, MIB);
        let a = vm.disk_checksum(target);
        assert_ne!(
            a, empty,
            "{target}: a written pattern must change the checksum"
        );
        assert_eq!(a, vm.disk_checksum(target), "same state, same checksum");
        vm.write_pattern(target, 0xcd, MIB, MIB);
        let b = vm.disk_checksum(target);
        assert_ne!(
            a, b,
            "{target}: a different pattern gives a different checksum"
        );
        vm.write_pattern(target, 0xab, MIB, MIB);
        assert_eq!(
            vm.disk_checksum(target),
            a,
            "{target}: writing the first pattern again restores its checksum"
        );
    }
    // the same content in a qcow2 and a raw disk of the same size hashes the same:
    // checksums are of guest-visible content, not of the container format
    let twin = TestVm::builder("smoke-twin")
        .qcow2_disk(16 * MIB)
        .raw_disk(16 * MIB)
        .running(false)
        .build();
    twin.write_pattern("vda", 0x5a, 4096, 8192);
    twin.write_pattern("vdb", 0x5a, 4096, 8192);
    assert_eq!(twin.disk_checksum("vda"), twin.disk_checksum("vdb"));
    let path = twin.disk("vda").path.clone().expect("path");
    assert_eq!(file_checksum(&path, "qcow2"), twin.disk_checksum("vda"));
    assert!(vm.leftovers().is_empty(), "{:?}", vm.leftovers());
    assert_eq!(
        vm.current_sources()
            .into_iter()
            .map(|(_, s)| s)
            .collect::<Vec<_>>(),
        vm.disks
            .iter()
            .map(|d| d.path.clone().expect("path").to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    );
}

#[test]
fn rbd_backed_domain_runs_and_takes_writes() {
    let lab = lab();
    let vm = TestVm::builder("smoke-rbd")
        .rbd_disk(16 * MIB)
        .qcow2_disk(16 * MIB)
        .build();
    assert!(vm.is_running(), "RBD-backed domain must run");
    let disk = vm.disk("vda");
    assert_eq!(disk.kind, DiskKind::Rbd);
    let image = disk.rbd_image.clone().expect("image");
    let info = lab.rbd(&["info", "--format", "json", &lab.rbd_spec(&image)]);
    assert!(info.contains(&format!("\"size\":{}", 16 * MIB)), "{info}");
    let before = vm.disk_checksum("vda");
    vm.write_pattern("vda", 0x42, 0, 2 * MIB);
    let after = vm.disk_checksum("vda");
    assert_ne!(before, after);
    assert_eq!(after, rbd_checksum(&image));
    // an RBD snapshot shows up as a leftover
    lab.rbd(&[
        "snap",
        "create",
        &format!("{}@vk-test", lab.rbd_spec(&image)),
    ]);
    assert_eq!(
        vm.leftovers().rbd_snapshots,
        vec![format!("{image}@vk-test")]
    );
    assert_eq!(rbd_checksum(&format!("{image}@vk-test")), after);
}

#[test]
fn s3_put_list_get_round_trip_on_radosgw() {
    let lab = lab();
    let key = format!("{}/hello.bin", unique_name("s3"));
    let script = r#"
import os, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["EP"], aws_access_key_id=os.environ["AK"],
                  aws_secret_access_key=os.environ["SK"], region_name=os.environ["RG"],
                  config=Config(s3={"addressing_style": "path"}))
b, k = os.environ["BK"], os.environ["KEY"]
body = os.urandom(3 * 1024 * 1024 + 17)
s3.put_object(Bucket=b, Key=k, Body=body)
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=b, Prefix=k).get("Contents", [])]
assert keys == [k], keys
got = s3.get_object(Bucket=b, Key=k)["Body"].read()
assert got == body, "content differs"
s3.delete_object(Bucket=b, Key=k)
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("EP", &lab.s3_endpoint)
        .env("AK", &lab.s3_access_key)
        .env("SK", &lab.s3_secret_key)
        .env("RG", &lab.s3_region)
        .env("BK", &lab.s3_bucket)
        .env("KEY", &key)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert_eq!(ok(&out, "boto3 round trip").trim(), "ok");
}

#[test]
fn hostile_name_domain_and_drop_leaves_nothing() {
    let lab = lab();
    let hostile = format!(
        "it's $(touch vkt-pwned); \"quoted\" `id` ü {}",
        unique_name("hostile")
    );
    let (name, files, images) = {
        let vm = TestVm::builder("smoke-drop")
            .name(hostile.clone())
            .qcow2_disk(16 * MIB)
            .raw_disk(8 * MIB)
            .rbd_disk(8 * MIB)
            .build();
        assert!(vm.is_running());
        assert_eq!(vm.name, hostile);
        vm.write_pattern("vdb", 0x11, 0, 4096);
        // leave things behind the way a failed backup might
        let vda = vm.disk("vda").path.clone().expect("path");
        let overlay = format!("{}.vk-leftover", vda.display());
        std::fs::write(&overlay, b"x").expect("write overlay");
        // checkpoints need qcow2: leave the raw and RBD disks out of it
        lab.virsh(&[
            "checkpoint-create-as",
            "--domain",
            &vm.name,
            "--name",
            "vk-cp",
            "--diskspec",
            "vdb,checkpoint=no",
            "--diskspec",
            "vdc,checkpoint=no",
        ]);
        let left = vm.leftovers();
        assert_eq!(left.overlay_files, vec![std::path::PathBuf::from(&overlay)]);
        assert_eq!(left.checkpoints, vec!["vk-cp".to_string()]);
        assert!(!left.is_empty());
        let files: Vec<_> = vm.disks.iter().filter_map(|d| d.path.clone()).collect();
        let images: Vec<_> = vm
            .disks
            .iter()
            .filter_map(|d| d.rbd_image.clone())
            .collect();
        (vm.name.clone(), files, images)
    };
    assert!(
        lab.try_virsh(&["domuuid", "--domain", &name]).is_err(),
        "domain still defined after drop"
    );
    for f in &files {
        assert!(!f.exists(), "{} still exists", f.display());
        assert!(virtkeep_lab::overlay_files(f).is_empty());
    }
    let listed = lab.rbd(&["ls", &lab.ceph_pool]);
    for i in &images {
        assert!(
            !listed.lines().any(|l| l == i),
            "rbd image {i} still exists"
        );
    }
    assert!(!Path::new("vkt-pwned").exists());
}

#[test]
fn adopt_cleans_up_a_domain_defined_elsewhere() {
    let lab = lab();
    let (name, path) = {
        let vm = TestVm::builder("smoke-adopt")
            .raw_disk(4 * MIB)
            .running(false)
            .build();
        let name = vm.name.clone();
        let path = vm.disk("vda").path.clone().expect("path");
        // hand the domain over to an adopting guard, as a test does with a restored VM
        std::mem::forget(vm);
        let adopted = TestVm::adopt(&name);
        assert_eq!(adopted.disks.len(), 1);
        assert_eq!(adopted.disks[0].path.as_deref(), Some(path.as_path()));
        assert_eq!(adopted.disks[0].size, 4 * MIB);
        (name, path)
    };
    assert!(lab.try_virsh(&["domuuid", "--domain", &name]).is_err());
    assert!(!path.exists());
}
