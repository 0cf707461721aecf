//! `virtkeep verify SNAPSHOT --boot --to HOST`: prove that a backup boots, without
//! copying it and without writing to the repository.
//!
//! The node serves the backup's disks read-only over NBD ([`crate::live`]); the host
//! reaches that server through the SSH connection (a unix socket its sshd listens on
//! for us). Each disk gets a qcow2 overlay in a private job directory on the host, over
//! that export; a transient domain made from the backup's XML (new name, UUID and MACs,
//! NICs down, serial port logged to a file, any reset or crash ending it, nothing of
//! the host its XML names: [`virtkeep_libvirt::isolate_for_boot`]) runs on the
//! overlays. It passes when it is still running at the timeout and, if asked, its
//! serial output matched and its guest agent answered `guest-ping` (through a
//! guest-agent channel the domain gets instead of the source's channels). Then the domain is destroyed and the job directory removed.

use std::time::{Duration, Instant};

use serde::Serialize;
use virtkeep_libvirt::virsh::{DomainState, parse_domstate};
use virtkeep_libvirt::{Isolation, NewSource, Rewrite, coreutils, isolate_for_boot};

use crate::error::{Error, Result};
use crate::host::Host;
use crate::live::LiveBackup;

/// How often the domain's state and serial log are looked at.
const POLL: Duration = Duration::from_millis(250);
/// The serial log read for matching (its first bytes: a boot marker comes early).
const SERIAL_READ: u64 = 1 << 20;
/// The serial log kept in the report (its last bytes).
const SERIAL_REPORT: usize = 4096;
/// The largest screenshot taken back to the node.
const SCREENSHOT_MAX: u64 = 32 << 20;
/// Longest `--expect-serial` pattern, and the compiled program's size limit.
const REGEX_MAX: usize = 1024;

/// What `verify --boot` checks.
#[derive(Debug, Clone)]
pub struct BootVerifyOptions {
    /// How long the guest must keep running.
    pub timeout: Duration,
    /// A regular expression the serial log must match within the timeout.
    pub expect_serial: Option<String>,
    /// The guest agent must answer `guest-ping` within the timeout.
    pub agent: bool,
}

/// The outcome of one boot verification (stable `--json`: additions only).
#[derive(Debug, Clone, Serialize)]
pub struct BootVerifyReport {
    pub snapshot: String,
    pub host: String,
    pub vm: String,
    /// The transient domain's name.
    pub domain: String,
    pub passed: bool,
    /// Why it failed.
    pub reason: Option<String>,
    pub timeout_secs: f64,
    /// From `virsh create` to a running domain.
    pub time_to_running_secs: f64,
    /// How long the domain was watched running.
    pub ran_secs: f64,
    pub expect_serial: Option<String>,
    /// Whether the serial log matched (`None` when no pattern was given).
    pub serial_matched: Option<bool>,
    /// Whether the guest agent answered `guest-ping` (`None` without `--agent`).
    pub agent_answered: Option<bool>,
    /// The end of the serial log (lossy UTF-8).
    pub serial_log: String,
    /// Why no screenshot could be taken (e.g. the domain has no display).
    pub screenshot_error: Option<String>,
    /// The screenshot (PPM or PNG as QEMU wrote it).
    #[serde(skip)]
    pub screenshot: Option<Vec<u8>>,
}

/// Compiles `--expect-serial`, bounded in length and program size.
fn compile(pattern: Option<&str>) -> Result<Option<regex::bytes::Regex>> {
    let Some(p) = pattern else { return Ok(None) };
    if p.len() > REGEX_MAX {
        return Err(Error::config(format!(
            "--expect-serial: the pattern is longer than {REGEX_MAX} bytes"
        )));
    }
    regex::bytes::RegexBuilder::new(p)
        .size_limit(1 << 20)
        .build()
        .map(Some)
        .map_err(|e| Error::config(format!("--expect-serial {p:?}: {e}")))
}

/// Boot backup `id` on `host` as a transient domain and watch it (see the module doc).
pub async fn verify_boot(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    id: &str,
    opts: &BootVerifyOptions,
    interrupted: impl std::future::Future<Output = ()>,
) -> Result<BootVerifyReport> {
    let re = compile(opts.expect_serial.as_deref())?;
    refuse_unbootable(repo, id).await?;
    let name = format!(
        "{DOMAIN_PREFIX}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // The job's lock, keyed by its name: `cleanup` removes the domain and job directory
    // of a verification only once this lock is gone (its node killed).
    // The clean-up below destroys the domain by this UUID, never by name: a domain of
    // that name that is not ours (`virsh create` refused it) is left alone.
    let uuid = uuid::Uuid::new_v4().to_string();
    let lock = host.lock_vm(&name, 0).await?;
    let live = match LiveBackup::start(host, repo, id, &name).await {
        Ok(live) => live,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    // A signal ends the watch, never the clean-up below.
    let res = tokio::select! {
        r = boot_and_watch(host, &live, (&name, &uuid), opts, re.as_ref()) => r,
        _ = interrupted => Err(Error::new(
            crate::error::ErrorKind::Interrupted,
            format!("interrupted; {name} was destroyed and its overlays removed"),
        )),
    };
    // Whatever happened: no domain, forward, overlay or socket is left.
    let _ = host.exec(&host.virsh().destroy(&uuid)).await;
    live.finish(host).await;
    lock.release().await;
    let mut r = res?;
    r.snapshot = id.to_string();
    Ok(r)
}

/// Refused before anything is started on the host:
/// - A UEFI backup (an NVRAM store in its XML): booting it would need the store copied
///   per run and the firmware paths of the host, which verification does not handle yet.
/// - A backup whose `<os>` names host files QEMU loads into the guest (`<kernel>`,
///   `<initrd>`, `<dtb>`, ACPI tables): the XML is untrusted, and libvirt would label
///   any file it names for QEMU (DAC owner, AppArmor rule) and load it into the
///   memory of a guest whose serial output comes back in the report. Nor would it
///   prove anything about the backup: that kernel is not in it.
async fn refuse_unbootable(repo: &virtkeep_repo::Repository, id: &str) -> Result<()> {
    let m = repo.manifest(id).await?;
    let dom = virtkeep_libvirt::parse_domain(&m.domain_xml)?;
    let restore_hint = format!(
        "restore it under a new name and start the copy instead: virtkeep restore {id} --to HOST --name NEW --storage file:/DIR --start (then check it and remove it)"
    );
    if dom.nvram.is_some() {
        return Err(Error::unsupported(format!(
            "backup {id} is of a UEFI domain (it has an NVRAM store): verify --boot cannot boot it from the repository yet"
        ))
        .hint(restore_hint));
    }
    if !dom.host_boot_files.is_empty() {
        let what: Vec<String> = dom
            .host_boot_files
            .iter()
            .map(|e| format!("<{e}>"))
            .collect();
        return Err(Error::unsupported(format!(
            "backup {id} boots from files of the host its XML names ({} in <os>): verify --boot boots a backup from its disks only and never hands a backup's host paths to QEMU",
            what.join(", ")
        ))
        .hint(format!(
            "give the guest a boot loader on its disk (then a new backup verifies), or {restore_hint}"
        )));
    }
    Ok(())
}

async fn boot_and_watch(
    host: &Host,
    live: &LiveBackup,
    (name, uuid): (&str, &str),
    opts: &BootVerifyOptions,
    re: Option<&regex::bytes::Regex>,
) -> Result<BootVerifyReport> {
    let m = live.manifest();
    let serial = format!("{}/serial.log", live.dir());
    let overlays = live.create_overlays(host).await?;
    let mut rw = Rewrite {
        name: Some(name.to_string()),
        new_uuid: Some(uuid.to_string()),
        regenerate_macs: true,
        remove_disks: live.disks_not_backed_up()?,
        disk_sources: overlays
            .iter()
            .map(|(t, path)| {
                let src = NewSource::File {
                    path: path.clone(),
                    format: "qcow2".into(),
                };
                (t.clone(), src)
            })
            .collect(),
        drop_backing_store: true,
        ..Rewrite::default()
    };
    if let Some(note) = crate::define::fit_to_host(host, &m.domain_xml, &mut rw).await? {
        tracing::info!(host = %host.name, "{note}");
    }
    let xml = virtkeep_libvirt::rewrite_domain(&m.domain_xml, &rw)?;
    let iso = Isolation {
        serial_log: Some(serial.clone()),
        nbd_backing: live.nbd_backing(),
        links_up: false,
        stop_on_reset: true,
        agent_channel: opts.agent,
    };
    let xml = isolate_for_boot(&xml, &iso)?;
    let xml_path = format!("{}/domain.xml", live.dir());
    host.upload(&xml_path, xml.as_bytes()).await?;
    let t0 = Instant::now();
    host.run(&host.virsh().create(&xml_path))
        .await
        .map_err(|e| e.context("starting the verification domain"))?;
    crate::failpoint::hold(HOLD_RUNNING).await;
    let mut r = BootVerifyReport {
        snapshot: String::new(),
        host: host.name.clone(),
        vm: m.vm.clone(),
        domain: name.to_string(),
        passed: false,
        reason: None,
        timeout_secs: opts.timeout.as_secs_f64(),
        time_to_running_secs: t0.elapsed().as_secs_f64(),
        ran_secs: 0.0,
        expect_serial: opts.expect_serial.clone(),
        serial_matched: re.map(|_| false),
        agent_answered: opts.agent.then_some(false),
        serial_log: String::new(),
        screenshot_error: None,
        screenshot: None,
    };
    watch(host, uuid, &serial, opts.timeout, re, &mut r).await?;
    if r.reason.is_none() {
        screenshot(host, uuid, live.dir(), &mut r).await;
    }
    Ok(r)
}

/// Polls the domain's state and serial log until the timeout or until it stops; sets
/// `passed`/`reason`.
async fn watch(
    host: &Host,
    name: &str,
    serial: &str,
    timeout: Duration,
    re: Option<&regex::bytes::Regex>,
    r: &mut BootVerifyReport,
) -> Result<()> {
    let start = Instant::now();
    let mut log = Vec::new();
    loop {
        let state = domain_state(host, name).await?;
        r.ran_secs = start.elapsed().as_secs_f64();
        log = host
            .exec(&coreutils::head_bytes(serial, SERIAL_READ))
            .await
            .map(|o| o.stdout)
            .unwrap_or(log);
        if let Some(re) = re {
            r.serial_matched = Some(re.is_match(&log));
        }
        if r.agent_answered == Some(false) && state == Some(DomainState::Running) {
            r.agent_answered = Some(agent_answers(host, name).await);
        }
        if state != Some(DomainState::Running) {
            r.reason = Some(match state {
                Some(DomainState::Paused) => format!(
                    "the guest was paused after {:.1} s (an I/O error on a disk, or the host paused it)",
                    r.ran_secs
                ),
                Some(s) => format!("the guest stopped ({s:?}) after {:.1} s", r.ran_secs),
                None => format!(
                    "the guest stopped after {:.1} s (it reset, crashed or powered off)",
                    r.ran_secs
                ),
            });
            break;
        }
        if start.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(POLL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
    if r.reason.is_none() && r.serial_matched == Some(false) {
        r.reason = Some(format!(
            "the serial output did not match {:?} within {:.0} s",
            r.expect_serial.as_deref().unwrap_or_default(),
            timeout.as_secs_f64()
        ));
    }
    if r.reason.is_none() && r.agent_answered == Some(false) {
        r.reason = Some(format!(
            "the guest agent did not answer guest-ping within {:.0} s (is qemu-guest-agent installed and started in the guest?)",
            timeout.as_secs_f64()
        ));
    }
    r.passed = r.reason.is_none();
    let tail = log.len().saturating_sub(SERIAL_REPORT);
    r.serial_log = String::from_utf8_lossy(&log[tail..]).into_owned();
    Ok(())
}

/// Whether the guest agent answers `guest-ping` now (waiting at most a second).
async fn agent_answers(host: &Host, name: &str) -> bool {
    match host.exec(&host.virsh().agent_ping(name, 1)).await {
        Ok(o) => o.status == 0 && String::from_utf8_lossy(&o.stdout).contains("\"return\""),
        Err(_) => false,
    }
}

/// The domain's state; `None` when it is gone (a transient domain that stopped).
async fn domain_state(host: &Host, name: &str) -> Result<Option<DomainState>> {
    let out = host.exec(&host.virsh().domstate(name)).await?;
    if out.status != 0 {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_domstate(&text).ok())
}

/// Takes the screenshot on the host and brings it back (best effort: a domain without
/// a display has none, which the report says).
async fn screenshot(host: &Host, name: &str, dir: &str, r: &mut BootVerifyReport) {
    let path = format!("{dir}/screen");
    let taken = host.exec(&host.virsh().screenshot(name, &path)).await;
    let err = match taken {
        Ok(o) if o.status == 0 => {
            match host
                .exec(&coreutils::head_bytes(&path, SCREENSHOT_MAX))
                .await
            {
                Ok(img) if img.status == 0 && !img.stdout.is_empty() => {
                    r.screenshot = Some(img.stdout);
                    return;
                }
                Ok(img) => String::from_utf8_lossy(&img.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            }
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => e.to_string(),
    };
    r.screenshot_error = Some(err);
}

/// The transient domains of boot verification are named with this prefix, and so are
/// their job directories on the host (and their locks).
pub const DOMAIN_PREFIX: &str = "virtkeep-verify-";

/// Failpoint: hold once the verification domain runs (tests kill the node there).
pub const HOLD_RUNNING: &str = "verify-boot-running";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_bounded() {
        assert!(compile(None).expect("none").is_none());
        let re = compile(Some("VK-BOOT-[0-9]+")).expect("ok").expect("some");
        assert!(re.is_match(b"..VK-BOOT-42.."));
        assert!(compile(Some("(")).is_err());
        assert!(compile(Some(&"a".repeat(REGEX_MAX + 1))).is_err());
        assert!(
            compile(Some("a{1000}{1000}")).is_err(),
            "huge program accepted"
        );
    }
}
