//! Group commit for the filesystem backend: one pass of syncs makes many chunks durable.
//!
//! Deduplication trusts an existing chunk name, so a name must never survive a crash
//! without its bytes. Done per chunk (fsync the file, link it, fsync the directory) that
//! costs two journal commits per 4 MiB chunk, and a backup's writers mostly wait on them.
//! A chunk write instead
//!
//! ```text
//!   write .tmp-* (no fsync), add it to the pending work
//!     ──► wait for a barrier that STARTED after that: it takes all pending work, starts
//!         the writeback of every file, then fdatasyncs each (the first commit of the
//!         journal covers the others' allocations), then fsyncs the pending directories
//!     ──► link(tmp, name), add its directory to the pending work
//!         (the name is not durable yet: a crash may lose it, never leave it empty)
//! ```
//!
//! and every other write (an index, a manifest, a lease …), which may name such chunks,
//! first takes a barrier of its own, which fsyncs the directories of every name linked
//! before it. So nothing durable names a chunk whose name could still vanish. A name
//! another process linked and this one found by deduplication is covered as it was before
//! group commit: that process fsyncs its directory right after its barrier, and journaling
//! filesystems commit metadata in order.
//!
//! Only this backend's own files and directories are synced (a `syncfs` of the whole
//! filesystem was tried: it also wrote back every other program's dirty data, and made
//! the LVM hypervisor tests, whose guest disk lives on the same filesystem, 1.5× slower).
//!
//! Barriers run one at a time; a writer arriving while one runs waits for the next, which
//! also serves everybody else who arrived meanwhile.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Shared state of the barriers of one filesystem backend; `P` is the pending work.
#[derive(Debug, Default)]
pub(super) struct GroupSync<P> {
    state: Mutex<State<P>>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct State<P> {
    /// Barriers started so far (the running one included).
    started: u64,
    /// Barriers finished so far.
    finished: u64,
    /// The newest barrier that failed, and why.
    failed: Option<(u64, io::ErrorKind, String)>,
    /// Callers waiting for a barrier somebody else runs.
    waiting: u32,
    /// Work the next barrier takes.
    pending: P,
}

impl<P: Default> GroupSync<P> {
    /// Add to the work the next barrier takes.
    pub fn add(&self, f: impl FnOnce(&mut P)) {
        f(&mut self.lock().pending);
    }

    /// Wait until a barrier that started after this call has finished: all work added
    /// before the call is done. `sync` does a barrier's work; it runs on the calling
    /// thread when no barrier is running.
    pub fn barrier(&self, sync: impl FnOnce(P) -> io::Result<()>) -> io::Result<()> {
        let mut st = self.lock();
        // A running barrier may have taken its work before ours was added: we need the next.
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
        mut st: MutexGuard<'a, State<P>>,
        sync: impl FnOnce(P) -> io::Result<()>,
    ) -> MutexGuard<'a, State<P>> {
        st.started += 1;
        let generation = st.started;
        let work = std::mem::take(&mut st.pending);
        drop(st);
        let res = sync(work);
        let mut st = self.lock();
        st.finished = generation;
        if let Err(e) = res {
            st.failed = Some((generation, e.kind(), e.to_string()));
        }
        self.finished.notify_all();
        st
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A barrier that records the work it took.
    fn record(log: &Log) -> impl FnOnce(Vec<u32>) -> io::Result<()> + '_ {
        move |work| {
            log.lock().expect("log").push(work);
            Ok(())
        }
    }

    #[test]
    fn a_barrier_runs_once_per_call_and_takes_the_work_added_before_it() {
        let g = GroupSync::<Vec<u32>>::default();
        let log = Log::default();
        for i in 0..3 {
            g.add(|p| p.push(i));
            g.barrier(record(&log)).expect("barrier");
        }
        g.barrier(record(&log)).expect("barrier");
        assert_eq!(
            *log.lock().expect("log"),
            vec![vec![0], vec![1], vec![2], vec![]]
        );
    }

    #[test]
    fn callers_arriving_during_a_barrier_share_the_next_one() {
        let g = Arc::new(GroupSync::<Vec<u32>>::default());
        let log = Log::default();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        g.add(|p| p.push(0));
        let first = {
            let (g, log) = (g.clone(), log.clone());
            std::thread::spawn(move || {
                g.barrier(|work| {
                    started_tx.send(()).expect("send");
                    release_rx.recv().expect("recv");
                    record(&log)(work)
                })
            })
        };
        started_rx.recv().expect("recv");
        // Four writers add work while the first barrier runs: none is served by it.
        let waiters: Vec<_> = (1..=4)
            .map(|i| {
                let (g, log) = (g.clone(), log.clone());
                std::thread::spawn(move || {
                    g.add(|p| p.push(i));
                    g.barrier(record(&log))
                })
            })
            .collect();
        while g.lock().waiting < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(log.lock().expect("log").is_empty(), "waiters served early");
        release_tx.send(()).expect("send");
        first.join().expect("join").expect("barrier");
        for w in waiters {
            w.join().expect("join").expect("barrier");
        }
        let mut log = log.lock().expect("log").clone();
        assert_eq!(log.len(), 2, "one barrier serves all four: {log:?}");
        log[1].sort_unstable();
        assert_eq!(log, vec![vec![0], vec![1, 2, 3, 4]]);
    }

    #[test]
    fn a_failed_barrier_fails_its_callers_and_not_later_ones() {
        let g = GroupSync::<Vec<u32>>::default();
        let err = g
            .barrier(|_| Err(io::Error::other("EIO on writeback")))
            .expect_err("the sync failed");
        assert!(err.to_string().contains("EIO"));
        g.barrier(|_| Ok(())).expect("a later barrier");
    }
}
