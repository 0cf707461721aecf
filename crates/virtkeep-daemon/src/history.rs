//! Job history retention: which finished jobs leave the catalog.
//!
//! A finished job (succeeded, failed or cancelled) goes when it finished longer than
//! `history_max_age` ago, or when more than `history_max_jobs` newer finished jobs
//! exist. The newest successful backup of each VM stays whatever its age, so `/metrics`
//! keeps the VM's last-success time (an alert on a stale backup must not stop firing
//! because the evidence was deleted). Queued and running jobs are never touched.
//! Pure selection, tested without I/O; `Catalog::forget_jobs` deletes.

use std::collections::HashSet;
use std::time::Duration;

/// The configured limits (`[daemon] history_max_age`, `history_max_jobs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub max_age: Duration,
    pub max_jobs: usize,
}

/// Default: 90 days, and at most 100 000 finished jobs.
pub const DEFAULT_LIMITS: HistoryLimits = HistoryLimits {
    max_age: Duration::from_secs(90 * 24 * 3600),
    max_jobs: 100_000,
};

/// How often the daemon applies the limits (and once at start).
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// A finished job as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedJob {
    pub id: i64,
    pub host: String,
    pub vm: String,
    pub kind: String,
    /// A succeeded job of a kind whose last success the metrics and VM states show
    /// (backup, verify_boot, sync, gc, verify; a gc or verify job's VM is its
    /// repository): the newest per (kind, host, VM) is kept.
    pub success: bool,
    /// Unix seconds.
    pub finished: i64,
}

/// The ids of the jobs to remove at `now`.
pub fn expired(jobs: &[FinishedJob], now: i64, limits: HistoryLimits) -> Vec<i64> {
    let mut sorted: Vec<&FinishedJob> = jobs.iter().collect();
    sorted.sort_by(|a, b| b.finished.cmp(&a.finished).then(b.id.cmp(&a.id)));
    let mut seen: HashSet<(&str, &str, &str)> = HashSet::new();
    let max_age = i64::try_from(limits.max_age.as_secs()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(max_age);
    let mut out = Vec::new();
    for (rank, j) in sorted.into_iter().enumerate() {
        let last_success = j.success && seen.insert((&j.kind, &j.host, &j.vm));
        if last_success {
            continue;
        }
        if j.finished < cutoff || rank >= limits.max_jobs {
            out.push(j.id);
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    fn job(id: i64, vm: &str, ok: bool, days_ago: i64) -> FinishedJob {
        FinishedJob {
            id,
            host: "kvm1".into(),
            vm: vm.into(),
            kind: "backup".into(),
            success: ok,
            finished: 1000 * DAY - days_ago * DAY,
        }
    }

    fn limits(days: u64, max_jobs: usize) -> HistoryLimits {
        HistoryLimits {
            max_age: Duration::from_secs(days * 24 * 3600),
            max_jobs,
        }
    }

    #[test]
    fn old_jobs_go_but_each_vms_last_success_stays() {
        let jobs = [
            job(1, "a", true, 200), // a's older success: goes
            job(2, "a", true, 100), // a's last success: stays although old
            job(3, "a", false, 95), // an old failure: goes
            job(4, "b", false, 120),
            job(5, "b", true, 10),
            job(6, "a", false, 1),
        ];
        assert_eq!(expired(&jobs, 1000 * DAY, limits(90, 1000)), vec![1, 3, 4]);
        // Nothing is old enough: nothing goes.
        assert!(expired(&jobs, 1000 * DAY, limits(365, 1000)).is_empty());
    }

    #[test]
    fn beyond_the_count_the_oldest_go() {
        let jobs: Vec<FinishedJob> = (1..=10).map(|i| job(i, "a", false, 20 - i)).collect();
        // The newest three stay (ids 8, 9, 10: finished last).
        assert_eq!(
            expired(&jobs, 1000 * DAY, limits(90, 3)),
            (1..=7).collect::<Vec<_>>()
        );
        assert!(expired(&jobs, 1000 * DAY, limits(90, 10)).is_empty());
        // A success below the count is kept as the VM's last one.
        let mut with_ok = jobs.clone();
        with_ok[0].success = true;
        assert_eq!(
            expired(&with_ok, 1000 * DAY, limits(90, 3)),
            (2..=7).collect::<Vec<_>>()
        );
        assert!(expired(&[], 0, limits(1, 0)).is_empty());
    }

    /// The last success of each kind stays: a newer backup does not let the last
    /// boot verification or sync of the VM go.
    #[test]
    fn each_kinds_last_success_stays() {
        let of = |id, kind: &str, days_ago| FinishedJob {
            kind: kind.into(),
            ..job(id, "a", true, days_ago)
        };
        let jobs = [
            of(1, "verify_boot", 300),
            of(2, "verify_boot", 200),
            of(3, "sync", 150),
            of(4, "backup", 100),
        ];
        assert_eq!(expired(&jobs, 1000 * DAY, limits(90, 1000)), vec![1]);
    }

    #[test]
    fn the_same_time_is_ordered_by_id() {
        let jobs = [job(1, "a", false, 5), job(2, "a", false, 5)];
        assert_eq!(expired(&jobs, 1000 * DAY, limits(90, 1)), vec![1]);
    }
}
