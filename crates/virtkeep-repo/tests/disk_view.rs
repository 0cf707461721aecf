//! DiskView: random reads equal the source, zero chunks cost no read, the cache stays
//! within its bound, sequential reads prefetch, the blocking adapter reads and seeks.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom};

use common::*;
use virtkeep_repo::*;

/// 40 chunks: noise with whole zero chunks (holes) every 5th chunk and a short tail.
fn source() -> Vec<u8> {
    let mut d = noise(7, (40 * CS + 1234) as usize);
    for i in (0..40).step_by(5) {
        let s = (i * CS) as usize;
        d[s..s + CS as usize].fill(0);
    }
    d
}

fn opts(cache_chunks: u64, readahead: usize) -> DiskViewOptions {
    DiskViewOptions {
        cache_bytes: cache_chunks * CS,
        readahead_chunks: readahead,
    }
}

fn random_reads_equal_source(kind: Kind) {
    rt().block_on(async {
        let f = fx(kind);
        let repo = new_repo(&f, None, std::time::Duration::ZERO).await;
        let data = source();
        let m = backup_full(&repo, "dv", &data).await;
        let view = repo.disk_view(&m.id, "vda", opts(4, 2)).await.unwrap();
        assert_eq!(view.size(), data.len() as u64);
        let mut x = 0x1234_5678u64;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % data.len() as u64;
            let len = ((x >> 20) % (3 * CS)).min(data.len() as u64 - off) as usize;
            let b = view.read_at(off, len).await.unwrap();
            assert_eq!(
                &b[..],
                &data[off as usize..off as usize + len],
                "at {off}+{len}"
            );
            assert!(view.stats().cached_bytes <= 4 * CS, "{:?}", view.stats());
        }
        // Past the end is refused, the last byte is readable.
        assert!(view.read_at(data.len() as u64, 1).await.is_err());
        assert!(view.read_at(data.len() as u64 - 1, 2).await.is_err());
        assert_eq!(
            view.read_at(data.len() as u64 - 1, 1).await.unwrap()[0],
            data[data.len() - 1]
        );
        f.cleanup().await;
    });
}

fn zero_chunks_and_allocation(kind: Kind) {
    rt().block_on(async {
        let f = fx(kind);
        let repo = new_repo(&f, None, std::time::Duration::ZERO).await;
        let data = source();
        let m = backup_full(&repo, "dv", &data).await;
        let view = repo.disk_view(&m.id, "vda", opts(4, 0)).await.unwrap();
        let b = view.read_at(5 * CS, CS as usize).await.unwrap();
        assert!(b.iter().all(|x| *x == 0));
        assert_eq!(view.stats().fetched, 0, "a zero chunk must not be read");
        let a = view.allocation(4 * CS + 10, 2 * CS);
        assert_eq!(
            a,
            vec![
                Allocation {
                    offset: 4 * CS + 10,
                    len: CS - 10,
                    zero: false
                },
                Allocation {
                    offset: 5 * CS,
                    len: CS,
                    zero: true
                },
                Allocation {
                    offset: 6 * CS,
                    len: 10,
                    zero: false
                },
            ]
        );
        let total: u64 = view.allocation(0, u64::MAX).iter().map(|a| a.len).sum();
        assert_eq!(total, data.len() as u64);
        f.cleanup().await;
    });
}

fn sequential_readahead_and_blocking(kind: Kind) {
    rt().block_on(async {
        let f = fx(kind);
        let repo = new_repo(&f, None, std::time::Duration::ZERO).await;
        let data = source();
        let m = backup_full(&repo, "dv", &data).await;
        let view = repo.disk_view(&m.id, "vda", opts(16, 4)).await.unwrap();
        // Two sequential reads in chunk 1 then 2: read-ahead fetches 3, 4 (6 is next after 5 = zero).
        view.read_at(CS, 100).await.unwrap();
        view.read_at(CS + 100, CS as usize).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let before = view.stats();
        view.read_at(3 * CS, (2 * CS) as usize).await.unwrap();
        let after = view.stats();
        assert!(after.hits >= before.hits + 2, "{before:?} -> {after:?}");
        // A whole sequential pass through the blocking adapter equals the source.
        let h = tokio::runtime::Handle::current();
        let v2 = view.clone();
        let (all, tail) = tokio::task::spawn_blocking(move || {
            let mut r = v2.blocking(h);
            let mut all = Vec::new();
            let mut buf = vec![0u8; 100_000];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            r.seek(SeekFrom::End(-10)).unwrap();
            let mut tail = Vec::new();
            r.read_to_end(&mut tail).unwrap();
            (all, tail)
        })
        .await
        .unwrap();
        assert!(all == data, "sequential read differs from the source");
        assert_eq!(tail, data[data.len() - 10..]);
        assert!(view.stats().cached_bytes <= 16 * CS);
        f.cleanup().await;
    });
}

both_backends!(
    random_reads_equal_source,
    zero_chunks_and_allocation,
    sequential_readahead_and_blocking
);

/// A lost chunk fails the reads that need it, every time (errors are not cached), and
/// nothing else.
#[test]
fn missing_chunk_fails_only_its_reads() {
    rt().block_on(async {
        let f = fx(Kind::Fs);
        let repo = new_repo(&f, None, std::time::Duration::ZERO).await;
        let data = source();
        let m = backup_full(&repo, "dv", &data).await;
        let idx = repo.fixed_index(&m.id, "vda").await.unwrap();
        let Location::Local { path, .. } = &f.loc else {
            unreachable!()
        };
        std::fs::remove_file(path.join(chunk_key(&idx.digests[3]))).unwrap();
        let view = repo.disk_view(&m.id, "vda", opts(8, 2)).await.unwrap();
        for _ in 0..2 {
            let e = view.read_at(3 * CS + 10, 100).await.unwrap_err();
            assert!(matches!(e, RepoError::ChunkMissing { .. }), "{e}");
            // A read across chunks 2..4 fails too; chunk 2 and 4 alone read.
            assert!(view.read_at(2 * CS, (3 * CS) as usize).await.is_err());
        }
        let b = view.read_at(2 * CS, CS as usize).await.unwrap();
        assert_eq!(&b[..], &data[(2 * CS) as usize..(3 * CS) as usize]);
        let b = view.read_at(4 * CS, 10).await.unwrap();
        assert_eq!(&b[..], &data[(4 * CS) as usize..(4 * CS) as usize + 10]);
    });
}

/// A filesystem reads 4 KiB blocks: through the blocking adapter every byte equals the
/// source, each chunk is fetched once, read-ahead starts at most one fetch per chunk
/// (not one per block while the chunk is in flight), and blocks of cached chunks are
/// answered from the cache.
#[test]
fn small_blocking_reads_fetch_each_chunk_once() {
    rt().block_on(async {
        let f = fx(Kind::Fs);
        let repo = new_repo(&f, None, std::time::Duration::ZERO).await;
        let data = source();
        let m = backup_full(&repo, "dv", &data).await;
        let view = repo.disk_view(&m.id, "vda", opts(64, 4)).await.unwrap();
        let h = tokio::runtime::Handle::current();
        let v2 = view.clone();
        let all = tokio::task::spawn_blocking(move || {
            let mut r = v2.blocking(h);
            let mut all = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            all
        })
        .await
        .unwrap();
        assert!(all == data, "4 KiB reads differ from the source");
        let s = view.stats();
        let data_chunks = 41 - 8; // 40 whole chunks + the tail, 8 of them holes
        assert_eq!(s.fetched, data_chunks, "{s:?}");
        assert!(s.readaheads <= data_chunks, "{s:?}");
        // Blocks of data chunks (the tail is one block); holes are not cache hits.
        let data_blocks = (data_chunks - 1) * (CS / 4096) + 1;
        assert!(s.hits >= data_blocks - data_chunks, "{s:?}");
        f.cleanup().await;
    });
}
