//! Reading every frozen disk into the repository and publishing the manifest.

use std::time::Instant;

use virtkeep_libvirt::sh;

use super::job::Job;
use super::strategy::{DiskOut, Strategy};
use crate::error::{Error, Result};
use crate::export::ExportStats;
use crate::plan::{BackupExtra, BaseOnHost, Plan, PlannedDisk, Transport};

/// What was published, what each disk moved, and the seconds publishing took.
pub type Exported = (virtkeep_repo::Manifest, Vec<ExportStats>, f64);

pub fn owner<'s>(
    strategies: &'s [Box<dyn Strategy>],
    disk: &PlannedDisk,
) -> Result<&'s dyn Strategy> {
    strategies
        .iter()
        .find(|s| s.owns(disk))
        .map(|s| &**s)
        .ok_or_else(|| Error::domain(format!("internal: no strategy for disk {}", disk.target)))
}

/// The transport the disks travel by: the one asked for, or a `dd` stream on a host
/// without qemu-nbd (raw images only).
async fn transport(
    job: &Job<'_>,
    plan: &Plan,
    strategies: &[Box<dyn Strategy>],
) -> Result<Transport> {
    let mut transport = job.opts.transport;
    if transport != Transport::Stream
        && job.host.exec(&sh::command_path("qemu-nbd")).await?.status != 0
    {
        job.notice("qemu-nbd is not installed on the host: falling back to a dd stream (every byte is read)".into());
        transport = Transport::Stream;
    }
    if transport == Transport::Stream {
        for d in plan.disks.iter().filter(|d| d.format != "raw") {
            if owner(strategies, d)?.reads_image() {
                return Err(Error::unsupported(format!(
                    "disk {} is {}: without qemu-nbd only raw images can be streamed",
                    d.target, d.format
                ))
                .hint("install qemu-nbd on the host (Debian: qemu-utils, RHEL: qemu-img)"));
            }
        }
    }
    Ok(transport)
}

/// Exports every disk in the plan's order, then publishes the manifest with each
/// strategy's part of its `extra`.
pub async fn export_all(
    job: &Job<'_>,
    plan: &Plan,
    strategies: &[Box<dyn Strategy>],
    (meta, nvram): (virtkeep_repo::BackupMeta, &super::nvram::Captured),
) -> Result<Exported> {
    let transport = transport(job, plan, strategies).await?;
    let writer = job.repo.begin_backup(meta).await?;
    let mut stats = Vec::new();
    for (index, disk) in plan.disks.iter().enumerate() {
        let out = DiskOut {
            writer: &writer,
            transport,
            index,
        };
        stats.push(owner(strategies, disk)?.export(job, &out, disk).await?);
    }
    let mut extra = BackupExtra {
        method: Some(plan.method),
        transport: Some(transport),
        base_kept: Some(job.opts.base == BaseOnHost::Keep),
        ..BackupExtra::default()
    };
    for s in strategies {
        s.publish(job, &mut extra).await?;
    }
    super::nvram::store(&writer, nvram).await?;
    let publishing = Instant::now();
    let manifest = writer.finish(extra.to_value()).await?;
    Ok((manifest, stats, publishing.elapsed().as_secs_f64()))
}
