//! Command-line arguments (the stable CLI contract of design.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use virtkeep_engine::plan::{ModeRequest, Transport};

#[derive(Parser, Debug)]
#[command(
    name = "virtkeep",
    version,
    about = "Agentless backup and restore of libvirt VMs over SSH"
)]
pub struct Cli {
    /// Configuration file [default: $VIRTKEEP_CONFIG, else /etc/virtkeep/config.toml for
    /// root and the virtkeep user, ~/.config/virtkeep/config.toml for others]
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
    /// Remove one or more backups (refuses protected ones); `gc` frees their chunks
    Forget(SnapshotIdsArgs),
    /// Protect backups from forget and prune
    Protect(SnapshotIdsArgs),
    /// Remove the protection of backups
    Unprotect(SnapshotIdsArgs),
    /// Free chunks no backup references any more
    Gc(GcArgs),
    /// Copy backups into another repository, sending only the chunks it lacks
    Sync(SyncArgs),
    /// Repository size, deduplication ratio and backups per VM
    Stats(StatsArgs),
    /// Return VMs to their own files and remove what killed jobs left on a host
    Cleanup(CleanupArgs),
    /// Run the policies' schedules, the job queue and the REST API until SIGTERM
    Daemon,
    /// Job history and state from the daemon's catalog
    Jobs(JobsArgs),
    /// The daemon nodes sharing the catalog: heartbeat, running jobs, which one leads
    Nodes,
    /// Backup policies from the configuration file
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Serve the disks of a backup read-only over NBD on a unix socket (Ctrl-C ends it)
    ServeNbd(ServeNbdArgs),
    /// Mount a backup read-only with FUSE: DIR/DISK.img per disk (Ctrl-C or umount ends it)
    Mount(MountArgs),
    /// Look inside backups without restoring them: disks, partitions, filesystems
    #[command(subcommand)]
    Files(FilesCommand),
    /// Print the shell completion script (e.g. `virtkeep completions bash >
    /// /etc/bash_completion.d/virtkeep`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (virtkeep.1, virtkeep-backup.1, …) into DIR
    Man { dir: PathBuf },
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
    Cancelled,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Policies with their schedules, next and last runs
    List,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Add a host, or update what is given of an existing one
    Add(Box<HostAddArgs>),
    /// Remove a host from the configuration (its pinned key stays in known_hosts)
    Remove { name: String },
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
    /// USER@ADDRESS[:PORT] (needed for a new host)
    #[arg(long)]
    pub ssh: Option<String>,
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
    /// Run host commands through sudo -n (the user needs passwordless sudo for every command)
    #[arg(long, conflicts_with = "no_sudo")]
    pub sudo: bool,
    /// Run host commands as the SSH user (undoes --sudo)
    #[arg(long)]
    pub no_sudo: bool,
    /// [default for a new host: qemu:///system]
    #[arg(long)]
    pub libvirt_uri: Option<String>,
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
    /// Create a repository (a directory, or s3://bucket/prefix), encrypted by default
    Init(RepoInitArgs),
    /// The repository's key: export a copy, import one, change the password or key file
    #[command(subcommand)]
    Key(RepoKeyCommand),
    /// Upgrade the repository to format v2 (authenticated metadata; chunks unchanged)
    Upgrade(RepoUpgradeArgs),
}

#[derive(Args, Debug)]
pub struct RepoUpgradeArgs {
    /// (--key-file, unencrypted: the key file to authenticate the metadata with from now
    /// on, created when it does not exist [default: the configured one, else
    /// keys/repo-XXXXXXXX.key beside the config file])
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct RepoKeyImportArgs {
    /// A key file written by `repo key export` (or copied) on another node
    pub file: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Subcommand, Debug)]
pub enum RepoKeyCommand {
    /// Write the repository's key to a new file: the wrapped master key (its `config`
    /// object) when encrypted, a copy of the key file that authenticates it otherwise
    Export(RepoKeyExportArgs),
    /// Keep a copy of a repository's key file on this node and name it in the config
    Import(RepoKeyImportArgs),
    /// Re-wrap the master key with a new password or key file
    ChangePassphrase(RepoKeyChangeArgs),
}

#[derive(Args, Debug)]
pub struct RepoKeyExportArgs {
    /// File to create (mode 0600; an existing file is not overwritten)
    pub file: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct RepoKeyChangeArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Unlock with this key file from now on (created when it does not exist)
    #[arg(long, conflicts_with_all = ["new_password_file", "new_password_command"])]
    pub new_key_file: Option<PathBuf>,
    /// Unlock with the password in this file from now on
    #[arg(long, conflicts_with = "new_password_command")]
    pub new_password_file: Option<PathBuf>,
    /// Unlock with the password this command prints from now on
    #[arg(long)]
    pub new_password_command: Option<String>,
}

/// The repository and its key. The key is taken from the first of: --key-file,
/// --password-file, --password-command, --passphrase-env; else from the config file;
/// else asked for on a terminal.
#[derive(Args, Debug, Clone, Default)]
pub struct RepoArgs {
    /// Repository location [default: the config file's, else ~/.local/share/virtkeep/repo]
    #[arg(long, global = true, env = "VIRTKEEP_REPOSITORY")]
    pub repo: Option<String>,
    /// Key file of the repository (encrypted: unlocks it; unencrypted: authenticates its
    /// manifests and indexes)
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// File whose first line is the repository's password
    #[arg(long, global = true, env = "VIRTKEEP_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Command (sh -c) that prints the repository's password
    #[arg(long, global = true, env = "VIRTKEEP_PASSWORD_COMMAND")]
    pub password_command: Option<String>,
    /// Variable holding the passphrase of an encrypted repository
    #[arg(long, global = true)]
    pub passphrase_env: Option<String>,
}

#[derive(Args, Debug)]
pub struct RepoInitArgs {
    pub location: Option<String>,
    /// `none` for a repository anyone who can read it can read
    #[arg(long, value_enum, default_value = "aes-256-gcm")]
    pub encryption: Encryption,
    /// Key file to create [default: keys/repo-XXXXXXXX.key beside the config file,
    /// unless a password option is given]
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// File whose first line is the password
    #[arg(long, env = "VIRTKEEP_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Command (sh -c) that prints the password
    #[arg(long, env = "VIRTKEEP_PASSWORD_COMMAND")]
    pub password_command: Option<String>,
    #[arg(long)]
    pub passphrase_env: Option<String>,
    /// Chunk size in MiB
    #[arg(long, default_value_t = 4)]
    pub chunk_size_mib: u64,
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Share the chunk-id and encryption keys of this repository (a name from
    /// [repositories] or a location), so `sync` copies chunks without re-encoding; the
    /// chunk size is taken from it
    #[arg(long, value_name = "REPO")]
    pub copy_keys_from: Option<String>,
    /// Key file of the --copy-keys-from repository, when the configuration has none
    #[arg(long, value_name = "FILE", requires = "copy_keys_from")]
    pub copy_keys_key_file: Option<PathBuf>,
    /// S3 only: chunks, indexes and manifests get Object Lock retention in this mode, so
    /// the repository's own credentials cannot destroy a backup; a missing bucket is
    /// created with Object Lock, an existing one must have it. Prune with --keep-within
    #[arg(long, value_enum, value_name = "MODE", requires = "retain")]
    pub object_lock: Option<ObjectLockMode>,
    /// With --object-lock: how long each object is retained from when it is written or
    /// reused by a backup (e.g. 30d, 6mo, 1y; at least the 1 h GC grace period)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "object_lock")]
    pub retain: Option<time::Duration>,
}

/// `repo init --object-lock`: S3 Object Lock retention mode.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectLockMode {
    /// Deletable before the end only with s3:BypassGovernanceRetention
    Governance,
    /// Nobody can delete a version before its retention ends
    Compliance,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// HOST or HOST/VM whose backups to copy [default: every backup]
    pub selection: Vec<String>,
    /// Source repository: a name from [repositories], or a location
    #[arg(long, value_name = "REPO")]
    pub from: String,
    /// Destination repository: a name from [repositories], or a location
    #[arg(long, value_name = "REPO")]
    pub to: String,
    /// Key file of the source, when the configuration has none for it
    #[arg(long, value_name = "FILE")]
    pub from_key_file: Option<PathBuf>,
    /// Key file of the destination, when the configuration has none for it
    #[arg(long, value_name = "FILE")]
    pub to_key_file: Option<PathBuf>,
    /// Only the newest N backups of each VM
    #[arg(long, value_name = "N")]
    pub latest: Option<usize>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// HOST/VM (the VM name may contain any character but '/')
    #[arg(required = true)]
    pub vms: Vec<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ModeRequest,
    /// Leave nothing on the host for the next incremental (no checkpoint, RBD or thin LVM
    /// snapshot, or kept overlay); the next backup is then a full, and says why
    #[arg(long)]
    pub no_keep_base: bool,
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
    pub transport: Transport,
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
    /// Times in UTC instead of the local time zone
    #[arg(long)]
    pub utc: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotIdsArgs {
    /// Backup ids (from `virtkeep snapshots`)
    #[arg(required = true)]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Backup id (from `virtkeep snapshots`), a unique prefix of it, or HOST/VM@latest
    #[arg(required_unless_present = "resume")]
    pub snapshot: Option<String>,
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
    /// Run the VM from the repository at once (qcow2 overlays over the backup, served
    /// through the SSH connection) while its data is copied into its disks (placed as by
    /// a restore with the same --name and --storage); needs --name and --to
    #[arg(long, requires_all = ["name", "to"], conflicts_with_all = ["to_file", "dry_run", "owner", "disk", "force"])]
    pub live: bool,
    /// With --live: hand the restore to the daemon (`virtkeep daemon`, the configuration's
    /// catalog) and return once the domain runs; the daemon copies the disks (follow it
    /// with `virtkeep jobs`)
    #[arg(long, requires = "live")]
    pub detach: bool,
    /// Finish a live restore whose node died after its domain started (JOB as `cleanup`
    /// reports it, live-…): serve the backup again, resume the domain, copy and pivot its
    /// disks; needs --to and the repository it ran from
    #[arg(long, value_name = "JOB", requires = "to", conflicts_with_all = [
        "snapshot", "live", "detach", "to_file", "dry_run", "name", "storage", "owner", "disk",
        "define", "start", "force", "allow_qemu_passthrough",
    ])]
    pub resume: Option<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest; every backup when omitted
    pub snapshot: Option<String>,
    #[arg(long, conflicts_with = "snapshot")]
    pub all: bool,
    /// Download and check every chunk (default: check that manifests and indexes read
    /// and authenticate and that every chunk they name exists, downloading no chunk)
    #[arg(long)]
    pub read_data: bool,
    #[command(flatten)]
    pub boot: VerifyBootArgs,
    #[command(flatten)]
    pub repo: RepoArgs,
}

/// `verify SNAPSHOT --boot --to HOST`: boot the backup from the repository (issue 20).
#[derive(Args, Debug)]
pub struct VerifyBootArgs {
    /// Boot the backup on --to HOST as a transient domain over the repository (nothing
    /// is copied, the repository is not written) and check that it keeps running
    #[arg(long, requires = "to", requires = "snapshot", conflicts_with_all = ["all", "read_data"])]
    pub boot: bool,
    /// The host to boot on (with --boot)
    #[arg(long, requires = "boot")]
    pub to: Option<String>,
    /// How long the guest must keep running, in seconds (with --boot)
    #[arg(long, requires = "boot", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: u64,
    /// A regular expression the guest's serial output must match (with --boot)
    #[arg(long, requires = "boot")]
    pub expect_serial: Option<String>,
    /// The guest agent must answer guest-ping within the timeout (with --boot; the
    /// verification domain gets a guest-agent channel)
    #[arg(long, requires = "boot")]
    pub agent: bool,
    /// Write report.json, serial.log and the screenshot into this directory (with --boot)
    #[arg(long, requires = "boot")]
    pub report_dir: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only the backups of HOST or HOST/VM (each VM is pruned on its own either way)
    pub filter: Option<String>,
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
    /// Keep every backup taken within DURATION of the VM's newest one (e.g. 7d, 2w,
    /// 1y6mo, 36h; mo = 30 days, y = 365 days). Recommended for Object Lock repositories:
    /// counts (--keep-last…) can be used up by an attacker who adds backups
    #[arg(long, value_parser = parse_duration)]
    pub keep_within: Option<time::Duration>,
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Only the VMs of HOST or HOST/VM in the per-VM table
    pub filter: Option<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
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

/// `1y6mo2w3d12h`: years of 365 days, months of 30 days (`mo`), weeks, days, hours.
/// A bare `m` is refused: it reads as minutes (the daemon's schedules) as easily as
/// months, and a retention off by a factor of 43 200 is not a typo to guess at.
pub fn parse_duration(s: &str) -> Result<time::Duration, String> {
    let bad = || {
        format!(
            "{s:?}: expected a duration such as 7d, 2w, 6mo, 1y6mo or 36h (units h, d, w, \
             mo = 30 days, y = 365 days; `m` is ambiguous: write `mo` for months)"
        )
    };
    let mut total = time::Duration::ZERO;
    let mut digits = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let hours = match c {
            'y' => 365 * 24,
            'm' if chars.next_if_eq(&'o').is_some() => 30 * 24,
            'w' => 7 * 24,
            'd' => 24,
            'h' => 1,
            _ => return Err(bad()),
        };
        let part = n
            .checked_mul(hours)
            .filter(|h| *h <= 1_000_000)
            .ok_or_else(bad)?;
        total += time::Duration::hours(part);
        digits.clear();
    }
    if !digits.is_empty() || total.is_zero() {
        return Err(bad());
    }
    Ok(total)
}

#[derive(Args, Debug)]
pub struct ServeNbdArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// Unix socket to create (must not exist; removed when the server ends); one export
    /// per disk, named by its target (`nbd+unix:///vda?socket=PATH`)
    #[arg(long)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// Existing empty directory to mount on
    pub dir: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Subcommand, Debug)]
pub enum FilesCommand {
    /// Disks of a backup with their partitions and filesystems, or one directory
    Ls(FilesLsArgs),
    /// Copy a file or directory tree out of a backup (ext2/3/4), without restoring it
    Get(FilesGetArgs),
    /// Paths whose name matches a glob, under a filesystem of a backup (ext2/3/4)
    Find(FilesFindArgs),
}

#[derive(Args, Debug)]
pub struct FilesFindArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// Where to search: DISK:PART or DISK (the filesystem's root), or DISK[:PART]:/PATH
    pub target: String,
    /// Shell glob on the name: *, ?, [abc], [a-z], [!a]; quote it for the shell
    pub pattern: String,
    /// Fail when the walk takes longer than this many seconds (default 600)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct FilesLsArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// A directory to list: DISK:PART:/PATH (e.g. vda:1:/etc) or DISK:/PATH for a
    /// filesystem on the whole disk (ext2/3/4 so far); without it, the disks' layout
    pub target: Option<String>,
    /// Long listing: type and mode, owner, size, time, symlink target
    #[arg(short = 'l', long)]
    pub long: bool,
    /// Fail when the walk takes longer than this many seconds (default 600)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Args, Debug)]
pub struct FilesGetArgs {
    /// Backup id, a unique prefix of it, or HOST/VM@latest
    pub snapshot: String,
    /// What to copy: DISK:PART:/PATH or DISK:/PATH (a file, a symlink or a directory)
    pub target: String,
    /// Local directory to copy into (created if missing); /PATH lands as LOCALDIR/NAME
    #[arg(long, value_name = "LOCALDIR")]
    pub to: PathBuf,
    /// Replace existing files and symlinks, and write into existing directories
    #[arg(long)]
    pub overwrite: bool,
    /// Fail after copying this many entries
    #[arg(long, default_value_t = virtkeep_files::DEFAULT_MAX_ENTRIES)]
    pub max_entries: u64,
    /// Fail when the copy takes longer than this many seconds (default 21600)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;

    /// `90m` was 90 months of 30 days where a reader (and the daemon's schedules) sees
    /// 90 minutes: refused, with `mo` in the hint; `mo` is months.
    #[test]
    fn months_must_be_spelled_mo() {
        for s in ["90m", "1y6m", "6m2d"] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains("`mo`"), "{e}");
        }
        assert_eq!(parse_duration("6mo"), Ok(time::Duration::days(180)));
        assert_eq!(
            parse_duration("1y6mo2w3d12h"),
            Ok(time::Duration::hours((365 + 180 + 14 + 3) * 24 + 12))
        );
        for s in ["", "7", "d", "5x", "3mon", "0d"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}

#[cfg(test)]
mod restore_args_tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// `--detach` belongs to `--live`: refused without it, parsed with it.
    #[test]
    fn detach_needs_live() {
        let base = ["virtkeep", "restore", "abc", "--to", "lab", "--name", "new"];
        let without = Cli::try_parse_from(base.iter().chain(&["--detach"]));
        let e = without.expect_err("--detach without --live");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let with = Cli::try_parse_from(base.iter().chain(&["--live", "--detach"]));
        match with.expect("--live --detach").command {
            Command::Restore(a) => assert!(a.live && a.detach),
            other => panic!("{other:?}"),
        }
    }

    /// `--resume JOB` takes the place of the backup id, needs `--to` and goes with no
    /// other restore option.
    #[test]
    fn resume_needs_to_and_nothing_else() {
        let ok = Cli::try_parse_from(["virtkeep", "restore", "--resume", "live-1", "--to", "lab"]);
        match ok.expect("--resume --to").command {
            Command::Restore(a) => {
                assert_eq!(a.resume.as_deref(), Some("live-1"));
                assert_eq!(a.snapshot, None);
            }
            _ => panic!("not restore"),
        }
        for bad in [
            &["--resume", "live-1"][..],
            &["abc", "--resume", "live-1", "--to", "lab"],
            &["--resume", "live-1", "--to", "lab", "--live", "--name", "n"],
            &["--resume", "live-1", "--to", "lab", "--storage", "lvm:vg"],
            &[],
        ] {
            let args = ["virtkeep", "restore"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }
}
