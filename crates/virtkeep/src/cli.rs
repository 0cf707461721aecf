//! Command-line arguments (the stable CLI contract of design.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "virtkeep",
    version,
    about = "Agentless backup and restore of libvirt VMs over SSH"
)]
pub struct Cli {
    /// Configuration file [default: $VIRTKEEP_CONFIG or ~/.config/virtkeep/config.toml]
    #[arg(long, global = true, env = "VIRTKEEP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output on stdout (stable, documented in docs/cli.md)
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Hypervisor hosts: add, trust, check, list
    #[command(subcommand)]
    Host(HostCommand),
    /// Virtual machines on the hosts
    #[command(subcommand)]
    Vm(VmCommand),
    /// Repositories
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Back up VMs (HOST/VM ...)
    Backup(BackupArgs),
    /// List the backups in the repository
    Snapshots(SnapshotsArgs),
    /// Restore a backup onto a host
    Restore(RestoreArgs),
    /// Check every chunk of one or all backups
    Verify(VerifyArgs),
    /// Remove backups by retention policy
    Prune(PruneArgs),
    /// Free chunks no backup references any more
    Gc(GcArgs),
    /// Return VMs to their own files and remove what killed jobs left on a host
    Cleanup(CleanupArgs),
    /// Run the policies' schedules, the job queue and the REST API until SIGTERM
    Daemon,
    /// Job history and state from the daemon's catalog
    Jobs(JobsArgs),
    /// Backup policies from the configuration file
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs in this state
    #[arg(long, value_enum)]
    pub status: Option<JobStatusArg>,
    /// Only jobs of HOST or HOST/VM
    pub filter: Option<String>,
    /// Only the jobs of this policy run
    #[arg(long)]
    pub run: Option<i64>,
    /// At most this many, newest first
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatusArg {
    Queued,
    Running,
    Succeeded,
    Failed,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Policies with their schedules, next and last runs
    List,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Add (or update) a host in the configuration
    Add(Box<HostAddArgs>),
    /// Show the host's key fingerprint and pin it in the known_hosts file
    Trust(HostTrustArgs),
    /// Preflight: tools, versions, permissions, each with pass/fail and the fix
    Check { name: String },
    /// List configured hosts
    List,
}

#[derive(Args, Debug)]
pub struct HostAddArgs {
    pub name: String,
    /// USER@ADDRESS[:PORT]
    #[arg(long)]
    pub ssh: String,
    /// Private key file
    #[arg(long, conflicts_with_all = ["password_env", "agent"])]
    pub identity: Option<PathBuf>,
    /// Name of the environment variable that holds the password
    #[arg(long)]
    pub password_env: Option<String>,
    /// Authenticate with the ssh-agent at $SSH_AUTH_SOCK
    #[arg(long)]
    pub agent: bool,
    /// known_hosts file for this host
    #[arg(long)]
    pub known_hosts: Option<PathBuf>,
    /// Run host commands through sudo -n
    #[arg(long)]
    pub sudo: bool,
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    #[arg(long, requires = "qemu_group")]
    pub qemu_user: Option<String>,
    #[arg(long, requires = "qemu_user")]
    pub qemu_group: Option<String>,
    #[arg(long, requires_all = ["ceph_id", "ceph_keyring"])]
    pub ceph_conf: Option<String>,
    #[arg(long)]
    pub ceph_id: Option<String>,
    #[arg(long)]
    pub ceph_keyring: Option<String>,
}

#[derive(Args, Debug)]
pub struct HostTrustArgs {
    pub name: String,
    /// Pin without asking when the host presents exactly this key (SHA256:…)
    #[arg(long)]
    pub fingerprint: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Every domain with its disks and the backup method that applies
    List { host: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Create a repository (a directory, or s3://bucket/prefix)
    Init(RepoInitArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// Repository location [default: the config file's, else ~/.local/share/virtkeep/repo]
    #[arg(long, global = true)]
    pub repo: Option<String>,
    /// Key file of an encrypted repository
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// Variable holding the passphrase of an encrypted repository
    #[arg(long, global = true)]
    pub passphrase_env: Option<String>,
}

#[derive(Args, Debug)]
pub struct RepoInitArgs {
    pub location: Option<String>,
    #[arg(long, value_enum, default_value = "none")]
    pub encryption: Encryption,
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    #[arg(long)]
    pub passphrase_env: Option<String>,
    /// Chunk size in MiB
    #[arg(long, default_value_t = 4)]
    pub chunk_size_mib: u64,
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Full,
    Incremental,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportArg {
    /// qemu-nbd on a private unix socket through the SSH connection (encrypted)
    Ssh,
    /// qemu-nbd on plain TCP from the host: UNENCRYPTED, for trusted networks only
    Netcat,
    /// dd of raw images through SSH, for hosts without qemu-nbd (reads every byte)
    Stream,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// HOST/VM (the VM name may contain any character but '/')
    #[arg(required = true)]
    pub vms: Vec<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Leave out this disk (target name, e.g. vdb); repeatable
    #[arg(long)]
    pub exclude_disk: Vec<String>,
    /// Freeze guest filesystems through the QEMU guest agent
    #[arg(long)]
    pub quiesce: bool,
    /// Command run on the host before the snapshot (sh -c); failing aborts the backup
    #[arg(long)]
    pub pre_snapshot: Option<String>,
    /// Command run on the host after the snapshot, also when the snapshot failed
    #[arg(long)]
    pub post_snapshot: Option<String>,
    #[arg(long, value_enum, default_value = "ssh")]
    pub transport: TransportArg,
    /// Parallel data connections per disk
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only backups of HOST or HOST/VM
    pub filter: Option<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Backup id (from `virtkeep snapshots`), a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// Host to restore onto
    #[arg(long, required_unless_present = "to_file")]
    pub to: Option<String>,
    /// Write one disk (--disk) to this file on this node instead, no hypervisor involved
    #[arg(long, value_name = "PATH", conflicts_with_all = ["to", "name", "storage", "owner", "define", "start", "dry_run"], requires = "disk")]
    pub to_file: Option<std::path::PathBuf>,
    /// Format of the --to-file file: raw (sparse) or qcow2
    #[arg(long, requires = "to_file", value_parser = ["raw", "qcow2"], default_value = "raw")]
    pub format: String,
    /// Check and print the plan (disks, destinations, XML changes); write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Define a domain whose XML passes arguments to QEMU (<qemu:commandline> …)
    #[arg(long)]
    pub allow_qemu_passthrough: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
    /// New domain name (gets a fresh UUID and MAC addresses)
    #[arg(long)]
    pub name: Option<String>,
    /// Where the disks go: file:/DIR (files), rbd:POOL (RBD disks into this pool) or
    /// lvm:VG (every disk into a new logical volume); each disk's own place otherwise
    #[arg(long)]
    pub storage: Option<String>,
    /// USER:GROUP of the restored files
    #[arg(long)]
    pub owner: Option<String>,
    /// Restore only this disk (repeatable); with --force it may overwrite the VM's own file
    #[arg(long)]
    pub disk: Vec<String>,
    /// Define the domain on the host
    #[arg(long)]
    pub define: bool,
    /// Start it (implies --define)
    #[arg(long)]
    pub start: bool,
    /// Overwrite existing files, and a shut-off domain of the same name
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest; every backup when omitted
    pub snapshot: Option<String>,
    #[arg(long, conflicts_with = "snapshot")]
    pub all: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long)]
    pub keep_last: Option<u32>,
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    #[arg(long)]
    pub keep_daily: Option<u32>,
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    #[arg(long)]
    pub keep_yearly: Option<u32>,
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Chunks younger than this many hours are kept even when unreferenced
    #[arg(long, default_value_t = 24)]
    pub grace_hours: u64,
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    pub host: String,
    /// Only this VM (name or UUID); every VM of the host otherwise
    #[arg(long)]
    pub vm: Option<String>,
    #[arg(long)]
    pub dry_run: bool,
}
