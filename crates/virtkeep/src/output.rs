//! How results and errors reach the user: text or `--json`, progress bars in a
//! terminal, tracing logs elsewhere.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use virtkeep_engine::progress::{Event, LogProgress, Progress};
use virtkeep_engine::{Error as EngineError, ErrorKind};

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

/// Prints an error (with its hint) and returns the exit code for it.
pub fn report_error(err: &anyhow::Error, json: bool) -> ExitCode {
    let engine = err.downcast_ref::<EngineError>();
    let kind = engine.map(|e| e.kind);
    let code = match kind {
        Some(ErrorKind::Config) => 2,
        _ => 1,
    };
    let hint = engine.and_then(|e| e.hint.clone());
    if json {
        let value = serde_json::json!({
            "error": {
                "kind": kind,
                "message": format!("{err:#}"),
                "hint": hint,
            }
        });
        println!("{value}");
    } else {
        eprintln!("error: {err:#}");
        if let Some(h) = hint {
            eprintln!("hint: {h}");
        }
    }
    ExitCode::from(code)
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

pub use virtkeep_engine::inventory::human as human_bytes;
