//! Reads a whole NBD export sequentially with N requests in flight and reports MiB/s.
//!
//! `cargo run --release -p virtkeep-nbd --example nbd_read -- SOCKET [EXPORT] [INFLIGHT] [REQ_KIB]`

use std::collections::VecDeque;
use std::time::Instant;

use virtkeep_nbd::NbdClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(sock) = args.get(1) else {
        eprintln!("usage: nbd_read SOCKET [EXPORT] [INFLIGHT] [REQ_KIB]");
        std::process::exit(2);
    };
    let export = args.get(2).map_or("", |s| s.as_str());
    let inflight: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let req_kib: u32 = args.get(4).map_or(Ok(1024), |s| s.parse())?;

    let stream = tokio::net::UnixStream::connect(sock).await?;
    let nbd = NbdClient::connect(stream, export, &[]).await?;
    let size = nbd.size();
    let req = (req_kib * 1024).min(nbd.max_block());
    let start = Instant::now();
    let mut queue = VecDeque::new();
    let mut next = 0u64;
    let mut total = 0u64;
    let mut checksum = 0u64;
    loop {
        while queue.len() < inflight.max(1) && next < size {
            let len = (size - next).min(u64::from(req)) as u32;
            let c = nbd.clone();
            let off = next;
            queue.push_back(tokio::spawn(async move { c.read(off, len).await }));
            next += u64::from(len);
        }
        let Some(h) = queue.pop_front() else { break };
        let data = h.await??;
        total += data.len() as u64;
        // Touch the data in order, as a consumer (chunker/hasher) would.
        checksum = checksum.wrapping_add(
            data.iter()
                .step_by(4096)
                .map(|b| u64::from(*b))
                .sum::<u64>(),
        );
    }
    let secs = start.elapsed().as_secs_f64();
    nbd.disconnect().await?;
    println!(
        "read {} MiB in {secs:.3} s: {:.1} MiB/s (inflight {inflight}, request {} KiB, checksum {checksum})",
        total / (1024 * 1024),
        total as f64 / (1024.0 * 1024.0) / secs,
        req / 1024
    );
    Ok(())
}
