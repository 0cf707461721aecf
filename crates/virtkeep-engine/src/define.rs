//! `virsh define` of a domain XML document: below healing, backup and restore, which
//! all redefine domains.

use virtkeep_libvirt::coreutils;

use crate::error::Result;
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
