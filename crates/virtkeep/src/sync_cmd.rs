//! `virtkeep sync --from REPO --to REPO`, and opening a repository named by `--from`,
//! `--to` or `repo init --copy-keys-from`.

use std::path::Path;
use std::process::ExitCode;

use virtkeep_engine::config::RepositoryConfig;
use virtkeep_engine::progress::LogProgress;
use virtkeep_engine::sync::{SyncOptions, sync as run_sync};
use virtkeep_repo::Repository;

use crate::cli::{RepoArgs, SyncArgs};
use crate::keys::{self, KeyChoice};
use crate::output::{human_bytes, print_json};
use crate::settings::{Settings, repo_error};

/// The configuration of `spec`: a name from `[repositories]`, or the location of the
/// default or a named repository.
fn configured<'a>(settings: &'a Settings, spec: &str) -> Option<&'a RepositoryConfig> {
    let cfg = &settings.config;
    if let Some(rc) = cfg.repositories.get(spec) {
        return Some(rc);
    }
    let location = keys::absolute_location(spec);
    cfg.repositories
        .values()
        .chain(cfg.repository.as_ref())
        .find(|rc| rc.location == location)
}

/// Opens the repository `spec` names, with its configured key unless `key_file` is given.
pub async fn open_named(
    settings: &Settings,
    spec: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<Repository> {
    let Some(rc) = configured(settings, spec) else {
        // Not configured: as `--repo LOCATION --key-file FILE`.
        let args = RepoArgs {
            repo: Some(spec.to_string()),
            key_file: key_file.map(Path::to_path_buf),
            ..RepoArgs::default()
        };
        return settings.open_repo(&args).await;
    };
    let given = KeyChoice {
        key_file: key_file.map(keys::absolute),
        ..KeyChoice::default()
    };
    let choice = given.or(KeyChoice::of_repository(rc));
    let location = settings.location(&rc.location, Some(rc))?;
    let key = choice.resolve().await?;
    Repository::open(location, key).await.map_err(|e| {
        repo_error(e, &rc.location)
            .context(format!("repository {spec}"))
            .into()
    })
}

pub async fn sync(settings: &Settings, args: SyncArgs, json: bool) -> anyhow::Result<ExitCode> {
    let from = open_named(settings, &args.from, args.from_key_file.as_deref()).await?;
    let to = open_named(settings, &args.to, args.to_key_file.as_deref()).await?;
    let opts = SyncOptions {
        selection: args.selection,
        latest: args.latest,
    };
    let report = run_sync(&from, &to, &opts, &LogProgress).await?;
    if json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    for b in &report.backups {
        if b.status == "copied" {
            println!(
                "{} {}/{}: copied, {} chunks sent ({}), {} already there",
                b.id,
                b.host,
                b.vm,
                b.stats.chunks_sent,
                human_bytes(b.stats.bytes_sent),
                b.stats.chunks_skipped
            );
        }
    }
    println!(
        "{} backups copied, {} already in {}; {} chunks sent ({}), {} skipped{}",
        report.manifests_copied,
        report.manifests_present,
        report.to,
        report.totals.chunks_sent,
        human_bytes(report.totals.bytes_sent),
        report.totals.chunks_skipped,
        if report.raw {
            ""
        } else {
            " (keys differ: chunks re-encrypted; `repo init --copy-keys-from` avoids it)"
        }
    );
    Ok(ExitCode::SUCCESS)
}
