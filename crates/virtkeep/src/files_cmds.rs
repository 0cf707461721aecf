//! `serve-nbd`, `files ls`, `files get` and `files find`: a backup's disks without restoring them (issue 19).

use std::process::ExitCode;

use serde::Serialize;
use virtkeep_files::{DirListing, DiskLayout, EntryKind, FileTarget, FilesError, FsInfo};

use crate::cli::{FilesFindArgs, FilesGetArgs, FilesLsArgs, MountArgs, ServeNbdArgs};
use crate::output::{human_bytes, print_json};
use crate::settings::{Settings, repo_err};

/// The walk limits of `--timeout SECS` (the listing and search default otherwise).
fn walk_opts(timeout: Option<u64>) -> virtkeep_files::WalkOptions {
    timeout.map_or_else(Default::default, |s| virtkeep_files::WalkOptions {
        timeout: std::time::Duration::from_secs(s),
    })
}

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

/// SIGINT or SIGTERM.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}

#[derive(Serialize)]
struct Mounted<'a> {
    snapshot: &'a str,
    dir: String,
    files: &'a [String],
}

/// Mounted until SIGINT, SIGTERM or `umount DIR`; unmounted either way.
pub async fn mount(settings: &Settings, args: MountArgs, json: bool) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, &args.snapshot).await?;
    let shutdown = stop_signal()?;
    let dir = args.dir.display().to_string();
    let ready = |files: &[String]| {
        if json {
            let m = Mounted {
                snapshot: &id,
                dir: dir.clone(),
                files,
            };
            let _ = serde_json::to_string(&m).map(|l| println!("{l}"));
        } else {
            for f in files {
                println!("{dir}/{f}");
            }
            eprintln!("backup {id} mounted read-only; Ctrl-C or umount ends it");
        }
    };
    virtkeep_files::mount_backup(&repo, &id, &args.dir, shutdown, ready)
        .await
        .map_err(files_err)?;
    Ok(ExitCode::SUCCESS)
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
    if let Some(target) = &args.target {
        let walk = walk_opts(args.timeout);
        return list_dir(&repo, id, target, json, args.long, walk).await;
    }
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
        for l in &d.lvs {
            let _ = writeln!(
                out,
                "  {}:{}  size {:>10}  on {}  {}",
                d.disk,
                l.name,
                human_bytes(l.size),
                l.partition
                    .map_or("the whole disk".to_string(), |n| format!("partition {n}")),
                fs_text(l.filesystem.as_ref())
            );
        }
        for w in &d.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

#[derive(Serialize)]
struct FilesDir {
    snapshot: String,
    disk: String,
    partition: Option<u32>,
    lv: Option<String>,
    #[serde(flatten)]
    listing: DirListing,
}

async fn list_dir(
    repo: &virtkeep_repo::Repository,
    id: String,
    target: &str,
    json: bool,
    long: bool,
    walk: virtkeep_files::WalkOptions,
) -> anyhow::Result<ExitCode> {
    let t: FileTarget = target.parse().map_err(files_err)?;
    let listing = virtkeep_files::list_dir(repo, &id, &t, walk)
        .await
        .map_err(files_err)?;
    if json {
        print_json(&FilesDir {
            snapshot: id,
            disk: t.disk,
            partition: t.partition,
            lv: t.lv,
            listing,
        })?;
    } else {
        // Unreadable entries are listed; why, on stderr.
        for e in listing.entries.iter().filter(|e| e.error.is_some()) {
            let why = e.error.as_deref().unwrap_or_default();
            eprintln!("warning: {}: {why}", e.name);
        }
        if long {
            print!("{}", listing_text(&listing));
        } else {
            print!("{}", names_text(&listing));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mode_text(kind: EntryKind, mode: u16) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::BlockDevice => 'b',
        EntryKind::CharDevice => 'c',
        EntryKind::Fifo => 'p',
        EntryKind::Socket => 's',
        EntryKind::File => '-',
        EntryKind::Unknown => '?',
    };
    let bits: String = (0..9)
        .map(|i| {
            let on = mode & (0o400 >> i) != 0;
            match (on, i % 3) {
                (false, _) => '-',
                (true, 0) => 'r',
                (true, 1) => 'w',
                (true, _) => 'x',
            }
        })
        .collect();
    format!("{t}{bits}")
}

/// One name a line, `/` after a directory's.
fn names_text(l: &DirListing) -> String {
    let mut out = String::new();
    for e in &l.entries {
        out.push_str(&e.name);
        if e.kind == EntryKind::Dir {
            out.push('/');
        }
        out.push('\n');
    }
    if l.truncated {
        out.push_str(&format!(
            "(listing truncated at {} entries)\n",
            virtkeep_files::MAX_DIR_ENTRIES
        ));
    }
    out
}

fn listing_text(l: &DirListing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for e in &l.entries {
        let time = chrono::DateTime::from_timestamp(e.mtime, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| e.mtime.to_string());
        let _ = write!(
            out,
            "{} {:>5} {:>5} {:>12} {} {}",
            mode_text(e.kind, e.mode),
            e.uid,
            e.gid,
            e.size,
            time,
            e.name
        );
        if let Some(t) = &e.target {
            let _ = write!(out, " -> {t}");
        }
        out.push('\n');
    }
    if l.truncated {
        let _ = writeln!(
            out,
            "(listing truncated at {} entries)",
            virtkeep_files::MAX_DIR_ENTRIES
        );
    }
    out
}

#[derive(Serialize)]
struct FilesGet {
    snapshot: String,
    disk: String,
    partition: Option<u32>,
    lv: Option<String>,
    path: String,
    #[serde(flatten)]
    summary: virtkeep_files::GetSummary,
}

/// Exit 1 when something was skipped (unsafe names, device files), after copying the rest.
pub async fn files_get(
    settings: &Settings,
    args: FilesGetArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, &args.snapshot).await?;
    let t: FileTarget = args.target.parse().map_err(files_err)?;
    let opts = virtkeep_files::GetOptions {
        overwrite: args.overwrite,
        max_entries: args.max_entries,
        timeout: args.timeout.map_or(
            virtkeep_files::DEFAULT_GET_TIMEOUT,
            std::time::Duration::from_secs,
        ),
    };
    let summary = virtkeep_files::get(&repo, &id, &t, &args.to, opts)
        .await
        .map_err(files_err)?;
    let partial = !summary.skipped.is_empty();
    if json {
        print_json(&FilesGet {
            snapshot: id,
            disk: t.disk,
            partition: t.partition,
            lv: t.lv,
            path: t.path,
            summary,
        })?;
    } else {
        for s in &summary.skipped {
            eprintln!("skipped {s}");
        }
        println!(
            "copied to {}: {} files ({}), {} directories, {} symlinks, {} hard links",
            summary.to,
            summary.files,
            human_bytes(summary.bytes),
            summary.dirs,
            summary.symlinks,
            summary.hard_links
        );
    }
    Ok(if partial {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Serialize)]
struct FilesFind {
    snapshot: String,
    disk: String,
    partition: Option<u32>,
    lv: Option<String>,
    root: String,
    pattern: String,
    #[serde(flatten)]
    result: virtkeep_files::FindResult,
}

pub async fn files_find(
    settings: &Settings,
    args: FilesFindArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, &args.snapshot).await?;
    let t = FileTarget::parse_root(&args.target).map_err(files_err)?;
    let result = virtkeep_files::find(&repo, &id, &t, &args.pattern, walk_opts(args.timeout))
        .await
        .map_err(files_err)?;
    if json {
        print_json(&FilesFind {
            snapshot: id,
            disk: t.disk,
            partition: t.partition,
            lv: t.lv,
            root: t.path,
            pattern: args.pattern,
            result,
        })?;
    } else {
        for m in &result.matches {
            println!("{}", m.path);
        }
        if result.truncated {
            eprintln!(
                "(search stopped after {} entries or {} matches)",
                virtkeep_files::MAX_FIND_VISITS,
                virtkeep_files::MAX_FIND_MATCHES
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
