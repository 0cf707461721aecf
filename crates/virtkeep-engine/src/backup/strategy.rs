//! The one trait every disk backend's backup strategy implements (see `docs/architecture.md`,
//! "Backup strategies"). A strategy owns the planned disks of one kind for one job and
//! keeps what it made (snapshots, bases) between the steps; the job in `mod.rs` calls
//! the steps in order for every strategy.

use async_trait::async_trait;
use virtkeep_repo::BackupWriter;

use super::job::Job;
use crate::error::Result;
use crate::export::ExportStats;
use crate::plan::{BackupExtra, PlannedDisk, Transport};

/// How the instant is being taken, for a strategy's part of it.
#[derive(Debug, Clone, Copy)]
pub struct Freeze {
    /// The VM runs (a live snapshot); otherwise it is stopped (overlays and a redefine).
    pub live: bool,
    /// The guest is held still around all snapshot calls (paused or fsfrozen).
    pub held: bool,
}

/// What a strategy found to build an incremental on.
#[derive(Debug, Default)]
pub struct BaseSummary {
    /// The backup its disks build on (the VM's newest), when any of them does.
    pub parent: Option<String>,
    /// How many of its disks have a base.
    pub based: usize,
    /// Why some of its disks have none (for the reason).
    pub problem: Option<String>,
    /// How the incremental reads its disks, when its disks are all the backup has.
    pub detail: Option<String>,
}

/// Where one disk's data goes.
pub struct DiskOut<'a> {
    pub writer: &'a BackupWriter,
    pub transport: Transport,
    /// The disk's position in the plan (names its export's socket and pid file).
    pub index: usize,
}

/// One backend's way of freezing, reading and keeping the base of its disks.
#[async_trait]
pub trait Strategy: Send + Sync {
    /// Whether `disk` is one of this strategy's disks.
    fn owns(&self, disk: &PlannedDisk) -> bool;

    /// Whether its disks are read as images through qemu-nbd or dd (and so must be raw
    /// when the host has no qemu-nbd).
    fn reads_image(&self) -> bool {
        true
    }

    /// Looks up and sizes what the freeze will make; a refusal here leaves nothing.
    async fn prepare(&mut self, _job: &Job<'_>) -> Result<()> {
        Ok(())
    }

    /// The separate snapshot calls its freeze makes (more than one in a job: the guest
    /// is held still around all of them).
    fn freeze_calls(&self) -> usize;

    /// Whether its snapshots need the guest held still even when they are the only call.
    fn needs_hold(&self) -> bool {
        false
    }

    /// Takes its disks' part of the one instant.
    async fn freeze(&mut self, job: &Job<'_>, freeze: Freeze) -> Result<()>;

    /// After the freeze: the bases an incremental of its disks builds on, or why none.
    async fn bases(&mut self, job: &mut Job<'_>) -> Result<BaseSummary>;

    /// Reads one of its disks into the backup being written.
    async fn export(
        &self,
        job: &Job<'_>,
        out: &DiskOut<'_>,
        disk: &PlannedDisk,
    ) -> Result<ExportStats>;

    /// Just before the manifest is published: checks that what was read still holds
    /// the instant, and records its part of the manifest's `extra`.
    async fn publish(&self, job: &Job<'_>, extra: &mut BackupExtra) -> Result<()>;

    /// After the manifest is published: keeps the next base. An error fails the job
    /// (the backup stays published).
    async fn after_publish(&mut self, _job: &mut Job<'_>) -> Result<()> {
        Ok(())
    }

    /// At the end of the job, before healing, whether or not it succeeded.
    async fn finish(&mut self, _job: &Job<'_>, _ok: bool) {}
}
