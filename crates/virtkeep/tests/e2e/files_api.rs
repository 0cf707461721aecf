//! File-level access to backups (issue 19) beyond the CLI on a local repository: the
//! daemon's `/api/backups/{id}/files` routes with token scopes, a disk whose GPT uses
//! 4096-byte sectors, and `files ls/get` + `mount` of a backup in an encrypted
//! repository on S3 (the lab's Ceph RGW).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use virtkeep_lab::{TestVm, unique_name};

use crate::daemon::{Daemon, TOKEN, append_config, catalog};
use crate::files::{
    fixture_vm, fs_of, make_content, mounted, parted_partitions, partitions_of, sh, tree, wait_exit,
};
use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;
const READER: &str = "vkf-read-token-4c1e77";

/// A loop device with 4096-byte logical sectors over a whole file, detached on drop.
struct Loop4k(String);

impl Loop4k {
    fn new(file: &Path) -> Loop4k {
        let dev = sh(Command::new("losetup")
            .args(["-f", "--show", "--sector-size", "4096"])
            .arg(file));
        Loop4k(dev.trim().to_string())
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// 6 MiB of reproducible noise, with a NUL-free sha256 source on disk.
fn noise(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// vda: a GPT written by sgdisk through a loop device with 4096-byte sectors (header
/// at byte 4096), partition 1 = ext4 "api" from 1 MiB holding `make_content` plus
/// `etc/big.bin` (6 MiB of noise). Returns the VM and the content directory.
fn gpt4k_vm(dir: &Path) -> (TestVm, PathBuf) {
    let vm = TestVm::builder("files-api")
        .raw_disk(64 * MIB)
        .running(false)
        .build();
    let vda = vm.disk("vda").path.clone().expect("vda file");
    {
        let lo = Loop4k::new(&vda);
        sh(Command::new("sgdisk")
            .args(["-n", "1:256:+40M", "-t", "1:8300", "-c", "1:api"])
            .arg(&lo.0));
    }
    let content = dir.join("content");
    make_content(&content);
    std::fs::write(content.join("etc/big.bin"), noise(6 * MIB)).expect("big.bin");
    let img = dir.join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(40 * MIB))
        .expect("fs image");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "api", "-d"])
        .arg(&content)
        .arg(&img));
    sh(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", vda.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"]));
    (vm, content)
}

/// An answer of the API read with curl: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// `GET route?path=PATH` (URL-encoded by curl) with `token`.
fn get(port: u16, route: &str, path: Option<&str>, token: Option<&str>) -> Answer {
    let dir = tempfile::tempdir().expect("tempdir");
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut c = Command::new("curl");
    c.args(["-sS", "-G", "--max-time", "120", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"]);
    if let Some(p) = path {
        c.arg("--data-urlencode").arg(format!("path={p}"));
    }
    if let Some(t) = token {
        c.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let code = sh(c.arg(format!("http://127.0.0.1:{port}{route}")));
    Answer {
        status: code.trim().parse().expect("status"),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn sha256(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("x");
    std::fs::write(&f, bytes).expect("write");
    sh(Command::new("sha256sum").arg(&f))
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A daemon answering the API on a free port: the legacy token (read) and a token
/// file with scope read; its `TMPDIR` is a path that does not exist.
fn api_daemon(node: &Node) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let tokens = node.dir.path().join("read.tokens");
    std::fs::write(&tokens, format!("{READER}\n")).expect("token file");
    append_config(
        node,
        &format!(
            r#"
[daemon]
catalog = "{}"

[daemon.api]
listen = "127.0.0.1:{port}"
token_env = "VKD_TEST_TOKEN"
tokens = [ {{ file = "{}", scope = "read" }} ]
"#,
            catalog(node),
            tokens.display()
        ),
    );
    // Downloads stream from the backup: a daemon whose temporary directory does not
    // exist serves them all the same (a staging copy would fail there).
    let no_tmp = node.dir.path().join("no-tmp");
    let no_tmp = no_tmp.to_str().expect("utf-8 path");
    let mut daemon = Daemon::start_env(node, None, &[("TMPDIR", no_tmp)]);
    daemon.wait_log("API listening", 30);
    (daemon, port)
}

/// The API lists what `files ls` lists (a GPT with 4096-byte sectors included) and
/// downloads files byte-exact with a safe Content-Disposition, for a read-scoped token
/// only; malformed, traversing and oversized paths get 400, missing things 404.
#[test]
fn files_api_lists_and_downloads_with_the_read_scope() {
    let node = Node::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (vm, content) = gpt4k_vm(work.path());
    let id = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (daemon, port) = api_daemon(&node);
    let files = format!("/api/backups/{id}/files");
    let download = format!("{files}/download");
    let doc = get(port, "/api/openapi.json", None, None).json();
    for route in [
        "/api/backups/{id}/files",
        "/api/backups/{id}/files/download",
    ] {
        assert!(
            doc["paths"][route]["get"].is_object(),
            "{route} not in the OpenAPI document"
        );
    }

    // The layout: the 4K GPT's partition at 1 MiB, as the CLI shows it.
    let cli = node.json(&["files", "ls", &id]);
    let a = get(port, &files, None, Some(READER));
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let layout = a.json();
    assert_eq!(layout, cli);
    let d = &layout["disks"][0];
    assert_eq!(d["table"], "gpt", "{d}");
    assert_eq!(partitions_of(d), [(1, MIB, 40 * MIB)], "{d}");
    assert_eq!(fs_of(d, 1), ("ext4".into(), "api".into()));

    // A directory, equal to `files ls --json`; the legacy (unscoped = read) token too.
    let cli = node.json(&["files", "ls", &id, "vda:1:/etc"]);
    for token in [READER, TOKEN] {
        let a = get(port, &files, Some("vda:1:/etc"), Some(token));
        assert_eq!(a.status, 200);
        assert_eq!(a.json(), cli);
    }
    let names: Vec<&str> = cli["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "big.bin",
            "hard",
            "hostname",
            "link",
            "sparse",
            "sub",
            "ünï cödé.txt"
        ]
    );

    // Downloads: bytes equal the source by sha256, with length and a safe name;
    // big.bin (6 MiB) streams in more pieces than the stream buffers (4 MiB).
    for (path, name, disposition) in [
        ("vda:1:/etc/big.bin", "big.bin", "filename=\"big.bin\""),
        ("vda:1:/etc/sparse", "sparse", "filename=\"sparse\""),
        (
            "vda:1:/etc/ünï cödé.txt",
            "ünï cödé.txt",
            "filename*=UTF-8''%C3%BCn%C3%AF%20c%C3%B6d%C3%A9.txt",
        ),
    ] {
        let a = get(port, &download, Some(path), Some(READER));
        assert_eq!(
            a.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let want = std::fs::read(content.join("etc").join(name)).expect("source");
        assert_eq!(sha256(&a.body), sha256(&want), "{path}");
        assert_eq!(a.header("content-length"), Some(want.len().to_string()));
        let cd = a.header("content-disposition").expect("disposition");
        assert!(
            cd.starts_with("attachment;") && cd.contains(disposition),
            "{cd}"
        );
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/octet-stream")
        );
    }
    assert_no_downloads_left(&node);
    refusals(port, &id, &files, &download);
    daemon.terminate();
}

/// No token or a wrong one: 401; bad targets 400; missing things 404; the checks
/// answer JSON errors.
fn refusals(port: u16, id: &str, files: &str, download: &str) {
    for token in [None, Some("not-a-token")] {
        let a = get(port, files, Some("vda:1:/etc"), token);
        assert_eq!(a.status, 401);
        assert!(a.json()["error"].is_string());
        let a = get(port, download, Some("vda:1:/etc/big.bin"), token);
        assert_eq!(a.status, 401);
        assert!(a.body.len() < 1024, "no file bytes without a token");
    }
    let long = format!("vda:1:/{}", "a/".repeat(3000));
    for (route, path, status, needle) in [
        (files, "vda:1:/etc/../..", 400, "normal"),
        (download, "vda:1:/../etc/hostname", 400, "normal"),
        (files, "vda:1://etc", 400, "normal"),
        (files, long.as_str(), 400, "longer than"),
        (files, "vda;rm:1:/", 400, "invalid path"),
        (files, "vda:1:etc", 400, "invalid path"),
        (download, "vda:1:/etc", 400, "directory"),
        (download, "vda:1:/etc/link", 400, "symlink"),
        (download, "vda:1:/", 400, "directory"),
        (files, "vda:1:/nope", 404, "not found"),
        (download, "vda:1:/etc/nope", 404, "not found"),
        (files, "vdz:1:/", 404, "no disk"),
        (files, "vda:7:/", 404, "no partition 7"),
    ] {
        let a = get(port, route, Some(path), Some(READER));
        let body = String::from_utf8_lossy(&a.body).into_owned();
        assert_eq!(a.status, status, "{route} {path}: {body}");
        let e = a.json()["error"].as_str().unwrap_or("").to_string();
        assert!(e.contains(needle), "{route} {path}: {e}");
    }
    let a = get(port, download, None, Some(READER));
    assert_eq!(a.status, 400);
    let a = get(port, "/api/backups/..%2Fx/files", None, Some(READER));
    assert!(a.status == 400 || a.status == 404, "{}", a.status);
    let a = get(
        port,
        "/api/backups/no-such-backup/files",
        None,
        Some(READER),
    );
    assert_eq!(a.status, 404, "{}", String::from_utf8_lossy(&a.body));
    let _ = id;
}

/// Downloads stream without a temporary copy: the daemon's missing `TMPDIR` is still
/// missing, and nothing of theirs is in the system's.
fn assert_no_downloads_left(node: &Node) {
    assert!(!node.dir.path().join("no-tmp").exists());
    let tmp = std::env::temp_dir();
    let left: Vec<String> = std::fs::read_dir(&tmp)
        .expect("tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("virtkeep-download-"))
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
}

/// The lab's RGW credentials for a command.
fn s3_env(node: &Node, c: &mut Command) {
    let lab = node.lab;
    c.env("AWS_ENDPOINT_URL", &lab.s3_endpoint)
        .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
        .env("AWS_REGION", &lab.s3_region);
}

fn virtkeep(node: &Node) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtkeep"));
    c.arg("--config")
        .arg(node.config())
        .env("HOME", node.dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env_remove("VIRTKEEP_PASSWORD_FILE")
        .env_remove("VIRTKEEP_PASSWORD_COMMAND");
    s3_env(node, &mut c);
    c
}

fn json_run(node: &Node, args: &[&str]) -> Value {
    let out = sh(virtkeep(node).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The main files fixture backed up into an encrypted repository on S3 (RGW): `files
/// ls` shows the tables parted sees, `files get` copies a tree equal to the source,
/// `mount` shows each DISK.img byte-equal to its source disk, and umount leaves
/// nothing mounted.
#[test]
fn files_ls_get_and_mount_from_encrypted_s3() {
    let node = Node::new();
    let vm = fixture_vm();
    let location = format!("s3://{}/{}", node.lab.s3_bucket, unique_name("files"));
    let key = node.dir.path().join("s3.key").display().to_string();
    sh(virtkeep(&node).args(["repo", "init", &location, "--key-file", &key]));
    let repo = ["--repo", location.as_str(), "--key-file", key.as_str()];
    let mut args = vec!["backup".to_string(), format!("{HOST}/{}", vm.name)];
    args.extend(repo.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = json_run(&node, &args);
    let id = v[0]["id"].as_str().expect("id").to_string();
    fn with<'a>(a: &[&'a str], repo: &[&'a str]) -> Vec<&'a str> {
        let mut all: Vec<&str> = a.to_vec();
        all.extend_from_slice(repo);
        all
    }
    // The repository is encrypted: without the key nothing is read.
    let out = virtkeep(&node)
        .args(["files", "ls", &id, "--repo", &location])
        .output()
        .expect("run");
    assert!(!out.status.success());

    let ls = json_run(&node, &with(&["files", "ls", &id], &repo));
    let vda = vm.disk("vda").path.clone().expect("vda");
    let vdb = vm.disk("vdb").path.clone().expect("vdb");
    assert_eq!(partitions_of(&ls["disks"][0]), parted_partitions(&vda));
    assert_eq!(partitions_of(&ls["disks"][1]), parted_partitions(&vdb));
    assert_eq!(fs_of(&ls["disks"][0], 1), ("ext4".into(), "root".into()));
    assert_eq!(fs_of(&ls["disks"][1], 6), ("ext4".into(), "home".into()));

    let src = node.dir.path().join("src");
    make_content(&src);
    let out = node.dir.path().join("out");
    let outs = out.display().to_string();
    json_run(
        &node,
        &with(&["files", "get", &id, "vdb:6:/etc", "--to", &outs], &repo),
    );
    assert_eq!(tree(&out.join("etc")), tree(&src.join("etc")));

    let dir = node.dir.path().join("mnt");
    std::fs::create_dir(&dir).expect("mnt");
    let mut child = mount(&node, &id, &dir, &repo);
    assert!(mounted(&dir));
    sh(Command::new("cmp").arg(&vda).arg(dir.join("vda.img")));
    sh(Command::new("cmp").arg(&vdb).arg(dir.join("vdb.img")));
    sh(Command::new("umount").arg(&dir));
    let status = wait_exit(&mut child);
    assert!(status.success(), "mount exit {status}");
    assert!(!mounted(&dir));
}

/// `virtkeep --json mount ID DIR` in the background, once it is ready.
fn mount(node: &Node, id: &str, dir: &Path, repo: &[&str]) -> Child {
    let mut child = virtkeep(node)
        .args(["--json", "mount", id])
        .arg(dir)
        .args(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mount");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(v["files"], serde_json::json!(["vda.img", "vdb.img"]));
    child
}
