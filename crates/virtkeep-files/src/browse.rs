//! `DISK[:PART]:/PATH` targets inside a backup, and directory listings of them.

use std::io::{Read, Seek};
use std::path::Path;

use virtkeep_repo::{DiskViewOptions, Repository};

use crate::error::FilesError;
use crate::ext4::{DirListing, MAX_PATH, list_ext4};
use crate::find::{FindResult, find_ext4};
use crate::fsdetect::detect;
use crate::get::{GetOptions, GetSummary, get_ext4};
use crate::partition::read_table;

/// A place in a backup: a disk, optionally a partition number, and an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    pub disk: String,
    /// `None`: the filesystem spans the whole disk.
    pub partition: Option<u32>,
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
        let (partition, path) = if rest.starts_with('/') {
            (None, rest)
        } else {
            let (p, path) = rest.split_once(':').ok_or_else(bad)?;
            (Some(p.parse::<u32>().map_err(|_| bad())?), path)
        };
        if !path.starts_with('/') {
            return Err(bad());
        }
        Ok(FileTarget {
            disk: disk.to_string(),
            partition,
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

/// The byte range of `target`'s filesystem on a disk of `size` bytes read through `r`,
/// checked to hold ext2/3/4.
fn ext_range<R: Read + Seek>(
    r: &mut R,
    size: u64,
    target: &FileTarget,
) -> Result<(u64, u64), FilesError> {
    let (start, len, what) = match target.partition {
        None => (0, size, target.disk.clone()),
        Some(n) => {
            let t = read_table(r, size)?;
            let p = t.partitions.iter().find(|p| p.number == n).ok_or_else(|| {
                FilesError::NotFound(format!("disk {} has no partition {n}", target.disk))
            })?;
            (p.start, p.size, format!("{} partition {n}", target.disk))
        }
    };
    match detect(r, size, start, len)? {
        Some(f) if matches!(f.kind.as_str(), "ext2" | "ext3" | "ext4") => Ok((start, len)),
        Some(f) => Err(FilesError::Unsupported {
            what,
            found: f.kind,
        }),
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

/// List the directory `target` names in backup `id`.
pub async fn list_dir(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
) -> Result<DirListing, FilesError> {
    // Metadata reads are scattered: no read-ahead.
    let (mut r, size) = open_disk(repo, id, target, 0).await?;
    let target = target.clone();
    tokio::task::spawn_blocking(move || {
        let (start, len) = ext_range(&mut r, size, &target)?;
        list_ext4(r, start, len, &target.path)
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
    let (mut r, size) = open_disk(
        repo,
        id,
        target,
        DiskViewOptions::default().readahead_chunks,
    )
    .await?;
    let (target, to) = (target.clone(), to.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let (start, len) = ext_range(&mut r, size, &target)?;
        get_ext4(r, start, len, &target.path, &to, opts)
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

/// Entries under directory `target` of backup `id` whose name matches the glob `pattern`.
pub async fn find(
    repo: &Repository,
    id: &str,
    target: &FileTarget,
    pattern: &str,
) -> Result<FindResult, FilesError> {
    let (mut r, size) = open_disk(repo, id, target, 0).await?;
    let (target, pattern) = (target.clone(), pattern.to_string());
    tokio::task::spawn_blocking(move || {
        let (start, len) = ext_range(&mut r, size, &target)?;
        find_ext4(r, start, len, &target.path, &pattern)
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}
