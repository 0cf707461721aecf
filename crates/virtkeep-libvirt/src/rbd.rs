//! `rbd` (Ceph RBD): the [`CephArgs`] builders and the parsers of their JSON output.
//!
//! Images go attached to their option (`--image=POOL/IMAGE[@SNAP]`), never as a word
//! of their own.

use serde::Deserialize;
use virtkeep_ssh::RemoteCommand;

use crate::error::ParseError;
use crate::support::json;

/// Ceph client settings, given explicitly on every `rbd` command (sshd passes no
/// CEPH_* variables).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephArgs {
    /// `-c ceph.conf`.
    pub conf: Option<String>,
    /// `--id` (without `client.`).
    pub id: Option<String>,
    /// `--keyring`.
    pub keyring: Option<String>,
}

impl CephArgs {
    /// `rbd [-c X] [--id Y] [--keyring Z] SUBCOMMAND…`, for the builders below.
    fn rbd(&self, subcommand: &[&str]) -> RemoteCommand {
        let mut c = RemoteCommand::new("rbd");
        if let Some(x) = &self.conf {
            c = c.arg("-c").arg(x);
        }
        if let Some(x) = &self.id {
            c = c.arg("--id").arg(x);
        }
        if let Some(x) = &self.keyring {
            c = c.arg("--keyring").arg(x);
        }
        c.args(subcommand)
    }

    /// `rbd info --format json --image=POOL/IMAGE`.
    pub fn info_json(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["info", "--format", "json"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd snap create --no-progress --image=POOL/IMAGE@SNAP`.
    pub fn snap_create(&self, pool: &str, image: &str, snap: &str) -> RemoteCommand {
        self.rbd(&["snap", "create", "--no-progress"])
            .arg(rbd_image_arg(pool, image, Some(snap)))
    }

    /// `rbd snap rm --no-progress --image=POOL/IMAGE@SNAP`.
    pub fn snap_rm(&self, pool: &str, image: &str, snap: &str) -> RemoteCommand {
        self.rbd(&["snap", "rm", "--no-progress"])
            .arg(rbd_image_arg(pool, image, Some(snap)))
    }

    /// `rbd snap ls --format json --image=POOL/IMAGE`.
    pub fn snap_ls_json(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["snap", "ls", "--format", "json"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd export-diff --no-progress [--from-snap=A] --image=POOL/IMAGE@SNAP -`
    /// (stream on stdout).
    pub fn export_diff(
        &self,
        pool: &str,
        image: &str,
        snap: &str,
        from_snap: Option<&str>,
    ) -> RemoteCommand {
        let mut c = self.rbd(&["export-diff", "--no-progress"]);
        if let Some(f) = from_snap {
            c = c.arg(format!("--from-snap={f}"));
        }
        c.arg(rbd_image_arg(pool, image, Some(snap))).arg("-")
    }

    /// `rbd import-diff --no-progress - --image=POOL/IMAGE` (stream on stdin).
    pub fn import_diff(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["import-diff", "--no-progress", "-"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd create --size={bytes}B --image=POOL/IMAGE` (a plain number would mean MiB).
    pub fn create(&self, pool: &str, image: &str, size: u64) -> RemoteCommand {
        self.rbd(&["create"])
            .arg(format!("--size={size}B"))
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd rm --no-progress --image=POOL/IMAGE`.
    pub fn rm(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["rm", "--no-progress"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd pool stats`: statistics of the default pool (`rbd_default_pool`, `rbd`
    /// unless ceph.conf says otherwise); succeeds when the cluster answers and the
    /// credentials work. (rbd has no `pool ls`.)
    pub fn default_pool_stats(&self) -> RemoteCommand {
        self.rbd(&["pool", "stats"])
    }

    /// `rbd snap purge --no-progress --image=POOL/IMAGE`: removes every (unprotected)
    /// snapshot of the image.
    pub fn snap_purge(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["snap", "purge", "--no-progress"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd rename --image=POOL/FROM --dest=POOL/TO` (within one pool).
    pub fn rename(&self, pool: &str, from: &str, to: &str) -> RemoteCommand {
        self.rbd(&["rename"])
            .arg(rbd_image_arg(pool, from, None))
            .arg(format!("--dest={pool}/{to}"))
    }

    /// `rbd image-meta get --image=POOL/IMAGE KEY`.
    pub fn meta_get(&self, pool: &str, image: &str, key: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "get"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
    }

    /// `rbd image-meta set --image=POOL/IMAGE KEY VALUE`.
    pub fn meta_set(&self, pool: &str, image: &str, key: &str, value: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "set"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
            .arg(value)
    }

    /// `rbd image-meta remove --image=POOL/IMAGE KEY`.
    pub fn meta_remove(&self, pool: &str, image: &str, key: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "remove"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
    }
}

/// The image (or snapshot) of an `rbd` command as one option with its value attached:
/// `--image=POOL/IMAGE[@SNAP]` (rbd splits pool, namespace and snapshot out of it).
/// A positional `POOL/IMAGE` would be read as an option when the pool name starts with
/// `-`; an attached value never is. Names are checked where they are read
/// ([`crate::check_rbd_image`]); this is the second line.
pub fn rbd_image_arg(pool: &str, image: &str, snap: Option<&str>) -> String {
    match snap {
        Some(s) => format!("--image={pool}/{image}@{s}"),
        None => format!("--image={pool}/{image}"),
    }
}

// ───────────────────────────── output ─────────────────────────────

/// The parent of a cloned RBD image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdParent {
    /// Pool.
    pub pool: String,
    /// Image.
    pub image: String,
    /// Snapshot.
    pub snapshot: String,
}

/// `rbd info --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdImageInfo {
    /// Image name.
    pub name: String,
    /// Image id (format 2).
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    #[serde(default)]
    pub object_size: u64,
    /// log2 of the object size.
    #[serde(default)]
    pub order: u32,
    /// Image format (1 or 2).
    #[serde(default)]
    pub format: u32,
    /// Features, e.g. `layering`, `exclusive-lock`, `object-map`, `fast-diff`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Number of snapshots.
    #[serde(default)]
    pub snapshot_count: u64,
    /// Parent, for a clone.
    #[serde(default)]
    pub parent: Option<RbdParent>,
}

impl RbdImageInfo {
    /// `fast-diff` is enabled: `export-diff` needs no full scan.
    pub fn has_fast_diff(&self) -> bool {
        self.features.iter().any(|f| f == "fast-diff")
    }
}

/// Parse `rbd info --format json`.
pub fn parse_rbd_info_json(json_text: &str) -> Result<RbdImageInfo, ParseError> {
    json("rbd info", json_text)
}

/// One snapshot from `rbd snap ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSnap {
    /// Snapshot id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Image size at the snapshot, bytes.
    pub size: u64,
    /// Protected (for cloning).
    pub protected: bool,
    /// Creation time as printed by rbd.
    pub timestamp: Option<String>,
}

#[derive(Deserialize)]
struct RawRbdSnap {
    id: u64,
    name: String,
    size: u64,
    #[serde(default)]
    protected: Option<serde_json::Value>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// Parse `rbd snap ls --format json` (`protected` is the string `"true"`/`"false"`).
pub fn parse_rbd_snap_ls_json(json_text: &str) -> Result<Vec<RbdSnap>, ParseError> {
    let raw: Vec<RawRbdSnap> = json("rbd snap ls", json_text)?;
    Ok(raw
        .into_iter()
        .map(|r| RbdSnap {
            id: r.id,
            name: r.name,
            size: r.size,
            protected: match r.protected {
                Some(serde_json::Value::Bool(b)) => b,
                Some(serde_json::Value::String(s)) => s == "true",
                _ => false,
            },
            timestamp: r.timestamp,
        })
        .collect())
}
