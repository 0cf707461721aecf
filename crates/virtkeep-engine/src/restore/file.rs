//! Restoring a disk into an image file: written as `.{FILE}.vkrestore-{job}` beside the
//! destination (qcow2 or raw, owned by the qemu user, 0600) through a writable
//! qemu-nbd export, then renamed over it.

use async_trait::async_trait;
use virtkeep_libvirt::sh::{self, PathKind};
use virtkeep_libvirt::{NewSource, coreutils, qemu_img};

use super::context::{DiskCheck, DiskWrite, WriteCtx};
use super::destination::{Destination, Room};
use super::guard;
use super::nbd;
use super::staged::{Kind, Staged, temp_file};
use crate::error::{Error, Result};
use crate::export::NbdExport;
use crate::host::Host;

/// An image file at an absolute, canonical path.
#[derive(Debug, Clone)]
pub struct FileDest {
    pub path: String,
}

#[async_trait]
impl Destination for FileDest {
    fn check_names(&self) -> Result<()> {
        guard::check_path(&self.path)
    }

    fn key(&self) -> String {
        format!("file {}", self.path)
    }

    fn describe(&self) -> String {
        self.path.clone()
    }

    /// A file keeps the disk's format; an RBD disk (raw in Ceph) becomes a raw file.
    fn format(&self, m: &virtkeep_repo::ManifestDisk) -> String {
        if m.spec.backend == virtkeep_repo::Storage::Rbd {
            "raw".to_string()
        } else {
            m.spec.format.clone()
        }
    }

    async fn in_use_names(&self, _host: &Host) -> Result<Vec<String>> {
        Ok(vec![self.path.clone()])
    }

    async fn check(&self, host: &Host, _disk: &DiskCheck<'_>) -> Result<bool> {
        check_on_host(host, &self.path).await
    }

    fn replace_hint(&self) -> &'static str {
        "restore under another name (--name) or into another directory (--storage file:DIR), or overwrite with --force"
    }

    fn staged(&self, tag: &str) -> Staged {
        Staged {
            kind: Kind::File,
            temp: temp_file(&self.path, tag),
            dest: self.path.clone(),
        }
    }

    async fn write(&self, ctx: &WriteCtx<'_>, disk: &DiskWrite<'_>) -> Result<u64> {
        let temp = &disk.staged.temp;
        create_file(ctx.host, ctx.owner, disk.m, temp, disk.format).await?;
        let export =
            NbdExport::start_writable(ctx.host, disk.job_dir, disk.index, temp, disk.format, false)
                .await?;
        nbd::write_through(ctx, disk.m, export, false).await
    }

    async fn temp_exists(&self, host: &Host, s: &Staged) -> Result<bool> {
        Ok(host.exec(&coreutils::is_file(&s.temp)).await?.status == 0)
    }

    /// rename(2): the destination is the old file or the new one, never neither.
    async fn commit(&self, host: &Host, s: &Staged) -> Result<()> {
        host.run(&coreutils::mv_replace(&s.temp, &self.path))
            .await?;
        Ok(())
    }

    async fn roll_back(&self, host: &Host, s: &Staged) -> Result<()> {
        host.run(&coreutils::rm_f(&s.temp)).await?;
        Ok(())
    }

    async fn create_empty(
        &self,
        host: &Host,
        m: &virtkeep_repo::ManifestDisk,
        owner: &(String, String),
    ) -> Result<()> {
        create_file(host, owner, m, &self.path, &self.format(m)).await
    }

    async fn remove_created(&self, host: &Host) -> Result<()> {
        host.run(&coreutils::rm_f(&self.path)).await?;
        Ok(())
    }

    fn report(&self) -> (virtkeep_repo::Storage, String) {
        (virtkeep_repo::Storage::File, self.path.clone())
    }

    fn room(&self) -> Option<(Room, bool)> {
        let dir = match self.path.rsplit_once('/') {
            Some((d, _)) if !d.is_empty() => d,
            _ => "/",
        };
        Some((Room::Dir(dir.to_string()), false))
    }

    fn new_source(&self, format: &str) -> NewSource {
        NewSource::File {
            path: self.path.clone(),
            format: format.to_string(),
        }
    }
}

/// What the host says about a file destination: whether it exists (as a regular file);
/// refuses a path whose parents or leaf are symlinks, or that is not a regular file.
pub(crate) async fn check_on_host(host: &Host, path: &str) -> Result<bool> {
    // `realpath -m` resolves every symlink along the path, existing or not: a canonical
    // path it changes goes through a symlink somewhere.
    let out = host.run_string(&sh::resolve_and_classify(path)).await?;
    let (resolved, kind) = sh::parse_resolve_and_classify(&out);
    if resolved != path || kind == PathKind::Symlink {
        return Err(guard::refused(format!(
            "destination {path} on host {} goes through a symlink (it resolves to {resolved})",
            host.name
        )));
    }
    match kind {
        PathKind::File => Ok(true),
        PathKind::Missing => Ok(false),
        _ => Err(Error::conflict(format!(
            "destination {path} on host {} exists and is not a regular file",
            host.name
        ))),
    }
}

/// Creates the image file where nothing is (its directory too), owned by the qemu
/// user, 0600.
async fn create_file(
    host: &Host,
    owner: &(String, String),
    m: &virtkeep_repo::ManifestDisk,
    path: &str,
    format: &str,
) -> Result<()> {
    if let Some(i) = path.rfind('/') {
        host.run(&coreutils::mkdir_p(&path[..i.max(1)])).await?;
    }
    // Exclusively: a file that appeared at `path` since it was checked is not ours to
    // write over (nor, after a failure, to remove).
    let format = if format == "qcow2" { "qcow2" } else { "raw" };
    host.run(&qemu_img::create_new_image(path, format, m.spec.size))
        .await?;
    let (user, group) = owner;
    let res = match host
        .run(&coreutils::chown(&format!("{user}:{group}"), path))
        .await
    {
        Ok(_) => host.run(&coreutils::chmod(0o600, path)).await.map(|_| ()),
        Err(e) => Err(e.context(format!("giving {path} to {user}:{group}"))),
    };
    if let Err(e) = res {
        // Created exclusively above, so the file is ours: remove it, keep the error.
        if let Err(rm) = host.run(&coreutils::rm_f(path)).await {
            tracing::warn!(host = %host.name, path, error = %rm, "removing a file this restore created");
        }
        return Err(e);
    }
    Ok(())
}
