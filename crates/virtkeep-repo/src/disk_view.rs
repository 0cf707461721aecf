//! Random access over one backed-up disk: `read_at` through the fixed index, with a
//! size-bounded LRU cache of decoded chunks and sequential read-ahead.
//!
//! All-zero chunks are answered from the index without touching the repository. The
//! file-level readers (partition tables, filesystems) and the NBD server read through
//! this; [`BlockingDiskView`] adapts it to `std::io::Read + Seek` for synchronous parsers
//! (use it from `spawn_blocking`, never from an async task).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::error::{RepoError, Result};
use crate::reader::DiskReader;
use crate::repo::Repository;

/// Default bound of the chunk cache (decoded bytes).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Default number of chunks fetched ahead of a sequential reader.
pub const DEFAULT_READAHEAD_CHUNKS: usize = 4;
/// Longest single `read_at` (the NBD server's largest request is 32 MiB).
pub const MAX_READ: usize = 64 << 20;

/// Tuning of a [`DiskView`].
#[derive(Debug, Clone, Copy)]
pub struct DiskViewOptions {
    /// Upper bound of decoded chunk bytes kept (at least one chunk is always kept).
    pub cache_bytes: u64,
    /// Chunks fetched in the background after a sequential read (0 = none).
    pub readahead_chunks: usize,
}

impl Default for DiskViewOptions {
    fn default() -> Self {
        DiskViewOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            readahead_chunks: DEFAULT_READAHEAD_CHUNKS,
        }
    }
}

/// A range of the disk and whether the index knows it reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub offset: u64,
    pub len: u64,
    /// True when every chunk of the range is the zero chunk (a hole).
    pub zero: bool,
}

/// Cache and read-ahead counters (for tests and diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Chunks decoded from the repository.
    pub fetched: u64,
    /// Chunk reads answered from the cache.
    pub hits: u64,
    /// Decoded bytes held now.
    pub cached_bytes: u64,
    /// Fetches started by read-ahead (each chunk at most once while cached or in flight).
    pub readaheads: u64,
}

type Fetch = Shared<BoxFuture<'static, std::result::Result<Option<Bytes>, Arc<RepoError>>>>;

#[derive(Default)]
struct Cache {
    entries: HashMap<u64, (Bytes, u64)>,
    inflight: HashMap<u64, Fetch>,
    tick: u64,
    bytes: u64,
    stats: ViewStats,
    /// The chunk after the end of the previous read (sequential detection).
    next: Option<u64>,
}

struct Inner {
    reader: DiskReader,
    opts: DiskViewOptions,
    cache: Mutex<Cache>,
}

/// Random access over one disk of a backup (cheap to clone; clones share the cache).
#[derive(Clone)]
pub struct DiskView {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskView")
            .field("size", &self.size())
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl Repository {
    /// A random-access view of disk `disk` of backup `id`.
    pub async fn disk_view(&self, id: &str, disk: &str, opts: DiskViewOptions) -> Result<DiskView> {
        Ok(DiskView::new(self.disk_reader(id, disk).await?, opts))
    }
}

impl DiskView {
    /// A view over `reader`.
    pub fn new(reader: DiskReader, opts: DiskViewOptions) -> Self {
        DiskView {
            inner: Arc::new(Inner {
                reader,
                opts,
                cache: Mutex::new(Cache::default()),
            }),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.reader.size()
    }

    /// Chunk size of the index.
    pub fn chunk_size(&self) -> u64 {
        self.inner.reader.index().chunk_size
    }

    /// Counters so far.
    pub fn stats(&self) -> ViewStats {
        let c = self.lock();
        ViewStats {
            cached_bytes: c.bytes,
            ..c.stats
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves only a cache behind: keep using it.
        self.inner
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Zero and data ranges of `offset..offset+len` from the index alone (no chunk is
    /// read); adjacent ranges of the same kind are merged, the result covers the range
    /// (clipped to the disk).
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let idx = self.inner.reader.index();
        let end = offset.saturating_add(len).min(idx.size);
        let mut out: Vec<Allocation> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / idx.chunk_size;
            let chunk_end = ((i + 1) * idx.chunk_size).min(end);
            let zero = idx.is_zero(i);
            match out.last_mut() {
                Some(a) if a.zero == zero => a.len += chunk_end - pos,
                _ => out.push(Allocation {
                    offset: pos,
                    len: chunk_end - pos,
                    zero,
                }),
            }
            pos = chunk_end;
        }
        out
    }

    /// `len` bytes at `offset` (the range must lie inside the disk, `len` ≤ [`MAX_READ`]).
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let size = self.size();
        if len > MAX_READ || offset > size || (len as u64) > size - offset {
            return Err(RepoError::InvalidArgument(format!(
                "read of {len} bytes at {offset} outside the disk of {size} bytes"
            )));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len as u64 - 1) / cs;
        self.maybe_readahead(first, last);
        if first == last {
            // One chunk: a slice of it, no copy.
            let start = (offset - first * cs) as usize;
            return Ok(match self.chunk(first).await? {
                Some(b) => b.slice(start..start + len),
                None => Bytes::from(vec![0u8; len]),
            });
        }
        let mut out = BytesMut::with_capacity(len);
        for i in first..=last {
            let cstart = i * cs;
            let from = offset.max(cstart);
            let to = (offset + len as u64).min(cstart + cs);
            let (a, b) = ((from - cstart) as usize, (to - cstart) as usize);
            match self.chunk(i).await? {
                Some(c) => out.extend_from_slice(&c[a..b]),
                None => out.resize(out.len() + (b - a), 0),
            }
        }
        Ok(out.freeze())
    }

    /// Start background fetches of the chunks after `last` when this read continues
    /// the previous one.
    fn maybe_readahead(&self, first: u64, last: u64) {
        let n = self.inner.opts.readahead_chunks as u64;
        let sequential = {
            let mut c = self.lock();
            let seq = matches!(c.next, Some(x) if x == first || x == first + 1 || x == last + 1);
            c.next = Some(last + 1);
            seq
        };
        if !sequential || n == 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let idx = self.inner.reader.index();
        let count = idx.chunk_count();
        for i in (last + 1)..(last + 1 + n).min(count) {
            if idx.is_zero(i) {
                continue;
            }
            // A chunk already fetching needs no second task: readers of small pieces
            // (a filesystem's 4 KiB blocks) come here many times per chunk.
            {
                let mut c = self.lock();
                if c.entries.contains_key(&i) || c.inflight.contains_key(&i) {
                    continue;
                }
                c.stats.readaheads += 1;
            }
            let f = self.fetch(i);
            tokio::spawn(async move {
                let _ = f.await;
            });
        }
    }

    /// Fills `buf` from `offset` when every chunk it touches is cached or a hole, with
    /// no future and no allocation (the common case of a reader of small pieces);
    /// `false` when a chunk must be fetched (nothing was copied then).
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        let (cs, idx) = (self.chunk_size(), self.inner.reader.index());
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return false;
        };
        if buf.is_empty() || end > self.size() {
            return false;
        }
        let (first, last) = (offset / cs, (end - 1) / cs);
        let mut guard = self.lock();
        let c = &mut *guard;
        if (first..=last).any(|i| !idx.is_zero(i) && !c.entries.contains_key(&i)) {
            return false;
        }
        let mut at = 0usize;
        for i in first..=last {
            let cstart = i * cs;
            let (from, to) = (offset.max(cstart), end.min(cstart + cs));
            let (a, b) = ((from - cstart) as usize, (to - cstart) as usize);
            let out = &mut buf[at..at + (b - a)];
            c.tick += 1;
            let tick = c.tick;
            match c.entries.get_mut(&i) {
                Some((bytes, t)) => {
                    *t = tick;
                    out.copy_from_slice(&bytes[a..b]);
                    c.stats.hits += 1;
                }
                None => out.fill(0),
            }
            at += b - a;
        }
        true
    }

    /// A fetch of chunk `i`: the cached bytes, the one already in flight, or a new one.
    fn fetch(&self, i: u64) -> Fetch {
        let mut c = self.lock();
        c.tick += 1;
        let tick = c.tick;
        if let Some((b, t)) = c.entries.get_mut(&i) {
            *t = tick;
            let b = b.clone();
            c.stats.hits += 1;
            return futures::future::ready(Ok(Some(b))).boxed().shared();
        }
        if let Some(f) = c.inflight.get(&i) {
            return f.clone();
        }
        let view = self.clone();
        let fut = async move {
            let r = view.inner.reader.read_chunk(i).await;
            let mut c = view.lock();
            c.inflight.remove(&i);
            match r {
                Ok(Some(b)) => {
                    c.stats.fetched += 1;
                    view.insert(&mut c, i, b.clone());
                    Ok(Some(b))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(Arc::new(e)),
            }
        }
        .boxed()
        .shared();
        c.inflight.insert(i, fut.clone());
        fut
    }

    fn insert(&self, c: &mut Cache, i: u64, b: Bytes) {
        c.tick += 1;
        let len = b.len() as u64;
        if let Some((old, _)) = c.entries.insert(i, (b, c.tick)) {
            c.bytes -= old.len() as u64;
        }
        c.bytes += len;
        // Evict the least recently used; a linear scan is fine for the few hundred
        // entries a bounded cache holds.
        while c.bytes > self.inner.opts.cache_bytes && c.entries.len() > 1 {
            let Some(victim) = c
                .entries
                .iter()
                .filter(|(k, _)| **k != i)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((old, _)) = c.entries.remove(&victim) {
                c.bytes -= old.len() as u64;
            }
        }
    }

    /// Chunk `i` decoded (`None` = zeros), from the cache when there.
    async fn chunk(&self, i: u64) -> Result<Option<Bytes>> {
        if self.inner.reader.index().is_zero(i) {
            return Ok(None);
        }
        match self.fetch(i).await {
            Ok(b) => Ok(b),
            // The shared error cannot be moved out: read again for the caller's own.
            Err(_) => self.inner.reader.read_chunk(i).await,
        }
    }

    /// A synchronous `Read + Seek` over this view, driven by `handle`.
    pub fn blocking(&self, handle: tokio::runtime::Handle) -> BlockingDiskView {
        BlockingDiskView {
            view: self.clone(),
            handle,
            pos: 0,
        }
    }
}

/// `Read + Seek` over a [`DiskView`] for synchronous parsers. Each call blocks on the
/// runtime: use it only on a blocking thread (`spawn_blocking`) or outside the runtime.
#[derive(Debug)]
pub struct BlockingDiskView {
    view: DiskView,
    handle: tokio::runtime::Handle,
    pos: u64,
}

impl Read for BlockingDiskView {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.view.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left).min(MAX_READ as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let cs = self.view.chunk_size();
        if self.view.read_cached(self.pos, &mut buf[..n]) {
            let _rt = self.handle.enter();
            self.view
                .maybe_readahead(self.pos / cs, (self.pos + n as u64 - 1) / cs);
            self.pos += n as u64;
            return Ok(n);
        }
        let b = self
            .handle
            .block_on(self.view.read_at(self.pos, n))
            .map_err(std::io::Error::other)?;
        buf[..n].copy_from_slice(&b);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BlockingDiskView {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let size = self.view.size();
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.pos = new;
        Ok(new)
    }
}
