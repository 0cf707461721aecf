//! Throughput benchmark: stream a remote file over 1..N russh connections.
//!
//! ```text
//! ssh_cat --host H --port P --user U --key KEY --known-hosts KH \
//!         --file /path/on/host --size BYTES --streams N
//! ```
//! With one stream it runs `cat FILE`; with N it splits the file into N byte ranges,
//! each read with `dd … iflag=skip_bytes,count_bytes` over its own connection
//! (`Pool::data_session(i)`). Prints one line: streams, bytes, seconds, MiB/s. The
//! time includes connecting and authenticating, as the OpenSSH comparison does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use virtkeep_ssh::{Auth, HostTarget, Pool, RemoteCommand, SshError};

struct Args {
    host: String,
    port: u16,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
    file: String,
    size: u64,
    streams: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = std::env::args().skip(1);
    let (mut host, mut port, mut user, mut key, mut kh, mut file, mut size, mut streams) =
        (None, None, None, None, None, None, None, 1usize);
    while let Some(flag) = a.next() {
        let v = a.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--host" => host = Some(v),
            "--port" => port = Some(v.parse::<u16>().map_err(|e| format!("--port: {e}"))?),
            "--user" => user = Some(v),
            "--key" => key = Some(PathBuf::from(v)),
            "--known-hosts" => kh = Some(PathBuf::from(v)),
            "--file" => file = Some(v),
            "--size" => size = Some(v.parse::<u64>().map_err(|e| format!("--size: {e}"))?),
            "--streams" => streams = v.parse::<usize>().map_err(|e| format!("--streams: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let need = |n: &str| format!("missing {n}");
    Ok(Args {
        host: host.ok_or_else(|| need("--host"))?,
        port: port.unwrap_or(22),
        user: user.ok_or_else(|| need("--user"))?,
        key: key.ok_or_else(|| need("--key"))?,
        known_hosts: kh.ok_or_else(|| need("--known-hosts"))?,
        file: file.ok_or_else(|| need("--file"))?,
        size: size.ok_or_else(|| need("--size"))?,
        streams: streams.max(1),
    })
}

async fn stream(pool: Pool, i: usize, cmd: RemoteCommand) -> Result<u64, SshError> {
    let s = pool.data_session(i).await?;
    let mut p = s.spawn(&cmd).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = p.stdout.read(&mut buf).await?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    p.wait_success().await?;
    Ok(n)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let target = HostTarget {
        host: args.host.clone(),
        port: args.port,
        user: args.user.clone(),
        auth: Auth::KeyFile {
            path: args.key.clone(),
            passphrase: None,
        },
        known_hosts: args.known_hosts.clone(),
        sudo: false,
        connect_timeout: Duration::from_secs(15),
        keepalive: Duration::from_secs(15),
        max_handshakes: virtkeep_ssh::DEFAULT_MAX_HANDSHAKES,
        connect_retries: virtkeep_ssh::DEFAULT_CONNECT_RETRIES,
    };
    let n = args.streams;
    let pool = Pool::new(target, n);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let part = args.size.div_ceil(n as u64);
    for i in 0..n {
        let cmd = if n == 1 {
            RemoteCommand::new("cat").arg(&args.file)
        } else {
            let off = part * i as u64;
            let len = part.min(args.size.saturating_sub(off));
            RemoteCommand::new("dd")
                .arg(format!("if={}", args.file))
                .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
                .arg(format!("skip={off}"))
                .arg(format!("count={len}"))
        };
        tasks.push(tokio::spawn(stream(pool.clone(), i, cmd)));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    pool.close().await;
    if total != args.size {
        return Err(format!("read {total} bytes, expected {}", args.size).into());
    }
    println!(
        "streams={n} bytes={total} secs={secs:.3} MiB/s={:.1}",
        total as f64 / secs / (1024.0 * 1024.0)
    );
    Ok(())
}
