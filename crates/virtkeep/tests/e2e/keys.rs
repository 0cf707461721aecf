//! Keys and passwords as restic and borg users expect them: encrypted by default with a
//! key file the user is told to back up, password files, commands, the environment, a
//! terminal prompt, key export and change, absolute paths in the configuration.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::Node;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// A node without a `[repository]` in its configuration (the harness adds one).
fn bare_node() -> Node {
    let node = Node::new();
    let config = std::fs::read_to_string(node.config()).expect("config");
    let mut config: toml::Table = toml::from_str(&config).expect("toml");
    config.remove("repository");
    std::fs::write(node.config(), toml::to_string(&config).expect("toml")).expect("write");
    node
}

#[test]
fn repo_init_encrypts_by_default_with_a_key_file_stored_absolute() {
    let node = bare_node();
    // A relative location, from the node's directory.
    let out = node
        .cmd()
        .current_dir(node.dir.path())
        .args(["repo", "init", "rel-repo"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("encrypted with aes-256-gcm"), "{stdout}");
    let key_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key file: "))
        .expect("key file line");
    let key = Path::new(key_line);
    assert!(key.is_absolute() && key.is_file(), "{stdout}");
    assert_eq!(mode(key), 0o600);
    assert_eq!(mode(key.parent().expect("dir")), 0o700);
    assert!(stdout.contains("BACK UP the key file"), "{stdout}");

    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(node.config()).expect("config")).expect("toml");
    let repo = node.dir.path().join("rel-repo").display().to_string();
    assert_eq!(
        config["repository"]["location"].as_str(),
        Some(repo.as_str())
    );
    assert_eq!(config["repository"]["key_file"].as_str(), Some(key_line));

    // From anywhere else, the configured repository opens with its key file.
    let out = node
        .cmd()
        .current_dir("/")
        .arg("snapshots")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no backups\n");

    // A password where the key file is wanted: exit 12, and the hint is not "create it".
    let pw = node.dir.path().join("pw");
    std::fs::write(&pw, "a password\n").expect("pw");
    let out = node.run(&[
        "snapshots",
        "--repo",
        &repo,
        "--password-file",
        &pw.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not a passphrase"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("repo init"),
        "{}",
        text(&out.stderr)
    );

    // --encryption none still makes an unencrypted one, whose metadata a new key file
    // (0600, beside the configuration) authenticates.
    let plain = node.dir.path().join("plain").display().to_string();
    let out = node.ok(&["repo", "init", &plain, "--encryption", "none"]);
    assert!(out.contains("not encrypted"), "{out}");
    let plain_key = out
        .lines()
        .find_map(|l| l.strip_prefix("key file: "))
        .expect("key file line");
    assert_ne!(plain_key, key_line);
    assert_eq!(mode(Path::new(plain_key)), 0o600);
    assert!(out.contains("BACK UP the key file"), "{out}");

    // A key file in a missing directory: a clear usage error, nothing created.
    let missing = node.dir.path().join("no/such/dir/repo.key");
    let other = node.dir.path().join("other").display().to_string();
    let out = node.run(&[
        "repo",
        "init",
        &other,
        "--key-file",
        &missing.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");
    assert!(err.contains("mkdir -p -m 700"), "{err}");
    assert!(!Path::new(&other).exists());
}

#[test]
fn password_file_command_environment_export_and_change() {
    let node = Node::new();
    let dir = node.dir.path();
    let repo = dir.join("enc").display().to_string();
    let pw = dir.join("pw");
    std::fs::write(&pw, "correct horse\n").expect("pw");
    let pw_s = pw.display().to_string();
    node.ok(&["repo", "init", &repo, "--password-file", &pw_s]);
    let with = |extra: &[&str]| {
        let mut args = vec!["snapshots", "--repo", repo.as_str()];
        args.extend_from_slice(extra);
        node.run(&args)
    };
    assert!(with(&["--password-file", &pw_s]).status.success());
    assert!(
        with(&["--password-command", &format!("cat {pw_s}")])
            .status
            .success()
    );
    let out = with(&["--password-command", "echo nope; exit 1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let bad = dir.join("bad");
    std::fs::write(&bad, "wrong\n").expect("pw");
    let out = with(&["--password-file", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    // The environment variables, as restic's.
    let out = node
        .cmd()
        .env("VIRTKEEP_REPOSITORY", &repo)
        .env("VIRTKEEP_PASSWORD_FILE", &pw)
        .arg("snapshots")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no backups\n");

    // Export: a private copy of the repository's config object.
    let export = dir.join("key-export");
    let export_s = export.display().to_string();
    let args = [
        "repo",
        "key",
        "export",
        &export_s,
        "--repo",
        &repo,
        "--password-file",
        &pw_s,
    ];
    node.ok(&args);
    assert_eq!(mode(&export), 0o600);
    let config_object = Path::new(&repo).join("config");
    assert_eq!(
        std::fs::read(&export).ok(),
        std::fs::read(&config_object).ok()
    );
    assert_eq!(node.run(&args).status.code(), Some(2), "never overwrites");

    // Change the password: the old one stops working, the new one works.
    let pw2 = dir.join("pw2");
    std::fs::write(&pw2, "battery staple\n").expect("pw");
    let pw2_s = pw2.display().to_string();
    node.ok(&[
        "repo",
        "key",
        "change-passphrase",
        "--repo",
        &repo,
        "--password-file",
        &pw_s,
        "--new-password-file",
        &pw2_s,
    ]);
    assert_eq!(with(&["--password-file", &pw_s]).status.code(), Some(12));
    assert!(with(&["--password-file", &pw2_s]).status.success());
    // The export brings back the old wrapping (access with the old password).
    std::fs::copy(&export, &config_object).expect("restore config");
    assert!(with(&["--password-file", &pw_s]).status.success());
}

/// A password typed at a terminal (a pseudo-terminal made by `script`).
#[test]
fn password_prompt_on_a_terminal() {
    let node = Node::new();
    let repo = node.dir.path().join("enc").display().to_string();
    let pw = node.dir.path().join("pw");
    std::fs::write(&pw, "typed secret\n").expect("pw");
    node.ok(&[
        "repo",
        "init",
        &repo,
        "--password-file",
        &pw.display().to_string(),
    ]);
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let line = format!(
        "{} --config {} snapshots --repo {repo}",
        bin.display(),
        node.config().display()
    );
    let run = |password: &str| -> Output {
        let mut child = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("HOME", node.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script");
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        // After the prompt appears; the terminal keeps the line until it is read.
        std::thread::sleep(Duration::from_millis(500));
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .expect("type");
        let out = child.wait_with_output().expect("wait");
        drop(stdin);
        out
    };
    let out = run("typed secret");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("password for repository"), "{shown}");
    assert!(shown.contains("no backups"), "{shown}");
    assert!(!shown.contains("typed secret"), "no echo: {shown}");
    let out = run("wrong");
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stdout));
}

/// Ctrl-C: exit code 130, and the password command it was waiting for is gone.
#[test]
fn interrupted_command_exits_130() {
    let node = Node::new();
    let marker = node.dir.path().join("still-running");
    let cmd = format!("sleep 30; touch {}", marker.display());
    let bin = assert_cmd::cargo::cargo_bin("virtkeep");
    let child = Command::new(bin)
        .arg("--config")
        .arg(node.config())
        .args(["snapshots", "--password-command", &cmd])
        .env("HOME", node.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let out = child.wait_with_output().expect("wait");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("error: interrupted"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists());
}

/// The configuration names a password file or command as the daemon reads them: `repo
/// init --password-file` records the file (absolute), and later commands open the
/// repository with it from anywhere; `password_command` works the same way.
#[test]
fn password_file_and_command_in_the_configuration() {
    let node = bare_node();
    let dir = node.dir.path();
    std::fs::write(dir.join("pw"), "in the config\n").expect("pw");
    let out = node
        .cmd()
        .current_dir(dir)
        .args(["repo", "init", "cfg-repo", "--password-file", "pw"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(node.config()).expect("config")).expect("toml");
    let pw = dir.join("pw").display().to_string();
    assert_eq!(
        config["repository"]["password_file"].as_str(),
        Some(pw.as_str())
    );
    assert!(config["repository"].get("key_file").is_none(), "{config}");
    let snapshots = || {
        node.cmd()
            .current_dir("/")
            .arg("snapshots")
            .output()
            .expect("run")
    };
    let out = snapshots();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no backups\n");

    // A password command instead of the file; a failing one is a usage error.
    let edit = |from: &str, to: &str| {
        let c = std::fs::read_to_string(node.config()).expect("config");
        assert!(c.contains(from), "{c}");
        std::fs::write(node.config(), c.replace(from, to)).expect("write");
    };
    edit(
        &format!("password_file = \"{pw}\""),
        &format!("password_command = \"cat {pw}\""),
    );
    let out = snapshots();
    assert!(out.status.success(), "{}", text(&out.stderr));
    edit(&format!("cat {pw}"), "exit 3");
    let out = snapshots();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("password command"),
        "{}",
        text(&out.stderr)
    );
}
