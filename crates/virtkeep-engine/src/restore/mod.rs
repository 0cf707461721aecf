//! `virtkeep restore SNAPSHOT --to HOST`: recreate every disk in its format, write only
//! the data extents over SSH, rewrite the saved XML and define it.
//!
//! The order is resolve → refuse → write → define, one module each ([`resolve`],
//! [`refuse`], [`write`], [`define`]): every destination is chosen by virtkeep
//! ([`place`]) and checked before anything is written; disks are written under
//! temporary names and swapped in only once all are written ([`stage`]).
//!
//! A destination is one backend behind the [`destination::Destination`] trait (check,
//! create under a temporary name, write, commit, roll back): [`file`], [`lvm`], [`rbd`].
//! The modules form layers, each importing only those below it:
//! `guard` (lexical rules) ← `staged` (temporary names, the host's record) ← `context`,
//! `options`, `nbd` ← `destination` ← `file`/`lvm`/`rbd` ← `stage`, `place`, `in_use`,
//! `job`, `nvram`, `space` ← `resolve`, `refuse`, `write`, `define` ← this module.

mod context;
mod created;
mod define;
mod destination;
mod file;
mod guard;
mod in_use;
mod job;
pub mod local;
mod lvm;
mod nbd;
mod nvram;
mod options;
mod place;
mod rbd;
mod refuse;
mod resolve;
mod space;
pub mod stage;
mod staged;
mod write;

use std::sync::Arc;
use std::time::Instant;

pub use options::{RestoreOptions, RestoreResult, RestoredDisk, Storage};
pub use place::destination;
pub(crate) use refuse::{check_distinct, check_format, check_passthrough};
// Live restore chooses and creates its destinations like a restore under a new name.
pub(crate) use context::DiskCheck;
pub(crate) use created::{Created, Outcome};
pub(crate) use destination::Destination;
pub(crate) use place::Place;
pub(crate) use space::check as check_space;
pub(crate) use staged::temp_file as stage_temp_file;

use crate::error::Result;
use crate::host::Host;
use crate::progress::Progress;

/// How long a restore waits for the lock of its target VM (a cleanup pass holds it briefly).
const LOCK_WAIT_SECS: u32 = 60;

pub async fn restore(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreResult> {
    let started = Instant::now();
    let job = resolve::resolve(host, repo, opts).await?;
    // The lock keeps a backup, cleanup or second restore of this VM out while its
    // disks are replaced; a dry run changes nothing and takes none.
    let lock = if opts.dry_run {
        None
    } else {
        Some(host.lock_vm(&job.lock_key, LOCK_WAIT_SECS).await?)
    };
    let res = restore_locked(host, repo, opts, &progress, &job).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    let mut r = res?;
    r.duration_secs = started.elapsed().as_secs_f64();
    Ok(r)
}

async fn restore_locked(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    progress: &Arc<dyn Progress>,
    job: &job::Job,
) -> Result<RestoreResult> {
    let mut notes = Vec::new();
    let checked = refuse::refuse(host, repo, job, opts, &mut notes).await?;
    let mut rw = define::rewrite_for(job, opts, &checked.plan, &checked.nvram, &mut notes);
    if opts.define {
        // Before anything is written: a definition that cannot fit this host is a refusal.
        define::fit_emulator(host, job, &mut rw, &mut notes).await?;
    }
    let mut result = planned(host, opts, job, &checked, &rw);
    if let Some(n) = checked.nvram.as_ref().filter(|n| n.bytes.is_some()) {
        let when = if opts.dry_run { "would be " } else { "" };
        notes.push(format!(
            "UEFI variables: {}, {when}written from the backup",
            n.dest
        ));
    }
    if !opts.dry_run {
        result.disks = write::write(host, repo, opts, job, &checked, progress).await?;
        if opts.define {
            let (uuid, started) =
                define::define_restored(host, opts, job, &checked.nvram, &rw, &mut notes).await?;
            result.uuid = Some(uuid);
            result.defined = true;
            result.started = started;
        }
    }
    result.notes = notes;
    Ok(result)
}

/// What the restore reports before anything is written (all of it with `--dry-run`).
fn planned(
    host: &Host,
    opts: &RestoreOptions,
    job: &job::Job,
    checked: &job::Checked<'_>,
    rw: &virtkeep_libvirt::Rewrite,
) -> RestoreResult {
    RestoreResult {
        snapshot: job.manifest.id.clone(),
        host: host.name.clone(),
        vm: job.name.clone(),
        uuid: None,
        disks: checked.plan.iter().map(|p| p.report(0)).collect(),
        defined: false,
        started: false,
        notes: Vec::new(),
        duration_secs: 0.0,
        dry_run: opts.dry_run,
        replaces: checked
            .plan
            .iter()
            .filter(|p| p.replaces)
            .map(|p| p.m.spec.target.clone())
            .collect(),
        xml_changes: if opts.define {
            define::describe_rewrite(rw)
        } else {
            Vec::new()
        },
    }
}
