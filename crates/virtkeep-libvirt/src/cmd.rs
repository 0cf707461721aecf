//! Builders for every command line virtkeep runs on a hypervisor.
//!
//! Each returns a [`RemoteCommand`], whose arguments are quoted by
//! `virtkeep_ssh::quote`; nothing here concatenates input into a shell line.
//! Extra hardening where the tools themselves would misread a value:
//! - domains are passed as `--domain X` (virsh would read a leading `-` as an option);
//! - paths given to qemu-img/qemu-nbd that are not absolute get a `./` prefix (a
//!   leading `-` would be an option, `proto:` a protocol);
//! - values inside comma-separated option strings (`--diskspec`, `--image-opts`)
//!   have `,` doubled, the escape both virsh and QEMU use;
//! - coreutils get `--` before paths.
//!
//! Domains can be named by name, UUID or numeric id; virsh tries id, then UUID, then
//! name, so a domain *named* `5` is better addressed by its UUID.

use virtkeep_ssh::RemoteCommand;

/// Escape a value for a comma-separated option list (virsh `--diskspec`, QEMU
/// `--image-opts`): `,` becomes `,,`.
pub fn escape_commas(value: &str) -> String {
    value.replace(',', ",,")
}

/// A path for qemu-img/qemu-nbd/rbd-free tools: absolute paths as they are, anything
/// else prefixed with `./` so it cannot be read as an option or a `protocol:` name.
pub fn safe_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("./{path}")
    }
}

// ───────────────────────────── virsh ─────────────────────────────

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

    /// `LC_ALL=C virsh -c URI SUBCOMMAND`.
    pub fn command(&self, subcommand: &str) -> RemoteCommand {
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

    /// `virsh dominfo --domain DOM`.
    pub fn dominfo(&self, dom: &str) -> RemoteCommand {
        self.dom("dominfo", dom)
    }

    /// `virsh domblklist --domain DOM --details`.
    pub fn domblklist_details(&self, dom: &str) -> RemoteCommand {
        self.dom("domblklist", dom).arg("--details")
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
    /// `virsh blockcommit --domain DOM --path TARGET --active --pivot --wait`.
    /// (`--pivot` needs `--active`; `--wait` makes virsh return only when the job is
    /// done; `--delete` is deliberately not used: virtkeep removes its overlay itself
    /// after checking the pivot happened.)
    pub fn blockcommit_active_pivot(&self, dom: &str, target: &str) -> RemoteCommand {
        self.dom("blockcommit", dom)
            .arg("--path")
            .arg(target)
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

    /// `virsh blockjob --domain DOM --path TARGET --info --bytes`.
    pub fn blockjob_info(&self, dom: &str, target: &str) -> RemoteCommand {
        self.dom("blockjob", dom)
            .arg("--path")
            .arg(target)
            .args(["--info", "--bytes"])
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

    /// `virsh checkpoint-create --domain DOM --xmlfile XML_PATH`.
    pub fn checkpoint_create(&self, dom: &str, xml_path: &str) -> RemoteCommand {
        self.dom("checkpoint-create", dom)
            .arg("--xmlfile")
            .arg(xml_path)
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

    /// `virsh snapshot-list --domain DOM --name`.
    pub fn snapshot_list(&self, dom: &str) -> RemoteCommand {
        self.dom("snapshot-list", dom).arg("--name")
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

    /// `virsh version --daemon` (see [`crate::parse::parse_virsh_version`]).
    pub fn version(&self) -> RemoteCommand {
        self.command("version").arg("--daemon")
    }

    /// `virsh secret-list`.
    pub fn secret_list(&self) -> RemoteCommand {
        self.command("secret-list")
    }

    /// `virsh pool-list --all --name`.
    pub fn pool_list(&self) -> RemoteCommand {
        self.command("pool-list").args(["--all", "--name"])
    }

    /// `virsh capabilities`.
    pub fn capabilities(&self) -> RemoteCommand {
        self.command("capabilities")
    }

    /// `virsh domcapabilities [--virttype T]` (see
    /// [`crate::parse::parse_domcapabilities_backup_supported`]).
    pub fn domcapabilities(&self, virttype: Option<&str>) -> RemoteCommand {
        let c = self.command("domcapabilities");
        match virttype {
            Some(t) => c.arg("--virttype").arg(t),
            None => c,
        }
    }
}

// ───────────────────────────── qemu-img ─────────────────────────────

/// `qemu-img info --output=json [-f FMT] [-U] PATH`. Give the format whenever it is
/// known: probing a raw image lets a guest that wrote a qcow2 header into its disk
/// redirect the read.
pub fn qemu_img_info_json(path: &str, format: Option<&str>, force_share: bool) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["info", "--output=json"]);
    if let Some(f) = format {
        c = c.arg("-f").arg(f);
    }
    if force_share {
        c = c.arg("-U");
    }
    c.arg(safe_path(path))
}

/// `qemu-img create -f qcow2 PATH SIZE` (sparse; `size` in bytes), or with
/// `backing = Some((file, fmt))` an overlay `-b FILE -F FMT` of the given size.
pub fn qemu_img_create_qcow2(
    path: &str,
    size: u64,
    backing: Option<(&str, &str)>,
) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["create", "-q", "-f", "qcow2"]);
    if let Some((file, fmt)) = backing {
        c = c.arg("-b").arg(safe_path(file)).arg("-F").arg(fmt);
    }
    c.arg(safe_path(path)).arg(size.to_string())
}

/// `qemu-img create -q -f qcow2 -b BACKING -F FMT PATH`: an overlay as large as its
/// backing file (the stopped-VM snapshot).
pub fn qemu_img_create_overlay(path: &str, backing: &str, backing_format: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(safe_path(backing))
        .arg("-F")
        .arg(backing_format)
        .arg(safe_path(path))
}

/// `qemu-img create -q -f raw PATH SIZE` (a sparse file).
pub fn qemu_img_create_raw(path: &str, size: u64) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(safe_path(path))
        .arg(size.to_string())
}

/// `qemu-img map --output=json [-f FMT] [-U] PATH`.
pub fn qemu_img_map_json(path: &str, format: Option<&str>, force_share: bool) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["map", "--output=json"]);
    if let Some(f) = format {
        c = c.arg("-f").arg(f);
    }
    if force_share {
        c = c.arg("-U");
    }
    c.arg(safe_path(path))
}

/// `qemu-img commit -q -f qcow2 OVERLAY` (merge a stopped VM's overlay into its base).
pub fn qemu_img_commit(overlay: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["commit", "-q", "-f", "qcow2"])
        .arg(safe_path(overlay))
}

// ───────────────────────────── qemu-nbd ─────────────────────────────

/// A QEMU `--image-opts` string for a local image: `driver=FMT[,force-share=on],
/// file.driver=file|host_device,file.filename=PATH` with `,` in values doubled.
/// `block_device` selects `host_device` (LVs, raw devices), which QEMU requires for
/// block devices.
pub fn image_opts(format: &str, path: &str, block_device: bool, force_share: bool) -> String {
    let mut s = format!("driver={}", escape_commas(format));
    if force_share {
        s.push_str(",force-share=on");
    }
    s.push_str(if block_device {
        ",file.driver=host_device"
    } else {
        ",file.driver=file"
    });
    s.push_str(",file.filename=");
    s.push_str(&escape_commas(path));
    s
}

/// Read-only NBD export on a unix socket that daemonises once the socket is ready:
/// `qemu-nbd -r --fork --persistent --shared=8 --socket=S --pid-file=P --image-opts OPTS`
/// (build `OPTS` with [`image_opts`]; qemu-nbd 7.2 has no `-U`, force-share goes
/// into the options). Stop it by killing the pid in `pid_file`.
pub fn qemu_nbd_export_readonly(image_opts: &str, socket: &str, pid_file: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-nbd")
        .args(["-r", "--fork", "--persistent", "--shared=8"])
        .arg(format!("--socket={socket}"))
        .arg(format!("--pid-file={pid_file}"))
        .arg("--image-opts")
        .arg(image_opts)
}

/// Writable NBD export for restore: `qemu-nbd --fork --persistent --shared=8
/// --discard=unmap [--cache=none] --socket=S --pid-file=P --image-opts
/// driver=FMT,file.driver=file|host_device,file.filename=PATH`. Zero writes the
/// client sends with "may trim" become holes (`--discard=unmap`). `direct` bypasses
/// the host's page cache (O_DIRECT): through the page cache qemu-nbd used 7.9 CPU s to
/// restore the 1794 MiB benchmark disk, without it 2.0 s; file
/// systems without O_DIRECT (tmpfs) refuse it, so callers fall back.
pub fn qemu_nbd_export_writable(
    path: &str,
    format: &str,
    block_device: bool,
    direct: bool,
    socket: &str,
    pid_file: &str,
) -> RemoteCommand {
    let c = RemoteCommand::new("qemu-nbd").args([
        "--fork",
        "--persistent",
        "--shared=8",
        "--discard=unmap",
    ]);
    let c = if direct { c.arg("--cache=none") } else { c };
    c.arg(format!("--socket={socket}"))
        .arg(format!("--pid-file={pid_file}"))
        .arg("--image-opts")
        .arg(image_opts(format, path, block_device, false))
}

// ───────────────────────────── LVM ─────────────────────────────

/// Fields requested by [`lvs_json`].
pub const LVS_FIELDS: &str =
    "lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags";
/// Fields requested by [`vgs_json`].
pub const VGS_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size";

/// `lvs --reportformat json --units b --nosuffix -o FIELDS [VG]`.
pub fn lvs_json(vg: Option<&str>) -> RemoteCommand {
    let c = RemoteCommand::new("lvs")
        .args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o"])
        .arg(LVS_FIELDS);
    match vg {
        Some(v) => c.arg(v),
        None => c,
    }
}

/// `vgs --reportformat json --units b --nosuffix -o FIELDS`.
pub fn vgs_json() -> RemoteCommand {
    RemoteCommand::new("vgs")
        .args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o"])
        .arg(VGS_FIELDS)
}

/// Snapshot of `VG/LV` named `snap`. `cow_size = Some(bytes)`: classic snapshot with
/// that much copy-on-write space (`-L {bytes}b`); `None`: thin snapshot, activated
/// (`-kn`, thin snapshots skip activation by default).
pub fn lvcreate_snapshot(vg: &str, lv: &str, snap: &str, cow_size: Option<u64>) -> RemoteCommand {
    let c = RemoteCommand::new("lvcreate").args(["-s", "-n"]).arg(snap);
    let c = match cow_size {
        Some(b) => c.arg("-L").arg(format!("{b}b")),
        None => c.args(["-kn"]),
    };
    c.arg(format!("{vg}/{lv}"))
}

/// `lvremove -f VG/LV`.
pub fn lvremove(vg: &str, lv: &str) -> RemoteCommand {
    RemoteCommand::new("lvremove")
        .arg("-f")
        .arg(format!("{vg}/{lv}"))
}

/// `lvcreate --yes -Wy -Zy -n NAME -L {bytes}b VG`: a new (thick) LV. Only its first
/// KiB is zeroed: a sparse restore into it must write zeros for the holes too.
pub fn lvcreate(vg: &str, name: &str, size: u64) -> RemoteCommand {
    RemoteCommand::new("lvcreate")
        .args(["--yes", "-Wy", "-Zy", "-n"])
        .arg(name)
        .arg("-L")
        .arg(format!("{size}b"))
        .arg(vg)
}

// ───────────────────────────── rbd ─────────────────────────────

/// Ceph client settings, given explicitly on every `rbd` command (sshd passes no
/// CEPH_* variables).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephArgs {
    /// `-c ceph.conf`.
    pub conf: Option<String>,
    /// `--id` (without `client.`).
    pub id: Option<String>,
    /// `--keyring`.
    pub keyring: Option<String>,
}

impl CephArgs {
    /// `rbd [-c X] [--id Y] [--keyring Z] SUBCOMMAND…`.
    pub fn rbd(&self, subcommand: &[&str]) -> RemoteCommand {
        let mut c = RemoteCommand::new("rbd");
        if let Some(x) = &self.conf {
            c = c.arg("-c").arg(x);
        }
        if let Some(x) = &self.id {
            c = c.arg("--id").arg(x);
        }
        if let Some(x) = &self.keyring {
            c = c.arg("--keyring").arg(x);
        }
        c.args(subcommand)
    }

    /// `rbd info --format json --image=POOL/IMAGE`.
    pub fn info_json(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["info", "--format", "json"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd snap create --no-progress --image=POOL/IMAGE@SNAP`.
    pub fn snap_create(&self, pool: &str, image: &str, snap: &str) -> RemoteCommand {
        self.rbd(&["snap", "create", "--no-progress"])
            .arg(rbd_image_arg(pool, image, Some(snap)))
    }

    /// `rbd snap rm --no-progress --image=POOL/IMAGE@SNAP`.
    pub fn snap_rm(&self, pool: &str, image: &str, snap: &str) -> RemoteCommand {
        self.rbd(&["snap", "rm", "--no-progress"])
            .arg(rbd_image_arg(pool, image, Some(snap)))
    }

    /// `rbd snap ls --format json --image=POOL/IMAGE`.
    pub fn snap_ls_json(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["snap", "ls", "--format", "json"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd export-diff --no-progress [--from-snap=A] --image=POOL/IMAGE@SNAP -`
    /// (stream on stdout).
    pub fn export_diff(
        &self,
        pool: &str,
        image: &str,
        snap: &str,
        from_snap: Option<&str>,
    ) -> RemoteCommand {
        let mut c = self.rbd(&["export-diff", "--no-progress"]);
        if let Some(f) = from_snap {
            c = c.arg(format!("--from-snap={f}"));
        }
        c.arg(rbd_image_arg(pool, image, Some(snap))).arg("-")
    }

    /// `rbd import-diff --no-progress - --image=POOL/IMAGE` (stream on stdin).
    pub fn import_diff(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["import-diff", "--no-progress", "-"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd create --size={bytes}B --image=POOL/IMAGE` (a plain number would mean MiB).
    pub fn create(&self, pool: &str, image: &str, size: u64) -> RemoteCommand {
        self.rbd(&["create"])
            .arg(format!("--size={size}B"))
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd rm --no-progress --image=POOL/IMAGE`.
    pub fn rm(&self, pool: &str, image: &str) -> RemoteCommand {
        self.rbd(&["rm", "--no-progress"])
            .arg(rbd_image_arg(pool, image, None))
    }

    /// `rbd image-meta get --image=POOL/IMAGE KEY`.
    pub fn meta_get(&self, pool: &str, image: &str, key: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "get"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
    }

    /// `rbd image-meta set --image=POOL/IMAGE KEY VALUE`.
    pub fn meta_set(&self, pool: &str, image: &str, key: &str, value: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "set"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
            .arg(value)
    }

    /// `rbd image-meta remove --image=POOL/IMAGE KEY`.
    pub fn meta_remove(&self, pool: &str, image: &str, key: &str) -> RemoteCommand {
        self.rbd(&["image-meta", "remove"])
            .arg(rbd_image_arg(pool, image, None))
            .arg(key)
    }
}

/// The image (or snapshot) of an `rbd` command as one option with its value attached:
/// `--image=POOL/IMAGE[@SNAP]` (rbd splits pool, namespace and snapshot out of it).
/// A positional `POOL/IMAGE` would be read as an option when the pool name starts with
/// `-`; an attached value never is. Names are checked where they are read
/// ([`crate::check_rbd_image`]); this is the second line.
pub fn rbd_image_arg(pool: &str, image: &str, snap: Option<&str>) -> String {
    match snap {
        Some(s) => format!("--image={pool}/{image}@{s}"),
        None => format!("--image={pool}/{image}"),
    }
}

// ───────────────────────────── files and misc ─────────────────────────────

/// `chown -- USER:GROUP PATH`.
pub fn chown(owner: &str, path: &str) -> RemoteCommand {
    RemoteCommand::new("chown").args(["--", owner, path])
}

/// `rm -f -- PATH`.
pub fn rm_f(path: &str) -> RemoteCommand {
    RemoteCommand::new("rm").args(["-f", "--", path])
}

/// Format string of [`stat`]: size, owner, group, octal mode, type (tab-separated).
pub const STAT_FORMAT: &str = "%s\t%U\t%G\t%a\t%F";

/// `stat -L -c '%s\t%U\t%G\t%a\t%F' -- PATH` (see [`crate::parse::parse_stat`]).
pub fn stat(path: &str) -> RemoteCommand {
    RemoteCommand::new("stat").args(["-L", "-c", STAT_FORMAT, "--", path])
}

/// `mkdir -p -- PATH`.
pub fn mkdir_p(path: &str) -> RemoteCommand {
    RemoteCommand::new("mkdir").args(["-p", "--", path])
}

/// `df -B1 --output=avail -- PATH`: free bytes for unprivileged users on the file
/// system holding PATH (see [`crate::parse::parse_df_avail`]).
pub fn df_avail(path: &str) -> RemoteCommand {
    RemoteCommand::new("df").args(["-B1", "--output=avail", "--", path])
}

/// `mktemp -d [-p DIR] virtkeep.XXXXXXXXXX`: a private temporary directory (mode 0700).
pub fn mktemp_d(dir: Option<&str>) -> RemoteCommand {
    let c = RemoteCommand::new("mktemp").arg("-d");
    let c = match dir {
        Some(d) => c.arg("-p").arg(d),
        None => c,
    };
    c.arg("virtkeep.XXXXXXXXXX")
}

/// Exit status of the `flock` helpers when the lock is held by someone else.
pub const FLOCK_CONFLICT_STATUS: u32 = 75;

/// Run `cmd` under an exclusive lock on `lock_path`:
/// `flock -E 75 (-n | -w SECS) LOCK sh -c 'CMD'`. Exit status 75 means the lock was
/// busy. `wait_secs = None` fails at once.
pub fn flock_run(lock_path: &str, wait_secs: Option<u32>, cmd: &RemoteCommand) -> RemoteCommand {
    flock_base(lock_path, wait_secs)
        .args(["sh", "-c"])
        .arg(cmd.render())
}

/// Hold an exclusive lock on `lock_path` for as long as the command's stdin stays
/// open: prints `locked` once the lock is taken, then waits for end of input. Close
/// stdin (or lose the connection) to release it. Exit status 75: busy.
pub fn flock_hold(lock_path: &str, wait_secs: Option<u32>) -> RemoteCommand {
    flock_base(lock_path, wait_secs).args(["sh", "-c", "echo locked && exec cat >/dev/null"])
}

fn flock_base(lock_path: &str, wait_secs: Option<u32>) -> RemoteCommand {
    let c = RemoteCommand::new("flock")
        .arg("-E")
        .arg(FLOCK_CONFLICT_STATUS.to_string());
    let c = match wait_secs {
        Some(s) => c.arg("-w").arg(s.to_string()),
        None => c.arg("-n"),
    };
    c.arg(lock_path)
}
