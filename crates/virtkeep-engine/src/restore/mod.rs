//! `virtkeep restore SNAPSHOT --to HOST`: recreate every disk in its format, write only
//! the data extents through qemu-nbd over SSH, rewrite the saved XML and define it.
//!
//! The order is resolve → refuse → write → swap → define: every destination is chosen
//! by virtkeep and checked ([`guard`]) before anything is written; disks are written
//! under temporary names and swapped in only once all are written ([`stage`]).

mod guard;
pub mod local;
pub mod stage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;
use virtkeep_libvirt::{DiskSource, NewSource, Rewrite, cmd, parse_domain, rewrite_domain};
use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::export::NbdExport;
use crate::heal::define;
use crate::host::Host;
use crate::progress::{Event, Progress};

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
        match s.split_once(':') {
            Some(("file", dir)) if guard::check_path(dir.trim_end_matches('/')).is_ok() => {
                Ok(Storage::FileDir(dir.trim_end_matches('/').to_string()))
            }
            Some(("rbd", pool)) if guard::check_rbd_name("pool", pool).is_ok() => {
                Ok(Storage::Rbd(pool.to_string()))
            }
            Some(("lvm", vg)) if crate::lvm::valid_new_lv_name(vg) => {
                Ok(Storage::Lvm(vg.to_string()))
            }
            _ => Err(Error::config(format!(
                "storage {s:?}: expected file:/ABSOLUTE/DIR (canonical), rbd:POOL or lvm:VG"
            ))),
        }
    }
}

/// Where one disk is restored to.
#[derive(Debug, Clone)]
enum Dest {
    File(String),
    Rbd(String, String),
    Lv(LvDest),
}

#[derive(Debug, Clone)]
struct LvDest {
    vg: String,
    name: String,
    /// Thin pool of the new LV; thick when `None`.
    thin_pool: Option<String>,
    /// An LV of that name exists and `--force` lets the restore write into it.
    reuse: bool,
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

/// Keeps a file-name component to characters that need no care anywhere.
fn safe_component(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_start_matches('.').to_string()
}

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

/// How long a restore waits for the lock of its target VM (a cleanup pass holds it briefly).
const LOCK_WAIT_SECS: u32 = 60;

/// The lock a restore takes: the existing domain's UUID (the key its backups take), or
/// a key derived from the new name.
fn lock_key(name: &str, existing_uuid: Option<&str>) -> String {
    match existing_uuid {
        Some(u) => u.to_string(),
        None => {
            let mut s = format!("name-{}", safe_component(name));
            s.truncate(120);
            s
        }
    }
}

pub async fn restore(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreResult> {
    let started = Instant::now();
    let id = crate::snapshot_ref::resolve(repo, &opts.snapshot).await?;
    let manifest = repo.manifest(&id).await?;
    let domain = parse_domain(&manifest.domain_xml)?;
    let name = opts.name.clone().unwrap_or_else(|| domain.name.clone());
    // By name only: `virsh domuuid 14` would answer for the domain running with id 14.
    let existing_uuid = crate::vm::Vm::uuid_by_name(host, &name).await?;
    let key = lock_key(&name, existing_uuid.as_deref());
    // The lock keeps a backup, cleanup or second restore of this VM out while its
    // disks are replaced; a dry run changes nothing and takes none.
    let lock = if opts.dry_run {
        None
    } else {
        Some(host.lock_vm(&key, LOCK_WAIT_SECS).await?)
    };
    let job = Job {
        manifest,
        domain,
        name,
        existing_uuid,
        lock_key: key,
    };
    let res = restore_locked(host, repo, opts, progress, job).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    let mut r = res?;
    r.duration_secs = started.elapsed().as_secs_f64();
    Ok(r)
}

/// What a restore works from once the backup is loaded.
struct Job {
    manifest: virtkeep_repo::Manifest,
    domain: virtkeep_libvirt::Domain,
    /// The domain name restored to.
    name: String,
    /// The domain of that name on the host.
    existing_uuid: Option<String>,
    lock_key: String,
}

impl Job {
    fn renamed(&self) -> bool {
        self.name != self.domain.name
    }
}

/// One disk of the plan, decided and checked before anything is written.
struct Planned<'a> {
    m: &'a virtkeep_repo::ManifestDisk,
    dest: Dest,
    /// Its format at the destination.
    format: String,
    /// Where it is written first.
    staged: stage::Staged,
    /// The destination exists and is replaced.
    replaces: bool,
}

async fn restore_locked(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
    job: Job,
) -> Result<RestoreResult> {
    let mut notes = Vec::new();
    let selected = select_disks(&job.manifest, &opts.disks)?;
    if opts.define {
        check_passthrough(&job.manifest, opts.allow_qemu_passthrough)?;
        check_existing_domain(host, opts, &job).await?;
    }
    let nvram = plan_nvram(host, opts, &job).await?;
    let job_id = crate::job_id();
    let plan = plan_disks(host, &job, &selected, opts, &job_id, &mut notes).await?;
    let rw = rewrite_for(&job, opts, &plan, &nvram, &mut notes);
    let mut result = RestoreResult {
        snapshot: job.manifest.id.clone(),
        host: host.name.clone(),
        vm: job.name.clone(),
        uuid: None,
        disks: plan.iter().map(|p| planned_disk(p, 0)).collect(),
        defined: false,
        started: false,
        notes: Vec::new(),
        duration_secs: 0.0,
        dry_run: opts.dry_run,
        replaces: plan
            .iter()
            .filter(|p| p.replaces)
            .map(|p| p.m.spec.target.clone())
            .collect(),
        xml_changes: if opts.define {
            describe_rewrite(&rw)
        } else {
            Vec::new()
        },
    };
    if opts.dry_run {
        result.notes = notes;
        return Ok(result);
    }
    let owner = match &opts.owner {
        Some(o) => o.clone(),
        None => host.qemu_owner().await?,
    };
    let ctx = WriteCtx {
        host,
        vm: &job.name,
        repo,
        id: &job.manifest.id,
        owner: &owner,
        parallel: opts.parallel,
        progress: &progress,
    };
    result.disks = write_all(&ctx, &plan, &job_id, &job.lock_key).await?;
    if opts.define {
        let (uuid, started) = define_restored(host, opts, &job, &nvram, &rw, &mut notes).await?;
        result.uuid = Some(uuid);
        result.defined = true;
        result.started = started;
    }
    result.notes = notes;
    Ok(result)
}

fn select_disks<'a>(
    manifest: &'a virtkeep_repo::Manifest,
    only: &[String],
) -> Result<Vec<&'a virtkeep_repo::ManifestDisk>> {
    for d in only {
        if !manifest.disks.iter().any(|m| &m.spec.target == d) {
            return Err(Error::config(format!(
                "backup {} has no disk {d}",
                manifest.id
            )));
        }
    }
    Ok(manifest
        .disks
        .iter()
        .filter(|m| only.is_empty() || only.contains(&m.spec.target))
        .collect())
}

/// libvirt's namespace for QEMU passthrough (`<qemu:commandline>`, `<qemu:capabilities>`…).
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// A backup's XML may hand arbitrary arguments to QEMU (run as root's delegate on the
/// host): defined only when the user says so.
fn check_passthrough(manifest: &virtkeep_repo::Manifest, allowed: bool) -> Result<()> {
    if allowed || !manifest.domain_xml.contains(QEMU_NS) {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "backup {} has QEMU passthrough in its domain XML (<qemu:commandline> or <qemu:capabilities>)",
        manifest.id
    ))
    .hint("it passes arguments to QEMU unchecked: restore the disks without --define, or, if you trust this backup, add --allow-qemu-passthrough"))
}

/// `--define` replaces an existing domain of that name only with `--force`, and only
/// while it is shut off.
async fn check_existing_domain(host: &Host, opts: &RestoreOptions, job: &Job) -> Result<()> {
    let Some(uuid) = &job.existing_uuid else {
        return Ok(());
    };
    if !opts.force {
        return Err(Error::conflict(format!(
            "a domain named {:?} exists on host {}",
            job.name, host.name
        ))
        .hint("restore under another name with --name NEW, or replace it with --force"));
    }
    let state = host.run_string(&host.virsh().domstate(uuid)).await?;
    if state.trim() != "shut off" {
        return Err(Error::conflict(format!(
            "domain {:?} is {}: it must be shut off to be replaced",
            job.name,
            state.trim()
        )));
    }
    Ok(())
}

/// A renamed copy gets a UEFI variable store of its own: two domains on one NVRAM file
/// overwrite each other's boot entries.
async fn plan_nvram(
    host: &Host,
    opts: &RestoreOptions,
    job: &Job,
) -> Result<Option<(String, String)>> {
    let (Some(old), true) = (&job.domain.nvram, job.renamed() && opts.define) else {
        return Ok(None);
    };
    let new = nvram_path_for(old, &job.name);
    guard::check_path(&new)?;
    if !opts.force
        && host
            .exec(&RemoteCommand::new("test").arg("-e").arg(&new))
            .await?
            .status
            == 0
    {
        return Err(
            Error::conflict(format!("NVRAM file {new} exists on host {}", host.name))
                .hint("restore under another name (--name), or overwrite with --force"),
        );
    }
    Ok(Some((old.clone(), new)))
}

/// Decides every disk's destination and checks them all (names, symlinks, clashes,
/// running domains, existing data without `--force`) before anything is written.
async fn plan_disks<'a>(
    host: &Host,
    job: &Job,
    selected: &[&'a virtkeep_repo::ManifestDisk],
    opts: &RestoreOptions,
    job_id: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Planned<'a>>> {
    let new_name = job.renamed().then_some(job.name.as_str());
    let tag = &job_id[job_id.len().saturating_sub(8)..];
    let mut lv_lists = BTreeMap::new();
    let mut dests = Vec::new();
    for m in selected {
        let dest = match lv_destination(
            host,
            &job.manifest,
            m,
            &opts.storage,
            new_name,
            &mut lv_lists,
            notes,
        )
        .await?
        {
            Some(dest) => dest,
            None => other_destination(m, &opts.storage, new_name),
        };
        let format = match &dest {
            Dest::File(_) if m.spec.backend != virtkeep_repo::Storage::Rbd => m.spec.format.clone(),
            _ => "raw".to_string(),
        };
        if format != "qcow2" && format != "raw" {
            return Err(Error::unsupported(format!(
                "disk {} has format {format}, which restore cannot create",
                m.spec.target
            )));
        }
        guard::check_names(&dest)?;
        dests.push((*m, dest, format));
    }
    guard::check_distinct(dests.iter().map(|(m, d, _)| (m.spec.target.as_str(), d)))?;
    let in_use = guard::InUse::load(host).await?;
    let mut plan = Vec::new();
    for (m, dest, format) in dests {
        in_use.check(host, &m.spec.target, &dest).await?;
        let replaces = check_destination(host, &job.domain, m, &dest, opts).await?;
        let staged = staged_for(&dest, tag);
        plan.push(Planned {
            m,
            dest,
            format,
            staged,
            replaces,
        });
    }
    Ok(plan)
}

/// The destination of a disk that does not go into an LV.
fn other_destination(
    m: &virtkeep_repo::ManifestDisk,
    storage: &Storage,
    new_name: Option<&str>,
) -> Dest {
    let target = &m.spec.target;
    if m.spec.backend == virtkeep_repo::Storage::Lvm {
        let (_, lv) = virtkeep_libvirt::lvm_from_path(&m.spec.source)
            .unwrap_or_else(|| (String::new(), target.clone()));
        let path = destination(storage, &format!("/{lv}.img"), new_name, target, "raw");
        return Dest::File(path);
    }
    if m.spec.backend != virtkeep_repo::Storage::Rbd {
        let path = destination(storage, &m.spec.source, new_name, target, &m.spec.format);
        return Dest::File(path);
    }
    let (pool, image) = crate::rbd::split(&m.spec.source);
    match storage {
        Storage::FileDir(_) => Dest::File(destination(
            storage,
            &format!("/{image}.img"),
            new_name,
            target,
            "raw",
        )),
        other => {
            let pool = if let Storage::Rbd(p) = other {
                p.as_str()
            } else {
                pool
            };
            let image = match new_name {
                Some(n) => format!("{}-{}", safe_component(n), safe_component(target)),
                None => image.to_string(),
            };
            Dest::Rbd(pool.to_string(), image)
        }
    }
}

/// Where a disk is written before it is swapped in.
fn staged_for(dest: &Dest, tag: &str) -> stage::Staged {
    match dest {
        Dest::File(path) => stage::Staged {
            kind: stage::Kind::File,
            temp: stage::temp_file(path, tag),
            dest: path.clone(),
        },
        Dest::Lv(lv) => stage::Staged {
            kind: stage::Kind::Lv,
            temp: format!(
                "{}/{}",
                lv.vg,
                stage::temp_name(&lv.name, tag, crate::lvm::LVM_NAME_MAX)
            ),
            dest: format!("{}/{}", lv.vg, lv.name),
        },
        Dest::Rbd(pool, image) => stage::Staged {
            kind: stage::Kind::Rbd,
            temp: format!("{pool}/{}", stage::temp_name(image, tag, guard::NAME_MAX)),
            dest: format!("{pool}/{image}"),
        },
    }
}

/// Checks one destination on the host; returns whether it exists (and so is replaced,
/// which needs `--force`).
async fn check_destination(
    host: &Host,
    domain: &virtkeep_libvirt::Domain,
    m: &virtkeep_repo::ManifestDisk,
    dest: &Dest,
    opts: &RestoreOptions,
) -> Result<bool> {
    let (exists, hint) = match dest {
        Dest::Lv(lv) => (
            lv.reuse,
            "restore under another name (--name) or into another volume group (--storage lvm:VG), or overwrite it with --force",
        ),
        Dest::File(path) => (
            guard::check_file_on_host(host, path).await?,
            "restore under another name (--name) or into another directory (--storage file:DIR), or overwrite with --force",
        ),
        Dest::Rbd(pool, image) => {
            let ceph = crate::rbd::ceph(host)?;
            if opts.define {
                check_rbd_secret(host, domain, &m.spec.target).await?;
            }
            (
                crate::rbd::image_exists(host, &ceph, pool, image).await?,
                "restore under another name (--name) or into another pool (--storage rbd:POOL), or overwrite with --force",
            )
        }
    };
    if exists && !opts.force {
        return Err(Error::conflict(format!(
            "{} exists on host {}",
            describe_dest(dest),
            host.name
        ))
        .hint(hint));
    }
    Ok(exists)
}

fn describe_dest(dest: &Dest) -> String {
    match dest {
        Dest::File(p) => p.clone(),
        Dest::Lv(lv) => format!("logical volume {}/{}", lv.vg, lv.name),
        Dest::Rbd(pool, image) => format!("RBD image {pool}/{image}"),
    }
}

/// A defined RBD disk that authenticates needs the libvirt secret on the host.
async fn check_rbd_secret(
    host: &Host,
    domain: &virtkeep_libvirt::Domain,
    target: &str,
) -> Result<()> {
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

fn planned_disk(p: &Planned<'_>, bytes_written: u64) -> RestoredDisk {
    let (backend, path) = match &p.dest {
        Dest::File(path) => (virtkeep_repo::Storage::File, path.clone()),
        Dest::Lv(lv) => (
            virtkeep_repo::Storage::Lvm,
            crate::lvm::lv_path(&lv.vg, &lv.name),
        ),
        Dest::Rbd(pool, image) => (virtkeep_repo::Storage::Rbd, format!("rbd:{pool}/{image}")),
    };
    RestoredDisk {
        target: p.m.spec.target.clone(),
        backend,
        path,
        format: p.format.clone(),
        size: p.m.spec.size,
        bytes_written,
    }
}

/// The domain XML changes of a restore: new sources, and for a new name a new identity.
fn rewrite_for(
    job: &Job,
    opts: &RestoreOptions,
    plan: &[Planned<'_>],
    nvram: &Option<(String, String)>,
    notes: &mut Vec<String>,
) -> Rewrite {
    let mut sources = BTreeMap::new();
    for p in plan {
        let source = match &p.dest {
            Dest::Lv(lv) => NewSource::Block {
                dev: crate::lvm::lv_path(&lv.vg, &lv.name),
            },
            Dest::Rbd(pool, image) => NewSource::Rbd {
                pool: pool.clone(),
                image: image.clone(),
                hosts: Vec::new(),
                auth: None,
            },
            Dest::File(path) => NewSource::File {
                path: path.clone(),
                format: p.format.clone(),
            },
        };
        sources.insert(p.m.spec.target.clone(), source);
    }
    // Disks the backup left out would point at the original VM's files: drop them.
    let mut remove = Vec::new();
    for disk in &job.domain.disks {
        let media = matches!(
            disk.device,
            virtkeep_libvirt::DiskDevice::Cdrom | virtkeep_libvirt::DiskDevice::Floppy
        );
        if !sources.contains_key(&disk.target)
            && !media
            && !matches!(disk.source, DiskSource::Empty)
        {
            remove.push(disk.target.clone());
            if opts.define {
                notes.push(format!(
                    "disk {} is not in this restore and was left out of the definition",
                    disk.target
                ));
            }
        }
    }
    let renamed = job.renamed();
    let new_uuid = (renamed || job.existing_uuid.is_none() && opts.name.is_some())
        .then(|| uuid::Uuid::new_v4().to_string());
    Rewrite {
        nvram: nvram.as_ref().map(|(_, new)| new.clone()),
        name: renamed.then(|| job.name.clone()),
        new_uuid,
        regenerate_macs: renamed,
        remove_disks: remove,
        disk_sources: sources,
        drop_backing_store: true,
    }
}

/// What a rewrite changes, one line each (for `--dry-run`).
fn describe_rewrite(rw: &Rewrite) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = &rw.name {
        out.push(format!("name: {n}"));
    }
    if rw.new_uuid.is_some() {
        out.push("uuid: a new random UUID".into());
    }
    if rw.regenerate_macs {
        out.push("interfaces: new MAC addresses".into());
    }
    for (target, source) in &rw.disk_sources {
        let s = match source {
            NewSource::File { path, format } => format!("file {path} ({format})"),
            NewSource::Block { dev } => format!("block device {dev}"),
            NewSource::Rbd { pool, image, .. } => format!("RBD image {pool}/{image}"),
        };
        out.push(format!("disk {target}: source {s}"));
    }
    for target in &rw.remove_disks {
        out.push(format!("disk {target}: removed (not in this restore)"));
    }
    if let Some(n) = &rw.nvram {
        out.push(format!("nvram: {n}"));
    }
    if rw.drop_backing_store {
        out.push("backing stores: dropped (restored disks are flat)".into());
    }
    out
}

/// Defines (and with `--start` starts) the restored domain; returns its UUID and
/// whether it was started.
async fn define_restored(
    host: &Host,
    opts: &RestoreOptions,
    job: &Job,
    nvram: &Option<(String, String)>,
    rw: &Rewrite,
    notes: &mut Vec<String>,
) -> Result<(String, bool)> {
    if let Some((old, new)) = nvram {
        notes.push(copy_nvram(host, old, new).await?);
    }
    let xml = rewrite_domain(&job.manifest.domain_xml, rw)?;
    if let (Some(old), true) = (&job.existing_uuid, opts.force) {
        host.run(&host.virsh().undefine(
            old,
            cmd::UndefineOptions {
                keep_nvram: true,
                ..Default::default()
            },
        ))
        .await?;
        notes.push(format!(
            "replaced the existing definition of {:?}",
            job.name
        ));
    }
    define(host, &job.name, &xml).await?;
    let uuid = crate::vm::Vm::find_uuid(host, &job.name).await?;
    if opts.start {
        host.run(&host.virsh().start(&uuid)).await?;
    }
    Ok((uuid, opts.start))
}

/// What writing a disk needs besides the disk.
struct WriteCtx<'a> {
    host: &'a Host,
    /// The domain name restored to (for progress).
    vm: &'a str,
    repo: &'a virtkeep_repo::Repository,
    id: &'a str,
    owner: &'a (String, String),
    parallel: usize,
    progress: &'a Arc<dyn Progress>,
}

/// Writes every disk under its temporary name, then swaps them all in; a failure
/// before the swap removes the temporaries and leaves every destination as it was.
async fn write_all(
    ctx: &WriteCtx<'_>,
    plan: &[Planned<'_>],
    job_id: &str,
    lock_key: &str,
) -> Result<Vec<RestoredDisk>> {
    let host = ctx.host;
    let job_dir = host
        .job_dir(&format!("{}{job_id}", stage::JOB_PREFIX))
        .await?;
    let staged: Vec<stage::Staged> = plan.iter().map(|p| p.staged.clone()).collect();
    let written = async {
        host.upload(
            &format!("{job_dir}/{}", stage::LOCK_FILE),
            lock_key.as_bytes(),
        )
        .await?;
        stage::record(host, &job_dir, &staged).await?;
        let mut restored = Vec::new();
        for (i, p) in plan.iter().enumerate() {
            ctx.progress.event(Event::Phase {
                vm: ctx.vm.to_string(),
                phase: "restore",
            });
            let n = write_one(ctx, p, &job_dir, i).await?;
            restored.push(planned_disk(p, n));
        }
        Ok::<_, Error>(restored)
    }
    .await;
    let rm_job_dir = RemoteCommand::new("rm").args(["-rf", "--"]).arg(&job_dir);
    let restored = match written {
        Ok(r) => r,
        Err(e) => {
            let _ = stage::remove_all(host, &staged).await;
            let _ = host.run(&rm_job_dir).await;
            return Err(e);
        }
    };
    stage::commit(host, &job_dir, &staged)
        .await
        .map_err(|e| stage::commit_failed(e, &job_dir))?;
    let _ = host.run(&rm_job_dir).await;
    Ok(restored)
}

/// Writes one disk into its temporary; returns the data bytes written.
async fn write_one(
    ctx: &WriteCtx<'_>,
    p: &Planned<'_>,
    job_dir: &str,
    index: usize,
) -> Result<u64> {
    let host = ctx.host;
    let temp = &p.staged.temp;
    match &p.dest {
        Dest::File(_) => {
            create_file(ctx, p.m, temp, &p.format).await?;
            let export =
                NbdExport::start_writable(host, job_dir, index, temp, &p.format, false).await?;
            finish_export(ctx, p.m, export, false).await
        }
        Dest::Lv(lv) => {
            let name = temp.rsplit('/').next().unwrap_or(temp);
            let path =
                crate::lvm::create_lv(host, &lv.vg, name, p.m.spec.size, lv.thin_pool.as_deref())
                    .await?;
            // A new thin LV reads zeros where nothing is written; a thick one may hold
            // old data of freed extents, so its zero runs are written too.
            let zero_fill = lv.thin_pool.is_none();
            let export =
                NbdExport::start_writable(host, job_dir, index, &path, "raw", true).await?;
            finish_export(ctx, p.m, export, zero_fill).await
        }
        Dest::Rbd(_, _) => {
            let ceph = crate::rbd::ceph(host)?;
            let (pool, image) = crate::rbd::split(temp);
            let reader = ctx.repo.disk_reader(ctx.id, &p.m.spec.name).await?;
            ctx.progress.event(Event::DiskStart {
                vm: ctx.vm.to_string(),
                disk: p.m.spec.target.clone(),
                bytes: p.m.spec.size,
            });
            let written = crate::rbd::restore_image(
                host,
                &ceph,
                pool,
                image,
                &reader,
                p.m.spec.size,
                ctx.progress,
                &p.m.spec.target,
            )
            .await?;
            ctx.progress.event(Event::DiskDone {
                disk: p.m.spec.target.clone(),
            });
            Ok(written)
        }
    }
}

/// Writes through a started export and stops it, whatever happened.
async fn finish_export(
    ctx: &WriteCtx<'_>,
    m: &virtkeep_repo::ManifestDisk,
    export: NbdExport,
    zero_fill: bool,
) -> Result<u64> {
    let disk = DiskWrite {
        repo: ctx.repo,
        id: ctx.id,
        m,
        parallel: ctx.parallel,
        zero_fill,
    };
    let res = write_disk(ctx.host, &disk, &export, ctx.progress).await;
    let stopped = export.stop(ctx.host).await;
    let written = res?;
    stopped?;
    Ok(written)
}

/// Creates the temporary image file (its directory too), owned by the qemu user, 0600.
async fn create_file(
    ctx: &WriteCtx<'_>,
    m: &virtkeep_repo::ManifestDisk,
    path: &str,
    format: &str,
) -> Result<()> {
    let host = ctx.host;
    if let Some(i) = path.rfind('/') {
        host.run(
            &RemoteCommand::new("mkdir")
                .arg("-p")
                .arg("--")
                .arg(&path[..i.max(1)]),
        )
        .await?;
    }
    let create = if format == "qcow2" {
        cmd::qemu_img_create_qcow2(path, m.spec.size, None)
    } else {
        cmd::qemu_img_create_raw(path, m.spec.size)
    };
    host.run(&create).await?;
    let (user, group) = ctx.owner;
    host.run(
        &RemoteCommand::new("chown")
            .arg(format!("{user}:{group}"))
            .arg("--")
            .arg(path),
    )
    .await
    .map_err(|e| e.context(format!("giving {path} to {user}:{group}")))?;
    host.run(&RemoteCommand::new("chmod").arg("0600").arg("--").arg(path))
        .await?;
    Ok(())
}

/// Writes the data extents of a backed-up disk through `export`; with `zero_fill` also
/// its zeros (a thick LV or a reused volume holds old data where the disk had holes).
/// One backed-up disk to write.
struct DiskWrite<'a> {
    repo: &'a virtkeep_repo::Repository,
    id: &'a str,
    m: &'a virtkeep_repo::ManifestDisk,
    parallel: usize,
    /// Also write its zeros (the target may hold old data where the disk had holes).
    zero_fill: bool,
}

async fn write_disk(
    host: &Host,
    disk: &DiskWrite<'_>,
    export: &NbdExport,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    let (m, parallel, zero_fill) = (disk.m, disk.parallel, disk.zero_fill);
    let reader = Arc::new(disk.repo.disk_reader(disk.id, &m.spec.name).await?);
    let chunks = reader.index().chunk_count();
    let chunk_size = reader.index().chunk_size;
    let size = m.spec.size;
    progress.event(Event::DiskStart {
        vm: String::new(),
        disk: m.spec.target.clone(),
        bytes: m.spec.size,
    });
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..parallel.max(1) {
        let session = host.data_session(w).await?;
        let client = export.connect(&session, &[]).await?;
        if client.size() < m.spec.size {
            return Err(Error::new(
                ErrorKind::DataPath,
                format!(
                    "the new image is smaller ({}) than the disk ({})",
                    client.size(),
                    m.spec.size
                ),
            ));
        }
        let (reader, next, progress, disk) = (
            reader.clone(),
            next.clone(),
            progress.clone(),
            m.spec.target.clone(),
        );
        workers.spawn(async move {
            let _session = session;
            let job = ChunkWrite {
                client: &client,
                max: u64::from(client.max_block().clamp(64 * 1024, 32 << 20)),
                chunk_size,
                size,
                zero_fill,
            };
            let indices = std::iter::from_fn(|| {
                let i = next.fetch_add(1, Ordering::Relaxed) as u64;
                (i < chunks).then_some(i)
            });
            // Two chunks per connection: one is read and decoded (on another core)
            // while the other's writes are on the wire, so neither waits for the other.
            let mut done = futures::stream::iter(indices)
                .map(|i| {
                    let reader = reader.clone();
                    let read = tokio::spawn(async move { reader.read_chunk(i).await });
                    job.write(i, read)
                })
                .buffer_unordered(CHUNKS_IN_FLIGHT);
            let mut written = 0u64;
            while let Some(n) = done.next().await {
                let n = n?;
                written += n;
                progress.event(Event::DiskBytes {
                    disk: disk.clone(),
                    bytes: n,
                });
            }
            drop(done);
            client.flush().await?;
            let _ = client.disconnect().await;
            Ok::<u64, Error>(written)
        });
    }
    let mut total = 0;
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    format!("restore worker failed: {join}"),
                ));
            }
        }
    }
    progress.event(Event::DiskDone {
        disk: m.spec.target.clone(),
    });
    Ok(total)
}

/// Chunks each NBD connection has in flight during a restore.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Writes one chunk of a restored disk through an NBD connection.
struct ChunkWrite<'a> {
    client: &'a virtkeep_nbd::NbdClient,
    max: u64,
    chunk_size: u64,
    size: u64,
    zero_fill: bool,
}

impl ChunkWrite<'_> {
    /// Waits for chunk `i` from `read`, writes its data extents (and, with
    /// `zero_fill`, its zero runs), returns the data bytes written.
    async fn write(
        &self,
        i: u64,
        read: tokio::task::JoinHandle<virtkeep_repo::Result<Option<bytes::Bytes>>>,
    ) -> Result<u64> {
        let data = read.await.map_err(|join| {
            Error::new(ErrorKind::DataPath, format!("chunk reader failed: {join}"))
        })??;
        let Some(data) = data else {
            if self.zero_fill {
                let len = self
                    .chunk_size
                    .min(self.size.saturating_sub(i * self.chunk_size));
                self.client
                    .write_zeroes(i * self.chunk_size, len as u32, false)
                    .await?;
            }
            return Ok(0);
        };
        let mut writes = Vec::new();
        let mut zeros = Vec::new();
        for extent in virtkeep_repo::split_zero_runs(i * self.chunk_size, data) {
            match extent {
                virtkeep_repo::Extent::Data { offset, bytes } => {
                    let mut off = 0u64;
                    while off < bytes.len() as u64 {
                        let n = (bytes.len() as u64 - off).min(self.max);
                        writes.push((offset + off, bytes.slice(off as usize..(off + n) as usize)));
                        off += n;
                    }
                }
                virtkeep_repo::Extent::Zero { offset, len } if self.zero_fill => {
                    zeros.push((offset, len));
                }
                virtkeep_repo::Extent::Zero { .. } => {}
            }
        }
        let futs = writes.iter().map(|(o, b)| self.client.write(*o, b));
        futures::future::try_join_all(futs).await?;
        let futs = zeros
            .iter()
            .map(|(o, n)| self.client.write_zeroes(*o, *n as u32, false));
        futures::future::try_join_all(futs).await?;
        Ok(writes.iter().map(|(_, b)| b.len() as u64).sum())
    }
}

/// `NAME_VARS.fd` beside the original's store (libvirt's own naming).
fn nvram_path_for(old: &str, name: &str) -> String {
    let dir = match old.rsplit_once('/') {
        Some((d, _)) if !d.is_empty() => d,
        _ => "/var/lib/libvirt/qemu/nvram",
    };
    format!("{dir}/{}_VARS.fd", safe_component(name))
}

/// Copies the original domain's current UEFI variables to `new` (the backup holds
/// none: the variables at the backup instant are not kept); without an original
/// store, libvirt creates `new` from the firmware's template at the first start.
async fn copy_nvram(host: &Host, old: &str, new: &str) -> Result<String> {
    let have_old = host
        .exec(&RemoteCommand::new("test").arg("-f").arg(old))
        .await?
        .status
        == 0;
    if have_old {
        host.run(&RemoteCommand::new("cp").arg("--").arg(old).arg(new))
            .await?;
        Ok(format!(
            "UEFI variables: {new}, copied from the original's current {old}"
        ))
    } else {
        host.run(&RemoteCommand::new("rm").arg("-f").arg("--").arg(new))
            .await?;
        Ok(format!(
            "UEFI variables: {new}, created by libvirt from the firmware template at first start ({old} is gone)"
        ))
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

/// Where a disk goes when it is restored into a logical volume: an LVM disk restored in
/// place (its VG, or `--storage lvm:VG`), or any disk with `--storage lvm:VG`. `None`
/// when the disk does not go into an LV.
#[allow(clippy::too_many_arguments)]
async fn lv_destination(
    host: &Host,
    manifest: &virtkeep_repo::Manifest,
    m: &virtkeep_repo::ManifestDisk,
    storage: &Storage,
    new_name: Option<&str>,
    lv_lists: &mut BTreeMap<String, Vec<virtkeep_libvirt::parse::LvInfo>>,
    notes: &mut Vec<String>,
) -> Result<Option<Dest>> {
    let original = (m.spec.backend == virtkeep_repo::Storage::Lvm)
        .then(|| virtkeep_libvirt::lvm_from_path(&m.spec.source))
        .flatten();
    let vg = match (storage, &original) {
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
    let name = match new_name {
        Some(n) => lv_name(&format!("{n}-{}", m.spec.target)),
        None => lv_name(&base),
    };
    if !lv_lists.contains_key(&vg) {
        lv_lists.insert(vg.clone(), crate::lvm::list_lvs(host, Some(&vg)).await?);
    }
    let lvs = &lv_lists[&vg];
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
    let wanted_pool = manifest.extra["lvm"][&m.spec.target]["thin_pool"].as_str();
    let thin_pool = match wanted_pool {
        Some(pool) if lvs.iter().any(|l| l.name == pool && l.is_thin_pool()) => {
            Some(pool.to_string())
        }
        Some(pool) => {
            notes.push(format!(
                "disk {} was a thin LV in pool {pool}; volume group {vg} has no such thin pool, so it is restored thick",
                m.spec.target
            ));
            None
        }
        None => None,
    };
    Ok(Some(Dest::Lv(LvDest {
        vg,
        name,
        thin_pool,
        reuse: existing.is_some(),
    })))
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
