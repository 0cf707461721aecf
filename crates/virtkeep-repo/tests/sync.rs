//! Copying backups between repositories (`Repository::copy_backup`): raw blobs when the
//! keys are shared, re-encoded otherwise, dedup in the destination, and a source that
//! lies is refused with nothing published.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use virtkeep_repo::*;

/// An encrypted repository (key file) in `fx`.
async fn encrypted(fx: &Fx) -> Repository {
    Repository::init(
        fx.loc.clone(),
        InitOptions {
            chunk_size: CS,
            encryption: Some(KeySource::KeyFile(fx.key())),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn chunks(repo: &Repository) -> Vec<(String, Bytes)> {
    let be = repo.backend();
    let infos: Vec<ObjectInfo> = be.list("chunks/").try_collect().await.unwrap();
    let mut out = Vec::new();
    for o in infos {
        let b = be.get(&o.key).await.unwrap().unwrap();
        out.push((o.key, b));
    }
    out.sort();
    out
}

#[test]
fn shared_keys_copy_blobs_as_stored() {
    rt().block_on(async {
        let (fa, fb) = (fx(Kind::Fs), fx(Kind::Fs));
        let a = encrypted(&fa).await;
        let data = noise(1, 5 * CS as usize + 100);
        let m = backup_full(&a, "web", &data).await;
        let opts = InitOptions {
            chunk_size: CS,
            encryption: Some(KeySource::KeyFile(fb.key())),
            ..Default::default()
        };
        let b = Repository::init_with_keys_of(fb.loc.clone(), opts, &a)
            .await
            .unwrap();
        assert!(b.shares_chunk_keys(&a));
        let st = b
            .copy_backup(&a, &m, &DigestMap::default(), &QuietCopy)
            .await
            .unwrap();
        assert_eq!(st.chunks_sent, 6);
        // The very bytes of the source: nothing was re-encrypted.
        assert_eq!(chunks(&a).await, chunks(&b).await);
        assert_eq!(restore(&b, &m.id, "vda").await, data);
        assert_eq!(b.manifest(&m.id).await.unwrap().disks, m.disks);
        // Again: present, nothing sent.
        assert!(b.has_backup(&m.id).await.unwrap());
    });
}

#[test]
fn keys_must_match_in_kind_and_chunk_size() {
    rt().block_on(async {
        let (fa, fb) = (fx(Kind::Fs), fx(Kind::Fs));
        let a = encrypted(&fa).await;
        let plain = InitOptions {
            chunk_size: CS,
            auth_key_file: Some(fb.key()),
            ..Default::default()
        };
        let e = Repository::init_with_keys_of(fb.loc.clone(), plain, &a)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("encrypted too"), "{e}");
        let other_size = InitOptions {
            chunk_size: CS * 2,
            encryption: Some(KeySource::KeyFile(fb.key())),
            ..Default::default()
        };
        let e = Repository::init_with_keys_of(fb.loc.clone(), other_size, &a)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("same size"), "{e}");
    });
}

/// Different keys: chunks are re-encoded, and a second backup's chunks seen before are
/// neither downloaded nor sent again.
#[test]
fn different_keys_reencode_and_dedup() {
    rt().block_on(async {
        let (fa, fb) = (fx(Kind::Fs), fx(Kind::Fs));
        let a = new_repo(&fa, None, std::time::Duration::from_secs(3600)).await;
        let b = encrypted(&fb).await;
        assert!(!b.shares_chunk_keys(&a));
        let mut data = noise(2, 8 * CS as usize);
        let m1 = backup_full(&a, "web", &data).await;
        data[3 * CS as usize..4 * CS as usize].copy_from_slice(&noise(3, CS as usize));
        let m2 = backup_full(&a, "web", &data).await;
        let map = DigestMap::default();
        let s1 = b.copy_backup(&a, &m1, &map, &QuietCopy).await.unwrap();
        assert_eq!(s1.chunks_sent, 8);
        let s2 = b.copy_backup(&a, &m2, &map, &QuietCopy).await.unwrap();
        assert_eq!((s2.chunks_sent, s2.chunks_skipped), (1, 7));
        let one_blob = chunks(&a).await[0].1.len() as u64;
        assert!(s2.bytes_fetched <= one_blob + 64, "{s2:?}");
        assert_eq!(chunks(&b).await.len(), 9);
        assert_eq!(restore(&b, &m2.id, "vda").await, data);
        // A fresh map learns the pairs from a backup present in both.
        let map2 = DigestMap::default();
        b.learn_digests(&a, &m1.id, &map2).await.unwrap();
        assert_eq!(map2.len(), 8);
    });
}

/// A source chunk that was altered, or replaced by another valid chunk, is refused and
/// the destination publishes nothing.
#[test]
fn lying_source_is_refused() {
    rt().block_on(async {
        for swap in [false, true] {
            let (fa, fb) = (fx(Kind::Fs), fx(Kind::Fs));
            let a = new_repo(&fa, None, std::time::Duration::from_secs(3600)).await;
            let data = noise(4, 4 * CS as usize);
            let m = backup_full(&a, "web", &data).await;
            let all = chunks(&a).await;
            let be = a.backend();
            let bad = if swap {
                all[1].1.clone()
            } else {
                let mut v = all[0].1.to_vec();
                let n = v.len();
                v[n - 1] ^= 1;
                Bytes::from(v)
            };
            be.put(&all[0].0, bad).await.unwrap();
            let opts = InitOptions {
                chunk_size: CS,
                auth_key_file: Some(fb.key()),
                ..Default::default()
            };
            let b = Repository::init_with_keys_of(fb.loc.clone(), opts, &a)
                .await
                .unwrap();
            let e = b
                .copy_backup(&a, &m, &DigestMap::default(), &QuietCopy)
                .await
                .unwrap_err();
            assert!(matches!(e, RepoError::ChunkCorrupt { .. }), "{swap}: {e}");
            assert!(!b.has_backup(&m.id).await.unwrap());
            assert!(b.snapshots().await.unwrap().is_empty());
        }
    });
}

/// The NVRAM index is copied with the disks.
#[test]
fn nvram_is_copied() {
    rt().block_on(async {
        let (fa, fb) = (fx(Kind::Fs), fx(Kind::Fs));
        let a = encrypted(&fa).await;
        let b = encrypted(&fb).await;
        let data = noise(5, 2 * CS as usize);
        let vars = noise(6, 3 * CS as usize / 2);
        let w = a.begin_backup(meta("uefi", None)).await.unwrap();
        let d = w.disk(spec("vda", data.len() as u64), None).await.unwrap();
        for (i, c) in data.chunks(CS as usize).enumerate() {
            d.write_chunk(i as u64, Bytes::copy_from_slice(c))
                .await
                .unwrap();
        }
        d.finish().await.unwrap();
        w.nvram("/var/lib/libvirt/qemu/nvram/uefi_VARS.fd", &vars)
            .await
            .unwrap();
        let m = w.finish(serde_json::json!({})).await.unwrap();
        b.copy_backup(&a, &m, &DigestMap::default(), &QuietCopy)
            .await
            .unwrap();
        let copied = b.manifest(&m.id).await.unwrap();
        assert_eq!(copied.nvram, m.nvram);
        assert_eq!(b.nvram(&copied).await.unwrap(), Some(vars));
        assert_eq!(restore(&b, &m.id, "vda").await, data);
    });
}
