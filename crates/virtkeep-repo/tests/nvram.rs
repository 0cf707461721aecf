//! The NVRAM artefact of a backup: stored and read back, kept by GC, checked by
//! verify, removed by forget; manifests without one read as having none.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use std::time::Duration;
use virtkeep_repo::*;

both_backends!(nvram_roundtrip_gc_verify_forget);

/// A backup of one disk plus NVRAM bytes.
async fn backup_with_nvram(repo: &Repository, data: &[u8], nvram: &[u8]) -> Manifest {
    let w = repo.begin_backup(meta("uefi", None)).await.unwrap();
    let d = w.disk(spec("vda", data.len() as u64), None).await.unwrap();
    for (i, c) in data.chunks(CS as usize).enumerate() {
        d.write_chunk(i as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    d.finish().await.unwrap();
    w.nvram("/var/lib/libvirt/qemu/nvram/uefi_VARS.fd", nvram)
        .await
        .unwrap();
    assert!(w.nvram("/x", nvram).await.is_err(), "stored twice");
    w.finish(serde_json::Value::Null).await.unwrap()
}

fn nvram_roundtrip_gc_verify_forget(kind: Kind) {
    rt().block_on(async {
        let fx = fx(kind);
        let tmp = tempfile::tempdir().unwrap();
        let key = KeySource::KeyFile(tmp.path().join("key"));
        let repo = new_repo(&fx, Some(key), Duration::from_secs(0)).await;
        // 2.5 chunks with a zero chunk in the middle and a short last chunk
        let mut nv = noise(7, 2 * CS as usize + 500);
        nv[CS as usize..2 * CS as usize].fill(0);
        let a = backup_with_nvram(&repo, &noise(1, 2 * CS as usize), &nv).await;
        let n = a.nvram.clone().unwrap();
        assert_eq!(
            (n.size, n.index.as_str()),
            (nv.len() as u64, &*format!("snapshots/{}/.nvram.fidx", a.id))
        );
        let m = repo.manifest(&a.id).await.unwrap();
        assert_eq!(repo.nvram(&m).await.unwrap().unwrap(), nv);
        // a backup without NVRAM has none
        let b = backup_full(&repo, "plain", &noise(2, CS as usize)).await;
        assert!(b.nvram.is_none());
        assert!(repo.nvram(&b).await.unwrap().is_none());
        // GC keeps the NVRAM chunks; verify --read-data reads them
        repo.gc(GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        })
        .await
        .unwrap();
        assert_eq!(repo.nvram(&m).await.unwrap().unwrap(), nv);
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All).with_read_data())
            .await
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
        // the NVRAM's own chunks (those no disk index names) are what verify must miss
        let mut disk_chunks = std::collections::HashSet::new();
        for (id, disk) in [(&a.id, "vda"), (&b.id, "vda")] {
            disk_chunks.extend(repo.fixed_index(id, disk).await.unwrap().digests);
        }
        let be = fx.loc.backend().unwrap();
        let mut removed = 0;
        for (k, _) in fx.all_objects().await {
            let own = k.starts_with("chunks/")
                && !disk_chunks.iter().any(|d| k.ends_with(&hex::encode(d)));
            if own {
                be.delete(&k).await.unwrap();
                removed += 1;
            }
        }
        assert_eq!(removed, 2, "two non-zero NVRAM chunks");
        let r = repo
            .verify(VerifyOptions::new(VerifySelection::All))
            .await
            .unwrap();
        assert!(!r.is_ok() && r.missing.len() == 2, "{r:?}");
        assert!(repo.nvram(&m).await.is_err());
        // a manifest naming another object as its NVRAM index is refused
        let mut forged = m.clone();
        forged.nvram.as_mut().unwrap().index = format!("snapshots/{}/vda.fidx", a.id);
        assert!(repo.nvram(&forged).await.is_err());
        let mut big = m.clone();
        big.nvram.as_mut().unwrap().size = MAX_NVRAM_SIZE + 1;
        assert!(repo.nvram(&big).await.is_err());
        // forget removes the NVRAM index with the backup
        repo.forget(&a.id).await.unwrap();
        let left: Vec<_> = fx
            .all_objects()
            .await
            .into_iter()
            .filter(|(k, _)| k.contains(&a.id))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        fx.cleanup().await;
    })
}

/// A manifest written before NVRAM was kept (no `nvram` key) reads as having none.
#[test]
fn old_manifest_reads_without_nvram() {
    let json = serde_json::json!({
        "version": 1, "id": "20261126T210000Z-1a2b3c4d", "host": "hv1", "vm": "web",
        "time": "2026-11-26T21:00:00Z", "mode": "full", "reason": "r", "parent": null,
        "protected": false, "domain_xml": "<domain/>", "disks": [],
        "stats": { "chunks_new": 0, "chunks_reused": 0, "chunks_zero": 0, "chunks_unchanged": 0,
                   "bytes_read": 0, "bytes_new": 0, "bytes_stored": 0, "duration_secs": 0.0 }
    });
    let m: Manifest = serde_json::from_value(json).unwrap();
    assert!(m.nvram.is_none());
    assert!(!serde_json::to_string(&m).unwrap().contains("nvram"));
}
