//! Backup writers: the lease, per-disk chunk pipelines, the extent adapter, publishing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::error::{RepoError, Result};
use crate::format::{Digest, FixedIndex, ZERO_DIGEST, chunk_key, is_all_zero};
use crate::manifest::{BackupMeta, BackupStats, DiskSpec, DiskStats, Manifest, ManifestDisk};
use crate::repo::{
    GC_LOCK, LEASE_PREFIX, LeaseFile, Repository, check_name, index_key, manifest_key, ms,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Lease {
    key: String,
    file: Mutex<LeaseFile>,
    last_ok: Mutex<Instant>,
    start: SystemTime,
}

impl Lease {
    async fn write(&self, repo: &Repository) -> Result<()> {
        let body =
            serde_json::to_vec(&*lock(&self.file)).map_err(|e| RepoError::json(&self.key, e))?;
        let t = Instant::now();
        repo.inner.backend.put(&self.key, Bytes::from(body)).await?;
        *lock(&self.last_ok) = t;
        Ok(())
    }
}

struct Shared {
    repo: Repository,
    id: String,
    lease: Arc<Lease>,
    known: Mutex<HashSet<Digest>>,
    refreshed: Mutex<Vec<Digest>>,
    /// Object Lock: chunks the new indexes take from a parent without a look at their
    /// retention; extended before publishing (docs/format.md, "S3 Object Lock").
    inherited: Mutex<HashSet<Digest>>,
    disks: Mutex<Vec<ManifestDisk>>,
    open_disks: Mutex<HashSet<String>>,
    reuse_window: Duration,
    nvram: Mutex<Option<crate::manifest::ManifestNvram>>,
    /// A sync writes indexes with overwrite: a killed sync of the same backup id may
    /// have left them (unpublished) and the next one takes over.
    overwrite_index: bool,
}

/// A running backup. Holds a lease that GC and forget respect until `finish`/`abort`.
pub struct BackupWriter {
    sh: Arc<Shared>,
    meta: BackupMeta,
    time: OffsetDateTime,
    started: Instant,
    /// The lease refresher; taken when the lease is released.
    refresher: Option<tokio::task::JoinHandle<()>>,
}

/// A writer dropped without `finish`/`abort` (the backup failed and the caller returned
/// early) releases its lease in the background, so a failed backup does not hold back
/// GC or pin its base for `stale_after`. Its index objects are GC's.
impl Drop for BackupWriter {
    fn drop(&mut self) {
        let Some(refresher) = self.refresher.take() else {
            return;
        };
        refresher.abort();
        let (be, key) = (self.sh.repo.backend().clone(), self.sh.lease.key.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // Wait for the refresher to be gone, or it could write the lease anew.
                    let _ = refresher.await;
                    if let Err(e) = be.delete(&key).await {
                        tracing::warn!("releasing backup lease {key}: {e}");
                    }
                });
            }
            Err(_) => tracing::warn!("backup lease {key} left to expire (no runtime)"),
        }
    }
}

impl Repository {
    /// Start a backup: takes a lease `locks/backup-<uuid>`.
    pub async fn begin_backup(&self, meta: BackupMeta) -> Result<BackupWriter> {
        self.begin_writer(meta, None).await
    }

    /// A writer publishing under a given backup id (a sync copies backups with their
    /// ids, so a backup present in both repositories is the same backup).
    pub(crate) async fn begin_copy(&self, meta: BackupMeta, id: &str) -> Result<BackupWriter> {
        check_name("backup id", id)?;
        self.begin_writer(meta, Some(id.to_string())).await
    }

    async fn begin_writer(
        &self,
        meta: BackupMeta,
        copy_id: Option<String>,
    ) -> Result<BackupWriter> {
        let time = meta.time.unwrap_or_else(OffsetDateTime::now_utc);
        let time = time.to_offset(time::UtcOffset::UTC);
        let time = time
            .replace_nanosecond(time.nanosecond() / 1_000_000 * 1_000_000)
            .unwrap_or(time);
        let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        let stamp = time
            .format(&fmt)
            .map_err(|e| RepoError::InvalidArgument(format!("time: {e}")))?;
        let overwrite_index = copy_id.is_some();
        let id = copy_id.unwrap_or_else(|| {
            format!(
                "{stamp}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let lease_uuid = uuid::Uuid::new_v4().to_string();
        let key = format!("{LEASE_PREFIX}{lease_uuid}");
        let mut lf = LeaseFile {
            kind: "backup".into(),
            lease: lease_uuid,
            snapshot: id.clone(),
            host: meta.host.clone(),
            vm: meta.vm.clone(),
            pid: std::process::id(),
            started_ms: 0,
            pins: Vec::new(),
        };
        let be = &self.inner.backend;
        let body = serde_json::to_vec(&lf).map_err(|e| RepoError::json(&key, e))?;
        be.put(&key, Bytes::from(body)).await?;
        let start = be
            .head(&key)
            .await?
            .map(|h| h.modified)
            .ok_or_else(|| RepoError::backend(&key, "lease vanished"))?;
        lf.started_ms = ms(start);
        let lease = Arc::new(Lease {
            key,
            file: Mutex::new(lf),
            last_ok: Mutex::new(Instant::now()),
            start,
        });
        lease.write(self).await?;
        let timing = self.timing();
        let refresher = {
            let lease = lease.clone();
            let repo = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(timing.refresh).await;
                    if let Err(e) = lease.write(&repo).await {
                        tracing::warn!("refreshing backup lease {}: {e}", lease.key);
                    }
                }
            })
        };
        Ok(BackupWriter {
            sh: Arc::new(Shared {
                repo: self.clone(),
                id,
                lease,
                known: Mutex::new(HashSet::new()),
                refreshed: Mutex::new(Vec::new()),
                inherited: Mutex::new(HashSet::new()),
                disks: Mutex::new(Vec::new()),
                open_disks: Mutex::new(HashSet::new()),
                reuse_window: self.min_grace(),
                nvram: Mutex::new(None),
                overwrite_index,
            }),
            meta,
            time,
            started: Instant::now(),
            refresher: Some(refresher),
        })
    }
}

/// What [`crate::nvram`] stores through a writer.
impl BackupWriter {
    pub(crate) fn repo(&self) -> &Repository {
        &self.sh.repo
    }
    pub(crate) fn nvram_entry(&self) -> Option<crate::manifest::ManifestNvram> {
        lock(&self.sh.nvram).clone()
    }
    pub(crate) fn set_nvram_entry(&self, n: crate::manifest::ManifestNvram) {
        *lock(&self.sh.nvram) = Some(n);
    }
    pub(crate) fn reuse_window(&self) -> Duration {
        self.sh.reuse_window
    }
    pub(crate) fn lease_start(&self) -> SystemTime {
        self.sh.lease.start
    }
    pub(crate) fn note_refreshed(&self, d: Digest) {
        lock(&self.sh.refreshed).push(d);
    }
}

impl BackupWriter {
    /// The id the backup will have.
    pub fn id(&self) -> &str {
        &self.sh.id
    }

    /// Open a disk. `previous` seeds every slot (unwritten slots keep its digests); when it
    /// was loaded from this repository its backup is pinned (forget/prune refuse it) and its
    /// chunks are reused without upload.
    pub async fn disk(&self, spec: DiskSpec, previous: Option<&FixedIndex>) -> Result<DiskWriter> {
        check_name("disk name", &spec.name)?;
        let repo = &self.sh.repo;
        let cs = repo.chunk_size();
        let mut ix = FixedIndex::new_zero(cs, spec.size)?;
        if let Some(p) = previous {
            if p.chunk_size != cs {
                return Err(RepoError::InvalidArgument(format!(
                    "previous index has chunk size {}, repository uses {cs}",
                    p.chunk_size
                )));
            }
            for (i, d) in p.digests.iter().enumerate().take(ix.digests.len()) {
                if p.chunk_len(i as u64) == ix.chunk_len(i as u64) {
                    ix.digests[i] = *d;
                }
            }
            if let Some(snap) = &p.snapshot {
                {
                    let mut f = lock(&self.sh.lease.file);
                    if !f.pins.contains(snap) {
                        f.pins.push(snap.clone());
                    }
                }
                self.sh.lease.write(repo).await?;
                if repo.backend().head(&manifest_key(snap)).await?.is_none() {
                    return Err(RepoError::SnapshotNotFound(snap.clone()));
                }
                let used = p.digests.iter().filter(|d| **d != ZERO_DIGEST);
                if repo.object_lock().is_some() {
                    lock(&self.sh.inherited).extend(used.clone());
                }
                lock(&self.sh.known).extend(used);
            }
        }
        if !lock(&self.sh.open_disks).insert(spec.name.clone()) {
            return Err(RepoError::InvalidArgument(format!(
                "disk {} opened twice",
                spec.name
            )));
        }
        let n = ix.digests.len();
        let permits = in_flight_budget(repo.parallelism(), repo.chunk_size());
        Ok(DiskWriter {
            d: Arc::new(DiskShared {
                sh: self.sh.clone(),
                spec,
                state: Mutex::new(IndexState {
                    digests: ix.digests,
                    written: vec![false; n],
                }),
                ix_size: ix.size,
                stats: Mutex::new(DiskStats::default()),
                sem: Arc::new(Semaphore::new(permits)),
                permits: permits as u32,
                error: Mutex::new(None),
                finished: AtomicBool::new(false),
            }),
        })
    }

    /// Stops refreshing and deletes the lease (once).
    async fn release_lease(&mut self) -> Result<()> {
        let Some(refresher) = self.refresher.take() else {
            return Ok(());
        };
        refresher.abort();
        let _ = refresher.await;
        self.sh.repo.backend().delete(&self.sh.lease.key).await
    }

    /// Publish: wait for the lease rules, write the manifest (create-only), drop the
    /// lease. The lease is dropped when publishing fails too.
    pub async fn finish(mut self, extra: serde_json::Value) -> Result<Manifest> {
        let res = self.publish(extra).await;
        let released = self.release_lease().await;
        let m = res?;
        released?;
        Ok(m)
    }

    async fn publish(&mut self, extra: serde_json::Value) -> Result<Manifest> {
        let disks = self.before_publish().await?;
        let mut totals = DiskStats::default();
        for d in &disks {
            totals.add(&d.stats);
        }
        let m = Manifest {
            version: 1,
            id: self.sh.id.clone(),
            host: self.meta.host.clone(),
            vm: self.meta.vm.clone(),
            time: self.time,
            mode: self.meta.mode,
            reason: self.meta.reason.clone(),
            parent: self.meta.parent.clone(),
            protected: false,
            domain_xml: self.meta.domain_xml.clone(),
            disks,
            stats: BackupStats {
                totals,
                duration_secs: self.started.elapsed().as_secs_f64(),
            },
            extra,
            nvram: lock(&self.sh.nvram).clone(),
        };
        self.put_manifest(&m).await?;
        Ok(m)
    }

    /// Publish a copy of `m` (a sync): the manifest as it was, once every disk it names
    /// has been written here under the same index key.
    pub(crate) async fn finish_copy(mut self, m: &Manifest) -> Result<()> {
        let res = self.publish_copy(m).await;
        let released = self.release_lease().await;
        res?;
        released
    }

    async fn publish_copy(&mut self, m: &Manifest) -> Result<()> {
        let disks = self.before_publish().await?;
        let mut written: Vec<&str> = disks.iter().map(|d| d.index.as_str()).collect();
        written.sort_unstable();
        let mut wanted: Vec<&str> = m.disks.iter().map(|d| d.index.as_str()).collect();
        wanted.sort_unstable();
        let nvram = lock(&self.sh.nvram).as_ref().map(|n| n.index.clone());
        if m.id != self.sh.id
            || written != wanted
            || nvram != m.nvram.as_ref().map(|n| n.index.clone())
        {
            return Err(RepoError::WriterState(format!(
                "copy of backup {} incomplete: wrote {written:?}, the manifest names {wanted:?}",
                m.id
            )));
        }
        let mut copy = m.clone();
        copy.protected = false;
        self.put_manifest(&copy).await
    }

    async fn put_manifest(&self, m: &Manifest) -> Result<()> {
        let timing = self.sh.repo.timing();
        let key = manifest_key(&m.id);
        let body = serde_json::to_vec_pretty(m).map_err(|e| RepoError::json(&key, e))?;
        if lock(&self.sh.lease.last_ok).elapsed() >= timing.stale_after {
            return Err(RepoError::LeaseExpired(self.sh.lease.key.clone()));
        }
        self.sh.repo.put_meta(&key, body, true).await
    }

    /// The lease rules before a manifest is written; returns the written disks, sorted.
    async fn before_publish(&mut self) -> Result<Vec<ManifestDisk>> {
        let repo = self.sh.repo.clone();
        let be = repo.backend().clone();
        if !lock(&self.sh.open_disks).is_empty() {
            return Err(RepoError::WriterState(format!(
                "disks not finished: {:?}",
                lock(&self.sh.open_disks)
            )));
        }
        let timing = repo.timing();
        // Refresh now so a slow last phase cannot expire the lease unnoticed.
        if lock(&self.sh.lease.last_ok).elapsed() >= timing.stale_after {
            return Err(RepoError::LeaseExpired(self.sh.lease.key.clone()));
        }
        self.sh.lease.write(&repo).await?;
        self.extend_inherited().await?;
        // Object Lock: the config holds the keys of all this backup's objects, so its
        // retention must reach past theirs (nothing to do without Object Lock).
        if !be.extend_retention(crate::repo::CONFIG_KEY).await? {
            return Err(RepoError::corrupt(
                crate::repo::CONFIG_KEY,
                "missing from the repository (deleted?)",
            ));
        }
        // Chunks we re-uploaded because they were old may have been listed by a GC that
        // ran meanwhile: wait for it to end, then check they are still there.
        let refreshed: Vec<Digest> = std::mem::take(&mut *lock(&self.sh.refreshed));
        if !refreshed.is_empty() {
            let deadline = Instant::now() + timing.stale_after;
            while let Some(h) = be.head(GC_LOCK).await? {
                let now = repo.storage_now().await?;
                if h.modified + timing.stale_after < now || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.sh.lease.write(&repo).await?;
            }
            for d in &refreshed {
                if be.head(&chunk_key(d)).await?.is_none() {
                    return Err(RepoError::ChunkVanished {
                        digest: hex::encode(d),
                        reason: "removed by a concurrent garbage collection".into(),
                    });
                }
            }
        }
        let pins = lock(&self.sh.lease.file).pins.clone();
        for p in &pins {
            if be.head(&manifest_key(p)).await?.is_none() {
                return Err(RepoError::ChunkVanished {
                    digest: "-".into(),
                    reason: format!("base backup {p} was forgotten while this backup ran"),
                });
            }
        }
        let mut disks = std::mem::take(&mut *lock(&self.sh.disks));
        disks.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(disks)
    }

    /// Object Lock: a chunk taken from the parent keeps the retention its last backup
    /// gave it; extend each one whose retention was set more than the reuse window
    /// before this backup started, so every chunk of the new backup is retained
    /// `retain` (less that window) from its start. Extended chunks join `refreshed`
    /// (checked against a concurrent GC below).
    async fn extend_inherited(&self) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        let digests: Vec<Digest> = lock(&self.sh.inherited).drain().collect();
        if digests.is_empty() {
            return Ok(());
        }
        let be = self.sh.repo.backend().clone();
        let sh = &self.sh;
        let extended: Vec<Option<Digest>> = futures::stream::iter(digests)
            .map(|d| {
                let be = be.clone();
                async move {
                    let key = chunk_key(&d);
                    let vanished = || RepoError::ChunkVanished {
                        digest: hex::encode(d),
                        reason: "a chunk of the base backup is gone".into(),
                    };
                    let h = be.head(&key).await?.ok_or_else(vanished)?;
                    if h.modified + sh.reuse_window >= sh.lease.start {
                        return Ok(None);
                    }
                    if !be.extend_retention(&key).await? {
                        return Err(vanished());
                    }
                    Ok::<_, RepoError>(Some(d))
                }
            })
            .buffer_unordered(sh.repo.parallelism().max(1))
            .try_collect()
            .await?;
        lock(&sh.refreshed).extend(extended.into_iter().flatten());
        Ok(())
    }

    /// Abandon the backup: remove its index objects and its lease. Chunks already uploaded
    /// stay until GC.
    pub async fn abort(mut self) -> Result<()> {
        let be = self.sh.repo.backend().clone();
        let disks = std::mem::take(&mut *lock(&self.sh.disks));
        let mut res = Ok(());
        for d in disks {
            res = res.and(be.delete(&d.index).await);
        }
        let nvram = lock(&self.sh.nvram).take();
        if let Some(n) = nvram {
            res = res.and(be.delete(&n.index).await);
        }
        self.release_lease().await.and(res)
    }
}

struct IndexState {
    digests: Vec<Digest>,
    written: Vec<bool>,
}

struct DiskShared {
    sh: Arc<Shared>,
    spec: DiskSpec,
    state: Mutex<IndexState>,
    ix_size: u64,
    stats: Mutex<DiskStats>,
    sem: Arc<Semaphore>,
    permits: u32,
    error: Mutex<Option<RepoError>>,
    finished: AtomicBool,
}

/// Bytes of queued chunk data one disk writer holds at most, per CPU worker: enough
/// for every core to compress one chunk while another is uploaded.
const IN_FLIGHT_PER_WORKER: u64 = 8 << 20;
/// The semaphore counts this many bytes per permit.
const PERMIT_BYTES: u64 = 64 << 10;

/// Permits (of [`PERMIT_BYTES`]) of chunk data in flight for one disk: a byte budget
/// rather than a count of chunks, so the peak memory of a backup does not grow with the
/// chunk size or the number of cores (each queued chunk may also hold its compressed
/// and encrypted copy). At least two chunks fit, so hashing overlaps uploading.
fn in_flight_budget(workers: usize, chunk_size: u64) -> usize {
    let bytes = (workers.max(1) as u64 * IN_FLIGHT_PER_WORKER).max(2 * chunk_size);
    bytes.div_ceil(PERMIT_BYTES) as usize
}

/// Permits one chunk of `len` bytes takes (never more than the whole budget).
fn chunk_permits(len: u64, budget: u32) -> u32 {
    (len.div_ceil(PERMIT_BYTES).max(1)).min(u64::from(budget)) as u32
}

/// Writes one disk. Cloneable; all methods take `&self`, so several tasks can feed it.
/// `write_chunk` returns once the chunk is queued; hashing, compression and encryption run
/// on the blocking pool and uploads run concurrently, with at most
/// `max(cores × 8 MiB, 2 chunks)` of chunk data in flight (memory stays bounded).
#[derive(Clone)]
pub struct DiskWriter {
    d: Arc<DiskShared>,
}

impl DiskWriter {
    /// Chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.d.sh.repo.chunk_size()
    }
    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        lock(&self.d.state).digests.len() as u64
    }
    /// Disk size.
    pub fn size(&self) -> u64 {
        self.d.ix_size
    }

    fn chunk_len(&self, i: u64) -> Result<u64> {
        let n = self.chunk_count();
        if i >= n {
            return Err(RepoError::InvalidArgument(format!(
                "chunk index {i} out of range (disk {} has {n} chunks)",
                self.d.spec.name
            )));
        }
        let cs = self.chunk_size();
        Ok(cs.min(self.d.ix_size - i * cs))
    }

    fn take_error(&self) -> Result<()> {
        match lock(&self.d.error).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queue chunk `index` (exactly `chunk_size` bytes; the last chunk may be shorter).
    /// All-zero data is detected and recorded as a zero chunk.
    pub async fn write_chunk(&self, index: u64, data: Bytes) -> Result<()> {
        let want = self.chunk_len(index)?;
        if data.len() as u64 != want {
            return Err(RepoError::InvalidArgument(format!(
                "chunk {index} of disk {} must be {want} bytes, got {}",
                self.d.spec.name,
                data.len()
            )));
        }
        self.take_error()?;
        let permit = self
            .d
            .sem
            .clone()
            .acquire_many_owned(chunk_permits(want, self.d.permits))
            .await
            .map_err(|_| RepoError::WriterState("disk writer closed".into()))?;
        let d = self.d.clone();
        tokio::spawn(async move {
            if let Err(e) = process_chunk(&d, index, data).await {
                let mut slot = lock(&d.error);
                if slot.is_none() {
                    *slot = Some(e);
                }
            }
            drop(permit);
        });
        Ok(())
    }

    /// Record chunk `index` as all zeros.
    pub fn zero_chunk(&self, index: u64) -> Result<()> {
        self.chunk_len(index)?;
        set_slot(&self.d, index, ZERO_DIGEST);
        lock(&self.d.stats).chunks_zero += 1;
        Ok(())
    }

    /// A sync: records chunk `index` as `digest` without any upload when this backup
    /// already has it or the repository holds a copy fresh enough to reuse (the rules
    /// of `process_chunk`). `false`: the caller must supply it ([`DiskWriter::put_blob`]).
    pub(crate) async fn reuse_chunk(&self, index: u64, digest: Digest) -> Result<bool> {
        self.chunk_len(index)?;
        let sh = &self.d.sh;
        let reuse = lock(&sh.known).contains(&digest)
            || sh
                .repo
                .backend()
                .head(&chunk_key(&digest))
                .await?
                .is_some_and(|h| h.modified + sh.reuse_window >= sh.lease.start);
        if reuse {
            lock(&sh.known).insert(digest);
            set_slot(&self.d, index, digest);
            lock(&self.d.stats).chunks_reused += 1;
        }
        Ok(reuse)
    }

    /// A sync: stores chunk `index` from an encoded blob already checked against
    /// `digest` (plaintext `len` bytes). Returns whether this call uploaded it.
    pub(crate) async fn put_blob(
        &self,
        index: u64,
        digest: Digest,
        blob: Bytes,
        len: u64,
    ) -> Result<bool> {
        if self.chunk_len(index)? != len {
            return Err(RepoError::ChunkCorrupt {
                digest: hex::encode(digest),
                reason: format!(
                    "{len} bytes where the index needs {}",
                    self.chunk_len(index)?
                ),
            });
        }
        let sh = &self.d.sh;
        let be = sh.repo.backend();
        let key = chunk_key(&digest);
        let stored = blob.len() as u64;
        let created = match be.head(&key).await? {
            Some(h) if h.modified + sh.reuse_window >= sh.lease.start => false,
            Some(_) => {
                // Old: rewritten, and rechecked at publish (a GC may have listed it).
                be.put(&key, blob).await?;
                lock(&sh.refreshed).push(digest);
                true
            }
            None => be.put_chunk(&key, blob).await? == crate::backend::PutOutcome::Created,
        };
        {
            let mut s = lock(&self.d.stats);
            s.bytes_read += len;
            if created {
                s.chunks_new += 1;
                s.bytes_new += len;
                s.bytes_stored += stored;
            } else {
                s.chunks_reused += 1;
            }
        }
        lock(&sh.known).insert(digest);
        set_slot(&self.d, index, digest);
        Ok(created)
    }

    /// Wait for all queued chunks, write the index object, return the statistics.
    pub async fn finish(&self) -> Result<DiskStats> {
        if self.d.finished.swap(true, Ordering::SeqCst) {
            return Err(RepoError::WriterState(format!(
                "disk {} finished twice",
                self.d.spec.name
            )));
        }
        let _all = self
            .d
            .sem
            .acquire_many(self.d.permits)
            .await
            .map_err(|_| RepoError::WriterState("disk writer closed".into()))?;
        self.take_error()?;
        let (digests, unchanged) = {
            let st = lock(&self.d.state);
            let unchanged = st
                .written
                .iter()
                .zip(&st.digests)
                .filter(|(w, d)| !**w && **d != ZERO_DIGEST)
                .count() as u64;
            (st.digests.clone(), unchanged)
        };
        let ix = FixedIndex {
            chunk_size: self.chunk_size(),
            size: self.d.ix_size,
            digests,
            snapshot: None,
        };
        let key = index_key(&self.d.sh.id, &self.d.spec.name);
        let repo = self.d.sh.repo.clone();
        repo.put_meta(&key, ix.encode(), !self.d.sh.overwrite_index)
            .await?;
        let stats = {
            let mut s = lock(&self.d.stats);
            s.chunks_unchanged = unchanged;
            *s
        };
        lock(&self.d.sh.disks).push(ManifestDisk {
            spec: self.d.spec.clone(),
            chunk_size: ix.chunk_size,
            index: key,
            stats,
        });
        lock(&self.d.sh.open_disks).remove(&self.d.spec.name);
        Ok(stats)
    }
}

fn set_slot(d: &DiskShared, index: u64, digest: Digest) {
    let mut st = lock(&d.state);
    if let Some(s) = st.digests.get_mut(index as usize) {
        *s = digest;
    }
    if let Some(w) = st.written.get_mut(index as usize) {
        *w = true;
    }
}

async fn process_chunk(d: &DiskShared, index: u64, data: Bytes) -> Result<()> {
    let sh = &d.sh;
    let codec = sh.repo.inner.codec.clone();
    let (data, digest) = tokio::task::spawn_blocking(move || {
        let dg = if is_all_zero(&data) {
            ZERO_DIGEST
        } else {
            codec.digest(&data)
        };
        (data, dg)
    })
    .await?;
    if digest == ZERO_DIGEST {
        set_slot(d, index, ZERO_DIGEST);
        lock(&d.stats).chunks_zero += 1;
        return Ok(());
    }
    let len = data.len() as u64;
    lock(&d.stats).bytes_read += len;
    if lock(&sh.known).contains(&digest) {
        set_slot(d, index, digest);
        lock(&d.stats).chunks_reused += 1;
        return Ok(());
    }
    let be = sh.repo.backend().clone();
    let key = chunk_key(&digest);
    let existing = be.head(&key).await?;
    let fresh_enough = |m: SystemTime| m + sh.reuse_window >= sh.lease.start;
    let (upload, overwrite) = match existing {
        Some(h) if fresh_enough(h.modified) => (false, false),
        Some(_) => (true, true),
        None => (true, false),
    };
    if upload {
        let codec = sh.repo.inner.codec.clone();
        let blob =
            tokio::task::spawn_blocking(move || codec.encode_chunk(&digest, &data)).await??;
        let stored = blob.len() as u64;
        let created = if overwrite {
            be.put(&key, Bytes::from(blob)).await?;
            lock(&sh.refreshed).push(digest);
            true
        } else {
            be.put_chunk(&key, Bytes::from(blob)).await? == crate::backend::PutOutcome::Created
        };
        let mut s = lock(&d.stats);
        if created {
            s.chunks_new += 1;
            s.bytes_new += len;
            s.bytes_stored += stored;
        } else {
            s.chunks_reused += 1;
        }
    } else {
        lock(&d.stats).chunks_reused += 1;
    }
    lock(&sh.known).insert(digest);
    set_slot(d, index, digest);
    Ok(())
}

/// Assembles chunks from ordered, non-overlapping extents. Inside a chunk touched by at
/// least one extent, bytes no extent covers are zero; chunks no extent touches keep the
/// previous index's digest. (For incrementals, cover whole chunks or use
/// [`DiskWriter::write_chunk`].)
pub struct ExtentSink {
    w: DiskWriter,
    cur: Option<(u64, Vec<u8>, bool)>,
    last_end: u64,
}

impl ExtentSink {
    /// Wrap a disk writer.
    pub fn new(w: DiskWriter) -> Self {
        ExtentSink {
            w,
            cur: None,
            last_end: 0,
        }
    }

    fn check(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.w.size())
            .ok_or_else(|| {
                RepoError::InvalidArgument(format!("extent {offset}+{len} beyond disk end"))
            })?;
        if offset < self.last_end {
            return Err(RepoError::InvalidArgument(format!(
                "extent at {offset} overlaps or is out of order (previous ended at {})",
                self.last_end
            )));
        }
        self.last_end = end;
        Ok(())
    }

    async fn switch_to(&mut self, idx: u64) -> Result<()> {
        if let Some((i, _, _)) = &self.cur
            && *i == idx
        {
            return Ok(());
        }
        self.flush().await?;
        let len = self.w.chunk_len(idx)? as usize;
        self.cur = Some((idx, vec![0u8; len], false));
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if let Some((i, buf, has_data)) = self.cur.take() {
            if has_data {
                self.w.write_chunk(i, Bytes::from(buf)).await?;
            } else {
                self.w.zero_chunk(i)?;
            }
        }
        Ok(())
    }

    /// Data at `offset`.
    pub async fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        let cs = self.w.chunk_size();
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            self.switch_to(idx).await?;
            if let Some((_, buf, has)) = &mut self.cur {
                let n = rest.len().min(buf.len() - within);
                buf[within..within + n].copy_from_slice(&rest[..n]);
                *has = true;
                rest = &rest[n..];
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// A zero run at `offset`.
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let cs = self.w.chunk_size();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / cs;
            let cstart = idx * cs;
            let clen = self.w.chunk_len(idx)?;
            let cend = cstart + clen;
            let n = end.min(cend) - pos;
            if pos == cstart && n == clen {
                if matches!(&self.cur, Some((i, _, _)) if *i == idx) {
                    self.cur = None;
                } else {
                    self.flush().await?;
                }
                self.w.zero_chunk(idx)?;
            } else {
                // partial: the chunk buffer is zero-initialised, just touch it
                self.switch_to(idx).await?;
                if let Some((_, buf, _)) = &mut self.cur {
                    let w = (pos - cstart) as usize;
                    buf[w..w + n as usize].fill(0);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Flush the last chunk and finish the disk.
    pub async fn finish(mut self) -> Result<DiskStats> {
        self.flush().await?;
        self.w.finish().await
    }
}

#[cfg(test)]
mod budget_tests {
    use super::{PERMIT_BYTES, chunk_permits, in_flight_budget};

    #[test]
    fn in_flight_chunk_data_is_a_byte_budget() {
        let mib = 1u64 << 20;
        // Two cores, 4 MiB chunks: 16 MiB, four chunks.
        let b = in_flight_budget(2, 4 * mib);
        assert_eq!(b as u64 * PERMIT_BYTES, 16 * mib);
        assert_eq!(b as u32 / chunk_permits(4 * mib, b as u32), 4);
        // Smaller chunks: more of them in flight, the same bytes.
        assert_eq!(b as u32 / chunk_permits(mib, b as u32), 16);
        // Huge chunks: still two at once, and one never waits for more than the budget.
        let b = in_flight_budget(1, 64 * mib);
        assert_eq!(b as u64 * PERMIT_BYTES, 128 * mib);
        assert_eq!(chunk_permits(64 * mib, b as u32), b as u32 / 2);
        assert_eq!(chunk_permits(1, 7), 1);
        assert_eq!(chunk_permits(u64::MAX / 2, 7), 7);
    }
}
