//! The configuration file and the node's defaults: where things live when nothing is said.

use std::path::{Path, PathBuf};

use virtkeep_engine::Error as EngineError;
use virtkeep_engine::config::{Config, RepositoryConfig};
use virtkeep_repo::{KeySource, Location, RepoError, Repository};

use crate::cli::RepoArgs;
use crate::keys::{self, KeyChoice};

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The file root and the service user share with the daemon.
pub const SYSTEM_CONFIG: &str = "/etc/virtkeep/config.toml";

/// Root and the `virtkeep` service user use the node's file (the daemon's); other users
/// their own in the XDG configuration directory.
pub fn default_config_path() -> PathBuf {
    if is_system_user() {
        return PathBuf::from(SYSTEM_CONFIG);
    }
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
        .join("virtkeep/config.toml")
}

fn is_system_user() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    root || std::env::var("USER").is_ok_and(|u| u == "virtkeep")
}

/// The embedded default repository: a directory in the node user's data dir.
pub fn default_repo_location() -> String {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("virtkeep/repo")
        .to_string_lossy()
        .into_owned()
}

pub struct Settings {
    pub path: PathBuf,
    pub config: Config,
    /// The file as read, and what it said: `save` changes only what differs.
    text: String,
    loaded: Config,
}

impl Settings {
    /// Connects to host `name` of the configuration.
    pub async fn connect(&self, name: &str) -> anyhow::Result<virtkeep_engine::host::Host> {
        let config = self.config.host(name)?;
        Ok(virtkeep_engine::host::Host::connect(name, config, &self.known_hosts()).await?)
    }

    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Settings> {
        let path = explicit
            .map(Path::to_path_buf)
            .unwrap_or_else(default_config_path);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A missing file is an empty configuration: `host add` and `repo init` create it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(
                    EngineError::config(format!("cannot read {}: {e}", path.display())).into(),
                );
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| {
            EngineError::config(format!("{}: {}", path.display(), e.to_string().trim()))
                .hint("fix the file, or move it away to start from the defaults")
        })?;
        Ok(Settings {
            path,
            loaded: config.clone(),
            config,
            text,
        })
    }

    /// Writes what changed into the file (comments and order of the rest kept).
    pub fn save(&mut self) -> anyhow::Result<()> {
        let text = crate::configfile::edit(&self.text, &self.loaded, &self.config)?;
        crate::configfile::write(&self.path, &text)?;
        self.text = text;
        self.loaded = self.config.clone();
        Ok(())
    }

    /// The node-wide known_hosts file.
    pub fn known_hosts(&self) -> PathBuf {
        self.config
            .known_hosts
            .clone()
            .unwrap_or_else(|| self.path.with_file_name("known_hosts"))
    }

    /// The repository commands use without `--repo` (the config's, else the embedded default).
    pub fn default_repository(&self) -> RepositoryConfig {
        self.repo_config(&RepoArgs::default()).0
    }

    /// The repository to open and where its key comes from: the command line's key
    /// options replace the configuration's; another location than the configuration's
    /// takes none of its key settings.
    pub fn repo_config(&self, args: &RepoArgs) -> (RepositoryConfig, KeyChoice) {
        let mut rc = self.config.repository.clone().unwrap_or(RepositoryConfig {
            location: default_repo_location(),
            ..RepositoryConfig::default()
        });
        if let Some(loc) = &args.repo {
            let loc = keys::absolute_location(loc);
            if loc != rc.location {
                rc = RepositoryConfig {
                    location: loc,
                    key_file: None,
                    password_file: None,
                    password_command: None,
                    passphrase_env: None,
                    ..rc
                };
            }
        }
        let given = KeyChoice {
            key_file: args.key_file.as_deref().map(keys::absolute),
            password_file: args.password_file.clone(),
            password_command: args.password_command.clone(),
            passphrase_env: args.passphrase_env.clone(),
        };
        // The command line (and its variables) first, then the configuration's.
        let choice = given.or(KeyChoice::of_repository(&rc));
        (rc, choice)
    }

    pub fn location(
        &self,
        location: &str,
        rc: Option<&RepositoryConfig>,
    ) -> anyhow::Result<Location> {
        let loc = Location::parse(location).map_err(EngineError::from)?;
        Ok(match loc {
            Location::S3 { .. } => {
                let rc = rc.cloned().unwrap_or_default();
                loc.with_s3_options(rc.s3_options())
            }
            other => other,
        })
    }

    pub async fn open_repo(&self, args: &RepoArgs) -> anyhow::Result<Repository> {
        let (rc, choice) = self.repo_config(args);
        let location = self.location(&rc.location, Some(&rc))?;
        let key = choice.resolve().await?;
        let may_prompt = key.is_none() && keys::can_prompt();
        let opened = match Repository::open(location.clone(), key).await {
            // Encrypted, and nothing said how to unlock it: ask, as restic and borg do.
            Err(RepoError::KeyRequired { .. }) if may_prompt => {
                let prompt = format!("password for repository {}: ", rc.location);
                let password = keys::prompt(&prompt)?;
                Repository::open(location, Some(KeySource::Passphrase(password))).await
            }
            other => other,
        };
        opened.map_err(|e| {
            let err = repo_error(e, &rc.location);
            // Most repository errors name the location already.
            if err.message.contains(&rc.location) {
                err.into()
            } else {
                err.context(format!("repository {}", rc.location)).into()
            }
        })
    }
}

/// [`repo_error`] for operations on an open repository (which is never missing).
pub fn repo_err(e: RepoError) -> EngineError {
    repo_error(e, "LOCATION")
}

/// A repository error with the hint that fits it: the one place that says what to do,
/// so that a wrong key is never answered with "create it".
pub fn repo_error(e: RepoError, location: &str) -> EngineError {
    let hint = match &e {
        RepoError::NotARepository(_) => Some(format!(
            "create it with `virtkeep repo init {location}`, or name another with --repo or VIRTKEEP_REPOSITORY"
        )),
        RepoError::KeyRequired { message, .. } if message.contains("not encrypted") => Some(
            "this repository has no password: leave out the password options (its key file, \
             if any, goes in --key-file or the repository's key_file)"
                .into(),
        ),
        RepoError::AuthKeyRequired { .. } => Some(
            "name its key file with --key-file or `key_file` in the repository's \
             configuration (`virtkeep repo init` made it, in keys/ beside the config file); \
             on another node, copy it with `virtkeep repo key export FILE` there and \
             `virtkeep repo key import FILE` here"
                .into(),
        ),
        RepoError::WrongKey { .. } | RepoError::KeyRequired { .. } => Some(
            "give the repository's key file (--key-file) or its password (--password-file, \
             --password-command, VIRTKEEP_PASSWORD_FILE, --passphrase-env, or the prompt on a terminal)"
                .into(),
        ),
        RepoError::GcRunning { .. } => {
            Some("another `virtkeep gc` is running; try again when it has finished".into())
        }
        RepoError::InUse { .. } => {
            Some("a running backup builds on it; try again when that backup has finished".into())
        }
        RepoError::SnapshotNotFound(_) => {
            Some("`virtkeep snapshots` lists the backups and their ids".into())
        }
        RepoError::Protected(id) => Some(format!(
            "`virtkeep unprotect {id}` first if it really is to go"
        )),
        RepoError::Retained { .. } => Some(
            "the repository has S3 Object Lock: a backup can be removed once its retention \
             has ended (`virtkeep prune --keep-within` keeps it until then and says so)"
                .into(),
        ),
        _ => None,
    };
    let err = EngineError::from(e);
    match hint {
        Some(h) if err.hint.is_none() => err.hint(h),
        _ => err,
    }
}
