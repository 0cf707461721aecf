//! The repository commands through the binary: encryption and wrong keys, verify
//! finding a damaged chunk, prune and gc, and a backup into S3 (the lab's Ceph RGW).

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

fn chunk_files(repo: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(repo.join("chunks"))
        .expect("chunks dir")
        .flatten()
    {
        for f in std::fs::read_dir(dir.path())
            .expect("fan-out dir")
            .flatten()
        {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

#[test]
fn encrypted_repository_verify_prune_gc() {
    let node = Node::new();
    let vm = TestVm::builder("repo")
        .raw_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x11, 0, 6 * MIB);
    let repo = node.dir.path().join("enc");
    let repo_s = repo.display().to_string();
    let pass = |c: &mut assert_cmd::Command| {
        c.env("VK_PASS", "correct horse");
    };
    let mut init = node.cmd();
    pass(&mut init);
    init.args([
        "repo",
        "init",
        &repo_s,
        "--encryption",
        "aes-256-gcm",
        "--passphrase-env",
        "VK_PASS",
    ])
    .assert()
    .success();

    let spec = format!("{HOST}/{}", vm.name);
    let backup = |extra: &[&str]| {
        let mut c = node.cmd();
        pass(&mut c);
        let out = c
            .args([
                "--json",
                "backup",
                &spec,
                "--repo",
                &repo_s,
                "--passphrase-env",
                "VK_PASS",
                "--mode",
                "full",
            ])
            .args(extra)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v[0]["id"].as_str().expect("id").to_string()
    };
    let first = backup(&[]);
    vm.write_pattern("vda", 0x12, 8 * MIB, 4 * MIB);
    let second = backup(&[]);

    // A wrong passphrase is refused with guidance, and nothing is written.
    let before = chunk_files(&repo);
    let out = node
        .cmd()
        .env("VK_PASS", "wrong")
        .args([
            "snapshots",
            "--repo",
            &repo_s,
            "--passphrase-env",
            "VK_PASS",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(12));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(chunk_files(&repo), before);
    // The plaintext pattern appears nowhere in the stored chunks.
    for f in &before {
        let bytes = std::fs::read(f).expect("chunk");
        assert!(
            !bytes.windows(64).any(|w| w.iter().all(|b| *b == 0x11)),
            "{} holds plaintext",
            f.display()
        );
    }

    let run = |args: &[&str]| {
        let mut c = node.cmd();
        pass(&mut c);
        c.args(args)
            .args(["--repo", &repo_s, "--passphrase-env", "VK_PASS"])
            .output()
            .expect("run")
    };
    assert!(run(&["verify", "--all"]).status.success());

    // Damage one stored chunk (other bytes, same name): the default check downloads no
    // chunk and passes; --read-data names it and the backups it breaks, exit 1.
    let victim = &before[0];
    let mut bytes = std::fs::read(victim).expect("chunk");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(victim, &bytes).expect("write");
    let digest_of =
        |p: &std::path::Path| p.file_name().expect("name").to_string_lossy().to_string();
    let digest = digest_of(victim);
    let out = run(&["--json", "verify", "--all"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["read_data"], false, "{report}");
    assert_eq!(
        report["corrupt"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    let out = run(&["--json", "verify", "--all", "--read-data"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["read_data"], true, "{report}");
    let corrupt = report["corrupt"].as_array().expect("corrupt");
    assert!(
        corrupt.iter().any(|c| c["digest"] == digest.as_str()),
        "{report}"
    );
    assert!(
        !report["broken_snapshots"]
            .as_array()
            .expect("broken")
            .is_empty()
    );
    // A deleted chunk is found by both levels.
    let gone = &before[1];
    std::fs::remove_file(gone).expect("delete chunk");
    let gone = digest_of(gone);
    for extra in [None, Some("--read-data")] {
        let mut args = vec!["--json", "verify", "--all"];
        args.extend(extra);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let missing = report["missing"].as_array().expect("missing");
        assert!(
            missing.iter().any(|c| c["digest"] == gone.as_str()),
            "{args:?}: {report}"
        );
    }
    // The text report says what it did.
    let out = run(&["verify", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("contents not read") && text.contains(&format!("missing chunk {gone}")),
        "{text}"
    );

    // prune keeps the newest; gc frees what only the pruned backup used.
    let out = run(&["--json", "prune", "--keep-last", "1", "--dry-run"]);
    let decisions: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let gone: Vec<&str> = decisions
        .as_array()
        .expect("list")
        .iter()
        .filter(|d| d["keep"] == false)
        .map(|d| d["id"].as_str().expect("id"))
        .collect();
    assert_eq!(gone, [first.as_str()]);
    assert!(run(&["prune", "--keep-last", "1"]).status.success());
    let out = run(&["--json", "snapshots"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(|l| l.len()), Some(1));
    assert_eq!(list[0]["id"], second.as_str());
    let out = run(&["--json", "gc", "--grace-hours", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backup_into_s3_on_ceph_rgw() {
    let node = Node::new();
    let lab = node.lab;
    let vm = TestVm::builder("s3")
        .qcow2_disk(16 * MIB)
        .raw_disk(8 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x21, 0, 3 * MIB);
    vm.write_pattern("vdb", 0x22, MIB, MIB);
    let sums = vec![
        ("vda".to_string(), vm.disk_checksum("vda")),
        ("vdb".to_string(), vm.disk_checksum("vdb")),
    ];
    let location = format!("s3://{}/{}", lab.s3_bucket, unique_name("e2e"));
    let s3 = |c: &mut assert_cmd::Command| {
        c.env("AWS_ENDPOINT_URL", &lab.s3_endpoint)
            .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
            .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
            .env("AWS_REGION", &lab.s3_region);
    };
    // Another location than the configured one: its key file is named on each command.
    let key_file = node.dir.path().join("s3.key").display().to_string();
    let mut c = node.cmd();
    s3(&mut c);
    c.args(["repo", "init", &location, "--encryption", "none"])
        .args(["--key-file", &key_file])
        .assert()
        .success();
    let mut c = node.cmd();
    s3(&mut c);
    let out = c
        .args([
            "--json",
            "backup",
            &format!("{HOST}/{}", vm.name),
            "--repo",
            &location,
            "--key-file",
            &key_file,
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v[0]["id"].as_str().expect("id").to_string();
    let new_name = unique_name("s3-restored");
    let restored = TestVm::adopt(&new_name);
    let mut c = node.cmd();
    s3(&mut c);
    let out = c
        .args([
            "--json",
            "restore",
            &id,
            "--to",
            HOST,
            "--name",
            &new_name,
            "--define",
            "--repo",
            &location,
            "--key-file",
            &key_file,
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let got: Vec<(String, String)> = r["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| {
            let sum = crate::harness::restored_checksum(
                d["path"].as_str().expect("p"),
                d["format"].as_str().expect("f"),
            );
            (d["target"].as_str().expect("t").to_string(), sum)
        })
        .collect();
    assert_eq!(got, sums);
    drop(restored);

    // verify on S3: change one chunk's bytes and delete another. The default check (one
    // listing, no download) finds the deleted chunk only; --read-data finds both.
    let backend = virtkeep_repo::Location::parse(&location)
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
        .expect("backend");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (changed, deleted) = rt.block_on(async {
        use futures::TryStreamExt;
        let chunks: Vec<virtkeep_repo::ObjectInfo> =
            backend.list("chunks/").try_collect().await.expect("list");
        assert!(chunks.len() >= 2, "{chunks:?}");
        let mut bytes = backend
            .get(&chunks[0].key)
            .await
            .expect("get")
            .expect("there")
            .to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        backend
            .put(&chunks[0].key, bytes.into())
            .await
            .expect("put");
        backend.delete(&chunks[1].key).await.expect("delete");
        let name = |k: &str| k.rsplit('/').next().expect("name").to_string();
        (name(&chunks[0].key), name(&chunks[1].key))
    });
    let verify = |extra: &[&str]| {
        let mut c = node.cmd();
        s3(&mut c);
        let out = c
            .args(["--json", "verify", "--repo", &location])
            .args(["--key-file", &key_file])
            .args(extra)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let digests = |k: &str| -> Vec<String> {
            v[k].as_array()
                .expect(k)
                .iter()
                .map(|p| p["digest"].as_str().expect("d").to_string())
                .collect()
        };
        (digests("missing"), digests("corrupt"))
    };
    assert_eq!(verify(&[]), (vec![deleted.clone()], vec![]));
    assert_eq!(verify(&["--read-data"]), (vec![deleted], vec![changed]));
}

/// verify and gc show a bar per stage when stderr is a terminal (a pseudo-terminal made
/// by `script`), and log lines instead when it is not.
#[test]
fn verify_and_gc_progress_on_a_terminal_log_lines_otherwise() {
    let node = Node::new();
    let vm = TestVm::builder("progress")
        .qcow2_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x31, 0, 2 * MIB);
    node.backup(&vm.name, &["--mode", "full"]);
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let on_terminal = |args: &str| -> String {
        let line = format!(
            "{} --config {} {args}",
            bin.display(),
            node.config().display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("HOME", node.dir.path())
            .env_remove("VIRTKEEP_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("script");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{args}: {text}");
        text
    };
    let shown = on_terminal("verify --read-data");
    for stage in ["reading manifests and indexes [", "reading chunks ["] {
        assert!(shown.contains(stage), "{stage:?} not in {shown:?}");
    }
    assert!(shown.contains("1 backups, "), "{shown:?}");
    let shown = on_terminal("gc --dry-run");
    for stage in ["reading indexes [", "sweeping chunks "] {
        assert!(shown.contains(stage), "{stage:?} not in {shown:?}");
    }

    // Not a terminal: no bar, and with -v the stages as log lines.
    for args in [["-v", "verify", "--read-data"], ["-v", "gc", "--dry-run"]] {
        let out = node.run(&args);
        assert!(out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains(" ["), "{args:?}: {stderr}");
        let stage = if args[1] == "verify" {
            "reading chunks"
        } else {
            "sweeping chunks"
        };
        assert!(
            stderr.contains(&format!("stage starts stage=\"{stage}\"")),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("stage done"), "{args:?}: {stderr}");
    }
}
