//! README "Installing on a real node", walked verbatim against the lab.
//!
//! The test reads the section's `sh` blocks and runs every command line with `sh -c` from
//! the repository's root, in the README's order, after these substitutions and no others:
//! - absolute paths under `/etc/`, `/usr/` and `/var/` move under a temporary root R, so
//!   nothing on this machine is touched (R starts with the directories a Debian system
//!   has: `STANDARD_DIRS`);
//! - `systemd-sysusers` and `systemd-tmpfiles` get `--root=R`;
//! - `target/release/virtkeep` is the binary cargo built for the tests;
//! - `sudo -u virtkeep ` is dropped: the `virtkeep` user exists only in R and the test runs
//!   as itself, with `VIRTKEEP_CONFIG=R/etc/virtkeep/config.toml` (the file root and the
//!   service user share) and `PATH` starting with `R/usr/local/bin` (so `virtkeep` is the
//!   copy the README installed);
//! - `alias NAME='VALUE'` lines make NAME at the start of a later line VALUE;
//! - the hypervisor: `root@kvm1.example.net` is the lab's sshd (`root@127.0.0.1:PORT`),
//!   `web01` a lab VM made for the test, the word `ID` the id `snapshots` printed for it.
//!
//! What the README asks in prose, the test does: after `ssh-keygen`, the key's `.pub`
//! line goes into root's authorized_keys on kvm1 (the lab sshd's AuthorizedKeysFile; the
//! line is removed at the end); `host trust` runs on a pseudo-terminal and its fingerprint
//! is compared with `ssh-keygen -lf` of the host's ed25519 key before answering `y`.
//! Skipped (`SKIPPED`): `cargo build --release` (the test binary stands in for the release
//! build) and `systemctl …` (it would start a service on this machine; the installed
//! unit's paths are checked instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use virtkeep_lab::{Lab, TestVm};

const MIB: u64 = 1 << 20;

/// Command lines not run, by their start.
const SKIPPED: &[&str] = &["cargo build --release", "systemctl "];

/// Directories of a Debian system the README's `install` lines expect.
const STANDARD_DIRS: &[&str] = &[
    "etc",
    "etc/bash_completion.d",
    "etc/systemd/system",
    "root",
    "usr/lib/sysusers.d",
    "usr/lib/tmpfiles.d",
    "usr/local/bin",
    "usr/local/share/man",
    "var/lib",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The command lines of the section's `sh` blocks, comments and blank lines left out.
fn quickstart_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README");
    let start = readme
        .find("## Installing on a real node")
        .expect("README has the section");
    let body = &readme[start + 3..];
    let section = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim();
        if in_sh && !line.is_empty() && !line.starts_with('#') {
            lines.push(line.to_string());
        }
    }
    lines
}

/// The lab's authorized_keys with one more line, removed again on drop. Other tests log
/// in through the same file at the same time: the line is appended in one write and
/// removed by renaming a new file over the old, so sshd never reads a partial file; a
/// lock beside it keeps two such edits from losing each other's line.
struct AuthorizedKey {
    file: PathBuf,
    line: String,
}

impl AuthorizedKey {
    fn locked<T>(file: &Path, f: impl FnOnce() -> T) -> T {
        let lock = std::fs::File::create(file.with_extension("vk-test-lock")).expect("lock file");
        lock.lock().expect("lock");
        f()
    }

    fn add(lab: &Lab, pub_file: &Path) -> AuthorizedKey {
        use std::io::Write;
        let file = lab.lab_dir.join("ssh/authorized_keys");
        let line = std::fs::read_to_string(pub_file)
            .expect("public key")
            .trim()
            .to_string();
        AuthorizedKey::locked(&file, || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .expect("authorized_keys");
            f.write_all(format!("{line}\n").as_bytes())
                .expect("append to authorized_keys");
        });
        AuthorizedKey { file, line }
    }
}

impl Drop for AuthorizedKey {
    fn drop(&mut self) {
        AuthorizedKey::locked(&self.file, || {
            let Ok(text) = std::fs::read_to_string(&self.file) else {
                return;
            };
            let kept: String = text
                .lines()
                .filter(|l| l.trim() != self.line)
                .map(|l| format!("{l}\n"))
                .collect();
            let tmp = self.file.with_extension("vk-test-tmp");
            let written = std::fs::write(&tmp, kept).and_then(|()| {
                let mode = std::fs::metadata(&self.file)?.permissions();
                std::fs::set_permissions(&tmp, mode)?;
                std::fs::rename(&tmp, &self.file)
            });
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        });
    }
}

struct Walk {
    root: PathBuf,
    lab: &'static Lab,
    vm: String,
    aliases: Vec<(String, String)>,
    id: Option<String>,
    authorized: Option<AuthorizedKey>,
    restored: Option<TestVm>,
}

impl Walk {
    fn substitute(&self, line: &str) -> String {
        let lab = self.lab;
        let ssh = format!("{}@{}:{}", lab.ssh_user, lab.ssh_host, lab.ssh_port);
        let bin = assert_cmd::cargo::cargo_bin("virtkeep");
        let mut l = line
            .replace("root@kvm1.example.net", &ssh)
            .replace("sudo -u virtkeep ", "")
            .replace("target/release/virtkeep", &bin.display().to_string())
            .replace("web01", &self.vm);
        if let Some(id) = &self.id {
            let words: Vec<&str> = l
                .split(' ')
                .map(|w| if w == "ID" { id.as_str() } else { w })
                .collect();
            l = words.join(" ");
        }
        for (name, value) in &self.aliases {
            if let Some(rest) = l.strip_prefix(&format!("{name} ")) {
                l = format!("{value} {rest}");
            }
        }
        let root = self.root.display();
        for tool in ["systemd-sysusers", "systemd-tmpfiles"] {
            l = l.replace(tool, &format!("{tool} --root={root}"));
        }
        for dir in ["/etc/", "/usr/", "/var/"] {
            l = l.replace(&format!(" {dir}"), &format!(" {root}{dir}"));
        }
        l
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let path = format!(
            "{}:{}",
            self.root.join("usr/local/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.current_dir(workspace())
            .env("PATH", path)
            .env("HOME", self.root.join("root"))
            .env(
                "VIRTKEEP_CONFIG",
                self.root.join("etc/virtkeep/config.toml"),
            )
            .env_remove("VIRTKEEP_LOG")
            .env_remove("VIRTKEEP_REPOSITORY")
            .env_remove("VIRTKEEP_PASSWORD_FILE")
            .env_remove("VIRTKEEP_PASSWORD_COMMAND")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
        c
    }

    fn run(&self, line: &str) -> Output {
        let out = self
            .command("sh")
            .args(["-c", line])
            .stdin(Stdio::null())
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "README step failed: {line}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `host trust` on a pseudo-terminal: the fingerprint shown is the one `ssh-keygen
    /// -lf` gives for the host's ed25519 key, and the answer is `y`.
    fn trust(&self, line: &str) -> String {
        let mut child = self
            .command("script")
            .args(["-qec", line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script");
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        // The terminal keeps the answer until the prompt reads it.
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"y\n").expect("answer");
        let out = child.wait_with_output().expect("wait");
        drop(stdin);
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{line}: {shown}");
        let keygen = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&self.lab.hostkey_ed25519_pub)
            .output()
            .expect("ssh-keygen -lf");
        let keygen = String::from_utf8_lossy(&keygen.stdout).into_owned();
        let fingerprint = keygen.split_whitespace().nth(1).expect("fingerprint");
        assert!(
            shown.contains(fingerprint) && shown.contains("pinned"),
            "{fingerprint} not shown and pinned: {shown}"
        );
        shown
    }

    /// Runs one README line and checks what it is for.
    fn step(&mut self, line: &str) {
        if let Some(alias) = line.strip_prefix("alias ") {
            let (name, value) = alias.split_once('=').expect("alias NAME=VALUE");
            let value = self.substitute(value.trim_matches('\''));
            self.aliases.push((name.to_string(), value));
            return;
        }
        let l = self.substitute(line);
        eprintln!("README step: {l}");
        let stdout = if l.contains(" host trust ") {
            self.trust(&l)
        } else {
            String::from_utf8_lossy(&self.run(&l).stdout).into_owned()
        };
        self.check(&l, &stdout);
    }

    fn check(&mut self, l: &str, stdout: &str) {
        let etc = self.root.join("etc/virtkeep");
        if l.starts_with("ssh-keygen ") {
            self.authorized = Some(AuthorizedKey::add(self.lab, &etc.join("id_kvm1.pub")));
        } else if l.contains(" repo init ") {
            let keys = etc.join("keys").display().to_string();
            assert!(stdout.contains(&format!("key file: {keys}")), "{stdout}");
        } else if l.contains(" vm list ") {
            assert!(stdout.contains(&self.vm), "{stdout}");
        } else if l.ends_with(" snapshots") {
            let row = stdout
                .lines()
                .find(|r| r.contains(&format!("kvm1/{}", self.vm)))
                .unwrap_or_else(|| panic!("the backup is not listed: {stdout}"));
            self.id = row.split_whitespace().next().map(String::from);
        } else if l.ends_with(" verify") {
            assert!(stdout.starts_with("1 backups, "), "{stdout}");
        } else if l.contains(" restore ") {
            self.restored = Some(TestVm::adopt(&format!("{}-restoretest", self.vm)));
        }
    }
}

#[test]
fn readme_quickstart_on_a_real_node_walked_in_the_lab() {
    let lab = virtkeep_lab::lab();
    let vm = TestVm::builder("qs")
        .qcow2_disk(16 * MIB)
        .running(true)
        .build();
    vm.write_pattern("vda", 0x71, MIB, 3 * MIB);
    let sum = vm.disk_checksum("vda");
    let root = tempfile::Builder::new()
        .prefix("vk-quickstart-")
        .tempdir()
        .expect("tempdir");
    for dir in STANDARD_DIRS {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    let mut walk = Walk {
        root: root.path().to_path_buf(),
        lab,
        vm: vm.name.clone(),
        aliases: Vec::new(),
        id: None,
        authorized: None,
        restored: None,
    };
    let lines = quickstart_lines();
    let mut skipped = Vec::new();
    for line in &lines {
        if SKIPPED.iter().any(|s| line.starts_with(s)) {
            skipped.push(line.as_str());
        } else {
            walk.step(line);
        }
    }
    assert_eq!(
        skipped,
        [
            "cargo build --release -p virtkeep",
            "systemctl enable --now virtkeep"
        ],
        "only the documented steps are skipped"
    );
    // The restore brought back the bytes of the backup.
    let restored = walk.restored.take().expect("the README restores");
    assert_eq!(restored.disk_checksum("vda"), sum);
    check_installed(root.path());
    assert!(walk.authorized.is_some(), "the README makes a key for kvm1");
}

/// What the install block leaves: the binary, the user and its directories, the unit
/// pointing at the installed binary and the shared file, completions and the man page.
fn check_installed(r: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let bin = std::fs::metadata(r.join("usr/local/bin/virtkeep")).expect("installed binary");
    assert_eq!(bin.permissions().mode() & 0o777, 0o755);
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).expect("passwd");
    assert!(
        passwd.lines().any(|l| l.starts_with("virtkeep:")),
        "{passwd}"
    );
    let unit =
        std::fs::read_to_string(r.join("etc/systemd/system/virtkeep.service")).expect("unit");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/virtkeep --config /etc/virtkeep/config.toml daemon"
        ),
        "{unit}"
    );
    let completion =
        std::fs::read_to_string(r.join("etc/bash_completion.d/virtkeep")).expect("completion");
    assert!(completion.contains("complete"), "{completion}");
    assert!(r.join("usr/local/share/man/man1/virtkeep.1").is_file());
    assert!(r.join("etc/virtkeep/repo-config.export").is_file());
    let known = std::fs::read_to_string(r.join("etc/virtkeep/known_hosts")).expect("known_hosts");
    assert!(known.contains("127.0.0.1"), "{known}");
}
