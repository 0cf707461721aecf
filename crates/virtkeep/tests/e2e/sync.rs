//! `virtkeep sync` between repositories: only the chunks the destination lacks are sent,
//! a copy restores byte-exact, a killed sync publishes nothing and the next one does not
//! send again what arrived, and a GC on the destination during a sync loses nothing.
//! Local ↔ Ceph RGW both ways.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

/// A node command with the lab's S3 credentials (harmless for local repositories).
fn cmd(node: &Node) -> assert_cmd::Command {
    let lab = node.lab;
    let mut c = node.cmd();
    c.env("AWS_ENDPOINT_URL", &lab.s3_endpoint)
        .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
        .env("AWS_REGION", &lab.s3_region);
    c
}

fn json(node: &Node, args: &[&str]) -> Value {
    let out = cmd(node).arg("--json").args(args).output().expect("run");
    assert!(
        out.status.success(),
        "virtkeep {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The node's own repository key file (made by `repo init` in keys/).
fn node_key(node: &Node) -> PathBuf {
    let keys: Vec<PathBuf> = std::fs::read_dir(node.dir.path().join("keys"))
        .expect("keys dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

fn s3_location(node: &Node, tag: &str) -> String {
    format!("s3://{}/{}", node.lab.s3_bucket, unique_name(tag))
}

/// The backend of a location, for counting objects.
fn backend(node: &Node, location: &str) -> std::sync::Arc<dyn virtkeep_repo::ChunkBackend> {
    let lab = node.lab;
    virtkeep_repo::Location::parse(location)
        .expect("location")
        .with_s3_options(virtkeep_repo::S3Options {
            endpoint: Some(lab.s3_endpoint.clone()),
            region: Some(lab.s3_region.clone()),
            access_key: Some(lab.s3_access_key.clone()),
            secret_key: Some(lab.s3_secret_key.clone()),
            allow_http: true,
            instance_metadata: false,
        })
        .backend()
        .expect("backend")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn count(node: &Node, location: &str, prefix: &str) -> usize {
    use futures::TryStreamExt;
    let be = backend(node, location);
    runtime().block_on(async {
        let v: Vec<virtkeep_repo::ObjectInfo> = be.list(prefix).try_collect().await.expect("list");
        v.len()
    })
}

fn manifests(node: &Node, location: &str) -> usize {
    let be = backend(node, location);
    use futures::TryStreamExt;
    runtime().block_on(async {
        let v: Vec<virtkeep_repo::ObjectInfo> =
            be.list("snapshots/").try_collect().await.expect("list");
        v.iter().filter(|o| o.key.ends_with("/manifest")).count()
    })
}

fn sync(node: &Node, from: &str, to: &str, extra: &[&str]) -> Value {
    let mut args = vec!["sync", "--from", from, "--to", to];
    args.extend_from_slice(extra);
    json(node, &args)
}

/// Restores `id` from `repo` (with `key`) under a fresh name and returns the checksum
/// of every restored disk by target.
fn restore_from(node: &Node, repo: &str, key: &Path, id: &str) -> Vec<(String, String)> {
    let name = unique_name("synced");
    let restored = TestVm::adopt(&name);
    let key = key.display().to_string();
    let out = json(
        node,
        &[
            "restore",
            id,
            "--to",
            HOST,
            "--name",
            &name,
            "--define",
            "--repo",
            repo,
            "--key-file",
            &key,
        ],
    );
    let sums = out["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| {
            let sum = restored_checksum(
                d["path"].as_str().expect("path"),
                d["format"].as_str().expect("format"),
            );
            (d["target"].as_str().expect("target").to_string(), sum)
        })
        .collect();
    drop(restored);
    sums
}

fn chunks_new(backup: &Value) -> u64 {
    backup["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["chunks_new"].as_u64().expect("chunks_new"))
        .sum()
}

/// Local → RGW with shared keys (chunks copied as stored), then RGW → local with other
/// keys (re-encoded): the second sync sends only the new backup's chunks, both copies
/// restore byte-exact, and a sync with nothing new sends nothing.
#[test]
fn sync_sends_only_missing_chunks_local_to_rgw_and_back() {
    let node = Node::new();
    let vm = TestVm::builder("sync")
        .qcow2_disk(16 * MIB)
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x31, 0, 6 * MIB);
    vm.write_pattern("vdb", 0x32, MIB, 2 * MIB);
    let a = node.backup(&vm.name, &[]);
    let local = node.repo().display().to_string();
    let rgw = s3_location(&node, "sync");
    let rgw_key = node.dir.path().join("rgw.key");
    let rgw_key_s = rgw_key.display().to_string();
    json(
        &node,
        &[
            "repo",
            "init",
            &rgw,
            "--encryption",
            "none",
            "--key-file",
            &rgw_key_s,
            "--copy-keys-from",
            &local,
        ],
    );
    let to_rgw = ["--to-key-file", rgw_key_s.as_str()];
    let first = sync(&node, &local, &rgw, &to_rgw);
    assert_eq!(first["raw"], true, "{first}");
    assert_eq!(first["manifests_copied"], 1, "{first}");
    let sent_a = first["chunks_sent"].as_u64().expect("sent");
    assert_eq!(sent_a, chunks_new(&a), "{first}");
    assert_eq!(count(&node, &rgw, "chunks/") as u64, sent_a);

    // B changes 1 MiB of vda: the sync sends B's new chunks only.
    vm.write_pattern("vda", 0x33, 8 * MIB, MIB);
    let sums_b = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];
    let b = node.backup(&vm.name, &[]);
    let id_b = b["id"].as_str().expect("id").to_string();
    let second = sync(&node, &local, &rgw, &to_rgw);
    assert_eq!(second["manifests_copied"], 1, "{second}");
    assert_eq!(second["manifests_present"], 1, "{second}");
    let sent_b = second["chunks_sent"].as_u64().expect("sent");
    assert!(sent_b >= 1 && sent_b == chunks_new(&b), "{second} vs {b}");
    assert_eq!(count(&node, &rgw, "chunks/") as u64, sent_a + sent_b);
    assert_eq!(restore_from(&node, &rgw, &rgw_key, &id_b), sums_b);

    // RGW → a local repository with its own keys: chunks are re-encoded, and a second
    // run finds everything there.
    let back = node.dir.path().join("back").display().to_string();
    let back_key = node.dir.path().join("back.key");
    let back_key_s = back_key.display().to_string();
    json(
        &node,
        &[
            "repo",
            "init",
            &back,
            "--encryption",
            "none",
            "--key-file",
            &back_key_s,
        ],
    );
    let keys = [
        "--from-key-file",
        rgw_key_s.as_str(),
        "--to-key-file",
        back_key_s.as_str(),
    ];
    let third = sync(&node, &rgw, &back, &keys);
    assert_eq!(third["raw"], false, "{third}");
    assert_eq!(third["manifests_copied"], 2, "{third}");
    assert_eq!(
        third["chunks_sent"].as_u64(),
        Some(sent_a + sent_b),
        "{third}"
    );
    let again = sync(&node, &rgw, &back, &keys);
    assert_eq!(again["manifests_copied"], 0, "{again}");
    assert_eq!(again["manifests_present"], 2, "{again}");
    assert_eq!(again["chunks_sent"], 0, "{again}");
    assert_eq!(restore_from(&node, &back, &back_key, &id_b), sums_b);
}

/// Starts `virtkeep sync` with failpoint `name` on and returns once the node is there.
fn sync_until(node: &Node, args: &[&str], name: &str) -> Child {
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env("VIRTKEEP_LOG", "info")
        .env("VIRTKEEP_FAILPOINT", name)
        .arg("sync")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn virtkeep");
    let stderr = child.stderr.take().expect("stderr");
    let trigger = format!("virtkeep: failpoint {name} reached");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = Vec::new();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines.next().map(|l| l.unwrap_or_default());
        let Some(line) = line else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sync ended before {trigger:?}: {seen:?}");
        };
        if line.contains(&trigger) {
            // Keep draining stderr so the node never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
        seen.push(line);
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no {trigger:?}: {seen:?}");
        }
    }
}

/// A sync killed mid-copy publishes nothing and the next one sends only what had not
/// arrived; a GC on a destination (grace 0) while a sync is held there removes none of
/// its chunks, and the backup restores from both.
#[test]
fn killed_sync_resumes_and_gc_during_sync_loses_nothing() {
    let node = Node::new();
    let vm = TestVm::builder("synck")
        .qcow2_disk(40 * MIB)
        .running(false)
        .build();
    // More distinct chunks than a sync has in flight (2 × cores), so a kill at the
    // first one sent leaves some behind.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let n = (2 * cores + 2).min(10);
    for i in 0..n {
        vm.write_pattern("vda", 0x41 + i as u8, i * 4 * MIB, 4 * MIB);
    }
    let sums = vec![("vda".to_string(), vm.disk_checksum("vda"))];
    let a = node.backup(&vm.name, &[]);
    let id = a["id"].as_str().expect("id").to_string();
    let total = chunks_new(&a);
    let local = node.repo().display().to_string();

    // 1. killed at the first chunk sent, then resumed.
    let dest = node.dir.path().join("dest").display().to_string();
    let dest_key = node.dir.path().join("dest.key");
    let dest_key_s = dest_key.display().to_string();
    json(
        &node,
        &[
            "repo",
            "init",
            &dest,
            "--encryption",
            "none",
            "--key-file",
            &dest_key_s,
            "--copy-keys-from",
            &local,
        ],
    );
    let args = [
        "--from",
        &local,
        "--to",
        &dest,
        "--to-key-file",
        &dest_key_s,
    ];
    let mut child = sync_until(&node, &args, "sync-chunk-sent");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        manifests(&node, &dest),
        0,
        "a killed sync published a backup"
    );
    let arrived = count(&node, &dest, "chunks/") as u64;
    assert!(arrived >= 1 && arrived < total, "{arrived} of {total}");
    let resumed = sync(&node, &local, &dest, &["--to-key-file", &dest_key_s]);
    assert_eq!(resumed["manifests_copied"], 1, "{resumed}");
    assert_eq!(
        resumed["chunks_sent"].as_u64(),
        Some(total - arrived),
        "{resumed}"
    );
    assert_eq!(count(&node, &dest, "chunks/") as u64, total);
    assert_eq!(restore_from(&node, &dest, &dest_key, &id), sums);

    // 2. a destination whose GC grace is 0: a GC while the sync is held (chunks
    // uploaded, no manifest yet) would sweep them but for the sync's lease.
    let held = node.dir.path().join("held");
    let held_key = node.dir.path().join("held.key");
    runtime().block_on(async {
        let source = virtkeep_repo::Repository::open(
            virtkeep_repo::Location::parse(&local).expect("loc"),
            Some(virtkeep_repo::KeySource::KeyFile(node_key(&node))),
        )
        .await
        .expect("open source");
        virtkeep_repo::Repository::init_with_keys_of(
            virtkeep_repo::Location::parse(&held.display().to_string()).expect("loc"),
            virtkeep_repo::InitOptions {
                min_gc_grace: Duration::ZERO,
                auth_key_file: Some(held_key.clone()),
                ..Default::default()
            },
            &source,
        )
        .await
        .expect("init held");
    });
    let held_s = held.display().to_string();
    let held_key_s = held_key.display().to_string();
    let args = [
        "--from",
        &local,
        "--to",
        &held_s,
        "--to-key-file",
        &held_key_s,
    ];
    let mut child = sync_until(&node, &args, "sync-hold");
    let gc = json(
        &node,
        &[
            "gc",
            "--grace-hours",
            "0",
            "--repo",
            &held_s,
            "--key-file",
            &held_key_s,
        ],
    );
    assert_eq!(gc["live_leases"], 1, "{gc}");
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    assert!(gc["chunks_too_recent"].as_u64() >= Some(1), "{gc}");
    // Let the sync go on.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"\n").expect("release");
    drop(stdin);
    let status = child.wait().expect("wait");
    assert!(status.success(), "held sync failed");
    assert_eq!(manifests(&node, &held_s), 1);
    let verify = json(
        &node,
        &[
            "verify",
            "--read-data",
            "--repo",
            &held_s,
            "--key-file",
            &held_key_s,
        ],
    );
    assert_eq!(verify["snapshots_checked"], 1, "{verify}");
    assert_eq!(verify["chunks_ok"].as_u64(), Some(total), "{verify}");
    assert_eq!(restore_from(&node, &held_s, &held_key, &id), sums);
}

/// A `[sync.NAME]` job of the daemon copies the default repository's backups into a
/// named one at once (an interval schedule fires at start) and reports its last success
/// in `/metrics`.
#[test]
fn daemon_sync_job_copies_and_reports_last_success() {
    use crate::daemon::{Daemon, TOKEN, append_config, catalog, http};
    let node = Node::new();
    let vm = TestVm::builder("syncd")
        .qcow2_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x51, 0, 3 * MIB);
    let a = node.backup(&vm.name, &[]);
    let dest = node.dir.path().join("offsite").display().to_string();
    let dest_key = node.dir.path().join("offsite.key").display().to_string();
    json(
        &node,
        &[
            "repo",
            "init",
            &dest,
            "--encryption",
            "none",
            "--key-file",
            &dest_key,
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    append_config(
        &node,
        &format!(
            r#"
[repositories.offsite]
location = "{dest}"
key_file = "{dest_key}"

[daemon]
catalog = "{}"

[daemon.api]
listen = "127.0.0.1:{port}"
token_env = "VKD_TEST_TOKEN"

[sync.offsite]
source = "default"
destination = "offsite"
selection = ["{HOST}/{}"]
every = "1h"
"#,
            catalog(&node),
            vm.name
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    daemon.wait_log("sync finished", 120);
    let (status, metrics) = http(port, "GET", "/metrics", Some(TOKEN), None);
    assert_eq!(status, 200, "{metrics}");
    let last: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("virtkeep_sync_last_success_timestamp_seconds{sync=\"offsite\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sync series: {metrics}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs_f64();
    assert!(last > now - 300.0 && last <= now + 1.0, "{last} vs {now}");
    // The run is a job of kind "sync" in the catalog, as the API lists it.
    // (The log line comes just before the run's end is recorded.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (body, jobs) = loop {
        let (status, body) = http(port, "GET", "/api/jobs", Some(TOKEN), None);
        assert_eq!(status, 200, "{body}");
        let jobs: Value = serde_json::from_str(&body).expect("jobs");
        let open = jobs
            .as_array()
            .expect("list")
            .iter()
            .any(|j| j["status"] == "running");
        if !open || std::time::Instant::now() > deadline {
            break (body, jobs);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let syncs: Vec<&Value> = jobs
        .as_array()
        .expect("list")
        .iter()
        .filter(|j| j["kind"] == "sync")
        .collect();
    assert_eq!(syncs.len(), 1, "{body}");
    assert_eq!(
        (&syncs[0]["vm"], &syncs[0]["host"], &syncs[0]["status"]),
        (
            &Value::from("offsite"),
            &Value::from(""),
            &Value::from("succeeded")
        ),
        "{body}"
    );
    assert!(
        syncs[0]["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("1 backups copied")),
        "{body}"
    );
    daemon.terminate();
    let snaps = json(
        &node,
        &["snapshots", "--repo", &dest, "--key-file", &dest_key],
    );
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{snaps}");
    assert_eq!(snaps[0]["id"], a["id"]);
}

/// `repo init --copy-keys-from` refuses an encryption other than the source's (exit 2,
/// with the flag that fixes it), and `sync` refuses a repository into itself.
#[test]
fn copy_keys_needs_the_same_encryption_and_sync_needs_two_repositories() {
    let node = Node::new();
    let local = node.repo().display().to_string();
    let other = node.dir.path().join("other").display().to_string();
    let key = node.dir.path().join("other.key").display().to_string();
    let out = cmd(&node)
        .args(["--json", "repo", "init", &other, "--key-file", &key])
        .args(["--copy-keys-from", &local])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("--encryption none")),
        "{v}"
    );
    assert!(!Path::new(&other).join("config").exists());
    let out = cmd(&node)
        .args(["--json", "sync", "--from", &local, "--to", &local])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("same repository")),
        "{v}"
    );
}
