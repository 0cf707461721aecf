//! Restoring a disk into a Ceph RBD image: a new image `{IMAGE}.vkrestore-{job}` in the
//! destination's pool, written with `rbd import-diff` (data extents only), then renamed
//! over the destination (its snapshots purged and the old image removed first).

use async_trait::async_trait;
use virtkeep_libvirt::{DiskSource, NewSource};

use super::context::{DiskCheck, DiskWrite, WriteCtx};
use super::destination::Destination;
use super::guard;
use super::staged::{Kind, Staged, split, temp_name};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::progress::Event;

/// An RBD image `pool/image`.
#[derive(Debug, Clone)]
pub struct RbdDest {
    pub pool: String,
    pub image: String,
}

impl RbdDest {
    /// The destination a host's record names (`POOL/IMAGE`), to finish a killed restore.
    pub fn recorded(spec: &str) -> RbdDest {
        let (pool, image) = split(spec);
        RbdDest {
            pool: pool.to_string(),
            image: image.to_string(),
        }
    }

    fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

#[async_trait]
impl Destination for RbdDest {
    fn check_names(&self) -> Result<()> {
        guard::check_rbd_name("pool", &self.pool)?;
        guard::check_rbd_name("image", &self.image)
    }

    fn key(&self) -> String {
        format!("rbd {}", self.spec())
    }

    fn describe(&self) -> String {
        format!("RBD image {}", self.spec())
    }

    fn format(&self, _m: &virtkeep_repo::ManifestDisk) -> String {
        "raw".to_string()
    }

    async fn in_use_names(&self, _host: &Host) -> Result<Vec<String>> {
        Ok(vec![self.spec()])
    }

    async fn check(&self, host: &Host, disk: &DiskCheck<'_>) -> Result<bool> {
        let ceph = crate::rbd::ceph(host)?;
        if disk.define {
            check_secret(host, disk.domain, &disk.m.spec.target).await?;
        }
        crate::rbd::image_exists(host, &ceph, &self.pool, &self.image).await
    }

    fn replace_hint(&self) -> &'static str {
        "restore under another name (--name) or into another pool (--storage rbd:POOL), or overwrite with --force"
    }

    fn staged(&self, tag: &str) -> Staged {
        Staged {
            kind: Kind::Rbd,
            temp: format!(
                "{}/{}",
                self.pool,
                temp_name(&self.image, tag, guard::NAME_MAX)
            ),
            dest: self.spec(),
        }
    }

    async fn write(&self, ctx: &WriteCtx<'_>, disk: &DiskWrite<'_>) -> Result<u64> {
        let ceph = crate::rbd::ceph(ctx.host)?;
        let (pool, image) = split(&disk.staged.temp);
        let m = disk.m;
        let reader = ctx.repo.disk_reader(ctx.id, &m.spec.name).await?;
        ctx.progress.event(Event::DiskStart {
            vm: ctx.vm.to_string(),
            disk: m.spec.target.clone(),
            bytes: m.spec.size,
        });
        let to = crate::rbd::ImageRestore {
            ceph: &ceph,
            pool,
            image,
            size: m.spec.size,
            disk: &m.spec.target,
        };
        let written = crate::rbd::restore_image(ctx.host, &to, &reader, ctx.progress).await?;
        ctx.progress.event(Event::DiskDone {
            disk: m.spec.target.clone(),
        });
        Ok(written)
    }

    async fn temp_exists(&self, host: &Host, s: &Staged) -> Result<bool> {
        let ceph = crate::rbd::ceph(host)?;
        let (pool, image) = split(&s.temp);
        crate::rbd::image_exists(host, &ceph, pool, image).await
    }

    async fn commit(&self, host: &Host, s: &Staged) -> Result<()> {
        let ceph = crate::rbd::ceph(host)?;
        let (pool, temp) = split(&s.temp);
        if crate::rbd::image_exists(host, &ceph, pool, &self.image).await? {
            host.run(&ceph.snap_purge(&self.pool, &self.image)).await?;
            host.run(&ceph.rm(pool, &self.image)).await?;
        }
        host.run(&ceph.rename(pool, temp, &self.image))
            .await
            .map_err(|e| e.context(format!("renaming RBD image {pool}/{temp}")))?;
        Ok(())
    }

    async fn roll_back(&self, host: &Host, s: &Staged) -> Result<()> {
        let ceph = crate::rbd::ceph(host)?;
        let (pool, image) = split(&s.temp);
        if crate::rbd::image_exists(host, &ceph, pool, image).await? {
            host.run(&ceph.rm(pool, image)).await?;
        }
        Ok(())
    }

    /// `rbd:POOL/IMAGE` (the path `--json` has always reported for RBD disks).
    async fn create_empty(
        &self,
        host: &Host,
        m: &virtkeep_repo::ManifestDisk,
        _owner: &(String, String),
    ) -> Result<()> {
        let ceph = crate::rbd::ceph(host)?;
        host.run(&ceph.create(&self.pool, &self.image, m.spec.size))
            .await?;
        Ok(())
    }

    async fn remove_created(&self, host: &Host) -> Result<()> {
        let ceph = crate::rbd::ceph(host)?;
        host.run(&ceph.rm(&self.pool, &self.image)).await?;
        Ok(())
    }

    fn report(&self) -> (virtkeep_repo::Storage, String) {
        (virtkeep_repo::Storage::Rbd, format!("rbd:{}", self.spec()))
    }

    fn new_source(&self, _format: &str) -> NewSource {
        NewSource::Rbd {
            pool: self.pool.clone(),
            image: self.image.clone(),
            hosts: Vec::new(),
            auth: None,
        }
    }
}

/// A defined RBD disk that authenticates needs the libvirt secret on the host.
async fn check_secret(host: &Host, domain: &virtkeep_libvirt::Domain, target: &str) -> Result<()> {
    let secret = domain
        .disks
        .iter()
        .find(|d| d.target == target)
        .and_then(|d| match &d.source {
            DiskSource::Network { auth: Some(a), .. } => a.secret_uuid.clone(),
            _ => None,
        });
    let Some(uuid) = secret else {
        return Ok(());
    };
    if crate::rbd::secret_exists(host, &uuid).await? {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "disk {target} authenticates with libvirt secret {uuid}, which host {} does not have",
        host.name
    ))
    .hint(format!(
        "create it on the host: virsh secret-define a <secret ephemeral='no' private='yes'><uuid>{uuid}</uuid><usage type='ceph'><name>client.ID secret</name></usage></secret>, then virsh secret-set-value {uuid} --file KEYFILE"
    )))
}
