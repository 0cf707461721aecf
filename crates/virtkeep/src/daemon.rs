//! `virtkeep daemon`, `virtkeep jobs` and `virtkeep policy list`: thin shells over
//! virtkeep-daemon.

use std::process::ExitCode;

use virtkeep_daemon::catalog::{Catalog, JobFilter, JobStatus};
use virtkeep_daemon::policy::DaemonConfig;
use virtkeep_daemon::{DaemonError, api, task};
use virtkeep_engine::Error as EngineError;

use crate::cli::{JobStatusArg, JobsArgs};
use crate::output::{human_bytes, print_json};
use crate::settings::Settings;

/// Daemon errors as the binary reports them: configuration mistakes exit with 2.
pub(crate) fn user_error(e: DaemonError) -> anyhow::Error {
    let hint = e.hint();
    let mut err = if e.is_config() {
        EngineError::config(e.to_string())
    } else {
        EngineError::new(virtkeep_engine::ErrorKind::Conflict, e.to_string())
    };
    if let DaemonError::Engine(inner) = e {
        err = inner;
    } else if let Some(h) = hint {
        err = err.hint(h);
    }
    err.into()
}

pub(crate) fn load(settings: &Settings) -> anyhow::Result<DaemonConfig> {
    DaemonConfig::load(&settings.path, &settings.config).map_err(user_error)
}

pub async fn daemon(settings: &Settings) -> anyhow::Result<ExitCode> {
    let config = load(settings)?;
    let tokens = match &config.api {
        Some(a) => Some(api::load_tokens(a).map_err(user_error)?),
        None => None,
    };
    let env = task::Env {
        engine: settings.config.clone(),
        daemon: config,
        known_hosts: settings.known_hosts(),
        default_repository: settings.default_repository(),
    };
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    virtkeep_daemon::daemon::run(env, shutdown, |env, catalog, progress, submit| {
        if let (Some(api_config), Some(tokens)) = (env.daemon.api.clone(), tokens) {
            let state = api::ApiState {
                env,
                catalog,
                progress,
                submit,
                tokens,
            };
            api::serve(state, &api_config)?;
        } else {
            // SIGHUP (`systemctl reload`) must not stop a daemon without an API.
            virtkeep_daemon::tls::handle_sighup(None).map_err(|source| DaemonError::Io {
                what: "installing the SIGHUP handler",
                path: std::path::PathBuf::from("SIGHUP"),
                source,
            })?;
        }
        Ok(())
    })
    .await
    .map_err(user_error)?;
    Ok(ExitCode::SUCCESS)
}

pub fn jobs(settings: &Settings, args: JobsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(settings)?;
    let (host, vm) = match args.filter.as_deref() {
        None => (None, None),
        Some(f) => match f.split_once('/') {
            Some((h, v)) => (Some(h.to_string()), Some(v.to_string())),
            None => (Some(f.to_string()), None),
        },
    };
    let list = match Catalog::open_reader_at(&config.catalog).map_err(user_error)? {
        None => Vec::new(),
        Some(c) => c
            .jobs(&JobFilter {
                status: args.status.map(|s| match s {
                    JobStatusArg::Queued => JobStatus::Queued,
                    JobStatusArg::Running => JobStatus::Running,
                    JobStatusArg::Succeeded => JobStatus::Succeeded,
                    JobStatusArg::Failed => JobStatus::Failed,
                    JobStatusArg::Cancelled => JobStatus::Cancelled,
                }),
                host,
                vm,
                run_id: args.run,
                limit: Some(args.limit),
            })
            .map_err(user_error)?,
    };
    if json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no jobs in {}", config.catalog.display());
    }
    for j in &list {
        let what = match (&j.snapshot, &j.mode) {
            (Some(s), Some(m)) => format!("{m} {s}"),
            (Some(s), None) => s.clone(),
            _ => String::new(),
        };
        println!(
            "{:>6}  {:<9} {:<7} {}/{}  try {}{}  {}  {}{}{}",
            j.id,
            j.status.as_str(),
            j.kind,
            j.host,
            j.vm,
            j.attempt,
            j.retry_of
                .map(|r| format!(" (retry of {r})"))
                .unwrap_or_default(),
            j.finished
                .as_deref()
                .or(j.started.as_deref())
                .unwrap_or(&j.created),
            what,
            j.bytes_new
                .map(|b| format!("  new {}", human_bytes(b.max(0) as u64)))
                .unwrap_or_default(),
            j.pruned
                .filter(|n| *n > 0)
                .map(|n| format!("  pruned {n}"))
                .unwrap_or_default(),
        );
        if let Some(e) = &j.error {
            println!("        error: {e}");
        }
        // A live restore's note: running since when, then both times and the disks.
        if let (Some(n), "live_restore") = (&j.note, j.kind.as_str()) {
            println!("        {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `virtkeep nodes`: the nodes registered in the catalog.
pub fn nodes(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(settings)?;
    let now = virtkeep_daemon::catalog::now();
    let list = match Catalog::open_reader_at(&config.catalog).map_err(user_error)? {
        None => Vec::new(),
        Some(c) => c.nodes(now).map_err(user_error)?,
    };
    if json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no nodes in {}", config.catalog.display());
    }
    for n in &list {
        println!(
            "{:<20} {:<5} {}{}  running {}/{}  heartbeat {}{}",
            n.name,
            if n.alive { "up" } else { "DOWN" },
            if n.leader { "leader  " } else { "" },
            n.address.as_deref().unwrap_or("-"),
            n.running,
            n.capacity,
            n.heartbeat,
            if n.alive { "" } else { " (lease expired)" },
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn policy_list(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(settings)?;
    let catalog = Catalog::open_reader_at(&config.catalog).map_err(user_error)?;
    let views = api::policy_views(&config, catalog.as_ref()).map_err(user_error)?;
    if json {
        print_json(&views)?;
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        println!("no policies in {}", settings.path.display());
    }
    for p in &views {
        println!(
            "{}{}  priority {}  repository {}",
            p.name,
            if p.enabled { "" } else { " (disabled)" },
            p.priority,
            p.repository.as_deref().unwrap_or("(default)")
        );
        for v in &p.vms {
            println!("  vms       {v}");
        }
        for s in &p.schedules {
            println!(
                "  schedule  {} {}  next {}  last {}",
                s.schedule,
                s.mode,
                s.next_run.as_deref().unwrap_or("-"),
                s.last_run.as_deref().unwrap_or("-")
            );
        }
        if let Some(r) = &p.retention {
            println!("  retention {r}");
        }
        for r in &p.last_runs {
            println!(
                "  run {:>4}  {} {} ({}) {}{}",
                r.id,
                r.started,
                r.status,
                r.trigger,
                r.mode,
                r.note
                    .as_deref()
                    .map(|n| format!("  {n}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
