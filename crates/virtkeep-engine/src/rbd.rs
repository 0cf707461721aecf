//! Ceph RBD disks: `rbd snap create` per image, `rbd export-diff` (from the start for a
//! full, `--from-snap` the kept snapshot for an incremental) streamed through SSH and
//! parsed on the node, and `rbd import-diff` of a node-generated stream for restore.
//!
//! Snapshot housekeeping: every backup (`--mode full` too: a full read, not a break of
//! the chain) keeps the newest virtkeep snapshot of each image for the next incremental,
//! recorded in the image's metadata (`virtkeep.base`) and the manifest; older virtkeep
//! snapshots go. Only `--no-keep-base` leaves none (recorded in the manifest, so the next
//! backup says why it is a full). `cleanup` removes virtkeep snapshots that are not the
//! recorded base (a killed run's). Ceph settings (conf, id, keyring) are passed
//! on every command line: sshd passes no CEPH_* variables.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use virtkeep_libvirt::rbd::CephArgs;

use crate::error::{Error, ErrorKind, Result};
use crate::export::{ChunkSink, ExportStats, stalled};
use crate::host::Host;
use crate::progress::{Event, Progress};
use crate::rbd_diff::{DiffReader, DiffWriter, Record};

pub const SNAP_PREFIX: &str = "virtkeep-";
const BASE_KEY: &str = "virtkeep.base";

pub fn ceph(host: &Host) -> Result<CephArgs> {
    host.config.ceph_args().ok_or_else(|| {
        Error::config(format!("host {} has RBD disks but no Ceph settings", host.name)).hint(format!(
            "add them: `virtkeep host add {} --ssh … --ceph-conf /etc/ceph/ceph.conf --ceph-id admin --ceph-keyring /etc/ceph/ceph.client.admin.keyring`",
            host.name
        ))
    })
}

pub fn split(spec: &str) -> (&str, &str) {
    spec.split_once('/').unwrap_or(("rbd", spec))
}

pub async fn snapshots(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
) -> Result<Vec<String>> {
    let out = host.run_string(&ceph.snap_ls_json(pool, image)).await?;
    Ok(virtkeep_libvirt::rbd::parse_rbd_snap_ls_json(&out)
        .map_err(|e| {
            Error::new(
                ErrorKind::Remote,
                format!("rbd snap ls {pool}/{image}: {e}"),
            )
        })?
        .into_iter()
        .map(|s| s.name)
        // Snapshot names go back into rbd command lines: only names virtkeep could
        // have made are passed on (other tools' snapshots are never touched anyway).
        .filter(|n| virtkeep_libvirt::check_rbd_name("snapshot", n).is_ok())
        .collect())
}

pub async fn snap_create(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
    snap: &str,
) -> Result<()> {
    host.run(&ceph.snap_create(pool, image, snap))
        .await
        .map(|_| ())
        .map_err(|e| e.context(format!("rbd snap create {pool}/{image}@{snap}")))
}

pub async fn snap_rm(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
    snap: &str,
) -> Result<()> {
    host.run(&ceph.snap_rm(pool, image, snap)).await.map(|_| ())
}

pub async fn recorded_base(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
) -> Option<String> {
    let cmd = ceph.meta_get(pool, image, BASE_KEY);
    match host.exec(&cmd).await {
        Ok(out) if out.status == 0 => Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|s| virtkeep_libvirt::check_rbd_name("snapshot", s).is_ok()),
        _ => None,
    }
}

/// Keeps `keep` (recording it as the base) or nothing, and removes other virtkeep snaps.
pub async fn housekeep(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
    keep: Option<&str>,
) -> Result<Vec<String>> {
    match keep {
        Some(snap) => {
            host.run(&ceph.meta_set(pool, image, BASE_KEY, snap))
                .await?;
        }
        None => {
            let _ = host.exec(&ceph.meta_remove(pool, image, BASE_KEY)).await;
        }
    }
    let mut removed = Vec::new();
    for s in snapshots(host, ceph, pool, image).await? {
        if s.starts_with(SNAP_PREFIX) && Some(s.as_str()) != keep {
            snap_rm(host, ceph, pool, image, &s).await?;
            removed.push(s);
        }
    }
    Ok(removed)
}

/// For `cleanup`: virtkeep snapshots other than the recorded base are a killed run's.
pub async fn heal_image(
    host: &Host,
    ceph: &CephArgs,
    pool: &str,
    image: &str,
    dry_run: bool,
) -> Result<Vec<String>> {
    let base = recorded_base(host, ceph, pool, image).await;
    let mut actions = Vec::new();
    for s in snapshots(host, ceph, pool, image).await? {
        if s.starts_with(SNAP_PREFIX) && Some(&s) != base.as_ref() {
            actions.push(format!("remove RBD snapshot {pool}/{image}@{s}"));
            if !dry_run {
                snap_rm(host, ceph, pool, image, &s).await?;
            }
        }
    }
    Ok(actions)
}

/// One `rbd export-diff` to read: `pool/image@snap`, from snapshot `from` (with the
/// parent backup's chunks the diff is patched onto) when incremental.
pub struct DiffExport<'a> {
    pub ceph: &'a CephArgs,
    pub pool: &'a str,
    pub image: &'a str,
    pub snap: &'a str,
    pub from: Option<(&'a str, Arc<virtkeep_repo::DiskReader>)>,
    pub size: u64,
    /// VM and disk names, for progress events.
    pub vm: &'a str,
    pub disk: &'a str,
}

/// Streams `rbd export-diff` of `pool/image@snap` (from `from` when incremental) into
/// the sink. A full fills untouched chunks with zeros; an incremental patches the
/// records onto the parent's chunks and leaves untouched chunks as they were.
pub async fn export(
    host: &Host,
    req: DiffExport<'_>,
    sink: Arc<dyn ChunkSink>,
    progress: &Arc<dyn Progress>,
) -> Result<ExportStats> {
    let DiffExport {
        ceph,
        pool,
        image,
        snap,
        from,
        size,
        vm,
        disk,
    } = req;
    let cmd = ceph.export_diff(pool, image, snap, from.as_ref().map(|(s, _)| *s));
    let mut proc = host.session().spawn(&cmd).await?;
    let parent = from.map(|(_, r)| r);
    progress.event(Event::DiskStart {
        vm: vm.to_string(),
        disk: disk.to_string(),
        bytes: size,
    });
    let mut patcher = Patcher {
        chunk: sink.chunk_size(),
        sink,
        parent,
        size,
        stats: ExportStats {
            size,
            ..ExportStats::default()
        },
        current: None,
        next_untouched: 0,
    };
    let stall = host.data_stall_timeout();
    let mut reader = tokio::time::timeout(stall, DiffReader::new(&mut proc.stdout))
        .await
        .map_err(|_| stalled())?
        .map_err(diff_err)?;
    loop {
        let record = tokio::time::timeout(stall, reader.next())
            .await
            .map_err(|_| stalled())?
            .map_err(diff_err)?;
        let (offset, len, data) = match record {
            Record::End => break,
            Record::Size(_) => continue,
            Record::Data { offset, data } => (offset, data.len() as u64, Some(data)),
            Record::Zero { offset, len } => (offset, len, None),
        };
        patcher.stats.bytes_read += data.as_ref().map_or(0, |d| d.len() as u64);
        progress.event(Event::DiskBytes {
            disk: disk.to_string(),
            bytes: len,
        });
        patcher.apply(offset, len, data.as_deref()).await?;
    }
    let stats = patcher.finish().await?;
    let (status, stderr) = proc.wait().await?;
    if status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "rbd export-diff {pool}/{image}@{snap} failed: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        ));
    }
    progress.event(Event::DiskDone {
        disk: disk.to_string(),
    });
    Ok(stats)
}

/// Turns the records of an export-diff into whole chunks: each chunk starts as the
/// parent's (incremental) or zeros (full) and gets the records' bytes written over it.
struct Patcher {
    sink: Arc<dyn ChunkSink>,
    parent: Option<Arc<virtkeep_repo::DiskReader>>,
    chunk: u64,
    size: u64,
    stats: ExportStats,
    /// The chunk being patched.
    current: Option<(u64, BytesMut)>,
    /// The first chunk not yet handed to the sink.
    next_untouched: u64,
}

impl Patcher {
    /// Writes `len` bytes at `offset` (`data`, or zeros) into the chunks they cover.
    async fn apply(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let chunk = self.chunk;
        let mut pos = offset;
        while pos < (offset + len).min(self.size) {
            let idx = pos / chunk;
            if self.current.as_ref().is_none_or(|(i, _)| *i != idx) {
                self.start_chunk(idx).await?;
            }
            let end = ((idx + 1) * chunk).min(offset + len).min(self.size);
            if let Some((_, buf)) = self.current.as_mut() {
                let (a, b) = ((pos - idx * chunk) as usize, (end - idx * chunk) as usize);
                match data {
                    Some(d) => buf[a..b]
                        .copy_from_slice(&d[(pos - offset) as usize..(end - offset) as usize]),
                    None => buf[a..b].fill(0),
                }
            }
            pos = end;
        }
        Ok(())
    }

    /// Hands the chunk being patched to the sink and starts chunk `idx`.
    async fn start_chunk(&mut self, idx: u64) -> Result<()> {
        if let Some((i, buf)) = self.current.take() {
            if i > idx {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    "rbd export-diff records out of order",
                ));
            }
            flush(&self.sink, i, buf, &mut self.stats).await?;
            self.next_untouched = i + 1;
        }
        let incremental = self.parent.is_some();
        fill_untouched(
            &self.sink,
            incremental,
            self.next_untouched,
            idx,
            &mut self.stats,
        )
        .await?;
        let len = self.chunk.min(self.size - idx * self.chunk) as usize;
        let base = match &self.parent {
            Some(p) => match p.read_chunk(idx).await? {
                Some(old) if old.len() == len => BytesMut::from(&old[..]),
                _ => BytesMut::zeroed(len),
            },
            None => BytesMut::zeroed(len),
        };
        self.current = Some((idx, base));
        Ok(())
    }

    async fn finish(mut self) -> Result<ExportStats> {
        if let Some((i, buf)) = self.current.take() {
            flush(&self.sink, i, buf, &mut self.stats).await?;
            self.next_untouched = i + 1;
        }
        let count = self.size.div_ceil(self.chunk);
        let incremental = self.parent.is_some();
        fill_untouched(
            &self.sink,
            incremental,
            self.next_untouched,
            count,
            &mut self.stats,
        )
        .await?;
        Ok(self.stats)
    }
}

fn diff_err(e: crate::rbd_diff::DiffError) -> Error {
    Error::new(ErrorKind::DataPath, e.to_string())
}

async fn flush(
    sink: &Arc<dyn ChunkSink>,
    index: u64,
    buf: BytesMut,
    stats: &mut ExportStats,
) -> Result<()> {
    stats.data_chunks += 1;
    sink.data_chunk(index, buf.freeze()).await
}

/// Chunks `from..to` that the diff did not mention: zeros in a full, unchanged otherwise.
async fn fill_untouched(
    sink: &Arc<dyn ChunkSink>,
    incremental: bool,
    from: u64,
    to: u64,
    stats: &mut ExportStats,
) -> Result<()> {
    if incremental {
        return Ok(());
    }
    for i in from..to {
        sink.zero_chunk(i).await?;
        stats.zero_chunks += 1;
    }
    Ok(())
}

/// The RBD image a restore creates: `pool/image` of `size` bytes, for disk `disk`.
pub struct ImageRestore<'a> {
    pub ceph: &'a CephArgs,
    pub pool: &'a str,
    pub image: &'a str,
    pub size: u64,
    pub disk: &'a str,
}

/// Creates `pool/image` and writes the disk's data extents into it through
/// `rbd import-diff` (zeros stay unallocated).
pub async fn restore_image(
    host: &Host,
    to: &ImageRestore<'_>,
    reader: &virtkeep_repo::DiskReader,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    let &ImageRestore {
        ceph,
        pool,
        image,
        size,
        disk,
    } = to;
    host.run(&ceph.create(pool, image, size))
        .await
        .map_err(|e| e.context(format!("creating RBD image {pool}/{image}")))?;
    let spec = format!("{pool}/{image}");
    let mut proc = host.session().spawn(&ceph.import_diff(pool, image)).await?;
    let fed = feed_import(&mut proc.stdin, reader, size, progress, disk).await;
    let shut = proc.stdin.shutdown().await.map_err(io("rbd import-diff"));
    // Waited for even after a failed read: the image can be removed only once
    // `rbd import-diff` has closed it.
    let (status, stderr) = proc.wait().await?;
    let written = fed?;
    shut?;
    if status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "rbd import-diff into {spec} failed: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        ));
    }
    Ok(written)
}

/// Streams the data extents of a backed-up disk as an rbd diff into `stdin`.
async fn feed_import<W: tokio::io::AsyncWrite + Unpin>(
    stdin: &mut W,
    reader: &virtkeep_repo::DiskReader,
    size: u64,
    progress: &Arc<dyn Progress>,
    disk: &str,
) -> Result<u64> {
    let mut w = DiffWriter::new(stdin, size)
        .await
        .map_err(io("rbd import-diff"))?;
    let chunk = reader.index().chunk_size;
    let mut written = 0u64;
    for i in 0..reader.index().chunk_count() {
        let Some(data) = reader.read_chunk(i).await? else {
            continue;
        };
        for extent in virtkeep_repo::split_zero_runs(i * chunk, Bytes::clone(&data)) {
            if let virtkeep_repo::Extent::Data { offset, bytes } = extent {
                w.data(offset, &bytes)
                    .await
                    .map_err(io("rbd import-diff"))?;
                written += bytes.len() as u64;
                progress.event(Event::DiskBytes {
                    disk: disk.to_string(),
                    bytes: bytes.len() as u64,
                });
            }
        }
        crate::failpoint::hit("restore-chunk-written").await;
    }
    w.finish().await.map_err(io("rbd import-diff"))?;
    Ok(written)
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::new(ErrorKind::DataPath, format!("{what}: {e}"))
}

pub async fn image_exists(host: &Host, ceph: &CephArgs, pool: &str, image: &str) -> Result<bool> {
    Ok(host.exec(&ceph.info_json(pool, image)).await?.status == 0)
}

/// Whether libvirt on the host has the secret a restored RBD disk refers to.
pub async fn secret_exists(host: &Host, uuid: &str) -> Result<bool> {
    let out = host.exec(&host.virsh().secret_dumpxml(uuid)).await?;
    Ok(out.status == 0)
}

pub async fn image_size(host: &Host, ceph: &CephArgs, pool: &str, image: &str) -> Result<u64> {
    let out = host.run_string(&ceph.info_json(pool, image)).await?;
    Ok(virtkeep_libvirt::rbd::parse_rbd_info_json(&out)
        .map_err(|e| Error::new(ErrorKind::Remote, format!("rbd info {pool}/{image}: {e}")))?
        .size)
}
