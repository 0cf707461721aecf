//! Repository ingest/restore benchmark. Run through `bench/repo.sh` (release build).
//!
//! `repo_bench [--size GiB] [--profile mixed|light] [--dir DIR] [--mode all|ingest-rss]`
//!
//! Data is generated on the fly from a 16 MiB pool (2 random + 2 compressible chunks,
//! each copy stamped with its index so it is unique): `mixed` = per 8 chunks 2 random,
//! 3 compressible, 1 repeated (identical), 2 zero; `light` = 1 random, 1 compressible,
//! 3 repeated, 3 zero. Baselines (single-core BLAKE3 and zstd-1) run over the same chunk
//! sequence in the same process.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use virtkeep_repo::*;

const CS: usize = 4 << 20;

struct Gen {
    random: Vec<Vec<u8>>,
    text: Vec<Vec<u8>>,
    light: bool,
}

fn xorshift_fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn text_chunk(seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "virtual",
        "machine",
        "backup",
        "restore",
        "chunk",
        "index",
        "kernel",
        "page",
        "block",
        "device",
        "libvirt",
        "qemu",
        "snapshot",
        "the",
        "a",
        "of",
        "and",
        "to",
        "error",
        "info",
        "2026-11-26T21:00:00Z",
        "systemd",
        "sshd",
        "GET /api/v1/items",
    ];
    let mut out = Vec::with_capacity(CS);
    let mut x = seed | 1;
    while out.len() < CS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        if x.is_multiple_of(7) {
            out.extend_from_slice(format!("{}", x % 100000).as_bytes());
        }
    }
    out.truncate(CS);
    out
}

impl Gen {
    fn new(light: bool) -> Self {
        let random = (0..2)
            .map(|i| {
                let mut v = vec![0u8; CS];
                xorshift_fill(0xdead_beef + i, &mut v);
                v
            })
            .collect();
        let text = (0..2).map(|i| text_chunk(77 + i)).collect();
        Gen {
            random,
            text,
            light,
        }
    }

    /// Chunk `i` (None = all zero).
    fn chunk(&self, i: u64) -> Option<Vec<u8>> {
        let k = i % 8;
        let kind = if self.light {
            match k {
                0 => 'r',
                1 => 't',
                2..=4 => 'p',
                _ => 'z',
            }
        } else {
            match k {
                0 | 1 => 'r',
                2..=4 => 't',
                5 => 'p',
                _ => 'z',
            }
        };
        let stamp = |mut v: Vec<u8>| {
            for off in (0..CS).step_by(256 << 10) {
                v[off..off + 8].copy_from_slice(&i.to_le_bytes());
            }
            v
        };
        match kind {
            'r' => Some(stamp(self.random[(i / 8 % 2) as usize].clone())),
            't' => Some(stamp(self.text[(i / 8 % 2) as usize].clone())),
            'p' => Some(self.text[0].clone()),
            _ => None,
        }
    }
}

fn hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .max_blocking_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

async fn ingest(repo: &Repository, data_gen: &Gen, chunks: u64, vm: &str) -> (f64, Manifest) {
    let size = chunks * CS as u64;
    let t = Instant::now();
    let w = repo
        .begin_backup(BackupMeta {
            host: "bench".into(),
            vm: vm.into(),
            mode: BackupMode::Full,
            reason: "bench".into(),
            parent: None,
            domain_xml: String::new(),
            time: None,
        })
        .await
        .unwrap();
    let d = w
        .disk(
            DiskSpec {
                name: "vda".into(),
                size,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    for i in 0..chunks {
        match data_gen.chunk(i) {
            Some(v) => d.write_chunk(i, Bytes::from(v)).await.unwrap(),
            None => {
                // the engine learns zeros from block status; here the writer detects them
                d.write_chunk(i, Bytes::from(vec![0u8; CS])).await.unwrap()
            }
        }
    }
    d.finish().await.unwrap();
    let m = w.finish(serde_json::Value::Null).await.unwrap();
    (t.elapsed().as_secs_f64(), m)
}

async fn restore_seq(repo: &Repository, id: &str) -> (f64, u64) {
    let t = Instant::now();
    let r = repo.disk_reader(id, "vda").await.unwrap().with_readahead(1);
    let mut n = 0u64;
    let mut s = Box::pin(r.extents());
    while let Some(e) = s.try_next().await.unwrap() {
        n += match e {
            Extent::Data { bytes, .. } => bytes.len() as u64,
            Extent::Zero { len, .. } => len,
        };
    }
    (t.elapsed().as_secs_f64(), n)
}

async fn restore_par(repo: &Repository, id: &str, par: usize) -> (f64, u64) {
    let t = Instant::now();
    let r = repo.disk_reader(id, "vda").await.unwrap();
    let n = r.index().chunk_count();
    let total: u64 = futures::stream::iter(0..n)
        .map(|i| {
            let r = r.clone();
            async move {
                r.read_chunk(i)
                    .await
                    .unwrap()
                    .map(|b| b.len() as u64)
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(par)
        .fold(0u64, |a, b| async move { a + b })
        .await;
    (t.elapsed().as_secs_f64(), total)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|p| args.get(p + 1).cloned())
    };
    let gib: f64 = arg("--size").and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let light = arg("--profile").as_deref() == Some("light");
    let mode = arg("--mode").unwrap_or_else(|| "all".into());
    let dir = arg("--dir").unwrap_or_else(|| "/tmp".into());
    let chunks = (gib * 256.0) as u64;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let data_gen = Gen::new(light);
    let tmp = tempfile::Builder::new()
        .prefix("vk-bench-")
        .tempdir_in(&dir)
        .unwrap();
    let total = chunks * CS as u64;
    println!(
        "size {gib} GiB ({chunks} chunks of 4 MiB), profile {}, {cores} cores, repo {} (fsync off, AES-256-GCM, zstd-1)",
        if light { "light" } else { "mixed" },
        tmp.path().display()
    );

    let key = tmp.path().join("key");
    let init = |name: &str| {
        let loc = Location::Local {
            path: tmp.path().join(name),
            fsync: false,
        };
        let key = key.clone();
        async move {
            Repository::init(
                loc,
                InitOptions {
                    encryption: Some(KeySource::KeyFile(key)),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };

    if mode == "ingest-rss" {
        let rt = runtime(cores);
        let (secs, m) = rt.block_on(async {
            let repo = init("rss").await;
            ingest(&repo, &data_gen, chunks, "rss").await
        });
        println!(
            "RESULT {{\"size_gib\":{gib},\"chunks\":{chunks},\"ingest_mibps\":{:.0},\"chunks_new\":{},\"chunks_zero\":{},\"chunks_reused\":{},\"vmhwm_mib\":{:.1}}}",
            mibps(total, secs),
            m.stats.totals.chunks_new,
            m.stats.totals.chunks_zero,
            m.stats.totals.chunks_reused,
            hwm_mib()
        );
        return;
    }

    // Baselines over the same chunk sequence (first 256 chunks at most), one core.
    let base_n = chunks.min(256);
    let (mut th, mut tz, mut bytes) = (0f64, 0f64, 0u64);
    let mut comp = zstd::bulk::Compressor::new(1).unwrap();
    let zeros = vec![0u8; CS];
    for i in 0..base_n {
        let c = data_gen.chunk(i);
        let data = c.as_deref().unwrap_or(&zeros);
        let t = Instant::now();
        std::hint::black_box(blake3::hash(data));
        th += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(comp.compress(data).unwrap());
        tz += t.elapsed().as_secs_f64();
        bytes += data.len() as u64;
    }
    let b3 = mibps(bytes, th);
    let z1 = mibps(bytes, tz);
    let base = b3.min(z1);
    println!("baseline 1 core: BLAKE3 {b3:.0} MiB/s, zstd-1 {z1:.0} MiB/s → min {base:.0} MiB/s");

    let mut results = Vec::new();
    for (label, threads) in [("1 thread", 1usize), ("multi", cores)] {
        let rt = runtime(threads);
        rt.block_on(async {
            let repo = init(&format!("r{threads}")).await;
            repo.set_parallelism(threads);
            let (secs, m) = ingest(&repo, &data_gen, chunks, "bench").await;
            let ing = mibps(total, secs);
            let (rs, rn) = restore_seq(&repo, &m.id).await;
            let (rp, _) = restore_par(&repo, &m.id, threads * 2).await;
            println!(
                "{label:9}: ingest {ing:7.0} MiB/s ({:.2}× min baseline, {:.2}× per core)  restore seq {:7.0} MiB/s  restore par {:7.0} MiB/s   [new {} zero {} reused {}; stored {} MiB]",
                ing / base,
                ing / base / threads as f64,
                mibps(rn, rs),
                mibps(total, rp),
                m.stats.totals.chunks_new,
                m.stats.totals.chunks_zero,
                m.stats.totals.chunks_reused,
                m.stats.totals.bytes_stored >> 20
            );
            results.push(format!(
                "{{\"threads\":{threads},\"ingest_mibps\":{ing:.0},\"ratio_to_min_baseline\":{:.2},\"restore_seq_mibps\":{:.0},\"restore_par_mibps\":{:.0}}}",
                ing / base,
                mibps(rn, rs),
                mibps(total, rp)
            ));
        });
    }
    println!(
        "RESULT {{\"size_gib\":{gib},\"blake3_mibps\":{b3:.0},\"zstd1_mibps\":{z1:.0},\"runs\":[{}],\"vmhwm_mib\":{:.1}}}",
        results.join(","),
        hwm_mib()
    );
}
