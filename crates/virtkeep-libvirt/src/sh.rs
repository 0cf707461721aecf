//! `sh -c`: the constant scripts virtkeep runs on a host (loops over its job
//! directories, probes) and the user's hooks.
//!
//! A script is a `&'static str` written here; input reaches it only as positional
//! parameters (`"$1"`, `"$2"`), each quoted by [`RemoteCommand::arg`].

use virtkeep_ssh::RemoteCommand;

/// `sh -c SCRIPT sh ARG…`: `script` is a literal, the arguments are `$1`, `$2`, ….
pub(crate) fn script<'a>(
    script: &'static str,
    args: impl IntoIterator<Item = &'a str>,
) -> RemoteCommand {
    RemoteCommand::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
}

/// `true`: a command that only has to start (e.g. to see whether `sudo -n` works).
pub fn noop() -> RemoteCommand {
    RemoteCommand::new("true")
}

/// `id -u`: the user id host commands run as (0 when root, directly or through sudo).
pub fn effective_uid() -> RemoteCommand {
    RemoteCommand::new("id").arg("-u")
}

/// `sh -c 'command -v "$1"' sh NAME`: prints where the program is; fails when the host
/// does not have it.
pub fn command_path(name: &str) -> RemoteCommand {
    script(r#"command -v "$1""#, [name])
}

/// A user hook: `K=V… sh -c COMMAND`. The command is the operator's own configuration
/// (trusted like the host's shell); what virtkeep adds goes in as environment variables.
pub fn hook(command: &str, env: &[(&str, &str)]) -> RemoteCommand {
    env.iter().fold(
        RemoteCommand::new("sh").arg("-c").arg(command),
        |c, (k, v)| c.env(k, v),
    )
}

/// Prints `DIR<TAB>MARKER` for every hold record (`held-*`) in the VM's job
/// directories `JOBS_DIR/UUID-*`.
pub fn list_holds(jobs_dir: &str, vm_uuid: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for f in "$1"/"$2"-*/held-*; do [ -e "$f" ] && printf '%s\t%s\n' "${f%/*}" "${f##*/}"; done; exit 0"#;
    script(SCRIPT, [jobs_dir, vm_uuid])
}

/// Succeeds when any job directory `JOBS_DIR/UUID-*` of the VM exists.
pub fn has_job_dirs(jobs_dir: &str, vm_uuid: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for d in "$1"/"$2"-*; do [ -e "$d" ] && exit 0; done; exit 1"#;
    script(SCRIPT, [jobs_dir, vm_uuid])
}

/// Succeeds when a job directory of the VM records that the job started it paused
/// (a `started-paused` file).
pub fn has_started_paused_job(jobs_dir: &str, vm_uuid: &str) -> RemoteCommand {
    const SCRIPT: &str =
        r#"for f in "$1"/"$2"-*/started-paused; do [ -e "$f" ] && exit 0; done; exit 1"#;
    script(SCRIPT, [jobs_dir, vm_uuid])
}

/// Prints `DIR<TAB>LOCK KEY` for every restore job directory `JOBS_DIR/restore-*`
/// (the key: the first 200 bytes of its `lock` file, tabs and newlines dropped).
pub fn list_restore_jobs(jobs_dir: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for d in "$1"/restore-*; do
  [ -d "$d" ] || continue
  printf '%s\t%s\n' "$d" "$(head -c 200 "$d/lock" 2>/dev/null | tr -d '\t\n')"
done"#;
    script(SCRIPT, [jobs_dir])
}

/// Prints every directory `JOBS_DIR/PREFIX*`, one a line.
pub fn list_job_dirs(jobs_dir: &str, prefix: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for d in "$1"/"$2"*; do
  [ -d "$d" ] && printf '%s\n' "$d"
done; true"#;
    script(SCRIPT, [jobs_dir, prefix])
}

/// Prints a fingerprint of the host's libvirt and QEMU installation (name, size, mtime
/// and inode of virsh, the libvirt library and QEMU driver, the daemons and the
/// emulators: an upgrade replaces them), or an empty line when none is found, then the
/// first 200 bytes of `cache_file`. Only `stat`: running `virsh --version` cost ~40 ms
/// of every backup.
pub fn installation_key_and_cache(cache_file: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"s=$(stat -L -c '%n %s %Y %i' /usr/bin/virsh /usr/lib/*/libvirt.so.0 /usr/lib64/libvirt.so.0 /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so /usr/lib64/libvirt/connection-driver/libvirt_driver_qemu.so /usr/sbin/libvirtd /usr/sbin/virtqemud /usr/bin/qemu-system-* /usr/libexec/qemu-kvm 2>/dev/null)
if [ -n "$s" ]; then printf '%s\n' "$s" | cksum; else echo; fi
head -c 200 "$1" 2>/dev/null"#;
    script(SCRIPT, [cache_file])
}

/// Prints `realpath -m PATH` (every symlink along the path resolved, existing or not),
/// then what PATH is: `symlink`, `file` (regular), `other` or `missing`. Exit 3 when
/// the path cannot be resolved. Read the answer with [`parse_resolve_and_classify`].
pub fn resolve_and_classify(path: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"r=$(realpath -m -- "$1") || exit 3
printf '%s\n' "$r"
if [ -L "$1" ]; then echo symlink; elif [ -f "$1" ]; then echo file; elif [ -e "$1" ]; then echo other; else echo missing; fi"#;
    script(SCRIPT, [path])
}

/// What [`resolve_and_classify`] found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// The path itself is a symbolic link.
    Symlink,
    /// A regular file.
    File,
    /// Something else (a directory, a device, …).
    Other,
    /// Nothing.
    Missing,
}

/// `(resolved path, kind)` from the output of [`resolve_and_classify`]; an answer it
/// cannot read is [`PathKind::Other`] (never a file, never missing).
pub fn parse_resolve_and_classify(out: &str) -> (&str, PathKind) {
    let mut lines = out.lines();
    let resolved = lines.next().unwrap_or("");
    let kind = match lines.next().unwrap_or("") {
        "symlink" => PathKind::Symlink,
        "file" => PathKind::File,
        "missing" => PathKind::Missing,
        _ => PathKind::Other,
    };
    (resolved, kind)
}
