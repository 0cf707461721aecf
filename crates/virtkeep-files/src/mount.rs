//! `virtkeep mount`: a backup as a read-only FUSE filesystem with one `DISK.img` per
//! disk, read through the disk view (pure-Rust `fuser`, no libfuse), and `DISK/PART/…`
//! trees of the filesystems read here (see `mounttree.rs`).
//!
//! The mount is read-only (`ro`, and every write-like call is refused by the kernel for
//! it), not shared with other users (no `allow_other`: FUSE lets only the mounting user
//! in), and ends when the returned future's `shutdown` completes or someone unmounts it.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use virtkeep_repo::{DiskView, DiskViewOptions, Repository};

use crate::browse::FileTarget;
use crate::error::FilesError;
use crate::fs::{EntryKind, FsNode, MAX_PATH, join};
use crate::mounttree::{FsWorker, Node, Table};
use crate::open::FsType;

const TTL: Duration = Duration::from_secs(60);
/// Largest read answered at once (the kernel asks for at most 1 MiB).
const MAX_READ: u32 = 4 << 20;

struct BackupFs {
    disks: Vec<(String, DiskView)>,
    /// One per readable filesystem, in the order of [`Node::Fs`] numbers.
    workers: Vec<FsWorker>,
    table: Mutex<Table>,
    handle: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// Told when the session ends (unmounted from outside, or shut down).
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

fn file_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::BlockDevice => FileType::BlockDevice,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
        // Listed so it can be seen; looking it up gives the reader's error.
        EntryKind::Unknown => FileType::RegularFile,
    }
}

fn time_of(n: &FsNode) -> SystemTime {
    let d = Duration::new(n.mtime.unsigned_abs(), n.mtime_nsec.min(999_999_999));
    if n.mtime >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

impl BackupFs {
    fn node(&self, ino: u64) -> Option<Node> {
        self.table.lock().ok()?.get(ino).cloned()
    }

    fn base_attr(&self, ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 1 << 20,
        }
    }

    /// A guest node as seen through the mount: its own mode and time, readable by the
    /// mounting user (who owns everything here).
    fn fs_attr(&self, ino: u64, n: &FsNode) -> FileAttr {
        let kind = file_type(n.kind);
        let add = if kind == FileType::Directory {
            0o500
        } else {
            0o400
        };
        let mut a = self.base_attr(ino, kind, n.size, (n.mode & 0o7777) | add);
        a.mtime = time_of(n);
        a.ctime = a.mtime;
        a.atime = a.mtime;
        a.nlink = n.nlink.max(1);
        a
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Dir(_) => Ok(self.base_attr(ino, FileType::Directory, 0, 0o500)),
            Node::Img(d) => {
                let size = self.disks.get(d).ok_or(Errno::ENOENT)?.1.size();
                Ok(self.base_attr(ino, FileType::RegularFile, size, 0o400))
            }
            Node::Fs(v, path) => {
                let n = self.worker(v)?.stat(path).map_err(|e| self.fail(e))?;
                Ok(self.fs_attr(ino, &n))
            }
        }
    }

    fn worker(&self, v: usize) -> Result<&FsWorker, Errno> {
        self.workers.get(v).ok_or(Errno::ENOENT)
    }

    fn fail(&self, e: String) -> Errno {
        tracing::warn!("mount: {e}");
        if e.contains("no such file") || e.contains("not found") {
            Errno::ENOENT
        } else {
            Errno::EIO
        }
    }

    fn add(&self, n: Node) -> Result<u64, Errno> {
        self.table
            .lock()
            .map_err(|_| Errno::EIO)?
            .add(n)
            .ok_or(Errno::ENOMEM)
    }

    fn lookup_in(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        match self.node(parent).ok_or(Errno::ENOENT)? {
            Node::Dir(children) => {
                let (_, ino) = children
                    .iter()
                    .find(|(n, _)| OsStr::new(n) == name)
                    .ok_or(Errno::ENOENT)?;
                self.attr(*ino)
            }
            Node::Fs(v, path) => {
                let child = join(&path, name.as_bytes());
                if child.len() > MAX_PATH {
                    return Err(Errno::ENAMETOOLONG);
                }
                let n = self
                    .worker(v)?
                    .stat(child.clone())
                    .map_err(|e| self.fail(e))?;
                let ino = self.add(Node::Fs(v, child))?;
                Ok(self.fs_attr(ino, &n))
            }
            Node::Img(_) => Err(Errno::ENOTDIR),
        }
    }

    /// `(inode, type, name)` of each entry of directory `ino`, `.` and `..` first.
    fn entries(&self, ino: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        let mut out = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (1, FileType::Directory, b"..".to_vec()),
        ];
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Dir(children) => {
                for (name, child) in children {
                    let kind = match self.node(child) {
                        Some(Node::Img(_)) => FileType::RegularFile,
                        _ => FileType::Directory,
                    };
                    out.push((child, kind, name.into_bytes()));
                }
            }
            Node::Fs(v, path) => {
                let found = self
                    .worker(v)?
                    .read_dir(path.clone())
                    .map_err(|e| self.fail(e))?;
                for e in found {
                    let child = self.add(Node::Fs(v, join(&path, &e.name)))?;
                    out.push((child, file_type(e.node.kind), e.name));
                }
            }
            Node::Img(_) => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn read_node(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        match self.node(ino).ok_or(Errno::ENOENT)? {
            Node::Img(d) => {
                let view = &self.disks.get(d).ok_or(Errno::ENOENT)?.1;
                let n = u64::from(size.min(MAX_READ)).min(view.size().saturating_sub(offset));
                if n == 0 {
                    return Ok(Vec::new());
                }
                match self.handle.block_on(view.read_at(offset, n as usize)) {
                    Ok(b) => Ok(b.to_vec()),
                    Err(e) => {
                        tracing::warn!("mount: reading {n} bytes at {offset}: {e}");
                        Err(Errno::EIO)
                    }
                }
            }
            Node::Fs(v, path) => self
                .worker(v)?
                .read(path, offset, size.min(MAX_READ) as usize)
                .map_err(|e| self.fail(e)),
            Node::Dir(_) => Err(Errno::EISDIR),
        }
    }
}

impl Filesystem for BackupFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_in(u64::from(parent), name) {
            Ok(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(u64::from(ino)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = match self.node(u64::from(ino)) {
            Some(Node::Fs(v, path)) => self
                .worker(v)
                .and_then(|w| w.read_link(path).map_err(|e| self.fail(e))),
            _ => Err(Errno::EINVAL),
        };
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_node(u64::from(ino), offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.entries(u64::from(ino)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn destroy(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }
}

/// The readable filesystems of each disk: `(disk index, path under DIR/DISK, target)`.
async fn volumes(
    disks: &[(String, DiskView)],
) -> Result<Vec<(usize, Vec<String>, FileTarget)>, FilesError> {
    let mut out = Vec::new();
    for (d, (name, view)) in disks.iter().enumerate() {
        let l = crate::layout::disk_layout(view, name).await?;
        let readable =
            |f: &Option<crate::fsdetect::FsInfo>| f.as_ref().and_then(FsType::of).is_some();
        let target = |partition, lv| FileTarget {
            disk: name.clone(),
            partition,
            lv,
            path: "/".into(),
        };
        if readable(&l.filesystem) {
            out.push((d, Vec::new(), target(None, None)));
        }
        for p in l.partitions.iter().filter(|p| readable(&p.filesystem)) {
            let n = p.partition.number;
            out.push((d, vec![n.to_string()], target(Some(n), None)));
        }
        for lv in l.lvs.iter().filter(|lv| readable(&lv.filesystem)) {
            let path = lv.name.split('/').map(str::to_string).collect();
            out.push((d, path, target(None, Some(lv.name.clone()))));
        }
    }
    Ok(out)
}

/// Mount backup `id` read-only at `dir` (an existing directory) until `shutdown`
/// completes or the mount is unmounted; `on_ready(file names)` is called once mounted.
/// Unmounts before returning.
pub async fn mount_backup(
    repo: &Repository,
    id: &str,
    dir: &Path,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), FilesError> {
    let m = repo.manifest(id).await?;
    let mut disks = Vec::with_capacity(m.disks.len());
    for d in &m.disks {
        let view = repo
            .disk_view(id, &d.spec.name, DiskViewOptions::default())
            .await?;
        disks.push((d.spec.name.clone(), view));
    }
    let names: Vec<String> = disks.iter().map(|(n, _)| format!("{n}.img")).collect();
    let vols = volumes(&disks).await?;
    let handle = tokio::runtime::Handle::current();
    let mut workers = Vec::with_capacity(vols.len());
    for (d, _, target) in &vols {
        workers.push(FsWorker::spawn(
            disks[*d].1.clone(),
            handle.clone(),
            target.clone(),
        )?);
    }
    let disk_names: Vec<String> = disks.iter().map(|(n, _)| n.clone()).collect();
    let paths: Vec<(usize, Vec<String>)> = vols.into_iter().map(|(d, p, _)| (d, p)).collect();
    let (tx, ended) = tokio::sync::oneshot::channel();
    let fs = BackupFs {
        table: Mutex::new(Table::build(&disk_names, &paths)),
        workers,
        disks,
        handle: tokio::runtime::Handle::current(),
        uid: nix_ids().0,
        gid: nix_ids().1,
        time: SystemTime::now(),
        ended: Some(tx),
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options.extend([
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::FSName(format!("virtkeep:{id}")),
        MountOption::Subtype("virtkeep".into()),
    ]);
    cfg.n_threads = Some(4);
    let dir = dir.to_path_buf();
    let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &dir, &cfg))
        .await
        .map_err(|e| FilesError::Task(e.to_string()))??;
    on_ready(&names);
    let unmount = tokio::select! {
        _ = shutdown => true,
        _ = ended => false,
    };
    tokio::task::spawn_blocking(move || {
        if unmount {
            session.umount_and_join()
        } else {
            session.join()
        }
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))??;
    Ok(())
}

fn nix_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    // The ids this process runs as, read without unsafe code.
    std::fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}
