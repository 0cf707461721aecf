//! The shapes a backup is planned with: the options of a run and the enums the CLI, the
//! configuration file and the daemon share (each defined once, here; clap's `ValueEnum`
//! is derived behind the `clap` feature, as rustic_core does); the plan of one VM's
//! disks ([`plan_backup`]), the result a backup reports, and the typed `extra` of its
//! manifest ([`BackupExtra`]), through which it is written and read.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use virtkeep_libvirt::{Backend, Disk, DiskSource, Domain};
use virtkeep_repo::Storage;

use crate::error::{Error, Result};
use crate::phases::Phases;
use crate::vm::DomainState;

/// What the user asked for with `--mode`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ModeRequest {
    #[default]
    Auto,
    Full,
    Incremental,
}

/// How frozen data travels from the host to the node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// qemu-nbd on a private unix socket through the SSH connection (encrypted)
    #[default]
    Ssh,
    /// qemu-nbd on plain TCP from the host: UNENCRYPTED, for trusted networks only
    Netcat,
    /// dd of raw images through SSH, for hosts without qemu-nbd (reads every byte; chosen
    /// automatically when qemu-nbd is missing)
    Stream,
}

/// Whether a backup leaves on the host the base the next incremental builds on (the
/// libvirt checkpoint, the RBD snapshot, the thin LVM snapshot, the kept overlay).
/// Every mode keeps it, `--mode full` too: a full is a full read, not a break of the
/// chain. `Remove` (`--no-keep-base`, policy `keep_base = false`) leaves nothing and
/// records that in the manifest, so the next backup's reason says why it is a full.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BaseOnHost {
    #[default]
    Keep,
    Remove,
}

impl ModeRequest {
    pub fn as_str(self) -> &'static str {
        match self {
            ModeRequest::Auto => "auto",
            ModeRequest::Full => "full",
            ModeRequest::Incremental => "incremental",
        }
    }

    /// The mode named `s` (`auto`, `full`, `incremental`), as the catalog stores it.
    pub fn parse(s: &str) -> Option<ModeRequest> {
        [
            ModeRequest::Auto,
            ModeRequest::Full,
            ModeRequest::Incremental,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for ModeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of one backup run (`virtkeep backup`).
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub mode: ModeRequest,
    /// Leave the next incremental's base on the host (the default) or nothing.
    pub base: BaseOnHost,
    /// Disk targets (`vdb`) to leave out.
    pub exclude_disks: Vec<String>,
    /// Freeze guest filesystems through the QEMU guest agent.
    pub quiesce: bool,
    /// Shell command run on the host before the snapshot; failing aborts the backup.
    pub pre_snapshot: Option<String>,
    /// Shell command run on the host after the snapshot, also when it failed.
    pub post_snapshot: Option<String>,
    pub transport: Transport,
    /// Parallel data connections per disk.
    pub parallel: usize,
}

/// How the disks are frozen at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeMethod {
    /// Running VM: `virsh snapshot-create-as --disk-only --atomic --no-metadata`.
    LiveSnapshot,
    /// Stopped VM: `qemu-img create` overlays, and the domain redefined on them so a
    /// start during the backup writes into the overlays, never into the frozen bases.
    OfflineOverlay,
    /// qcow2 disks on a host with libvirt's backup API: `virsh backup-begin` in pull
    /// mode with a checkpoint (dirty bitmaps), no overlay and no blockcommit. A stopped
    /// VM is started paused for the job and destroyed again afterwards.
    BackupApi,
}

/// Which disks a backup takes and how.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub method: FreezeMethod,
    pub disks: Vec<PlannedDisk>,
    pub skipped: Vec<SkippedDisk>,
}

/// Where a planned disk's data lives; each kind has its backup strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    /// An image file, frozen with a qcow2 overlay (or read through the backup API).
    File { path: String },
    /// A logical volume `/dev/VG/LV`, frozen with an LVM snapshot.
    Lvm { vg: String, lv: String },
    /// A Ceph RBD image, frozen with an RBD snapshot.
    Rbd { pool: String, image: String },
}

impl DiskKind {
    /// How the disk is recorded in the manifest.
    pub fn storage(&self) -> Storage {
        match self {
            DiskKind::File { .. } => Storage::File,
            DiskKind::Lvm { .. } => Storage::Lvm,
            DiskKind::Rbd { .. } => Storage::Rbd,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedDisk {
    pub target: String,
    /// File path, `/dev/VG/LV`, or `pool/image` for RBD (the manifest's `source`).
    pub path: String,
    pub format: String,
    pub kind: DiskKind,
}

impl PlannedDisk {
    /// A file disk: frozen with a qcow2 overlay (neither RBD nor LVM).
    pub fn is_file(&self) -> bool {
        matches!(self.kind, DiskKind::File { .. })
    }

    /// The disk's spec in the manifest, at `size` bytes.
    pub fn spec(&self, size: u64) -> virtkeep_repo::DiskSpec {
        virtkeep_repo::DiskSpec {
            name: self.target.clone(),
            size,
            backend: self.kind.storage(),
            format: self.format.clone(),
            target: self.target.clone(),
            source: self.path.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedDisk {
    pub target: String,
    pub reason: String,
}

/// Decides method and disks from the definition alone (unit-tested with fixtures).
pub fn plan_backup(domain: &Domain, state: DomainState, opts: &BackupOptions) -> Result<Plan> {
    for ex in &opts.exclude_disks {
        if !domain.disks.iter().any(|d| &d.target == ex) {
            return Err(
                Error::config(format!("--exclude-disk {ex}: the domain has no disk {ex}"))
                    .hint(format!("its disks are: {}", targets(domain))),
            );
        }
    }
    let is_xen = domain.kind == "xen";
    if is_xen && state.is_active() {
        return Err(Error::unsupported(format!(
            "{:?} is a running Xen domain: libvirt's Xen driver cannot take external disk snapshots",
            domain.name
        ))
        .hint("shut the domain down and run the backup again (stopped domains are frozen with qemu-img overlays)"));
    }
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for disk in &domain.disks {
        let skip = if opts.exclude_disks.contains(&disk.target) {
            Some("excluded with --exclude-disk".to_string())
        } else {
            disk.is_backup_candidate().err().map(|r| r.to_string())
        };
        match skip {
            Some(reason) => skipped.push(SkippedDisk {
                target: disk.target.clone(),
                reason,
            }),
            None => disks.push(plan_disk(disk, is_xen)?),
        }
    }
    if disks.is_empty() {
        return Err(Error::domain(format!("{:?} has no disk to back up", domain.name))
            .hint("every disk was excluded or skipped (CD-ROMs, floppies, read-only and shareable disks are skipped)"));
    }
    let method = if state.is_active() {
        FreezeMethod::LiveSnapshot
    } else {
        FreezeMethod::OfflineOverlay
    };
    Ok(Plan {
        method,
        disks,
        skipped,
    })
}

/// One included disk: its kind, or why this version cannot back it up.
fn plan_disk(disk: &Disk, is_xen: bool) -> Result<PlannedDisk> {
    if let Some(problem) = disk.rbd_name_problem() {
        return Err(Error::unsupported(format!("disk {}: {problem}", disk.target))
            .hint(format!("virtkeep passes no other RBD names to rbd; rename the image or leave the disk out with --exclude-disk {}", disk.target)));
    }
    let format = disk.format.clone().unwrap_or_else(|| "raw".into());
    let (path, format, kind) = match (disk.backend(), &disk.source) {
        (Backend::QcowFile | Backend::RawFile, DiskSource::File { path }) => {
            // A path with the overlay marker here is a kept overlay (healing ran
            // first and committed every other one); it is read as the frozen layer.
            if is_xen && !matches!(disk.driver_name.as_deref(), Some("qemu" | "qdisk")) {
                return Err(Error::unsupported(format!(
                    "Xen disk {} uses driver {:?}: only qdisk file disks can be frozen with an overlay",
                    disk.target,
                    disk.driver_name.as_deref().unwrap_or("default")
                ))
                .hint(format!("exclude it with --exclude-disk {}", disk.target)));
            }
            let kind = DiskKind::File { path: path.clone() };
            (path.clone(), format, kind)
        }
        (Backend::Rbd { pool, image }, _) => (
            format!("{pool}/{image}"),
            "raw".into(),
            DiskKind::Rbd { pool, image },
        ),
        // An LV is frozen with an LVM snapshot (no overlay), read like a raw image.
        (Backend::Lvm { vg, lv }, _) => (
            crate::lvm::lv_path(&vg, &lv),
            format,
            DiskKind::Lvm { vg, lv },
        ),
        (backend, _) => {
            return Err(Error::unsupported(format!(
                "disk {} ({}) is on a storage backend this version cannot back up yet",
                disk.target,
                describe(disk, &backend)
            ))
            .hint(format!("leave it out with --exclude-disk {}", disk.target)));
        }
    };
    Ok(PlannedDisk {
        target: disk.target.clone(),
        path,
        format,
        kind,
    })
}

fn describe(disk: &Disk, backend: &Backend) -> String {
    match backend {
        Backend::Rbd { pool, image } => format!("Ceph RBD {pool}/{image}"),
        Backend::Lvm { vg, lv } => format!("LVM volume {vg}/{lv}"),
        Backend::Block => "block device".into(),
        _ => format!("{:?}", disk.source),
    }
}

fn targets(domain: &Domain) -> String {
    domain
        .disks
        .iter()
        .map(|d| d.target.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Plan {
    /// Why this backup cannot be incremental, for the manifest and the output.
    pub fn full_reason(&self) -> String {
        let raw = self.disks.iter().any(|d| d.format != "qcow2");
        if self
            .disks
            .iter()
            .any(|d| matches!(d.kind, DiskKind::Lvm { .. }))
        {
            "full: no earlier backup of these LVM volumes (LVM keeps no change map: later backups read each snapshot whole and store only the chunks that changed)".into()
        } else if raw && self.method == FreezeMethod::LiveSnapshot {
            "full: raw disks carry no dirty bitmap; --mode incremental keeps an overlay under the running VM for the next incremental (auto never leaves one)".into()
        } else if raw {
            "full: raw disks carry no dirty bitmap (only qcow2 disks can be backed up incrementally)"
                .into()
        } else {
            "full: the host's libvirt has no backup API (checkpoints), so no dirty bitmap".into()
        }
    }
}

/// One disk in the result of a backup.
#[derive(Debug, Clone, Serialize)]
pub struct DiskResult {
    pub target: String,
    pub size: u64,
    pub bytes_read: u64,
    /// Plaintext bytes of the chunks this backup uploaded.
    pub bytes_new: u64,
    /// What those chunks take in the repository (compressed, encrypted): the `NEW` of
    /// `snapshots`.
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub chunks_zero: u64,
}

/// What `virtkeep backup` reports (stable in `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BackupResult {
    pub id: String,
    pub host: String,
    pub vm: String,
    pub mode: String,
    pub reason: String,
    pub method: FreezeMethod,
    pub disks: Vec<DiskResult>,
    pub skipped: Vec<SkippedDisk>,
    pub warnings: Vec<String>,
    pub duration_secs: f64,
    /// Where the time went (`connect_secs` is the caller's).
    pub phases: Phases,
}

/// The reason of a full whose parent left no base on request.
pub fn removed_on_request_reason(parent: &str) -> String {
    format!(
        "full: backup {parent} left no base on the host, as asked (--no-keep-base or keep_base = false)"
    )
}

/// The manifest's `extra` of a backup: how it was taken and which bases it left on the
/// host for the next incremental. Written and read only through this type. Every field
/// is read leniently (a value of another shape reads as absent, as an older reader
/// would have ignored it) and keys this version does not know are kept in `other`, so
/// older and newer versions read each other's manifests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupExtra {
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub method: Option<FreezeMethod>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub transport: Option<Transport>,
    /// Per RBD disk (target): the snapshot kept as the next base, `null` when none.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub rbd: Option<BTreeMap<String, Option<String>>>,
    /// Per file disk (target): the overlay kept under the running VM.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub kept: Option<BTreeMap<String, String>>,
    /// Per LVM disk (target): the volume and the thin snapshot kept as the next base.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub lvm: Option<BTreeMap<String, LvmRecord>>,
    /// The checkpoint of a backup-API backup.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub cbt: Option<CbtRecord>,
    /// `false` when the backup left no base on the host on request (`--no-keep-base`).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_kept: Option<bool>,
    /// Keys of other versions, written back unchanged.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// One LVM disk of a backup (`extra.lvm.TARGET`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LvmRecord {
    pub vg: String,
    pub lv: String,
    /// The thin pool of a thin LV (a restore recreates the LV thin in it).
    #[serde(default)]
    pub thin_pool: Option<String>,
    /// The snapshot this backup left on the host as the next incremental's base.
    #[serde(default)]
    pub kept: Option<String>,
}

/// What a CBT backup records in its manifest (`extra.cbt`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CbtRecord {
    pub checkpoint: String,
    pub vm_uuid: String,
    /// (target, size) of every disk in the backup.
    pub disks: Vec<(String, u64)>,
}

/// A value of another shape reads as absent (never an error).
fn lenient<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl BackupExtra {
    /// The `extra` of `manifest` (what this version cannot read reads as absent).
    pub fn of(manifest: &virtkeep_repo::Manifest) -> BackupExtra {
        Self::from_value(&manifest.extra)
    }

    pub fn from_value(v: &serde_json::Value) -> BackupExtra {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The JSON written into the manifest.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Whether the backup was taken with the base removed on request (`--no-keep-base`).
    pub fn base_removed_on_request(&self) -> bool {
        self.base_kept == Some(false)
    }

    /// The RBD snapshot the backup kept of disk `target`.
    pub fn rbd_base(&self, target: &str) -> Option<&str> {
        self.rbd.as_ref()?.get(target)?.as_deref()
    }

    /// The overlay the backup kept under disk `target`.
    pub fn kept_overlay(&self, target: &str) -> Option<&str> {
        self.kept.as_ref()?.get(target).map(String::as_str)
    }

    /// The thin snapshot the backup kept of LVM disk `target`.
    pub fn lvm_base(&self, target: &str) -> Option<&str> {
        self.lvm.as_ref()?.get(target)?.kept.as_deref()
    }

    /// The thin pool LVM disk `target` was in (for a restore).
    pub fn thin_pool(&self, target: &str) -> Option<String> {
        self.lvm.as_ref()?.get(target)?.thin_pool.clone()
    }
}

#[cfg(test)]
mod extra_tests {
    use super::*;

    /// The `extra` of an LVM + RBD + kept-overlay backup as virtkeep 0.x wrote it
    /// (`json!` in backup.rs), and of a backup-API backup (cbt_backup.rs).
    const CURRENT: &str = r#"{
        "method": "live_snapshot", "transport": "ssh",
        "rbd": {"vdb": "virtkeep-20260101T000000Z-ab12cd34", "vdc": null},
        "kept": {"vda": "/img/a.qcow2.virtkeep-20260101T000000Z-ab12cd34"},
        "lvm": {"vdd": {"vg": "vg0", "lv": "data", "thin_pool": "pool0", "kept": "data-vk"},
                "vde": {"vg": "vg0", "lv": "thick", "thin_pool": null, "kept": null}},
        "base_kept": true
    }"#;
    const CURRENT_CBT: &str = r#"{
        "method": "backup_api", "transport": "ssh",
        "cbt": {"checkpoint": "virtkeep-1", "vm_uuid": "u", "disks": [["vda", 10]]},
        "base_kept": false
    }"#;

    #[test]
    fn current_manifests_read() {
        let v: serde_json::Value = serde_json::from_str(CURRENT).expect("json");
        let e = BackupExtra::from_value(&v);
        assert_eq!(e.method, Some(FreezeMethod::LiveSnapshot));
        assert_eq!(e.transport, Some(Transport::Ssh));
        assert_eq!(
            e.rbd_base("vdb"),
            Some("virtkeep-20260101T000000Z-ab12cd34")
        );
        assert_eq!(e.rbd_base("vdc"), None);
        assert_eq!(
            e.kept_overlay("vda"),
            Some("/img/a.qcow2.virtkeep-20260101T000000Z-ab12cd34")
        );
        assert_eq!(e.lvm_base("vdd"), Some("data-vk"));
        assert_eq!(e.thin_pool("vdd").as_deref(), Some("pool0"));
        assert_eq!(e.thin_pool("vde"), None);
        assert!(!e.base_removed_on_request());
        // Written back, it is the same JSON (keys and values).
        assert_eq!(e.to_value(), v);

        let v: serde_json::Value = serde_json::from_str(CURRENT_CBT).expect("json");
        let e = BackupExtra::from_value(&v);
        assert_eq!(e.method, Some(FreezeMethod::BackupApi));
        assert_eq!(
            e.cbt.as_ref().map(|c| c.checkpoint.as_str()),
            Some("virtkeep-1")
        );
        assert!(e.base_removed_on_request());
        assert_eq!(e.to_value(), v);
    }

    #[test]
    fn unknown_keys_and_shapes_are_kept_or_ignored() {
        let v = serde_json::json!({
            "method": "some_future_method",
            "kept": {"vda": "/x"},
            "future": {"a": [1, 2]},
            "lvm": "not a map",
        });
        let e = BackupExtra::from_value(&v);
        assert_eq!(e.method, None);
        assert_eq!(e.lvm, None);
        assert_eq!(e.kept_overlay("vda"), Some("/x"));
        assert_eq!(e.to_value()["future"], serde_json::json!({"a": [1, 2]}));
        // Older manifests without extra (or null) read as empty.
        assert_eq!(
            BackupExtra::from_value(&serde_json::Value::Null),
            BackupExtra::default()
        );
    }

    #[test]
    fn round_trip() {
        let e = BackupExtra {
            method: Some(FreezeMethod::OfflineOverlay),
            transport: Some(Transport::Stream),
            rbd: Some(BTreeMap::from([("vdb".into(), None)])),
            kept: Some(BTreeMap::new()),
            lvm: Some(BTreeMap::from([(
                "vdc".into(),
                LvmRecord {
                    vg: "vg".into(),
                    lv: "lv".into(),
                    thin_pool: None,
                    kept: Some("s".into()),
                },
            )])),
            cbt: None,
            base_kept: Some(true),
            other: serde_json::Map::from_iter([("x".to_string(), serde_json::json!(1))]),
        };
        assert_eq!(BackupExtra::from_value(&e.to_value()), e);
    }
}
#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::ErrorKind;

    fn fixture(name: &str) -> Domain {
        let path = format!(
            "{}/../virtkeep-libvirt/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let xml = std::fs::read_to_string(&path).expect("fixture");
        virtkeep_libvirt::parse_domain(&xml).expect("parses")
    }

    fn opts(exclude: &[&str]) -> BackupOptions {
        BackupOptions {
            exclude_disks: exclude.iter().map(|s| s.to_string()).collect(),
            ..BackupOptions::default()
        }
    }

    #[test]
    fn kvm_running_uses_live_snapshot_and_skips_media_and_shared_disks() {
        let plan = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::Running,
            &opts(&[]),
        )
        .expect("plan");
        assert_eq!(plan.method, FreezeMethod::LiveSnapshot);
        let disks: Vec<_> = plan.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(disks, ["vda", "vdb"]);
        assert_eq!(plan.disks[1].path, "/srv/vm disks/web01, data.img");
        let skipped: Vec<_> = plan.skipped.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(skipped, ["vdc", "sda", "sdb"]);
    }

    #[test]
    fn stopped_vm_uses_overlays_and_excludes() {
        let plan = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::ShutOff,
            &opts(&["vdb"]),
        )
        .expect("plan");
        assert_eq!(plan.method, FreezeMethod::OfflineOverlay);
        assert_eq!(plan.disks.len(), 1);
        assert!(
            plan.skipped
                .iter()
                .any(|s| s.target == "vdb" && s.reason.contains("exclude"))
        );
        let err = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::ShutOff,
            &opts(&["vdz"]),
        )
        .expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Config);
    }

    /// Xen: libvirt's Xen driver has no external disk snapshots, so a running Xen domain
    /// is refused with what to do; a stopped one uses the overlay method for qdisk file
    /// disks, and other Xen disk drivers are refused unless excluded.
    #[test]
    fn xen_choices() {
        let hvm = fixture("xen-hvm.xml");
        let err = plan_backup(&hvm, DomainState::Running, &opts(&[])).expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(
            err.hint
                .as_deref()
                .is_some_and(|h| h.contains("shut the domain down"))
        );

        let err = plan_backup(&hvm, DomainState::ShutOff, &opts(&["hdb"])).expect_err("refused");
        assert!(err.message.contains("xvdc"), "{}", err.message);

        let plan = plan_backup(&hvm, DomainState::ShutOff, &opts(&["hdb", "xvdc"])).expect("plan");
        assert_eq!(plan.method, FreezeMethod::OfflineOverlay);
        assert_eq!(
            plan.disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>(),
            ["hda"]
        );
        assert!(plan.skipped.iter().any(|s| s.target == "hdc"));
        assert!(plan.skipped.iter().any(|s| s.target == "fda"));

        let pv = fixture("xen-pv.xml");
        let err = plan_backup(&pv, DomainState::ShutOff, &opts(&[])).expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Unsupported);
    }

    /// An RBD name that could be read as an rbd option is refused with the disk and
    /// the name, before anything runs; the disk can be left out.
    #[test]
    fn rbd_names_that_look_like_options_are_refused() {
        let path = format!(
            "{}/../virtkeep-libvirt/tests/fixtures/rbd-auth.xml",
            env!("CARGO_MANIFEST_DIR")
        );
        let xml = std::fs::read_to_string(&path).expect("fixture");
        for bad in ["--keyring=/tmp/k/db", "vms/-db-ceph-root", "vms/a b"] {
            let xml = xml.replace("vms/db-ceph-root", bad);
            let dom = virtkeep_libvirt::parse_domain(&xml).expect("parses");
            let err = plan_backup(&dom, DomainState::Running, &opts(&["vdc", "vdd"]))
                .expect_err("refused");
            assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
            assert!(err.message.contains("disk vda: RBD"), "{err}");
            assert!(
                err.hint
                    .as_deref()
                    .is_some_and(|h| h.contains("--exclude-disk vda"))
            );
            let plan = plan_backup(&dom, DomainState::Running, &opts(&["vda", "vdc", "vdd"]))
                .expect("without vda");
            assert_eq!(plan.disks.len(), 1);
        }
    }
}
