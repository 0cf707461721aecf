//! `DISK[:PART]:/PATH` targets inside a backup, and directory listings of them.

use std::io::{Read, Seek};
use std::path::Path;

use virtkeep_repo::{DiskViewOptions, Repository};

use crate::error::FilesError;
use crate::ext4::list_fs;
use crate::find::{FindResult, find_fs};
use crate::fs::{DirListing, GuestFs, MAX_PATH};
use crate::fsdetect::detect;
use crate::get::{GetOptions, GetSummary, get_fs};
use crate::lvm::{Mapped, read_pv};
use crate::open::{FsType, open_fs};
use crate::partition::read_table;
use crate::walk::{TimedFs, WalkOptions};

/// A place in a backup: a disk, optionally a partition number, and an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    pub disk: String,
    /// `None`: the filesystem spans the whole disk (or an LV holds it).
    pub partition: Option<u32>,
    /// `VG/LV`: a linear logical volume of guest LVM on this disk.
    pub lv: Option<String>,
    pub path: String,
}

impl std::str::FromStr for FileTarget {
    type Err = FilesError;

    /// `vda:1:/etc`, `vda:/etc` (whole-disk filesystem).
    fn from_str(s: &str) -> Result<Self, FilesError> {
        let bad = || FilesError::InvalidPath(s.chars().take(200).collect());
        if s.len() > MAX_PATH + 64 {
            return Err(bad());
        }
        let (disk, rest) = s.split_once(':').ok_or_else(bad)?;
        if !disk.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !disk
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad());
        }
        let (part, path) = if rest.starts_with('/') {
            (None, rest)
        } else {
            let (p, path) = rest.split_once(':').ok_or_else(bad)?;
            (Some(p), path)
        };
        let (partition, lv) = match part {
            None => (None, None),
            Some(p) if p.contains('/') => {
                let ok = |n: &str| {
                    !n.is_empty()
                        && n.len() <= 128
                        && !n.starts_with('-')
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
                };
                match p.split_once('/') {
                    Some((vg, lvn)) if ok(vg) && ok(lvn) => (None, Some(p.to_string())),
                    _ => return Err(bad()),
                }
            }
            Some(p) => (Some(p.parse::<u32>().map_err(|_| bad())?), None),
        };
        if !path.starts_with('/') {
            return Err(bad());
        }
        Ok(FileTarget {
            disk: disk.to_string(),
            partition,
            lv,
            path: path.to_string(),
        })
    }
}

impl FileTarget {
    /// `DISK[:PART]` (the filesystem's root) or `DISK[:PART]:/PATH`.
    pub fn parse_root(s: &str) -> Result<Self, FilesError> {
        if s.contains(":/") {
            s.parse()
        } else {
            format!("{s}:/").parse()
        }
    }
}

/// The place of `target`'s filesystem on a disk of `size` bytes: a partition, the
/// whole disk, or an LV found on any LVM2 PV of the disk.
fn locate<R: Read + Seek>(
    r: &mut R,
    size: u64,
    target: &FileTarget,
) -> Result<(Mapped<()>, String), FilesError> {
    if let Some(name) = &target.lv {
        for (pv_start, pv_len) in pv_ranges(r, size)? {
            let Ok((lvs, _)) = read_pv(r, pv_start, pv_len) else {
                continue;
            };
            if let Some(lv) = lvs.iter().find(|l| format!("{}/{}", l.vg, l.name) == *name) {
                return Ok((
                    Mapped::lv((), pv_start, lv),
                    format!("{} LV {name}", target.disk),
                ));
            }
        }
        return Err(FilesError::NotFound(format!(
            "disk {} has no linear LV {name}",
            target.disk
        )));
    }
    match target.partition {
        None => Ok((Mapped::range((), 0, size), target.disk.clone())),
        Some(n) => {
            let t = read_table(r, size)?;
            let p = t.partitions.iter().find(|p| p.number == n).ok_or_else(|| {
                FilesError::NotFound(format!("disk {} has no partition {n}", target.disk))
            })?;
            let what = format!("{} partition {n}", target.disk);
            Ok((Mapped::range((), p.start, p.size), what))
        }
    }
}

/// `(start, len)` of each LVM2 physical volume of a disk: partitions, or the whole disk.
pub(crate) fn pv_ranges<R: Read + Seek>(
    r: &mut R,
    size: u64,
) -> Result<Vec<(u64, u64)>, FilesError> {
    let t = read_table(r, size)?;
    let mut ranges: Vec<(u64, u64)> = t.partitions.iter().map(|p| (p.start, p.size)).collect();
    if ranges.is_empty() {
        ranges.push((0, size));
    }
    let mut out = Vec::new();
    for (start, len) in ranges {
        if detect(r, size, start, len)?.is_some_and(|f| f.kind == "LVM2_member") {
            out.push((start, len));
        }
    }
    Ok(out)
}

/// `target`'s filesystem, opened by its type.
pub(crate) fn open_target<R: Read + Seek + 'static>(
    mut r: R,
    size: u64,
    target: &FileTarget,
) -> Result<Box<dyn GuestFs>, FilesError> {
    let (place, what) = locate(&mut r, size, target)?;
    let mut m = place.with(r);
    let len = m.size();
    match detect(&mut m, len, 0, len)? {
        Some(f) => match FsType::of(&f) {
            Some(t) => open_fs(t, m, len),
            None => Err(FilesError::Unsupported {
                what,
                found: f.kind,
            }),
        },
        None => Err(FilesError::Unsupported {
            what,
            found: "no recognised filesystem".into(),
        }),
    }
}

/// A blocking reader over `target`'s disk in backup `id`, and the disk's size.
async fn open_disk(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    readahead_chunks: usize,
) -> Result<(virtkeep_repo::BlockingDiskView, u64), FilesError> {
    let m = repo.manifest(id).await?;
    if !m.disks.iter().any(|d| d.spec.name == target.disk) {
        return Err(FilesError::NotFound(format!(
            "backup {id} has no disk {:?}",
            target.disk
        )));
    }
    let opts = DiskViewOptions {
        readahead_chunks,
        ..DiskViewOptions::default()
    };
    let view = repo.disk_view(id, &target.disk, opts).await?;
    let r = view.blocking(tokio::runtime::Handle::current());
    Ok((r, view.size()))
}

/// List the directory `target` names in backup `id`, within `walk.timeout`.
pub async fn list_dir(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    walk: WalkOptions,
) -> Result<DirListing, FilesError> {
    // Metadata reads are scattered: no read-ahead.
    let (r, size) = open_disk(repo, id, target, 0).await?;
    let target = target.clone();
    tokio::task::spawn_blocking(move || {
        let mut fs = open_target(r, size, &target)?;
        list_fs(
            &mut TimedFs::new(fs.as_mut(), walk.timeout, "files ls"),
            &target.path,
        )
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

/// Copy the file or directory tree `target` names in backup `id` into directory `to`.
pub async fn get(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    to: &Path,
    opts: GetOptions,
) -> Result<GetSummary, FilesError> {
    // File data is read in order: the default read-ahead helps.
    let (r, size) = open_disk(
        repo,
        id,
        target,
        DiskViewOptions::default().readahead_chunks,
    )
    .await?;
    let (target, to) = (target.clone(), to.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let mut fs = open_target(r, size, &target)?;
        get_fs(fs.as_mut(), &target.path, &to, opts)
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

/// Entries under directory `target` of backup `id` whose name matches the glob
/// `pattern`, within `walk.timeout`.
pub async fn find(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    pattern: &str,
    walk: WalkOptions,
) -> Result<FindResult, FilesError> {
    let (r, size) = open_disk(repo, id, target, 0).await?;
    let (target, pattern) = (target.clone(), pattern.to_string());
    tokio::task::spawn_blocking(move || {
        let mut fs = open_target(r, size, &target)?;
        let mut timed = TimedFs::new(fs.as_mut(), walk.timeout, "files find");
        find_fs(&mut timed, &target.path, &pattern)
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

/// Size of the pieces a [`FileStream`] yields.
pub const STREAM_PIECE: usize = 1 << 20;
/// Pieces read ahead of the consumer (the bound on a stream's buffered bytes).
const STREAM_AHEAD: usize = 4;

/// A regular file of a backup, read piece by piece as the consumer takes them: no
/// local copy is made. Dropping it stops the reading thread at its next piece.
#[derive(Debug)]
pub struct FileStream {
    /// The file's size: exactly this many bytes come, or an error ends the stream.
    pub size: u64,
    /// The file's bytes in order, in pieces of at most [`STREAM_PIECE`].
    pub pieces: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, FilesError>>,
}

/// Streams the regular file `target` names in backup `id` (at most `max_size` bytes),
/// within `walk.timeout` for the whole read.
pub async fn stream_file(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    max_size: u64,
    walk: WalkOptions,
) -> Result<FileStream, FilesError> {
    let (r, size) = open_disk(
        repo,
        id,
        target,
        DiskViewOptions::default().readahead_chunks,
    )
    .await?;
    let target = target.clone();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (tx, pieces) = tokio::sync::mpsc::channel(STREAM_AHEAD);
    tokio::task::spawn_blocking(move || {
        let opened = open_target(r, size, &target).and_then(|mut fs| {
            let node = fs.stat(target.path.as_bytes())?;
            if node.kind != crate::fs::EntryKind::File || node.size > max_size {
                return Err(FilesError::Filesystem {
                    path: target.path.clone(),
                    reason: format!(
                        "not a regular file of at most {max_size} bytes ({:?}, {} bytes)",
                        node.kind, node.size
                    ),
                });
            }
            Ok((fs, node.size))
        });
        let (mut fs, len) = match opened {
            Ok(v) => v,
            Err(e) => return drop(head_tx.send(Err(e))),
        };
        if head_tx.send(Ok(len)).is_err() {
            return;
        }
        let mut timed = TimedFs::new(fs.as_mut(), walk.timeout, "download");
        send_pieces(&mut timed, target.path.as_bytes(), len, &tx);
    });
    let size = head_rx
        .await
        .map_err(|e| FilesError::Task(e.to_string()))??;
    Ok(FileStream { size, pieces })
}

/// Reads `len` bytes of file `path` into `tx` piece by piece until done, an error
/// (sent as the last item), or the receiver is gone.
fn send_pieces(
    fs: &mut dyn GuestFs,
    path: &[u8],
    len: u64,
    tx: &tokio::sync::mpsc::Sender<Result<bytes::Bytes, FilesError>>,
) {
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(STREAM_PIECE as u64) as usize;
        let mut buf = vec![0u8; want];
        let item = match crate::fs::read_full(fs, path, pos, &mut buf) {
            Ok(n) if n == want => Ok(bytes::Bytes::from(buf)),
            Ok(n) => Err(FilesError::Filesystem {
                path: crate::fs::show(path),
                reason: format!("file ended at {} of {len} bytes", pos + n as u64),
            }),
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
        pos += want as u64;
    }
}
