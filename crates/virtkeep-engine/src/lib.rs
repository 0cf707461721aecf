//! virtkeep's engine: backup and restore orchestration over SSH.
//!
//! The binary parses arguments and renders output; everything a job does on a host
//! and in the repository happens here. One options struct per command
//! ([`backup::BackupOptions`], [`restore::RestoreOptions`]), progress through
//! [`progress::Progress`], and errors that say what to do ([`Error`]).

pub mod backup;
pub mod cbt;
pub mod cleanup;
pub mod cleanup_live;
pub mod config;
pub mod define;
pub mod error;
pub mod export;
pub mod failpoint;
pub mod heal;
pub mod hold;
pub mod host;
pub mod inventory;
pub mod live;
pub mod live_copy;
pub mod live_record;
pub mod live_restore;
pub mod live_resume;
pub mod lvm;
pub mod phases;
pub mod plan;
pub mod progress;
pub mod rbd;
pub mod rbd_diff;
pub mod repo_key;
pub mod restore;
pub mod snapshot_ref;
pub mod store;
pub mod sync;
pub mod verify_boot;
pub mod vm;

pub use error::{Error, ErrorKind, Result};

/// A job id: sortable by time, unique, and safe in file names and command lines.
pub fn job_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = now
        .format(&fmt)
        .unwrap_or_else(|_| "00000000T000000Z".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{stamp}-{}", &rand[..8])
}
