//! `[maintenance.REPOSITORY]`: the daemon runs a repository's GC and verify on schedules,
//! as `virtkeep gc` and `virtkeep verify` would.
//!
//! ```toml
//! [maintenance.default]          # "default" is [repository]; or a name from [repositories]
//! gc = { every = "1d" }          # or cron = "0 3 * * *" (timezone = "…"); grace = "24h"
//! verify = { cron = "0 4 * * 0", read_data = true, sample = 20 }
//! ```
//!
//! Each run is a catalog job of kind `gc` or `verify` (no host, the repository's name as
//! its VM), in `GET /api/jobs`, on the console's repository card and in `/metrics`. The
//! runs of one repository are made by one task, one after the other, so its GC and its
//! verify never overlap (a verify beside a GC would report the chunks the GC is
//! removing); like the sync jobs they run on the cluster's leader only. GC takes the
//! repository's GC lock and keeps what running backups' leases and the grace protect,
//! exactly as the command does. A restart does not run a task again before its time:
//! the next run follows the last one recorded in the catalog.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::catalog::{Catalog, JobOutcome};
pub use crate::maintenance_config::{GcTask, Maintenance, Task, VerifyTask, parse};
use crate::recorded::Recorded;
use crate::schedule::Schedule;
use crate::task::{Env, open_repository};

/// The next run of one repository's tasks: the earlier of the two; at the same time GC
/// first (the verify then checks what the GC left).
pub fn next_task(
    gc: Option<DateTime<Utc>>,
    verify: Option<DateTime<Utc>>,
) -> Option<(Task, DateTime<Utc>)> {
    match (gc, verify) {
        (Some(g), Some(v)) if v < g => Some((Task::Verify, v)),
        (Some(g), _) => Some((Task::Gc, g)),
        (None, Some(v)) => Some((Task::Verify, v)),
        (None, None) => None,
    }
}

/// A task's first run at start (or when this node takes the lead): after the last run
/// the catalog records (`last`, when it started), at once when that time has passed;
/// the schedule's first run when there is none.
pub fn first_run(
    s: &Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    match last {
        None => s.first_run(now),
        Some(t) => s.next_after(t).map(|n| n.max(now)),
    }
}

/// When the newest run of `task` on `name` started, from the catalog.
fn last_started(catalog: &Catalog, task: Task, name: &str) -> Option<DateTime<Utc>> {
    let jobs = catalog
        .last_jobs(task.kind())
        .map_err(|e| tracing::warn!("the last {} runs are not known: {e}", task.kind()))
        .ok()?;
    let j = jobs
        .into_iter()
        .find(|j| j.host.is_empty() && j.vm == name)?;
    let t = j.started.as_deref().or(j.finished.as_deref())?;
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

const STOPPED: &str = "stopped: the daemon ended or this node lost the lead; the GC lock it held expires, and the next run starts over";

/// Longest error text a run records (a verify of a damaged repository names many chunks).
const MAX_ERROR: usize = 2000;

async fn gc(env: &Env, m: &Maintenance, t: &GcTask) -> Result<JobOutcome, String> {
    let repo = open_repository(
        env.repository_config(m.repository.as_deref())
            .map_err(|e| e.to_string())?,
    )
    .await
    .map_err(|e| e.to_string())?;
    let opts = virtkeep_repo::GcOptions {
        grace: t.grace,
        dry_run: false,
    };
    let r = repo.gc(opts).await.map_err(|e| e.to_string())?;
    let mut note = format!(
        "{} chunks removed, {} bytes freed; {} kept, {} unreferenced but too recent",
        r.chunks_removed, r.bytes_freed, r.chunks_kept, r.chunks_too_recent
    );
    if r.objects_retained > 0 {
        note.push_str(&format!(
            "; {} kept under object lock retention",
            r.objects_retained
        ));
    }
    Ok(JobOutcome {
        bytes_new: i64::try_from(r.bytes_freed).ok(),
        note: Some(note),
        ..Default::default()
    })
}

/// The backups a verify run checks: all, or `sample` of them at random.
fn sample(mut ids: Vec<String>, n: Option<usize>) -> Vec<String> {
    if let Some(n) = n {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        ids.sort_by_key(|id| s.hash_one(id));
        ids.truncate(n);
        ids.sort();
    }
    ids
}

async fn verify(env: &Env, m: &Maintenance, t: &VerifyTask) -> Result<JobOutcome, String> {
    let repo = open_repository(
        env.repository_config(m.repository.as_deref())
            .map_err(|e| e.to_string())?,
    )
    .await
    .map_err(|e| e.to_string())?;
    let selection = match t.sample {
        None => virtkeep_repo::VerifySelection::All,
        Some(n) => {
            // The sample is drawn from the readable backups; an unreadable manifest is
            // always checked, so that the run reports it.
            let listing = repo.list_snapshots().await.map_err(|e| e.to_string())?;
            let mut ids = sample(
                listing.snapshots.into_iter().map(|b| b.id).collect(),
                Some(n),
            );
            ids.extend(listing.unreadable.into_iter().map(|u| u.id));
            virtkeep_repo::VerifySelection::Snapshots(ids)
        }
    };
    let opts = virtkeep_repo::VerifyOptions {
        selection,
        read_data: t.read_data,
    };
    let r = repo.verify(opts).await.map_err(|e| e.to_string())?;
    let note = format!(
        "{} backups, {} chunks {}, {} ok",
        r.snapshots_checked,
        r.chunks_checked,
        if r.read_data { "read" } else { "looked up" },
        r.chunks_ok
    );
    let error = (!r.is_ok()).then(|| {
        let mut e = format!(
            "{} missing, {} corrupt chunks, {} metadata errors; broken backups: {}",
            r.missing.len(),
            r.corrupt.len(),
            r.metadata_errors.len(),
            r.broken_snapshots.join(", ")
        );
        if let Some(m) = r.metadata_errors.first() {
            e.push_str(&format!("; first metadata error: {m}"));
        }
        bounded(e)
    });
    Ok(JobOutcome {
        error,
        note: Some(note),
        ..Default::default()
    })
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Runs one task under its timeout and records it.
async fn run(env: &Env, catalog: &Arc<Catalog>, m: &Maintenance, task: Task) {
    let (work, limit) = match (task, &m.gc, &m.verify) {
        (Task::Gc, Some(g), _) => (futures::future::Either::Left(gc(env, m, g)), g.timeout),
        (Task::Verify, _, Some(v)) => {
            (futures::future::Either::Right(verify(env, m, v)), v.timeout)
        }
        // next_task only yields tasks that have a schedule.
        _ => return,
    };
    tracing::info!(repository = %m.name, task = task.kind(), "maintenance starting");
    let recorded = Recorded::start(catalog.clone(), env, task.kind(), &m.name, STOPPED);
    let t0 = std::time::Instant::now();
    let res = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "did not end within its timeout ({} s)",
            limit.as_secs()
        )),
    };
    let mut outcome = res.unwrap_or_else(|e| JobOutcome {
        error: Some(bounded(e)),
        ..Default::default()
    });
    outcome.duration = Some(t0.elapsed().as_secs_f64());
    match &outcome.error {
        None => {
            tracing::info!(repository = %m.name, task = task.kind(), note = ?outcome.note, "maintenance finished")
        }
        Some(e) => {
            tracing::error!(repository = %m.name, task = task.kind(), "maintenance failed: {e}")
        }
    }
    recorded.finish(&outcome).await;
}

/// Starts one task per `[maintenance.NAME]`, running its GC and verify at their times,
/// one after the other, until the daemon ends (or this node loses the lead).
pub fn spawn(env: Arc<Env>, catalog: Arc<Catalog>) -> Vec<tokio::task::JoinHandle<()>> {
    env.daemon
        .maintenance
        .iter()
        .cloned()
        .map(|m| {
            let env = env.clone();
            let catalog = catalog.clone();
            tokio::spawn(async move {
                let now = Utc::now();
                let first = |s: &Schedule, t| first_run(s, last_started(&catalog, t, &m.name), now);
                let mut next_gc = m.gc.as_ref().and_then(|g| first(&g.schedule, Task::Gc));
                let mut next_verify = m
                    .verify
                    .as_ref()
                    .and_then(|v| first(&v.schedule, Task::Verify));
                while let Some((task, at)) = next_task(next_gc, next_verify) {
                    let wait = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    run(&env, &catalog, &m, task).await;
                    let after = Utc::now().max(at);
                    match task {
                        Task::Gc => {
                            next_gc = m.gc.as_ref().and_then(|g| g.schedule.next_after(after))
                        }
                        Task::Verify => {
                            next_verify =
                                m.verify.as_ref().and_then(|v| v.schedule.next_after(after))
                        }
                    }
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::path::Path;
    use std::time::Duration;
    use virtkeep_engine::config::Config as EngineConfig;

    use crate::error::ConfigError;
    use crate::maintenance_config::DEFAULT_TIMEOUT;

    fn engine() -> EngineConfig {
        toml::from_str("[repository]\nlocation = \"/srv/repo\"\n[repositories.offsite]\nlocation = \"s3://b/p\"\n")
            .expect("engine config")
    }

    fn parse_text(text: &str) -> Result<Vec<Maintenance>, ConfigError> {
        parse(Path::new("/etc/virtkeep/config.toml"), text, &engine())
    }

    #[test]
    fn parses_schedules_and_refuses_mistakes() {
        let m = parse_text(
            "[maintenance.default]\ngc = { every = \"1d\", grace = \"2h\" }\n\
             verify = { cron = \"0 4 * * 0\", read_data = true, sample = 5 }\n\
             [maintenance.offsite.verify]\nevery = \"7d\"\n",
        )
        .expect("parse");
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].name.as_str(), m[0].repository.as_deref()),
            ("default", None)
        );
        let g = m[0].gc.as_ref().expect("gc");
        assert_eq!(
            (g.grace, g.timeout),
            (Duration::from_secs(7200), DEFAULT_TIMEOUT)
        );
        let v = m[0].verify.as_ref().expect("verify");
        assert_eq!((v.read_data, v.sample), (true, Some(5)));
        assert_eq!(m[1].repository.as_deref(), Some("offsite"));
        assert!(m[1].gc.is_none() && !m[1].verify.as_ref().expect("v").read_data);
        for (text, want) in [
            ("[maintenance.nowhere.gc]\nevery = \"1d\"\n", "nowhere"),
            (
                "[maintenance.default.gc]\ngrace = \"1d\"\n",
                "cron and every",
            ),
            (
                "[maintenance.default.gc]\nevery = \"1d\"\nread_data = true\n",
                "read_data",
            ),
            ("[maintenance.default.verify]\nevery = \"soon\"\n", "soon"),
            (
                "[maintenance.default.verify]\nevery = \"1d\"\nsample = 0\n",
                "sample = 0",
            ),
        ] {
            let e = parse_text(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn gc_and_verify_of_a_repository_take_turns() {
        let t = |h| Utc.with_ymd_and_hms(2026, 3, 10, h, 0, 0).single();
        assert_eq!(next_task(t(3), t(4)), Some((Task::Gc, t(3).expect("t"))));
        assert_eq!(
            next_task(t(5), t(4)),
            Some((Task::Verify, t(4).expect("t")))
        );
        // Due together: GC first, the verify then checks what it left.
        assert_eq!(next_task(t(4), t(4)), Some((Task::Gc, t(4).expect("t"))));
        assert_eq!(
            next_task(None, t(4)),
            Some((Task::Verify, t(4).expect("t")))
        );
        assert_eq!(next_task(None, None), None);
    }

    #[test]
    fn a_restart_keeps_the_rhythm_of_the_recorded_runs() {
        let now = Utc
            .with_ymd_and_hms(2026, 3, 10, 12, 0, 0)
            .single()
            .expect("t");
        let daily = Schedule::every(
            Duration::from_secs(86400),
            "1d",
            virtkeep_engine::plan::ModeRequest::Auto,
        );
        // Never ran: at once. Ran an hour ago: a day after that run, not again now.
        assert_eq!(first_run(&daily, None, now), Some(now));
        let hour_ago = now - chrono::Duration::hours(1);
        assert_eq!(
            first_run(&daily, Some(hour_ago), now),
            Some(hour_ago + chrono::Duration::days(1))
        );
        // Ran two days ago (the daemon was down): at once, once.
        assert_eq!(
            first_run(&daily, Some(now - chrono::Duration::days(2)), now),
            Some(now)
        );
    }

    #[test]
    fn a_sample_is_that_many_distinct_backups() {
        let ids: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
        let s = sample(ids.clone(), Some(3));
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|i| ids.contains(i)) && s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(ids.clone(), None), ids);
        assert_eq!(sample(ids.clone(), Some(50)).len(), 10);
    }
}
