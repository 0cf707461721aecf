//! Remote unix-socket forwarding against the lab's real sshd: a program on the host
//! connects to a socket sshd listens on, and talks to a server inside this process.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtkeep_ssh::{Auth, HostTarget, Session, SshError, UnixForward};

fn root_target() -> HostTarget {
    let lab = virtkeep_lab::lab();
    HostTarget {
        host: lab.ssh_host.clone(),
        port: lab.ssh_port,
        user: lab.ssh_user.clone(),
        auth: Auth::KeyFile {
            path: lab.ssh_key.clone(),
            passphrase: None,
        },
        known_hosts: lab.known_hosts.clone(),
        sudo: false,
        connect_timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(5),
        max_handshakes: virtkeep_ssh::DEFAULT_MAX_HANDSHAKES,
        connect_retries: virtkeep_ssh::DEFAULT_CONNECT_RETRIES,
    }
}

const T: Duration = Duration::from_secs(10);

/// Serves every forwarded connection: reply with the bytes received, upper-cased, so an
/// answer cannot come from anything but this server.
fn serve_upper(mut fwd: UnixForward) -> tokio::task::JoinHandle<UnixForward> {
    tokio::spawn(async move {
        for _ in 0..2 {
            let Some(mut s) = fwd.accept().await else {
                break;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = s.read(&mut buf).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    buf[..n].make_ascii_uppercase();
                    s.write_all(&buf[..n]).await.expect("write");
                }
                let _ = s.shutdown().await;
            });
        }
        fwd
    })
}

/// Like a host program (QEMU) would: connect, send, read the whole answer.
fn talk(path: &std::path::Path, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = UnixStream::connect(path)?;
    c.set_read_timeout(Some(T))?;
    c.write_all(msg)?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    Ok(out)
}

/// Two connections to the forwarded socket reach the in-process server (one of 1 MiB);
/// after `close` the socket no longer leads anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_connections_reach_the_node_through_the_forward() {
    let dir = tempfile::Builder::new()
        .prefix("vk-fwd-")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join("fwd.sock");
    let s = Session::connect(&root_target()).await.expect("connect");
    let fwd = s
        .forward_unix_socket(path.to_str().expect("utf8"), T)
        .await
        .expect("forward");
    assert_eq!(fwd.path(), path.to_str().expect("utf8"));
    assert!(path.exists(), "sshd did not create {}", path.display());
    let server = serve_upper(fwd);

    let p = path.clone();
    let small = tokio::task::spawn_blocking(move || talk(&p, b"hello nbd"));
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
    let p = path.clone();
    let sent = big.clone();
    let large = tokio::task::spawn_blocking(move || talk(&p, &sent));
    assert_eq!(small.await.expect("join").expect("small"), b"HELLO NBD");
    let got = large.await.expect("join").expect("large");
    assert!(got == big.to_ascii_uppercase(), "1 MiB answer differs");

    let fwd = tokio::time::timeout(T, server)
        .await
        .expect("server")
        .expect("join");
    fwd.close(T).await.expect("close");
    let p = path.clone();
    let after = tokio::task::spawn_blocking(move || talk(&p, b"x"))
        .await
        .expect("join");
    assert!(
        after.as_ref().map_or(true, |v| v.is_empty()),
        "a closed forward still answered: {after:?}"
    );
}

/// A path sshd cannot bind (its directory does not exist) is a clear error naming the
/// path; a relative or over-long path is refused before anything is sent; the same path
/// cannot be forwarded twice on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_forwards_are_clear_errors() {
    let s = Session::connect(&root_target()).await.expect("connect");
    match s
        .forward_unix_socket("/nonexistent-virtkeep-dir/x.sock", T)
        .await
    {
        Err(e @ SshError::ForwardRefused { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("/nonexistent-virtkeep-dir/x.sock")
                    && m.contains("AllowStreamLocalForwarding"),
                "{m}"
            );
        }
        other => panic!("expected ForwardRefused, got {other:?}"),
    }
    let long = format!("/tmp/{}", "x".repeat(120));
    for bad in ["relative.sock", long.as_str()] {
        assert!(
            matches!(
                s.forward_unix_socket(bad, T).await,
                Err(SshError::ForwardRefused { .. })
            ),
            "{bad}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twice.sock");
    let p = path.to_str().expect("utf8");
    let first = s.forward_unix_socket(p, T).await.expect("first");
    assert!(matches!(
        s.forward_unix_socket(p, T).await,
        Err(SshError::ForwardRefused { .. })
    ));
    first.close(T).await.expect("close");
}
