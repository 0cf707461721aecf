//! The REST API (axum) with its OpenAPI document (utoipa) at `/api/openapi.json`.
//!
//! Every route but the OpenAPI document needs `Authorization: Bearer TOKEN`, with a
//! token from the variable or file named in `[daemon.api]`; tokens are compared in
//! constant time. `/metrics` needs it too (Prometheus sends it with `authorization:`).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::catalog::{Catalog, JobFilter, JobRecord, JobStatus, NewJob, RunRecord, now, rfc3339};
use crate::daemon::{CancelReply, Control, Submissions};
use crate::error::{DaemonError, Result};
use crate::idle::IdleLimit;
use crate::policy::{ApiConfig, DaemonConfig, TokenFrom};
use crate::scope::{self, Action, Scope};
use crate::task::{Env, JobProgress, JobRequest, ProgressMap, open_repository};

/// One accepted token and what it may do.
pub struct ApiToken {
    pub secret: Vec<u8>,
    pub scope: Scope,
}

fn read_source(from: &TokenFrom) -> Result<Vec<Vec<u8>>> {
    match from {
        TokenFrom::Env(var) => match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok(vec![t.trim().as_bytes().to_vec()]),
            _ => Err(DaemonError::TokenEnv { var: var.clone() }),
        },
        TokenFrom::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Io {
                what: "reading the API token file",
                path: path.clone(),
                source,
            })?;
            Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec())
                .collect())
        }
    }
}

/// Reads the API tokens named in the configuration (never stored in it). A token file
/// holds one token per line; blank lines and `#` comments are ignored. A token listed
/// with two different scopes is refused rather than guessed at.
pub fn load_tokens(api: &ApiConfig) -> Result<Vec<ApiToken>> {
    let mut tokens: Vec<ApiToken> = Vec::new();
    for source in &api.tokens {
        if !source.scoped {
            tracing::warn!(
                "an API token source ({:?}) has no scope: its tokens may only read (scope = \"{}\"); set scope in [daemon.api] (docs/daemon.md)",
                source.from,
                source.scope.as_str()
            );
        }
        for secret in read_source(&source.from)? {
            match tokens.iter().find(|t| t.secret == secret) {
                Some(t) if t.scope != source.scope => {
                    return Err(DaemonError::TokenConflict {
                        first: t.scope.as_str().into(),
                        second: source.scope.as_str().into(),
                    });
                }
                Some(_) => {}
                None => tokens.push(ApiToken {
                    secret,
                    scope: source.scope,
                }),
            }
        }
    }
    if tokens.is_empty() {
        return Err(DaemonError::TokenEnv {
            var: "(the token files are empty)".into(),
        });
    }
    Ok(tokens)
}

pub struct ApiState {
    pub env: Arc<Env>,
    pub catalog: Arc<Catalog>,
    pub progress: ProgressMap,
    pub submit: Submissions,
    pub tokens: Vec<ApiToken>,
}

impl ApiState {
    /// The scope of the token `given`, if it is one. Every token is compared, whichever
    /// matches, so timing tells nothing about which (tokens are unique, see load_tokens).
    pub(crate) fn token_scope(&self, given: &[u8]) -> Option<Scope> {
        self.token_match(given).map(|(scope, _)| scope)
    }

    /// The scope and the index (in `tokens`) of the token `given`, if it is one; every
    /// token is compared, as in [`ApiState::token_scope`]. The web console counts its
    /// sessions per token by the index.
    pub(crate) fn token_match(&self, given: &[u8]) -> Option<(Scope, usize)> {
        let mut found = 0u8;
        let mut index = 0u32;
        for (i, t) in self.tokens.iter().enumerate() {
            let level = t.scope as u8 + 1;
            let hit = given.ct_eq(&t.secret);
            found = u8::conditional_select(&found, &level, hit);
            index = u32::conditional_select(&index, &(i as u32), hit);
        }
        [Scope::Read, Scope::Operate, Scope::Admin]
            .into_iter()
            .find(|s| *s as u8 + 1 == found)
            .map(|s| (s, index as usize))
    }
}

/// The authenticated token's scope, for handlers that decide by the request's content.
#[derive(Debug, Clone, Copy)]
struct Granted(Scope);

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
    /// On 403: the scope the request needs, and the token's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required_scope: Option<Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_scope: Option<Scope>,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: msg.into(),
            required_scope: None,
            token_scope: None,
        }),
    )
        .into_response()
}

/// The 403 answer, unless the token's scope covers `action`.
fn forbidden(granted: Granted, action: Action) -> Option<Response> {
    scope::check(granted.0, action).err().map(|msg| {
        (
            StatusCode::FORBIDDEN,
            Json(ApiError {
                error: msg,
                required_scope: Some(action.needs()),
                token_scope: Some(granted.0),
            }),
        )
            .into_response()
    })
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn auth(State(s): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    match given.and_then(|t| s.token_scope(&t)) {
        Some(scope) => {
            req.extensions_mut().insert(Granted(scope));
            next.run(req).await
        }
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer <token>",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostView {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub libvirt_uri: String,
}

#[utoipa::path(get, path = "/api/hosts", tag = "hosts",
    responses((status = 200, description = "Configured hosts", body = [HostView])))]
async fn list_hosts(State(s): State<Arc<ApiState>>) -> Json<Vec<HostView>> {
    Json(
        s.env
            .engine
            .hosts
            .iter()
            .map(|(name, h)| HostView {
                name: name.clone(),
                address: h.address.clone(),
                port: h.port,
                user: h.user.clone(),
                libvirt_uri: h.libvirt_uri.clone(),
            })
            .collect(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmView {
    pub host: String,
    pub name: String,
    pub uuid: String,
    /// `running`, `shut_off`, … as libvirt reports it.
    pub state: String,
    /// Disk targets with the backup method that applies.
    pub disks: Vec<VmDiskView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmDiskView {
    pub target: String,
    pub backend: String,
    pub source: String,
    pub method: String,
}

#[utoipa::path(get, path = "/api/hosts/{host}/vms", tag = "hosts",
    params(("host" = String, Path, description = "Host name from the configuration")),
    responses((status = 200, description = "The host's VMs", body = [VmView]),
              (status = 404, description = "No such host", body = ApiError),
              (status = 502, description = "The host could not be asked", body = ApiError)))]
async fn list_vms(State(s): State<Arc<ApiState>>, Path(host): Path<String>) -> Response {
    if !s.env.engine.hosts.contains_key(&host) {
        return error(StatusCode::NOT_FOUND, format!("no host {host:?}"));
    }
    let h = match s.env.connect(&host).await {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    match virtkeep_engine::inventory::list_vms(&h).await {
        Ok(vms) => Json(
            vms.into_iter()
                .map(|v| VmView {
                    host: v.host,
                    name: v.name,
                    uuid: v.uuid,
                    state: serde_json::to_value(v.state)
                        .ok()
                        .and_then(|s| s.as_str().map(String::from))
                        .unwrap_or_default(),
                    disks: v
                        .disks
                        .into_iter()
                        .map(|d| VmDiskView {
                            target: d.target,
                            backend: d.backend,
                            source: d.source,
                            method: d.method,
                        })
                        .collect(),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupView {
    pub id: String,
    /// RFC 3339.
    pub time: String,
    pub host: String,
    pub vm: String,
    /// `full` or `incremental`.
    pub mode: String,
    pub disks: Vec<String>,
    pub size: u64,
    pub bytes_new: u64,
    pub protected: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupsQuery {
    /// Only this host's backups.
    pub host: Option<String>,
    /// Only this VM's backups.
    pub vm: Option<String>,
    /// A name from `[repositories]`; the default repository otherwise.
    pub repository: Option<String>,
}

#[utoipa::path(get, path = "/api/backups", tag = "backups", params(BackupsQuery),
    responses((status = 200, description = "Backups in the repository", body = [BackupView]),
              (status = 502, description = "The repository could not be read", body = ApiError)))]
async fn list_backups(State(s): State<Arc<ApiState>>, Query(q): Query<BackupsQuery>) -> Response {
    let rc = match s.env.repository_config(q.repository.as_deref()) {
        Ok(rc) => rc,
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    let repo = match open_repository(rc).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    match repo.snapshots().await {
        Ok(list) => Json(
            list.into_iter()
                .filter(|b| q.host.as_ref().is_none_or(|h| *h == b.host))
                .filter(|b| q.vm.as_ref().is_none_or(|v| *v == b.vm))
                .map(|b| BackupView {
                    id: b.id,
                    time: b
                        .time
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    host: b.host,
                    vm: b.vm,
                    mode: serde_json::to_value(b.mode)
                        .ok()
                        .and_then(|m| m.as_str().map(String::from))
                        .unwrap_or_default(),
                    disks: b.disks,
                    size: b.size,
                    bytes_new: b.bytes_new,
                    protected: b.protected,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// queued, running, succeeded, failed or cancelled.
    pub status: Option<String>,
    pub host: Option<String>,
    pub vm: Option<String>,
    pub run: Option<i64>,
    /// At most this many, newest first (default 100).
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(JobsQuery),
    responses((status = 200, description = "Jobs, newest first", body = [JobRecord]),
              (status = 400, description = "Bad filter", body = ApiError)))]
async fn list_jobs(State(s): State<Arc<ApiState>>, Query(q): Query<JobsQuery>) -> Response {
    let status = match q.status.as_deref() {
        None => None,
        Some("queued") => Some(JobStatus::Queued),
        Some("running") => Some(JobStatus::Running),
        Some("succeeded") => Some(JobStatus::Succeeded),
        Some("failed") => Some(JobStatus::Failed),
        Some("cancelled") => Some(JobStatus::Cancelled),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "status {other:?}: expected queued, running, succeeded, failed or cancelled"
                ),
            );
        }
    };
    match s.catalog.jobs(&JobFilter {
        status,
        host: q.host,
        vm: q.vm,
        run_id: q.run,
        limit: Some(q.limit.unwrap_or(100)),
    }) {
        Ok(j) => Json(j).into_response(),
        Err(e) => internal(e),
    }
}

/// A job with its live progress while it runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRecord,
    pub progress: Option<JobProgress>,
}

#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = JobView),
              (status = 404, description = "No such job", body = ApiError)))]
async fn get_job(State(s): State<Arc<ApiState>>, Path(id): Path<i64>) -> Response {
    match s.catalog.job(id) {
        Ok(job) => {
            let progress = s.progress.lock().ok().and_then(|m| m.get(&id).cloned());
            Json(JobView { job, progress }).into_response()
        }
        Err(DaemonError::NoSuchJob(_)) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => internal(e),
    }
}

/// A backup (`kind = "backup"`, `vm`, optional `mode`, `policy`) or a restore
/// (`kind = "restore"`, `snapshot`, optional `name`, `storage`, `define`, `start`); a
/// live restore is a restore with `live = true` and `name` (job kind `live_restore`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct SubmitJob {
    /// The host to back up from or restore to.
    pub host: String,
    /// The VM to back up.
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(flatten)]
    pub request: JobRequest,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    pub id: i64,
    /// Where to follow it.
    pub href: String,
}

#[utoipa::path(post, path = "/api/jobs", tag = "jobs", request_body = SubmitJob,
    responses((status = 202, description = "Queued", body = Submitted),
              (status = 400, description = "Bad request", body = ApiError),
              (status = 403, description = "The token's scope does not allow it (backup: operate, restore: admin)", body = ApiError),
              (status = 413, description = "The body is larger than max_request_bytes", body = ApiError)))]
async fn submit_job(
    State(s): State<Arc<ApiState>>,
    Extension(granted): Extension<Granted>,
    body: std::result::Result<Json<SubmitJob>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let action = match req.request {
        JobRequest::Backup { .. } => Action::SubmitBackup,
        JobRequest::Restore { .. } => Action::SubmitRestore,
        JobRequest::VerifyBoot { .. } => {
            return error(
                StatusCode::BAD_REQUEST,
                "boot verification runs on its policy's schedule ([policies.NAME.verify_boot]); use `virtkeep verify --boot` for one now",
            );
        }
    };
    if let Some(r) = forbidden(granted, action) {
        return r;
    }
    if !s.env.engine.hosts.contains_key(&req.host) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("no host {:?} in the configuration", req.host),
        );
    }
    let (vm, policy, priority) = match &req.request {
        JobRequest::Backup { policy, .. } => {
            let Some(vm) = req.vm.clone().filter(|v| !v.is_empty()) else {
                return error(StatusCode::BAD_REQUEST, "a backup needs \"vm\"");
            };
            let priority = match policy {
                None => 0,
                Some(p) => match s.env.daemon.policies.get(p) {
                    Some(p) => p.priority,
                    None => return error(StatusCode::BAD_REQUEST, format!("no policy {p:?}")),
                },
            };
            (vm, policy.clone(), priority)
        }
        JobRequest::Restore {
            snapshot,
            name,
            storage,
            live,
            ..
        } => {
            if let Err(e) = crate::task::parse_storage(storage.as_deref()) {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            if *live && name.as_deref().is_none_or(str::is_empty) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "a live restore needs \"name\" (it makes a new domain)",
                );
            }
            (
                name.clone()
                    .or(req.vm.clone())
                    .unwrap_or_else(|| snapshot.clone()),
                None,
                0,
            )
        }
        // Refused above.
        JobRequest::VerifyBoot { .. } => return error(StatusCode::BAD_REQUEST, "not submittable"),
    };
    let request = match serde_json::to_string(&req.request) {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let id = match s.catalog.add_job(&NewJob {
        run_id: None,
        kind: req.request.kind(),
        host: &req.host,
        vm: &vm,
        policy: policy.as_deref(),
        request: &request,
        attempt: 1,
        retry_of: None,
        priority: i64::from(priority),
        not_before: now(),
    }) {
        Ok(id) => id,
        Err(e) => return internal(e),
    };
    if s.submit.send(Control::Submit(id)).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down; the job runs after the next start",
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(Submitted {
            id,
            href: format!("/api/jobs/{id}"),
        }),
    )
        .into_response()
}

/// The answer to a cancel.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    pub id: i64,
    /// `cancelled` (it was queued) or `cancelling` (it runs: it stops, its VM is
    /// healed, and it ends as `cancelled`; follow `href`).
    pub status: String,
    pub href: String,
}

/// The 409 message for a job `crate::daemon::cancellable` refuses.
pub fn not_cancellable(job: &JobRecord) -> String {
    format!(
        "job {} is a {} run, which cannot be cancelled: it runs beside the job queue and ends on its own (a stopped daemon or a lost lead ends it too)",
        job.id, job.kind
    )
}

#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, description = "It was queued and is cancelled", body = Cancelled),
              (status = 202, description = "It runs: being stopped, its VM healed", body = Cancelled),
              (status = 403, description = "The token's scope does not allow it (backup: operate, restore: admin)", body = ApiError),
              (status = 404, description = "No such job", body = ApiError),
              (status = 409, description = "The job has already ended, or is of a kind that cannot be cancelled (sync, gc, verify)", body = ApiError)))]
async fn cancel_job(
    State(s): State<Arc<ApiState>>,
    Extension(granted): Extension<Granted>,
    Path(id): Path<i64>,
) -> Response {
    let job = match s.catalog.job(id) {
        Ok(j) => j,
        Err(DaemonError::NoSuchJob(_)) => {
            return error(StatusCode::NOT_FOUND, format!("no job {id}"));
        }
        Err(e) => return internal(e),
    };
    if let Some(r) = forbidden(granted, Action::cancel_of(&job.kind)) {
        return r;
    }
    if !crate::daemon::cancellable(&job.kind) {
        return error(StatusCode::CONFLICT, not_cancellable(&job));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if s.submit.send(Control::Cancel { id, reply: tx }).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        );
    }
    let answer = |code, status: &str| {
        (
            code,
            Json(Cancelled {
                id,
                status: status.into(),
                href: format!("/api/jobs/{id}"),
            }),
        )
            .into_response()
    };
    match rx.await {
        Ok(CancelReply::WasQueued) => answer(StatusCode::OK, "cancelled"),
        Ok(CancelReply::Stopping) => answer(StatusCode::ACCEPTED, "cancelling"),
        Ok(CancelReply::Finished(st)) => error(
            StatusCode::CONFLICT,
            format!("job {id} has already ended ({})", st.as_str()),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    pub name: String,
    pub enabled: bool,
    pub priority: i32,
    pub repository: Option<String>,
    /// `HOST: names [...] regex [...] exclude [...]` per selection.
    pub vms: Vec<String>,
    pub schedules: Vec<ScheduleView>,
    /// e.g. `keep_last=3 keep_daily=7`.
    pub retention: Option<String>,
    pub retries: u32,
    pub fail_rest_above_percent: Option<u8>,
    pub last_runs: Vec<RunRecord>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    pub schedule: String,
    pub mode: String,
    /// RFC 3339, from the catalog; none before the daemon first ran it.
    pub next_run: Option<String>,
    pub last_run: Option<String>,
}

/// The policies with their schedules' state, as `virtkeep policy list` and the API show it.
pub fn policy_views(daemon: &DaemonConfig, catalog: Option<&Catalog>) -> Result<Vec<PolicyView>> {
    let mut out = Vec::new();
    for p in daemon.policies.values() {
        let mut schedules = Vec::new();
        for s in p.all_schedules() {
            let (next, last) = match catalog {
                Some(c) => (c.next_run(&p.name, &s.key)?, c.last_run(&p.name, &s.key)?),
                None => (None, None),
            };
            schedules.push(ScheduleView {
                schedule: s.describe(),
                mode: if p.is_verify_schedule(&s.key) {
                    "verify_boot".to_string()
                } else {
                    s.mode.as_str().to_string()
                },
                next_run: next.map(rfc3339),
                last_run: last.map(rfc3339),
            });
        }
        let retention = p.retention.map(|k| {
            [
                ("keep_last", k.last),
                ("keep_hourly", k.hourly),
                ("keep_daily", k.daily),
                ("keep_weekly", k.weekly),
                ("keep_monthly", k.monthly),
                ("keep_yearly", k.yearly),
            ]
            .iter()
            .filter_map(|(n, v)| v.map(|v| format!("{n}={v}")))
            .collect::<Vec<_>>()
            .join(" ")
        });
        out.push(PolicyView {
            name: p.name.clone(),
            enabled: p.enabled,
            priority: p.priority,
            repository: p.repository.clone(),
            vms: p
                .selections
                .iter()
                .map(|s| {
                    format!(
                        "{}: names {:?} regex {:?} exclude {:?}",
                        s.host,
                        s.names,
                        s.regex.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        s.exclude.iter().map(|r| r.as_str()).collect::<Vec<_>>()
                    )
                })
                .collect(),
            schedules,
            retention,
            retries: p.retries,
            fail_rest_above_percent: p.fail_rest_above_percent,
            last_runs: match catalog {
                Some(c) => c.runs(Some(&p.name), 5)?,
                None => Vec::new(),
            },
        });
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/policies", tag = "policies",
    responses((status = 200, description = "Policies with next runs", body = [PolicyView])))]
async fn list_policies(State(s): State<Arc<ApiState>>) -> Response {
    match policy_views(&s.env.daemon, Some(&s.catalog)) {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let text = crate::metrics::render(&s.catalog, &s.env.daemon.named_vms()).and_then(|mut t| {
        crate::metrics::scheduled(&mut t, &s.catalog, &s.env.daemon)?;
        Ok(t)
    });
    match text {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

#[utoipa::path(get, path = "/api/nodes", tag = "nodes",
    responses((status = 200, description = "The nodes sharing this daemon's catalog", body = [crate::catalog::NodeRecord])))]
async fn list_nodes(State(s): State<Arc<ApiState>>) -> Response {
    match s.catalog.nodes(now()) {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

struct TokenScheme;

impl Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The boot verification state of one VM (its newest `verify_boot` job).
#[derive(Debug, Serialize, ToSchema)]
pub struct BootVerifyView {
    pub host: String,
    pub vm: String,
    /// Whether the last verification passed.
    pub passed: bool,
    /// The backup it booted.
    pub snapshot: Option<String>,
    /// RFC 3339: when the last verification ended, and when one last passed.
    pub finished: Option<String>,
    pub last_success: Option<String>,
    /// Why the last one failed.
    pub error: Option<String>,
    /// The last verification's job (`GET /api/jobs/{id}`).
    pub job: i64,
}

/// The boot verification state of each VM a policy verified.
pub fn boot_verify_views(catalog: &Catalog) -> Result<Vec<BootVerifyView>> {
    let stats = catalog.vm_stats_of("verify_boot")?;
    Ok(catalog
        .last_jobs("verify_boot")?
        .into_iter()
        .map(|j| BootVerifyView {
            last_success: stats
                .iter()
                .find(|s| s.host == j.host && s.vm == j.vm)
                .and_then(|s| s.last_success)
                .map(rfc3339),
            host: j.host,
            vm: j.vm,
            passed: j.status == JobStatus::Succeeded,
            snapshot: j.snapshot,
            finished: j.finished,
            error: j.error,
            job: j.id,
        })
        .collect())
}

#[utoipa::path(get, path = "/api/boot-verify", tag = "jobs",
    responses((status = 200, description = "Per VM: its last boot verification", body = [BootVerifyView])))]
async fn list_boot_verify(State(s): State<Arc<ApiState>>) -> Response {
    match boot_verify_views(&s.catalog) {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "virtkeep", description = "Hosts, VMs, backups and jobs of a virtkeep daemon"),
    paths(list_hosts, list_vms, list_backups, list_jobs, get_job, submit_job, cancel_job,
          list_policies, metrics, crate::files_api::list_files,
          crate::files_api::download_file, list_nodes, list_boot_verify),
    components(schemas(HostView, VmView, VmDiskView, BackupView, JobRecord, JobStatus, JobView,
                       JobProgress, SubmitJob, JobRequest, Submitted, Cancelled, ApiError, Scope,
                       PolicyView, ScheduleView, RunRecord,
                       crate::files_api::FilesLayoutView, crate::files_api::FilesDirView,
                       crate::catalog::NodeRecord, BootVerifyView)),
    modifiers(&TokenScheme),
    security(("token" = []))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// A request that takes longer than `request_timeout` is answered 503 (its handler is
/// dropped; a job it queued is in the catalog already and runs).
async fn deadline(State(limit): State<std::time::Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than request_timeout ({} s)",
                limit.as_secs()
            ),
        ),
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    let (max_bytes, timeout) = state.env.daemon.api.as_ref().map_or(
        (
            crate::policy::DEFAULT_MAX_REQUEST_BYTES,
            crate::policy::DEFAULT_REQUEST_TIMEOUT,
        ),
        |a| (a.max_request_bytes, a.request_timeout),
    );
    let protected = Router::new()
        .route("/api/hosts", get(list_hosts))
        .route("/api/hosts/{host}/vms", get(list_vms))
        .route("/api/backups", get(list_backups))
        .route("/api/backups/{id}/files", get(crate::files_api::list_files))
        .route(
            "/api/backups/{id}/files/download",
            get(crate::files_api::download_file),
        )
        .route("/api/jobs", get(list_jobs).post(submit_job))
        .route("/api/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/api/policies", get(list_policies))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(list_nodes))
        .route("/api/boot-verify", get(list_boot_verify))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .merge(protected)
        .merge(crate::web::router(state.clone()))
        .layer(DefaultBodyLimit::max(max_bytes))
        .layer(axum::middleware::from_fn_with_state(timeout, deadline))
        .with_state(state)
}

/// How much longer than `request_timeout` a connection may stay without traffic.
const IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `[daemon.api] listen` (failing now, not later) and serves in the background:
/// HTTPS when the configuration names a certificate (reloaded on SIGHUP), else HTTP.
pub fn serve(state: ApiState, api: &ApiConfig) -> Result<std::net::SocketAddr> {
    let listen = api.listen.as_str();
    let fail = |source| DaemonError::Listen {
        addr: listen.to_string(),
        source,
    };
    let tls = match &api.tls {
        Some(files) => Some(crate::tls::Reloader::new(files.clone())?),
        None => None,
    };
    crate::tls::handle_sighup(tls.clone()).map_err(|source| DaemonError::Io {
        what: "installing the SIGHUP handler",
        path: "SIGHUP".into(),
        source,
    })?;
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(fail)?;
    let app = router(Arc::new(state));
    // Idle connections close a little after request_timeout, so a slow handler gets
    // its 503 out first.
    let limit = api.request_timeout + IDLE_GRACE;
    match tls {
        Some(tls) => {
            let inner = crate::tls::TlsListener::new(listener, tls).map_err(fail)?;
            tokio::spawn(async move {
                let app = app.into_make_service_with_connect_info::<crate::idle::PeerAddr>();
                if let Err(e) = axum::serve(IdleLimit { inner, limit }, app).await {
                    tracing::error!("API server stopped: {e}");
                }
            });
        }
        None => {
            tokio::spawn(async move {
                let inner = listener;
                let app = app.into_make_service_with_connect_info::<crate::idle::PeerAddr>();
                if let Err(e) = axum::serve(IdleLimit { inner, limit }, app).await {
                    tracing::error!("API server stopped: {e}");
                }
            });
        }
    }
    let scheme = if api.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "API listening");
    Ok(addr)
}
