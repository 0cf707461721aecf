//! Progress events. The engine reports; the binary decides how to show them
//! (indicatif bars in a terminal, tracing events elsewhere, nothing with `--json`).

/// What a long-running job reports while it works.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new phase of the job for one VM (e.g. "snapshot", "export", "commit").
    Phase {
        vm: String,
        phase: &'static str,
    },
    /// A disk's transfer starts; `bytes` is how much data will move (allocated data only).
    DiskStart {
        vm: String,
        disk: String,
        bytes: u64,
    },
    /// `bytes` more of the disk were transferred.
    DiskBytes {
        disk: String,
        bytes: u64,
    },
    DiskDone {
        disk: String,
    },
    /// Something the user should know that is not an error (a skipped disk, a fallback).
    Notice {
        vm: String,
        message: String,
    },
}

pub trait Progress: Send + Sync {
    fn event(&self, event: Event);
}

/// Progress that goes nowhere, for library users and tests.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: Event) {}
}

/// Progress as tracing events, for logs.
pub struct LogProgress;

impl Progress for LogProgress {
    fn event(&self, event: Event) {
        match event {
            Event::Phase { vm, phase } => tracing::info!(vm = %vm, phase, "phase"),
            Event::DiskStart { vm, disk, bytes } => {
                tracing::info!(vm = %vm, disk = %disk, bytes, "disk transfer starts")
            }
            Event::DiskBytes { .. } => {}
            Event::DiskDone { disk } => tracing::info!(disk = %disk, "disk done"),
            Event::Notice { vm, message } => tracing::warn!(vm = %vm, "{message}"),
        }
    }
}
