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
    /// Adds `pairs` unless one of them contradicts a pair already known (then none).
    fn learn(&self, pairs: HashMap<Digest, Digest>) {
        let mut m = lock(&self.0);
        if pairs.iter().any(|(x, y)| m.get(x).is_some_and(|k| k != y)) {
            return;
        }
        m.extend(pairs);
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
    /// Only disks both manifests name with the same size are paired, each slot with the
    /// slot at the same offset ([`pair_slots`]); a disk whose pairing does not hold
    /// together teaches nothing (a wrong pair would make a later copy reuse a wrong chunk).
    pub async fn learn_digests(&self, src: &Repository, id: &str, map: &DigestMap) -> Result<()> {
        let (ms, md) = (src.manifest(id).await?, self.manifest(id).await?);
        for d in &md.disks {
            let same = ms
                .disks
                .iter()
                .any(|s| s.spec.name == d.spec.name && s.spec.size == d.spec.size);
            if !same {
                continue;
            }
            let a = src.fixed_index(id, &d.spec.name).await?;
            let b = self.fixed_index(id, &d.spec.name).await?;
            if let Some(pairs) = pair_slots(&a, &b) {
                map.learn(pairs);
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

/// Pairs the chunks of one disk as indexed in two copies of a backup: the slot at each
/// offset holds the same plaintext in both, so its source digest maps to its destination
/// digest. `None` when the two cannot be copies of one disk: disk size or chunk size
/// differ, a slot count does not fit them, a slot is all-zero in one and not the other,
/// or the pairs contradict each other (one digest paired with two different ones, in
/// either direction: digests are keyed hashes of the plaintext, one per plaintext).
fn pair_slots(src: &FixedIndex, dst: &FixedIndex) -> Option<HashMap<Digest, Digest>> {
    let slots = |ix: &FixedIndex| {
        ix.chunk_size > 0 && ix.digests.len() as u64 == ix.size.div_ceil(ix.chunk_size)
    };
    if src.chunk_size != dst.chunk_size || src.size != dst.size || !slots(src) || !slots(dst) {
        return None;
    }
    let mut fwd: HashMap<Digest, Digest> = HashMap::new();
    let mut back: HashMap<Digest, Digest> = HashMap::new();
    for (x, y) in src.digests.iter().zip(&dst.digests) {
        match (*x == ZERO_DIGEST, *y == ZERO_DIGEST) {
            (true, true) => continue,
            (false, false) => {}
            _ => return None,
        }
        if *fwd.entry(*x).or_insert(*y) != *y || *back.entry(*y).or_insert(*x) != *x {
            return None;
        }
    }
    Some(fwd)
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

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    fn ix(size: u64, digests: &[u8]) -> FixedIndex {
        FixedIndex {
            chunk_size: CS,
            size,
            digests: digests
                .iter()
                .map(|&b| if b == 0 { ZERO_DIGEST } else { [b; 32] })
                .collect(),
            snapshot: None,
        }
    }

    #[test]
    fn pairs_slot_by_slot() {
        let pairs = pair_slots(&ix(3 * CS, &[1, 0, 2]), &ix(3 * CS, &[7, 0, 8])).expect("pairs");
        let mut got: Vec<_> = pairs.iter().map(|(x, y)| (x[0], y[0])).collect();
        got.sort();
        assert_eq!(got, [(1, 7), (2, 8)]);
        // The same chunk at two slots pairs the same way: fine.
        assert!(pair_slots(&ix(2 * CS, &[1, 1]), &ix(2 * CS, &[7, 7])).is_some());
    }

    /// Indexes with the same slot count but not the same layout, or whose slots do not
    /// correspond, are not copies of one disk: pairing them by position would map source
    /// chunks to unrelated destination chunks, which a later copy would then reuse.
    #[test]
    fn refuses_pairings_that_do_not_hold() {
        // Same slot count, different disk size (the last slot's length differs).
        assert!(pair_slots(&ix(3 * CS, &[1, 2, 3]), &ix(3 * CS - 100, &[7, 8, 9])).is_none());
        // Different chunk size, same number of slots.
        let mut big = ix(3 * CS, &[7, 8, 9]);
        big.chunk_size = 2 * CS;
        big.size = 5 * CS;
        assert!(pair_slots(&ix(3 * CS, &[1, 2, 3]), &big).is_none());
        // One source chunk against two different destination chunks, and the reverse.
        assert!(pair_slots(&ix(2 * CS, &[1, 1]), &ix(2 * CS, &[7, 8])).is_none());
        assert!(pair_slots(&ix(2 * CS, &[1, 2]), &ix(2 * CS, &[7, 7])).is_none());
        // All-zero in one, data in the other.
        assert!(pair_slots(&ix(2 * CS, &[1, 0]), &ix(2 * CS, &[7, 8])).is_none());
        // A slot count that does not fit the size.
        assert!(pair_slots(&ix(3 * CS, &[1, 2]), &ix(3 * CS, &[7, 8])).is_none());
    }

    #[test]
    fn learn_keeps_known_pairs() {
        let map = DigestMap::default();
        map.learn(HashMap::from([([1; 32], [7; 32])]));
        // A contradicting set teaches nothing, not even its consistent pairs.
        map.learn(HashMap::from([([1; 32], [8; 32]), ([2; 32], [9; 32])]));
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&[1; 32]), Some([7; 32]));
    }
}
