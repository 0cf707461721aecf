use crate::proto::{errno_name, opt_name, rep_name};

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Transport failure (reading or writing the stream).
    #[error("NBD I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something the protocol does not allow.
    #[error("NBD protocol violation: expected {expected}, got {got}")]
    Protocol { expected: String, got: String },
    /// The server refused an option during the handshake.
    #[error("NBD server rejected {} with {}{}", opt_name(*option), rep_name(*reply), fmt_msg(message))]
    OptionRejected {
        /// NBD_OPT_* value.
        option: u32,
        /// NBD_REP_ERR_* value.
        reply: u32,
        /// The server's text (may be empty).
        message: String,
    },
    /// The server failed a request.
    #[error("NBD server error {} ({errno}){}{}", errno_name(*errno), fmt_msg(message), fmt_off(offset))]
    Server {
        /// NBD error value (EIO = 5, EINVAL = 22, ENOSPC = 28, ...).
        errno: u32,
        message: String,
        /// Offset the error applies to (NBD_REPLY_TYPE_ERROR_OFFSET).
        offset: Option<u64>,
    },
    /// Block status was asked for a metadata context the server did not grant.
    #[error("NBD metadata context {0:?} was not negotiated with the server")]
    MetaContextNotNegotiated(String),
    /// A write-type request on a read-only export.
    #[error("NBD export is read-only")]
    ReadOnly,
    /// The connection is closed (by `disconnect`, by the server, or after a fatal error).
    #[error("NBD connection closed: {reason}")]
    Disconnected { reason: String },
    /// A request or a server message exceeds a limit.
    #[error("NBD {what} too large: {len} bytes (limit {max})")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// A request outside the export or otherwise invalid (checked before sending).
    #[error("invalid NBD request: {0}")]
    InvalidArgument(String),
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

fn fmt_off(o: &Option<u64>) -> String {
    match o {
        Some(o) => format!(" at offset {o}"),
        None => String::new(),
    }
}

impl NbdError {
    pub(crate) fn protocol(expected: impl Into<String>, got: impl Into<String>) -> Self {
        NbdError::Protocol {
            expected: expected.into(),
            got: got.into(),
        }
    }
}
