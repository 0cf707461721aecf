//! What a sysadmin sees of the binary: exit codes, errors printed once with the right
//! hint, the `snapshots` table, forget/protect/unprotect.

use std::process::Output;

use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the exit code and that the error line appears exactly once; returns stderr.
fn fails_with(out: &Output, code: i32, message: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.matches("error:").count(), 1, "one error line: {err}");
    assert_eq!(err.matches(message).count(), 1, "{message:?} once: {err}");
    err
}

#[test]
fn exit_codes_for_usage_missing_wrong_key_and_locked_repositories() {
    let node = Node::new();
    // 2: usage.
    let out = node.run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // 10: no repository; the hint says how to create it.
    let missing = node.dir.path().join("nothing-here");
    let missing_s = missing.display().to_string();
    let out = node.run(&["snapshots", "--repo", &missing_s]);
    let err = fails_with(&out, 10, "no virtkeep repository");
    assert!(
        err.contains("hint: create it with `virtkeep repo init"),
        "{err}"
    );
    assert!(!missing.exists(), "nothing was created");

    // 12: a wrong password, and a missing one; neither hint talks about creating it.
    let enc = node.dir.path().join("enc").display().to_string();
    node.cmd()
        .env("VK_PASS", "right")
        .args(["repo", "init", &enc, "--encryption", "aes-256-gcm"])
        .args(["--passphrase-env", "VK_PASS"])
        .assert()
        .success();
    let out = node
        .cmd()
        .env("VK_PASS", "wrong")
        .args(["snapshots", "--repo", &enc, "--passphrase-env", "VK_PASS"])
        .output()
        .expect("run");
    let err = fails_with(&out, 12, "wrong key");
    assert!(!err.contains("repo init"), "{err}");
    assert!(err.contains("--password-file"), "{err}");
    let out = node.run(&["snapshots", "--repo", &enc]);
    let err = fails_with(&out, 12, "encrypted");
    assert!(!err.contains("repo init"), "{err}");

    // 11: another node's garbage collection holds the repository's GC lease.
    let plain = node.repo();
    std::fs::create_dir_all(plain.join("locks")).expect("locks");
    std::fs::write(plain.join("locks/gc"), br#"{"kind":"gc"}"#).expect("lease");
    let out = node.run(&["gc", "--grace-hours", "0"]);
    let err = fails_with(&out, 11, "garbage collection already running");
    assert!(err.contains("hint:"), "{err}");
    std::fs::remove_file(plain.join("locks/gc")).expect("lease");
    node.ok(&["gc", "--grace-hours", "0"]);

    // --json carries the exit code and the hint with the error.
    let out = node.run(&["--json", "snapshots", "--repo", &missing_s]);
    assert_eq!(out.status.code(), Some(10));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["error"]["exit_code"], 10, "{v}");
    assert_eq!(v["error"]["kind"], "repository", "{v}");
}

/// A lab VM, the listing, forget refusing a protected backup, verify of an unknown id,
/// and exit code 3 when one of two VMs fails.
#[test]
fn snapshots_table_forget_protect_and_partial_failure() {
    let node = Node::new();
    let out = node.ok(&["snapshots"]);
    assert_eq!(out, "no backups\n");
    assert_eq!(node.json(&["snapshots"]), serde_json::json!([]));

    let vm = TestVm::builder("cli")
        .raw_disk(8 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x31, 0, MIB);
    let first = node.backup(&vm.name, &["--mode", "full"]);
    // What the backup says its new chunks take is what `snapshots` lists as NEW.
    let stored: u64 = first["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["bytes_stored"].as_u64().expect("bytes_stored"))
        .sum();
    assert!(stored > 0, "{first}");
    let first = first["id"].as_str().expect("id").to_string();
    let listed = node.json(&["snapshots"]);
    assert_eq!(listed[0]["id"], first.as_str(), "{listed}");
    assert_eq!(listed[0]["bytes_new"].as_u64(), Some(stored), "{listed}");

    // 3: one of two VMs failed; the other one's backup is there.
    let spec = format!("{HOST}/{}", vm.name);
    let ghost = format!("{HOST}/{}", unique_name("ghost"));
    let out = node.run(&["backup", &spec, &ghost]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let list = node.json(&["snapshots"]);
    let ids: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    let second = ids[1].to_string();

    // The table: a header, aligned columns, the local zone (or UTC), a totals line.
    let out = node
        .cmd()
        .env("TZ", "Asia/Kolkata")
        .arg("snapshots")
        .output()
        .expect("run");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("ID"), "{text}");
    let col = lines[0].find("TIME").expect("TIME column");
    for row in &lines[1..3] {
        assert!(row[col..].contains("+05:30"), "local time: {text}");
        assert_eq!(&row[col - 1..col], " ", "aligned: {text}");
    }
    assert!(lines[1].starts_with(&first) && lines[2].starts_with(&second));
    assert!(
        lines[3].starts_with("2 backups, 16.0 MiB of disks"),
        "{text}"
    );
    let utc = node.ok(&["snapshots", "--utc"]);
    assert_eq!(utc.matches(" UTC").count(), 2, "{utc}");

    // Protected backups are refused by forget, marked in the table, and survive prune.
    assert_eq!(
        node.ok(&["protect", &first]),
        format!("protected {first}\n")
    );
    let out = node.run(&["forget", &first]);
    let err = fails_with(&out, 1, "is protected");
    assert!(
        err.contains(&format!("virtkeep unprotect {first}")),
        "{err}"
    );
    assert!(
        node.ok(&["snapshots"])
            .lines()
            .nth(1)
            .expect("row")
            .ends_with("protected")
    );
    node.ok(&["prune", "--keep-last", "1"]);
    assert_eq!(node.json(&["snapshots"]).as_array().map(Vec::len), Some(2));
    node.ok(&["unprotect", &first]);
    let forgot = node.json(&["forget", &first]);
    assert_eq!(forgot, serde_json::json!({ "forgot": [first] }));
    let list = node.json(&["snapshots"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], second.as_str());
    node.ok(&["verify", "--all"]);

    // An unknown id is said to be unknown, by verify and forget alike.
    for cmd in ["verify", "forget", "protect"] {
        let out = node.run(&[cmd, "nonsense"]);
        let err = fails_with(&out, 1, "backup nonsense not found");
        assert!(!err.contains("broken"), "{err}");
        assert!(err.contains("virtkeep snapshots"), "{err}");
    }
}

fn chunk_bytes(repo: &std::path::Path) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    for dir in std::fs::read_dir(repo.join("chunks"))
        .expect("chunks")
        .flatten()
    {
        for f in std::fs::read_dir(dir.path()).expect("fan-out").flatten() {
            n += 1;
            bytes += f.metadata().expect("stat").len();
        }
    }
    (n, bytes)
}

/// `stats` against the files on disk, `prune HOST/VM` and `prune HOST` touching only
/// their scope, `vm list` going on past a host that is down.
#[test]
fn stats_prune_scope_and_vm_list_past_a_down_host() {
    let node = Node::new();
    let a = TestVm::builder("st-a")
        .raw_disk(8 * MIB)
        .running(true)
        .build();
    let b = TestVm::builder("st-b")
        .raw_disk(4 * MIB)
        .running(true)
        .build();
    a.write_pattern("vda", 0x41, 0, 2 * MIB);
    b.write_pattern("vda", 0x42, 0, MIB);
    for _ in 0..2 {
        node.backup(&a.name, &["--mode", "full"]);
        node.backup(&b.name, &["--mode", "full"]);
    }
    let s = node.json(&["stats"]);
    let (chunks, bytes) = chunk_bytes(&node.repo());
    assert_eq!(s["backups"], 4, "{s}");
    assert_eq!(s["chunks"], chunks, "{s}");
    assert_eq!(s["stored_bytes"], bytes, "{s}");
    assert_eq!(s["logical_bytes"], 24 * MIB, "{s}");
    let ratio = s["dedup_ratio"].as_f64().expect("ratio");
    assert!(
        (ratio - (24 * MIB) as f64 / bytes as f64).abs() < 1e-9,
        "{s}"
    );
    let only_a = node.json(&["stats", &format!("{HOST}/{}", a.name)]);
    let vms = only_a["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 1, "{only_a}");
    assert_eq!(vms[0]["backups"], 2);
    assert_eq!(vms[0]["logical_bytes"], 16 * MIB);
    let text = node.ok(&["stats"]);
    assert!(
        text.contains("4 backups holding 24.0 MiB of disks"),
        "{text}"
    );

    // --keep-within counts back from the VM's newest backup: both of b's are recent.
    let d = node.json(&[
        "prune",
        &format!("{HOST}/{}", b.name),
        "--keep-within",
        "1h",
    ]);
    let reasons: Vec<&str> = d
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["reason"].as_str().expect("reason"))
        .collect();
    assert_eq!(reasons, ["keep-within", "keep-within"], "{d}");
    let out = node.run(&["prune", "--keep-within", "5x"]);
    assert_eq!(out.status.code(), Some(2));

    // prune HOST/VM: only that VM's group.
    let count = |vm: &str| {
        node.json(&["snapshots"])
            .as_array()
            .expect("list")
            .iter()
            .filter(|s| s["vm"] == vm)
            .count()
    };
    node.ok(&["prune", &format!("{HOST}/{}", a.name), "--keep-last", "1"]);
    assert_eq!((count(&a.name), count(&b.name)), (1, 2));
    node.ok(&["prune", "elsewhere", "--keep-last", "1"]);
    assert_eq!((count(&a.name), count(&b.name)), (1, 2));
    node.ok(&["prune", HOST, "--keep-last", "1"]);
    assert_eq!((count(&a.name), count(&b.name)), (1, 1));

    // A host that is down: reported, the other listed, exit 3.
    node.ok(&[
        "host",
        "add",
        "down",
        "--ssh",
        "root@127.0.0.1:1",
        "--agent",
    ]);
    let out = node.run(&["vm", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("{HOST}/{}", a.name)));
    assert!(stderr(&out).starts_with("down: error:"), "{}", stderr(&out));
    let out = node.run(&["--json", "vm", "list"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = v.as_array().expect("list");
    assert!(items.iter().any(|i| i["name"] == a.name.as_str()));
    assert!(
        items
            .iter()
            .any(|i| i["host"] == "down" && i["error"]["message"].is_string())
    );
    // Named alone, the host's failure is the command's.
    assert_eq!(node.run(&["vm", "list", "down"]).status.code(), Some(1));
}
