//! Helpers: qcow2 images written with qemu-io, exported by a real qemu-nbd.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use virtkeep_nbd::NbdClient;

pub const MIB: u64 = 1024 * 1024;

pub fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Creates a qcow2 image of `size` in `dir` and applies qemu-io commands to it.
pub fn make_image(dir: &Path, name: &str, size: u64, cmds: &[String]) -> PathBuf {
    let img = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    qemu_io(&img, cmds);
    img
}

pub fn qemu_io(img: &Path, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    run("qemu-io", &args);
}

/// The image's guest-visible bytes (qemu-img convert -O raw).
pub fn raw_bytes(img: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// A forked qemu-nbd; killed (SIGKILL) on drop.
pub struct QemuNbd {
    pub sock: PathBuf,
    pid: Option<String>,
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    pub fn start(img: &Path, extra: &[&str]) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let pidf = dir.path().join("nbd.pid");
        let errf = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let sock_arg = format!("--socket={}", sock.display());
        let pid_arg = format!("--pid-file={}", pidf.display());
        let mut args = vec![
            sock_arg.as_str(),
            "--persistent",
            "--fork",
            pid_arg.as_str(),
            "-f",
            "qcow2",
        ];
        args.extend_from_slice(extra);
        args.push(img.to_str().unwrap());
        let status = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errf)
            .status()
            .unwrap();
        let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
        assert!(status.success(), "qemu-nbd {args:?} failed: {err}");
        let pid = std::fs::read_to_string(&pidf).unwrap().trim().to_string();
        QemuNbd {
            sock,
            pid: Some(pid),
            _dir: dir,
        }
    }

    pub async fn connect(
        &self,
        export: &str,
        ctx: &[&str],
    ) -> Result<NbdClient, virtkeep_nbd::NbdError> {
        let s = tokio::net::UnixStream::connect(&self.sock).await?;
        NbdClient::connect(s, export, ctx).await
    }

    /// SIGKILL now (and wait until the process is gone).
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            for _ in 0..200 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}
