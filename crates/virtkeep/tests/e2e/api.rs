//! The daemon's REST API hardening against the real lab: token scopes, HTTPS with a
//! certificate swapped on SIGHUP, the loopback rule, body limits, cancelling jobs
//! (a running backup's VM healed) and the job history limits.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use virtkeep_lab::TestVm;

use crate::daemon::{
    Daemon, TOKEN, append_config, catalog, failpoint_reached, http, jobs, json_of, wait_job_http,
    wait_jobs,
};
use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;
const OPERATE: &str = "vkd-operate-token-7d41c0";
const ADMIN: &str = "vkd-admin-token-93be5a";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn post(port: u16, token: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(port, "POST", "/api/jobs", Some(token), Some(body));
    (status, json_of(&text))
}

/// Asserts a 403 whose JSON names the scope needed and the token's.
fn assert_forbidden(answer: (u16, Value), needed: &str, had: &str) {
    let (status, body) = answer;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["required_scope"], needed, "{body}");
    assert_eq!(body["token_scope"], had, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains(needed)),
        "{body}"
    );
}

/// Read-only tokens read, operate tokens back up and cancel, only admin restores; an
/// unscoped legacy token may only read; a body over max_request_bytes gets 413.
#[test]
fn token_scopes_decide_what_a_token_may_do() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-scope")
        .qcow2_disk(16 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x61, 0, 2 * MIB);
    let sum = vm.disk_checksum("vda");
    let port = free_port();
    let token_file = node.dir.path().join("operate.tokens");
    std::fs::write(&token_file, format!("# operators\n{OPERATE}\n")).expect("token file");
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
max_request_bytes = 4096
tokens = [
  {{ file = "{}", scope = "operate" }},
  {{ env = "VKD_ADMIN_TOKEN", scope = "admin" }},
]
"#,
            catalog(&node),
            token_file.display()
        ),
    );
    let mut daemon = Daemon::start_env(&node, None, &[("VKD_ADMIN_TOKEN", ADMIN)]);
    daemon.wait_log("API listening", 30);
    // The pre-scope token (no scope set) is read-only, and the log says so.
    daemon.wait_log("has no scope: its tokens may only read", 5);
    let read = TOKEN;

    for path in ["/api/hosts", "/api/jobs", "/metrics", "/api/policies"] {
        let (status, body) = http(port, "GET", path, Some(read), None);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, doc) = http(port, "GET", "/api/openapi.json", None, None);
    let doc = json_of(&doc);
    assert!(
        doc["paths"]["/api/jobs/{id}"]["delete"].is_object(),
        "{doc}"
    );
    assert!(doc["components"]["schemas"]["Scope"].is_object(), "{doc}");
    let backup = json!({"kind": "backup", "host": HOST, "vm": vm.name, "mode": "full"});
    assert_forbidden(post(port, read, &backup), "operate", "read");
    let restore_of = |snapshot: &str, name: &str| json!({"kind": "restore", "host": HOST, "snapshot": snapshot, "name": name, "define": true, "force": true});
    assert_forbidden(post(port, read, &restore_of("x", "y")), "admin", "read");
    assert!(jobs(&node).is_empty(), "a refused request queued nothing");

    // Operate: two backups of one VM; the second waits for the first and is cancelled.
    let (status, first) = post(port, OPERATE, &backup);
    assert_eq!(status, 202, "{first}");
    let (status, second) = post(port, OPERATE, &backup);
    assert_eq!(status, 202, "{second}");
    let (first, second) = (
        first["id"].as_i64().expect("id"),
        second["id"].as_i64().expect("id"),
    );
    let del = format!("/api/jobs/{second}");
    let (status, body) = http(port, "DELETE", &del, Some(read), None);
    assert_forbidden((status, json_of(&body)), "operate", "read");
    let (status, body) = http(port, "DELETE", &del, Some(OPERATE), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["status"], "cancelled", "{body}");
    let done = wait_job_http(port, first, &daemon);
    assert_eq!(done["status"], "succeeded", "{done}");
    let cancelled = wait_job_http(port, second, &daemon);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["started"].is_null(), "it never ran: {cancelled}");
    let snapshot = done["snapshot"].as_str().expect("snapshot").to_string();

    // Restores are admin's, with or without force; operate gets 403 and nothing runs.
    let new_name = virtkeep_lab::unique_name("vkd-scope-restored");
    let _restored = TestVm::adopt(&new_name);
    assert_forbidden(
        post(port, OPERATE, &restore_of(&snapshot, &new_name)),
        "admin",
        "operate",
    );
    let (status, body) = post(port, ADMIN, &restore_of(&snapshot, &new_name));
    assert_eq!(status, 202, "{body}");
    let rid = body["id"].as_i64().expect("id");
    let job = wait_job_http(port, rid, &daemon);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(TestVm::adopt(&new_name).disk_checksum("vda"), sum);
    // Cancelling a restore is admin's too; a finished job cannot be cancelled.
    let del = format!("/api/jobs/{rid}");
    let (status, body) = http(port, "DELETE", &del, Some(OPERATE), None);
    assert_forbidden((status, json_of(&body)), "admin", "operate");
    let (status, body) = http(port, "DELETE", &del, Some(ADMIN), None);
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        http(port, "DELETE", "/api/jobs/999999", Some(ADMIN), None).0,
        404
    );

    // A body over max_request_bytes is refused before it is parsed.
    let big = json!({"kind": "backup", "host": HOST, "vm": "x".repeat(8192)});
    let (status, body) = post(port, ADMIN, &big);
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert_eq!(jobs(&node).len(), 3, "{:#?}", jobs(&node));
    daemon.terminate();
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A self-signed certificate for 127.0.0.1 / localhost: (cert, key) PEM, and its
/// SHA-256 fingerprint as openssl prints it.
fn make_certificate(dir: &Path, tag: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = dir.join(format!("{tag}.crt"));
    let key = dir.join(format!("{tag}.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=virtkeep-test-{tag}"),
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        &key.display().to_string(),
        "-out",
        &cert.display().to_string(),
    ]);
    let fp = openssl(&[
        "x509",
        "-in",
        &cert.display().to_string(),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    (cert, key, fp)
}

/// The fingerprint of the certificate the server presents now (a new connection).
fn served_fingerprint(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 20 openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `curl` verifying the server against `ca`: the HTTP status, or 0 when TLS failed.
fn curl_status(port: u16, ca: &Path, scheme: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("{scheme}://127.0.0.1:{port}/api/hosts"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Replaces `dst` atomically, as a certificate renewal tool would.
fn swap_in(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy");
    std::fs::rename(&tmp, dst).expect("rename");
}

/// HTTPS with the configured PEM files; SIGHUP makes new connections get the new
/// certificate; a broken file on reload keeps the previous one.
#[test]
fn https_with_a_certificate_reloaded_on_sighup() {
    let node = Node::new();
    let dir = node.dir.path();
    let (cert1, key1, fp1) = make_certificate(dir, "one");
    let (cert2, key2, fp2) = make_certificate(dir, "two");
    assert_ne!(fp1, fp2);
    let (cert, key) = (dir.join("api.crt"), dir.join("api.key"));
    swap_in(&cert1, &cert);
    swap_in(&key1, &key);
    let port = free_port();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[daemon.api]
listen = "127.0.0.1:{port}"
tls_certificate = "{}"
tls_key = "{}"
tokens = [{{ env = "VKD_TEST_TOKEN", scope = "read" }}]
"#,
            catalog(&node),
            cert.display(),
            key.display()
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    assert!(daemon.log_text().contains("https"), "{}", daemon.log_text());
    assert_eq!(served_fingerprint(port), fp1);
    assert_eq!(curl_status(port, &cert1, "https"), 200);
    assert_eq!(
        curl_status(port, &cert2, "https"),
        0,
        "verified by the wrong CA"
    );
    assert_ne!(
        curl_status(port, &cert1, "http"),
        200,
        "plain HTTP on the TLS port"
    );

    swap_in(&cert2, &cert);
    swap_in(&key2, &key);
    daemon.signal("HUP");
    daemon.wait_log("SIGHUP: TLS certificate reloaded", 20);
    assert_eq!(served_fingerprint(port), fp2);
    assert_eq!(curl_status(port, &cert2, "https"), 200);
    assert_eq!(curl_status(port, &cert1, "https"), 0);

    // A broken certificate file: the reload fails, the last good one stays.
    std::fs::write(&cert, "not a certificate\n").expect("break");
    daemon.signal("HUP");
    daemon.wait_log("TLS reload failed", 20);
    assert_eq!(served_fingerprint(port), fp2);
    assert_eq!(curl_status(port, &cert2, "https"), 200);
    daemon.terminate();
}

/// A non-loopback listen address without TLS stops the daemon at start with a clear
/// error naming the place and the ways out; `insecure_plain_http = true` allows it.
#[test]
fn a_network_address_without_tls_is_refused_unless_allowed() {
    let node = Node::new();
    let port = free_port();
    let base = std::fs::read_to_string(node.config()).expect("config");
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[daemon.api]
listen = "0.0.0.0:{port}"
token_env = "VKD_TEST_TOKEN"
"#,
            catalog(&node)
        ),
    );
    let out = node
        .cmd()
        .arg("daemon")
        .env("VKD_TEST_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0.0.0.0") && stderr.contains("not a loopback address"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tls_certificate") && stderr.contains("insecure_plain_http"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:", node.config().display())),
        "{stderr}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );

    std::fs::write(node.config(), base).expect("config");
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[daemon.api]
listen = "0.0.0.0:{port}"
token_env = "VKD_TEST_TOKEN"
insecure_plain_http = true
request_timeout = "2s"

[hosts.silent]
address = "127.0.0.1"
port = {}
user = "root"
identity = "{}"
"#,
            catalog(&node),
            silent.local_addr().expect("addr").port(),
            node.lab.ssh_key.display()
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    assert_eq!(http(port, "GET", "/api/hosts", Some(TOKEN), None).0, 200);
    // A host that accepts TCP but never says a word: the request ends at request_timeout.
    let asked = Instant::now();
    let (status, body) = http(port, "GET", "/api/hosts/silent/vms", Some(TOKEN), None);
    assert_eq!(status, 503, "{body}");
    assert!(
        json_of(&body)["error"]
            .as_str()
            .is_some_and(|e| e.contains("request_timeout")),
        "{body}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    // A connection that never sends a request is closed soon after request_timeout.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let opened = Instant::now();
    let mut byte = [0u8; 1];
    let closed = std::io::Read::read(&mut idle, &mut byte);
    assert!(
        matches!(closed, Ok(0))
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "{closed:?}"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(20),
        "{:?}",
        opened.elapsed()
    );
    // SIGHUP (`systemctl reload`) without TLS does not stop the daemon.
    daemon.signal("HUP");
    daemon.wait_log("SIGHUP: nothing to reload", 20);
    assert_eq!(http(port, "GET", "/api/hosts", Some(TOKEN), None).0, 200);
    daemon.terminate();
}

/// DELETE of a running backup (stopped at a failpoint mid export): the job ends as
/// `cancelled`, is not retried, the VM runs on its own disk with nothing left on the
/// host, and the next backup succeeds.
#[test]
fn cancelling_a_running_backup_heals_the_vm() {
    let node = Node::new();
    let vm = TestVm::builder("vkd-cancel")
        .raw_disk(64 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x62, 0, 32 * MIB);
    let sources = vm.current_sources();
    let port = free_port();
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retries = 2
retry_backoff = "1s"

[daemon.api]
listen = "127.0.0.1:{port}"
tokens = [{{ env = "VKD_TEST_TOKEN", scope = "operate" }}]
"#,
            catalog(&node)
        ),
    );
    let mut daemon = Daemon::start_with(&node, Some("export-chunk-written"));
    daemon.wait_log("API listening", 30);
    let backup = json!({"kind": "backup", "host": HOST, "vm": vm.name, "mode": "full"});
    let (status, body) = post(port, TOKEN, &backup);
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().expect("id");
    daemon.wait_log(&failpoint_reached("export-chunk-written"), 120);
    let (_, job) = http(port, "GET", &format!("/api/jobs/{id}"), Some(TOKEN), None);
    assert_eq!(json_of(&job)["status"], "running", "{job}");

    let started = Instant::now();
    let del = format!("/api/jobs/{id}");
    let (status, body) = http(port, "DELETE", &del, Some(TOKEN), None);
    assert_eq!(status, 202, "{body}");
    assert_eq!(json_of(&body)["status"], "cancelling", "{body}");
    let job = wait_job_http(port, id, &daemon);
    eprintln!(
        "cancel and heal took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled")),
        "{job}"
    );
    assert!(
        job["note"].as_str().is_some_and(|n| n.contains("healed")),
        "{job}"
    );
    assert!(job["snapshot"].is_null(), "{job}");
    assert_eq!(http(port, "DELETE", &del, Some(TOKEN), None).0, 409);
    // Not retried, although retries = 2.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(jobs(&node).len(), 1, "{:#?}", jobs(&node));

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
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(0));
    daemon.terminate();

    // The next backup (a daemon without the failpoint) succeeds.
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    let (status, body) = post(port, TOKEN, &backup);
    assert_eq!(status, 202, "{body}");
    let next = wait_job_http(port, body["id"].as_i64().expect("id"), &daemon);
    assert_eq!(next["status"], "succeeded", "{next}");
    assert!(vm.leftovers().is_empty(), "leftovers: {:?}", vm.leftovers());
    assert_eq!(vm.current_sources(), sources);
    daemon.terminate();
}

/// Finished jobs beyond history_max_jobs leave the catalog (checked at start, then
/// hourly); the newest stay.
#[test]
fn job_history_beyond_the_limit_is_removed() {
    let node = Node::new();
    let port = free_port();
    let absent = virtkeep_lab::unique_name("vkd-absent");
    append_config(
        &node,
        &format!(
            r#"
[daemon]
catalog = "{}"
retries = 0
history_max_jobs = 2

[daemon.api]
listen = "127.0.0.1:{port}"
tokens = [{{ env = "VKD_TEST_TOKEN", scope = "operate" }}]
"#,
            catalog(&node)
        ),
    );
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("API listening", 30);
    // Backups of a VM the host does not have: they fail at once.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = post(
            port,
            TOKEN,
            &json!({"kind": "backup", "host": HOST, "vm": absent}),
        );
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_i64().expect("id"));
    }
    wait_jobs(&node, &daemon, 120, "three failed jobs", |l| {
        l.iter().filter(|j| j["status"] == "failed").count() == 3
    });
    daemon.terminate();
    let mut daemon = Daemon::start(&node);
    daemon.wait_log("job history limits applied", 30);
    let left: Vec<i64> = jobs(&node)
        .iter()
        .map(|j| j["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(left, vec![ids[2], ids[1]], "the newest two stay");
    daemon.terminate();
}
