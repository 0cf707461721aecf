//! Full or incremental: from what each strategy found to build on.

use super::job::Job;
use super::strategy::{BaseSummary, Strategy};
use crate::error::Result;
use crate::plan::{ModeRequest, Plan};

/// The backup's mode, the reason said for it, and its parent.
pub struct Decision {
    pub mode: virtkeep_repo::BackupMode,
    pub reason: String,
    pub parent: Option<String>,
}

/// Asks every strategy for its bases (after the freeze) and decides.
pub async fn decide(
    job: &mut Job<'_>,
    plan: &Plan,
    strategies: &mut [Box<dyn Strategy>],
) -> Result<Decision> {
    let mut found = Vec::new();
    for s in strategies.iter_mut() {
        found.push(s.bases(job).await?);
    }
    let default = match job.opts.mode {
        ModeRequest::Full => "full backup requested".to_string(),
        ModeRequest::Auto | ModeRequest::Incremental => plan.full_reason(),
    };
    Ok(decision(plan, &found, default))
}

fn decision(plan: &Plan, found: &[BaseSummary], default: String) -> Decision {
    // The file disks' problem (the strategy listed last) names the likelier cause.
    let reason = found
        .iter()
        .rev()
        .find_map(|b| b.problem.clone())
        .unwrap_or(default);
    let Some(parent) = found.iter().find_map(|b| b.parent.clone()) else {
        return Decision {
            mode: virtkeep_repo::BackupMode::Full,
            reason,
            parent: None,
        };
    };
    let based: usize = found.iter().map(|b| b.based).sum();
    let alone = found
        .iter()
        .find(|b| b.based == plan.disks.len())
        .and_then(|b| b.detail.clone());
    let reason = match alone {
        Some(detail) => format!("incremental since backup {parent}: {detail}"),
        None if based == plan.disks.len() => format!(
            "incremental since backup {parent} (kept RBD snapshots / kept overlays; LVM volumes read whole, only changed chunks stored)"
        ),
        None => format!("incremental since backup {parent} for some disks; {reason}"),
    };
    Decision {
        mode: virtkeep_repo::BackupMode::Incremental,
        reason,
        parent: Some(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DiskKind, FreezeMethod, PlannedDisk};

    fn plan(n: usize) -> Plan {
        let disk = |i: usize| PlannedDisk {
            target: format!("vd{i}"),
            path: format!("/img/{i}"),
            format: "raw".into(),
            kind: DiskKind::File {
                path: format!("/img/{i}"),
            },
        };
        Plan {
            method: FreezeMethod::LiveSnapshot,
            disks: (0..n).map(disk).collect(),
            skipped: Vec::new(),
        }
    }

    fn based(n: usize, detail: Option<&str>) -> BaseSummary {
        BaseSummary {
            parent: Some("b1".into()),
            based: n,
            problem: None,
            detail: detail.map(str::to_string),
        }
    }

    /// The reasons of today's manifests: one strategy covering every disk says how it
    /// read them; bases for every disk, or only some (then the missing ones' problem).
    #[test]
    fn reasons() {
        let none = BaseSummary::default();
        let d = decision(&plan(2), &[none, based(2, Some("thin"))], "x".into());
        assert_eq!(d.reason, "incremental since backup b1: thin");
        assert_eq!(d.parent.as_deref(), Some("b1"));

        let d = decision(
            &plan(2),
            &[based(1, None), based(1, Some("thin"))],
            "x".into(),
        );
        assert!(
            d.reason
                .starts_with("incremental since backup b1 (kept RBD"),
            "{}",
            d.reason
        );

        let problem = |p: &str| BaseSummary {
            problem: Some(p.into()),
            ..BaseSummary::default()
        };
        let d = decision(
            &plan(3),
            &[based(1, None), problem("rbd"), problem("kept")],
            "x".into(),
        );
        assert_eq!(d.reason, "incremental since backup b1 for some disks; kept");

        let d = decision(
            &plan(1),
            &[problem("rbd"), BaseSummary::default()],
            "dflt".into(),
        );
        assert_eq!(d.mode, virtkeep_repo::BackupMode::Full);
        assert_eq!(d.reason, "rbd");
        let d = decision(&plan(1), &[BaseSummary::default()], "dflt".into());
        assert_eq!((d.reason.as_str(), d.parent), ("dflt", None));
    }
}
