//! A disk's layout: its partition table and what each partition holds.

use std::io::{Read, Seek};

use serde::Serialize;
use virtkeep_repo::{DiskView, Repository};

use crate::error::FilesError;
use crate::fsdetect::{FsInfo, detect};
use crate::lvm::{Mapped, read_pv};
use crate::partition::{Partition, TableKind, read_table};

/// One partition and its filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLayout {
    #[serde(flatten)]
    pub partition: Partition,
    pub filesystem: Option<FsInfo>,
}

/// A linear logical volume of guest LVM and its filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LvLayout {
    /// `VG/LV`, as `files ls/get` take it (`vda:VG/LV:/PATH`).
    pub name: String,
    pub size: u64,
    /// The partition holding the PV (`None`: the whole disk is the PV).
    pub partition: Option<u32>,
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
    /// Linear LVs on the disk's LVM2 physical volumes.
    pub lvs: Vec<LvLayout>,
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
    let mut warnings = t.warnings;
    let mut pvs: Vec<(Option<u32>, u64, u64)> = partitions
        .iter()
        .filter(|p| {
            p.filesystem
                .as_ref()
                .is_some_and(|f| f.kind == "LVM2_member")
        })
        .map(|p| {
            (
                Some(p.partition.number),
                p.partition.start,
                p.partition.size,
            )
        })
        .collect();
    if filesystem.as_ref().is_some_and(|f| f.kind == "LVM2_member") {
        pvs.push((None, 0, size));
    }
    let lvs = read_lvs(r, &pvs, &mut warnings)?;
    Ok(DiskLayout {
        disk: disk.to_string(),
        size,
        table: t.kind,
        disk_guid: t.disk_guid,
        partitions,
        filesystem,
        lvs,
        warnings,
    })
}

/// The linear LVs of each PV `(partition, start, len)`, with their filesystems; a PV
/// that cannot be read becomes a warning.
fn read_lvs<R: Read + Seek>(
    r: &mut R,
    pvs: &[(Option<u32>, u64, u64)],
    warnings: &mut Vec<String>,
) -> std::io::Result<Vec<LvLayout>> {
    let mut out = Vec::new();
    for &(partition, start, len) in pvs {
        let (lvs, w) = match read_pv(r, start, len) {
            Ok(x) => x,
            Err(e) => {
                warnings.push(format!("LVM physical volume at byte {start}: {e}"));
                continue;
            }
        };
        warnings.extend(w);
        for lv in lvs {
            let mut m = Mapped::lv(&mut *r, start, &lv);
            let filesystem = detect(&mut m, lv.size, 0, lv.size)?;
            out.push(LvLayout {
                name: format!("{}/{}", lv.vg, lv.name),
                size: lv.size,
                partition,
                filesystem,
            });
        }
    }
    Ok(out)
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
