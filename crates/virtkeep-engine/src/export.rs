//! The data path of a backup: a frozen image on the host, exported read-only by
//! qemu-nbd on a private unix socket, read by the node's NBD client through SSH
//! (direct-streamlocal), chunk by chunk into the repository.
//!
//! Block status (`base:allocation`) is asked once for the whole disk, so holes and zero
//! runs are neither read nor sent; chunks with no data are recorded as zero chunks.
//! Several connections read in parallel, each with a few requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use virtkeep_libvirt::{coreutils, qemu_nbd};
use virtkeep_nbd::{BASE_ALLOCATION, MappedKind, NbdClient, allocated_extents};

use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;
use crate::progress::{Event, Progress};

/// Where the chunks of one disk go (the repository's disk writer, behind a seam so the
/// data path does not depend on the repository's internals).
#[async_trait]
pub trait ChunkSink: Send + Sync {
    fn chunk_size(&self) -> u64;
    async fn data_chunk(&self, index: u64, data: Bytes) -> Result<()>;
    async fn zero_chunk(&self, index: u64) -> Result<()>;
}

/// Where a qemu-nbd export listens.
#[derive(Debug, Clone)]
enum Endpoint {
    /// A private unix socket on the host, reached through SSH (the default).
    Unix(String),
    /// Plain TCP on the host's address (`--transport netcat`): unencrypted, for
    /// trusted networks only.
    Tcp(String, u16),
}

/// A running qemu-nbd export on the host; `stop` kills it (and `heal` does, after a crash).
pub struct NbdExport {
    endpoint: Endpoint,
    export_name: String,
    /// qemu-nbd's pid file; `None` for libvirt's own NBD server (pull-mode backup),
    /// which ends with the backup job.
    pid_file: Option<String>,
}

impl NbdExport {
    /// Exports `path` (format `format`) read-only, shared with the QEMU that may hold it.
    pub async fn start_readonly(
        host: &Host,
        job_dir: &str,
        index: usize,
        path: &str,
        format: &str,
        block_device: bool,
    ) -> Result<NbdExport> {
        let socket = format!("{job_dir}/{index}.sock");
        let pid_file = format!("{job_dir}/{index}.pid");
        host.run(&qemu_nbd::export_readonly(
            &qemu_nbd::image_opts(format, path, block_device, true),
            &socket,
            &pid_file,
        ))
        .await
        .map_err(|e| e.context(format!("exporting {path} with qemu-nbd")))?;
        Ok(NbdExport {
            endpoint: Endpoint::Unix(socket),
            export_name: String::new(),
            pid_file: Some(pid_file),
        })
    }

    /// Exports `path` read-only on plain TCP at the host's address, on the first free
    /// port of a small range. Unencrypted and unauthenticated: `--transport netcat`.
    pub async fn start_readonly_tcp(
        host: &Host,
        job_dir: &str,
        index: usize,
        path: &str,
        format: &str,
        block_device: bool,
    ) -> Result<NbdExport> {
        let pid_file = format!("{job_dir}/{index}.pid");
        let bind = host.config.address.clone();
        let mut last = None;
        for attempt in 0..20u16 {
            let port = 10809 + (std::process::id() as u16 % 500) + attempt * 7 + index as u16;
            let opts = qemu_nbd::image_opts(format, path, block_device, true);
            let cmd = qemu_nbd::export_readonly_tcp(&opts, &bind, port, &pid_file);
            match host.run(&cmd).await {
                Ok(_) => {
                    return Ok(NbdExport {
                        endpoint: Endpoint::Tcp(bind, port),
                        export_name: String::new(),
                        pid_file: Some(pid_file),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| Error::new(ErrorKind::DataPath, "no free port"))
            .context(format!("exporting {path} over TCP")))
    }

    /// Exports `path` writable, for restore.
    pub async fn start_writable(
        host: &Host,
        job_dir: &str,
        index: usize,
        path: &str,
        format: &str,
        block_device: bool,
    ) -> Result<NbdExport> {
        let socket = format!("{job_dir}/{index}.sock");
        let pid_file = format!("{job_dir}/{index}.pid");
        let start = |direct| {
            qemu_nbd::export_writable(path, format, block_device, direct, &socket, &pid_file)
        };
        if let Err(e) = host.run(&start(true)).await {
            // No O_DIRECT there (tmpfs, some network file systems): through the page cache.
            tracing::debug!(path, error = %e, "qemu-nbd without the page cache failed; using it");
            host.run(&start(false))
                .await
                .map_err(|e| e.context(format!("exporting {path} with qemu-nbd")))?;
        }
        Ok(NbdExport {
            endpoint: Endpoint::Unix(socket),
            export_name: String::new(),
            pid_file: Some(pid_file),
        })
    }

    /// The export of one disk of a libvirt pull-mode backup job.
    pub fn libvirt_pull(socket: &str, target: &str) -> NbdExport {
        NbdExport {
            endpoint: Endpoint::Unix(socket.to_string()),
            export_name: target.to_string(),
            pid_file: None,
        }
    }

    /// Connects and completes the NBD handshake within [`HANDSHAKE_TIMEOUT`] (a server
    /// that accepts but never answers must not hold the job forever).
    pub async fn connect(
        &self,
        session: &virtkeep_ssh::Session,
        contexts: &[&str],
    ) -> Result<NbdClient> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect_unbounded(session, contexts))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::DataPath,
                    format!(
                        "the NBD export {} did not complete its handshake within {} s",
                        self.describe(),
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                )
                .hint("the host's qemu-nbd or libvirt is stuck or overloaded; `virtkeep cleanup HOST` heals the VM")
            })?
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(socket) => socket.clone(),
            Endpoint::Tcp(addr, port) => format!("{addr}:{port}"),
        }
    }

    async fn connect_unbounded(
        &self,
        session: &virtkeep_ssh::Session,
        contexts: &[&str],
    ) -> Result<NbdClient> {
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = session.open_unix_socket(socket).await?;
                Ok(NbdClient::connect(stream, &self.export_name, contexts).await?)
            }
            Endpoint::Tcp(addr, port) => {
                let stream = tokio::net::TcpStream::connect((addr.as_str(), *port)).await.map_err(|e| {
                    Error::new(ErrorKind::DataPath, format!("connecting to the NBD export at {addr}:{port}: {e}"))
                        .hint("--transport netcat needs the host's qemu-nbd port reachable from the node (no firewall in between)")
                })?;
                let _ = stream.set_nodelay(true);
                Ok(NbdClient::connect(stream, &self.export_name, contexts).await?)
            }
        }
    }

    pub async fn stop(self, host: &Host) -> Result<()> {
        let Some(pid_file) = self.pid_file else {
            return Ok(());
        };
        // Terminate and wait until it is gone, so the image is no longer open. A
        // zombie counts as gone: it has closed the image, and its reaper (init, as
        // qemu-nbd --fork detaches) may take seconds to collect it.
        host.run(&qemu_nbd::stop(&pid_file))
            .await
            .map_err(|e| e.context("stopping qemu-nbd"))?;
        Ok(())
    }
}

/// How long connecting to an NBD export and its handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub fn stalled() -> Error {
    Error::new(
        ErrorKind::DataPath,
        "the disk's data stream on the host made no progress within data_stall_timeout_secs",
    )
    .hint(
        "check the host's load, its storage and the network (raise data_stall_timeout_secs \
         for very slow storage); `virtkeep cleanup HOST` removes what the job left",
    )
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExportStats {
    pub size: u64,
    /// Bytes that block status says hold data, i.e. what crossed the network.
    pub bytes_read: u64,
    pub zero_chunks: u64,
    pub data_chunks: u64,
}

/// The data ranges (relative to the chunk) of each chunk; empty = all zeros.
fn plan_chunks(extents: &[virtkeep_nbd::Mapped], size: u64, chunk: u64) -> Vec<Vec<(u64, u64)>> {
    let count = size.div_ceil(chunk) as usize;
    let mut plan = vec![Vec::new(); count];
    for e in extents.iter().filter(|e| e.kind == MappedKind::Data) {
        let mut off = e.offset;
        let end = (e.offset + e.length).min(size);
        while off < end {
            let idx = off / chunk;
            let chunk_end = ((idx + 1) * chunk).min(end);
            plan[idx as usize].push((off - idx * chunk, chunk_end - off));
            off = chunk_end;
        }
    }
    plan
}

/// What to read of an export.
#[derive(Clone, Default)]
pub enum ReadScope {
    /// Everything allocated (`base:allocation`).
    #[default]
    Full,
    /// Only the ranges a dirty-bitmap context marks, patched onto the parent's chunks.
    Dirty {
        context: String,
        parent: Arc<virtkeep_repo::DiskReader>,
    },
    /// Only these (offset, length) ranges, patched onto the parent's chunks: a kept
    /// overlay's own allocation.
    Ranges {
        ranges: Vec<(u64, u64)>,
        parent: Arc<virtkeep_repo::DiskReader>,
    },
}

/// Which disk is read, and how: the caller's side of [`export_disk`] and
/// [`export_stream`].
#[derive(Clone)]
pub struct DiskRead {
    pub scope: ReadScope,
    /// Parallel data connections.
    pub parallel: usize,
    /// VM and disk names, for progress events.
    pub vm: String,
    pub disk: String,
}

impl DiskRead {
    /// Everything allocated of disk `disk` of `vm`.
    pub fn whole(vm: &str, disk: &str, parallel: usize) -> DiskRead {
        DiskRead {
            scope: ReadScope::Full,
            parallel,
            vm: vm.to_string(),
            disk: disk.to_string(),
        }
    }
}

/// Reads the guest-visible content of an export into `sink`: everything allocated, or
/// (incremental) only the dirty ranges; unchanged chunks keep the parent's digest.
pub async fn export_disk(
    host: &Host,
    export: &NbdExport,
    sink: Arc<dyn ChunkSink>,
    read: &DiskRead,
    progress: &Arc<dyn Progress>,
) -> Result<ExportStats> {
    let (size, extents) = extents(host, export, &read.scope).await?;
    let parent = match &read.scope {
        ReadScope::Dirty { parent, .. } | ReadScope::Ranges { parent, .. } => Some(parent.clone()),
        ReadScope::Full => None,
    };
    let chunk = sink.chunk_size();
    let plan = Arc::new(plan_chunks(&extents, size, chunk));
    let data_bytes: u64 = plan.iter().flatten().map(|(_, l)| l).sum();
    progress.event(Event::DiskStart {
        vm: read.vm.clone(),
        disk: read.disk.clone(),
        bytes: data_bytes,
    });
    let shared = Workers {
        plan: plan.clone(),
        next: Arc::new(AtomicUsize::new(0)),
        read: Arc::new(AtomicU64::new(0)),
        zero: Arc::new(AtomicU64::new(0)),
        sink,
        progress: progress.clone(),
        parent,
        disk: read.disk.clone(),
        chunk,
        size,
        stall: host.data_stall_timeout(),
    };
    // The workers' connections and NBD handshakes side by side, not one after another.
    let connected = futures::future::try_join_all((0..read.parallel.max(1)).map(|w| async move {
        let session = host.data_session(w).await?;
        let client = export.connect(&session, &[]).await?;
        Ok::<_, Error>((session, client))
    }))
    .await?;
    let mut workers = tokio::task::JoinSet::new();
    for (session, client) in connected {
        let shared = shared.clone();
        workers.spawn(async move {
            let _session = session;
            shared.run(client).await
        });
    }
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    format!("export worker failed: {join}"),
                ));
            }
        }
    }
    progress.event(Event::DiskDone {
        disk: read.disk.clone(),
    });
    Ok(ExportStats {
        size,
        bytes_read: shared.read.load(Ordering::Relaxed),
        zero_chunks: shared.zero.load(Ordering::Relaxed),
        data_chunks: plan.iter().filter(|r| !r.is_empty()).count() as u64,
    })
}

/// The export's size and the extents `scope` reads: the allocated ones, the dirty ones,
/// or the given ranges.
async fn extents(
    host: &Host,
    export: &NbdExport,
    scope: &ReadScope,
) -> Result<(u64, Vec<virtkeep_nbd::Mapped>)> {
    let context = match scope {
        ReadScope::Dirty { context, .. } => context.clone(),
        _ => BASE_ALLOCATION.to_string(),
    };
    let control = export.connect(host.session(), &[context.as_str()]).await?;
    let size = control.size();
    let extents = match scope {
        ReadScope::Ranges { ranges, .. } => ranges
            .iter()
            .map(|&(offset, length)| virtkeep_nbd::Mapped {
                offset,
                length,
                kind: MappedKind::Data,
            })
            .collect(),
        _ => allocated_extents(&control, &context, 0, size).await?,
    };
    let _ = control.disconnect().await;
    Ok((size, extents))
}

/// What the parallel readers of one disk share.
#[derive(Clone)]
struct Workers {
    plan: Arc<Vec<Vec<(u64, u64)>>>,
    next: Arc<AtomicUsize>,
    read: Arc<AtomicU64>,
    zero: Arc<AtomicU64>,
    sink: Arc<dyn ChunkSink>,
    progress: Arc<dyn Progress>,
    parent: Option<Arc<virtkeep_repo::DiskReader>>,
    disk: String,
    chunk: u64,
    size: u64,
    /// How long one chunk's requests may take.
    stall: std::time::Duration,
}

impl Workers {
    /// One reader: takes chunks from the shared counter until the plan is done.
    async fn run(self, client: NbdClient) -> Result<()> {
        let max = u64::from(client.max_block().clamp(64 * 1024, 32 << 20));
        let job = ChunkJob {
            client: &client,
            max,
            chunk: self.chunk,
            size: self.size,
            parent: self.parent.as_ref(),
            stall: self.stall,
        };
        // Chunks are taken from the shared counter as this worker has room, so the
        // workers still share the disk evenly.
        let indices = std::iter::from_fn(|| {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            (i < self.plan.len()).then_some(i)
        });
        let mut chunks = futures::stream::iter(indices)
            .map(|i| job.fetch(i as u64, &self.plan[i]))
            .buffer_unordered(CHUNKS_IN_FLIGHT);
        while let Some(fetched) = chunks.next().await {
            match fetched? {
                Fetched::Unchanged => {}
                Fetched::Zero(index) => {
                    self.sink.zero_chunk(index).await?;
                    self.zero.fetch_add(1, Ordering::Relaxed);
                }
                Fetched::Data { index, data, moved } => {
                    self.read.fetch_add(moved, Ordering::Relaxed);
                    self.sink.data_chunk(index, data).await?;
                    self.progress.event(Event::DiskBytes {
                        disk: self.disk.clone(),
                        bytes: moved,
                    });
                }
            }
        }
        drop(chunks);
        let _ = client.disconnect().await;
        Ok(())
    }
}

/// Chunks each NBD connection reads at once: while one chunk's replies are copied and
/// handed to the repository writer, the next one's requests are already on the wire.
const CHUNKS_IN_FLIGHT: usize = 2;

/// What one chunk of the plan turned into.
enum Fetched {
    /// Nothing to read: unchanged since the parent (it keeps the seeded digest).
    Unchanged,
    /// Nothing allocated: a zero chunk.
    Zero(u64),
    Data {
        index: u64,
        data: Bytes,
        moved: u64,
    },
}

/// Reads the planned ranges of one chunk through an NBD connection.
struct ChunkJob<'a> {
    client: &'a NbdClient,
    max: u64,
    chunk: u64,
    size: u64,
    parent: Option<&'a Arc<virtkeep_repo::DiskReader>>,
    stall: std::time::Duration,
}

impl ChunkJob<'_> {
    async fn fetch(&self, index: u64, ranges: &[(u64, u64)]) -> Result<Fetched> {
        if ranges.is_empty() {
            return Ok(match self.parent {
                Some(_) => Fetched::Unchanged,
                None => Fetched::Zero(index),
            });
        }
        let len = self.chunk.min(self.size - index * self.chunk) as usize;
        // Requests of this chunk go out together (the client pipelines them).
        let mut offs = Vec::new();
        let mut reads = Vec::new();
        for &(rel, rlen) in ranges {
            let mut off = rel;
            while off < rel + rlen {
                let n = (rel + rlen - off).min(self.max);
                offs.push(off);
                reads.push(self.client.read(index * self.chunk + off, n as u32));
                off += n;
            }
        }
        let replies = async {
            tokio::time::timeout(self.stall, futures::future::try_join_all(reads))
                .await
                .map_err(|_| stalled())?
                .map_err(Error::from)
        };
        let whole = offs.len() == 1 && ranges[0].1 == len as u64;
        // An incremental merges the changed ranges into the parent's chunk, read
        // from the repository while the NBD replies arrive.
        let base = async {
            match self.parent {
                Some(p) if !whole => p.read_chunk(index).await.map_err(Error::from),
                _ => Ok(None),
            }
        };
        let (all, base) = tokio::try_join!(replies, base)?;
        let moved: u64 = all.iter().map(|d| d.len() as u64).sum();
        let data = if whole && offs[0] == 0 && all[0].len() == len {
            // The whole chunk in one reply (the common case): no zeroing, no copy.
            all.into_iter().next().unwrap_or_default()
        } else {
            let mut buf = match base {
                Some(old) if old.len() == len => BytesMut::from(&old[..]),
                _ => BytesMut::zeroed(len),
            };
            for (off, data) in offs.into_iter().zip(all) {
                buf[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            buf.freeze()
        };
        Ok(Fetched::Data { index, data, moved })
    }
}

/// The fallback for hosts without qemu-nbd: `dd` of a raw image through the SSH
/// session. Every byte travels (no block status); all-zero chunks are still not stored.
pub async fn export_stream(
    host: &Host,
    path: &str,
    size: u64,
    sink: Arc<dyn ChunkSink>,
    read: &DiskRead,
    progress: &Arc<dyn Progress>,
) -> Result<ExportStats> {
    use tokio::io::AsyncReadExt;
    let (vm, disk) = (read.vm.as_str(), read.disk.as_str());
    let chunk = sink.chunk_size();
    progress.event(Event::DiskStart {
        vm: vm.to_string(),
        disk: disk.to_string(),
        bytes: size,
    });
    let cmd = coreutils::dd_read(path, chunk.min(16 << 20));
    let mut proc = host.session().spawn(&cmd).await?;
    let mut stats = ExportStats {
        size,
        ..ExportStats::default()
    };
    let mut index = 0u64;
    while index * chunk < size {
        let len = chunk.min(size - index * chunk) as usize;
        let mut buf = BytesMut::zeroed(len);
        tokio::time::timeout(host.data_stall_timeout(), proc.stdout.read_exact(&mut buf))
            .await
            .map_err(|_| stalled())?
            .map_err(|e| {
                Error::new(
                    ErrorKind::DataPath,
                    format!("reading {path} through dd: {e}"),
                )
            })?;
        if buf.iter().all(|b| *b == 0) {
            sink.zero_chunk(index).await?;
            stats.zero_chunks += 1;
        } else {
            sink.data_chunk(index, buf.freeze()).await?;
            stats.data_chunks += 1;
        }
        stats.bytes_read += len as u64;
        progress.event(Event::DiskBytes {
            disk: disk.to_string(),
            bytes: len as u64,
        });
        index += 1;
    }
    let (status, stderr) = proc.wait().await?;
    if status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "dd of {path} failed: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        ));
    }
    progress.event(Event::DiskDone {
        disk: disk.to_string(),
    });
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::plan_chunks;
    use virtkeep_nbd::{Mapped, MappedKind};

    #[test]
    fn data_extents_split_at_chunk_boundaries() {
        let ex = [
            Mapped {
                offset: 0,
                length: 10,
                kind: MappedKind::Data,
            },
            Mapped {
                offset: 10,
                length: 90,
                kind: MappedKind::Zero,
            },
            Mapped {
                offset: 100,
                length: 150,
                kind: MappedKind::Data,
            },
        ];
        let plan = plan_chunks(&ex, 300, 128);
        assert_eq!(plan, vec![vec![(0, 10), (100, 28)], vec![(0, 122)], vec![]]);
    }
}
