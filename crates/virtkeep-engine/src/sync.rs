//! `virtkeep sync`: copies backups from one repository into another, sending only the
//! chunks the destination lacks (virtkeep_repo's `copy_backup` does one backup; this
//! picks the backups, orders them and reports).

use serde::Serialize;
use virtkeep_repo::{CopyObserver, CopyStats, DigestMap, Manifest, RepoError, Repository};

use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Event, Progress};

/// What to copy.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// `HOST` or `HOST/VM` patterns; empty: every backup of the source.
    pub selection: Vec<String>,
    /// Per VM, only its newest N backups of the source (`None`: all).
    pub latest: Option<usize>,
}

/// One backup of the selection.
#[derive(Debug, Clone, Serialize)]
pub struct SyncedBackup {
    pub id: String,
    pub host: String,
    pub vm: String,
    /// `copied`, or `present` (the destination had it already).
    pub status: &'static str,
    #[serde(flatten)]
    pub stats: CopyStats,
}

/// The `--json` summary of a sync (stable: additions only).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    pub from: String,
    pub to: String,
    /// Whether chunks were copied as stored (`repo init --copy-keys-from`) rather than
    /// re-encoded with the destination's keys.
    pub raw: bool,
    pub manifests_copied: u64,
    pub manifests_present: u64,
    #[serde(flatten)]
    pub totals: CopyStats,
    pub backups: Vec<SyncedBackup>,
}

/// The `sync-chunk-sent` failpoint: a fault test stops a sync once a chunk of a backup
/// is in the destination and its manifest is not.
struct Observer;

#[async_trait::async_trait]
impl CopyObserver for Observer {
    async fn chunk_sent(&self, _bytes: u64) {
        crate::failpoint::hit("sync-chunk-sent").await;
        crate::failpoint::hold("sync-hold").await;
    }
}

fn selected(m: &Manifest, selection: &[String]) -> bool {
    selection.is_empty()
        || selection.iter().any(|s| match s.split_once('/') {
            Some((h, v)) => h == m.host && v == m.vm,
            None => *s == m.host,
        })
}

/// The source's backups to copy, oldest first: the selection, newest `latest` per VM.
fn choose(mut all: Vec<Manifest>, opts: &SyncOptions) -> Vec<Manifest> {
    all.retain(|m| selected(m, &opts.selection));
    if let Some(n) = opts.latest {
        let mut seen: std::collections::HashMap<(String, String), usize> = Default::default();
        // newest first, keep n per VM, then back to oldest first
        all.reverse();
        all.retain(|m| {
            let c = seen.entry((m.host.clone(), m.vm.clone())).or_default();
            *c += 1;
            *c <= n
        });
        all.reverse();
    }
    all
}

fn sync_error(e: RepoError, from: &Repository, to: &Repository) -> Error {
    let hint = match &e {
        RepoError::InvalidArgument(m) if m.contains("chunk size") => Some(format!(
            "create the destination with the source's chunk size: `virtkeep repo init \
             {} --copy-keys-from {}` (which also lets chunks be copied without re-encoding)",
            to.location(),
            from.location()
        )),
        RepoError::ChunkMissing { .. } | RepoError::ChunkCorrupt { .. } => Some(format!(
            "the source is damaged: nothing of this backup was published in {}; `virtkeep \
             verify --repo {}` names what is broken",
            to.location(),
            from.location()
        )),
        RepoError::Backend { .. } | RepoError::Io { .. } | RepoError::LeaseExpired(_) => Some(
            "run the sync again: backups already copied stay, and chunks that arrived \
                 are not sent again"
                .into(),
        ),
        _ => None,
    };
    let err = Error::from(e);
    match hint {
        Some(h) => err.hint(h),
        None => err,
    }
}

/// Copies the selected backups of `from` that `to` lacks, oldest first.
pub async fn sync(
    from: &Repository,
    to: &Repository,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    if from.id() == to.id() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{} and {} are the same repository",
                from.location(),
                to.location()
            ),
        )
        .hint("name another repository with --to"));
    }
    let err = |e| sync_error(e, from, to);
    let chosen = choose(from.manifests().await.map_err(err)?, opts);
    let map = DigestMap::default();
    let mut report = SyncReport {
        from: from.location().to_string(),
        to: to.location().to_string(),
        raw: to.shares_chunk_keys(from),
        ..SyncReport::default()
    };
    for m in chosen {
        let mut done = SyncedBackup {
            id: m.id.clone(),
            host: m.host.clone(),
            vm: m.vm.clone(),
            status: "present",
            stats: CopyStats::default(),
        };
        if to.has_backup(&m.id).await.map_err(err)? {
            if !report.raw {
                // Its chunks are known in both: the next backup of the VM reuses them.
                to.learn_digests(from, &m.id, &map).await.map_err(err)?;
            }
            report.manifests_present += 1;
            report.backups.push(done);
            continue;
        }
        progress.event(Event::Phase {
            vm: format!("{}/{} {}", m.host, m.vm, m.id),
            phase: "sync",
        });
        done.stats = to
            .copy_backup(from, &m, &map, &Observer)
            .await
            .map_err(err)?;
        tracing::info!(
            id = %m.id,
            chunks_sent = done.stats.chunks_sent,
            chunks_skipped = done.stats.chunks_skipped,
            bytes_sent = done.stats.bytes_sent,
            "backup copied"
        );
        done.status = "copied";
        report.manifests_copied += 1;
        report.totals.add(&done.stats);
        report.backups.push(done);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, host: &str, vm: &str) -> Manifest {
        let mut v: Manifest = serde_json::from_value(serde_json::json!({
            "version": 1, "id": id, "host": host, "vm": vm,
            "time": "2026-11-26T21:00:00Z", "mode": "full", "reason": "", "parent": null,
            "protected": false, "domain_xml": "", "disks": [],
            "stats": { "bytes_read": 0, "bytes_new": 0, "bytes_stored": 0, "chunks_new": 0,
                       "chunks_reused": 0, "chunks_zero": 0, "chunks_unchanged": 0,
                       "duration_secs": 0.0 }
        }))
        .expect("manifest");
        v.id = id.into();
        v
    }

    fn ids(v: &[Manifest]) -> Vec<&str> {
        v.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn selection_and_latest_per_vm_keep_the_order() {
        let all = vec![
            m("1", "hv1", "web"),
            m("2", "hv1", "db"),
            m("3", "hv1", "web"),
            m("4", "hv2", "web"),
            m("5", "hv1", "web"),
        ];
        let opts = |sel: &[&str], latest| SyncOptions {
            selection: sel.iter().map(|s| s.to_string()).collect(),
            latest,
        };
        assert_eq!(
            ids(&choose(all.clone(), &opts(&[], None))),
            ["1", "2", "3", "4", "5"]
        );
        assert_eq!(
            ids(&choose(all.clone(), &opts(&["hv1"], None))),
            ["1", "2", "3", "5"]
        );
        assert_eq!(
            ids(&choose(all.clone(), &opts(&["hv1/web"], Some(2)))),
            ["3", "5"]
        );
        assert_eq!(
            ids(&choose(all.clone(), &opts(&[], Some(1)))),
            ["2", "4", "5"]
        );
        assert!(choose(all, &opts(&["hv1/we"], None)).is_empty());
    }
}
