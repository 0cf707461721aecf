//! `[sync.NAME]` jobs: copy backups from one configured repository into another on a
//! schedule (`virtkeep sync`, run by the daemon), with a last-success metric.
//!
//! ```toml
//! [sync.offsite]
//! source = "default"            # [repository]; or a name from [repositories]
//! destination = "offsite"       # a name from [repositories] (or "default")
//! selection = ["hv1", "hv2/web"]  # HOST or HOST/VM; default: every backup
//! latest = 3                    # per VM, only the newest N (default: all)
//! every = "6h"                  # or cron = "0 3 * * *" (timezone = "…", default UTC)
//! ```
//!
//! A sync runs in the daemon beside the backup jobs, not in their queue (it touches no
//! host). Each run is a job of kind `sync` in the catalog (`GET /api/jobs`, `virtkeep
//! jobs`), with no host and the sync job's name as its VM; the last-success metric reads
//! the catalog, so it survives restarts. A daemon stopped mid-sync publishes nothing of the
//! backup being copied; the next run continues without re-sending what arrived.

use std::sync::Arc;

use chrono::Utc;
use virtkeep_engine::progress::LogProgress;

use crate::catalog::{Catalog, JobOutcome};
use crate::recorded::Recorded;
pub use crate::sync_config::{SyncJob, parse};
use crate::task::{Env, open_repository};

/// One run of a job; what the catalog records of it.
async fn run_once(env: &Env, job: &SyncJob) -> Result<JobOutcome, virtkeep_engine::Error> {
    let from = open_repository(env.repository_config(job.source.as_deref())?).await?;
    let to = open_repository(env.repository_config(job.destination.as_deref())?).await?;
    let r = virtkeep_engine::sync::sync(&from, &to, &job.options, &LogProgress).await?;
    tracing::info!(
        sync = %job.name,
        manifests_copied = r.manifests_copied,
        manifests_present = r.manifests_present,
        chunks_sent = r.totals.chunks_sent,
        chunks_skipped = r.totals.chunks_skipped,
        bytes_sent = r.totals.bytes_sent,
        "sync finished"
    );
    Ok(JobOutcome {
        bytes_new: i64::try_from(r.totals.bytes_sent).ok(),
        note: Some(format!(
            "{} backups copied, {} already there; {} chunks sent, {} skipped",
            r.manifests_copied, r.manifests_present, r.totals.chunks_sent, r.totals.chunks_skipped
        )),
        ..Default::default()
    })
}

/// What a sync run aborted halfway records.
const STOPPED: &str = "stopped: the daemon ended or this node lost the lead; the next run continues without re-sending what arrived";

/// Starts one task per sync job; each runs at its schedule's times (an interval at
/// once, a cron expression at its next time) until the daemon ends.
pub fn spawn(env: Arc<Env>, catalog: Arc<Catalog>) -> Vec<tokio::task::JoinHandle<()>> {
    env.daemon
        .syncs
        .iter()
        .cloned()
        .map(|job| {
            let env = env.clone();
            let catalog = catalog.clone();
            tokio::spawn(async move {
                let mut next = job.schedule.first_run(Utc::now());
                while let Some(at) = next {
                    let wait = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    tracing::info!(sync = %job.name, "sync starting");
                    let recorded =
                        Recorded::start(catalog.clone(), &env, "sync", &job.name, STOPPED);
                    let t0 = std::time::Instant::now();
                    let res = run_once(&env, &job).await;
                    let mut outcome = res.as_ref().cloned().unwrap_or_else(|e| {
                        tracing::error!(sync = %job.name, "sync failed: {e}");
                        JobOutcome {
                            error: Some(e.to_string()),
                            ..Default::default()
                        }
                    });
                    outcome.duration = Some(t0.elapsed().as_secs_f64());
                    recorded.finish(&outcome).await;
                    next = job.schedule.next_after(Utc::now().max(at));
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use virtkeep_engine::config::Config as EngineConfig;

    use crate::error::ConfigError;

    fn engine() -> EngineConfig {
        toml::from_str(
            r#"
[repository]
location = "/srv/repo"
[repositories.offsite]
location = "s3://b/p"
"#,
        )
        .expect("engine config")
    }

    fn parse_text(text: &str) -> Result<Vec<SyncJob>, ConfigError> {
        parse(Path::new("/etc/virtkeep/config.toml"), text, &engine())
    }

    #[test]
    fn parses_a_sync_job() {
        let jobs = parse_text(
            r#"
[sync.offsite]
source = "default"
destination = "offsite"
selection = ["hv1/web"]
latest = 2
every = "6h"
"#,
        )
        .expect("parse");
        assert_eq!(jobs.len(), 1);
        let j = &jobs[0];
        assert_eq!(
            (j.source.as_deref(), j.destination.as_deref()),
            (None, Some("offsite"))
        );
        assert_eq!(j.options.selection, ["hv1/web"]);
        assert_eq!(j.options.latest, Some(2));
        assert_eq!(parse_text("").expect("empty").len(), 0);
    }

    #[test]
    fn refuses_unknown_repositories_missing_schedules_and_self_copies() {
        let e = parse_text(
            "[sync.a]\nsource = \"default\"\ndestination = \"nowhere\"\nevery = \"1h\"\n",
        )
        .expect_err("unknown");
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.message.contains("nowhere") && e.expected.contains("offsite"),
            "{e}"
        );
        let e = parse_text("[sync.a]\nsource = \"default\"\ndestination = \"offsite\"\n")
            .expect_err("no schedule");
        assert!(e.message.contains("cron and every"), "{e}");
        let e = parse_text(
            "[sync.a]\nsource = \"offsite\"\ndestination = \"offsite\"\nevery = \"1h\"\n",
        )
        .expect_err("itself");
        assert!(e.message.contains("into itself"), "{e}");
        let e = parse_text(
            "[sync.a]\nsource = \"default\"\ndestination = \"offsite\"\nevery = \"1h\"\nkeep = 3\n",
        )
        .expect_err("unknown field");
        assert!(e.message.contains("keep"), "{e}");
    }
}
