//! virtkeep-lab: test support for virtkeep (dev-only).
//!
//! `lab/up.sh` starts the shared services of a test run (a private sshd on 127.0.0.1,
//! virtlogd + libvirtd, the directory pool `vkt-pool`, a single-node Ceph with radosgw)
//! and writes `/tmp/virtkeep-lab/env`; [`lab()`] reads that file, running `lab/up.sh`
//! first when the lab is missing or unhealthy.
//!
//! Per-test resources carry unique `vkt-` names ([`unique_name`]) and are removed by
//! [`TestVm`]'s `Drop`, also when the test panics; `lab/up.sh` sweeps what killed test
//! processes left behind. Everything here may panic: it is test support, and a panic
//! with the failing command and its stderr is the clearest report.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub mod hvm;

/// Where `lab/up.sh` writes the lab's `KEY=VALUE` environment file.
pub const ENV_FILE: &str = "/tmp/virtkeep-lab/env";

/// Everything a test needs to reach the lab (one field per `VK_*` key of the env file).
#[derive(Debug, Clone)]
pub struct Lab {
    /// `VK_LAB_DIR`: runtime state of the lab (`/tmp/virtkeep-lab`).
    pub lab_dir: PathBuf,
    /// `VK_SSH_HOST` (127.0.0.1).
    pub ssh_host: String,
    /// `VK_SSH_PORT`: the private sshd's port.
    pub ssh_port: u16,
    /// `VK_SSH_USER` (root).
    pub ssh_user: String,
    /// `VK_SSH_KEY`: the ed25519 private key authorised for root (and vkpass).
    pub ssh_key: PathBuf,
    /// `VK_SSH_KNOWN_HOSTS`: OpenSSH known_hosts pinning both host keys for `[127.0.0.1]:PORT`.
    pub known_hosts: PathBuf,
    /// `VK_SSH_HOSTKEY_ED25519_PUB`: path of the sshd's ed25519 host public key (`.pub` file).
    pub hostkey_ed25519_pub: PathBuf,
    /// `VK_SSH_HOSTKEY_RSA_PUB`: path of the sshd's RSA host public key (`.pub` file).
    pub hostkey_rsa_pub: PathBuf,
    /// `VK_SSH_PASSWORD_USER` (vkpass): password login, NOPASSWD sudo.
    pub password_user: String,
    /// `VK_SSH_PASSWORD`: vkpass's password.
    pub password: String,
    /// `VK_LIBVIRT_URI` (qemu:///system).
    pub libvirt_uri: String,
    /// `VK_POOL_NAME` (vkt-pool): libvirt directory pool over `pool_dir`.
    pub pool_name: String,
    /// `VK_POOL_DIR`: where test disk images live.
    pub pool_dir: PathBuf,
    /// `VK_QEMU_USER`: the user libvirt runs QEMU as.
    pub qemu_user: String,
    /// `VK_QEMU_GROUP`: the group libvirt runs QEMU as.
    pub qemu_group: String,
    /// `VK_CEPH_CONF`: ceph.conf of the lab cluster.
    pub ceph_conf: PathBuf,
    /// `VK_CEPH_KEYRING`: keyring holding client.admin's key.
    pub ceph_keyring: PathBuf,
    /// `VK_CEPH_ID` (admin).
    pub ceph_id: String,
    /// `VK_CEPH_POOL` (rbd).
    pub ceph_pool: String,
    /// `VK_CEPH_MON` (127.0.0.1:6789).
    pub ceph_mon: String,
    /// `VK_CEPH_SECRET_UUID`: libvirt secret (type ceph) holding client.admin's key.
    pub ceph_secret_uuid: String,
    /// `VK_S3_ENDPOINT` (http://127.0.0.1:7480, radosgw).
    pub s3_endpoint: String,
    /// `VK_S3_ACCESS_KEY`.
    pub s3_access_key: String,
    /// `VK_S3_SECRET_KEY`.
    pub s3_secret_key: String,
    /// `VK_S3_REGION`.
    pub s3_region: String,
    /// `VK_S3_BUCKET`: a bucket created for tests.
    pub s3_bucket: String,
}

static LAB: OnceLock<Lab> = OnceLock::new();

/// The running lab. Reads [`ENV_FILE`], running `lab/up.sh` first when the file is
/// missing or the lab's daemons are not healthy. Panics when the lab cannot be started.
pub fn lab() -> &'static Lab {
    LAB.get_or_init(|| {
        if let Some(lab) = Lab::load().filter(Lab::healthy) {
            return lab;
        }
        run_up_script();
        let lab = Lab::load().unwrap_or_else(|| {
            panic!("lab/up.sh succeeded but {ENV_FILE} is missing or incomplete")
        });
        assert!(
            lab.healthy(),
            "lab/up.sh succeeded but the lab is not healthy (sshd/ceph daemons not answering)"
        );
        lab
    })
}

/// The workspace root (where `lab/` lives), from this crate's manifest dir.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|p| p.join("lab").join("up.sh").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "cannot find lab/up.sh above {}; the virtkeep-lab crate must live in the virtkeep workspace",
                manifest.display()
            )
        })
}

fn run_up_script() {
    let script = workspace_root().join("lab").join("up.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if !out.status.success() {
        panic!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn pid_file_alive(pid_file: &Path, needle: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    let pid = text.trim();
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    // PID 1 reaps zombies lazily: a zombie has an empty cmdline, kill -0 would succeed.
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
        }
        Err(_) => false,
    }
}

fn port_open(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some()
}

impl Lab {
    /// Parses [`ENV_FILE`]; `None` when it is missing or lacks a key.
    pub fn load() -> Option<Lab> {
        let text = std::fs::read_to_string(ENV_FILE).ok()?;
        Self::parse_env(&text)
    }

    /// Parses the `KEY=VALUE` lines of an env file.
    pub fn parse_env(text: &str) -> Option<Lab> {
        let map: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let s = |k: &str| map.get(k).map(|v| v.to_string());
        let p = |k: &str| map.get(k).map(PathBuf::from);
        Some(Lab {
            lab_dir: p("VK_LAB_DIR")?,
            ssh_host: s("VK_SSH_HOST")?,
            ssh_port: map.get("VK_SSH_PORT")?.parse().ok()?,
            ssh_user: s("VK_SSH_USER")?,
            ssh_key: p("VK_SSH_KEY")?,
            known_hosts: p("VK_SSH_KNOWN_HOSTS")?,
            hostkey_ed25519_pub: p("VK_SSH_HOSTKEY_ED25519_PUB")?,
            hostkey_rsa_pub: p("VK_SSH_HOSTKEY_RSA_PUB")?,
            password_user: s("VK_SSH_PASSWORD_USER")?,
            password: s("VK_SSH_PASSWORD")?,
            libvirt_uri: s("VK_LIBVIRT_URI")?,
            pool_name: s("VK_POOL_NAME")?,
            pool_dir: p("VK_POOL_DIR")?,
            qemu_user: s("VK_QEMU_USER")?,
            qemu_group: s("VK_QEMU_GROUP")?,
            ceph_conf: p("VK_CEPH_CONF")?,
            ceph_keyring: p("VK_CEPH_KEYRING")?,
            ceph_id: s("VK_CEPH_ID")?,
            ceph_pool: s("VK_CEPH_POOL")?,
            ceph_mon: s("VK_CEPH_MON")?,
            ceph_secret_uuid: s("VK_CEPH_SECRET_UUID")?,
            s3_endpoint: s("VK_S3_ENDPOINT")?,
            s3_access_key: s("VK_S3_ACCESS_KEY")?,
            s3_secret_key: s("VK_S3_SECRET_KEY")?,
            s3_region: s("VK_S3_REGION")?,
            s3_bucket: s("VK_S3_BUCKET")?,
        })
    }

    /// Cheap health check (no CLI calls): sshd and the Ceph daemons are alive by their
    /// pid files, and their ports accept connections.
    pub fn healthy(&self) -> bool {
        let ssh_dir = self.lab_dir.join("ssh");
        let ceph_run = self.lab_dir.join("ceph").join("run");
        let conf = self.ceph_conf.to_string_lossy();
        pid_file_alive(
            &ssh_dir.join("sshd.pid"),
            &ssh_dir.join("sshd_config").to_string_lossy(),
        ) && pid_file_alive(&ceph_run.join("mon.a.pid"), &conf)
            && pid_file_alive(&ceph_run.join("osd.0.pid"), &conf)
            && pid_file_alive(&ceph_run.join("client.rgw.a.pid"), &conf)
            && port_open(&format!("{}:{}", self.ssh_host, self.ssh_port))
            && port_open(&self.ceph_mon)
            && port_open(self.s3_endpoint.trim_start_matches("http://"))
    }

    /// Runs `virsh -c URI ARGS...`; panics with the command and its stderr on failure.
    pub fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `virsh -c URI ARGS...`; `Err` carries the command line and its stderr.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c").arg(&self.libvirt_uri).args(args);
        run_capture(&mut cmd)
    }

    /// `-c CONF --id ID --keyring KEYRING` for ceph/rbd/rados command lines.
    pub fn ceph_args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            self.ceph_conf.to_string_lossy().into_owned(),
            "--id".into(),
            self.ceph_id.clone(),
            "--keyring".into(),
            self.ceph_keyring.to_string_lossy().into_owned(),
        ]
    }

    /// Runs `rbd <ceph_args> ARGS...`; panics with the command and its stderr on failure.
    pub fn rbd(&self, args: &[&str]) -> String {
        self.try_rbd(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `rbd <ceph_args> ARGS...`; `Err` carries the command line and its stderr.
    pub fn try_rbd(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("rbd");
        cmd.args(self.ceph_args()).args(args);
        run_capture(&mut cmd)
    }

    /// `pool/image` for an image name (names that already hold a pool are kept).
    pub fn rbd_spec(&self, image: &str) -> String {
        if image.contains('/') {
            image.to_string()
        } else {
            format!("{}/{}", self.ceph_pool, image)
        }
    }

    /// OpenSSH client options for the lab sshd with strict host-key checking against
    /// the lab's known_hosts, key auth with the lab key, no agent, no prompts.
    pub fn ssh_options(&self) -> Vec<String> {
        vec![
            "-p".into(),
            self.ssh_port.to_string(),
            "-i".into(),
            self.ssh_key.to_string_lossy().into_owned(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "IdentityAgent=none".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-F".into(),
            "/dev/null".into(),
        ]
    }

    /// A system `ssh` command logged in as root with the lab key (strict host keys);
    /// append the remote command line with `.arg(...)`.
    pub fn ssh_command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options())
            .arg(format!("{}@{}", self.ssh_user, self.ssh_host))
            .stdin(Stdio::null());
        cmd
    }
}

/// Runs a command, returns its stdout; `Err` names the command, its status and stderr.
fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failure(cmd, &out))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&format!("{:?}", a.to_string_lossy()));
    }
    s
}

fn failure(cmd: &Command, out: &Output) -> String {
    format!(
        "command failed ({}): {}\nstderr: {}\nstdout: {}",
        out.status,
        describe(cmd),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

fn run(cmd: &mut Command) -> String {
    run_capture(cmd).unwrap_or_else(|e| panic!("{e}"))
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `vkt-{tag}-{pid}-{counter}` with the tag reduced to `[a-z0-9-]`: unique across the
/// parallel processes of a nextest run, recognisable by `lab/up.sh`'s sweep (which
/// removes resources whose pid is gone).
pub fn unique_name(tag: &str) -> String {
    let mut clean: String = tag
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while clean.contains("--") {
        clean = clean.replace("--", "-");
    }
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "t" } else { clean };
    let clean: String = clean.chars().take(32).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("vkt-{}-{}-{}", clean, std::process::id(), n)
}

/// The storage backend of a test disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// qcow2 v3 (compat 1.1) file in the pool dir.
    Qcow2,
    /// Sparse raw file in the pool dir.
    Raw,
    /// Ceph RBD image in the lab pool, attached as a network disk.
    Rbd,
}

impl DiskKind {
    /// QEMU format name of the disk's top layer (`qcow2` or `raw`).
    pub fn format(self) -> &'static str {
        match self {
            DiskKind::Qcow2 => "qcow2",
            DiskKind::Raw | DiskKind::Rbd => "raw",
        }
    }
}

/// One disk of a [`TestVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDisk {
    /// Guest target: vda, vdb, ...
    pub target: String,
    /// Backend.
    pub kind: DiskKind,
    /// File path (Qcow2, Raw).
    pub path: Option<PathBuf>,
    /// RBD image name in the lab pool (Rbd), without the pool.
    pub rbd_image: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
}

/// What a backup could leave behind on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Files next to a disk whose name starts with the disk file's name (overlays).
    pub overlay_files: Vec<PathBuf>,
    /// libvirt snapshots (`virsh snapshot-list --name`).
    pub snapshots: Vec<String>,
    /// libvirt checkpoints (`virsh checkpoint-list --name`).
    pub checkpoints: Vec<String>,
    /// RBD snapshots as `image@snap`.
    pub rbd_snapshots: Vec<String>,
}

impl Leftovers {
    /// Nothing left behind.
    pub fn is_empty(&self) -> bool {
        self.overlay_files.is_empty()
            && self.snapshots.is_empty()
            && self.checkpoints.is_empty()
            && self.rbd_snapshots.is_empty()
    }
}

/// Builder for [`TestVm`].
#[derive(Debug, Clone)]
pub struct TestVmBuilder {
    tag: String,
    disks: Vec<(DiskKind, u64)>,
    name: Option<String>,
    running: bool,
}

impl TestVmBuilder {
    /// Adds a qcow2 v3 disk of `size` bytes.
    pub fn qcow2_disk(mut self, size: u64) -> Self {
        self.disks.push((DiskKind::Qcow2, size));
        self
    }
    /// Adds a sparse raw file disk of `size` bytes.
    pub fn raw_disk(mut self, size: u64) -> Self {
        self.disks.push((DiskKind::Raw, size));
        self
    }
    /// Adds an RBD network disk of `size` bytes (rounded up to whole MiB by nothing:
    /// RBD takes byte sizes).
    pub fn rbd_disk(mut self, size: u64) -> Self {
        self.disks.push((DiskKind::Rbd, size));
        self
    }
    /// A custom domain name (may be hostile: quotes, `$()`, spaces, unicode; libvirt
    /// rejects `/`). Disk files and RBD images keep the unique `vkt-` name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Start the domain after defining it (default: true).
    pub fn running(mut self, running: bool) -> Self {
        self.running = running;
        self
    }

    /// Creates the disks, defines the domain and starts it when `running(true)`.
    /// Whatever was created is removed again if this panics half-way.
    pub fn build(self) -> TestVm {
        let lab = lab();
        let id = unique_name(&self.tag);
        let name = self.name.clone().unwrap_or_else(|| id.clone());
        assert!(
            !name.contains('/'),
            "libvirt rejects '/' in domain names: {name:?}"
        );
        assert!(
            !self.disks.is_empty(),
            "TestVm {name:?} needs at least one disk"
        );
        assert!(self.disks.len() <= 26, "at most 26 disks");
        // By name only: `--domain 14` would find the domain running with id 14.
        let exists = lab
            .try_virsh(&["list", "--all", "--name"])
            .is_ok_and(|l| l.lines().any(|n| n == name));
        if exists {
            // A leftover of a killed run with the same custom name: remove it when it
            // only uses lab storage, refuse otherwise.
            let old = TestVm::adopt(&name);
            let foreign = old.disks.iter().any(|d| match &d.path {
                Some(p) => !p.starts_with(&lab.pool_dir),
                None => !d
                    .rbd_image
                    .as_deref()
                    .is_some_and(|i| i.starts_with("vkt-")),
            });
            if foreign {
                std::mem::forget(old);
                panic!("domain {name:?} already exists and uses storage outside the lab");
            }
            drop(old);
        }
        let mut vm = TestVm {
            name: name.clone(),
            disks: Vec::new(),
            adopted: false,
        };
        for (i, (kind, size)) in self.disks.iter().copied().enumerate() {
            let target = format!("vd{}", (b'a' + i as u8) as char);
            let disk = create_disk(lab, &id, &target, kind, size);
            vm.disks.push(disk);
        }
        let xml = domain_xml(lab, &name, &vm.disks);
        let dir = tempfile::tempdir().expect("tempdir for domain XML");
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).expect("write domain XML");
        lab.virsh(&["define", "--file", &xml_path.to_string_lossy()]);
        if self.running {
            vm.start();
        }
        vm
    }
}

fn create_disk(lab: &Lab, id: &str, target: &str, kind: DiskKind, size: u64) -> TestDisk {
    match kind {
        DiskKind::Qcow2 | DiskKind::Raw => {
            let ext = kind.format();
            let path = lab.pool_dir.join(format!("{id}-{target}.{ext}"));
            if kind == DiskKind::Qcow2 {
                run(Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-o", "compat=1.1"])
                    .arg(&path)
                    .arg(size.to_string()));
            } else {
                let f = std::fs::File::create(&path)
                    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                f.set_len(size)
                    .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
            }
            run(Command::new("chown")
                .arg(format!("{}:{}", lab.qemu_user, lab.qemu_group))
                .arg(&path));
            TestDisk {
                target: target.to_string(),
                kind,
                path: Some(path),
                rbd_image: None,
                size,
            }
        }
        DiskKind::Rbd => {
            let image = format!("{id}-{target}");
            lab.rbd(&[
                "create",
                "--size",
                &format!("{size}B"),
                &lab.rbd_spec(&image),
            ]);
            TestDisk {
                target: target.to_string(),
                kind,
                path: None,
                rbd_image: Some(image),
                size,
            }
        }
    }
}

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn domain_xml(lab: &Lab, name: &str, disks: &[TestDisk]) -> String {
    let mut x = String::new();
    x.push_str("<domain type='qemu'>\n");
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(name));
    x.push_str("  <memory unit='KiB'>65536</memory>\n");
    x.push_str("  <vcpu>1</vcpu>\n");
    x.push_str("  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    let (mon_host, mon_port) = lab
        .ceph_mon
        .rsplit_once(':')
        .unwrap_or((lab.ceph_mon.as_str(), "6789"));
    for d in disks {
        match d.kind {
            DiskKind::Qcow2 | DiskKind::Raw => {
                let path = d.path.as_ref().map(|p| p.to_string_lossy().into_owned());
                let _ = write!(
                    x,
                    "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n",
                    d.kind.format(),
                    xml_escape(&path.unwrap_or_default())
                );
            }
            DiskKind::Rbd => {
                let image = d.rbd_image.clone().unwrap_or_default();
                let _ = write!(
                    x,
                    "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source protocol='rbd' name='{}'>\n        <host name='{}' port='{}'/>\n      </source>\n      <auth username='{}'>\n        <secret type='ceph' uuid='{}'/>\n      </auth>\n",
                    xml_escape(&lab.rbd_spec(&image)),
                    xml_escape(mon_host),
                    xml_escape(mon_port),
                    xml_escape(&lab.ceph_id),
                    xml_escape(&lab.ceph_secret_uuid)
                );
            }
        }
        let _ = write!(
            x,
            "      <target dev='{t}' bus='virtio'/>\n      <alias name='ua-{t}'/>\n    </disk>\n",
            t = d.target
        );
    }
    x.push_str("    <controller type='usb' model='none'/>\n");
    x.push_str("    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// A test domain; `Drop` destroys and undefines it (with snapshot and checkpoint
/// metadata) and removes its disk files, overlays next to them and RBD images (with
/// their snapshots), also when the test panicked.
#[derive(Debug)]
pub struct TestVm {
    /// Domain name.
    pub name: String,
    /// Disks in target order.
    pub disks: Vec<TestDisk>,
    adopted: bool,
}

impl TestVm {
    /// Starts building a test domain; `tag` becomes part of its unique `vkt-` name.
    pub fn builder(tag: &str) -> TestVmBuilder {
        TestVmBuilder {
            tag: tag.to_string(),
            disks: Vec::new(),
            name: None,
            running: true,
        }
    }

    /// A drop guard over an existing domain (e.g. one a test restored under a new name):
    /// its disks are read from `virsh domblklist`; dropping it removes the domain, its
    /// disk files (and overlays) and RBD images. The domain may not exist yet: the
    /// disks are looked up again when the guard drops.
    pub fn adopt(name: &str) -> TestVm {
        TestVm {
            name: name.to_string(),
            disks: discover_disks(lab(), name),
            adopted: true,
        }
    }

    /// The disk with guest target `target` (vda, vdb, ...); panics when there is none.
    pub fn disk(&self, target: &str) -> &TestDisk {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .unwrap_or_else(|| panic!("domain {:?} has no disk {target}", self.name))
    }

    /// `virsh domstate` is "running".
    pub fn is_running(&self) -> bool {
        lab()
            .try_virsh(&["domstate", "--domain", &self.name])
            .map(|s| s.trim() == "running")
            .unwrap_or(false)
    }

    /// Starts the domain.
    pub fn start(&self) {
        lab().virsh(&["start", "--domain", &self.name]);
    }

    /// Stops the domain hard (`virsh destroy`).
    pub fn stop(&self) {
        lab().virsh(&["destroy", "--domain", &self.name]);
    }

    /// The domain's disk sources as `(target, source)` from `virsh domblklist`
    /// (file paths, or `pool/image` for RBD), so a test can check the VM runs on its
    /// original files after a backup.
    pub fn current_sources(&self) -> Vec<(String, String)> {
        parse_domblklist(&lab().virsh(&["domblklist", "--domain", &self.name, "--details"]))
            .into_iter()
            .filter(|e| e.device == "disk")
            .map(|e| (e.target, e.source))
            .collect()
    }

    /// Writes `len` bytes of `pattern` at `offset` into the guest-visible disk `target`.
    /// A running domain is written through its QEMU (qemu-io on the device via HMP, then
    /// a flush), and the write is confirmed from QEMU's log; a stopped domain's image is
    /// written with qemu-io directly.
    pub fn write_pattern(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        let disk = self.disk(target).clone();
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= disk.size),
            "write_pattern({target}, {offset}, {len}) is beyond the disk size {}",
            disk.size
        );
        let io_cmd = format!("write -P 0x{pattern:02x} {offset} {len}");
        if self.is_running() {
            self.hmp_qemu_io(
                target,
                &io_cmd,
                &format!("wrote {len}/{len} bytes at offset {offset}"),
            );
            self.hmp_qemu_io(target, "flush", "");
        } else {
            let lab = lab();
            let mut cmd = Command::new("qemu-io");
            match disk.kind {
                DiskKind::Qcow2 | DiskKind::Raw => {
                    cmd.args(["-f", disk.kind.format()])
                        .arg("-c")
                        .arg(&io_cmd)
                        .arg(disk.path.as_ref().expect("file disk has a path"));
                }
                DiskKind::Rbd => {
                    let image = disk.rbd_image.as_deref().expect("rbd disk has an image");
                    let spec = lab.rbd_spec(image);
                    let (pool, img) = spec.split_once('/').expect("pool/image");
                    cmd.arg("--image-opts").arg("-c").arg(&io_cmd).arg(format!(
                        "driver=raw,file.driver=rbd,file.pool={pool},file.image={img},file.conf={},file.user={}",
                        lab.ceph_conf.display(),
                        lab.ceph_id
                    ));
                }
            }
            let out = run(&mut cmd);
            assert!(
                out.contains(&format!("wrote {len}/{len} bytes")),
                "qemu-io did not confirm the write on {} {target}: {out}",
                self.name
            );
        }
    }

    fn device_alias(&self, target: &str) -> String {
        let xml = lab().virsh(&["dumpxml", "--domain", &self.name]);
        let needle = format!("dev='{target}'");
        for chunk in xml.split("<disk ").skip(1) {
            let chunk = chunk.split("</disk>").next().unwrap_or("");
            if chunk.contains(&needle)
                && let Some(rest) = chunk.split("<alias name='").nth(1)
                && let Some(alias) = rest.split('\'').next()
            {
                return alias.to_string();
            }
        }
        panic!(
            "no device alias for disk {target} in the live XML of {:?}",
            self.name
        )
    }

    /// Runs `qemu-io -d DEVICE "CMD"` in the domain's HMP monitor; when `expect` is not
    /// empty, waits until that text shows in the domain's QEMU log (where qemu-io prints).
    fn hmp_qemu_io(&self, target: &str, io_cmd: &str, expect: &str) {
        let lab = lab();
        let device = format!(
            "/machine/peripheral/{}/virtio-backend",
            self.device_alias(target)
        );
        let log = PathBuf::from("/var/log/libvirt/qemu").join(format!("{}.log", self.name));
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let hmp = format!("qemu-io -d {device} \"{io_cmd}\"");
        let out = lab.virsh(&[
            "qemu-monitor-command",
            "--domain",
            &self.name,
            "--hmp",
            &hmp,
        ]);
        assert!(
            out.trim().is_empty(),
            "HMP {hmp:?} on {:?} failed: {}",
            self.name,
            out.trim()
        );
        if expect.is_empty() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log) {
                use std::io::Seek as _;
                if f.seek(std::io::SeekFrom::Start(start)).is_ok() {
                    let _ = f.read_to_string(&mut text);
                }
            }
            if text.contains(expect) {
                return;
            }
            if let Some(line) = text.lines().find(|l| l.contains("failed")) {
                panic!("qemu-io {io_cmd:?} on {:?} {target}: {line}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io {io_cmd:?} on {:?} {target}: no confirmation in {} within 15 s",
                self.name,
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// sha256 (hex) of the guest-visible content of disk `target` at this moment. For a
    /// running domain this follows the live source (an overlay on top of the disk,
    /// should a backup have put one there).
    pub fn disk_checksum(&self, target: &str) -> String {
        let disk = self.disk(target);
        match disk.kind {
            DiskKind::Rbd => rbd_checksum(disk.rbd_image.as_deref().expect("rbd image")),
            DiskKind::Qcow2 | DiskKind::Raw => {
                let path = disk.path.clone().expect("file disk has a path");
                let live = if self.is_running() {
                    self.current_sources()
                        .into_iter()
                        .find(|(t, _)| t == target)
                        .map(|(_, s)| PathBuf::from(s))
                } else {
                    None
                };
                match live {
                    Some(live) if live != path => file_checksum(&live, &probe_format(&live)),
                    _ => file_checksum(&path, disk.kind.format()),
                }
            }
        }
    }

    /// What a backup could have left behind: overlay files next to the disks, libvirt
    /// snapshots and checkpoints, RBD snapshots.
    pub fn leftovers(&self) -> Leftovers {
        let lab = lab();
        let mut left = Leftovers::default();
        for d in &self.disks {
            if let Some(path) = &d.path {
                left.overlay_files.extend(overlay_files(path));
            }
            if let Some(image) = &d.rbd_image {
                left.rbd_snapshots.extend(
                    rbd_snapshots(lab, image)
                        .into_iter()
                        .map(|(s, _)| format!("{image}@{s}")),
                );
            }
        }
        if lab.try_virsh(&["domuuid", "--domain", &self.name]).is_ok() {
            left.snapshots =
                lines(&lab.virsh(&["snapshot-list", "--domain", &self.name, "--name"]));
            left.checkpoints =
                lines(&lab.virsh(&["checkpoint-list", "--domain", &self.name, "--name"]));
        }
        left
    }

    fn teardown(&mut self) {
        let lab = match LAB.get() {
            Some(l) => l,
            None => lab(),
        };
        // disks as the domain sees them now (adopted guards learn them here)
        for d in discover_disks(lab, &self.name) {
            let known = self.disks.iter().any(|k| {
                (k.path.is_some() && k.path == d.path)
                    || (k.rbd_image.is_some() && k.rbd_image == d.rbd_image)
            });
            if !known && (self.adopted || is_lab_storage(lab, &d)) {
                self.disks.push(d);
            }
        }
        let _ = lab.try_virsh(&["destroy", "--domain", &self.name]);
        if lab.try_virsh(&["domuuid", "--domain", &self.name]).is_ok() {
            let undefined = lab
                .try_virsh(&[
                    "undefine",
                    "--domain",
                    &self.name,
                    "--snapshots-metadata",
                    "--checkpoints-metadata",
                ])
                .or_else(|_| lab.try_virsh(&["undefine", "--domain", &self.name]));
            if let Err(e) = undefined {
                eprintln!(
                    "virtkeep-lab: WARNING: cannot undefine {:?}: {e}",
                    self.name
                );
            }
        }
        for d in &self.disks {
            if let Some(path) = &d.path {
                for f in overlay_files(path) {
                    let _ = std::fs::remove_file(f);
                }
                if let Err(e) = std::fs::remove_file(path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    eprintln!(
                        "virtkeep-lab: WARNING: cannot remove {}: {e}",
                        path.display()
                    );
                }
            }
            if let Some(image) = &d.rbd_image {
                remove_rbd_image(lab, image);
            }
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // never panic in drop (a panic while unwinding aborts the test process)
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown()));
        if res.is_err() {
            eprintln!(
                "virtkeep-lab: WARNING: teardown of {:?} failed; lab/up.sh or lab/down.sh sweeps leftovers",
                self.name
            );
        }
    }
}

fn is_lab_storage(lab: &Lab, d: &TestDisk) -> bool {
    match (&d.path, &d.rbd_image) {
        (Some(p), _) => p.starts_with(&lab.pool_dir),
        (None, Some(i)) => i.starts_with("vkt-"),
        _ => false,
    }
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

struct BlkEntry {
    kind: String,
    device: String,
    target: String,
    source: String,
}

fn parse_domblklist(text: &str) -> Vec<BlkEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("---"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let kind = it.next()?.to_string();
            let device = it.next()?.to_string();
            let target = it.next()?.to_string();
            let source = it.collect::<Vec<_>>().join(" ");
            if kind == "Type" && device == "Device" {
                return None; // header
            }
            Some(BlkEntry {
                kind,
                device,
                target,
                source,
            })
        })
        .collect()
}

fn discover_disks(lab: &Lab, name: &str) -> Vec<TestDisk> {
    let Ok(text) = lab.try_virsh(&["domblklist", "--domain", name, "--details"]) else {
        return Vec::new();
    };
    let mut disks = Vec::new();
    for e in parse_domblklist(&text) {
        if e.device != "disk" || e.source == "-" || e.source.is_empty() {
            continue;
        }
        match e.kind.as_str() {
            "file" | "block" => {
                let path = PathBuf::from(&e.source);
                let (format, size) = image_info(&path).unwrap_or_else(|| ("raw".into(), 0));
                disks.push(TestDisk {
                    target: e.target,
                    kind: if format == "qcow2" {
                        DiskKind::Qcow2
                    } else {
                        DiskKind::Raw
                    },
                    path: Some(path),
                    rbd_image: None,
                    size,
                });
            }
            "network" => {
                let image = e
                    .source
                    .strip_prefix(&format!("{}/", lab.ceph_pool))
                    .unwrap_or(&e.source)
                    .to_string();
                let size = lab
                    .try_rbd(&["info", "--format", "json", &lab.rbd_spec(&image)])
                    .ok()
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                    .and_then(|v| v["size"].as_u64())
                    .unwrap_or(0);
                disks.push(TestDisk {
                    target: e.target,
                    kind: DiskKind::Rbd,
                    path: None,
                    rbd_image: Some(image),
                    size,
                });
            }
            _ => {}
        }
    }
    disks
}

/// `(format, virtual size)` of an image file from `qemu-img info -U`.
fn image_info(path: &Path) -> Option<(String, u64)> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["format"].as_str()?.to_string(),
        v["virtual-size"].as_u64()?,
    ))
}

fn probe_format(path: &Path) -> String {
    image_info(path)
        .map(|(f, _)| f)
        .unwrap_or_else(|| panic!("qemu-img info -U {} failed", path.display()))
}

/// Files in the disk's directory whose name starts with the disk file's name, other
/// than the disk itself (overlays such as `DISK.SNAPNAME`).
pub fn overlay_files(disk: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(base)) = (disk.parent(), disk.file_name()) else {
        return Vec::new();
    };
    let base = base.to_string_lossy();
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with(base.as_ref()) && n != base
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// `(name, protected)` of an image's RBD snapshots.
fn rbd_snapshots(lab: &Lab, image: &str) -> Vec<(String, bool)> {
    let Ok(json) = lab.try_rbd(&["snap", "ls", "--format", "json", &lab.rbd_spec(image)]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let name = s["name"].as_str()?.to_string();
                    let protected = s["protected"].as_str() == Some("true")
                        || s["protected"].as_bool() == Some(true);
                    Some((name, protected))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes an RBD image with all its snapshots; retries while QEMU's watch lingers.
pub fn remove_rbd_image(lab: &Lab, image: &str) {
    let spec = lab.rbd_spec(image);
    if lab.try_rbd(&["info", &spec]).is_err() {
        return;
    }
    for (snap, protected) in rbd_snapshots(lab, image) {
        if protected {
            let _ = lab.try_rbd(&["snap", "unprotect", &format!("{spec}@{snap}")]);
        }
    }
    let _ = lab.try_rbd(&["snap", "purge", "--no-progress", &spec]);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        match lab.try_rbd(&["rm", "--no-progress", &spec]) {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline && e.contains("watchers") => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                eprintln!("virtkeep-lab: WARNING: cannot remove rbd image {spec}: {e}");
                return;
            }
        }
    }
}

/// sha256 (hex) of the guest-visible content of an image file in `format` (qcow2,
/// raw, ...), read with `-U` so it works while QEMU holds the image.
pub fn file_checksum(path: &Path, format: &str) -> String {
    if format == "raw" {
        return sha256_of_file(path);
    }
    let dir = tempfile::Builder::new()
        .prefix("vkt-checksum-")
        .tempdir()
        .expect("tempdir for checksum");
    let tmp = dir.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&tmp));
    sha256_of_file(&tmp)
}

fn sha256_of_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg("-b").arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

/// sha256 (hex) of an RBD image's content (`image`, `pool/image` or `pool/image@snap`),
/// streamed from `rbd export` into sha256sum.
pub fn rbd_checksum(image: &str) -> String {
    let lab = lab();
    let spec = lab.rbd_spec(image);
    let mut export = Command::new("rbd")
        .args(lab.ceph_args())
        .args(["export", "--no-progress", &spec, "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rbd export");
    let stdout = export.stdout.take().expect("rbd stdout");
    let hash = Command::new("sha256sum")
        .arg("-b")
        .stdin(Stdio::from(stdout))
        .output()
        .expect("run sha256sum");
    let status = export.wait().expect("wait for rbd export");
    let mut err = String::new();
    if let Some(mut e) = export.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.success(),
        "rbd export {spec} failed ({status}): {err}"
    );
    assert!(hash.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&hash.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_clean_and_distinct() {
        let a = unique_name("My Test_1 ü");
        let b = unique_name("My Test_1 ü");
        assert_ne!(a, b);
        assert!(a.starts_with("vkt-my-test-1-"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
        assert!(a.contains(&format!("-{}-", std::process::id())));
    }

    #[test]
    fn xml_escape_escapes_everything_special() {
        assert_eq!(
            xml_escape(r#"it's $(x) "q" <a> & b"#),
            "it&apos;s $(x) &quot;q&quot; &lt;a&gt; &amp; b"
        );
    }

    #[test]
    fn domblklist_parsing() {
        let text = " Type      Device   Target   Source\n---------------------\n file      disk     vda      /var/lib/x y/a.qcow2\n network   disk     vdb      rbd/vkt-a\n file      cdrom    sda      -\n";
        let e = parse_domblklist(text);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].source, "/var/lib/x y/a.qcow2");
        assert_eq!(e[1].kind, "network");
        assert_eq!(e[2].device, "cdrom");
    }

    #[test]
    fn env_parsing_requires_every_key() {
        assert!(Lab::parse_env("VK_LAB_DIR=/tmp/x\n").is_none());
    }
}
