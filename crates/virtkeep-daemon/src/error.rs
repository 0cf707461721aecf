//! The daemon's errors. Each says what failed in the user's terms; the binary adds the
//! exit code (2 for configuration errors) and prints the hint.

use std::path::PathBuf;

/// A mistake in the configuration file, pointing at the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}{}", file.display(), if expected.is_empty() { String::new() } else { format!("; expected {expected}") })]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line of the offending value.
    pub line: usize,
    /// 1-based column (in characters) of the offending value.
    pub column: usize,
    pub message: String,
    /// What would have been accepted there (empty when the message says it).
    pub expected: String,
}

impl ConfigError {
    /// Locates byte offset `at` of `text` (the file's content) as line and column.
    pub fn at(
        file: &std::path::Path,
        text: &str,
        at: usize,
        message: impl Into<String>,
        expected: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_column(text, at);
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
            expected: expected.into(),
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("catalog {}: {what}: {source}", path.display())]
    Catalog {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {catalog}: {what}: {source}")]
    CatalogDb {
        catalog: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("catalog {} has schema version {found}; this virtkeep knows up to {known}", path.display())]
    CatalogVersion {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("another virtkeep daemon uses the catalog {} (lock {} is held)", path.display(), lock.display())]
    CatalogBusy { path: PathBuf, lock: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API token variable {var} is not set or empty")]
    TokenEnv { var: String },
    #[error("one API token is listed with two scopes ({first} and {second})")]
    TokenConflict { first: String, second: String },
    #[error("TLS certificate {} / key {}: {message}", certificate.display(), key.display())]
    Tls {
        certificate: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no job {0} in the catalog")]
    NoSuchJob(i64),
    #[error(transparent)]
    Engine(#[from] virtkeep_engine::Error),
}

impl DaemonError {
    /// What the user can do about it, where there is something.
    pub fn hint(&self) -> Option<String> {
        match self {
            DaemonError::Config(_) => Some("fix the configuration file; docs/daemon.md describes every setting".into()),
            DaemonError::CatalogBusy { .. } => Some("stop the other daemon (systemctl stop virtkeep), or give this one another [daemon] catalog".into()),
            DaemonError::CatalogVersion { .. } => Some("run the virtkeep version that wrote this catalog, or move the file away to start a new history".into()),
            DaemonError::TokenEnv { var } => Some(format!("export {var}=<a long random string> for the daemon (systemd: EnvironmentFile=)")),
            DaemonError::TokenConflict { .. } => Some("give every token one scope: remove it from the token source with the scope it should not have".into()),
            DaemonError::Tls { .. } => Some("[daemon.api] tls_certificate and tls_key name PEM files: the certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1), readable by the daemon".into()),
            DaemonError::Listen { .. } => Some("another process holds the port: change [daemon.api] listen".into()),
            DaemonError::Engine(e) => e.hint.clone(),
            _ => None,
        }
    }

    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DaemonError::Config(_)
                | DaemonError::TokenEnv { .. }
                | DaemonError::TokenConflict { .. }
                | DaemonError::Tls { .. }
        ) || matches!(self, DaemonError::Engine(e) if e.kind == virtkeep_engine::ErrorKind::Config)
    }

    pub(crate) fn catalog(
        path: &std::path::Path,
        what: &'static str,
    ) -> impl FnOnce(rusqlite::Error) -> DaemonError {
        let path = path.to_path_buf();
        move |source| DaemonError::Catalog { path, what, source }
    }
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let t = "a = 1\nbb = \"x\"\n";
        assert_eq!(line_column(t, 0), (1, 1));
        assert_eq!(line_column(t, 6), (2, 1));
        assert_eq!(line_column(t, 11), (2, 6));
        assert_eq!(line_column(t, 999), (3, 1));
    }
}
