//! A backup served to a host while it is in use there (boot verification, live
//! restore): the node's read-only NBD server over the repository
//! (`virtkeep_files::backup_server`), reached by QEMU on the host through a unix
//! socket the host's sshd listens on for us (remote forwarding over the job's SSH
//! connection: no port is opened anywhere), in a private job directory that also
//! holds the disks' qcow2 overlays.
//!
//! [`LiveBackup::finish`] stops serving, cancels the forward and removes the job
//! directory; if the node dies instead, the forward ends with its SSH connection and
//! the directory is under `/run` (gone at the host's next boot, or by `cleanup`; a
//! live restore's is served again by `restore --resume`: [`LiveBackup::reopen`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use virtkeep_libvirt::{NbdBacking, coreutils, parse_domain, qemu_img};
use virtkeep_repo::{DiskViewOptions, Manifest};
use virtkeep_ssh::UnixForward;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{Deadline, Host};

/// The deadline of asking the host's sshd to listen, and to stop.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// A backup being served to a host (see the module documentation).
pub struct LiveBackup {
    manifest: Manifest,
    dir: String,
    socket: String,
    server: Arc<Server>,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<UnixForward>>,
}

impl LiveBackup {
    /// Serves backup `id` to `host` on `<job dir>/nbd.sock`, a socket QEMU may open.
    pub async fn start(
        host: &Host,
        repo: &virtkeep_repo::Repository,
        id: &str,
        job: &str,
    ) -> Result<LiveBackup> {
        let (manifest, server) = open(repo, id).await?;
        let dir = forward_dir(host, job).await?;
        let socket = format!("{dir}/nbd.sock");
        match forward(host, &socket, server.clone()).await {
            Ok((stop, serving)) => Ok(LiveBackup {
                manifest,
                dir,
                socket,
                server,
                stop: Some(stop),
                serving: Some(serving),
            }),
            Err(e) => {
                let _ = host.exec(&coreutils::rm_rf(&dir)).await;
                Err(e)
            }
        }
    }

    /// Backup `id` for the existing job directory `dir` of a job whose node died, not
    /// served yet: [`LiveBackup::reforward`] serves it on the socket path its overlays
    /// name.
    pub async fn reopen(
        repo: &virtkeep_repo::Repository,
        id: &str,
        dir: &str,
    ) -> Result<LiveBackup> {
        let (manifest, server) = open(repo, id).await?;
        Ok(LiveBackup {
            manifest,
            dir: dir.to_string(),
            socket: format!("{dir}/nbd.sock"),
            server,
            stop: None,
            serving: None,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The private job directory on the host.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The NBD base of every backed-up disk, by target.
    pub fn nbd_backing(&self) -> BTreeMap<String, NbdBacking> {
        self.manifest
            .disks
            .iter()
            .map(|d| {
                let b = NbdBacking {
                    socket: self.socket.clone(),
                    export: d.spec.name.clone(),
                };
                (d.spec.target.clone(), b)
            })
            .collect()
    }

    /// Targets of the backup's domain XML with no data in the backup (CD-ROMs,
    /// excluded disks): the domain booted from the backup goes without them.
    pub fn disks_not_backed_up(&self) -> Result<Vec<String>> {
        let dom = parse_domain(&self.manifest.domain_xml)?;
        Ok(dom
            .disks
            .iter()
            .map(|d| d.target.clone())
            .filter(|t| !self.manifest.disks.iter().any(|m| &m.spec.target == t))
            .collect())
    }

    /// A qcow2 overlay over each disk's export, in the job directory: (target, path).
    pub async fn create_overlays(&self, host: &Host) -> Result<Vec<(String, String)>> {
        let paths: Vec<(String, String)> = (0..self.manifest.disks.len())
            .map(|i| {
                let t = self.manifest.disks[i].spec.target.clone();
                (t, format!("{}/disk{i}.qcow2", self.dir))
            })
            .collect();
        self.create_overlays_at(host, &paths).await?;
        Ok(paths)
    }

    /// A qcow2 overlay over the export of the disk with each target, at its path.
    pub async fn create_overlays_at(&self, host: &Host, paths: &[(String, String)]) -> Result<()> {
        for (target, path) in paths {
            let d = self
                .manifest
                .disks
                .iter()
                .find(|d| &d.spec.target == target)
                .ok_or_else(|| Error::domain(format!("no disk {target} in the backup")))?;
            let cmd = qemu_img::create_nbd_overlay(path, d.spec.size, &self.socket, &d.spec.name)
                .ok_or_else(|| {
                Error::unsupported(format!(
                    "disk name {:?} cannot be an NBD export name in a backing URI",
                    d.spec.name
                ))
            })?;
            host.run(&cmd)
                .await
                .map_err(|e| e.context(format!("creating the overlay of {target}")))?;
        }
        Ok(())
    }

    /// Marks the ranges the backup knows are zeros (its zero chunks) as zero clusters
    /// in the qcow2 overlay at `path` of the disk with `target`, before anything uses
    /// it: QEMU's block jobs then find them allocated (as zeros) in the overlay and
    /// never read them over NBD — `blockcopy` writes zeros into the destination without
    /// reading them. Returns the bytes marked.
    pub async fn mark_holes(&self, host: &Host, target: &str, path: &str) -> Result<u64> {
        let d = self
            .manifest
            .disks
            .iter()
            .find(|d| d.spec.target == target)
            .ok_or_else(|| Error::domain(format!("no disk {target} in the backup")))?;
        let Some(export) = self.server.export(&d.spec.name) else {
            return Ok(0);
        };
        // The index is the repository's (untrusted): the ranges are clamped to the
        // overlay's size, aligned to its clusters, and bounded in number.
        let size = d.spec.size.min(export.0.size());
        let ranges = hole_ranges(&export.0.allocation(0, size), size);
        // Writes qcow2 metadata in proportion to the disk's size (an L2 table per GiB
        // marked): the deadline of commands that move a disk's data.
        for cmd in qemu_img::zero_clusters(path, &ranges) {
            host.run_within(&cmd, Deadline::Data)
                .await
                .map_err(|e| e.context(format!("marking the holes of {target} in its overlay")))?;
        }
        Ok(ranges.iter().map(|r| r.1).sum())
    }

    /// Bytes the NBD server has answered READ requests for (data and holes alike).
    pub fn served_bytes(&self) -> u64 {
        self.server.served_bytes()
    }

    /// After the job's SSH connection was lost (or its node died): serves the backup
    /// again on the same socket path over `host`, a new connection (the old forward
    /// ended with the old connection; sshd leaves its socket file, which is removed
    /// first: with `StreamLocalBindUnlink no`, sshd's default, the new listener could
    /// not bind; with `yes` sshd would unlink it itself). QEMU's NBD client connects to
    /// it again by itself.
    pub async fn reforward(&mut self, host: &Host) -> Result<()> {
        self.stop_serving(host).await;
        host.run(&coreutils::rm_f(&self.socket)).await?;
        let (stop, serving) = forward(host, &self.socket, self.server.clone()).await?;
        self.stop = Some(stop);
        self.serving = Some(serving);
        Ok(())
    }

    /// Stops serving and cancels the forward (if its connection is still there).
    async fn stop_serving(&mut self, host: &Host) {
        drop(self.stop.take());
        if let Some(serving) = self.serving.take() {
            match serving.await {
                Ok(fwd) => {
                    if let Err(e) = fwd.close(FORWARD_TIMEOUT).await {
                        tracing::warn!(host = %host.name, error = %e, "cancelling the forward");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the NBD forward task failed"),
            }
        }
    }

    /// Stops serving but keeps the job directory: a domain that ran still uses its
    /// overlays (left for the user, reported by `cleanup`).
    pub async fn abandon(mut self, host: &Host) {
        self.stop_serving(host).await;
    }

    /// Stops serving, cancels the forward and removes the job directory. Failures are
    /// logged: the forward ends with the connection, the directory with `cleanup`.
    pub async fn finish(mut self, host: &Host) {
        self.stop_serving(host).await;
        if let Err(e) = host.run(&coreutils::rm_rf(&self.dir)).await {
            tracing::warn!(host = %host.name, dir = %self.dir, error = %e, "removing the job directory");
        }
    }
}

type Server = virtkeep_nbd::NbdServer<virtkeep_files::DiskExport>;

/// Backup `id`'s manifest and an NBD server over it, for a domain to boot: not of a
/// UEFI domain, no QEMU passthrough.
async fn open(repo: &virtkeep_repo::Repository, id: &str) -> Result<(Manifest, Arc<Server>)> {
    let manifest = repo.manifest(id).await?;
    if parse_domain(&manifest.domain_xml)?.nvram.is_some() {
        return Err(Error::unsupported(format!(
            "backup {id} is of a UEFI domain (it has an NVRAM store): booting it from the repository is not supported yet"
        )));
    }
    // Booting the backup's XML runs what it says: QEMU passthrough is refused, as a
    // restore with --define refuses it without --allow-qemu-passthrough.
    crate::restore::check_passthrough(&manifest, false)?;
    let server = virtkeep_files::backup_server(repo, id, DiskViewOptions::default())
        .await
        .map_err(|e| Error::new(ErrorKind::Repository, format!("serving backup {id}: {e}")))?;
    Ok((manifest, Arc::new(server)))
}

/// Most hole ranges marked per disk (the longest kept): a bound on the `qemu-io`
/// invocations an index full of small holes could cause (~2000 ranges each).
pub const MAX_HOLE_RANGES: usize = 16 * 1024;

/// The zero ranges of `alloc` inside `0..size`, shrunk to whole overlay clusters
/// (a partial cluster is left to the copy), at most [`MAX_HOLE_RANGES`] (the longest),
/// in order of offset.
fn hole_ranges(alloc: &[virtkeep_repo::Allocation], size: u64) -> Vec<(u64, u64)> {
    let c = qemu_img::OVERLAY_CLUSTER;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for a in alloc.iter().filter(|a| a.zero) {
        let end = a.offset.saturating_add(a.len).min(size);
        match out.last_mut() {
            // Adjacent zero runs (a view answers in pieces) merge before aligning.
            Some(last) if last.0 + last.1 == a.offset => last.1 = end.max(last.0) - last.0,
            _ => out.push((a.offset, end.saturating_sub(a.offset))),
        }
    }
    let mut out: Vec<(u64, u64)> = out
        .into_iter()
        .filter_map(|(off, len)| {
            let start = off.checked_next_multiple_of(c)?;
            let end = ((off + len) / c) * c;
            (end > start).then(|| (start, end - start))
        })
        .collect();
    if out.len() > MAX_HOLE_RANGES {
        out.sort_by_key(|r| std::cmp::Reverse(r.1));
        out.truncate(MAX_HOLE_RANGES);
        out.sort();
    }
    out
}

/// The job directory, writable by the login user: sshd creates forwarded sockets as
/// that user, which with sudo is not root.
async fn forward_dir(host: &Host, job: &str) -> Result<String> {
    let dir = host.job_dir(job).await?;
    if host.config.sudo
        && let Err(e) = host.run(&coreutils::chown(&host.config.user, &dir)).await
    {
        let _ = host.exec(&coreutils::rm_rf(&dir)).await;
        return Err(e);
    }
    Ok(dir)
}

/// For `host check`: can the host's sshd listen on a socket of a job directory for us,
/// and can that socket be handed to QEMU's user? Leaves nothing behind.
pub async fn probe_forwarding(host: &Host) -> (bool, String) {
    let job = format!("check-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let dir = match forward_dir(host, &job).await {
        Ok(d) => d,
        Err(e) => return (false, e.to_string()),
    };
    let socket = format!("{dir}/probe.sock");
    let res = match host
        .session()
        .forward_unix_socket(&socket, FORWARD_TIMEOUT)
        .await
    {
        Ok(fwd) => {
            let owner = host.qemu_owner().await.map(|(u, g)| format!("{u}:{g}"));
            let chowned = match owner {
                Ok(o) => host.run(&coreutils::chown(&o, &socket)).await.map(|_| o),
                Err(e) => Err(e),
            };
            let _ = fwd.close(FORWARD_TIMEOUT).await;
            match chowned {
                Ok(o) => (
                    true,
                    format!("sshd listens on unix sockets for virtkeep; QEMU ({o}) may open them"),
                ),
                Err(e) => (false, e.to_string()),
            }
        }
        Err(e) => (false, e.to_string()),
    };
    let _ = host.exec(&coreutils::rm_rf(&dir)).await;
    res
}

/// Has the host's sshd listen on `socket`, lets QEMU's user open it, and serves every
/// connection to it until the returned sender is dropped (the task then returns the
/// forward, for closing).
async fn forward(
    host: &Host,
    socket: &str,
    server: Arc<Server>,
) -> Result<(oneshot::Sender<()>, JoinHandle<UnixForward>)> {
    let fwd = host
        .session()
        .forward_unix_socket(socket, FORWARD_TIMEOUT)
        .await?;
    // sshd creates the socket owner-only for the login user; QEMU runs as its own.
    let owner = host.qemu_owner().await.map(|(u, g)| format!("{u}:{g}"));
    let chowned = match owner {
        Ok(o) => host.run(&coreutils::chown(&o, socket)).await,
        Err(e) => Err(e),
    };
    if let Err(e) = chowned {
        let _ = fwd.close(FORWARD_TIMEOUT).await;
        return Err(e.context("letting QEMU open the forwarded NBD socket"));
    }
    let (stop, mut stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let mut fwd = fwd;
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                c = fwd.accept() => match c {
                    Some(stream) => {
                        let s = server.clone();
                        conns.spawn(async move {
                            if let Err(e) = s.serve_connection(stream).await {
                                tracing::debug!(error = %e, "NBD connection from the host ended");
                            }
                        });
                    }
                    None => break,
                },
                _ = &mut stopped => break,
            }
        }
        conns.abort_all();
        fwd
    });
    Ok((stop, serving))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkeep_repo::Allocation;

    fn a(offset: u64, len: u64, zero: bool) -> Allocation {
        Allocation { offset, len, zero }
    }

    #[test]
    fn holes_are_whole_clusters_inside_the_disk() {
        const M: u64 = 1 << 20;
        let alloc = [
            a(0, M, false),
            a(M, 4 * M, true),
            a(5 * M, 100, false),
            a(5 * M + 100, 3 * M, true),
            a(8 * M + 100, 10, true),
            a(8 * M + 110, M, false),
            a(9 * M + 110, 1 << 40, true),
        ];
        let r = hole_ranges(&alloc, 20 * M);
        let c = qemu_img::OVERLAY_CLUSTER;
        assert_eq!(r[0], (M, 4 * M));
        // Starts rounded up, ends rounded down, merged runs kept whole.
        assert_eq!(r[1], (5 * M + c, 3 * M - c));
        // Clamped to the disk's size.
        assert_eq!(r[2], (9 * M + c, 11 * M - c));
        assert_eq!(r.len(), 3);
        assert!(hole_ranges(&[a(0, c - 1, true)], M).is_empty());
    }

    #[test]
    fn too_many_holes_keep_the_longest() {
        let c = qemu_img::OVERLAY_CLUSTER;
        let n = MAX_HOLE_RANGES as u64 + 10;
        let mut alloc = Vec::new();
        for i in 0..n {
            let len = if i < 10 { 4 * c } else { c };
            alloc.push(a(i * 8 * c, len, true));
            alloc.push(a(i * 8 * c + len, 8 * c - len, false));
        }
        let r = hole_ranges(&alloc, n * 8 * c);
        assert_eq!(r.len(), MAX_HOLE_RANGES);
        assert_eq!(r.iter().filter(|x| x.1 == 4 * c).count(), 10);
        assert!(r.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
