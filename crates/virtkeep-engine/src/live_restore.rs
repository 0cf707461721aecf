//! `virtkeep restore SNAPSHOT --to HOST --live --name NEW`: the VM runs from the
//! repository within seconds while its data is copied into its own disks.
//!
//! Each disk is a qcow2 file at the place a restore under the new name would choose,
//! created as an overlay over the backup's NBD export ([`crate::live::LiveBackup`]);
//! the domain is defined and started on them (I/O errors pause it), then
//! `virsh blockpull` copies every block into the overlays while the guest runs and
//! writes, and drops the backing link. At the end nothing refers to the node.
//!
//! This first version restores file (qcow2) disks under a new name only, never over
//! an existing domain or file. A failure before the copy is done destroys and
//! undefines the new domain and removes its files: nothing half-restored stays.

use std::time::Instant;

use serde::Serialize;
use virtkeep_libvirt::{Isolation, NewSource, Rewrite, coreutils, isolate_for_boot};

use crate::error::{Error, Result};
use crate::host::{Deadline, Host};
use crate::live::LiveBackup;
use crate::restore::{Storage, check_on_host, check_path, destination};

/// Failpoint: held (until a line on stdin) once the domain runs, before the copy.
pub const HOLD_BEFORE_COPY: &str = "live-restore-running";

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
}

/// A disk of the live-restored domain.
#[derive(Debug, Clone, Serialize)]
pub struct LiveDisk {
    pub target: String,
    pub path: String,
    pub format: String,
}

/// Live-restores backup `id` onto `host` as domain `name` (see the module doc).
pub async fn restore_live(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    name: &str,
    interrupted: impl std::future::Future<Output = ()>,
) -> Result<LiveRestoreResult> {
    let started = Instant::now();
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
    let job = format!("live-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let live = LiveBackup::start(host, repo, id, &job).await?;
    let res = match plan(host, &live, name).await {
        // Only what this run made is rolled back: plan checked that none of it existed.
        // A signal before the copy is done rolls back like any failure.
        Ok(disks) => match tokio::select! {
            r = run(host, &live, name, &disks, started) => r,
            _ = interrupted => Err(Error::new(
                crate::error::ErrorKind::Interrupted,
                format!("interrupted before the copy was done; {name} was removed"),
            )),
        } {
            Ok(times) => Ok((times, disks)),
            Err(e) => {
                roll_back(host, name, &disks).await;
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    live.finish(host).await;
    let ((running, copied), disks) = res?;
    Ok(LiveRestoreResult {
        snapshot: id.to_string(),
        host: host.name.clone(),
        vm: name.to_string(),
        disks,
        time_to_running_secs: running,
        time_to_copied_secs: copied,
    })
}

/// Where each disk goes: the path a restore under `name` would choose; none may exist.
async fn plan(host: &Host, live: &LiveBackup, name: &str) -> Result<Vec<LiveDisk>> {
    let mut out = Vec::new();
    for d in &live.manifest().disks {
        let path = destination(
            &Storage::Original,
            &d.spec.source,
            Some(name),
            &d.spec.target,
            "qcow2",
        );
        if d.spec.backend != virtkeep_repo::Storage::File {
            return Err(Error::unsupported(format!(
                "disk {} was not a file ({}): live restore handles file disks so far",
                d.spec.target, d.spec.source
            )));
        }
        // The directory comes from the backup (untrusted): canonical, no symlink on the
        // way, nothing there yet — the checks of every file restore.
        check_path(&path)?;
        if check_on_host(host, &path).await? {
            return Err(Error::conflict(format!("{path} exists on {}", host.name))
                .hint("choose another --name"));
        }
        let disk = LiveDisk {
            target: d.spec.target.clone(),
            path,
            format: "qcow2".into(),
        };
        out.push(disk);
    }
    Ok(out)
}

/// Overlays, define, start, copy. Returns (time to running, time to copied).
async fn run(
    host: &Host,
    live: &LiveBackup,
    name: &str,
    disks: &[LiveDisk],
    started: Instant,
) -> Result<(f64, f64)> {
    let paths: Vec<(String, String)> = disks
        .iter()
        .map(|d| (d.target.clone(), d.path.clone()))
        .collect();
    live.create_overlays_at(host, &paths).await?;
    let rw = Rewrite {
        name: Some(name.to_string()),
        new_uuid: Some(uuid::Uuid::new_v4().to_string()),
        regenerate_macs: true,
        remove_disks: live.disks_not_backed_up()?,
        disk_sources: paths
            .iter()
            .map(|(t, p)| {
                let src = NewSource::File {
                    path: p.clone(),
                    format: "qcow2".into(),
                };
                (t.clone(), src)
            })
            .collect(),
        drop_backing_store: true,
        ..Rewrite::default()
    };
    let xml = virtkeep_libvirt::rewrite_domain(&live.manifest().domain_xml, &rw)?;
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
    host.run(&host.virsh().define(&xml_path)).await?;
    host.run(&host.virsh().start(name))
        .await
        .map_err(|e| e.context(format!("starting {name} on the backup")))?;
    let running = started.elapsed().as_secs_f64();
    crate::failpoint::hold(HOLD_BEFORE_COPY).await;
    for d in disks {
        host.run_within(
            &host.virsh().blockpull_wait(name, &d.target),
            Deadline::Data,
        )
        .await
        .map_err(|e| e.context(format!("copying {} into {}", d.target, d.path)))?;
    }
    check_detached(host, name, live.dir()).await?;
    Ok((running, started.elapsed().as_secs_f64()))
}

/// After the copy neither the running domain nor its definition may name the job
/// directory (the socket) any more.
async fn check_detached(host: &Host, name: &str, dir: &str) -> Result<()> {
    for inactive in [false, true] {
        let xml = host
            .run_string(&host.virsh().dumpxml(name, inactive))
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

/// Destroys and undefines the new domain and removes its files (best effort).
async fn roll_back(host: &Host, name: &str, disks: &[LiveDisk]) {
    let _ = host.exec(&host.virsh().destroy(name)).await;
    let _ = host
        .exec(&host.virsh().undefine(name, Default::default()))
        .await;
    for d in disks {
        let _ = host.exec(&coreutils::rm_f(&d.path)).await;
    }
}
