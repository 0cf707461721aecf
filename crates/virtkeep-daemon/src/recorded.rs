//! A run of a scheduled task that is not queued (a `[sync.NAME]` run, a repository's
//! GC or verify) as a catalog job: it starts as running on this node and must end, even
//! when the catalog refused the first try of its finish (a lock timeout, a lost
//! PostgreSQL connection). The finish is retried a few times; one that still fails waits
//! in a process-wide list that the daemon loop flushes at each heartbeat, so the row does
//! not stay `running` (its lease is renewed by the heartbeat) until the next restart.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::catalog::{Catalog, JobOutcome, NewJob, now};
use crate::task::Env;

/// Finishes that failed, retried at each heartbeat: (job id, outcome).
type Pending = Vec<(i64, JobOutcome)>;

fn pending() -> &'static Mutex<Pending> {
    static PENDING: OnceLock<Mutex<Pending>> = OnceLock::new();
    PENDING.get_or_init(Default::default)
}

/// Pauses between the tries of a finish before it is left to the heartbeat.
const RETRIES: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// Tries each pending finish once; keeps those that fail again. Returns how many are
/// still pending.
fn flush_with<E: std::fmt::Display>(
    pending: &mut Pending,
    mut finish: impl FnMut(i64, &JobOutcome) -> Result<(), E>,
) -> usize {
    pending.retain(|(id, o)| match finish(*id, o) {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(
                job = id,
                "a run's end is still not recorded in the catalog: {e}"
            );
            true
        }
    });
    pending.len()
}

/// Records the finishes that failed before (called by the daemon loop's heartbeat).
pub fn flush_pending(catalog: &Catalog) {
    let mut p = pending().lock().unwrap_or_else(|p| p.into_inner());
    if !p.is_empty() && flush_with(&mut p, |id, o| catalog.finish_job(id, o)) == 0 {
        tracing::info!("the runs' ends that had failed are recorded now");
    }
}

/// One unqueued run in the catalog (`host` empty, `vm` = the task's name).
pub struct Recorded {
    catalog: Arc<Catalog>,
    id: Option<i64>,
    /// The error recorded when the guard is dropped before [`Recorded::finish`] (the
    /// task was aborted: the daemon stops or this node lost the lead).
    dropped: &'static str,
}

impl Recorded {
    pub fn start(
        catalog: Arc<Catalog>,
        env: &Env,
        kind: &'static str,
        name: &str,
        dropped: &'static str,
    ) -> Recorded {
        let request = serde_json::json!({ "kind": kind, "name": name }).to_string();
        let lease = i64::try_from(env.daemon.lease.as_secs()).unwrap_or(i64::MAX);
        let started = catalog.start_job(
            &NewJob {
                run_id: None,
                kind,
                host: "",
                vm: name,
                policy: None,
                request: &request,
                attempt: 1,
                retry_of: None,
                priority: 0,
                not_before: now(),
            },
            &env.daemon.node,
            now().saturating_add(lease),
        );
        let id = started
            .map_err(|e| tracing::warn!(kind, name, "run not recorded in the catalog: {e}"))
            .ok();
        Recorded {
            catalog,
            id,
            dropped,
        }
    }

    /// The job's id, when the catalog recorded its start.
    pub fn id(&self) -> Option<i64> {
        self.id
    }

    /// Records the run's end, retrying; left to the heartbeat when every try fails. The
    /// id stays in the guard until the end is recorded or queued: a task aborted during
    /// a pause still ends its row (as stopped) when the guard drops.
    pub async fn finish(mut self, o: &JobOutcome) {
        let Some(id) = self.id else { return };
        for pause in RETRIES {
            match self.catalog.finish_job(id, o) {
                Ok(()) => {
                    self.id = None;
                    return;
                }
                Err(e) => tracing::warn!(
                    job = id,
                    "run's end not recorded in the catalog (retried): {e}"
                ),
            }
            tokio::time::sleep(pause).await;
        }
        self.id = None;
        if let Err(e) = self.catalog.finish_job(id, o) {
            tracing::warn!(
                job = id,
                "run's end not recorded; retried at each heartbeat: {e}"
            );
            let mut p = pending().lock().unwrap_or_else(|p| p.into_inner());
            p.push((id, o.clone()));
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let o = JobOutcome {
                error: Some(self.dropped.into()),
                ..Default::default()
            };
            if self.catalog.finish_job(id, &o).is_err() {
                let mut p = pending().lock().unwrap_or_else(|p| p.into_inner());
                p.push((id, o));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_finishes_wait_until_the_catalog_takes_them() {
        let mut p: Pending = vec![(1, JobOutcome::default()), (2, JobOutcome::default())];
        // The catalog refuses job 2 once: job 1 is recorded, job 2 stays pending.
        let mut tries = Vec::new();
        let left = flush_with(&mut p, |id, _| {
            tries.push(id);
            if id == 2 {
                Err("database is locked")
            } else {
                Ok(())
            }
        });
        assert_eq!((left, tries), (1, vec![1, 2]));
        assert_eq!(p.iter().map(|e| e.0).collect::<Vec<_>>(), [2]);
        let left = flush_with(&mut p, |_, _| Ok::<(), &str>(()));
        assert_eq!((left, p.len()), (0, 0));
    }
}
