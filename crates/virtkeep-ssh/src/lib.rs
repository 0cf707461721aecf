//! virtkeep-ssh: the SSH transport of virtkeep.
//!
//! - [`quote`] and [`RemoteCommand`]: the only way command lines are built.
//! - [`Session`]: a russh connection with strict host-key checking against our own
//!   trust store ([`known_hosts`]), key-file / password / agent authentication,
//!   `exec`/`run`/`spawn` and unix-socket forwarding.
//! - [`Pool`]: a control connection plus lazily opened data connections (one russh
//!   connection is served by one task, i.e. one core).
//! - [`probe_host_key`]: fetch a server's host key for `virtkeep host trust`.

mod command;
mod error;
pub mod known_hosts;
mod pool;
mod session;
mod shell;

pub use command::{RemoteCommand, quote};
pub use error::SshError;
pub use known_hosts::{HostKeyStatus, KnownHosts};
pub use pool::Pool;
pub use russh::keys::PublicKey;
pub use session::{
    Auth, ChannelStream, HostKeyInfo, HostTarget, Output, RemoteProcess, RemoteStdin, RemoteStdout,
    Session, probe_host_key,
};
