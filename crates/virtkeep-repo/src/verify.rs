//! `verify`: can the selected backups be restored? Two levels, as restic's `check`:
//! the default reads and authenticates every manifest and index and checks that every
//! chunk an index names exists (one listing of `chunks/`, no chunk is downloaded, cheap
//! on S3); `read_data` downloads and decodes every chunk as well (digest and, encrypted,
//! authentication), which is what finds a chunk whose bytes changed.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::{Digest, ZERO_DIGEST, chunk_key};
use crate::progress::{QuietProgress, RepoProgress};
use crate::repo::{Repository, parse_chunk_key};

/// Which backups `verify` checks.
#[derive(Debug, Clone)]
pub enum VerifySelection {
    /// Every backup.
    All,
    /// These backups.
    Snapshots(Vec<String>),
}

/// Options for [`Repository::verify`].
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The backups to check.
    pub selection: VerifySelection,
    /// Download and decode every chunk; otherwise only check that it exists.
    pub read_data: bool,
}

impl VerifyOptions {
    /// The cheap check (metadata and existence) of `selection`.
    pub fn new(selection: VerifySelection) -> Self {
        VerifyOptions {
            selection,
            read_data: false,
        }
    }

    /// Also download and decode every chunk.
    pub fn with_read_data(mut self) -> Self {
        self.read_data = true;
        self
    }
}

/// A missing or corrupt chunk and the backups it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChunkProblem {
    /// Hex digest.
    pub digest: String,
    /// What is wrong.
    pub error: String,
    /// Backups referencing it.
    pub snapshots: Vec<String>,
}

/// Result of `verify`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Whether chunk contents were read (`--read-data`) or only their existence checked.
    pub read_data: bool,
    /// Backups looked at.
    pub snapshots_checked: u64,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Chunks that passed (exist; with `read_data`: decode to their digest).
    pub chunks_ok: u64,
    /// Missing chunks.
    pub missing: Vec<ChunkProblem>,
    /// Corrupt chunks (only found with `read_data`).
    pub corrupt: Vec<ChunkProblem>,
    /// Manifest/index problems.
    pub metadata_errors: Vec<String>,
    /// Backups that cannot be fully restored.
    pub broken_snapshots: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong (the CLI exits non-zero otherwise).
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.metadata_errors.is_empty()
    }

    fn mark_broken(&mut self, id: &str) {
        if !self.broken_snapshots.iter().any(|b| b == id) {
            self.broken_snapshots.push(id.to_string());
        }
    }
}

/// Which backups reference each chunk (all-zero chunks are never stored).
type Users = HashMap<Digest, Vec<String>>;

impl Repository {
    /// Check the selected backups (see the module documentation for the two levels).
    pub async fn verify(&self, opts: VerifyOptions) -> Result<VerifyReport> {
        self.verify_reporting(opts, &QuietProgress).await
    }

    /// [`Repository::verify`], reporting its stages to `progress`.
    pub async fn verify_reporting(
        &self,
        opts: VerifyOptions,
        progress: &dyn RepoProgress,
    ) -> Result<VerifyReport> {
        let ids: Vec<String> = match opts.selection {
            VerifySelection::All => self.snapshot_ids().await?.0,
            VerifySelection::Snapshots(v) => v,
        };
        let mut report = VerifyReport {
            read_data: opts.read_data,
            ..VerifyReport::default()
        };
        let users = self.check_metadata(&ids, &mut report, progress).await;
        let mut broken: BTreeSet<String> = report.broken_snapshots.iter().cloned().collect();
        if opts.read_data {
            self.check_contents(&users, &mut report, progress).await;
        } else {
            self.check_existence(&users, &mut report, progress).await?;
        }
        for p in report.missing.iter().chain(&report.corrupt) {
            broken.extend(p.snapshots.iter().cloned());
        }
        report.broken_snapshots = broken.into_iter().collect();
        report.missing.sort_by(|a, b| a.digest.cmp(&b.digest));
        report.corrupt.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(report)
    }

    /// Reads (and so authenticates) every selected manifest and index; returns which
    /// backups use each chunk.
    async fn check_metadata(
        &self,
        ids: &[String],
        report: &mut VerifyReport,
        progress: &dyn RepoProgress,
    ) -> Users {
        progress.stage("reading manifests and indexes", Some(ids.len() as u64));
        let mut users = Users::new();
        for id in ids {
            report.snapshots_checked += 1;
            let m = match self.manifest(id).await {
                Ok(m) => m,
                Err(e) => {
                    report.metadata_errors.push(format!("{id}: {e}"));
                    report.mark_broken(id);
                    progress.advance(1);
                    continue;
                }
            };
            match self.nvram_index(&m).await {
                Ok(ix) => {
                    let digests = ix.into_iter().flat_map(|ix| ix.digests);
                    for dg in digests.filter(|d| *d != ZERO_DIGEST) {
                        let u = users.entry(dg).or_default();
                        if u.last() != Some(id) {
                            u.push(id.clone());
                        }
                    }
                }
                Err(e) => {
                    report.metadata_errors.push(format!("{id}/nvram: {e}"));
                    report.mark_broken(id);
                }
            }
            for d in &m.disks {
                match self.fixed_index(id, &d.spec.name).await {
                    Ok(ix) => {
                        for dg in ix.digests.into_iter().filter(|d| *d != ZERO_DIGEST) {
                            let u = users.entry(dg).or_default();
                            if u.last() != Some(id) {
                                u.push(id.clone());
                            }
                        }
                    }
                    Err(e) => {
                        let name = &d.spec.name;
                        report.metadata_errors.push(format!("{id}/{name}: {e}"));
                        report.mark_broken(id);
                    }
                }
            }
            progress.advance(1);
        }
        users
    }

    /// Every used chunk exists: one listing of `chunks/` (a thousand keys a request on
    /// S3, instead of a request per chunk); a chunk the listing lacks is asked for once
    /// more by name, since a listing may lag behind a store's writes.
    async fn check_existence(
        &self,
        users: &Users,
        report: &mut VerifyReport,
        progress: &dyn RepoProgress,
    ) -> Result<()> {
        progress.stage("listing chunks", None);
        let mut present: HashSet<Digest> = HashSet::new();
        let mut listing = self.backend().list("chunks/");
        while let Some(o) = listing.try_next().await? {
            if let Some(d) = parse_chunk_key(&o.key).filter(|d| users.contains_key(d)) {
                present.insert(d);
            }
            progress.advance(1);
        }
        progress.stage("checking chunks", Some(users.len() as u64));
        for (d, snaps) in users {
            report.chunks_checked += 1;
            if present.contains(d) || self.backend().head(&chunk_key(d)).await?.is_some() {
                report.chunks_ok += 1;
            } else {
                report.missing.push(ChunkProblem {
                    digest: hex::encode(d),
                    error: "missing".into(),
                    snapshots: snaps.clone(),
                });
            }
            progress.advance(1);
        }
        Ok(())
    }

    /// Downloads and decodes every used chunk.
    async fn check_contents(
        &self,
        users: &Users,
        report: &mut VerifyReport,
        progress: &dyn RepoProgress,
    ) {
        progress.stage("reading chunks", Some(users.len() as u64));
        let mut results = futures::stream::iter(users.keys().copied())
            .map(|d| async move { (d, self.read_chunk_by_digest(&d).await) })
            .buffer_unordered(self.parallelism().max(2) * 2);
        while let Some((d, r)) = results.next().await {
            report.chunks_checked += 1;
            progress.advance(1);
            let snapshots = users.get(&d).cloned().unwrap_or_default();
            match r {
                Ok(_) => report.chunks_ok += 1,
                Err(RepoError::ChunkMissing { digest }) => report.missing.push(ChunkProblem {
                    digest,
                    error: "missing".into(),
                    snapshots,
                }),
                Err(e) => report.corrupt.push(ChunkProblem {
                    digest: hex::encode(d),
                    error: e.to_string(),
                    snapshots,
                }),
            }
        }
    }
}
