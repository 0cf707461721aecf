//! `virtkeep mount`: a backup as a read-only FUSE filesystem with one `DISK.img` per
//! disk, read through the disk view (pure-Rust `fuser`, no libfuse).
//!
//! The mount is read-only (`ro`, and every write-like call is refused by the kernel for
//! it), not shared with other users (no `allow_other`: FUSE lets only the mounting user
//! in), and ends when the returned future's `shutdown` completes or someone unmounts it.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use virtkeep_repo::{DiskView, DiskViewOptions, Repository};

use crate::error::FilesError;

const TTL: Duration = Duration::from_secs(60);
/// Largest read answered at once (the kernel asks for at most 1 MiB).
const MAX_READ: u32 = 4 << 20;

struct BackupFs {
    disks: Vec<(String, DiskView)>,
    handle: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// Told when the session ends (unmounted from outside, or shut down).
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BackupFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == 1 {
            (FileType::Directory, 0, 0o500, 2)
        } else {
            let (_, v) = self.disks.get(usize::try_from(ino.checked_sub(2)?).ok()?)?;
            (FileType::RegularFile, v.size(), 0o400, 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 1 << 20,
        })
    }
}

impl Filesystem for BackupFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (u64::from(parent) == 1)
            .then(|| {
                self.disks
                    .iter()
                    .position(|(n, _)| OsStr::new(&format!("{n}.img")) == name)
            })
            .flatten()
            .and_then(|i| self.attr(i as u64 + 2));
        match found {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(u64::from(ino)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
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
        let Some((_, view)) = u64::from(ino)
            .checked_sub(2)
            .and_then(|i| self.disks.get(usize::try_from(i).ok()?))
        else {
            return reply.error(Errno::ENOENT);
        };
        let n = u64::from(size.min(MAX_READ)).min(view.size().saturating_sub(offset));
        if n == 0 {
            return reply.data(&[]);
        }
        match self.handle.block_on(view.read_at(offset, n as usize)) {
            Ok(b) => reply.data(&b),
            Err(e) => {
                tracing::warn!("mount: reading {} bytes at {offset}: {e}", n);
                reply.error(Errno::EIO)
            }
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
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![(1, FileType::Directory, ".".to_string())];
        entries.push((1, FileType::Directory, "..".to_string()));
        for (i, (n, _)) in self.disks.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, format!("{n}.img")));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
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
    let (tx, ended) = tokio::sync::oneshot::channel();
    let fs = BackupFs {
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
