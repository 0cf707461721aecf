//! The context of one backup job, shared by the job and its strategies (which import
//! this file and `plan.rs`, never the job in `mod.rs`).

use std::sync::Arc;

use virtkeep_libvirt::{coreutils, sh};

use crate::error::{Error, ErrorKind, Result};
use crate::export::ExportStats;
use crate::host::Host;
use crate::phases::PhaseClock;
use crate::plan::{BackupOptions, DiskResult};
use crate::progress::{Event, Progress};
use crate::vm::Vm;

/// One backup job of one VM.
pub struct Job<'a> {
    pub host: &'a Host,
    pub repo: &'a virtkeep_repo::Repository,
    pub vm: Vm,
    pub opts: &'a BackupOptions,
    pub progress: Arc<dyn Progress>,
    /// Empty until the plan is made (the job id names snapshots, overlays, checkpoints).
    pub id: String,
    /// The job's private directory on the host (sockets, pid files, hold records).
    pub dir: String,
    pub clock: PhaseClock,
    pub warnings: Vec<String>,
}

impl Job<'_> {
    /// A notice for the user, also kept as a warning of the result.
    pub fn warn(&mut self, message: String) {
        self.notice(message.clone());
        self.warnings.push(message);
    }

    pub fn notice(&self, message: String) {
        self.progress.event(Event::Notice {
            vm: self.vm.name.clone(),
            message,
        });
    }

    pub fn phase(&self, phase: &'static str) {
        self.progress.event(Event::Phase {
            vm: self.vm.name.clone(),
            phase,
        });
    }

    /// Gives the job its id and private directory on the host.
    pub async fn open_dir(&mut self) -> Result<()> {
        self.id = crate::job_id();
        self.dir = self
            .host
            .job_dir(&format!("{}-{}", self.vm.uuid, self.id))
            .await?;
        Ok(())
    }

    /// Gives the job its id and the name of its directory, made by
    /// [`make_dir_for_qemu`](Self::make_dir_for_qemu).
    pub fn name_dir(&mut self) {
        self.id = crate::job_id();
        self.dir = format!(
            "{}/jobs/{}-{}",
            crate::host::HOST_STATE_DIR,
            self.vm.uuid,
            self.id
        );
    }

    /// Makes the named directory and hands it to QEMU (the NBD socket and scratch
    /// files of a backup-API job are QEMU's), in one round trip.
    pub async fn make_dir_for_qemu(&self) -> Result<()> {
        let (user, group) = self.host.qemu_owner().await?;
        let make = coreutils::mkdir_p_mode(&self.dir, 0o711)
            .and_then(coreutils::chown(&format!("{user}:{group}"), &self.dir))
            .and_then(coreutils::chmod(0o750, &self.dir));
        self.host.run(&make).await?;
        Ok(())
    }

    /// Removes the job's directory (best effort: healing removes what is left).
    pub async fn remove_dir(&self) {
        let _ = self.host.run(&coreutils::rm_rf(&self.dir)).await;
    }

    /// The name of the snapshots and checkpoint this job takes.
    pub fn snapshot_name(&self) -> String {
        format!("virtkeep-{}", self.id)
    }

    /// Runs the pre-snapshot command, if any; its failure aborts before any snapshot.
    pub async fn pre_snapshot(&self) -> Result<()> {
        let Some(cmd) = &self.opts.pre_snapshot else {
            return Ok(());
        };
        self.phase("pre-snapshot");
        run_hook(self.host, &self.vm, "pre-snapshot", cmd)
            .await
            .map_err(|e| e.context("the pre-snapshot command failed, nothing was snapshotted"))
    }

    /// Runs the post-snapshot command, if any; its failure is a warning.
    pub async fn post_snapshot(&mut self) {
        let Some(cmd) = self.opts.post_snapshot.clone() else {
            return;
        };
        self.phase("post-snapshot");
        if let Err(e) = run_hook(self.host, &self.vm, "post-snapshot", &cmd).await {
            self.warn(format!("the post-snapshot command failed: {e}"));
        }
    }

    /// `--quiesce` needs the guest agent: asked before anything is frozen.
    pub async fn ping_agent(&self, hint: &'static str) -> Result<()> {
        let ping = self
            .host
            .exec(&self.host.virsh().qemu_agent_ping(&self.vm.uuid, 5))
            .await?;
        if ping.status != 0 {
            return Err(Error::domain(format!(
                "--quiesce needs the QEMU guest agent, and it does not answer in {:?}",
                self.vm.name
            ))
            .hint(hint));
        }
        Ok(())
    }

    /// Parallel data connections per disk.
    pub fn parallel(&self) -> usize {
        self.opts.parallel.max(1)
    }
}

/// Runs a user hook on the host with `sh -c`; its output goes to the log.
pub async fn run_hook(host: &Host, vm: &Vm, phase: &str, command: &str) -> Result<()> {
    let cmd = sh::hook(
        command,
        &[
            ("VIRTKEEP_PHASE", phase),
            ("VIRTKEEP_VM", &vm.name),
            ("VIRTKEEP_VM_UUID", &vm.uuid),
            ("VIRTKEEP_HOST", &host.name),
        ],
    );
    let out = host.exec(&cmd).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    tracing::info!(vm = %vm.name, phase, status = out.status, stdout = %stdout.trim(), stderr = %stderr.trim(), "hook ran");
    if out.status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "{phase} command exited with status {}: {}",
                out.status,
                stderr.trim()
            ),
        ));
    }
    Ok(())
}

/// The per-disk lines of a result: the manifest's statistics and what crossed the wire.
pub fn disk_results(
    manifest: &virtkeep_repo::Manifest,
    stats: Vec<ExportStats>,
) -> Vec<DiskResult> {
    manifest
        .disks
        .iter()
        .zip(stats)
        .map(|(d, s)| DiskResult {
            target: d.spec.target.clone(),
            size: d.spec.size,
            bytes_read: s.bytes_read,
            bytes_new: d.stats.bytes_new,
            bytes_stored: d.stats.bytes_stored,
            chunks_new: d.stats.chunks_new,
            chunks_reused: d.stats.chunks_reused,
            chunks_zero: d.stats.chunks_zero,
        })
        .collect()
}
