//! Authenticated metadata in every mode (issue 16 item 1, format v2): an unencrypted
//! repository's manifests and indexes carry a MAC under a key file kept on the node, so
//! someone who can only write to the repository cannot steer a restore; the key file
//! travels to a second node with `repo key export` / `import`; a v1 repository is read
//! with a warning and upgraded with `repo upgrade`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use virtkeep_lab::{TestVm, unique_name};

use crate::harness::{HOST, Node};

const MIB: u64 = 1 << 20;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The node's key file (as `repo init` named it in the configuration), its 32 bytes.
fn auth_key(node: &Node) -> [u8; 32] {
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(node.config()).expect("config")).expect("toml");
    let path = config["repository"]["key_file"].as_str().expect("key_file");
    let kf: Value = serde_json::from_slice(&std::fs::read(path).expect("key file")).expect("json");
    hex::decode(kf["key"].as_str().expect("key"))
        .expect("hex")
        .try_into()
        .expect("32 bytes")
}

/// MAC || payload of an authenticated meta blob, as the node's key computes it
/// (docs/format.md): for tests that play a writer holding the key.
pub fn mac_meta(node: &Node, magic: &[u8], object: &str, payload: &[u8]) -> Vec<u8> {
    let mk = blake3::derive_key("virtkeep 2026 meta mac key v2", &auth_key(node));
    let mut h = blake3::Hasher::new_keyed(&mk);
    h.update(magic);
    h.update(&(object.len() as u32).to_le_bytes());
    h.update(object.as_bytes());
    h.update(payload);
    let mut out = h.finalize().as_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Edits a meta blob's payload as someone with write access to the repository but
/// without the key would: payload changed, CRC recomputed, the old MAC left.
fn tamper_without_key(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let blob = std::fs::read(path).expect("read");
    assert_eq!(
        blob[..8],
        *virtkeep_repo::MAGIC_META_AUTH,
        "not authenticated"
    );
    let mut payload = blob[12 + 32..].to_vec();
    edit(&mut payload);
    let mut body = blob[12..12 + 32].to_vec();
    body.extend_from_slice(&payload);
    let mut out = blob[..8].to_vec();
    out.extend_from_slice(&crc32fast_like(&body).to_le_bytes());
    out.extend_from_slice(&body);
    std::fs::write(path, out).expect("write");
}

/// CRC-32 (IEEE), as the repository's meta blobs carry it.
fn crc32fast_like(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The attack of issue 16 in an unencrypted repository: a manifest whose disk source
/// was edited and an index whose digests were changed (CRCs recomputed). `snapshots`
/// names the manifest as failing authentication, `verify` fails naming both backups,
/// `restore` refuses both and writes nothing.
#[test]
fn tampered_metadata_in_an_unencrypted_repository_is_refused() {
    let node = Node::new();
    let vm = TestVm::builder("auth")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x51, 0, MIB);
    let a = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let b = node.backup(&vm.name, &[])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let snap = node.repo().join("snapshots");
    let escape = unique_name("auth-escape");
    let evil = node.lab.pool_dir.join(&escape).join("x.raw");
    tamper_without_key(&snap.join(&a).join("manifest"), |p| {
        let mut m: Value = serde_json::from_slice(p).expect("manifest");
        m["disks"][0]["source"] = Value::from(evil.display().to_string());
        *p = serde_json::to_vec(&m).expect("json");
    });
    let index = std::fs::read_dir(snap.join(&b))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "fidx"))
        .expect("an index");
    tamper_without_key(&index, |p| {
        let last = p.len() - 1;
        p[last] ^= 0x5a;
    });

    let out = node.run(&["--json", "snapshots"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .all(|s| s["id"] != a.as_str()),
        "{list}"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&a) && err.contains("authentication failed"),
        "{err}"
    );

    let out = node.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("authentication failed"), "{stdout}");
    assert!(stdout.contains(&a) && stdout.contains(&b), "{stdout}");

    for id in [&a, &b] {
        let name = unique_name("auth-restored");
        let restored = TestVm::adopt(&name);
        let out = node.run(&["restore", id, "--to", HOST, "--name", &name, "--define"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "restore of tampered {id} succeeded");
        assert!(err.contains("authentication failed"), "{err}");
        assert!(
            node.lab.try_virsh(&["domuuid", "--domain", &name]).is_err(),
            "refused restore defined the domain"
        );
        let written: Vec<_> = std::fs::read_dir(&node.lab.pool_dir)
            .expect("pool")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(&name))
            .collect();
        assert!(written.is_empty(), "{written:?}");
        drop(restored);
    }
    assert!(!node.lab.pool_dir.join(&escape).exists());
}

/// A second node: without the key file the repository does not open (a clear error
/// naming what to do); `repo key export` on the first and `repo key import` on the
/// second make it open there.
#[test]
fn key_file_missing_then_exported_and_imported_on_a_second_node() {
    let first = Node::new();
    let second = Node::new();
    // The second node's own repository is not the one it is to use.
    let config = std::fs::read_to_string(second.config()).expect("config");
    let mut config: toml::Table = toml::from_str(&config).expect("toml");
    config.remove("repository");
    std::fs::write(second.config(), toml::to_string(&config).expect("toml")).expect("write");
    let repo = first.repo().display().to_string();

    let out = second.run(&["snapshots", "--repo", &repo]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for want in [
        "key file",
        "--key-file",
        "repo key export",
        "repo key import",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }

    let export = first.dir.path().join("exported.key");
    first.ok(&["repo", "key", "export", &export.display().to_string()]);
    assert_eq!(
        std::fs::metadata(&export)
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let out = second.ok(&[
        "repo",
        "key",
        "import",
        &export.display().to_string(),
        "--repo",
        &repo,
    ]);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key file: "))
        .expect("key file line")
        .to_string();
    assert!(
        key.starts_with(&second.dir.path().display().to_string()),
        "{out}"
    );
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    // From now on the configuration names it: plain commands open the repository.
    assert_eq!(second.ok(&["snapshots"]), "no backups\n");
    // A key file of another repository is refused by import, nothing recorded.
    let other = second.dir.path().join("other.key");
    let third = Node::new();
    third.ok(&["repo", "key", "export", &other.display().to_string()]);
    let out = second.run(&["repo", "key", "import", &other.display().to_string()]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
}

/// A repository the v1 writer made: read with a warning; `repo upgrade` creates the key
/// file and authenticates every manifest and index; afterwards it needs the key file and
/// restores as before.
#[test]
fn v1_repository_read_with_a_warning_then_upgraded() {
    let node = Node::new();
    let v1 = node.dir.path().join("v1repo");
    v1_repository(&v1, None);
    let loc = v1.display().to_string();
    let vm = TestVm::builder("authv1")
        .raw_disk(8 * MIB)
        .running(false)
        .build();
    vm.write_pattern("vda", 0x61, 0, MIB);
    let sum = vm.disk_checksum("vda");
    let out = node.run(&[
        "--json",
        "backup",
        &format!("{HOST}/{}", vm.name),
        "--repo",
        &loc,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = serde_json::from_slice::<Value>(&out.stdout).expect("json")[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let manifest = v1.join("snapshots").join(&id).join("manifest");
    assert_eq!(
        std::fs::read(&manifest).expect("manifest")[..8],
        *virtkeep_repo::MAGIC_META_PLAIN
    );
    let out = node.run(&["snapshots", "--repo", &loc]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&id));
    let err = text(&out.stderr);
    assert!(
        err.contains("format v1") && err.contains("repo upgrade"),
        "{err}"
    );

    let key = node.dir.path().join("v1.key").display().to_string();
    let out = node.ok(&["repo", "upgrade", "--repo", &loc, "--key-file", &key]);
    assert!(out.contains("format v1 -> v2"), "{out}");
    assert!(
        out.contains("authenticated 2 manifests and indexes"),
        "{out}"
    );
    assert!(out.contains(&format!("key file: {key}")), "{out}");
    assert_eq!(
        std::fs::read(&manifest).expect("manifest")[..8],
        *virtkeep_repo::MAGIC_META_AUTH
    );

    // Without its key file now: refused, saying what to do.
    let out = node.run(&["snapshots", "--repo", &loc]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--key-file"),
        "{}",
        text(&out.stderr)
    );
    let out = node.run(&["snapshots", "--repo", &loc, "--key-file", &key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("format v1"),
        "{}",
        text(&out.stderr)
    );
    node.ok(&["verify", "--repo", &loc, "--key-file", &key, "--read-data"]);
    let name = unique_name("authv1-restored");
    let restored = TestVm::adopt(&name);
    let out = node.json(&[
        "restore",
        &id,
        "--to",
        HOST,
        "--name",
        &name,
        "--repo",
        &loc,
        "--key-file",
        &key,
    ]);
    let disk = &out["disks"][0];
    let got = crate::harness::restored_checksum(
        disk["path"].as_str().expect("path"),
        disk["format"].as_str().expect("format"),
    );
    assert_eq!(got, sum);
    drop(restored);
}

/// An S3 repository and no credentials anywhere: the command fails at once naming what
/// to set, and never waits on the cloud instance metadata address.
#[test]
fn s3_without_credentials_fails_fast_naming_the_settings() {
    let node = Node::new();
    let location = format!("s3://{}/{}", node.lab.s3_bucket, unique_name("nocreds"));
    let started = std::time::Instant::now();
    let mut cmd = node.cmd();
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .env("AWS_ENDPOINT_URL", &node.lab.s3_endpoint)
        .args(["snapshots", "--repo", &location])
        .output()
        .expect("run");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for want in [
        "no S3 credentials",
        "AWS_ACCESS_KEY_ID",
        "s3_instance_metadata",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// Builds a repository with the v1 writer (`encryption`: the key file of an encrypted one).
fn v1_repository(path: &Path, encryption: Option<&Path>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(virtkeep_repo::Repository::init(
            virtkeep_repo::Location::Local {
                path: path.to_path_buf(),
                fsync: false,
            },
            virtkeep_repo::InitOptions {
                format_version: 1,
                encryption: encryption.map(|k| virtkeep_repo::KeySource::KeyFile(k.to_path_buf())),
                ..Default::default()
            },
        ))
        .expect("v1 repository");
}

/// `repo upgrade` of the configured repository names the new key file in the
/// configuration (plain commands keep working); an encrypted v1 repository is upgraded
/// with the key that unlocks it and its warning goes.
#[test]
fn upgrade_of_the_configured_repository_and_of_an_encrypted_one() {
    let node = Node::new();
    let plain = node.dir.path().join("v1plain");
    v1_repository(&plain, None);
    let c = std::fs::read_to_string(node.config()).expect("config");
    let mut c: toml::Table = toml::from_str(&c).expect("toml");
    let mut rc = toml::Table::new();
    rc.insert("location".into(), plain.display().to_string().into());
    c.insert("repository".into(), rc.into());
    std::fs::write(node.config(), toml::to_string(&c).expect("toml")).expect("write");
    let out = node.run(&["snapshots"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("format v1"),
        "{}",
        text(&out.stderr)
    );
    let out = node.json(&["repo", "upgrade"]);
    assert_eq!(out["from_version"], 1);
    assert_eq!(out["to_version"], 2);
    let key = out["key_file"].as_str().expect("key file").to_string();
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    let c: toml::Table =
        toml::from_str(&std::fs::read_to_string(node.config()).expect("config")).expect("toml");
    assert_eq!(c["repository"]["key_file"].as_str(), Some(key.as_str()));
    let out = node.run(&["snapshots"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("format v1"),
        "{}",
        text(&out.stderr)
    );

    let enc = node.dir.path().join("v1enc");
    let enc_key = node.dir.path().join("enc.key");
    v1_repository(&enc, Some(&enc_key));
    let (enc, enc_key) = (enc.display().to_string(), enc_key.display().to_string());
    let args = ["--repo", enc.as_str(), "--key-file", enc_key.as_str()];
    let out = node.run(&[&["snapshots"][..], &args].concat());
    assert!(
        text(&out.stderr).contains("format v1"),
        "{}",
        text(&out.stderr)
    );
    let out = node.ok(&[&["repo", "upgrade"][..], &args].concat());
    assert!(out.contains("format v1 -> v2"), "{out}");
    let out = node.run(&[&["snapshots"][..], &args].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("format v1"),
        "{}",
        text(&out.stderr)
    );
}
