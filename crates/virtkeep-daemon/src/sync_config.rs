//! The `[sync.NAME]` tables of the configuration: what the daemon's sync jobs
//! (`sync_jobs.rs`) are told to copy, and the repository and schedule checks the
//! `[maintenance.*]` tables share. Parsing only, below the daemon and the catalog.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use virtkeep_engine::config::Config as EngineConfig;
use virtkeep_engine::plan::ModeRequest;
use virtkeep_engine::sync::SyncOptions;

use crate::error::ConfigError;
use crate::schedule::{Schedule, parse_duration};

#[derive(Deserialize)]
struct FileModel {
    #[serde(default)]
    sync: BTreeMap<String, Spanned<SyncModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncModel {
    source: Spanned<String>,
    destination: Spanned<String>,
    #[serde(default)]
    selection: Vec<String>,
    latest: Option<usize>,
    every: Option<Spanned<String>>,
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
}

/// One checked `[sync.NAME]`.
#[derive(Debug, Clone)]
pub struct SyncJob {
    pub name: String,
    /// `None`: the default `[repository]`.
    pub source: Option<String>,
    pub destination: Option<String>,
    pub options: SyncOptions,
    pub schedule: Schedule,
}

/// A repository name as the job names it: `default` is `[repository]`.
pub(crate) fn repository(
    file: &Path,
    text: &str,
    engine: &EngineConfig,
    (name, at): (&str, usize),
) -> Result<Option<String>, ConfigError> {
    if name == "default" {
        return Ok(None);
    }
    if engine.repositories.contains_key(name) {
        return Ok(Some(name.to_string()));
    }
    let known: Vec<&str> = engine.repositories.keys().map(String::as_str).collect();
    Err(ConfigError::at(
        file,
        text,
        at,
        format!("no repository named {name:?}"),
        format!("\"default\" or one of {known:?} ([repositories.NAME])"),
    ))
}

/// A table's `cron`, `every` and `timezone` keys.
pub(crate) type When<'a> = (
    &'a Option<Spanned<String>>,
    &'a Option<Spanned<String>>,
    &'a Option<Spanned<String>>,
);

/// The schedule of a table with `every` or `cron` (+ `timezone`), as policies write it;
/// `what` names the table in the error ("a sync job").
pub(crate) fn schedule_of(
    (file, text): (&Path, &str),
    at: usize,
    (cron, every, timezone): When<'_>,
    what: &str,
) -> Result<Schedule, ConfigError> {
    let err = |at: usize, msg: String, exp: &str| Err(ConfigError::at(file, text, at, msg, exp));
    match (cron, every) {
        (Some(cron), None) => {
            let tz = match timezone {
                None => chrono_tz::Tz::UTC,
                Some(t) => match t.get_ref().parse::<chrono_tz::Tz>() {
                    Ok(tz) => tz,
                    Err(_) => {
                        return err(
                            t.span().start,
                            format!("unknown timezone {:?}", t.get_ref()),
                            "an IANA name such as \"Europe/Berlin\"",
                        );
                    }
                },
            };
            Schedule::cron(cron.get_ref(), tz, ModeRequest::Auto).or_else(|e| {
                err(
                    cron.span().start,
                    format!("cron expression {:?}: {e}", cron.get_ref()),
                    "5 fields, e.g. \"0 3 * * *\"",
                )
            })
        }
        (None, Some(every)) => match parse_duration(every.get_ref()) {
            Some(d) if !d.is_zero() => Ok(Schedule::every(d, every.get_ref(), ModeRequest::Auto)),
            _ => err(
                every.span().start,
                format!("every {:?} is not a duration", every.get_ref()),
                "e.g. \"30m\", \"6h\", \"1d\"",
            ),
        },
        _ => err(
            at,
            format!("{what} needs exactly one of cron and every"),
            "cron = \"0 3 * * *\" or every = \"6h\"",
        ),
    }
}

/// The `[sync.*]` tables of the configuration file's text.
pub fn parse(file: &Path, text: &str, engine: &EngineConfig) -> Result<Vec<SyncJob>, ConfigError> {
    let model: FileModel = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        ConfigError::at(file, text, at, e.message().trim(), "")
    })?;
    let mut jobs = Vec::new();
    for (name, m) in model.sync {
        let at = m.span().start;
        let m = m.into_inner();
        let source = repository(
            file,
            text,
            engine,
            (m.source.get_ref(), m.source.span().start),
        )?;
        let destination = repository(
            file,
            text,
            engine,
            (m.destination.get_ref(), m.destination.span().start),
        )?;
        if source == destination {
            return Err(ConfigError::at(
                file,
                text,
                m.destination.span().start,
                format!("sync {name} copies a repository into itself"),
                "another destination",
            ));
        }
        jobs.push(SyncJob {
            schedule: schedule_of(
                (file, text),
                at,
                (&m.cron, &m.every, &m.timezone),
                "a sync job",
            )?,
            name,
            source,
            destination,
            options: SyncOptions {
                selection: m.selection,
                latest: m.latest,
            },
        });
    }
    Ok(jobs)
}
