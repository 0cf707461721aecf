//! The UEFI variable store (NVRAM) of a backup: one more fixed index, under the
//! reserved artefact name `.nvram` (disk names never start with `.`, so it cannot clash
//! with a disk), recorded in the manifest's `nvram` field. Its chunks are stored,
//! deduplicated, encrypted and authenticated like a disk's; GC marks them, `verify`
//! checks them and `forget` removes the index with the backup's other indexes.

use std::time::SystemTime;

use bytes::Bytes;

use crate::error::{RepoError, Result};
use crate::format::{FixedIndex, ZERO_DIGEST, chunk_key, is_all_zero};
use crate::manifest::{Manifest, ManifestNvram};
use crate::repo::{Repository, check_name};
use crate::writer::BackupWriter;

/// The artefact name of the NVRAM index (`snapshots/<id>/.nvram.fidx`).
pub const NVRAM_ARTEFACT: &str = ".nvram";

/// The largest NVRAM store kept or restored (OVMF's are 128 KiB to 4 MiB; the host and
/// the repository are untrusted, so every read is bounded).
pub const MAX_NVRAM_SIZE: u64 = 64 << 20;

/// The object key of a backup's NVRAM index.
fn nvram_key(id: &str) -> String {
    format!("snapshots/{id}/{NVRAM_ARTEFACT}.fidx")
}

fn too_large(what: &str, size: u64) -> RepoError {
    RepoError::InvalidArgument(format!(
        "{what}: NVRAM of {size} bytes exceeds the limit of {MAX_NVRAM_SIZE}"
    ))
}

impl BackupWriter {
    /// Stores the VM's NVRAM bytes with this backup (at most once, before `finish`).
    pub async fn nvram(&self, source: &str, data: &[u8]) -> Result<()> {
        if data.len() as u64 > MAX_NVRAM_SIZE {
            return Err(too_large(source, data.len() as u64));
        }
        if self.nvram_entry().is_some() {
            return Err(RepoError::WriterState("NVRAM stored twice".into()));
        }
        let repo = self.repo().clone();
        let mut ix = FixedIndex::new_zero(repo.chunk_size(), data.len() as u64)?;
        for (i, part) in data.chunks(repo.chunk_size() as usize).enumerate() {
            if !is_all_zero(part) {
                ix.digests[i] = self.store_chunk(Bytes::copy_from_slice(part)).await?;
            }
        }
        let key = nvram_key(self.id());
        repo.put_meta(&key, ix.encode(), true).await?;
        self.set_nvram_entry(ManifestNvram {
            index: key,
            size: data.len() as u64,
            source: source.to_string(),
        });
        Ok(())
    }

    /// Uploads one chunk unless a fresh copy exists; an old copy is rewritten and
    /// rechecked at publish (a GC may have listed it), as for disks.
    async fn store_chunk(&self, data: Bytes) -> Result<crate::format::Digest> {
        let repo = self.repo().clone();
        let codec = repo.inner.codec.clone();
        let d2 = data.clone();
        let digest = tokio::task::spawn_blocking(move || codec.digest(&d2)).await?;
        let be = repo.backend().clone();
        let key = chunk_key(&digest);
        let fresh = |m: SystemTime| m + self.reuse_window() >= self.lease_start();
        let existing = be.head(&key).await?;
        if existing.as_ref().is_some_and(|h| fresh(h.modified)) {
            return Ok(digest);
        }
        let codec = repo.inner.codec.clone();
        let blob =
            tokio::task::spawn_blocking(move || codec.encode_chunk(&digest, &data)).await??;
        if existing.is_some() {
            be.put(&key, Bytes::from(blob)).await?;
            self.note_refreshed(digest);
        } else {
            be.put_if_absent(&key, Bytes::from(blob)).await?;
        }
        Ok(digest)
    }
}

impl Repository {
    /// The NVRAM index of a backup, if it has one.
    pub(crate) async fn nvram_index(&self, m: &Manifest) -> Result<Option<FixedIndex>> {
        let Some(n) = &m.nvram else {
            return Ok(None);
        };
        check_name("backup id", &m.id)?;
        // The key is derived, never taken from the manifest.
        let key = nvram_key(&m.id);
        if n.index != key {
            return Err(RepoError::corrupt(
                &key,
                "manifest names another NVRAM index",
            ));
        }
        if n.size > MAX_NVRAM_SIZE {
            return Err(too_large(&key, n.size));
        }
        let b = self
            .get_meta(&key)
            .await?
            .ok_or_else(|| RepoError::corrupt(&key, "NVRAM index missing"))?;
        let mut ix = FixedIndex::decode(&key, &b)?;
        if ix.size != n.size {
            return Err(RepoError::corrupt(
                &key,
                "NVRAM size differs from the manifest",
            ));
        }
        ix.snapshot = Some(m.id.clone());
        Ok(Some(ix))
    }

    /// The NVRAM bytes of a backup (`None` when it has none), every chunk checked.
    pub async fn nvram(&self, m: &Manifest) -> Result<Option<Vec<u8>>> {
        let Some(ix) = self.nvram_index(m).await? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(ix.size as usize);
        for i in 0..ix.chunk_count() {
            let len = ix.chunk_len(i) as usize;
            let d = ix.digests[i as usize];
            if d == ZERO_DIGEST {
                out.resize(out.len() + len, 0);
                continue;
            }
            let c = self.read_chunk_by_digest(&d).await?;
            if c.len() != len {
                return Err(RepoError::ChunkCorrupt {
                    digest: hex::encode(d),
                    reason: format!("NVRAM chunk of {} bytes, index says {len}", c.len()),
                });
            }
            out.extend_from_slice(&c);
        }
        Ok(Some(out))
    }
}
