//! How results and errors reach the user: text or `--json`, progress bars in a
//! terminal, tracing logs elsewhere.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use virtkeep_engine::progress::{Event, LogProgress, Progress};
use virtkeep_engine::{Error as EngineError, ErrorKind};
use virtkeep_repo::{RepoError, RepoProgress};

pub fn init_logging(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRTKEEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json || !std::io::stderr().is_terminal() {
        let _ = builder.with_ansi(false).try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// The exit codes scripts can rely on (docs/cli.md, "Exit codes").
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const PARTIAL: u8 = 3;
    pub const UNFINISHED: u8 = 4;
    pub const REPO_MISSING: u8 = 10;
    pub const REPO_LOCKED: u8 = 11;
    pub const WRONG_KEY: u8 = 12;
    pub const INTERRUPTED: u8 = 130;
}

/// The one place where error kinds become exit codes: the first cause in the chain
/// that has a specific code decides (a repository error under an engine error of
/// kind `repository` is looked at, too).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(r) = cause.downcast_ref::<RepoError>() {
            match r {
                RepoError::NotARepository(_) => return exit::REPO_MISSING,
                RepoError::GcRunning { .. } | RepoError::InUse { .. } => return exit::REPO_LOCKED,
                RepoError::WrongKey { .. }
                | RepoError::KeyRequired { .. }
                | RepoError::AuthKeyRequired { .. } => {
                    return exit::WRONG_KEY;
                }
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            match e.kind {
                ErrorKind::Config => return exit::USAGE,
                ErrorKind::Interrupted => return exit::INTERRUPTED,
                ErrorKind::Unfinished => return exit::UNFINISHED,
                _ => {}
            }
        }
    }
    exit::FAILED
}

/// The error's message once: the engine's errors already carry their source's text,
/// so a cause whose text the previous one contains is not repeated.
pub fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !previous.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        previous = text;
    }
    out
}

/// The hint of the outermost engine error that has one.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    err.chain()
        .filter_map(|c| c.downcast_ref::<EngineError>())
        .find_map(|e| e.hint.clone())
}

/// Kind, message and hint of an error as `--json` shows it (also per VM in `backup`).
pub fn error_json(err: &anyhow::Error) -> serde_json::Value {
    let kind = err
        .chain()
        .find_map(|c| c.downcast_ref::<EngineError>())
        .map(|e| e.kind);
    serde_json::json!({
        "kind": kind,
        "message": message(err),
        "hint": hint(err),
        "exit_code": exit_code(err),
    })
}

/// Prints an error (with its hint) once and returns the exit code for it.
pub fn report_error(err: &anyhow::Error, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({ "error": error_json(err) }));
    } else {
        eprintln!("error: {}", message(err));
        if let Some(h) = hint(err) {
            eprintln!("hint: {h}");
        }
    }
    ExitCode::from(exit_code(err))
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Progress bars on a terminal; log lines otherwise; nothing on stdout either way.
pub fn progress(json: bool) -> std::sync::Arc<dyn Progress> {
    if !json && std::io::stderr().is_terminal() {
        std::sync::Arc::new(Bars::default())
    } else {
        std::sync::Arc::new(LogProgress)
    }
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn event(&self, event: Event) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        match event {
            Event::Phase { vm, phase } => {
                let _ = self.multi.println(format!("{vm}: {phase}"));
            }
            Event::DiskStart { disk, bytes, .. } => {
                let bar = self.multi.add(ProgressBar::new(bytes));
                let style = ProgressStyle::with_template(
                    "{prefix:>6} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(disk.clone());
                bars.insert(disk, bar);
            }
            Event::DiskBytes { disk, bytes } => {
                if let Some(b) = bars.get(&disk) {
                    b.inc(bytes);
                }
            }
            Event::DiskDone { disk } => {
                if let Some(b) = bars.remove(&disk) {
                    b.finish();
                }
            }
            Event::Notice { vm, message } => {
                let _ = self.multi.println(format!("{vm}: {message}"));
            }
        }
    }
}

/// Progress of a repository operation (verify, gc) in stages; `finish` ends the last.
pub trait Stages: RepoProgress {
    fn finish(&self);
}

/// A bar per stage when stderr is a terminal (and not `--json`); log lines otherwise.
pub fn stages(json: bool) -> Box<dyn Stages> {
    if !json && std::io::stderr().is_terminal() {
        Box::new(StageBars::default())
    } else {
        Box::new(StageLog::default())
    }
}

#[derive(Default)]
struct StageBars {
    current: Mutex<Option<ProgressBar>>,
}

impl RepoProgress for StageBars {
    fn stage(&self, name: &'static str, total: Option<u64>) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if let Some(done) = current.take() {
            done.finish();
        }
        let (bar, template) = match total {
            Some(n) => (
                ProgressBar::new(n),
                "{prefix} [{wide_bar}] {pos}/{len} {eta}",
            ),
            // A listing: how far it got, not how far it has to go.
            None => (ProgressBar::no_length(), "{prefix} {spinner} {pos}"),
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name);
        bar.tick();
        *current = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Ok(current) = self.current.lock()
            && let Some(bar) = current.as_ref()
        {
            bar.inc(n);
        }
    }
}

impl Stages for StageBars {
    fn finish(&self) {
        if let Ok(mut current) = self.current.lock()
            && let Some(bar) = current.take()
        {
            bar.finish();
        }
    }
}

/// Stages as tracing events: when each starts (with its size) and how many items it did.
#[derive(Default)]
struct StageLog {
    current: Mutex<Option<(&'static str, u64)>>,
}

impl StageLog {
    fn end(current: &mut Option<(&'static str, u64)>) {
        if let Some((stage, done)) = current.take() {
            tracing::info!(stage, done, "stage done");
        }
    }
}

impl RepoProgress for StageLog {
    fn stage(&self, name: &'static str, total: Option<u64>) {
        if let Ok(mut current) = self.current.lock() {
            StageLog::end(&mut current);
            tracing::info!(stage = name, total, "stage starts");
            *current = Some((name, 0));
        }
    }

    fn advance(&self, n: u64) {
        if let Ok(mut current) = self.current.lock()
            && let Some((_, done)) = current.as_mut()
        {
            *done += n;
        }
    }
}

impl Stages for StageLog {
    fn finish(&self) {
        if let Ok(mut current) = self.current.lock() {
            StageLog::end(&mut current);
        }
    }
}

pub use virtkeep_engine::inventory::human as human_bytes;

/// `snapshots` as a table with a header and a totals line; times in the local zone
/// unless `utc`.
pub fn snapshot_table(list: &[virtkeep_repo::SnapshotSummary], utc: bool) -> String {
    use comfy_table::{Cell, CellAlignment, Table, presets};
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(["ID", "TIME", "VM", "MODE", "DISKS", "SIZE", "NEW", ""]);
    for s in list {
        table.add_row([
            Cell::new(&s.id),
            Cell::new(format_time(s.time, utc)),
            Cell::new(format!("{}/{}", s.host, s.vm)),
            Cell::new(s.mode),
            Cell::new(s.disks.join(",")),
            Cell::new(human_bytes(s.size)).set_alignment(CellAlignment::Right),
            Cell::new(human_bytes(s.bytes_new)).set_alignment(CellAlignment::Right),
            Cell::new(if s.protected { "protected" } else { "" }),
        ]);
    }
    // The preset pads every cell by one blank: not needed before the first column; the
    // trailing blanks of the last (mostly empty) column are noise.
    let mut out: String = table
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(&l).trim_end()))
        .collect();
    let size: u64 = list.iter().map(|s| s.size).sum();
    let new: u64 = list.iter().map(|s| s.bytes_new).sum();
    out.push_str(&format!(
        "{} backup{}, {} of disks, {} stored new\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        human_bytes(size),
        human_bytes(new)
    ));
    out
}

/// A backup time for people: local time with its offset, or UTC.
pub fn format_time(t: time::OffsetDateTime, utc: bool) -> String {
    let Some(dt) = chrono::DateTime::from_timestamp(t.unix_timestamp(), 0) else {
        return t.to_string();
    };
    if utc {
        dt.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    } else {
        dt.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S %:z")
            .to_string()
    }
}
