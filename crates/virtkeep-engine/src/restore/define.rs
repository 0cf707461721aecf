//! The last step of a restore: the backup's domain XML rewritten for the restored
//! disks (and, under a new name, a new identity), defined, and started on request.

use std::collections::BTreeMap;

use virtkeep_libvirt::{DiskSource, NewSource, Rewrite, rewrite_domain, virsh};

use super::job::{Job, NvramPlan, Planned};
use super::nvram;
use super::options::RestoreOptions;
use crate::define::define;
use crate::error::Result;
use crate::host::Host;

/// The domain XML changes of a restore: new sources, and for a new name a new identity.
pub fn rewrite_for(
    job: &Job,
    opts: &RestoreOptions,
    plan: &[Planned<'_>],
    nvram: &Option<NvramPlan>,
    notes: &mut Vec<String>,
) -> Rewrite {
    let mut sources = BTreeMap::new();
    for p in plan {
        let source = p.dest.new_source(&p.format);
        sources.insert(p.m.spec.target.clone(), source);
    }
    // Disks the backup left out would point at the original VM's files: drop them.
    let mut remove = Vec::new();
    for disk in &job.domain.disks {
        let media = matches!(
            disk.device,
            virtkeep_libvirt::DiskDevice::Cdrom | virtkeep_libvirt::DiskDevice::Floppy
        );
        if !sources.contains_key(&disk.target)
            && !media
            && !matches!(disk.source, DiskSource::Empty)
        {
            remove.push(disk.target.clone());
            if opts.define {
                notes.push(format!(
                    "disk {} is not in this restore and was left out of the definition",
                    disk.target
                ));
            }
        }
    }
    let renamed = job.renamed();
    let new_uuid = (renamed || job.existing_uuid.is_none() && opts.name.is_some())
        .then(|| uuid::Uuid::new_v4().to_string());
    Rewrite {
        nvram: nvram.as_ref().and_then(|n| n.rewrite.clone()),
        name: renamed.then(|| job.name.clone()),
        new_uuid,
        regenerate_macs: renamed,
        remove_disks: remove,
        disk_sources: sources,
        drop_backing_store: true,
        // Set by `fit_emulator`, which asks the target host.
        emulator: None,
        file_chardevs_to_pty: renamed,
    }
}

/// What a rewrite changes, one line each (for `--dry-run`).
pub fn describe_rewrite(rw: &Rewrite) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = &rw.name {
        out.push(format!("name: {n}"));
    }
    if rw.new_uuid.is_some() {
        out.push("uuid: a new random UUID".into());
    }
    if rw.regenerate_macs {
        out.push("interfaces: new MAC addresses".into());
    }
    for (target, source) in &rw.disk_sources {
        let s = match source {
            NewSource::File { path, format } => format!("file {path} ({format})"),
            NewSource::Block { dev } => format!("block device {dev}"),
            NewSource::Rbd { pool, image, .. } => format!("RBD image {pool}/{image}"),
        };
        out.push(format!("disk {target}: source {s}"));
    }
    for target in &rw.remove_disks {
        out.push(format!("disk {target}: removed (not in this restore)"));
    }
    if let Some(n) = &rw.nvram {
        out.push(format!("nvram: {n}"));
    }
    if rw.drop_backing_store {
        out.push("backing stores: dropped (restored disks are flat)".into());
    }
    out
}

/// Sets the emulator the definition gets on `host` ([`crate::define::host_emulator`]),
/// with a note when it is replaced. Called while planning, before any disk is written:
/// a backup whose domain type this host's libvirt does not offer (`kvm` without KVM)
/// is refused then, not after its disks were replaced.
pub async fn fit_emulator(
    host: &Host,
    job: &Job,
    rw: &mut Rewrite,
    notes: &mut Vec<String>,
) -> Result<()> {
    let emulator = crate::define::host_emulator(host, &job.manifest.domain_xml)
        .await
        .map_err(|e| {
            let e = e.context("finding the emulator for the restored definition (nothing was written)");
            if e.hint.is_some() {
                e
            } else {
                e.hint(format!(
                    "{}'s libvirt does not offer this backup's domain type (a `kvm` domain needs KVM on the host): restore without --define, or to a host that offers it",
                    host.name
                ))
            }
        })?;
    if let Some(e) = &emulator {
        notes.push(format!(
            "emulator: {e} (libvirt's on {}; the backup's is not)",
            host.name
        ));
    }
    rw.emulator = emulator;
    Ok(())
}

/// Defines (and with `--start` starts) the restored domain; returns its UUID and
/// whether it was started.
pub async fn define_restored(
    host: &Host,
    opts: &RestoreOptions,
    job: &Job,
    nvram: &Option<NvramPlan>,
    rw: &Rewrite,
    notes: &mut Vec<String>,
) -> Result<(String, bool)> {
    if let Some(n) = nvram
        .as_ref()
        .filter(|n| n.rewrite.is_some() && n.bytes.is_none())
    {
        notes.push(nvram::finish(host, n).await?);
    }
    let xml = rewrite_domain(&job.manifest.domain_xml, rw)?;
    if let (Some(old), true) = (&job.existing_uuid, opts.force) {
        host.run(&host.virsh().undefine(
            old,
            virsh::UndefineOptions {
                keep_nvram: true,
                ..Default::default()
            },
        ))
        .await?;
        notes.push(format!(
            "replaced the existing definition of {:?}",
            job.name
        ));
    }
    define(host, &job.name, &xml).await?;
    let uuid = crate::vm::Vm::find_uuid(host, &job.name).await?;
    if opts.start {
        host.run(&host.virsh().start(&uuid)).await?;
    }
    Ok((uuid, opts.start))
}
