//! `restore --live` beyond its first run: `--storage` (the disks go where a normal
//! restore with the same `--storage` puts them), a destination without room (refused
//! before anything is made), a link that never comes back (exit 4, the domain left as
//! it is, `cleanup` reports it), and a node killed mid-copy (`restore --resume JOB`
//! finishes it).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use virtkeep_lab::{TestVm, lab, unique_name};

use crate::harness::{HOST, Node};
use crate::live::{
    assert_pool_disks, live_job_dirs, live_restore_held_with, marker_sector, reader_sector,
    write_sector,
};
use crate::restore_space::SmallMount;

const MIB: u64 = 1 << 20;

/// A second RBD pool in the lab's Ceph (made once, idempotently: `pool create` of an
/// existing pool succeeds).
fn second_rbd_pool() -> String {
    let pool = "vkt-rbd2";
    let ceph = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("60")
            .arg("ceph")
            .args(lab().ceph_args())
            .args(args)
            .output()
            .expect("ceph");
        assert!(
            out.status.success(),
            "ceph {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ceph(&["osd", "pool", "create", pool, "8", "8"]);
    ceph(&["osd", "pool", "application", "enable", pool, "rbd"]);
    pool.to_string()
}

/// Releases a held `restore --live` and returns its exit code, stdout (JSON) and stderr.
fn release(
    child: std::process::Child,
    reader: std::thread::JoinHandle<String>,
) -> (Option<i32>, Value, String) {
    let (out, err) = crate::live::release_held(child, reader);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}\n{err}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), json, err)
}

/// The names in the lab's pool directory that contain `name`.
pub(crate) fn in_pool(name: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&lab().pool_dir)
        .expect("pool dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(name))
        .collect();
    v.sort();
    v
}

/// `restore --live --storage` puts the disks where `restore --storage` would: with
/// `file:DIR` both disks (a raw file, an RBD image) become raw files in DIR; with
/// `rbd:POOL` the RBD disk becomes an image in that other pool and the file disk stays
/// beside the original. Held once the domain runs, the guest writes; released, every
/// disk ends at its place equal to the backup plus those writes, the domain's
/// definition names them, and nothing is left at the original place (pool directory,
/// original Ceph pool) or in a job directory.
#[test]
fn live_restore_with_storage_goes_where_restore_would() {
    let node = Node::new();
    let vm = TestVm::builder("vlsto")
        .raw_disk(MIB)
        .rbd_disk(MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-STO")));
    vm.write_pattern("vda", 0x5A, 256 * 1024, 256 * 1024);
    vm.write_pattern("vdb", 0x5B, 0, 256 * 1024);
    let b = node.backup(&vm.name, &[]);
    let id = b["id"].as_str().expect("id");
    let writes = [
        ("vda", 0xA3u8, 4096u64, 8192u64),
        ("vdb", 0xB3, 512 * 1024, 65536),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb"].iter().map(|t| vm.disk_checksum(t)).collect();
    let pool2 = second_rbd_pool();
    let dir = lab().pool_dir.join(unique_name("vlsto-dir"));
    for storage in [format!("file:{}", dir.display()), format!("rbd:{pool2}")] {
        let new_name = unique_name("vlsto-new");
        let in_dir = |t: &str| format!("{}/{new_name}-{t}.img", dir.display());
        let beside = |t: &str| format!("{}/{new_name}-{t}.img", lab().pool_dir.display());
        let image = format!("{pool2}/{new_name}-vdb");
        let expected = if storage.starts_with("file:") {
            [in_dir("vda"), in_dir("vdb")]
        } else {
            [beside("vda"), format!("rbd:{image}")]
        };
        let restored = TestVm::adopt(&new_name);
        let (child, reader) = live_restore_held_with(
            &node,
            (HOST, id, &new_name),
            "live-restore-running",
            &[],
            &["--storage", &storage],
        );
        let running = TestVm::adopt(&new_name);
        for (t, p, off, len) in writes {
            running.write_pattern(t, p, off, len);
        }
        let (code, r, err) = release(child, reader);
        assert_eq!(code, Some(0), "{storage}: {r:#}\n{err}");
        let paths: Vec<&str> = r["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .map(|d| d["path"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(paths, expected, "{storage}: {r:#}");
        let xml = lab().virsh(&["dumpxml", "--inactive", "--domain", &new_name]);
        restored.stop();
        let got = if storage.starts_with("file:") {
            [
                virtkeep_lab::file_checksum(Path::new(&expected[0]), "raw"),
                virtkeep_lab::file_checksum(Path::new(&expected[1]), "raw"),
            ]
        } else {
            [
                virtkeep_lab::file_checksum(Path::new(&expected[0]), "raw"),
                virtkeep_lab::rbd_checksum(&image),
            ]
        };
        let original_pool = lab().rbd(&["ls", &lab().ceph_pool]);
        let left_beside = in_pool(&new_name);
        let jobs = live_job_dirs();
        drop(running);
        drop(restored);
        let _ = lab().try_rbd(&["rm", &image]);
        assert_eq!(
            got.as_slice(),
            want.as_slice(),
            "{storage}: backup + writes"
        );
        let named = [
            format!("'{}'", expected[0]),
            if storage.starts_with("file:") {
                format!("'{}'", expected[1])
            } else {
                format!("name='{image}'")
            },
        ];
        for n in &named {
            assert!(xml.contains(n.as_str()), "{storage}: {n} not in\n{xml}");
        }
        let want_beside: Vec<String> = if storage.starts_with("file:") {
            Vec::new()
        } else {
            vec![format!("{new_name}-vda.img")]
        };
        assert_eq!(left_beside, want_beside, "{storage}: in the pool directory");
        assert!(
            !original_pool.lines().any(|l| l.contains(&new_name)),
            "{storage}: an image in the original pool: {original_pool}"
        );
        assert!(jobs.is_empty(), "{storage}: job directories left: {jobs:?}");
    }
    let left: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
}

/// A TCP relay to the lab's sshd that the test owns: a host added through it loses its
/// connections, for good, when the relay is killed (the shared sshd is not touched).
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn to_lab_sshd() -> Relay {
        let target = format!("{}:{}", lab().ssh_host, lab().ssh_port);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => relay_one(client, &target, &c),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Relay {
            port,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// Closes the listener (nothing reaches the sshd through it any more) and every
    /// relayed connection.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pipes `client` to a new connection to `target`, both ways, each in a thread.
fn relay_one(client: TcpStream, target: &str, conns: &Mutex<Vec<TcpStream>>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let pairs = [(&client, &server), (&server, &client)];
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    let mut c = conns.lock().expect("conns");
    c.push(client);
    c.push(server);
}

/// Adds host `name` to the node: the lab host reached through `port` (its host key
/// pinned for that port).
fn add_host_via(node: &Node, name: &str, port: u16) {
    let lab = lab();
    let known = std::fs::read_to_string(&lab.known_hosts).expect("known_hosts");
    let from = format!("[{}]:{} ", lab.ssh_host, lab.ssh_port);
    let to = format!("[{}]:{port} ", lab.ssh_host);
    let path = node.dir.path().join("relay_known_hosts");
    std::fs::write(&path, known.replace(&from, &to)).expect("write known_hosts");
    let ssh = format!("{}@{}:{port}", lab.ssh_user, lab.ssh_host);
    node.ok(&[
        "host",
        "add",
        name,
        "--ssh",
        &ssh,
        "--identity",
        &lab.ssh_key.display().to_string(),
        "--known-hosts",
        &path.display().to_string(),
    ]);
}

/// The job directory an error message names (`/run/virtkeep/jobs/live-…`).
fn job_dir_in(text: &str) -> Option<String> {
    let at = text.find("/run/virtkeep/jobs/live-")?;
    let name: String = text[at + "/run/virtkeep/jobs/".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some(name)
}

/// The SSH link of `restore --live` lost during the copy for good: held at
/// `live-restore-copying` (block jobs throttled, mid-copy), its only way to the host (a
/// relay this test owns) is killed, and reconnecting is refused for the whole window
/// (`VIRTKEEP_LIVE_RECONNECT_SECS=3`). The command exits 4 with `--json` error kind
/// `unfinished`, naming the domain, its state and its job directory; the domain stays
/// (paused or running, never destroyed), with its disks, overlay and job directory; a
/// `cleanup` reports it as left as is and changes nothing. The test then removes it.
#[test]
fn live_restore_left_as_is_when_the_link_never_comes_back() {
    let node = Node::new();
    let mut relay = Relay::to_lab_sshd();
    add_host_via(&node, "relayed", relay.port);
    let vm = TestVm::builder("vgone")
        .raw_disk(2 * MIB)
        .qcow2_disk(2 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &reader_sector());
    vm.write_pattern("vdb", 0x5B, 64 * 1024, MIB);
    let b = node.backup(&vm.name, &[]);
    let new_name = unique_name("vgone-new");
    let restored = TestVm::adopt(&new_name);
    let (child, reader) = live_restore_held_with(
        &node,
        ("relayed", b["id"].as_str().expect("id"), &new_name),
        "live-restore-copying",
        &[
            ("VIRTKEEP_LIVE_COPY_BYTES_PER_SEC", "4096"),
            ("VIRTKEEP_LIVE_RECONNECT_SECS", "3"),
        ],
        &[],
    );
    relay.kill();
    let (code, r, err) = release(child, reader);
    let state = lab().try_virsh(&["domstate", "--reason", "--domain", &new_name]);
    let files = in_pool(&new_name);
    let e = &r["error"];
    let message = e["message"].as_str().unwrap_or_default().to_string();
    let job = job_dir_in(&message);
    let jobs_before = live_job_dirs();
    let c = node.json(&["cleanup", HOST]);
    let report = c["vms"].as_array().and_then(|vms| {
        vms.iter()
            .find(|v| {
                Some(v["vm"].as_str().unwrap_or(""))
                    == job
                        .as_deref()
                        .map(|j| format!("live restore job {j}"))
                        .as_deref()
            })
            .map(|v| v["actions"].to_string())
    });
    let state_after = lab().try_virsh(&["domstate", "--domain", &new_name]);
    let files_after = in_pool(&new_name);
    // The clean end, before asserting: the domain, its disks and overlay, the job.
    drop(restored);
    for f in in_pool(&new_name) {
        let _ = std::fs::remove_file(lab().pool_dir.join(f));
    }
    if let Some(j) = &job {
        let _ = std::fs::remove_dir_all(Path::new("/run/virtkeep/jobs").join(j));
    }
    // In the test's output: what the user sees.
    eprintln!("restore --live: {r:#}\nguest: {state:?}\ncleanup: {report:?}");
    assert_eq!(code, Some(4), "{r:#}\n{err}");
    assert_eq!(e["kind"], "unfinished", "{r:#}");
    assert_eq!(e["exit_code"], 4, "{r:#}");
    for needle in [new_name.as_str(), "not rolled back", "running or paused"] {
        assert!(message.contains(needle), "{needle} not in {message}");
    }
    let hint = e["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("cleanup"), "{hint}");
    let state = state.unwrap_or_else(|e| panic!("{new_name} was removed: {e}\n{err}"));
    assert!(
        state.starts_with("paused") || state.starts_with("running"),
        "{state}"
    );
    let want_files = [
        format!(".{new_name}-vda.img.vkrestore-"),
        format!(".{new_name}-vdb.qcow2.vkrestore-"),
        format!("{new_name}-vda.img"),
        format!("{new_name}-vdb.qcow2"),
    ];
    assert_eq!(files.len(), 4, "{files:?}");
    for (f, w) in files.iter().zip(&want_files) {
        assert!(f.starts_with(w.as_str()), "{f} is not {w}: {files:?}");
    }
    let job = job.unwrap_or_else(|| panic!("no job directory in {message}"));
    assert!(jobs_before.contains(&job), "{job} not in {jobs_before:?}");
    assert!(hint.contains(&job), "{hint}");
    let resume = format!("virtkeep restore --resume {job} --to relayed");
    assert!(hint.contains(&resume), "{resume} not in {hint}");
    let report = report.unwrap_or_else(|| panic!("cleanup did not report {job}: {c:#}"));
    assert!(
        report.contains("left as is") && report.contains(&new_name),
        "{report}"
    );
    assert!(state_after.is_ok(), "cleanup removed {new_name}: {c:#}");
    assert_eq!(files_after, files, "cleanup changed the disks: {c:#}");
    assert!(in_pool(&new_name).is_empty());
    assert!(!live_job_dirs().contains(&job));
}

/// A live restore into a directory that cannot hold the backup's data (12 MiB into
/// 8 MiB) is refused like a restore, before anything is made: the error says what is
/// needed and what is free, nothing is written there, no domain is defined, and no job
/// directory is left.
#[test]
fn live_restore_without_room_is_refused_before_anything_is_made() {
    let node = Node::new();
    let vm = TestVm::builder("vlroom")
        .raw_disk(32 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-ROOM")));
    vm.write_pattern("vda", 0x61, MIB, 12 * MIB);
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mnt = SmallMount::new(&node, 8);
    let storage = format!("file:{}", mnt.0.display());
    let before = live_job_dirs();
    let name = unique_name("vlroom-new");
    let guard = TestVm::adopt(&name);
    let out = node.run(&[
        "restore",
        &id,
        "--to",
        HOST,
        "--live",
        "--name",
        &name,
        "--storage",
        &storage,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "live restore into a full directory ran"
    );
    assert!(stderr.contains("not enough free space"), "{stderr}");
    assert!(stderr.contains("MiB needed"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(&mnt.0).expect("ls").collect();
    assert!(written.is_empty(), "written: {written:?}");
    assert!(lab().try_virsh(&["domuuid", "--domain", &name]).is_err());
    assert_eq!(live_job_dirs(), before, "a job directory was left");
    drop(guard);
}

/// `restore --resume JOB`, run with `--json`: its exit code and what it printed.
fn resume(node: &Node, job: &str) -> (Option<i32>, Value, String) {
    let out = node.run(&["--json", "restore", "--resume", job, "--to", HOST]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}\n{err}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), json, err)
}

/// The node SIGKILLed while `restore --live` copies (held at `live-restore-copying`:
/// its block jobs run, started at 4 KiB/s; QEMU's first burst copies these small disks
/// but the jobs wait to be pivoted), after the guest (which reads its disk in a loop)
/// wrote into its overlays: the guest pauses on an I/O error at its next read. While
/// the node still held the job, `restore --resume JOB` was refused; a job that does not
/// exist is refused too. One disk (vdb) had pivoted before the kill (the test pivots its
/// ready mirror). Then `restore --resume JOB` serves the backup again, resumes the
/// guest, skips vdb (its overlay removed), follows the job the killed run left on vda
/// and pivots it: the result is that of `restore --live` (`resumed`), the domain runs,
/// its disks (a raw and a qcow2 file, and an RBD image whose overlay was in the job
/// directory) equal the backup plus the guest's writes, its XML names only them, and no
/// job directory, socket or overlay is left.
#[test]
fn live_restore_resumed_after_its_node_was_killed_mid_copy() {
    let (_, err) = killed_then_resumed("vresume", "live-restore-copying", Some("vdb"));
    assert!(err.contains("its block job still runs"), "{err}");
    assert!(err.contains("pivoted before the node died"), "{err}");
}

/// As above, the node killed once the domain runs but before any block job started
/// (held at `live-restore-running`): the resume starts the copies, which read the
/// backup over the new connection (`served_bytes`), with the same end state.
#[test]
fn live_restore_resumed_after_its_node_was_killed_before_the_copy() {
    let (r, err) = killed_then_resumed("vresume0", "live-restore-running", None);
    assert!(r["served_bytes"].as_u64() > Some(0), "{r:#}\n{err}");
}

/// A live restore held at `failpoint` and SIGKILLed there (after the disk `pivoted`
/// pivoted), then resumed (see the tests above; both assert all of it): the resume's
/// result and stderr.
fn killed_then_resumed(tag: &str, failpoint: &str, pivoted: Option<&str>) -> (Value, String) {
    let node = Node::new();
    let vm = TestVm::builder(tag)
        .raw_disk(2 * MIB)
        .qcow2_disk(2 * MIB)
        .rbd_disk(MIB)
        .running(false)
        .build();
    write_sector(&vm, &reader_sector());
    vm.write_pattern("vda", 0x5A, 256 * 1024, 512 * 1024);
    vm.write_pattern("vdb", 0x5B, 64 * 1024, MIB);
    vm.write_pattern("vdc", 0x5C, 0, 256 * 1024);
    let b = node.backup(&vm.name, &[]);
    let writes = [
        ("vda", 0xA3u8, MIB, 64 * 1024),
        ("vdb", 0xB3, MIB + 4096, 8192),
        ("vdc", 0xC3, 512 * 1024, 8192),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb", "vdc"]
        .iter()
        .map(|t| vm.disk_checksum(t))
        .collect();
    let new_name = unique_name(&format!("{tag}-new"));
    // The RBD disk goes to an image of the new name in the same pool (its overlay is
    // in the job directory).
    let image = format!("{}/{new_name}-vdc", lab().ceph_pool);
    let restored = TestVm::adopt(&new_name);
    let jobs_before = live_job_dirs();
    let (mut child, reader) = live_restore_held_with(
        &node,
        (HOST, b["id"].as_str().expect("id"), &new_name),
        failpoint,
        &[("VIRTKEEP_LIVE_COPY_BYTES_PER_SEC", "4096")],
        &[],
    );
    let running = TestVm::adopt(&new_name);
    for (t, p, off, len) in writes {
        running.write_pattern(t, p, off, len);
    }
    let job: Vec<String> = live_job_dirs()
        .into_iter()
        .filter(|j| !jobs_before.contains(j))
        .collect();
    assert_eq!(job.len(), 1, "{job:?}");
    let job = job[0].clone();
    let held = resume(&node, &job);
    if let Some(t) = pivoted {
        pivot_when_ready(&new_name, t);
    }
    child.kill().expect("SIGKILL the node");
    let _ = child.wait();
    let _ = reader.join();
    let unknown = resume(&node, "live-000000000000");
    // Paused on an I/O error once it read, or still running: either is resumed.
    let before = lab().try_virsh(&["domstate", "--reason", "--domain", &new_name]);
    let (code, r, err) = resume(&node, &job);
    let state = lab().try_virsh(&["domstate", "--reason", "--domain", &new_name]);
    let xmls: Vec<String> = [&["dumpxml"][..], &["dumpxml", "--inactive"]]
        .iter()
        .map(|a| {
            let mut args = a.to_vec();
            args.extend(["--domain", new_name.as_str()]);
            lab().try_virsh(&args).unwrap_or_default()
        })
        .collect();
    restored.stop();
    let files = in_pool(&new_name);
    let job_left = Path::new("/run/virtkeep/jobs").join(&job).exists();
    let rbd_got = lab()
        .try_rbd(&["info", &image])
        .map(|_| virtkeep_lab::rbd_checksum(&image));
    let _ = lab().try_rbd(&["rm", &image]);
    eprintln!(
        "held: {:#}\nunknown: {:#}\nbefore the resume: {before:?}\nresume: {r:#}\n{err}",
        held.1, unknown.1
    );
    assert_eq!(held.0, Some(1), "{:#}", held.1);
    assert_eq!(held.1["error"]["kind"], "conflict", "{:#}", held.1);
    assert!(
        held.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("still running") && m.contains(&job)),
        "{:#}",
        held.1
    );
    assert_eq!(unknown.0, Some(1), "{:#}", unknown.1);
    assert!(
        unknown.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no live restore job live-000000000000")),
        "{:#}",
        unknown.1
    );
    assert_eq!(code, Some(0), "{r:#}\n{err}");
    assert_eq!(r["resumed"], true, "{r:#}");
    assert_eq!(r["vm"], new_name.as_str(), "{r:#}");
    assert_eq!(r["snapshot"], b["id"], "{r:#}");
    assert_eq!(r["disks"].as_array().map(Vec::len), Some(3), "{r:#}");
    assert_eq!(
        state.as_deref().map(str::trim),
        Ok("running (unpaused)"),
        "{err}"
    );
    assert_pool_disks(&new_name, &[("vda", "raw"), ("vdb", "qcow2")], &want[..2]);
    assert_eq!(rbd_got.as_ref(), Ok(&want[2]), "{image}: backup + writes");
    for xml in &xmls {
        assert!(
            xml.contains(&format!("{new_name}-vda.img"))
                && xml.contains(&format!("{new_name}-vdb.qcow2"))
                && xml.contains(&format!("name='{image}'")),
            "{xml}"
        );
        assert!(
            !xml.contains("nbd") && !xml.contains("/run/virtkeep") && !xml.contains(".vkrestore-"),
            "the domain still refers to the node or an overlay:\n{xml}"
        );
    }
    assert_eq!(
        files,
        [
            format!("{new_name}-vda.img"),
            format!("{new_name}-vdb.qcow2")
        ],
        "overlays left"
    );
    assert!(!job_left, "{job} left");
    drop(running);
    drop(restored);
    (r, err)
}

/// Lifts the speed limit of the block copy on `target` of `vm`, waits until its mirror
/// is ready and pivots it (what the killed run would have done next).
fn pivot_when_ready(vm: &str, target: &str) {
    let job = ["blockjob", "--domain", vm, "--path", target];
    lab().virsh(&[&job[..], &["--bandwidth", "0", "--bytes"]].concat());
    let dev = format!("dev='{target}'");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let xml = lab().virsh(&["dumpxml", "--domain", vm]);
        let ready = xml
            .split("<disk ")
            .find(|d| d.contains(&dev))
            .is_some_and(|d| d.contains("ready='yes'"));
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy of {target} never got ready:\n{xml}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab().virsh(&[&job[..], &["--pivot"]].concat());
}
