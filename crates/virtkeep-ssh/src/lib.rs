//! virtkeep-ssh: the SSH transport of virtkeep.
//!
//! - [`quote`] and [`RemoteCommand`]: the only way command lines are built.
//! - [`Session`] (`session.rs`): an authenticated connection shared by its clones,
//!   with a pool of command shells on the host (`shell.rs`); `exec`/`run`/`spawn` and
//!   unix-socket forwarding, both ways (`forward.rs`: the host's sshd listens for us).
//! - Connecting (`connect.rs`): [`HostTarget`], [`Auth`], strict host-key checking
//!   against our own trust store ([`known_hosts`]), key-file / password / agent
//!   authentication; at most a few handshakes per host at once, and a connection
//!   sshd drops under load (`MaxStartups`) retried (`admission.rs`).
//! - Remote processes (`process.rs`): [`RemoteProcess`] and its streams, [`Output`],
//!   [`ChannelStream`], and running a command on a channel of its own.
//! - [`Pool`]: a control connection plus lazily opened data connections (one russh
//!   connection is served by one task, i.e. one core).
//! - [`probe_host_key`]: fetch a server's host key for `virtkeep host trust`.

mod admission;
mod command;
mod connect;
mod error;
mod forward;
pub mod known_hosts;
mod pool;
mod process;
mod session;
mod shell;

pub use admission::{DEFAULT_CONNECT_RETRIES, DEFAULT_MAX_HANDSHAKES};
pub use command::{RemoteCommand, quote};
pub use connect::{Auth, HostKeyInfo, HostTarget, probe_host_key};
pub use error::SshError;
pub use forward::{MAX_SOCKET_PATH, UnixForward};
pub use known_hosts::{HostKeyStatus, KnownHosts};
pub use pool::Pool;
pub use process::{ChannelStream, Output, RemoteProcess, RemoteStdin, RemoteStdout};
pub use russh::keys::PublicKey;
pub use session::Session;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncWrite};

    #[test]
    fn public_types_are_send_sync_unpin() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>() {}
        fn reader<T: AsyncRead + Unpin + Send>() {}
        fn writer<T: AsyncWrite + Unpin + Send>() {}
        send_sync::<Session>();
        send_sync::<Pool>();
        send_sync::<UnixForward>();
        send_sync::<SshError>();
        stream::<ChannelStream>();
        reader::<RemoteStdout>();
        writer::<RemoteStdin>();
    }
}
