//! `stats`: what the repository holds and how well it deduplicates.

use std::collections::BTreeMap;
use std::process::ExitCode;

use futures::TryStreamExt;
use serde::Serialize;

use crate::cli::StatsArgs;
use crate::output::{human_bytes, print_json};
use crate::settings::{Settings, repo_err};

#[derive(Serialize)]
struct Stats {
    location: String,
    backups: usize,
    chunks: u64,
    /// Bytes of all chunk objects (compressed, encrypted): what the storage holds.
    stored_bytes: u64,
    /// Disk bytes of all backups, as a restore would write them.
    logical_bytes: u64,
    /// logical / stored (0 for an empty repository).
    dedup_ratio: f64,
    vms: Vec<VmStats>,
}

#[derive(Serialize)]
struct VmStats {
    host: String,
    vm: String,
    backups: usize,
    #[serde(with = "time::serde::rfc3339")]
    latest: time::OffsetDateTime,
    logical_bytes: u64,
    /// Stored bytes its backups added (the rest was already there).
    new_bytes: u64,
}

pub async fn stats(settings: &Settings, args: StatsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let list = repo.snapshots().await.map_err(repo_err)?;
    let (mut chunks, mut stored) = (0u64, 0u64);
    let mut objects = repo.backend().list("chunks/");
    while let Some(o) = objects.try_next().await.map_err(repo_err)? {
        chunks += 1;
        stored += o.size;
    }
    let logical: u64 = list.iter().map(|s| s.size).sum();
    let (host, vm) = match args.filter.as_deref() {
        Some(f) => f
            .split_once('/')
            .map_or((Some(f), None), |(h, v)| (Some(h), Some(v))),
        None => (None, None),
    };
    let mut vms: BTreeMap<(String, String), VmStats> = BTreeMap::new();
    for s in &list {
        if host.is_some_and(|h| h != s.host) || vm.is_some_and(|v| v != s.vm) {
            continue;
        }
        let e = vms
            .entry((s.host.clone(), s.vm.clone()))
            .or_insert_with(|| VmStats {
                host: s.host.clone(),
                vm: s.vm.clone(),
                backups: 0,
                latest: s.time,
                logical_bytes: 0,
                new_bytes: 0,
            });
        e.backups += 1;
        e.latest = e.latest.max(s.time);
        e.logical_bytes += s.size;
        e.new_bytes += s.bytes_new;
    }
    let stats = Stats {
        location: repo.location().to_string(),
        backups: list.len(),
        chunks,
        stored_bytes: stored,
        logical_bytes: logical,
        dedup_ratio: if stored == 0 {
            0.0
        } else {
            logical as f64 / stored as f64
        },
        vms: vms.into_values().collect(),
    };
    if json {
        print_json(&stats)?;
    } else {
        print_stats(&stats);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_stats(s: &Stats) {
    println!("repository {}", s.location);
    println!(
        "{} backups holding {} of disks, stored in {} chunks ({}): {:.1}x less",
        s.backups,
        human_bytes(s.logical_bytes),
        s.chunks,
        human_bytes(s.stored_bytes),
        s.dedup_ratio
    );
    if s.vms.is_empty() {
        return;
    }
    use comfy_table::{Cell, CellAlignment, Table, presets};
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(["VM", "BACKUPS", "LATEST", "DISKS", "ADDED"]);
    for v in &s.vms {
        table.add_row([
            Cell::new(format!("{}/{}", v.host, v.vm)),
            Cell::new(v.backups).set_alignment(CellAlignment::Right),
            Cell::new(crate::output::format_time(v.latest, false)),
            Cell::new(human_bytes(v.logical_bytes)).set_alignment(CellAlignment::Right),
            Cell::new(human_bytes(v.new_bytes)).set_alignment(CellAlignment::Right),
        ]);
    }
    for line in table.lines() {
        println!("{}", line.strip_prefix(' ').unwrap_or(&line).trim_end());
    }
}
