//! The daemon's part of the configuration file: `[daemon]` (catalog, limits, retries,
//! shutdown, API) and `[policies.NAME]` (which VMs, when, how, how long to keep).
//!
//! Read from the file's text rather than from the engine's `Config` so that every
//! error names the file, line and column, and what was expected there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use toml::Spanned;
use virtkeep_engine::config::Config as EngineConfig;

use crate::catalog::CatalogLocation;
use crate::catalog::pg::{PasswordSource, PgLocation};
use crate::error::ConfigError;
use crate::history::HistoryLimits;
use crate::schedule::{Schedule, parse_duration};
use crate::scope::{Scope, UNSCOPED_DEFAULT};
use virtkeep_engine::plan::{ModeRequest, Transport};

/// What to do with runs that fell due while the daemon was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MissedRuns {
    /// One run at start-up for each schedule that missed one or more (never several).
    #[default]
    RunOnce,
    /// Wait for the next regular time.
    Skip,
}

/// What SIGTERM does to running jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// Let running jobs finish (up to `shutdown_grace`, then abort them).
    #[default]
    Finish,
    /// Abort running jobs at once, returning their VMs to their own files.
    Abort,
}

// ---- the file's shape -------------------------------------------------------------

#[derive(Deserialize)]
struct FileModel {
    #[serde(default)]
    daemon: Option<DaemonModel>,
    #[serde(default)]
    policies: BTreeMap<String, Spanned<PolicyModel>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DaemonModel {
    catalog: Option<Spanned<String>>,
    catalog_password_file: Option<PathBuf>,
    catalog_password_env: Option<String>,
    catalog_ca_file: Option<PathBuf>,
    node: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
    max_jobs: Option<Spanned<usize>>,
    max_jobs_per_host: Option<Spanned<usize>>,
    #[serde(default)]
    host_limits: BTreeMap<Spanned<String>, Spanned<usize>>,
    #[serde(default)]
    missed_runs: MissedRuns,
    retries: Option<u32>,
    retry_backoff: Option<Spanned<String>>,
    #[serde(default)]
    shutdown: ShutdownMode,
    shutdown_grace: Option<Spanned<String>>,
    history_max_age: Option<Spanned<String>>,
    history_max_jobs: Option<Spanned<usize>>,
    api: Option<ApiModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiModel {
    listen: Spanned<String>,
    token_env: Option<Spanned<String>>,
    token_file: Option<PathBuf>,
    /// The scope of `token_env` / `token_file` tokens.
    scope: Option<Scope>,
    #[serde(default)]
    tokens: Vec<Spanned<TokenModel>>,
    tls_certificate: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    insecure_plain_http: bool,
    max_request_bytes: Option<Spanned<usize>>,
    request_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenModel {
    env: Option<String>,
    file: Option<PathBuf>,
    scope: Scope,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyModel {
    #[serde(default = "yes")]
    enabled: bool,
    repository: Option<Spanned<String>>,
    #[serde(default)]
    priority: i32,
    vms: Vec<SelectModel>,
    schedules: Vec<Spanned<ModeRequestl>>,
    retention: Option<Spanned<RetentionModel>>,
    pre_snapshot: Option<String>,
    post_snapshot: Option<String>,
    #[serde(default)]
    quiesce: bool,
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    exclude_disks: Vec<String>,
    keep_base: Option<bool>,
    job_timeout: Option<Spanned<String>>,
    parallel: Option<Spanned<usize>>,
    retries: Option<u32>,
    fail_rest_above_percent: Option<Spanned<u8>>,
    verify_boot: Option<Spanned<VerifyBootModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBootModel {
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    every: Option<Spanned<String>>,
    host: Spanned<String>,
    expect_serial: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    agent: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectModel {
    host: Spanned<String>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    regex: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequestl {
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    every: Option<Spanned<String>>,
    #[serde(default = "auto")]
    mode: ModeRequest,
}

fn auto() -> ModeRequest {
    ModeRequest::Auto
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionModel {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
}

// ---- the checked result ---------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub file: PathBuf,
    pub catalog: CatalogLocation,
    /// This node's name in a cluster (`[daemon] node`, default the host name).
    pub node: String,
    /// How long a node's claim on a job holds without a heartbeat (`[daemon] lease`).
    pub lease: Duration,
    pub max_jobs: usize,
    pub max_jobs_per_host: usize,
    pub host_limits: BTreeMap<String, usize>,
    pub missed_runs: MissedRuns,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub shutdown: ShutdownMode,
    pub shutdown_grace: Duration,
    /// How long finished jobs stay in the catalog, and how many.
    pub history: HistoryLimits,
    pub api: Option<ApiConfig>,
    pub policies: BTreeMap<String, Policy>,
    /// `[sync.NAME]` jobs (crate::sync_jobs).
    pub syncs: Vec<crate::sync_config::SyncJob>,
    /// `[maintenance.REPOSITORY]` GC and verify schedules (crate::maintenance).
    pub maintenance: Vec<crate::maintenance_config::Maintenance>,
}

impl DaemonConfig {
    /// (host, VM) pairs the enabled policies name exactly (`names`); VMs matched by a
    /// regular expression are only known once a run has listed the host's domains.
    pub fn named_vms(&self) -> std::collections::BTreeSet<(String, String)> {
        self.policies
            .values()
            .filter(|p| p.enabled)
            .flat_map(|p| &p.selections)
            .flat_map(|s| s.names.iter().map(|n| (s.host.clone(), n.clone())))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: String,
    pub tokens: Vec<TokenSource>,
    /// HTTPS with these files; plain HTTP without (loopback or `insecure_plain_http`).
    pub tls: Option<TlsFiles>,
    /// Larger request bodies get 413.
    pub max_request_bytes: usize,
    /// A request that takes longer gets 503.
    pub request_timeout: Duration,
}

/// Where tokens come from, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    pub from: TokenFrom,
    pub scope: Scope,
    /// False for `token_env` / `token_file` without `scope`: the daemon warns at start.
    pub scoped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    /// One token in this environment variable.
    Env(String),
    /// One token per line, `#` comments.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
}

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a job may run when its policy does not say (and for jobs without a policy).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub enabled: bool,
    /// A name from `[repositories]`; `None` is the default `[repository]`.
    pub repository: Option<String>,
    pub priority: i32,
    pub selections: Vec<Selection>,
    pub schedules: Vec<Schedule>,
    pub retention: Option<virtkeep_repo::KeepPolicy>,
    pub pre_snapshot: Option<String>,
    pub post_snapshot: Option<String>,
    pub quiesce: bool,
    pub transport: Transport,
    pub exclude_disks: Vec<String>,
    /// Leave the next incremental's base on the host. Default: when some schedule is not
    /// `full` (as the seed keeps the last snapshot only for VMs with an incremental
    /// schedule); `keep_base = false` leaves nothing.
    pub keep_base: bool,
    /// A job of this policy that runs longer is aborted and its VM healed, so that a
    /// stuck job can never block the VM's schedules (default 24 h).
    pub job_timeout: Duration,
    pub parallel: usize,
    /// Retries of a failed backup (the daemon-wide default when not set here).
    pub retries: u32,
    /// Fail the tasks not yet started when more than this share of the run failed.
    pub fail_rest_above_percent: Option<u8>,
    /// Boot-verify the newest backup of each selected VM on a schedule.
    pub verify_boot: Option<VerifyBootPolicy>,
}

/// `[policies.NAME.verify_boot]` (see `virtkeep verify --boot`).
#[derive(Debug, Clone)]
pub struct VerifyBootPolicy {
    pub schedule: Schedule,
    /// The host the transient domains run on.
    pub host: String,
    /// A regular expression the serial output must match.
    pub expect_serial: Option<String>,
    /// How long each guest must keep running.
    pub timeout: Duration,
    /// The guest agent must answer `guest-ping`.
    pub agent: bool,
}

/// How long a verified guest must keep running when the policy does not say.
pub const DEFAULT_VERIFY_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// VMs of one host: by name or regex (anchored by the user as they like), minus exclusions.
#[derive(Debug, Clone)]
pub struct Selection {
    pub host: String,
    pub names: Vec<String>,
    pub regex: Vec<Regex>,
    pub exclude: Vec<Regex>,
}

impl Selection {
    pub fn matches(&self, vm: &str) -> bool {
        let included =
            self.names.iter().any(|n| n == vm) || self.regex.iter().any(|r| r.is_match(vm));
        included && !self.exclude.iter().any(|r| r.is_match(vm))
    }

    /// The selected VMs among `available` (the host's domains), in the host's order.
    pub fn select<'a>(&self, available: &'a [String]) -> Vec<&'a String> {
        available.iter().filter(|vm| self.matches(vm)).collect()
    }
}

impl Policy {
    /// The backup schedules and the boot verification's, each with its own key.
    pub fn all_schedules(&self) -> impl Iterator<Item = &Schedule> {
        self.schedules
            .iter()
            .chain(self.verify_boot.iter().map(|v| &v.schedule))
    }

    /// Whether the schedule with `key` is the boot verification's.
    pub fn is_verify_schedule(&self, key: &str) -> bool {
        self.verify_boot
            .as_ref()
            .is_some_and(|v| v.schedule.key == key)
    }

    pub fn backup_options(&self, mode: ModeRequest) -> virtkeep_engine::backup::BackupOptions {
        virtkeep_engine::backup::BackupOptions {
            mode,
            base: if self.keep_base {
                virtkeep_engine::backup::BaseOnHost::Keep
            } else {
                virtkeep_engine::backup::BaseOnHost::Remove
            },
            exclude_disks: self.exclude_disks.clone(),
            quiesce: self.quiesce,
            pre_snapshot: self.pre_snapshot.clone(),
            post_snapshot: self.post_snapshot.clone(),
            transport: self.transport,
            parallel: self.parallel,
        }
    }
}

/// The default catalog: next to the default repository, in the user's data directory.
pub fn default_catalog() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"))
                .join(".local/share")
        })
        .join("virtkeep/catalog.sqlite")
}

/// This machine's host name, the default node name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `catalog` (a file, or a `postgres://` URL with its password source), `node` and `lease`.
fn check_cluster(
    c: &Checker<'_>,
    d: &DaemonModel,
) -> Result<(CatalogLocation, String, Duration), ConfigError> {
    let catalog = match &d.catalog {
        None => CatalogLocation::Sqlite(default_catalog()),
        Some(v)
            if v.get_ref().starts_with("postgres://")
                || v.get_ref().starts_with("postgresql://") =>
        {
            let password = match (&d.catalog_password_file, &d.catalog_password_env) {
                (Some(f), None) => PasswordSource::File(f.clone()),
                (None, Some(e)) => PasswordSource::Env(e.clone()),
                (None, None) => PasswordSource::None,
                (Some(_), Some(_)) => {
                    return c.err(
                        v.span(),
                        "both catalog_password_file and catalog_password_env are set",
                        "one of them",
                    );
                }
            };
            match PgLocation::new(v.get_ref(), password) {
                Ok(l) => CatalogLocation::Postgres(l.with_ca_file(d.catalog_ca_file.clone())),
                Err(e) => return c.err(v.span(), e, "postgres://USER@HOST:PORT/DATABASE"),
            }
        }
        Some(v) => CatalogLocation::Sqlite(PathBuf::from(v.get_ref())),
    };
    let node = match &d.node {
        None => host_name(),
        Some(v) => {
            let n = v.get_ref();
            let ok = n.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && n.len() <= 64
                && n.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
            if !ok {
                return c.err(
                    v.span(),
                    format!("node {n:?} is not a node name"),
                    "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                );
            }
            n.clone()
        }
    };
    let lease = match &d.lease {
        Some(v) => c.duration(v, "lease")?,
        None => Duration::from_secs(60),
    };
    Ok((catalog, node, lease))
}

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
        expected: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::at(
            self.file, self.text, span.start, message, expected,
        ))
    }

    fn duration(&self, v: &Spanned<String>, what: &str) -> Result<Duration, ConfigError> {
        match parse_duration(v.get_ref()) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => self.err(
                v.span(),
                format!("{what} {:?} is not a duration", v.get_ref()),
                "a number with a unit, e.g. \"30s\", \"15m\", \"6h\", \"1d\" or \"1h30m\"",
            ),
        }
    }

    fn regex(&self, v: &Spanned<String>) -> Result<Regex, ConfigError> {
        Regex::new(v.get_ref()).map_err(|e| {
            ConfigError::at(
                self.file,
                self.text,
                v.span().start,
                format!(
                    "{:?} is not a valid regular expression: {}",
                    v.get_ref(),
                    e.to_string().lines().last().unwrap_or("")
                ),
                "a regular expression (Rust regex syntax), e.g. \"^web-\"",
            )
        })
    }

    fn positive(&self, v: &Spanned<usize>, what: &str) -> Result<usize, ConfigError> {
        if *v.get_ref() == 0 {
            return self.err(v.span(), format!("{what} is 0"), "a number of at least 1");
        }
        Ok(*v.get_ref())
    }
}

impl DaemonConfig {
    /// Reads the daemon's settings and policies from the configuration file's `text`;
    /// `engine` is the same file as the engine read it (hosts and repositories).
    pub fn parse(
        file: &Path,
        text: &str,
        engine: &EngineConfig,
    ) -> Result<DaemonConfig, ConfigError> {
        let model: FileModel = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            let message = e.message().trim().to_string();
            // toml's message already says what it wanted ("expected one of …") where it knows.
            let expected = if message.contains("expected") {
                String::new()
            } else {
                "a setting described in docs/daemon.md".to_string()
            };
            ConfigError::at(file, text, at, message, expected)
        })?;
        let c = Checker { file, text };
        let d = model.daemon.unwrap_or_default();
        let max_jobs = match &d.max_jobs {
            Some(v) => c.positive(v, "max_jobs")?,
            None => 2,
        };
        let max_jobs_per_host = match &d.max_jobs_per_host {
            Some(v) => c.positive(v, "max_jobs_per_host")?,
            None => 1,
        };
        let mut host_limits = BTreeMap::new();
        for (h, n) in &d.host_limits {
            if !engine.hosts.contains_key(h.get_ref()) {
                return c.err(
                    h.span(),
                    format!("host_limits names the unknown host {:?}", h.get_ref()),
                    host_names(engine),
                );
            }
            host_limits.insert(h.get_ref().clone(), c.positive(n, "a host limit")?);
        }
        let retry_backoff = match &d.retry_backoff {
            Some(v) => c.duration(v, "retry_backoff")?,
            None => Duration::from_secs(60),
        };
        let shutdown_grace = match &d.shutdown_grace {
            Some(v) => c.duration(v, "shutdown_grace")?,
            None => Duration::from_secs(30 * 60),
        };
        let history = check_history(&c, &d)?;
        let (catalog, node, lease) = check_cluster(&c, &d)?;
        let api = match d.api {
            None => None,
            Some(a) => Some(check_api(&c, a)?),
        };
        let retries = d.retries.unwrap_or(2);
        let mut policies = BTreeMap::new();
        for (name, p) in model.policies {
            let span = p.span();
            let p = p.into_inner();
            policies.insert(
                name.clone(),
                check_policy(&c, engine, &name, span, p, retries)?,
            );
        }
        Ok(DaemonConfig {
            file: file.to_path_buf(),
            catalog,
            node,
            lease,
            max_jobs,
            max_jobs_per_host,
            host_limits,
            missed_runs: d.missed_runs,
            retries,
            retry_backoff,
            shutdown: d.shutdown,
            shutdown_grace,
            history,
            api,
            policies,
            syncs: crate::sync_config::parse(file, text, engine)?,
            maintenance: crate::maintenance_config::parse(file, text, engine)?,
        })
    }

    /// Reads `file`; a missing file is an empty configuration.
    pub fn load(file: &Path, engine: &EngineConfig) -> crate::Result<DaemonConfig> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(crate::DaemonError::Io {
                    what: "reading",
                    path: file.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self::parse(file, &text, engine)?)
    }

    pub fn host_limit(&self, host: &str) -> usize {
        self.host_limits
            .get(host)
            .copied()
            .unwrap_or(self.max_jobs_per_host)
    }
}

fn check_history(c: &Checker<'_>, d: &DaemonModel) -> Result<HistoryLimits, ConfigError> {
    Ok(HistoryLimits {
        max_age: match &d.history_max_age {
            Some(v) => c.duration(v, "history_max_age")?,
            None => crate::history::DEFAULT_LIMITS.max_age,
        },
        max_jobs: match &d.history_max_jobs {
            Some(v) => c.positive(v, "history_max_jobs")?,
            None => crate::history::DEFAULT_LIMITS.max_jobs,
        },
    })
}

fn check_api(c: &Checker<'_>, a: ApiModel) -> Result<ApiConfig, ConfigError> {
    let listen = match a.listen.get_ref().parse::<std::net::SocketAddr>() {
        Ok(l) => l,
        Err(_) => {
            return c.err(
                a.listen.span(),
                format!("listen {:?} is not an address", a.listen.get_ref()),
                "IP:PORT, e.g. \"127.0.0.1:8470\"",
            );
        }
    };
    let tls = match (a.tls_certificate, a.tls_key) {
        (Some(certificate), Some(key)) => Some(TlsFiles { certificate, key }),
        (None, None) => None,
        _ => {
            return c.err(
                a.listen.span(),
                "the API has only one of tls_certificate and tls_key",
                "both tls_certificate = \"/path/cert.pem\" and tls_key = \"/path/key.pem\", or neither",
            );
        }
    };
    // Tokens and job requests must not cross a network in clear by accident.
    if tls.is_none() && !listen.ip().is_loopback() && !a.insecure_plain_http {
        return c.err(
            a.listen.span(),
            format!("listen {listen} is not a loopback address and the API has no TLS: tokens would cross the network in clear"),
            "tls_certificate and tls_key (PEM files) for HTTPS, a loopback address (127.0.0.1:PORT) behind a TLS proxy, or insecure_plain_http = true on a network you trust",
        );
    }
    let mut tokens = Vec::new();
    let legacy = |from| TokenSource {
        from,
        scope: a.scope.unwrap_or(UNSCOPED_DEFAULT),
        scoped: a.scope.is_some(),
    };
    tokens.extend(a.token_env.map(|v| legacy(TokenFrom::Env(v.into_inner()))));
    tokens.extend(a.token_file.map(|f| legacy(TokenFrom::File(f))));
    for t in a.tokens {
        let span = t.span();
        let t = t.into_inner();
        let from = match (t.env, t.file) {
            (Some(v), None) => TokenFrom::Env(v),
            (None, Some(f)) => TokenFrom::File(f),
            _ => {
                return c.err(
                    span,
                    "an API token needs exactly one of env and file",
                    "{ env = \"VARIABLE\", scope = \"read\" } or { file = \"/path\", scope = \"operate\" }",
                );
            }
        };
        tokens.push(TokenSource {
            from,
            scope: t.scope,
            scoped: true,
        });
    }
    if tokens.is_empty() {
        return c.err(a.listen.span(), "the API has no token", "token_env = \"VARIABLE\", token_file = \"/path\" or [[daemon.api.tokens]] next to listen (the token itself never goes in this file)");
    }
    Ok(ApiConfig {
        listen: a.listen.into_inner(),
        tokens,
        tls,
        max_request_bytes: match &a.max_request_bytes {
            Some(v) => c.positive(v, "max_request_bytes")?,
            None => DEFAULT_MAX_REQUEST_BYTES,
        },
        request_timeout: match &a.request_timeout {
            Some(v) => c.duration(v, "request_timeout")?,
            None => DEFAULT_REQUEST_TIMEOUT,
        },
    })
}

fn host_names(engine: &EngineConfig) -> String {
    if engine.hosts.is_empty() {
        "a host added with `virtkeep host add` (none are configured)".into()
    } else {
        format!(
            "one of the configured hosts: {}",
            engine
                .hosts
                .keys()
                .map(|h| format!("{h:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// When a schedule fires, as the file gives it.
struct When<'a> {
    cron: Option<&'a Spanned<String>>,
    timezone: Option<&'a Spanned<String>>,
    every: Option<&'a Spanned<String>>,
}

fn check_schedule(
    c: &Checker<'_>,
    s: &When<'_>,
    sp: std::ops::Range<usize>,
    mode: ModeRequest,
) -> Result<Schedule, ConfigError> {
    match (s.cron, s.every) {
        (Some(cron), None) => {
            let tz = match s.timezone {
                None => chrono_tz::Tz::UTC,
                Some(t) => match t.get_ref().parse::<chrono_tz::Tz>() {
                    Ok(tz) => tz,
                    Err(_) => {
                        return c.err(
                            t.span(),
                            format!("unknown time zone {:?}", t.get_ref()),
                            "an IANA time zone name, e.g. \"UTC\" or \"Europe/Berlin\"",
                        );
                    }
                },
            };
            Schedule::cron(cron.get_ref(), tz, mode).or_else(|e| {
                c.err(cron.span(), format!("cron expression {:?}: {e}", cron.get_ref()), "5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first, e.g. \"0 2 * * *\"")
            })
        }
        (None, Some(every)) => {
            if let Some(t) = s.timezone {
                return c.err(
                    t.span(),
                    "timezone applies to cron schedules only",
                    "no timezone with every = …",
                );
            }
            Ok(Schedule::every(
                c.duration(every, "every")?,
                every.get_ref(),
                mode,
            ))
        }
        _ => c.err(
            sp,
            "a schedule needs exactly one of cron and every",
            "{ cron = \"0 2 * * *\" } or { every = \"6h\" }",
        ),
    }
}

/// `[policies.NAME.verify_boot]`: where and how the newest backups are boot-verified.
fn check_verify_boot(
    c: &Checker<'_>,
    engine: &EngineConfig,
    name: &str,
    v: &Spanned<VerifyBootModel>,
    job_timeout: Duration,
) -> Result<VerifyBootPolicy, ConfigError> {
    let m = v.get_ref();
    let when = When {
        cron: m.cron.as_ref(),
        timezone: m.timezone.as_ref(),
        every: m.every.as_ref(),
    };
    let mut schedule = check_schedule(c, &when, v.span(), ModeRequest::Auto)?;
    // Its own next-run state in the catalog, apart from the backup schedules'.
    schedule.key = format!("verify_boot {}", schedule.key);
    if !engine.hosts.contains_key(m.host.get_ref()) {
        return c.err(
            m.host.span(),
            format!(
                "policy {name}: verify_boot on unknown host {:?}",
                m.host.get_ref()
            ),
            host_names(engine),
        );
    }
    if let Some(p) = &m.expect_serial
        && p.get_ref().len() > 1024
    {
        return c.err(
            p.span(),
            format!("expect_serial is {} bytes long", p.get_ref().len()),
            "a regular expression (Rust regex syntax) of at most 1024 bytes, e.g. \"login:\"",
        );
    }
    if let Some(p) = &m.expect_serial
        && let Err(e) = regex::bytes::RegexBuilder::new(p.get_ref())
            .size_limit(1 << 20)
            .build()
    {
        return c.err(
            p.span(),
            format!(
                "expect_serial {:?}: {}",
                p.get_ref(),
                e.to_string().lines().last().unwrap_or("")
            ),
            "a regular expression (Rust regex syntax) of at most 1024 bytes, e.g. \"login:\"",
        );
    }
    let timeout = match &m.timeout {
        Some(t) => c.duration(t, "verify_boot timeout")?,
        None => DEFAULT_VERIFY_BOOT_TIMEOUT,
    };
    // The job's own deadline would end a boot verification before its wait did.
    if timeout >= job_timeout {
        return c.err(
            m.timeout.as_ref().map_or(v.span(), |t| t.span()),
            format!(
                "policy {name}: verify_boot timeout {timeout:?} is not below the job_timeout {job_timeout:?}"
            ),
            "a verify_boot timeout shorter than the policy's job_timeout",
        );
    }
    Ok(VerifyBootPolicy {
        schedule,
        host: m.host.get_ref().clone(),
        expect_serial: m.expect_serial.as_ref().map(|p| p.get_ref().clone()),
        timeout,
        agent: m.agent,
    })
}

fn check_policy(
    c: &Checker<'_>,
    engine: &EngineConfig,
    name: &str,
    span: std::ops::Range<usize>,
    p: PolicyModel,
    default_retries: u32,
) -> Result<Policy, ConfigError> {
    if let Some(r) = &p.repository
        && !engine.repositories.contains_key(r.get_ref())
    {
        let known: Vec<String> = engine
            .repositories
            .keys()
            .map(|k| format!("{k:?}"))
            .collect();
        return c.err(r.span(), format!("policy {name}: no repository named {:?}", r.get_ref()), if known.is_empty() {
            "a name from [repositories.NAME] (none are defined; leave repository out to use [repository])".to_string()
        } else {
            format!("one of {}", known.join(", "))
        });
    }
    if p.vms.is_empty() {
        return c.err(
            span,
            format!("policy {name} selects no VMs"),
            "at least one [[policies.NAME.vms]] with host = \"…\" and names or regex",
        );
    }
    let mut selections = Vec::new();
    for s in &p.vms {
        if !engine.hosts.contains_key(s.host.get_ref()) {
            return c.err(
                s.host.span(),
                format!("policy {name}: unknown host {:?}", s.host.get_ref()),
                host_names(engine),
            );
        }
        if s.names.is_empty() && s.regex.is_empty() {
            return c.err(
                s.host.span(),
                format!(
                    "policy {name}: the selection on host {} names no VMs",
                    s.host.get_ref()
                ),
                "names = [\"vm\", …] and/or regex = [\"^pattern\", …]",
            );
        }
        selections.push(Selection {
            host: s.host.get_ref().clone(),
            names: s.names.clone(),
            regex: s
                .regex
                .iter()
                .map(|r| c.regex(r))
                .collect::<Result<_, _>>()?,
            exclude: s
                .exclude
                .iter()
                .map(|r| c.regex(r))
                .collect::<Result<_, _>>()?,
        });
    }
    if p.schedules.is_empty() {
        return c.err(span, format!("policy {name} has no schedule"), "schedules = [{ cron = \"0 2 * * *\", timezone = \"Europe/Berlin\", mode = \"incremental\" }] or [{ every = \"6h\" }]");
    }
    let mut schedules = Vec::new();
    for s in &p.schedules {
        let m = s.get_ref();
        let when = When {
            cron: m.cron.as_ref(),
            timezone: m.timezone.as_ref(),
            every: m.every.as_ref(),
        };
        schedules.push(check_schedule(c, &when, s.span(), m.mode)?);
    }
    let job_timeout = match &p.job_timeout {
        Some(v) => c.duration(v, "job_timeout")?,
        None => DEFAULT_JOB_TIMEOUT,
    };
    let verify_boot = match &p.verify_boot {
        Some(v) => Some(check_verify_boot(c, engine, name, v, job_timeout)?),
        None => None,
    };
    let retention = match p.retention {
        None => None,
        Some(r) => {
            let sp = r.span();
            let r = r.into_inner();
            let keep = virtkeep_repo::KeepPolicy {
                last: r.keep_last,
                hourly: r.keep_hourly,
                daily: r.keep_daily,
                weekly: r.keep_weekly,
                monthly: r.keep_monthly,
                yearly: r.keep_yearly,
            };
            if keep == virtkeep_repo::KeepPolicy::default()
                || [
                    r.keep_last,
                    r.keep_hourly,
                    r.keep_daily,
                    r.keep_weekly,
                    r.keep_monthly,
                    r.keep_yearly,
                ]
                .iter()
                .all(|k| k.unwrap_or(0) == 0)
            {
                return c.err(sp, format!("policy {name}: retention keeps nothing explicitly"), "at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly above 0");
            }
            Some(keep)
        }
    };
    let parallel = match &p.parallel {
        Some(v) => c.positive(v, "parallel")?,
        None => 2,
    };
    if let Some(pct) = &p.fail_rest_above_percent
        && *pct.get_ref() > 100
    {
        return c.err(
            pct.span(),
            format!("fail_rest_above_percent is {}", pct.get_ref()),
            "a percentage from 0 to 100",
        );
    }
    let keep_base = p
        .keep_base
        .unwrap_or_else(|| schedules.iter().any(|s| s.mode != ModeRequest::Full));
    Ok(Policy {
        name: name.to_string(),
        enabled: p.enabled,
        repository: p.repository.map(Spanned::into_inner),
        priority: p.priority,
        selections,
        schedules,
        retention,
        pre_snapshot: p.pre_snapshot,
        post_snapshot: p.post_snapshot,
        quiesce: p.quiesce,
        transport: p.transport,
        exclude_disks: p.exclude_disks,
        keep_base,
        job_timeout,
        parallel,
        retries: p.retries.unwrap_or(default_retries),
        fail_rest_above_percent: p.fail_rest_above_percent.map(Spanned::into_inner),
        verify_boot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> EngineConfig {
        toml::from_str(
            r#"
[repository]
location = "/tmp/repo"
[repositories.offsite]
location = "s3://b/p"
[hosts.kvm1]
address = "10.0.0.1"
identity = "/k"
"#,
        )
        .expect("engine config")
    }

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(Path::new("/etc/virtkeep.toml"), text, &engine())
    }

    const GOOD: &str = r#"
[daemon]
catalog = "/var/lib/virtkeep/catalog.sqlite"
max_jobs = 4
host_limits = { kvm1 = 2 }
retry_backoff = "30s"
missed_runs = "skip"

[daemon.api]
listen = "127.0.0.1:8470"
token_env = "VIRTKEEP_API_TOKEN"

[policies.nightly]
repository = "offsite"
priority = 10
schedules = [
  { cron = "0 2 * * 1-6", timezone = "Europe/Berlin", mode = "incremental" },
  { cron = "0 2 * * 0", timezone = "Europe/Berlin", mode = "full" },
]
retention = { keep_last = 3, keep_daily = 7 }
fail_rest_above_percent = 50

[[policies.nightly.vms]]
host = "kvm1"
names = ["db01"]
regex = ["^web-"]
exclude = ["-test$"]
"#;

    #[test]
    fn keep_base_follows_the_schedules_unless_set() {
        let inc = "mode = \"incremental\"";
        let full_only = GOOD.replace(inc, "mode = \"full\"");
        assert!(!parse(&full_only).expect("valid").policies["nightly"].keep_base);
        assert_eq!(
            parse(GOOD).expect("valid").policies["nightly"].job_timeout,
            DEFAULT_JOB_TIMEOUT
        );
        let short = GOOD.replace("fail_rest_above_percent = 50", "job_timeout = \"90m\"");
        assert_eq!(
            parse(&short).expect("valid").policies["nightly"].job_timeout,
            Duration::from_secs(5400)
        );
        let off = GOOD.replace("fail_rest_above_percent = 50", "keep_base = false");
        let p = &parse(&off).expect("valid").policies["nightly"];
        assert!(!p.keep_base);
        assert_eq!(
            p.backup_options(ModeRequest::Full).base,
            virtkeep_engine::backup::BaseOnHost::Remove
        );
        let on = full_only.replace("fail_rest_above_percent = 50", "keep_base = true");
        assert!(parse(&on).expect("valid").policies["nightly"].keep_base);
    }

    #[test]
    fn a_full_config_reads() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.max_jobs, 4);
        assert_eq!(c.host_limit("kvm1"), 2);
        assert_eq!(c.host_limit("other"), 1);
        assert_eq!(c.missed_runs, MissedRuns::Skip);
        assert_eq!(c.retry_backoff, Duration::from_secs(30));
        let p = &c.policies["nightly"];
        assert_eq!(p.repository.as_deref(), Some("offsite"));
        assert_eq!(p.schedules.len(), 2);
        // An incremental schedule uses the base a full leaves.
        assert!(p.keep_base);
        assert_eq!(p.schedules[1].mode, ModeRequest::Full);
        assert_eq!(p.retention.and_then(|r| r.last), Some(3));
        let sel = &p.selections[0];
        assert!(sel.matches("db01"));
        assert!(sel.matches("web-1"));
        assert!(!sel.matches("web-1-test"));
        assert!(!sel.matches("db02"));
    }

    fn err_of(text: &str) -> ConfigError {
        parse(text).expect_err("must fail")
    }

    #[test]
    fn errors_point_at_the_line_and_say_what_was_expected() {
        let bad = GOOD.replace("0 2 * * 1-6", "0 25 * * 1-6");
        let e = err_of(&bad);
        assert_eq!(e.line, 17, "{e}");
        assert!(e.expected.contains("5 fields"), "{e}");
        assert!(e.to_string().starts_with("/etc/virtkeep.toml:17:"), "{e}");

        let e = err_of(&GOOD.replace(
            "Europe/Berlin\", mode = \"incremental",
            "Mars/Base\", mode = \"incremental",
        ));
        assert_eq!((e.line, e.expected.contains("IANA")), (17, true), "{e}");

        let e = err_of(&GOOD.replace("mode = \"full\"", "mode = \"weekly\""));
        assert_eq!(e.line, 18, "{e}");
        assert!(
            e.message.contains("weekly") && e.message.contains("incremental"),
            "{e}"
        );

        let e = err_of(&GOOD.replace("host = \"kvm1\"", "host = \"kvm9\""));
        assert_eq!(e.line, 24, "{e}");
        assert!(e.expected.contains("\"kvm1\""), "{e}");

        let e = err_of(&GOOD.replace("^web-", "^web-("));
        assert_eq!((e.line, e.column), (26, 10), "{e}");

        let e = err_of(&GOOD.replace("retry_backoff = \"30s\"", "retry_backoff = \"soon\""));
        assert_eq!(e.line, 6, "{e}");

        let e = err_of(&GOOD.replace("priority = 10", "priority = 10\ncolour = \"red\""));
        assert_eq!(e.line, 16, "{e}");
        assert!(e.message.contains("colour"), "{e}");

        let e = err_of(&GOOD.replace("token_env = \"VIRTKEEP_API_TOKEN\"", ""));
        assert_eq!(e.line, 10, "{e}");
        assert!(e.expected.contains("token_env"), "{e}");
    }

    /// `[policies.NAME.verify_boot]`: its own schedule key (apart from the backups'
    /// next-run state), a default timeout, and errors at the line for an unknown host,
    /// a bad pattern, a missing schedule and an unknown key.
    #[test]
    fn verify_boot_reads_and_its_errors_point_at_the_line() {
        let base = "[policies.p]\nschedules = [{ every = \"1d\" }]\n[[policies.p.vms]]\nhost = \"kvm1\"\nnames = [\"a\"]\n";
        let c = parse(&format!(
            "{base}[policies.p.verify_boot]\nevery = \"1d\"\nhost = \"kvm1\"\nagent = true\n"
        ))
        .expect("parse");
        let p = &c.policies["p"];
        let v = p.verify_boot.as_ref().expect("verify_boot");
        assert_eq!(v.timeout, DEFAULT_VERIFY_BOOT_TIMEOUT);
        assert!(v.agent && v.expect_serial.is_none());
        assert_ne!(
            v.schedule.key, p.schedules[0].key,
            "shares the backups' state"
        );
        assert!(p.is_verify_schedule(&v.schedule.key));
        assert!(!p.is_verify_schedule(&p.schedules[0].key));
        assert_eq!(p.all_schedules().count(), 2);
        let long_serial = format!(
            "every = \"1d\"\nhost = \"kvm1\"\nexpect_serial = \"{}\"\n",
            "a".repeat(1025)
        );
        for (extra, line, says) in [
            ("every = \"1d\"\nhost = \"nope\"\n", 8, "unknown host"),
            (
                "every = \"1d\"\nhost = \"kvm1\"\nexpect_serial = \"(\"\n",
                9,
                "expect_serial",
            ),
            ("host = \"kvm1\"\n", 6, "exactly one of cron and every"),
            (
                "every = \"1d\"\nhost = \"kvm1\"\nretries = 2\n",
                9,
                "retries",
            ),
            (long_serial.as_str(), 9, "1025 bytes"),
            (
                "every = \"1d\"\nhost = \"kvm1\"\ntimeout = \"1d\"\n",
                9,
                "not below the job_timeout",
            ),
        ] {
            let e = parse(&format!("{base}[policies.p.verify_boot]\n{extra}")).expect_err(extra);
            assert!(e.message.contains(says), "{extra}: {e}");
            // (A table's own span starts at its header or its first key.)
            assert!(e.line == line || (line == 6 && e.line == 7), "{extra}: {e}");
        }
    }

    #[test]
    fn the_packaged_sample_config_is_valid() {
        let text = include_str!("../../../packaging/virtkeep.toml");
        let engine: EngineConfig = toml::from_str(text).expect("engine part");
        let c = DaemonConfig::parse(Path::new("packaging/virtkeep.toml"), text, &engine)
            .expect("daemon part");
        assert_eq!(c.policies.len(), 2);
        let v = c.policies["nightly"]
            .verify_boot
            .as_ref()
            .expect("verify_boot");
        assert_eq!(
            (v.host.as_str(), v.timeout),
            ("kvm1", Duration::from_secs(120))
        );
        assert_eq!(v.expect_serial.as_deref(), Some("login:"));
        assert!(c.policies["frequent"].verify_boot.is_none());
        let m = &c.maintenance[0];
        assert_eq!((c.maintenance.len(), m.repository.as_deref()), (1, None));
        let verify = m.verify.as_ref().expect("verify");
        assert_eq!((verify.read_data, verify.sample), (true, Some(20)));
        assert!(m.gc.is_some());
        let api = c.api.as_ref().expect("api");
        // The sample gives every token a scope, and Prometheus' may only read.
        assert!(api.tokens.iter().all(|t| t.scoped), "{:?}", api.tokens);
        assert!(api.tokens.contains(&TokenSource {
            from: TokenFrom::Env("VIRTKEEP_PROMETHEUS_TOKEN".into()),
            scope: Scope::Read,
            scoped: true,
        }));
        assert_eq!(c.history, crate::history::DEFAULT_LIMITS);
        // `host add` and `repo init` rewrite the file from the engine's Config: the
        // daemon's sections must survive that.
        let rewritten = toml::to_string_pretty(&engine).expect("serialise");
        let again: EngineConfig = toml::from_str(&rewritten).expect("engine part");
        let c2 = DaemonConfig::parse(Path::new("rewritten.toml"), &rewritten, &again)
            .expect("daemon part after a rewrite");
        assert_eq!(
            c2.policies.keys().collect::<Vec<_>>(),
            c.policies.keys().collect::<Vec<_>>()
        );
        assert_eq!(c2.policies["nightly"].schedules.len(), 2);
        assert_eq!(c2.host_limit("kvm1"), 2);
    }

    #[test]
    fn api_tokens_have_scopes_and_unscoped_ones_only_read() {
        let c = parse(GOOD).expect("valid");
        let api = c.api.expect("api");
        assert_eq!(
            api.tokens,
            vec![TokenSource {
                from: TokenFrom::Env("VIRTKEEP_API_TOKEN".into()),
                scope: Scope::Read,
                scoped: false,
            }]
        );
        assert_eq!(api.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(api.tls, None);
        let scoped = GOOD.replace(
            "token_env = \"VIRTKEEP_API_TOKEN\"",
            "token_env = \"VIRTKEEP_API_TOKEN\"\nscope = \"admin\"\nmax_request_bytes = 1024\nrequest_timeout = \"5s\"\ntokens = [{ env = \"PROM\", scope = \"read\" }, { file = \"/etc/ops\", scope = \"operate\" }]",
        );
        let api = parse(&scoped).expect("valid").api.expect("api");
        let got: Vec<(TokenFrom, Scope, bool)> = api
            .tokens
            .into_iter()
            .map(|t| (t.from, t.scope, t.scoped))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    TokenFrom::Env("VIRTKEEP_API_TOKEN".into()),
                    Scope::Admin,
                    true
                ),
                (TokenFrom::Env("PROM".into()), Scope::Read, true),
                (TokenFrom::File("/etc/ops".into()), Scope::Operate, true),
            ]
        );
        assert_eq!(
            (api.max_request_bytes, api.request_timeout.as_secs()),
            (1024, 5)
        );
        let e = err_of(&GOOD.replace(
            "token_env = \"VIRTKEEP_API_TOKEN\"",
            "tokens = [{ env = \"A\", file = \"/b\", scope = \"read\" }]",
        ));
        assert!(e.message.contains("exactly one of env and file"), "{e}");
        let e = err_of(&GOOD.replace(
            "token_env = \"VIRTKEEP_API_TOKEN\"",
            "tokens = [{ env = \"A\", scope = \"root\" }]",
        ));
        assert!(
            e.message.contains("root") && e.message.contains("admin"),
            "{e}"
        );
    }

    #[test]
    fn a_network_listen_address_needs_tls_or_an_explicit_opt_out() {
        let open = GOOD.replace("127.0.0.1:8470", "0.0.0.0:8470");
        let e = err_of(&open);
        assert_eq!(e.line, 10, "{e}");
        assert!(e.message.contains("not a loopback address"), "{e}");
        assert!(e.expected.contains("insecure_plain_http"), "{e}");
        let tls = open.replace(
            "listen = \"0.0.0.0:8470\"",
            "listen = \"0.0.0.0:8470\"\ntls_certificate = \"/c.pem\"\ntls_key = \"/k.pem\"",
        );
        let api = parse(&tls).expect("valid").api.expect("api");
        assert_eq!(
            api.tls,
            Some(TlsFiles {
                certificate: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        let plain = open.replace(
            "listen = \"0.0.0.0:8470\"",
            "listen = \"0.0.0.0:8470\"\ninsecure_plain_http = true",
        );
        assert!(
            parse(&plain)
                .expect("valid")
                .api
                .expect("api")
                .tls
                .is_none()
        );
        let half = open.replace(
            "listen = \"0.0.0.0:8470\"",
            "listen = \"0.0.0.0:8470\"\ntls_key = \"/k.pem\"",
        );
        assert!(err_of(&half).message.contains("only one of"));
        // IPv6 loopback is loopback.
        assert!(parse(&GOOD.replace("127.0.0.1:8470", "[::1]:8470")).is_ok());
    }

    #[test]
    fn job_history_limits_read() {
        assert_eq!(
            parse("").expect("empty").history,
            crate::history::DEFAULT_LIMITS
        );
        let c = parse(&GOOD.replace(
            "missed_runs = \"skip\"",
            "missed_runs = \"skip\"\nhistory_max_age = \"30d\"\nhistory_max_jobs = 500",
        ))
        .expect("valid");
        assert_eq!(c.history.max_age, Duration::from_secs(30 * 86400));
        assert_eq!(c.history.max_jobs, 500);
        let e = err_of(&GOOD.replace("missed_runs = \"skip\"", "history_max_jobs = 0"));
        assert!(e.message.contains("history_max_jobs"), "{e}");
    }

    #[test]
    fn an_empty_file_has_defaults() {
        let c = parse("").expect("empty");
        assert!(c.policies.is_empty());
        assert_eq!(c.max_jobs, 2);
        assert_eq!(c.missed_runs, MissedRuns::RunOnce);
        assert!(c.api.is_none());
    }

    #[test]
    fn a_postgres_catalog_takes_its_password_from_elsewhere_and_a_node_name() {
        let c = parse(
            "[daemon]\ncatalog = \"postgres://vk@db:5432/vk?sslmode=require\"\n\
             catalog_password_file = \"/etc/virtkeep/pg\"\ncatalog_ca_file = \"/etc/virtkeep/ca.pem\"\n\
             node = \"backup-a\"\nlease = \"20s\"\n",
        )
        .expect("valid");
        let crate::catalog::CatalogLocation::Postgres(l) = &c.catalog else {
            panic!("{:?}", c.catalog)
        };
        assert_eq!(l.password, PasswordSource::File("/etc/virtkeep/pg".into()));
        assert_eq!(l.ca_file, Some(PathBuf::from("/etc/virtkeep/ca.pem")));
        assert_eq!(
            (c.node.as_str(), c.lease),
            ("backup-a", Duration::from_secs(20))
        );
        let e = err_of("[daemon]\ncatalog = \"postgres://vk:secret@db/vk\"\n");
        assert!(e.to_string().contains("holds a password"), "{e}");
        let e = err_of("[daemon]\nnode = \"--help\"\n");
        assert_eq!(e.line, 2, "{e}");
        let e = err_of("[daemon]\nnode = \"a/b\"\n");
        assert!(e.to_string().contains("not a node name"), "{e}");
        // Default: SQLite, the host name, 60 s.
        let d = parse("").expect("empty");
        assert!(matches!(
            d.catalog,
            crate::catalog::CatalogLocation::Sqlite(_)
        ));
        assert!(!d.node.is_empty());
        assert_eq!(d.lease, Duration::from_secs(60));
    }
}
