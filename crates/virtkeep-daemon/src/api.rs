//! The REST API (axum) with its OpenAPI document (utoipa) at `/api/openapi.json`.
//!
//! Every route but the OpenAPI document needs `Authorization: Bearer TOKEN`, with a
//! token from the variable or file named in `[daemon.api]`; tokens are compared in
//! constant time. `/metrics` needs it too (Prometheus sends it with `authorization:`).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::catalog::{Catalog, JobFilter, JobRecord, JobStatus, NewJob, RunRecord, now, rfc3339};
use crate::daemon::Submissions;
use crate::error::{DaemonError, Result};
use crate::policy::{ApiConfig, DaemonConfig};
use crate::task::{Env, JobProgress, JobRequest, ProgressMap, open_repository};

/// Reads the API tokens named in the configuration (never stored in it). A token file
/// holds one token per line; blank lines and `#` comments are ignored.
pub fn load_tokens(api: &ApiConfig) -> Result<Vec<Vec<u8>>> {
    let mut tokens = Vec::new();
    if let Some(var) = &api.token_env {
        match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => tokens.push(t.trim().as_bytes().to_vec()),
            _ => return Err(DaemonError::TokenEnv { var: var.clone() }),
        }
    }
    if let Some(path) = &api.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Io {
            what: "reading the API token file",
            path: path.clone(),
            source,
        })?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec()),
        );
    }
    if tokens.is_empty() {
        return Err(DaemonError::TokenEnv {
            var: api
                .token_env
                .clone()
                .unwrap_or_else(|| "(token_file is empty)".into()),
        });
    }
    Ok(tokens)
}

pub struct ApiState {
    pub env: Arc<Env>,
    pub catalog: Arc<Catalog>,
    pub progress: ProgressMap,
    pub submit: Submissions,
    pub tokens: Vec<Vec<u8>>,
}

impl ApiState {
    fn token_ok(&self, given: &[u8]) -> bool {
        // Every token is compared, whichever matches, so timing tells nothing about which.
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.tokens {
            ok |= given.ct_eq(t);
        }
        ok.into()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn auth(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    match given {
        Some(t) if s.token_ok(&t) => next.run(req).await,
        _ => {
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
    /// queued, running, succeeded or failed.
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
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("status {other:?}: expected queued, running, succeeded or failed"),
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
/// (`kind = "restore"`, `snapshot`, optional `name`, `storage`, `define`, `start`).
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
              (status = 400, description = "Bad request", body = ApiError)))]
async fn submit_job(State(s): State<Arc<ApiState>>, Json(req): Json<SubmitJob>) -> Response {
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
            ..
        } => {
            if let Err(e) = crate::task::parse_storage(storage.as_deref()) {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            (
                name.clone()
                    .or(req.vm.clone())
                    .unwrap_or_else(|| snapshot.clone()),
                None,
                0,
            )
        }
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
    if s.submit.send(id).is_err() {
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
        for s in &p.schedules {
            let (next, last) = match catalog {
                Some(c) => (c.next_run(&p.name, &s.key)?, c.last_run(&p.name, &s.key)?),
                None => (None, None),
            };
            schedules.push(ScheduleView {
                schedule: s.describe(),
                mode: s.mode.as_str().to_string(),
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
    match crate::metrics::render(&s.catalog, &s.env.daemon.named_vms()) {
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

#[derive(OpenApi)]
#[openapi(
    info(title = "virtkeep", description = "Hosts, VMs, backups and jobs of a virtkeep daemon"),
    paths(list_hosts, list_vms, list_backups, list_jobs, get_job, submit_job, list_policies, metrics),
    components(schemas(HostView, VmView, VmDiskView, BackupView, JobRecord, JobStatus, JobView,
                       JobProgress, SubmitJob, JobRequest, Submitted, ApiError, PolicyView,
                       ScheduleView, RunRecord)),
    modifiers(&TokenScheme),
    security(("token" = []))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/api/hosts", get(list_hosts))
        .route("/api/hosts/{host}/vms", get(list_vms))
        .route("/api/backups", get(list_backups))
        .route("/api/jobs", get(list_jobs).post(submit_job))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/policies", get(list_policies))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .merge(protected)
        .with_state(state)
}

/// Binds `[daemon.api] listen` (failing now, not later) and serves in the background.
pub fn serve(state: ApiState, listen: &str) -> Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let app = router(Arc::new(state));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("API server stopped: {e}");
        }
    });
    tracing::info!(%addr, "API listening");
    Ok(addr)
}
