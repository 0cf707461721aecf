//! Prune semantics (Proxmox Backup Server's keep-* rules), table driven.
#![allow(clippy::unwrap_used)]

use time::OffsetDateTime;
use time::macros::datetime;
use virtkeep_repo::*;

fn snap(id: &str, t: OffsetDateTime, protected: bool) -> SnapshotSummary {
    SnapshotSummary {
        id: id.into(),
        time: t,
        host: "h".into(),
        vm: "v".into(),
        mode: BackupMode::Full,
        disks: vec![],
        size: 0,
        bytes_new: 0,
        protected,
    }
}

fn run(list: &[SnapshotSummary], p: KeepPolicy) -> Vec<(String, bool, String)> {
    let mut v: Vec<_> = compute_prune(list, &p)
        .into_iter()
        .map(|d| (d.id, d.keep, d.reason))
        .collect();
    v.sort();
    v
}

fn kept(list: &[SnapshotSummary], p: KeepPolicy) -> Vec<String> {
    run(list, p)
        .into_iter()
        .filter(|x| x.1)
        .map(|x| x.0)
        .collect()
}

fn series() -> Vec<SnapshotSummary> {
    // two backups a day, 2026-01-01 .. 2026-01-20, plus one in 2025-12
    let mut v = vec![snap("d2025-12-30", datetime!(2025-12-30 10:00 UTC), false)];
    for day in 1..=20u8 {
        for (h, tag) in [(8u8, "a"), (20u8, "b")] {
            let t = datetime!(2026-01-01 00:00 UTC)
                .replace_day(day)
                .unwrap()
                .replace_hour(h)
                .unwrap();
            v.push(snap(&format!("d{day:02}{tag}"), t, false));
        }
    }
    v
}

#[test]
fn no_option_keeps_all() {
    let s = series();
    assert!(run(&s, KeepPolicy::default()).iter().all(|x| x.1));
}

#[test]
fn keep_last() {
    let s = series();
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                last: Some(3),
                ..Default::default()
            }
        ),
        vec!["d19b", "d20a", "d20b"]
    );
}

#[test]
fn keep_daily_takes_last_of_each_day() {
    let s = series();
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                daily: Some(3),
                ..Default::default()
            }
        ),
        vec!["d18b", "d19b", "d20b"]
    );
}

#[test]
fn options_do_not_double_count() {
    // keep-last 2 takes d20b, d20a; keep-daily 2 then skips day 20 (already included)
    // and takes days 19 and 18.
    let s = series();
    let r = run(
        &s,
        KeepPolicy {
            last: Some(2),
            daily: Some(2),
            ..Default::default()
        },
    );
    let k: Vec<_> = r
        .iter()
        .filter(|x| x.1)
        .map(|x| (x.0.as_str(), x.2.as_str()))
        .collect();
    assert_eq!(
        k,
        vec![
            ("d18b", "keep-daily"),
            ("d19b", "keep-daily"),
            ("d20a", "keep-last"),
            ("d20b", "keep-last")
        ]
    );
}

#[test]
fn weekly_monthly_yearly() {
    let s = series();
    // ISO weeks: 2026-01-01 is a Thursday → week 1 = Jan 1-4, week 2 = 5-11, week 3 = 12-18,
    // week 4 = 19-25
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                weekly: Some(3),
                ..Default::default()
            }
        ),
        vec!["d11b", "d18b", "d20b"]
    );
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                monthly: Some(5),
                ..Default::default()
            }
        ),
        vec!["d2025-12-30", "d20b"]
    );
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                yearly: Some(1),
                ..Default::default()
            }
        ),
        vec!["d20b"]
    );
    assert_eq!(
        kept(
            &s,
            KeepPolicy {
                hourly: Some(2),
                ..Default::default()
            }
        ),
        vec!["d20a", "d20b"]
    );
}

#[test]
fn protected_never_pruned_and_not_counted() {
    let mut s = series();
    for x in &mut s {
        if x.id == "d20b" {
            x.protected = true;
        }
    }
    let r = run(
        &s,
        KeepPolicy {
            last: Some(1),
            ..Default::default()
        },
    );
    let k: Vec<_> = r
        .iter()
        .filter(|x| x.1)
        .map(|x| (x.0.as_str(), x.2.as_str()))
        .collect();
    assert_eq!(k, vec![("d20a", "keep-last"), ("d20b", "protected")]);
    let removed = r.iter().filter(|x| !x.1).count();
    assert_eq!(removed, s.len() - 2);
    assert!(
        r.iter()
            .filter(|x| !x.1)
            .all(|x| x.2 == "not selected by any keep option")
    );
}

#[test]
fn keep_within_counts_back_from_the_newest_backup() {
    let s = series();
    let within = |d: time::Duration, p: KeepPolicy| -> Vec<String> {
        let mut v: Vec<String> = compute_prune_within(&s, &p, Some(d))
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        v.sort();
        v
    };
    // Newest: 2026-01-20 20:00; 1 day back reaches 2026-01-19 20:00 inclusive.
    assert_eq!(
        within(time::Duration::days(1), KeepPolicy::default()),
        ["d19b", "d20a", "d20b"]
    );
    // Combined with keep-last: the last 2 beyond those already kept by keep-within.
    let p = KeepPolicy {
        last: Some(2),
        ..KeepPolicy::default()
    };
    assert_eq!(
        within(time::Duration::hours(12), p),
        ["d19a", "d19b", "d20a", "d20b"]
    );
    // Protected ones stay protected, and nothing outside the window is kept.
    let decisions =
        compute_prune_within(&s, &KeepPolicy::default(), Some(time::Duration::hours(1)));
    let kept: Vec<_> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.reason.as_str())
        .collect();
    assert_eq!(kept, ["keep-within"]);
}
