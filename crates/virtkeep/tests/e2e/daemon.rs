//! The daemon against the real lab: schedules firing every few seconds, retention, a
//! daemon killed mid-job and restarted, the REST API over real HTTP, config errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use virtkeep_lab::TestVm;

use crate::harness::{HOST, Node, assert_only_incremental_base};

const MIB: u64 = 1 << 20;
pub(crate) const TOKEN: &str = "vkd-test-token-5f0c2a9e";

/// A running `virtkeep daemon` whose log lines are collected as they come.
pub(crate) struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Its stdin, when a test releases a held failpoint (`failpoint::hold`) with a line.
    stdin: Option<std::process::ChildStdin>,
}

/// The daemon's log line when failpoint `name` stops it (see `virtkeep_engine::failpoint`).
pub(crate) fn failpoint_reached(name: &str) -> String {
    format!("virtkeep: failpoint {name} reached")
}

impl Daemon {
    pub(crate) fn start(node: &Node) -> Daemon {
        Daemon::start_with(node, None)
    }

    /// With failpoint `failpoint` on: its job stops there for good (for fault tests).
    pub(crate) fn start_with(node: &Node, failpoint: Option<&str>) -> Daemon {
        Daemon::start_env(node, failpoint, &[])
    }

    /// With further variables in the daemon's environment.
    pub(crate) fn start_env(node: &Node, failpoint: Option<&str>, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(node, failpoint, env, Stdio::inherit())
    }

    /// With hold failpoint `failpoint` on: the job waits there until [`Daemon::release`].
    pub(crate) fn start_held(node: &Node, failpoint: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::spawn(node, Some(failpoint), env, Stdio::piped());
        d.stdin = d.child.stdin.take();
        d
    }

    /// Lets a job held at a hold failpoint go on (a line on the daemon's stdin).
    pub(crate) fn release(&mut self) {
        let stdin = self.stdin.as_mut().expect("started with start_held");
        stdin.write_all(b"\n").expect("release the held job");
        stdin.flush().expect("flush");
    }

    fn spawn(node: &Node, failpoint: Option<&str>, env: &[(&str, &str)], stdin: Stdio) -> Daemon {
        let bin = assert_cmd::cargo::cargo_bin("virtkeep");
        let mut cmd = Command::new(bin);
        cmd.env_remove("VIRTKEEP_FAILPOINT");
        cmd.env_remove("VIRTKEEP_PASSWORD_FILE");
        cmd.env_remove("VIRTKEEP_PASSWORD_COMMAND");
        if let Some(name) = failpoint {
            cmd.env("VIRTKEEP_FAILPOINT", name);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .arg("--config")
            .arg(node.config())
            .arg("daemon")
            .env("HOME", node.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env("VIRTKEEP_LOG", "info")
            .env("VKD_TEST_TOKEN", TOKEN)
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virtkeep daemon");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("log").push(line);
            }
        });
        Daemon {
            child,
            log,
            stdin: None,
        }
    }

    pub(crate) fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Waits for a log line containing `needle`.
    pub(crate) fn wait_log(&mut self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self
                .log
                .lock()
                .expect("log")
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "daemon exited ({status}) before {needle:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no {needle:?} in {secs} s:\n{}", self.log_text());
    }

    /// Sends `signal` (e.g. `HUP`) with kill(1).
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {pid}");
    }

    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the daemon to exit by itself.
    pub(crate) fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "daemon exit {status}:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn append_config(node: &Node, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(node.config())
        .expect("config");
    f.write_all(text.as_bytes()).expect("write config");
}

pub(crate) fn catalog(node: &Node) -> String {
    node.dir.path().join("catalog.sqlite").display().to_string()
}

pub(crate) fn jobs(node: &Node) -> Vec<Value> {
    node.json(&["jobs", "--limit", "1000"])
        .as_array()
        .cloned()
        .expect("jobs list")
}

/// Polls `virtkeep jobs` (the catalog) until `done` holds for the job list.
pub(crate) fn wait_jobs(
    node: &Node,
    daemon: &Daemon,
    secs: u64,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let list = jobs(node);
        if done(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached in {secs} s; jobs: {list:#?}\nlog:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub(crate) fn succeeded(list: &[Value]) -> Vec<&Value> {
    list.iter().filter(|j| j["status"] == "succeeded").collect()
}

#[test]
fn scheduled_incrementals_with_retention() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-sched")
        .qcow2_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x51, 0, 2 * MIB);
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retry_backoff = "1s"

[policies.every3s]
schedules = [{{ every = "3s", mode = "incremental" }}]
retention = {{ keep_last = 2 }}

[[policies.every3s.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    let started = Instant::now();
    let daemon = Daemon::start(&node);
    let list = wait_jobs(&node, &daemon, 150, "three scheduled backups", |l| {
        succeeded(l).len() >= 3
    });
    daemon.terminate();
    eprintln!(
        "three scheduled backups and a SIGTERM took {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let list = {
        // SIGTERM let a running job finish: take the final state.
        let _ = list;
        jobs(&node)
    };
    let ok = succeeded(&list);
    // Newest first: the oldest is the full that started the chain, the others are incremental.
    let (first, rest) = ok.split_last().expect("jobs");
    assert_eq!(first["mode"], "full", "{first}");
    assert!(rest.iter().all(|j| j["mode"] == "incremental"), "{list:#?}");
    assert!(
        list.iter()
            .all(|j| j["policy"] == "every3s" && j["run_id"].is_i64()),
        "{list:#?}"
    );
    // Retention ran after each success and removed the oldest backups.
    let pruned: i64 = ok.iter().filter_map(|j| j["pruned"].as_i64()).sum();
    assert_eq!(pruned as usize, ok.len() - 2, "{list:#?}");
    let snaps = node.json(&["snapshots", &format!("{HOST}/{}", vm.name)]);
    let snaps = snaps.as_array().expect("snapshots");
    assert_eq!(snaps.len(), 2, "keep_last = 2: {snaps:#?}");
    assert!(
        snaps.iter().all(|s| s["mode"] == "incremental"),
        "{snaps:#?}"
    );
    let kept: Vec<&str> = snaps.iter().filter_map(|s| s["id"].as_str()).collect();
    for j in &ok[..2] {
        assert!(
            kept.contains(&j["snapshot"].as_str().expect("snapshot")),
            "{j}"
        );
    }
    assert_only_incremental_base(&vm);
    assert!(vm.is_running());

    // `policy list` reads the same catalog: last and next runs, and the runs themselves.
    let policies = node.json(&["policy", "list"]);
    let p = &policies[0];
    assert_eq!(p["name"], "every3s");
    assert!(p["schedules"][0]["last_run"].is_string(), "{p}");
    assert!(p["schedules"][0]["next_run"].is_string(), "{p}");
    assert!(
        p["last_runs"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["status"] == "succeeded")),
        "{p}"
    );
    let human = node.ok(&["jobs"]);
    assert!(
        human.contains("succeeded") && human.contains(&vm.name),
        "{human}"
    );
}

#[test]
fn daemon_killed_mid_job_fails_it_heals_and_retries() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-kill")
        .raw_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x52, 0, 32 * MIB);
    let sources = vm.current_sources();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retries = 2
retry_backoff = "1s"

[policies.hourly]
schedules = [{{ every = "1h", mode = "full" }}]
parallel = 1

[[policies.hourly.vms]]
host = "{HOST}"
regex = ["^{}$"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    // An interval schedule without history fires at once; its job stops mid export.
    let mut daemon = Daemon::start_with(&node, Some("export-chunk-written"));
    daemon.wait_log(&failpoint_reached("export-chunk-written"), 120);
    daemon.kill();
    let left = jobs(&node);
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(
        left[0]["status"], "running",
        "a SIGKILLed daemon cannot record anything"
    );
    let first_id = left[0]["id"].as_i64().expect("id");

    let started = Instant::now();
    let daemon = Daemon::start(&node);
    let list = wait_jobs(&node, &daemon, 150, "the retry", |l| {
        !succeeded(l).is_empty()
    });
    eprintln!(
        "restart, heal and retry took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    daemon.terminate();

    let first = list
        .iter()
        .find(|j| j["id"] == first_id)
        .expect("first job");
    assert_eq!(first["status"], "failed", "{first}");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("daemon stopped while this job ran")),
        "{first}"
    );
    let retry = succeeded(&list)[0];
    assert_eq!(retry["retry_of"], first_id, "{retry}");
    assert_eq!(retry["attempt"], 2);
    assert_eq!(retry["run_id"], first["run_id"]);
    // The missed hourly schedule is not run again: its next run is an hour away.
    assert_eq!(list.len(), 2, "{list:#?}");
    // Nothing left on the host: the VM runs on its own file, no overlay, no lock.
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    let dry = node.json(&["cleanup", HOST, "--dry-run"]);
    let ours: Vec<&Value> = dry["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter(|v| v["vm"] == vm.name.as_str())
        .collect();
    assert!(
        ours.iter()
            .all(|v| v["actions"].as_array().is_none_or(Vec::is_empty)),
        "{dry}"
    );
    let snaps = node.json(&["snapshots", &format!("{HOST}/{}", vm.name)]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{snaps}");
    assert_eq!(snaps[0]["id"], retry["snapshot"]);
}

/// One HTTP/1.1 request over a plain TCP connection: (status, body).
pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    // Chunked bodies: join the chunks.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

pub(crate) fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("bad JSON ({e}): {body}"))
}

pub(crate) fn wait_job_http(port: u16, id: i64, daemon: &Daemon) -> Value {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let (status, body) = http(port, "GET", &format!("/api/jobs/{id}"), Some(TOKEN), None);
        assert_eq!(status, 200, "{body}");
        let j = json_of(&body);
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not end: {j}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn rest_api_with_token_auth_backup_restore_and_metrics() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-api")
        .qcow2_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x53, 0, 2 * MIB);
    let sum = vm.disk_checksum("vda");
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
scope = "admin"
"#,
            catalog(&node)
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);

    // Refused without a token, or with a wrong one; the OpenAPI document is public.
    let (status, body) = http(port, "GET", "/api/hosts", None, None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(http(port, "GET", "/api/jobs", Some("wrong"), None).0, 401);
    assert_eq!(http(port, "GET", "/metrics", None, None).0, 401);
    let (status, body) = http(port, "GET", "/api/openapi.json", None, None);
    assert_eq!(status, 200);
    let doc = json_of(&body);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    for path in [
        "/api/hosts",
        "/api/hosts/{host}/vms",
        "/api/backups",
        "/api/jobs",
        "/api/jobs/{id}",
        "/metrics",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        doc["components"]["securitySchemes"]["token"].is_object(),
        "{doc}"
    );

    let (status, body) = http(port, "GET", "/api/hosts", Some(TOKEN), None);
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)[0]["name"], HOST);
    let (status, body) = http(
        port,
        "GET",
        &format!("/api/hosts/{HOST}/vms"),
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        json_of(&body)
            .as_array()
            .expect("vms")
            .iter()
            .any(|v| v["name"] == vm.name.as_str()),
        "{body}"
    );

    // A bad request says what is wrong.
    let (status, body) = http(
        port,
        "POST",
        "/api/jobs",
        Some(TOKEN),
        Some(&serde_json::json!({"kind": "backup", "host": "nohost", "vm": "x"})),
    );
    assert_eq!(status, 400, "{body}");

    // Start two backups of the VM at once and follow them: they run one after the other.
    let submit = || {
        let (status, body) = http(
            port,
            "POST",
            "/api/jobs",
            Some(TOKEN),
            Some(
                &serde_json::json!({"kind": "backup", "host": HOST, "vm": vm.name, "mode": "full"}),
            ),
        );
        assert_eq!(status, 202, "{body}");
        json_of(&body)["id"].as_i64().expect("id")
    };
    let (id, second) = (submit(), submit());
    let job = wait_job_http(port, id, &daemon);
    assert_eq!(job["status"], "succeeded", "{job}");
    let other = wait_job_http(port, second, &daemon);
    assert_eq!(other["status"], "succeeded", "{other}");
    let (a, b) = if job["started"].as_str() <= other["started"].as_str() {
        (&job, &other)
    } else {
        (&other, &job)
    };
    assert!(
        b["started"].as_str().expect("started") >= a["finished"].as_str().expect("finished"),
        "two backups of one VM overlapped: {a} {b}"
    );
    let snapshot = other["snapshot"].as_str().expect("snapshot").to_string();

    let (status, body) = http(
        port,
        "GET",
        &format!("/api/backups?host={HOST}&vm={}", vm.name),
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 200);
    let backups = json_of(&body);
    assert_eq!(backups.as_array().map(Vec::len), Some(2), "{backups}");
    assert!(
        backups
            .as_array()
            .expect("list")
            .iter()
            .any(|b| b["id"] == snapshot.as_str()),
        "{backups}"
    );

    let (status, metrics) = http(port, "GET", "/metrics", Some(TOKEN), None);
    assert_eq!(status, 200);
    let series = format!(
        "virtkeep_backup_last_success_timestamp_seconds{{host=\"{HOST}\",vm=\"{}\"}}",
        vm.name
    );
    assert!(metrics.contains(&series), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "virtkeep_backup_last_bytes_new{{host=\"{HOST}\",vm=\"{}\"}}",
            vm.name
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtkeep_jobs{status=\"succeeded\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "virtkeep_backup_successes_total{{host=\"{HOST}\",vm=\"{}\"}} 2",
            vm.name
        )),
        "{metrics}"
    );

    // Restore it under a new name through the API; the restored disk has the data.
    let new_name = virtkeep_lab::unique_name("vkd-api-restored");
    let restored = TestVm::adopt(&new_name);
    let (status, body) = http(
        port,
        "POST",
        "/api/jobs",
        Some(TOKEN),
        Some(
            &serde_json::json!({"kind": "restore", "host": HOST, "snapshot": snapshot, "name": new_name, "define": true}),
        ),
    );
    assert_eq!(status, 202, "{body}");
    let rid = json_of(&body)["id"].as_i64().expect("id");
    let job = wait_job_http(port, rid, &daemon);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "restore");
    let restored_sum = TestVm::adopt(&new_name).disk_checksum("vda");
    assert_eq!(restored_sum, sum);
    // The CLI reads the same jobs.
    let listed = jobs(&node);
    assert_eq!(listed.len(), 3, "{listed:#?}");
    daemon.terminate();
    drop(restored);
}

#[test]
fn config_errors_name_file_line_and_expectation() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        r#"[hosts.kvm1]
address = "127.0.0.1"
identity = "/dev/null"

[policies.nightly]
schedules = [
  { cron = "0 2 * * *", timezone = "Europe/Berlin", mode = "incremental" },
  { cron = "0 2 * * 8", mode = "full" },
]
[[policies.nightly.vms]]
host = "kvm1"
names = ["db01"]
"#,
    )
    .expect("write");
    for args in [&["daemon"][..], &["policy", "list"], &["jobs"]] {
        let out = assert_cmd::Command::cargo_bin("virtkeep")
            .expect("bin")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("HOME", dir.path())
            .timeout(Duration::from_secs(30))
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let place = format!("{}:8:", config.display());
        assert!(stderr.contains(&place), "{args:?}: {stderr}");
        assert!(stderr.contains("expected 5 fields"), "{args:?}: {stderr}");
    }
}

#[test]
fn sigterm_with_abort_stops_the_export_and_heals_the_vm() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-term")
        .raw_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x54, 0, 32 * MIB);
    let sources = vm.current_sources();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
shutdown = "abort"
retries = 1

[policies.hourly]
schedules = [{{ every = "1h", mode = "full" }}]
parallel = 1

[[policies.hourly.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    let mut daemon = Daemon::start_with(&node, Some("export-chunk-written"));
    daemon.wait_log(&failpoint_reached("export-chunk-written"), 120);
    let started = Instant::now();
    daemon.terminate();
    eprintln!(
        "SIGTERM with abort took {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let list = jobs(&node);
    let first = list.iter().find(|j| j["attempt"] == 1).expect("first job");
    assert_eq!(first["status"], "failed", "{list:#?}");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("aborted by the daemon's shutdown")),
        "{first}"
    );
    // Its retry waits in the catalog for the next start.
    let retry = list.iter().find(|j| j["attempt"] == 2).expect("retry");
    assert_eq!(retry["status"], "queued", "{list:#?}");
    assert_eq!(retry["retry_of"], first["id"]);
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(0));
}

/// The value of the series `name{labels}` in Prometheus text.
fn series_value(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&head))
        .and_then(|v| v.trim().parse().ok())
}

/// A VM a policy selects that never had a successful backup (its backups fail, or the
/// host does not even have it) has a last-success series, 0, so docs/daemon.md's alert
/// `time() - virtkeep_backup_last_success_timestamp_seconds > 26*3600` fires for it.
#[test]
fn metrics_have_a_series_for_a_vm_never_backed_up() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-never")
        .qcow2_disk(4 * MIB)
        .running(false)
        .build();
    let absent = virtkeep_lab::unique_name("vkd-absent");
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
retries = 0

[daemon.api]
listen = "127.0.0.1:{port}"
token_env = "VKD_TEST_TOKEN"

[policies.never]
schedules = [{{ every = "1h" }}]
pre_snapshot = "echo not this time >&2; exit 3"

[[policies.never.vms]]
host = "{HOST}"
names = ["{}", "{absent}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    let list = wait_jobs(&node, &daemon, 120, "the failed backup", |l| {
        l.len() == 1 && l[0]["status"] == "failed"
    });
    assert_eq!(list[0]["vm"], vm.name.as_str(), "{list:#?}");
    let (status, metrics) = http(port, "GET", "/metrics", Some(TOKEN), None);
    daemon.terminate();
    assert_eq!(status, 200, "{metrics}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for name in [vm.name.as_str(), absent.as_str()] {
        let labels = format!("host=\"{HOST}\",vm=\"{name}\"");
        let last = series_value(
            &metrics,
            "virtkeep_backup_last_success_timestamp_seconds",
            &labels,
        );
        assert_eq!(last, Some(0.0), "{name}: {metrics}");
        // The documented alert's expression, evaluated as Prometheus would.
        assert!(now - last.unwrap_or(now) > 26.0 * 3600.0);
    }
    let failures = |name: &str| {
        let labels = format!("host=\"{HOST}\",vm=\"{name}\"");
        series_value(&metrics, "virtkeep_backup_failures_total", &labels)
    };
    assert_eq!(failures(&vm.name), Some(1.0), "{metrics}");
    assert_eq!(failures(&absent), Some(0.0), "{metrics}");
}

/// The daemon opens encrypted repositories from the sources the CLI reads: the
/// configuration's `password_file` and `password_command`, and VIRTKEEP_PASSWORD_FILE
/// for a repository that names no key (never for an unencrypted one, which it would
/// break); a wrong password fails the job with the repository's error.
#[test]
fn the_daemon_reads_repository_passwords_as_the_cli_does() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-keys")
        .qcow2_disk(4 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x5a, 0, MIB);
    let dir = node.dir.path();
    let mut repos = Vec::new();
    for (name, password) in [
        ("byfile", "file pw"),
        ("bycmd", "command pw"),
        ("byenv", "env pw"),
    ] {
        let pw = dir.join(format!("{name}.pw"));
        std::fs::write(&pw, format!("{password}\n")).expect("pw");
        let repo = dir.join(name).display().to_string();
        let pw = pw.display().to_string();
        node.ok(&["repo", "init", &repo, "--password-file", &pw]);
        repos.push((name, repo, pw));
    }
    let bad = dir.join("bad.pw");
    std::fs::write(&bad, "not it\n").expect("pw");
    let mut text = format!(
        r#"
[repositories.byfile]
location = "{}"
password_file = "{}"

[repositories.bycmd]
location = "{}"
password_command = "cat '{}'"

[repositories.byenv]
location = "{}"

[repositories.wrong]
location = "{}"
password_file = "{}"

[daemon]
catalog = "{}"
retries = 0
"#,
        repos[0].1,
        repos[0].2,
        repos[1].1,
        repos[1].2,
        repos[2].1,
        repos[0].1,
        bad.display(),
        catalog(&node)
    );
    // One policy per repository; "plain" uses the harness's unencrypted [repository].
    for policy in ["byfile", "bycmd", "byenv", "wrong", "plain"] {
        let repository = if policy == "plain" {
            String::new()
        } else {
            format!("repository = \"{policy}\"\n")
        };
        text.push_str(&format!(
            r#"
[policies.{policy}]
{repository}schedules = [{{ every = "1h", mode = "full" }}]

[[policies.{policy}.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            vm.name
        ));
    }
    append_config(&node, &text);
    let env_pw = repos[2].2.clone();
    let daemon = Daemon::start_env(&node, None, &[("VIRTKEEP_PASSWORD_FILE", &env_pw)]);
    let list = wait_jobs(&node, &daemon, 180, "five finished jobs", |l| {
        l.len() == 5
            && l.iter()
                .all(|j| j["status"] == "succeeded" || j["status"] == "failed")
    });
    daemon.terminate();
    let status = |policy: &str| -> &Value {
        list.iter()
            .find(|j| j["policy"] == policy)
            .unwrap_or_else(|| panic!("no job of {policy}: {list:#?}"))
    };
    for policy in ["byfile", "bycmd", "byenv", "plain"] {
        assert_eq!(status(policy)["status"], "succeeded", "{list:#?}");
    }
    let wrong = status("wrong");
    assert_eq!(wrong["status"], "failed", "{wrong}");
    assert!(
        wrong["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not unlock")),
        "{wrong}"
    );
    // Each backup is in its repository, readable with that repository's password.
    for (name, repo, pw) in &repos {
        let snaps = node.json(&["snapshots", "--repo", repo, "--password-file", pw]);
        let snapshot = status(name)["snapshot"]
            .as_str()
            .expect("snapshot")
            .to_string();
        assert!(
            snaps
                .as_array()
                .is_some_and(|l| l.len() == 1 && l[0]["id"] == snapshot.as_str()),
            "{name}: {snaps}"
        );
    }
}

#[test]
fn a_run_fails_its_remaining_tasks_past_the_threshold() {
    let node = Node::new();
    let vms: Vec<TestVm> = (0..3)
        .map(|_| {
            TestVm::builder("vkd-rest")
                .qcow2_disk(4 * MIB)
                .running(false)
                .build()
        })
        .collect();
    let names: Vec<String> = vms.iter().map(|v| format!("\"{}\"", v.name)).collect();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
max_jobs = 1
retries = 0

[policies.strict]
schedules = [{{ every = "1h" }}]
pre_snapshot = "echo not today >&2; exit 7"
fail_rest_above_percent = 30

[[policies.strict.vms]]
host = "{HOST}"
names = [{}]
"#,
            catalog(&node),
            names.join(", ")
        ),
    );
    let daemon = Daemon::start(&node);
    let list = wait_jobs(&node, &daemon, 120, "the run's end", |l| {
        l.len() == 3 && l.iter().all(|j| j["status"] == "failed")
    });
    let policies = node.json(&["policy", "list"]);
    daemon.terminate();
    let ran: Vec<&Value> = list
        .iter()
        .filter(|j| j["error"].as_str().is_some_and(|e| e.contains("not today")))
        .collect();
    let cancelled: Vec<&Value> = list
        .iter()
        .filter(|j| {
            j["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("not run: 1 of the 3 tasks"))
        })
        .collect();
    assert_eq!((ran.len(), cancelled.len()), (1, 2), "{list:#?}");
    assert!(
        cancelled.iter().all(|j| j["started"].is_null()),
        "{list:#?}"
    );
    assert_eq!(
        policies[0]["last_runs"][0]["status"], "failed",
        "{policies}"
    );
}

#[test]
fn a_failed_backup_is_retried_after_the_backoff() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-retry")
        .qcow2_disk(4 * MIB)
        .running(false)
        .build();
    // The hook fails the first time only (the flag lives on the host, which is this machine).
    let flag = std::env::temp_dir().join(virtkeep_lab::unique_name("vkd-retry-flag"));
    let flag_s = flag.display().to_string();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retries = 2
retry_backoff = "3s"

[policies.once]
schedules = [{{ every = "1h" }}]
pre_snapshot = "test -e {flag_s} || {{ touch {flag_s}; echo first try fails >&2; exit 1; }}"

[[policies.once.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    let daemon = Daemon::start(&node);
    let list = wait_jobs(&node, &daemon, 120, "the retry's success", |l| {
        !succeeded(l).is_empty()
    });
    daemon.terminate();
    let _ = std::fs::remove_file(&flag);
    assert_eq!(list.len(), 2, "{list:#?}");
    let (retry, first) = (&list[0], &list[1]);
    assert_eq!(first["status"], "failed");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("first try fails")),
        "{first}"
    );
    assert_eq!(retry["status"], "succeeded");
    assert_eq!(
        (retry["attempt"].as_i64(), retry["retry_of"].as_i64()),
        (Some(2), first["id"].as_i64())
    );
    let at = |v: &Value| unix_seconds(v.as_str().expect("time"));
    assert!(
        at(&retry["started"]) - at(&first["finished"]) >= 3,
        "the retry waited less than retry_backoff: {first} {retry}"
    );
}

/// Seconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SSZ` (as the
/// catalog writes them), enough to compare two times of one test.
fn unix_seconds(t: &str) -> i64 {
    let parsed = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("bad time {t}: {e}"));
    parsed.unix_timestamp()
}

/// A weekly full and daily incrementals, compressed to seconds: a scheduled full does
/// not break the chain, so the backups go full, incremental, …, full, incremental — never
/// a full that was asked as an incremental.
#[test]
fn full_and_incremental_schedules_alternate_without_breaking_the_chain() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-mix")
        .qcow2_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x53, 0, 2 * MIB);
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[policies.mix]
schedules = [{{ every = "15s", mode = "full" }}, {{ every = "3s", mode = "incremental" }}]

[[policies.mix.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    // Oldest first.
    let modes = |l: &[Value]| -> Vec<String> {
        let mut ok: Vec<String> = succeeded(l)
            .iter()
            .map(|j| j["mode"].as_str().unwrap_or("").to_string())
            .collect();
        ok.reverse();
        ok
    };
    let daemon = Daemon::start(&node);
    wait_jobs(
        &node,
        &daemon,
        240,
        "a second scheduled full followed by an incremental",
        |l| {
            let m = modes(l);
            let fulls: Vec<usize> = (0..m.len()).filter(|&i| m[i] == "full").collect();
            fulls.len() >= 2 && fulls.last().is_some_and(|&i| i + 1 < m.len())
        },
    );
    daemon.terminate();
    let m = modes(&jobs(&node));
    assert_eq!(m[0], "full", "{m:?}");
    assert!(m.iter().filter(|x| *x == "full").count() >= 2, "{m:?}");
    assert!(
        m.windows(2).all(|w| !(w[0] == "full" && w[1] == "full")),
        "an incremental after a full fell back to a full: {m:?}"
    );
    assert!(m.iter().all(|x| x == "full" || x == "incremental"), "{m:?}");
    assert_only_incremental_base(&vm);
    assert!(vm.is_running());
}

/// A job that never ends (stopped at a failpoint mid export) is aborted after its
/// policy's `job_timeout`, its VM healed, and the VM's schedule goes on: the "already
/// queued or running" rule cannot block it forever.
#[test]
fn a_stuck_job_is_aborted_after_job_timeout_and_the_schedule_goes_on() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-stuck")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x55, 0, 2 * MIB);
    let sources = vm.current_sources();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retries = 0

[policies.stuck]
schedules = [{{ every = "2s", mode = "full" }}]
job_timeout = "4s"

[[policies.stuck.vms]]
host = "{HOST}"
names = ["{}"]
"#,
            catalog(&node),
            vm.name
        ),
    );
    let timed_out = |l: &[Value]| -> usize {
        l.iter()
            .filter(|j| {
                j["status"] == "failed"
                    && j["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("job_timeout"))
            })
            .count()
    };
    let daemon = Daemon::start_with(&node, Some("export-chunk-written"));
    wait_jobs(
        &node,
        &daemon,
        120,
        "two jobs aborted by job_timeout",
        |l| timed_out(l) >= 2,
    );
    daemon.terminate();
    let list = jobs(&node);
    assert!(timed_out(&list) >= 2, "{list:#?}");
    assert!(vm.is_running());
    assert_eq!(vm.current_sources(), sources);
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
}
