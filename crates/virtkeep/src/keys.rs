//! Where a repository's key comes from: the sources the daemon shares
//! (`virtkeep_engine::repo_key`: key file, password file, password command, variable)
//! and, for the CLI only, a prompt on the terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use virtkeep_engine::Error as EngineError;

pub use virtkeep_engine::repo_key::KeyChoice;
use virtkeep_engine::repo_key::first_line;

/// Whether a password may be asked for: someone at a terminal (the prompt goes to the
/// terminal, so `--json` output stays clean).
pub fn can_prompt() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

pub fn prompt(text: &str) -> anyhow::Result<String> {
    let p = rpassword::prompt_password(text)
        .map_err(|e| EngineError::config(format!("cannot read the password: {e}")))?;
    Ok(first_line(p.as_bytes(), "the password")?)
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
