//! `/metrics` in the Prometheus text format, computed from the catalog at each scrape
//! (so the figures survive restarts and need no counters in memory).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::catalog::{Catalog, VmStats};
use crate::error::Result;

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
    crate::sync_jobs::render_metrics(&mut out, &catalog.vm_stats_of("sync")?);
    Ok(out)
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
}
