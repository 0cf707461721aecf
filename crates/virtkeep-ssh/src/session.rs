//! SSH sessions over russh: connect with strict host-key checking, authenticate,
//! run commands, stream output, forward to unix sockets.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use russh::client::{self, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Sig, cipher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::known_hosts::{self, HostKeyStatus, KnownHosts};
use crate::shell::{self, CommandShell, ShellError};
use crate::{RemoteCommand, SshError};

/// Receive window per channel. Only `Config::window_size` counts on the client side
/// (russh#770); 16 MiB keeps a single stream from being window-bound.
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;
/// Largest packet allowed by russh (and by the SSH spec's recommendation).
const MAX_PACKET: u32 = 65535;
/// Messages buffered per channel inside russh before it stops reading the socket.
const CHANNEL_BUFFER: usize = 256;
/// Chunks (≤ 64 KiB each) buffered between a process's channel and its stdout reader.
const STDOUT_CHUNKS: usize = 64;
/// Stderr kept for a spawned process (the tail is kept, older bytes are dropped).
const STDERR_LIMIT: usize = 1024 * 1024;
/// Keepalives sent without an answer before the connection counts as dead.
const KEEPALIVE_MAX: usize = 3;

/// How to authenticate. `Debug` never prints secrets.
#[derive(Clone)]
pub enum Auth {
    /// A private key file (OpenSSH, PEM or PuTTY format), optionally encrypted.
    KeyFile {
        path: PathBuf,
        passphrase: Option<String>,
    },
    /// Password authentication.
    Password { password: String },
    /// The ssh-agent named by `SSH_AUTH_SOCK` (read at connect time), or the socket
    /// given to [`Session::connect_with_agent`].
    Agent,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::KeyFile { path, passphrase } => f
                .debug_struct("KeyFile")
                .field("path", path)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Auth::Password { .. } => f
                .debug_struct("Password")
                .field("password", &"<redacted>")
                .finish(),
            Auth::Agent => f.write_str("Agent"),
        }
    }
}

impl Auth {
    fn method(&self) -> &'static str {
        match self {
            Auth::KeyFile { .. } => "publickey (key file)",
            Auth::Password { .. } => "password",
            Auth::Agent => "publickey (ssh-agent)",
        }
    }
}

/// One hypervisor to connect to.
#[derive(Clone, Debug)]
pub struct HostTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub auth: Auth,
    /// The trust store (OpenSSH known_hosts format) checked on every connect.
    pub known_hosts: PathBuf,
    /// Wrap every command as `sudo -n -- sh -c '<line>'`.
    pub sudo: bool,
    /// Limit for TCP connect, handshake and authentication, each.
    pub connect_timeout: Duration,
    /// Keepalive interval; after 3 unanswered keepalives the connection fails.
    /// `Duration::ZERO` disables keepalives (and then no dead-peer detection).
    pub keepalive: Duration,
}

impl HostTarget {
    /// A target with port 22, no sudo, 15 s connect timeout and 15 s keepalive.
    pub fn new(
        host: impl Into<String>,
        user: impl Into<String>,
        auth: Auth,
        known_hosts: impl Into<PathBuf>,
    ) -> HostTarget {
        HostTarget {
            host: host.into(),
            port: 22,
            user: user.into(),
            auth,
            known_hosts: known_hosts.into(),
            sudo: false,
            connect_timeout: Duration::from_secs(15),
            keepalive: Duration::from_secs(15),
        }
    }
}

/// What a finished command produced. A command killed by a signal reports
/// `status = 128 + signal number`, like a shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// The server host key seen by [`probe_host_key`].
#[derive(Clone, Debug)]
pub struct HostKeyInfo {
    /// e.g. `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa` (the key type).
    pub algorithm: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// The known_hosts line that pins this key for the probed host and port.
    pub openssh_line: String,
    pub key: PublicKey,
}

// ---------------------------------------------------------------------------------
// Handler: host-key policy
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Seen {
    Key {
        key: PublicKey,
        status: HostKeyStatus,
    },
    Certificate,
}

enum KeyPolicy {
    Verify(KnownHosts),
    /// Record the key, then refuse it (so no authentication is attempted).
    Probe,
}

struct ClientHandler {
    host: String,
    port: u16,
    policy: KeyPolicy,
    seen: Arc<Mutex<Option<Seen>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (seen, ok) = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                let status = match &self.policy {
                    KeyPolicy::Verify(kh) => kh.check(&self.host, self.port, key),
                    KeyPolicy::Probe => HostKeyStatus::Unknown,
                };
                let ok =
                    status == HostKeyStatus::Trusted && matches!(self.policy, KeyPolicy::Verify(_));
                (
                    Seen::Key {
                        key: key.clone(),
                        status,
                    },
                    ok,
                )
            }
            PublicKeyOrCertificate::Certificate(_) => (Seen::Certificate, false),
        };
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        Ok(ok)
    }
}

fn all_host_key_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::Ed25519,
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
    ]
}

/// Host-key algorithms, those with a pinned key first (as OpenSSH orders them), so a
/// server with several host keys presents the one we know.
fn host_key_order(pinned: &[&PublicKey]) -> Vec<Algorithm> {
    let all = all_host_key_algorithms();
    let is_pinned = |a: &Algorithm| {
        pinned.iter().any(|k| match (k.algorithm(), a) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            (ka, a) => ka == *a,
        })
    };
    let (mut first, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(is_pinned);
    first.extend(rest);
    first
}

fn client_config(keepalive: Duration, host_keys: Vec<Algorithm>) -> client::Config {
    let preferred = russh::Preferred {
        key: Cow::Owned(host_keys),
        cipher: Cow::Borrowed(&[
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        ..russh::Preferred::default()
    };
    let (keepalive_interval, inactivity_timeout) = if keepalive.is_zero() {
        (None, None)
    } else {
        // The inactivity timer is reset by every keepalive answer, so it only fires
        // when the peer stopped answering altogether.
        (
            Some(keepalive),
            Some(keepalive * (KEEPALIVE_MAX as u32 + 2)),
        )
    };
    client::Config {
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_BUFFER,
        preferred,
        keepalive_interval,
        keepalive_max: KEEPALIVE_MAX,
        inactivity_timeout,
        nodelay: true,
        ..client::Config::default()
    }
}

async fn with_timeout<T>(
    host: &str,
    port: u16,
    what: &'static str,
    after: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, SshError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| SshError::Timeout {
            host: host.to_owned(),
            port,
            what,
            after,
        })
}

/// TCP connect + SSH handshake; returns russh's result and the host key seen.
async fn handshake_raw(
    host: &str,
    port: u16,
    timeout: Duration,
    config: client::Config,
    policy: KeyPolicy,
) -> Result<(Result<Handle<ClientHandler>, russh::Error>, Option<Seen>), SshError> {
    let stream = with_timeout(
        host,
        port,
        "TCP connect",
        timeout,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await?
    .map_err(|e| SshError::Connect {
        host: host.to_owned(),
        port,
        detail: e.to_string(),
    })?;
    let _ = stream.set_nodelay(true);
    let seen = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        host: host.to_owned(),
        port,
        policy,
        seen: seen.clone(),
    };
    let res = with_timeout(
        host,
        port,
        "SSH handshake",
        timeout,
        client::connect_stream(Arc::new(config), stream, handler),
    )
    .await?;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((res, seen))
}

/// TCP connect + SSH handshake with the host-key verdict turned into precise errors.
async fn handshake(
    host: &str,
    port: u16,
    timeout: Duration,
    config: client::Config,
    policy: KeyPolicy,
    known_hosts_path: &Path,
) -> Result<(Handle<ClientHandler>, PublicKey), SshError> {
    let (res, seen) = handshake_raw(host, port, timeout, config, policy).await?;
    match (res, seen) {
        (
            Ok(h),
            Some(Seen::Key {
                key,
                status: HostKeyStatus::Trusted,
            }),
        ) => Ok((h, key)),
        (Ok(_), _) => Err(SshError::Protocol(
            "handshake finished without a verified host key".into(),
        )),
        (Err(e), Some(Seen::Key { key, status })) => {
            Err(host_key_error(host, port, &key, status, known_hosts_path)
                .unwrap_or_else(|| connect_error(host, port, &e)))
        }
        (Err(_), Some(Seen::Certificate)) => Err(SshError::HostCertificate {
            host: host.to_owned(),
            port,
        }),
        (Err(e), None) => Err(connect_error(host, port, &e)),
    }
}

fn connect_error(host: &str, port: u16, e: &russh::Error) -> SshError {
    SshError::Connect {
        host: host.to_owned(),
        port,
        detail: e.to_string(),
    }
}

fn host_key_error(
    host: &str,
    port: u16,
    key: &PublicKey,
    status: HostKeyStatus,
    known_hosts: &Path,
) -> Option<SshError> {
    let fingerprint = known_hosts::fingerprint(key);
    let algorithm = key.algorithm().as_str().to_owned();
    match status {
        HostKeyStatus::Trusted => None,
        HostKeyStatus::Unknown => Some(SshError::UnknownHostKey {
            host: host.to_owned(),
            port,
            fingerprint,
            algorithm,
            known_hosts: known_hosts.to_owned(),
        }),
        HostKeyStatus::Changed { known } => Some(SshError::HostKeyChanged {
            host: host.to_owned(),
            port,
            algorithm,
            presented: fingerprint,
            expected: known,
            known_hosts: known_hosts.to_owned(),
        }),
        HostKeyStatus::Revoked => Some(SshError::Revoked {
            host: host.to_owned(),
            port,
            fingerprint,
            known_hosts: known_hosts.to_owned(),
        }),
    }
}

/// Connect to `host`:`port`, record the host key the server proves it holds, and
/// disconnect before any authentication. Used by `virtkeep host trust` to show the
/// fingerprint before pinning it. Ed25519, ECDSA and RSA (rsa-sha2-512/256) keys are
/// accepted; the server picks its preferred one in that order.
pub async fn probe_host_key(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<HostKeyInfo, SshError> {
    let config = client_config(Duration::ZERO, all_host_key_algorithms());
    let (res, seen) = handshake_raw(host, port, timeout, config, KeyPolicy::Probe).await?;
    if let Ok(h) = &res {
        // The probe policy refuses every key, so this cannot happen; never keep it.
        let _ = h
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
    match seen {
        Some(Seen::Key { key, .. }) => Ok(HostKeyInfo {
            algorithm: key.algorithm().as_str().to_owned(),
            fingerprint: known_hosts::fingerprint(&key),
            openssh_line: format!(
                "{} {}",
                known_hosts::host_pattern(host, port),
                known_hosts::openssh_key(&key)?
            ),
            key,
        }),
        Some(Seen::Certificate) => Err(SshError::HostCertificate {
            host: host.to_owned(),
            port,
        }),
        None => Err(match res {
            Err(e) => connect_error(host, port, &e),
            Ok(_) => SshError::Protocol("server presented no host key".into()),
        }),
    }
}

// ---------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------

struct Inner {
    handle: Handle<ClientHandler>,
    target: HostTarget,
    host_key: PublicKey,
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
            .field("host", &self.inner.target.host)
            .field("port", &self.inner.target.port)
            .field("user", &self.inner.target.user)
            .field("closed", &self.inner.handle.is_closed())
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
        let known = KnownHosts::load(&target.known_hosts)?;
        let order = host_key_order(&known.keys_for(&target.host, target.port));
        let config = client_config(target.keepalive, order);
        let (mut handle, host_key) = handshake(
            &target.host,
            target.port,
            target.connect_timeout,
            config,
            KeyPolicy::Verify(known),
            &target.known_hosts,
        )
        .await?;
        with_timeout(
            &target.host,
            target.port,
            "authentication",
            target.connect_timeout,
            authenticate(&mut handle, target, agent_socket),
        )
        .await??;
        tracing::debug!(host = %target.host, port = target.port, user = %target.user, "ssh session established");
        Ok(Session {
            inner: Arc::new(Inner {
                handle,
                target: target.clone(),
                host_key,
                shells: Mutex::new(Vec::new()),
                shell_enabled: AtomicBool::new(true),
                shells_starting: AtomicUsize::new(0),
                shell_ready: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The target this session was opened for.
    pub fn target(&self) -> &HostTarget {
        &self.inner.target
    }

    /// The verified host key.
    pub fn host_key(&self) -> &PublicKey {
        &self.inner.host_key
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.handle.is_closed()
    }

    /// The line sent to the server for `cmd` (with sudo wrapping when configured).
    pub fn command_line(&self, cmd: &RemoteCommand) -> String {
        if self.inner.target.sudo {
            cmd.render_with_sudo()
        } else {
            cmd.render()
        }
    }

    fn disconnected(&self, detail: impl Into<String>) -> SshError {
        SshError::Disconnected {
            host: self.inner.target.host.clone(),
            port: self.inner.target.port,
            detail: detail.into(),
        }
    }

    fn map_russh(&self, what: &str, e: russh::Error) -> SshError {
        match e {
            russh::Error::ChannelOpenFailure(reason) => SshError::ChannelOpen {
                what: what.to_owned(),
                detail: format!("{reason:?}"),
            },
            russh::Error::SendError
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::ConnectionTimeout
            | russh::Error::KeepaliveTimeout
            | russh::Error::InactivityTimeout
            | russh::Error::IO(_) => self.disconnected(format!("{what}: {e}")),
            other if self.is_closed() => self.disconnected(format!("{what}: {other}")),
            other => SshError::Protocol(format!("{what}: {other}")),
        }
    }

    /// Start `cmd` on a new channel; the server's reply to the exec request is awaited
    /// by the caller's read loop (`Success`/`Failure`).
    async fn start(&self, line: &str) -> Result<russh::Channel<client::Msg>, SshError> {
        let ch = self
            .inner
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.map_russh("opening a session channel", e))?;
        ch.exec(true, line.as_bytes())
            .await
            .map_err(|e| self.map_russh("sending the exec request", e))?;
        Ok(ch)
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
        let Some(mut shell) = self.idle_shell().await? else {
            return self.exec_on_channel(&line).await;
        };
        match shell.run(&line).await {
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
                tracing::debug!(host = %self.inner.target.host, %detail, "no command shell on this host: one channel per command");
                self.inner.shell_enabled.store(false, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    async fn exec_on_channel(&self, line: &str) -> Result<Output, SshError> {
        let mut ch = self.start(line).await?;
        ch.eof()
            .await
            .map_err(|e| self.map_russh("closing stdin", e))?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut end = End::default();
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.extend_from_slice(&data),
                other => {
                    if end.on_msg(other) {
                        break;
                    }
                }
            }
        }
        let status = end.finish(self, line)?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
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
        let ch = self.start(&line).await?;
        let (mut rd, wr) = ch.split();
        let stdin = RemoteStdin {
            inner: Box::pin(wr.make_writer()),
            shut_down: false,
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(STDOUT_CHUNKS);
        let (done_tx, done_rx) = oneshot::channel();
        // Weak: a pooled command shell's channel lives as long as the session, and a
        // strong reference here would keep the connection open after its last user.
        let session = Arc::downgrade(&self.inner);
        let line2 = line.clone();
        tokio::spawn(async move {
            // Keep the write half alive until the remote side is done, so the
            // channel is not closed under the process.
            let _wr = wr;
            let mut stderr = TailBuffer::new(STDERR_LIMIT);
            let mut end = End::default();
            let mut tx = Some(tx);
            while let Some(msg) = rd.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        if let Some(t) = &tx
                            && t.send(Ok(data)).await.is_err()
                        {
                            // Reader dropped: keep draining so the connection flows.
                            tx = None;
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
                    other => {
                        let eof = matches!(other, ChannelMsg::Eof);
                        let stop = end.on_msg(other);
                        if eof {
                            // Stdout complete: let the reader see EOF now.
                            tx = None;
                        }
                        if stop {
                            break;
                        }
                    }
                }
            }
            let result = match session.upgrade() {
                Some(inner) => end.finish(&Session { inner }, &line2),
                None => end.finish_detached(&line2),
            };
            if let Some(t) = tx.take() {
                // Stdout ended without the server's EOF: never let a truncated stream
                // look like a complete one.
                let detail = match &result {
                    Err(e) => e.to_string(),
                    Ok(_) => "channel closed before end of stdout".to_owned(),
                };
                let _ = t
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        detail,
                    )))
                    .await;
            }
            let _ = done_tx.send(result.map(|status| (status, stderr.into_vec())));
        });
        Ok(RemoteProcess {
            stdout: RemoteStdout {
                rx,
                pending: Bytes::new(),
                failed: false,
            },
            stdin,
            command: line,
            done: done_rx,
        })
    }

    /// Open a byte stream to the unix socket `remote_path` on the host
    /// (`direct-streamlocal@openssh.com`), e.g. an NBD export. The socket is opened by
    /// sshd as the login user (sudo does not apply).
    pub async fn open_unix_socket(&self, remote_path: &str) -> Result<ChannelStream, SshError> {
        let ch = self
            .inner
            .handle
            .channel_open_direct_streamlocal(remote_path)
            .await
            .map_err(|e| self.map_russh(&format!("forwarding to unix socket {remote_path}"), e))?;
        Ok(ChannelStream {
            inner: ch.into_stream(),
        })
    }

    /// Disconnect (all clones of this session become unusable).
    pub async fn close(&self) -> Result<(), SshError> {
        if self.is_closed() {
            return Ok(());
        }
        self.inner
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
            .map_err(|e| self.map_russh("disconnect", e))
    }
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    target: &HostTarget,
    agent_socket: Option<PathBuf>,
) -> Result<(), SshError> {
    let auth_err = |detail: String| SshError::Auth {
        user: target.user.clone(),
        host: target.host.clone(),
        port: target.port,
        method: target.auth.method(),
        detail,
    };
    let proto = |e: russh::Error| auth_err(format!("protocol error: {e}"));
    let rejected = "the server rejected it".to_owned();
    match &target.auth {
        Auth::Password { password } => {
            let r = handle
                .authenticate_password(target.user.clone(), password.clone())
                .await
                .map_err(proto)?;
            if !r.success() {
                return Err(auth_err(rejected));
            }
        }
        Auth::KeyFile { path, passphrase } => {
            let key = russh::keys::load_secret_key(path, passphrase.as_deref()).map_err(|e| {
                SshError::KeyFile {
                    path: path.clone(),
                    detail: match e {
                        russh::keys::Error::KeyIsEncrypted => {
                            "the key is encrypted and no (or a wrong) passphrase was given"
                                .to_owned()
                        }
                        other => other.to_string(),
                    },
                }
            })?;
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(proto)?
                    .flatten()
            } else {
                None
            };
            let r = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(proto)?;
            if !r.success() {
                return Err(auth_err(rejected));
            }
        }
        Auth::Agent => {
            let socket = match agent_socket {
                Some(s) => s,
                None => std::env::var_os("SSH_AUTH_SOCK")
                    .map(PathBuf::from)
                    .ok_or_else(|| SshError::Agent {
                        detail: "SSH_AUTH_SOCK is not set; start an agent or use a key file".into(),
                    })?,
            };
            let mut agent =
                AgentClient::connect_uds(&socket)
                    .await
                    .map_err(|e| SshError::Agent {
                        detail: format!("cannot connect to {}: {e}", socket.display()),
                    })?;
            let ids = agent
                .request_identities()
                .await
                .map_err(|e| SshError::Agent {
                    detail: format!("cannot list identities: {e}"),
                })?;
            let mut tried = 0usize;
            let mut last = String::from("the agent holds no keys");
            for id in ids {
                let AgentIdentity::PublicKey { key, .. } = id else {
                    continue;
                };
                tried += 1;
                let hash = if key.algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(proto)?
                        .flatten()
                } else {
                    None
                };
                match handle
                    .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
                    .await
                {
                    Ok(r) if r.success() => return Ok(()),
                    Ok(_) => last = format!("the server rejected all {tried} agent key(s)"),
                    Err(e) => last = format!("agent signing failed: {e}"),
                }
            }
            return Err(auth_err(last));
        }
    }
    Ok(())
}

/// Tracks how a channel ended.
#[derive(Default)]
struct End {
    status: Option<u32>,
    signal: Option<String>,
    refused: bool,
    closed: bool,
}

impl End {
    /// Returns true when the channel is finished.
    fn on_msg(&mut self, msg: ChannelMsg) -> bool {
        match msg {
            ChannelMsg::ExitStatus { exit_status } => self.status = Some(exit_status),
            ChannelMsg::ExitSignal {
                signal_name,
                error_message,
                ..
            } => {
                self.status = Some(128 + signal_number(&signal_name));
                self.signal = Some(format!("{signal_name:?} {error_message}").trim().to_owned());
            }
            ChannelMsg::Failure => {
                self.refused = true;
                return true;
            }
            ChannelMsg::Close => {
                self.closed = true;
                return true;
            }
            _ => {}
        }
        false
    }

    /// [`finish`](Self::finish) once every handle of the session is gone.
    fn finish_detached(self, line: &str) -> Result<u32, SshError> {
        match self.status {
            Some(s) => Ok(s),
            None => Err(SshError::ChannelClosed {
                what: format!("`{line}` (session closed)"),
            }),
        }
    }

    fn finish(self, session: &Session, line: &str) -> Result<u32, SshError> {
        if self.refused {
            return Err(SshError::ChannelOpen {
                what: format!("exec of `{line}`"),
                detail: "the server refused the exec request".into(),
            });
        }
        if let Some(sig) = &self.signal {
            tracing::debug!(command = line, signal = %sig, "remote command killed by signal");
        }
        match self.status {
            Some(s) => Ok(s),
            None if !self.closed || session.is_closed() => {
                Err(session.disconnected(format!("while running `{line}`")))
            }
            None => Err(SshError::ChannelClosed {
                what: format!("`{line}`"),
            }),
        }
    }
}

fn signal_number(sig: &Sig) -> u32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 64,
    }
}

/// Keeps the last `limit` bytes.
struct TailBuffer {
    buf: std::collections::VecDeque<u8>,
    limit: usize,
}

impl TailBuffer {
    fn new(limit: usize) -> Self {
        TailBuffer {
            buf: std::collections::VecDeque::new(),
            limit,
        }
    }
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.limit {
            &data[data.len() - self.limit..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.limit);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }
    fn into_vec(self) -> Vec<u8> {
        self.buf.into()
    }
}

// ---------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------

/// A running remote command.
pub struct RemoteProcess {
    /// The command's stdout. Ends with an error (not EOF) if the connection is lost.
    pub stdout: RemoteStdout,
    /// The command's stdin; `shutdown()` sends EOF.
    pub stdin: RemoteStdin,
    pub(crate) command: String,
    pub(crate) done: oneshot::Receiver<Result<(u32, Vec<u8>), SshError>>,
}

impl fmt::Debug for RemoteProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteProcess")
            .field("command", &self.command)
            .finish()
    }
}

impl RemoteProcess {
    /// The command line as sent.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Wait for the command to end: exit status (128 + N for signal N) and the tail of
    /// stderr (last 1 MiB). Sends EOF on stdin if that was not done yet; stdout that
    /// has not been read is discarded. (If `stdout` was moved out of the struct, read
    /// it to the end or drop it first: unread stdout holds the command back.)
    pub async fn wait(self) -> Result<(u32, Vec<u8>), SshError> {
        use tokio::io::AsyncWriteExt;
        let RemoteProcess {
            stdout,
            mut stdin,
            done,
            ..
        } = self;
        drop(stdout);
        let _ = stdin.shutdown().await;
        drop(stdin);
        done.await.unwrap_or_else(|_| {
            Err(SshError::Protocol(
                "channel task ended without a result".into(),
            ))
        })
    }

    /// Like [`wait`](Self::wait), but a non-zero status is [`SshError::CommandFailed`].
    pub async fn wait_success(self) -> Result<Vec<u8>, SshError> {
        let command = self.command.clone();
        let (status, stderr) = self.wait().await?;
        if status != 0 {
            return Err(SshError::CommandFailed {
                command,
                status,
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            });
        }
        Ok(stderr)
    }
}

/// Stdout of a [`RemoteProcess`].
pub struct RemoteStdout {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    pending: Bytes,
    failed: bool,
}

impl AsyncRead for RemoteStdout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "remote stdout failed",
                )));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => self.pending = b,
                Poll::Ready(Some(Err(e))) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Stdin of a [`RemoteProcess`].
pub struct RemoteStdin {
    inner: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    shut_down: bool,
}

impl AsyncWrite for RemoteStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.shut_down {
            return Poll::Ready(Ok(()));
        }
        let r = self.inner.as_mut().poll_shutdown(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.shut_down = true;
        }
        r
    }
}

/// A byte stream over an SSH channel (see [`Session::open_unix_socket`]).
pub struct ChannelStream {
    inner: russh::ChannelStream<client::Msg>,
}

impl fmt::Debug for ChannelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChannelStream")
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A poisoned lock only means another task panicked while holding it; the idle
/// list is still consistent (push/pop are atomic under the lock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_types_are_send_sync_unpin() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>() {}
        fn reader<T: AsyncRead + Unpin + Send>() {}
        fn writer<T: AsyncWrite + Unpin + Send>() {}
        send_sync::<Session>();
        send_sync::<crate::Pool>();
        send_sync::<SshError>();
        stream::<ChannelStream>();
        reader::<RemoteStdout>();
        writer::<RemoteStdin>();
    }

    #[test]
    fn tail_buffer_keeps_tail() {
        let mut t = TailBuffer::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!(t.into_vec(), b"cdef");
        let mut t = TailBuffer::new(3);
        t.push(b"123456");
        t.push(b"7");
        assert_eq!(t.into_vec(), b"567");
    }

    #[test]
    fn auth_debug_redacts() {
        let a = Auth::Password {
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        let a = Auth::KeyFile {
            path: "/k".into(),
            passphrase: Some("s3cret".into()),
        };
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
