//! The daemon's loop: due schedules become runs and jobs, the queue starts jobs within
//! the limits, finished jobs are recorded, retried or end their run; SIGTERM (the
//! `shutdown` future) stops it as docs/daemon.md describes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::{
    Catalog, Claim, JobFilter, JobOutcome, JobRecord, JobStatus, NewJob, NodeRegistration, now,
};
use crate::dispatch::{Pending, Queue, Running};
use crate::error::Result;
use crate::policy::{MissedRuns, Policy, ShutdownMode};
use crate::task::{self, Env, JobRequest, ProgressMap};
use virtkeep_engine::plan::ModeRequest;

/// What the API asks of the loop.
#[derive(Debug)]
pub enum Control {
    /// A job already in the catalog, to queue.
    Submit(i64),
    /// Cancel a queued or running job.
    Cancel {
        id: i64,
        reply: oneshot::Sender<CancelReply>,
    },
}

/// The loop's answer to [`Control::Cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReply {
    /// It was queued: it is `cancelled` now and will not run.
    WasQueued,
    /// It runs: it is being stopped and its VM healed; it ends as `cancelled`.
    Stopping,
    /// It had already ended with this status.
    Finished(JobStatus),
}

/// Whether `DELETE /api/jobs/{id}` can stop jobs of `kind`: those the queue runs
/// (backup, restore, live_restore, verify_boot). A sync, GC or verify run is a task beside the queue
/// that a cancel would not reach; it ends on its own.
pub fn cancellable(kind: &str) -> bool {
    matches!(kind, "backup" | "restore" | "live_restore" | "verify_boot")
}

/// How the API reaches the loop.
pub type Submissions = mpsc::UnboundedSender<Control>;

/// The error recorded for a cancelled job.
pub const CANCELLED: &str = "cancelled through the API";

/// The error of a job whose node stopped renewing its lease (taken over by another node).
pub const DEAD_NODE_ERROR: &str = "the node running this job stopped renewing its lease (killed, crashed or cut off); another node healed the VM and retried the job";

/// The error of a job that is not a backup or restore whose node stopped while it ran.
pub fn interrupted_error(kind: &str) -> String {
    if kind == "live_restore" {
        return LIVE_ORPHAN_ERROR.to_string();
    }
    format!(
        "interrupted: the daemon running this {kind} job stopped (killed, crashed or cut off); it is not retried, the next scheduled run starts over"
    )
}

/// The error of a live restore whose daemon stopped while it ran (not retried).
pub const LIVE_ORPHAN_ERROR: &str = "interrupted: the daemon running this live restore stopped (killed, crashed or cut off) and its copy with it; the domain is left on the host as it is, not rolled back (its writes are only in its overlays, whose NBD server is gone); `virtkeep cleanup HOST` reports it (and `virtkeep restore --resume JOB --to HOST` finishes its copy) or, if its domain never started, removes what the job created";

/// The error of a job whose daemon died under it (found at the next start).
pub const ORPHAN_ERROR: &str = "the daemon stopped while this job ran (killed or crashed); the VM was healed and the job retried";

struct State {
    env: Arc<Env>,
    catalog: Arc<Catalog>,
    queue: Queue,
    progress: ProgressMap,
    done_tx: mpsc::UnboundedSender<(i64, JobOutcome)>,
    cancel_rx: watch::Receiver<bool>,
    /// Per running job: fires its cancel.
    cancels: HashMap<i64, oneshot::Sender<()>>,
    /// When the job history limits apply next.
    next_history: tokio::time::Instant,
    /// Next run per (policy, schedule key).
    next: BTreeMap<(String, String), DateTime<Utc>>,
    /// Retries are not queued while the daemon shuts down; they wait in the catalog.
    stopping: bool,
    /// The catalog is shared with other nodes: jobs are claimed from it, not queued here.
    cluster: bool,
    /// This node fires the schedules and runs the sync jobs (always, alone on a SQLite
    /// catalog).
    leading: bool,
    /// The `[sync.NAME]` and `[maintenance.NAME]` tasks, running while this node leads:
    /// they run once for the cluster, like a schedule.
    syncs: Vec<tokio::task::JoinHandle<()>>,
    /// When the heartbeat (lease renewal, lead, takeover of dead nodes' jobs) is due.
    next_beat: tokio::time::Instant,
    /// When jobs queued in the catalog by commands are looked for next (single node).
    next_adopt: tokio::time::Instant,
    /// The loop's own control channel (boot verification runs, listed off the loop,
    /// submit their jobs through it).
    submit_tx: Submissions,
}

/// Runs the daemon until `shutdown` resolves, then stops as configured.
/// `api` is called once the catalog is open, with what the API server needs.
pub async fn run(
    env: Env,
    shutdown: impl Future<Output = ()>,
    api: impl FnOnce(Arc<Env>, Arc<Catalog>, ProgressMap, Submissions) -> Result<()>,
) -> Result<()> {
    let env = Arc::new(env);
    let catalog = Arc::new(Catalog::open(&env.daemon.catalog)?);
    tracing::info!(catalog = %catalog.describe(), node = %env.daemon.node, policies = env.daemon.policies.len(), "daemon starting");
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (submit_tx, mut submit_rx) = mpsc::unbounded_channel::<Control>();
    let progress = ProgressMap::default();
    let mut st = State {
        env: env.clone(),
        catalog: catalog.clone(),
        queue: Queue::default(),
        progress: progress.clone(),
        done_tx,
        cancel_rx,
        cancels: HashMap::new(),
        next_history: tokio::time::Instant::now(),
        next: BTreeMap::new(),
        stopping: false,
        cluster: catalog.shared(),
        leading: false,
        syncs: Vec::new(),
        next_beat: tokio::time::Instant::now(),
        next_adopt: tokio::time::Instant::now(),
        submit_tx: submit_tx.clone(),
    };
    st.register()?;
    st.recover().await?;
    api(env.clone(), catalog.clone(), progress, submit_tx)?;

    tokio::pin!(shutdown);
    loop {
        st.beat().await?;
        st.apply_history_limits();
        if st.leading {
            st.fire_due_schedules().await?;
        }
        st.adopt_queued()?;
        st.start_jobs()?;
        let wake = st.wake_in();
        tokio::select! {
            Some((id, outcome)) = done_rx.recv() => st.job_done(id, outcome)?,
            Some(c) = submit_rx.recv() => st.control(c)?,
            _ = tokio::time::sleep(wake) => {}
            _ = &mut shutdown => break,
        }
    }

    // Shutdown: nothing new starts; queued jobs stay queued in the catalog for the next start.
    // A sync stopped mid-copy publishes nothing of that backup (docs/format.md).
    st.syncs.drain(..).for_each(|s| s.abort());
    st.stopping = true;
    let running = st.queue.running();
    tracing::info!(running, mode = ?env.daemon.shutdown, "shutting down");
    if env.daemon.shutdown == ShutdownMode::Abort {
        let _ = cancel_tx.send(true);
    }
    let grace = match env.daemon.shutdown {
        ShutdownMode::Finish => env.daemon.shutdown_grace,
        ShutdownMode::Abort => Duration::from_secs(120),
    };
    let deadline = tokio::time::Instant::now() + grace;
    while st.queue.running() > 0 {
        tokio::select! {
            Some((id, outcome)) = done_rx.recv() => st.job_done(id, outcome)?,
            _ = tokio::time::sleep_until(deadline) => {
                if *cancel_tx.borrow() {
                    tracing::error!(running = st.queue.running(), "jobs did not stop in time");
                    break;
                }
                tracing::warn!("shutdown grace over: aborting the running jobs");
                let _ = cancel_tx.send(true);
                // Healing after the abort gets its own time.
                return finish_aborted(&mut st, &mut done_rx).await;
            }
        }
    }
    tracing::info!("daemon stopped");
    Ok(())
}

async fn finish_aborted(
    st: &mut State,
    done_rx: &mut mpsc::UnboundedReceiver<(i64, JobOutcome)>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while st.queue.running() > 0 {
        tokio::select! {
            Some((id, outcome)) = done_rx.recv() => st.job_done(id, outcome)?,
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(())
}

/// A schedule's next run at start-up (the missed-run rule of docs/daemon.md): no
/// history → its first run; a time still ahead → kept; a time that passed while the
/// daemon was stopped → now once (`run-once`, however many were missed) or the next
/// regular time (`skip`).
pub fn initial_next(
    s: &crate::schedule::Schedule,
    stored: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    rule: MissedRuns,
) -> Option<DateTime<Utc>> {
    match stored {
        None => s.first_run(now),
        Some(t) if t <= now => match rule {
            MissedRuns::RunOnce => Some(t),
            MissedRuns::Skip => s.next_after(now),
        },
        Some(t) => Some(t),
    }
}

/// Seconds before the retry of a try that failed: `backoff × 2^(attempt−1)`, the
/// doubling capped at 2^10.
pub fn retry_delay(backoff: Duration, attempt: i64) -> i64 {
    let base = i64::try_from(backoff.as_secs()).unwrap_or(i64::MAX);
    base.saturating_mul(1i64 << (attempt - 1).clamp(0, 10))
}

/// The VM a job touches: the backed-up VM, or a restore's new domain name.
fn target_vm(j: &JobRecord) -> String {
    match serde_json::from_str::<JobRequest>(&j.request) {
        Ok(JobRequest::Restore { name: Some(n), .. }) => n,
        _ => j.vm.clone(),
    }
}

fn to_unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn from_unix(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).unwrap_or_else(Utc::now)
}

/// The VMs of `host` (all domains, running or not), by name.
pub async fn host_vms(
    env: &Env,
    host: &str,
) -> std::result::Result<Vec<String>, virtkeep_engine::Error> {
    let h = env.connect(host).await?;
    let out = h.run_string(&h.virsh().list_all_names()).await?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

impl State {
    fn control(&mut self, c: Control) -> Result<()> {
        match c {
            Control::Submit(id) => self.enqueue(id),
            Control::Cancel { id, reply } => {
                let r = self.cancel(id)?;
                let _ = reply.send(r);
                Ok(())
            }
        }
    }

    /// Cancels job `id` (which exists: the API read it first).
    fn cancel(&mut self, id: i64) -> Result<CancelReply> {
        let job = self.catalog.job(id)?;
        match job.status {
            JobStatus::Queued => {
                self.queue.remove(id);
                self.catalog.finish_job(
                    id,
                    &JobOutcome {
                        cancelled: true,
                        error: Some(CANCELLED.into()),
                        ..Default::default()
                    },
                )?;
                tracing::info!(job = id, host = %job.host, vm = %job.vm, "queued job cancelled");
                let job = self.catalog.job(id)?;
                self.retry_or_close(&job, 0)?;
                Ok(CancelReply::WasQueued)
            }
            JobStatus::Running => {
                // A second DELETE finds the sender gone: the job is already stopping.
                if let Some(tx) = self.cancels.remove(&id) {
                    tracing::info!(job = id, host = %job.host, vm = %job.vm, "cancelling the running job");
                    let _ = tx.send(());
                }
                Ok(CancelReply::Stopping)
            }
            done => Ok(CancelReply::Finished(done)),
        }
    }

    /// Removes finished jobs past the history limits; hourly (a failure is logged and
    /// tried again next time: the history is not worth stopping backups for).
    fn apply_history_limits(&mut self) {
        let now_i = tokio::time::Instant::now();
        if now_i < self.next_history {
            return;
        }
        self.next_history = now_i + crate::history::INTERVAL;
        match self
            .catalog
            .apply_history_limits(self.env.daemon.history, now())
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "job history limits applied"),
            Err(e) => tracing::warn!("job history limits not applied: {e}"),
        }
    }

    fn policy_retries(&self, job: &JobRecord) -> u32 {
        job.policy
            .as_deref()
            .and_then(|p| self.env.daemon.policies.get(p))
            .map(|p| p.retries)
            .unwrap_or(self.env.daemon.retries)
    }

    /// Jobs a dead daemon left running are failed, their VMs healed, and retried;
    /// queued jobs are queued again.
    async fn recover(&mut self) -> Result<()> {
        let orphans = if self.cluster {
            // Only this node's own jobs (it restarted) and those of dead nodes.
            let node = self.env.daemon.node.clone();
            self.catalog
                .take_orphans(Some(&node), now(), ORPHAN_ERROR)?
        } else {
            self.catalog.fail_orphans(ORPHAN_ERROR)?
        };
        self.heal_and_retry(orphans).await?;
        for j in self.catalog.jobs(&crate::catalog::JobFilter {
            status: Some(crate::catalog::JobStatus::Queued),
            ..Default::default()
        })? {
            self.enqueue_record(&j)?;
        }
        Ok(())
    }

    /// Tells the catalog (the cluster) about this node.
    fn register(&self) -> Result<()> {
        let d = &self.env.daemon;
        self.catalog.register_node(&NodeRegistration {
            name: &d.node,
            address: d.api.as_ref().map(|a| a.listen.as_str()),
            capacity: i64::try_from(d.max_jobs).unwrap_or(i64::MAX),
            now: now(),
            lease_secs: self.lease_secs(),
        })
    }

    fn lease_secs(&self) -> i64 {
        i64::try_from(self.env.daemon.lease.as_secs()).unwrap_or(i64::MAX / 4)
    }

    /// Every third of the lease: the heartbeat renews this node's leases; the lead is
    /// taken (or kept); jobs of nodes whose leases expired are taken over.
    async fn beat(&mut self) -> Result<()> {
        let now_i = tokio::time::Instant::now();
        if now_i < self.next_beat {
            return Ok(());
        }
        let lease = self.lease_secs();
        self.next_beat = now_i + (self.env.daemon.lease / 3).max(Duration::from_millis(500));
        let lead = self.catalog.try_lead()?;
        if lead && !self.leading {
            tracing::info!(node = %self.env.daemon.node, "this node leads: it fires the schedules");
            // Where the previous leader left the schedules, as at a start.
            self.init_schedules()?;
            self.syncs = crate::sync_jobs::spawn(self.env.clone(), self.catalog.clone());
            self.syncs.extend(crate::maintenance::spawn(
                self.env.clone(),
                self.catalog.clone(),
            ));
        } else if !lead && self.leading {
            tracing::warn!(node = %self.env.daemon.node, "this node lost the lead");
            self.next.clear();
            self.syncs.drain(..).for_each(|s| s.abort());
        }
        self.leading = lead;
        let t = now();
        self.catalog
            .heartbeat(&self.env.daemon.node, t, t + lease, lead)?;
        crate::recorded::flush_pending(&self.catalog);
        if self.cluster {
            let orphans = self.catalog.take_orphans(None, t, DEAD_NODE_ERROR)?;
            self.heal_and_retry(orphans).await?;
        }
        Ok(())
    }

    /// Rewrites the error of an interrupted job that is not a backup or restore (the
    /// orphan texts speak of healing a VM and retrying).
    fn record_interrupted(&self, j: JobRecord) -> Result<JobRecord> {
        self.catalog.finish_job(
            j.id,
            &JobOutcome {
                error: Some(interrupted_error(&j.kind)),
                snapshot: j.snapshot.clone(),
                ..Default::default()
            },
        )?;
        self.catalog.job(j.id)
    }

    /// Heals the VMs of jobs that were interrupted (their node died) and retries them.
    async fn heal_and_retry(&mut self, orphans: Vec<JobRecord>) -> Result<()> {
        for j in orphans {
            tracing::warn!(job = j.id, host = %j.host, vm = %j.vm, node = ?j.node, "job left running by a stopped daemon: marked failed");
            // A sync, GC, verify or boot verification never touched the VM: nothing to
            // heal, and nothing retried; its record says so rather than the VM jobs' text.
            if !matches!(j.kind.as_str(), "backup" | "restore") {
                let j = self.record_interrupted(j)?;
                self.retry_or_close(&j, 0)?;
                continue;
            }
            match self.env.connect(&j.host).await {
                Ok(h) => {
                    let healed = task::heal_taken_over(&h, &j.vm).await;
                    if !healed.is_empty() {
                        tracing::info!(job = j.id, "healed: {}", healed.join("; "));
                    }
                }
                Err(e) => tracing::warn!(job = j.id, "cannot heal {}/{}: {e}", j.host, j.vm),
            }
            self.retry_or_close(&j, 0)?;
        }
        Ok(())
    }

    fn init_schedules(&mut self) -> Result<()> {
        let now = Utc::now();
        for p in self.env.daemon.policies.values().filter(|p| p.enabled) {
            for s in p.all_schedules() {
                let stored = self.catalog.next_run(&p.name, &s.key)?.map(from_unix);
                let next = initial_next(s, stored, now, self.env.daemon.missed_runs);
                if let Some(t) = stored.filter(|t| *t <= now) {
                    tracing::info!(policy = %p.name, schedule = %s.describe(), missed = %t, rule = ?self.env.daemon.missed_runs, "a run fell due while the daemon was stopped");
                }
                self.catalog
                    .set_next_run(&p.name, &s.key, next.map(to_unix), None)?;
                if let Some(n) = next {
                    self.next.insert((p.name.clone(), s.key.clone()), n);
                }
            }
        }
        Ok(())
    }

    fn wake_in(&self) -> Duration {
        let now = Utc::now();
        let mut until = now + chrono::Duration::seconds(30);
        if let Some(t) = self.next.values().min() {
            until = until.min(*t);
        }
        if let Some(t) = self.queue.next_wake(now.timestamp()) {
            until = until.min(from_unix(t));
        }
        // Other nodes queue jobs too, and the heartbeat has its time.
        let beat = (self.env.daemon.lease / 3).max(Duration::from_millis(500));
        until = until.min(now + chrono::Duration::from_std(beat).unwrap_or_default());
        // Other nodes (a cluster) or commands (`restore --detach`) queue jobs too.
        until = until.min(now + chrono::Duration::seconds(1));
        (until - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(200))
    }

    async fn fire_due_schedules(&mut self) -> Result<()> {
        let now = Utc::now();
        let mut due: BTreeMap<String, (ModeRequest, bool)> = BTreeMap::new();
        let mut verify_due: BTreeMap<String, bool> = BTreeMap::new();
        let keys: Vec<(String, String)> = self
            .next
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (policy, key) in keys {
            let Some(p) = self.env.daemon.policies.get(&policy) else {
                continue;
            };
            let Some(s) = p.all_schedules().find(|s| s.key == key) else {
                continue;
            };
            let scheduled = self.next.get(&(policy.clone(), key.clone())).copied();
            let missed = scheduled.is_some_and(|t| now - t > chrono::Duration::seconds(60));
            let next = s.next_after(now);
            self.catalog
                .set_next_run(&policy, &key, next.map(to_unix), Some(to_unix(now)))?;
            match next {
                Some(n) => self.next.insert((policy.clone(), key.clone()), n),
                None => self.next.remove(&(policy.clone(), key.clone())),
            };
            if p.is_verify_schedule(&key) {
                verify_due.insert(policy, missed);
                continue;
            }
            // Schedules of one policy due together make one run of the strongest mode
            // (a weekly full and a daily incremental at the same time: one full).
            let e = due.entry(policy).or_insert((s.mode, missed));
            e.0 = e.0.max(s.mode);
            e.1 &= missed;
        }
        for (policy, (mode, missed)) in due {
            let Some(p) = self.env.daemon.policies.get(&policy).cloned() else {
                continue;
            };
            self.start_run(&p, mode, if missed { "missed" } else { "schedule" })
                .await?;
        }
        for (policy, missed) in verify_due {
            let Some(p) = self.env.daemon.policies.get(&policy).cloned() else {
                continue;
            };
            self.start_verify_run(&p, if missed { "missed" } else { "schedule" });
        }
        Ok(())
    }

    /// Creates a boot verification run of `policy` off the loop (listing the newest
    /// backups may take up to 120 s, which must not hold up the heartbeat): its jobs
    /// come back to the loop as submissions (crate::verify_jobs::queue_run).
    fn start_verify_run(&mut self, p: &Policy, trigger: &str) {
        let (env, catalog) = (self.env.clone(), self.catalog.clone());
        let (p, trigger, submit) = (p.clone(), trigger.to_string(), self.submit_tx.clone());
        tokio::spawn(async move {
            let queue = |id| {
                let _ = submit.send(Control::Submit(id));
            };
            if let Err(e) = crate::verify_jobs::queue_run(&env, &catalog, &p, &trigger, queue).await
            {
                tracing::error!(policy = %p.name, "boot verification run not queued: {e}");
            }
        });
    }

    /// Creates a run of `policy` with one job per selected VM.
    pub async fn start_run(&mut self, p: &Policy, mode: ModeRequest, trigger: &str) -> Result<()> {
        let mut notes = Vec::new();
        let mut had_error = false;
        let mut skipped = 0;
        let mut chosen: Vec<(String, String)> = Vec::new();
        for sel in &p.selections {
            let listed =
                tokio::time::timeout(Duration::from_secs(60), host_vms(&self.env, &sel.host)).await;
            let available = match listed {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    had_error = true;
                    notes.push(format!("host {}: {e}", sel.host));
                    continue;
                }
                Err(_) => {
                    had_error = true;
                    notes.push(format!("host {}: no answer in 60 s", sel.host));
                    continue;
                }
            };
            for wanted in &sel.names {
                if !available.contains(wanted) {
                    had_error = true;
                    notes.push(format!("{}/{wanted}: no such VM", sel.host));
                }
            }
            for vm in sel.select(&available) {
                // A run does not pile up behind the previous one: a VM whose backup of
                // this policy is still queued or running is left to that job.
                if self
                    .catalog
                    .has_open_job(&sel.host, vm, &p.name, "backup")?
                {
                    skipped += 1;
                    notes.push(format!(
                        "{}/{vm}: skipped, its previous backup has not finished",
                        sel.host
                    ));
                } else if !chosen.iter().any(|(h, v)| h == &sel.host && v == vm) {
                    chosen.push((sel.host.clone(), vm.clone()));
                }
            }
        }
        if chosen.is_empty() && !had_error && skipped > 0 {
            // Nothing to do and nothing wrong: no run is recorded, or a short interval
            // behind a slow backup would fill the history with empty runs.
            tracing::info!(policy = %p.name, skipped, "run skipped: the previous backups have not finished");
            return Ok(());
        }
        let run = self.catalog.start_run(&p.name, mode.as_str(), trigger)?;
        let request = serde_json::to_string(&JobRequest::Backup {
            policy: Some(p.name.clone()),
            mode,
        })
        .unwrap_or_default();
        for (host, vm) in &chosen {
            let id = self.catalog.add_job(&NewJob {
                run_id: Some(run),
                kind: "backup",
                host,
                vm,
                policy: Some(&p.name),
                request: &request,
                attempt: 1,
                retry_of: None,
                priority: i64::from(p.priority),
                not_before: now(),
            })?;
            self.enqueue(id)?;
        }
        let note = (!notes.is_empty()).then(|| notes.join("; "));
        tracing::info!(policy = %p.name, run, jobs = chosen.len(), mode = mode.as_str(), trigger, "policy run");
        if let Some(n) = &note {
            tracing::warn!(policy = %p.name, run, "{n}");
        }
        if chosen.is_empty() {
            self.catalog.finish_run(
                run,
                if had_error { "failed" } else { "succeeded" },
                Some(note.as_deref().unwrap_or("no VM matched the selection")),
            )?;
        } else if let Some(n) = &note {
            // Recorded now; the run's status is decided when its jobs end.
            self.catalog.finish_run_note(run, n)?;
        }
        Ok(())
    }

    /// On a single node: jobs a command queued in the catalog beside the daemon
    /// (`restore --live --detach`) join the queue, at most once a second.
    fn adopt_queued(&mut self) -> Result<()> {
        let now_i = tokio::time::Instant::now();
        if self.cluster || self.stopping || now_i < self.next_adopt {
            return Ok(());
        }
        self.next_adopt = now_i + Duration::from_secs(1);
        let queued = self.catalog.jobs(&JobFilter {
            status: Some(JobStatus::Queued),
            ..Default::default()
        })?;
        for j in queued.iter().filter(|j| j.run_id.is_none()) {
            self.enqueue_record(j)?;
        }
        Ok(())
    }

    fn enqueue(&mut self, id: i64) -> Result<()> {
        let j = self.catalog.job(id)?;
        self.enqueue_record(&j)
    }

    fn enqueue_record(&mut self, j: &JobRecord) -> Result<()> {
        if self.cluster {
            // The shared queue is the catalog: some node claims it.
            return Ok(());
        }
        self.queue.push(Pending {
            id: j.id,
            host: j.host.clone(),
            vm: target_vm(j),
            slot: crate::verify_jobs::slot_host(&self.env, j),
            priority: j.priority,
            not_before: self.catalog.not_before(j.id)?,
            run_id: j.run_id,
        });
        Ok(())
    }

    /// Takes jobs from the shared queue within this node's and the cluster's limits.
    fn claim_jobs(&mut self) -> Result<Vec<JobRecord>> {
        let daemon = &self.env.daemon;
        let choose = |queued: &[JobRecord], running: &[JobRecord]| {
            let queued: Vec<Pending> = queued
                .iter()
                .map(|j| Pending {
                    id: j.id,
                    host: j.host.clone(),
                    vm: target_vm(j),
                    slot: crate::verify_jobs::slot_host(&self.env, j),
                    priority: j.priority,
                    not_before: 0,
                    run_id: j.run_id,
                })
                .collect();
            let running: Vec<Running> = running
                .iter()
                .map(|j| Running {
                    node: j.node.clone().unwrap_or_default(),
                    host: j.host.clone(),
                    vm: target_vm(j),
                    slot: crate::verify_jobs::slot_host(&self.env, j),
                })
                .collect();
            crate::dispatch::choose(&daemon.node, &queued, &running, daemon.max_jobs, &|h| {
                daemon.host_limit(h)
            })
        };
        let t = now();
        let jobs = self.catalog.claim(&Claim {
            node: &daemon.node,
            now: t,
            lease_until: t + self.lease_secs(),
            choose: &choose,
        })?;
        for j in &jobs {
            let slot = crate::verify_jobs::slot_host(&self.env, j);
            self.queue.adopt(j.id, &j.host, &target_vm(j), &slot);
        }
        Ok(jobs)
    }

    fn start_jobs(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        let jobs = if self.cluster {
            self.claim_jobs()?
        } else {
            let daemon = &self.env.daemon;
            let started = self
                .queue
                .start(now(), daemon.max_jobs, &|h| daemon.host_limit(h));
            let mut jobs = Vec::new();
            for p in started {
                let lease_until = now() + self.lease_secs();
                self.catalog
                    .mark_running(p.id, &self.env.daemon.node, lease_until)?;
                let job = self.catalog.job(p.id)?;
                if job.status == JobStatus::Running {
                    jobs.push(job);
                } else {
                    // Cancelled in the catalog meanwhile (`restore --detach` gave up).
                    self.queue.finished(p.id);
                }
            }
            jobs
        };
        for job in jobs {
            tracing::info!(job = job.id, kind = %job.kind, host = %job.host, vm = %job.vm, attempt = job.attempt, node = %self.env.daemon.node, "job starts");
            let env = self.env.clone();
            let progress = self.progress.clone();
            let (cancel_tx, cancel_rx) = oneshot::channel();
            self.cancels.insert(job.id, cancel_tx);
            let stops = task::Stops {
                shutdown: self.cancel_rx.clone(),
                cancel: cancel_rx,
            };
            let done = self.done_tx.clone();
            let catalog = self.catalog.clone();
            tokio::spawn(async move {
                let id = job.id;
                let outcome = match serde_json::from_str(&job.request) {
                    Ok(JobRequest::VerifyBoot { policy, snapshot }) => {
                        crate::verify_jobs::run_job(env, &policy, &snapshot, stops).await
                    }
                    Ok(JobRequest::Restore { live: true, .. }) => {
                        crate::live_jobs::run(env, catalog, job, progress, stops).await
                    }
                    _ => task::run(env, job, progress, stops).await,
                };
                let _ = done.send((id, outcome));
            });
        }
        Ok(())
    }

    fn job_done(&mut self, id: i64, outcome: JobOutcome) -> Result<()> {
        self.queue.finished(id);
        self.cancels.remove(&id);
        self.catalog.finish_job(id, &outcome)?;
        let job = self.catalog.job(id)?;
        if job.error.as_deref() == Some(DEAD_NODE_ERROR) {
            // This node was cut off long enough for another one to take the job over:
            // that node healed the VM and queued the retry; this result is not recorded.
            tracing::warn!(job = id, host = %job.host, vm = %job.vm, "job ended after another node took it over (this node's lease had expired)");
            return Ok(());
        }
        match &outcome.error {
            None => {
                tracing::info!(job = id, host = %job.host, vm = %job.vm, snapshot = ?job.snapshot, mode = ?job.mode, pruned = ?job.pruned, "job succeeded")
            }
            Some(_) if outcome.cancelled => {
                tracing::info!(job = id, host = %job.host, vm = %job.vm, note = ?job.note, "job cancelled")
            }
            Some(e) => {
                tracing::warn!(job = id, host = %job.host, vm = %job.vm, attempt = job.attempt, "job failed: {e}")
            }
        }
        let delay = retry_delay(self.env.daemon.retry_backoff, job.attempt);
        self.retry_or_close(&job, delay)
    }

    /// After a job ended: queue its retry (failed backups with tries left), apply the
    /// policy run's fail-rest threshold, and close the run when nothing is left.
    fn retry_or_close(&mut self, job: &JobRecord, delay: i64) -> Result<()> {
        // A cancelled job is not retried: someone wanted it stopped.
        let failed = job.status == JobStatus::Failed;
        if failed && job.kind == "backup" && job.attempt <= self.policy_retries(job) as i64 {
            let id = self.catalog.add_job(&NewJob {
                run_id: job.run_id,
                kind: &job.kind,
                host: &job.host,
                vm: &job.vm,
                policy: job.policy.as_deref(),
                request: &job.request,
                attempt: job.attempt + 1,
                retry_of: Some(job.id),
                priority: job.priority,
                not_before: now() + delay,
            })?;
            tracing::info!(job = job.id, retry = id, in_secs = delay, "retry queued");
            if !self.stopping {
                self.enqueue(id)?;
            }
        }
        let Some(run) = job.run_id else {
            return Ok(());
        };
        let (finals, failures, open) = self.catalog.run_counts(run)?;
        let total = finals + open;
        let threshold = job
            .policy
            .as_deref()
            .and_then(|p| self.env.daemon.policies.get(p))
            .and_then(|p| p.fail_rest_above_percent);
        if let Some(pct) = threshold
            && open > 0
            && failures * 100 > i64::from(pct) * total
        {
            let why = format!(
                "not run: {failures} of the {total} tasks of run {run} failed, more than the policy's fail_rest_above_percent = {pct}"
            );
            let mut ids = self.queue.cancel_run(run);
            if self.cluster {
                let queued = self.catalog.jobs(&JobFilter {
                    status: Some(JobStatus::Queued),
                    run_id: Some(run),
                    ..Default::default()
                })?;
                ids.extend(queued.iter().map(|j| j.id));
            }
            for id in ids {
                self.catalog.finish_job(
                    id,
                    &JobOutcome {
                        error: Some(why.clone()),
                        ..Default::default()
                    },
                )?;
            }
            tracing::warn!(run, "{why}");
        }
        let (_, failures, open) = self.catalog.run_counts(run)?;
        if open == 0 {
            self.catalog.finish_run(
                run,
                if failures > 0 { "failed" } else { "succeeded" },
                None,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;
    use chrono::TimeZone;

    #[test]
    fn only_queued_kinds_are_cancellable() {
        for k in ["backup", "restore", "live_restore", "verify_boot"] {
            assert!(cancellable(k), "{k}");
        }
        for k in ["sync", "gc", "verify", ""] {
            assert!(!cancellable(k), "{k}");
        }
    }

    #[test]
    fn retries_back_off_exponentially() {
        let b = Duration::from_secs(60);
        assert_eq!([1, 2, 3, 4].map(|a| retry_delay(b, a)), [60, 120, 240, 480]);
        assert_eq!(retry_delay(b, 40), 60 * 1024);
    }

    #[test]
    fn missed_runs_rule() {
        let now = Utc
            .with_ymd_and_hms(2026, 3, 10, 12, 0, 0)
            .single()
            .expect("t");
        let cron = Schedule::cron("0 2 * * *", chrono_tz::Tz::UTC, ModeRequest::Full).expect("c");
        let at2 = Utc.with_ymd_and_hms(2026, 3, 11, 2, 0, 0).single();
        // First start: the next occurrence.
        assert_eq!(initial_next(&cron, None, now, MissedRuns::RunOnce), at2);
        // Missed three nights: one run now (due at its old time), not three.
        let old = Utc
            .with_ymd_and_hms(2026, 3, 7, 2, 0, 0)
            .single()
            .expect("t");
        assert_eq!(
            initial_next(&cron, Some(old), now, MissedRuns::RunOnce),
            Some(old)
        );
        assert_eq!(initial_next(&cron, Some(old), now, MissedRuns::Skip), at2);
        // Not missed: kept.
        assert_eq!(initial_next(&cron, at2, now, MissedRuns::Skip), at2);
        // Intervals start at once.
        let every = Schedule::every(Duration::from_secs(3600), "1h", ModeRequest::Auto);
        assert_eq!(initial_next(&every, None, now, MissedRuns::Skip), Some(now));
    }
}
