//! The UEFI variable store (`<nvram>`) of a VM, read right after its disks are
//! snapshotted and stored with the backup. For a running VM QEMU writes the store only
//! when the guest changes a variable, so the copy read just after the snapshot is the
//! one of the snapshot instant but for a variable written in those milliseconds.

use virtkeep_libvirt::coreutils;

use super::job::Job;
use crate::error::{Error, ErrorKind, Result};

/// The store read from the host: (its path, its bytes).
pub type Captured = Option<(String, Vec<u8>)>;

/// Reads the store of the job's VM (none when it has none or libvirt has not created
/// it yet: it does at the first start, from the firmware's template). The host is
/// untrusted: the read is bounded to [`virtkeep_repo::MAX_NVRAM_SIZE`].
pub async fn capture(job: &Job<'_>) -> Result<Captured> {
    let Some(path) = job.vm.domain.nvram.clone() else {
        return Ok(None);
    };
    if !path.starts_with('/') || path.contains('\n') {
        return Err(Error::domain(format!(
            "the domain's NVRAM path {path:?} is not an absolute path"
        )));
    }
    if job.host.exec(&coreutils::is_file(&path)).await?.status != 0 {
        job.notice(format!(
            "the NVRAM file {path} does not exist (yet): the backup holds no UEFI variables"
        ));
        return Ok(None);
    }
    let max = virtkeep_repo::MAX_NVRAM_SIZE;
    let out = job.host.run(&coreutils::head_bytes(&path, max + 1)).await?;
    if out.stdout.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::Domain,
            format!("the NVRAM file {path} is larger than {max} bytes"),
        )
        .hint("a UEFI variable store is at most a few MiB; check the <nvram> of the domain"));
    }
    Ok(Some((path, out.stdout)))
}

/// Stores the captured store with the backup.
pub async fn store(writer: &virtkeep_repo::BackupWriter, captured: &Captured) -> Result<()> {
    if let Some((path, bytes)) = captured {
        writer.nvram(path, bytes).await?;
    }
    Ok(())
}
