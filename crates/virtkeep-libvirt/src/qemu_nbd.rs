//! `qemu-nbd`: exporting an image on a private socket (read-only for backup, writable
//! for restore) and stopping those exports again.
//!
//! Values inside the `--image-opts` string have `,` doubled, QEMU's escape.

use virtkeep_ssh::RemoteCommand;

use crate::support::escape_commas;

/// A QEMU `--image-opts` string for a local image: `driver=FMT[,force-share=on],
/// file.driver=file|host_device,file.filename=PATH` with `,` in values doubled.
/// `block_device` selects `host_device` (LVs, raw devices), which QEMU requires for
/// block devices.
pub fn image_opts(format: &str, path: &str, block_device: bool, force_share: bool) -> String {
    let mut s = format!("driver={}", escape_commas(format));
    if force_share {
        s.push_str(",force-share=on");
    }
    s.push_str(if block_device {
        ",file.driver=host_device"
    } else {
        ",file.driver=file"
    });
    s.push_str(",file.filename=");
    s.push_str(&escape_commas(path));
    s
}

/// Read-only NBD export on a unix socket that daemonises once the socket is ready:
/// `qemu-nbd -r --fork --persistent --shared=8 --socket=S --pid-file=P --image-opts OPTS`
/// (build `OPTS` with [`image_opts`]; qemu-nbd 7.2 has no `-U`, force-share goes
/// into the options). Stop it by killing the pid in `pid_file`.
pub fn export_readonly(image_opts: &str, socket: &str, pid_file: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-nbd")
        .args(["-r", "--fork", "--persistent", "--shared=8"])
        .arg(format!("--socket={socket}"))
        .arg(format!("--pid-file={pid_file}"))
        .arg("--image-opts")
        .arg(image_opts)
}

/// Writable NBD export for restore: `qemu-nbd --fork --persistent --shared=8
/// --discard=unmap [--cache=none] --socket=S --pid-file=P --image-opts
/// driver=FMT,file.driver=file|host_device,file.filename=PATH`. Zero writes the
/// client sends with "may trim" become holes (`--discard=unmap`). `direct` bypasses
/// the host's page cache (O_DIRECT): through the page cache qemu-nbd used 7.9 CPU s to
/// restore the 1794 MiB benchmark disk, without it 2.0 s; file
/// systems without O_DIRECT (tmpfs) refuse it, so callers fall back.
pub fn export_writable(
    path: &str,
    format: &str,
    block_device: bool,
    direct: bool,
    socket: &str,
    pid_file: &str,
) -> RemoteCommand {
    let c = RemoteCommand::new("qemu-nbd").args([
        "--fork",
        "--persistent",
        "--shared=8",
        "--discard=unmap",
    ]);
    let c = if direct { c.arg("--cache=none") } else { c };
    c.arg(format!("--socket={socket}"))
        .arg(format!("--pid-file={pid_file}"))
        .arg("--image-opts")
        .arg(image_opts(format, path, block_device, false))
}

/// Read-only NBD export on plain TCP (`--transport netcat`: unencrypted, for trusted
/// networks): `qemu-nbd -r --fork --persistent --shared=8 --bind=ADDR --port=PORT
/// --pid-file=P --image-opts OPTS`.
pub fn export_readonly_tcp(
    image_opts: &str,
    bind: &str,
    port: u16,
    pid_file: &str,
) -> RemoteCommand {
    RemoteCommand::new("qemu-nbd")
        .args(["-r", "--fork", "--persistent", "--shared=8"])
        .arg(format!("--bind={bind}"))
        .arg(format!("--port={port}"))
        .arg(format!("--pid-file={pid_file}"))
        .arg("--image-opts")
        .arg(image_opts)
}

/// Stops the qemu-nbd whose pid is in `pid_file` and waits (up to 5 s) until it is
/// gone, so the image is no longer open. A zombie counts as gone: it has closed the
/// image, and its reaper (init, as `qemu-nbd --fork` detaches) may take seconds. A
/// stopped one (the stall a job gave up on) is continued so that it sees the TERM, and
/// one still there after 5 s is killed: a job never leaves an export behind.
pub fn stop(pid_file: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"pid=$(cat "$1") || exit 1
case $pid in ''|*[!0-9]*) echo "qemu-nbd pid file $1 holds no pid" >&2; exit 1;; esac
kill "$pid" 2>/dev/null
kill -CONT "$pid" 2>/dev/null
i=0
while [ $i -lt 100 ]; do
  st=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' /proc/"$pid"/status 2>/dev/null) || break
  case $st in ''|Z) exit 0;; esac
  sleep 0.05
  i=$((i + 1))
done
case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in *qemu-nbd*) kill -KILL "$pid";; esac
exit 0"#;
    crate::sh::script(SCRIPT, [pid_file])
}

/// Kills every qemu-nbd named by a `*.pid` file in `job_dir` (a killed restore's
/// exports); pid files of other programs are left alone.
pub fn kill_exports_in(job_dir: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for p in "$1"/*.pid; do
  [ -f "$p" ] || continue
  pid=$(cat "$p")
  case "$pid" in ''|*[!0-9]*) continue;; esac
  case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in *qemu-nbd*) kill "$pid";; esac
done
sleep 0.2"#;
    crate::sh::script(SCRIPT, [job_dir])
}

/// For healing a VM: in every job directory `JOBS_DIR/UUID-*` of the VM, kills the
/// qemu-nbd named by each `*.pid` file, then removes the directory.
pub fn kill_job_exports(jobs_dir: &str, vm_uuid: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"for d in "$1"/"$2"-*; do
  [ -d "$d" ] || continue
  for p in "$d"/*.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    case "$pid" in ''|*[!0-9]*) continue;; esac
    case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in *qemu-nbd*) kill "$pid";; esac
  done
  rm -rf "$d"
done"#;
    crate::sh::script(SCRIPT, [jobs_dir, vm_uuid])
}
