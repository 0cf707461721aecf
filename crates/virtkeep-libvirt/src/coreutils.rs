//! Files, processes and locks on a host: coreutils, util-linux (`flock`, `blockdev`)
//! and procps (`pgrep`) builders, and the parsers of their output.
//!
//! Paths follow `--` wherever the tool knows it; tools without it get [`safe_path`].
//! `test` needs neither: it reads its operands by their count, never as options.

use virtkeep_ssh::RemoteCommand;

use crate::error::ParseError;
use crate::support::{safe_path, truncate, unexpected};

// ───────────────────────────── files ─────────────────────────────

/// `rm -f -- PATH`.
pub fn rm_f(path: &str) -> RemoteCommand {
    RemoteCommand::new("rm").args(["-f", "--", path])
}

/// `rm -rf -- PATH` (a job directory and everything in it).
pub fn rm_rf(path: &str) -> RemoteCommand {
    RemoteCommand::new("rm").args(["-rf", "--", path])
}

/// `mkdir -p -- PATH`.
pub fn mkdir_p(path: &str) -> RemoteCommand {
    RemoteCommand::new("mkdir").args(["-p", "--", path])
}

/// `mkdir -p -m MODE -- PATH` (`mode` in octal, e.g. `0o700`; parents get the
/// default mode).
pub fn mkdir_p_mode(path: &str, mode: u32) -> RemoteCommand {
    RemoteCommand::new("mkdir")
        .args(["-p", "-m"])
        .arg(format!("{mode:04o}"))
        .args(["--", path])
}

/// `chown -- USER:GROUP PATH`.
pub fn chown(owner: &str, path: &str) -> RemoteCommand {
    RemoteCommand::new("chown").args(["--", owner, path])
}

/// `chmod MODE -- PATH` (`mode` in octal, e.g. `0o600`).
pub fn chmod(mode: u32, path: &str) -> RemoteCommand {
    RemoteCommand::new("chmod")
        .arg(format!("{mode:04o}"))
        .args(["--", path])
}

/// `chown --reference=REF -- PATH`: the owner of `reference`.
pub fn chown_like(reference: &str, path: &str) -> RemoteCommand {
    RemoteCommand::new("chown")
        .arg(format!("--reference={reference}"))
        .args(["--", path])
}

/// `chmod --reference=REF -- PATH`: the mode of `reference`.
pub fn chmod_like(reference: &str, path: &str) -> RemoteCommand {
    RemoteCommand::new("chmod")
        .arg(format!("--reference={reference}"))
        .args(["--", path])
}

/// `cp -- FROM TO`.
pub fn cp(from: &str, to: &str) -> RemoteCommand {
    RemoteCommand::new("cp").args(["--", from, to])
}

/// `mv -f -T -- FROM TO`: rename(2), so `to` is the old file or the new one, never
/// neither (`-T`: never into a directory named `to`).
pub fn mv_replace(from: &str, to: &str) -> RemoteCommand {
    RemoteCommand::new("mv").args(["-f", "-T", "--", from, to])
}

/// `cat -- PATH`.
pub fn cat(path: &str) -> RemoteCommand {
    RemoteCommand::new("cat").args(["--", path])
}

/// `head -c N -- PATH`: at most `n` bytes of a file (a bounded read of a file whose
/// size the host could change).
pub fn head_bytes(path: &str, n: u64) -> RemoteCommand {
    RemoteCommand::new("head").args(["-c", &n.to_string(), "--", path])
}

/// `cat > PATH`: writes the command's stdin to `path` (content never goes on the
/// command line).
pub fn write_stdin_to(path: &str) -> RemoteCommand {
    RemoteCommand::new("cat").stdout_to(path)
}

/// `test -e PATH`: succeeds when something exists there.
pub fn exists(path: &str) -> RemoteCommand {
    RemoteCommand::new("test").args(["-e", path])
}

/// `test -f PATH`: succeeds when a regular file (or a link to one) is there.
pub fn is_file(path: &str) -> RemoteCommand {
    RemoteCommand::new("test").args(["-f", path])
}

/// `test -x PATH`: succeeds when an executable (or a link to one) is there.
pub fn is_executable(path: &str) -> RemoteCommand {
    RemoteCommand::new("test").args(["-x", path])
}

/// `realpath -m -z -- PATH…`: each path with every symlink resolved (existing or
/// not), NUL-terminated, in order.
pub fn realpath_all<'a>(paths: impl IntoIterator<Item = &'a str>) -> RemoteCommand {
    RemoteCommand::new("realpath")
        .args(["-m", "-z", "--"])
        .args(paths)
}

/// `find DIR -maxdepth 1 -type f -print0`: the regular files directly in `dir`.
pub fn list_files(dir: &str) -> RemoteCommand {
    RemoteCommand::new("find")
        .arg(safe_path(dir))
        .args(["-maxdepth", "1", "-type", "f", "-print0"])
}

/// Format string of [`stat`]: size, owner, group, octal mode, type (tab-separated).
pub const STAT_FORMAT: &str = "%s\t%U\t%G\t%a\t%F";

/// `stat -L -c '%s\t%U\t%G\t%a\t%F' -- PATH` (see [`parse_stat`]).
pub fn stat(path: &str) -> RemoteCommand {
    RemoteCommand::new("stat").args(["-L", "-c", STAT_FORMAT, "--", path])
}

/// Format string of [`stat_identity`]: device, inode, size, modification time.
pub const IDENTITY_FORMAT: &str = "%d:%i:%s:%Y";

/// `stat -c '%d:%i:%s:%Y' -- PATH`, not following a symlink at PATH: which file this
/// is (device and inode) and whether it changed (size, mtime), as one token.
pub fn stat_identity(path: &str) -> RemoteCommand {
    RemoteCommand::new("stat").args(["-c", IDENTITY_FORMAT, "--", path])
}

/// `blockdev --getsize64 DEV`: a block device's size in bytes.
pub fn blockdev_size(dev: &str) -> RemoteCommand {
    RemoteCommand::new("blockdev")
        .arg("--getsize64")
        .arg(safe_path(dev))
}

/// `df -B1 --output=avail -- PATH`: free bytes for unprivileged users on the file
/// system holding PATH (see [`parse_df_avail`]).
pub fn df_avail(path: &str) -> RemoteCommand {
    RemoteCommand::new("df").args(["-B1", "--output=avail", "--", path])
}

/// `dd if=PATH bs=N iflag=fullblock status=none`: a file or device on stdout, in
/// blocks of `block_size` bytes.
pub fn dd_read(path: &str, block_size: u64) -> RemoteCommand {
    RemoteCommand::new("dd")
        .arg(format!("if={path}"))
        .arg(format!("bs={block_size}"))
        .args(["iflag=fullblock", "status=none"])
}

// ───────────────────────────── users ─────────────────────────────

/// `id -u -- USER`: succeeds when the user exists.
pub fn user_exists(user: &str) -> RemoteCommand {
    RemoteCommand::new("id").args(["-u", "--", user])
}

/// `id -gn -- USER`: the name of the user's primary group.
pub fn primary_group(user: &str) -> RemoteCommand {
    RemoteCommand::new("id").args(["-gn", "--", user])
}

// ───────────────────────────── processes ─────────────────────────────

/// `pgrep -a -x -- NAME`: `PID ARGS…` of every process named exactly `name` (see
/// [`parse_pgrep`]).
pub fn pgrep_exact(name: &str) -> RemoteCommand {
    RemoteCommand::new("pgrep").args(["-a", "-x", "--", name])
}

/// A signal for [`kill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
}

/// `kill -TERM|-KILL PID`.
pub fn kill(signal: Signal, pid: u32) -> RemoteCommand {
    let s = match signal {
        Signal::Term => "-TERM",
        Signal::Kill => "-KILL",
    };
    RemoteCommand::new("kill").arg(s).arg(pid.to_string())
}

/// `grep -q . /proc/PID/cmdline`: succeeds while the process runs (a zombie, exited
/// but not yet reaped, has an empty command line).
pub fn process_alive(pid: u32) -> RemoteCommand {
    RemoteCommand::new("grep")
        .args(["-q", "."])
        .arg(format!("/proc/{pid}/cmdline"))
}

// ───────────────────────────── locks ─────────────────────────────

/// Exit status of [`flock_hold`] when the lock is held by someone else.
pub const FLOCK_CONFLICT_STATUS: u32 = 75;

/// Hold an exclusive lock on `lock_path` for as long as the command's stdin stays
/// open: `flock -E 75 (-n | -w SECS) LOCK sh -c 'echo locked && exec cat >/dev/null'`
/// prints `locked` once the lock is taken, then waits for end of input. Close stdin
/// (or lose the connection) to release it. Exit status 75: busy. `wait_secs = None`
/// fails at once.
pub fn flock_hold(lock_path: &str, wait_secs: Option<u32>) -> RemoteCommand {
    let c = RemoteCommand::new("flock")
        .arg("-E")
        .arg(FLOCK_CONFLICT_STATUS.to_string());
    let c = match wait_secs {
        Some(s) => c.arg("-w").arg(s.to_string()),
        None => c.arg("-n"),
    };
    c.arg(safe_path(lock_path))
        .args(["sh", "-c", "echo locked && exec cat >/dev/null"])
}

// ───────────────────────────── output ─────────────────────────────

/// Parse `df -B1 --output=avail PATH`: the free byte count.
pub fn parse_df_avail(stdout: &str) -> Result<u64, ParseError> {
    let what = "df";
    let line = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .nth(1)
        .ok_or_else(|| unexpected(what, format!("no value in {:?}", truncate(stdout))))?;
    line.parse::<u64>()
        .map_err(|_| unexpected(what, format!("not a byte count: {line:?}")))
}

/// `stat` output in [`STAT_FORMAT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatInfo {
    /// Size in bytes (0 for block devices: use `blockdev --getsize64`).
    pub size: u64,
    /// Owner name.
    pub user: String,
    /// Group name.
    pub group: String,
    /// Permission bits.
    pub mode: u32,
    /// `regular file`, `block special file`, `directory`, …
    pub file_type: String,
}

/// Parse the output of [`stat`].
pub fn parse_stat(stdout: &str) -> Result<StatInfo, ParseError> {
    let what = "stat";
    let line = stdout.lines().next().unwrap_or("");
    let f: Vec<&str> = line.split('\t').collect();
    let [size, user, group, mode, file_type] = f.as_slice() else {
        return Err(unexpected(what, format!("expected 5 fields in {line:?}")));
    };
    Ok(StatInfo {
        size: size
            .parse()
            .map_err(|_| unexpected(what, format!("bad size {size:?}")))?,
        user: (*user).to_owned(),
        group: (*group).to_owned(),
        mode: u32::from_str_radix(mode, 8)
            .map_err(|_| unexpected(what, format!("bad mode {mode:?}")))?,
        file_type: (*file_type).to_owned(),
    })
}

/// `pgrep -a` lines: `(pid, command line)`; lines without a pid are skipped.
pub fn parse_pgrep(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|l| {
            let (pid, args) = l.trim().split_once(' ')?;
            Some((pid.parse().ok()?, args.to_string()))
        })
        .collect()
}

/// A command line `args` names `path` as a whole (not as the prefix of a longer path).
pub fn mentions_path(args: &str, path: &str) -> bool {
    args.match_indices(path).any(|(i, _)| {
        let after = args[i + path.len()..].chars().next();
        let before = args[..i].chars().next_back();
        matches!(after, None | Some(' ' | ',' | '\t' | '\'' | '"'))
            && matches!(before, None | Some(' ' | '=' | ',' | '\t' | '\'' | '"'))
    })
}
