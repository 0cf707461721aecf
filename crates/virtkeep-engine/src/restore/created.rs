//! What a live restore created outside its job directory (destinations, overlays
//! beside files), each recorded right after its exclusive create with an identity that
//! names *that* object, not only its name: a file's device, inode, size and mtime (no
//! symlink followed), an LV's UUID (random, given by `lvcreate`), an RBD image's id.
//!
//! `cleanup` of a live restore killed before its domain started removes such a thing
//! only when the record parses with the names the restore itself would accept, the
//! host's object passes the restore's own checks again (a file: canonical path, no
//! symlink along it, a regular file) and its identity is still the recorded one (for a
//! file also unchanged: nobody wrote into it). Anything else is reported, not touched.
//! (Between the identity check and the removal a file could still be swapped by
//! someone with write access to its directory: the window is one SSH round trip, under
//! the job's host lock.)

use virtkeep_libvirt::{NewSource, coreutils};

use super::guard;
use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;

/// Identities longer than this are not ours (an inode tuple, a UUID, an image id).
const ID_MAX: usize = 128;

/// One thing a live restore created, with its identity right after the create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A file and its `dev:inode:size:mtime`.
    File { path: String, id: String },
    /// A logical volume and its LVM UUID.
    Lv {
        vg: String,
        name: String,
        uuid: String,
    },
    /// An RBD image and its image id.
    Rbd {
        pool: String,
        image: String,
        id: String,
    },
}

/// What `cleanup` did with one recorded thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Removed,
    /// Not there any more.
    Gone,
    /// Kept: it cannot be proven to be the one the job created (why).
    Kept(String),
}

impl Created {
    /// Identifies what was just created exclusively at `src` (its identity read now).
    pub async fn identify(host: &Host, src: &NewSource) -> Result<Created> {
        let c = match src {
            NewSource::File { path, .. } => Created::File {
                path: path.clone(),
                id: String::new(),
            },
            NewSource::Block { dev } => {
                let (vg, name) = crate::lvm::parse_lv_path(dev)
                    .ok_or_else(|| Error::domain(format!("{dev} is not /dev/VG/LV")))?;
                Created::Lv {
                    vg,
                    name,
                    uuid: String::new(),
                }
            }
            NewSource::Rbd { pool, image, .. } => Created::Rbd {
                pool: pool.clone(),
                image: image.clone(),
                id: String::new(),
            },
        };
        let id = c.current_id(host).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Remote,
                format!(
                    "{} has no identity right after it was created",
                    c.describe()
                ),
            )
        })?;
        Ok(c.with_id(id))
    }

    fn with_id(self, id: String) -> Created {
        match self {
            Created::File { path, .. } => Created::File { path, id },
            Created::Lv { vg, name, .. } => Created::Lv { vg, name, uuid: id },
            Created::Rbd { pool, image, .. } => Created::Rbd { pool, image, id },
        }
    }

    fn id(&self) -> &str {
        match self {
            Created::File { id, .. } | Created::Rbd { id, .. } => id,
            Created::Lv { uuid, .. } => uuid,
        }
    }

    /// Its line in the job's `created` file: kind (`path`, `lv`, `image`), identity,
    /// what (tab-separated).
    pub fn line(&self) -> String {
        let (kind, what) = match self {
            Created::File { path, .. } => ("path", path.clone()),
            Created::Lv { vg, name, .. } => ("lv", format!("{vg}/{name}")),
            Created::Rbd { pool, image, .. } => ("image", format!("{pool}/{image}")),
        };
        format!("{kind}\t{}\t{what}", self.id())
    }

    /// Parses a [`line`](Self::line); `None` for anything else, or with a name the
    /// restore would not have chosen (such a line is reported, never acted on).
    pub fn parse(line: &str) -> Option<Created> {
        let mut f = line.splitn(3, '\t');
        let (kind, id, what) = (f.next()?, f.next()?, f.next()?);
        let id_ok = !id.is_empty()
            && id.len() <= ID_MAX
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-'));
        if !id_ok {
            return None;
        }
        let id = id.to_string();
        let c = match kind {
            "path" => {
                guard::check_path(what).ok()?;
                Created::File {
                    path: what.to_string(),
                    id,
                }
            }
            "lv" => {
                let (vg, name) = what.split_once('/')?;
                guard::check_vg_name(vg).ok()?;
                if !crate::lvm::valid_new_lv_name(name) {
                    return None;
                }
                let (vg, name) = (vg.to_string(), name.to_string());
                Created::Lv { vg, name, uuid: id }
            }
            "image" => {
                let (pool, image) = what.split_once('/')?;
                guard::check_rbd_name("pool", pool).ok()?;
                guard::check_rbd_name("image", image).ok()?;
                let (pool, image) = (pool.to_string(), image.to_string());
                Created::Rbd { pool, image, id }
            }
            _ => return None,
        };
        Some(c)
    }

    /// It in a message: the path, `logical volume VG/NAME`, `RBD image POOL/IMAGE`.
    pub fn describe(&self) -> String {
        match self {
            Created::File { path, .. } => path.clone(),
            Created::Lv { vg, name, .. } => format!("logical volume {vg}/{name}"),
            Created::Rbd { pool, image, .. } => format!("RBD image {pool}/{image}"),
        }
    }

    /// Its identity on the host now; `None` when it is not there. A file is checked as
    /// the restore checked its destination first (no symlink along the path, a
    /// regular file).
    async fn current_id(&self, host: &Host) -> Result<Option<String>> {
        match self {
            Created::File { path, .. } => {
                if !super::file::check_on_host(host, path).await? {
                    return Ok(None);
                }
                let out = host.exec(&coreutils::stat_identity(path)).await?;
                let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok((out.status == 0 && !id.is_empty()).then_some(id))
            }
            Created::Lv { vg, name, .. } => Ok(crate::lvm::list_lvs(host, Some(vg))
                .await?
                .into_iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.uuid)),
            Created::Rbd { pool, image, .. } => {
                let ceph = crate::rbd::ceph(host)?;
                let out = host.exec(&ceph.info_json(pool, image)).await?;
                if out.status != 0 {
                    return Ok(None);
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let info = virtkeep_libvirt::rbd::parse_rbd_info_json(&text).map_err(|e| {
                    Error::new(ErrorKind::Remote, format!("rbd info {pool}/{image}: {e}"))
                })?;
                Ok(info.id)
            }
        }
    }

    /// Removes it if it is still what the job created (see the module doc).
    pub async fn remove_if_unchanged(&self, host: &Host) -> Result<Outcome> {
        let now = match self.current_id(host).await {
            Ok(Some(now)) => now,
            Ok(None) => return Ok(Outcome::Gone),
            Err(e) => return Ok(Outcome::Kept(e.to_string())),
        };
        if now != self.id() {
            return Ok(Outcome::Kept(format!(
                "it is not the one the live restore created, or was changed since (identity {now}, recorded {})",
                self.id()
            )));
        }
        match self {
            Created::File { path, .. } => {
                host.run(&coreutils::rm_f(path)).await?;
            }
            Created::Lv { vg, name, .. } => {
                crate::lvm::remove_lv(host, vg, name).await?;
            }
            Created::Rbd { pool, image, .. } => {
                let ceph = crate::rbd::ceph(host)?;
                host.run(&ceph.rm(pool, image)).await?;
            }
        }
        Ok(Outcome::Removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let all = [
            Created::File {
                path: "/pool/a-vda.img".into(),
                id: "2049:1234:1048576:1700000000".into(),
            },
            Created::Lv {
                vg: "vg0".into(),
                name: "a-vda".into(),
                uuid: "Ab12-cd".into(),
            },
            Created::Rbd {
                pool: "rbd".into(),
                image: "a-vdc".into(),
                id: "10f3a2b".into(),
            },
        ];
        for c in all {
            assert_eq!(Created::parse(&c.line()), Some(c));
        }
    }

    #[test]
    fn unsafe_or_foreign_lines_are_not_taken() {
        for l in [
            "/pool/a.raw",
            "logical volume vg0/a",
            "path\t1:2:3:4\t/pool/../etc/passwd",
            "path\t1:2:3:4\trelative",
            "path\t\t/pool/a",
            "path\t1 2\t/pool/a",
            "lv\tu\tvg0/-a",
            "lv\tu\tvg0",
            "image\ti\tpool/.a",
            "dir\t1\t/pool",
        ] {
            assert_eq!(Created::parse(l), None, "{l}");
        }
    }
}
