//! Retention with Proxmox Backup Server's keep-* semantics.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::Result;
use crate::manifest::SnapshotSummary;
use crate::repo::Repository;

/// Keep options; `None`/0 = option unused. No option set at all keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// Keep the last N backups.
    pub last: Option<u32>,
    /// Keep the last backup of each of the last N hours that have backups.
    pub hourly: Option<u32>,
    /// … days.
    pub daily: Option<u32>,
    /// … ISO weeks.
    pub weekly: Option<u32>,
    /// … months.
    pub monthly: Option<u32>,
    /// … years.
    pub yearly: Option<u32>,
}

impl KeepPolicy {
    fn any(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .any(|o| o.is_some_and(|n| n > 0))
    }
}

/// One backup's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneDecision {
    /// Backup id.
    pub id: String,
    /// Host.
    pub host: String,
    /// VM.
    pub vm: String,
    /// Kept?
    pub keep: bool,
    /// `keep-last`, `keep-daily`, …, `protected`, `in use by a running backup`,
    /// `keep-all (no keep option)` or `not selected by any keep option`.
    pub reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Keep(&'static str),
    Protected,
    Remove,
}

fn period(t: OffsetDateTime, kind: &str) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    match kind {
        "keep-hourly" => format!("{}/{}/{}/{}", t.year(), t.month() as u8, t.day(), t.hour()),
        "keep-daily" => format!("{}/{}/{}", t.year(), t.month() as u8, t.day()),
        "keep-weekly" => {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y}/{w}")
        }
        "keep-monthly" => format!("{}/{}", t.year(), t.month() as u8),
        "keep-yearly" => format!("{}", t.year()),
        _ => String::new(),
    }
}

/// Apply `policy` to one group (one host/VM). Pure; periods in UTC.
pub fn compute_prune(group: &[SnapshotSummary], policy: &KeepPolicy) -> Vec<PruneDecision> {
    compute_prune_within(group, policy, None)
}

/// [`compute_prune`] that also keeps every backup taken within `within` of the group's
/// newest one (restic's `--keep-within`), before the other options are applied.
pub fn compute_prune_within(
    group: &[SnapshotSummary],
    policy: &KeepPolicy,
    within: Option<time::Duration>,
) -> Vec<PruneDecision> {
    let mut list: Vec<&SnapshotSummary> = group.iter().collect();
    list.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id))); // newest first
    let any = policy.any() || within.is_some();
    let mut mark: HashMap<&str, Mark> = HashMap::new();
    if let (Some(w), Some(newest)) = (within, list.first()) {
        let since = newest.time - w;
        for s in list.iter().filter(|s| !s.protected && s.time >= since) {
            mark.insert(&s.id, Mark::Keep("keep-within"));
        }
    }
    if policy.any() {
        mark_periods(&list, policy, &mut mark);
    }
    list.iter()
        .map(|s| {
            let m = if !any {
                Mark::Keep("keep-all (no keep option)")
            } else if s.protected {
                Mark::Protected
            } else {
                mark.get(s.id.as_str()).copied().unwrap_or(Mark::Remove)
            };
            let (keep, reason) = match m {
                Mark::Keep(r) => (true, r.to_string()),
                Mark::Protected => (true, "protected".to_string()),
                Mark::Remove => (false, "not selected by any keep option".to_string()),
            };
            PruneDecision {
                id: s.id.clone(),
                host: s.host.clone(),
                vm: s.vm.clone(),
                keep,
                reason,
            }
        })
        .collect()
}

/// The keep-last/hourly/… options over `list` (newest first), in that order.
fn mark_periods<'a>(
    list: &[&'a SnapshotSummary],
    policy: &KeepPolicy,
    mark: &mut HashMap<&'a str, Mark>,
) {
    let opts: [(&'static str, Option<u32>); 6] = [
        ("keep-last", policy.last),
        ("keep-hourly", policy.hourly),
        ("keep-daily", policy.daily),
        ("keep-weekly", policy.weekly),
        ("keep-monthly", policy.monthly),
        ("keep-yearly", policy.yearly),
    ];
    for (name, keep) in opts {
        let Some(keep) = keep.filter(|k| *k > 0) else {
            continue;
        };
        let sel = |s: &SnapshotSummary| {
            if name == "keep-last" {
                s.id.clone()
            } else {
                period(s.time, name)
            }
        };
        let mut already: HashSet<String> = HashSet::new();
        for s in list {
            if let Some(Mark::Keep(_)) = mark.get(s.id.as_str()) {
                already.insert(sel(s));
            }
        }
        let mut include: HashSet<String> = HashSet::new();
        for s in list {
            if mark.contains_key(s.id.as_str()) {
                continue;
            }
            if s.protected {
                mark.insert(&s.id, Mark::Protected);
                continue;
            }
            let id = sel(s);
            if already.contains(&id) {
                continue;
            }
            if !include.contains(&id) {
                if include.len() >= keep as usize {
                    break;
                }
                include.insert(id);
                mark.insert(&s.id, Mark::Keep(name));
            } else {
                mark.insert(&s.id, Mark::Remove);
            }
        }
    }
}

impl Repository {
    /// Prune every (host, vm) group, or only `group` when given. Removed backups are
    /// forgotten unless `dry_run`; chunks are freed by the next GC. Decisions are listed
    /// newest first within each group.
    ///
    /// Backups whose manifest cannot be read are left alone and logged;
    /// [`Repository::prune_report`] names them.
    pub async fn prune(
        &self,
        policy: &KeepPolicy,
        group: Option<(&str, &str)>,
        dry_run: bool,
    ) -> Result<Vec<PruneDecision>> {
        self.prune_within(policy, None, group, dry_run).await
    }

    /// [`Repository::prune`] with [`compute_prune_within`]'s `within`.
    pub async fn prune_within(
        &self,
        policy: &KeepPolicy,
        within: Option<time::Duration>,
        group: Option<(&str, &str)>,
        dry_run: bool,
    ) -> Result<Vec<PruneDecision>> {
        let report = self
            .prune_report_within(policy, within, group, dry_run)
            .await?;
        crate::repo::log_unreadable(&report.unreadable);
        Ok(report.decisions)
    }

    /// [`Repository::prune`], also naming the backups whose manifest cannot be read
    /// (they are never removed by prune: nothing says which group they belong to).
    pub async fn prune_report(
        &self,
        policy: &KeepPolicy,
        group: Option<(&str, &str)>,
        dry_run: bool,
    ) -> Result<PruneReport> {
        self.prune_report_within(policy, None, group, dry_run).await
    }

    /// [`Repository::prune_report`] with [`compute_prune_within`]'s `within`.
    pub async fn prune_report_within(
        &self,
        policy: &KeepPolicy,
        within: Option<time::Duration>,
        group: Option<(&str, &str)>,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let listing = self.list_snapshots().await?;
        let snaps = listing.snapshots;
        let mut groups: std::collections::BTreeMap<(String, String), Vec<SnapshotSummary>> =
            Default::default();
        for s in snaps {
            if let Some((h, v)) = group
                && (s.host != h || s.vm != v)
            {
                continue;
            }
            groups
                .entry((s.host.clone(), s.vm.clone()))
                .or_default()
                .push(s);
        }
        let now = self.storage_now().await?;
        let pinned: HashSet<String> = self
            .live_leases(now)
            .await?
            .into_iter()
            .flat_map(|(_, l)| l.pins)
            .collect();
        let mut out = Vec::new();
        for (_, g) in groups {
            for mut d in compute_prune_within(&g, policy, within) {
                if !d.keep && pinned.contains(&d.id) {
                    d.keep = true;
                    d.reason = "in use by a running backup".into();
                }
                if !d.keep && !dry_run {
                    match self.forget(&d.id).await {
                        Ok(()) => {}
                        Err(crate::RepoError::InUse { .. }) => {
                            d.keep = true;
                            d.reason = "in use by a running backup".into();
                        }
                        Err(crate::RepoError::Retained { until, .. }) => {
                            d.keep = true;
                            d.reason = format!("under object lock retention until {until}");
                        }
                        Err(e) => return Err(e),
                    }
                }
                out.push(d);
            }
        }
        Ok(PruneReport {
            decisions: out,
            unreadable: listing.unreadable,
        })
    }
}

/// Result of [`Repository::prune_report`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// One decision per readable backup, newest first within each group.
    pub decisions: Vec<PruneDecision>,
    /// Backups whose manifest cannot be read: skipped.
    pub unreadable: Vec<crate::repo::UnreadableManifest>,
}
