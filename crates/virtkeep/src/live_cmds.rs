//! `verify SNAPSHOT --boot --to HOST` and `restore SNAPSHOT --to HOST --live --name NEW
//! [--storage …]`:
//! a backup booted from the repository (issue 20).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use virtkeep_engine::live_restore::LiveTarget;
use virtkeep_engine::restore::Storage;
use virtkeep_engine::verify_boot::{BootVerifyOptions, BootVerifyReport, verify_boot as run};

use crate::cli::{RestoreArgs, VerifyArgs};
use crate::output::print_json;
use crate::settings::Settings;

/// Exit 0 when the backup booted and passed, 1 with the reason when it did not.
pub async fn verify_boot(
    settings: &Settings,
    args: VerifyArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let spec = args.snapshot.as_deref().unwrap_or_default();
    let id = virtkeep_engine::snapshot_ref::resolve(&repo, spec).await?;
    let host = settings
        .connect(args.boot.to.as_deref().unwrap_or_default())
        .await?;
    let opts = BootVerifyOptions {
        timeout: Duration::from_secs(args.boot.timeout),
        expect_serial: args.boot.expect_serial.clone(),
        agent: args.boot.agent,
    };
    let report = run(&host, &repo, &id, &opts, stop_signal()?).await?;
    if let Some(dir) = &args.boot.report_dir {
        write_report(dir, &report)?;
    }
    if json {
        print_json(&report)?;
    } else if report.passed {
        println!(
            "backup {id} boots: {} ran {:.0} s on {}{}",
            report.domain,
            report.ran_secs,
            report.host,
            if report.serial_matched == Some(true) {
                ", serial output matched"
            } else {
                ""
            }
        );
    } else {
        println!(
            "backup {id} FAILED boot verification: {}",
            report.reason.as_deref().unwrap_or("unknown")
        );
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `report.json`, `serial.log` and `screenshot.png|ppm` into `dir` (created if missing;
/// existing files of those names are replaced).
fn write_report(dir: &Path, r: &BootVerifyReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("serial.log"), r.serial_log.as_bytes())?;
    if let Some(img) = &r.screenshot {
        let ext = if img.starts_with(b"\x89PNG") {
            "png"
        } else {
            "ppm"
        };
        std::fs::write(dir.join(format!("screenshot.{ext}")), img)?;
    }
    Ok(())
}

/// Returns once every disk is copied and nothing refers to the node any more (with
/// `--detach`, once the daemon's job runs the domain: [`crate::live_detach`]).
pub async fn restore_live(
    settings: &Settings,
    args: RestoreArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if args.detach {
        return crate::live_detach::restore_live_detached(settings, args, json).await;
    }
    let storage = Storage::parse(args.storage.as_deref())?;
    let repo = settings.open_repo(&args.repo).await?;
    let id =
        virtkeep_engine::snapshot_ref::resolve(&repo, args.snapshot.as_deref().unwrap_or_default())
            .await?;
    let host = settings
        .connect(args.to.as_deref().unwrap_or_default())
        .await?;
    let name = args.name.as_deref().unwrap_or_default();
    if !json {
        eprintln!("starting {name} on backup {id}; its disks are copied while it runs");
    }
    let progress = crate::output::progress(json);
    let to = LiveTarget {
        name,
        storage: &storage,
        progress: progress.as_ref(),
    };
    let r =
        virtkeep_engine::live_restore::restore_live(&host, &repo, &id, to, stop_signal()?).await?;
    print_live_result(&r, json)?;
    Ok(ExitCode::SUCCESS)
}

/// `restore --resume JOB --to HOST`: finishes a live restore whose node died (exit 0
/// once copied, as `restore --live`; 4 when the link is lost for good again).
pub async fn resume_live(
    settings: &Settings,
    args: &RestoreArgs,
    job: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let host = settings
        .connect(args.to.as_deref().unwrap_or_default())
        .await?;
    if !json {
        eprintln!("resuming live restore job {job} on {}", host.name);
    }
    let progress = crate::output::progress(json);
    let r = virtkeep_engine::live_resume::resume_live(&host, &repo, job, progress.as_ref()).await?;
    print_live_result(&r, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_live_result(
    r: &virtkeep_engine::live_restore::LiveRestoreResult,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "{} {}running after {:.1} s, copied after {:.1} s",
        r.vm,
        if r.resumed { "resumed: " } else { "" },
        r.time_to_running_secs,
        r.time_to_copied_secs
    );
    for d in &r.disks {
        println!("  {} -> {} ({})", d.target, d.path, d.format);
    }
    Ok(())
}

/// SIGINT or SIGTERM: the engine then destroys what it made before returning.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    // Both registered now, not when first polled: a Ctrl-C during start or plan must
    // reach the engine's clean-up rather than kill the process.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    /// A SIGINT that arrives before the stop future is first polled (during start or
    /// plan) must be caught, not kill the process.
    #[tokio::test]
    async fn sigint_before_first_poll_is_caught() {
        let stop = super::stop_signal().expect("signal handlers");
        let sent = std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), stop)
            .await
            .expect("the stop future completes on the SIGINT");
    }
}
