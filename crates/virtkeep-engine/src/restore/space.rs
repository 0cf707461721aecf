//! Free space, checked before anything is written: every temporary is written while
//! the data it replaces still exists, so a destination must hold all of it at once. A
//! file takes its data (the backup's non-zero chunks) plus the image's metadata, a thin
//! LV its data in the pool, a thick LV its whole size in extents; disks sharing a
//! directory, volume group or pool add up.

use std::collections::BTreeMap;

use virtkeep_libvirt::coreutils;

use super::destination::{Destination, Room};
use crate::error::{Error, Result};
use crate::host::Host;

/// Room for a qcow2 image's metadata beyond its data: 1 MiB plus 0.2 % of the size
/// (L2 tables, refcounts).
fn image_overhead(size: u64) -> u64 {
    (1 << 20) + size / 500
}

/// The bytes of disk `m` that hold data (non-zero chunks of its index, bounded by the
/// disk's size).
async fn data_bytes(
    repo: &virtkeep_repo::Repository,
    id: &str,
    m: &virtkeep_repo::ManifestDisk,
) -> Result<u64> {
    let ix = repo.fixed_index(id, &m.spec.name).await?;
    let data: u64 = (0..ix.chunk_count())
        .filter(|&i| !ix.is_zero(i))
        .map(|i| ix.chunk_len(i))
        .sum();
    Ok(data.min(m.spec.size))
}

/// A disk of backup `id` and where it is written: what [`check`] adds up.
pub(crate) type Written<'a> = (&'a virtkeep_repo::ManifestDisk, &'a dyn Destination);

/// Refuses a restore whose destinations cannot hold what it writes.
pub(crate) async fn check(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    disks: &[Written<'_>],
) -> Result<()> {
    let mut need: BTreeMap<Room, (u64, Vec<String>)> = BTreeMap::new();
    for &(m, dest) in disks {
        let Some((room, whole)) = dest.room() else {
            continue;
        };
        let bytes = match (&room, whole) {
            (_, true) => m.spec.size,
            (Room::Dir(_), false) => data_bytes(repo, id, m).await? + image_overhead(m.spec.size),
            _ => data_bytes(repo, id, m).await?,
        };
        let e = need.entry(room).or_default();
        e.0 += bytes;
        e.1.push(m.spec.target.clone());
    }
    for (room, (bytes, disks)) in need {
        let free = available(host, &room).await?;
        if free < bytes {
            return Err(no_room(host, &room, bytes, free, &disks));
        }
    }
    Ok(())
}

/// Free bytes of a room on the host.
async fn available(host: &Host, room: &Room) -> Result<u64> {
    match room {
        Room::Dir(dir) => dir_available(host, dir).await,
        Room::Vg(vg) => Ok(crate::lvm::vg_info(host, vg).await?.free),
        Room::ThinPool(vg, pool) => {
            let p = crate::lvm::lv_info(host, vg, pool).await?;
            let used = p.data_percent.unwrap_or(100.0).clamp(0.0, 100.0);
            Ok((p.size as f64 * (100.0 - used) / 100.0) as u64)
        }
    }
}

/// `df` of the directory, or of its nearest existing parent (the restore creates it).
async fn dir_available(host: &Host, dir: &str) -> Result<u64> {
    let mut d = dir.to_string();
    loop {
        let out = host.exec(&coreutils::df_avail(&d)).await?;
        if out.status == 0 {
            return coreutils::parse_df_avail(&String::from_utf8_lossy(&out.stdout))
                .map_err(|e| Error::new(crate::error::ErrorKind::Remote, format!("df {d}: {e}")));
        }
        match d.rsplit_once('/') {
            Some((parent, _)) if !parent.is_empty() => d = parent.to_string(),
            _ if d != "/" => d = "/".to_string(),
            _ => {
                return Err(Error::new(
                    crate::error::ErrorKind::Remote,
                    format!("df {dir} failed on host {}", host.name),
                ));
            }
        }
    }
}

fn no_room(host: &Host, room: &Room, need: u64, free: u64, disks: &[String]) -> Error {
    let mib = |b: u64| b.div_ceil(1 << 20);
    let (what, hint) = match room {
        Room::Dir(d) => (
            format!("directory {d}"),
            "free space there, or restore into another directory (--storage file:DIR)",
        ),
        Room::Vg(vg) => (
            format!("volume group {vg}"),
            "free extents in it (vgextend, or remove unused LVs), or restore into another volume group (--storage lvm:VG)",
        ),
        Room::ThinPool(vg, pool) => (
            format!("thin pool {vg}/{pool}"),
            "extend the thin pool (lvextend -L +SIZE VG/POOL) or free space in it, or restore elsewhere (--storage)",
        ),
    };
    Error::conflict(format!(
        "not enough free space for disk(s) {} in {what} on host {}: {} MiB needed, {} MiB free (a disk replaced in place keeps its old data until the restored one is swapped in)",
        disks.join(", "),
        host.name,
        mib(need),
        mib(free)
    ))
    .hint(hint)
}
