//! The [`Session`]: an authenticated connection ([`crate::connect`]) shared by its
//! clones, and its pool of command shells ([`crate::shell`]) that run short commands
//! and start streaming processes ([`crate::process`]) without a login shell each.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use russh::keys::PublicKey;

use crate::command::RemoteCommand;
use crate::connect::{Connection, HostTarget};
use crate::error::SshError;
use crate::forward::{self, UnixForward};
use crate::process::{self, ChannelStream, Output, RemoteProcess};
use crate::shell::{self, CommandShell, ShellError};

struct Inner {
    /// The only strong reference: processes hold a weak one (see
    /// [`process::spawn_on_channel`]), so the connection ends with its last session.
    conn: Arc<Connection>,
    /// Idle command shells of this connection (see [`crate::shell`]).
    shells: Mutex<Vec<CommandShell>>,
    /// Cleared when the host cannot run the command shell, or by the caller.
    shell_enabled: AtomicBool,
    /// Shells being started right now, and a wake-up for those waiting on them.
    shells_starting: AtomicUsize,
    shell_ready: tokio::sync::Notify,
}

/// Idle command shells kept per connection; more concurrent commands than this
/// start extra shells that are closed after use.
const IDLE_SHELLS: usize = 4;

/// An authenticated SSH connection. Cheap to clone; all clones share the connection.
/// One connection is served by one task (one core): use [`crate::Pool`] to spread
/// parallel data streams over several connections.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("host", &self.inner.conn.target().host)
            .field("port", &self.inner.conn.target().port)
            .field("user", &self.inner.conn.target().user)
            .field("closed", &self.inner.conn.is_closed())
            .finish()
    }
}

impl Session {
    /// Connect, verify the host key against `target.known_hosts`, authenticate.
    pub async fn connect(target: &HostTarget) -> Result<Session, SshError> {
        Session::connect_inner(target, None).await
    }

    /// Like [`connect`](Self::connect), but `Auth::Agent` uses the agent listening on
    /// `agent_socket` instead of `SSH_AUTH_SOCK`.
    pub async fn connect_with_agent(
        target: &HostTarget,
        agent_socket: &Path,
    ) -> Result<Session, SshError> {
        Session::connect_inner(target, Some(agent_socket.to_owned())).await
    }

    async fn connect_inner(
        target: &HostTarget,
        agent_socket: Option<PathBuf>,
    ) -> Result<Session, SshError> {
        let conn = Connection::open(target, agent_socket).await?;
        Ok(Session {
            inner: Arc::new(Inner {
                conn: Arc::new(conn),
                shells: Mutex::new(Vec::new()),
                shell_enabled: AtomicBool::new(true),
                shells_starting: AtomicUsize::new(0),
                shell_ready: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The target this session was opened for.
    pub fn target(&self) -> &HostTarget {
        self.inner.conn.target()
    }

    /// The verified host key.
    pub fn host_key(&self) -> &PublicKey {
        self.inner.conn.host_key()
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.conn.is_closed()
    }

    /// The line sent to the server for `cmd` (with sudo wrapping when configured).
    pub fn command_line(&self, cmd: &RemoteCommand) -> String {
        if self.inner.conn.target().sudo {
            cmd.render_with_sudo()
        } else {
            cmd.render()
        }
    }

    fn disconnected(&self, detail: impl Into<String>) -> SshError {
        self.inner.conn.disconnected(detail)
    }

    /// Run short commands through a command shell on the host (the default), or each
    /// on a channel of its own (`false`: every command pays the login shell's start-up).
    pub fn use_command_shell(&self, enabled: bool) {
        self.inner.shell_enabled.store(enabled, Ordering::Relaxed);
    }

    /// Run `cmd`, collecting stdout and stderr. Stdin is `/dev/null`. Any exit status
    /// is `Ok`. Runs through an idle command shell of this connection when the host
    /// has one (see [`crate::shell`]), else on a channel of its own.
    pub async fn exec(&self, cmd: &RemoteCommand) -> Result<Output, SshError> {
        let line = self.command_line(cmd);
        let started = std::time::Instant::now();
        let result = self.exec_line(&line).await;
        // Where a slow host spends its time (`VIRTKEEP_LOG=virtkeep_ssh=debug`): one
        // line per command, bounded, with its duration and exit status.
        tracing::debug!(
            host = %self.target().host,
            ms = started.elapsed().as_millis() as u64,
            status = result.as_ref().map(|o| o.status as i64).unwrap_or(-1),
            command = %bounded(&line, 240),
            "remote command"
        );
        result
    }

    async fn exec_line(&self, line: &str) -> Result<Output, SshError> {
        let Some(mut shell) = self.idle_shell().await? else {
            return process::exec_on_channel(&self.inner.conn, line).await;
        };
        match shell.run(line).await {
            Ok(out) => {
                self.put_shell(shell);
                Ok(out)
            }
            // The command may have run: report, never retry.
            Err(ShellError::Broken(detail)) | Err(ShellError::NotAvailable(detail)) => {
                Err(if self.is_closed() {
                    self.disconnected(format!("while running `{line}`"))
                } else {
                    SshError::ChannelClosed {
                        what: format!("`{line}` ({detail})"),
                    }
                })
            }
        }
    }

    /// An idle command shell, or a new one; `None` when shells are off or the host
    /// cannot run one (then they stay off for this connection). A shell already starting is waited for rather than a further one started: on a
    /// loaded host, login shells starting side by side only slow each other down.
    async fn idle_shell(&self) -> Result<Option<CommandShell>, SshError> {
        loop {
            // Registered before the checks, so a shell put back in between still wakes us.
            let ready = self.inner.shell_ready.notified();
            if let Some(shell) = self.take_idle_shell() {
                return Ok(Some(shell));
            }
            if !self.inner.shell_enabled.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if self.inner.shells_starting.load(Ordering::SeqCst) == 0 {
                return self.new_shell().await;
            }
            ready.await;
        }
    }

    fn take_idle_shell(&self) -> Option<CommandShell> {
        if !self.inner.shell_enabled.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.inner.shells).pop()
    }

    /// Starts `n` command shells in the background, so that the first commands and
    /// streams of a job do not wait for the login shell's start-up one after another.
    pub fn prewarm_shells(&self, n: usize) {
        for _ in 0..n.min(IDLE_SHELLS) {
            self.refill_shells();
        }
    }

    /// Starts a shell in the background and adds it to the idle ones.
    fn refill_shells(&self) {
        let session = self.clone();
        tokio::spawn(async move {
            if let Ok(Some(shell)) = session.new_shell().await {
                session.put_shell(shell);
            }
        });
    }

    fn put_shell(&self, shell: CommandShell) {
        let extra = {
            let mut idle = lock(&self.inner.shells);
            if idle.len() < IDLE_SHELLS {
                idle.push(shell);
                None
            } else {
                Some(shell)
            }
        };
        if let Some(shell) = extra {
            // EOF ends the remote loop; dropping alone would leave it until disconnect.
            tokio::spawn(shell.close());
        }
        self.inner.shell_ready.notify_waiters();
    }

    async fn new_shell(&self) -> Result<Option<CommandShell>, SshError> {
        if !self.inner.shell_enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Never under sudo: each command line carries its own sudo wrapping.
        let script = RemoteCommand::new("sh")
            .arg("-c")
            .arg(shell::SCRIPT)
            .render();
        self.inner.shells_starting.fetch_add(1, Ordering::SeqCst);
        let started = async {
            let proc = self.spawn_line(script).await?;
            Ok::<_, SshError>(CommandShell::start(proc).await)
        }
        .await;
        self.inner.shells_starting.fetch_sub(1, Ordering::SeqCst);
        self.inner.shell_ready.notify_waiters();
        match started? {
            Ok(shell) => Ok(Some(shell)),
            Err(ShellError::NotAvailable(detail)) | Err(ShellError::Broken(detail)) => {
                if self.is_closed() {
                    return Err(self.disconnected("starting the command shell"));
                }
                tracing::debug!(host = %self.target().host, %detail, "no command shell on this host: one channel per command");
                self.inner.shell_enabled.store(false, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Run `cmd`; a non-zero exit status is [`SshError::CommandFailed`].
    pub async fn run(&self, cmd: &RemoteCommand) -> Result<Output, SshError> {
        let out = self.exec(cmd).await?;
        if out.status != 0 {
            return Err(SshError::CommandFailed {
                command: self.command_line(cmd),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out)
    }

    /// [`run`](Self::run) and return stdout as UTF-8.
    pub async fn run_stdout_string(&self, cmd: &RemoteCommand) -> Result<String, SshError> {
        let out = self.run(cmd).await?;
        String::from_utf8(out.stdout).map_err(|_| SshError::NotUtf8 {
            command: self.command_line(cmd),
        })
    }

    /// Start `cmd` with streaming stdin/stdout. Stderr is drained in the background
    /// (the last 1 MiB is kept). Stdout has backpressure: a slow reader stops the
    /// channel, which (russh adjusts windows on receipt, not on consumption) in turn
    /// stops reading this *connection* — so give each data stream its own connection
    /// ([`crate::Pool::data_session`]); control commands on other connections are
    /// unaffected.
    ///
    /// An idle command shell of this connection is turned into the process when there
    /// is one (and a replacement is started in the background), which saves the login
    /// shell's start-up.
    pub async fn spawn(&self, cmd: &RemoteCommand) -> Result<RemoteProcess, SshError> {
        let line = self.command_line(cmd);
        let Some(shell) = self.take_idle_shell() else {
            return self.spawn_line(line).await;
        };
        self.refill_shells();
        shell.exec_into(&line).await.map_err(|e| {
            let (ShellError::Broken(detail) | ShellError::NotAvailable(detail)) = e;
            if self.is_closed() {
                self.disconnected(format!("starting `{line}`"))
            } else {
                SshError::ChannelClosed {
                    what: format!("`{line}` ({detail})"),
                }
            }
        })
    }

    async fn spawn_line(&self, line: String) -> Result<RemoteProcess, SshError> {
        process::spawn_on_channel(&self.inner.conn, line).await
    }

    /// Open a byte stream to the unix socket `remote_path` on the host
    /// (`direct-streamlocal@openssh.com`), e.g. an NBD export. The socket is opened by
    /// sshd as the login user (sudo does not apply).
    pub async fn open_unix_socket(&self, remote_path: &str) -> Result<ChannelStream, SshError> {
        process::open_unix_socket(&self.inner.conn, remote_path).await
    }

    /// Ask the host's sshd to listen on the unix socket `remote_path` and hand every
    /// connection to it to the returned [`UnixForward`] (`streamlocal-forward@openssh.com`).
    /// sshd creates the socket as the login user (sudo does not apply), with its
    /// `StreamLocalBindMask` (owner-only by default), and refuses an existing file.
    /// `timeout` bounds the request.
    pub async fn forward_unix_socket(
        &self,
        remote_path: &str,
        timeout: std::time::Duration,
    ) -> Result<UnixForward, SshError> {
        forward::listen(&self.inner.conn, remote_path, timeout).await
    }

    /// Disconnect (all clones of this session become unusable).
    pub async fn close(&self) -> Result<(), SshError> {
        self.inner.conn.close().await
    }
}

/// A poisoned lock only means another task panicked while holding it; the idle
/// list is still consistent (push/pop are atomic under the lock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `s` cut to at most `max` bytes (at a character boundary), for logs.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
