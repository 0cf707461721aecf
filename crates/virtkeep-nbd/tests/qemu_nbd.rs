//! Against a real qemu-nbd on a unix socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{MIB, QemuNbd, make_image, raw_bytes};
use virtkeep_nbd::{BASE_ALLOCATION, DIRTY, MappedKind, NbdError, STATE_ZERO, allocated_extents};

fn data_ranges(ext: &[virtkeep_nbd::Extent], is_data: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in ext {
        if !is_data(e.flags) {
            continue;
        }
        match out.last_mut() {
            Some((o, l)) if *o + *l == e.offset => *l += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

fn assert_consecutive(ext: &[virtkeep_nbd::Extent], start: u64, end: u64) {
    let mut pos = start;
    for e in ext {
        assert_eq!(e.offset, pos, "extents not consecutive: {ext:?}");
        assert!(e.length > 0);
        pos += e.length;
    }
    assert_eq!(pos, end, "extents do not cover the range");
}

fn cmds(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_status_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = make_image(
        dir.path(),
        "ro.qcow2",
        size,
        &cmds(&[
            "write -P 0xab 1M 64k",
            "write -P 0xcd 8M 1M",
            "write -P 0x77 40M 512k",
            "write -z 40M 128k",
            "write -z 50M 1M",
            "write -P 0x5a 63M 1M",
        ]),
    );
    let raw = raw_bytes(&img);
    let srv = QemuNbd::start(&img, &["-r"]);
    let ctx_missing = "qemu:dirty-bitmap:nope";
    let nbd = srv
        .connect("", &[BASE_ALLOCATION, ctx_missing])
        .await
        .unwrap();
    assert_eq!(nbd.size(), size);
    assert!(nbd.read_only());
    assert!(nbd.structured_replies());
    assert_eq!(nbd.meta_contexts(), vec![BASE_ALLOCATION.to_string()]);
    assert!(nbd.max_block() >= 1024 * 1024 && nbd.max_block() <= 32 * 1024 * 1024);

    // Block status: the written ranges are data, everything else reads as zero.
    let ext = nbd
        .block_status_all(BASE_ALLOCATION, 0, size)
        .await
        .unwrap();
    assert_consecutive(&ext, 0, size);
    let data = data_ranges(&ext, |f| f & STATE_ZERO == 0);
    assert_eq!(
        data,
        vec![
            (MIB, 64 * 1024),
            (8 * MIB, MIB),
            (40 * MIB + 128 * 1024, 384 * 1024),
            (63 * MIB, MIB)
        ]
    );
    // One call may return less than asked, never more, always from `offset`.
    let one = nbd
        .block_status(BASE_ALLOCATION, 4096, (size - 4096) as u32)
        .await
        .unwrap();
    assert_eq!(one[0].offset, 4096);
    let end = one.last().map(|e| e.offset + e.length).unwrap();
    assert_consecutive(&one, 4096, end);
    assert!(end <= size);

    let mapped = allocated_extents(&nbd, BASE_ALLOCATION, 0, size)
        .await
        .unwrap();
    let mdata: Vec<(u64, u64)> = mapped
        .iter()
        .filter(|m| m.kind == MappedKind::Data)
        .map(|m| (m.offset, m.length))
        .collect();
    assert_eq!(mdata, data);
    assert!(mapped.iter().all(|m| m.kind != MappedKind::Unchanged));
    assert!(mapped.windows(2).all(|w| w[0].kind != w[1].kind));

    // Reads match qemu-img convert output (holes come back as zeros).
    let step = 4 * MIB as u32;
    let mut off = 0u64;
    while off < size {
        let b = nbd.read(off, step).await.unwrap();
        assert!(
            b[..] == raw[off as usize..off as usize + step as usize],
            "mismatch at {off}"
        );
        off += u64::from(step);
    }
    let b = nbd.read(MIB - 100, 300).await.unwrap();
    assert_eq!(&b[..], &raw[(MIB - 100) as usize..(MIB + 200) as usize]);
    let mut buf = vec![0u8; 5000];
    nbd.read_into(40 * MIB + 127 * 1024, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf[..], &raw[(40 * MIB + 127 * 1024) as usize..][..5000]);

    // Errors detected before sending.
    assert!(matches!(
        nbd.read(size - 10, 20).await,
        Err(NbdError::InvalidArgument(_))
    ));
    assert!(matches!(
        nbd.read(0, 64 * 1024 * 1024).await,
        Err(NbdError::TooLarge { .. })
    ));
    assert!(matches!(
        nbd.block_status(ctx_missing, 0, 4096).await,
        Err(NbdError::MetaContextNotNegotiated(_))
    ));
    assert!(matches!(nbd.write(0, b"x").await, Err(NbdError::ReadOnly)));
    assert!(matches!(
        nbd.write_zeroes(0, 512, false).await,
        Err(NbdError::ReadOnly)
    ));

    nbd.disconnect().await.unwrap();
    assert!(matches!(
        nbd.read(0, 512).await,
        Err(NbdError::Disconnected { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_concurrent_reads() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let mut c = Vec::new();
    for i in 0..32u64 {
        c.push(format!("write -P {:#x} {}M 512k", (i * 7 + 1) % 255, i));
    }
    let img = make_image(dir.path(), "p.qcow2", size, &c);
    let raw = std::sync::Arc::new(raw_bytes(&img));
    let srv = QemuNbd::start(&img, &["-r", "--shared=4"]);
    let a = srv.connect("", &[]).await.unwrap();
    let b = srv.connect("", &[BASE_ALLOCATION]).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let nbd = if t % 2 == 0 { a.clone() } else { b.clone() };
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = (x % (256 * 1024)) as u32 + 1;
                let off = (x >> 20) % (size - u64::from(len));
                let got = nbd.read(off, len).await.unwrap();
                assert!(
                    got[..] == raw[off as usize..off as usize + len as usize],
                    "task {t} off {off} len {len}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_export() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let img = make_image(dir.path(), "rw.qcow2", size, &cmds(&["write -P 0x11 0 4M"]));
    let mut expect = raw_bytes(&img);
    {
        let srv = QemuNbd::start(&img, &[]);
        let nbd = srv.connect("", &[BASE_ALLOCATION]).await.unwrap();
        assert!(!nbd.read_only());
        assert!(nbd.can_flush() && nbd.can_write_zeroes() && nbd.can_trim());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let off = 2 * MIB as usize + 3;
        // Several writes in flight at once.
        let (r1, r2, r3) = tokio::join!(
            nbd.write(off as u64, &data),
            nbd.write_zeroes(MIB, 64 * 1024, false),
            nbd.write_zeroes(8 * MIB, 128 * 1024, true),
        );
        r1.unwrap();
        r2.unwrap();
        r3.unwrap();
        expect[off..off + data.len()].copy_from_slice(&data);
        expect[MIB as usize..(MIB + 64 * 1024) as usize].fill(0);
        // Trim is advisory (qemu-nbd's default is --discard=ignore): it must succeed,
        // and the range reads either as before or as zeros.
        nbd.trim(3 * MIB, 64 * 1024).await.unwrap();
        nbd.flush().await.unwrap();
        let back = nbd.read(off as u64, data.len() as u32).await.unwrap();
        assert_eq!(&back[..], &data[..]);
        // 8M..8M+128k was allocated as zeros (no hole), so not data-with-content.
        let ext = nbd
            .block_status(BASE_ALLOCATION, 8 * MIB, 128 * 1024)
            .await
            .unwrap();
        assert!(ext.iter().all(|e| e.flags & STATE_ZERO != 0), "{ext:?}");
        nbd.disconnect().await.unwrap();
    }
    let mut got = raw_bytes(&img);
    let trimmed = 3 * MIB as usize..(3 * MIB + 64 * 1024) as usize;
    assert!(
        got[trimmed.clone()] == expect[trimmed.clone()]
            || got[trimmed.clone()].iter().all(|b| *b == 0)
    );
    got[trimmed.clone()].copy_from_slice(&expect[trimmed]);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expect[i]) {
        panic!(
            "image differs after writes at byte {i}: {:#x} != {:#x}",
            got[i], expect[i]
        );
    }
    common::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0 1M 64k",
            img.to_str().unwrap(),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_rejected_with_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "x.qcow2", MIB, &[]);
    let srv = QemuNbd::start(&img, &["-r", "-x", "disk0"]);
    for ctx in [&[][..], &[BASE_ALLOCATION][..]] {
        match srv.connect("nope", ctx).await {
            Err(NbdError::OptionRejected { message, .. }) => {
                assert!(message.contains("nope"), "message: {message}")
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("unknown export accepted"),
        }
    }
    let ok = srv.connect("disk0", &[]).await.unwrap();
    assert_eq!(ok.size(), MIB);
    ok.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_context() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let img = make_image(dir.path(), "d.qcow2", size, &cmds(&["write -P 0x11 0 2M"]));
    common::run(
        "qemu-img",
        &["bitmap", "--add", "--enable", img.to_str().unwrap(), "bm0"],
    );
    // Writes through qemu-io after the bitmap exists are tracked (granularity 64k).
    common::qemu_io(
        &img,
        &cmds(&[
            "write -P 0xab 1M 128k",
            "write -z 4M 64k",
            "write -P 0x22 10M 1000",
        ]),
    );
    let srv = QemuNbd::start(&img, &["-r", "-B", "bm0"]);
    let ctx = "qemu:dirty-bitmap:bm0";
    let nbd = srv.connect("", &[BASE_ALLOCATION, ctx]).await.unwrap();
    let mut granted = nbd.meta_contexts();
    granted.sort();
    assert_eq!(granted, vec![BASE_ALLOCATION.to_string(), ctx.to_string()]);

    let ext = nbd.block_status_all(ctx, 0, size).await.unwrap();
    assert_consecutive(&ext, 0, size);
    let dirty = data_ranges(&ext, |f| f & DIRTY != 0);
    assert_eq!(
        dirty,
        vec![
            (MIB, 128 * 1024),
            (4 * MIB, 64 * 1024),
            (10 * MIB, 64 * 1024)
        ]
    );

    let mapped = allocated_extents(&nbd, ctx, 0, size).await.unwrap();
    let kinds: Vec<(u64, u64, MappedKind)> = mapped
        .iter()
        .map(|m| (m.offset, m.length, m.kind))
        .collect();
    assert_eq!(kinds[0], (0, MIB, MappedKind::Unchanged));
    assert_eq!(kinds[1], (MIB, 128 * 1024, MappedKind::Data));
    assert!(mapped.iter().all(|m| m.kind != MappedKind::Zero));

    // base:allocation still answers on the same connection.
    let alloc = nbd
        .block_status_all(BASE_ALLOCATION, 0, size)
        .await
        .unwrap();
    assert_eq!(
        data_ranges(&alloc, |f| f & STATE_ZERO == 0),
        vec![(0, 2 * MIB), (10 * MIB, 64 * 1024)]
    );
    nbd.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_read_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = make_image(dir.path(), "k.qcow2", size, &cmds(&["write -P 0x42 0 64M"]));
    let mut srv = QemuNbd::start(&img, &["-r"]);
    let nbd = srv.connect("", &[]).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let nbd = nbd.clone();
        tasks.push(tokio::spawn(async move {
            let mut off = t * 4 * MIB;
            loop {
                if let Err(e) = nbd.read(off % size, 4 * 1024 * 1024).await {
                    return e;
                }
                off += 16 * MIB;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.kill();
    for t in tasks {
        let e = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("read hung after the server died")
            .unwrap();
        assert!(
            matches!(e, NbdError::Disconnected { .. } | NbdError::Io(_)),
            "{e}"
        );
    }
    let e = tokio::time::timeout(Duration::from_secs(5), nbd.read(0, 512))
        .await
        .unwrap();
    assert!(matches!(e, Err(NbdError::Disconnected { .. })), "{e:?}");
}
