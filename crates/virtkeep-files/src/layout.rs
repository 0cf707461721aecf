//! A disk's layout: its partition table and what each partition holds.

use std::io::{Read, Seek};

use serde::Serialize;
use virtkeep_repo::{DiskView, Repository};

use crate::error::FilesError;
use crate::fsdetect::{FsInfo, detect};
use crate::partition::{Partition, TableKind, read_table};

/// One partition and its filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLayout {
    #[serde(flatten)]
    pub partition: Partition,
    pub filesystem: Option<FsInfo>,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskLayout {
    pub disk: String,
    pub size: u64,
    pub table: TableKind,
    pub disk_guid: Option<String>,
    pub partitions: Vec<PartitionLayout>,
    /// A filesystem on the whole disk (no partition table).
    pub filesystem: Option<FsInfo>,
    pub warnings: Vec<String>,
}

/// Layout of a disk of `size` bytes read through `r` (synchronous; bounded reads).
pub fn read_layout<R: Read + Seek>(
    r: &mut R,
    disk: &str,
    size: u64,
) -> std::io::Result<DiskLayout> {
    let t = read_table(r, size)?;
    let mut partitions = Vec::with_capacity(t.partitions.len());
    for p in t.partitions {
        // An extended partition's first sector is an EBR, not a filesystem.
        let filesystem = if p.type_name == Some("Extended") {
            None
        } else {
            detect(r, size, p.start, p.size)?
        };
        partitions.push(PartitionLayout {
            partition: p,
            filesystem,
        });
    }
    let filesystem = if t.kind == TableKind::None {
        detect(r, size, 0, size)?
    } else {
        None
    };
    Ok(DiskLayout {
        disk: disk.to_string(),
        size,
        table: t.kind,
        disk_guid: t.disk_guid,
        partitions,
        filesystem,
        warnings: t.warnings,
    })
}

/// Layout of one disk of a backup, read through `view` on a blocking thread.
pub async fn disk_layout(view: &DiskView, disk: &str) -> Result<DiskLayout, FilesError> {
    let mut r = view.blocking(tokio::runtime::Handle::current());
    let (disk, size) = (disk.to_string(), view.size());
    tokio::task::spawn_blocking(move || read_layout(&mut r, &disk, size))
        .await
        .map_err(|e| FilesError::Task(e.to_string()))?
        .map_err(FilesError::Io)
}

/// Layouts of every disk of backup `id`, in manifest order.
pub async fn backup_layout(repo: &Repository, id: &str) -> Result<Vec<DiskLayout>, FilesError> {
    let m = repo.manifest(id).await?;
    let mut out = Vec::with_capacity(m.disks.len());
    for d in &m.disks {
        // Partition probing reads a few scattered sectors: a small cache suffices.
        let opts = virtkeep_repo::DiskViewOptions {
            cache_bytes: 16 << 20,
            readahead_chunks: 0,
        };
        let view = repo.disk_view(id, &d.spec.name, opts).await?;
        out.push(disk_layout(&view, &d.spec.name).await?);
    }
    Ok(out)
}
