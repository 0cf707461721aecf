//! The second step of a restore: everything that can refuse it is checked before
//! anything is written (the disks asked for, QEMU passthrough, the domain replaced, the
//! UEFI store, and for each disk its destination: names, clashes, running domains,
//! existing data without `--force`).

use std::collections::BTreeMap;

use super::context::DiskCheck;
use super::destination::Destination;
use super::in_use::InUse;
use super::job::{Checked, Job, Planned};
use super::nvram;
use super::options::RestoreOptions;
use super::place::Place;
use super::space;
use crate::error::{Error, Result};
use crate::host::Host;

pub async fn refuse<'a>(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    job: &'a Job,
    opts: &RestoreOptions,
    notes: &mut Vec<String>,
) -> Result<Checked<'a>> {
    let selected = select_disks(&job.manifest, &opts.disks)?;
    if opts.define {
        check_passthrough(&job.manifest, opts.allow_qemu_passthrough)?;
        check_existing_domain(host, opts, job).await?;
    }
    let job_id = crate::job_id();
    let tag = &job_id[job_id.len().saturating_sub(8)..];
    let nvram = nvram::plan(host, repo, opts, job, tag).await?;
    let placed = place_all(host, job, &selected, opts, notes).await?;
    let plan = check_all(host, job, placed, opts, tag).await?;
    let written: Vec<_> = plan.iter().map(|p| (p.m, p.dest.as_ref())).collect();
    space::check(host, repo, &job.manifest.id, &written).await?;
    Ok(Checked {
        plan,
        nvram,
        job_id,
    })
}

fn select_disks<'a>(
    manifest: &'a virtkeep_repo::Manifest,
    only: &[String],
) -> Result<Vec<&'a virtkeep_repo::ManifestDisk>> {
    for d in only {
        if !manifest.disks.iter().any(|m| &m.spec.target == d) {
            return Err(Error::config(format!(
                "backup {} has no disk {d}",
                manifest.id
            )));
        }
    }
    Ok(manifest
        .disks
        .iter()
        .filter(|m| only.is_empty() || only.contains(&m.spec.target))
        .collect())
}

/// libvirt's namespace for QEMU passthrough (`<qemu:commandline>`, `<qemu:capabilities>`…).
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// A backup's XML may hand arbitrary arguments to QEMU (run as root's delegate on the
/// host): defined only when the user says so.
pub(crate) fn check_passthrough(manifest: &virtkeep_repo::Manifest, allowed: bool) -> Result<()> {
    if allowed || !has_qemu_namespace(&manifest.domain_xml) {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "backup {} has QEMU passthrough in its domain XML (<qemu:commandline> or <qemu:capabilities>)",
        manifest.id
    ))
    .hint("it passes arguments to QEMU unchecked: restore the disks without --define, or, if you trust this backup, add --allow-qemu-passthrough"))
}

/// Whether the XML declares libvirt's QEMU namespace, compared after decoding (as
/// libvirt does: `qemu/1&#46;0` is the same URI). XML that does not parse, and any
/// raw mention of the URI, counts as passthrough: refusing is the safe side.
fn has_qemu_namespace(xml: &str) -> bool {
    if xml.contains(QEMU_NS) {
        return true;
    }
    match virtkeep_libvirt::namespace_uris(xml) {
        Ok(uris) => uris.iter().any(|u| u.trim() == QEMU_NS),
        Err(_) => true,
    }
}

/// `--define` replaces an existing domain of that name only with `--force`, and only
/// while it is shut off.
async fn check_existing_domain(host: &Host, opts: &RestoreOptions, job: &Job) -> Result<()> {
    let Some(uuid) = &job.existing_uuid else {
        return Ok(());
    };
    if !opts.force {
        return Err(Error::conflict(format!(
            "a domain named {:?} exists on host {}",
            job.name, host.name
        ))
        .hint("restore under another name with --name NEW, or replace it with --force"));
    }
    let state = host.run_string(&host.virsh().domstate(uuid)).await?;
    if state.trim() != "shut off" {
        return Err(Error::conflict(format!(
            "domain {:?} is {}: it must be shut off to be replaced",
            job.name,
            state.trim()
        )));
    }
    Ok(())
}

/// A disk, its destination and its format there.
type Placed<'a> = (
    &'a virtkeep_repo::ManifestDisk,
    Box<dyn Destination>,
    String,
);

/// Chooses every disk's destination and checks what needs no host: names, formats,
/// no two disks on one destination.
async fn place_all<'a>(
    host: &Host,
    job: &Job,
    selected: &[&'a virtkeep_repo::ManifestDisk],
    opts: &RestoreOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Placed<'a>>> {
    let mut place = Place {
        host,
        manifest: &job.manifest,
        storage: &opts.storage,
        new_name: job.renamed().then_some(job.name.as_str()),
        lv_lists: BTreeMap::new(),
        notes,
    };
    let mut placed = Vec::new();
    for m in selected {
        let dest = place.disk(m).await?;
        let format = dest.format(m);
        check_format(m, &format)?;
        dest.check_names()?;
        placed.push((*m, dest, format));
    }
    check_distinct(
        placed
            .iter()
            .map(|(m, d, _)| (m.spec.target.as_str(), d.key())),
    )?;
    Ok(placed)
}

/// A restore creates qcow2 and raw images only.
pub(crate) fn check_format(m: &virtkeep_repo::ManifestDisk, format: &str) -> Result<()> {
    if format != "qcow2" && format != "raw" {
        return Err(Error::unsupported(format!(
            "disk {} has format {format}, which restore cannot create",
            m.spec.target
        )));
    }
    Ok(())
}

/// Two disks of one restore never share a destination.
pub(crate) fn check_distinct<'a>(dests: impl Iterator<Item = (&'a str, String)>) -> Result<()> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (target, key) in dests {
        if let Some(other) = seen.insert(key.clone(), target) {
            return Err(Error::conflict(format!(
                "disks {other} and {target} would both be restored to {key}"
            ))
            .hint("restore under a new name (--name NEW): each disk then gets a name of its own (NEW-TARGET)"));
        }
    }
    Ok(())
}

/// Checks every destination on the host: none a running domain uses, none that exists
/// without `--force`, and each one's own refusals.
async fn check_all<'a>(
    host: &Host,
    job: &Job,
    placed: Vec<Placed<'a>>,
    opts: &RestoreOptions,
    tag: &str,
) -> Result<Vec<Planned<'a>>> {
    let in_use = InUse::load(host).await?;
    let mut plan = Vec::new();
    for (m, dest, format) in placed {
        in_use.check(host, &m.spec.target, dest.as_ref()).await?;
        let disk = DiskCheck {
            m,
            domain: &job.domain,
            define: opts.define,
        };
        let exists = dest.check(host, &disk).await?;
        if exists && !opts.force {
            return Err(Error::conflict(format!(
                "{} exists on host {}",
                dest.describe(),
                host.name
            ))
            .hint(dest.replace_hint()));
        }
        let staged = dest.staged(tag);
        plan.push(Planned {
            m,
            dest,
            format,
            staged,
            replaces: exists,
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::has_qemu_namespace;

    const DOMAIN: &str = "<domain type='kvm' xmlns:q=\"NS\"><name>a</name>\
        <q:commandline><q:arg value='-x'/></q:commandline></domain>";

    #[test]
    fn qemu_namespace_is_found_however_it_is_encoded() {
        for ns in [
            "http://libvirt.org/schemas/domain/qemu/1.0",
            "http://libvirt.org/schemas/domain/qemu/1&#46;0",
            "http&#x3a;//libvirt.org/schemas/domain/qemu/1.0",
        ] {
            assert!(has_qemu_namespace(&DOMAIN.replace("NS", ns)), "{ns}");
        }
        let other = DOMAIN.replace("NS", "http://example.org/ns");
        assert!(!has_qemu_namespace(&other));
        assert!(!has_qemu_namespace(
            "<domain type='kvm'><name>a</name></domain>"
        ));
    }
}
