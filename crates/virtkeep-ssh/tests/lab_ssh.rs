//! virtkeep-ssh against the lab's real sshd (`virtkeep_lab::lab()`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtkeep_ssh::known_hosts::{self, fingerprint};
use virtkeep_ssh::{
    Auth, HostTarget, Pool, PublicKey, RemoteCommand, Session, SshError, probe_host_key,
};

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

fn password_target(sudo: bool) -> HostTarget {
    let lab = virtkeep_lab::lab();
    HostTarget {
        user: lab.password_user.clone(),
        auth: Auth::Password {
            password: lab.password.clone(),
        },
        sudo,
        ..root_target()
    }
}

fn host_key(pub_file: &Path) -> PublicKey {
    let text = std::fs::read_to_string(pub_file).expect("read host key");
    PublicKey::from_openssh(text.trim()).expect("parse host key")
}

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(t: &HostTarget) -> Session {
    Session::connect(t)
        .await
        .unwrap_or_else(|e| panic!("connect {t:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_auth_exec_and_failure() {
    let s = connect(&root_target()).await;
    let id = s
        .run_stdout_string(&RemoteCommand::new("id").arg("-u"))
        .await
        .expect("id");
    assert_eq!(id, "0\n");

    let cmd =
        RemoteCommand::new("sh").args(["-c", "echo out; echo 'bad thing happened' >&2; exit 3"]);
    let out = s.exec(&cmd).await.expect("exec");
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"bad thing happened\n");
    match s.run(&cmd).await {
        Err(e @ SshError::CommandFailed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("exit status 3"), "{msg}");
            assert!(msg.contains(&cmd.render()), "{msg}");
            assert!(msg.contains("bad thing happened"), "{msg}");
            let SshError::CommandFailed { status, stderr, .. } = e else {
                unreachable!()
            };
            assert_eq!(status, 3);
            assert_eq!(stderr, "bad thing happened\n");
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }

    // Killed by a signal: status 128 + 9, and run() reports it.
    let killed = RemoteCommand::new("sh").args(["-c", "kill -9 $$"]);
    assert_eq!(s.exec(&killed).await.expect("exec").status, 137);
    assert!(matches!(
        s.run(&killed).await,
        Err(SshError::CommandFailed { status: 137, .. })
    ));

    // Commands reading stdin get EOF rather than hanging.
    assert_eq!(
        s.exec(&RemoteCommand::new("cat"))
            .await
            .expect("cat")
            .stdout,
        b""
    );
    s.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_and_sudo() {
    let plain = connect(&password_target(false)).await;
    let uid = plain
        .run_stdout_string(&RemoteCommand::new("id").arg("-u"))
        .await
        .expect("id");
    assert_ne!(uid.trim(), "0");

    let sudo = connect(&password_target(true)).await;
    let cmd = RemoteCommand::new("id").arg("-u");
    assert!(sudo.command_line(&cmd).starts_with("sudo -n -- sh -c "));
    assert_eq!(sudo.run_stdout_string(&cmd).await.expect("sudo id"), "0\n");

    let mut wrong = password_target(false);
    wrong.auth = Auth::Password {
        password: "definitely-wrong".into(),
    };
    match Session::connect(&wrong).await {
        Err(SshError::Auth { user, method, .. }) => {
            assert_eq!(user, virtkeep_lab::lab().password_user);
            assert_eq!(method, "password");
        }
        other => panic!("expected Auth error, got {other:?}"),
    }
}

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_auth() {
    let lab = virtkeep_lab::lab();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("start ssh-agent");
    let agent = Agent { child, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SSH_AUTH_SOCK only for the ssh-add child; the test process env is untouched.
    let st = Command::new("ssh-add")
        .arg(&lab.ssh_key)
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .expect("ssh-add");
    assert!(st.success());

    let t = HostTarget {
        auth: Auth::Agent,
        ..root_target()
    };
    let s = Session::connect_with_agent(&t, &sock)
        .await
        .expect("agent connect");
    assert_eq!(
        s.run_stdout_string(&RemoteCommand::new("whoami"))
            .await
            .expect("whoami"),
        "root\n"
    );

    // An agent without keys is an authentication failure, not a hang.
    let st = Command::new("ssh-add")
        .arg("-D")
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .expect("ssh-add -D");
    assert!(st.success());
    assert!(matches!(
        Session::connect_with_agent(&t, &sock).await,
        Err(SshError::Auth { .. })
    ));
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_changed_revoked_host_keys_refused() {
    let lab = virtkeep_lab::lab();
    let dir = tempfile::tempdir().expect("tempdir");
    let ed = host_key(&lab.hostkey_ed25519_pub);
    let ed_fp = fingerprint(&ed);

    // Unknown: empty (and missing) known_hosts.
    for (i, content) in [Some(""), None].into_iter().enumerate() {
        let kh = dir.path().join(format!("empty{i}"));
        if let Some(c) = content {
            std::fs::write(&kh, c).expect("write");
        }
        let t = HostTarget {
            known_hosts: kh.clone(),
            ..root_target()
        };
        match Session::connect(&t).await {
            Err(e @ SshError::UnknownHostKey { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("virtkeep host trust"), "{msg}");
                let SshError::UnknownHostKey {
                    fingerprint,
                    algorithm,
                    known_hosts,
                    port,
                    ..
                } = e
                else {
                    unreachable!()
                };
                assert_eq!(fingerprint, ed_fp);
                assert_eq!(algorithm, "ssh-ed25519");
                assert_eq!(known_hosts, kh);
                assert_eq!(port, lab.ssh_port);
            }
            other => panic!("expected UnknownHostKey, got {other:?}"),
        }
    }

    // Changed: another ed25519 key pinned for this host.
    let other_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBHQSbfBUkimtUyGTT3IGGVby8/w0oumNdm4MSDsBiAE";
    let other = PublicKey::from_openssh(other_key).expect("key");
    let kh = dir.path().join("changed");
    std::fs::write(
        &kh,
        format!("[{}]:{} {other_key}\n", lab.ssh_host, lab.ssh_port),
    )
    .expect("write");
    let t = HostTarget {
        known_hosts: kh,
        ..root_target()
    };
    match Session::connect(&t).await {
        Err(e @ SshError::HostKeyChanged { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("HOST KEY CHANGED") && msg.contains("ssh-keygen -R"),
                "{msg}"
            );
            let SshError::HostKeyChanged {
                presented,
                expected,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(presented, ed_fp);
            assert_eq!(expected, vec![fingerprint(&other)]);
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }

    // Revoked: the real key pinned but also @revoked.
    let kh = dir.path().join("revoked");
    let ed_line = known_hosts::openssh_key(&ed).expect("encode");
    std::fs::write(
        &kh,
        format!(
            "[{h}]:{p} {ed_line}\n@revoked [{h}]:{p} {ed_line}\n",
            h = lab.ssh_host,
            p = lab.ssh_port
        ),
    )
    .expect("write");
    let t = HostTarget {
        known_hosts: kh,
        ..root_target()
    };
    assert!(matches!(
        Session::connect(&t).await,
        Err(SshError::Revoked { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_pin_and_rsa_host_key() {
    let lab = virtkeep_lab::lab();
    let info = probe_host_key(&lab.ssh_host, lab.ssh_port, Duration::from_secs(10))
        .await
        .expect("probe");
    assert_eq!(info.algorithm, "ssh-ed25519");
    assert_eq!(
        info.fingerprint,
        fingerprint(&host_key(&lab.hostkey_ed25519_pub))
    );
    assert!(
        info.openssh_line
            .starts_with(&format!("[{}]:{} ssh-ed25519 ", lab.ssh_host, lab.ssh_port))
    );

    // Pin what the probe saw into a fresh file; connecting then works.
    let dir = tempfile::tempdir().expect("tempdir");
    let kh = dir.path().join("new/known_hosts");
    known_hosts::pin(&kh, &lab.ssh_host, lab.ssh_port, &info.key).expect("pin");
    let t = HostTarget {
        known_hosts: kh,
        ..root_target()
    };
    connect(&t).await;

    // Only the RSA key pinned: the client asks for rsa-sha2-* first and succeeds.
    let rsa = host_key(&lab.hostkey_rsa_pub);
    let kh = dir.path().join("rsa_only");
    known_hosts::pin(&kh, &lab.ssh_host, lab.ssh_port, &rsa).expect("pin rsa");
    let t = HostTarget {
        known_hosts: kh,
        ..root_target()
    };
    let s = connect(&t).await;
    assert_eq!(fingerprint(s.host_key()), fingerprint(&rsa));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_argument_round_trips() {
    let marker = format!("/tmp/{}", unique("vkx"));
    let hostile =
        format!("it's $(touch {marker}); \"quoted\" `id` ü\n\ttab; rm -rf /nonexistent* &");
    for target in [root_target(), password_target(true)] {
        let s = connect(&target).await;
        let out = s
            .run(&RemoteCommand::new("printf").arg("%s").arg(&hostile))
            .await
            .expect("printf");
        assert_eq!(
            out.stdout,
            hostile.as_bytes(),
            "via {}",
            s.command_line(&RemoteCommand::new("x"))
        );
        // Also as a file name (redirect target) and through a pipe.
        let path = format!("/tmp/{} it's $(x)", unique("vkq"));
        s.run(
            &RemoteCommand::new("printf")
                .arg("%s")
                .arg(&hostile)
                .pipe(RemoteCommand::new("cat"))
                .stdout_to(&path)
                .and_then(RemoteCommand::new("cat").arg(&path))
                .and_then(RemoteCommand::new("rm").arg("-f").arg(&path)),
        )
        .await
        .map(|o| assert_eq!(o.stdout, hostile.as_bytes()))
        .expect("pipe/redirect");
    }
    assert!(
        !Path::new(&marker).exists(),
        "{marker} was created: quoting failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stream_with_slow_reader_and_noisy_stderr() {
    const TOTAL: u64 = 512 << 20;
    let s = connect(&root_target()).await;
    // 512 MiB on stdout while 8 MiB go to stderr at the same time.
    let cmd = RemoteCommand::new("sh").args([
        "-c",
        "(head -c 8388608 /dev/zero | tr '\\0' e >&2) & head -c 536870912 /dev/zero; wait",
    ]);
    let mut p = s.spawn(&cmd).await.expect("spawn");
    let mut buf = vec![0u8; 256 * 1024];
    let mut n: u64 = 0;
    let mut probe = None;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(30), p.stdout.read(&mut buf))
            .await
            .expect("stdout read stalled")
            .expect("read");
        if r == 0 {
            break;
        }
        assert!(buf[..r].iter().all(|&b| b == 0));
        n += r as u64;
        if n < (16 << 20) {
            // Slow at first: ~16 MiB at 256 KiB per 5 ms.
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else if probe.is_none() {
            // Another channel on the same connection gets through while the stream
            // is being consumed.
            let s2 = s.clone();
            probe = Some(tokio::spawn(async move {
                let t0 = Instant::now();
                let out = s2.run(&RemoteCommand::new("echo").arg("hi")).await;
                (out, t0.elapsed())
            }));
        }
        assert!(Instant::now() < deadline, "too slow");
    }
    let (other, took) = probe.expect("probe started").await.expect("join");
    assert_eq!(other.expect("echo").stdout, b"hi\n");
    assert!(
        took < Duration::from_secs(20),
        "second channel took {took:?}"
    );
    assert_eq!(n, TOTAL);
    let (status, stderr) = p.wait().await.expect("wait");
    assert_eq!(status, 0);
    assert_eq!(stderr.len(), 1 << 20, "stderr tail is bounded to 1 MiB");
    assert!(stderr.iter().all(|&b| b == b'e'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_stdout_round_trip() {
    let s = connect(&root_target()).await;
    let mut p = s
        .spawn(&RemoteCommand::new("sha256sum"))
        .await
        .expect("spawn");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let mut stdin = std::mem::replace(
        &mut p.stdin,
        s.spawn(&RemoteCommand::new("true")).await.expect("x").stdin,
    );
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.expect("write");
        stdin.shutdown().await.expect("eof");
        data
    });
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).await.expect("read");
    let data = writer.await.expect("join");
    let (status, _) = p.wait().await.expect("wait");
    assert_eq!(status, 0);
    let local = {
        let mut c = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum");
        std::io::Write::write_all(&mut c.stdin.take().expect("stdin"), &data).expect("w");
        String::from_utf8(c.wait_with_output().expect("out").stdout).expect("utf8")
    };
    assert_eq!(
        out.split_whitespace().next(),
        local.split_whitespace().next()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_sends_eof_and_discards_unread_stdout() {
    let s = connect(&root_target()).await;
    let mut p = s
        .spawn(&RemoteCommand::new("sh").args(["-c", "cat; echo done >&2; exit 4"]))
        .await
        .expect("spawn");
    p.stdin
        .write_all(&vec![b'x'; 3 << 20])
        .await
        .expect("write");
    let (status, stderr) = tokio::time::timeout(Duration::from_secs(30), p.wait())
        .await
        .expect("wait hangs")
        .expect("wait");
    assert_eq!((status, stderr.as_slice()), (4, &b"done\n"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_errors_quickly() {
    let t = HostTarget {
        keepalive: Duration::from_secs(1),
        ..root_target()
    };
    let s = connect(&t).await;
    // The login shell runs this line; $PPID is the sshd process serving the session.
    let mut p = s
        .spawn(&RemoteCommand::raw_trusted(
            "echo $PPID; exec cat /dev/zero",
        ))
        .await
        .expect("spawn");
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        p.stdout.read_exact(&mut byte).await.expect("read pid");
        if byte[0] == b'\n' {
            break;
        }
        first.push(byte[0]);
    }
    let pid: u32 = String::from_utf8(first)
        .expect("utf8")
        .trim()
        .parse()
        .expect("pid");
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..16 {
        p.stdout.read_exact(&mut buf).await.expect("stream running");
    }
    let started = Instant::now();
    let st = Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    let res = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match p.stdout.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("hang: no error within 30 s after the server was killed");
    assert!(res.is_err(), "a cut stream must end in an error, not EOF");
    let waited = tokio::time::timeout(Duration::from_secs(10), p.wait())
        .await
        .expect("wait hangs");
    assert!(
        matches!(
            waited,
            Err(SshError::Disconnected { .. }) | Err(SshError::ChannelClosed { .. })
        ),
        "{waited:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // The session knows it is dead; new commands fail fast.
    let again = tokio::time::timeout(Duration::from_secs(10), s.exec(&RemoteCommand::new("true")))
        .await
        .expect("exec on dead session hangs");
    assert!(again.is_err());
}

struct EchoServer {
    child: Child,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_server() -> EchoServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("echo it's.sock");
    let child = Command::new("python3")
        .arg("-c")
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_UNIX)\n\
             s.bind(sys.argv[1]); s.listen(4)\n\
             while True:\n\
             \x20   c,_=s.accept()\n\
             \x20   while True:\n\
             \x20       d=c.recv(65536)\n\
             \x20       if not d: break\n\
             \x20       c.sendall(d)\n\
             \x20   c.close()\n",
        )
        .arg(&path)
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "echo server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    EchoServer {
        child,
        _dir: dir,
        path,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_forwarding() {
    let srv = echo_server();
    let s = connect(&root_target()).await;
    let stream = s
        .open_unix_socket(srv.path.to_str().expect("utf8 path"))
        .await
        .expect("open_unix_socket");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.expect("write");
        wr.shutdown().await.expect("shutdown");
    });
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut got))
        .await
        .expect("echo stalled")
        .expect("read");
    writer.await.expect("join");
    assert!(got == expected, "echoed bytes differ");

    match s.open_unix_socket("/nonexistent/virtkeep.sock").await {
        Err(SshError::ChannelOpen { .. }) => {}
        other => panic!("expected ChannelOpen error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_round_robin() {
    let pool = Pool::new(root_target(), 2);
    let ctl = pool.session().await.expect("control");
    let mut pids = Vec::new();
    for i in 0..4 {
        let d = pool.data_session(i).await.expect("data");
        // $PPID of the login shell = the sshd process of that connection.
        let pid = d
            .run_stdout_string(&RemoteCommand::raw_trusted("echo $PPID"))
            .await
            .expect("ppid");
        pids.push(pid);
    }
    assert_eq!(pids[0], pids[2]);
    assert_eq!(pids[1], pids[3]);
    assert_eq!(
        ctl.run_stdout_string(&RemoteCommand::new("echo").arg("ok"))
            .await
            .expect("ctl"),
        "ok\n"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out() {
    // A listener that never speaks SSH: the handshake must time out, not hang.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let t = HostTarget {
        host: "127.0.0.1".into(),
        port,
        connect_timeout: Duration::from_secs(1),
        ..root_target()
    };
    let started = Instant::now();
    assert!(matches!(
        Session::connect(&t).await,
        Err(SshError::Timeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(l);
}

/// Short commands go through the command shell: the same results as one channel per
/// command (status, stdout, stderr, binary and large output, hostile arguments),
/// concurrent callers each get a shell, and a failed command leaves the shell usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_shell_matches_one_channel_per_command() {
    let via_shell = connect(&root_target()).await;
    let via_channels = connect(&root_target()).await;
    via_channels.use_command_shell(false);
    let hostile = "it's $(id) \"q\" `x` ü\n\ttab; &";
    let cmds = [
        RemoteCommand::new("printf").arg("%s").arg(hostile),
        RemoteCommand::new("sh").args(["-c", "printf 'a\\0b'; echo err >&2; exit 7"]),
        RemoteCommand::new("head")
            .args(["-c", "3000000", "/dev/urandom"])
            .pipe(RemoteCommand::new("sha256sum")),
        RemoteCommand::new("sh").args(["-c", "kill -9 $$"]),
        RemoteCommand::new("cat"),
        RemoteCommand::new("sh").args(["-c", "seq 1 200000"]),
        RemoteCommand::new("no-such-command-virtkeep"),
    ];
    for cmd in &cmds {
        let a = via_shell.exec(cmd).await.expect("shell exec");
        let b = via_channels.exec(cmd).await.expect("channel exec");
        assert_eq!(a.status, b.status, "{cmd}");
        if !cmd.render().contains("urandom") {
            assert_eq!(a.stdout, b.stdout, "{cmd}");
        }
        // A command killed by a signal: dash, running the line, notes "Killed" where
        // the login shell exec'd the command; the status is the same.
        if a.status < 128 {
            assert_eq!(
                a.stderr.is_empty(),
                b.stderr.is_empty(),
                "{cmd}: {:?} vs {:?}",
                String::from_utf8_lossy(&a.stderr),
                String::from_utf8_lossy(&b.stderr)
            );
        }
    }
    // Many callers at once, each answer is its own.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = via_shell.clone();
        tasks.push(tokio::spawn(async move {
            let out = s
                .run(
                    &RemoteCommand::new("sh")
                        .args(["-c", "sleep 0.2; echo \"$1\"", "sh"])
                        .arg(i.to_string()),
                )
                .await
                .expect("concurrent run");
            (i, out.stdout)
        }));
    }
    for t in tasks {
        let (i, out) = t.await.expect("task");
        assert_eq!(out, format!("{i}\n").into_bytes());
    }
    // A command that forks a daemon keeping its stdout does not hold the reply back.
    let started = Instant::now();
    let out = via_shell
        .run(&RemoteCommand::raw_trusted(
            "(sleep 30; echo late) & echo now",
        ))
        .await
        .expect("daemon");
    assert_eq!(out.stdout, b"now\n");
    // A hang check, not a timing one: the reply must not wait for the forked sleeper.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        via_shell
            .run_stdout_string(&RemoteCommand::new("echo").arg("next"))
            .await
            .expect("next"),
        "next\n"
    );
    // A streaming process started from an idle shell: stdin, stdout, stderr, status.
    for round in 0..3 {
        let mut p = via_shell
            .spawn(&RemoteCommand::raw_trusted(
                "tr a-z A-Z; echo warn >&2; exit 4",
            ))
            .await
            .expect("spawn");
        p.stdin.write_all(b"stream me").await.expect("stdin");
        p.stdin.shutdown().await.expect("eof");
        let mut got = Vec::new();
        p.stdout.read_to_end(&mut got).await.expect("stdout");
        assert_eq!(got, b"STREAM ME", "round {round}");
        let (status, stderr) = p.wait().await.expect("wait");
        assert_eq!((status, stderr), (4, b"warn\n".to_vec()), "round {round}");
    }
    via_shell.close().await.expect("close");
    via_channels.close().await.expect("close");
}

/// A private sshd with the lab's keys and users but its own `MaxStartups`, killed when
/// dropped (also after a failed assertion).
struct PrivateSshd {
    child: Child,
    port: u16,
    known_hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_sshd(max_startups: &str) -> PrivateSshd {
    let ssh_dir = virtkeep_lab::lab().lab_dir.join("ssh");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let base = std::fs::read_to_string(ssh_dir.join("sshd_config")).expect("lab sshd_config");
    let mut cfg: String = base
        .lines()
        .filter(|l| !l.starts_with("ListenAddress") && !l.starts_with("MaxStartups"))
        .filter(|l| !l.starts_with("PidFile"))
        .map(|l| format!("{l}\n"))
        .collect();
    cfg.push_str(&format!(
        "ListenAddress 127.0.0.1:{port}\nMaxStartups {max_startups}\nPidFile {}\n",
        dir.path().join("pid").display()
    ));
    let cfg_path = dir.path().join("sshd_config");
    std::fs::write(&cfg_path, cfg).expect("write sshd_config");
    let pub_key =
        std::fs::read_to_string(ssh_dir.join("ssh_host_ed25519_key.pub")).expect("host key");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}", pub_key.trim()),
    )
    .expect("write known_hosts");
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-f")
        .arg(&cfg_path)
        .arg("-E")
        .arg(dir.path().join("log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start sshd");
    let sshd = PrivateSshd {
        child,
        port,
        known_hosts,
        _dir: dir,
    };
    // Wait for the listener without opening a connection (that would count as a startup).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "private sshd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    sshd
}

/// `n` connects at once, each running `true` once connected.
async fn burst(t: &HostTarget, n: usize) -> Vec<Result<Session, SshError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                let s = Session::connect(&t).await?;
                s.run(&RemoteCommand::new("true")).await?;
                Ok(s)
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

/// sshd under `MaxStartups 2` drops connections beyond two unauthenticated ones: a
/// burst of connects loses some without retries, and all get through with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_dropped_by_max_startups_are_retried() {
    let sshd = private_sshd("2");
    let t = HostTarget {
        port: sshd.port,
        known_hosts: sshd.known_hosts.clone(),
        connect_timeout: Duration::from_secs(10),
        ..root_target()
    };
    let without = burst(
        &HostTarget {
            connect_retries: 0,
            ..t.clone()
        },
        8,
    )
    .await;
    let dropped: Vec<String> = without
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert!(!dropped.is_empty(), "MaxStartups 2 dropped nothing");
    for e in &dropped {
        assert!(e.contains("MaxStartups"), "not an early drop: {e}");
    }
    for s in without.into_iter().flatten() {
        let _ = s.close().await;
    }
    let started = Instant::now();
    for r in burst(&t, 8).await {
        let s = r.unwrap_or_else(|e| panic!("with retries: {e}"));
        let _ = s.close().await;
    }
    eprintln!(
        "{} early drops without retries; 8 connects with them in {:.1} s",
        dropped.len(),
        started.elapsed().as_secs_f64()
    );
}

/// At most `max_handshakes` connections to one host:port are in their handshake at
/// once: a listener that never speaks SSH sees them arrive four at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_per_host_are_bounded() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            seen.lock().expect("lock").push(c);
        }
    });
    let t = HostTarget {
        host: "127.0.0.1".into(),
        port,
        connect_timeout: Duration::from_secs(3),
        max_handshakes: 4,
        ..root_target()
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { Session::connect(&t).await.map(|_| ()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        accepted.lock().expect("lock").len(),
        4,
        "handshakes at once"
    );
    for task in tasks {
        assert!(matches!(
            task.await.expect("task"),
            Err(SshError::Timeout { .. })
        ));
    }
    assert_eq!(accepted.lock().expect("lock").len(), 8);
}
