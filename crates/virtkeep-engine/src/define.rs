//! `virsh define` of a domain XML document: below healing, backup and restore, which
//! all redefine domains; and what a backup's XML must change to run on another host
//! (restore `--define`, live restore, boot verification).

use virtkeep_libvirt::{Rewrite, coreutils, virsh};

use crate::error::{Error, Result};
use crate::host::Host;

/// `virsh define` of an XML document, uploaded to a private file first.
pub async fn define(host: &Host, vm_key: &str, xml: &str) -> Result<()> {
    let dir = host
        .job_dir(&format!("define-{}", uuid::Uuid::new_v4()))
        .await?;
    let path = format!("{dir}/domain.xml");
    host.upload(&path, xml.as_bytes()).await?;
    let res = host.run(&host.virsh().define(&path)).await;
    let _ = host.run(&coreutils::rm_rf(&dir)).await;
    res.map(|_| ())
        .map_err(|e| e.context(format!("defining domain {vm_key}")))
}

/// The emulator a backup's domain XML gets on `host`: the one libvirt reports there for
/// the domain's type and architecture (`virsh domcapabilities`). `None` keeps the XML's,
/// which is exactly that one. Any other path is replaced: one missing on the host
/// (restored on another host or distribution: libvirt would refuse the domain), and
/// one that merely exists there, since the XML is untrusted and libvirt would run
/// whatever executable it names.
pub async fn host_emulator(host: &Host, domain_xml: &str) -> Result<Option<String>> {
    let Some(old) = virtkeep_libvirt::emulator_of(domain_xml)? else {
        return Ok(None);
    };
    let kind = virtkeep_libvirt::parse_domain(domain_xml)?.kind;
    let arch = virtkeep_libvirt::arch_of(domain_xml)?;
    let cmd = host
        .virsh()
        .domcapabilities_for(&kind, arch.as_deref())
        .ok_or_else(|| {
            Error::domain(format!(
                "the backup's domain type {kind:?} or architecture {arch:?} is not a plain name"
            ))
        })?;
    let caps = host.run_string(&cmd).await?;
    let theirs = virsh::parse_domcapabilities_emulator(&caps)
        .map_err(|e| Error::domain(e.to_string()))?
        .ok_or_else(|| {
            Error::domain(format!(
                "libvirt on {} reports no emulator for {kind} domains{}",
                host.name,
                arch.as_deref()
                    .map(|a| format!(" of {a}"))
                    .unwrap_or_default()
            ))
        })?;
    Ok((theirs != old).then_some(theirs))
}

/// The rewrites every domain made from a backup beside its source gets on `host`
/// (live restore, boot verification; restore `--define` under a new name): the host's
/// emulator ([`host_emulator`]), and chardevs written to files made `pty` without their
/// logs, so the new domain never writes into the source VM's log files. Returns the
/// note to show when the emulator was replaced.
pub async fn fit_to_host(
    host: &Host,
    domain_xml: &str,
    rw: &mut Rewrite,
) -> Result<Option<String>> {
    rw.emulator = host_emulator(host, domain_xml).await?;
    rw.file_chardevs_to_pty = true;
    let old = virtkeep_libvirt::emulator_of(domain_xml)?.unwrap_or_default();
    Ok(rw.emulator.as_ref().map(|e| {
        format!(
            "emulator: {e} (libvirt's on {}; the backup named {old})",
            host.name
        )
    }))
}
