//! The repository test suite; every test runs on the filesystem (`*::fs`) and on the lab's
//! Ceph RGW (`*::s3`).
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use std::time::Duration;
use virtkeep_repo::*;

both_backends!(
    roundtrip_extents,
    dedup_across_backups,
    seeded_from_previous,
    wrong_key_writes_nothing,
    corruption_detected,
    prune_forget_protected,
    concurrent_backup_and_gc,
    create_only_put,
    abort_leaves_nothing_visible,
    tampered_metadata_refused,
);

#[derive(Debug, Clone)]
enum Piece {
    Data(u32, u64),
    Zero(u32),
    Skip(u32),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        (1u32..150_000, any::<u64>()).prop_map(|(l, s)| Piece::Data(l, s)),
        (1u32..300_000).prop_map(Piece::Zero),
        (1u32..100_000).prop_map(Piece::Skip),
    ]
}

fn roundtrip_extents(kind: Kind) {
    let rt = rt();
    let fx = fx(kind);
    let repo = rt.block_on(new_repo(&fx, None, Duration::from_secs(3600)));
    let cases = if matches!(kind, Kind::Fs) { 24 } else { 6 };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(proptest::collection::vec(piece(), 1..12), any::<bool>()),
            |(pieces, tail)| {
                rt.block_on(async {
                    // build the expected image
                    let mut img: Vec<u8> = Vec::new();
                    let mut ops = Vec::new();
                    for p in &pieces {
                        let off = img.len() as u64;
                        match p {
                            Piece::Data(l, s) => {
                                // half the data pieces are compressible text-like
                                let v = if s % 2 == 0 {
                                    noise(*s, *l as usize)
                                } else {
                                    (0..*l).map(|i| b"virtkeep "[(i % 9) as usize]).collect()
                                };
                                img.extend_from_slice(&v);
                                ops.push((off, Some(v), *l as u64));
                            }
                            Piece::Zero(l) => {
                                img.resize(img.len() + *l as usize, 0);
                                ops.push((off, None, *l as u64));
                            }
                            Piece::Skip(l) => img.resize(img.len() + *l as usize, 0),
                        }
                    }
                    if tail {
                        img.resize(img.len() + 12345, 0);
                    }
                    let w = repo.begin_backup(meta("prop", None)).await.unwrap();
                    let d = w.disk(spec("vda", img.len() as u64), None).await.unwrap();
                    let mut sink = ExtentSink::new(d);
                    for (off, data, len) in ops {
                        match data {
                            Some(v) => sink.write_data(off, &v).await.unwrap(),
                            None => sink.write_zeroes(off, len).await.unwrap(),
                        }
                    }
                    sink.finish().await.unwrap();
                    let m = w.finish(serde_json::Value::Null).await.unwrap();
                    let back = restore(&repo, &m.id, "vda").await;
                    prop_assert_eq!(back.len(), img.len());
                    prop_assert!(back == img, "restored image differs");
                    // zero chunks are holes, not bytes
                    let r = repo.disk_reader(&m.id, "vda").await.unwrap();
                    for i in 0..r.index().chunk_count() {
                        let s = (i * CS) as usize;
                        let e = (s + CS as usize).min(img.len());
                        prop_assert_eq!(r.index().is_zero(i), img[s..e].iter().all(|b| *b == 0));
                    }
                    Ok(())
                })
            },
        )
        .unwrap();
    rt.block_on(fx.cleanup());
}

fn dedup_across_backups(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::from_secs(3600)).await;
        let mut data = noise(1, 10 * CS as usize);
        data[3 * CS as usize..5 * CS as usize].fill(0);
        let a = backup_full(&repo, "vm1", &data).await;
        assert_eq!(a.stats.totals.chunks_new, 8);
        assert_eq!(a.stats.totals.chunks_zero, 2);
        // second full, no parent: nothing new
        let b = backup_full(&repo, "vm1", &data).await;
        assert_eq!(b.stats.totals.chunks_new, 0, "{:?}", b.stats);
        assert_eq!(b.stats.totals.chunks_reused, 8);
        // a different VM with one chunk changed: one new chunk
        data[0] ^= 0xff;
        let c = backup_full(&repo, "vm2", &data).await;
        assert_eq!(c.stats.totals.chunks_new, 1);
        assert_eq!(restore(&repo, &c.id, "vda").await, data);
        let snaps = repo.snapshots().await.unwrap();
        assert_eq!(snaps.len(), 3);
        assert_eq!(snaps[2].vm, "vm2");
        assert_eq!(repo.manifest(&a.id).await.unwrap().extra["test"], true);
        fx.cleanup().await;
    })
}

fn seeded_from_previous(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::from_secs(3600)).await;
        let size = 6 * CS as usize + 1000; // short last chunk
        let mut data = noise(2, size);
        let a = backup_full(&repo, "vm", &data).await;
        let prev = repo.fixed_index(&a.id, "vda").await.unwrap();
        // incremental: only chunk 2 and the last one changed; chunk 4 became zero
        let w = repo
            .begin_backup(meta("vm", Some(a.id.clone())))
            .await
            .unwrap();
        let d = w.disk(spec("vda", size as u64), Some(&prev)).await.unwrap();
        let c2 = noise(99, CS as usize);
        data[2 * CS as usize..3 * CS as usize].copy_from_slice(&c2);
        d.write_chunk(2, Bytes::from(c2)).await.unwrap();
        data[4 * CS as usize..5 * CS as usize].fill(0);
        d.zero_chunk(4).unwrap();
        let last = noise(98, 1000);
        data[6 * CS as usize..].copy_from_slice(&last);
        d.write_chunk(6, Bytes::from(last)).await.unwrap();
        // a wrong-length chunk is refused
        assert!(d.write_chunk(1, Bytes::from(vec![1u8; 10])).await.is_err());
        let st = d.finish().await.unwrap();
        assert_eq!(st.chunks_new, 2);
        assert_eq!(st.chunks_unchanged, 4);
        let b = w.finish(serde_json::Value::Null).await.unwrap();
        assert_eq!(b.parent.as_deref(), Some(a.id.as_str()));
        let ix = repo.fixed_index(&b.id, "vda").await.unwrap();
        for i in 0..7 {
            let same = ix.digests[i] == prev.digests[i];
            assert_eq!(same, ![2, 4, 6].contains(&i), "slot {i}");
        }
        assert_eq!(restore(&repo, &b.id, "vda").await, data);
        // the parent is untouched
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        fx.cleanup().await;
    })
}

fn wrong_key_writes_nothing(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(
            &fx,
            Some(KeySource::Passphrase("correct horse".into())),
            Duration::from_secs(3600),
        )
        .await;
        let data = noise(3, 3 * CS as usize);
        let a = backup_full(&repo, "vm", &data).await;
        let before = fx.all_objects().await;
        let e = Repository::open(fx.loc.clone(), Some(KeySource::Passphrase("wrong".into())))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("passphrase"), "{e}");
        let e = Repository::open(fx.loc.clone(), None).await.unwrap_err();
        assert!(matches!(e, RepoError::KeyRequired { .. }), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let e = Repository::open(
            fx.loc.clone(),
            Some(KeySource::KeyFile(tmp.path().join("nokey"))),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert_eq!(fx.all_objects().await, before, "nothing written");
        // change to a key file; the old passphrase stops working, data stays readable
        let kf = tmp.path().join("repo.key");
        repo.change_passphrase(KeySource::KeyFile(kf.clone()))
            .await
            .unwrap();
        assert!(matches!(
            Repository::open(
                fx.loc.clone(),
                Some(KeySource::Passphrase("correct horse".into()))
            )
            .await,
            Err(RepoError::WrongKey { .. })
        ));
        let other = tmp.path().join("other.key");
        let r2 = Repository::init(
            Location::Local {
                path: tmp.path().join("other"),
                fsync: false,
            },
            InitOptions {
                encryption: Some(KeySource::KeyFile(other.clone())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        drop(r2);
        assert!(matches!(
            Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(other))).await,
            Err(RepoError::WrongKey { .. })
        ));
        let repo = Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(kf)))
            .await
            .unwrap();
        assert_eq!(restore(&repo, &a.id, "vda").await, data);
        // chunk objects never contain the plaintext
        let be = repo.backend();
        let ix = repo.fixed_index(&a.id, "vda").await.unwrap();
        let blob = be.get(&chunk_key(&ix.digests[0])).await.unwrap().unwrap();
        assert!(!blob.windows(64).any(|w| w == &data[..64]));
        // re-init refused
        assert!(matches!(
            Repository::init(fx.loc.clone(), InitOptions::default()).await,
            Err(RepoError::AlreadyExists(_))
        ));
        fx.cleanup().await;
    })
}

fn corruption_detected(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let tmp = tempfile::tempdir().unwrap();
        let repo = new_repo(
            &fx,
            Some(KeySource::KeyFile(tmp.path().join("k"))),
            Duration::from_secs(3600),
        )
        .await;
        let da = noise(4, 4 * CS as usize);
        let mut db = da.clone();
        db[3 * CS as usize..].copy_from_slice(&noise(5, CS as usize));
        let a = backup_full(&repo, "vma", &da).await;
        let b = backup_full(&repo, "vmb", &db).await;
        let ia = repo.fixed_index(&a.id, "vda").await.unwrap();
        let ib = repo.fixed_index(&b.id, "vda").await.unwrap();
        let shared = ia.digests[1];
        let only_b = ib.digests[3];
        let be = repo.backend();
        let mut blob = be.get(&chunk_key(&shared)).await.unwrap().unwrap().to_vec();
        let mid = blob.len() / 2;
        blob[mid] ^= 0x01;
        be.put(&chunk_key(&shared), Bytes::from(blob))
            .await
            .unwrap();
        be.delete(&chunk_key(&only_b)).await.unwrap();
        // The cheap check (listing, no download) finds the deleted chunk only: the
        // changed one still exists under its name.
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All))
            .await
            .unwrap();
        assert!(!r.is_ok());
        assert!(!r.read_data);
        assert!(r.corrupt.is_empty(), "{r:?}");
        assert_eq!(r.missing.len(), 1, "{r:?}");
        assert_eq!(r.missing[0].digest, hex::encode(only_b));
        assert_eq!(r.missing[0].snapshots, vec![b.id.clone()]);
        assert_eq!(r.broken_snapshots, vec![b.id.clone()]);
        assert_eq!(r.chunks_checked, r.chunks_ok + 1);
        assert_eq!(r.chunks_checked, 5, "{r:?}");
        // Reading the data finds both.
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All).with_read_data())
            .await
            .unwrap();
        assert!(!r.is_ok());
        assert!(r.read_data);
        assert_eq!(r.corrupt.len(), 1);
        assert_eq!(r.corrupt[0].digest, hex::encode(shared));
        let mut s = r.corrupt[0].snapshots.clone();
        s.sort();
        let mut both = vec![a.id.clone(), b.id.clone()];
        both.sort();
        assert_eq!(s, both);
        assert_eq!(r.missing.len(), 1);
        assert_eq!(r.missing[0].digest, hex::encode(only_b));
        assert_eq!(r.missing[0].snapshots, vec![b.id.clone()]);
        assert_eq!(r.broken_snapshots, both);
        // restore fails with an error naming the chunk
        let rd = repo.disk_reader(&a.id, "vda").await.unwrap();
        let e = rd.read_chunk(1).await.unwrap_err();
        assert!(e.to_string().contains(&hex::encode(shared)), "{e}");
        // selective verify of A only reports A
        let only_a = VerifyOptions::new(VerifySelection::Snapshots(vec![a.id.clone()]));
        let r = repo.verify(only_a.clone().with_read_data()).await.unwrap();
        assert_eq!(r.broken_snapshots, vec![a.id.clone()]);
        assert!(r.missing.is_empty());
        // (without reading, A's chunks are all there)
        let r = repo.verify(only_a).await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        fx.cleanup().await;
    })
}

fn prune_forget_protected(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let mut ids = Vec::new();
        for day in 1..=4u8 {
            let w = repo
                .begin_backup(BackupMeta {
                    time: Some(
                        time::macros::datetime!(2026-01-01 12:00 UTC)
                            .replace_day(day)
                            .unwrap(),
                    ),
                    ..meta("vm", None)
                })
                .await
                .unwrap();
            let d = w.disk(spec("vda", CS), None).await.unwrap();
            d.write_chunk(0, Bytes::from(noise(day as u64, CS as usize)))
                .await
                .unwrap();
            d.finish().await.unwrap();
            ids.push(w.finish(serde_json::Value::Null).await.unwrap().id);
        }
        repo.set_protected(&ids[0], true).await.unwrap();
        assert!(matches!(
            repo.forget(&ids[0]).await,
            Err(RepoError::Protected(_))
        ));
        let policy = KeepPolicy {
            last: Some(2),
            ..Default::default()
        };
        let dry = repo.prune(&policy, None, true).await.unwrap();
        let keep: Vec<_> = dry
            .iter()
            .map(|d| (d.id.clone(), d.keep, d.reason.clone()))
            .collect();
        assert_eq!(
            keep,
            vec![
                (ids[3].clone(), true, "keep-last".into()),
                (ids[2].clone(), true, "keep-last".into()),
                (
                    ids[1].clone(),
                    false,
                    "not selected by any keep option".into()
                ),
                (ids[0].clone(), true, "protected".into()),
            ]
        );
        assert_eq!(
            repo.snapshots().await.unwrap().len(),
            4,
            "dry run removes nothing"
        );
        repo.prune(&policy, Some(("hv1", "vm")), false)
            .await
            .unwrap();
        let left: Vec<_> = repo
            .snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(left, vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]);
        // S3 timestamps have whole seconds: a chunk written in the second GC takes as
        // "now" is (rightly) too recent to remove, even with no grace.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let g = repo
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            })
            .await
            .unwrap();
        assert_eq!(g.chunks_removed, 1, "{g:?}");
        assert_eq!(g.chunks_kept, 3);
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        repo.set_protected(&ids[0], false).await.unwrap();
        repo.forget(&ids[0]).await.unwrap();
        assert!(matches!(
            repo.manifest(&ids[0]).await,
            Err(RepoError::SnapshotNotFound(_))
        ));
        fx.cleanup().await;
    })
}

fn concurrent_backup_and_gc(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let n = 12usize;
        // X: published then forgotten → its chunks are unreferenced and old
        let xdata = noise(10, n * CS as usize);
        let x = backup_full(&repo, "vmx", &xdata).await;
        // P: the parent of the running backup
        let pdata = noise(11, n * CS as usize);
        let p = backup_full(&repo, "vmp", &pdata).await;
        let xix = repo.fixed_index(&x.id, "vda").await.unwrap();
        repo.forget(&x.id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // running backup B: half of X's data (old unreferenced chunks), P's data (parent),
        // and new data, with GC running all the time
        let prev = repo.fixed_index(&p.id, "vda").await.unwrap();
        let w = repo
            .begin_backup(meta("vmp", Some(p.id.clone())))
            .await
            .unwrap();
        let d = w
            .disk(spec("vda", (3 * n) as u64 * CS), Some(&prev))
            .await
            .unwrap();
        // forgetting the parent of a running backup is refused
        assert!(matches!(
            repo.forget(&p.id).await,
            Err(RepoError::InUse { .. })
        ));
        let mut expect = pdata.clone();
        expect.resize(3 * n * CS as usize, 0);
        let gc_repo = repo.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let gc = tokio::spawn(async move {
            let mut runs = 0;
            let mut removed = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) || runs == 0 {
                match gc_repo
                    .gc(GcOptions {
                        grace: Duration::ZERO,
                        dry_run: false,
                    })
                    .await
                {
                    Ok(r) => {
                        runs += 1;
                        removed += r.chunks_removed;
                    }
                    Err(RepoError::GcRunning { .. }) => {}
                    Err(e) => panic!("gc: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (runs, removed)
        });
        for i in 0..n {
            let (slot, data) = if i % 2 == 0 {
                // old chunk of X, found by HEAD
                (
                    n + i,
                    xdata[i * CS as usize..(i + 1) * CS as usize].to_vec(),
                )
            } else {
                (n + i, noise(1000 + i as u64, CS as usize))
            };
            expect[slot * CS as usize..(slot + 1) * CS as usize].copy_from_slice(&data);
            d.write_chunk(slot as u64, Bytes::from(data)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // one slot rewritten with the parent's own data
        d.write_chunk(2 * n as u64, Bytes::copy_from_slice(&pdata[..CS as usize]))
            .await
            .unwrap();
        expect[2 * n * CS as usize..(2 * n + 1) * CS as usize]
            .copy_from_slice(&pdata[..CS as usize]);
        d.finish().await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (runs, removed) = gc.await.unwrap();
        assert!(runs >= 1);
        let b = w.finish(serde_json::Value::Null).await.unwrap();
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All).with_read_data())
            .await
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(restore(&repo, &b.id, "vda").await, expect);
        // after the backup: the rest of X goes
        let g = repo
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            })
            .await
            .unwrap();
        // (a chunk of X may have been swept before B reached it, then re-uploaded by B)
        assert!(
            removed + g.chunks_removed >= (n / 2) as u64,
            "{removed} {g:?}"
        );
        for (i, dg) in xix.digests.iter().enumerate() {
            let present = repo.backend().head(&chunk_key(dg)).await.unwrap().is_some();
            assert_eq!(present, i % 2 == 0, "chunk {i} of X");
        }
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        fx.cleanup().await;
    })
}

fn create_only_put(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let be = fx.loc.backend().unwrap();
        assert_eq!(
            be.put_if_absent("t/a", Bytes::from_static(b"one"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            be.put_if_absent("t/a", Bytes::from_static(b"two"))
                .await
                .unwrap(),
            PutOutcome::Existed
        );
        assert_eq!(&be.get("t/a").await.unwrap().unwrap()[..], b"one");
        assert!(be.head("t/missing").await.unwrap().is_none());
        assert!(be.get("t/missing").await.unwrap().is_none());
        be.delete("t/missing").await.unwrap();
        fx.cleanup().await;
    })
}

fn abort_leaves_nothing_visible(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let w = repo.begin_backup(meta("vm", None)).await.unwrap();
        let d = w.disk(spec("vda", 2 * CS), None).await.unwrap();
        d.write_chunk(0, Bytes::from(noise(7, CS as usize)))
            .await
            .unwrap();
        d.finish().await.unwrap();
        // a second writer with an unfinished disk cannot publish
        let w2 = repo.begin_backup(meta("vm2", None)).await.unwrap();
        let _d2 = w2.disk(spec("vda", CS), None).await.unwrap();
        assert!(matches!(
            w2.finish(serde_json::Value::Null).await,
            Err(RepoError::WriterState(_))
        ));
        w.abort().await.unwrap();
        assert!(repo.snapshots().await.unwrap().is_empty());
        let g = repo
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: true,
            })
            .await
            .unwrap();
        assert!(g.dry_run);
        fx.cleanup().await;
    })
}

fn tampered_metadata_refused(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let tmp = tempfile::tempdir().unwrap();
        let repo = new_repo(
            &fx,
            Some(KeySource::KeyFile(tmp.path().join("k"))),
            Duration::from_secs(3600),
        )
        .await;
        let a = backup_full(&repo, "vma", &noise(1, 2 * CS as usize)).await;
        let b = backup_full(&repo, "vmb", &noise(2, 2 * CS as usize)).await;
        let be = repo.backend();
        // swap A's index into B's place
        let ia = be
            .get(&format!("snapshots/{}/vda.fidx", a.id))
            .await
            .unwrap()
            .unwrap();
        be.put(&format!("snapshots/{}/vda.fidx", b.id), ia)
            .await
            .unwrap();
        assert!(matches!(
            repo.fixed_index(&b.id, "vda").await,
            Err(RepoError::Corrupt { .. })
        ));
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All).with_read_data())
            .await
            .unwrap();
        assert_eq!(r.broken_snapshots, vec![b.id.clone()]);
        // The cheap check authenticates indexes too.
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All))
            .await
            .unwrap();
        assert_eq!(r.broken_snapshots, vec![b.id.clone()]);
        assert_eq!(r.metadata_errors.len(), 1, "{r:?}");
        // GC refuses to sweep with an unreadable index
        assert!(
            repo.gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false
            })
            .await
            .is_err()
        );
        fx.cleanup().await;
    })
}

both_backends!(gc_mid_backup_keeps_everything_the_backup_uses);

/// Deterministic interleaving: old unreferenced chunks reused by a running backup, a new
/// chunk, and a GC between the writes and publication.
fn gc_mid_backup_keeps_everything_the_backup_uses(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let xdata = noise(20, 4 * CS as usize);
        let x = backup_full(&repo, "vmx", &xdata).await;
        let xix = repo.fixed_index(&x.id, "vda").await.unwrap();
        repo.forget(&x.id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let w = repo.begin_backup(meta("vmy", None)).await.unwrap();
        let d = w.disk(spec("vda", 2 * CS), None).await.unwrap();
        d.write_chunk(0, Bytes::copy_from_slice(&xdata[..CS as usize]))
            .await
            .unwrap();
        d.write_chunk(1, Bytes::from(noise(21, CS as usize)))
            .await
            .unwrap();
        d.finish().await.unwrap();
        let g = repo
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            })
            .await
            .unwrap();
        assert_eq!(g.chunks_removed, 3, "{g:?}");
        assert_eq!(g.live_leases, 1);
        assert!(
            repo.backend()
                .head(&chunk_key(&xix.digests[0]))
                .await
                .unwrap()
                .is_some()
        );
        let m = w.finish(serde_json::Value::Null).await.unwrap();
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        let mut expect = xdata[..CS as usize].to_vec();
        expect.extend(noise(21, CS as usize));
        assert_eq!(restore(&repo, &m.id, "vda").await, expect);
        fx.cleanup().await;
    })
}

// -- hardening (issue 17) -----------------------------------------------------------------

both_backends!(
    kdf_parameters_are_bounded,
    prune_deletes_only_keys_it_derives,
    unreadable_manifest_is_isolated,
    gc_collects_stale_temp_objects,
    failed_backup_releases_its_lease,
);

/// Rewrites `config` with `edit` applied to its JSON.
async fn edit_config(fx: &Fx, edit: impl FnOnce(&mut serde_json::Value)) {
    let be = fx.loc.backend().unwrap();
    let raw = be.get("config").await.unwrap().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    edit(&mut cfg);
    be.put("config", Bytes::from(serde_json::to_vec(&cfg).unwrap()))
        .await
        .unwrap();
}

/// A config whose argon2id parameters would make `open` run for hours or allocate
/// without limit is refused at once, naming the parameter.
fn kdf_parameters_are_bounded(kind: Kind) {
    let rt = rt();
    let fx = fx(kind);
    let pass = || Some(KeySource::Passphrase("correct horse".into()));
    rt.block_on(new_repo(&fx, pass(), Duration::from_secs(3600)));
    let cases: [(&str, u64, &str); 3] = [
        ("t", 4_000_000_000, "t = 4000000000"),
        ("m_kib", 1 << 22, "m_kib = 4194304"),
        ("p", 0, "p = 0"),
    ];
    for (field, value, expect) in cases {
        let original = rt.block_on(async {
            let mut original = serde_json::Value::Null;
            edit_config(&fx, |c| {
                original = c["encryption"]["kdf"][field].clone();
                c["encryption"]["kdf"][field] = value.into();
            })
            .await;
            original
        });
        let res = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                Repository::open(fx.loc.clone(), pass()),
            )
            .await
        });
        let err = match res {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("{field} = {value} accepted"),
            Err(_) => {
                // Without the bound the derivation runs on a blocking thread: do not
                // wait for it when the runtime goes.
                rt.shutdown_background();
                panic!("open with {field} = {value} did not return in 20 s");
            }
        };
        assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(expect), "{err}");
        rt.block_on(edit_config(&fx, |c| {
            c["encryption"]["kdf"][field] = original
        }));
    }
    rt.block_on(async {
        Repository::open(fx.loc.clone(), pass()).await.unwrap();
        fx.cleanup().await;
    });
}

/// An unencrypted meta blob around `payload` (magic, CRC32 of the rest, payload).
fn plain_meta(payload: &[u8]) -> Bytes {
    let mut out = MAGIC_META_PLAIN.to_vec();
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A manifest (unencrypted v1 repositories only have a CRC) naming `config` as its
/// index: prune forgets the backup and deletes the backup's own index, never `config`.
fn prune_deletes_only_keys_it_derives(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo_v1(&fx, None, Duration::ZERO).await;
        let a = backup_full(&repo, "vm", &noise(30, 2 * CS as usize)).await;
        let b = backup_full(&repo, "vm", &noise(31, 2 * CS as usize)).await;
        let be = repo.backend().clone();
        let key = format!("snapshots/{}/manifest", a.id);
        let blob = be.get(&key).await.unwrap().unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&blob[12..]).unwrap();
        m["disks"][0]["index"] = "config".into();
        be.put(&key, plain_meta(&serde_json::to_vec(&m).unwrap()))
            .await
            .unwrap();
        assert_eq!(repo.manifest(&a.id).await.unwrap().disks[0].index, "config");
        let policy = KeepPolicy {
            last: Some(1),
            ..Default::default()
        };
        let d = repo.prune(&policy, None, false).await.unwrap();
        assert_eq!(d.iter().filter(|d| !d.keep).count(), 1, "{d:?}");
        assert!(
            be.head("config").await.unwrap().is_some(),
            "prune deleted config"
        );
        let a_index = format!("snapshots/{}/vda.fidx", a.id);
        assert!(
            be.head(&a_index).await.unwrap().is_none(),
            "index left behind"
        );
        let repo = Repository::open(fx.loc.clone(), None).await.unwrap();
        let ids: Vec<_> = repo
            .snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, vec![b.id.clone()]);
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        fx.cleanup().await;
    })
}

/// One corrupt manifest: listing and prune go on without it and name it, GC refuses to
/// sweep and says how to forget it, forget removes it (refusing while protected).
fn unreadable_manifest_is_isolated(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let tmp = tempfile::tempdir().unwrap();
        let repo = new_repo(
            &fx,
            Some(KeySource::KeyFile(tmp.path().join("k"))),
            Duration::ZERO,
        )
        .await;
        let a1 = backup_full(&repo, "vm1", &noise(40, 2 * CS as usize)).await;
        let bad = backup_full(&repo, "vm1", &noise(41, 2 * CS as usize)).await;
        let a2 = backup_full(&repo, "vm1", &noise(42, 2 * CS as usize)).await;
        let c = backup_full(&repo, "vm2", &noise(43, 2 * CS as usize)).await;
        let be = repo.backend().clone();
        let key = format!("snapshots/{}/manifest", bad.id);
        let mut blob = be.get(&key).await.unwrap().unwrap().to_vec();
        let mid = blob.len() / 2;
        blob[mid] ^= 0x01;
        be.put(&key, Bytes::from(blob)).await.unwrap();

        let listing = repo.list_snapshots().await.unwrap();
        let ids: Vec<_> = listing.snapshots.iter().map(|s| s.id.clone()).collect();
        assert_eq!(ids, vec![a1.id.clone(), a2.id.clone(), c.id.clone()]);
        assert_eq!(listing.unreadable.len(), 1);
        assert_eq!(listing.unreadable[0].id, bad.id);
        assert!(
            listing.unreadable[0].error.contains("manifest"),
            "{:?}",
            listing.unreadable
        );
        assert_eq!(repo.snapshots().await.unwrap().len(), 3);

        let policy = KeepPolicy {
            last: Some(1),
            ..Default::default()
        };
        let report = repo.prune_report(&policy, None, false).await.unwrap();
        assert_eq!(report.unreadable, listing.unreadable);
        let removed: Vec<_> = report
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.clone())
            .collect();
        assert_eq!(removed, vec![a1.id.clone()]);
        assert!(report.decisions.iter().all(|d| d.id != bad.id));

        let gc = GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        };
        let err = repo.gc(gc).await.unwrap_err();
        assert!(matches!(err, RepoError::UnreadableBackup { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("virtkeep forget {}", bad.id)),
            "{err}"
        );

        be.put(
            &format!("snapshots/{}/protected", bad.id),
            Bytes::from_static(b"1"),
        )
        .await
        .unwrap();
        assert!(matches!(
            repo.forget(&bad.id).await,
            Err(RepoError::Protected(_))
        ));
        be.delete(&format!("snapshots/{}/protected", bad.id))
            .await
            .unwrap();
        repo.forget(&bad.id).await.unwrap();
        assert!(repo.list_snapshots().await.unwrap().unreadable.is_empty());
        let objs = fx.all_objects().await;
        assert!(!objs.iter().any(|(k, _)| k.contains(&bad.id)), "{objs:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let g = repo.gc(gc).await.unwrap();
        assert!(g.chunks_removed >= 2, "{g:?}");
        assert!(
            repo.verify(VerifyOptions::new(VerifySelection::All).with_read_data())
                .await
                .unwrap()
                .is_ok()
        );
        assert_eq!(
            restore(&repo, &a2.id, "vda").await,
            noise(42, 2 * CS as usize)
        );
        fx.cleanup().await;
    })
}

/// `.tmp-*` objects of writes that died half-way are removed by GC once older than its
/// cutoff (listings never show them).
fn gc_collects_stale_temp_objects(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let a = backup_full(&repo, "vm", &noise(50, 2 * CS as usize)).await;
        let be = repo.backend().clone();
        let temps = [
            "chunks/abc/.tmp-abcdef-0123",
            "snapshots/x/.tmp-manifest-4567",
            ".tmp-config-89ab",
        ];
        for t in temps {
            be.put(t, Bytes::from_static(b"half")).await.unwrap();
        }
        assert!(
            !fx.all_objects()
                .await
                .iter()
                .any(|(k, _)| k.contains(".tmp-"))
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let mut gc = GcOptions {
            grace: Duration::ZERO,
            dry_run: true,
        };
        assert_eq!(repo.gc(gc).await.unwrap().temp_removed, 3);
        assert!(
            be.head(temps[0]).await.unwrap().is_some(),
            "dry run deleted"
        );
        gc.dry_run = false;
        let g = repo.gc(gc).await.unwrap();
        assert_eq!(g.temp_removed, 3, "{g:?}");
        assert_eq!(g.chunks_removed, 0, "{g:?}");
        for t in temps {
            assert!(be.head(t).await.unwrap().is_none(), "{t} left");
        }
        // A recent one stays.
        gc.grace = Duration::from_secs(3600);
        be.put(temps[0], Bytes::from_static(b"half")).await.unwrap();
        assert_eq!(repo.gc(gc).await.unwrap().temp_removed, 0);
        assert!(be.head(temps[0]).await.unwrap().is_some());
        assert_eq!(
            restore(&repo, &a.id, "vda").await,
            noise(50, 2 * CS as usize)
        );
        fx.cleanup().await;
    })
}

async fn leases(fx: &Fx) -> Vec<String> {
    fx.all_objects()
        .await
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("locks/backup-"))
        .collect()
}

/// A backup that fails (its writer dropped mid-way, or `finish` refusing) releases its
/// lease at once: its base can be forgotten and GC's cutoff is not held back.
fn failed_backup_releases_its_lease(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        let a = backup_full(&repo, "vm", &noise(60, 2 * CS as usize)).await;
        let ix = repo.fixed_index(&a.id, "vda").await.unwrap();
        let w = repo
            .begin_backup(meta("vm", Some(a.id.clone())))
            .await
            .unwrap();
        let d = w.disk(spec("vda", 2 * CS), Some(&ix)).await.unwrap();
        d.write_chunk(0, Bytes::from(noise(61, CS as usize)))
            .await
            .unwrap();
        assert_eq!(leases(&fx).await.len(), 1);
        assert!(matches!(
            repo.forget(&a.id).await,
            Err(RepoError::InUse { .. })
        ));
        drop(d);
        drop(w); // the engine's `?` on a failed export
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !leases(&fx).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "lease kept: {:?}",
                leases(&fx).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // finish refusing to publish releases it too
        let w2 = repo.begin_backup(meta("vm", None)).await.unwrap();
        let _d2 = w2.disk(spec("vda", CS), None).await.unwrap();
        assert!(matches!(
            w2.finish(serde_json::Value::Null).await,
            Err(RepoError::WriterState(_))
        ));
        assert!(leases(&fx).await.is_empty(), "{:?}", leases(&fx).await);
        repo.forget(&a.id).await.unwrap();
        fx.cleanup().await;
    })
}

/// Directories 0700 and objects 0600 whatever the umask (filesystem only: S3 has no
/// modes), and a warning when an existing repository is open to others.
#[test]
fn repository_is_private_under_umask_022() {
    use std::os::unix::fs::PermissionsExt;
    set_umask(0o022);
    rt().block_on(async {
        let fx = fx(Kind::Fs);
        let tmp = tempfile::tempdir().unwrap();
        let repo = new_repo(
            &fx,
            Some(KeySource::KeyFile(tmp.path().join("k"))),
            Duration::ZERO,
        )
        .await;
        backup_full(&repo, "vm", &noise(70, 3 * CS as usize)).await;
        let Location::Local { path: root, .. } = fx.loc.clone() else {
            unreachable!()
        };
        let mut stack = vec![root.clone()];
        let (mut dirs, mut files) = (0, 0);
        while let Some(dir) = stack.pop() {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
            dirs += 1;
            for e in std::fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "{}", e.path().display());
                    files += 1;
                }
            }
        }
        assert!(dirs >= 4 && files >= 5, "{dirs} dirs, {files} files");
        let key = Some(KeySource::KeyFile(tmp.path().join("k")));
        let r = Repository::open(fx.loc.clone(), key.clone()).await.unwrap();
        assert!(r.warnings().is_empty(), "{:?}", r.warnings());
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = Repository::open(fx.loc.clone(), key).await.unwrap();
        assert_eq!(r.warnings().len(), 1);
        assert!(
            r.warnings()[0].contains("chmod -R go-rwx"),
            "{:?}",
            r.warnings()
        );
    })
}

/// `umask(2)`: process-wide, and nextest runs every test in its own process.
#[allow(unsafe_code)]
fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(mask);
    }
}

// -- authenticated metadata, format v2 (issues 16 and 17) ---------------------------------

both_backends!(
    unencrypted_metadata_is_authenticated,
    v1_repository_reads_with_a_warning_and_upgrades,
    kdf_parameters_are_authenticated,
);

/// Re-writes an authenticated (v2) meta blob's payload with `edit` and recomputes its CRC,
/// as an attacker with write access to the storage can.
async fn tamper_meta(
    be: &std::sync::Arc<dyn ChunkBackend>,
    key: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) {
    let blob = be.get(key).await.unwrap().unwrap();
    assert_eq!(blob[..8], *MAGIC_META_AUTH, "{key} is not authenticated");
    let mut payload = blob[12 + 32..].to_vec();
    edit(&mut payload);
    let mut out = blob[..12 + 32].to_vec();
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    be.put(key, Bytes::from(out)).await.unwrap();
}

/// The attack of issue 16 on an unencrypted repository: a manifest whose disk source was
/// edited (CRC recomputed), an index whose digest was changed, an index moved from one
/// backup to another. Listing names them as failing authentication, verify reports them,
/// prune never acts on them, and reading them (what restore does) is refused.
fn unencrypted_metadata_is_authenticated(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo(&fx, None, Duration::ZERO).await;
        assert_eq!(repo.format_version(), 2);
        let data = noise(80, 2 * CS as usize);
        let a = backup_full(&repo, "vm", &data).await;
        let b = backup_full(&repo, "vm", &noise(81, 2 * CS as usize)).await;
        let c = backup_full(&repo, "vm", &noise(82, 2 * CS as usize)).await;
        let d = backup_full(&repo, "vm", &noise(83, 2 * CS as usize)).await;
        let be = repo.backend().clone();
        tamper_meta(&be, &format!("snapshots/{}/manifest", a.id), |p| {
            let mut m: serde_json::Value = serde_json::from_slice(p).unwrap();
            m["disks"][0]["source"] = "/etc/cron.d/evil".into();
            *p = serde_json::to_vec(&m).unwrap();
        })
        .await;
        tamper_meta(&be, &format!("snapshots/{}/vda.fidx", b.id), |p| {
            let last = p.len() - 1;
            p[last] ^= 1;
        })
        .await;
        let moved = be
            .get(&format!("snapshots/{}/vda.fidx", d.id))
            .await
            .unwrap()
            .unwrap();
        be.put(&format!("snapshots/{}/vda.fidx", c.id), moved)
            .await
            .unwrap();

        let repo = fx.open_plain().await;
        let listing = repo.list_snapshots().await.unwrap();
        let ids: Vec<_> = listing.snapshots.iter().map(|s| s.id.clone()).collect();
        assert!(!ids.contains(&a.id), "{ids:?}");
        assert_eq!(listing.unreadable.len(), 1, "{:?}", listing.unreadable);
        assert_eq!(listing.unreadable[0].id, a.id);
        assert!(
            listing.unreadable[0]
                .error
                .contains("authentication failed"),
            "{:?}",
            listing.unreadable
        );
        assert!(matches!(
            repo.manifest(&a.id).await,
            Err(RepoError::Corrupt { .. })
        ));
        for id in [&b.id, &c.id] {
            let e = repo.fixed_index(id, "vda").await.unwrap_err();
            assert!(e.to_string().contains("authentication failed"), "{e}");
            assert!(repo.disk_reader(id, "vda").await.is_err());
        }
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All))
            .await
            .unwrap();
        let mut broken = vec![a.id.clone(), b.id.clone(), c.id.clone()];
        broken.sort();
        let mut got = r.broken_snapshots.clone();
        got.sort();
        assert_eq!(got, broken, "{r:?}");
        assert!(!r.is_ok());
        // prune never removes what it cannot read
        let policy = KeepPolicy {
            last: Some(1),
            ..Default::default()
        };
        let decisions = repo.prune(&policy, None, true).await.unwrap();
        assert!(decisions.iter().all(|x| x.id != a.id), "{decisions:?}");
        // the untouched backup still restores
        assert_eq!(
            restore(&repo, &d.id, "vda").await,
            noise(83, 2 * CS as usize)
        );

        // the key: missing, another one, a password
        let e = Repository::open(fx.loc.clone(), None).await.unwrap_err();
        assert!(matches!(e, RepoError::AuthKeyRequired { .. }), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let other = tmp.path().join("other.key");
        let r2 = Repository::init(
            Location::Local {
                path: tmp.path().join("r2"),
                fsync: false,
            },
            InitOptions {
                auth_key_file: Some(other.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        drop(r2);
        let e = Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(other)))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        let e = Repository::open(fx.loc.clone(), Some(KeySource::Passphrase("x".into())))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::KeyRequired { .. }), "{e}");
        // the config's id key is authenticated too
        edit_config(&fx, |c| c["id_key"] = hex::encode([1u8; 32]).into()).await;
        let e = Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(fx.key())))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("config authentication failed"),
            "{e}"
        );
        fx.cleanup().await;
    })
}

/// A repository the v1 writer made opens with a warning and reads as before; `upgrade`
/// authenticates every manifest and index (chunks untouched), after which the old
/// unauthenticated form is refused; an encrypted v1 config is re-written too.
fn v1_repository_reads_with_a_warning_and_upgrades(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let repo = new_repo_v1(&fx, None, Duration::ZERO).await;
        let data = noise(90, 3 * CS as usize);
        let a = backup_full(&repo, "vm", &data).await;
        let be = repo.backend().clone();
        let mkey = format!("snapshots/{}/manifest", a.id);
        let v1_manifest = be.get(&mkey).await.unwrap().unwrap();
        assert_eq!(v1_manifest[..8], *MAGIC_META_PLAIN);
        let chunks_before: Vec<_> = fx
            .all_objects()
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with("chunks/"))
            .collect();

        let repo = Repository::open(fx.loc.clone(), None).await.unwrap();
        assert_eq!(repo.format_version(), 1);
        assert!(
            repo.warnings().iter().any(|w| w.contains("format v1")
                && w.contains("not authenticated")
                && w.contains("virtkeep repo upgrade")),
            "{:?}",
            repo.warnings()
        );
        assert_eq!(restore(&repo, &a.id, "vda").await, data);
        // A key file for a v1 config: a downgraded config, refused outside an upgrade.
        let e = Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(fx.key())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("format v1"), "{e}");

        let repo = Repository::open_for_upgrade(fx.loc.clone(), None)
            .await
            .unwrap();
        let report = repo.upgrade(Some(fx.key())).await.unwrap();
        assert_eq!(report.from_version, 1);
        assert_eq!(report.to_version, 2);
        assert!(report.config_rewritten);
        assert_eq!(report.objects_authenticated, 2, "{report:?}");
        assert!(report.failed.is_empty(), "{report:?}");
        assert!(fx.key().is_file());

        let repo = fx.open_plain().await;
        assert_eq!(repo.format_version(), 2);
        assert!(repo.warnings().iter().all(|w| !w.contains("format v1")));
        assert_eq!(restore(&repo, &a.id, "vda").await, data);
        assert_eq!(be.get(&mkey).await.unwrap().unwrap()[..8], *MAGIC_META_AUTH);
        let chunks_after: Vec<_> = fx
            .all_objects()
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with("chunks/"))
            .collect();
        assert_eq!(chunks_after, chunks_before);
        // running it again changes nothing
        let again = repo.upgrade(None).await.unwrap();
        assert!(!again.config_rewritten);
        assert_eq!(again.objects_authenticated, 0);
        assert_eq!(again.objects_already_authenticated, 2);
        // the old, unauthenticated manifest put back: refused now
        be.put(&mkey, v1_manifest).await.unwrap();
        let e = repo.manifest(&a.id).await.unwrap_err();
        assert!(e.to_string().contains("not authenticated"), "{e}");
        let listing = repo.list_snapshots().await.unwrap();
        assert_eq!(listing.unreadable.len(), 1);
        // ... and so is the config lowered to v1 to have it accepted: by open with the
        // node's key file, and by an upgrade that would bless it
        edit_config(&fx, |c| c["version"] = 1.into()).await;
        let e = Repository::open(fx.loc.clone(), Some(KeySource::KeyFile(fx.key())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("changed outside virtkeep"), "{e}");
        let repo = Repository::open_for_upgrade(fx.loc.clone(), None)
            .await
            .unwrap();
        let e = repo.upgrade(Some(fx.key())).await.unwrap_err();
        assert!(e.to_string().contains("is authenticated (v2)"), "{e}");
        assert_eq!(
            be.get(&mkey).await.unwrap().unwrap()[..8],
            *MAGIC_META_PLAIN
        );
        fx.cleanup().await;

        // encrypted v1: opens with a warning, upgrade re-writes only the config
        let fx = common::fx(kind);
        let tmp = tempfile::tempdir().unwrap();
        let key = || Some(KeySource::KeyFile(tmp.path().join("k")));
        let repo = new_repo_v1(&fx, key(), Duration::ZERO).await;
        let a = backup_full(&repo, "vm", &data).await;
        let repo = Repository::open(fx.loc.clone(), key()).await.unwrap();
        assert!(repo.warnings().iter().any(|w| w.contains("format v1")));
        let report = repo.upgrade(None).await.unwrap();
        assert!(report.config_rewritten && report.key_file.is_none());
        let repo = Repository::open(fx.loc.clone(), key()).await.unwrap();
        assert_eq!(repo.format_version(), 2);
        assert!(repo.warnings().is_empty(), "{:?}", repo.warnings());
        assert_eq!(restore(&repo, &a.id, "vda").await, data);
        fx.cleanup().await;
    })
}

/// Format v2 binds the cipher and the KDF parameters to the wrapped master key and the
/// config MAC: a config whose parameters were changed (within the bounds) is refused
/// with a message that says so, and one whose cipher was changed does not open.
fn kdf_parameters_are_authenticated(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let pass = || Some(KeySource::Passphrase("correct horse".into()));
        new_repo(&fx, pass(), Duration::from_secs(3600)).await;
        let mut original = serde_json::Value::Null;
        edit_config(&fx, |c| {
            original = c.clone();
            c["encryption"]["kdf"]["t"] = 2.into();
        })
        .await;
        let e = Repository::open(fx.loc.clone(), pass()).await.unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("key derivation parameters"), "{e}");
        assert!(e.to_string().contains("t=2"), "{e}");
        edit_config(&fx, |c| {
            *c = original.clone();
            c["encryption"]["cipher"] = "none".into();
        })
        .await;
        let e = Repository::open(fx.loc.clone(), pass()).await.unwrap_err();
        assert!(e.to_string().contains("cipher"), "{e}");
        // the version cannot be lowered to skip the binding
        edit_config(&fx, |c| {
            *c = original.clone();
            c["version"] = 1.into();
        })
        .await;
        assert!(Repository::open(fx.loc.clone(), pass()).await.is_err());
        edit_config(&fx, |c| *c = original.clone()).await;
        Repository::open(fx.loc.clone(), pass()).await.unwrap();
        fx.cleanup().await;
    })
}

/// S3 without credentials fails at once, naming what to set, instead of asking the
/// cloud instance metadata service (169.254.169.254) and failing confusingly.
#[test]
#[allow(unsafe_code)]
fn s3_without_credentials_never_asks_instance_metadata() {
    let lab = virtkeep_lab::lab();
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SKIP_SIGNATURE",
    ] {
        // SAFETY: nextest runs each test in its own process; no other thread reads the
        // environment yet.
        unsafe { std::env::remove_var(var) };
    }
    let loc = |instance_metadata| Location::S3 {
        bucket: lab.s3_bucket.clone(),
        prefix: format!("vkt-repo-tests/{}", uuid::Uuid::new_v4().simple()),
        options: S3Options {
            endpoint: Some(lab.s3_endpoint.clone()),
            region: Some(lab.s3_region.clone()),
            access_key: None,
            secret_key: None,
            allow_http: true,
            instance_metadata,
        },
    };
    let started = std::time::Instant::now();
    let e = rt()
        .block_on(Repository::open(loc(false), None))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(e, RepoError::InvalidLocation(..)), "{e}");
    let msg = e.to_string();
    for want in [
        "no S3 credentials",
        "AWS_ACCESS_KEY_ID",
        "s3_instance_metadata",
    ] {
        assert!(msg.contains(want), "{msg}");
    }
    // Asked for, the backend is built (and would ask the metadata service).
    assert!(loc(true).backend().is_ok());
}

/// Object Lock: an incremental that takes chunks from its parent without reading them
/// still moves their retention (each backup's chunks are retained `retain` from its
/// start, less the grace). On the lab's RGW, in a bucket made with Object Lock; the
/// short retention lets the objects expire (the bucket is reused by later runs).
#[test]
fn s3_object_lock_incremental_extends_inherited_chunks() {
    let mut fx = fx(Kind::S3);
    if let Location::S3 { bucket, .. } = &mut fx.loc {
        *bucket = "vkt-lock-extend".into();
    }
    rt().block_on(async {
        let repo = Repository::init(
            fx.loc.clone(),
            InitOptions {
                chunk_size: CS,
                zstd_level: 1,
                encryption: None,
                min_gc_grace: Duration::from_secs(1),
                auth_key_file: Some(fx.key()),
                format_version: FORMAT_VERSION,
                object_lock: Some(ObjectLock {
                    mode: LockMode::Governance,
                    retain: Duration::from_secs(120),
                }),
            },
        )
        .await
        .unwrap();
        let data = noise(7, 2 * CS as usize);
        let a = backup_full(&repo, "vm", &data).await;
        let prev = repo.fixed_index(&a.id, "vda").await.unwrap();
        let listed: Vec<ObjectInfo> =
            futures::TryStreamExt::try_collect(repo.backend().list("chunks/"))
                .await
                .unwrap();
        let key = listed[0].key.clone();
        let before = repo.backend().head(&key).await.unwrap().unwrap().modified;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w = repo
            .begin_backup(meta("vm", Some(a.id.clone())))
            .await
            .unwrap();
        let d = w
            .disk(spec("vda", data.len() as u64), Some(&prev))
            .await
            .unwrap();
        d.finish().await.unwrap();
        w.finish(serde_json::json!({})).await.unwrap();
        let after = repo.backend().head(&key).await.unwrap().unwrap().modified;
        assert!(
            after >= before + Duration::from_secs(2),
            "retention of a reused chunk not extended: {before:?} -> {after:?}"
        );
        // The backup also extended the config's retention (it holds the keys).
        let config = repo
            .backend()
            .head("config")
            .await
            .unwrap()
            .unwrap()
            .modified;
        assert!(
            config >= before + Duration::from_secs(2),
            "config retention not extended by the backup: {before:?} -> {config:?}"
        );
        locked_config_and_longer_retention(&fx, &repo, &key).await;
    });
}

/// The config (its keys) is retained: a versioned DELETE with the writer's keys is
/// refused and the repository still opens. A chunk retained longer than the
/// repository's retention (another writer, an administrator) is "extended" without
/// error: the extension asks for less, RGW refuses (403), and that is not a failure.
async fn locked_config_and_longer_retention(fx: &Fx, repo: &Repository, chunk: &str) {
    let Location::S3 {
        bucket,
        prefix,
        options,
    } = &fx.loc
    else {
        unreachable!("S3 fixture");
    };
    let plain = std::sync::Arc::new(S3Backend::new(bucket, prefix, options).unwrap());
    let refused = plain
        .delete_current_version("config", false)
        .await
        .expect_err("a versioned delete of the config was accepted");
    assert!(refused.to_string().contains("403"), "{refused}");
    fx.open_plain().await;
    let longer = plain
        .with_object_lock(ObjectLock {
            mode: LockMode::Governance,
            retain: Duration::from_secs(600),
        })
        .unwrap();
    assert!(longer.extend_retention(chunk).await.unwrap());
    assert!(
        repo.backend().extend_retention(chunk).await.unwrap(),
        "an extension asking for less than the object has failed"
    );
}

/// The filesystem backend with fsync on (the default): chunks written concurrently go
/// through the group barrier (`backend/group_sync.rs`), each lands whole under its name,
/// a second write of a name creates nothing, and no temporary file is left behind.
#[test]
fn fs_chunks_with_fsync_land_whole_through_the_group_barrier() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let be = Location::Local {
            path: tmp.path().join("repo"),
            fsync: true,
        }
        .backend()
        .unwrap();
        be.put("config", Bytes::from_static(b"c")).await.unwrap();
        let key = |i: usize| format!("chunks/{:03x}/{i:064x}", i % 3);
        let body = |i: usize| Bytes::from(noise(i as u64 + 7, 64 << 10));
        let writes = (0..24).map(|i| {
            let be = be.clone();
            tokio::spawn(async move { be.put_chunk(&key(i % 16), body(i % 16)).await })
        });
        let outcomes: Vec<PutOutcome> = futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let created = outcomes
            .iter()
            .filter(|o| **o == PutOutcome::Created)
            .count();
        assert_eq!(
            created, 16,
            "each of the 16 names is created once: {outcomes:?}"
        );
        be.put_if_absent("snapshots/x/vda.fidx", Bytes::from_static(b"i"))
            .await
            .unwrap();
        for i in 0..16 {
            assert_eq!(
                be.get(&key(i)).await.unwrap().unwrap(),
                body(i),
                "chunk {i}"
            );
        }
        let temps: Vec<_> = futures::TryStreamExt::try_collect(be.list_temp(""))
            .await
            .unwrap();
        assert!(temps.is_empty(), "{temps:?}");
    })
}
