//! `virtkeep restore SNAPSHOT --disk vda --to-file PATH`: one disk into a local file on
//! the node, no hypervisor involved. Sparse raw (only data extents are written), or
//! qcow2 converted from it with the node's `qemu-img`; written beside PATH under a
//! temporary name and renamed into place once complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use super::staged::TEMP_MARKER;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Event, Progress};

/// Chunks read ahead of the one being written.
const READ_AHEAD: usize = 4;
/// Deadline of the local `qemu-img convert` (per GiB of disk, at least a minute).
const CONVERT_SECS_PER_GIB: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Raw,
    Qcow2,
}

impl FileFormat {
    pub fn parse(s: &str) -> Result<FileFormat> {
        match s {
            "raw" => Ok(FileFormat::Raw),
            "qcow2" => Ok(FileFormat::Qcow2),
            _ => Err(Error::config(format!(
                "format {s:?}: expected raw or qcow2"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub snapshot: String,
    /// The disk's target (`vda`).
    pub disk: String,
    pub path: PathBuf,
    pub format: FileFormat,
    /// Replace an existing file.
    pub force: bool,
}

/// What `restore --to-file` reports (stable in `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct LocalResult {
    pub snapshot: String,
    pub disk: String,
    pub path: String,
    pub format: FileFormat,
    pub size: u64,
    pub bytes_written: u64,
    pub duration_secs: f64,
}

pub async fn restore_to_file(
    repo: &virtkeep_repo::Repository,
    opts: &LocalOptions,
    progress: Arc<dyn Progress>,
) -> Result<LocalResult> {
    let started = Instant::now();
    let id = crate::snapshot_ref::resolve(repo, &opts.snapshot).await?;
    let manifest = repo.manifest(&id).await?;
    let Some(m) = manifest.disks.iter().find(|m| m.spec.target == opts.disk) else {
        let have: Vec<&str> = manifest
            .disks
            .iter()
            .map(|m| m.spec.target.as_str())
            .collect();
        return Err(Error::config(format!(
            "backup {id} has no disk {}; it has {}",
            opts.disk,
            have.join(", ")
        )));
    };
    let path = std::path::absolute(&opts.path).map_err(|e| local_err("resolving the path", e))?;
    check_target(&path, opts.force)?;
    let tag = crate::job_id();
    let temp = temp_beside(&path, &tag, "raw")?;
    let res = async {
        let written = write_raw(repo, &id, m, &temp, &progress).await?;
        let done = match opts.format {
            FileFormat::Raw => temp.clone(),
            FileFormat::Qcow2 => {
                let q = temp_beside(&path, &tag, "qcow2")?;
                convert(&temp, &q, m.spec.size).await?;
                q
            }
        };
        std::fs::rename(&done, &path).map_err(|e| local_err("renaming into place", e))?;
        Ok::<u64, Error>(written)
    }
    .await;
    for ext in ["raw", "qcow2"] {
        if let Ok(t) = temp_beside(&path, &tag, ext) {
            let _ = std::fs::remove_file(t);
        }
    }
    Ok(LocalResult {
        snapshot: id,
        disk: opts.disk.clone(),
        path: path.display().to_string(),
        format: opts.format,
        size: m.spec.size,
        bytes_written: res?,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

fn local_err(what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorKind::DataPath, format!("{what}: {e}"))
}

/// An existing file is replaced only with `--force`, and never through a symlink.
fn check_target(path: &Path, force: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(local_err(&format!("checking {}", path.display()), e)),
        Ok(md) if !md.file_type().is_file() => Err(Error::conflict(format!(
            "{} exists and is not a regular file",
            path.display()
        ))),
        Ok(_) if !force => Err(Error::conflict(format!("{} exists", path.display()))
            .hint("choose another path, or replace it with --force")),
        Ok(_) => Ok(()),
    }
}

fn temp_beside(path: &Path, tag: &str, ext: &str) -> Result<PathBuf> {
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(Error::config(format!(
            "{}: not a file path",
            path.display()
        )));
    };
    let file = file.to_string_lossy();
    let short: String = file.chars().take(150).collect();
    Ok(dir.join(format!(".{short}{TEMP_MARKER}{tag}.{ext}")))
}

/// Writes the disk as a sparse raw file: only data extents are written.
async fn write_raw(
    repo: &virtkeep_repo::Repository,
    id: &str,
    m: &virtkeep_repo::ManifestDisk,
    temp: &Path,
    progress: &Arc<dyn Progress>,
) -> Result<u64> {
    let reader = Arc::new(repo.disk_reader(id, &m.spec.name).await?);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| local_err(&format!("creating {}", temp.display()), e))?;
    file.set_len(m.spec.size)
        .map_err(|e| local_err("sizing the file", e))?;
    let file = Arc::new(file);
    let disk = m.spec.target.clone();
    progress.event(Event::DiskStart {
        vm: String::new(),
        disk: disk.clone(),
        bytes: m.spec.size,
    });
    let chunk = reader.index().chunk_size;
    let mut chunks = futures::stream::iter(0..reader.index().chunk_count())
        .map(|i| {
            let reader = reader.clone();
            async move { (i, reader.read_chunk(i).await) }
        })
        .buffered(READ_AHEAD);
    let mut written = 0u64;
    while let Some((i, data)) = chunks.next().await {
        let Some(data) = data? else { continue };
        let file = file.clone();
        let n = tokio::task::spawn_blocking(move || write_extents(&file, i * chunk, data))
            .await
            .map_err(|e| Error::new(ErrorKind::DataPath, format!("writer failed: {e}")))??;
        written += n;
        progress.event(Event::DiskBytes {
            disk: disk.clone(),
            bytes: n,
        });
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| Error::new(ErrorKind::DataPath, format!("sync failed: {e}")))?
        .map_err(|e| local_err("syncing the file", e))?;
    progress.event(Event::DiskDone { disk });
    Ok(written)
}

fn write_extents(file: &std::fs::File, offset: u64, data: bytes::Bytes) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    for extent in virtkeep_repo::split_zero_runs(offset, data) {
        if let virtkeep_repo::Extent::Data { offset, bytes } = extent {
            file.write_all_at(&bytes, offset)
                .map_err(|e| local_err("writing the file", e))?;
            n += bytes.len() as u64;
        }
    }
    Ok(n)
}

/// `qemu-img convert` raw → qcow2 on the node (holes stay unallocated).
async fn convert(raw: &Path, qcow2: &Path, size: u64) -> Result<()> {
    let secs = CONVERT_SECS_PER_GIB * (size >> 30).max(1);
    let run = tokio::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(secs), run)
        .await
        .map_err(|_| Error::new(ErrorKind::DataPath, "qemu-img convert timed out"))?
        .map_err(|e| {
            local_err("running qemu-img", e)
                .hint("--format qcow2 needs qemu-img (package qemu-utils) on this node; --format raw does not")
        })?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::DataPath,
            format!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}
