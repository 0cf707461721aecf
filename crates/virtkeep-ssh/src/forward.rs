//! Remote unix-socket forwarding (`streamlocal-forward@openssh.com`): the host's sshd
//! listens on a unix socket path we choose, and every connection to it arrives here as
//! a channel of the same SSH connection — so a server of the node (the NBD export of a
//! backup) is reachable on the host without opening any port.
//!
//! The connection's handler ([`crate::connect`]) routes each forwarded channel by its
//! socket path to the queue of the [`UnixForward`] that asked for it; channels for any
//! other path are refused.

use std::sync::{Arc, Weak};
use std::time::Duration;

use russh::Channel;
use russh::client::Msg;
use tokio::sync::mpsc;

use crate::connect::{Connection, Forwards};
use crate::error::SshError;
use crate::process::ChannelStream;

/// Longest socket path accepted: `sun_path` holds 108 bytes with the NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// A unix socket the host's sshd listens on for us. [`accept`](Self::accept) yields
/// each connection made to it; [`close`](Self::close) asks sshd to stop listening.
/// Dropping it refuses further connections at once (sshd keeps the listener until the
/// connection ends or `close`). sshd does not remove the socket file: the caller
/// chooses the path in a private directory and removes that.
pub struct UnixForward {
    conn: Weak<Connection>,
    forwards: Forwards,
    path: String,
    rx: mpsc::UnboundedReceiver<Channel<Msg>>,
}

impl std::fmt::Debug for UnixForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixForward")
            .field("path", &self.path)
            .finish()
    }
}

/// Asks the server to listen on `path`, waiting at most `timeout` for its answer.
pub(crate) async fn listen(
    conn: &Arc<Connection>,
    path: &str,
    timeout: Duration,
) -> Result<UnixForward, SshError> {
    let target = conn.target();
    let refused = |detail: String| SshError::ForwardRefused {
        host: target.host.clone(),
        path: path.to_owned(),
        dir: path
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or(".")
            .to_owned(),
        detail,
    };
    if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
        return Err(refused(format!(
            "a socket path must be absolute and at most {MAX_SOCKET_PATH} bytes"
        )));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    // Registered before asking, so a connection made the moment sshd listens is routed.
    if !conn.forwards().add(path, tx) {
        return Err(refused("already forwarded on this connection".into()));
    }
    let asked = tokio::time::timeout(timeout, conn.handle().streamlocal_forward(path)).await;
    let res = match asked {
        Ok(Ok(())) => Ok(()),
        Ok(Err(russh::Error::RequestDenied)) => Err(refused("request denied".into())),
        Ok(Err(e)) => Err(conn.map_russh(&format!("forwarding unix socket {path}"), e)),
        Err(_) => Err(SshError::Timeout {
            host: target.host.clone(),
            port: target.port,
            what: "unix-socket forward request",
            after: timeout,
        }),
    };
    if let Err(e) = res {
        conn.forwards().remove(path);
        return Err(e);
    }
    tracing::debug!(host = %target.host, path, "remote unix socket forward listening");
    Ok(UnixForward {
        conn: Arc::downgrade(conn),
        forwards: conn.forwards().clone(),
        path: path.to_owned(),
        rx,
    })
}

impl UnixForward {
    /// The socket path on the host.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The next connection made to the socket; `None` once the SSH connection is gone.
    pub async fn accept(&mut self) -> Option<ChannelStream> {
        let ch = self.rx.recv().await?;
        Some(ChannelStream::from_channel(ch))
    }

    /// Stops routing new connections and asks sshd to stop listening (within
    /// `timeout`). Connections already accepted go on until their streams end.
    pub async fn close(self, timeout: Duration) -> Result<(), SshError> {
        self.forwards.remove(&self.path);
        let Some(conn) = self.conn.upgrade() else {
            return Ok(());
        };
        if conn.is_closed() {
            return Ok(());
        }
        let cancel = conn.handle().cancel_streamlocal_forward(self.path.as_str());
        match tokio::time::timeout(timeout, cancel).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(conn.map_russh(&format!("cancelling forward {}", self.path), e)),
            Err(_) => Err(SshError::Timeout {
                host: conn.target().host.clone(),
                port: conn.target().port,
                what: "unix-socket forward cancel",
                after: timeout,
            }),
        }
    }
}

impl Drop for UnixForward {
    fn drop(&mut self) {
        self.forwards.remove(&self.path);
    }
}
