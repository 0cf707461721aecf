//! One function per command: parse into the engine's options, run, render.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use virtkeep_engine::backup::{BackupOptions, BaseOnHost, backup_vm};
use virtkeep_engine::config::{CephConfig, HostConfig};
use virtkeep_engine::host::Host;
use virtkeep_engine::restore::{RestoreOptions, Storage, restore};
use virtkeep_engine::{Error as EngineError, cleanup, heal, inventory};

use crate::cli::*;
use crate::output::{human_bytes, print_json, progress, stages};
use crate::settings::{Settings, repo_err};

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    let json = cli.json;
    match cli.command {
        Command::Host(HostCommand::Add(args)) => host_add(&mut settings, *args, json),
        Command::Host(HostCommand::Remove { name }) => host_remove(&mut settings, &name, json),
        Command::Host(HostCommand::Trust(args)) => host_trust(&settings, args, json).await,
        Command::Host(HostCommand::Check { name }) => host_check(&settings, &name, json).await,
        Command::Host(HostCommand::List) => host_list(&settings, json),
        Command::Vm(VmCommand::List { host }) => vm_list(&settings, host.as_deref(), json).await,
        Command::Repo(RepoCommand::Init(args)) => {
            crate::repo_cmds::init(&mut settings, args, json).await
        }
        Command::Repo(RepoCommand::Key(RepoKeyCommand::Export(args))) => {
            crate::repo_cmds::key_export(&settings, args).await
        }
        Command::Repo(RepoCommand::Key(RepoKeyCommand::Import(args))) => {
            crate::repo_cmds::key_import(&mut settings, args, json).await
        }
        Command::Repo(RepoCommand::Upgrade(args)) => {
            crate::repo_cmds::upgrade(&mut settings, args, json).await
        }
        Command::Repo(RepoCommand::Key(RepoKeyCommand::ChangePassphrase(args))) => {
            crate::repo_cmds::key_change(&mut settings, args, json).await
        }
        Command::Backup(args) => backup(&settings, args, json).await,
        Command::Snapshots(args) => snapshots(&settings, args, json).await,
        Command::Restore(args) => restore_cmd(&settings, args, json).await,
        Command::Verify(args) => verify(&settings, args, json).await,
        Command::Prune(args) => prune(&settings, args, json).await,
        Command::Forget(args) => crate::manage::forget(&settings, args, json).await,
        Command::Protect(args) => crate::manage::protect(&settings, args, true, json).await,
        Command::Unprotect(args) => crate::manage::protect(&settings, args, false, json).await,
        Command::Gc(args) => gc(&settings, args, json).await,
        Command::Sync(args) => crate::sync_cmd::sync(&settings, args, json).await,
        Command::Stats(args) => crate::stats::stats(&settings, args, json).await,
        Command::Cleanup(args) => cleanup(&settings, args, json).await,
        Command::Daemon => crate::daemon::daemon(&settings).await,
        Command::Jobs(args) => crate::daemon::jobs(&settings, args, json),
        Command::Nodes => crate::daemon::nodes(&settings, json),
        Command::Policy(PolicyCommand::List) => crate::daemon::policy_list(&settings, json),
        Command::ServeNbd(args) => crate::files_cmds::serve_nbd(&settings, args, json).await,
        Command::Mount(args) => crate::files_cmds::mount(&settings, args, json).await,
        Command::Files(FilesCommand::Ls(args)) => {
            crate::files_cmds::files_ls(&settings, args, json).await
        }
        Command::Files(FilesCommand::Get(args)) => {
            crate::files_cmds::files_get(&settings, args, json).await
        }
        Command::Files(FilesCommand::Find(args)) => {
            crate::files_cmds::files_find(&settings, args, json).await
        }
        // Handled in main before any configuration is read.
        Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
    }
}

async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Host> {
    settings.connect(name).await
}

fn parse_ssh(spec: &str) -> anyhow::Result<(String, String, u16)> {
    let (user, rest) = spec.split_once('@').unwrap_or(("root", spec));
    let (addr, port) = match rest.rsplit_once(':') {
        Some((a, p)) if !a.contains(':') || a.ends_with(']') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| EngineError::config(format!("--ssh {spec}: {p:?} is not a port")))?;
            (
                a.trim_start_matches('[').trim_end_matches(']').to_string(),
                port,
            )
        }
        _ => (rest.to_string(), 22),
    };
    if user.is_empty() || addr.is_empty() {
        return Err(
            EngineError::config(format!("--ssh {spec}: expected USER@ADDRESS[:PORT]")).into(),
        );
    }
    Ok((user.to_string(), addr, port))
}

fn host_add(settings: &mut Settings, args: HostAddArgs, json: bool) -> anyhow::Result<ExitCode> {
    let existing = settings.config.hosts.get(&args.name).cloned();
    let existed = existing.is_some();
    let mut host = match (existing, &args.ssh) {
        (Some(h), _) => h,
        (None, Some(_)) => HostConfig {
            address: String::new(),
            port: 22,
            user: String::new(),
            identity: None,
            password_env: None,
            agent: None,
            known_hosts: None,
            sudo: false,
            libvirt_uri: "qemu:///system".into(),
            qemu_user: None,
            qemu_group: None,
            ceph: None,
            lvm: None,
            command_timeout_secs: None,
            data_command_timeout_secs: None,
            data_stall_timeout_secs: None,
        },
        (None, None) => {
            return Err(EngineError::config(format!(
                "host {} is new: give --ssh USER@ADDRESS[:PORT]",
                args.name
            ))
            .into());
        }
    };
    if !existed && args.identity.is_none() && args.password_env.is_none() && !args.agent {
        return Err(EngineError::config("no authentication method given")
            .hint("give --identity KEYFILE, --password-env VAR (the variable's name, not the password) or --agent")
            .into());
    }
    let name = args.name.clone();
    apply_host_args(&mut host, args)?;
    settings.config.hosts.insert(name.clone(), host);
    settings.save()?;
    if json {
        print_json(
            &serde_json::json!({ "host": name, "updated": existed, "config": settings.path }),
        )?;
    } else {
        println!(
            "{} host {name} in {}",
            if existed { "updated" } else { "added" },
            settings.path.display()
        );
        println!("next: `virtkeep host trust {name}` to pin its host key");
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets what the command line gives and leaves the rest as it was.
fn apply_host_args(host: &mut HostConfig, args: HostAddArgs) -> anyhow::Result<()> {
    if let Some(ssh) = &args.ssh {
        (host.user, host.address, host.port) = parse_ssh(ssh)?;
    }
    if let Some(id) = &args.identity
        && !id.exists()
    {
        return Err(
            EngineError::config(format!("key file {} does not exist", id.display())).into(),
        );
    }
    // One authentication method: a new one replaces the old.
    if args.identity.is_some() || args.password_env.is_some() || args.agent {
        host.identity = args
            .identity
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        host.password_env = args.password_env;
        host.agent = args.agent.then(String::new);
    }
    if let Some(k) = args.known_hosts {
        host.known_hosts = Some(crate::keys::absolute(&k));
    }
    if args.sudo || args.no_sudo {
        host.sudo = args.sudo;
    }
    if let Some(uri) = args.libvirt_uri {
        host.libvirt_uri = uri;
    }
    if let (Some(u), Some(g)) = (args.qemu_user, args.qemu_group) {
        (host.qemu_user, host.qemu_group) = (Some(u), Some(g));
    }
    if let (Some(conf), Some(id), Some(keyring)) = (args.ceph_conf, args.ceph_id, args.ceph_keyring)
    {
        host.ceph = Some(CephConfig { conf, id, keyring });
    }
    Ok(())
}

fn host_remove(settings: &mut Settings, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    if settings.config.hosts.remove(name).is_none() {
        return Err(
            EngineError::config(format!("no host {name} in {}", settings.path.display()))
                .hint("`virtkeep host list` shows the configured hosts")
                .into(),
        );
    }
    settings.save()?;
    if json {
        print_json(&serde_json::json!({ "host": name, "removed": true, "config": settings.path }))?;
    } else {
        println!("removed host {name} from {}", settings.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn host_trust(
    settings: &Settings,
    args: HostTrustArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let host = settings.config.host(&args.name)?;
    let known_hosts = host
        .known_hosts
        .clone()
        .unwrap_or_else(|| settings.known_hosts());
    let probed = virtkeep_ssh::probe_host_key(&host.address, host.port, Duration::from_secs(15))
        .await
        .map_err(EngineError::from)?;
    let fingerprint = probed.fingerprint.clone();
    let status = virtkeep_ssh::known_hosts::KnownHosts::load(&known_hosts)
        .map_err(EngineError::from)?
        .check(&host.address, host.port, &probed.key);
    if matches!(status, virtkeep_ssh::known_hosts::HostKeyStatus::Trusted) {
        if json {
            print_json(
                &serde_json::json!({ "host": args.name, "fingerprint": fingerprint, "pinned": true, "changed": false }),
            )?;
        } else {
            println!(
                "{} ({}) is already pinned in {}",
                fingerprint,
                probed.algorithm,
                known_hosts.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let virtkeep_ssh::known_hosts::HostKeyStatus::Changed { .. }
    | virtkeep_ssh::known_hosts::HostKeyStatus::Revoked = status
    {
        return Err(EngineError::new(
            virtkeep_engine::ErrorKind::HostKey,
            format!("host {} presents {fingerprint}, which differs from the key pinned in {} (or is revoked)", args.name, known_hosts.display()),
        )
        .hint("verify the new key on the host's console (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub); if it is right, remove the old line from the known_hosts file and trust again")
        .into());
    }
    match &args.fingerprint {
        Some(expected) if *expected == fingerprint => {}
        Some(expected) => {
            return Err(EngineError::new(
                virtkeep_engine::ErrorKind::HostKey,
                format!("host {} presents {fingerprint}, not the expected {expected}; nothing was pinned", args.name),
            )
            .hint("check the fingerprint on the host's console: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
            .into());
        }
        None => {
            if !std::io::stdin().is_terminal() || json {
                return Err(EngineError::config(format!(
                    "host {} presents {fingerprint} ({}); refusing to pin it without confirmation",
                    args.name, probed.algorithm
                ))
                .hint(format!("after checking it on the host, run `virtkeep host trust {} --fingerprint {fingerprint}`", args.name))
                .into());
            }
            eprint!(
                "host {} presents the {} key\n  {fingerprint}\nPin it in {}? [y/N] ",
                args.name,
                probed.algorithm,
                known_hosts.display()
            );
            std::io::stderr().flush()?;
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                eprintln!("not pinned");
                return Ok(ExitCode::from(1));
            }
        }
    }
    virtkeep_ssh::known_hosts::pin(&known_hosts, &host.address, host.port, &probed.key)
        .map_err(EngineError::from)?;
    if json {
        print_json(
            &serde_json::json!({ "host": args.name, "fingerprint": fingerprint, "pinned": true, "changed": true }),
        )?;
    } else {
        println!(
            "pinned {fingerprint} for {} in {}",
            args.name,
            known_hosts.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn host_check(settings: &Settings, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let host = connect(settings, name).await?;
    let items = inventory::check_host(&host).await?;
    let failed = items.iter().any(|i| i.required && !i.ok);
    if json {
        print_json(&serde_json::json!({ "host": name, "ok": !failed, "checks": items }))?;
    } else {
        for i in &items {
            let mark = if i.ok {
                "ok  "
            } else if i.required {
                "FAIL"
            } else {
                "warn"
            };
            println!("[{mark}] {:<44} {}", i.check, i.detail);
            if let Some(fix) = &i.fix {
                println!("       fix: {fix}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn host_list(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let list: Vec<_> = settings
            .config
            .hosts
            .iter()
            .map(|(name, h)| serde_json::json!({ "name": name, "address": h.address, "port": h.port, "user": h.user, "sudo": h.sudo, "libvirt_uri": h.libvirt_uri }))
            .collect();
        print_json(&list)?;
    } else {
        for (name, h) in &settings.config.hosts {
            println!(
                "{name:<20} {}@{}:{} {}{}",
                h.user,
                h.address,
                h.port,
                h.libvirt_uri,
                if h.sudo { " (sudo)" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn vm_list(settings: &Settings, only: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let names: Vec<String> = match only {
        Some(h) => [settings.config.host(h)?; 1]
            .iter()
            .map(|_| h.to_string())
            .collect(),
        None => settings.config.hosts.keys().cloned().collect(),
    };
    let several = names.len() > 1;
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for name in names {
        let listed = async {
            let host = connect(settings, &name).await?;
            anyhow::Ok(inventory::list_vms(&host).await?)
        }
        .await;
        match listed {
            Ok(vms) => all.extend(vms),
            // One host down must not hide the others.
            Err(e) if several => {
                if !json {
                    eprintln!("{name}: error: {}", crate::output::message(&e));
                    if let Some(h) = crate::output::hint(&e) {
                        eprintln!("  hint: {h}");
                    }
                }
                failed.push((name, e));
            }
            Err(e) => return Err(e),
        }
    }
    if json {
        let mut list = serde_json::to_value(&all)?;
        if let Some(items) = list.as_array_mut() {
            for (name, e) in &failed {
                items.push(
                    serde_json::json!({ "host": name, "error": crate::output::error_json(e) }),
                );
            }
        }
        print_json(&list)?;
    } else {
        for vm in &all {
            println!(
                "{}/{}  {:?}  {}  {}",
                vm.host, vm.name, vm.state, vm.kind, vm.uuid
            );
            for d in &vm.disks {
                println!(
                    "    {:<6} {:<10} {:<16} {:<6} {:>10} {:>10}  {}  [{}]",
                    d.target,
                    d.device,
                    d.backend,
                    d.format.as_deref().unwrap_or("-"),
                    d.virtual_size.map(human_bytes).unwrap_or_default(),
                    d.allocated.map(human_bytes).unwrap_or_default(),
                    d.source,
                    d.method
                );
            }
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::output::exit::PARTIAL)
    })
}

fn split_host_vm(spec: &str) -> anyhow::Result<(&str, &str)> {
    match spec.split_once('/') {
        Some((h, v)) if !h.is_empty() && !v.is_empty() => Ok((h, v)),
        _ => Err(EngineError::config(format!("{spec:?}: expected HOST/VM"))
            .hint("e.g. `virtkeep backup kvm1/web01`; `virtkeep vm list` shows the names")
            .into()),
    }
}

async fn backup(settings: &Settings, args: BackupArgs, json: bool) -> anyhow::Result<ExitCode> {
    let targets: Vec<(String, String)> = args
        .vms
        .iter()
        .map(|s| split_host_vm(s).map(|(h, v)| (h.to_string(), v.to_string())))
        .collect::<anyhow::Result<_>>()?;
    let repo = settings.open_repo(&args.repo).await?;
    let opts = BackupOptions {
        mode: args.mode,
        base: if args.no_keep_base {
            BaseOnHost::Remove
        } else {
            BaseOnHost::Keep
        },
        exclude_disks: args.exclude_disk.clone(),
        quiesce: args.quiesce,
        pre_snapshot: args.pre_snapshot.clone(),
        post_snapshot: args.post_snapshot.clone(),
        transport: args.transport,
        parallel: args.parallel,
    };
    let progress = progress(json);
    let mut results = Vec::new();
    let mut failures = 0;
    let mut interrupted = false;
    for (host_name, vm) in &targets {
        let res = async {
            let connecting = std::time::Instant::now();
            let host = connect(settings, host_name).await?;
            let connect_secs = connecting.elapsed().as_secs_f64();
            let job = backup_vm(&host, &repo, vm, &opts, progress.clone());
            tokio::select! {
                r = job => {
                    let mut r = r?;
                    r.phases.connect_secs = connect_secs;
                    Ok::<_, anyhow::Error>(r)
                }
                _ = tokio::signal::ctrl_c() => {
                    // The interrupted job's future is gone; heal the VM before exiting.
                    if let Ok(v) = virtkeep_engine::vm::Vm::find(&host, vm).await {
                        let _ = heal::stop_job_exports(&host, &v.uuid).await;
                        let _ = heal::heal_vm(&host, &v.uuid, false).await;
                    }
                    Err(EngineError::new(virtkeep_engine::ErrorKind::Interrupted, "interrupted; the VM was returned to its own files").into())
                }
            }
        }
        .await;
        match res {
            Ok(r) => {
                if !json {
                    let read: u64 = r.disks.iter().map(|d| d.bytes_read).sum();
                    let new: u64 = r.disks.iter().map(|d| d.bytes_new).sum();
                    let stored: u64 = r.disks.iter().map(|d| d.bytes_stored).sum();
                    // Both: `snapshots` lists what the new chunks take in the repository.
                    println!(
                        "{}/{}: backup {} ({}, {}) {} read, {} new ({} stored), {:.1}s",
                        r.host,
                        r.vm,
                        r.id,
                        r.mode,
                        r.reason,
                        human_bytes(read),
                        human_bytes(new),
                        human_bytes(stored),
                        r.duration_secs
                    );
                    for s in &r.skipped {
                        println!("  skipped {}: {}", s.target, s.reason);
                    }
                    for w in &r.warnings {
                        println!("  warning: {w}");
                    }
                }
                results.push(serde_json::to_value(&r)?);
            }
            Err(e) => {
                failures += 1;
                let code = crate::output::exit_code(&e);
                interrupted |= code == crate::output::exit::INTERRUPTED;
                if json {
                    results.push(serde_json::json!({
                        "host": host_name, "vm": vm, "error": crate::output::error_json(&e),
                    }));
                } else if targets.len() == 1 {
                    return Err(e);
                } else {
                    eprintln!("{host_name}/{vm}: error: {}", crate::output::message(&e));
                    if let Some(h) = crate::output::hint(&e) {
                        eprintln!("  hint: {h}");
                    }
                }
                if interrupted {
                    break;
                }
            }
        }
    }
    if json {
        print_json(&results)?;
    }
    Ok(backup_exit_code(failures, targets.len(), interrupted))
}

/// 0 all done, 130 interrupted, 3 some of several VMs failed, 1 all failed.
fn backup_exit_code(failures: usize, total: usize, interrupted: bool) -> ExitCode {
    use crate::output::exit;
    ExitCode::from(match failures {
        _ if interrupted => exit::INTERRUPTED,
        0 => 0,
        f if f < total => exit::PARTIAL,
        _ => exit::FAILED,
    })
}

async fn snapshots(
    settings: &Settings,
    args: SnapshotsArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let mut list = repo.snapshots().await.map_err(repo_err)?;
    if let Some(f) = &args.filter {
        let (h, v) = f
            .split_once('/')
            .map(|(h, v)| (h, Some(v)))
            .unwrap_or((f.as_str(), None));
        list.retain(|s| s.host == h && v.is_none_or(|v| s.vm == v));
    }
    if json {
        print_json(&list)?;
    } else if list.is_empty() {
        match &args.filter {
            Some(f) => println!("no backups of {f}"),
            None => println!("no backups"),
        }
    } else {
        print!("{}", crate::output::snapshot_table(&list, args.utc));
    }
    Ok(ExitCode::SUCCESS)
}

async fn restore_cmd(
    settings: &Settings,
    args: RestoreArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if args.live {
        return crate::live_cmds::restore_live(settings, args, json).await;
    }
    if let Some(job) = &args.resume {
        return crate::live_cmds::resume_live(settings, &args, job, json).await;
    }
    let repo = settings.open_repo(&args.repo).await?;
    if let Some(path) = &args.to_file {
        return restore_to_file_cmd(&repo, &args, path, json).await;
    }
    let storage = Storage::parse(args.storage.as_deref())?;
    let owner = match args.owner.as_deref() {
        None => None,
        Some(o) => match o.split_once(':') {
            Some((u, g)) if !u.is_empty() && !g.is_empty() => Some((u.to_string(), g.to_string())),
            _ => {
                return Err(
                    EngineError::config(format!("--owner {o}: expected USER:GROUP")).into(),
                );
            }
        },
    };
    let host = connect(settings, args.to.as_deref().unwrap_or_default()).await?;
    let opts = RestoreOptions {
        snapshot: args.snapshot.clone().unwrap_or_default(),
        name: args.name.clone(),
        storage,
        owner,
        disks: args.disk.clone(),
        define: args.define || args.start,
        start: args.start,
        force: args.force,
        parallel: args.parallel,
        dry_run: args.dry_run,
        allow_qemu_passthrough: args.allow_qemu_passthrough,
    };
    let r = restore(&host, &repo, &opts, progress(json)).await?;
    if json {
        print_json(&r)?;
    } else if r.dry_run {
        print_restore_plan(&r);
    } else {
        for d in &r.disks {
            println!(
                "restored {} -> {}:{} ({}, {} written)",
                d.target,
                r.host,
                d.path,
                d.format,
                human_bytes(d.bytes_written)
            );
        }
        if r.defined {
            println!(
                "defined {:?} ({}){}",
                r.vm,
                r.uuid.as_deref().unwrap_or("?"),
                if r.started { ", started" } else { "" }
            );
        }
        for n in &r.notes {
            println!("note: {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `restore --dry-run` without `--json`.
fn print_restore_plan(r: &virtkeep_engine::restore::RestoreResult) {
    println!(
        "dry run: nothing written; restore {} to {}:",
        r.snapshot, r.host
    );
    for d in &r.disks {
        let replaced = if r.replaces.contains(&d.target) {
            ", replaces the existing one"
        } else {
            ""
        };
        println!(
            "  disk {} -> {} ({} {}, {}){replaced}",
            d.target,
            d.path,
            d.backend,
            d.format,
            human_bytes(d.size)
        );
    }
    for c in &r.xml_changes {
        println!("  define {:?}: {c}", r.vm);
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

async fn restore_to_file_cmd(
    repo: &virtkeep_repo::Repository,
    args: &RestoreArgs,
    path: &std::path::Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use virtkeep_engine::restore::local;
    let opts = local::LocalOptions {
        snapshot: args.snapshot.clone().unwrap_or_default(),
        disk: args.disk.first().cloned().unwrap_or_default(),
        path: path.to_path_buf(),
        format: local::FileFormat::parse(&args.format)?,
        force: args.force,
    };
    if args.disk.len() != 1 {
        return Err(
            EngineError::config("--to-file writes one disk: give exactly one --disk").into(),
        );
    }
    let r = local::restore_to_file(repo, &opts, progress(json)).await?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "restored {} -> {} ({:?}, {} written)",
            r.disk,
            r.path,
            r.format,
            human_bytes(r.bytes_written)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(settings: &Settings, args: VerifyArgs, json: bool) -> anyhow::Result<ExitCode> {
    if args.boot.boot {
        return crate::live_cmds::verify_boot(settings, args, json).await;
    }
    let repo = settings.open_repo(&args.repo).await?;
    let selection = match args.snapshot {
        Some(spec) => {
            // An unknown id is an error of its own, not a "broken backup"; a damaged
            // manifest is for verify to report.
            let id = virtkeep_engine::snapshot_ref::resolve(&repo, &spec).await?;
            virtkeep_repo::VerifySelection::Snapshots(vec![id])
        }
        None => virtkeep_repo::VerifySelection::All,
    };
    let opts = virtkeep_repo::VerifyOptions {
        selection,
        read_data: args.read_data,
    };
    let progress = stages(json);
    let report = repo.verify_reporting(opts, &*progress).await;
    progress.finish();
    let report = report.map_err(repo_err)?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "{} backups, {} chunks {}, {} ok",
            report.snapshots_checked,
            report.chunks_checked,
            if report.read_data {
                "read"
            } else {
                "looked up (contents not read; --read-data reads them)"
            },
            report.chunks_ok
        );
        for p in report
            .missing
            .iter()
            .map(|p| ("missing", p))
            .chain(report.corrupt.iter().map(|p| ("corrupt", p)))
        {
            println!(
                "{} chunk {}: {} (breaks {})",
                p.0,
                p.1.digest,
                p.1.error,
                p.1.snapshots.join(", ")
            );
        }
        for m in &report.metadata_errors {
            println!("metadata: {m}");
        }
        if !report.broken_snapshots.is_empty() {
            println!("broken backups: {}", report.broken_snapshots.join(", "));
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn prune(settings: &Settings, args: PruneArgs, json: bool) -> anyhow::Result<ExitCode> {
    let policy = virtkeep_repo::KeepPolicy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    };
    if policy == virtkeep_repo::KeepPolicy::default() && args.keep_within.is_none() {
        return Err(
            EngineError::config("prune needs at least one --keep-* option")
                .hint("e.g. `virtkeep prune --keep-last 3 --keep-daily 7 --dry-run`")
                .into(),
        );
    }
    let repo = settings.open_repo(&args.repo).await?;
    if repo.object_lock().is_some() && args.keep_within.is_none() {
        eprintln!(
            "warning: {} has Object Lock; prune it with --keep-within: an attacker who can \
             write to it can add backups until count-based rules (--keep-last…) select the \
             real ones for removal",
            repo.location()
        );
    }
    let within = args.keep_within;
    let decisions = match args.filter.as_deref() {
        None => repo.prune_within(&policy, within, None, args.dry_run).await,
        Some(f) => match f.split_once('/') {
            Some(group) => {
                repo.prune_within(&policy, within, Some(group), args.dry_run)
                    .await
            }
            None => prune_host(&repo, f, (&policy, within), args.dry_run).await,
        },
    }
    .map_err(repo_err)?;
    if json {
        print_json(&decisions)?;
    } else {
        for d in &decisions {
            println!(
                "{} {}  {}",
                if d.keep {
                    "keep  "
                } else if args.dry_run {
                    "would remove"
                } else {
                    "remove"
                },
                d.id,
                d.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every VM of one host, group by group (the library prunes one group or all).
async fn prune_host(
    repo: &virtkeep_repo::Repository,
    host: &str,
    (policy, within): (&virtkeep_repo::KeepPolicy, Option<time::Duration>),
    dry_run: bool,
) -> virtkeep_repo::Result<Vec<virtkeep_repo::PruneDecision>> {
    let vms: std::collections::BTreeSet<String> = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|s| s.host == host)
        .map(|s| s.vm)
        .collect();
    let mut out = Vec::new();
    for vm in vms {
        out.extend(
            repo.prune_within(policy, within, Some((host, vm.as_str())), dry_run)
                .await?,
        );
    }
    Ok(out)
}

async fn gc(settings: &Settings, args: GcArgs, json: bool) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let opts = virtkeep_repo::GcOptions {
        grace: Duration::from_secs(args.grace_hours * 3600),
        dry_run: args.dry_run,
    };
    let progress = stages(json);
    let report = repo.gc_reporting(opts, &*progress).await;
    progress.finish();
    let report = report.map_err(repo_err)?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "{}{} chunks removed, {} freed; {} kept, {} unreferenced but too recent",
            if report.dry_run { "(dry run) " } else { "" },
            report.chunks_removed,
            human_bytes(report.bytes_freed),
            report.chunks_kept,
            report.chunks_too_recent
        );
        if report.objects_retained > 0 {
            println!(
                "{} unreferenced objects kept under object lock retention (a later gc removes them)",
                report.objects_retained
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cleanup(settings: &Settings, args: CleanupArgs, json: bool) -> anyhow::Result<ExitCode> {
    let host = connect(settings, &args.host).await?;
    let reports = match &args.vm {
        Some(vm) => {
            let r = cleanup::cleanup_vm(&host, vm, args.dry_run)
                .await
                .context("cleanup")?;
            if r.actions.is_empty() {
                vec![]
            } else {
                vec![r]
            }
        }
        None => cleanup::cleanup_host(&host, args.dry_run)
            .await
            .context("cleanup")?,
    };
    if json {
        print_json(
            &serde_json::json!({ "host": args.host, "dry_run": args.dry_run, "vms": reports }),
        )?;
    } else if reports.is_empty() {
        println!("{}: nothing to clean up", args.host);
    } else {
        for r in &reports {
            for a in &r.actions {
                println!("{}: {}{a}", r.vm, if args.dry_run { "would " } else { "" });
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
