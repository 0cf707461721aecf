//! LVM primitives for VMs whose disks are logical volumes
//! (`<disk type='block'><source dev='/dev/VG/LV'/>`): snapshot planning against the VG's
//! free space, all-or-nothing snapshot creation, overflow checks, removal (also of what a
//! killed job left), and LV creation for restore.
//!
//! The command lines and the parsing of LVM's reports are `virtkeep_libvirt::lvm`'s.
//! Reporting uses `lvs/vgs --reportformat json`, which needs LVM ≥ 2.02.158
//! (RHEL/CentOS 7.3); older tools get a clear [`ErrorKind::Unsupported`] error.
//!
//! Classic snapshots (`lvcreate -s -L`) are made one LV at a time: LVM has no atomic
//! multi-LV snapshot, so the caller gives several disks of one VM a common instant by
//! freezing the guest's filesystems or pausing the VM around [`create_snapshots`].
//! A classic snapshot whose copy-on-write area fills up becomes invalid; call
//! [`check_snapshot_valid`] after the last read and before publishing the backup.

use std::collections::BTreeMap;
use std::time::Duration;

use virtkeep_libvirt::coreutils::{self, Signal, mentions_path, parse_pgrep};
use virtkeep_libvirt::human_bytes;
use virtkeep_libvirt::lvm::{
    self as lvm_cmd, DM_NAME_MAX, LvInfo, VgInfo, dm_len, name_char, parse_lvm_version,
};
use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;

/// Every snapshot LV virtkeep creates is named `{origin}-vksnap-{job_id}`, so that
/// `cleanup` can tell its own snapshots from anything else.
pub const LV_SNAPSHOT_MARKER: &str = "-vksnap-";

/// A thin pool this full gets no new snapshot: the VM's writes during the backup would
/// allocate blocks the pool may not have, and a full pool stops the VM's I/O.
pub const THIN_POOL_FULL_PERCENT: f64 = 95.0;

pub use virtkeep_libvirt::lvm::{
    BASE_TAG, LVM_NAME_MAX, MIN_LVM_VERSION, lvm_version_has_json, lvrename, parse_thin_delta,
    snapshot_state, valid_new_lv_name,
};

/// Extent size assumed when LVM reports none (LVM's default, 4 MiB).
const DEFAULT_EXTENT: u64 = 4 << 20;

/// An LV that is a VM disk: what snapshot planning needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvDisk {
    pub vg: String,
    pub lv: String,
    /// Size in bytes.
    pub size: u64,
    /// A thin LV: it gets a thin snapshot (no copy-on-write size).
    pub thin: bool,
}

impl LvDisk {
    pub fn from_info(info: &LvInfo) -> LvDisk {
        LvDisk {
            vg: info.vg.clone(),
            lv: info.name.clone(),
            size: info.size,
            thin: info.is_thin(),
        }
    }
}

/// One snapshot to make: `cow_size = Some(bytes)` for a classic snapshot, `None` for a
/// thin one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub vg: String,
    pub lv: String,
    pub cow_size: Option<u64>,
}

impl SnapshotRequest {
    /// Pairs disks with the sizes [`plan_snapshot_space`] returned for them.
    pub fn planned(disks: &[LvDisk], cow_sizes: &[Option<u64>]) -> Vec<SnapshotRequest> {
        disks
            .iter()
            .zip(cow_sizes)
            .map(|(d, s)| SnapshotRequest {
                vg: d.vg.clone(),
                lv: d.lv.clone(),
                cow_size: *s,
            })
            .collect()
    }
}

/// A snapshot virtkeep made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LvSnapshot {
    pub vg: String,
    /// The origin LV (the VM's disk).
    pub origin: String,
    /// The snapshot LV's name.
    pub name: String,
    /// `/dev/VG/NAME`: what to export or read.
    pub path: String,
    pub thin: bool,
}

/// What [`probe`] found on a host, for `host check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmProbe {
    /// `2.03.16` from `lvm version`, when the tools are there.
    pub version: Option<String>,
    /// `lvs --reportformat json` works.
    pub json_reporting: bool,
    /// `thin_delta` (thin-provisioning-tools) is installed: changed blocks of thin LVs
    /// can be listed without reading them.
    pub thin_delta: bool,
}

/// `/dev/VG/LV` or `/dev/mapper/VG-LV` → `(VG, LV)`; `None` for anything else. A guess
/// from the path: confirm it with [`lv_info`].
pub fn parse_lv_path(path: &str) -> Option<(String, String)> {
    virtkeep_libvirt::lvm_from_path(path)
}

/// `/dev/VG/LV`.
pub fn lv_path(vg: &str, lv: &str) -> String {
    format!("/dev/{vg}/{lv}")
}

/// The name of the snapshot of `vg/lv` for job `job_id`: `{lv}-vksnap-{job_id}`, with the
/// origin part shortened as far as needed for LVM's 127-character limit and for the
/// device-mapper name of the snapshot's COW device (`VG-NAME-cow`, every `-` doubled,
/// at most 127 characters). Characters LVM does not allow in names become `_`.
pub fn snapshot_name(vg: &str, lv: &str, job_id: &str) -> String {
    let job: String = job_id
        .chars()
        .map(|c| if name_char(c) { c } else { '_' })
        .collect();
    let suffix = format!("{LV_SNAPSHOT_MARKER}{job}");
    let dm_budget = DM_NAME_MAX.saturating_sub(dm_len(vg) + 1 + "-cow".len());
    let mut prefix: String = lv
        .chars()
        .map(|c| if name_char(c) { c } else { '_' })
        .collect();
    loop {
        let name = format!("{prefix}{suffix}");
        let fits = name.len() <= LVM_NAME_MAX && dm_len(&name) <= dm_budget;
        if fits || prefix.chars().count() <= 1 {
            return name;
        }
        prefix.pop();
    }
}

/// `name` is a snapshot virtkeep made of `vg/origin` (by its name, for any job).
pub fn is_snapshot_name_of(vg: &str, origin: &str, name: &str) -> bool {
    let Some(at) = name.rfind(LV_SNAPSHOT_MARKER) else {
        return false;
    };
    let job = &name[at + LV_SNAPSHOT_MARKER.len()..];
    !job.is_empty() && snapshot_name(vg, origin, job) == name
}

/// Copy-on-write size of a classic snapshot of an LV of `size` bytes: `share` of it,
/// at least `floor`, at most what LVM can use (the origin plus its exception table),
/// rounded up to whole extents.
pub fn cow_size_for(size: u64, share: f64, floor: u64, extent: u64) -> u64 {
    let extent = if extent == 0 { DEFAULT_EXTENT } else { extent };
    let wanted = ((size as f64) * share).ceil();
    let wanted = if wanted.is_finite() && wanted > 0.0 {
        wanted.min(u64::MAX as f64) as u64
    } else {
        0
    };
    let cap = size.saturating_add(size / 64).saturating_add(extent);
    let bytes = wanted.max(floor).min(cap).max(extent);
    bytes.div_ceil(extent).saturating_mul(extent)
}

// ───────────────────────────── running LVM commands ─────────────────────────────

fn too_old(host: &Host, detail: &str) -> Error {
    Error::unsupported(format!(
        "LVM on host {} cannot report in JSON ({detail}); virtkeep needs LVM ≥ {MIN_LVM_VERSION} (RHEL/CentOS 7.3, Debian 9, Ubuntu 18.04)",
        host.name
    ))
    .hint("update the lvm2 package on the host")
}

/// Runs an LVM reporting command; turns "no LVM" and "LVM too old" into clear errors.
async fn report(host: &Host, cmd: RemoteCommand, what: &str) -> Result<String> {
    let out = host.exec(&cmd).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status == 127 {
        return Err(Error::unsupported(format!(
            "the LVM tools are not installed on host {} ({what}: command not found)",
            host.name
        ))
        .hint(format!("install lvm2 ≥ {MIN_LVM_VERSION} on the host")));
    }
    if out.status != 0 {
        let s = stderr.trim();
        if s.contains("reportformat") || s.contains("nrecogni") {
            return Err(too_old(host, s));
        }
        return Err(Error::new(
            ErrorKind::Remote,
            format!("`{what}` failed on host {}: {s}", host.name),
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| {
        Error::new(
            ErrorKind::Remote,
            format!("`{what}` printed output that is not UTF-8"),
        )
    })
}

fn parse_failed(host: &Host, text: &str, e: virtkeep_libvirt::ParseError) -> Error {
    if text.trim_start().starts_with('{') {
        Error::new(
            ErrorKind::Remote,
            format!("unexpected LVM report from host {}: {e}", host.name),
        )
        .with_source(e)
    } else {
        too_old(host, "the report is not JSON")
    }
}

/// All LVs (of one VG, or of all).
pub async fn list_lvs(host: &Host, vg: Option<&str>) -> Result<Vec<LvInfo>> {
    let text = report(host, lvm_cmd::lvs_json(vg), "lvs")
        .await
        .map_err(|e| match vg {
            Some(vg) if e.message.contains("not found") => Error::new(
                ErrorKind::Remote,
                format!("volume group {vg} not found on host {}", host.name),
            )
            .hint("`vgs` on the host lists its volume groups; restore elsewhere with --storage lvm:VG"),
            _ => e,
        })?;
    lvm_cmd::parse_lvs_json(&text).map_err(|e| parse_failed(host, &text, e))
}

/// All VGs of the host.
pub async fn list_vgs(host: &Host) -> Result<Vec<VgInfo>> {
    let text = report(host, lvm_cmd::vgs_json(), "vgs").await?;
    lvm_cmd::parse_vgs_json(&text).map_err(|e| parse_failed(host, &text, e))
}

/// One VG.
pub async fn vg_info(host: &Host, vg: &str) -> Result<VgInfo> {
    list_vgs(host)
        .await?
        .into_iter()
        .find(|v| v.name == vg)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Remote,
                format!("volume group {vg} not found on host {}", host.name),
            )
            .hint("`vgs` on the host lists its volume groups")
        })
}

/// One LV.
pub async fn lv_info(host: &Host, vg: &str, lv: &str) -> Result<LvInfo> {
    list_lvs(host, Some(vg))
        .await?
        .into_iter()
        .find(|l| l.name == lv)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Remote,
                format!("logical volume {vg}/{lv} not found on host {}", host.name),
            )
            .hint("`lvs` on the host lists its logical volumes")
        })
}

/// LVM version, JSON reporting and `thin_delta` on the host, for `host check`. Never
/// fails because of LVM itself (missing tools give `version: None`).
pub async fn probe(host: &Host) -> Result<LvmProbe> {
    let out = host.exec(&lvm_cmd::version()).await?;
    let version = if out.status == 0 {
        parse_lvm_version(&String::from_utf8_lossy(&out.stdout))
    } else {
        None
    };
    let json_reporting = match &version {
        Some(v) => {
            lvm_version_has_json(v)
                && host
                    .exec(&lvm_cmd::vgs_json())
                    .await
                    .map(|o| o.status == 0 && o.stdout.trim_ascii_start().starts_with(b"{"))
                    .unwrap_or(false)
        }
        None => false,
    };
    let thin_delta = has_thin_delta(host).await?;
    Ok(LvmProbe {
        version,
        json_reporting,
        thin_delta,
    })
}

// ───────────────────────────── snapshots ─────────────────────────────

/// Copy-on-write sizes for snapshots of `disks` (`None` for thin LVs), after checking
/// that each VG has room for all of its classic snapshots and that no thin pool is
/// nearly full. `share` is the part of each origin's size to reserve (0 < share ≤ 1 makes
/// sense; more is capped at what LVM can use), `floor` the minimum in bytes.
pub async fn plan_snapshot_space(
    host: &Host,
    disks: &[LvDisk],
    share: f64,
    floor: u64,
) -> Result<Vec<Option<u64>>> {
    if !share.is_finite() || share <= 0.0 {
        return Err(Error::config(format!(
            "the LVM snapshot share must be a positive fraction, not {share}"
        )));
    }
    let vgs = if disks.iter().any(|d| !d.thin) {
        list_vgs(host).await?
    } else {
        Vec::new()
    };
    let mut sizes = Vec::with_capacity(disks.len());
    let mut need: BTreeMap<&str, u64> = BTreeMap::new();
    let mut thin_vgs: Vec<&str> = Vec::new();
    for d in disks {
        if d.thin {
            sizes.push(None);
            if !thin_vgs.contains(&d.vg.as_str()) {
                thin_vgs.push(&d.vg);
            }
            continue;
        }
        let vg = vgs.iter().find(|v| v.name == d.vg).ok_or_else(|| {
            Error::new(
                ErrorKind::Remote,
                format!("volume group {} not found on host {}", d.vg, host.name),
            )
        })?;
        let cow = cow_size_for(d.size, share, floor, vg.extent_size);
        *need.entry(&d.vg).or_default() += cow;
        sizes.push(Some(cow));
    }
    for (vg_name, needed) in &need {
        let vg = vgs
            .iter()
            .find(|v| v.name == *vg_name)
            .expect("looked up above");
        if *needed > vg.free {
            return Err(Error::conflict(format!(
                "volume group {vg_name} has {} free, the snapshots need {}",
                human_bytes(vg.free),
                human_bytes(*needed)
            ))
            .hint(
                "a classic LVM snapshot needs free extents in the VG for every block the VM writes during the backup: \
                 add space to the volume group (vgextend) or remove unused LVs, or lower the snapshot share/floor in the settings",
            ));
        }
    }
    // thin snapshots take no VG space, but the VM's writes during the backup fill the pool
    for vg in thin_vgs {
        let lvs = list_lvs(host, Some(vg)).await?;
        for d in disks.iter().filter(|d| d.thin && d.vg == vg) {
            let pool = lvs
                .iter()
                .find(|l| l.name == d.lv)
                .and_then(|l| l.pool_lv.clone());
            let Some(pool) = pool else { continue };
            let Some(p) = lvs.iter().find(|l| l.name == pool) else {
                continue;
            };
            if let Some(pct) = p.data_percent
                && pct >= THIN_POOL_FULL_PERCENT
            {
                return Err(Error::conflict(format!(
                    "thin pool {vg}/{pool} is {pct:.1}% full; a snapshot of {vg}/{} could let the VM's writes fill it",
                    d.lv
                ))
                .hint("extend the thin pool (lvextend -L +SIZE VG/POOL) or free space in it before backing up"));
            }
        }
    }
    Ok(sizes)
}

/// Makes one snapshot per request, named [`snapshot_name`]`(vg, lv, job_id)`. All or
/// nothing: when one fails, the ones made are removed again and the error is returned.
pub async fn create_snapshots(
    host: &Host,
    requests: &[SnapshotRequest],
    job_id: &str,
) -> Result<Vec<LvSnapshot>> {
    let mut made: Vec<LvSnapshot> = Vec::with_capacity(requests.len());
    for r in requests {
        let name = snapshot_name(&r.vg, &r.lv, job_id);
        let out = host
            .exec(&lvm_cmd::lvcreate_snapshot(&r.vg, &r.lv, &name, r.cow_size))
            .await;
        let failure = match out {
            Ok(o) if o.status == 0 => None,
            Ok(o) => Some(Error::new(
                ErrorKind::Remote,
                format!(
                    "creating the LVM snapshot of {}/{} failed: {}",
                    r.vg,
                    r.lv,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )),
            Err(e) => Some(e.context(format!("creating the LVM snapshot of {}/{}", r.vg, r.lv))),
        };
        if let Some(err) = failure {
            // a half-made snapshot may exist too
            let partial = LvSnapshot {
                vg: r.vg.clone(),
                origin: r.lv.clone(),
                path: lv_path(&r.vg, &name),
                name,
                thin: r.cow_size.is_none(),
            };
            made.push(partial);
            if let Err(e) = remove_snapshots(host, &made).await {
                tracing::warn!(host = %host.name, error = %e, "removing the snapshots made so far failed; `virtkeep cleanup` removes them");
            }
            return Err(err);
        }
        tracing::debug!(host = %host.name, vg = %r.vg, lv = %r.lv, snapshot = %name, "LVM snapshot created");
        made.push(LvSnapshot {
            vg: r.vg.clone(),
            origin: r.lv.clone(),
            path: lv_path(&r.vg, &name),
            name,
            thin: r.cow_size.is_none(),
        });
    }
    Ok(made)
}

/// Fails when the snapshot is gone, overflowed (invalid) or its thin pool failed: its
/// content is then not the backup instant and must not be stored. Call it after the last
/// read of the snapshot.
pub async fn check_snapshot_valid(host: &Host, snap: &LvSnapshot) -> Result<()> {
    let lvs = list_lvs(host, Some(&snap.vg)).await?;
    let Some(info) = lvs.iter().find(|l| l.name == snap.name) else {
        return Err(Error::new(
            ErrorKind::DataPath,
            format!(
                "the LVM snapshot {}/{} disappeared during the backup",
                snap.vg, snap.name
            ),
        ));
    };
    snapshot_state(info).map_err(|why| {
        Error::new(
            ErrorKind::DataPath,
            format!("the LVM snapshot {}/{} of {} {why}: its content is no longer the backup instant, nothing of it is kept", snap.vg, snap.name, snap.origin),
        )
        .hint("the VM wrote more than the snapshot's copy-on-write space during the backup: raise the LVM snapshot share or floor, or back up at a quieter time")
    })
}

/// Removes the snapshots (each tried, also after an earlier one failed); the first
/// error is returned. A snapshot that is gone already counts as removed.
pub async fn remove_snapshots(host: &Host, snaps: &[LvSnapshot]) -> Result<()> {
    let mut first_err = None;
    for s in snaps {
        if let Err(e) = remove_lv(host, &s.vg, &s.name).await
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `lvremove -f`, retried while the LV is still in use (a qemu-nbd that is exiting);
/// an LV that does not exist counts as removed.
pub async fn remove_lv(host: &Host, vg: &str, name: &str) -> Result<()> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
        }
        let out = host.exec(&lvm_cmd::lvremove(vg, name)).await?;
        if out.status == 0 {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if last.contains("Failed to find") || last.contains("not found") {
            return Ok(());
        }
        if !(last.contains("in use") || last.contains("open") || last.contains("busy")) {
            break;
        }
    }
    Err(Error::new(ErrorKind::Remote, format!("removing the logical volume {vg}/{name} failed: {last}"))
        .hint("`virtkeep cleanup HOST` retries; `lvs -o+lv_attr` on the host shows whether something still holds it open"))
}

/// For `cleanup`: removes every LV in the VGs of `origins` that is a virtkeep snapshot of
/// one of them (`{origin}-vksnap-*`, of any job), after stopping any qemu-nbd (or `dd`)
/// still reading it. Returns the removed LVs as `VG/NAME`.
pub async fn remove_leftover_snapshots(
    host: &Host,
    origins: &[(String, String)],
) -> Result<Vec<String>> {
    let mut by_vg: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (vg, name) in find_leftover_snapshots(host, origins).await? {
        by_vg.entry(vg).or_default().push(name);
    }
    let mut removed = Vec::new();
    let mut first_err = None;
    for (vg, leftovers) in by_vg {
        let holders = reader_processes(host).await?;
        for name in leftovers {
            let paths = [
                lv_path(vg, &name),
                format!(
                    "/dev/mapper/{}-{}",
                    vg.replace('-', "--"),
                    name.replace('-', "--")
                ),
            ];
            for (pid, _) in holders
                .iter()
                .filter(|(_, args)| paths.iter().any(|p| mentions_path(args, p)))
            {
                stop_process(host, *pid).await?;
            }
            match remove_lv(host, vg, &name).await {
                Ok(()) => removed.push(format!("{vg}/{name}")),
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Every LV in the VGs of `origins` that is a virtkeep snapshot of one of them (of any
/// job), as `(VG, NAME)`: what [`remove_leftover_snapshots`] removes.
pub async fn find_leftover_snapshots<'a>(
    host: &Host,
    origins: &'a [(String, String)],
) -> Result<Vec<(&'a str, String)>> {
    let mut by_vg: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (vg, lv) in origins {
        by_vg.entry(vg).or_default().push(lv);
    }
    let mut out = Vec::new();
    for (vg, lvs_of_vg) in by_vg {
        let lvs = list_lvs(host, Some(vg)).await?;
        out.extend(
            lvs.iter()
                .filter(|l| {
                    l.name.contains(LV_SNAPSHOT_MARKER)
                        && !l.tags.iter().any(|t| t == BASE_TAG)
                        && lvs_of_vg
                            .iter()
                            .any(|o| is_snapshot_name_of(vg, o, &l.name))
                })
                .map(|l| (vg, l.name.clone())),
        );
    }
    Ok(out)
}

/// `(pid, command line)` of every qemu-nbd and dd on the host (what reads a snapshot).
async fn reader_processes(host: &Host) -> Result<Vec<(u32, String)>> {
    let mut all = Vec::new();
    for prog in ["qemu-nbd", "dd"] {
        let out = host.exec(&coreutils::pgrep_exact(prog)).await?;
        // 1: none found; 127: no pgrep (then nothing can be checked)
        if out.status != 0 {
            continue;
        }
        all.extend(parse_pgrep(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(all)
}

/// SIGTERM, up to 10 s for it to go, then SIGKILL.
async fn stop_process(host: &Host, pid: u32) -> Result<()> {
    tracing::info!(host = %host.name, pid, "stopping a process that still reads a leftover snapshot");
    host.exec(&coreutils::kill(Signal::Term, pid)).await?;
    for _ in 0..40 {
        // a zombie (exited, not yet reaped) has an empty cmdline and holds no LV open
        let alive = host.exec(&coreutils::process_alive(pid)).await?;
        if alive.status != 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    host.exec(&coreutils::kill(Signal::Kill, pid)).await?;
    Ok(())
}

// ───────────────────────────── thin_delta ─────────────────────────────

/// `thin_delta` (thin-provisioning-tools) is installed on the host.
pub async fn has_thin_delta(host: &Host) -> Result<bool> {
    Ok(host.exec(&lvm_cmd::has_thin_delta()).await?.status == 0)
}

/// Marks (or unmarks) a thin snapshot as the kept base of its origin.
pub async fn set_base_tag(host: &Host, vg: &str, name: &str, on: bool) -> Result<()> {
    host.run(&lvm_cmd::set_base_tag(vg, name, on))
        .await
        .map_err(|e| e.context(format!("tagging the LVM snapshot {vg}/{name}")))?;
    Ok(())
}

/// Kept base snapshots (tagged [`BASE_TAG`]) of `vg/origin`.
pub async fn base_snapshots(host: &Host, vg: &str, origin: &str) -> Result<Vec<LvInfo>> {
    Ok(list_lvs(host, Some(vg))
        .await?
        .into_iter()
        .filter(|l| {
            l.tags.iter().any(|t| t == BASE_TAG) && is_snapshot_name_of(vg, origin, &l.name)
        })
        .collect())
}

/// The byte ranges in which thin LVs `base` and `new` (snapshots of one origin, in
/// `vg/pool`) differ, from the pool's metadata: no data is read.
pub async fn thin_changed_ranges(
    host: &Host,
    vg: &str,
    pool: &str,
    base: &str,
    new: &str,
) -> Result<Vec<(u64, u64)>> {
    let xml = host
        .run_string(&lvm_cmd::thin_delta(vg, pool, base, new))
        .await
        .map_err(|e| e.context(format!("listing the changes of {vg}/{new} with thin_delta")))?;
    parse_thin_delta(&xml).map_err(|why| {
        Error::new(
            ErrorKind::Remote,
            format!("unexpected thin_delta output for {vg}/{new}: {why}"),
        )
    })
}

// ───────────────────────────── restore ─────────────────────────────

/// Creates the LV `vg/name` of `size` bytes (rounded up by LVM to whole extents) for a
/// restore, thin in `thin_pool` when given; refuses when it exists or the VG (thick) has
/// no room. Returns `/dev/VG/NAME`. A thick LV is not zeroed beyond its first KiB: write
/// the holes as zeros. A thin LV reads zeros where nothing was written.
pub async fn create_lv(
    host: &Host,
    vg: &str,
    name: &str,
    size: u64,
    thin_pool: Option<&str>,
) -> Result<String> {
    if !valid_new_lv_name(name) {
        return Err(
            Error::config(format!("{name:?} is not a valid LVM logical volume name")).hint(
                "LV names may hold letters, digits and + _ . - (not first), up to 127 characters",
            ),
        );
    }
    let lvs = list_lvs(host, Some(vg)).await?;
    if lvs.iter().any(|l| l.name == name) {
        return Err(Error::conflict(format!("logical volume {vg}/{name} exists already on host {}", host.name))
            .hint("restore under another name, or remove that LV (lvremove) after making sure nothing uses it"));
    }
    let cmd = match thin_pool {
        Some(pool) => {
            match lvs.iter().find(|l| l.name == pool) {
                Some(p) if p.is_thin_pool() => {}
                _ => {
                    return Err(Error::new(
                        ErrorKind::Remote,
                        format!("thin pool {vg}/{pool} not found on host {}", host.name),
                    )
                    .hint("restore as a thick LV, or name an existing thin pool"));
                }
            }
            lvm_cmd::lvcreate_thin(vg, name, size, pool)
        }
        None => {
            let info = vg_info(host, vg).await?;
            let extent = if info.extent_size == 0 {
                DEFAULT_EXTENT
            } else {
                info.extent_size
            };
            let needed = size.div_ceil(extent) * extent;
            if needed > info.free {
                return Err(Error::conflict(format!(
                    "volume group {vg} has {} free, the restored disk needs {}",
                    human_bytes(info.free),
                    human_bytes(needed)
                ))
                .hint(
                    "restore into another volume group (--storage lvm:VG) or make room in this one",
                ));
            }
            lvm_cmd::lvcreate(vg, name, size)
        }
    };
    let out = host.exec(&cmd).await?;
    if out.status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "creating the logical volume {vg}/{name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(lv_path(vg, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "20250102T030405Z-0a1b2c3d";

    #[test]
    fn snapshot_names() {
        let n = snapshot_name("vg0", "web-root", JOB);
        assert_eq!(n, "web-root-vksnap-20250102T030405Z-0a1b2c3d");
        assert!(valid_new_lv_name(&n));
        assert!(is_snapshot_name_of("vg0", "web-root", &n));
        assert!(!is_snapshot_name_of("vg0", "web", &n));
        assert!(!is_snapshot_name_of("vg0", "web-root", "web-root"));
        assert!(!is_snapshot_name_of("vg0", "web-root", "web-root-vksnap-"));
        // hostile job ids cannot leave LVM's character set
        let n = snapshot_name("vg0", "a", "x y/$(z)");
        assert!(n.chars().all(name_char), "{n}");
    }

    #[test]
    fn long_names_are_shortened_and_still_recognised() {
        let lv = "d".repeat(127);
        let n = snapshot_name("vg0", &lv, JOB);
        assert!(n.len() <= LVM_NAME_MAX, "{}", n.len());
        assert!(n.ends_with(&format!("{LV_SNAPSHOT_MARKER}{JOB}")));
        assert!(dm_len("vg0") + 1 + dm_len(&n) + 4 <= DM_NAME_MAX);
        assert!(is_snapshot_name_of("vg0", &lv, &n));
        // another origin with the same shortened prefix is not matched
        let other = format!("{}e", "d".repeat(126));
        assert!(!is_snapshot_name_of("vg0", &other, &n) || snapshot_name("vg0", &other, JOB) == n);
        // dashes count twice in device-mapper names
        let lv = "a-".repeat(60);
        let vg = "v-g".repeat(5);
        let n = snapshot_name(&vg, &lv, JOB);
        assert!(dm_len(&vg) + 1 + dm_len(&n) + 4 <= DM_NAME_MAX, "{n}");
        assert!(is_snapshot_name_of(&vg, &lv, &n));
    }

    #[test]
    fn cow_sizes() {
        const MIB: u64 = 1 << 20;
        const EXT: u64 = 4 * MIB;
        // share of the origin, rounded up to extents
        assert_eq!(cow_size_for(1024 * MIB, 0.1, 0, EXT), 104 * MIB);
        // floor
        assert_eq!(cow_size_for(64 * MIB, 0.1, 32 * MIB, EXT), 32 * MIB);
        // ... but not beyond what the origin can use
        assert_eq!(cow_size_for(16 * MIB, 0.1, 32 * MIB, EXT), 24 * MIB);
        // never more than the origin can use (+ exception table, + 1 extent)
        assert_eq!(cow_size_for(64 * MIB, 5.0, 0, EXT), 72 * MIB);
        assert_eq!(cow_size_for(64 * MIB, 1.0, 1 << 40, EXT), 72 * MIB);
        // at least one extent
        assert_eq!(cow_size_for(0, 0.1, 0, EXT), EXT);
        assert_eq!(cow_size_for(MIB, 0.1, 0, 0), DEFAULT_EXTENT);
    }
}
