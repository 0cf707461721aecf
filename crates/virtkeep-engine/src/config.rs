//! Node configuration: hosts and repositories, as kept in the TOML config file.
//!
//! Secrets are never stored here: a host refers to a key file or to the name of an
//! environment variable that holds a password, and a repository to a key file, a
//! password file, a password command or a passphrase variable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Repository used when a command is given no `--repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryConfig>,
    /// known_hosts file used by hosts that do not name their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<PathBuf>,
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
    /// Further named repositories, for policies that back up somewhere else than the
    /// default `[repository]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub repositories: BTreeMap<String, RepositoryConfig>,
    /// `[daemon]` and `[policies.*]` belong to virtkeep-daemon, which reads and checks
    /// them from the file's text (to point errors at lines). They are kept here as
    /// opaque values only so that commands which rewrite the file (`host add`,
    /// `repo init`) do not drop them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, serde_json::Value>,
    /// `[sync.NAME]` jobs of virtkeep-daemon, opaque here like `policies`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sync: BTreeMap<String, serde_json::Value>,
    /// `[maintenance.REPOSITORY]` GC and verify schedules of virtkeep-daemon, opaque here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub maintenance: BTreeMap<String, serde_json::Value>,
}

/// How to reach and use one hypervisor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key file for public-key authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// Name of the environment variable holding the password (never the password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Use the ssh-agent at this socket (or `$SSH_AUTH_SOCK` when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// known_hosts file for this host; the node-wide one otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<PathBuf>,
    /// Run host commands through `sudo -n` (for a non-root user).
    #[serde(default)]
    pub sudo: bool,
    #[serde(default = "default_uri")]
    pub libvirt_uri: String,
    /// Owner of restored image files when it is not the distribution's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephConfig>,
    /// How big the copy-on-write areas of classic LVM snapshots are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<LvmConfig>,
    /// Seconds a control command (virsh, rbd, lvm, qemu-img, hooks) may take before the
    /// job gives up on it (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_timeout_secs: Option<u64>,
    /// Seconds a command that moves a disk's data on the host (blockcommit, qemu-img
    /// commit) may take (default 21600: 6 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_command_timeout_secs: Option<u64>,
    /// Seconds a disk's data stream (a backup's NBD reads, a restore's NBD writes) may
    /// make no progress before the job gives up on it (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_stall_timeout_secs: Option<u64>,
}

/// Sizing of classic (thick) LVM snapshots: the VM's writes during the backup must fit
/// into the copy-on-write area, or the snapshot becomes invalid and the backup fails.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LvmConfig {
    /// Share of the origin LV's size (0.1 = 10 %).
    #[serde(default = "default_lvm_share")]
    pub snapshot_share: f64,
    /// Lower bound in MiB (capped at what the origin can use).
    #[serde(default = "default_lvm_floor_mib")]
    pub snapshot_floor_mib: u64,
}

impl Default for LvmConfig {
    fn default() -> Self {
        LvmConfig {
            snapshot_share: default_lvm_share(),
            snapshot_floor_mib: default_lvm_floor_mib(),
        }
    }
}

fn default_lvm_share() -> f64 {
    0.1
}
fn default_lvm_floor_mib() -> u64 {
    512
}

/// Ceph settings passed explicitly on every `rbd` command (sshd passes no CEPH_* variables).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CephConfig {
    pub conf: String,
    pub id: String,
    pub keyring: String,
}

/// Where backups go and how they are protected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A directory, or `s3://bucket/prefix`.
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// File whose first line is the repository's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Command (`sh -c`) that prints the repository's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_command: Option<String>,
    /// Name of the environment variable holding the passphrase (never the passphrase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Without S3 credentials, take them from the cloud instance metadata service
    /// (off: a missing credential is an error naming the variables to set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub s3_instance_metadata: bool,
}

impl RepositoryConfig {
    /// The S3 settings of this repository (the endpoint from the config or
    /// `AWS_ENDPOINT_URL`; keys from the `AWS_*` variables).
    pub fn s3_options(&self) -> virtkeep_repo::S3Options {
        let endpoint = self
            .s3_endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        virtkeep_repo::S3Options {
            allow_http: endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
            endpoint,
            region: self.s3_region.clone(),
            access_key: None,
            secret_key: None,
            instance_metadata: self.s3_instance_metadata,
        }
    }
}

fn default_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_uri() -> String {
    "qemu:///system".into()
}

impl Config {
    pub fn host(&self, name: &str) -> Result<&HostConfig> {
        self.hosts.get(name).ok_or_else(|| {
            Error::config(format!("no host named {name:?} in the configuration"))
                .hint("add it with `virtkeep host add NAME --ssh USER@ADDRESS`; `virtkeep host list` shows the known ones")
        })
    }
}

impl HostConfig {
    /// The ssh target, with secrets resolved from the environment at the last moment.
    pub fn target(&self, node_known_hosts: &std::path::Path) -> Result<virtkeep_ssh::HostTarget> {
        use virtkeep_ssh::Auth;
        let auth = if let Some(var) = &self.password_env {
            let password = std::env::var(var).map_err(|_| {
                Error::config(format!("the password variable {var} is not set")).hint(format!(
                    "export {var}=… before running virtkeep, or use a key file"
                ))
            })?;
            Auth::Password { password }
        } else if let Some(path) = &self.identity {
            Auth::KeyFile {
                path: path.clone(),
                passphrase: None,
            }
        } else if self.agent.is_some() {
            Auth::Agent
        } else {
            return Err(Error::config("the host has no authentication method").hint(
                "give --identity KEYFILE, --password-env VAR or --agent to `virtkeep host add`",
            ));
        };
        Ok(virtkeep_ssh::HostTarget {
            host: self.address.clone(),
            port: self.port,
            user: self.user.clone(),
            auth,
            known_hosts: self
                .known_hosts
                .clone()
                .unwrap_or_else(|| node_known_hosts.to_path_buf()),
            sudo: self.sudo,
            connect_timeout: Duration::from_secs(15),
            keepalive: Duration::from_secs(10),
            max_handshakes: virtkeep_ssh::DEFAULT_MAX_HANDSHAKES,
            connect_retries: virtkeep_ssh::DEFAULT_CONNECT_RETRIES,
        })
    }

    /// The ceph arguments for `rbd` on this host, when it has Ceph settings.
    pub fn ceph_args(&self) -> Option<virtkeep_libvirt::rbd::CephArgs> {
        self.ceph.as_ref().map(|c| virtkeep_libvirt::rbd::CephArgs {
            conf: Some(c.conf.clone()),
            id: Some(c.id.clone()),
            keyring: Some(c.keyring.clone()),
        })
    }
}
