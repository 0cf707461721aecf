//! Copying a backup from one repository into another (`virtkeep sync`), keeping
//! deduplication: only the chunks the destination lacks are sent, and the copy is
//! published like a backup (chunks, indexes, then the create-only manifest, under a
//! writer lease GC respects). See docs/format.md, "Sync between repositories".
//!
//! The source is untrusted: every chunk is decoded and checked against its digest and
//! its slot's length before it is stored; indexes and manifests are read through the
//! source's authentication and written anew under the destination's.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::{Digest, FixedIndex, ZERO_DIGEST, chunk_key};
use crate::manifest::{BackupMeta, Manifest};
use crate::repo::{Repository, manifest_key};
use crate::writer::DiskWriter;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CopyStats {
    /// Chunks uploaded to the destination.
    pub chunks_sent: u64,
    /// Chunks the destination already had (nothing uploaded).
    pub chunks_skipped: u64,
    /// All-zero chunks (never stored).
    pub chunks_zero: u64,
    /// Stored (encoded) bytes uploaded.
    pub bytes_sent: u64,
    /// Stored bytes downloaded from the source.
    pub bytes_fetched: u64,
}

impl CopyStats {
    /// Adds `o` to these counters.
    pub fn add(&mut self, o: &CopyStats) {
        self.chunks_sent += o.chunks_sent;
        self.chunks_skipped += o.chunks_skipped;
        self.chunks_zero += o.chunks_zero;
        self.bytes_sent += o.bytes_sent;
        self.bytes_fetched += o.bytes_fetched;
    }
}

/// Told about each chunk of a copy (progress; fault tests stop a sync here).
#[async_trait]
pub trait CopyObserver: Send + Sync {
    /// A chunk was uploaded to the destination (`bytes` stored).
    async fn chunk_sent(&self, _bytes: u64) {}
    /// A chunk the destination had already, or an all-zero one.
    fn chunk_skipped(&self) {}
}

/// A [`CopyObserver`] that does nothing.
pub struct QuietCopy;
impl CopyObserver for QuietCopy {}

/// Source digest → destination digest, for repositories with different keys: a chunk
/// seen before is recognised in the destination without downloading it.
#[derive(Debug, Default)]
pub struct DigestMap(Mutex<HashMap<Digest, Digest>>);

impl DigestMap {
    fn get(&self, d: &Digest) -> Option<Digest> {
        lock(&self.0).get(d).copied()
    }
    fn insert(&self, from: Digest, to: Digest) {
        lock(&self.0).insert(from, to);
    }
    /// Number of known pairs.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }
    /// No pairs known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Repository {
    /// Whether chunks of `other` are valid here as they are stored: same chunk-id key and
    /// same encryption key (`repo init --copy-keys-from`).
    pub fn shares_chunk_keys(&self, other: &Repository) -> bool {
        self.inner.codec.id_key == other.inner.codec.id_key
            && self.inner.master == other.inner.master
    }

    /// Whether backup `id` is published here (its manifest exists).
    pub async fn has_backup(&self, id: &str) -> Result<bool> {
        crate::repo::check_name("backup id", id)?;
        Ok(self.backend().head(&manifest_key(id)).await?.is_some())
    }

    /// Learns the digest pairs of backup `id`, published in both `src` and here, so that
    /// copying the next backup of its VM downloads only the chunks not seen before.
    pub async fn learn_digests(&self, src: &Repository, id: &str, map: &DigestMap) -> Result<()> {
        let m = self.manifest(id).await?;
        for d in &m.disks {
            let (a, b) = (
                src.fixed_index(id, &d.spec.name).await?,
                self.fixed_index(id, &d.spec.name).await?,
            );
            if a.digests.len() == b.digests.len() {
                for (x, y) in a.digests.iter().zip(&b.digests) {
                    if *x != ZERO_DIGEST && *y != ZERO_DIGEST {
                        map.insert(*x, *y);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies backup `m` of `src` here under the same id. Nothing is visible until the
    /// manifest is written last; a copy that fails or is killed leaves unpublished index
    /// objects (taken over by the next copy of that backup, else removed by GC) and
    /// chunks the next copy finds instead of sending them again.
    pub async fn copy_backup(
        &self,
        src: &Repository,
        m: &Manifest,
        map: &DigestMap,
        observer: &dyn CopyObserver,
    ) -> Result<CopyStats> {
        if self.chunk_size() != src.chunk_size() {
            return Err(RepoError::InvalidArgument(format!(
                "{} has {} byte chunks and {} {}: a sync needs the same chunk size",
                src.location(),
                src.chunk_size(),
                self.location(),
                self.chunk_size()
            )));
        }
        let meta = BackupMeta {
            host: m.host.clone(),
            vm: m.vm.clone(),
            mode: m.mode,
            reason: m.reason.clone(),
            parent: m.parent.clone(),
            domain_xml: m.domain_xml.clone(),
            time: Some(m.time),
        };
        let w = self.begin_copy(meta, &m.id).await?;
        let mut stats = CopyStats::default();
        for d in &m.disks {
            let ix = src.fixed_index(&m.id, &d.spec.name).await?;
            if ix.size != d.spec.size || ix.chunk_size != self.chunk_size() {
                return Err(RepoError::corrupt(
                    &d.index,
                    "index size or chunk size differs from the manifest",
                ));
            }
            let dw = w.disk(d.spec.clone(), None).await?;
            let job = ChunkCopy {
                src,
                dst: self,
                ix: &ix,
                dw: &dw,
                same: self.shares_chunk_keys(src),
                map,
                observer,
                stats: Mutex::new(CopyStats::default()),
            };
            stats.add(&job.run().await?);
            dw.finish().await?;
        }
        if let Some(n) = &m.nvram
            && let Some(data) = src.nvram(m).await?
        {
            w.nvram(&n.source, &data).await?;
        }
        w.finish_copy(m).await?;
        Ok(stats)
    }
}

/// The chunks of one disk index being copied.
struct ChunkCopy<'a> {
    src: &'a Repository,
    dst: &'a Repository,
    ix: &'a FixedIndex,
    dw: &'a DiskWriter,
    same: bool,
    map: &'a DigestMap,
    observer: &'a dyn CopyObserver,
    stats: Mutex<CopyStats>,
}

impl ChunkCopy<'_> {
    async fn run(self) -> Result<CopyStats> {
        // Bounded memory: each slot holds a stored blob and its plaintext.
        let width = self.dst.parallelism() * 2;
        futures::stream::iter(0..self.ix.chunk_count())
            .map(|i| self.one(i))
            .buffer_unordered(width)
            .try_collect::<()>()
            .await?;
        Ok(*lock(&self.stats))
    }

    fn skipped(&self) {
        lock(&self.stats).chunks_skipped += 1;
        self.observer.chunk_skipped();
    }

    async fn one(&self, i: u64) -> Result<()> {
        let d = self.ix.digests[i as usize];
        if d == ZERO_DIGEST {
            self.dw.zero_chunk(i)?;
            lock(&self.stats).chunks_zero += 1;
            self.observer.chunk_skipped();
            return Ok(());
        }
        let known = if self.same { Some(d) } else { self.map.get(&d) };
        if let Some(t) = known
            && self.dw.reuse_chunk(i, t).await?
        {
            self.skipped();
            return Ok(());
        }
        let Some((target, blob)) = self.fetch(i, d).await? else {
            self.skipped();
            return Ok(());
        };
        let n = blob.len() as u64;
        if self
            .dw
            .put_blob(i, target, blob, self.ix.chunk_len(i))
            .await?
        {
            {
                let mut s = lock(&self.stats);
                s.chunks_sent += 1;
                s.bytes_sent += n;
            }
            self.observer.chunk_sent(n).await;
        } else {
            self.skipped();
        }
        Ok(())
    }

    /// Downloads and checks chunk `d` of slot `i`; returns the digest and blob to store
    /// here, or `None` when (keys differing) the destination turns out to have it.
    async fn fetch(&self, i: u64, d: Digest) -> Result<Option<(Digest, Bytes)>> {
        let blob = self
            .src
            .backend()
            .get(&chunk_key(&d))
            .await?
            .ok_or_else(|| RepoError::ChunkMissing {
                digest: hex::encode(d),
            })?;
        lock(&self.stats).bytes_fetched += blob.len() as u64;
        // The source is untrusted: CRC, encryption mode, GCM tag and keyed digest are
        // checked by decoding, whether or not the blob is then stored as it is.
        let codec = self.src.inner.codec.clone();
        let raw = blob.clone();
        let plain = tokio::task::spawn_blocking(move || codec.decode_chunk(&d, raw)).await??;
        let want = self.ix.chunk_len(i);
        if plain.len() as u64 != want {
            return Err(RepoError::ChunkCorrupt {
                digest: hex::encode(d),
                reason: format!("{} bytes where the index needs {want}", plain.len()),
            });
        }
        if self.same {
            return Ok(Some((d, blob)));
        }
        let codec = self.dst.inner.codec.clone();
        let p = plain.clone();
        let target = tokio::task::spawn_blocking(move || codec.digest(&p)).await?;
        self.map.insert(d, target);
        if self.dw.reuse_chunk(i, target).await? {
            return Ok(None);
        }
        let codec = self.dst.inner.codec.clone();
        let enc =
            tokio::task::spawn_blocking(move || codec.encode_chunk(&target, &plain)).await??;
        Ok(Some((target, Bytes::from(enc))))
    }
}
