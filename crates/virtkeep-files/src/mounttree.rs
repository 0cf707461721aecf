//! The browsable trees of `virtkeep mount`: `DIR/DISK/PART/…` (`PART` a partition
//! number, `VG/LV` two levels, or the disk directory itself for a whole-disk filesystem),
//! read through the same [`GuestFs`] backends as `files ls/get`.
//!
//! The backends are not `Send` (`ext4-view` shares its reader through `Rc`), so each
//! filesystem lives on its own thread, opened at its first use, and FUSE requests reach
//! it as closures over a channel. Dropping the tree drops the channels and the threads
//! end. Inode numbers are handed out as the kernel meets nodes, at most [`MAX_INODES`].

use std::collections::HashMap;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use virtkeep_repo::DiskView;

use crate::browse::{FileTarget, open_target};
use crate::error::FilesError;
use crate::fs::{FsEntry, FsNode, GuestFs};

/// Most nodes a mount numbers (then lookups fail with an error).
pub(crate) const MAX_INODES: usize = 1 << 22;

type Job = Box<dyn FnOnce(Result<&mut dyn GuestFs, &str>) + Send>;

/// Longest wait for one request of the kernel on a filesystem's thread: past it the
/// request fails (EIO) instead of hanging the caller; the thread finishes that read
/// (bounded in bytes by its backend) before it takes the next.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(120);

type Opener = Box<dyn FnOnce() -> Result<Box<dyn GuestFs>, String> + Send>;

/// One filesystem, served by its own thread.
pub(crate) struct FsWorker {
    tx: Mutex<mpsc::Sender<Job>>,
    limit: Duration,
}

impl FsWorker {
    pub(crate) fn spawn(
        view: DiskView,
        handle: tokio::runtime::Handle,
        target: FileTarget,
    ) -> std::io::Result<FsWorker> {
        let open: Opener = Box::new(move || {
            let size = view.size();
            let r = view.blocking(handle);
            open_target(r, size, &target).map_err(|e| e.to_string())
        });
        Self::spawn_with(open, CALL_TIMEOUT)
    }

    /// A worker whose filesystem `open` makes at the first request; each request waits
    /// at most `limit` for its answer.
    fn spawn_with(open: Opener, limit: Duration) -> std::io::Result<FsWorker> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vk-mount-fs".into())
            .spawn(move || {
                let mut open = Some(open);
                let mut fs: Option<Result<Box<dyn GuestFs>, String>> = None;
                while let Ok(job) = rx.recv() {
                    let opened = fs.get_or_insert_with(|| match open.take() {
                        Some(o) => o(),
                        None => Err("filesystem not opened".into()),
                    });
                    match opened {
                        Ok(f) => job(Ok(f.as_mut())),
                        Err(e) => job(Err(e)),
                    }
                }
            })?;
        Ok(FsWorker {
            tx: Mutex::new(tx),
            limit,
        })
    }

    /// Runs `f` on the filesystem's thread and waits for its answer (at most the limit).
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn GuestFs) -> Result<T, FilesError> + Send + 'static,
    ) -> Result<T, String> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |fs| {
            let r = match fs {
                Ok(fs) => f(fs).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = rtx.send(r);
        });
        self.tx
            .lock()
            .map_err(|_| "worker lock poisoned".to_string())?
            .send(job)
            .map_err(|_| "filesystem thread ended".to_string())?;
        rrx.recv_timeout(self.limit).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => FilesError::TimedOut {
                what: "a read of the mounted filesystem".into(),
                secs: self.limit.as_secs_f64(),
            }
            .to_string(),
            mpsc::RecvTimeoutError::Disconnected => "filesystem thread ended".to_string(),
        })?
    }

    pub(crate) fn stat(&self, path: Vec<u8>) -> Result<FsNode, String> {
        self.call(move |fs| fs.stat(&path))
    }

    pub(crate) fn read_dir(&self, path: Vec<u8>) -> Result<Vec<FsEntry>, String> {
        self.call(move |fs| Ok(fs.read_dir(&path, crate::fs::MAX_DIR_ENTRIES)?.0))
    }

    pub(crate) fn read(&self, path: Vec<u8>, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.call(move |fs| {
            let mut buf = vec![0u8; len];
            let n = crate::fs::read_full(fs, &path, offset, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    pub(crate) fn read_link(&self, path: Vec<u8>) -> Result<Vec<u8>, String> {
        self.call(move |fs| fs.read_link(&path))
    }
}

/// What an inode of the mount is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// `DISK.img` of disk `n`.
    Img(usize),
    /// A directory of the mount's own: a disk, or a volume group.
    Dir(Vec<(String, u64)>),
    /// `path` inside filesystem `n`.
    Fs(usize, Vec<u8>),
}

/// Inode numbers (index + 1) of the mount's nodes.
#[derive(Debug, Default)]
pub(crate) struct Table {
    nodes: Vec<Node>,
    by_fs: HashMap<(usize, Vec<u8>), u64>,
}

impl Table {
    pub(crate) fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino.checked_sub(1)?).ok()?)
    }

    pub(crate) fn add(&mut self, n: Node) -> Option<u64> {
        if self.nodes.len() >= MAX_INODES {
            return None;
        }
        if let Node::Fs(v, p) = &n {
            if let Some(i) = self.by_fs.get(&(*v, p.clone())) {
                return Some(*i);
            }
            self.by_fs
                .insert((*v, p.clone()), self.nodes.len() as u64 + 1);
        }
        self.nodes.push(n);
        Some(self.nodes.len() as u64)
    }

    /// The root (inode 1) with `DISK.img` for each disk and, for each disk with readable
    /// filesystems, `DISK/` holding them at their paths (`["1"]`, `["vg0", "root"]`, or
    /// `[]` for the whole disk). `vols[i]` is `(disk index, path)` of filesystem `i`.
    pub(crate) fn build(disks: &[String], vols: &[(usize, Vec<String>)]) -> Table {
        let mut t = Table::default();
        t.nodes.push(Node::Dir(Vec::new()));
        let mut root = Vec::new();
        for (d, name) in disks.iter().enumerate() {
            let img = t.add(Node::Img(d)).unwrap_or(0);
            root.push((format!("{name}.img"), img));
        }
        for (d, name) in disks.iter().enumerate() {
            let mine: Vec<(usize, &Vec<String>)> = vols
                .iter()
                .enumerate()
                .filter(|(_, (vd, _))| *vd == d)
                .map(|(i, (_, p))| (i, p))
                .collect();
            if let Some(ino) = t.subtree(&mine, 0) {
                root.push((name.clone(), ino));
            }
        }
        t.nodes[0] = Node::Dir(root);
        t
    }

    /// The node for volumes `vols` below `depth` components of their paths.
    fn subtree(&mut self, vols: &[(usize, &Vec<String>)], depth: usize) -> Option<u64> {
        if let Some((i, _)) = vols.iter().find(|(_, p)| p.len() == depth) {
            return self.add(Node::Fs(*i, b"/".to_vec()));
        }
        let mut names: Vec<&String> = vols.iter().filter_map(|(_, p)| p.get(depth)).collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return None;
        }
        let mut children = Vec::new();
        for n in names {
            let below: Vec<(usize, &Vec<String>)> = vols
                .iter()
                .filter(|(_, p)| p.get(depth) == Some(n))
                .copied()
                .collect();
            if let Some(ino) = self.subtree(&below, depth + 1) {
                children.push((n.clone(), ino));
            }
        }
        self.add(Node::Dir(children))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the filesystem does not answer in time fails with the limit's error
    /// instead of hanging; the worker answers again once the slow read is done.
    #[test]
    fn slow_requests_time_out() {
        let (release, wait) = mpsc::channel::<()>();
        // Opening blocks until released: the first request cannot be answered in time.
        let open: Opener = Box::new(move || {
            let _ = wait.recv();
            Err("no filesystem here".into())
        });
        let w = FsWorker::spawn_with(open, Duration::from_millis(20)).expect("worker");
        let e = w.stat(b"/".to_vec()).expect_err("timed out");
        assert!(e.contains("took longer than its limit"), "{e}");
        release.send(()).expect("release");
        let w = FsWorker {
            limit: Duration::from_secs(60),
            ..w
        };
        let e = w.stat(b"/".to_vec()).expect_err("no filesystem");
        assert_eq!(e, "no filesystem here");
    }

    #[test]
    fn tree_of_disks_partitions_and_lvs() {
        let disks = ["vda".to_string(), "vdb".to_string(), "vdc".to_string()];
        let vols = [
            (0, vec!["1".to_string()]),
            (0, vec!["vg0".to_string(), "root".to_string()]),
            (0, vec!["vg0".to_string(), "home".to_string()]),
            (2, vec![]),
        ];
        let t = Table::build(&disks, &vols);
        let Some(Node::Dir(root)) = t.get(1) else {
            panic!("root")
        };
        let names: Vec<&str> = root.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["vda.img", "vdb.img", "vdc.img", "vda", "vdc"]);
        assert_eq!(t.get(root[4].1), Some(&Node::Fs(3, b"/".to_vec())));
        let Some(Node::Dir(vda)) = t.get(root[3].1) else {
            panic!("vda")
        };
        let names: Vec<&str> = vda.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["1", "vg0"]);
        let Some(Node::Dir(vg)) = t.get(vda[1].1) else {
            panic!("vg0")
        };
        assert_eq!(vg[0].0, "home");
        assert_eq!(t.get(vg[0].1), Some(&Node::Fs(2, b"/".to_vec())));
    }
}
