//! The repository as NBD exports: one read-only export per disk of a backup.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use virtkeep_nbd::{ExportSource, Extent, NbdServer, STATE_HOLE, STATE_ZERO};
use virtkeep_repo::{DiskView, DiskViewOptions, Repository};

use crate::error::FilesError;

/// One backed-up disk as an NBD export.
#[derive(Debug, Clone)]
pub struct DiskExport(pub DiskView);

impl ExportSource for DiskExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        self.0
            .read_at(offset, len as usize)
            .await
            .map_err(std::io::Error::other)
    }

    fn allocation(&self, offset: u64, len: u32) -> Vec<Extent> {
        self.0
            .allocation(offset, u64::from(len))
            .into_iter()
            .map(|a| Extent {
                offset: a.offset,
                length: a.len,
                flags: if a.zero { STATE_HOLE | STATE_ZERO } else { 0 },
            })
            .collect()
    }
}

/// An NBD server with one export per disk of backup `id`, named by the disk (`vda`).
pub async fn backup_server(
    repo: &Repository,
    id: &str,
    opts: DiskViewOptions,
) -> Result<NbdServer<DiskExport>, FilesError> {
    let m = repo.manifest(id).await?;
    let mut exports = Vec::with_capacity(m.disks.len());
    for d in &m.disks {
        let view = repo.disk_view(id, &d.spec.name, opts).await?;
        exports.push((d.spec.name.clone(), DiskExport(view)));
    }
    Ok(NbdServer::new(exports)?)
}

/// Serve backup `id` on a new unix socket at `socket` until `shutdown` completes.
/// The socket is made owner-only (it hands out decrypted disk bytes) before
/// `on_ready(export names)` is called; it is removed on return. An existing file at
/// `socket` is refused, never replaced.
pub async fn serve_backup(
    repo: &Repository,
    id: &str,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[&str]),
) -> Result<(), FilesError> {
    use std::os::unix::fs::PermissionsExt;
    let server = Arc::new(backup_server(repo, id, DiskViewOptions::default()).await?);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let res = async {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        on_ready(&server.export_names());
        virtkeep_nbd::serve_listener(server.clone(), listener, shutdown).await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(socket);
    res
}
