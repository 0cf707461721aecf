//! `restore --live --detach`: the live restore as a daemon job (kind `live_restore`);
//! the command returns once the domain runs, the daemon follows the copy.

use std::time::{Duration, Instant};

use serde_json::Value;
use virtkeep_lab::{TestVm, lab, unique_name};

use crate::daemon::{
    Daemon, TOKEN, append_config, catalog, failpoint_reached, http, jobs, json_of, wait_jobs,
};
use crate::harness::{HOST, Node};
use crate::live::{assert_pool_disks, live_job_dirs, marker_sector, write_sector};
use crate::live_restore::in_pool;

const MIB: u64 = 1 << 20;

/// A `[daemon]` section with its catalog (and `extra` lines).
fn daemon_config(node: &Node, extra: &str) {
    let text = format!("\n[daemon]\ncatalog = \"{}\"\n{extra}\n", catalog(node));
    append_config(node, &text);
}

/// The daemon's catalog and an API on a free port (returned).
fn daemon_config_with_api(node: &Node) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    daemon_config(node, "");
    let api = format!(
        "\n[daemon.api]\nlisten = \"127.0.0.1:{port}\"\ntoken_env = \"VKD_TEST_TOKEN\"\nscope = \"admin\"\n"
    );
    append_config(node, &api);
    port
}

/// A live restore detached into a daemon whose copy is held at its failpoint.
struct Detached {
    daemon: Daemon,
    name: String,
    /// Destroys and undefines the new domain at the end.
    restored: TestVm,
    job: i64,
    /// What `restore --detach --json` printed.
    answer: Value,
}

/// Starts the daemon (configured already) held at `live-restore-copying`, its copy
/// throttled, and detaches `restore --live` of backup `id` into it as a new domain
/// named after `tag`; returns once the command returned and the copy is held.
fn detach_held(node: &Node, id: &str, tag: &str) -> Detached {
    let mut daemon = Daemon::start_held(
        node,
        "live-restore-copying",
        &[("VIRTKEEP_LIVE_COPY_BYTES_PER_SEC", "4096")],
    );
    let name = unique_name(tag);
    let restored = TestVm::adopt(&name);
    let answer = node.json(&[
        "restore", id, "--to", HOST, "--live", "--name", &name, "--detach",
    ]);
    let job = answer["job"].as_i64().expect("job id");
    daemon.wait_log(&failpoint_reached("live-restore-copying"), 120);
    Detached {
        daemon,
        name,
        restored,
        job,
        answer,
    }
}

fn job(node: &Node, id: i64) -> Value {
    jobs(node)
        .into_iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("no job {id} in `virtkeep jobs`"))
}

/// The domain's XML (live or `--inactive`).
fn dumpxml(name: &str, inactive: bool) -> String {
    let mut args = vec!["dumpxml", "--domain", name];
    if inactive {
        args.push("--inactive");
    }
    lab().virsh(&args)
}

/// A daemon runs; `restore --live --detach` queues the job and returns while the
/// daemon's copy is held at `live-restore-copying` (block jobs started at 4 KiB/s):
/// the job runs, the guest runs on its overlays over the NBD export and takes writes.
/// Released, the daemon finishes the copy: the job succeeded, the disks (a raw and a
/// qcow2 file) equal the backup plus the guest's writes, the domain names only its
/// final disks, and no job directory is left.
#[test]
fn detached_live_restore_returns_while_the_daemon_copies() {
    let node = Node::new();
    let vm = TestVm::builder("vdet")
        .raw_disk(MIB)
        .qcow2_disk(2 * MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-DET")));
    vm.write_pattern("vdb", 0x5B, 64 * 1024, 512 * 1024);
    let b = node.backup(&vm.name, &[]);
    let writes = [
        ("vda", 0xA3u8, 512 * 1024, 64 * 1024),
        ("vdb", 0xB3, MIB, 64 * 1024),
    ];
    for (t, p, off, len) in writes {
        vm.write_pattern(t, p, off, len);
    }
    let want: Vec<String> = ["vda", "vdb"].iter().map(|t| vm.disk_checksum(t)).collect();
    let port = daemon_config_with_api(&node);
    let id = b["id"].as_str().expect("id");
    let Detached {
        mut daemon,
        name: new_name,
        restored,
        job: job_id,
        answer: r,
    } = detach_held(&node, id, "vdet-new");
    assert_eq!(r["status"], "running", "{r:#}");
    assert_eq!(r["vm"], new_name.as_str(), "{r:#}");
    assert!(
        r["time_to_running_secs"].as_f64().is_some_and(|s| s > 0.0),
        "{r:#}"
    );
    // Returned, and the copy is still held: the guest runs on the overlays.
    let j = job(&node, job_id);
    assert_eq!(
        (&j["status"], &j["kind"]),
        (&"running".into(), &"live_restore".into()),
        "{j:#}"
    );
    assert!(restored.is_running(), "the domain does not run");
    let xml = dumpxml(&new_name, false);
    assert!(
        xml.contains(".vkrestore-") && xml.contains("nbd"),
        "not on overlays over the export:\n{xml}"
    );
    assert!(
        !live_job_dirs().is_empty(),
        "no job directory while the copy is held"
    );
    let path = format!("/api/jobs/{job_id}");
    let (status, body) = http(port, "GET", &path, Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    let view = json_of(&body);
    assert_eq!(view["kind"], "live_restore", "{view:#}");
    assert_eq!(view["progress"]["phase"], "copying", "{view:#}");
    // The API queues the same job kind; a live restore needs a new name.
    let body = serde_json::json!({"kind": "restore", "host": HOST, "snapshot": id, "live": true});
    let (status, text) = http(port, "POST", "/api/jobs", Some(TOKEN), Some(&body));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("a live restore needs"), "{text}");
    let (_, doc) = http(port, "GET", "/api/openapi.json", None, None);
    assert!(doc.contains("\"live\""), "no live in the OpenAPI document");
    let running = TestVm::adopt(&new_name);
    for (t, p, off, len) in writes {
        running.write_pattern(t, p, off, len);
    }
    daemon.release();
    let done = |l: &[Value]| {
        l.iter()
            .any(|j| j["id"] == job_id && j["status"] != "running")
    };
    wait_jobs(&node, &daemon, 120, "the live restore job's end", done);
    let j = job(&node, job_id);
    assert_eq!(j["status"], "succeeded", "{j:#}\n{}", daemon.log_text());
    let note = j["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("running after ") && note.contains("copied after"),
        "{j:#}"
    );
    // The copy's bytes reached the job's progress (from the block jobs).
    let log = daemon.log_text();
    assert!(log.contains("disk transfer starts"), "{log}");
    restored.stop();
    assert_pool_disks(&new_name, &[("vda", "raw"), ("vdb", "qcow2")], &want);
    for inactive in [false, true] {
        let xml = dumpxml(&new_name, inactive);
        assert!(
            !xml.contains("nbd") && !xml.contains("/run/virtkeep") && !xml.contains(".vkrestore-"),
            "the domain still refers to the node or an overlay:\n{xml}"
        );
    }
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    daemon.terminate();
    drop(running);
}

/// No daemon takes the job: `restore --live --detach` waits the bounded time
/// (`VIRTKEEP_DETACH_CLAIM_SECS`), cancels the queued job and fails with a hint to
/// start `virtkeep daemon`; nothing was made on the host.
#[test]
fn detach_without_a_daemon_cancels_the_job_and_says_so() {
    let node = Node::new();
    let vm = TestVm::builder("vdetno")
        .raw_disk(MIB)
        .running(false)
        .build();
    let b = node.backup(&vm.name, &[]);
    daemon_config(&node, "");
    // The daemon made the catalog once and is gone.
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("daemon starting", 60);
    daemon.terminate();
    let new_name = unique_name("vdetno-new");
    let started = Instant::now();
    let out = node
        .cmd()
        .env("VIRTKEEP_DETACH_CLAIM_SECS", "2")
        .args(["restore", b["id"].as_str().expect("id"), "--to", HOST])
        .args(["--live", "--name", &new_name, "--detach"])
        .output()
        .expect("run virtkeep");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "not bounded");
    assert!(
        err.contains("no daemon took the job") && err.contains("virtkeep daemon"),
        "{err}"
    );
    let list = jobs(&node);
    let j = list
        .iter()
        .find(|j| j["vm"] == new_name.as_str())
        .expect("the job");
    assert_eq!(
        (&j["status"], &j["kind"]),
        (&"cancelled".into(), &"live_restore".into()),
        "{j:#}"
    );
    let domains = lab().virsh(&["list", "--all", "--name"]);
    assert!(!domains.contains(&new_name), "{domains}");
}

/// The daemon stops (`shutdown = "abort"`) while its live restore copies, after the
/// domain ran: the job ends failed as `unfinished`, the domain is left as it is (not
/// rolled back: the guest's writes are only in its overlays) with its job directory,
/// and `cleanup` reports it as left as is. The test then removes it.
#[test]
fn daemon_stopping_after_the_domain_ran_leaves_it_as_is() {
    let node = Node::new();
    let vm = TestVm::builder("vdetstop")
        .raw_disk(MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-DETS")));
    let b = node.backup(&vm.name, &[]);
    daemon_config(&node, "shutdown = \"abort\"");
    let id = b["id"].as_str().expect("id");
    let Detached {
        mut daemon,
        name: new_name,
        restored,
        job: job_id,
        ..
    } = detach_held(&node, id, "vdetstop-new");
    let dirs = live_job_dirs();
    daemon.signal("TERM");
    daemon.wait_log("job failed", 60);
    // The held failpoint's read of stdin ends: the daemon's runtime may stop.
    daemon.release();
    daemon.terminate();
    let j = job(&node, job_id);
    let state = lab().try_virsh(&["domstate", "--reason", "--domain", &new_name]);
    let c = node.json(&["cleanup", HOST]);
    let report = c["vms"].as_array().and_then(|vms| {
        vms.iter()
            .find(|v| {
                dirs.iter()
                    .any(|d| v["vm"] == format!("live restore job {d}"))
            })
            .map(|v| v["actions"].to_string())
    });
    let dirs_after = live_job_dirs();
    // The clean end, before asserting: the domain, its disks and overlay, the job.
    drop(restored);
    for f in in_pool(&new_name) {
        let _ = std::fs::remove_file(lab().pool_dir.join(f));
    }
    for d in &dirs {
        let _ = std::fs::remove_dir_all(std::path::Path::new("/run/virtkeep/jobs").join(d));
    }
    eprintln!("job: {j:#}\nguest: {state:?}\ncleanup: {report:?}");
    assert_eq!(j["status"], "failed", "{j:#}");
    let error = j["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("unfinished: stopped by the daemon's shutdown after"),
        "{error}"
    );
    assert!(
        error.contains("not rolled back") && error.contains("cleanup"),
        "{error}"
    );
    let state = state.unwrap_or_else(|e| panic!("{new_name} was removed: {e}"));
    assert!(
        state.starts_with("running") || state.starts_with("paused"),
        "{state}"
    );
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_eq!(dirs_after, dirs, "cleanup removed the job directory");
    let report = report.unwrap_or_else(|| panic!("cleanup did not report {dirs:?}: {c:#}"));
    assert!(report.contains("left as is"), "{report}");
}

/// A running live restore cancelled through the API (`DELETE /api/jobs/ID`, 202) is
/// rolled back as Ctrl-C rolls back `restore --live`: the job ends `cancelled`, the
/// new domain is destroyed and undefined, its disks and overlays are removed, and no
/// job directory is left; the source VM is untouched.
#[test]
fn cancelling_a_running_live_restore_rolls_it_back() {
    let node = Node::new();
    let vm = TestVm::builder("vdetcan")
        .raw_disk(MIB)
        .running(false)
        .build();
    write_sector(&vm, &marker_sector(&unique_name("VK-DETC")));
    let source = vm.disk_checksum("vda");
    let b = node.backup(&vm.name, &[]);
    let port = daemon_config_with_api(&node);
    let id = b["id"].as_str().expect("id");
    let Detached {
        mut daemon,
        name: new_name,
        restored,
        job: job_id,
        ..
    } = detach_held(&node, id, "vdetcan-new");
    assert!(restored.is_running(), "the domain does not run");
    assert!(
        !in_pool(&new_name).is_empty(),
        "no destination while copying"
    );
    let path = format!("/api/jobs/{job_id}");
    let (status, body) = http(port, "DELETE", &path, Some(TOKEN), None);
    assert_eq!(status, 202, "{body}");
    let done = |l: &[Value]| {
        l.iter()
            .any(|j| j["id"] == job_id && j["status"] != "running")
    };
    wait_jobs(&node, &daemon, 120, "the cancelled job's end", done);
    daemon.release();
    let j = job(&node, job_id);
    assert_eq!(j["status"], "cancelled", "{j:#}\n{}", daemon.log_text());
    assert!(
        lab()
            .try_virsh(&["domuuid", "--domain", &new_name])
            .is_err(),
        "{new_name} is still defined"
    );
    assert_eq!(in_pool(&new_name), Vec::<String>::new(), "disks left");
    assert!(live_job_dirs().is_empty(), "left: {:?}", live_job_dirs());
    assert_eq!(
        vm.disk_checksum("vda"),
        source,
        "the source VM's disk changed"
    );
    daemon.terminate();
    drop(restored);
}
