//! `GET /api/backups/{id}/files` and `GET /api/backups/{id}/files/download`: a backup's
//! disks, directories and files, read in-process through `virtkeep-files` (issue 19).
//!
//! The query is untrusted: the target is bounded in length and parsed by
//! [`FileTarget`], and its path must be absolute and normal (no `.`, `..` or empty
//! components, no NUL), so it can only name something inside the guest filesystem.
//! Reads of guest bytes run on blocking threads inside `virtkeep-files`. At most
//! [`MAX_FILE_REQUESTS`] such requests run at once (each holds a disk view's cache);
//! more are answered 503. A download streams the file straight from the backup (no
//! local copy, so no temporary space) and holds its slot until its body ends or the
//! client goes away.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::{IntoParams, ToSchema};
use virtkeep_files::{
    DirListing, DiskLayout, EntryKind, FileStream, FileTarget, FilesError, MAX_PATH, WalkOptions,
};
use virtkeep_repo::{RepoError, Repository};

use crate::api::{ApiError, ApiState};
use crate::task::open_repository;

/// Longest `path` query accepted (a guest path plus `DISK:PART:`).
pub const MAX_TARGET: usize = MAX_PATH + 200;
/// Largest file one download serves.
pub const MAX_DOWNLOAD_BYTES: u64 = 16 << 30;
/// File requests (listings and downloads, a download until its body ends) running at
/// once, the web console's included: they share one pool of slots ([`file_slot`]).
pub const MAX_FILE_REQUESTS: usize = 4;

static RUNNING: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// `DISK[:PART]:/PATH` (`PART` a partition number or `VG/LV`); without it the
    /// disks, partitions, LVs and filesystems of the backup.
    pub path: Option<String>,
    /// A name from `[repositories]`; the default repository otherwise.
    pub repository: Option<String>,
}

/// The layout of every disk of a backup (as `virtkeep --json files ls ID`).
#[derive(Debug, Serialize, ToSchema)]
pub struct FilesLayoutView {
    pub snapshot: String,
    /// Disks with partitions, LVs, filesystems and warnings (docs/daemon.md).
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<DiskLayout>,
}

/// A directory of a backup (as `virtkeep --json files ls ID DISK[:PART]:/PATH`).
#[derive(Debug, Serialize, ToSchema)]
pub struct FilesDirView {
    pub snapshot: String,
    pub disk: String,
    pub partition: Option<u32>,
    pub lv: Option<String>,
    /// `path`, `entries` (name, kind, size, mode, uid, gid, mtime, target), `truncated`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub listing: DirListing,
}

/// A refused or failed request: its status and the message of its JSON answer.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
                required_scope: None,
                token_scope: None,
            }),
        )
            .into_response()
    }
}

fn fail(status: StatusCode, msg: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: msg.into(),
    }
}

fn repo_status(e: &RepoError) -> StatusCode {
    match e {
        RepoError::SnapshotNotFound(_) | RepoError::DiskNotFound { .. } => StatusCode::NOT_FOUND,
        RepoError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The answer to a failed read: 404 for what is not there, 400 for a malformed target,
/// 422 for a filesystem that cannot be read, 502 when the repository fails.
fn files_fail(e: FilesError) -> Refusal {
    let status = match &e {
        FilesError::Repo(r) => repo_status(r),
        FilesError::InvalidPath(_) => StatusCode::BAD_REQUEST,
        FilesError::NotFound(_) => StatusCode::NOT_FOUND,
        // ext4-view's "file not found"; other reasons are a damaged or unexpected tree.
        FilesError::Filesystem { reason, .. } if reason.ends_with("not found") => {
            StatusCode::NOT_FOUND
        }
        FilesError::Filesystem { .. } | FilesError::Unsupported { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(status, e.to_string())
}

/// The target of a `path` query, refused (400) unless bounded, well-formed and normal.
fn parse_target(raw: &str) -> Result<FileTarget, Refusal> {
    let bad = |why: &str| fail(StatusCode::BAD_REQUEST, format!("path: {why}"));
    if raw.len() > MAX_TARGET {
        return Err(bad(&format!("longer than {MAX_TARGET} bytes")));
    }
    if raw.contains('\0') {
        return Err(bad("contains NUL"));
    }
    let t = FileTarget::parse_root(raw).map_err(|e| bad(&e.to_string()))?;
    let parts: Vec<&str> = t.path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    for (i, p) in parts.iter().enumerate() {
        if *p == "." || *p == ".." || (p.is_empty() && i != last) {
            return Err(bad(
                "the path must be absolute and normal (no '.', '..' or '//')",
            ));
        }
    }
    Ok(t)
}

fn check_id(id: &str) -> Result<(), Refusal> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(fail(
            StatusCode::BAD_REQUEST,
            "backup id must be 1-128 chars of [A-Za-z0-9._-] not starting with '.'",
        ))
    }
}

/// A free slot among [`MAX_FILE_REQUESTS`] (API and web console alike), if any.
pub(crate) fn file_slot() -> Option<OwnedSemaphorePermit> {
    RUNNING
        .get_or_init(|| Arc::new(Semaphore::new(MAX_FILE_REQUESTS)))
        .clone()
        .try_acquire_owned()
        .ok()
}

/// Runs `work` in a task of its own that holds `slot` until `work` ends. Reads of a
/// backup run on blocking threads that cannot be cancelled: when the request is dropped
/// (its timeout, or the client left) they go on to their own time limit, and they
/// keep counting against [`MAX_FILE_REQUESTS`] until they really end.
pub(crate) async fn run_held<T: Send + 'static>(
    slot: OwnedSemaphorePermit,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::spawn(async move {
        let out = work.await;
        drop(slot);
        out
    })
    .await
}

/// A slot among [`MAX_FILE_REQUESTS`], the repository, and the checked backup id.
async fn begin(
    s: &ApiState,
    id: &str,
    repository: Option<&str>,
) -> Result<(OwnedSemaphorePermit, Repository), Refusal> {
    check_id(id)?;
    let permit = file_slot().ok_or_else(|| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_FILE_REQUESTS} file requests are running; try again shortly"),
        )
    })?;
    let rc = s
        .env
        .repository_config(repository)
        .map_err(|e| fail(StatusCode::NOT_FOUND, e.to_string()))?;
    let repo = open_repository(rc)
        .await
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok((permit, repo))
}

fn query_of(q: Result<Query<FilesQuery>, QueryRejection>) -> Result<FilesQuery, Refusal> {
    q.map(|Query(q)| q)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, e.body_text()))
}

#[utoipa::path(get, path = "/api/backups/{id}/files", tag = "backups",
    params(("id" = String, Path, description = "Backup id"), FilesQuery),
    responses((status = 200, description = "Without path: the disks' layout (FilesLayoutView); with path: the directory (FilesDirView)", body = FilesDirView),
              (status = 400, description = "Malformed id or path", body = ApiError),
              (status = 404, description = "No such backup, disk, partition, LV or path", body = ApiError),
              (status = 422, description = "The filesystem cannot be read there", body = ApiError),
              (status = 503, description = "Too many file requests at once", body = ApiError)))]
pub async fn list_files(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Response {
    list(&s, id, q)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn list(
    s: &ApiState,
    id: String,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let q = query_of(q)?;
    let target = q.path.as_deref().map(parse_target).transpose()?;
    let (permit, repo) = begin(s, &id, q.repository.as_deref()).await?;
    run_held(permit, async move {
        let Some(t) = target else {
            let disks = virtkeep_files::backup_layout(&repo, &id)
                .await
                .map_err(files_fail)?;
            return Ok(Json(FilesLayoutView {
                snapshot: id,
                disks,
            })
            .into_response());
        };
        let listing = virtkeep_files::list_dir(&repo, &id, &t, WalkOptions::default())
            .await
            .map_err(files_fail)?;
        Ok(Json(FilesDirView {
            snapshot: id,
            disk: t.disk,
            partition: t.partition,
            lv: t.lv,
            listing,
        })
        .into_response())
    })
    .await
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// `(parent directory, name)` of a file path; `None` for the root.
fn split_file(path: &str) -> Option<(String, String)> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let (dir, name) = trimmed.rsplit_once('/')?;
    if name.is_empty() {
        return None;
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    Some((dir.to_string(), name.to_string()))
}

/// `Content-Disposition` for a guest file name: an ASCII fallback with anything but
/// `[A-Za-z0-9._-]` replaced, and the exact name percent-encoded (RFC 6266 / 5987).
pub fn disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let ascii = if ascii.trim_matches('.').is_empty() {
        "download".to_string()
    } else {
        ascii
    };
    let mut encoded = String::new();
    for b in name.bytes().take(1024) {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Size of the regular file `t` names, or the answer refusing it.
async fn file_size(repo: &Repository, id: &str, t: &FileTarget) -> Result<(u64, String), Refusal> {
    let not_file = || {
        fail(
            StatusCode::BAD_REQUEST,
            format!("{} is a directory", t.path),
        )
    };
    let (dir, name) = split_file(&t.path).ok_or_else(not_file)?;
    let parent = FileTarget {
        path: dir,
        ..t.clone()
    };
    let listing = virtkeep_files::list_dir(repo, id, &parent, WalkOptions::default())
        .await
        .map_err(files_fail)?;
    let e = listing
        .entries
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| fail(StatusCode::NOT_FOUND, format!("{}: file not found", t.path)))?;
    if e.kind != EntryKind::File {
        let kind = match e.kind {
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symlink",
            _ => "special file",
        };
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is a {kind}; only regular files can be downloaded",
                t.path
            ),
        ));
    }
    if e.size > MAX_DOWNLOAD_BYTES {
        return Err(fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} is {} bytes; downloads are limited to {MAX_DOWNLOAD_BYTES} (use virtkeep files get)",
                t.path, e.size
            ),
        ));
    }
    Ok((e.size, name))
}

/// The file `t` (of `size` bytes, as its listing said) as a stream from the backup.
async fn open_stream(
    repo: &Repository,
    id: &str,
    t: &FileTarget,
    size: u64,
) -> Result<FileStream, Refusal> {
    // The whole download, client included, within get's limit (hours at disk speed).
    let walk = WalkOptions {
        timeout: virtkeep_files::DEFAULT_GET_TIMEOUT,
    };
    let fs = virtkeep_files::stream_file(repo, id, t, MAX_DOWNLOAD_BYTES, walk)
        .await
        .map_err(files_fail)?;
    if fs.size != size {
        return Err(fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}: the file changed size while read ({} of {size} bytes)",
                t.path, fs.size
            ),
        ));
    }
    Ok(fs)
}

/// The body yielding `f`'s pieces; the permit is held until the stream ends or is
/// dropped (the client went away), which also stops the reading thread.
fn stream(f: FileStream, permit: OwnedSemaphorePermit) -> Body {
    let s = futures::stream::unfold((f.pieces, permit), |(mut rx, permit)| async move {
        let item = rx.recv().await?;
        let item = item.map_err(|e| std::io::Error::other(e.to_string()));
        Some((item, (rx, permit)))
    });
    Body::from_stream(s)
}

#[utoipa::path(get, path = "/api/backups/{id}/files/download", tag = "backups",
    params(("id" = String, Path, description = "Backup id"), FilesQuery),
    responses((status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
              (status = 400, description = "Malformed path, or not a regular file", body = ApiError),
              (status = 404, description = "No such backup, disk, partition, LV or file", body = ApiError),
              (status = 422, description = "Unreadable filesystem, or larger than the download limit", body = ApiError),
              (status = 503, description = "Too many file requests at once", body = ApiError)))]
pub async fn download_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Response {
    download(&s, id, q)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn download(
    s: &ApiState,
    id: String,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let q = query_of(q)?;
    let raw = q.path.as_deref().ok_or_else(|| {
        fail(
            StatusCode::BAD_REQUEST,
            "path is required: DISK[:PART]:/PATH",
        )
    })?;
    let t = parse_target(raw)?;
    let (permit, repo) = begin(s, &id, q.repository.as_deref()).await?;
    // The listing that finds the file and the opening run in a task of their own that
    // holds the permit: when `request_timeout` drops this handler, they still count
    // against MAX_FILE_REQUESTS until they end. Then the body holds the permit for the
    // stream's life; nothing is read ahead of the client but a few pieces.
    let (opened, permit) = tokio::spawn(async move {
        let opened = match file_size(&repo, &id, &t).await {
            Ok((size, name)) => open_stream(&repo, &id, &t, size)
                .await
                .map(|f| (f, size, name)),
            Err(e) => Err(e),
        };
        (opened, permit)
    })
    .await
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (opened, size, name) = opened?;
    let mut r = Response::new(stream(opened, permit));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition(&name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request dropped while its blocking read runs (the timeout) does not free its
    /// slot: the slot comes back only when the read ends.
    #[tokio::test]
    async fn a_timed_out_request_keeps_its_slot_until_its_read_ends() {
        let slots: Vec<_> = std::iter::from_fn(file_slot).collect();
        assert_eq!(slots.len(), MAX_FILE_REQUESTS);
        let mut slots = slots.into_iter();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let work = async move {
            let r = tokio::task::spawn_blocking(move || wait.recv()).await;
            let _ = ended_tx.send(());
            r
        };
        let held = run_held(slots.next().expect("a slot"), work);
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(50), held).await;
        assert!(timed_out.is_err(), "the read should still run");
        drop(slots);
        // Three slots are free again; the timed-out request's is not.
        let again: Vec<_> = std::iter::from_fn(file_slot).collect();
        assert_eq!(again.len(), MAX_FILE_REQUESTS - 1);
        release.send(()).expect("release the read");
        ended.await.expect("the read ended");
        let mut freed = None;
        for _ in 0..200 {
            freed = file_slot();
            if freed.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(freed.is_some(), "the slot came back after the read ended");
    }

    #[test]
    fn targets_must_be_bounded_and_normal() {
        for ok in [
            "vda:1:/etc",
            "vda:/",
            "vda:1",
            "vda:vg0/root:/home/a b/",
            "vda:1:/ünï",
        ] {
            assert!(parse_target(ok).is_ok(), "{ok}");
        }
        let long = format!("vda:1:/{}", "a".repeat(MAX_TARGET));
        for bad in [
            "vda:1:/etc/../..",
            "vda:1:/..",
            "vda:1:/./etc",
            "vda:1://etc",
            "vda:1:/etc\0x",
            "../vda:1:/",
            "vda:-1:/",
            "vda:1:etc",
            long.as_str(),
        ] {
            let r = parse_target(bad).expect_err(bad);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn file_names_split_and_dispositions_are_safe() {
        assert_eq!(
            split_file("/etc/hostname"),
            Some(("/etc".into(), "hostname".into()))
        );
        assert_eq!(split_file("/a"), Some(("/".into(), "a".into())));
        assert_eq!(split_file("/"), None);
        let d = disposition("ünï \"x\";\r\n.txt");
        assert!(
            d.starts_with("attachment; filename=\"_n___x____.txt\""),
            "{d}"
        );
        assert!(
            d.ends_with("filename*=UTF-8''%C3%BCn%C3%AF%20%22x%22%3B%0D%0A.txt"),
            "{d}"
        );
        assert!(HeaderValue::from_str(&d).is_ok());
        assert!(disposition("..").contains("filename=\"download\""));
    }
}
