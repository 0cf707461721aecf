//! The dashboard's repository card: usage and dedup ratio of the default repository (as
//! `virtkeep stats` counts them) and whether a GC holds its lock now. Counting lists
//! every chunk object, which takes long on a big S3 repository: it runs in the
//! background, at most one at a time and at most every [`REFRESH`], under a
//! [`DEADLINE`]; the dashboard shows the last figures and their age, never waits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use maud::{Markup, html};

use super::view::{WebState, age, bytes, unix};
use crate::catalog::{Catalog, JobRecord, JobStatus};
use crate::policy::DaemonConfig;

/// Figures older than this are counted again (in the background) when the dashboard is shown.
pub const REFRESH: Duration = Duration::from_secs(600);
/// ... and figures older than a backup that finished since, but at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Longest a count may take.
pub const DEADLINE: Duration = Duration::from_secs(300);
/// The GC's exclusive lock (docs/format.md, "Concurrency").
const GC_LOCK: &str = "locks/gc";

/// What the card shows.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoFigures {
    pub location: String,
    pub backups: usize,
    pub chunks: u64,
    /// Bytes of the chunk objects (what the storage holds).
    pub stored_bytes: u64,
    /// Disk bytes of all backups (what restores would write).
    pub logical_bytes: u64,
    /// Seconds a GC has held its lock, if one does now.
    pub gc_running: Option<u64>,
}

impl RepoFigures {
    /// logical / stored; 0 for an empty repository.
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}

#[derive(Debug, Clone)]
struct Counted {
    at: Instant,
    /// When the count started (unix seconds).
    started: i64,
    figures: Result<RepoFigures, String>,
}

#[derive(Default)]
pub struct RepoStats {
    last: Mutex<Option<Counted>>,
    running: Mutex<bool>,
}

/// Counts the default repository.
async fn count(s: &WebState) -> Result<RepoFigures, String> {
    let repo = crate::task::open_repository(&s.api.env.default_repository)
        .await
        .map_err(|e| e.to_string())?;
    let list = repo.snapshots().await.map_err(|e| e.to_string())?;
    let be = repo.backend();
    let (mut chunks, mut stored) = (0u64, 0u64);
    let mut objects = be.list("chunks/");
    while let Some(o) = objects.try_next().await.map_err(|e| e.to_string())? {
        chunks += 1;
        stored += o.size;
    }
    let gc = be.head(GC_LOCK).await.map_err(|e| e.to_string())?;
    let gc_running = gc.map(|h| {
        SystemTime::now()
            .duration_since(h.modified)
            .unwrap_or_default()
            .as_secs()
    });
    Ok(RepoFigures {
        location: repo.location().to_string(),
        backups: list.len(),
        chunks,
        stored_bytes: stored,
        logical_bytes: list.iter().map(|b| b.size).sum(),
        gc_running,
    })
}

impl RepoStats {
    /// The last figures and their age; starts a count in the background (unless one
    /// runs) when there are none, or they are older than [`REFRESH`], or older than
    /// `newest_backup` (unix seconds) and [`MIN_INTERVAL`].
    pub fn current(
        &self,
        s: &Arc<WebState>,
        newest_backup: Option<i64>,
    ) -> Option<(Duration, Result<RepoFigures, String>)> {
        let last = self.last.lock().ok()?.clone();
        let stale = last.as_ref().is_none_or(|c| {
            let age = c.at.elapsed();
            age >= REFRESH || (age >= MIN_INTERVAL && newest_backup.is_some_and(|t| t >= c.started))
        });
        if stale {
            self.start(s);
        }
        last.map(|c| (c.at.elapsed(), c.figures))
    }

    /// Starts a count in the background, unless one runs.
    fn start(&self, s: &Arc<WebState>) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if *running {
            return;
        }
        *running = true;
        let s = s.clone();
        tokio::spawn(async move {
            let started = crate::catalog::now();
            let figures = match tokio::time::timeout(DEADLINE, count(&s)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "counting took longer than {} s",
                    DEADLINE.as_secs()
                )),
            };
            let stats = &s.repo_stats;
            if let Ok(mut last) = stats.last.lock() {
                *last = Some(Counted {
                    at: Instant::now(),
                    started,
                    figures,
                });
            }
            if let Ok(mut running) = stats.running.lock() {
                *running = false;
            }
        });
    }
}

/// The default repository's maintenance as the card shows it: the newest finished GC
/// and verify runs of `[maintenance.default]` (catalog jobs), and whether they are
/// scheduled.
#[derive(Debug, Clone, Default)]
pub struct Maintained {
    pub gc: Option<JobRecord>,
    pub verify: Option<JobRecord>,
    pub gc_scheduled: bool,
    pub verify_scheduled: bool,
}

/// The default repository's last GC and verify runs, from the catalog.
pub fn maintained(daemon: &DaemonConfig, catalog: &Catalog) -> crate::Result<Maintained> {
    let last = |kind: &str| -> crate::Result<Option<JobRecord>> {
        let jobs = catalog.last_jobs(kind)?;
        Ok(jobs
            .into_iter()
            .find(|j| j.host.is_empty() && j.vm == "default"))
    };
    let m = daemon.maintenance.iter().find(|m| m.repository.is_none());
    Ok(Maintained {
        gc: last("gc")?,
        verify: last("verify")?,
        gc_scheduled: m.is_some_and(|m| m.gc.is_some()),
        verify_scheduled: m.is_some_and(|m| m.verify.is_some()),
    })
}

/// A maintenance task's last run: result (linked to its job), age, what it did.
fn last_run(j: &Option<JobRecord>, scheduled: bool, now: i64) -> Markup {
    html! {
        @match j {
            Some(j) => {
                a href={"/ui/jobs/" (j.id)} {
                    @if j.status == JobStatus::Succeeded { "ok" } @else { b.bad { (j.status.as_str()) } }
                }
                @if let Some(t) = j.finished.as_deref().and_then(unix) { " " (age(now - t)) " ago" }
                @if let Some(n) = &j.note { br; small { (n) } }
                @if let Some(e) = &j.error { br; small.error { (e) } }
            }
            None if scheduled => "scheduled, not run yet",
            None => small.hint { "not scheduled ([maintenance.default] in the daemon's configuration)" },
        }
    }
}

/// The card: usage, dedup ratio, GC and verify state.
pub fn card(
    current: Option<(Duration, Result<RepoFigures, String>)>,
    m: &Maintained,
    now: i64,
) -> Markup {
    html! {
        section.card aria-labelledby="repo-h" {
            h2 #repo-h { "Repository" }
            @match current {
                None => p.hint { "Counting the repository's chunks… (reload in a moment)" },
                Some((_, Err(e))) => p.error role="alert" { "The repository could not be counted: " (e) },
                Some((old, Ok(f))) => dl {
                    dt { "Location" } dd { code { (f.location) } }
                    dt { "Backups" } dd { (f.backups) ", holding " (bytes(f.logical_bytes)) " of disks" }
                    dt { "Stored" } dd { (bytes(f.stored_bytes)) " in " (f.chunks) " chunks" }
                    dt { "Dedup ratio" } dd { (format!("{:.1}×", f.dedup_ratio())) }
                    dt { "GC" } dd {
                        @match f.gc_running {
                            Some(secs) => { b.warn { "running" } " for " (age(secs as i64)) }
                            None => "not running",
                        }
                    }
                    dt { "Counted" } dd { (age(old.as_secs() as i64)) " ago" }
                },
            }
            dl {
                dt { "Last GC" } dd { (last_run(&m.gc, m.gc_scheduled, now)) }
                dt { "Last verify" } dd { (last_run(&m.verify, m.verify_scheduled, now)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_shows_usage_ratio_and_gc() {
        let f = RepoFigures {
            location: "/srv/repo".into(),
            backups: 3,
            chunks: 10,
            stored_bytes: 1 << 20,
            logical_bytes: 5 << 20,
            gc_running: Some(300),
        };
        assert_eq!(f.dedup_ratio(), 5.0);
        let none = Maintained::default();
        let page = card(Some((Duration::from_secs(30), Ok(f.clone()))), &none, 0).into_string();
        for want in [
            "1.0 MiB in 10 chunks",
            "3, holding 5.0 MiB",
            "5.0×",
            "running</b> for 5 min",
            "30 s ago",
        ] {
            assert!(page.contains(want), "{want}: {page}");
        }
        let idle = RepoFigures {
            gc_running: None,
            stored_bytes: 0,
            ..f
        };
        assert_eq!(idle.dedup_ratio(), 0.0);
        assert!(
            card(Some((Duration::ZERO, Ok(idle))), &none, 0)
                .into_string()
                .contains("not running")
        );
        assert!(card(None, &none, 0).into_string().contains("Counting"));
        let failed = card(
            Some((Duration::ZERO, Err("no such bucket".into()))),
            &none,
            0,
        )
        .into_string();
        assert!(failed.contains("could not be counted: no such bucket"));
    }

    #[test]
    fn the_card_links_the_last_gc_and_verify_runs() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let run = |kind: &str, vm: &str, o: crate::catalog::JobOutcome| {
            let id = c
                .start_job(
                    &crate::catalog::NewJob {
                        run_id: None,
                        kind,
                        host: "",
                        vm,
                        policy: None,
                        request: "{}",
                        attempt: 1,
                        retry_of: None,
                        priority: 0,
                        not_before: 0,
                    },
                    "n1",
                    i64::MAX / 2,
                )
                .expect("start");
            c.finish_job(id, &o).expect("finish");
            id
        };
        let gc = run(
            "gc",
            "default",
            crate::catalog::JobOutcome {
                note: Some("3 chunks removed".into()),
                ..Default::default()
            },
        );
        // Another repository's verify is not the default one's.
        run("verify", "offsite", Default::default());
        let bad = run(
            "verify",
            "default",
            crate::catalog::JobOutcome {
                error: Some("1 missing".into()),
                ..Default::default()
            },
        );
        let daemon = DaemonConfig::parse(
            std::path::Path::new("/c.toml"),
            "[maintenance.default.gc]\nevery = \"1d\"\n",
            &toml::from_str(
                "[repository]\nlocation = \"/r\"\n[repositories.offsite]\nlocation = \"/o\"\n",
            )
            .expect("engine"),
        )
        .expect("daemon config");
        let m = maintained(&daemon, &c).expect("maintained");
        assert!(m.gc_scheduled && !m.verify_scheduled);
        let page = card(None, &m, crate::catalog::now() + 120).into_string();
        for want in [
            format!("href=\"/ui/jobs/{gc}\">ok</a> 2 min ago"),
            "3 chunks removed".into(),
            format!("href=\"/ui/jobs/{bad}\"><b class=\"bad\">failed</b></a>"),
            "1 missing".into(),
        ] {
            assert!(page.contains(&want), "{want}: {page}");
        }
        let never = card(
            None,
            &Maintained {
                gc_scheduled: true,
                ..Default::default()
            },
            0,
        )
        .into_string();
        assert!(
            never.contains("scheduled, not run yet") && never.contains("not scheduled"),
            "{never}"
        );
    }
}
