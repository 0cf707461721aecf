//! `/metrics` in the Prometheus text format, computed from the catalog at each scrape
//! (so the figures survive restarts and need no counters in memory).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::catalog::{Catalog, VmStats};
use crate::error::Result;
use crate::maintenance_config::Task;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The VMs to report: every VM with a backup job in the catalog, and every VM a policy
/// names (`named`) even before its first job, so that a VM which never had a successful
/// backup has a series (its last success is 0) and the alert on its age fires.
fn vms(catalog: &Catalog, named: &BTreeSet<(String, String)>) -> Result<Vec<VmStats>> {
    let mut stats = catalog.vm_stats()?;
    let known: BTreeSet<(String, String)> = stats
        .iter()
        .map(|s| (s.host.clone(), s.vm.clone()))
        .collect();
    for (host, vm) in named.difference(&known) {
        stats.push(VmStats {
            host: host.clone(),
            vm: vm.clone(),
            last_success: None,
            last_bytes_read: None,
            last_bytes_new: None,
            last_duration: None,
            failures: 0,
            successes: 0,
        });
    }
    stats.sort_by(|a, b| (&a.host, &a.vm).cmp(&(&b.host, &b.vm)));
    Ok(stats)
}

/// The metrics text; `named` are the (host, VM) pairs the policies name.
pub fn render(catalog: &Catalog, named: &BTreeSet<(String, String)>) -> Result<String> {
    let stats = vms(catalog, named)?;
    let mut out = String::new();
    type Pick = fn(&VmStats) -> Option<f64>;
    let per_vm: [(&str, &str, &str, Pick); 6] = [
        (
            "virtkeep_backup_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the VM's last successful backup, 0 when it never had one.",
            |s| Some(s.last_success.unwrap_or(0) as f64),
        ),
        (
            "virtkeep_backup_last_bytes_read",
            "gauge",
            "Bytes read from the host by the VM's last successful backup.",
            |s| s.last_bytes_read.map(|v| v as f64),
        ),
        (
            "virtkeep_backup_last_bytes_new",
            "gauge",
            "Bytes the VM's last successful backup added to the repository.",
            |s| s.last_bytes_new.map(|v| v as f64),
        ),
        (
            "virtkeep_backup_last_duration_seconds",
            "gauge",
            "Duration of the VM's last successful backup.",
            |s| s.last_duration,
        ),
        (
            "virtkeep_backup_successes_total",
            "counter",
            "Successful backup jobs of the VM.",
            |s| Some(s.successes as f64),
        ),
        (
            "virtkeep_backup_failures_total",
            "counter",
            "Failed backup jobs (tries) of the VM.",
            |s| Some(s.failures as f64),
        ),
    ];
    for (name, kind, help, pick) in per_vm {
        family(&mut out, name, kind, help);
        for s in &stats {
            if let Some(v) = pick(s) {
                let _ = writeln!(
                    out,
                    "{name}{{host=\"{}\",vm=\"{}\"}} {v}",
                    label(&s.host),
                    label(&s.vm)
                );
            }
        }
    }
    family(
        &mut out,
        "virtkeep_jobs",
        "gauge",
        "Jobs in the catalog by status.",
    );
    for (status, n) in catalog.status_counts()? {
        let _ = writeln!(out, "virtkeep_jobs{{status=\"{}\"}} {n}", label(&status));
    }
    boot_verify(&mut out, &catalog.vm_stats_of("verify_boot")?);
    Ok(out)
}

/// The series of the tasks the daemon runs beside the queue (`[sync.NAME]`, the
/// repositories' GC and verify), from the catalog and the configured names (which have a
/// series before their first run): every node of a cluster exports the same figures, not
/// only the leader that runs them.
pub fn scheduled(
    out: &mut String,
    catalog: &Catalog,
    daemon: &crate::policy::DaemonConfig,
) -> Result<()> {
    per_name(
        out,
        ("sync", "sync"),
        daemon.syncs.iter().map(|j| j.name.as_str()),
        &catalog.vm_stats_of("sync")?,
        [
            "Unix time of the sync job's last success (in the catalog), 0 when none.",
            "Failed runs of the sync job in the catalog's job history.",
        ],
    );
    for (task, what) in [(Task::Gc, "GC"), (Task::Verify, "verify")] {
        let names = daemon.maintenance.iter().filter(|m| match task {
            Task::Gc => m.gc.is_some(),
            Task::Verify => m.verify.is_some(),
        });
        per_name(
            out,
            (task.kind(), "repository"),
            names.map(|m| m.name.as_str()),
            &catalog.vm_stats_of(task.kind())?,
            [
                &format!(
                    "Unix time of the repository's last successful {what} run by the daemon, 0 when none."
                ),
                &format!("Failed {what} runs of the repository in the catalog's job history."),
            ],
        );
    }
    Ok(())
}

/// `virtkeep_KIND_last_success_timestamp_seconds{LABEL="NAME"}` and
/// `virtkeep_KIND_failures_total{LABEL="NAME"}` for every configured `names` and every
/// name with runs of `kind` in the catalog (`recorded`: `vm` is the name).
fn per_name<'a>(
    out: &mut String,
    (kind, key): (&str, &str),
    names: impl Iterator<Item = &'a str>,
    recorded: &[VmStats],
    [help_ok, help_failed]: [&str; 2],
) {
    let mut all: std::collections::BTreeMap<&str, (i64, i64)> =
        names.map(|n| (n, (0, 0))).collect();
    for r in recorded {
        let e = all.entry(r.vm.as_str()).or_default();
        *e = (e.0.max(r.last_success.unwrap_or(0)), e.1 + r.failures);
    }
    if all.is_empty() {
        return;
    }
    let ok = format!("virtkeep_{kind}_last_success_timestamp_seconds");
    family(out, &ok, "gauge", help_ok);
    for (name, (t, _)) in &all {
        let _ = writeln!(out, "{ok}{{{key}=\"{}\"}} {t}", label(name));
    }
    let failed = format!("virtkeep_{kind}_failures_total");
    family(out, &failed, "counter", help_failed);
    for (name, (_, n)) in &all {
        let _ = writeln!(out, "{failed}{{{key}=\"{}\"}} {n}", label(name));
    }
}

/// The policies' boot verifications (`verify_boot` jobs), per VM that had one.
fn boot_verify(out: &mut String, stats: &[VmStats]) {
    type Pick = fn(&VmStats) -> i64;
    let families: [(&str, &str, &str, Pick); 2] = [
        (
            "virtkeep_boot_verify_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last boot verification of the VM's newest backup that passed, 0 when none did.",
            |s| s.last_success.unwrap_or(0),
        ),
        (
            "virtkeep_boot_verify_failures_total",
            "counter",
            "Boot verifications of the VM's backups that failed.",
            |s| s.failures,
        ),
    ];
    for (name, kind, help, pick) in families {
        family(out, name, kind, help);
        for s in stats {
            let _ = writeln!(
                out,
                "{name}{{host=\"{}\",vm=\"{}\"}} {}",
                label(&s.host),
                label(&s.vm),
                pick(s)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{JobOutcome, NewJob};

    #[test]
    fn renders_per_vm_series_with_escaped_labels() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let job = NewJob {
            run_id: None,
            kind: "backup",
            host: "kvm1",
            vm: "we\"ird",
            policy: None,
            request: "{}",
            attempt: 1,
            retry_of: None,
            priority: 0,
            not_before: 0,
        };
        let id = c.add_job(&job).expect("job");
        c.finish_job(
            id,
            &JobOutcome {
                bytes_new: Some(42),
                duration: Some(1.5),
                ..Default::default()
            },
        )
        .expect("finish");
        // A VM whose backup failed, and one a policy names that never had a job.
        let failed = c
            .add_job(&NewJob {
                vm: "broken",
                ..job.clone()
            })
            .expect("job");
        c.finish_job(
            failed,
            &JobOutcome {
                error: Some("no".into()),
                ..Default::default()
            },
        )
        .expect("finish");
        let named = BTreeSet::from([("kvm2".to_string(), "new".to_string())]);
        let text = render(&c, &named).expect("render");
        for vm in ["host=\"kvm1\",vm=\"broken\"", "host=\"kvm2\",vm=\"new\""] {
            assert!(
                text.contains(&format!(
                    "virtkeep_backup_last_success_timestamp_seconds{{{vm}}} 0\n"
                )),
                "{text}"
            );
        }
        assert!(
            text.contains("virtkeep_backup_failures_total{host=\"kvm1\",vm=\"broken\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("virtkeep_backup_last_bytes_new{host=\"kvm1\",vm=\"we\\\"ird\"} 42"),
            "{text}"
        );
        assert!(
            text.contains(
                "virtkeep_backup_last_duration_seconds{host=\"kvm1\",vm=\"we\\\"ird\"} 1.5"
            )
        );
        assert!(text.contains("virtkeep_jobs{status=\"succeeded\"} 1"));
        assert!(text.contains("# TYPE virtkeep_backup_failures_total counter"));
    }

    /// A node that never led (it ran no sync, GC or verify itself) exports their series
    /// from the catalog the leader writes, and a configured one before its first run.
    #[test]
    fn scheduled_task_series_come_from_the_catalog_on_every_node() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let run = |kind: &str, vm: &str, error: Option<&str>| {
            let id = c
                .start_job(
                    &NewJob {
                        run_id: None,
                        kind,
                        host: "",
                        vm,
                        policy: None,
                        request: "{}",
                        attempt: 1,
                        retry_of: None,
                        priority: 0,
                        not_before: 0,
                    },
                    "leader",
                    i64::MAX / 2,
                )
                .expect("start");
            let o = JobOutcome {
                error: error.map(String::from),
                ..Default::default()
            };
            c.finish_job(id, &o).expect("finish");
        };
        run("sync", "offsite", None);
        run("gc", "default", None);
        run("verify", "default", Some("1 missing"));
        let engine = toml::from_str(
            "[repository]\nlocation = \"/r\"\n[repositories.offsite]\nlocation = \"/o\"\n",
        )
        .expect("engine");
        let daemon = crate::policy::DaemonConfig::parse(
            std::path::Path::new("/c.toml"),
            "[sync.offsite]\nsource = \"default\"\ndestination = \"offsite\"\nevery = \"1h\"\n\
             [sync.later]\nsource = \"default\"\ndestination = \"offsite\"\nevery = \"1d\"\n\
             [maintenance.default]\ngc = { every = \"1d\" }\nverify = { every = \"7d\" }\n",
            &engine,
        )
        .expect("config");
        let mut text = String::new();
        scheduled(&mut text, &c, &daemon).expect("render");
        let value = |series: &str| -> i64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{series}: {text}"))
        };
        let t0 = crate::catalog::now() - 60;
        assert!(value("virtkeep_sync_last_success_timestamp_seconds{sync=\"offsite\"}") > t0);
        assert_eq!(
            value("virtkeep_sync_last_success_timestamp_seconds{sync=\"later\"}"),
            0
        );
        assert!(value("virtkeep_gc_last_success_timestamp_seconds{repository=\"default\"}") > t0);
        assert_eq!(
            value("virtkeep_verify_last_success_timestamp_seconds{repository=\"default\"}"),
            0
        );
        assert_eq!(
            value("virtkeep_verify_failures_total{repository=\"default\"}"),
            1
        );
        assert!(
            text.contains("# TYPE virtkeep_gc_failures_total counter"),
            "{text}"
        );
    }
}
