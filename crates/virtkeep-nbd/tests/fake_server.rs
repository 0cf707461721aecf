//! Scripted in-memory servers: simple replies (no structured replies), out-of-order
//! replies, holes, error chunks and hostile lengths.
#![allow(clippy::unwrap_used)]

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use virtkeep_nbd::{BASE_ALLOCATION, NbdClient, NbdError};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

async fn opt_reply(s: &mut DuplexStream, opt: u32, rep: u32, data: &[u8]) {
    s.write_u64(REPLY_MAGIC).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(rep).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// Handshake as a server; `structured` decides the answer to STRUCTURED_REPLY.
async fn serve_handshake(s: &mut DuplexStream, structured: bool, size: u64, tflags: u16) {
    s.write_u64(0x4e42_444d_4147_4943).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(3).await.unwrap();
    assert_eq!(s.read_u32().await.unwrap(), 3);
    loop {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let opt = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        match opt {
            8 if structured => opt_reply(s, opt, 1, &[]).await,
            8 => opt_reply(s, opt, (1 << 31) | 1, b"no structured replies here").await,
            10 => {
                let mut d = 7u32.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                opt_reply(s, opt, 4, &d).await;
                opt_reply(s, opt, 1, &[]).await;
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(s, opt, 3, &info).await;
                opt_reply(s, opt, 1, &[]).await;
                return;
            }
            _ => opt_reply(s, opt, (1 << 31) | 1, &[]).await,
        }
    }
}

struct Req {
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

async fn read_req(s: &mut DuplexStream) -> Option<Req> {
    let magic = s.read_u32().await.ok()?;
    assert_eq!(magic, 0x2560_9513);
    let _flags = s.read_u16().await.ok()?;
    let cmd = s.read_u16().await.ok()?;
    let handle = s.read_u64().await.ok()?;
    let offset = s.read_u64().await.ok()?;
    let len = s.read_u32().await.ok()?;
    Some(Req {
        cmd,
        handle,
        offset,
        len,
    })
}

async fn simple(s: &mut DuplexStream, handle: u64, err: u32) {
    s.write_u32(0x6744_6698).await.unwrap();
    s.write_u32(err).await.unwrap();
    s.write_u64(handle).await.unwrap();
}

async fn chunk(
    s: &mut DuplexStream,
    flags: u16,
    typ: u16,
    handle: u64,
    payload: &[u8],
    claimed: Option<u32>,
) {
    s.write_u32(0x668e_33ef).await.unwrap();
    s.write_u16(flags).await.unwrap();
    s.write_u16(typ).await.unwrap();
    s.write_u64(handle).await.unwrap();
    s.write_u32(claimed.unwrap_or(payload.len() as u32))
        .await
        .unwrap();
    s.write_all(payload).await.unwrap();
}

fn pattern(offset: u64, len: u32) -> Vec<u8> {
    (offset..offset + u64::from(len))
        .map(|i| (i % 251) as u8)
        .collect()
}

#[tokio::test]
async fn simple_replies_out_of_order() {
    let (c, mut s) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, 1 << 20, 1 | 4).await;
        let mut reqs = Vec::new();
        for _ in 0..4 {
            reqs.push(read_req(&mut s).await.unwrap());
        }
        for r in reqs.iter().rev() {
            assert_eq!(r.cmd, 0);
            simple(&mut s, r.handle, 0).await;
            s.write_all(&pattern(r.offset, r.len)).await.unwrap();
        }
        let f = read_req(&mut s).await.unwrap();
        assert_eq!(f.cmd, 3);
        simple(&mut s, f.handle, 0).await;
        let r = read_req(&mut s).await.unwrap();
        simple(&mut s, r.handle, 22).await; // EINVAL on a read: no data follows
        let d = read_req(&mut s).await.unwrap();
        assert_eq!(d.cmd, 2);
    });
    let nbd = NbdClient::connect(c, "", &[BASE_ALLOCATION]).await.unwrap();
    assert!(!nbd.structured_replies());
    assert!(nbd.meta_contexts().is_empty());
    assert!(nbd.can_flush() && !nbd.read_only());
    let (a, b, c2, d) = tokio::join!(
        nbd.read(0, 1000),
        nbd.read(5000, 17),
        nbd.read(100_000, 4096),
        nbd.read(7, 1)
    );
    assert_eq!(&a.unwrap()[..], &pattern(0, 1000)[..]);
    assert_eq!(&b.unwrap()[..], &pattern(5000, 17)[..]);
    assert_eq!(&c2.unwrap()[..], &pattern(100_000, 4096)[..]);
    assert_eq!(&d.unwrap()[..], &pattern(7, 1)[..]);
    nbd.flush().await.unwrap();
    match nbd.read(0, 10).await {
        Err(NbdError::Server { errno: 22, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        nbd.block_status(BASE_ALLOCATION, 0, 512).await,
        Err(NbdError::MetaContextNotNegotiated(_))
    ));
    nbd.disconnect().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn structured_chunks_holes_errors_and_status() {
    let (c, mut s) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, true, 1 << 20, 1 | 2).await;
        // Read: data for the second half first, then a hole for the first half.
        let r = read_req(&mut s).await.unwrap();
        let half = r.len / 2;
        let mut p = (r.offset + u64::from(half)).to_be_bytes().to_vec();
        p.extend_from_slice(&pattern(r.offset + u64::from(half), r.len - half));
        chunk(&mut s, 0, 1, r.handle, &p, None).await;
        let mut h = r.offset.to_be_bytes().to_vec();
        h.extend_from_slice(&half.to_be_bytes());
        chunk(&mut s, 1, 2, r.handle, &h, None).await;
        // Read: an error chunk with offset and message.
        let r = read_req(&mut s).await.unwrap();
        let msg = b"bad sector";
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        e.extend_from_slice(msg);
        e.extend_from_slice(&(r.offset + 512).to_be_bytes());
        chunk(&mut s, 1, 0x8002, r.handle, &e, None).await;
        // Block status: a chunk for another context, then ours (longer than asked).
        let r = read_req(&mut s).await.unwrap();
        assert_eq!(r.cmd, 7);
        let mut other = 9u32.to_be_bytes().to_vec();
        other.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        chunk(&mut s, 0, 5, r.handle, &other, None).await;
        let mut bs = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3), (1 << 20, 0)] {
            bs.extend_from_slice(&l.to_be_bytes());
            bs.extend_from_slice(&f.to_be_bytes());
        }
        chunk(&mut s, 1, 5, r.handle, &bs, None).await;
        // Hostile: a data chunk claiming 4 GiB.
        let r = read_req(&mut s).await.unwrap();
        chunk(
            &mut s,
            1,
            1,
            r.handle,
            &r.offset.to_be_bytes(),
            Some(0xffff_fff0),
        )
        .await;
        let _ = s.read_u8().await; // hold the stream open until the client closes it
    });
    let nbd = NbdClient::connect(c, "", &[BASE_ALLOCATION]).await.unwrap();
    assert!(nbd.read_only() && nbd.structured_replies());
    let b = nbd.read(1000, 2000).await.unwrap();
    assert!(b[..1000].iter().all(|x| *x == 0));
    assert_eq!(&b[1000..], &pattern(2000, 1000)[..]);
    match nbd.read(4096, 4096).await {
        Err(NbdError::Server {
            errno: 5,
            message,
            offset: Some(4608),
        }) => assert_eq!(message, "bad sector"),
        other => panic!("{other:?}"),
    }
    let ext = nbd.block_status(BASE_ALLOCATION, 0, 10_000).await.unwrap();
    assert_eq!(
        ext,
        vec![
            virtkeep_nbd::Extent {
                offset: 0,
                length: 4096,
                flags: 0
            },
            virtkeep_nbd::Extent {
                offset: 4096,
                length: 5904,
                flags: 3
            },
        ]
    );
    let e = nbd.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(e, NbdError::Protocol { .. } | NbdError::Disconnected { .. }),
        "{e}"
    );
    assert!(matches!(
        nbd.read(0, 1).await,
        Err(NbdError::Disconnected { .. })
    ));
    drop(nbd);
    server.await.unwrap();
}

#[tokio::test]
async fn hostile_option_reply_length_is_bounded() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        s.write_u64(0x4e42_444d_4147_4943).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(3).await.unwrap();
        let _ = s.read_u32().await;
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).await.unwrap();
        s.write_u64(REPLY_MAGIC).await.unwrap();
        s.write_u32(8).await.unwrap();
        s.write_u32(1).await.unwrap();
        s.write_u32(u32::MAX).await.unwrap();
        let _ = s.read_u8().await;
    });
    let e = NbdClient::connect(c, "", &[]).await.err().unwrap();
    assert!(matches!(e, NbdError::TooLarge { .. }), "{e}");
    server.await.unwrap();
}
