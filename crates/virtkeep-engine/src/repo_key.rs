//! Where a repository's key comes from, the same for the CLI and the daemon: a key
//! file, a password file, a password command or an environment variable (the CLI adds a
//! prompt on a terminal). The configuration names them per repository; the variables
//! `VIRTKEEP_PASSWORD_FILE` and `VIRTKEEP_PASSWORD_COMMAND` stand in for a repository
//! that names none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use virtkeep_repo::KeySource;

use crate::config::RepositoryConfig;
use crate::error::{Error, Result};

/// Variable naming a password file (as `--password-file`).
pub const PASSWORD_FILE_ENV: &str = "VIRTKEEP_PASSWORD_FILE";
/// Variable holding a password command (as `--password-command`).
pub const PASSWORD_COMMAND_ENV: &str = "VIRTKEEP_PASSWORD_COMMAND";

/// Longest password read from a file or command: a password, not a file's contents.
const MAX_PASSWORD: usize = 4096;
/// How long a password command may take (a password manager may ask on a terminal).
pub const PASSWORD_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The key options of one command line, one repository's configuration, or the
/// environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyChoice {
    pub key_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    pub passphrase_env: Option<String>,
}

impl KeyChoice {
    pub fn is_empty(&self) -> bool {
        *self == KeyChoice::default()
    }

    /// What a repository's configuration names.
    pub fn of_repository(rc: &RepositoryConfig) -> KeyChoice {
        KeyChoice {
            key_file: rc.key_file.clone(),
            password_file: rc.password_file.clone(),
            password_command: rc.password_command.clone(),
            passphrase_env: rc.passphrase_env.clone(),
        }
    }

    /// What `VIRTKEEP_PASSWORD_FILE` and `VIRTKEEP_PASSWORD_COMMAND` say.
    pub fn from_env() -> KeyChoice {
        let set = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        KeyChoice {
            password_file: set(PASSWORD_FILE_ENV).map(PathBuf::from),
            password_command: set(PASSWORD_COMMAND_ENV),
            ..KeyChoice::default()
        }
    }

    /// This choice, or `other` when this one names nothing.
    pub fn or(self, other: KeyChoice) -> KeyChoice {
        if self.is_empty() { other } else { self }
    }

    /// The key, first of: key file, password file, password command, variable.
    pub async fn resolve(&self) -> Result<Option<KeySource>> {
        if let Some(f) = &self.key_file {
            return Ok(Some(KeySource::KeyFile(f.clone())));
        }
        if let Some(f) = &self.password_file {
            return Ok(Some(KeySource::Passphrase(read_password_file(f)?)));
        }
        if let Some(cmd) = &self.password_command {
            return Ok(Some(KeySource::Passphrase(
                run_password_command(cmd).await?,
            )));
        }
        if let Some(var) = &self.passphrase_env {
            let p = std::env::var(var).map_err(|_| {
                Error::config(format!("the passphrase variable {var} is not set"))
                    .hint(format!("set {var} in virtkeep's environment"))
            })?;
            return Ok(Some(KeySource::Passphrase(p)));
        }
        Ok(None)
    }
}

/// The first line of `bytes`, without its line end (as restic reads a password file).
pub fn first_line(bytes: &[u8], what: &str) -> Result<String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::config(format!("{what}: the password is not UTF-8")))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(Error::config(format!("{what}: the password is empty")));
    }
    if line.len() > MAX_PASSWORD {
        return Err(Error::config(format!(
            "{what}: longer than {MAX_PASSWORD} bytes"
        )));
    }
    Ok(line.to_string())
}

fn read_password_file(path: &Path) -> Result<String> {
    let what = format!("password file {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| {
        Error::config(format!("cannot read {what}: {e}")).hint(
            "name a readable file (one line, mode 0600) with --password-file, \
             VIRTKEEP_PASSWORD_FILE or the repository's password_file",
        )
    })?;
    first_line(&bytes, &what)
}

/// Runs `sh -c CMD` and takes the first line of its output; stderr goes to virtkeep's
/// (a password manager may ask something there). Killed after
/// [`PASSWORD_COMMAND_TIMEOUT`] or when the caller gives up on it.
async fn run_password_command(cmd: &str) -> Result<String> {
    let what = format!("password command {cmd:?}");
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PASSWORD_COMMAND_TIMEOUT, child)
        .await
        .map_err(|_| {
            Error::config(format!(
                "{what} did not finish in {} s",
                PASSWORD_COMMAND_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| Error::config(format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        return Err(Error::config(format!("{what} failed ({})", out.status)));
    }
    first_line(&out.stdout, &what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_only_and_not_empty() {
        assert_eq!(first_line(b"pw\nrest\n", "t").expect("line"), "pw");
        assert_eq!(first_line(b"pw\r\n", "t").expect("line"), "pw");
        assert!(first_line(b"\nsecond", "t").is_err());
        assert!(first_line(&[0xff, 0xfe], "t").is_err());
    }

    #[tokio::test]
    async fn sources_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from file\n").expect("write");
        let by_file = KeyChoice {
            password_file: Some(file),
            password_command: Some("echo from command".into()),
            ..KeyChoice::default()
        };
        let got = by_file.resolve().await.expect("resolve");
        assert!(matches!(got, Some(KeySource::Passphrase(p)) if p == "from file"));
        let by_command = KeyChoice {
            password_command: Some("echo from command; echo second".into()),
            ..KeyChoice::default()
        };
        let got = by_command.resolve().await.expect("resolve");
        assert!(matches!(got, Some(KeySource::Passphrase(p)) if p == "from command"));
        let failing = KeyChoice {
            password_command: Some("exit 4".into()),
            ..KeyChoice::default()
        };
        assert!(failing.resolve().await.is_err());
        assert!(
            KeyChoice::default()
                .resolve()
                .await
                .expect("none")
                .is_none()
        );
    }
}
