//! Writing a backed-up disk through a writable qemu-nbd export of its temporary (file
//! and LV destinations): the data extents only, or with `zero_fill` also its zeros,
//! over `parallel` NBD connections with two chunks in flight on each.
//!
//! This module imports nothing of the restore but [`super::context`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;

use super::context::WriteCtx;
use crate::error::{Error, ErrorKind, Result};
use crate::export::NbdExport;
use crate::host::Host;
use crate::progress::{Event, Progress};

/// Writes through a started export and stops it, whatever happened.
pub async fn write_through(
    ctx: &WriteCtx<'_>,
    m: &virtkeep_repo::ManifestDisk,
    export: NbdExport,
    zero_fill: bool,
) -> Result<u64> {
    let disk = NbdWrite {
        repo: ctx.repo,
        id: ctx.id,
        m,
        parallel: ctx.parallel,
        zero_fill,
    };
    let res = write_disk(ctx.host, &disk, &export, ctx.progress).await;
    let stopped = export.stop(ctx.host).await;
    let written = res?;
    stopped?;
    Ok(written)
}

/// One backed-up disk to write.
struct NbdWrite<'a> {
    repo: &'a virtkeep_repo::Repository,
    id: &'a str,
    m: &'a virtkeep_repo::ManifestDisk,
    parallel: usize,
    /// Also write its zeros (the target may hold old data where the disk had holes).
    zero_fill: bool,
}

/// Writes the data extents of a backed-up disk through `export` (with `zero_fill` also
/// its zeros: a thick LV or a reused volume holds old data where the disk had holes);
/// returns the data bytes written.
async fn write_disk(
    host: &Host,
    disk: &NbdWrite<'_>,
    export: &NbdExport,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    let m = disk.m;
    let reader = Arc::new(disk.repo.disk_reader(disk.id, &m.spec.name).await?);
    progress.event(Event::DiskStart {
        vm: String::new(),
        disk: m.spec.target.clone(),
        bytes: m.spec.size,
    });
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..disk.parallel.max(1) {
        let session = host.data_session(w).await?;
        let client = export.connect(&session, &[]).await?;
        if client.size() < m.spec.size {
            return Err(Error::new(
                ErrorKind::DataPath,
                format!(
                    "the new image is smaller ({}) than the disk ({})",
                    client.size(),
                    m.spec.size
                ),
            ));
        }
        let worker = Worker {
            chunks: reader.index().chunk_count(),
            chunk_size: reader.index().chunk_size,
            reader: reader.clone(),
            next: next.clone(),
            progress: progress.clone(),
            disk: m.spec.target.clone(),
            size: m.spec.size,
            zero_fill: disk.zero_fill,
            stall: host.data_stall_timeout(),
        };
        workers.spawn(async move {
            let _session = session;
            worker.run(client).await
        });
    }
    let total = join_workers(workers).await?;
    progress.event(Event::DiskDone {
        disk: m.spec.target.clone(),
    });
    Ok(total)
}

/// The sum of the workers' bytes, or the first error.
async fn join_workers(mut workers: tokio::task::JoinSet<Result<u64>>) -> Result<u64> {
    let mut total = 0;
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    format!("restore worker failed: {join}"),
                ));
            }
        }
    }
    Ok(total)
}

/// One NBD connection's share of a disk: it takes the next unwritten chunk until none
/// is left.
struct Worker {
    reader: Arc<virtkeep_repo::DiskReader>,
    next: Arc<AtomicUsize>,
    progress: Arc<dyn Progress>,
    /// The disk's target (for progress).
    disk: String,
    chunks: u64,
    chunk_size: u64,
    size: u64,
    zero_fill: bool,
    /// How long one chunk's writes (or the final flush) may take.
    stall: std::time::Duration,
}

impl Worker {
    async fn run(self, client: virtkeep_nbd::NbdClient) -> Result<u64> {
        let job = ChunkWrite {
            client: &client,
            max: u64::from(client.max_block().clamp(64 * 1024, 32 << 20)),
            chunk_size: self.chunk_size,
            size: self.size,
            zero_fill: self.zero_fill,
        };
        let indices = std::iter::from_fn(|| {
            let i = self.next.fetch_add(1, Ordering::Relaxed) as u64;
            (i < self.chunks).then_some(i)
        });
        // Two chunks per connection: one is read and decoded (on another core)
        // while the other's writes are on the wire, so neither waits for the other.
        let mut done = futures::stream::iter(indices)
            .map(|i| {
                let reader = self.reader.clone();
                let read = tokio::spawn(async move { reader.read_chunk(i).await });
                let write = tokio::time::timeout(self.stall, job.write(i, read));
                async { write.await.map_err(|_| crate::export::stalled())? }
            })
            .buffer_unordered(CHUNKS_IN_FLIGHT);
        let mut written = 0u64;
        while let Some(n) = done.next().await {
            let n = n?;
            written += n;
            self.progress.event(Event::DiskBytes {
                disk: self.disk.clone(),
                bytes: n,
            });
            if n > 0 {
                crate::failpoint::hit("restore-chunk-written").await;
            }
        }
        drop(done);
        tokio::time::timeout(self.stall, client.flush())
            .await
            .map_err(|_| crate::export::stalled())??;
        let _ = client.disconnect().await;
        Ok(written)
    }
}

/// Chunks each NBD connection has in flight during a restore.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Writes one chunk of a restored disk through an NBD connection.
struct ChunkWrite<'a> {
    client: &'a virtkeep_nbd::NbdClient,
    max: u64,
    chunk_size: u64,
    size: u64,
    zero_fill: bool,
}

impl ChunkWrite<'_> {
    /// Waits for chunk `i` from `read`, writes its data extents (and, with
    /// `zero_fill`, its zero runs), returns the data bytes written.
    async fn write(
        &self,
        i: u64,
        read: tokio::task::JoinHandle<virtkeep_repo::Result<Option<bytes::Bytes>>>,
    ) -> Result<u64> {
        let data = read.await.map_err(|join| {
            Error::new(ErrorKind::DataPath, format!("chunk reader failed: {join}"))
        })??;
        let Some(data) = data else {
            if self.zero_fill {
                let len = self
                    .chunk_size
                    .min(self.size.saturating_sub(i * self.chunk_size));
                self.client
                    .write_zeroes(i * self.chunk_size, len as u32, false)
                    .await?;
            }
            return Ok(0);
        };
        let mut writes = Vec::new();
        let mut zeros = Vec::new();
        for extent in virtkeep_repo::split_zero_runs(i * self.chunk_size, data) {
            match extent {
                virtkeep_repo::Extent::Data { offset, bytes } => {
                    let mut off = 0u64;
                    while off < bytes.len() as u64 {
                        let n = (bytes.len() as u64 - off).min(self.max);
                        writes.push((offset + off, bytes.slice(off as usize..(off + n) as usize)));
                        off += n;
                    }
                }
                virtkeep_repo::Extent::Zero { offset, len } if self.zero_fill => {
                    zeros.push((offset, len));
                }
                virtkeep_repo::Extent::Zero { .. } => {}
            }
        }
        let futs = writes.iter().map(|(o, b)| self.client.write(*o, b));
        futures::future::try_join_all(futs).await?;
        let futs = zeros
            .iter()
            .map(|(o, n)| self.client.write_zeroes(*o, *n as u32, false));
        futures::future::try_join_all(futs).await?;
        Ok(writes.iter().map(|(_, b)| b.len() as u64).sum())
    }
}
