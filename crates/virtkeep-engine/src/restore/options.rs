//! What a restore is asked to do and what it reports (the restore's public types).
//!
//! This module imports nothing of the restore but [`super::guard`].

use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};

use super::guard;
use crate::error::{Error, Result};

/// Where restored file disks go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Storage {
    /// Each disk at the path it had (or beside it, under the new name).
    #[default]
    Original,
    /// Every disk into this directory.
    FileDir(String),
    /// RBD disks into this Ceph pool (file disks stay files).
    Rbd(String),
    /// Every disk into a new logical volume of this LVM volume group (raw).
    Lvm(String),
}

impl Storage {
    /// `--storage` as the user writes it: none, `file:/DIR`, `rbd:POOL` or `lvm:VG`.
    pub fn parse(s: Option<&str>) -> Result<Storage> {
        let Some(s) = s else {
            return Ok(Storage::Original);
        };
        let backend = s.split_once(':').and_then(|(kind, rest)| {
            // The backend's own names (`file`, `lvm`, `rbd`), read as the typed enum.
            let kind = virtkeep_repo::Storage::deserialize(IntoDeserializer::<
                serde::de::value::Error,
            >::into_deserializer(kind));
            Some((kind.ok()?, rest))
        });
        use virtkeep_repo::Storage as B;
        match backend {
            Some((B::File, dir)) if guard::check_path(dir.trim_end_matches('/')).is_ok() => {
                Ok(Storage::FileDir(dir.trim_end_matches('/').to_string()))
            }
            Some((B::Rbd, pool)) if guard::check_rbd_name("pool", pool).is_ok() => {
                Ok(Storage::Rbd(pool.to_string()))
            }
            Some((B::Lvm, vg)) if crate::lvm::valid_new_lv_name(vg) => {
                Ok(Storage::Lvm(vg.to_string()))
            }
            _ => Err(Error::config(format!(
                "storage {s:?}: expected file:/ABSOLUTE/DIR (canonical), rbd:POOL or lvm:VG"
            ))),
        }
    }

    /// `--storage` as [`Storage::parse`] reads it back (`None`: each disk's own place).
    pub fn spec(&self) -> Option<String> {
        match self {
            Storage::Original => None,
            Storage::FileDir(dir) => Some(format!("file:{dir}")),
            Storage::Rbd(pool) => Some(format!("rbd:{pool}")),
            Storage::Lvm(vg) => Some(format!("lvm:{vg}")),
        }
    }
}

/// Options of one restore (`virtkeep restore`).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub snapshot: String,
    /// New domain name; a new name also gets a fresh UUID and MAC addresses.
    pub name: Option<String>,
    pub storage: Storage,
    /// Owner of the restored files; the host's configured qemu user:group otherwise.
    pub owner: Option<(String, String)>,
    /// Only these disks (by target); all when empty.
    pub disks: Vec<String>,
    pub define: bool,
    pub start: bool,
    /// Overwrite existing files and a stopped existing domain of that name.
    pub force: bool,
    pub parallel: usize,
    /// Plan and check only: print what would be written and defined, write nothing.
    pub dry_run: bool,
    /// Define a domain XML that carries QEMU passthrough (`<qemu:commandline>`, …).
    pub allow_qemu_passthrough: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub target: String,
    pub backend: virtkeep_repo::Storage,
    pub path: String,
    pub format: String,
    pub size: u64,
    pub bytes_written: u64,
}

/// What `virtkeep restore` reports (stable in `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreResult {
    pub snapshot: String,
    pub host: String,
    pub vm: String,
    pub uuid: Option<String>,
    pub disks: Vec<RestoredDisk>,
    pub defined: bool,
    pub started: bool,
    pub notes: Vec<String>,
    pub duration_secs: f64,
    /// Nothing was written: `disks` is the plan.
    pub dry_run: bool,
    /// Targets whose destination existed and was (or would be) replaced.
    pub replaces: Vec<String>,
    /// What the definition changes against the backup's XML (with --define).
    pub xml_changes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::Storage;

    #[test]
    fn storage_flag() {
        assert_eq!(Storage::parse(None).expect("none"), Storage::Original);
        assert_eq!(
            Storage::parse(Some("file:/a/b/")).expect("file"),
            Storage::FileDir("/a/b".into())
        );
        assert_eq!(
            Storage::parse(Some("rbd:pool")).expect("rbd"),
            Storage::Rbd("pool".into())
        );
        assert_eq!(
            Storage::parse(Some("lvm:vg0")).expect("lvm"),
            Storage::Lvm("vg0".into())
        );
        for bad in [
            "file:rel",
            "file:/a/../b",
            "lv:vg0",
            "rbd:-x",
            "nfs:/x",
            "/x",
            "FILE:/x",
        ] {
            assert!(Storage::parse(Some(bad)).is_err(), "{bad}");
        }
        for s in ["file:/a/b", "rbd:pool", "lvm:vg0"] {
            let st = Storage::parse(Some(s)).expect("parse");
            assert_eq!(st.spec().as_deref(), Some(s));
        }
        assert_eq!(Storage::Original.spec(), None);
    }
}
