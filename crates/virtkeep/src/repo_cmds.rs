//! `repo init`, `repo upgrade`, `repo key export|import|change-passphrase`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use virtkeep_engine::Error as EngineError;
use virtkeep_engine::config::RepositoryConfig;
use virtkeep_repo::KeySource;

use crate::cli::{
    Encryption, RepoInitArgs, RepoKeyChangeArgs, RepoKeyExportArgs, RepoKeyImportArgs,
    RepoUpgradeArgs,
};
use crate::keys::{self, KeyChoice};
use crate::output::print_json;
use crate::settings::{Settings, repo_err, repo_error};

/// The repository object that holds the wrapped master key and the KDF parameters
/// (docs/format.md).
const CONFIG_OBJECT: &str = "config";

/// `--object-lock MODE --retain DURATION` (clap makes them go together).
fn object_lock(args: &RepoInitArgs) -> Option<virtkeep_repo::ObjectLock> {
    let mode = match args.object_lock? {
        crate::cli::ObjectLockMode::Governance => virtkeep_repo::LockMode::Governance,
        crate::cli::ObjectLockMode::Compliance => virtkeep_repo::LockMode::Compliance,
    };
    let secs = args.retain?.whole_seconds().max(0).unsigned_abs();
    Some(virtkeep_repo::ObjectLock {
        mode,
        retain: std::time::Duration::from_secs(secs),
    })
}

pub async fn init(
    settings: &mut Settings,
    args: RepoInitArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let location = keys::absolute_location(
        &args
            .location
            .clone()
            .unwrap_or_else(crate::settings::default_repo_location),
    );
    let mut choice = KeyChoice {
        key_file: args.key_file.as_deref().map(keys::absolute),
        password_file: args.password_file.clone(),
        password_command: args.password_command.clone(),
        passphrase_env: args.passphrase_env.clone(),
    };
    let encryption = match args.encryption {
        Encryption::None if choice.key_file.is_none() && !choice.is_empty() => {
            return Err(
                EngineError::config("the password options need --encryption aes-256-gcm")
                    .hint(
                        "an unencrypted repository authenticates its metadata with a key file \
                 (--key-file, or one made beside the config file)",
                    )
                    .into(),
            );
        }
        Encryption::None => {
            // The key file that authenticates its manifests and indexes: kept on the
            // node, never in the repository.
            let f = match choice.key_file.clone() {
                Some(f) => f,
                None => default_key_file(settings)?,
            };
            keys::check_key_dir(&f)?;
            choice.key_file = Some(f);
            None
        }
        Encryption::Aes256Gcm => {
            if choice.is_empty() {
                // Nothing said: a fresh key file beside the configuration file.
                choice.key_file = Some(default_key_file(settings)?);
            }
            if let Some(f) = &choice.key_file {
                keys::check_key_dir(f)?;
            }
            choice.resolve().await?
        }
    };
    let opts = virtkeep_repo::InitOptions {
        chunk_size: args.chunk_size_mib << 20,
        zstd_level: args.zstd_level,
        auth_key_file: encryption
            .is_none()
            .then(|| choice.key_file.clone())
            .flatten(),
        encryption,
        object_lock: object_lock(&args),
        ..virtkeep_repo::InitOptions::default()
    };
    let loc = settings.location(&location, settings.config.repository.as_ref())?;
    let repo = match &args.copy_keys_from {
        Some(spec) => {
            let source =
                crate::sync_cmd::open_named(settings, spec, args.copy_keys_key_file.as_deref())
                    .await?;
            if source.is_encrypted() != opts.encryption.is_some() {
                let want = if source.is_encrypted() {
                    "aes-256-gcm"
                } else {
                    "none"
                };
                return Err(EngineError::config(format!(
                    "{spec} is {}encrypted, the new repository would {}be",
                    if source.is_encrypted() { "" } else { "not " },
                    if source.is_encrypted() { "not " } else { "" },
                ))
                .hint(format!("give --encryption {want} to share its keys"))
                .into());
            }
            let opts = virtkeep_repo::InitOptions {
                chunk_size: source.chunk_size(),
                ..opts
            };
            virtkeep_repo::Repository::init_with_keys_of(loc, opts, &source).await
        }
        None => virtkeep_repo::Repository::init(loc, opts).await,
    }
    .map_err(|e| repo_error(e, &location))?;
    if settings.config.repository.is_none() {
        settings.config.repository = Some(RepositoryConfig {
            location: location.clone(),
            key_file: choice.key_file.clone(),
            password_file: choice.password_file.as_deref().map(keys::absolute),
            password_command: choice.password_command.clone(),
            passphrase_env: choice.passphrase_env.clone(),
            ..RepositoryConfig::default()
        });
        settings.save()?;
    } else if let Some(f) = &choice.key_file
        && record_key_file(settings, &location, f)?
    {
        settings.save()?;
    }
    print_init(&repo, &location, choice.key_file.as_deref(), json)?;
    let configured = std::iter::once(settings.config.repository.as_ref())
        .flatten()
        .chain(settings.config.repositories.values())
        .any(|rc| rc.location == location);
    if let Some(f) = &choice.key_file
        && !configured
    {
        eprintln!(
            "note: {location} is not a repository of the configuration: give \
             `--repo {location} --key-file {}` to the commands that use it",
            f.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the key is and that it must be backed up: the one moment to say it.
fn print_init(
    repo: &virtkeep_repo::Repository,
    location: &str,
    key_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        print_json(&serde_json::json!({
            "location": location, "id": repo.id(), "encrypted": repo.is_encrypted(),
            "chunk_size": repo.chunk_size(), "key_file": key_file,
        }))?;
        return Ok(());
    }
    println!(
        "initialised repository {location} ({}, {} MiB chunks)",
        if repo.is_encrypted() {
            "encrypted with aes-256-gcm"
        } else {
            "not encrypted"
        },
        repo.chunk_size() >> 20
    );
    if let Some(f) = key_file {
        println!("key file: {}", f.display());
        println!(
            "BACK UP the key file now, somewhere else than the repository, together with\n\
             `virtkeep repo key export FILE`: without them no backup can be read."
        );
    } else if repo.is_encrypted() {
        println!(
            "Keep the password safe and back up `virtkeep repo key export FILE`:\n\
             without them no backup can be read."
        );
    }
    Ok(())
}

/// `keys/repo-XXXXXXXX.key` beside the configuration file (a directory only its user
/// can enter).
fn default_key_file(settings: &Settings) -> anyhow::Result<PathBuf> {
    let dir = keys::absolute(settings.path.parent().unwrap_or(Path::new("."))).join("keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            EngineError::config(format!("cannot create {}: {e}", dir.display()))
                .hint("give --key-file FILE or a password option")
        })?;
    let name = uuid::Uuid::new_v4().simple().to_string();
    Ok(dir.join(format!("repo-{}.key", &name[..8])))
}

/// Writes the repository's `config` object (wrapped master key, KDF parameters) to a
/// file: with the key file or password, it brings back access to a repository whose
/// `config` was lost or damaged. An unencrypted repository's secret is its key file: a
/// copy of it is written, for `repo key import` on another node.
pub async fn key_export(settings: &Settings, args: RepoKeyExportArgs) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    if let Some(f) = repo.auth_key_file() {
        let bytes = std::fs::read(f)
            .map_err(|e| EngineError::config(format!("cannot read {}: {e}", f.display())))?;
        write_private_new(&args.file, &bytes)?;
        eprintln!(
            "wrote a copy of the repository's key file {} to {}; on another node, \
             `virtkeep repo key import {}` lets it open the repository",
            f.display(),
            args.file.display(),
            args.file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !repo.is_encrypted() {
        return Err(
            EngineError::config("this repository (format v1) has no key to export")
                .hint("`virtkeep repo upgrade` gives it one")
                .into(),
        );
    }
    let bytes = repo
        .backend()
        .get(CONFIG_OBJECT)
        .await
        .map_err(repo_err)?
        .ok_or_else(|| {
            EngineError::new(
                virtkeep_engine::ErrorKind::Repository,
                "the repository's config object vanished",
            )
        })?;
    write_private_new(&args.file, &bytes)?;
    eprintln!(
        "wrote the repository's config (its wrapped master key) to {}; keep it with the key \
         file or password, away from the repository: copied back as the repository's \
         `config` object it restores access",
        args.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn write_private_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| EngineError::config(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Re-wraps the master key with a new key file or password; the old one stops working.
pub async fn key_change(
    settings: &mut Settings,
    args: RepoKeyChangeArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = settings.open_repo(&args.repo).await?;
    let new = KeyChoice {
        key_file: args.new_key_file.as_deref().map(keys::absolute),
        password_file: args.new_password_file.clone(),
        password_command: args.new_password_command.clone(),
        passphrase_env: None,
    };
    if let Some(f) = &new.key_file {
        keys::check_key_dir(f)?;
    }
    let source = match new.resolve().await? {
        Some(s) => s,
        None if keys::can_prompt() => KeySource::Passphrase(keys::prompt_new("new password: ")?),
        None => {
            return Err(EngineError::config("no new key given")
                .hint("give --new-key-file, --new-password-file or --new-password-command")
                .into());
        }
    };
    repo.change_passphrase(source).await.map_err(repo_err)?;
    let location = repo.location().to_string();
    // The configuration must name the new key, or the next command fails.
    if let Some(rc) = settings.config.repository.as_mut()
        && rc.location == location
    {
        rc.key_file = new.key_file.clone();
        rc.password_file = new.password_file.as_deref().map(keys::absolute);
        rc.password_command = new.password_command.clone();
        rc.passphrase_env = None;
        settings.save()?;
    }
    if json {
        print_json(&serde_json::json!({ "location": location, "key_file": new.key_file }))?;
    } else {
        println!("changed the key of {location}; the old one no longer opens it");
        if let Some(f) = &new.key_file {
            println!("key file: {} (back it up)", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Names `key_file` for `location` in the configuration: the default repository when it
/// is that location (or when there is none) and every named one there. Returns whether
/// anything changed.
fn record_key_file(
    settings: &mut Settings,
    location: &str,
    key_file: &Path,
) -> anyhow::Result<bool> {
    let mut changed = false;
    let cfg = &mut settings.config;
    let default = cfg.repository.get_or_insert_with(|| RepositoryConfig {
        location: location.to_string(),
        ..RepositoryConfig::default()
    });
    let named = cfg.repositories.values_mut();
    for rc in std::iter::once(default).chain(named) {
        if rc.location == location && rc.key_file.as_deref() != Some(key_file) {
            rc.key_file = Some(key_file.to_path_buf());
            changed = true;
        }
    }
    Ok(changed)
}

/// Copies a key file from another node into keys/ beside the config file (0600) and
/// names it for the repository, once it has been checked to open it.
pub async fn key_import(
    settings: &mut Settings,
    args: RepoKeyImportArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (rc, _) = settings.repo_config(&args.repo);
    let location = settings.location(&rc.location, Some(&rc))?;
    let source = keys::absolute(&args.file);
    virtkeep_repo::Repository::open(location, Some(KeySource::KeyFile(source.clone())))
        .await
        .map_err(|e| repo_error(e, &rc.location))?;
    let bytes = std::fs::read(&source)
        .map_err(|e| EngineError::config(format!("cannot read {}: {e}", source.display())))?;
    let dest = default_key_file(settings)?;
    write_private_new(&dest, &bytes)?;
    if record_key_file(settings, &rc.location, &dest)? {
        settings.save()?;
    }
    if json {
        print_json(&serde_json::json!({ "location": rc.location, "key_file": dest }))?;
    } else {
        println!("key file: {}", dest.display());
        println!("repository {} opens with it on this node", rc.location);
    }
    Ok(ExitCode::SUCCESS)
}

/// `repo upgrade`: format v2, with the key file named in the configuration.
pub async fn upgrade(
    settings: &mut Settings,
    args: RepoUpgradeArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (rc, choice) = settings.repo_config(&args.repo);
    let location = settings.location(&rc.location, Some(&rc))?;
    let mut key = choice.resolve().await?;
    let mut opened =
        virtkeep_repo::Repository::open_for_upgrade(location.clone(), key.clone()).await;
    if matches!(opened, Err(virtkeep_repo::RepoError::KeyRequired { .. })) && keys::can_prompt() {
        let password = keys::prompt(&format!("password for repository {}: ", rc.location))?;
        key = Some(KeySource::Passphrase(password));
        opened = virtkeep_repo::Repository::open_for_upgrade(location, key.clone()).await;
    }
    let repo = opened.map_err(|e| repo_error(e, &rc.location))?;
    let auth_key = match (&key, repo.is_encrypted()) {
        (_, true) => None,
        (Some(KeySource::KeyFile(f)), false) => Some(f.clone()),
        _ => Some(default_key_file(settings)?),
    };
    // Named before the upgrade writes anything: an interrupted upgrade is then finished
    // by running it again with the same key file.
    if let Some(f) = &auth_key
        && record_key_file(settings, &rc.location, f)?
    {
        settings.save()?;
    }
    let report = repo.upgrade(auth_key).await.map_err(repo_err)?;
    if json {
        print_json(&report)?;
    } else {
        print_upgrade(&rc.location, &report);
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_upgrade(location: &str, r: &virtkeep_repo::UpgradeReport) {
    println!(
        "repository {location}: format v{} -> v{}{}",
        r.from_version,
        r.to_version,
        if r.config_rewritten {
            ""
        } else {
            " (config already upgraded)"
        }
    );
    if let Some(f) = &r.key_file {
        println!(
            "authenticated {} manifests and indexes ({} already were)",
            r.objects_authenticated, r.objects_already_authenticated
        );
        println!("key file: {}", f.display());
        println!(
            "BACK UP the key file now, somewhere else than the repository: without it no \
             backup can be restored (`virtkeep repo key export FILE` writes a copy)."
        );
    }
    for f in &r.failed {
        println!("NOT upgraded: {}: {}", f.object, f.error);
    }
}
