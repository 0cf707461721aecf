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
//! another process (or another open backend) linked and this one found by deduplication is
//! covered as it was before group commit, when that process fsynced its directory only
//! after the link too: journaling filesystems (ext4, XFS) commit metadata in order, so the
//! fsync that makes this process's object durable commits that earlier link with it.
//!
//! Only this backend's own files and directories are synced (a `syncfs` of the whole
//! filesystem was tried: it also wrote back every other program's dirty data, and made
//! the LVM hypervisor tests, whose guest disk lives on the same filesystem, 1.5× slower).
//!
//! Barriers run one at a time; a writer arriving while one runs waits for the next, which
//! also serves everybody else who arrived meanwhile.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Work a barrier takes; what a failed barrier left undone goes back for the next one.
pub(super) trait Work: Default {
    /// Add `undone`, taken by a failed barrier, back to the work added since.
    fn put_back(&mut self, undone: Self);
}

/// Marks a point in the sequence of barriers: work added after it is taken by a later one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket(u64);

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

impl<P: Work> GroupSync<P> {
    /// Add to the work the next barrier takes. The ticket lets [`GroupSync::barrier`]
    /// report the failure of any barrier that took this work.
    pub fn add(&self, f: impl FnOnce(&mut P)) -> Ticket {
        let mut st = self.lock();
        f(&mut st.pending);
        Ticket(st.started)
    }

    /// The ticket of work added now, for a caller that added none.
    pub fn now(&self) -> Ticket {
        Ticket(self.lock().started)
    }

    /// Wait until a barrier that started after this call has finished: all work added
    /// before the call is done. `sync` does a barrier's work, leaving in it what it could
    /// not do; it runs on the calling thread when no barrier is running. Fails when any
    /// barrier that started after `since` failed (it may have taken the caller's work: a
    /// running barrier can take work added before this call and still fail), so a
    /// failure may also reach a caller whose own work was done.
    pub fn barrier(
        &self,
        since: Ticket,
        sync: impl FnOnce(&mut P) -> io::Result<()>,
    ) -> io::Result<()> {
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
            Some((generation, kind, msg)) if *generation > since.0 => {
                Err(io::Error::new(*kind, msg.clone()))
            }
            _ => Ok(()),
        }
    }

    fn run<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<P>>,
        sync: impl FnOnce(&mut P) -> io::Result<()>,
    ) -> MutexGuard<'a, State<P>> {
        st.started += 1;
        let generation = st.started;
        let mut work = std::mem::take(&mut st.pending);
        drop(st);
        let res = sync(&mut work);
        let mut st = self.lock();
        st.finished = generation;
        if let Err(e) = res {
            st.failed = Some((generation, e.kind(), e.to_string()));
            // Before the next barrier can start: it retries what this one left undone.
            st.pending.put_back(work);
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

    impl Work for Vec<u32> {
        fn put_back(&mut self, undone: Self) {
            self.extend(undone);
        }
    }

    /// A barrier that records the work it took.
    fn record(log: &Log) -> impl FnOnce(&mut Vec<u32>) -> io::Result<()> + '_ {
        move |work| {
            log.lock().expect("log").push(std::mem::take(work));
            Ok(())
        }
    }

    /// A barrier that fails and leaves its work undone.
    fn fail(work: &mut Vec<u32>) -> io::Result<()> {
        let _ = work;
        Err(io::Error::other("EIO on writeback"))
    }

    #[test]
    fn a_barrier_runs_once_per_call_and_takes_the_work_added_before_it() {
        let g = GroupSync::<Vec<u32>>::default();
        let log = Log::default();
        for i in 0..3 {
            let t = g.add(|p| p.push(i));
            g.barrier(t, record(&log)).expect("barrier");
        }
        g.barrier(g.now(), record(&log)).expect("barrier");
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
        let t0 = g.add(|p| p.push(0));
        let first = {
            let (g, log) = (g.clone(), log.clone());
            std::thread::spawn(move || {
                g.barrier(t0, |work| {
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
                    let t = g.add(|p| p.push(i));
                    g.barrier(t, record(&log))
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
        let t = g.add(|p| p.push(1));
        let err = g.barrier(t, fail).expect_err("the sync failed");
        assert!(err.to_string().contains("EIO"));
        let log = Log::default();
        g.barrier(g.now(), record(&log)).expect("a later barrier");
    }

    #[test]
    fn a_failed_barrier_puts_back_what_it_left_undone_for_the_next() {
        let g = GroupSync::<Vec<u32>>::default();
        let log = Log::default();
        let t = g.add(|p| p.push(1));
        g.barrier(t, fail).expect_err("the sync failed");
        let t = g.add(|p| p.push(2));
        g.barrier(t, record(&log)).expect("the retry");
        assert_eq!(*log.lock().expect("log"), vec![vec![1, 2]]);
    }

    #[test]
    fn work_taken_by_another_callers_failed_barrier_fails_its_adder() {
        let g = GroupSync::<Vec<u32>>::default();
        let log = Log::default();
        let mine = g.add(|p| p.push(1));
        // Somebody else's barrier takes our work, and fails.
        g.barrier(g.now(), |work: &mut Vec<u32>| {
            work.clear();
            Err(io::Error::other("EIO on writeback"))
        })
        .expect_err("the sync failed");
        // Our own barrier (the next one) succeeds, but our work was lost with the other.
        let err = g.barrier(mine, record(&log)).expect_err("reported");
        assert!(err.to_string().contains("EIO"));
        assert_eq!(*log.lock().expect("log"), vec![Vec::<u32>::new()]);
        // Work added after the failure is not blamed for it.
        let t = g.add(|p| p.push(2));
        g.barrier(t, record(&log)).expect("later work");
    }
}
