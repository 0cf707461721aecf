//! `virtkeep restore SNAPSHOT --to HOST --live --name NEW [--storage …]`: the VM runs
//! from the repository within seconds while its data is copied into its own disks.
//!
//! Each disk goes where a restore under the new name (and with the same `--storage`)
//! would put it (the same choice and checks: [`crate::restore::Place`], the format, no
//! two disks on one destination), never over anything that exists:
//! each destination (a qcow2 or raw file, an LV, an RBD image) is created empty, and
//! the guest first runs on a temporary qcow2 overlay over the backup's NBD export
//! ([`crate::live::LiveBackup`]; beside a file, in the job directory for an LV or RBD
//! image); `virsh blockcopy --reuse-external --transient-job --pivot` later mirrors the
//! overlay (the backup plus what the guest wrote) into the destination and switches the
//! guest to it; the overlay is then removed. A mirror rather than `blockpull` into a
//! qcow2 destination: the stream job reads one 512 KiB piece at a time over NBD+SSH and
//! copied at 0.60 x the throughput of a normal restore, the mirror keeps several reads
//! in flight and copied at 0.97 x (bench/live.sh, same run each).
//!   (libvirt 9 refuses a block copy of a persistent domain without
//!   `--transient-job`; with it the pivot updates the persistent definition too.)
//!
//! The domain is defined and started on the overlays (I/O errors pause it), so it runs
//! within seconds, while the copy goes on. At the end nothing refers to the node.
//! Before anything is created the job directory gets the run's record
//! ([`crate::live_record`]): if the node dies after the start, `restore --resume JOB`
//! (`live_resume.rs`) finishes the copy from it.
//! A failure before the copy is done destroys and undefines the new domain and removes
//! what this run created: nothing half-restored stays. Only that: every destination and
//! overlay is created exclusively (an image created by someone else meanwhile makes the
//! restore fail, untouched), the domain gets a fresh UUID (libvirt refuses to define it
//! when a domain of that name appeared meanwhile) and the roll-back destroys and
//! undefines that UUID, never a name.
//!
//! Like `restore --define` under a new name, the domain runs with the emulator libvirt
//! reports on the host, and the backup's file chardevs become `pty` without logs: the
//! new domain never writes into the source VM's log files
//! ([`crate::define::fit_to_host`]).

use std::time::Instant;

use serde::Serialize;
use virtkeep_libvirt::{Isolation, NewSource, Rewrite, coreutils, isolate_for_boot};

use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;
use crate::live::LiveBackup;
use crate::live_copy::{CopyDisk, Link, Mirror};
use crate::progress::{Event, Progress};
use crate::restore::{
    Created, Destination, DiskCheck, Place, Storage, check_distinct, check_format, check_space,
};

/// Failpoint: held (until a line on stdin) once the domain runs, before the copy.
pub const HOLD_BEFORE_COPY: &str = "live-restore-running";
/// Failpoint: held once the destinations are chosen and checked, before any is created.
pub const HOLD_PLANNED: &str = "live-restore-planned";
/// Failpoint: held once every destination and overlay is created, before the define.
pub const HOLD_CREATED: &str = "live-restore-created";
/// A live restore's job directory and host lock are named this and 12 hex digits.
pub const JOB_PREFIX: &str = "live-";
/// In the job directory: the new domain's UUID, written before it is defined.
pub const UUID_FILE: &str = "uuid";
/// In the job directory: written right before the domain is started. Once it exists
/// the guest may have run and written into its overlays: `cleanup` never removes it.
pub const STARTED_FILE: &str = "started";
/// In the job directory: what the run created outside it (destinations, overlays beside
/// files), one per line with its identity ([`Created::line`]), each added right after
/// its exclusive create succeeded. A job killed before its domain started leaves them:
/// `cleanup` removes those still identical to what was created, and names the others.
pub const CREATED_FILE: &str = "created";

/// The outcome of a live restore (stable `--json`: additions only).
#[derive(Debug, Clone, Serialize)]
pub struct LiveRestoreResult {
    pub snapshot: String,
    pub host: String,
    /// The new domain.
    pub vm: String,
    pub disks: Vec<LiveDisk>,
    /// From the start of the command until the domain was running.
    pub time_to_running_secs: f64,
    /// From the start of the command until every disk was copied.
    pub time_to_copied_secs: f64,
    /// How often the SSH connection was lost during the copy and made again.
    pub reconnects: u32,
    /// Bytes the node's NBD server sent the host for the guest's reads and the copy
    /// (holes the copy skips are not read: about the backup's data, not the disks'
    /// virtual size).
    pub served_bytes: u64,
    /// Whether this run finished a live restore whose node had died
    /// (`restore --resume JOB`): the times then count from the resume's start.
    pub resumed: bool,
}

/// A disk of the live-restored domain.
#[derive(Debug, Clone, Serialize)]
pub struct LiveDisk {
    pub target: String,
    pub path: String,
    pub format: String,
}

/// Where a live restore puts the new domain: its name, and where its disks go; and
/// where it reports: the phases `running` (the domain runs on the overlays) and
/// `copying`, and the copy's bytes as its block jobs report them.
#[derive(Clone, Copy)]
pub struct LiveTarget<'a> {
    pub name: &'a str,
    pub storage: &'a Storage,
    pub progress: &'a dyn Progress,
}

/// What [`run`] reports to, and when the restore started.
#[derive(Clone, Copy)]
struct Watch<'a> {
    started: Instant,
    progress: &'a dyn Progress,
}

/// Live-restores backup `id` onto `host` as domain `to.name` (see the module doc).
pub async fn restore_live(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    to: LiveTarget<'_>,
    interrupted: impl std::future::Future<Output = ()>,
) -> Result<LiveRestoreResult> {
    let started = Instant::now();
    let name = to.name;
    if name.is_empty() || name.len() > 200 || name.contains('/') || name.starts_with('-') {
        return Err(Error::config(format!(
            "--name {name:?}: not a usable domain name"
        )));
    }
    if host.exec(&host.virsh().domuuid(name)).await?.status == 0 {
        return Err(
            Error::conflict(format!("a domain named {name} exists on {}", host.name))
                .hint("live restore makes a new domain: choose another --name"),
        );
    }
    let job = format!(
        "{JOB_PREFIX}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // Held until the end, taken before the job directory exists: `cleanup` touches a
    // live restore's leftovers only once this lock is gone (its node killed).
    let lock = host.lock_vm(&job, 0).await?;
    let mut live = match LiveBackup::start(host, repo, id, &job).await {
        Ok(live) => live,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    let mut link = Link::new(host, lock, &job);
    let uuid = uuid::Uuid::new_v4().to_string();
    let res = match plan_and_record(host, repo, &live, to, id).await {
        // Only what this run made is rolled back: `made` records, per disk, what was
        // created (exclusively), and the domain goes by its new UUID.
        // A signal before the copy is done rolls back like any failure.
        Ok(disks) => {
            let mut made = Vec::new();
            let watch = Watch {
                started,
                progress: to.progress,
            };
            match tokio::select! {
                r = run(&mut link, &mut live, (name, &uuid), &disks, &mut made, watch) => r,
                _ = interrupted => Err(Error::new(
                    ErrorKind::Interrupted,
                    format!("interrupted before the copy was done; {name} was removed"),
                )),
            } {
                Ok(times) => Ok((times, disks)),
                // The link is gone and the guest ran: nothing is removed.
                Err(e) if e.kind == ErrorKind::Unfinished => {
                    Err(left_as_is(e, host, name, live.dir()))
                }
                Err(e) => {
                    roll_back(link.host(), &uuid, &disks, &made).await;
                    Err(e)
                }
            }
        }
        Err(e) => Err(e),
    };
    let served_bytes = live.served_bytes();
    if matches!(&res, Err(e) if e.kind == ErrorKind::Unfinished) {
        live.abandon(link.host()).await;
    } else {
        live.finish(link.host()).await;
    }
    let reconnects = link.reconnects;
    link.release().await;
    let ((running, copied), disks) = res?;
    Ok(LiveRestoreResult {
        snapshot: id.to_string(),
        host: host.name.clone(),
        vm: name.to_string(),
        disks: disks.into_iter().map(|d| d.report).collect(),
        time_to_running_secs: running,
        time_to_copied_secs: copied,
        reconnects,
        served_bytes,
        resumed: false,
    })
}

/// [`plan`] of a new run, then the job's record of it
/// ([`crate::live_record::JobRecord`]) in the job directory, for a resume after the
/// node died.
async fn plan_and_record(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    live: &LiveBackup,
    to: LiveTarget<'_>,
    backup: &str,
) -> Result<Vec<Planned>> {
    let job = live
        .dir()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let disks = plan(host, live, to, &job, PlanFor::NewRun(repo)).await?;
    let rec = crate::live_record::JobRecord {
        backup: backup.to_string(),
        repository: repo.id().to_string(),
        name: to.name.to_string(),
        storage: to.storage.spec().unwrap_or_default(),
        disks: disks.iter().map(Planned::recorded).collect(),
    };
    rec.write(host, live.dir()).await?;
    Ok(disks)
}

/// The error of a live restore whose link did not come back: what state the domain is
/// in and what to do.
fn left_as_is(e: Error, host: &Host, name: &str, dir: &str) -> Error {
    let h = &host.name;
    let resume = crate::live_record::resume_command(dir.rsplit('/').next().unwrap_or(dir), h);
    Error::new(
        ErrorKind::Unfinished,
        format!(
            "{e}. {name} is left on {h} as it is, not rolled back: running or paused (it pauses on an I/O error at its next read of data not yet copied), on overlays over the backup (job directory {dir}) whose server is gone"
        ),
    )
    .hint(format!(
        "nothing was removed (the guest's writes are only in its overlays). Once {h} is reachable, `{resume}` serves the backup again and finishes the copy (`virtkeep cleanup {h}` reports the job as left as is); or keep the guest as it is, or destroy and undefine {name} and remove its disks and {dir}, then run `restore --live` again or restore normally"
    ))
}

/// One disk of the plan: where it ends, and how its data gets there.
#[derive(Debug)]
pub(crate) struct Planned {
    pub(crate) report: LiveDisk,
    dest: Box<dyn Destination>,
    /// The qcow2 overlay over the export the guest runs on until `blockcopy` mirrored
    /// it into the destination (created empty).
    pub(crate) overlay: String,
}

impl Planned {
    /// The image the guest starts on.
    fn overlay(&self) -> &str {
        &self.overlay
    }

    /// The disk as the job's record has it.
    pub(crate) fn recorded(&self) -> crate::live_record::RecordedDisk {
        crate::live_record::RecordedDisk {
            target: self.report.target.clone(),
            format: self.report.format.clone(),
            path: self.report.path.clone(),
            overlay: self.overlay.clone(),
        }
    }
}

/// What [`plan`] is for.
#[derive(Clone, Copy)]
pub(crate) enum PlanFor<'a> {
    /// A new live restore from this repository: no destination may exist, and each
    /// must have room for the backup's data, as for a restore (the overlays only take
    /// what the guest writes during the copy).
    NewRun(&'a virtkeep_repo::Repository),
    /// A resume: the destinations exist, made by the job.
    Resume,
}

/// Where each disk goes: where a restore under `to.name` with `to.storage` would put
/// it, with the checks of what the plan is `made_for`.
pub(crate) async fn plan(
    host: &Host,
    live: &LiveBackup,
    to: LiveTarget<'_>,
    job: &str,
    made_for: PlanFor<'_>,
) -> Result<Vec<Planned>> {
    let manifest = live.manifest();
    let domain = virtkeep_libvirt::parse_domain(&manifest.domain_xml)?;
    let placed = place_all(host, manifest, to).await?;
    if let PlanFor::NewRun(repo) = made_for {
        let written: Vec<_> = placed.iter().map(|(m, d)| (*m, d.as_ref())).collect();
        check_space(host, repo, &manifest.id, &written).await?;
    }
    let mut out = Vec::new();
    for (i, (m, dest)) in placed.into_iter().enumerate() {
        // On the host: no symlink, the Ceph secret, … and nothing there yet.
        let check = DiskCheck {
            m,
            domain: &domain,
            define: true,
        };
        if dest.check(host, &check).await? && matches!(made_for, PlanFor::NewRun(_)) {
            return Err(
                Error::conflict(format!("{} exists on {}", dest.describe(), host.name))
                    .hint("live restore never overwrites: choose another --name or --storage"),
            );
        }
        let format = dest.format(m);
        let (_, path) = dest.report();
        let overlay = match dest.new_source(&format) {
            NewSource::File { path, .. } => crate::restore::stage_temp_file(&path, job),
            NewSource::Block { .. } | NewSource::Rbd { .. } => {
                format!("{}/disk{i}.qcow2", live.dir())
            }
        };
        let report = LiveDisk {
            target: m.spec.target.clone(),
            path,
            format,
        };
        out.push(Planned {
            report,
            dest,
            overlay,
        });
    }
    Ok(out)
}

/// Every disk's destination, with the checks that need no host: the place comes from
/// the backup (untrusted) and `--storage`, so the lexical checks of every restore
/// (canonical path, safe LVM/RBD names), a format it can create, no two disks on one
/// destination.
async fn place_all<'m>(
    host: &Host,
    manifest: &'m virtkeep_repo::Manifest,
    to: LiveTarget<'_>,
) -> Result<Vec<(&'m virtkeep_repo::ManifestDisk, Box<dyn Destination>)>> {
    let mut notes = Vec::new();
    let mut place = Place {
        host,
        manifest,
        storage: to.storage,
        new_name: Some(to.name),
        lv_lists: Default::default(),
        notes: &mut notes,
    };
    let mut placed = Vec::new();
    for m in &manifest.disks {
        let dest = place.disk(m).await?;
        dest.check_names()?;
        check_format(m, &dest.format(m))?;
        placed.push((m, dest));
    }
    check_distinct(
        placed
            .iter()
            .map(|(m, d)| (m.spec.target.as_str(), d.key())),
    )?;
    for note in notes {
        tracing::info!(host = %host.name, "{note}");
    }
    Ok(placed)
}

/// What this run created of one disk (all the roll-back removes).
#[derive(Debug, Default, Clone, Copy)]
struct Made {
    dest: bool,
    overlay: bool,
}

/// Destinations, overlays, define, start, copy. Returns (time to running, time to
/// copied); `made` records what was created, disk by disk. The domain is `(name, uuid)`
/// and is handled by its UUID once defined.
async fn run(
    link: &mut Link<'_>,
    live: &mut LiveBackup,
    (name, uuid): (&str, &str),
    disks: &[Planned],
    made: &mut Vec<Made>,
    watch: Watch<'_>,
) -> Result<(f64, f64)> {
    create_and_start(link.host(), live, (name, uuid), disks, made).await?;
    let running = watch.started.elapsed().as_secs_f64();
    let vm = name.to_string();
    watch.progress.event(Event::Phase {
        vm,
        phase: "running",
    });
    crate::failpoint::hold(HOLD_BEFORE_COPY).await;
    let finals = final_xml(live, disks)?;
    let dir = live.dir().to_string();
    let copies = link
        .attempt(live, async |h: &Host| {
            stage_copies(h, &dir, &finals, disks).await
        })
        .await?;
    crate::live_copy::copy(link, live, (name, uuid), &copies, watch.progress).await?;
    link.attempt(live, async |h: &Host| {
        check_detached(h, (name, uuid), &dir).await
    })
    .await?;
    Ok((running, watch.started.elapsed().as_secs_f64()))
}

/// Creates the destinations and overlays, records them, defines and starts the domain.
async fn create_and_start(
    host: &Host,
    live: &LiveBackup,
    (name, uuid): (&str, &str),
    disks: &[Planned],
    made: &mut Vec<Made>,
) -> Result<()> {
    crate::failpoint::hold(HOLD_PLANNED).await;
    create_all(host, live, disks, made).await?;
    crate::failpoint::hold(HOLD_CREATED).await;
    define_and_start(host, live, (name, uuid), disks).await
}

/// What the copy needs of each disk; a mirrored disk's destination `<disk>` (from the
/// XML as a restore would define it) is uploaded into the job directory `dir`.
pub(crate) async fn stage_copies(
    host: &Host,
    dir: &str,
    finals: &str,
    disks: &[Planned],
) -> Result<Vec<CopyDisk>> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let disk_xml = virtkeep_libvirt::disk_element(finals, &d.report.target)?;
        let xml_path = format!("{dir}/dest{i}.xml");
        host.upload(&xml_path, disk_xml.as_bytes()).await?;
        out.push(CopyDisk {
            target: d.report.target.clone(),
            path: d.report.path.clone(),
            mirror: Mirror {
                overlay: d.overlay.clone(),
                xml_path,
            },
            running: false,
        });
    }
    Ok(out)
}

/// Creates every destination (empty; a file's directory too, as a restore makes it for
/// `--storage file:DIR`) and overlay, each exclusively, and
/// records in `made` and in the job's [`CREATED_FILE`] (with its identity, for
/// `cleanup`) what was created.
async fn create_all(
    host: &Host,
    live: &LiveBackup,
    disks: &[Planned],
    made: &mut Vec<Made>,
) -> Result<()> {
    let owner = host.qemu_owner().await?;
    let mut created = Vec::new();
    for d in disks {
        made.push(Made::default());
        d.dest
            .create_empty(host, manifest_disk(live, d)?, &owner)
            .await?;
        made.last_mut().expect("pushed").dest = true;
        let src = d.dest.new_source(&d.report.format);
        record_created(host, live.dir(), &mut created, &src).await?;
        let at = [(d.report.target.clone(), d.overlay().to_string())];
        live.create_overlays_at(host, &at).await?;
        made.last_mut().expect("pushed").overlay = true;
        let zeros = live.mark_holes(host, &d.report.target, d.overlay()).await?;
        tracing::debug!(target = %d.report.target, zeros, "holes marked in the overlay");
        if !d.overlay().starts_with(&format!("{}/", live.dir())) {
            let src = NewSource::File {
                path: d.overlay().to_string(),
                format: "qcow2".into(),
            };
            record_created(host, live.dir(), &mut created, &src).await?;
        }
    }
    Ok(())
}

/// Adds what was just created at `src`, with its identity, to the job's
/// [`CREATED_FILE`] (rewritten whole: a handful of lines).
async fn record_created(
    host: &Host,
    dir: &str,
    created: &mut Vec<String>,
    src: &NewSource,
) -> Result<()> {
    created.push(Created::identify(host, src).await?.line());
    let text = created.join("\n") + "\n";
    host.upload(&format!("{dir}/{CREATED_FILE}"), text.as_bytes())
        .await
}

fn manifest_disk<'a>(live: &'a LiveBackup, d: &Planned) -> Result<&'a virtkeep_repo::ManifestDisk> {
    live.manifest()
        .disks
        .iter()
        .find(|m| m.spec.target == d.report.target)
        .ok_or_else(|| Error::domain(format!("no disk {} in the backup", d.report.target)))
}

/// Defines the new domain on the overlays (isolated from nothing but the node's export
/// as backing; errors pause it) and starts it.
async fn define_and_start(
    host: &Host,
    live: &LiveBackup,
    (name, uuid): (&str, &str),
    disks: &[Planned],
) -> Result<()> {
    let mut rw = Rewrite {
        name: Some(name.to_string()),
        new_uuid: Some(uuid.to_string()),
        regenerate_macs: true,
        remove_disks: live.disks_not_backed_up()?,
        disk_sources: disks
            .iter()
            .map(|d| {
                let src = NewSource::File {
                    path: d.overlay().to_string(),
                    format: "qcow2".into(),
                };
                (d.report.target.clone(), src)
            })
            .collect(),
        drop_backing_store: true,
        ..Rewrite::default()
    };
    let backup_xml = &live.manifest().domain_xml;
    if let Some(note) = crate::define::fit_to_host(host, backup_xml, &mut rw).await? {
        tracing::info!(host = %host.name, "{note}");
    }
    let xml = virtkeep_libvirt::rewrite_domain(backup_xml, &rw)?;
    let iso = Isolation {
        serial_log: None,
        nbd_backing: live.nbd_backing(),
        links_up: true,
        stop_on_reset: false,
        agent_channel: false,
    };
    let xml = isolate_for_boot(&xml, &iso)?;
    let xml_path = format!("{}/domain.xml", live.dir());
    host.upload(&xml_path, xml.as_bytes()).await?;
    // For `cleanup` after a killed node: which domain is this job's.
    host.upload(&format!("{}/{UUID_FILE}", live.dir()), uuid.as_bytes())
        .await?;
    // libvirt refuses the definition when a domain named `name` appeared since the
    // check (its UUID is not ours): no existing domain is ever redefined.
    host.run(&host.virsh().define(&xml_path))
        .await
        .map_err(|e| e.context(format!("defining {name}")))?;
    host.upload(&format!("{}/{STARTED_FILE}", live.dir()), b"")
        .await?;
    host.run(&host.virsh().start(uuid))
        .await
        .map_err(|e| e.context(format!("starting {name} on the backup")))?;
    Ok(())
}

/// The backup's domain XML with every disk at its final place, as a restore under the
/// new name would define it: the `<disk>` elements `blockcopy` mirrors into.
pub(crate) fn final_xml(live: &LiveBackup, disks: &[Planned]) -> Result<String> {
    let rw = Rewrite {
        remove_disks: live.disks_not_backed_up()?,
        disk_sources: disks
            .iter()
            .map(|d| (d.report.target.clone(), d.dest.new_source(&d.report.format)))
            .collect(),
        drop_backing_store: true,
        ..Rewrite::default()
    };
    Ok(virtkeep_libvirt::rewrite_domain(
        &live.manifest().domain_xml,
        &rw,
    )?)
}

/// After the copy neither the running domain nor its definition may name the job
/// directory (the socket) any more.
pub(crate) async fn check_detached(
    host: &Host,
    (name, uuid): (&str, &str),
    dir: &str,
) -> Result<()> {
    for inactive in [false, true] {
        let xml = host
            .run_string(&host.virsh().dumpxml(uuid, inactive))
            .await?;
        if xml.contains(dir) || xml.contains("protocol='nbd'") {
            return Err(Error::domain(format!(
                "{name} still refers to the backup's NBD export after the copy{}",
                if inactive { " (in its definition)" } else { "" }
            )));
        }
    }
    Ok(())
}

/// Destroys and undefines the domain with this run's UUID (none when its definition
/// was refused) and removes the overlays and destinations this run created (best
/// effort).
async fn roll_back(host: &Host, uuid: &str, disks: &[Planned], made: &[Made]) {
    let _ = host.exec(&host.virsh().destroy(uuid)).await;
    let _ = host
        .exec(&host.virsh().undefine(uuid, Default::default()))
        .await;
    for (d, m) in disks.iter().zip(made) {
        if m.overlay {
            let _ = host.exec(&coreutils::rm_f(d.overlay())).await;
        }
        if m.dest
            && let Err(e) = d.dest.remove_created(host).await
        {
            tracing::warn!(host = %host.name, dest = %d.dest.describe(), error = %e, "removing a live restore's destination");
        }
    }
}
