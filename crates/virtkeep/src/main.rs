//! virtkeep: agentless backup and restore of libvirt VMs over SSH.
//!
//! Exit codes (docs/cli.md): 0 success, 1 failed, 2 usage or configuration error,
//! 3 some of several VMs failed, 10 repository missing, 11 repository locked,
//! 12 wrong key or password, 130 interrupted.

mod cli;
mod commands;
mod configfile;
mod daemon;
mod files_cmds;
mod keys;
mod live_cmds;
mod live_detach;
mod manage;
mod output;
mod repo_cmds;
mod settings;
mod stats;
mod sync_cmd;

use std::process::ExitCode;

use clap::Parser;

/// Malloc arenas glibc may create. By default it creates up to 8 per core, one for each
/// thread that finds the others busy; a backup moves 4 MiB chunks through tokio's
/// blocking pool (hash, compress, encrypt) and its workers, so freed chunk buffers stay
/// cached in many arenas and the peak RSS grows with the number of threads that ever
/// touched a chunk (measured: 118 → 85 MiB for a 256 MiB full backup with 2 arenas;
/// bench/results/rss-20261206.md). Two arenas keep the two cores' threads from
/// contending on one lock. `MALLOC_ARENA_MAX` in the environment still wins.
const MALLOC_ARENAS: libc::c_int = 2;

// The one unsafe call of the workspace: glibc has no safe interface for this tunable,
// and setting MALLOC_ARENA_MAX would need a re-exec.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a glibc tunable; it is called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Neither needs the configuration (a broken one must not stop them) nor a runtime.
    match &cli.command {
        cli::Command::Completions { shell } => {
            let mut cmd = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "virtkeep", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        cli::Command::Man { dir } => {
            return match write_man_pages(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => output::report_error(&e, cli.json),
            };
        }
        _ => {}
    }
    // The daemon logs what it does by default: its log is its user interface.
    let verbose = match cli.command {
        cli::Command::Daemon => cli.verbose.max(1),
        _ => cli.verbose,
    };
    output::init_logging(verbose, cli.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.json;
    // `backup` heals the VM itself on Ctrl-C and the daemon drains its jobs on a signal;
    // any other command just stops where it is (nothing it does needs undoing).
    // `serve-nbd` ends on a signal and removes its socket.
    let own_signals = matches!(
        cli.command,
        cli::Command::Backup(_)
            | cli::Command::Daemon
            | cli::Command::ServeNbd(_)
            | cli::Command::Mount(_)
    ) || matches!(&cli.command, cli::Command::Verify(a) if a.boot.boot)
        || matches!(&cli.command, cli::Command::Restore(a) if a.live && !a.detach);
    let result = runtime.block_on(async move {
        if own_signals {
            return commands::run(cli).await;
        }
        tokio::select! {
            r = commands::run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(virtkeep_engine::Error::new(
                virtkeep_engine::ErrorKind::Interrupted,
                "interrupted",
            )
            .into()),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => output::report_error(&err, json),
    }
}

/// One page per command and subcommand (virtkeep.1, virtkeep-repo-init.1, …).
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <cli::Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing into {}", dir.display()))
}
