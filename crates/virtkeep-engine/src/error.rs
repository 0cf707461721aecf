//! The engine's user-facing error: what went wrong, in the user's terms, and what to do.
//!
//! Library crates return precise `thiserror` enums; the engine turns them into an
//! [`Error`] with a [`ErrorKind`] (for exit codes and `--json`) and a hint.

use std::fmt;

/// Broad class of a failure, stable in `--json` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad configuration or arguments: exit code 2.
    Config,
    /// Could not reach or log in to the hypervisor.
    Connection,
    /// The host key is unknown, changed or revoked.
    HostKey,
    /// A command on the hypervisor failed.
    Remote,
    /// The domain or its XML is not what virtkeep can handle.
    Domain,
    /// The repository refused or failed.
    Repository,
    /// Something exists already, or another job holds the lock.
    Conflict,
    /// The feature does not apply to this host or disk.
    Unsupported,
    /// The NBD data path failed.
    DataPath,
    /// Interrupted by a signal.
    Interrupted,
    /// A live restore could not finish its copy and left its domain on the host as it
    /// is (the guest ran: its writes are only there): exit code 4.
    Unfinished,
}

/// A failure with a message and, where one exists, a hint saying what to do.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub fn domain(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Domain, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Adds context in front of the message, keeping kind and hint.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Adds engine context to results from the library crates.
pub trait ResultExt<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }
}

impl From<virtkeep_ssh::SshError> for Error {
    fn from(e: virtkeep_ssh::SshError) -> Self {
        use virtkeep_ssh::SshError as S;
        let (kind, hint) = match &e {
            S::UnknownHostKey { .. } => (
                ErrorKind::HostKey,
                Some("check the fingerprint with the host's administrator (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the host), then pin it with `virtkeep host trust NAME`".to_string()),
            ),
            S::HostKeyChanged { .. } => (
                ErrorKind::HostKey,
                Some("the host presented a different key than the one pinned: this may be a reinstalled host or an attack. Verify the new key on the host's console before running `virtkeep host trust NAME --fingerprint SHA256:…` after removing the old line from the known_hosts file".to_string()),
            ),
            S::CommandFailed { .. } => (ErrorKind::Remote, None),
            S::Auth { .. } => (
                ErrorKind::Connection,
                Some("check the user, the key file or password variable in the host's settings (`virtkeep host list`), and that the key is in the host's authorized_keys".to_string()),
            ),
            _ => (
                ErrorKind::Connection,
                Some("check that the host is up and sshd reachable (`virtkeep host check NAME`)".to_string()),
            ),
        };
        let mut err = Error::new(kind, e.to_string()).with_source(e);
        err.hint = hint;
        err
    }
}

impl From<virtkeep_nbd::NbdError> for Error {
    fn from(e: virtkeep_nbd::NbdError) -> Self {
        Error::new(ErrorKind::DataPath, format!("NBD: {e}"))
            .hint("the export on the host went away or misbehaved; `virtkeep cleanup HOST` removes what the failed job left")
            .with_source(e)
    }
}

impl From<virtkeep_libvirt::XmlError> for Error {
    fn from(e: virtkeep_libvirt::XmlError) -> Self {
        Error::new(ErrorKind::Domain, format!("domain XML: {e}")).with_source(e)
    }
}

impl From<virtkeep_repo::RepoError> for Error {
    fn from(e: virtkeep_repo::RepoError) -> Self {
        if let virtkeep_repo::RepoError::Io { path, source } = &e
            && source.kind() == std::io::ErrorKind::StorageFull
        {
            return Error::new(
                ErrorKind::Repository,
                format!(
                    "the repository is full: no space left on device writing {}",
                    path.display()
                ),
            )
            .hint(REPO_FULL_HINT)
            .with_source(e);
        }
        Error::new(ErrorKind::Repository, e.to_string()).with_source(e)
    }
}

/// What to do about a full repository (the job published nothing and healed the VM).
const REPO_FULL_HINT: &str = "free space on the filesystem that holds the repository (or \
    move it to a larger one) and run the backup again; nothing of this backup was \
    published, and `virtkeep gc` removes the chunks it had already written once they are \
    older than its grace period";
