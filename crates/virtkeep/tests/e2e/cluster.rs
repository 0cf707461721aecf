//! Several daemons, one PostgreSQL catalog, one S3 repository on RGW: the shared queue
//! runs each job once and one job per VM at a time; a node SIGKILLed mid-job loses its
//! lease and another node heals the VM and retries; schedules fire once per period and
//! the lead moves when the leader dies.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use virtkeep_lab::{TestVm, unique_name, workspace_root};

use crate::daemon::{Daemon, TOKEN, append_config, failpoint_reached, http, json_of};
use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

/// A private PostgreSQL cluster from `lab/postgres.sh`, stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    url: String,
}

impl Postgres {
    fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("vkt-pg")
            .tempdir()
            .expect("tmp");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("lab/postgres.sh");
        assert!(
            out.status.success(),
            "lab/postgres.sh start (lab/install-deps.sh installs postgresql): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        Postgres { dir, url }
    }

    fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn script() -> PathBuf {
    workspace_root().join("lab/postgres.sh")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The cluster: one catalog, one S3 repository (its key file shared), and per node a
/// configuration naming both, its node name and its API port.
struct Cluster {
    pg: Postgres,
    location: String,
    key_file: PathBuf,
    /// Kept for its directory (the shared key file lives there).
    _keys: Node,
}

impl Cluster {
    fn new() -> Cluster {
        let pg = Postgres::start();
        let keys = Node::new();
        let location = format!("s3://{}/{}", keys.lab.s3_bucket, unique_name("cluster"));
        let key_file = keys.dir.path().join("shared.key");
        let mut c = keys.cmd();
        s3_env(&keys, &mut c);
        c.args(["repo", "init", &location, "--encryption", "none"])
            .arg("--key-file")
            .arg(&key_file)
            .assert()
            .success();
        Cluster {
            pg,
            location,
            key_file,
            _keys: keys,
        }
    }

    /// A node named `name`; `policy` is appended (the policy `p`, on the shared repository).
    fn node(&self, name: &str, policy: &str) -> (Node, u16) {
        let node = Node::new();
        let port = free_port();
        append_config(
            &node,
            &format!(
                r#"
[repositories.shared]
location = "{}"
key_file = "{}"

[daemon]
catalog = "{}"
catalog_password_file = "{}"
node = "{name}"
lease = "3s"
max_jobs = 2
max_jobs_per_host = 4
retry_backoff = "1s"

[daemon.api]
listen = "127.0.0.1:{port}"
tokens = [{{ env = "VKD_TEST_TOKEN", scope = "admin" }}]
{policy}
"#,
                self.location,
                self.key_file.display(),
                self.pg.url,
                self.pg.password_file().display()
            ),
        );
        (node, port)
    }

    fn start(&self, node: &Node, failpoint: Option<&str>) -> Daemon {
        let lab = node.lab;
        let mut d = Daemon::start_env(
            node,
            failpoint,
            &[
                ("AWS_ENDPOINT_URL", lab.s3_endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", lab.s3_access_key.as_str()),
                ("AWS_SECRET_ACCESS_KEY", lab.s3_secret_key.as_str()),
                ("AWS_REGION", lab.s3_region.as_str()),
            ],
        );
        d.wait_log("API listening", 60);
        d
    }

    /// `virtkeep verify --all --read-data` of the shared repository: every chunk of
    /// every backup is read and checked (exit status 0).
    fn verify(&self, node: &Node) {
        let mut c = node.cmd();
        s3_env(node, &mut c);
        let out = c
            .args(["verify", "--all", "--read-data", "--repo", &self.location])
            .arg("--key-file")
            .arg(&self.key_file)
            .output()
            .expect("verify");
        assert!(
            out.status.success(),
            "verify: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn s3_env(node: &Node, c: &mut assert_cmd::Command) {
    let lab = node.lab;
    c.env("AWS_ENDPOINT_URL", &lab.s3_endpoint)
        .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
        .env("AWS_REGION", &lab.s3_region);
}

/// Policy `p` on the shared repository; its cron schedule never fires during a test.
fn manual_policy(vms: &[&str]) -> String {
    format!(
        r#"
[policies.p]
repository = "shared"
schedules = [{{ cron = "0 3 1 1 *" }}]

[[policies.p.vms]]
host = "{HOST}"
names = [{}]
"#,
        vms.iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn submit(port: u16, vm: &str) -> i64 {
    let body = json!({"kind": "backup", "host": HOST, "vm": vm, "policy": "p", "mode": "full"});
    let (status, text) = http(port, "POST", "/api/jobs", Some(TOKEN), Some(&body));
    assert_eq!(status, 202, "{text}");
    json_of(&text)["id"].as_i64().expect("id")
}

fn all_jobs(port: u16) -> Vec<Value> {
    let (status, text) = http(port, "GET", "/api/jobs?limit=1000", Some(TOKEN), None);
    assert_eq!(status, 200, "{text}");
    json_of(&text).as_array().cloned().expect("jobs")
}

fn wait_for(what: &str, secs: u64, daemons: &[&Daemon], mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        if Instant::now() > deadline {
            let logs: Vec<String> = daemons.iter().map(|d| d.log_text()).collect();
            panic!("{what}: not within {secs} s\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn unix(t: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t.as_str().expect("time"))
        .expect("rfc3339")
        .timestamp()
}

/// Every submitted job ran to success exactly once: no duplicate and no extra job, but
/// for the retry of a first attempt that failed because QEMU did not start (seen on a
/// loaded CI machine, before any virtkeep code ran), which the policy's retry is for.
fn assert_once_each(list: &[Value], ids: &mut [i64]) {
    let failed: Vec<&Value> = list.iter().filter(|j| j["status"] != "succeeded").collect();
    for j in &failed {
        let error = j["error"].as_str().unwrap_or_default();
        assert!(
            j["status"] == "failed" && error.contains("while connecting to monitor"),
            "only a QEMU start may fail: {list:#?}"
        );
    }
    let retries: Vec<&Value> = list.iter().filter(|j| !j["retry_of"].is_null()).collect();
    assert_eq!(
        retries.len(),
        failed.len(),
        "one retry per failure: {list:#?}"
    );
    for r in &retries {
        assert!(
            failed.iter().any(|f| f["id"] == r["retry_of"]) && r["status"] == "succeeded",
            "{list:#?}"
        );
    }
    let mut got: Vec<i64> = list
        .iter()
        .filter(|j| j["retry_of"].is_null())
        .filter_map(|j| j["id"].as_i64())
        .collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "no duplicate: {list:#?}");
}

#[test]
fn three_nodes_run_twelve_jobs_once_each_and_one_per_vm() {
    let cluster = Cluster::new();
    let vms: Vec<TestVm> = (0..4)
        .map(|i| {
            TestVm::builder(&format!("vkc-q{i}"))
                .qcow2_disk(4 * MIB)
                .running(false)
                .build()
        })
        .collect();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let policy = manual_policy(&names);
    let nodes: Vec<(Node, u16)> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| cluster.node(n, &policy))
        .collect();
    let daemons: Vec<Daemon> = nodes.iter().map(|(n, _)| cluster.start(n, None)).collect();
    // Three jobs per VM, submitted round-robin to the three APIs.
    let mut ids = Vec::new();
    for round in 0..3 {
        for (i, vm) in names.iter().enumerate() {
            ids.push(submit(nodes[(round + i) % 3].1, vm));
        }
    }
    let port = nodes[0].1;
    let refs: Vec<&Daemon> = daemons.iter().collect();
    wait_for("12 jobs ended", 600, &refs, || {
        let l = all_jobs(port);
        l.len() >= 12
            && l.iter()
                .all(|j| j["status"] != "queued" && j["status"] != "running")
    });
    let list = all_jobs(port);
    assert_once_each(&list, &mut ids);
    // Every node ran some; the API of every node shows the whole cluster.
    let ran_on: std::collections::BTreeSet<&str> =
        list.iter().filter_map(|j| j["node"].as_str()).collect();
    assert!(
        ran_on.len() >= 2,
        "the work spread over the nodes: {ran_on:?}"
    );
    assert_eq!(all_jobs(nodes[2].1).len(), 12);
    let (_, text) = http(nodes[1].1, "GET", "/api/nodes", Some(TOKEN), None);
    let api_nodes = json_of(&text);
    let live: Vec<&str> = api_nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["alive"] == true)
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(live, vec!["n1", "n2", "n3"], "{api_nodes}");
    let leaders = api_nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["leader"] == true)
        .count();
    assert_eq!(leaders, 1, "{api_nodes}");
    // Never two jobs of one VM at once (whole seconds: one may start as the other ends).
    for vm in &names {
        let mut spans: Vec<(i64, i64)> = list
            .iter()
            .filter(|j| j["vm"] == *vm)
            .map(|j| (unix(&j["started"]), unix(&j["finished"])))
            .collect();
        spans.sort();
        assert!(spans.len() >= 3, "{vm}: {spans:?}");
        for w in spans.windows(2) {
            assert!(w[1].0 >= w[0].1, "{vm}: overlapping jobs {spans:?}");
        }
    }
    for d in daemons {
        d.terminate();
    }
    // The repository has the 12 backups, and they verify.
    cluster.verify(&nodes[0].0);
    let snaps = {
        let mut c = nodes[0].0.cmd();
        s3_env(&nodes[0].0, &mut c);
        let out = c
            .args(["--json", "snapshots", "--repo", &cluster.location])
            .arg("--key-file")
            .arg(&cluster.key_file)
            .output()
            .expect("snapshots");
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    };
    assert_eq!(snaps.as_array().map(Vec::len), Some(12), "{snaps:#}");
}

#[test]
fn a_killed_node_loses_its_job_to_another_which_heals_the_vm_and_retries() {
    let cluster = Cluster::new();
    let vm = TestVm::builder("vkc-kill")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x5c, 0, 8 * MIB);
    let sources = vm.current_sources();
    let policy = manual_policy(&[vm.name.as_str()]);
    let (n1, p1) = cluster.node("n1", &policy);
    let (n2, p2) = cluster.node("n2", &policy);
    // Only n1 runs when the job is queued: it takes it and stops at the failpoint.
    let mut d1 = cluster.start(&n1, Some("export-chunk-written"));
    let id = submit(p1, &vm.name);
    d1.wait_log(&failpoint_reached("export-chunk-written"), 180);
    let d2 = cluster.start(&n2, None);
    let killed = Instant::now();
    d1.kill();
    wait_for("the retry on n2", 300, &[&d2], || {
        all_jobs(p2)
            .iter()
            .any(|j| j["retry_of"] == id && j["status"] == "succeeded")
    });
    eprintln!(
        "takeover, heal and retry took {:.1}s",
        killed.elapsed().as_secs_f64()
    );
    let list = all_jobs(p2);
    let first = list.iter().find(|j| j["id"] == id).expect("first");
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(first["node"], "n1", "{first}");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped renewing its lease")),
        "{first}"
    );
    let retry = list.iter().find(|j| j["retry_of"] == id).expect("retry");
    assert_eq!(
        (retry["node"].as_str(), retry["attempt"].as_i64()),
        (Some("n2"), Some(2))
    );
    assert_eq!(list.len(), 2, "{list:#?}");
    // n1 is dead for the cluster; the VM runs on its own file, nothing left on the host.
    let (_, text) = http(p2, "GET", "/api/nodes", Some(TOKEN), None);
    let nodes = json_of(&text);
    let n1_state = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "n1")
        .cloned()
        .expect("n1");
    assert_eq!(n1_state["alive"], false, "{nodes}");
    d2.terminate();
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    cluster.verify(&n2);
}

#[test]
fn a_schedule_fires_once_per_period_and_the_lead_moves_when_the_leader_dies() {
    let cluster = Cluster::new();
    let vm = TestVm::builder("vkc-sched")
        .qcow2_disk(4 * MIB)
        .running(false)
        .build();
    let policy = format!(
        r#"
[policies.p]
repository = "shared"
schedules = [{{ every = "20s", mode = "full" }}]

[[policies.p.vms]]
host = "{HOST}"
names = ["{}"]
"#,
        vm.name
    );
    let (n1, p1) = cluster.node("n1", &policy);
    let (n2, p2) = cluster.node("n2", &policy);
    let (n3, _) = cluster.node("n3", &policy);
    // n1 starts first and leads; the others join.
    let mut d1 = cluster.start(&n1, None);
    d1.wait_log("this node leads", 30);
    let d2 = cluster.start(&n2, None);
    let d3 = cluster.start(&n3, None);
    let started = Instant::now();
    let runs = |port: u16| -> Vec<Value> {
        let (_, text) = http(port, "GET", "/api/policies", Some(TOKEN), None);
        json_of(&text)[0]["last_runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    // About 45 s: the first run at once, then one each 20 s — never one per node.
    wait_for("two runs", 120, &[&d1, &d2, &d3], || runs(p2).len() >= 2);
    let elapsed = started.elapsed().as_secs();
    let n = runs(p2).len() as u64;
    assert!(
        n <= elapsed / 20 + 2,
        "{n} runs in {elapsed} s: {:#?}",
        runs(p2)
    );
    // Only the leader fired: the others never even tried (no run, no skipped run).
    assert!(d1.log_text().contains("policy run"), "{}", d1.log_text());
    for d in [&d2, &d3] {
        let log = d.log_text();
        assert!(
            !log.contains("policy run")
                && !log.contains("run skipped")
                && !log.contains("this node leads"),
            "{log}"
        );
    }
    // The leader dies: another node leads and the schedule goes on.
    let before = runs(p2).len();
    d1.kill();
    wait_for("a new leader", 60, &[&d2, &d3], || {
        let (_, text) = http(p2, "GET", "/api/nodes", Some(TOKEN), None);
        json_of(&text).as_array().is_some_and(|a| {
            a.iter()
                .any(|n| n["leader"] == true && n["alive"] == true && n["name"] != "n1")
        })
    });
    wait_for("a run by the new leader", 90, &[&d2, &d3], || {
        runs(p2).len() > before
    });
    let leads = [&d2, &d3]
        .iter()
        .filter(|d| d.log_text().contains("this node leads"))
        .count();
    assert_eq!(leads, 1, "exactly one node took over the lead");
    let list = all_jobs(p2);
    // One job per run: no node fired the schedule on its own.
    let run_ids: std::collections::BTreeSet<i64> =
        list.iter().filter_map(|j| j["run_id"].as_i64()).collect();
    assert_eq!(
        run_ids.len(),
        list.iter().filter(|j| j["retry_of"].is_null()).count()
    );
    let _ = p1;
    d2.terminate();
    d3.terminate();
}
