//! virtkeep: agentless backup and restore of libvirt VMs over SSH.
//!
//! Exit codes: 0 success, 1 the job failed, 2 usage or configuration error.

mod cli;
mod commands;
mod daemon;
mod output;
mod settings;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(err) => output::report_error(&err, json),
    }
}
