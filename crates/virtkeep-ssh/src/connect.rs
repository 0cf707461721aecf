//! Opening an SSH connection: TCP connect, the handshake with strict host-key
//! checking against our own known_hosts ([`crate::known_hosts`]), authentication
//! (key file, password, ssh-agent), and [`probe_host_key`] for `virtkeep host trust`.
//! The result is a [`Connection`]; the session, its shells and its processes are
//! built on it elsewhere.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::cipher;
use russh::client::{self, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKey};
use tokio::sync::mpsc;

use crate::admission::{
    ConnectDeadline, DEFAULT_CONNECT_RETRIES, DEFAULT_MAX_HANDSHAKES, HandshakeSlots, Retry,
    is_early_drop,
};
use crate::error::SshError;
use crate::known_hosts::{self, HostKeyStatus, KnownHosts};

/// Receive window per channel. Only `Config::window_size` counts on the client side
/// (russh#770); 16 MiB keeps a single stream from being window-bound.
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;
/// Largest packet allowed by russh (and by the SSH spec's recommendation).
const MAX_PACKET: u32 = 65535;
/// Messages buffered per channel inside russh before it stops reading the socket.
const CHANNEL_BUFFER: usize = 256;
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
    /// given to [`crate::Session::connect_with_agent`].
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
    /// Limit for TCP connect, handshake and authentication, each; a whole connect
    /// (slot wait and retries included) gets three times this.
    pub connect_timeout: Duration,
    /// Keepalive interval; after 3 unanswered keepalives the connection fails.
    /// `Duration::ZERO` disables keepalives (and then no dead-peer detection).
    pub keepalive: Duration,
    /// Handshakes (TCP connect to the end of authentication) to this host:port this
    /// process runs at once; more wait. Keeps jobs under sshd's `MaxStartups`.
    pub max_handshakes: usize,
    /// Retries of a connection sshd closed before its banner or key exchange (what
    /// `MaxStartups` does under load), with jittered backoff within the connect's deadline.
    /// 0 disables them. Authentication and host-key failures are never retried.
    pub connect_retries: u32,
}

impl HostTarget {
    /// A target with port 22, no sudo, 15 s connect timeout, 15 s keepalive, and the
    /// default handshake limit and retries.
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
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            connect_retries: DEFAULT_CONNECT_RETRIES,
        }
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

/// The remote unix-socket forwards of one connection (`forward.rs`): socket path
/// → queue of its arriving channels, for the handler to route them.
#[derive(Clone, Default)]
pub(crate) struct Forwards(
    Arc<Mutex<HashMap<String, mpsc::UnboundedSender<russh::Channel<client::Msg>>>>>,
);

impl Forwards {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<String, mpsc::UnboundedSender<russh::Channel<client::Msg>>>,
    > {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn sender(
        &self,
        path: &str,
    ) -> Option<mpsc::UnboundedSender<russh::Channel<client::Msg>>> {
        self.lock().get(path).cloned()
    }

    /// Registers `path`; false when it is already forwarded on this connection.
    pub(crate) fn add(
        &self,
        path: &str,
        tx: mpsc::UnboundedSender<russh::Channel<client::Msg>>,
    ) -> bool {
        let mut map = self.lock();
        if map.contains_key(path) {
            return false;
        }
        map.insert(path.to_owned(), tx);
        true
    }

    pub(crate) fn remove(&self, path: &str) {
        self.lock().remove(path);
    }
}

pub(crate) struct ClientHandler {
    host: String,
    port: u16,
    policy: KeyPolicy,
    seen: Arc<Mutex<Option<Seen>>>,
    /// Remote unix-socket forwards of this connection (see `forward.rs`).
    forwards: Forwards,
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

    /// A connection to a socket we asked sshd to listen on goes to that forward's
    /// queue; one on a path we never asked for (or no longer listen on) is refused.
    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        match self.forwards.sender(socket_path) {
            Some(tx) => {
                reply.accept().await;
                if tx.send(channel).is_err() {
                    tracing::debug!(socket_path, "forward closed while a connection arrived");
                }
            }
            None => {
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
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
    deadline: ConnectDeadline,
    config: client::Config,
    policy: KeyPolicy,
    forwards: &Forwards,
) -> Result<(Result<Handle<ClientHandler>, russh::Error>, Option<Seen>), SshError> {
    let stream = with_timeout(
        host,
        port,
        "TCP connect",
        deadline.step(),
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
        forwards: forwards.clone(),
    };
    let res = with_timeout(
        host,
        port,
        "SSH handshake",
        deadline.step(),
        client::connect_stream(Arc::new(config), stream, handler),
    )
    .await?;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((res, seen))
}

/// A handshake slot of `target`, waited for within the connect's deadline (a slot
/// held by a stuck handshake must not stall this connect past it).
async fn acquire_slot(
    target: &HostTarget,
    deadline: ConnectDeadline,
) -> Result<tokio::sync::OwnedSemaphorePermit, SshError> {
    let limit = deadline.left();
    let acquire = HandshakeSlots::acquire(&target.host, target.port, target.max_handshakes);
    tokio::time::timeout(limit, acquire)
        .await
        .map_err(|_| SshError::Connect {
            host: target.host.clone(),
            port: target.port,
            detail: format!(
                "{} handshakes to {} already running for {limit:?}; hint: run fewer jobs \
                 against this host at once, or check why its logins are slow",
                target.max_handshakes.max(1),
                target.host
            ),
        })
}

/// A failed handshake; `early_drop` when sshd closed it before showing its key.
struct Failed {
    error: SshError,
    early_drop: bool,
}

impl From<SshError> for Failed {
    fn from(error: SshError) -> Failed {
        Failed {
            error,
            early_drop: false,
        }
    }
}

/// TCP connect + SSH handshake with the host-key verdict turned into precise errors.
async fn handshake(
    host: &str,
    port: u16,
    deadline: ConnectDeadline,
    config: client::Config,
    policy: KeyPolicy,
    known_hosts_path: &Path,
    forwards: &Forwards,
) -> Result<(Handle<ClientHandler>, PublicKey), Failed> {
    let (res, seen) = handshake_raw(host, port, deadline, config, policy, forwards).await?;
    if let (Err(e), None) = (&res, &seen)
        && is_early_drop(e)
    {
        return Err(Failed {
            error: SshError::Connect {
                host: host.to_owned(),
                port,
                detail: format!(
                    "the server closed the connection before the key exchange ({e}); \
                     sshd's MaxStartups limit may be shedding load"
                ),
            },
            early_drop: true,
        });
    }
    Ok(match (res, seen) {
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
    }?)
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
    let (res, seen) = handshake_raw(
        host,
        port,
        ConnectDeadline::new(timeout),
        config,
        KeyPolicy::Probe,
        &Forwards::default(),
    )
    .await?;
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
// Connection
// ---------------------------------------------------------------------------------

/// An authenticated connection with a verified host key: the russh handle, and how
/// its failures are reported.
pub(crate) struct Connection {
    handle: Handle<ClientHandler>,
    target: HostTarget,
    host_key: PublicKey,
    forwards: Forwards,
}

impl Connection {
    /// Connect, verify the host key against `target.known_hosts`, authenticate.
    /// `agent_socket` replaces `SSH_AUTH_SOCK` for `Auth::Agent`.
    pub(crate) async fn open(
        target: &HostTarget,
        agent_socket: Option<PathBuf>,
    ) -> Result<Connection, SshError> {
        let known = KnownHosts::load(&target.known_hosts)?;
        let order = host_key_order(&known.keys_for(&target.host, target.port));
        // Unauthenticated connections are what sshd's MaxStartups counts: hold a slot
        // until authentication is over.
        let deadline = ConnectDeadline::new(target.connect_timeout);
        let _slot = acquire_slot(target, deadline).await?;
        let mut retry = Retry::new(target.connect_retries, deadline.at());
        let forwards = Forwards::default();
        let (mut handle, host_key) = loop {
            let config = client_config(target.keepalive, order.clone());
            let policy = KeyPolicy::Verify(known.clone());
            match handshake(
                &target.host,
                target.port,
                deadline,
                config,
                policy,
                &target.known_hosts,
                &forwards,
            )
            .await
            {
                Ok(v) => break v,
                Err(f) if f.early_drop && retry.wait().await => {
                    tracing::debug!(host = %target.host, port = target.port, error = %f.error, "connection dropped early, retrying");
                }
                Err(f) => return Err(f.error),
            }
        };
        with_timeout(
            &target.host,
            target.port,
            "authentication",
            deadline.step(),
            authenticate(&mut handle, target, agent_socket),
        )
        .await??;
        tracing::debug!(host = %target.host, port = target.port, user = %target.user, "ssh session established");
        Ok(Connection {
            handle,
            target: target.clone(),
            host_key,
            forwards,
        })
    }

    pub(crate) fn handle(&self) -> &Handle<ClientHandler> {
        &self.handle
    }

    pub(crate) fn forwards(&self) -> &Forwards {
        &self.forwards
    }

    pub(crate) fn target(&self) -> &HostTarget {
        &self.target
    }

    pub(crate) fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    pub(crate) fn disconnected(&self, detail: impl Into<String>) -> SshError {
        SshError::Disconnected {
            host: self.target.host.clone(),
            port: self.target.port,
            detail: detail.into(),
        }
    }

    pub(crate) fn map_russh(&self, what: &str, e: russh::Error) -> SshError {
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

    /// Disconnect (every user of this connection sees it closed).
    pub(crate) async fn close(&self) -> Result<(), SshError> {
        if self.is_closed() {
            return Ok(());
        }
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
            .map_err(|e| self.map_russh("disconnect", e))
    }
}

// ---------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    target: &HostTarget,
    agent_socket: Option<PathBuf>,
) -> Result<(), SshError> {
    let rejected = || auth_error(target, "the server rejected it".to_owned());
    match &target.auth {
        Auth::Password { password } => {
            let r = handle
                .authenticate_password(target.user.clone(), password.clone())
                .await
                .map_err(|e| auth_protocol_error(target, e))?;
            if !r.success() {
                return Err(rejected());
            }
        }
        Auth::KeyFile { path, passphrase } => {
            let key = load_key_file(path, passphrase.as_deref())?;
            let hash = rsa_hash(handle, target, key.algorithm().is_rsa()).await?;
            let r = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(|e| auth_protocol_error(target, e))?;
            if !r.success() {
                return Err(rejected());
            }
        }
        Auth::Agent => return authenticate_with_agent(handle, target, agent_socket).await,
    }
    Ok(())
}

fn auth_error(target: &HostTarget, detail: String) -> SshError {
    SshError::Auth {
        user: target.user.clone(),
        host: target.host.clone(),
        port: target.port,
        method: target.auth.method(),
        detail,
    }
}

fn auth_protocol_error(target: &HostTarget, e: russh::Error) -> SshError {
    auth_error(target, format!("protocol error: {e}"))
}

fn load_key_file(
    path: &Path,
    passphrase: Option<&str>,
) -> Result<russh::keys::PrivateKey, SshError> {
    russh::keys::load_secret_key(path, passphrase).map_err(|e| SshError::KeyFile {
        path: path.to_owned(),
        detail: match e {
            russh::keys::Error::KeyIsEncrypted => {
                "the key is encrypted and no (or a wrong) passphrase was given".to_owned()
            }
            other => other.to_string(),
        },
    })
}

/// The RSA signature hash the server prefers, for an RSA key; `None` otherwise.
async fn rsa_hash(
    handle: &Handle<ClientHandler>,
    target: &HostTarget,
    is_rsa: bool,
) -> Result<Option<HashAlg>, SshError> {
    if !is_rsa {
        return Ok(None);
    }
    Ok(handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| auth_protocol_error(target, e))?
        .flatten())
}

/// Tries every key the agent holds, in its order.
async fn authenticate_with_agent(
    handle: &mut Handle<ClientHandler>,
    target: &HostTarget,
    agent_socket: Option<PathBuf>,
) -> Result<(), SshError> {
    let socket = match agent_socket {
        Some(s) => s,
        None => std::env::var_os("SSH_AUTH_SOCK")
            .map(PathBuf::from)
            .ok_or_else(|| SshError::Agent {
                detail: "SSH_AUTH_SOCK is not set; start an agent or use a key file".into(),
            })?,
    };
    let mut agent = AgentClient::connect_uds(&socket)
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
        let hash = rsa_hash(handle, target, key.algorithm().is_rsa()).await?;
        match handle
            .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
            .await
        {
            Ok(r) if r.success() => return Ok(()),
            Ok(_) => last = format!("the server rejected all {tried} agent key(s)"),
            Err(e) => last = format!("agent signing failed: {e}"),
        }
    }
    Err(auth_error(target, last))
}

#[cfg(test)]
mod tests {
    use super::*;

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
