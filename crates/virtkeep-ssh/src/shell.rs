//! A long-lived command shell on the host that runs short commands one after another
//! on a single SSH channel.
//!
//! Why: sshd starts every exec request through the login shell, which reads the
//! user's rc files (Debian's bash sources `~/.bashrc` for ssh commands). On real
//! hypervisors those files load pyenv, conda, motd helpers…: 0.2 s per command was
//! measured here, and one backup runs a few dozen short commands. The shell pays that
//! start-up once per connection.
//!
//! Protocol (node → host), version 2: a decimal line count and a newline, then that
//! many newline-terminated lines of command line. The host reads each line whole (a
//! frame cut by a dropped connection ends without its newline and must never run as
//! a shorter command), runs the command with `sh -c` as sshd would (stdin
//! `/dev/null`, stdout and stderr into files, so a daemon the command forks cannot
//! hold the frame open), then answers `STATUS STDOUT_LEN STDERR_LEN\n` followed by
//! both outputs. A count prefixed with `x` replaces the shell with the command
//! instead (`exec`), on the channel's own stdin, stdout and stderr: that is how a
//! streaming process ([`crate::Session::spawn`]) starts without a login shell of its
//! own. The shell greets with [`GREETING`] first; a host where that does not arrive
//! gets one channel per command, as before. Version 1 sent a byte count read with
//! `head -c`: one more program per command.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::error::SshError;
use crate::process::{Output, RemoteProcess, RemoteStdin, RemoteStdout};

/// First line the shell prints once it is ready: the protocol version.
pub(crate) const GREETING: &str = "virtkeep-shell 2";

/// The host side. Output files are numbered, so a background process still writing
/// to one cannot corrupt the next command's output; old ones are removed every 64
/// commands. The frame is read with the `read` builtin (byte by byte, so bytes after
/// a frame stay in the pipe for an exec'd command), and a command costs two programs
/// besides its own (`sh -c` and `stat`; `head` only for non-empty output): on a slow
/// host every fork and exec counts (version 1 ran nine per command, 0.76 s of a TCG
/// host's time each).
pub(crate) const SCRIPT: &str = r#"command -v stat >/dev/null && command -v head >/dev/null || exit 97
d=$(mktemp -d "${TMPDIR:-/tmp}/virtkeep-sh.XXXXXX") || exit 97
trap 'rm -rf "$d"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
i=0
echo 'virtkeep-shell 2'
while IFS= read -r n; do
  x=
  case $n in x*) x=1; n=${n#x};; esac
  case $n in ''|*[!0-9]*) exit 98;; esac
  c=
  while [ "$n" -gt 0 ]; do
    IFS= read -r l || exit 99
    c="$c$l
"
    n=$((n - 1))
  done
  if [ -n "$x" ]; then
    rm -rf "$d"
    trap - EXIT HUP TERM
    exec sh -c "$c"
  fi
  i=$((i + 1))
  [ $((i % 64)) -ne 0 ] || rm -f "$d"/o* "$d"/e*
  sh -c "$c" </dev/null >"$d/o$i" 2>"$d/e$i"
  rc=$?
  set -- $(stat -c %s -- "$d/o$i" "$d/e$i") || exit 99
  [ $# -eq 2 ] || exit 99
  printf '%s %s %s\n' "$rc" "$1" "$2"
  [ "$1" = 0 ] || head -c "$1" -- "$d/o$i"
  [ "$2" = 0 ] || head -c "$2" -- "$d/e$i"
done
"#;

/// Longest header line accepted; anything longer means the stream is out of step.
const MAX_HEADER: usize = 64;

/// A running command shell (one SSH channel).
pub(crate) struct CommandShell {
    stdin: RemoteStdin,
    stdout: BufReader<RemoteStdout>,
    done: tokio::sync::oneshot::Receiver<Result<(u32, Vec<u8>), SshError>>,
}

/// Why a command could not be run through the shell.
#[derive(Debug)]
pub(crate) enum ShellError {
    /// The shell never greeted: the host lacks something the script needs.
    NotAvailable(String),
    /// The channel failed mid-command (the command may or may not have run).
    Broken(String),
}

impl CommandShell {
    /// Takes over a freshly spawned shell process and waits for its greeting.
    pub(crate) async fn start(proc: RemoteProcess) -> Result<CommandShell, ShellError> {
        let RemoteProcess {
            stdin,
            stdout,
            done,
            ..
        } = proc;
        let mut shell = CommandShell {
            stdin,
            stdout: BufReader::new(stdout),
            done,
        };
        let line = shell.read_line().await.map_err(ShellError::NotAvailable)?;
        if line != GREETING {
            return Err(ShellError::NotAvailable(format!(
                "unexpected greeting {line:?}"
            )));
        }
        Ok(shell)
    }

    /// Runs one command line and returns how it ended.
    pub(crate) async fn run(&mut self, line: &str) -> Result<Output, ShellError> {
        self.send(line, "").await?;
        let header = self.read_line().await.map_err(ShellError::Broken)?;
        let (status, out_len, err_len) = parse_header(&header)
            .ok_or_else(|| ShellError::Broken(format!("malformed reply header {header:?}")))?;
        let stdout = self.read_exact(out_len).await?;
        let stderr = self.read_exact(err_len).await?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Replaces the shell with `line`, which then owns the channel's streams.
    pub(crate) async fn exec_into(mut self, line: &str) -> Result<RemoteProcess, ShellError> {
        self.send(line, "x").await?;
        // The shell answered every earlier command in full, so nothing is buffered
        // that could belong to the new process.
        debug_assert!(self.stdout.buffer().is_empty());
        Ok(RemoteProcess {
            stdin: self.stdin,
            stdout: self.stdout.into_inner(),
            command: line.to_owned(),
            done: self.done,
        })
    }

    /// Ends the shell (EOF on its stdin).
    pub(crate) async fn close(mut self) {
        let _ = self.stdin.shutdown().await;
    }

    async fn send(&mut self, line: &str, prefix: &str) -> Result<(), ShellError> {
        let frame = frame(line, prefix).ok_or_else(|| {
            ShellError::Broken("a command line with a NUL byte cannot be sent".to_owned())
        })?;
        self.stdin
            .write_all(&frame)
            .await
            .map_err(|e| ShellError::Broken(format!("sending the command: {e}")))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| ShellError::Broken(format!("sending the command: {e}")))
    }

    async fn read_line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        let mut limited = (&mut self.stdout).take(MAX_HEADER as u64);
        limited
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| format!("reading from the shell: {e}"))?;
        if buf.last() != Some(&b'\n') {
            return Err(if buf.is_empty() {
                "the shell ended".to_owned()
            } else {
                format!("unterminated line {:?}", String::from_utf8_lossy(&buf))
            });
        }
        buf.pop();
        String::from_utf8(buf).map_err(|_| "reply line is not UTF-8".to_owned())
    }

    async fn read_exact(&mut self, len: u64) -> Result<Vec<u8>, ShellError> {
        let len = usize::try_from(len)
            .map_err(|_| ShellError::Broken(format!("reply of {len} bytes")))?;
        let mut buf = vec![0u8; len];
        self.stdout
            .read_exact(&mut buf)
            .await
            .map_err(|e| ShellError::Broken(format!("reading the command's output: {e}")))?;
        Ok(buf)
    }
}

/// `PREFIX COUNT\n` and the line's COUNT lines, each ending in a newline; `None` for
/// a line with NUL (the shell's `read` cannot carry it, and no shell word holds one).
fn frame(line: &str, prefix: &str) -> Option<Vec<u8>> {
    if line.contains('\0') {
        return None;
    }
    let lines = line.split('\n').count();
    Some(format!("{prefix}{lines}\n{line}\n").into_bytes())
}

/// `STATUS STDOUT_LEN STDERR_LEN` (wc may pad with blanks on some systems).
fn parse_header(line: &str) -> Option<(u32, u64, u64)> {
    let mut it = line.split_whitespace();
    let status = it.next()?.parse().ok()?;
    let out = it.next()?.parse().ok()?;
    let err = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((status, out, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(parse_header("0 12 0"), Some((0, 12, 0)));
        assert_eq!(parse_header("127   0     44"), Some((127, 0, 44)));
        assert_eq!(parse_header("0 12"), None);
        assert_eq!(parse_header("0 12 1 4"), None);
        assert_eq!(parse_header("x 1 2"), None);
        assert_eq!(parse_header("-1 1 2"), None);
    }

    #[test]
    fn script_greets_with_the_protocol_version() {
        assert!(SCRIPT.contains(&format!("echo '{GREETING}'")));
    }

    /// The script run by the local /bin/sh, past its greeting.
    fn local_shell() -> (
        std::process::Child,
        std::process::ChildStdin,
        std::io::BufReader<std::process::ChildStdout>,
    ) {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh runs");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut greet = String::new();
        stdout.read_line(&mut greet).expect("greeting");
        assert_eq!(greet.trim_end(), GREETING);
        (child, stdin, stdout)
    }

    /// The script itself, run by the local /bin/sh: framing, status, stderr, a
    /// command that forks a daemon holding its stdout, binary output.
    #[test]
    fn script_round_trip_with_local_sh() {
        use std::io::{BufRead, Read, Write};
        let (mut child, mut stdin, mut stdout) = local_shell();
        let mut run = |line: &str| -> (u32, Vec<u8>, Vec<u8>) {
            stdin
                .write_all(&frame(line, "").expect("frame"))
                .expect("write");
            stdin.flush().expect("flush");
            let mut header = String::new();
            stdout.read_line(&mut header).expect("header");
            let (st, o, e) = parse_header(header.trim_end()).expect("header parses");
            let mut out = vec![0; o as usize];
            stdout.read_exact(&mut out).expect("stdout");
            let mut err = vec![0; e as usize];
            stdout.read_exact(&mut err).expect("stderr");
            (st, out, err)
        };
        assert_eq!(run("echo hi"), (0, b"hi\n".to_vec(), Vec::new()));
        assert_eq!(
            run("printf 'a\\0b'; echo oops >&2; exit 3"),
            (3, b"a\0b".to_vec(), b"oops\n".to_vec())
        );
        let multi = "for x in 1 2; do\n  printf '%s' \"$x\"\ndone";
        assert_eq!(run(multi).1, b"12".to_vec());
        // Lines keep their backslashes, leading blanks and empty lines.
        let raw = "printf '%s' 'a\\\n  b\n\nc'";
        assert_eq!(run(raw).1, b"a\\\n  b\n\nc".to_vec());
        // Past the 64th command the old output files go; every answer stays whole.
        for k in 0..70 {
            assert_eq!(run(&format!("echo {k}")).1, format!("{k}\n").into_bytes());
        }
        // A daemon that keeps its stdout: the frame still ends, the next one is clean.
        let (st, out, _) = run("(sleep 1; echo late) & echo now");
        assert_eq!((st, out), (0, b"now\n".to_vec()));
        assert_eq!(run("cat; echo done").1, b"done\n".to_vec());
        // `x`: the shell becomes the command, on the channel's stdin and stdout.
        let line = "tr a-z A-Z; exit 5";
        stdin
            .write_all(&frame(line, "x").expect("frame"))
            .expect("write");
        stdin.write_all(b"hello").expect("write");
        drop(stdin);
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("exec'd output");
        assert_eq!(rest, "HELLO");
        assert_eq!(child.wait().expect("exit").code(), Some(5));
    }

    #[test]
    fn frames_count_lines_and_refuse_nul() {
        assert_eq!(
            frame("echo hi", "").expect("frame"),
            b"1\necho hi\n".to_vec()
        );
        assert_eq!(
            frame("a\n\nb", "x").expect("frame"),
            b"x3\na\n\nb\n".to_vec()
        );
        assert_eq!(frame("echo a\0b", ""), None);
    }

    /// A frame cut short (the connection dropped mid-send) must not run as a shorter
    /// command.
    #[test]
    fn truncated_frame_never_runs() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("vk-shell-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        let (mut child, mut stdin, _stdout) = local_shell();
        // The whole line would be `rm -f VICTIM.bak`; only `rm -f VICTIM` arrives,
        // without its newline.
        let full = frame(&format!("rm -f {}.bak", victim.display()), "").expect("frame");
        let cut = format!("rm -f {}", victim.display());
        assert!(full.starts_with(b"1\n"));
        write!(stdin, "1\n{cut}").expect("write");
        drop(stdin);
        let status = child.wait().expect("exit");
        assert_eq!(status.code(), Some(99));
        assert!(victim.exists(), "a truncated command ran");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
