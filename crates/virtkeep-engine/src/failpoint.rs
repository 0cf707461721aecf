//! Named points where a fault test stops the node: with `VIRTKEEP_FAILPOINT=NAME[,NAME…]`
//! in its environment, the process announces `virtkeep: failpoint NAME reached` on stderr
//! when it gets there and then waits forever, so the harness kills it at exactly that
//! point. A fault test never races the code it tests (a kill sent on a log line could
//! land after the export had already finished). Without the variable a failpoint costs
//! one lookup of a cached empty list.
//!
//! | name | where |
//! |---|---|
//! | `export-chunk-written` | a data chunk of a backup is in the repository (mid export) |
//! | `before-heal` | a backup is about to return the VM to its own disks |
//! | `held` | the guest is paused or frozen around several snapshot calls |
//! | `backup-begun` | a backup-API job runs in QEMU (its NBD export is up), nothing read yet |
//! | `restore-chunk-written` | a restore has sent a data chunk to a disk's temporary (NBD write or `rbd import-diff` stream; mid write, before any swap) |
//! | `sync-chunk-sent` | a sync has uploaded a chunk of a backup to the destination (its manifest is not written yet) |
//! | `pick-base-fails` | not a stop: a backup-API job's base pick fails (the job dir made beside it must go) |
//! | `export-fails` | not a stop: a backup-API job fails after `backup-begin`, nothing read (its new checkpoint must go while a VM started for it still runs) |
//! | `sync-hold` | the same place, but [`hold`]: the sync waits for a line on stdin, then goes on (a GC runs meanwhile) |
//! | `verify-boot-running` | [`hold`]: a boot verification's domain runs on its overlays over the node's NBD export, before the watch |
//! | `live-restore-planned` | [`hold`]: a live restore has chosen and checked every destination (its job directory and NBD export are up), nothing created yet |
//! | `live-restore-created` | [`hold`]: a live restore has created every destination and overlay, before its domain is defined |
//! | `live-restore-running` | [`hold`]: a live restore's domain runs on its overlays, right before the copy begins |

use std::sync::OnceLock;

/// The environment variable that switches failpoints on.
pub const ENV: &str = "VIRTKEEP_FAILPOINT";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether failpoint `name` is switched on.
pub fn is_active(name: &str) -> bool {
    active().iter().any(|a| a == name)
}

/// Stops here for good when `name` is switched on.
pub async fn hit(name: &str) {
    if is_active(name) {
        eprintln!("virtkeep: failpoint {name} reached");
        std::future::pending::<()>().await;
    }
}

/// Stops here until a line (or end of file) arrives on stdin, once per process, when
/// `name` is switched on: for tests that act while a job is held at exactly this point
/// and then let it finish.
pub async fn hold(name: &str) {
    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if is_active(name) && !HELD.swap(true, std::sync::atomic::Ordering::SeqCst) {
        eprintln!("virtkeep: failpoint {name} reached");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)
        })
        .await;
    }
}
