//! The `[maintenance.REPOSITORY]` tables of the configuration: what the daemon's GC and
//! verify runs (`maintenance.rs`) are told to do. Parsing only; it knows neither the
//! daemon nor the catalog, so the configuration (`policy.rs`) can hold it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use virtkeep_engine::config::Config as EngineConfig;

use crate::error::ConfigError;
use crate::schedule::{Schedule, parse_duration};
use crate::sync_config::{repository, schedule_of};

#[derive(Deserialize)]
struct FileModel {
    #[serde(default)]
    maintenance: BTreeMap<String, Spanned<RepoModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoModel {
    gc: Option<Spanned<GcModel>>,
    verify: Option<Spanned<VerifyModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GcModel {
    every: Option<Spanned<String>>,
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyModel {
    every: Option<Spanned<String>>,
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    read_data: bool,
    sample: Option<usize>,
    timeout: Option<Spanned<String>>,
}

/// What a maintenance run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Gc,
    Verify,
}

impl Task {
    /// The catalog job kind.
    pub fn kind(self) -> &'static str {
        match self {
            Task::Gc => "gc",
            Task::Verify => "verify",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GcTask {
    pub schedule: Schedule,
    /// Unreferenced chunks younger than this are kept (`virtkeep gc --grace-hours`).
    pub grace: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct VerifyTask {
    pub schedule: Schedule,
    /// Read and decode every chunk (`virtkeep verify --read-data`).
    pub read_data: bool,
    /// Verify this many backups picked at random each run instead of all.
    pub sample: Option<usize>,
    pub timeout: Duration,
}

/// One checked `[maintenance.NAME]`.
#[derive(Debug, Clone)]
pub struct Maintenance {
    /// As written: `default` or a `[repositories]` name; the jobs' VM.
    pub name: String,
    /// `None`: the default `[repository]`.
    pub repository: Option<String>,
    pub gc: Option<GcTask>,
    pub verify: Option<VerifyTask>,
}

/// The longest a run may take unless `timeout` says otherwise.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

fn duration(
    (file, text): (&Path, &str),
    v: &Option<Spanned<String>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    match parse_duration(v.get_ref()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::at(
            file,
            text,
            v.span().start,
            format!("{:?} is not a duration", v.get_ref()),
            "e.g. \"30m\", \"6h\", \"1d\"",
        )),
    }
}

fn check(
    ft: (&Path, &str),
    m: RepoModel,
) -> Result<(Option<GcTask>, Option<VerifyTask>), ConfigError> {
    let gc = match m.gc {
        None => None,
        Some(g) => {
            let at = g.span().start;
            let g = g.into_inner();
            Some(GcTask {
                schedule: schedule_of(ft, at, (&g.cron, &g.every, &g.timezone), "gc")?,
                grace: duration(ft, &g.grace, Duration::from_secs(24 * 3600))?,
                timeout: duration(ft, &g.timeout, DEFAULT_TIMEOUT)?,
            })
        }
    };
    let verify = match m.verify {
        None => None,
        Some(v) => {
            let at = v.span().start;
            let v = v.into_inner();
            if v.sample == Some(0) {
                return Err(ConfigError::at(
                    ft.0,
                    ft.1,
                    at,
                    "sample = 0 verifies nothing",
                    "a number of backups ≥ 1, or no sample (all)",
                ));
            }
            Some(VerifyTask {
                schedule: schedule_of(ft, at, (&v.cron, &v.every, &v.timezone), "verify")?,
                read_data: v.read_data,
                sample: v.sample,
                timeout: duration(ft, &v.timeout, DEFAULT_TIMEOUT)?,
            })
        }
    };
    Ok((gc, verify))
}

/// The `[maintenance.*]` tables of the configuration file's text.
pub fn parse(
    file: &Path,
    text: &str,
    engine: &EngineConfig,
) -> Result<Vec<Maintenance>, ConfigError> {
    let model: FileModel = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        ConfigError::at(file, text, at, e.message().trim(), "")
    })?;
    let mut out = Vec::new();
    for (name, m) in model.maintenance {
        let at = m.span().start;
        let repository = repository(file, text, engine, (&name, at))?;
        let (gc, verify) = check((file, text), m.into_inner())?;
        out.push(Maintenance {
            name,
            repository,
            gc,
            verify,
        });
    }
    Ok(out)
}
