//! A time limit on walks of a guest filesystem (`files ls/get/find`, `mount`'s
//! directory reads).
//!
//! Counts and bytes are bounded by each walk, but a damaged or hostile filesystem can
//! still make a walk slow (millions of tiny directories, scattered extents). [`TimedFs`]
//! wraps a [`GuestFs`] and fails every operation once the deadline has passed, so a
//! walk ends with [`FilesError::TimedOut`] between two reads. One read is not
//! interrupted: each is bounded in bytes by its backend.

use std::time::{Duration, Instant};

use crate::error::FilesError;
use crate::fs::{FsEntry, FsNode, GuestFs};

/// Default limit of `files ls` and `files find` (and of one directory read of `mount`).
pub const DEFAULT_WALK_TIMEOUT: Duration = Duration::from_secs(600);
/// Default limit of `files get` (the copy's data included: hours at disk speed).
pub const DEFAULT_GET_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Limits of a listing or a search.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Fail with [`FilesError::TimedOut`] when the walk takes longer.
    pub timeout: Duration,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            timeout: DEFAULT_WALK_TIMEOUT,
        }
    }
}

/// `fs` with a deadline: each operation after it fails with [`FilesError::TimedOut`].
pub struct TimedFs<'a> {
    fs: &'a mut dyn GuestFs,
    deadline: Option<Instant>,
    limit: Duration,
    what: &'static str,
}

impl<'a> TimedFs<'a> {
    /// `fs` for a walk named `what` (for the error) limited to `limit` from now.
    pub fn new(fs: &'a mut dyn GuestFs, limit: Duration, what: &'static str) -> Self {
        TimedFs {
            fs,
            // A limit too large to add is no limit.
            deadline: Instant::now().checked_add(limit),
            limit,
            what,
        }
    }

    fn check(&self) -> Result<(), FilesError> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(FilesError::TimedOut {
                what: self.what.to_string(),
                secs: self.limit.as_secs_f64(),
            }),
            _ => Ok(()),
        }
    }
}

impl GuestFs for TimedFs<'_> {
    fn stat(&mut self, path: &[u8]) -> Result<FsNode, FilesError> {
        self.check()?;
        self.fs.stat(path)
    }

    fn read_dir(&mut self, path: &[u8], max: usize) -> Result<(Vec<FsEntry>, bool), FilesError> {
        self.check()?;
        self.fs.read_dir(path, max)
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, FilesError> {
        self.check()?;
        self.fs.read(path, offset, buf)
    }

    fn read_link(&mut self, path: &[u8]) -> Result<Vec<u8>, FilesError> {
        self.check()?;
        self.fs.read_link(path)
    }
}
