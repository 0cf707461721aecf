//! The copy phase of `restore --live` (`live_restore.rs`), and how it survives a
//! lost link.
//!
//! Every disk's block job is started without waiting (`virsh blockcopy
//! --reuse-external --transient-job`) and followed by short polls: the job on the host
//! (`virsh blockjob --info`) and the disk in the live XML (a mirror is `ready='yes'` and
//! then pivoted, a pivoted disk no longer names its overlay). No command waits on the
//! host for a whole copy, so nothing of a lost connection goes on by itself there.
//!
//! When the job's SSH connection is lost, the host's sshd closes the forwarded NBD
//! socket: the guest's next read of data not yet copied fails into a pause
//! (`rerror_policy=stop`), a job reading then ends without completing. The run then
//! reconnects (bounded retries within [`reconnect_window`]), takes the job's host lock
//! again and serves the backup on the same socket path the overlays name
//! ([`LiveBackup::reforward`]). QEMU's NBD client (QEMU 7.2, `reconnect-delay` 0, the
//! only value libvirt 9.0 can set) fails requests while it is disconnected but retries
//! connecting in the background (1, 2, 4, 8, 16 s apart) once a request found it
//! disconnected; so within that window after the reconnect the run resumes a guest
//! paused on an I/O error and restarts a job that ended without completing (the
//! mirror copies again), until every disk is copied. If reconnecting fails within the
//! window, nothing is removed: the domain stays on the host (its writes are only in its
//! overlays) and the error ([`ErrorKind::Unfinished`]) says so.

use std::time::{Duration, Instant};

use virtkeep_libvirt::coreutils;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{Deadline, Host, VmLock};
use crate::live::LiveBackup;
use crate::progress::{Event, Progress};

/// Failpoint: held (until a line on stdin) once every disk's block job runs.
pub const HOLD_COPYING: &str = "live-restore-copying";
/// How long a lost link may take to come back, in seconds (default
/// [`DEFAULT_RECONNECT_SECS`]).
pub const RECONNECT_ENV: &str = "VIRTKEEP_LIVE_RECONNECT_SECS";
pub const DEFAULT_RECONNECT_SECS: u64 = 120;
/// For tests: the block jobs start limited to this many bytes per second, and the limit
/// is lifted once [`HOLD_COPYING`] is passed (so a test's cut lands mid-copy).
pub const THROTTLE_ENV: &str = "VIRTKEEP_LIVE_COPY_BYTES_PER_SEC";
/// How often the block jobs are looked at.
const POLL: Duration = Duration::from_millis(500);
/// Reconnects within one command's attempt before giving up on the link.
const MAX_RECOVERIES: u32 = 5;

/// How long a lost link may take to come back (and, after it did, how long jobs are
/// restarted and the guest resumed while QEMU's NBD client reconnects).
pub fn reconnect_window() -> Duration {
    let secs = std::env::var(RECONNECT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RECONNECT_SECS);
    Duration::from_secs(secs.max(1))
}

fn throttle() -> Option<u64> {
    std::env::var(THROTTLE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
}

/// The job's connection to the host (the one it started on, or the one it made after
/// losing that) and the job's host lock, held over it.
pub(crate) struct Link<'a> {
    first: &'a Host,
    current: Option<Host>,
    lock: Option<VmLock>,
    job: String,
    /// When the link last came back.
    recovered: Option<Instant>,
    pub reconnects: u32,
}

impl<'a> Link<'a> {
    pub fn new(first: &'a Host, lock: VmLock, job: &str) -> Link<'a> {
        Link {
            first,
            current: None,
            lock: Some(lock),
            job: job.to_string(),
            recovered: None,
            reconnects: 0,
        }
    }

    pub fn host(&self) -> &Host {
        self.current.as_ref().unwrap_or(self.first)
    }

    pub async fn release(self) {
        if let Some(lock) = self.lock {
            lock.release().await;
        }
    }

    /// For a run that serves the backup again after its node died: the guest and the
    /// jobs are handled as in the window after a reconnect, from now.
    pub fn settle_from_now(&mut self) {
        self.recovered = Some(Instant::now());
    }

    /// Within the window after the link came back.
    fn settling(&self) -> bool {
        self.recovered
            .is_some_and(|t| t.elapsed() < reconnect_window())
    }

    fn is_link_error(&self, e: &Error) -> bool {
        e.kind == ErrorKind::Connection || self.host().session().is_closed()
    }

    /// Runs `f` on the current connection; when that is lost, reconnects and runs it
    /// again.
    pub(crate) async fn attempt<T>(
        &mut self,
        live: &mut LiveBackup,
        f: impl AsyncFn(&Host) -> Result<T>,
    ) -> Result<T> {
        let mut n = 0;
        loop {
            match f(self.host()).await {
                Err(e) if self.is_link_error(&e) && n < MAX_RECOVERIES => {
                    n += 1;
                    self.recover(live, e).await?;
                }
                r => return r,
            }
        }
    }

    /// Reconnects, takes the job lock again and serves the backup again, retrying
    /// within [`reconnect_window`]; fails with [`ErrorKind::Unfinished`].
    async fn recover(&mut self, live: &mut LiveBackup, lost: Error) -> Result<()> {
        let host = self.host().name.clone();
        let window = reconnect_window();
        tracing::warn!(host = %host, error = %lost, "lost the connection during the live restore's copy; reconnecting");
        let until = Instant::now() + window;
        let mut pause = Duration::from_secs(1);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, self.try_recover(live)).await {
                Ok(Ok(())) => {
                    tracing::warn!(host = %host, "reconnected; the copy goes on");
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => Error::new(ErrorKind::Connection, "timed out"),
            };
            if Instant::now() + pause >= until {
                return Err(Error::new(
                    ErrorKind::Unfinished,
                    format!(
                        "lost the connection to host {host} during the copy ({lost}) and could not reconnect within {} s: {err}",
                        window.as_secs()
                    ),
                ));
            }
            tracing::info!(host = %host, error = %err, "reconnecting failed; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    async fn try_recover(&mut self, live: &mut LiveBackup) -> Result<()> {
        let host = self.first.reconnect().await?;
        // The old lock went with the old connection (its `cat` saw EOF); a `cleanup`
        // meanwhile holds it for moments only.
        let lock = host.lock_vm(&self.job, 10).await?;
        live.reforward(&host).await?;
        if let Some(old) = self.lock.replace(lock) {
            drop(old);
        }
        self.current = Some(host);
        self.recovered = Some(Instant::now());
        self.reconnects += 1;
        Ok(())
    }
}

/// One disk to copy.
#[derive(Debug)]
pub(crate) struct CopyDisk {
    pub target: String,
    /// The destination, for messages.
    pub path: String,
    /// The overlay the guest runs on and the file with the destination's `<disk>`.
    pub mirror: Mirror,
    /// Its block job runs already (left by a run whose node died): not started again.
    pub running: bool,
}

#[derive(Debug)]
pub(crate) struct Mirror {
    pub overlay: String,
    pub xml_path: String,
}

/// Where a disk's copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Copying,
    /// A mirror ready to pivot.
    Ready,
    Done,
    /// No job, and not copied: the job failed.
    Ended,
}

/// Copies every disk (see the module doc); the guest `name` runs as `uuid` on `live`.
/// Reports the phase `copying` and the block jobs' bytes to `progress`.
pub(crate) async fn copy(
    link: &mut Link<'_>,
    live: &mut LiveBackup,
    (name, uuid): (&str, &str),
    disks: &[CopyDisk],
    progress: &dyn Progress,
) -> Result<()> {
    let limit = throttle();
    for d in disks.iter().filter(|d| !d.running) {
        link.attempt(live, async |h| start(h, uuid, d, limit).await)
            .await?;
    }
    progress.event(Event::Phase {
        vm: name.to_string(),
        phase: "copying",
    });
    crate::failpoint::hold(HOLD_COPYING).await;
    if limit.is_some() {
        for d in disks {
            let cmd = |h: &Host| h.virsh().blockjob_bandwidth(uuid, &d.target, 0);
            let _ = link.attempt(live, async |h| h.exec(&cmd(h)).await).await?;
        }
    }
    let mut counted = Counted::new(name, disks.len(), progress);
    follow(link, live, uuid, disks, &mut counted).await?;
    // A guest that paused on the link's loss retries its request on its own disk now.
    if link.reconnects > 0 {
        link.attempt(live, async |h| resume_if_io_paused(h, uuid).await)
            .await?;
    }
    Ok(())
}

/// Polls the jobs until every disk is copied: pivots ready mirrors, restarts jobs that
/// ended while the link was settling, resumes a guest paused on an I/O error then.
async fn follow(
    link: &mut Link<'_>,
    live: &mut LiveBackup,
    uuid: &str,
    disks: &[CopyDisk],
    counted: &mut Counted<'_>,
) -> Result<()> {
    let started = Instant::now();
    let limit = link.host().deadline(Deadline::Data);
    let mut done = vec![false; disks.len()];
    let mut ended = vec![0u32; disks.len()];
    while done.iter().any(|d| !d) {
        if started.elapsed() > limit {
            return Err(Error::new(
                ErrorKind::Remote,
                format!("the copy did not finish within {} s", limit.as_secs()),
            )
            .hint("raise data_command_timeout_secs for this host"));
        }
        let states = link
            .attempt(live, async |h| states(h, uuid, disks, &done).await)
            .await?;
        for (i, s, bytes) in states {
            let d = &disks[i];
            counted.saw(i, &d.target, bytes);
            match s {
                State::Copying => ended[i] = 0,
                State::Done => {
                    done[i] = true;
                    counted.done(i, &d.target);
                    remove_overlay(link.host(), &d.mirror.overlay).await;
                }
                State::Ready => {
                    let cmd = |h: &Host| h.virsh().blockjob_pivot(uuid, &d.target);
                    let out = link.attempt(live, async |h| h.exec(&cmd(h)).await).await?;
                    if out.status != 0 {
                        tracing::info!(target = %d.target, stderr = %String::from_utf8_lossy(&out.stderr), "pivot refused; polling on");
                    }
                }
                State::Ended => {
                    ended[i] += 1;
                    // Seen twice: not a job that just completed while the XML lagged.
                    if ended[i] >= 2 {
                        restart(link, live, uuid, d).await?;
                        ended[i] = 0;
                    }
                }
            }
        }
        if link.settling() {
            link.attempt(live, async |h| resume_if_io_paused(h, uuid).await)
                .await?;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// A job that ended without completing is started again while the link settles (its
/// reads failed while QEMU's NBD client was disconnected); otherwise the copy failed.
async fn restart(
    link: &mut Link<'_>,
    live: &mut LiveBackup,
    uuid: &str,
    d: &CopyDisk,
) -> Result<()> {
    if !link.settling() {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "copying {} into {}: the block job ended without completing",
                d.target, d.path
            ),
        )
        .hint("the domain's QEMU log on the host (/var/log/libvirt/qemu/) has the reason"));
    }
    tracing::info!(target = %d.target, "the block job ended while the link was down; starting it again");
    let res = link
        .attempt(live, async |h| start(h, uuid, d, None).await)
        .await;
    if let Err(e) = res {
        if e.kind == ErrorKind::Unfinished {
            return Err(e);
        }
        tracing::info!(target = %d.target, error = %e, "restarting the block job failed; trying again");
    }
    Ok(())
}

/// Starts the disk's block job.
async fn start(host: &Host, uuid: &str, d: &CopyDisk, limit: Option<u64>) -> Result<()> {
    let cmd = host
        .virsh()
        .blockcopy(uuid, &d.target, &d.mirror.xml_path, limit);
    host.run(&cmd)
        .await
        .map(|_| ())
        .map_err(|e| e.context(format!("copying {} into {}", d.target, d.path)))
}

/// The state of every disk not yet done, by index, with its job's (copied, total)
/// bytes while it runs.
async fn states(
    host: &Host,
    uuid: &str,
    disks: &[CopyDisk],
    done: &[bool],
) -> Result<Vec<(usize, State, Option<(u64, u64)>)>> {
    let xml = host.run_string(&host.virsh().dumpxml(uuid, false)).await?;
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if done[i] {
            continue;
        }
        let disk = virtkeep_libvirt::disk_element(&xml, &d.target)?;
        let info = host
            .run_string(&host.virsh().blockjob_info(uuid, &d.target))
            .await?;
        let bytes = job_bytes(&info);
        out.push((i, state(d, &disk, !info.trim().is_empty()), bytes));
    }
    Ok(out)
}

/// A disk's state from its live `<disk>` element and whether a job runs on it.
fn state(d: &CopyDisk, disk: &str, job: bool) -> State {
    let has = |a: &str, v: &str| {
        disk.contains(&format!("{a}='{v}'")) || disk.contains(&format!("{a}=\"{v}\""))
    };
    if !disk.contains(&d.mirror.overlay) {
        State::Done
    } else if disk.contains("<mirror") && has("ready", "yes") {
        State::Ready
    } else if job {
        State::Copying
    } else {
        State::Ended
    }
}

/// `cur` and `end` of `virsh blockjob --info --raw` (` cur=N` and ` end=N` lines).
fn job_bytes(info: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        info.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .find_map(|v| v.strip_prefix('=')?.trim().parse::<u64>().ok())
    };
    Some((field("cur")?, field("end")?))
}

/// The copy's bytes as the block jobs report them, turned into progress events: a
/// disk's `DiskStart` (its job's total) when first seen, then what its job copied since.
/// A mirror's total grows with what the guest writes meanwhile; only growth is counted.
struct Counted<'a> {
    vm: &'a str,
    progress: &'a dyn Progress,
    /// Per disk: (total announced, copied reported).
    seen: Vec<(u64, u64)>,
}

impl<'a> Counted<'a> {
    fn new(vm: &'a str, disks: usize, progress: &'a dyn Progress) -> Counted<'a> {
        Counted {
            vm,
            progress,
            seen: vec![(0, 0); disks],
        }
    }

    fn saw(&mut self, i: usize, target: &str, bytes: Option<(u64, u64)>) {
        let Some((cur, end)) = bytes else { return };
        let (total, copied) = &mut self.seen[i];
        if end > *total {
            self.progress.event(Event::DiskStart {
                vm: self.vm.to_string(),
                disk: target.to_string(),
                bytes: end - *total,
            });
            *total = end;
        }
        if cur > *copied {
            self.progress.event(Event::DiskBytes {
                disk: target.to_string(),
                bytes: cur - *copied,
            });
            *copied = cur;
        }
    }

    fn done(&mut self, i: usize, target: &str) {
        let (total, copied) = self.seen[i];
        if total > copied {
            self.saw(i, target, Some((total, total)));
        }
        self.progress.event(Event::DiskDone {
            disk: target.to_string(),
        });
    }
}

/// `virsh resume` when the guest is paused on an I/O error.
pub(crate) async fn resume_if_io_paused(host: &Host, uuid: &str) -> Result<()> {
    let state = host.run_string(&host.virsh().domstate_reason(uuid)).await?;
    if state.starts_with("paused") && state.contains("I/O error") {
        tracing::warn!(host = %host.name, "the guest paused on an I/O error while the link was down; resuming it");
        host.run(&host.virsh().resume(uuid)).await?;
    }
    Ok(())
}

/// The VM runs on its destination now: a leftover overlay is not worth failing a fully
/// copied VM for.
async fn remove_overlay(host: &Host, overlay: &str) {
    if let Err(e) = host.run(&coreutils::rm_f(overlay)).await {
        tracing::warn!(host = %host.name, overlay, error = %e, "removing a pivoted overlay");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> CopyDisk {
        CopyDisk {
            target: "vda".into(),
            path: "/d/new-vda.img".into(),
            mirror: Mirror {
                overlay: "/d/.new-vda.img.vkrestore-1".into(),
                xml_path: "/run/virtkeep/jobs/live-1/dest0.xml".into(),
            },
            running: false,
        }
    }

    #[test]
    fn block_job_bytes_from_raw_info() {
        let info = " type=Block Copy\n bandwidth=0\n cur=1048576\n end=4194304\n";
        assert_eq!(job_bytes(info), Some((1 << 20, 4 << 20)));
        assert_eq!(job_bytes(""), None);
    }

    #[test]
    fn a_mirror_is_ready_then_done_once_pivoted() {
        let d = disk();
        let copying = "<disk><source file='/d/.new-vda.img.vkrestore-1'/><mirror type='file' file='/d/new-vda.img' job='copy'/></disk>";
        assert_eq!(state(&d, copying, true), State::Copying);
        let ready = "<disk><source file='/d/.new-vda.img.vkrestore-1'/><mirror type='file' file='/d/new-vda.img' job='copy' ready='yes'/></disk>";
        assert_eq!(state(&d, ready, true), State::Ready);
        let failed = "<disk><source file='/d/.new-vda.img.vkrestore-1'/></disk>";
        assert_eq!(state(&d, failed, false), State::Ended);
        let pivoted = "<disk><source file='/d/new-vda.img'/><backingStore/></disk>";
        assert_eq!(state(&d, pivoted, false), State::Done);
    }
}
