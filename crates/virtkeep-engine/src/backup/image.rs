//! Reading one disk image (a file, or an LVM snapshot as a block device) into the
//! backup: qemu-nbd over SSH (or plain TCP with `--transport netcat`), or a `dd` stream
//! on hosts without qemu-nbd. Used by the strategies whose disks are images.

use std::sync::Arc;

use super::job::Job;
use super::strategy::DiskOut;
use crate::error::{Error, Result};
use crate::export::{DiskRead, ExportStats, NbdExport, ReadScope, export_disk, export_stream};
use crate::plan::{PlannedDisk, Transport};
use crate::store::RepoSink;

/// One image to read and what it builds on.
pub struct ImageRead<'a> {
    pub disk: &'a PlannedDisk,
    /// Where the frozen data is (the disk's path, or its snapshot's).
    pub path: &'a str,
    pub block_device: bool,
    /// The backup whose chunks this one builds on: its index is handed to the writer,
    /// so unchanged chunks are recognised by their digest and not stored again.
    pub parent: Option<&'a str>,
    /// Only these (offset, length) ranges changed since `parent`; everything else is
    /// the parent's.
    pub ranges: Option<Vec<(u64, u64)>>,
}

/// Reads `read` into the backup through the job's transport.
pub async fn export_image(
    job: &Job<'_>,
    out: &DiskOut<'_>,
    read: ImageRead<'_>,
) -> Result<ExportStats> {
    let host = job.host;
    let previous = match read.parent {
        Some(parent) => Some(job.repo.fixed_index(parent, &read.disk.target).await?),
        None => None,
    };
    if out.transport == Transport::Stream {
        let size = if read.block_device {
            host.block_device_size(read.path).await?
        } else {
            host.file_size(read.path).await?
        };
        let sink = Arc::new(RepoSink::new(
            out.writer
                .disk(read.disk.spec(size), previous.as_ref())
                .await?,
        ));
        let to = DiskRead::whole(&job.vm.name, &read.disk.target, 1);
        let st = export_stream(host, read.path, size, sink.clone(), &to, &job.progress).await?;
        sink.finish().await?;
        return Ok(st);
    }
    let (dir, i, format) = (&job.dir, out.index, &read.disk.format);
    let export = if out.transport == Transport::Netcat {
        NbdExport::start_readonly_tcp(host, dir, i, read.path, format, read.block_device).await?
    } else {
        NbdExport::start_readonly(host, dir, i, read.path, format, read.block_device).await?
    };
    let res = read_export(job, out, &export, &read, previous).await;
    let stopped = export.stop(host).await;
    let st = res?;
    stopped?;
    Ok(st)
}

async fn read_export(
    job: &Job<'_>,
    out: &DiskOut<'_>,
    export: &NbdExport,
    read: &ImageRead<'_>,
    previous: Option<virtkeep_repo::FixedIndex>,
) -> Result<ExportStats> {
    let probe = export.connect(job.host.session(), &[]).await?;
    let size = probe.size();
    let _ = probe.disconnect().await;
    let scope = match (&read.ranges, read.parent) {
        (Some(ranges), Some(parent)) => ReadScope::Ranges {
            ranges: ranges.clone(),
            parent: Arc::new(job.repo.disk_reader(parent, &read.disk.target).await?),
        },
        (Some(_), None) => {
            return Err(Error::domain(
                "internal: changed ranges without a parent backup",
            ));
        }
        _ => ReadScope::Full,
    };
    let sink = Arc::new(RepoSink::new(
        out.writer
            .disk(read.disk.spec(size), previous.as_ref())
            .await?,
    ));
    let to = DiskRead {
        scope,
        ..DiskRead::whole(&job.vm.name, &read.disk.target, job.parallel())
    };
    let st = export_disk(job.host, export, sink.clone(), &to, &job.progress).await?;
    sink.finish().await?;
    Ok(st)
}
