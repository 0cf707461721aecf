//! `virsh`: the [`Virsh`] builders and the parsers of their output.
//!
//! Domains are passed as `--domain X` (virsh would read a leading `-` of a positional
//! as an option; the value of an option never is). Domains can be named by name, UUID
//! or numeric id; virsh tries id, then UUID, then name, so a domain *named* `5` is
//! better addressed by its UUID.

use std::fmt;

use virtkeep_ssh::RemoteCommand;

use crate::error::{ParseError, XmlError};
use crate::support::{escape_commas, truncate, unexpected};
use crate::xml::Doc;

/// `virsh -c URI …` builders, with `LC_ALL=C` so table output is parseable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virsh {
    uri: String,
}

/// What `virsh undefine` also removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UndefineOptions {
    /// `--nvram`: also delete the UEFI variable file.
    pub nvram: bool,
    /// `--keep-nvram`: keep it (libvirt refuses to undefine a UEFI domain without
    /// one of the two).
    pub keep_nvram: bool,
    /// `--snapshots-metadata`.
    pub snapshots_metadata: bool,
    /// `--checkpoints-metadata`.
    pub checkpoints_metadata: bool,
}

impl Virsh {
    /// Builders for the libvirt connection `uri` (`qemu:///system`, `xen:///system`).
    pub fn new(uri: impl Into<String>) -> Virsh {
        Virsh { uri: uri.into() }
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `LC_ALL=C virsh -c URI SUBCOMMAND`, for the builders below.
    fn command(&self, subcommand: &str) -> RemoteCommand {
        RemoteCommand::new("virsh")
            .env("LC_ALL", "C")
            .arg("-c")
            .arg(&self.uri)
            .arg(subcommand)
    }

    fn dom(&self, subcommand: &str, dom: &str) -> RemoteCommand {
        self.command(subcommand).arg("--domain").arg(dom)
    }

    /// `virsh list --all --name`: every domain, one name per line.
    pub fn list_all_names(&self) -> RemoteCommand {
        self.command("list").args(["--all", "--name"])
    }

    /// `virsh dumpxml --domain DOM [--inactive] --security-info`.
    ///
    /// Always with `--security-info`: virtkeep redefines domains from what it read
    /// (stopped VMs on overlays, healing, restore), and without it libvirt leaves out
    /// the VNC/SPICE passwords, so a redefinition would silently drop them.
    pub fn dumpxml(&self, dom: &str, inactive: bool) -> RemoteCommand {
        let c = self.dom("dumpxml", dom);
        let c = if inactive { c.arg("--inactive") } else { c };
        c.arg("--security-info")
    }

    /// `virsh domstate --domain DOM`.
    pub fn domstate(&self, dom: &str) -> RemoteCommand {
        self.dom("domstate", dom)
    }

    /// `virsh domuuid --domain DOM`. virsh reads DOM as an id first, then as a UUID,
    /// then as a name: to look a domain up by name, check the answer with
    /// [`Virsh::domname`] (the engine's `Vm::find_uuid` does).
    pub fn domuuid(&self, dom: &str) -> RemoteCommand {
        self.dom("domuuid", dom)
    }

    /// `virsh domname --domain DOM` (DOM a UUID: never read as an id or a name).
    pub fn domname(&self, dom: &str) -> RemoteCommand {
        self.dom("domname", dom)
    }

    /// One external disk-only snapshot of all `overlays` at one instant:
    /// `virsh snapshot-create-as --domain DOM --name NAME --disk-only --atomic
    /// --no-metadata [--quiesce] --diskspec vda,snapshot=external,file=PATH …
    /// --diskspec vdc,snapshot=no …`. Commas in targets and paths are doubled.
    pub fn snapshot_create_disk_only(
        &self,
        dom: &str,
        snap_name: &str,
        overlays: &[(&str, &str)],
        excluded: &[&str],
        quiesce: bool,
    ) -> RemoteCommand {
        let mut c = self
            .dom("snapshot-create-as", dom)
            .arg("--name")
            .arg(snap_name)
            .args(["--disk-only", "--atomic", "--no-metadata"]);
        if quiesce {
            c = c.arg("--quiesce");
        }
        for (target, path) in overlays {
            c = c.arg("--diskspec").arg(format!(
                "{},snapshot=external,file={}",
                escape_commas(target),
                escape_commas(path)
            ));
        }
        for target in excluded {
            c = c
                .arg("--diskspec")
                .arg(format!("{},snapshot=no", escape_commas(target)));
        }
        c
    }

    /// Merge the active overlay back into its base and switch the VM to the base:
    /// `virsh blockcommit --domain DOM --path TARGET --base BASE --active --pivot --wait`.
    /// (`--base` stops the commit at the image the overlay was put on: without it
    /// libvirt flattens the whole chain; `--pivot` needs `--active`; `--wait` makes virsh
    /// return only when the job is done; `--delete` is deliberately not used: virtkeep
    /// removes its overlay itself after checking the pivot happened.)
    pub fn blockcommit_active_pivot(&self, dom: &str, target: &str, base: &str) -> RemoteCommand {
        self.dom("blockcommit", dom)
            .arg("--path")
            .arg(target)
            .arg("--base")
            .arg(base)
            .args(["--active", "--pivot", "--wait"])
    }

    /// `virsh blockjob --domain DOM --path TARGET --abort`.
    pub fn blockjob_abort(&self, dom: &str, target: &str) -> RemoteCommand {
        self.dom("blockjob", dom)
            .arg("--path")
            .arg(target)
            .arg("--abort")
    }

    /// `virsh blockjob --domain DOM --path TARGET --pivot`: finish a commit that is
    /// ready (e.g. one left behind by a killed run).
    pub fn blockjob_pivot(&self, dom: &str, target: &str) -> RemoteCommand {
        self.dom("blockjob", dom)
            .arg("--path")
            .arg(target)
            .arg("--pivot")
    }

    /// `virsh define --file XML_PATH`.
    pub fn define(&self, xml_path: &str) -> RemoteCommand {
        self.command("define").arg("--file").arg(xml_path)
    }

    /// `virsh undefine --domain DOM [--nvram|--keep-nvram] [--snapshots-metadata]
    /// [--checkpoints-metadata]`.
    pub fn undefine(&self, dom: &str, opts: UndefineOptions) -> RemoteCommand {
        let mut c = self.dom("undefine", dom);
        if opts.nvram {
            c = c.arg("--nvram");
        } else if opts.keep_nvram {
            c = c.arg("--keep-nvram");
        }
        if opts.snapshots_metadata {
            c = c.arg("--snapshots-metadata");
        }
        if opts.checkpoints_metadata {
            c = c.arg("--checkpoints-metadata");
        }
        c
    }

    /// `virsh create --file XML_PATH`: start a transient domain (gone once destroyed).
    pub fn create(&self, xml_path: &str) -> RemoteCommand {
        self.command("create").arg("--file").arg(xml_path)
    }

    /// `virsh qemu-agent-command --domain DOM --timeout SECS '{"execute":"guest-ping"}'`:
    /// answers `{"return":{}}` when the guest agent runs; fails after SECS otherwise.
    pub fn agent_ping(&self, dom: &str, timeout_secs: u32) -> RemoteCommand {
        self.dom("qemu-agent-command", dom)
            .arg("--timeout")
            .arg(timeout_secs.max(1).to_string())
            .arg(r#"{"execute":"guest-ping"}"#)
    }

    /// `virsh screenshot --domain DOM --file PATH`: the guest's display as an image.
    pub fn screenshot(&self, dom: &str, path: &str) -> RemoteCommand {
        self.dom("screenshot", dom).arg("--file").arg(path)
    }

    /// `virsh blockcopy --domain DOM --path TARGET --xml XML --reuse-external
    /// --transient-job [--bandwidth N --bytes]`: start mirroring the disk into the
    /// existing destination that the `<disk>` in file `xml_path` describes; returns once
    /// the job runs. Once the job is ready (`<mirror ready='yes'>` in the live XML),
    /// [`Virsh::blockjob_pivot`] switches the guest to the destination.
    /// `--transient-job` is what libvirt 9 needs for a persistent domain; it still
    /// updates the persistent definition on the pivot.
    pub fn blockcopy(
        &self,
        dom: &str,
        target: &str,
        xml_path: &str,
        bytes_per_sec: Option<u64>,
    ) -> RemoteCommand {
        let c = self
            .dom("blockcopy", dom)
            .arg("--path")
            .arg(target)
            .arg("--xml")
            .arg(xml_path)
            .arg("--reuse-external")
            .arg("--transient-job");
        with_bandwidth(c, bytes_per_sec)
    }

    /// `virsh blockjob --domain DOM --path TARGET --info --raw`: one ` type=…` line and
    /// the job's numbers when a block job runs on TARGET, nothing when none does.
    pub fn blockjob_info(&self, dom: &str, target: &str) -> RemoteCommand {
        self.dom("blockjob", dom)
            .arg("--path")
            .arg(target)
            .args(["--info", "--raw"])
    }

    /// `virsh blockjob --domain DOM --path TARGET --bandwidth N --bytes`: the running
    /// job's speed limit in bytes per second (0: none).
    pub fn blockjob_bandwidth(&self, dom: &str, target: &str, bytes_per_sec: u64) -> RemoteCommand {
        self.dom("blockjob", dom)
            .arg("--path")
            .arg(target)
            .arg("--bandwidth")
            .arg(bytes_per_sec.to_string())
            .arg("--bytes")
    }

    /// `virsh domstate --domain DOM --reason`: e.g. `paused (I/O error)`.
    pub fn domstate_reason(&self, dom: &str) -> RemoteCommand {
        self.dom("domstate", dom).arg("--reason")
    }

    /// `virsh start --domain DOM`.
    pub fn start(&self, dom: &str) -> RemoteCommand {
        self.dom("start", dom)
    }

    /// `virsh destroy --domain DOM` (hard power-off).
    pub fn destroy(&self, dom: &str) -> RemoteCommand {
        self.dom("destroy", dom)
    }

    /// `virsh checkpoint-list --domain DOM --name`.
    pub fn checkpoint_list(&self, dom: &str) -> RemoteCommand {
        self.dom("checkpoint-list", dom).arg("--name")
    }

    /// `virsh checkpoint-delete --domain DOM --checkpointname NAME [--metadata]`.
    pub fn checkpoint_delete(&self, dom: &str, name: &str, metadata_only: bool) -> RemoteCommand {
        let c = self
            .dom("checkpoint-delete", dom)
            .arg("--checkpointname")
            .arg(name);
        if metadata_only {
            c.arg("--metadata")
        } else {
            c
        }
    }

    /// `virsh backup-begin --domain DOM --backupxml B [--checkpointxml C]`.
    pub fn backup_begin(
        &self,
        dom: &str,
        backup_xml_path: &str,
        checkpoint_xml_path: Option<&str>,
    ) -> RemoteCommand {
        let c = self
            .dom("backup-begin", dom)
            .arg("--backupxml")
            .arg(backup_xml_path);
        match checkpoint_xml_path {
            Some(p) => c.arg("--checkpointxml").arg(p),
            None => c,
        }
    }

    /// `virsh domjobabort --domain DOM` (ends a pull-mode backup job).
    pub fn domjobabort(&self, dom: &str) -> RemoteCommand {
        self.dom("domjobabort", dom)
    }

    /// `virsh domfsfreeze --domain DOM`.
    pub fn domfsfreeze(&self, dom: &str) -> RemoteCommand {
        self.dom("domfsfreeze", dom)
    }

    /// `virsh domfsthaw --domain DOM`.
    pub fn domfsthaw(&self, dom: &str) -> RemoteCommand {
        self.dom("domfsthaw", dom)
    }

    /// `virsh qemu-agent-command --domain DOM --timeout SECS '{"execute":"guest-ping"}'`:
    /// succeeds with `{"return":{}}` when the guest agent answers.
    pub fn qemu_agent_ping(&self, dom: &str, timeout_secs: u32) -> RemoteCommand {
        self.dom("qemu-agent-command", dom)
            .arg("--timeout")
            .arg(timeout_secs.to_string())
            .arg(r#"{"execute":"guest-ping"}"#)
    }

    /// `virsh list --all --uuid`: every domain, addressed by UUID.
    pub fn list_all_uuids(&self) -> RemoteCommand {
        self.command("list").args(["--all", "--uuid"])
    }

    /// `virsh list --uuid`: the running (active) domains.
    pub fn list_active_uuids(&self) -> RemoteCommand {
        self.command("list").arg("--uuid")
    }

    /// One virsh process for what [`Virsh::describe`] asks three for, plus the
    /// domain's checkpoints: `virsh -c URI 'dumpxml …; echo MARK; dumpxml --inactive …;
    /// echo MARK; checkpoint-list …; echo MARK; domstate …'`. Each virsh start costs a
    /// connection to libvirtd (~25 ms), and this runs before every backup.
    ///
    /// The script is one argument that virsh splits into words itself, so only a
    /// [`DomainUuid`] and the mark (hex digits) go into it. `mark` separates the answers
    /// (split with [`parse_described`]); it is random per call, so no XML can end a part
    /// early. virsh runs every command of a script and exits with the last one's
    /// status (`domstate`): a failed `checkpoint-list` (Xen) leaves its part empty.
    pub fn describe_uuid(&self, uuid: &DomainUuid, mark: u128) -> RemoteCommand {
        let (u, m) = (uuid.as_str(), DescribeMark(mark));
        let script = format!(
            "dumpxml --domain {u} --security-info; echo {m}; \
             dumpxml --domain {u} --inactive --security-info; echo {m}; \
             checkpoint-list --domain {u} --name; echo {m}; domstate --domain {u}"
        );
        RemoteCommand::new("virsh")
            .env("LC_ALL", "C")
            .arg("-c")
            .arg(&self.uri)
            .arg(script)
    }

    /// `domjobabort`, then `checkpoint-delete` of `checkpoint`, in one virsh process (a
    /// virsh start costs ~40 ms of every backup). Built like [`Virsh::describe_uuid`]:
    /// virsh runs both and exits with the delete's status; the abort's failure (no job
    /// left) does not stop the delete.
    pub fn abort_job_then_delete_checkpoint(
        &self,
        uuid: &DomainUuid,
        checkpoint: &CheckpointName,
    ) -> RemoteCommand {
        let (u, c) = (uuid.as_str(), checkpoint.as_str());
        let script = format!(
            "domjobabort --domain {u}; checkpoint-delete --domain {u} --checkpointname {c}"
        );
        RemoteCommand::new("virsh")
            .env("LC_ALL", "C")
            .arg("-c")
            .arg(&self.uri)
            .arg(script)
    }

    /// `virsh dumpxml --domain DOM --security-info`, a NUL, the same with `--inactive`,
    /// a NUL, then `virsh domstate --domain DOM`: a domain's two definitions and its
    /// state in one round trip (XML cannot hold a NUL). Split with [`parse_describe`].
    pub fn describe(&self, dom: &str) -> RemoteCommand {
        let nul = || RemoteCommand::new("printf").arg("\\0");
        self.dumpxml(dom, false)
            .and_then(nul())
            .and_then(self.dumpxml(dom, true))
            .and_then(nul())
            .and_then(self.domstate(dom))
    }

    /// `virsh domblkinfo --domain DOM --all`: capacity and allocation of every disk
    /// (see [`parse_domblkinfo_all`]).
    pub fn domblkinfo_all(&self, dom: &str) -> RemoteCommand {
        self.dom("domblkinfo", dom).arg("--all")
    }

    /// `virsh suspend --domain DOM` (pause the vCPUs).
    pub fn suspend(&self, dom: &str) -> RemoteCommand {
        self.dom("suspend", dom)
    }

    /// `virsh resume --domain DOM`.
    pub fn resume(&self, dom: &str) -> RemoteCommand {
        self.dom("resume", dom)
    }

    /// `virsh start --domain DOM --paused`: a stopped VM's QEMU, with no guest code
    /// running (for a pull-mode backup of a stopped VM).
    pub fn start_paused(&self, dom: &str) -> RemoteCommand {
        self.dom("start", dom).arg("--paused")
    }

    /// Merge the overlay `top` of disk `target` down into `base` while the VM runs:
    /// `virsh blockcommit --domain DOM --path TARGET --top TOP --base BASE --wait`.
    pub fn blockcommit(&self, dom: &str, target: &str, top: &str, base: &str) -> RemoteCommand {
        self.dom("blockcommit", dom)
            .arg("--path")
            .arg(target)
            .arg("--top")
            .arg(top)
            .arg("--base")
            .arg(base)
            .arg("--wait")
    }

    /// `virsh backup-dumpxml --domain DOM`: the running backup job's definition.
    pub fn backup_dumpxml(&self, dom: &str) -> RemoteCommand {
        self.dom("backup-dumpxml", dom)
    }

    /// `virsh secret-dumpxml --secret UUID` (succeeds when libvirt has the secret).
    pub fn secret_dumpxml(&self, uuid: &str) -> RemoteCommand {
        self.command("secret-dumpxml").arg("--secret").arg(uuid)
    }

    /// `virsh help --command NAME`: succeeds when this virsh has the subcommand.
    pub fn help(&self, name: &str) -> RemoteCommand {
        self.command("help").arg("--command").arg(name)
    }

    /// `virsh version --daemon` (see [`parse_virsh_version`]).
    pub fn version(&self) -> RemoteCommand {
        self.command("version").arg("--daemon")
    }

    /// `virsh domcapabilities [--virttype T]` (see
    /// [`parse_domcapabilities_backup_supported`]).
    pub fn domcapabilities(&self, virttype: Option<&str>) -> RemoteCommand {
        let c = self.command("domcapabilities");
        match virttype {
            Some(t) => c.arg("--virttype").arg(t),
            None => c,
        }
    }

    /// `virsh domcapabilities --virttype TYPE [--arch ARCH]`: what libvirt offers a
    /// domain of that type and architecture (its `<path>` is the emulator). `None` when
    /// either is not a plain word (they come from a backup's XML: never an option).
    pub fn domcapabilities_for(&self, virttype: &str, arch: Option<&str>) -> Option<RemoteCommand> {
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !word(virttype) || arch.is_some_and(|a| !word(a)) {
            return None;
        }
        let c = self
            .command("domcapabilities")
            .arg("--virttype")
            .arg(virttype);
        Some(match arch {
            Some(a) => c.arg("--arch").arg(a),
            None => c,
        })
    }
}

/// `--bandwidth N --bytes` when a limit is given.
fn with_bandwidth(c: RemoteCommand, bytes_per_sec: Option<u64>) -> RemoteCommand {
    match bytes_per_sec {
        Some(n) => c.arg("--bandwidth").arg(n.to_string()).arg("--bytes"),
        None => c,
    }
}

// ───────────────────────────── output ─────────────────────────────

/// Names from `virsh list --all --name` (also `checkpoint-list --name`,
/// `snapshot-list --name`, `pool-list --name`): one per line, blank lines dropped.
/// Names are kept exactly (no trimming of inner or edge spaces); a trailing `\r` is
/// removed.
pub fn parse_virsh_list_names(stdout: &str) -> Vec<String> {
    stdout
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// State from `virsh domstate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// `running`.
    Running,
    /// `paused`.
    Paused,
    /// `shut off`.
    ShutOff,
    /// `in shutdown`.
    InShutdown,
    /// `crashed`.
    Crashed,
    /// `pmsuspended`.
    PmSuspended,
    /// `idle` (Xen).
    Idle,
    /// Anything else, as printed.
    Other(String),
}

impl DomainState {
    /// The domain has a QEMU (or Xen) process: live snapshot methods apply.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            DomainState::Running
                | DomainState::Paused
                | DomainState::InShutdown
                | DomainState::PmSuspended
                | DomainState::Idle
        )
    }
}

/// Parse `virsh domstate` output (first non-empty line).
pub fn parse_domstate(stdout: &str) -> Result<DomainState, ParseError> {
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| unexpected("virsh domstate", "empty output"))?;
    Ok(match line {
        "running" => DomainState::Running,
        "paused" => DomainState::Paused,
        "shut off" => DomainState::ShutOff,
        "in shutdown" => DomainState::InShutdown,
        "crashed" => DomainState::Crashed,
        "pmsuspended" => DomainState::PmSuspended,
        "idle" => DomainState::Idle,
        other => DomainState::Other(other.to_owned()),
    })
}

/// A `major.minor.micro` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl Version {
    /// A version.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Version {
        Version {
            major,
            minor,
            micro,
        }
    }

    /// Parse `9.0.0`, `7.2`, `10.0.2` (trailing non-digits in a part are ignored,
    /// e.g. `7.2.0-rc1`).
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.trim().split('.').map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = it.next()??;
        let minor = it.next().flatten().unwrap_or(0);
        let micro = it.next().flatten().unwrap_or(0);
        Some(Version::new(major, minor, micro))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `virsh version --daemon` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirshVersion {
    /// `Compiled against library: libvirt X`.
    pub compiled_library: Option<Version>,
    /// `Using library: libvirt X` (the client side).
    pub library: Option<Version>,
    /// `Using API: QEMU X`: driver name and version.
    pub api: Option<(String, Version)>,
    /// `Running hypervisor: QEMU X` (absent on some drivers).
    pub hypervisor: Option<(String, Version)>,
    /// `Running against daemon: X`.
    pub daemon: Option<Version>,
}

/// Parse `virsh version [--daemon]`.
pub fn parse_virsh_version(stdout: &str) -> Result<VirshVersion, ParseError> {
    let mut v = VirshVersion::default();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let named = || {
            let (name, ver) = value.rsplit_once(' ')?;
            Some((name.trim().to_owned(), Version::parse(ver)?))
        };
        let last = || value.rsplit(' ').next().and_then(Version::parse);
        match key.trim() {
            "Compiled against library" => v.compiled_library = last(),
            "Using library" => v.library = last(),
            "Using API" => v.api = named(),
            "Running hypervisor" => v.hypervisor = named(),
            "Running against daemon" => v.daemon = last(),
            _ => {}
        }
    }
    if v.library.is_none() && v.daemon.is_none() {
        return Err(unexpected(
            "virsh version",
            format!("no library version in {:?}", truncate(stdout)),
        ));
    }
    Ok(v)
}

/// The emulator `virsh domcapabilities` names (`<path>`): the host's QEMU for that
/// virtualization type. `None` when it names none.
pub fn parse_domcapabilities_emulator(xml: &str) -> Result<Option<String>, ParseError> {
    let what = "virsh domcapabilities";
    let doc = Doc::parse(xml).map_err(|source| ParseError::Xml { what, source })?;
    Ok(doc
        .child(0, "path")
        .map(|p| doc.elem(p).text.trim().to_string())
        .filter(|p| p.starts_with('/')))
}

/// Whether `virsh domcapabilities` reports the backup/checkpoint API
/// (`<features><backup supported='yes'/>`, libvirt ≥ 6.0 with a QEMU that has
/// incremental backup). An absent element means no.
pub fn parse_domcapabilities_backup_supported(xml: &str) -> Result<bool, ParseError> {
    let what = "virsh domcapabilities";
    let doc = Doc::parse(xml).map_err(|source| ParseError::Xml { what, source })?;
    if doc.root().name != "domainCapabilities" {
        return Err(ParseError::Xml {
            what,
            source: XmlError::NotADomain {
                found: doc.root().name.clone(),
            },
        });
    }
    Ok(doc
        .child(0, "features")
        .and_then(|f| doc.child(f, "backup"))
        .is_some_and(|b| doc.elem(b).attr("supported") == Some("yes")))
}

/// `(target, capacity, allocation)` per disk from [`Virsh::domblkinfo_all`]; the
/// header and any line without two byte counts are skipped.
pub fn parse_domblkinfo_all(stdout: &str) -> Vec<(String, u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [t, cap, alloc, ..] => {
                    Some((t.to_string(), cap.parse().ok()?, alloc.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// A domain's UUID as libvirt prints it: hex digits in groups of 8-4-4-4-12. Only this
/// goes into a virsh script ([`Virsh::describe_uuid`]): it holds nothing virsh's own
/// tokenizer reads (space, quote, `;`, `#`, `\`) and does not start with `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainUuid(String);

impl DomainUuid {
    /// `Some` only for the canonical form (either case).
    pub fn parse(s: &str) -> Option<DomainUuid> {
        let canonical = s.len() == 36
            && s.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        canonical.then(|| DomainUuid(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A checkpoint name that may go into a virsh script
/// ([`Virsh::abort_job_then_delete_checkpoint`]): 1 to 128 ASCII letters, digits, `-`,
/// `_` and `.`, not starting with `-` (nothing virsh's tokenizer reads, never an option).
/// Names from a host are untrusted: others go through argv one command at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointName(String);

impl CheckpointName {
    pub fn parse(s: &str) -> Option<CheckpointName> {
        let ok = (1..=128).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        ok.then(|| CheckpointName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The line between the answers of [`Virsh::describe_uuid`].
struct DescribeMark(u128);

impl fmt::Display for DescribeMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vk-mark-{:032x}", self.0)
    }
}

/// The answers of [`Virsh::describe_uuid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described<'a> {
    pub xml: &'a str,
    pub inactive_xml: &'a str,
    /// Empty also when `checkpoint-list` failed (Xen; virsh prints the same empty
    /// line then): a caller that misses a checkpoint here asks again on its own.
    pub checkpoints: Vec<String>,
    pub state: &'a str,
}

/// Splits the output of [`Virsh::describe_uuid`] made with `mark` at the lines that are
/// the mark: four parts, or `None`.
pub fn parse_described(stdout: &str, mark: u128) -> Option<Described<'_>> {
    let line = format!("{}\n", DescribeMark(mark));
    let mut parts = Vec::with_capacity(4);
    let mut start = 0;
    for (i, _) in stdout.match_indices(line.as_str()) {
        if i == 0 || stdout.as_bytes()[i - 1] == b'\n' {
            parts.push(&stdout[start..i]);
            start = i + line.len();
        }
    }
    parts.push(&stdout[start..]);
    let [xml, inactive_xml, checkpoints, state] = parts[..] else {
        return None;
    };
    Some(Described {
        xml,
        inactive_xml,
        checkpoints: parse_virsh_list_names(checkpoints),
        state,
    })
}

/// The output of [`Virsh::describe`]: `(live XML, inactive XML, state line)`, or
/// `None` when it is not three parts.
pub fn parse_describe(stdout: &str) -> Option<(&str, &str, &str)> {
    let mut parts = stdout.split('\0');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(xml), Some(inactive), Some(state), None) => Some((xml, inactive, state)),
        _ => None,
    }
}
