//! A connected hypervisor: the SSH session, its settings, and the small remote
//! operations every strategy needs (run, upload a file, lock a VM).

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtkeep_libvirt::coreutils;
use virtkeep_ssh::{Output, Pool, RemoteCommand, RemoteProcess, Session};

use crate::config::HostConfig;
use crate::error::{Error, ErrorKind, Result};

/// Where virtkeep keeps per-job state on the host: NBD sockets, pid files, locks.
/// Under /run so a host reboot (which also ends every qemu-nbd) clears it.
pub const HOST_STATE_DIR: &str = "/run/virtkeep";

/// The marker every overlay virtkeep creates carries in its file name, so that
/// `cleanup` can tell its own files from anything else.
pub const OVERLAY_MARKER: &str = ".virtkeep-";

/// The class of a remote command, which decides how long it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// virsh, rbd, lvm, qemu-img info/create, hooks: seconds, normally.
    Control,
    /// Commands that move a disk's data on the host: blockcommit, qemu-img commit.
    Data,
}

/// Default deadline of [`Deadline::Control`] commands.
pub const DEFAULT_COMMAND_TIMEOUT_SECS: u64 = 300;
/// Default deadline of [`Deadline::Data`] commands.
pub const DEFAULT_DATA_COMMAND_TIMEOUT_SECS: u64 = 6 * 3600;
/// Default of how long a disk's data stream may make no progress.
pub const DEFAULT_DATA_STALL_TIMEOUT_SECS: u64 = 300;

impl Deadline {
    fn of(self, config: &HostConfig) -> std::time::Duration {
        let secs = match self {
            Deadline::Control => config
                .command_timeout_secs
                .unwrap_or(DEFAULT_COMMAND_TIMEOUT_SECS),
            Deadline::Data => config
                .data_command_timeout_secs
                .unwrap_or(DEFAULT_DATA_COMMAND_TIMEOUT_SECS),
        };
        std::time::Duration::from_secs(secs.max(1))
    }

    fn setting(self) -> &'static str {
        match self {
            Deadline::Control => "command_timeout_secs",
            Deadline::Data => "data_command_timeout_secs",
        }
    }
}

pub struct Host {
    pub name: String,
    pub config: HostConfig,
    pool: Pool,
    session: Session,
    /// The qemu user:group once looked up (it does not change during a connection).
    qemu_owner: tokio::sync::OnceCell<(String, String)>,
}

impl Host {
    /// How long one batch of a disk's data stream (NBD reads or writes, an `rbd
    /// export-diff` record, a `dd` block) may take before the job counts it as stalled.
    pub fn data_stall_timeout(&self) -> std::time::Duration {
        let secs = self
            .config
            .data_stall_timeout_secs
            .unwrap_or(DEFAULT_DATA_STALL_TIMEOUT_SECS);
        std::time::Duration::from_secs(secs.max(1))
    }

    pub async fn connect(name: &str, config: &HostConfig, node_known_hosts: &Path) -> Result<Host> {
        let target = config.target(node_known_hosts)?;
        let session = Session::connect(&target)
            .await
            .map_err(|e| Error::from(e).context(format!("connecting to host {name}")))?;
        // The VM lock (which keeps its shell) and the commands a backup runs side by
        // side: three shells ready for them.
        session.prewarm_shells(3);
        // Data streams get their own connections: one SSH connection is bound to one core.
        let pool = Pool::new(target, 4);
        Ok(Host {
            name: name.to_string(),
            config: config.clone(),
            pool,
            session,
            qemu_owner: tokio::sync::OnceCell::new(),
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// A new connection to the same host, with the same settings and pinned key (a
    /// job that lost its link goes on over it).
    pub async fn reconnect(&self) -> Result<Host> {
        let target = self.pool.target().clone();
        let session = Session::connect(&target)
            .await
            .map_err(|e| Error::from(e).context(format!("reconnecting to host {}", self.name)))?;
        session.prewarm_shells(2);
        Ok(Host {
            name: self.name.clone(),
            config: self.config.clone(),
            pool: Pool::new(target, 4),
            session,
            qemu_owner: self.qemu_owner.clone(),
        })
    }

    /// How long a command of this class may take on this host.
    pub fn deadline(&self, deadline: Deadline) -> std::time::Duration {
        deadline.of(&self.config)
    }

    /// Opens the first `n` data connections in the background, so that a job's data
    /// phase finds them connected instead of connecting them one after another (a
    /// failure here is met again, and reported, by [`data_session`](Self::data_session)).
    pub fn prewarm_data_sessions(&self, n: usize) {
        for i in 0..n.min(self.pool.max_connections()) {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let _ = pool.data_session(i).await;
            });
        }
    }

    /// A connection for the `i`-th parallel data stream.
    pub async fn data_session(&self, i: usize) -> Result<Session> {
        Ok(self.pool.data_session(i).await?)
    }

    pub fn uri(&self) -> &str {
        &self.config.libvirt_uri
    }

    /// `virsh -c URI …` builders for this host.
    pub fn virsh(&self) -> virtkeep_libvirt::virsh::Virsh {
        virtkeep_libvirt::virsh::Virsh::new(self.uri())
    }

    /// Runs a command; a non-zero exit is an error carrying its stderr.
    pub async fn run(&self, cmd: &RemoteCommand) -> Result<Output> {
        self.run_within(cmd, Deadline::Control).await
    }

    /// Runs a command and returns its exit status and output without judging them.
    pub async fn exec(&self, cmd: &RemoteCommand) -> Result<Output> {
        self.exec_within(cmd, Deadline::Control).await
    }

    /// [`run`](Self::run) with the deadline of its class.
    pub async fn run_within(&self, cmd: &RemoteCommand, deadline: Deadline) -> Result<Output> {
        tracing::debug!(host = %self.name, command = %cmd, "run");
        self.bounded(cmd, deadline, self.session.run(cmd)).await
    }

    /// [`exec`](Self::exec) with the deadline of its class.
    pub async fn exec_within(&self, cmd: &RemoteCommand, deadline: Deadline) -> Result<Output> {
        tracing::debug!(host = %self.name, command = %cmd, "exec");
        self.bounded(cmd, deadline, self.session.exec(cmd)).await
    }

    /// Every remote command has a deadline: a command that hangs on a live link (a
    /// `virsh` waiting on a stuck QEMU monitor) fails the job in bounded time, so the job
    /// releases the VM lock and heals. The command itself may go on on the host (its
    /// shell is dropped with the future, never reused); healing deals with what it leaves.
    async fn bounded(
        &self,
        cmd: &RemoteCommand,
        deadline: Deadline,
        fut: impl std::future::Future<Output = std::result::Result<Output, virtkeep_ssh::SshError>>,
    ) -> Result<Output> {
        let limit = deadline.of(&self.config);
        match tokio::time::timeout(limit, fut).await {
            Ok(res) => Ok(res?),
            Err(_) => Err(Error::new(
                ErrorKind::Remote,
                format!(
                    "`{cmd}` did not finish within {} s on host {}",
                    limit.as_secs(),
                    self.name
                ),
            )
            .hint(format!(
                "the host may be overloaded or the command hung (a stuck QEMU or storage); it may still run there. `virtkeep cleanup {}` heals the VM once it returns; raise {} in [hosts.{}] for slow hosts",
                self.name,
                deadline.setting(),
                self.name
            ))),
        }
    }

    pub async fn run_string(&self, cmd: &RemoteCommand) -> Result<String> {
        let out = self.run(cmd).await?;
        String::from_utf8(out.stdout).map_err(|_| {
            Error::new(
                ErrorKind::Remote,
                format!("`{cmd}` printed output that is not UTF-8"),
            )
        })
    }

    /// Size in bytes of a file (or, through `-L`, what a link points to) on the host.
    pub async fn file_size(&self, path: &str) -> Result<u64> {
        let out = self.run_string(&coreutils::stat(path)).await?;
        coreutils::parse_stat(&out).map(|s| s.size).map_err(|_| {
            Error::new(
                ErrorKind::Remote,
                format!("cannot read the size of {path} on host {}", self.name),
            )
        })
    }

    /// Size in bytes of a block device (an LV, a snapshot) on the host.
    pub async fn block_device_size(&self, path: &str) -> Result<u64> {
        self.run_string(&coreutils::blockdev_size(path))
            .await?
            .trim()
            .parse()
            .map_err(|_| {
                Error::new(
                    ErrorKind::Remote,
                    format!("cannot read the size of {path} on host {}", self.name),
                )
            })
    }

    /// Writes `content` to `path` on the host (through stdin, never the command line),
    /// within the control deadline like every other remote command: a `cat` that
    /// cannot open its file (a stuck mount, a FIFO) fails the job instead of hanging it.
    pub async fn upload(&self, path: &str, content: &[u8]) -> Result<()> {
        let cmd = coreutils::write_stdin_to(path);
        let limit = Deadline::Control.of(&self.config);
        let out = tokio::time::timeout(limit, self.upload_unbounded(&cmd, content)).await;
        let (status, stderr) = match out {
            Ok(res) => res?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Remote,
                    format!(
                        "writing {path} on host {} did not finish within {} s",
                        self.name,
                        limit.as_secs()
                    ),
                )
                .hint(format!(
                    "the host may be overloaded or its file system hung; raise {} in [hosts.{}] for slow hosts",
                    Deadline::Control.setting(),
                    self.name
                )));
            }
        };
        if status != 0 {
            return Err(Error::new(
                ErrorKind::Remote,
                format!(
                    "writing {path} on the host failed: {}",
                    String::from_utf8_lossy(&stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    async fn upload_unbounded(
        &self,
        cmd: &RemoteCommand,
        content: &[u8],
    ) -> Result<(u32, Vec<u8>)> {
        let mut proc = self.session.spawn(cmd).await?;
        proc.stdin
            .write_all(content)
            .await
            .map_err(io_err("uploading a file"))?;
        proc.stdin
            .shutdown()
            .await
            .map_err(io_err("uploading a file"))?;
        Ok(proc.wait().await?)
    }

    /// The user:group QEMU runs as: configured, else the distribution's default
    /// (Debian/Ubuntu: libvirt-qemu, RHEL-likes: qemu).
    pub async fn qemu_owner(&self) -> Result<(String, String)> {
        if let (Some(u), Some(g)) = (&self.config.qemu_user, &self.config.qemu_group) {
            return Ok((u.clone(), g.clone()));
        }
        self.qemu_owner
            .get_or_try_init(|| self.lookup_qemu_owner())
            .await
            .cloned()
    }

    async fn lookup_qemu_owner(&self) -> Result<(String, String)> {
        for user in ["libvirt-qemu", "qemu"] {
            // `id -gn` fails for a missing user: one round trip answers both questions.
            let out = self.exec(&coreutils::primary_group(user)).await?;
            if out.status == 0 {
                let group = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Ok((user.to_string(), group));
            }
        }
        Ok(("root".into(), "root".into()))
    }

    /// Creates the private per-job state directory on the host.
    pub async fn job_dir(&self, job: &str) -> Result<String> {
        let dir = format!("{HOST_STATE_DIR}/jobs/{job}");
        self.run(&coreutils::mkdir_p_mode(&dir, 0o711)).await?;
        Ok(dir)
    }

    /// Takes the per-VM lock on the host, held for as long as the returned guard lives
    /// and the SSH connection is up: a node killed with SIGKILL drops the connection,
    /// the remote `cat` sees EOF and the lock goes with it, so no stale lock survives.
    /// `wait_secs`: how long to wait for a lock held by a short job (a cleanup pass);
    /// 0 fails at once.
    pub async fn lock_vm(&self, vm_uuid: &str, wait_secs: u32) -> Result<VmLock> {
        let lock_dir = format!("{HOST_STATE_DIR}/locks");
        let path = format!("{lock_dir}/{vm_uuid}.lock");
        let wait = (wait_secs > 0).then_some(wait_secs);
        // One round trip: the directory, then the lock (a failed mkdir reports below).
        let hold =
            coreutils::mkdir_p_mode(&lock_dir, 0o700).and_then(coreutils::flock_hold(&path, wait));
        let mut proc = self.session.spawn(&hold).await?;
        let mut first = [0u8; 7];
        match proc.stdout.read_exact(&mut first).await {
            Ok(_) if &first == b"locked\n" => Ok(VmLock { proc: Some(proc) }),
            _ => {
                let _ = proc.stdin.shutdown().await;
                let (status, stderr) = proc.wait().await.unwrap_or((1, Vec::new()));
                if status == coreutils::FLOCK_CONFLICT_STATUS {
                    Err(Error::conflict(format!(
                        "another virtkeep job holds the lock of VM {vm_uuid} on this host"
                    ))
                    .hint("wait for the running backup or restore of this VM to finish"))
                } else {
                    Err(Error::new(
                        ErrorKind::Remote,
                        format!(
                            "could not take the VM lock on the host (flock exit {status}): {}",
                            String::from_utf8_lossy(&stderr).trim()
                        ),
                    )
                    .hint("virtkeep needs flock(1) from util-linux on the host"))
                }
            }
        }
    }
}

/// Holds a per-VM lock on the host; dropping it (or losing the connection) releases it.
pub struct VmLock {
    proc: Option<RemoteProcess>,
}

impl VmLock {
    pub async fn release(mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.stdin.shutdown().await;
            let _ = proc.wait().await;
        }
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::new(ErrorKind::Connection, format!("{what}: {e}")).with_source(e)
}

#[cfg(test)]
mod lab_tests {
    use super::*;

    /// An upload whose `cat` never gets its file open (a FIFO nobody reads) fails
    /// within `command_timeout_secs` instead of hanging the job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_upload_fails_within_the_command_deadline() {
        let lab = virtkeep_lab::lab();
        let config = HostConfig {
            address: lab.ssh_host.clone(),
            port: lab.ssh_port,
            user: lab.ssh_user.clone(),
            identity: Some(lab.ssh_key.clone()),
            password_env: None,
            agent: None,
            known_hosts: Some(lab.known_hosts.clone()),
            sudo: false,
            libvirt_uri: lab.libvirt_uri.clone(),
            qemu_user: None,
            qemu_group: None,
            ceph: None,
            lvm: None,
            command_timeout_secs: Some(2),
            data_command_timeout_secs: None,
            data_stall_timeout_secs: None,
        };
        let host = Host::connect("lab", &config, &lab.known_hosts)
            .await
            .expect("connect");
        // The lab's sshd runs on this machine: a FIFO here is one on the host.
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let started = std::time::Instant::now();
        let err = host
            .upload(fifo.to_str().expect("utf-8 path"), b"job xml")
            .await
            .expect_err("a hung upload must fail");
        assert!(
            err.to_string().contains("did not finish within 2 s"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // Let the remote `cat` open its FIFO, see EOF on its closed stdin and exit:
        // nothing is left running on the host.
        let reader = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut sink = Vec::new();
            std::fs::File::open(reader).and_then(|mut f| f.read_to_end(&mut sink))
        });
        // A normal upload on the same host still works.
        let file = dir.path().join("file");
        host.upload(file.to_str().expect("utf-8 path"), b"ok")
            .await
            .expect("upload");
        assert_eq!(std::fs::read(&file).expect("read"), b"ok");
    }
}
