//! `serve-nbd` and `files ls`: a backup's disks without restoring them (issue 19).

use std::process::ExitCode;

use serde::Serialize;
use virtkeep_files::{DiskLayout, FilesError, FsInfo};

use crate::cli::{FilesLsArgs, ServeNbdArgs};
use crate::output::{human_bytes, print_json};
use crate::settings::{Settings, repo_err};

fn files_err(e: FilesError) -> anyhow::Error {
    match e {
        FilesError::Repo(e) => repo_err(e).into(),
        e => e.into(),
    }
}

#[derive(Serialize)]
struct Serving<'a> {
    snapshot: &'a str,
    socket: String,
    exports: Vec<String>,
}

/// Serve until SIGINT or SIGTERM; the socket is removed either way.
pub async fn serve_nbd(
    settings: &Settings,
    args: ServeNbdArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, &args.snapshot).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let socket = args.socket.display().to_string();
    let ready = |names: &[&str]| {
        let exports: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        if json {
            let s = Serving {
                snapshot: &id,
                socket: socket.clone(),
                exports,
            };
            let _ = serde_json::to_string(&s).map(|l| println!("{l}"));
        } else {
            for n in &exports {
                println!("nbd+unix:///{n}?socket={socket}");
            }
            eprintln!("serving backup {id} read-only; Ctrl-C ends it");
        }
    };
    virtkeep_files::serve_backup(&repo, &id, &args.socket, shutdown, ready)
        .await
        .map_err(files_err)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct FilesLs {
    snapshot: String,
    disks: Vec<DiskLayout>,
}

pub async fn files_ls(
    settings: &Settings,
    args: FilesLsArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, &args.snapshot).await?;
    let disks = virtkeep_files::backup_layout(&repo, &id)
        .await
        .map_err(files_err)?;
    if json {
        print_json(&FilesLs {
            snapshot: id,
            disks,
        })?;
    } else {
        print!("{}", layout_text(&disks));
    }
    Ok(ExitCode::SUCCESS)
}

fn fs_text(fs: Option<&FsInfo>) -> String {
    match fs {
        None => "-".into(),
        Some(f) => match &f.label {
            Some(l) => format!("{} ({l:?})", f.kind),
            None => f.kind.clone(),
        },
    }
}

fn layout_text(disks: &[DiskLayout]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for d in disks {
        let table = serde_json::to_value(d.table).unwrap_or_default();
        let _ = writeln!(
            out,
            "{}  {}  table {}  filesystem {}",
            d.disk,
            human_bytes(d.size),
            table.as_str().unwrap_or("?"),
            fs_text(d.filesystem.as_ref())
        );
        for p in &d.partitions {
            let q = &p.partition;
            let _ = writeln!(
                out,
                "  {:>3}  start {:>10}  size {:>10}  {:<24}  {:<12}  {}",
                q.number,
                q.start,
                human_bytes(q.size),
                q.type_name.unwrap_or(&q.type_id),
                q.name.as_deref().unwrap_or("-"),
                fs_text(p.filesystem.as_ref())
            );
        }
        for w in &d.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}
