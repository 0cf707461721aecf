//! Restoring a disk into a logical volume: a new LV `{NAME}.vkrestore-{job}` in the
//! destination's volume group (thin in the backup's thin pool when the group has it,
//! thick otherwise), written through a writable qemu-nbd export, then renamed over the
//! destination (`lvremove` of the old LV, `lvrename`).

use async_trait::async_trait;
use virtkeep_libvirt::NewSource;

use super::context::{DiskCheck, DiskWrite, WriteCtx};
use super::destination::{Destination, Room};
use super::guard;
use super::nbd;
use super::staged::{Kind, Staged, split, temp_name};
use crate::error::Result;
use crate::export::NbdExport;
use crate::host::Host;

/// A logical volume `vg/name`.
#[derive(Debug, Clone)]
pub struct LvDest {
    pub vg: String,
    pub name: String,
    /// Thin pool of the new LV; thick when `None`.
    pub thin_pool: Option<String>,
    /// An LV of that name exists (checked large enough) and is replaced.
    pub reuse: bool,
}

impl LvDest {
    /// The destination a host's record names (`VG/NAME`), to finish a killed restore.
    pub fn recorded(spec: &str) -> LvDest {
        let (vg, name) = split(spec);
        LvDest {
            vg: vg.to_string(),
            name: name.to_string(),
            thin_pool: None,
            reuse: false,
        }
    }

    fn path(&self) -> String {
        crate::lvm::lv_path(&self.vg, &self.name)
    }
}

#[async_trait]
impl Destination for LvDest {
    fn check_names(&self) -> Result<()> {
        guard::check_vg_name(&self.vg)?;
        if crate::lvm::valid_new_lv_name(&self.name) {
            Ok(())
        } else {
            Err(guard::refused(format!(
                "LV name {:?} is not allowed",
                self.name
            )))
        }
    }

    fn key(&self) -> String {
        format!("lv {}/{}", self.vg, self.name)
    }

    fn describe(&self) -> String {
        format!("logical volume {}/{}", self.vg, self.name)
    }

    fn format(&self, _m: &virtkeep_repo::ManifestDisk) -> String {
        "raw".to_string()
    }

    /// `/dev/VG/NAME` and what it resolves to (`/dev/dm-N`).
    async fn in_use_names(&self, host: &Host) -> Result<Vec<String>> {
        let path = self.path();
        let mut v = guard::resolve_all(host, std::iter::once(path.as_str())).await?;
        v.push(path);
        Ok(v)
    }

    /// Existence and size were checked when the destination was chosen (from one LV
    /// listing per volume group).
    async fn check(&self, _host: &Host, _disk: &DiskCheck<'_>) -> Result<bool> {
        Ok(self.reuse)
    }

    fn replace_hint(&self) -> &'static str {
        "restore under another name (--name) or into another volume group (--storage lvm:VG), or overwrite it with --force"
    }

    fn staged(&self, tag: &str) -> Staged {
        Staged {
            kind: Kind::Lv,
            temp: format!(
                "{}/{}",
                self.vg,
                temp_name(&self.name, tag, crate::lvm::LVM_NAME_MAX)
            ),
            dest: format!("{}/{}", self.vg, self.name),
        }
    }

    async fn write(&self, ctx: &WriteCtx<'_>, disk: &DiskWrite<'_>) -> Result<u64> {
        let (_, name) = split(&disk.staged.temp);
        let path = crate::lvm::create_lv(
            ctx.host,
            &self.vg,
            name,
            disk.m.spec.size,
            self.thin_pool.as_deref(),
        )
        .await?;
        // A new thin LV reads zeros where nothing is written; a thick one may hold
        // old data of freed extents, so its zero runs are written too.
        let zero_fill = self.thin_pool.is_none();
        let export =
            NbdExport::start_writable(ctx.host, disk.job_dir, disk.index, &path, "raw", true)
                .await?;
        nbd::write_through(ctx, disk.m, export, zero_fill).await
    }

    async fn temp_exists(&self, host: &Host, s: &Staged) -> Result<bool> {
        let (vg, name) = split(&s.temp);
        Ok(crate::lvm::list_lvs(host, Some(vg))
            .await?
            .iter()
            .any(|l| l.name == name))
    }

    /// The old LV goes with its kept incremental base (a tagged thin snapshot of it): a
    /// base of the old data would make the next incremental diff the restored LV
    /// against data it never held.
    async fn commit(&self, host: &Host, s: &Staged) -> Result<()> {
        let (vg, temp) = split(&s.temp);
        for base in crate::lvm::base_snapshots(host, vg, &self.name).await? {
            crate::lvm::remove_lv(host, vg, &base.name).await?;
        }
        crate::lvm::remove_lv(host, vg, &self.name).await?;
        host.run(&crate::lvm::lvrename(vg, temp, &self.name))
            .await?;
        Ok(())
    }

    async fn roll_back(&self, host: &Host, s: &Staged) -> Result<()> {
        let (vg, name) = split(&s.temp);
        crate::lvm::remove_lv(host, vg, name).await
    }

    async fn create_empty(
        &self,
        host: &Host,
        m: &virtkeep_repo::ManifestDisk,
        _owner: &(String, String),
    ) -> Result<()> {
        let size = m.spec.size;
        crate::lvm::create_lv(host, &self.vg, &self.name, size, self.thin_pool.as_deref()).await?;
        Ok(())
    }

    async fn remove_created(&self, host: &Host) -> Result<()> {
        crate::lvm::remove_lv(host, &self.vg, &self.name).await
    }

    fn report(&self) -> (virtkeep_repo::Storage, String) {
        (virtkeep_repo::Storage::Lvm, self.path())
    }

    fn room(&self) -> Option<(Room, bool)> {
        Some(match &self.thin_pool {
            Some(pool) => (Room::ThinPool(self.vg.clone(), pool.clone()), false),
            None => (Room::Vg(self.vg.clone()), true),
        })
    }

    fn new_source(&self, _format: &str) -> NewSource {
        NewSource::Block { dev: self.path() }
    }
}
