//! `verify SNAPSHOT --boot --to HOST`: a backup booted from the repository (issue 20).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use virtkeep_engine::host::Host;
use virtkeep_engine::verify_boot::{BootVerifyOptions, BootVerifyReport, verify_boot as run};

use crate::cli::VerifyArgs;
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
    let name = args.boot.to.as_deref().unwrap_or_default();
    let config = settings.config.host(name)?;
    let host = Host::connect(name, config, &settings.known_hosts()).await?;
    let opts = BootVerifyOptions {
        timeout: Duration::from_secs(args.boot.timeout),
        expect_serial: args.boot.expect_serial.clone(),
    };
    let report = run(&host, &repo, &id, &opts).await?;
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
