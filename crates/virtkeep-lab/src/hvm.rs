//! The LVM test hypervisor: a small Debian VM under qemu TCG (this machine's kernel has
//! no device-mapper) with LVM, libvirt and sshd, reached over SSH on 127.0.0.1.
//!
//! `lab/hvm/up.sh` boots it (building the cached image first when needed) and writes
//! [`HVM_ENV_FILE`]; [`hvm()`] reads that file, running the script when the VM is not up.
//! The VM has the volume group `vg0` on a 2 GiB PV: the thin pool `vg0/thinpool`
//! (512 MiB) and about 1.5 GiB free for thick LVs and their snapshots. It boots once per
//! test run (about 20–45 s) and powers itself off after an hour without SSH sessions;
//! `lab/hvm/down.sh` stops it.
//!
//! Everything through it is slow: about 1.5 s per SSH connection, 1–3 s per LVM command,
//! about 10 MiB/s of data through SSH. Keep LVs at 16–64 MiB and batch commands into one
//! [`Hvm::ssh`] call where possible.
//!
//! [`LvmTestVm`] makes LVs and a libvirt domain on them inside the VM (removed by `Drop`);
//! [`ScratchVg`] makes a small VG of its own (on a loop device) for tests that need a
//! full VG without disturbing `vg0`. Everything here panics on failure: it is test
//! support.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{unique_name, workspace_root, xml_escape};

/// Where `lab/hvm/up.sh` writes the VM's `KEY=VALUE` environment file.
pub const HVM_ENV_FILE: &str = "/tmp/virtkeep-lab/hvm/env";

/// The marker in the names of the LVM snapshots virtkeep makes (the engine's
/// `lvm::LV_SNAPSHOT_MARKER`; repeated here because this crate does not depend on the
/// engine).
pub const SNAPSHOT_MARKER: &str = "-vksnap-";

/// Default limit for one SSH command into the VM.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(300);

/// How to reach the LVM hypervisor (one field per `VK_HVM_*` key of the env file).
#[derive(Debug, Clone)]
pub struct Hvm {
    /// `VK_HVM_HOST` (127.0.0.1).
    pub host: String,
    /// `VK_HVM_PORT`: forwarded to the VM's sshd.
    pub port: u16,
    /// `VK_HVM_USER` (root).
    pub user: String,
    /// `VK_HVM_KEY`: ed25519 private key authorised for root in the VM (made per boot).
    pub key: PathBuf,
    /// `VK_HVM_KNOWN_HOSTS`: OpenSSH known_hosts pinning the VM's host key for `[127.0.0.1]:PORT`.
    pub known_hosts: PathBuf,
    /// `VK_HVM_VG` (vg0).
    pub vg: String,
    /// `VK_HVM_THINPOOL` (thinpool, in `vg`).
    pub thinpool: String,
    /// `VK_HVM_PID`: the qemu process.
    pub pid: u32,
    /// `VK_HVM_RUN_DIR`: the VM's per-boot state (`/var/tmp/virtkeep-lab-hvm`: overlay, PV
    /// disk, keys, console.log, SSH control sockets).
    pub run_dir: PathBuf,
}

static HVM: OnceLock<Hvm> = OnceLock::new();

/// The running LVM hypervisor. Reads [`HVM_ENV_FILE`], running `lab/hvm/up.sh` first when
/// the file is missing or the VM is not running. Panics when it cannot be started.
pub fn hvm() -> &'static Hvm {
    HVM.get_or_init(|| {
        if let Some(h) = Hvm::load().filter(Hvm::healthy) {
            return h;
        }
        let script = workspace_root().join("lab").join("hvm").join("up.sh");
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "virtkeep-lab: LVM hypervisor ready after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let h = Hvm::load().unwrap_or_else(|| {
            panic!("lab/hvm/up.sh succeeded but {HVM_ENV_FILE} is missing or incomplete")
        });
        assert!(
            h.healthy(),
            "lab/hvm/up.sh succeeded but the VM's qemu or its SSH port is gone"
        );
        h
    })
}

impl Hvm {
    /// Parses [`HVM_ENV_FILE`]; `None` when it is missing or lacks a key.
    pub fn load() -> Option<Hvm> {
        Self::parse_env(&std::fs::read_to_string(HVM_ENV_FILE).ok()?)
    }

    /// Parses the `KEY=VALUE` lines of the env file.
    pub fn parse_env(text: &str) -> Option<Hvm> {
        let map: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let s = |k: &str| map.get(k).map(|v| v.to_string());
        let p = |k: &str| map.get(k).map(PathBuf::from);
        Some(Hvm {
            host: s("VK_HVM_HOST")?,
            port: map.get("VK_HVM_PORT")?.parse().ok()?,
            user: s("VK_HVM_USER")?,
            key: p("VK_HVM_KEY")?,
            known_hosts: p("VK_HVM_KNOWN_HOSTS")?,
            vg: s("VK_HVM_VG")?,
            thinpool: s("VK_HVM_THINPOOL")?,
            pid: map.get("VK_HVM_PID")?.parse().ok()?,
            run_dir: p("VK_HVM_RUN_DIR")?,
        })
    }

    /// Cheap check (no SSH): the qemu process is ours and alive, its port accepts.
    pub fn healthy(&self) -> bool {
        let alive = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains("virtkeep-hvm")
            })
            .unwrap_or(false);
        alive
            && format!("{}:{}", self.host, self.port)
                .parse()
                .ok()
                .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
                .is_some()
    }

    /// The VM's serial console log (boot messages, `hvm-init:` lines), for failure reports.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// `root@127.0.0.1:PORT`, for `virtkeep host add NAME --ssh …`.
    pub fn ssh_spec(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// `/dev/VG/LV` in the VM; `lv` is `NAME` (in [`Hvm::vg`]) or `VG/NAME`.
    pub fn lv_path(&self, lv: &str) -> String {
        match lv.split_once('/') {
            Some((vg, name)) => format!("/dev/{vg}/{name}"),
            None => format!("/dev/{}/{lv}", self.vg),
        }
    }

    /// OpenSSH client options: the VM's key, strict host-key checking against its pinned
    /// known_hosts, no agent, no prompts, keepalives.
    pub fn ssh_options(&self) -> Vec<String> {
        let mut o: Vec<String> = vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.key.to_string_lossy().into_owned(),
            "-F".into(),
            "/dev/null".into(),
        ];
        for opt in [
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "StrictHostKeyChecking=yes",
            "GlobalKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "ConnectTimeout=15",
            "ServerAliveInterval=10",
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
        ] {
            o.push("-o".into());
            o.push(opt.into());
        }
        o.push("-o".into());
        o.push(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        o
    }

    /// `timeout -k 5 SECS ssh OPTIONS root@127.0.0.1 CMD` (stdin: null). Connections
    /// are multiplexed over one master per run dir (`ControlPersist` 60 s): a new SSH
    /// connection into the VM costs about 1.5 s, a multiplexed session a few ms.
    pub fn ssh_command(&self, cmd: &str, timeout: Duration) -> Command {
        let mut c = Command::new("timeout");
        c.arg("-k")
            .arg("5")
            .arg(timeout.as_secs().max(1).to_string())
            .arg("ssh")
            .args(self.ssh_options())
            .arg("-o")
            .arg("ControlMaster=auto")
            .arg("-o")
            .arg(format!("ControlPath={}/cm-%C", self.run_dir.display()))
            .arg("-o")
            .arg("ControlPersist=60")
            .arg(format!("{}@{}", self.user, self.host))
            .arg(cmd)
            .stdin(Stdio::null());
        c
    }

    /// Runs a shell command line in the VM (as root) within [`SSH_TIMEOUT`]; returns its
    /// stdout. Panics with the command and its stderr when it fails.
    pub fn ssh(&self, cmd: &str) -> String {
        self.try_ssh(cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Hvm::ssh`], `Err` with the command, status and stderr instead of a panic.
    pub fn try_ssh(&self, cmd: &str) -> Result<String, String> {
        self.try_ssh_timeout(cmd, SSH_TIMEOUT)
    }

    /// Like [`Hvm::try_ssh`] with another time limit (exit status 124: timed out).
    pub fn try_ssh_timeout(&self, cmd: &str, timeout: Duration) -> Result<String, String> {
        let out = self
            .ssh_command(cmd, timeout)
            .output()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ssh to the LVM hypervisor failed ({}{}): {cmd}\nstderr: {}\nstdout: {}",
                out.status,
                if out.status.code() == Some(124) {
                    ", timed out"
                } else {
                    ""
                },
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    /// sha256 (hex) of what `cmd` prints in the VM, computed here as it streams through
    /// SSH (e.g. `dd if=/dev/vg0/SNAP bs=4M status=none`), and the bytes counted.
    pub fn ssh_sha256(&self, cmd: &str) -> (String, u64) {
        let mut ssh = self
            .ssh_command(cmd, SSH_TIMEOUT)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let mut stdout = ssh.stdout.take().expect("ssh stdout");
        let mut sha = Command::new("sha256sum")
            .arg("-b")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sha256sum");
        let mut sink = sha.stdin.take().expect("sha256sum stdin");
        let n = std::io::copy(&mut stdout, &mut sink).expect("stream ssh into sha256sum");
        drop(sink);
        let status = ssh.wait().expect("wait for ssh");
        let mut err = String::new();
        if let Some(mut e) = ssh.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "ssh {cmd:?} failed ({status}): {err}");
        let out = sha.wait_with_output().expect("sha256sum");
        let hex = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("sha256sum output")
            .to_string();
        (hex, n)
    }

    /// sha256 (hex) of an LV's content, computed inside the VM; `lv` is `NAME` or `VG/NAME`.
    pub fn lv_checksum(&self, lv: &str) -> String {
        let out = self.ssh(&format!("sha256sum < {}", sh_quote(&self.lv_path(lv))));
        out.split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("sha256sum printed nothing for {lv}"))
            .to_string()
    }

    /// The LVs of `vg` as `(name, lv_attr, origin)`.
    pub fn lvs(&self, vg: &str) -> Vec<(String, String, String)> {
        self.ssh(&format!(
            "lvs --noheadings --separator '|' -o lv_name,lv_attr,origin {}",
            sh_quote(vg)
        ))
        .lines()
        .filter_map(|l| {
            let mut it = l.trim().split('|');
            Some((
                it.next()?.to_string(),
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            ))
        })
        .filter(|(n, _, _)| !n.is_empty())
        .collect()
    }

    /// `true` when `vg/lv` exists.
    pub fn lv_exists(&self, vg: &str, lv: &str) -> bool {
        self.lvs(vg).iter().any(|(n, _, _)| n == lv)
    }

    /// Free bytes in `vg`.
    pub fn vg_free(&self, vg: &str) -> u64 {
        let out = self.ssh(&format!(
            "vgs --noheadings --units b --nosuffix -o vg_free {}",
            sh_quote(vg)
        ));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("vg_free of {vg}: {out:?}"))
    }

    /// Every LV in every VG of the VM whose name carries the snapshot marker, as `VG/NAME`.
    pub fn leftover_snapshots(&self) -> Vec<String> {
        self.ssh("lvs --noheadings --separator / -o vg_name,lv_name")
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(SNAPSHOT_MARKER))
            .map(String::from)
            .collect()
    }

    /// Runs `virsh -c qemu:///system ARGS` in the VM (arguments quoted).
    pub fn virsh(&self, args: &[&str]) -> String {
        self.ssh(&virsh_line(args))
    }
}

/// POSIX single-quoting for the VM's shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-+=:,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn virsh_line(args: &[&str]) -> String {
    let mut line = String::from("virsh -q -c qemu:///system");
    for a in args {
        line.push(' ');
        line.push_str(&sh_quote(a));
    }
    line
}

/// Whether a test LV is thick (`lvcreate -L`) or thin (`lvcreate -V … -T VG/POOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvKind {
    Thick,
    Thin,
}

/// One disk of an [`LvmTestVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmTestDisk {
    /// Guest target: vda, vdb, …
    pub target: String,
    pub vg: String,
    pub lv: String,
    /// `/dev/VG/LV` in the VM.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    pub kind: LvKind,
}

/// Builder for [`LvmTestVm`].
#[derive(Debug, Clone)]
pub struct LvmTestVmBuilder {
    tag: String,
    disks: Vec<(LvKind, u64)>,
    running: bool,
    vg: Option<String>,
}

impl LvmTestVmBuilder {
    /// A thick LV of `size` bytes (rounded up to 4 MiB extents by LVM), zeroed.
    pub fn thick_disk(mut self, size: u64) -> Self {
        self.disks.push((LvKind::Thick, size));
        self
    }
    /// A thin LV of `size` bytes in the VM's thin pool (reads zeros until written).
    pub fn thin_disk(mut self, size: u64) -> Self {
        self.disks.push((LvKind::Thin, size));
        self
    }
    /// Start the domain after defining it (default: false; a running nested TCG guest
    /// works, its BIOS loop costs some CPU).
    pub fn running(mut self, running: bool) -> Self {
        self.running = running;
        self
    }
    /// Put the thick LVs into another VG (e.g. a [`ScratchVg`]); thin ones stay in the
    /// VM's thin pool.
    pub fn vg(mut self, vg: &str) -> Self {
        self.vg = Some(vg.to_string());
        self
    }

    /// Creates the LVs (one SSH call), defines the domain and starts it when asked
    /// (one more). Whatever was created is removed again when this panics half-way.
    pub fn build(self) -> LvmTestVm {
        let h = hvm();
        assert!(!self.disks.is_empty(), "LvmTestVm needs at least one disk");
        assert!(self.disks.len() <= 26, "at most 26 disks");
        let name = unique_name(&self.tag);
        let thick_vg = self.vg.clone().unwrap_or_else(|| h.vg.clone());
        let mut vm = LvmTestVm {
            name: name.clone(),
            disks: Vec::new(),
            extra_lvs: Vec::new(),
        };
        let mut script = String::from("set -e\n");
        for (i, (kind, size)) in self.disks.iter().copied().enumerate() {
            let target = format!("vd{}", (b'a' + i as u8) as char);
            let lv = format!("{name}-{target}");
            let vg = match kind {
                LvKind::Thick => thick_vg.clone(),
                LvKind::Thin => h.vg.clone(),
            };
            let path = format!("/dev/{vg}/{lv}");
            match kind {
                LvKind::Thick => {
                    let _ = writeln!(
                        script,
                        "lvcreate -q -y -Wy -Zy -L {size}b -n {lv} {vg} >/dev/null\n\
                         blkdiscard -z {path} 2>/dev/null || dd if=/dev/zero of={path} bs=1M status=none oflag=direct 2>/dev/null || true"
                    );
                }
                LvKind::Thin => {
                    let _ = writeln!(
                        script,
                        "lvcreate -q -y -V {size}b -T {vg}/{pool} -n {lv} >/dev/null",
                        pool = h.thinpool
                    );
                }
            }
            vm.disks.push(LvmTestDisk {
                target,
                vg,
                lv,
                path,
                size,
                kind,
            });
        }
        let xml = domain_xml(&name, &vm.disks);
        let _ = write!(
            script,
            "cat > /tmp/{name}.xml <<'VKT_EOF'\n{xml}VKT_EOF\nvirsh -q -c qemu:///system define /tmp/{name}.xml >/dev/null\nrm -f /tmp/{name}.xml\n"
        );
        if self.running {
            let _ = writeln!(script, "virsh -q -c qemu:///system start {name} >/dev/null");
        }
        h.ssh(&script);
        vm
    }
}

fn domain_xml(name: &str, disks: &[LvmTestDisk]) -> String {
    let mut x = String::new();
    x.push_str("<domain type='qemu'>\n");
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(name));
    x.push_str("  <memory unit='KiB'>65536</memory>\n  <vcpu>1</vcpu>\n");
    x.push_str("  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for d in disks {
        let _ = write!(
            x,
            "    <disk type='block' device='disk'>\n      <driver name='qemu' type='raw' cache='none' io='native'/>\n      <source dev='{}'/>\n      <target dev='{t}' bus='virtio'/>\n      <alias name='ua-{t}'/>\n    </disk>\n",
            xml_escape(&d.path),
            t = d.target
        );
    }
    x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// A libvirt domain on LVs inside the LVM hypervisor. `Drop` destroys and undefines it
/// and removes its LVs, their snapshots (any LV named `{lv}-vksnap-*`) and the LVs
/// registered with [`LvmTestVm::adopt_lv`], also when the test panicked.
#[derive(Debug)]
pub struct LvmTestVm {
    /// Domain name (also the prefix of its LV names).
    pub name: String,
    /// Disks in target order.
    pub disks: Vec<LvmTestDisk>,
    extra_lvs: Vec<(String, String)>,
}

impl LvmTestVm {
    /// Starts building a test domain; `tag` becomes part of its unique `vkt-` name.
    pub fn builder(tag: &str) -> LvmTestVmBuilder {
        LvmTestVmBuilder {
            tag: tag.to_string(),
            disks: Vec::new(),
            running: false,
            vg: None,
        }
    }

    /// A domain made by the code under test (e.g. a restore) on these LVs: `Drop`
    /// destroys and undefines it and removes them, as for a built one.
    pub fn adopt(name: &str, disks: Vec<LvmTestDisk>) -> LvmTestVm {
        LvmTestVm {
            name: name.to_string(),
            disks,
            extra_lvs: Vec::new(),
        }
    }

    /// Writes `bytes` at offset 0 of disk `target` (e.g. a boot sector), the domain
    /// stopped.
    pub fn write_head(&self, target: &str, bytes: &[u8]) {
        let d = self.disk(target);
        assert!(bytes.len() as u64 <= d.size);
        let octal: String = bytes.iter().map(|b| format!("\\{b:03o}")).collect();
        hvm().ssh(&format!(
            "printf '{octal}' | dd of={} bs={} count=1 iflag=fullblock oflag=direct status=none",
            sh_quote(&d.path),
            bytes.len()
        ));
    }

    /// The disk with guest target `target`; panics when there is none.
    pub fn disk(&self, target: &str) -> &LvmTestDisk {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .unwrap_or_else(|| panic!("domain {:?} has no disk {target}", self.name))
    }

    /// Removes `vg/lv` (e.g. a restored copy) together with this VM.
    pub fn adopt_lv(&mut self, vg: &str, lv: &str) {
        self.extra_lvs.push((vg.to_string(), lv.to_string()));
    }

    /// `virsh domstate` is "running".
    pub fn is_running(&self) -> bool {
        hvm()
            .try_ssh(&virsh_line(&["domstate", &self.name]))
            .map(|s| s.trim() == "running")
            .unwrap_or(false)
    }

    /// Starts the domain.
    pub fn start(&self) {
        hvm().virsh(&["start", &self.name]);
    }

    /// Stops the domain hard (`virsh destroy`).
    pub fn stop(&self) {
        hvm().virsh(&["destroy", &self.name]);
    }

    /// Writes `len` bytes of `pattern` at `offset` into disk `target`, in one SSH call:
    /// through the domain's QEMU when it runs (qemu-io on the device via HMP, a flush, and
    /// the confirmation awaited in the domain's log in the VM), else with `qemu-io -f raw`
    /// on the LV.
    pub fn write_pattern(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        let disk = self.disk(target).clone();
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= disk.size),
            "write_pattern({target}, {offset}, {len}) is beyond the disk size {}",
            disk.size
        );
        let io = format!("write -P 0x{pattern:02x} {offset} {len}");
        let expect = format!("wrote {len}/{len} bytes at offset {offset}");
        let name = &self.name;
        // Both branches decide on the domain's state inside the VM: one SSH round trip.
        let dev = format!("/machine/peripheral/ua-{target}/virtio-backend");
        let script = format!(
            "set -u\n\
             if [ \"$(virsh -q -c qemu:///system domstate {name})\" = running ]; then\n\
               log=/var/log/libvirt/qemu/{name}.log\n\
               start=$(stat -c %s $log 2>/dev/null || echo 0)\n\
               out=$(virsh -q -c qemu:///system qemu-monitor-command {name} --hmp 'qemu-io -d {dev} \"{io}\"') || exit 3\n\
               [ -z \"$out\" ] || {{ echo \"HMP: $out\" >&2; exit 4; }}\n\
               virsh -q -c qemu:///system qemu-monitor-command {name} --hmp 'qemu-io -d {dev} \"flush\"' >/dev/null || exit 5\n\
               i=0\n\
               while [ $i -lt 300 ]; do\n\
                 tail -c +$((start + 1)) $log | grep -qF '{expect}' && exit 0\n\
                 if tail -c +$((start + 1)) $log | grep -q 'failed'; then tail -c +$((start + 1)) $log >&2; exit 6; fi\n\
                 sleep 0.1; i=$((i + 1))\n\
               done\n\
               echo 'no confirmation of the write in the QEMU log' >&2; exit 7\n\
             else\n\
               qemu-io -f raw -c '{io}' {path} | grep -qF 'wrote {len}/{len} bytes' || exit 8\n\
             fi\n",
            path = disk.path
        );
        hvm()
            .try_ssh(&script)
            .unwrap_or_else(|e| panic!("write_pattern({target}) on {name}: {e}"));
    }

    /// sha256 (hex) of disk `target`'s LV, computed in the VM.
    pub fn disk_checksum(&self, target: &str) -> String {
        let d = self.disk(target);
        hvm().lv_checksum(&format!("{}/{}", d.vg, d.lv))
    }

    /// LVs named like a virtkeep snapshot of one of this VM's disks, as `VG/NAME`.
    pub fn leftover_snapshots(&self) -> Vec<String> {
        hvm()
            .leftover_snapshots()
            .into_iter()
            .filter(|s| {
                self.disks
                    .iter()
                    .any(|d| s.starts_with(&format!("{}/{}{SNAPSHOT_MARKER}", d.vg, d.lv)))
            })
            .collect()
    }

    fn teardown(&self) {
        let h = hvm();
        let mut script = format!(
            "virsh -q -c qemu:///system destroy {n} >/dev/null 2>&1\n\
             virsh -q -c qemu:///system undefine {n} >/dev/null 2>&1\n",
            n = self.name
        );
        let mut vgs: Vec<&str> = self.disks.iter().map(|d| d.vg.as_str()).collect();
        vgs.extend(self.extra_lvs.iter().map(|(vg, _)| vg.as_str()));
        vgs.sort_unstable();
        vgs.dedup();
        for vg in vgs {
            // snapshots of our LVs first, then the LVs
            let _ = writeln!(
                script,
                "for lv in $(lvs --noheadings -o lv_name {vg} 2>/dev/null); do case $lv in {prefix}*{SNAPSHOT_MARKER}*) lvremove -q -f {vg}/$lv ;; esac; done",
                vg = sh_quote(vg),
                prefix = self.name
            );
        }
        for d in &self.disks {
            let _ = writeln!(script, "lvremove -q -f {}/{} 2>/dev/null", d.vg, d.lv);
        }
        for (vg, lv) in &self.extra_lvs {
            let _ = writeln!(
                script,
                "lvremove -q -f {} 2>/dev/null",
                sh_quote(&format!("{vg}/{lv}"))
            );
        }
        script.push_str("true\n");
        if let Err(e) = h.try_ssh(&script) {
            eprintln!(
                "virtkeep-lab: WARNING: teardown of LVM test VM {:?}: {e}",
                self.name
            );
        }
    }
}

impl Drop for LvmTestVm {
    fn drop(&mut self) {
        // never panic in drop (a panic while unwinding aborts the test process)
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown())).is_err() {
            eprintln!(
                "virtkeep-lab: WARNING: teardown of {:?} failed; a reboot of the LVM hypervisor (lab/hvm/down.sh) clears it",
                self.name
            );
        }
    }
}

/// A volume group of its own inside the LVM hypervisor, on a loop device over a sparse
/// file, for tests that fill a VG (e.g. "VG too small for the snapshot") without
/// disturbing `vg0`. `Drop` removes it with every LV in it.
#[derive(Debug)]
pub struct ScratchVg {
    /// VG name (`vkt-…`).
    pub name: String,
    backing: String,
}

impl ScratchVg {
    /// A VG of about `size` bytes (minus LVM metadata; 4 MiB extents).
    pub fn new(tag: &str, size: u64) -> ScratchVg {
        let h = hvm();
        let name = unique_name(tag);
        let backing = format!("/var/tmp/{name}.img");
        let vg = ScratchVg { name, backing };
        h.ssh(&format!(
            "set -e\ntruncate -s {size} {f}\ndev=$(losetup -f --show {f})\npvcreate -q -y $dev >/dev/null\nvgcreate -q {n} $dev >/dev/null",
            f = vg.backing,
            n = vg.name
        ));
        vg
    }

    /// Free bytes.
    pub fn free(&self) -> u64 {
        hvm().vg_free(&self.name)
    }
}

impl Drop for ScratchVg {
    fn drop(&mut self) {
        let script = format!(
            "vgremove -q -f {n} >/dev/null 2>&1\n\
             for d in $(losetup -j {f} -O NAME -n); do pvremove -q -ff -y $d >/dev/null 2>&1; losetup -d $d; done\n\
             rm -f {f}\ntrue",
            n = self.name,
            f = self.backing
        );
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hvm().try_ssh(&script)));
        if !matches!(res, Ok(Ok(_))) {
            eprintln!(
                "virtkeep-lab: WARNING: could not remove scratch VG {}",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_parsing() {
        let text = "VK_HVM_HOST=127.0.0.1\nVK_HVM_PORT=2222\nVK_HVM_USER=root\nVK_HVM_KEY=/k\nVK_HVM_KNOWN_HOSTS=/kh\nVK_HVM_VG=vg0\nVK_HVM_THINPOOL=thinpool\nVK_HVM_PID=42\nVK_HVM_RUN_DIR=/r\n";
        let h = Hvm::parse_env(text).expect("complete env");
        assert_eq!(h.port, 2222);
        assert_eq!(h.ssh_spec(), "root@127.0.0.1:2222");
        assert_eq!(h.lv_path("a"), "/dev/vg0/a");
        assert_eq!(h.lv_path("vg1/b"), "/dev/vg1/b");
        assert!(Hvm::parse_env("VK_HVM_PORT=1\n").is_none());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/dev/vg0/a-b"), "/dev/vg0/a-b");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn domain_xml_has_block_disks() {
        let d = LvmTestDisk {
            target: "vda".into(),
            vg: "vg0".into(),
            lv: "x".into(),
            path: "/dev/vg0/x".into(),
            size: 1 << 24,
            kind: LvKind::Thick,
        };
        let x = domain_xml("vkt-a-1-2", &[d]);
        assert!(x.contains("<disk type='block' device='disk'>"));
        assert!(x.contains("<source dev='/dev/vg0/x'/>"));
        assert!(x.contains("<alias name='ua-vda'/>"));
    }
}
