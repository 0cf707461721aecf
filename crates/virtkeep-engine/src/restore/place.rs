//! Where each disk of a restore goes: virtkeep chooses the destination (the backup's
//! location only suggests it), from `--storage`, `--name` and the disk's backend.
//!
//! This module imports only the options and the destinations.

use std::collections::BTreeMap;

use super::destination::Destination;
use super::file::FileDest;
use super::guard::safe_component;
use super::lvm::LvDest;
use super::options::Storage;
use super::rbd::RbdDest;
use crate::error::{Error, Result};
use crate::host::Host;

fn extension(format: &str) -> &'static str {
    if format == "qcow2" { "qcow2" } else { "img" }
}

/// The path a disk is restored to.
pub fn destination(
    storage: &Storage,
    original: &str,
    new_name: Option<&str>,
    target: &str,
    format: &str,
) -> String {
    let (dir, file) = match original.rfind('/') {
        Some(i) => (&original[..i.max(1)], &original[i + 1..]),
        None => ("/var/lib/libvirt/images", original),
    };
    let dir = match storage {
        Storage::Original | Storage::Rbd(_) | Storage::Lvm(_) => dir.to_string(),
        Storage::FileDir(d) => d.trim_end_matches('/').to_string(),
    };
    let dir = if dir.is_empty() { "/".to_string() } else { dir };
    let file = match new_name {
        Some(n) => format!(
            "{}-{}.{}",
            safe_component(n),
            safe_component(target),
            extension(format)
        ),
        None => file.to_string(),
    };
    if dir.ends_with('/') {
        format!("{dir}{file}")
    } else {
        format!("{dir}/{file}")
    }
}

/// An LV name for a restored disk: LVM's character set, not LVM's reserved names.
fn lv_name(name: &str) -> String {
    let mut s = safe_component(name).trim_start_matches('-').to_string();
    if s.is_empty() || !crate::lvm::valid_new_lv_name(&s) {
        s = format!("vk-{s}");
    }
    s.truncate(crate::lvm::LVM_NAME_MAX);
    s
}

/// Chooses the destinations of one restore's disks.
pub struct Place<'a> {
    pub host: &'a Host,
    pub manifest: &'a virtkeep_repo::Manifest,
    pub storage: &'a Storage,
    /// The new domain name, when the restore renames.
    pub new_name: Option<&'a str>,
    /// The LVs of each volume group looked at (one listing each).
    pub lv_lists: BTreeMap<String, Vec<virtkeep_libvirt::lvm::LvInfo>>,
    /// What the user should know about the choices.
    pub notes: &'a mut Vec<String>,
}

impl Place<'_> {
    /// Where disk `m` goes.
    pub async fn disk(&mut self, m: &virtkeep_repo::ManifestDisk) -> Result<Box<dyn Destination>> {
        Ok(match self.lv(m).await? {
            Some(lv) => Box::new(lv),
            None => self.other(m),
        })
    }

    /// Where a disk goes when it is restored into a logical volume: an LVM disk restored
    /// in place (its VG, or `--storage lvm:VG`), or any disk with `--storage lvm:VG`.
    /// `None` when the disk does not go into an LV.
    async fn lv(&mut self, m: &virtkeep_repo::ManifestDisk) -> Result<Option<LvDest>> {
        let original = (m.spec.backend == virtkeep_repo::Storage::Lvm)
            .then(|| virtkeep_libvirt::lvm_from_path(&m.spec.source))
            .flatten();
        let vg = match (self.storage, &original) {
            (Storage::Lvm(vg), _) => vg.clone(),
            (Storage::Original | Storage::Rbd(_), Some((vg, _))) => vg.clone(),
            _ => return Ok(None),
        };
        let base = match &original {
            Some((_, lv)) => lv.clone(),
            None => {
                let file = m.spec.source.rsplit('/').next().unwrap_or(&m.spec.target);
                file.strip_suffix(".qcow2")
                    .or_else(|| file.strip_suffix(".img"))
                    .or_else(|| file.strip_suffix(".raw"))
                    .unwrap_or(file)
                    .to_string()
            }
        };
        let name = match self.new_name {
            Some(n) => lv_name(&format!("{n}-{}", m.spec.target)),
            None => lv_name(&base),
        };
        if !self.lv_lists.contains_key(&vg) {
            let lvs = crate::lvm::list_lvs(self.host, Some(&vg)).await?;
            self.lv_lists.insert(vg.clone(), lvs);
        }
        let lvs = &self.lv_lists[&vg];
        let existing = lvs.iter().find(|l| l.name == name);
        if let Some(e) = existing
            && e.size < m.spec.size
        {
            return Err(Error::conflict(format!(
                "logical volume {vg}/{name} exists and is smaller ({} B) than the disk ({} B)",
                e.size, m.spec.size
            ))
            .hint(
                "restore under another name (--name) or into another volume group (--storage lvm:VG)",
            ));
        }
        let wanted_pool = crate::plan::BackupExtra::of(self.manifest).thin_pool(&m.spec.target);
        let thin_pool = match wanted_pool {
            Some(pool) if lvs.iter().any(|l| l.name == pool && l.is_thin_pool()) => {
                Some(pool.to_string())
            }
            Some(pool) => {
                self.notes.push(format!(
                    "disk {} was a thin LV in pool {pool}; volume group {vg} has no such thin pool, so it is restored thick",
                    m.spec.target
                ));
                None
            }
            None => None,
        };
        Ok(Some(LvDest {
            vg,
            name,
            thin_pool,
            reuse: existing.is_some(),
        }))
    }

    /// The destination of a disk that does not go into an LV.
    fn other(&self, m: &virtkeep_repo::ManifestDisk) -> Box<dyn Destination> {
        let (storage, new_name, target) = (self.storage, self.new_name, &m.spec.target);
        let file = |path| -> Box<dyn Destination> { Box::new(FileDest { path }) };
        match m.spec.backend {
            virtkeep_repo::Storage::Lvm => {
                let (_, lv) = virtkeep_libvirt::lvm_from_path(&m.spec.source)
                    .unwrap_or_else(|| (String::new(), target.clone()));
                file(destination(
                    storage,
                    &format!("/{lv}.img"),
                    new_name,
                    target,
                    "raw",
                ))
            }
            virtkeep_repo::Storage::File => file(destination(
                storage,
                &m.spec.source,
                new_name,
                target,
                &m.spec.format,
            )),
            virtkeep_repo::Storage::Rbd => {
                let (pool, image) = crate::rbd::split(&m.spec.source);
                if let Storage::FileDir(_) = storage {
                    return file(destination(
                        storage,
                        &format!("/{image}.img"),
                        new_name,
                        target,
                        "raw",
                    ));
                }
                let pool = match storage {
                    Storage::Rbd(p) => p.as_str(),
                    _ => pool,
                };
                let image = match new_name {
                    Some(n) => format!("{}-{}", safe_component(n), safe_component(target)),
                    None => image.to_string(),
                };
                Box::new(RbdDest {
                    pool: pool.to_string(),
                    image,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Storage, destination};

    #[test]
    fn destinations() {
        assert_eq!(
            destination(&Storage::Original, "/img/a.qcow2", None, "vda", "qcow2"),
            "/img/a.qcow2"
        );
        assert_eq!(
            destination(
                &Storage::Original,
                "/img/a.qcow2",
                Some("it's $(x)"),
                "vda",
                "qcow2"
            ),
            "/img/it_s___x_-vda.qcow2"
        );
        assert_eq!(
            destination(
                &Storage::FileDir("/new/".into()),
                "/img/b.raw",
                None,
                "vdb",
                "raw"
            ),
            "/new/b.raw"
        );
        assert_eq!(
            destination(
                &Storage::FileDir("/new".into()),
                "/img/b.raw",
                Some("n"),
                "vdb",
                "raw"
            ),
            "/new/n-vdb.img"
        );
    }
}
