//! What an API token may do: its scope, and the scope each request needs.
//!
//! Scopes are levels, each including the ones below: `read` (lists, job details,
//! metrics) < `operate` (start and cancel backups) < `admin` (restores, which write
//! to hosts and can replace a VM with `force`, and cancelling them). Pure rules, tested
//! without I/O; the API's middleware and handlers apply them.

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Operate,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
        }
    }

    /// Whether a token of this scope may do what needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

/// Tokens configured without a scope (`token_env` / `token_file` before scopes
/// existed) may only read: a token that was handed to a dashboard or to Prometheus
/// must not keep the power to restore over a VM. docs/daemon.md says how to widen it.
pub const UNSCOPED_DEFAULT: Scope = Scope::Read;

/// A request as far as permissions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Any `GET`: hosts, VMs, backups, jobs, policies, metrics.
    Read,
    SubmitBackup,
    /// A restore, with or without `force`.
    SubmitRestore,
    CancelBackup,
    /// Cancelling a restore leaves a half-written target: as much power as starting one.
    CancelRestore,
}

impl Action {
    pub fn needs(self) -> Scope {
        match self {
            Action::Read => Scope::Read,
            Action::SubmitBackup | Action::CancelBackup => Scope::Operate,
            Action::SubmitRestore | Action::CancelRestore => Scope::Admin,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Action::Read => "reading",
            Action::SubmitBackup => "starting a backup",
            Action::SubmitRestore => "starting a restore",
            Action::CancelBackup => "cancelling a backup",
            Action::CancelRestore => "cancelling a restore",
        }
    }

    /// The cancel action for a job of `kind` (`backup` or `restore`); anything else
    /// is treated as the stronger one.
    pub fn cancel_of(kind: &str) -> Action {
        if kind == "backup" {
            Action::CancelBackup
        } else {
            Action::CancelRestore
        }
    }
}

/// `Ok` when `granted` covers `action`, else the message of the 403 answer.
pub fn check(granted: Scope, action: Action) -> Result<(), String> {
    let needed = action.needs();
    if granted.allows(needed) {
        return Ok(());
    }
    Err(format!(
        "{} needs a token with scope {:?} or higher; this token has scope {:?} (scopes are set per token in [daemon.api], see docs/daemon.md)",
        action.describe(),
        needed.as_str(),
        granted.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_include_the_lower_ones() {
        use Action::*;
        let table = [
            (Scope::Read, [true, false, false, false, false]),
            (Scope::Operate, [true, true, false, true, false]),
            (Scope::Admin, [true, true, true, true, true]),
        ];
        for (scope, allowed) in table {
            for (action, ok) in [
                Read,
                SubmitBackup,
                SubmitRestore,
                CancelBackup,
                CancelRestore,
            ]
            .into_iter()
            .zip(allowed)
            {
                assert_eq!(check(scope, action).is_ok(), ok, "{scope:?} {action:?}");
            }
        }
    }

    #[test]
    fn a_refusal_names_both_scopes() {
        let e = check(Scope::Read, Action::SubmitRestore).expect_err("refused");
        assert!(e.contains("\"admin\"") && e.contains("\"read\""), "{e}");
        assert!(e.starts_with("starting a restore"), "{e}");
    }

    #[test]
    fn unscoped_tokens_only_read_and_cancelling_unknown_kinds_is_admin() {
        assert!(check(UNSCOPED_DEFAULT, Action::SubmitBackup).is_err());
        assert!(check(UNSCOPED_DEFAULT, Action::Read).is_ok());
        assert_eq!(Action::cancel_of("backup"), Action::CancelBackup);
        assert_eq!(Action::cancel_of("restore"), Action::CancelRestore);
        assert_eq!(Action::cancel_of("x"), Action::CancelRestore);
    }
}
