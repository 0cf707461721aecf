//! `virtkeep restore SNAPSHOT --to HOST`: recreate every disk in its format, write only
//! the data extents through qemu-nbd over SSH, rewrite the saved XML and define it.

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Each disk at the path it had (or beside it, under the new name).
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
            Some(("file", dir)) if dir.starts_with('/') => Ok(Storage::FileDir(dir.to_string())),
            Some(("rbd", pool)) if !pool.is_empty() && !pool.contains('/') => {
                Ok(Storage::Rbd(pool.to_string()))
            }
            Some(("lvm", vg)) if crate::lvm::valid_new_lv_name(vg) => {
                Ok(Storage::Lvm(vg.to_string()))
            }
            _ => Err(Error::config(format!(
                "storage {s:?}: expected file:/ABSOLUTE/DIR, rbd:POOL or lvm:VG"
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
#[derive(Debug, Clone)]
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
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub target: String,
    /// `file`, `rbd` or `lvm`.
    pub backend: String,
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

pub async fn restore(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreResult> {
    let started = Instant::now();
    let manifest = repo.manifest(&opts.snapshot).await?;
    let domain = parse_domain(&manifest.domain_xml)?;
    let name = opts.name.clone().unwrap_or_else(|| domain.name.clone());
    let renamed = opts.name.as_deref().is_some_and(|n| n != domain.name);
    let mut notes = Vec::new();

    for d in &opts.disks {
        if !manifest.disks.iter().any(|m| &m.spec.target == d) {
            return Err(Error::config(format!(
                "backup {} has no disk {d}",
                manifest.id
            )));
        }
    }
    let selected: Vec<_> = manifest
        .disks
        .iter()
        .filter(|m| opts.disks.is_empty() || opts.disks.contains(&m.spec.target))
        .collect();

    // Refuse to clobber anything before touching the host.
    let existing = host.exec(&host.virsh().domuuid(&name)).await?;
    let existing_uuid = (existing.status == 0)
        .then(|| String::from_utf8_lossy(&existing.stdout).trim().to_string());
    if opts.define {
        if let Some(uuid) = &existing_uuid {
            if !opts.force {
                return Err(Error::conflict(format!(
                    "a domain named {name:?} exists on host {}",
                    host.name
                ))
                .hint("restore under another name with --name NEW, or replace it with --force"));
            }
            let state = host.run_string(&host.virsh().domstate(uuid)).await?;
            if state.trim() != "shut off" {
                return Err(Error::conflict(format!(
                    "domain {name:?} is {}: it must be shut off to be replaced",
                    state.trim()
                )));
            }
        }
    } else if let Some(uuid) = &existing_uuid {
        let state = host.run_string(&host.virsh().domstate(uuid)).await?;
        if state.trim() != "shut off" && !renamed && opts.storage == Storage::Original {
            return Err(Error::conflict(format!(
                "domain {name:?} is {}: its disks cannot be overwritten while it runs",
                state.trim()
            ))
            .hint("shut it down first, or restore to other files with --name or --storage"));
        }
    }
    // A renamed copy gets a UEFI variable store of its own: two domains on one NVRAM
    // file overwrite each other's boot entries.
    let nvram = match (&domain.nvram, renamed && opts.define) {
        (Some(old), true) => {
            let new = nvram_path_for(old, &name);
            if !opts.force
                && host
                    .exec(&RemoteCommand::new("test").arg("-e").arg(&new))
                    .await?
                    .status
                    == 0
            {
                return Err(Error::conflict(format!(
                    "NVRAM file {new} exists on host {}",
                    host.name
                ))
                .hint("restore under another name (--name), or overwrite with --force"));
            }
            Some((old.clone(), new))
        }
        _ => None,
    };
    let new_name = if renamed { Some(name.as_str()) } else { None };
    let mut plan = Vec::new();
    let mut lv_lists: BTreeMap<String, Vec<virtkeep_libvirt::parse::LvInfo>> = BTreeMap::new();
    for m in &selected {
        let dest = if let Some(dest) = lv_destination(
            host,
            &manifest,
            m,
            &opts.storage,
            new_name,
            &mut lv_lists,
            &mut notes,
        )
        .await?
        {
            dest
        } else if m.spec.backend == "lvm" {
            let (_, lv) = virtkeep_libvirt::lvm_from_path(&m.spec.source)
                .unwrap_or_else(|| (String::new(), m.spec.target.clone()));
            Dest::File(destination(
                &opts.storage,
                &format!("/{lv}.img"),
                new_name,
                &m.spec.target,
                "raw",
            ))
        } else if m.spec.backend == "rbd" {
            let (pool, image) = crate::rbd::split(&m.spec.source);
            match &opts.storage {
                Storage::FileDir(_) => Dest::File(destination(
                    &opts.storage,
                    &format!("/{image}.img"),
                    new_name,
                    &m.spec.target,
                    "raw",
                )),
                other => {
                    let pool = if let Storage::Rbd(p) = other {
                        p.as_str()
                    } else {
                        pool
                    };
                    let image = match new_name {
                        Some(n) => {
                            format!("{}-{}", safe_component(n), safe_component(&m.spec.target))
                        }
                        None => image.to_string(),
                    };
                    Dest::Rbd(pool.to_string(), image)
                }
            }
        } else {
            Dest::File(destination(
                &opts.storage,
                &m.spec.source,
                new_name,
                &m.spec.target,
                &m.spec.format,
            ))
        };
        match &dest {
            Dest::Lv(lv) => {
                if lv.reuse && !opts.force {
                    return Err(Error::conflict(format!(
                        "logical volume {}/{} exists on host {}",
                        lv.vg, lv.name, host.name
                    ))
                    .hint("restore under another name (--name) or into another volume group (--storage lvm:VG), or overwrite it with --force"));
                }
            }
            Dest::File(path) => {
                if !opts.force
                    && host
                        .exec(&RemoteCommand::new("test").arg("-e").arg(path))
                        .await?
                        .status
                        == 0
                {
                    return Err(Error::conflict(format!("{path} exists on host {}", host.name))
                        .hint("restore under another name (--name) or into another directory (--storage file:DIR), or overwrite with --force"));
                }
            }
            Dest::Rbd(pool, image) => {
                let ceph = crate::rbd::ceph(host)?;
                if crate::rbd::image_exists(host, &ceph, pool, image).await? {
                    if !opts.force {
                        return Err(Error::conflict(format!("RBD image {pool}/{image} exists")).hint(
                            "restore under another name (--name) or into another pool (--storage rbd:POOL), or overwrite with --force",
                        ));
                    }
                    host.run(&ceph.rbd(&["snap", "purge"]).arg(format!("{pool}/{image}")))
                        .await?;
                    host.run(&ceph.rm(pool, image)).await?;
                }
                if opts.define {
                    let secret = domain
                        .disks
                        .iter()
                        .find(|d| d.target == m.spec.target)
                        .and_then(|d| match &d.source {
                            DiskSource::Network { auth: Some(a), .. } => a.secret_uuid.clone(),
                            _ => None,
                        });
                    if let Some(uuid) = secret
                        && !crate::rbd::secret_exists(host, &uuid).await?
                    {
                        {
                            return Err(Error::conflict(format!(
                                "disk {} authenticates with libvirt secret {uuid}, which host {} does not have",
                                m.spec.target, host.name
                            ))
                            .hint(format!(
                                "create it on the host: virsh secret-define a <secret ephemeral='no' private='yes'><uuid>{uuid}</uuid><usage type='ceph'><name>client.ID secret</name></usage></secret>, then virsh secret-set-value {uuid} --file KEYFILE"
                            )));
                        }
                    }
                }
            }
        }
        plan.push((*m, dest));
    }

    let (user, group) = match &opts.owner {
        Some(o) => o.clone(),
        None => host.qemu_owner().await?,
    };
    let job_dir = host
        .job_dir(&format!("restore-{}", crate::job_id()))
        .await?;
    let mut restored = Vec::new();
    let res = async {
        for (i, (m, dest)) in plan.iter().enumerate() {
            progress.event(Event::Phase {
                vm: name.clone(),
                phase: "restore",
            });
            match dest {
                Dest::File(path) => {
                    let format = if m.spec.backend == "rbd" {
                        "raw"
                    } else {
                        m.spec.format.as_str()
                    };
                    let written = restore_disk(
                        host,
                        repo,
                        &manifest.id,
                        m,
                        path,
                        format,
                        &user,
                        &group,
                        &job_dir,
                        i,
                        opts.parallel,
                        &progress,
                    )
                    .await?;
                    restored.push(RestoredDisk {
                        target: m.spec.target.clone(),
                        backend: "file".into(),
                        path: path.clone(),
                        format: format.to_string(),
                        size: m.spec.size,
                        bytes_written: written,
                    });
                }
                Dest::Lv(lv) => {
                    let (path, written) = restore_lv(
                        host,
                        repo,
                        &manifest.id,
                        m,
                        lv,
                        &job_dir,
                        i,
                        opts.parallel,
                        &progress,
                    )
                    .await?;
                    restored.push(RestoredDisk {
                        target: m.spec.target.clone(),
                        backend: "lvm".into(),
                        path,
                        format: "raw".into(),
                        size: m.spec.size,
                        bytes_written: written,
                    });
                }
                Dest::Rbd(pool, image) => {
                    let ceph = crate::rbd::ceph(host)?;
                    let reader = repo.disk_reader(&manifest.id, &m.spec.name).await?;
                    progress.event(Event::DiskStart {
                        vm: name.clone(),
                        disk: m.spec.target.clone(),
                        bytes: m.spec.size,
                    });
                    let written = crate::rbd::restore_image(
                        host,
                        &ceph,
                        pool,
                        image,
                        &reader,
                        m.spec.size,
                        &progress,
                        &m.spec.target,
                    )
                    .await?;
                    progress.event(Event::DiskDone {
                        disk: m.spec.target.clone(),
                    });
                    restored.push(RestoredDisk {
                        target: m.spec.target.clone(),
                        backend: "rbd".into(),
                        path: format!("rbd:{pool}/{image}"),
                        format: "raw".into(),
                        size: m.spec.size,
                        bytes_written: written,
                    });
                }
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let _ = host
        .run(&RemoteCommand::new("rm").arg("-rf").arg("--").arg(&job_dir))
        .await;
    res?;

    let mut uuid = None;
    let mut started_vm = false;
    if opts.define {
        let mut sources = BTreeMap::new();
        for d in &restored {
            let source = match d.path.strip_prefix("rbd:") {
                _ if d.backend == "lvm" => NewSource::Block {
                    dev: d.path.clone(),
                },
                Some(spec) => {
                    let (pool, image) = crate::rbd::split(spec);
                    NewSource::Rbd {
                        pool: pool.to_string(),
                        image: image.to_string(),
                        hosts: Vec::new(),
                        auth: None,
                    }
                }
                None => NewSource::File {
                    path: d.path.clone(),
                    format: d.format.clone(),
                },
            };
            sources.insert(d.target.clone(), source);
        }
        // Disks the backup left out would point at the original VM's files: drop them.
        let mut remove = Vec::new();
        for disk in &domain.disks {
            let kept = sources.contains_key(&disk.target);
            let media = matches!(
                disk.device,
                virtkeep_libvirt::DiskDevice::Cdrom | virtkeep_libvirt::DiskDevice::Floppy
            );
            if !kept && !media && !matches!(disk.source, DiskSource::Empty) {
                remove.push(disk.target.clone());
                notes.push(format!(
                    "disk {} is not in this restore and was left out of the definition",
                    disk.target
                ));
            }
        }
        let new_uuid = if renamed || existing_uuid.is_none() && opts.name.is_some() {
            Some(uuid::Uuid::new_v4().to_string())
        } else {
            None
        };
        if let Some((old, new)) = &nvram {
            notes.push(copy_nvram(host, old, new).await?);
        }
        let rw = Rewrite {
            nvram: nvram.as_ref().map(|(_, new)| new.clone()),
            name: renamed.then(|| name.clone()),
            new_uuid: new_uuid.clone(),
            regenerate_macs: renamed,
            remove_disks: remove,
            disk_sources: sources,
            drop_backing_store: true,
        };
        let xml = rewrite_domain(&manifest.domain_xml, &rw)?;
        if let (Some(old), true) = (&existing_uuid, opts.force) {
            host.run(&host.virsh().undefine(
                old,
                cmd::UndefineOptions {
                    keep_nvram: true,
                    ..Default::default()
                },
            ))
            .await?;
            notes.push(format!("replaced the existing definition of {name:?}"));
        }
        define(host, &name, &xml).await?;
        let found = host.run_string(&host.virsh().domuuid(&name)).await?;
        uuid = Some(found.trim().to_string());
        if opts.start
            && let Some(u) = &uuid
        {
            {
                host.run(&host.virsh().start(u)).await?;
                started_vm = true;
            }
        }
    }
    Ok(RestoreResult {
        snapshot: manifest.id.clone(),
        host: host.name.clone(),
        vm: name,
        uuid,
        disks: restored,
        defined: opts.define,
        started: started_vm,
        notes,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn restore_disk(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    m: &virtkeep_repo::ManifestDisk,
    path: &str,
    format: &str,
    user: &str,
    group: &str,
    job_dir: &str,
    index: usize,
    parallel: usize,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    if format != "qcow2" && format != "raw" {
        return Err(Error::unsupported(format!(
            "disk {} has format {format}, which restore cannot create",
            m.spec.target
        )));
    }
    if let Some(i) = path.rfind('/') {
        host.run(
            &RemoteCommand::new("mkdir")
                .arg("-p")
                .arg("--")
                .arg(&path[..i.max(1)]),
        )
        .await?;
    }
    host.run(&RemoteCommand::new("rm").arg("-f").arg("--").arg(path))
        .await?;
    let create = if format == "qcow2" {
        cmd::qemu_img_create_qcow2(path, m.spec.size, None)
    } else {
        cmd::qemu_img_create_raw(path, m.spec.size)
    };
    host.run(&create).await?;
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

    let export = NbdExport::start_writable(host, job_dir, index, path, format, false).await?;
    let res = write_disk(host, repo, id, m, &export, parallel, false, progress).await;
    let stopped = export.stop(host).await;
    let written = res?;
    stopped?;
    Ok(written)
}

/// Writes the data extents of a backed-up disk through `export`; with `zero_fill` also
/// its zeros (a thick LV or a reused volume holds old data where the disk had holes).
#[allow(clippy::too_many_arguments)]
async fn write_disk(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    m: &virtkeep_repo::ManifestDisk,
    export: &NbdExport,
    parallel: usize,
    zero_fill: bool,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    let reader = Arc::new(repo.disk_reader(id, &m.spec.name).await?);
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
    let original = (m.spec.backend == "lvm")
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

/// Creates the LV (or reuses an existing one under `--force`) and writes the disk into
/// it through qemu-nbd on the block device. A new thin LV reads zeros where nothing is
/// written; a thick or reused one gets its zero runs written too.
#[allow(clippy::too_many_arguments)]
async fn restore_lv(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    m: &virtkeep_repo::ManifestDisk,
    lv: &LvDest,
    job_dir: &str,
    index: usize,
    parallel: usize,
    progress: &Arc<dyn Progress>,
) -> Result<(String, u64)> {
    let path = if lv.reuse {
        crate::lvm::lv_path(&lv.vg, &lv.name)
    } else {
        crate::lvm::create_lv(host, &lv.vg, &lv.name, m.spec.size, lv.thin_pool.as_deref()).await?
    };
    let zero_fill = lv.reuse || lv.thin_pool.is_none();
    let export = NbdExport::start_writable(host, job_dir, index, &path, "raw", true).await?;
    let res = write_disk(host, repo, id, m, &export, parallel, zero_fill, progress).await;
    let stopped = export.stop(host).await;
    let written = res?;
    stopped?;
    Ok((path, written))
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
