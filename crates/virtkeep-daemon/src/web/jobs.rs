//! Jobs: the history with filters, one job with its live progress (server-sent events),
//! starting a backup and cancelling, through the daemon's own submission path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use virtkeep_engine::plan::ModeRequest;

use super::view::{MAX_STREAMS, Viewer, WebState, blocking, bytes, layout, page_error};
use crate::catalog::{JobFilter, JobRecord, JobStatus, NewJob, now};
use crate::daemon::{CancelReply, Control};
use crate::error::DaemonError;
use crate::scope::Action;
use crate::task::JobRequest;

/// Longest host, VM or policy name a form may send.
const MAX_NAME: usize = 256;
/// At most this many jobs on one page.
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
pub struct JobsQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    vm: String,
    limit: Option<u32>,
}

fn parse_status(s: &str) -> Result<Option<JobStatus>, ()> {
    Ok(Some(match s {
        "" => return Ok(None),
        "queued" => JobStatus::Queued,
        "running" => JobStatus::Running,
        "succeeded" => JobStatus::Succeeded,
        "failed" => JobStatus::Failed,
        "cancelled" => JobStatus::Cancelled,
        _ => return Err(()),
    }))
}

fn status_badge(s: JobStatus) -> Markup {
    let class = match s {
        JobStatus::Succeeded => "good",
        JobStatus::Failed => "bad",
        JobStatus::Cancelled | JobStatus::Queued => "warn",
        JobStatus::Running => "info",
    };
    html! { span.badge.(class) { (s.as_str()) } }
}

fn filters(q: &JobsQuery) -> Markup {
    let select = |name: &str, label: &str, current: &str, options: &[&str]| {
        html! {
            label for={"f-" (name)} { (label) }
            select id={"f-" (name)} name=(name) {
                option value="" selected[current.is_empty()] { "any" }
                @for o in options { option value=(o) selected[current == *o] { (o) } }
            }
        }
    };
    html! {
        form.filters method="get" action="/ui/jobs" role="search" aria-label="Filter jobs" {
            (select("status", "Status", &q.status, &["queued", "running", "succeeded", "failed", "cancelled"]))
            (select("kind", "Kind", &q.kind, &["backup", "restore", "live_restore"]))
            label for="f-host" { "Host" }
            input #f-host name="host" value=(q.host) maxlength=(MAX_NAME);
            label for="f-vm" { "VM" }
            input #f-vm name="vm" value=(q.vm) maxlength=(MAX_NAME);
            button type="submit" { "Filter" }
        }
    }
}

fn cancel_button(j: &JobRecord, v: &Viewer) -> Markup {
    // Only where the API would cancel: never on a sync, GC or verify run.
    let open = matches!(j.status, JobStatus::Queued | JobStatus::Running)
        && crate::daemon::cancellable(&j.kind);
    html! {
        @if open && v.may(Action::cancel_of(&j.kind)) {
            form method="post" action={"/ui/jobs/" (j.id) "/cancel"} {
                (v.csrf_field())
                button.danger type="submit" aria-label={"Cancel job " (j.id)} { "Cancel" }
            }
        }
    }
}

fn job_row(j: &JobRecord, v: &Viewer) -> Markup {
    html! {
        tr {
            th scope="row" data-label="Job" { a href={"/ui/jobs/" (j.id)} { (j.id) } }
            td data-label="Kind" { (j.kind) @if let Some(m) = &j.mode { " · " (m) } }
            td data-label="VM" { (j.vm) div.small.muted { (j.host) } }
            td data-label="Status" {
                (status_badge(j.status))
                @if j.status == JobStatus::Running {
                    div.live data-job=(j.id) aria-live="polite" { span.phase {} " " progress max="1" value="0" {} }
                }
            }
            td data-label="Created" { time { (j.created) } }
            td data-label="Finished" { (j.finished.as_deref().unwrap_or("—")) }
            td data-label="Bytes" {
                @if let Some(n) = j.bytes_new { (bytes(n.max(0) as u64)) " new" }
                @if let Some(d) = j.duration_secs { div.small.muted { (format!("{d:.1} s")) } }
            }
            td data-label="" { (cancel_button(j, v)) }
        }
    }
}

pub async fn list(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<JobsQuery>,
) -> Response {
    let Ok(status) = parse_status(&q.status) else {
        return page_error(StatusCode::BAD_REQUEST, "Bad filter", "Unknown job status.");
    };
    if q.host.len() > MAX_NAME || q.vm.len() > MAX_NAME {
        return page_error(StatusCode::BAD_REQUEST, "Bad filter", "Name too long.");
    }
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let filter = JobFilter {
        status,
        host: nonempty(&q.host),
        vm: nonempty(&q.vm),
        run_id: None,
        limit: Some(q.limit.unwrap_or(100).min(MAX_LIMIT)),
    };
    let jobs = match blocking(&s, move |s| s.api.catalog.jobs(&filter)).await {
        Err(r) => return r,
        Ok(Ok(j)) => j,
        Ok(Err(e)) => {
            return page_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Catalog error",
                &e.to_string(),
            );
        }
    };
    let jobs: Vec<_> = jobs
        .into_iter()
        .filter(|j| q.kind.is_empty() || j.kind == q.kind)
        .collect();
    let body = html! {
        (filters(&q))
        @if jobs.is_empty() { p { "No jobs match." } } @else {
            table.jobs {
                caption { (jobs.len()) " jobs, newest first" }
                thead { tr {
                    th scope="col" { "Job" } th scope="col" { "Kind" } th scope="col" { "VM" } th scope="col" { "Status" }
                    th scope="col" { "Created" } th scope="col" { "Finished" } th scope="col" { "Bytes" } th scope="col" { span.sr { "Actions" } }
                } }
                tbody { @for j in &jobs { (job_row(j, &v)) } }
            }
        }
    };
    layout("Jobs", Some(&v), body).into_response()
}

pub async fn show(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<i64>,
) -> Response {
    let j = match job(&s, id).await {
        Ok(j) => j,
        Err(DaemonError::NoSuchJob(_)) => {
            return page_error(
                StatusCode::NOT_FOUND,
                "No such job",
                "This job is not in the catalog.",
            );
        }
        Err(e) => {
            return page_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Catalog error",
                &e.to_string(),
            );
        }
    };
    // Only where the API would cancel: never on a sync, GC or verify run.
    let open = matches!(j.status, JobStatus::Queued | JobStatus::Running)
        && crate::daemon::cancellable(&j.kind);
    let field =
        |k: &str, val: Option<String>| html! { @if let Some(x) = val { dt { (k) } dd { (x) } } };
    let body = html! {
        p { (status_badge(j.status)) " " (j.kind) " of " strong { (j.vm) } " on " (j.host) }
        @if open {
            section.card.live data-job=(j.id) data-reload="1" aria-labelledby="live-h" {
                h2 #live-h { "Live" }
                progress max="1" value="0" aria-label="Progress" {}
                p aria-live="polite" {
                    "Phase: " span.phase { "waiting" } " · " span.done { "0 B" } " of " span.total { "?" }
                    " · " span.rate { "—" }
                }
            }
        }
        dl.card {
            (field("Policy", j.policy.clone()))
            (field("Created", Some(j.created.clone())))
            (field("Started", j.started.clone()))
            (field("Finished", j.finished.clone()))
            (field("Attempt", Some(j.attempt.to_string())))
            (field("Backup id", j.snapshot.clone()))
            (field("Mode", j.mode.clone()))
            (field("Read", j.bytes_read.map(|b| bytes(b.max(0) as u64))))
            (field("New", j.bytes_new.map(|b| bytes(b.max(0) as u64))))
            (field("Duration", j.duration_secs.map(|d| format!("{d:.1} s"))))
            (field("Pruned", j.pruned.map(|p| p.to_string())))
            (field("Error", j.error.clone()))
            (field("Note", j.note.clone()))
        }
        (cancel_button(&j, &v))
        @if let (Some(id), "backup", JobStatus::Succeeded) = (&j.snapshot, j.kind.as_str(), j.status) {
            p { a href={"/ui/files?snapshot=" (id)} { "Browse the files of backup " (id) } }
        }
        p { a href="/ui/jobs" { "All jobs" } }
    };
    layout(&format!("Job {id}"), Some(&v), body).into_response()
}

/// Job `id` from the catalog (read on a blocking thread).
async fn job(s: &Arc<WebState>, id: i64) -> crate::Result<JobRecord> {
    match blocking(s, move |s| s.api.catalog.job(id)).await {
        Ok(r) => r,
        Err(_) => Err(DaemonError::NoSuchJob(id)),
    }
}

/// One server-sent `progress` event.
#[derive(Debug, Serialize)]
struct Tick {
    status: &'static str,
    phase: String,
    bytes_done: u64,
    bytes_total: u64,
    /// Bytes per second since the last event.
    rate: u64,
    /// The job ended: this is the last event.
    done: bool,
}

/// How often the live view is refreshed.
const TICK: Duration = Duration::from_secs(1);

/// The job's progress once a second until it ends (then one last event, and the stream
/// closes); a vanished job closes the stream too. At most [`MAX_STREAMS`] streams are
/// open at once (each holds a slot until it closes); more are answered 503.
pub async fn events(State(s): State<Arc<WebState>>, Path(id): Path<i64>) -> Response {
    let Ok(slot) = s.streams.clone().try_acquire_owned() else {
        return page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many live views",
            &format!("{MAX_STREAMS} live views are open; try again shortly."),
        );
    };
    if job(&s, id).await.is_err() {
        return page_error(
            StatusCode::NOT_FOUND,
            "No such job",
            "This job is not in the catalog.",
        );
    }
    let stream = futures::stream::unfold(
        (s, slot, 0u64, false, true),
        move |(s, slot, last, ended, first)| async move {
            if ended {
                return None;
            }
            if !first {
                tokio::time::sleep(TICK).await;
            }
            let job = job(&s, id).await.ok()?;
            let p = s
                .api
                .progress
                .lock()
                .ok()
                .and_then(|m| m.get(&id).cloned())
                .unwrap_or_default();
            let done = !matches!(job.status, JobStatus::Queued | JobStatus::Running);
            let tick = Tick {
                status: job.status.as_str(),
                phase: p.phase,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                rate: if first {
                    0
                } else {
                    p.bytes_done.saturating_sub(last) / TICK.as_secs().max(1)
                },
                done,
            };
            let ev = Event::default().event("progress").json_data(&tick).ok()?;
            Some((
                Ok::<_, Infallible>(ev),
                (s, slot, p.bytes_done, done, false),
            ))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
pub struct CancelForm {
    #[serde(default)]
    csrf: String,
}

pub async fn cancel(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<i64>,
    Form(f): Form<CancelForm>,
) -> Response {
    if let Some(r) = v.bad_csrf(&f.csrf) {
        return r;
    }
    let job = match job(&s, id).await {
        Ok(j) => j,
        Err(_) => {
            return page_error(
                StatusCode::NOT_FOUND,
                "No such job",
                "This job is not in the catalog.",
            );
        }
    };
    if let Some(r) = v.refuse(Action::cancel_of(&job.kind)) {
        return r;
    }
    if !crate::daemon::cancellable(&job.kind) {
        return page_error(
            StatusCode::CONFLICT,
            "Cannot be cancelled",
            &crate::api::not_cancellable(&job),
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if s.api
        .submit
        .send(Control::Cancel { id, reply: tx })
        .is_err()
    {
        return page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "The daemon is shutting down.",
        );
    }
    match rx.await {
        Ok(CancelReply::WasQueued | CancelReply::Stopping) => {
            Redirect::to(&format!("/ui/jobs/{id}")).into_response()
        }
        Ok(CancelReply::Finished(st)) => page_error(
            StatusCode::CONFLICT,
            "Already ended",
            &format!("Job {id} has already ended ({}).", st.as_str()),
        ),
        Err(_) => page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "The daemon is shutting down.",
        ),
    }
}

#[derive(Deserialize)]
pub struct BackupForm {
    #[serde(default)]
    csrf: String,
    /// `HOST/VM` (`t`: the dashboard's buttons, terse for its size).
    #[serde(default, alias = "t")]
    target: String,
    #[serde(default)]
    mode: ModeRequest,
}

/// What [`submit`] queues.
pub struct Submission {
    pub host: String,
    pub vm: String,
    pub policy: Option<String>,
    pub request: JobRequest,
}

/// Queues a job in the catalog and hands it to the daemon, as `POST /api/jobs` does
/// (the catalog written on a blocking thread).
pub async fn submit(s: &Arc<WebState>, j: Submission) -> Result<i64, Box<Response>> {
    blocking(s, move |s| {
        submit_now(s, &j.host, &j.vm, j.policy.as_deref(), &j.request)
    })
    .await
    .map_err(Box::new)?
}

fn submit_now(
    s: &WebState,
    host: &str,
    vm: &str,
    policy: Option<&str>,
    request: &JobRequest,
) -> Result<i64, Box<Response>> {
    let priority = match policy {
        None => 0,
        Some(p) => match s.api.env.daemon.policies.get(p) {
            Some(p) => i64::from(p.priority),
            None => {
                return Err(Box::new(page_error(
                    StatusCode::BAD_REQUEST,
                    "No such policy",
                    "This policy is not in the configuration.",
                )));
            }
        },
    };
    let text = serde_json::to_string(request).map_err(|e| {
        Box::new(page_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Error",
            &e.to_string(),
        ))
    })?;
    let id = s
        .api
        .catalog
        .add_job(&NewJob {
            run_id: None,
            kind: request.kind(),
            host,
            vm,
            policy,
            request: &text,
            attempt: 1,
            retry_of: None,
            priority,
            not_before: now(),
        })
        .map_err(|e| {
            Box::new(page_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Catalog error",
                &e.to_string(),
            ))
        })?;
    if s.api.submit.send(Control::Submit(id)).is_err() {
        return Err(Box::new(page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "The daemon is shutting down; the job runs after the next start.",
        )));
    }
    Ok(id)
}

/// Backs up `HOST/VM` now, with the options of the first enabled policy that selects it
/// (the defaults and the default repository when none does).
pub async fn start_backup(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Form(f): Form<BackupForm>,
) -> Response {
    if let Some(r) = v
        .bad_csrf(&f.csrf)
        .or_else(|| v.refuse(Action::SubmitBackup))
    {
        return r;
    }
    let daemon = &s.api.env.daemon;
    let Some((host, vm)) = f.target.split_once('/') else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "target must be HOST/VM.",
        );
    };
    if !s.api.env.engine.hosts.contains_key(host) {
        return page_error(
            StatusCode::BAD_REQUEST,
            "No such host",
            "This host is not in the configuration.",
        );
    }
    if vm.is_empty() || vm.len() > MAX_NAME {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "A backup needs a VM name (at most 256 bytes).",
        );
    }
    let policy = daemon
        .policies
        .values()
        .find(|p| {
            p.enabled
                && p.selections
                    .iter()
                    .any(|sel| sel.host == host && sel.matches(vm))
        })
        .map(|p| p.name.clone());
    let request = JobRequest::Backup {
        policy: policy.clone(),
        mode: f.mode,
    };
    let job = Submission {
        host: host.to_string(),
        vm: vm.to_string(),
        policy,
        request,
    };
    match submit(&s, job).await {
        Ok(id) => Redirect::to(&format!("/ui/jobs/{id}")).into_response(),
        Err(r) => *r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;
    use crate::web::session::Sessions;

    #[test]
    fn cancel_is_offered_only_where_the_api_cancels() {
        let sessions = Sessions::default();
        let id = sessions.create(Scope::Admin, 0).expect("session");
        let v = Viewer {
            session: sessions.get(&id).expect("get"),
            id,
        };
        let dir = tempfile::tempdir().expect("tmp");
        let c = crate::catalog::Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        for (kind, offered) in [
            ("backup", true),
            ("verify_boot", true),
            ("sync", false),
            ("gc", false),
            ("verify", false),
        ] {
            let new = crate::catalog::NewJob {
                run_id: None,
                kind,
                host: "",
                vm: "x",
                policy: None,
                request: "{}",
                attempt: 1,
                retry_of: None,
                priority: 0,
                not_before: 0,
            };
            let id = c.start_job(&new, "n1", i64::MAX / 2).expect("start");
            let running = c.job(id).expect("job");
            assert_eq!(running.status, JobStatus::Running);
            let html = cancel_button(&running, &v).into_string();
            assert_eq!(html.contains(">Cancel<"), offered, "{kind}: {html}");
        }
    }
}
