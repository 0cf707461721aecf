//! Managing single backups: forget, protect, unprotect.

use std::process::ExitCode;

use crate::cli::SnapshotIdsArgs;
use crate::output::print_json;
use crate::settings::{Settings, repo_err};

/// Forgets each backup in turn; the first refusal (protected, in use, unknown) stops
/// the command with what was forgotten so far reported.
pub async fn forget(
    settings: &Settings,
    args: SnapshotIdsArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let ids = resolve_all(&repo, &args.snapshots).await?;
    let mut done = Vec::new();
    for id in &ids {
        if let Err(e) = repo.forget(id).await {
            // With --json stdout holds the error object alone.
            if !json {
                report_done(&done, "forgot", json)?;
            }
            return Err(repo_err(e).into());
        }
        done.push(id.clone());
    }
    report_done(&done, "forgot", json)?;
    if !json {
        println!("`virtkeep gc` frees the chunks no other backup uses");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn protect(
    settings: &Settings,
    args: SnapshotIdsArgs,
    on: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let verb = if on { "protected" } else { "unprotected" };
    let ids = resolve_all(&repo, &args.snapshots).await?;
    let mut done = Vec::new();
    for id in &ids {
        if let Err(e) = repo.set_protected(id, on).await {
            if !json {
                report_done(&done, verb, json)?;
            }
            return Err(repo_err(e).into());
        }
        done.push(id.clone());
    }
    report_done(&done, verb, json)?;
    Ok(ExitCode::SUCCESS)
}

/// Each SNAPSHOT (id, unique id prefix, HOST/VM@latest) as a backup id, before anything
/// is changed: one that names nothing stops the command with nothing done.
async fn resolve_all(
    repo: &virtkeep_repo::Repository,
    specs: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for spec in specs {
        ids.push(virtkeep_engine::snapshot_ref::resolve(repo, spec).await?);
    }
    Ok(ids)
}

fn report_done(ids: &[String], verb: &str, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&serde_json::json!({ verb: ids }))?;
    } else {
        for id in ids {
            println!("{verb} {id}");
        }
    }
    Ok(())
}
