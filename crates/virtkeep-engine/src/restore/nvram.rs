//! The UEFI variable store of a restored domain: a renamed copy gets a store of its
//! own (two domains on one NVRAM file overwrite each other's boot entries).

use virtkeep_libvirt::coreutils;

use super::guard::{self, safe_component};
use super::job::Job;
use super::options::RestoreOptions;
use crate::error::{Error, Result};
use crate::host::Host;

/// The store a renamed, defined copy gets: (the original's, the copy's). Refuses an
/// existing one without `--force`.
pub async fn plan(
    host: &Host,
    opts: &RestoreOptions,
    job: &Job,
) -> Result<Option<(String, String)>> {
    let (Some(old), true) = (&job.domain.nvram, job.renamed() && opts.define) else {
        return Ok(None);
    };
    let new = path_for(old, &job.name);
    guard::check_path(&new)?;
    if !opts.force && host.exec(&coreutils::exists(&new)).await?.status == 0 {
        return Err(
            Error::conflict(format!("NVRAM file {new} exists on host {}", host.name))
                .hint("restore under another name (--name), or overwrite with --force"),
        );
    }
    Ok(Some((old.clone(), new)))
}

/// `NAME_VARS.fd` beside the original's store (libvirt's own naming).
fn path_for(old: &str, name: &str) -> String {
    let dir = match old.rsplit_once('/') {
        Some((d, _)) if !d.is_empty() => d,
        _ => "/var/lib/libvirt/qemu/nvram",
    };
    format!("{dir}/{}_VARS.fd", safe_component(name))
}

/// Copies the original domain's current UEFI variables to `new` (the backup holds
/// none: the variables at the backup instant are not kept); without an original
/// store, libvirt creates `new` from the firmware's template at the first start.
pub async fn copy(host: &Host, old: &str, new: &str) -> Result<String> {
    let have_old = host.exec(&coreutils::is_file(old)).await?.status == 0;
    if have_old {
        host.run(&coreutils::cp(old, new)).await?;
        Ok(format!(
            "UEFI variables: {new}, copied from the original's current {old}"
        ))
    } else {
        host.run(&coreutils::rm_f(new)).await?;
        Ok(format!(
            "UEFI variables: {new}, created by libvirt from the firmware template at first start ({old} is gone)"
        ))
    }
}
