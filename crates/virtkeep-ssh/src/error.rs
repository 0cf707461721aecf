//! The error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking to a host. Messages say what happened and,
/// where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// TCP connection or SSH handshake failed.
    #[error("cannot connect to {host}:{port}: {detail}")]
    Connect {
        host: String,
        port: u16,
        detail: String,
    },

    /// A step did not finish in time.
    #[error("{what} on {host}:{port} timed out after {after:?}")]
    Timeout {
        host: String,
        port: u16,
        what: &'static str,
        after: Duration,
    },

    /// The server refused our credentials.
    #[error(
        "authentication as {user:?} on {host}:{port} with {method} failed: {detail}. \
         Check the user name and the credential configured for this host"
    )]
    Auth {
        user: String,
        host: String,
        port: u16,
        method: &'static str,
        detail: String,
    },

    /// The server's host key is not pinned.
    #[error(
        "the host key of {host} port {port} is not trusted: the server presented the {algorithm} \
         key {fingerprint}, which is not pinned in {}. Compare it with the key on the host \
         (`ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub` run there) and pin it with \
         `virtkeep host trust NAME`",
        known_hosts.display(),
        key_file_stem(algorithm)
    )]
    UnknownHostKey {
        host: String,
        port: u16,
        fingerprint: String,
        algorithm: String,
        known_hosts: PathBuf,
    },

    /// The server presented a key other than the pinned one(s).
    #[error(
        "HOST KEY CHANGED for {host} port {port}: the server presented the {algorithm} key \
         {presented}, but {} pins {}. Someone may be intercepting the connection, or the host \
         was reinstalled or its keys regenerated. Check the key on the host (`ssh-keygen -lf \
         /etc/ssh/ssh_host_{}_key.pub` run there); only if the change is expected, remove the \
         old entry (`ssh-keygen -R '{}' -f {}`) and pin the new key with `virtkeep host trust NAME`",
        known_hosts.display(),
        expected.join(", "),
        key_file_stem(algorithm),
        host_pattern(host, *port),
        known_hosts.display()
    )]
    HostKeyChanged {
        host: String,
        port: u16,
        algorithm: String,
        presented: String,
        expected: Vec<String>,
        known_hosts: PathBuf,
    },

    /// The server's key is marked `@revoked`.
    #[error(
        "the host key {fingerprint} of {host} port {port} is marked @revoked in {}; refusing \
         to connect. Replace the host's key and pin the new one with `virtkeep host trust NAME`",
        known_hosts.display()
    )]
    Revoked {
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    /// The server presented an OpenSSH certificate, which this client does not trust.
    #[error(
        "{host}:{port} presented a host certificate; only plain pinned host keys are supported"
    )]
    HostCertificate { host: String, port: u16 },

    /// A known_hosts file could not be read or written.
    #[error("known_hosts file {}: {detail}", path.display())]
    KnownHosts { path: PathBuf, detail: String },

    /// A private key file could not be read or decoded.
    #[error("private key {}: {detail}", path.display())]
    KeyFile { path: PathBuf, detail: String },

    /// The ssh-agent could not be reached or used.
    #[error("ssh-agent: {detail}")]
    Agent { detail: String },

    /// A remote command exited with a non-zero status.
    #[error(
        "remote command failed with exit status {status}{}: {command}{}",
        signal_note(*status),
        stderr_tail(stderr)
    )]
    CommandFailed {
        command: String,
        status: u32,
        stderr: String,
    },

    /// The server refused to start the command or open the channel.
    #[error("{what} refused by the server: {detail}")]
    ChannelOpen { what: String, detail: String },

    /// The channel closed before the remote command reported how it ended.
    #[error("channel closed before {what} reported an exit status")]
    ChannelClosed { what: String },

    /// The connection is gone (peer closed it, keepalives unanswered, network error).
    #[error("connection to {host}:{port} lost: {detail}")]
    Disconnected {
        host: String,
        port: u16,
        detail: String,
    },

    /// Command output was expected to be UTF-8.
    #[error("output of `{command}` is not valid UTF-8")]
    NotUtf8 { command: String },

    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// The host's sshd would not listen on a unix socket for us.
    #[error(
        "the SSH server of {host} refused to listen on unix socket {path}: {detail}. \
         Allow it in the host's sshd_config (`AllowStreamLocalForwarding yes`, the default; \
         `DisableForwarding no`) and check that the login user may create files in {dir}"
    )]
    ForwardRefused {
        host: String,
        path: String,
        dir: String,
        detail: String,
    },

    /// Any other SSH protocol error.
    #[error("ssh protocol error: {0}")]
    Protocol(String),
}

impl SshError {
    /// True when the error means the connection itself is unusable (reconnect may help).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            SshError::Disconnected { .. } | SshError::Timeout { .. } | SshError::Connect { .. }
        )
    }
}

fn key_file_stem(algorithm: &str) -> &'static str {
    if algorithm.contains("ed25519") {
        "ed25519"
    } else if algorithm.contains("ecdsa") {
        "ecdsa"
    } else if algorithm.contains("rsa") {
        "rsa"
    } else {
        "*"
    }
}

fn signal_note(status: u32) -> String {
    match status {
        129..=192 => format!(" (killed by signal {})", status - 128),
        _ => String::new(),
    }
}

/// The last lines of stderr, for error messages.
fn stderr_tail(stderr: &str) -> String {
    const LINES: usize = 10;
    let trimmed = stderr.trim_end();
    if trimmed.is_empty() {
        return String::from(" (no stderr output)");
    }
    let lines: Vec<&str> = trimmed.lines().collect();
    let start = lines.len().saturating_sub(LINES);
    let mut out = String::from("\nstderr");
    if start > 0 {
        out.push_str(&format!(" (last {LINES} of {} lines)", lines.len()));
    }
    out.push(':');
    for l in &lines[start..] {
        out.push_str("\n  ");
        out.push_str(l);
    }
    out
}

/// The name under which OpenSSH records `host`/`port`: `host` for port 22,
/// `[host]:port` otherwise. Defined here, not in `known_hosts.rs` (which
/// re-exports it), because error messages need it and `known_hosts` uses this module.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_failed_message() {
        let stderr: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let e = SshError::CommandFailed {
            command: "false 'x y'".into(),
            status: 3,
            stderr,
        };
        let m = e.to_string();
        assert!(m.contains("exit status 3: false 'x y'"), "{m}");
        assert!(
            m.contains("line 30") && m.contains("line 21") && !m.contains("line 20\n"),
            "{m}"
        );
        let e = SshError::UnknownHostKey {
            host: "h".into(),
            port: 2222,
            fingerprint: "SHA256:abc".into(),
            algorithm: "ssh-ed25519".into(),
            known_hosts: "/k".into(),
        };
        let m = e.to_string();
        assert!(
            m.contains("virtkeep host trust NAME") && m.contains("SHA256:abc"),
            "{m}"
        );
    }
}
