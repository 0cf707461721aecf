//! Where a repository's key comes from: a key file, a password file, a password
//! command, an environment variable or a prompt on the terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use virtkeep_engine::Error as EngineError;
use virtkeep_repo::KeySource;

/// The key options of one command line (or of the configuration file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyChoice {
    pub key_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    pub passphrase_env: Option<String>,
}

/// Longest password read from a file or command: a password, not a file's contents.
const MAX_PASSWORD: usize = 4096;

impl KeyChoice {
    pub fn is_empty(&self) -> bool {
        *self == KeyChoice::default()
    }

    /// The key, first of: key file, password file, password command, variable.
    pub async fn resolve(&self) -> anyhow::Result<Option<KeySource>> {
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
                EngineError::config(format!("the passphrase variable {var} is not set"))
                    .hint(format!("export {var}=… before running virtkeep"))
            })?;
            return Ok(Some(KeySource::Passphrase(p)));
        }
        Ok(None)
    }
}

/// The first line of the file, without its line end (as restic reads it).
fn first_line(bytes: &[u8], what: &str) -> anyhow::Result<String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| EngineError::config(format!("{what}: the password is not UTF-8")))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(EngineError::config(format!("{what}: the password is empty")).into());
    }
    if line.len() > MAX_PASSWORD {
        return Err(
            EngineError::config(format!("{what}: longer than {MAX_PASSWORD} bytes")).into(),
        );
    }
    Ok(line.to_string())
}

fn read_password_file(path: &Path) -> anyhow::Result<String> {
    let what = format!("password file {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| {
        EngineError::config(format!("cannot read {what}: {e}")).hint(
            "give the file with --password-file or VIRTKEEP_PASSWORD_FILE (one line, mode 0600)",
        )
    })?;
    first_line(&bytes, &what)
}

/// Runs `sh -c CMD` and takes the first line of its output; stderr goes to the user
/// (a password manager may ask something there). Killed when virtkeep is interrupted.
async fn run_password_command(cmd: &str) -> anyhow::Result<String> {
    let what = format!("password command {cmd:?}");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| EngineError::config(format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        return Err(EngineError::config(format!("{what} failed ({})", out.status)).into());
    }
    first_line(&out.stdout, &what)
}

/// Whether a password may be asked for: someone at a terminal (the prompt goes to the
/// terminal, so `--json` output stays clean).
pub fn can_prompt() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

pub fn prompt(text: &str) -> anyhow::Result<String> {
    let p = rpassword::prompt_password(text)
        .map_err(|e| EngineError::config(format!("cannot read the password: {e}")))?;
    first_line(p.as_bytes(), "the password")
}

/// A new password, typed twice.
pub fn prompt_new(text: &str) -> anyhow::Result<String> {
    let first = prompt(text)?;
    let again = prompt("again: ")?;
    if first != again {
        return Err(EngineError::config("the passwords differ").into());
    }
    Ok(first)
}

/// An absolute path for the configuration: a relative one would name another file when
/// virtkeep runs elsewhere.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A repository location for the configuration: directories absolute, URLs as given.
pub fn absolute_location(location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else {
        absolute(Path::new(location)).to_string_lossy().into_owned()
    }
}

/// A key file about to be created needs its directory; say so instead of a bare ENOENT.
pub fn check_key_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir
        && !dir.is_dir()
    {
        return Err(EngineError::config(format!(
            "the directory {} for the key file {} does not exist",
            dir.display(),
            path.display()
        ))
        .hint(format!(
            "create it first (`mkdir -p -m 700 {}`) or give another --key-file",
            dir.display()
        ))
        .into());
    }
    Ok(())
}
