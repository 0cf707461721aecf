//! Failures must lose nothing and leave nothing: failing hooks, a node killed with
//! SIGKILL at each phase of the overlay method (raw disks, so no backup API), hostile
//! names, XML the code does not know.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

#[test]
fn failing_pre_snapshot_command_aborts_cleanly() {
    let node = Node::new();
    let vm = TestVm::builder("prefail")
        .qcow2_disk(16 * MIB)
        .running(true)
        .build();
    let before = vm.current_sources();
    let spec = format!("{HOST}/{}", vm.name);
    let out = node.run(&[
        "backup",
        &spec,
        "--pre-snapshot",
        "echo app not ready >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pre-snapshot") && stderr.contains("app not ready"),
        "stderr: {stderr}"
    );
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(vm.current_sources(), before);
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(0));
}

/// Starts a backup and SIGKILLs the node as soon as `trigger` shows in its log. Only for
/// points where the node waits by itself (a sleeping hook); everywhere else use
/// [`kill_backup_at`], which cannot race the code under test.
pub fn kill_backup_when(node: &Node, vm: &str, extra: &[&str], trigger: &str) {
    kill_backup(node, &format!("{HOST}/{vm}"), extra, None, trigger);
}

/// Starts a backup of `spec` (HOST/VM) with failpoint `name` switched on: the node stops
/// there for good, and the harness SIGKILLs it at exactly that point.
pub fn kill_backup_at(node: &Node, spec: &str, extra: &[&str], name: &str) {
    let trigger = format!("virtkeep: failpoint {name} reached");
    kill_backup(node, spec, extra, Some(name), &trigger);
}

fn kill_backup(node: &Node, spec: &str, extra: &[&str], failpoint: Option<&str>, trigger: &str) {
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_LOG", "info")
        .env_remove("VIRTKEEP_FAILPOINT")
        .arg("backup")
        .arg(spec)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(name) = failpoint {
        cmd.env("VIRTKEEP_FAILPOINT", name);
    }
    let mut child = cmd.spawn().expect("spawn virtkeep");
    let stderr = child.stderr.take().expect("stderr");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        seen.push(line.clone());
        if line.contains(trigger) {
            // SIGKILL: the node gets no chance to clean up.
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {trigger:?} in time: {seen:?}"
        );
    }
    let _ = child.wait();
    panic!("backup ended before {trigger:?}: {seen:?}");
}

/// After `cleanup` the VM runs on its own files with nothing left behind, and the next
/// backup restores to `sum`. (Tests run in parallel and any `cleanup` heals every VM of
/// the host, and a kill may land after the commit already finished, so whose cleanup did
/// the work is not asserted; the healed state is.)
fn assert_healed_and_backup_works(
    node: &Node,
    vm: &TestVm,
    sources: &[(String, String)],
    sum: &str,
) {
    node.json(&["cleanup", HOST]);
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    let r = node.backup(&vm.name, &[]);
    let sums = crate::harness::restore_sums(node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), sum.to_string())]);
}

#[test]
fn sigkill_after_snapshot_then_cleanup_heals() {
    let node = Node::new();
    let vm = TestVm::builder("kill-snap")
        .raw_disk(32 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x42, 0, 2 * MIB);
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    // The post-snapshot hook holds the job right after the snapshot: kill it there.
    kill_backup_when(
        &node,
        &vm.name,
        &["--post-snapshot", "sleep 60"],
        "phase=\"post-snapshot\"",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_healed_and_backup_works(&node, &vm, &sources, &sum);
}

#[test]
fn sigkill_mid_export_then_next_backup_heals() {
    let node = Node::new();
    let vm = TestVm::builder("kill-exp")
        .raw_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x43, 0, 32 * MIB);
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    // The node stops once the first chunk is in the repository: mid export, always.
    let spec = format!("{HOST}/{}", vm.name);
    kill_backup_at(&node, &spec, &[], "export-chunk-written");
    // Without `cleanup`: the next backup of the VM heals first, then succeeds.
    let r = node.backup(&vm.name, &[]);
    assert!(
        r["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("healed"))),
        "the next backup healed nothing: {r}"
    );
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    let new_name = unique_name("kill-exp-restored");
    let restored = TestVm::adopt(&new_name);
    let out = node.json(&[
        "restore",
        r["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
    ]);
    let d = &out["disks"][0];
    assert_eq!(
        restored_checksum(
            d["path"].as_str().expect("p"),
            d["format"].as_str().expect("f")
        ),
        sum
    );
    drop(restored);
}

#[test]
fn sigkill_before_blockcommit_then_cleanup_heals() {
    let node = Node::new();
    let vm = TestVm::builder("kill-commit")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x44, 0, MIB);
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    kill_backup_at(&node, &format!("{HOST}/{}", vm.name), &[], "before-heal");
    std::thread::sleep(Duration::from_secs(1));
    let dry = node.json(&["cleanup", HOST, "--dry-run"]);
    assert!(dry["dry_run"].as_bool().unwrap_or(false));
    assert_healed_and_backup_works(&node, &vm, &sources, &sum);
}

#[test]
fn hostile_names_and_unknown_xml_survive() {
    let node = Node::new();
    // Names cannot hold '/', so an injection would touch a file in the remote shell's
    // working directory (root's home) or the node's.
    let canaries = [
        std::path::PathBuf::from("/root/vkpwned"),
        std::env::current_dir().expect("cwd").join("vkpwned"),
    ];
    for c in &canaries {
        let _ = std::fs::remove_file(c);
    }
    let name = format!(
        "it's $(touch vkpwned); \"quoted\" `touch vkpwned` ü {}",
        unique_name("h")
    );
    let vm = TestVm::builder("hostile")
        .name(&name)
        .qcow2_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x77, 0, MIB);
    let sum = vm.disk_checksum("vda");
    // XML virtkeep does not model must come back unchanged.
    let xml = node.lab.virsh(&["dumpxml", "--inactive", &name]);
    let custom = "<vk:custom xmlns:vk=\"http://example.com/vk\">keep &amp; me</vk:custom>";
    let with_meta = if xml.contains("<metadata>") {
        xml.replacen("<metadata>", &format!("<metadata>{custom}"), 1)
    } else {
        xml.replacen(
            "</name>",
            &format!("</name>\n  <metadata>{custom}</metadata>"),
            1,
        )
    };
    let file = node.dir.path().join("dom.xml");
    std::fs::write(&file, with_meta).expect("write xml");
    node.lab.virsh(&["define", &file.display().to_string()]);

    let listed = node.json(&["vm", "list", HOST]);
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|v| v["name"] == name.as_str())
    );
    let r = node.backup(&name, &[]);
    assert_eq!(r["vm"], name.as_str());
    crate::harness::assert_only_incremental_base(&vm);

    let new_name = format!("restored $(touch vkpwned) 'x' {}", unique_name("h"));
    let restored = TestVm::adopt(&new_name);
    let out = node.json(&[
        "restore",
        r["id"].as_str().expect("id"),
        "--to",
        HOST,
        "--name",
        &new_name,
        "--define",
    ]);
    let d = &out["disks"][0];
    assert_eq!(
        restored_checksum(
            d["path"].as_str().expect("p"),
            d["format"].as_str().expect("f")
        ),
        sum
    );
    let back = node.lab.virsh(&["dumpxml", "--inactive", &new_name]);
    assert!(
        back.contains("keep &amp; me") && back.contains("http://example.com/vk"),
        "metadata lost:\n{back}"
    );
    for c in &canaries {
        assert!(
            !c.exists(),
            "a name reached a shell unquoted: {} exists",
            c.display()
        );
    }
    drop(restored);
}

fn domstate(vm: &TestVm) -> String {
    virtkeep_lab::lab()
        .virsh(&["domstate", "--domain", &vm.name])
        .trim()
        .to_string()
}

/// The node killed while it holds the guest still (a file and an RBD disk: two snapshot
/// calls, so the VM is paused around them): the pause was recorded on the host first, so
/// `cleanup` resumes the VM; a VM someone else paused is never resumed.
#[test]
fn sigkill_inside_the_pause_window_then_cleanup_resumes() {
    let node = Node::new();
    let vm = TestVm::builder("kill-held")
        .raw_disk(16 * MIB)
        .rbd_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x45, 0, MIB);
    let sources = vm.current_sources();
    kill_backup_at(&node, &format!("{HOST}/{}", vm.name), &[], "held");
    assert_eq!(domstate(&vm), "paused", "the kill landed inside the pause");

    // Another VM paused by its owner stays paused through the same cleanup.
    let other = TestVm::builder("user-paused")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    virtkeep_lab::lab().virsh(&["suspend", "--domain", &other.name]);

    node.json(&["cleanup", HOST]);
    assert_eq!(domstate(&vm), "running");
    assert_eq!(vm.current_sources(), sources);
    assert_eq!(
        domstate(&other),
        "paused",
        "not paused by virtkeep: left alone"
    );
    let r = node.backup(&vm.name, &[]);
    assert!(r["error"].is_null(), "{r}");
    assert_eq!(domstate(&vm), "running");
}

/// SIGCONTs a QEMU process when dropped (also after a failed assertion).
struct Continue(String);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// A host command that hangs on a live link (`virsh snapshot-create-as` waiting on a
/// stopped QEMU's monitor): the job fails in bounded time (`command_timeout_secs`),
/// releases the VM lock and heals; once QEMU runs again `cleanup` puts the VM back on its
/// own file with its definition unchanged, and the next backup works.
#[test]
fn hung_host_command_fails_the_job_in_bounded_time() {
    let node = Node::new();
    let cfg = std::fs::read_to_string(node.config()).expect("config");
    let section = format!("[hosts.{HOST}]\n");
    assert!(cfg.contains(&section), "{cfg}");
    let cfg = cfg.replacen(&section, &format!("{section}command_timeout_secs = 8\n"), 1);
    std::fs::write(node.config(), cfg).expect("config");
    let vm = TestVm::builder("hung")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x46, 0, MIB);
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    let lab = virtkeep_lab::lab();
    let inactive = lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]);
    let pid_file = format!("/run/libvirt/qemu/{}.pid", vm.name);
    let pid = std::fs::read_to_string(&pid_file).expect("qemu pid");
    let _cont = Continue(pid.trim().to_string());

    // The pre-snapshot hook stops QEMU: the snapshot that follows waits on its monitor.
    let hook = format!("kill -STOP \"$(cat '{pid_file}')\"");
    let started = Instant::now();
    let out = node.run(&[
        "backup",
        &format!("{HOST}/{}", vm.name),
        "--pre-snapshot",
        &hook,
    ]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("did not finish within 8 s"), "{stderr}");
    eprintln!(
        "the job with a hung command ended after {:.1} s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(150), "took {took:?}:\n{stderr}");

    drop(_cont);
    std::thread::sleep(Duration::from_secs(2));
    node.json(&["cleanup", HOST]);
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(
        lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]),
        inactive
    );
    let r = node.backup(&vm.name, &[]);
    let sums = crate::harness::restore_sums(&node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), sum)]);
}

fn domjobinfo(vm: &TestVm) -> String {
    virtkeep_lab::lab().virsh(&["domjobinfo", "--domain", &vm.name])
}

/// Job directories of the VM on the host (`/run/virtkeep/jobs/UUID-*`: scratch files,
/// the NBD socket, the backup XML).
pub(crate) fn job_dirs(vm: &TestVm) -> Vec<String> {
    let uuid = virtkeep_lab::lab().virsh(&["domuuid", "--domain", &vm.name]);
    let prefix = format!("{}-", uuid.trim());
    std::fs::read_dir("/run/virtkeep/jobs")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL right after `virsh backup-begin` (backup API, qcow2 disk): the pull-mode job
/// and its NBD export are left running in QEMU. `cleanup` ends the job and removes its
/// scratch files and socket; the definition is unchanged, and the next backup is an
/// incremental that holds every write since the last published backup.
#[test]
fn sigkill_at_backup_begin_then_cleanup_ends_the_job() {
    let node = Node::new();
    let lab = virtkeep_lab::lab();
    let vm = TestVm::builder("kill-begin")
        .qcow2_disk(32 * MIB)
        .running(true)
        .build();
    let inactive = lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]);
    vm.write_pattern("vda", 0x51, 0, MIB);
    let full = node.backup(&vm.name, &[]);
    assert_eq!(full["method"], "backup_api", "{full}");
    vm.write_pattern("vda", 0x52, 4 * MIB, MIB);
    let spec = format!("{HOST}/{}", vm.name);
    kill_backup_at(&node, &spec, &[], "backup-begun");
    let job = domjobinfo(&vm);
    assert!(job.contains("Backup"), "the kill left no backup job: {job}");
    assert!(!job_dirs(&vm).is_empty(), "the killed job left no job dir");
    vm.write_pattern("vda", 0x53, 8 * MIB, MIB);
    let sum = vm.disk_checksum("vda");

    node.json(&["cleanup", HOST]);
    let job = domjobinfo(&vm);
    assert!(
        job.lines()
            .any(|l| l.starts_with("Job type:") && l.trim_end().ends_with("None")),
        "a backup job is left in QEMU: {job}"
    );
    assert_eq!(job_dirs(&vm), Vec::<String>::new(), "scratch/NBD left");
    assert!(vm.is_running());
    assert_eq!(
        lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]),
        inactive
    );
    // A base pick that fails removes the job dir made beside it.
    crate::harness::backup_failing_at(&node, &spec, "pick-base-fails");
    assert_eq!(
        job_dirs(&vm),
        Vec::<String>::new(),
        "failed pick left its job dir"
    );
    let r = node.backup(&vm.name, &[]);
    assert_eq!(r["mode"], "incremental", "{r}");
    assert_eq!(r["method"], "backup_api", "{r}");
    let sums = crate::harness::restore_sums(&node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), sum)]);
    crate::harness::assert_only_incremental_base(&vm);
    node.ok(&["verify", "--all"]);
}

/// The node's established TCP connections to the lab sshd, as local ports.
pub(crate) fn ssh_ports_of(pid: u32) -> Vec<String> {
    let port = virtkeep_lab::lab().ssh_port;
    let out = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(2)?.rsplit_once(':'))
        .map(|(_, p)| p.to_string())
        .collect()
}

/// Cuts every SSH connection of process `pid` (`ss -K`: the sockets are destroyed, the
/// node gets an error, the server a reset): the link is gone mid-command.
pub(crate) fn cut_links_of(pid: u32) -> usize {
    let port = virtkeep_lab::lab().ssh_port;
    let ports = ssh_ports_of(pid);
    for p in &ports {
        let st = Command::new("ss")
            .args(["-K", "-tnH", "state", "established"])
            .arg(format!("( sport = :{p} and dport = :{port} )"))
            .stdout(Stdio::null())
            .status()
            .expect("ss -K");
        assert!(st.success());
    }
    ports.len()
}

/// Packets of the node's SSH connections silently dropped (iptables on loopback), as
/// on a link that went away without a word; the rules go when dropped.
struct Blackhole(Vec<Vec<String>>);

impl Blackhole {
    fn links_of(pid: u32) -> Blackhole {
        let lab_port = virtkeep_lab::lab().ssh_port.to_string();
        let mut rules = Vec::new();
        for p in ssh_ports_of(pid) {
            for (sport, dport) in [(&p, &lab_port), (&lab_port, &p)] {
                rules.push(
                    [
                        "INPUT", "-p", "tcp", "--sport", sport, "--dport", dport, "-j", "DROP",
                    ]
                    .map(String::from)
                    .to_vec(),
                );
            }
        }
        let mut hole = Blackhole(Vec::new());
        for r in rules {
            let st = Command::new("iptables")
                .arg("-I")
                .args(&r)
                .status()
                .expect("iptables");
            assert!(st.success(), "iptables -I {r:?}");
            hole.0.push(r);
        }
        hole
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

/// How a test cuts the node's link: returns what undoes it (if anything) when dropped.
type Cut = fn(u32) -> Option<Blackhole>;

/// The link cut while `virsh blockcommit` runs on the host (it waits on a QEMU the
/// post-snapshot hook stopped, so the cut lands inside the commit, no race): the job
/// fails within `bound`; once QEMU runs again, `cleanup` finishes the commit, the VM
/// runs on its own file with its definition unchanged, and the next backup works.
fn link_cut_during_blockcommit(cut_link: Cut, bound: Duration) {
    let node = Node::new();
    let lab = virtkeep_lab::lab();
    let vm = TestVm::builder("cut-commit")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x47, 0, MIB);
    let sum = vm.disk_checksum("vda");
    let sources = vm.current_sources();
    let inactive = lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]);
    let uuid = lab
        .virsh(&["domuuid", "--domain", &vm.name])
        .trim()
        .to_string();
    let pid_file = format!("/run/libvirt/qemu/{}.pid", vm.name);
    let pid = std::fs::read_to_string(&pid_file).expect("qemu pid");
    let cont = Continue(pid.trim().to_string());

    let log = node.dir.path().join("backup.log");
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("virtkeep"))
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_LOG", "info")
        .env_remove("VIRTKEEP_FAILPOINT")
        .args(["backup", &format!("{HOST}/{}", vm.name), "--post-snapshot"])
        .arg(format!("kill -STOP \"$(cat '{pid_file}')\""))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn virtkeep");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("pgrep")
            .args(["-af", "blockcommit"])
            .output()
            .expect("pgrep");
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(&uuid) && l.starts_with(|c: char| c.is_ascii_digit()))
        {
            break;
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(Instant::now() < deadline, "no blockcommit: {log}");
        assert!(child.try_wait().expect("wait").is_none(), "ended: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!ssh_ports_of(child.id()).is_empty(), "no connection to cut");
    let hole = cut_link(child.id());
    let cut = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if cut.elapsed() > bound + Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the job still runs {bound:?} + 60 s after the link was cut");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = cut.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    eprintln!(
        "the job ended {:.1} s after the cut:\n{stderr}",
        took.as_secs_f64()
    );
    assert!(took < bound, "took {took:?}");

    drop(hole);
    drop(cont);
    std::thread::sleep(Duration::from_secs(2));
    node.json(&["cleanup", HOST, "--vm", &vm.name]);
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(
        lab.virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]),
        inactive
    );
    let r = node.backup(&vm.name, &[]);
    let sums = crate::harness::restore_sums(&node, r["id"].as_str().expect("id"), &[]);
    assert_eq!(sums, [("vda".to_string(), sum)]);
    node.ok(&["verify", "--all"]);
}

/// The sockets destroyed (`ss -K`): the node sees the connection fail at once.
#[test]
fn link_reset_during_blockcommit_then_cleanup_finishes_it() {
    link_cut_during_blockcommit(
        |pid| {
            cut_links_of(pid);
            None
        },
        Duration::from_secs(30),
    );
}

/// Every packet dropped, nothing said: the SSH keepalives (15 s, three unanswered)
/// end the job.
#[test]
fn link_loss_during_blockcommit_then_cleanup_finishes_it() {
    link_cut_during_blockcommit(
        |pid| Some(Blackhole::links_of(pid)),
        Duration::from_secs(110),
    );
}
