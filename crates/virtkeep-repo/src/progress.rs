//! Progress of the long repository operations (verify, gc): the library reports stages
//! and items done; the caller decides how to show them (a bar on a terminal, log lines).

/// Receives the progress of one operation. Called from the operation's task; keep it cheap.
pub trait RepoProgress: Send + Sync {
    /// A stage starts (e.g. "reading chunks"): `total` items to go, `None` when unknown
    /// until the stage ends (a listing).
    fn stage(&self, name: &'static str, total: Option<u64>);
    /// `n` more items of the current stage are done.
    fn advance(&self, n: u64);
}

/// Progress that goes nowhere (library users, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct QuietProgress;

impl RepoProgress for QuietProgress {
    fn stage(&self, _: &'static str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
}
