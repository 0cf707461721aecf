//! Boot verification beyond one `verify --boot` (issue 20): a policy's scheduled
//! verification of each VM's newest backup, recorded in the catalog, the API and the
//! metrics; `--agent`. The guests are the boot sectors of `live.rs`, and for an agent
//! that answers, a small Linux guest booted from its own disk: `lab/agent-guest.sh`
//! builds it once (a FAT disk with syslinux, the LVM test hypervisor's Debian cloud
//! kernel and an initramfs that runs the host's qemu-ga; under TCG its agent answers
//! 5-10 s after the start, depending on the load).

use std::path::Path;

use serde_json::Value;
use virtkeep_lab::{TestVm, lab, unique_name, workspace_root};

use crate::daemon::{Daemon, TOKEN, append_config, catalog, http, json_of, wait_jobs};
use crate::harness::{HOST, Node};
use crate::live::{
    assert_nothing_left, marker_sector, repo_state, sector_vm, source_state, verify_boot,
};

/// The value of the series `name{labels}` in Prometheus text.
fn series(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&head))
        .and_then(|v| v.trim().parse().ok())
}

/// The transient domain a verify job booted, from its note ("booted as NAME on …").
fn booted_domain(job: &Value) -> String {
    let note = job["note"].as_str().unwrap_or_default();
    note.strip_prefix("booted as ")
        .and_then(|n| n.split_whitespace().next())
        .unwrap_or_else(|| panic!("no domain in the note: {job:#}"))
        .to_string()
}

/// A policy with `[policies.NAME.verify_boot]` on a short interval boots the newest
/// backup of each VM: the one whose newest backup prints the marker passes, the one
/// whose newest backup has no boot sector fails with the reason. The catalog has both
/// (`verify_boot` jobs with the backup booted), `/api/boot-verify` gives each VM's
/// state, `/metrics` the last success and the failures, and no domain is left.
/// Another policy, due first, lists a repository whose key never comes (a password
/// command that hangs, cut at 120 s): that listing runs off the daemon's loop, so the
/// verifications above are not held up behind it.
#[test]
fn a_policy_boot_verifies_the_newest_backups_on_schedule() {
    let node = Node::new();
    let marker = unique_name("VK-BOOT-OK");
    let good = sector_vm("vbp-good", &[0u8; 512]);
    let bad = sector_vm("vbp-bad", &[0u8; 512]);
    // good: an older backup without the marker, the newest with it.
    node.backup(&good.name, &[]);
    crate::live::write_sector(&good, &marker_sector(&marker));
    let newest = node.backup(&good.name, &[]);
    let bad_backup = node.backup(&bad.name, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[daemon.api]
listen = "127.0.0.1:{port}"
token_env = "VKD_TEST_TOKEN"

[repositories.hung]
location = "{repo}"
password_command = "sleep 600"

[policies.ahung]
repository = "hung"
schedules = [{{ cron = "0 3 1 1 *" }}]

[policies.ahung.verify_boot]
every = "1h"
host = "{HOST}"
timeout = "3s"

[[policies.ahung.vms]]
host = "{HOST}"
names = ["{good}"]

[policies.verified]
# Backups only once a year: this test is about the verification.
schedules = [{{ cron = "0 3 1 1 *" }}]

[policies.verified.verify_boot]
every = "1h"
host = "{HOST}"
expect_serial = "{marker}"
timeout = "3s"

[[policies.verified.vms]]
host = "{HOST}"
names = ["{good}", "{}"]
"#,
            catalog(&node),
            bad.name,
            repo = node.repo().display(),
            good = good.name,
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    // Under the 120 s the other policy's listing may hold up a loop that waits for it.
    let list = wait_jobs(&node, &daemon, 110, "two finished verifications", |l| {
        l.iter()
            .filter(|j| j["kind"] == "verify_boot")
            .filter(|j| j["status"] == "succeeded" || j["status"] == "failed")
            .count()
            == 2
    });
    let of = |vm: &str| {
        list.iter()
            .find(|j| j["kind"] == "verify_boot" && j["vm"] == vm)
            .unwrap_or_else(|| panic!("no verify job of {vm}: {list:#?}"))
            .clone()
    };
    let (g, b) = (of(&good.name), of(&bad.name));
    assert_eq!(g["status"], "succeeded", "{g:#}");
    assert_eq!(g["snapshot"], newest["id"], "not the newest backup: {g:#}");
    assert_eq!(b["status"], "failed", "{b:#}");
    assert_eq!(b["snapshot"], bad_backup["id"], "{b:#}");
    let reason = b["error"].as_str().expect("reason");
    assert!(reason.contains("did not match"), "{reason}");
    assert_eq!(list.iter().filter(|j| j["kind"] == "backup").count(), 0);

    let (status, body) = http(port, "GET", "/api/boot-verify", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    let states = json_of(&body);
    let state = |vm: &str| {
        states
            .as_array()
            .expect("list")
            .iter()
            .find(|s| s["vm"] == vm)
            .unwrap_or_else(|| panic!("no state of {vm}: {body}"))
            .clone()
    };
    assert_eq!(state(&good.name)["passed"], true, "{body}");
    assert!(state(&good.name)["last_success"].is_string(), "{body}");
    assert_eq!(state(&bad.name)["passed"], false, "{body}");
    assert!(state(&bad.name)["last_success"].is_null(), "{body}");

    let (status, metrics) = http(port, "GET", "/metrics", Some(TOKEN), None);
    assert_eq!(status, 200, "{metrics}");
    let labels = |vm: &str| format!("host=\"{HOST}\",vm=\"{vm}\"");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last = "virtkeep_boot_verify_last_success_timestamp_seconds";
    let ok = series(&metrics, last, &labels(&good.name)).expect("good series");
    assert!(ok > now - 300.0 && ok <= now + 1.0, "{ok}: {metrics}");
    assert_eq!(series(&metrics, last, &labels(&bad.name)), Some(0.0));
    let failures = "virtkeep_boot_verify_failures_total";
    assert_eq!(series(&metrics, failures, &labels(&bad.name)), Some(1.0));
    assert_eq!(series(&metrics, failures, &labels(&good.name)), Some(0.0));
    daemon.terminate();
    for j in [&g, &b] {
        let dom = booted_domain(j);
        assert_nothing_left(&serde_json::json!({ "domain": dom }));
    }
    assert!(!good.is_running() && !bad.is_running());
}

/// `verify --boot --agent` on a guest without an agent (the marker boot sector) fails
/// with exit 1 and says the agent did not answer, although the serial output matched;
/// nothing is left.
#[test]
fn verify_boot_with_agent_fails_when_no_agent_answers() {
    let node = Node::new();
    let marker = unique_name("VK-BOOT-OK");
    let vm = sector_vm("vagent", &marker_sector(&marker));
    let b = node.backup(&vm.name, &[]);
    let reports = tempfile::tempdir().expect("tempdir");
    let dir = reports.path().join("r");
    let (code, r) = verify_boot(
        &node,
        b["id"].as_str().expect("id"),
        &[
            "--timeout",
            "3",
            "--expect-serial",
            &marker,
            "--agent",
            "--report-dir",
            &dir.display().to_string(),
        ],
    );
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["serial_matched"], true, "{r:#}");
    assert_eq!(r["agent_answered"], false, "{r:#}");
    let reason = r["reason"].as_str().expect("reason");
    assert!(reason.contains("guest agent"), "{reason}");
    assert_nothing_left(&r);
    assert!(
        Path::new(&dir).join("report.json").exists(),
        "no report written"
    );
}

/// What the agent guest's /init prints on its serial port once qemu-ga runs.
const AGENT_GUEST_READY: &str = "vk-agent-guest: qemu-ga on /dev/vport";

/// A stopped VM whose one raw disk is the agent guest's (lab/agent-guest.sh: it boots
/// from that disk alone and runs qemu-ga on its `org.qemu.guest_agent.0` port), with
/// 192 MiB of memory for its kernel and initramfs.
fn agent_guest_vm(tag: &str) -> TestVm {
    let script = workspace_root().join("lab/agent-guest.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "lab/agent-guest.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(String::from_utf8_lossy(&out.stdout).trim()).expect("image");
    let vm = TestVm::builder(tag)
        .raw_disk(image.len() as u64)
        .running(false)
        .build();
    let disk = vm.disk("vda").path.clone().expect("file disk");
    // Written into the builder's file (owned by QEMU's user) rather than replacing it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &image).and_then(|()| f.sync_all()))
        .expect("write the disk");
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    assert!(xml.contains(">65536</memory>"), "{xml}");
    let xml = xml
        .replace(">65536</memory>", ">196608</memory>")
        .replace(">65536</currentMemory>", ">196608</currentMemory>");
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml).expect("write xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    vm
}

/// `verify --boot --agent` of a Linux guest whose guest agent runs: the transient
/// domain gets the agent channel, qemu-ga in the guest booted from the backup answers
/// `guest-ping`, and the verification passes (exit 0, `agent_answered` true, no reason,
/// the guest's line on the serial log); nothing is left on the host, the repository is
/// not written and the source VM is neither started nor changed.
#[test]
fn verify_boot_with_agent_passes_when_the_guest_agent_answers() {
    let node = Node::new();
    let vm = agent_guest_vm("vagentok");
    let b = node.backup(&vm.name, &[]);
    let before = source_state(&vm);
    let repo_before = repo_state(&node.repo());
    // The guest must keep running for the whole timeout, which is long enough for its
    // agent to answer on a loaded CI machine: it answered 4.6 s after the start on a
    // quiet machine, 9.5 s through the NBD export at a load average of 4.3.
    let (code, r) = verify_boot(
        &node,
        b["id"].as_str().expect("id"),
        &[
            "--timeout",
            "40",
            "--agent",
            "--expect-serial",
            AGENT_GUEST_READY,
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["agent_answered"], true, "{r:#}");
    assert!(r["reason"].is_null(), "{r:#}");
    assert_eq!(r["serial_matched"], true, "{r:#}");
    assert_nothing_left(&r);
    assert_eq!(source_state(&vm), before, "the source VM changed");
    assert!(!vm.is_running(), "the source VM was started");
    assert_eq!(
        repo_state(&node.repo()),
        repo_before,
        "the repository was written"
    );
}

/// Undefines a UEFI test domain with its store (a plain undefine is refused for it).
struct UefiGuard(String, std::path::PathBuf);

impl Drop for UefiGuard {
    fn drop(&mut self) {
        let _ = virtkeep_lab::lab().try_virsh(&["undefine", "--domain", &self.0, "--nvram"]);
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A backup of a UEFI domain (an NVRAM store) is refused before anything starts on
/// the host, with the error's hint saying how to boot it instead.
#[test]
fn verify_boot_refuses_a_uefi_backup_with_a_hint() {
    use virtkeep_lab::lab;
    let node = Node::new();
    let vm = sector_vm("vuefi", &[0u8; 512]);
    let store = lab().pool_dir.join(format!("{}_VARS.fd", vm.name));
    let _guard = UefiGuard(vm.name.clone(), store.clone());
    std::fs::write(&store, vec![0u8; 540_672]).expect("store");
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let fw = format!(
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>{}</nvram></os>\n  <features><acpi/></features>",
        store.display()
    );
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml.replacen("</os>", &fw, 1)).expect("xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    let b = node.backup(&vm.name, &[]);
    let id = b["id"].as_str().expect("id");
    let out = node.run(&["verify", id, "--boot", "--to", HOST, "--timeout", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("boot verification"), "it booted: {stdout}");
    assert!(stderr.contains("UEFI"), "{stderr}");
    assert!(
        stderr.contains(&format!("virtkeep restore {id} --to HOST --name NEW")),
        "no hint: {stderr}"
    );
}

/// A backup whose `<os>` boots files of the host (direct kernel boot: `<kernel>` and
/// `<initrd>`, here naming /etc/shadow as the initrd) is refused before anything starts
/// on the host: the error names the elements, not their paths, and says what to do
/// instead; /etc/shadow keeps its owner (libvirt labels the files it hands to QEMU).
#[test]
fn verify_boot_refuses_a_backup_that_boots_host_files() {
    let node = Node::new();
    let vm = sector_vm("vkernel", &[0u8; 512]);
    let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &vm.name]);
    let os = "<kernel>/etc/hostname</kernel><initrd>/etc/shadow</initrd><cmdline>console=ttyS0</cmdline></os>";
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), xml.replacen("</os>", os, 1)).expect("xml");
    lab().virsh(&["define", &file.path().display().to_string()]);
    let b = node.backup(&vm.name, &[]);
    let id = b["id"].as_str().expect("id");
    let owner = |p: &str| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).expect(p));
    let shadow_owner = owner("/etc/shadow");
    let out = node.run(&["verify", id, "--boot", "--to", HOST, "--timeout", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("boot verification"), "it booted: {stdout}");
    assert!(stderr.contains("<kernel>, <initrd>"), "{stderr}");
    assert!(!stderr.contains("/etc/shadow"), "{stderr}");
    assert!(
        stderr.contains("boot loader on its disk"),
        "no hint: {stderr}"
    );
    assert_eq!(owner("/etc/shadow"), shadow_owner);
}
