//! Group commit for the filesystem backend: one `syncfs(2)` makes many chunks durable.
//!
//! Deduplication trusts an existing chunk name, so a name must never survive a crash
//! without its bytes. Done per chunk (fsync the file, link it, fsync the directory) that
//! costs two journal commits per 4 MiB chunk, and a backup's writers mostly wait on them.
//! A chunk write instead
//!
//! ```text
//!   write .tmp-* (no fsync) ──► wait for a barrier that STARTED after the write
//!                               (one syncfs for every writer that arrived meanwhile)
//!                           ──► link(tmp, name)   the name is not durable yet: a crash
//!                                                 may lose it, never leave it empty
//! ```
//!
//! and every other write (an index, a manifest, a lease …), which may name such chunks,
//! first waits for a barrier of its own: it makes every name linked before it durable,
//! also names another process linked and this one found (deduplication reads names, not
//! who wrote them). So nothing durable ever names a chunk whose name could still vanish.
//!
//! Barriers run one at a time; a writer arriving while one runs waits for the next, which
//! also serves everybody else who arrived meanwhile. `syncfs` reports writeback errors
//! that happened since its descriptor was opened, so the caller keeps one descriptor open
//! from before its first write.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Shared state of the barriers of one filesystem backend.
#[derive(Debug, Default)]
pub(super) struct GroupSync {
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Barriers started so far (the running one included).
    started: u64,
    /// Barriers finished so far.
    finished: u64,
    /// The newest barrier that failed, and why.
    failed: Option<(u64, io::ErrorKind, String)>,
    /// Callers waiting for a barrier somebody else runs.
    waiting: u32,
}

impl GroupSync {
    /// Wait until a barrier that started after this call has finished: everything written
    /// before the call is durable. `sync` is the barrier itself (syncfs of the backend's
    /// filesystem); it runs on the calling thread when no barrier is running.
    pub fn barrier(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut st = self.lock();
        // A running barrier may have started before our write: we need the next one.
        let need = st.started + 1;
        let mut sync = Some(sync);
        while st.finished < need {
            if st.started == st.finished {
                st = self.run(st, sync.take().expect("a caller runs at most one barrier"));
            } else {
                st.waiting += 1;
                st = self.finished.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiting -= 1;
            }
        }
        match &st.failed {
            Some((generation, kind, msg)) if *generation >= need => {
                Err(io::Error::new(*kind, msg.clone()))
            }
            _ => Ok(()),
        }
    }

    fn run<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> MutexGuard<'a, State> {
        st.started += 1;
        let generation = st.started;
        drop(st);
        let res = sync();
        let mut st = self.lock();
        st.finished = generation;
        if let Err(e) = res {
            st.failed = Some((generation, e.kind(), e.to_string()));
        }
        self.finished.notify_all();
        st
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn a_barrier_runs_once_per_call_when_calls_do_not_overlap() {
        let g = GroupSync::default();
        let runs = AtomicU64::new(0);
        for _ in 0..3 {
            g.barrier(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .expect("barrier");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn callers_arriving_during_a_barrier_share_the_next_one() {
        let g = Arc::new(GroupSync::default());
        let runs = Arc::new(AtomicU64::new(0));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let (g, runs) = (g.clone(), runs.clone());
            std::thread::spawn(move || {
                g.barrier(|| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started_tx.send(()).expect("send");
                    release_rx.recv().expect("recv");
                    Ok(())
                })
            })
        };
        started_rx.recv().expect("recv");
        // Four writers arrive while the first barrier runs: none is served by it.
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (g, runs) = (g.clone(), runs.clone());
                std::thread::spawn(move || {
                    g.barrier(|| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        while g.lock().waiting < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "waiters must not be served early"
        );
        release_tx.send(()).expect("send");
        first.join().expect("join").expect("barrier");
        for w in waiters {
            w.join().expect("join").expect("barrier");
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "one barrier serves all four"
        );
    }

    #[test]
    fn a_failed_barrier_fails_its_callers_and_not_later_ones() {
        let g = GroupSync::default();
        let err = g
            .barrier(|| Err(io::Error::other("EIO on writeback")))
            .expect_err("the sync failed");
        assert!(err.to_string().contains("EIO"));
        g.barrier(|| Ok(())).expect("a later barrier");
    }
}
