//! The read-only server against the crate's own client and against raw bytes: reads,
//! holes, block status, LIST, writes refused with EPERM, hostile input closed cleanly.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use virtkeep_nbd::{
    BASE_ALLOCATION, ExportSource, Extent, NbdClient, NbdError, NbdServer, STATE_HOLE, STATE_ZERO,
};

/// An in-memory disk of 64 KiB blocks; zero blocks report HOLE|ZERO.
struct Mem(Vec<u8>);

const BLK: u64 = 64 << 10;

impl ExportSource for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        Ok(Bytes::copy_from_slice(
            &self.0[offset as usize..offset as usize + len as usize],
        ))
    }
    fn allocation(&self, offset: u64, len: u32) -> Vec<Extent> {
        let end = offset + u64::from(len);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLK;
            let e = ((b + 1) * BLK).min(end);
            let s = (b * BLK) as usize;
            let blk = &self.0[s..((b + 1) * BLK).min(self.size()) as usize];
            let flags = if blk.iter().all(|x| *x == 0) {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some(x) if x.flags == flags => x.length += e - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: e - pos,
                    flags,
                }),
            }
            pos = e;
        }
        out
    }
}

fn disk(seed: u8, blocks: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..blocks * BLK)
        .map(|i| (i as u8).wrapping_mul(seed) | 1)
        .collect();
    let s = (2 * BLK) as usize;
    v[s..s + 2 * BLK as usize].fill(0);
    v
}

fn server() -> Arc<NbdServer<Mem>> {
    Arc::new(
        NbdServer::new(vec![
            ("vda".into(), Mem(disk(3, 8))),
            ("vdb".into(), Mem(disk(5, 4))),
        ])
        .unwrap(),
    )
}

fn start(srv: &Arc<NbdServer<Mem>>) -> DuplexStream {
    let (a, b) = tokio::io::duplex(1 << 20);
    let srv = srv.clone();
    tokio::spawn(async move {
        let _ = srv.serve_connection(b).await;
    });
    a
}

#[tokio::test]
async fn client_reads_exports_and_block_status() {
    let srv = server();
    for (name, want) in [("vda", disk(3, 8)), ("vdb", disk(5, 4)), ("", disk(3, 8))] {
        let c = NbdClient::connect(start(&srv), name, &[BASE_ALLOCATION])
            .await
            .unwrap();
        assert_eq!(c.size(), want.len() as u64);
        assert!(c.read_only());
        assert!(c.structured_replies());
        // A data range, a hole (answered as a hole chunk), a range across both.
        for (off, len) in [
            (0u64, 1000u32),
            (2 * BLK, BLK as u32),
            (BLK + 5, 2 * BLK as u32),
        ] {
            let got = c.read(off, len).await.unwrap();
            assert_eq!(&got[..], &want[off as usize..off as usize + len as usize]);
        }
        let ext = c
            .block_status_all(BASE_ALLOCATION, 0, c.size())
            .await
            .unwrap();
        assert_eq!(
            ext[0],
            Extent {
                offset: 0,
                length: 2 * BLK,
                flags: 0
            }
        );
        assert_eq!(
            ext[1],
            Extent {
                offset: 2 * BLK,
                length: 2 * BLK,
                flags: STATE_HOLE | STATE_ZERO
            }
        );
        // Writes: the client refuses locally on a read-only export.
        assert!(matches!(c.write(0, b"x").await, Err(NbdError::ReadOnly)));
        c.disconnect().await.unwrap();
    }
    assert!(NbdClient::connect(start(&srv), "nope", &[]).await.is_err());
}

async fn raw_handshake(s: &mut DuplexStream) {
    assert_eq!(s.read_u64().await.unwrap(), 0x4e42_444d_4147_4943);
    assert_eq!(s.read_u64().await.unwrap(), 0x4948_4156_454f_5054);
    assert_eq!(s.read_u16().await.unwrap(), 3);
    s.write_u32(3).await.unwrap();
}

async fn send_opt(s: &mut DuplexStream, opt: u32, data: &[u8]) {
    s.write_u64(0x4948_4156_454f_5054).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

async fn read_opt_reply(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), 0x0003_e889_0455_65a9);
    let _opt = s.read_u32().await.unwrap();
    let rep = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (rep, d)
}

#[tokio::test]
async fn list_then_raw_write_gets_eperm() {
    let srv = server();
    let mut s = start(&srv);
    raw_handshake(&mut s).await;
    send_opt(&mut s, 3, &[]).await; // LIST
    let mut names = Vec::new();
    loop {
        let (rep, d) = read_opt_reply(&mut s).await;
        if rep == 1 {
            break;
        }
        assert_eq!(rep, 2);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["vda", "vdb"]);
    // EXPORT_NAME (old style entry, simple replies).
    send_opt(&mut s, 1, b"vdb").await;
    assert_eq!(s.read_u64().await.unwrap(), 4 * BLK);
    let flags = s.read_u16().await.unwrap();
    assert_ne!(flags & 2, 0, "read-only flag");
    // WRITE of 4 bytes at 0: payload drained, EPERM.
    s.write_u32(0x2560_9513).await.unwrap();
    s.write_u16(0).await.unwrap();
    s.write_u16(1).await.unwrap();
    s.write_u64(77).await.unwrap();
    s.write_u64(0).await.unwrap();
    s.write_u32(4).await.unwrap();
    s.write_all(b"evil").await.unwrap();
    assert_eq!(s.read_u32().await.unwrap(), 0x6744_6698);
    assert_eq!(s.read_u32().await.unwrap(), 1, "EPERM");
    assert_eq!(s.read_u64().await.unwrap(), 77);
    // The connection is still in step: a READ works.
    s.write_u32(0x2560_9513).await.unwrap();
    s.write_u16(0).await.unwrap();
    s.write_u16(0).await.unwrap();
    s.write_u64(78).await.unwrap();
    s.write_u64(0).await.unwrap();
    s.write_u32(4).await.unwrap();
    assert_eq!(s.read_u32().await.unwrap(), 0x6744_6698);
    assert_eq!(s.read_u32().await.unwrap(), 0);
    assert_eq!(s.read_u64().await.unwrap(), 78);
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b[..], disk(5, 4)[..4]);
}

#[tokio::test]
async fn hostile_input_closes_without_panic_or_hang() {
    let srv = server();
    // Deterministic garbage after a valid greeting, and huge option lengths.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..200 {
        let mut s = start(&srv);
        raw_handshake(&mut s).await;
        let mut junk = Vec::new();
        if round % 2 == 0 {
            junk.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            junk.extend_from_slice(&((x as u32) % 12).to_be_bytes());
            junk.extend_from_slice(&((x >> 32) as u32).to_be_bytes());
        }
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push(x as u8);
        }
        let _ = s.write_all(&junk).await;
        drop(s.shutdown().await);
        // The server must finish (close) in bounded time once input ends.
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
            .await
            .expect("server hung on hostile input")
            .ok();
    }
}

/// Many requests in flight on one connection (as qemu-img sends them) all get their
/// own bytes back.
#[tokio::test]
async fn pipelined_reads_get_their_own_data() {
    let srv = server();
    let want = disk(3, 8);
    let c = NbdClient::connect(start(&srv), "vda", &[BASE_ALLOCATION])
        .await
        .unwrap();
    let reads = (0..64u64).map(|i| {
        let c = c.clone();
        let off = (i * 7919 * 13) % (c.size() - 70_000);
        let len = 1 + ((i * 104_729) % 65_536) as u32;
        async move { (off, len, c.read(off, len).await.unwrap()) }
    });
    for (off, len, got) in futures_join(reads).await {
        assert_eq!(&got[..], &want[off as usize..off as usize + len as usize]);
    }
    c.disconnect().await.unwrap();
}

async fn futures_join<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
