//! `vm list` and `host check`: what is on a host and whether virtkeep can work there.

use serde::Serialize;
use virtkeep_libvirt::lvm::{self as lvm_cmd, LvInfo};
use virtkeep_libvirt::virsh::parse_domblkinfo_all;
use virtkeep_libvirt::{Backend, DiskSource, coreutils, human_bytes, sh};
use virtkeep_ssh::{Output, RemoteCommand};

use crate::error::Result;
use crate::host::{HOST_STATE_DIR, Host};
use crate::vm::{DomainState, Vm};

#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub target: String,
    pub device: String,
    pub backend: String,
    pub format: Option<String>,
    pub source: String,
    pub virtual_size: Option<u64>,
    pub allocated: Option<u64>,
    /// How virtkeep backs this disk up, or why it does not.
    pub method: String,
    /// Backend details: LVM (from `lvs --reportformat json`) or Ceph RBD (from the XML
    /// and `rbd info --format json` run with the host's Ceph settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub host: String,
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub kind: String,
    pub disks: Vec<DiskInfo>,
}

/// Capacity and allocation per target, from `virsh domblkinfo --all`.
async fn block_sizes(host: &Host, uuid: &str) -> Vec<(String, u64, u64)> {
    match host.exec(&host.virsh().domblkinfo_all(uuid)).await {
        Ok(out) => parse_domblkinfo_all(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => Vec::new(),
    }
}

/// LVs by (vg, lv) from LVM's JSON report; empty when LVM reporting is unavailable.
async fn lvm_report(host: &Host) -> Vec<LvInfo> {
    match host.exec(&lvm_cmd::lvs_json(None)).await {
        Ok(out) if out.status == 0 => {
            lvm_cmd::parse_lvs_json(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

async fn rbd_details(
    host: &Host,
    disk: &virtkeep_libvirt::Disk,
    pool: &str,
    image: &str,
) -> serde_json::Value {
    let (monitors, auth) = match &disk.source {
        DiskSource::Network { hosts, auth, .. } => (
            hosts
                .iter()
                .map(|h| {
                    format!(
                        "{}:{}",
                        h.name.as_deref().unwrap_or(""),
                        h.port.as_deref().unwrap_or("6789")
                    )
                })
                .collect::<Vec<_>>(),
            auth.clone(),
        ),
        _ => (Vec::new(), None),
    };
    let mut v = serde_json::json!({
        "pool": pool,
        "image": image,
        "monitors": monitors,
        "auth_user": auth.as_ref().map(|a| a.username.clone()),
        "secret_uuid": auth.as_ref().and_then(|a| a.secret_uuid.clone()),
    });
    match host.config.ceph_args() {
        Some(ceph) => match host.exec(&ceph.info_json(pool, image)).await {
            Ok(out) if out.status == 0 => {
                if let Ok(info) = virtkeep_libvirt::rbd::parse_rbd_info_json(
                    &String::from_utf8_lossy(&out.stdout),
                ) {
                    v["size"] = info.size.into();
                    v["fast_diff"] = info.has_fast_diff().into();
                }
            }
            Ok(out) => {
                v["rbd_info_error"] = String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .to_string()
                    .into()
            }
            Err(e) => v["rbd_info_error"] = e.to_string().into(),
        },
        None => {
            v["rbd_info_error"] =
                "the host has no Ceph settings (host add --ceph-conf/--ceph-id/--ceph-keyring)"
                    .into()
        }
    }
    v
}

pub async fn list_vms(host: &Host) -> Result<Vec<VmInfo>> {
    let mut lvs: Option<Vec<LvInfo>> = None;
    let uuids = host.run_string(&host.virsh().list_all_uuids()).await?;
    let mut vms = Vec::new();
    for uuid in uuids.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let vm = match Vm::load(host, uuid).await {
            Ok(vm) => vm,
            // Undefined between the listing and now.
            Err(_) if host.exec(&host.virsh().domuuid(uuid)).await?.status != 0 => continue,
            Err(e) => return Err(e),
        };
        let sizes = block_sizes(host, uuid).await;
        let mut disks = Vec::new();
        for d in &vm.domain.disks {
            let backend = d.backend();
            let size = sizes.iter().find(|(t, _, _)| t == &d.target);
            let method = match (d.is_backup_candidate(), &backend) {
                (Err(reason), _) => format!("skipped: {reason}"),
                (Ok(()), Backend::QcowFile | Backend::RawFile) if vm.state.is_active() => {
                    "snapshot-create-as --disk-only, qemu-nbd over SSH".into()
                }
                (Ok(()), Backend::QcowFile | Backend::RawFile) => {
                    "qemu-img overlay, qemu-nbd over SSH".into()
                }
                (Ok(()), Backend::Lvm { .. }) => "lvcreate -s (not in this version)".into(),
                (Ok(()), Backend::Rbd { .. }) => {
                    "rbd snapshot + export-diff (not in this version)".into()
                }
                (Ok(()), _) => "not supported".into(),
            };
            let details = match &backend {
                Backend::Lvm { vg, lv } => {
                    if lvs.is_none() {
                        lvs = Some(lvm_report(host).await);
                    }
                    lvs.as_ref().and_then(|all| all.iter().find(|l| &l.vg == vg && &l.name == lv)).map(|l| {
                        serde_json::json!({ "vg": l.vg, "lv": l.name, "size": l.size, "attr": l.attr, "thin_pool": l.pool_lv })
                    })
                }
                Backend::Rbd { pool, image } => Some(rbd_details(host, d, pool, image).await),
                _ => None,
            };
            let (virtual_size, allocated) = match (size, &details) {
                (Some(s), _) => (Some(s.1), Some(s.2)),
                (None, Some(d)) => (d["size"].as_u64(), None),
                _ => (None, None),
            };
            disks.push(DiskInfo {
                details,
                target: d.target.clone(),
                device: format!("{:?}", d.device).to_lowercase(),
                backend: backend_name(&backend),
                format: d.format.clone(),
                source: source_text(&d.source),
                virtual_size,
                allocated,
                method,
            });
        }
        vms.push(VmInfo {
            host: host.name.clone(),
            name: vm.name.clone(),
            uuid: vm.uuid.clone(),
            state: vm.state,
            kind: vm.domain.kind.clone(),
            disks,
        });
    }
    Ok(vms)
}

fn backend_name(b: &Backend) -> String {
    match b {
        Backend::QcowFile => "qcow2-file".into(),
        Backend::RawFile => "raw-file".into(),
        Backend::Block => "block".into(),
        Backend::Lvm { vg, lv } => format!("lvm:{vg}/{lv}"),
        Backend::Rbd { pool, image } => format!("rbd:{pool}/{image}"),
        Backend::Other => "other".into(),
    }
}

fn source_text(s: &DiskSource) -> String {
    match s {
        DiskSource::File { path } => path.clone(),
        DiskSource::Block { dev } => dev.clone(),
        DiskSource::Network { protocol, name, .. } => {
            format!("{protocol}:{}", name.as_deref().unwrap_or(""))
        }
        DiskSource::Volume { pool, volume } => format!("volume:{pool}/{volume}"),
        DiskSource::Empty => String::new(),
        other => format!("{other:?}"),
    }
}

/// One line of `host check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckItem {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// A failed optional check does not make the host unusable.
    pub required: bool,
}

/// `(ok, first line of stdout, else of stderr)` of a command's output.
fn judged(out: Result<Output>) -> (bool, String) {
    match out {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            let first = String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            (out.status == 0, first)
        }
        Err(e) => (false, e.to_string()),
    }
}

async fn probe(host: &Host, cmd: RemoteCommand) -> (bool, String) {
    judged(host.exec(&cmd).await)
}

/// The lines of `host check`, in order.
struct Checks {
    items: Vec<CheckItem>,
}

impl Checks {
    fn add(&mut self, check: &str, (ok, detail): (bool, String), fix: &str, required: bool) {
        self.items.push(CheckItem {
            check: check.into(),
            ok,
            detail,
            fix: (!ok).then(|| fix.to_string()),
            required,
        });
    }

    /// A detail for a check that passed, else what the command said.
    fn add_with(
        &mut self,
        check: &str,
        (ok, detail): (bool, String),
        passed: &str,
        fix: &str,
        required: bool,
    ) {
        let detail = if ok { passed.to_string() } else { detail };
        self.add(check, (ok, detail), fix, required);
    }
}

pub async fn check_host(host: &Host) -> Result<Vec<CheckItem>> {
    let mut c = Checks {
        items: vec![CheckItem {
            check: "ssh + pinned host key".into(),
            ok: true,
            detail: format!(
                "{}@{}:{}",
                host.config.user, host.config.address, host.config.port
            ),
            fix: None,
            required: true,
        }],
    };
    check_tools(host, &mut c).await;
    check_libvirt(host, &mut c).await;
    check_space(host, &mut c).await;
    check_storage(host, &mut c).await;
    c.add(
        "unix-socket forwarding",
        crate::live::probe_forwarding(host).await,
        "`restore --live` and `verify --boot` need the host's sshd to listen on unix sockets for \
         virtkeep: set `AllowStreamLocalForwarding yes` (and no `DisableForwarding yes`) in sshd_config",
        false,
    );
    Ok(c.items)
}

/// Root, directly or through `sudo -n` for any command: virtkeep sends each host
/// command as one shell line (pipelines, redirections, small scripts) and with sudo
/// wraps the whole line as `sudo -n -- sh -c '<line>'`, so a sudoers rule naming only
/// some binaries cannot work (it would have to allow `sh`, which is all of root).
async fn check_root(host: &Host, c: &mut Checks) {
    let (ok, said) = probe(host, sh::effective_uid()).await;
    let root = ok && said == "0";
    let user = &host.config.user;
    let all = format!("`{user} ALL=(root) NOPASSWD: ALL` (e.g. in /etc/sudoers.d/virtkeep)");
    let (check, passed, fix) = if host.config.sudo {
        (
            "sudo -n",
            "`sudo -n` runs any command as root",
            format!(
                "virtkeep runs every host command as `sudo -n -- sh -c '<command line>'`, so a \
                 sudoers rule for some binaries cannot work: give {user} passwordless sudo for \
                 every command, {all}, or log in as root"
            ),
        )
    } else {
        (
            "root",
            "logged in as root",
            format!("log in as root, or give {user} {all} and add the host with --sudo"),
        )
    };
    let detail = match (root, ok) {
        (true, _) => passed.to_string(),
        (false, true) => format!("commands run as uid {said}, not root"),
        (false, false) => said,
    };
    c.add(check, (root, detail), &fix, true);
}

/// Root, virsh and the tools every backup needs.
async fn check_tools(host: &Host, c: &mut Checks) {
    check_root(host, c).await;
    c.add(
        "virsh",
        probe(host, host.virsh().version()).await,
        "install libvirt-clients (Debian) / libvirt-client (RHEL) and check the libvirt URI",
        true,
    );
    for (name, pkg) in [
        ("qemu-img", "qemu-utils / qemu-img"),
        ("qemu-nbd", "qemu-utils / qemu-img"),
        ("flock", "util-linux"),
    ] {
        let (ok, detail) = probe(host, sh::command_path(name)).await;
        let detail = if ok {
            detail
        } else {
            format!("{name} not found")
        };
        c.add(
            name,
            (ok, detail),
            &format!("install {pkg} on the host"),
            true,
        );
    }
}

/// What libvirt offers: blockcommit, the backup API.
async fn check_libvirt(host: &Host, c: &mut Checks) {
    c.add_with(
        "virsh blockcommit",
        probe(host, host.virsh().help("blockcommit")).await,
        "available",
        "install the full libvirt (blockcommit missing: see the vendor's note on CentOS libvirt builds)",
        true,
    );
    // `host check` asks again and refreshes the answer backups use.
    let backup_api = crate::cbt::backup_api_supported(host, true).await;
    let detail = if backup_api {
        "supported"
    } else {
        "not supported"
    };
    c.add(
        "libvirt backup API (CBT)",
        (backup_api, detail.into()),
        "libvirt ≥ 7.2 with QEMU ≥ 6.0 enables dirty-bitmap incrementals",
        false,
    );
}

/// The state directory and room for overlays.
async fn check_space(host: &Host, c: &mut Checks) {
    c.add_with(
        "state dir",
        probe(host, coreutils::mkdir_p(HOST_STATE_DIR)).await,
        HOST_STATE_DIR,
        &format!("virtkeep needs to create {HOST_STATE_DIR} (root, or sudo for every command)"),
        true,
    );
    let out = host.exec(&coreutils::df_avail(IMAGES_DIR)).await;
    let free = match &out {
        Ok(o) if o.status == 0 => {
            coreutils::parse_df_avail(&String::from_utf8_lossy(&o.stdout)).ok()
        }
        _ => None,
    };
    let (ok, detail) = match free {
        Some(n) => (true, format!("{} free", human_bytes(n))),
        None => judged(out),
    };
    c.add(
        &format!("free space for overlays ({IMAGES_DIR})"),
        (ok, detail),
        "overlays go next to each disk; keep room for the writes made during a backup",
        false,
    );
}

/// LVM (and thin_delta) and Ceph RBD, when the host has them.
async fn check_storage(host: &Host, c: &mut Checks) {
    let (ok, detail) = probe(host, lvm_cmd::lvs_json(None)).await;
    c.add_with(
        "LVM reporting (lvs --reportformat json)",
        (ok, detail),
        "available",
        "update lvm2 (JSON reporting came with LVM 2.02.158, RHEL/CentOS 7.3)",
        false,
    );
    if ok {
        let (td, _) = probe(host, sh::command_path("thin_delta")).await;
        let detail = if td {
            "installed: incrementals of thin LVs read only the blocks thin_delta lists"
        } else {
            "not installed: incrementals of thin LVs read each snapshot whole (only changed chunks are stored)"
        };
        c.add(
            "thin_delta (thin-provisioning-tools)",
            (td, detail.to_string()),
            "install thin-provisioning-tools so that thin LV incrementals read only what changed",
            false,
        );
    }
    if let Some(ceph) = host.config.ceph_args() {
        c.add_with(
            "rbd + Ceph auth",
            probe(host, ceph.default_pool_stats()).await,
            "the cluster answers",
            "check the host's ceph conf, id and keyring settings",
            false,
        );
    }
}

/// Where overlays of file disks usually go.
const IMAGES_DIR: &str = "/var/lib/libvirt/images";

/// Bytes in binary units (the CLI's formatter; one for all of virtkeep).
pub use virtkeep_libvirt::human_bytes as human;
