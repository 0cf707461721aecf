//! S3 Object Lock (lab Ceph RGW, GOVERNANCE mode so the test can clean up): with the
//! repository's own (writer's) credentials, `prune` + `gc` and a raw DELETE of a chunk
//! version cannot destroy a locked backup, which still verifies and restores
//! byte-exact; `repo init --object-lock` refuses a bucket made without Object Lock.

use std::process::Command;

use serde_json::Value;
use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node, restored_checksum};

const MIB: u64 = 1 << 20;

/// A node command with the lab's S3 credentials.
fn cmd(node: &Node) -> assert_cmd::Command {
    let lab = node.lab;
    let mut c = node.cmd();
    c.env("AWS_ENDPOINT_URL", &lab.s3_endpoint)
        .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
        .env("AWS_REGION", &lab.s3_region);
    c
}

fn run(node: &Node, args: &[&str]) -> std::process::Output {
    cmd(node).arg("--json").args(args).output().expect("run")
}

fn json(node: &Node, args: &[&str]) -> Value {
    let out = run(node, args);
    assert!(
        out.status.success(),
        "virtkeep {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn s3_backend(node: &Node, bucket: &str, prefix: &str) -> virtkeep_repo::S3Backend {
    let lab = node.lab;
    let opts = virtkeep_repo::S3Options {
        endpoint: Some(lab.s3_endpoint.clone()),
        region: Some(lab.s3_region.clone()),
        access_key: Some(lab.s3_access_key.clone()),
        secret_key: Some(lab.s3_secret_key.clone()),
        allow_http: true,
        instance_metadata: false,
    };
    virtkeep_repo::S3Backend::new(bucket, prefix, &opts).expect("backend")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Removes a test bucket with everything in it, bypassing GOVERNANCE retention, with the
/// aws cli when it is installed (best effort: the lab is not harmed by a leftover).
fn remove_bucket(node: &Node, bucket: &str) {
    let lab = node.lab;
    let aws = |args: &[&str]| {
        Command::new("aws")
            .args([
                "--endpoint-url",
                &lab.s3_endpoint,
                "--output",
                "json",
                "s3api",
            ])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &lab.s3_access_key)
            .env("AWS_SECRET_ACCESS_KEY", &lab.s3_secret_key)
            .env("AWS_DEFAULT_REGION", &lab.s3_region)
            .output()
    };
    let Ok(out) = aws(&["list-object-versions", "--bucket", bucket]) else {
        return;
    };
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    for kind in ["Versions", "DeleteMarkers"] {
        for v in listing[kind].as_array().into_iter().flatten() {
            let (Some(key), Some(id)) = (v["Key"].as_str(), v["VersionId"].as_str()) else {
                continue;
            };
            // `=`: version ids may start with `-`.
            let version = format!("--version-id={id}");
            let _ = aws(&[
                "delete-object",
                "--bucket",
                bucket,
                "--key",
                key,
                &version,
                "--bypass-governance-retention",
            ]);
        }
    }
    let _ = aws(&["delete-bucket", "--bucket", bucket]);
}

/// Init with GOVERNANCE lock (the bucket is created with Object Lock), two backups;
/// the writer's `prune --keep-last 1` keeps the older one ("under object lock
/// retention"), `gc` removes nothing of it, a raw DELETE of one of its chunks' versions
/// is refused; the backup verifies with --read-data and restores byte-exact.
#[test]
fn object_lock_backup_survives_writer_prune_gc_and_version_delete() {
    let node = Node::new();
    let bucket = unique_name("lock");
    let location = format!("s3://{bucket}/repo");
    let key = node.dir.path().join("lock.key");
    let key_s = key.display().to_string();
    let repo_args = ["--repo", location.as_str(), "--key-file", key_s.as_str()];
    let init = run(
        &node,
        &[
            "repo",
            "init",
            &location,
            "--encryption",
            "none",
            "--key-file",
            &key_s,
            "--object-lock",
            "governance",
            "--retain",
            "1d",
        ],
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(init.status.success(), "{init:?}");
        survives(&node, &bucket, &repo_args);
    }));
    remove_bucket(&node, &bucket);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn survives(node: &Node, bucket: &str, repo_args: &[&str]) {
    let vm = TestVm::builder("lock")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x51, 0, 5 * MIB);
    let sum_a = vm.disk_checksum("vda");
    let backup = |node: &Node| {
        let spec = format!("{HOST}/{}", vm.name);
        let mut args = vec!["backup", spec.as_str()];
        args.extend_from_slice(repo_args);
        let v = json(node, &args);
        assert!(v[0].get("error").is_none(), "{v}");
        v[0]["id"].as_str().expect("id").to_string()
    };
    let id_a = backup(node);
    vm.write_pattern("vda", 0x52, 6 * MIB, MIB);
    let _id_b = backup(node);

    // The writer's own prune and GC: the older backup is kept under retention.
    let mut args = vec!["prune", "--keep-last", "1"];
    args.extend_from_slice(repo_args);
    let out = run(node, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--keep-within"),
        "no --keep-within advice: {out:?}"
    );
    let decisions: Value = serde_json::from_slice(&out.stdout).expect("json");
    let a = decisions
        .as_array()
        .expect("decisions")
        .iter()
        .find(|d| d["id"] == id_a.as_str())
        .expect("decision for A");
    assert_eq!(a["keep"], true, "{decisions}");
    assert!(
        a["reason"].as_str().unwrap_or("").contains("retention"),
        "{decisions}"
    );
    let mut args = vec!["gc"];
    args.extend_from_slice(repo_args);
    json(node, &args);

    // A raw S3 DELETE of a chunk version with the same credentials: refused.
    let mut args = vec!["snapshots"];
    args.extend_from_slice(repo_args);
    let listed = json(node, &args).to_string();
    assert!(listed.contains(&id_a), "{listed}");
    let be = s3_backend(node, bucket, "repo");
    let chunk = runtime().block_on(async {
        use futures::TryStreamExt;
        use virtkeep_repo::ChunkBackend;
        let first = be.list("chunks/").try_next().await.expect("list");
        first.expect("a chunk").key
    });
    let refused = runtime().block_on(be.delete_current_version(&chunk, false));
    // Refused by the lock (403), not failing for another reason: the same signed
    // requests created the bucket and wrote the backups.
    let refused = refused.expect_err("version delete of a locked chunk was accepted");
    assert!(refused.to_string().contains("403"), "{refused}");

    let mut args = vec!["verify", "--all", "--read-data"];
    args.extend_from_slice(repo_args);
    let v = json(node, &args);
    assert_eq!(v["snapshots_checked"], 2, "{v}");
    assert_eq!(v["missing"].as_array().map(Vec::len), Some(0), "{v}");
    let name = unique_name("lockrestored");
    let restored = TestVm::adopt(&name);
    let mut args = vec![
        "restore",
        id_a.as_str(),
        "--to",
        HOST,
        "--name",
        &name,
        "--define",
    ];
    args.extend_from_slice(repo_args);
    let out = json(node, &args);
    let d = &out["disks"][0];
    let sum = restored_checksum(
        d["path"].as_str().expect("path"),
        d["format"].as_str().expect("format"),
    );
    assert_eq!(sum, sum_a);
    drop(restored);
}

/// An existing bucket without Object Lock (the lab's shared one): refused with the way
/// out, and nothing is written.
#[test]
fn object_lock_init_refuses_bucket_without_lock() {
    let node = Node::new();
    let prefix = unique_name("nolock");
    let location = format!("s3://{}/{prefix}", node.lab.s3_bucket);
    let key = node.dir.path().join("nolock.key").display().to_string();
    let out = run(
        &node,
        &[
            "repo",
            "init",
            &location,
            "--encryption",
            "none",
            "--key-file",
            &key,
            "--object-lock",
            "compliance",
            "--retain",
            "1d",
        ],
    );
    // With --json the error is a JSON document on stdout.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(said.contains("without Object Lock"), "{said}");
    assert!(said.contains("does not exist yet"), "{said}");
    let be = s3_backend(&node, &node.lab.s3_bucket, &prefix);
    let config = runtime().block_on(async {
        use virtkeep_repo::ChunkBackend;
        be.head("config").await.expect("head")
    });
    assert!(config.is_none(), "a config was written: {config:?}");
}
