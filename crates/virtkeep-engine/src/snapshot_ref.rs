//! How users name a backup: its id, a unique prefix of it, or `HOST/VM@latest`.

use crate::error::{Error, ErrorKind, Result};

/// Most candidates an ambiguous prefix lists.
const LIST_MAX: usize = 10;

/// The backup id `spec` names, from the repository's listing.
pub async fn resolve(repo: &virtkeep_repo::Repository, spec: &str) -> Result<String> {
    let listing = repo.list_snapshots().await?;
    // A backup whose manifest cannot be read is still named by its exact id (verify
    // reports it, forget removes it); it has no time or VM for the other forms.
    if listing.unreadable.iter().any(|u| u.id == spec) {
        return Ok(spec.to_string());
    }
    resolve_in(&listing.snapshots, spec)
}

/// [`resolve`] on a listing already read.
pub fn resolve_in(snaps: &[virtkeep_repo::SnapshotSummary], spec: &str) -> Result<String> {
    if let Some(vm_spec) = spec.strip_suffix("@latest") {
        let Some((host, vm)) = vm_spec.split_once('/') else {
            return Err(Error::config(format!("{spec:?}: expected HOST/VM@latest")));
        };
        return snaps
            .iter()
            .filter(|s| s.host == host && s.vm == vm)
            .max_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)))
            .map(|s| s.id.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Repository,
                    format!("the repository has no backup of {host}/{vm}"),
                )
                .hint("`virtkeep snapshots` lists the backups")
            });
    }
    if spec.is_empty() {
        return Err(Error::config("empty backup id"));
    }
    if snaps.iter().any(|s| s.id == spec) {
        return Ok(spec.to_string());
    }
    let matches: Vec<&str> = snaps
        .iter()
        .filter(|s| s.id.starts_with(spec))
        .map(|s| s.id.as_str())
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err(Error::new(
            ErrorKind::Repository,
            format!("backup {spec} not found (no backup id starts with it)"),
        )
        .hint("`virtkeep snapshots` lists the backups; HOST/VM@latest names the newest of a VM")),
        many => {
            let shown: Vec<&str> = many.iter().take(LIST_MAX).copied().collect();
            let more = many.len().saturating_sub(LIST_MAX);
            Err(Error::config(format!(
                "backup id prefix {spec:?} is ambiguous: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ))
            .hint("give more characters of the id"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_in;
    use time::macros::datetime;
    use virtkeep_repo::SnapshotSummary;

    fn snap(id: &str, host: &str, vm: &str, t: time::OffsetDateTime) -> SnapshotSummary {
        SnapshotSummary {
            id: id.into(),
            time: t,
            host: host.into(),
            vm: vm.into(),
            mode: virtkeep_repo::BackupMode::Full,
            disks: vec![],
            size: 0,
            bytes_new: 0,
            protected: false,
        }
    }

    #[test]
    fn ids_prefixes_and_latest() {
        let s = vec![
            snap(
                "20260101T000000Z-aaaa0000",
                "h",
                "a",
                datetime!(2026-01-01 0:00 UTC),
            ),
            snap(
                "20260102T000000Z-bbbb0000",
                "h",
                "a",
                datetime!(2026-01-02 0:00 UTC),
            ),
            snap(
                "20260102T000000Z-cccc0000",
                "h",
                "b",
                datetime!(2026-01-02 0:00 UTC),
            ),
        ];
        assert_eq!(resolve_in(&s, "h/a@latest").expect("latest"), s[1].id);
        assert_eq!(resolve_in(&s, "20260101").expect("prefix"), s[0].id);
        assert_eq!(resolve_in(&s, &s[2].id).expect("exact"), s[2].id);
        let e = resolve_in(&s, "20260102").expect_err("ambiguous");
        assert!(e.message.contains(&s[1].id) && e.message.contains(&s[2].id));
        assert!(resolve_in(&s, "h/c@latest").is_err());
        assert!(resolve_in(&s, "x").is_err());
        assert!(resolve_in(&s, "").is_err());
    }
}
