//! Files: a backup's disks, partitions, LVs and directories, and downloading a file
//! (read scope, the default repository, like `GET /api/backups/{id}/files`).
//!
//! Listings are read in-process through `virtkeep-files`, with the API's checks on the
//! untrusted id and path (bounded, absolute and normal), in the API's slots
//! ([`crate::files_api::file_slot`]: one cap on file requests at once, each slot held
//! until its reads really end). A download is the API's own handler
//! ([`crate::files_api::download_file`]) called in-process: its checks, size limit,
//! concurrency cap and streaming; only its errors are turned into a page.

use std::sync::Arc;

use axum::Extension;
use axum::body::to_bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use virtkeep_files::{DirListing, DiskLayout, EntryKind, FileTarget, FsInfo};

use super::view::{Viewer, WebState, bytes, layout, page_error};
use crate::files_api::{FilesQuery, MAX_TARGET};

/// Largest error answer of the download handler read back.
const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Debug, Default, Deserialize)]
pub struct FilesParams {
    #[serde(default)]
    snapshot: String,
    /// `DISK[:PART]:/PATH`; empty: the disks' layout.
    #[serde(default)]
    path: String,
}

/// The API's rule for backup ids: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The target named by `raw`: bounded, well-formed, absolute and normal (no `.`, `..`
/// or empty components), as the files API requires.
fn target(raw: &str) -> Result<FileTarget, String> {
    if raw.len() > MAX_TARGET || raw.contains('\0') {
        return Err("The path is too long or contains NUL.".into());
    }
    let t = FileTarget::parse_root(raw).map_err(|e| e.to_string())?;
    let parts: Vec<&str> = t.path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let abnormal = parts
        .iter()
        .enumerate()
        .any(|(i, p)| *p == "." || *p == ".." || (p.is_empty() && i != last));
    if abnormal {
        return Err("The path must be absolute and normal (no '.', '..' or '//').".into());
    }
    Ok(t)
}

/// `s` percent-encoded for a query value (everything but `[A-Za-z0-9._~-]`).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._~-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The page of `snapshot` at `target` (`DISK[:PART]:/PATH`).
fn href(page: &str, snapshot: &str, target: &str) -> String {
    format!(
        "/ui/files{page}?snapshot={}&path={}",
        enc(snapshot),
        enc(target)
    )
}

/// `DISK:` or `DISK:PART:` or `DISK:VG/LV:` of a target.
fn root_of(t: &FileTarget) -> String {
    match (&t.partition, &t.lv) {
        (_, Some(lv)) => format!("{}:{lv}:", t.disk),
        (Some(p), None) => format!("{}:{p}:", t.disk),
        (None, None) => format!("{}:", t.disk),
    }
}

fn fs_text(fs: &FsInfo) -> String {
    match &fs.label {
        Some(l) => format!("{} \u{201c}{l}\u{201d}", fs.kind),
        None => fs.kind.clone(),
    }
}

/// A filesystem's row: a link to its root when it has one.
fn fs_row(snapshot: &str, root: &str, what: &str, size: u64, fs: Option<&FsInfo>) -> Markup {
    html! {
        tr {
            th scope="row" data-label="Volume" {
                @if fs.is_some() { a href=(href("", snapshot, &format!("{root}/"))) { (what) } } @else { (what) }
            }
            td data-label="Size" { (bytes(size)) }
            td data-label="Filesystem" { (fs.map(fs_text).unwrap_or_else(|| "none found".into())) }
        }
    }
}

fn layout_view(snapshot: &str, disks: &[DiskLayout]) -> Markup {
    html! {
        @for d in disks {
            section.card aria-labelledby={"d-" (d.disk)} {
                h2 id={"d-" (d.disk)} { "Disk " (d.disk) " · " (bytes(d.size)) }
                table {
                    caption { "Partitions, logical volumes and filesystems" }
                    thead { tr { th scope="col" { "Volume" } th scope="col" { "Size" } th scope="col" { "Filesystem" } } }
                    tbody {
                        @if d.filesystem.is_some() {
                            (fs_row(snapshot, &format!("{}:", d.disk), "whole disk", d.size, d.filesystem.as_ref()))
                        }
                        @for p in &d.partitions {
                            (fs_row(snapshot, &format!("{}:{}:", d.disk, p.partition.number),
                                &format!("partition {}", p.partition.number), p.partition.size, p.filesystem.as_ref()))
                        }
                        @for lv in &d.lvs {
                            (fs_row(snapshot, &format!("{}:{}:", d.disk, lv.name),
                                &format!("LV {}", lv.name), lv.size, lv.filesystem.as_ref()))
                        }
                    }
                }
                @for w in &d.warnings { p.hint { (w) } }
            }
        }
    }
}

fn kind_text(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::BlockDevice => "block device",
        EntryKind::CharDevice => "char device",
        EntryKind::Fifo => "fifo",
        EntryKind::Socket => "socket",
        EntryKind::Unknown => "unreadable",
    }
}

/// Links to each directory above `t.path` (the trail).
fn crumbs(snapshot: &str, t: &FileTarget) -> Markup {
    let root = root_of(t);
    let mut at = String::new();
    let mut trail = Vec::new();
    for part in t.path.split('/').filter(|p| !p.is_empty()) {
        at.push('/');
        at.push_str(part);
        trail.push((part, href("", snapshot, &format!("{root}{at}"))));
    }
    html! {
        nav aria-label="Path" {
            a href=(format!("/ui/files?snapshot={}", enc(snapshot))) { "disks" } " / "
            a href=(href("", snapshot, &format!("{root}/"))) { (root) }
            @for (part, link) in &trail { " / " a href=(link) { (part) } }
        }
    }
}

fn dir_view(snapshot: &str, t: &FileTarget, d: &DirListing) -> Markup {
    let root = root_of(t);
    let base = t.path.trim_end_matches('/');
    html! {
        (crumbs(snapshot, t))
        @if d.truncated { p.hint { "This directory has more entries than are listed." } }
        table {
            caption { (d.entries.len()) " entries in " code { (d.path) } }
            thead { tr { th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Size" } th scope="col" { "Modified" } th scope="col" { "Mode" } } }
            tbody { @for e in &d.entries {
                @let full = format!("{root}{base}/{}", e.name);
                tr {
                    th scope="row" data-label="Name" {
                        @match e.kind {
                            EntryKind::Dir => { a href=(href("", snapshot, &full)) { (e.name) "/" } }
                            EntryKind::File => {
                                a href=(href("/download", snapshot, &full)) download=(e.name)
                                    aria-label={"Download " (e.name)} { (e.name) }
                            }
                            _ => { (e.name) }
                        }
                        @if let Some(to) = &e.target { " → " code { (to) } }
                        @if let Some(why) = &e.error { " — " span.hint { (why) } }
                    }
                    td data-label="Kind" { (kind_text(e.kind)) }
                    td data-label="Size" { @if e.kind == EntryKind::File { (bytes(e.size)) } }
                    td data-label="Modified" { (crate::catalog::rfc3339(e.mtime)) }
                    td data-label="Mode" { code { (format!("{:04o}", e.mode)) } }
                }
            } }
        }
    }
}

/// `/ui/files?snapshot=ID[&path=DISK[:PART]:/PATH]`: the disks, or one directory.
pub async fn browse(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<FilesParams>,
) -> Response {
    let bad = |msg: &str| page_error(StatusCode::BAD_REQUEST, "Bad request", msg);
    if !id_ok(&q.snapshot) {
        return bad("Pick a backup (its id: 1-128 of A-Z a-z 0-9 . _ -).");
    }
    let t = match (!q.path.is_empty()).then(|| target(&q.path)).transpose() {
        Ok(t) => t,
        Err(e) => return bad(&e),
    };
    let Some(slot) = crate::files_api::file_slot() else {
        return page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Other file requests are running; try again shortly.",
        );
    };
    let repo = match crate::task::open_repository(&s.api.env.default_repository).await {
        Ok(r) => r,
        Err(e) => return page_error(StatusCode::BAD_GATEWAY, "Repository error", &e.to_string()),
    };
    let id = q.snapshot.clone();
    let read = crate::files_api::run_held(slot, async move {
        let id = id.as_str();
        match &t {
            None => virtkeep_files::backup_layout(&repo, id)
                .await
                .map(|disks| layout_view(id, &disks)),
            Some(t) => {
                virtkeep_files::list_dir(&repo, id, t, virtkeep_files::WalkOptions::default())
                    .await
                    .map(|d| dir_view(id, t, &d))
            }
        }
    })
    .await;
    let id = q.snapshot.as_str();
    let body = match read {
        Ok(Ok(b)) => b,
        Err(e) => {
            return page_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot list",
                &e.to_string(),
            );
        }
        Ok(Err(e)) => {
            return page_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Cannot list",
                &e.to_string(),
            );
        }
    };
    let title = format!("Files of {id}");
    layout(&title, Some(&v), body).into_response()
}

/// The JSON error answer of the files API.
#[derive(Deserialize)]
struct ApiMessage {
    error: String,
}

/// `/ui/files/download?snapshot=ID&path=DISK[:PART]:/PATH`: the file, through the API's
/// download handler; its refusals become a page.
pub async fn download(State(s): State<Arc<WebState>>, Query(q): Query<FilesParams>) -> Response {
    if !id_ok(&q.snapshot) || q.path.is_empty() {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Name a backup and a file.",
        );
    }
    let query = FilesQuery {
        path: Some(q.path),
        repository: None,
    };
    let r =
        crate::files_api::download_file(State(s.api.clone()), Path(q.snapshot), Ok(Query(query)))
            .await;
    if r.status().is_success() {
        return r;
    }
    let status = r.status();
    let msg = match to_bytes(r.into_body(), MAX_ERROR_BODY).await {
        Ok(b) => serde_json::from_slice::<ApiMessage>(&b)
            .map(|m| m.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&b).into_owned()),
        Err(e) => e.to_string(),
    };
    page_error(status, "Cannot download", &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_links_encoded() {
        assert!(id_ok("a1b2.c_d-e"));
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(!id_ok(bad), "{bad}");
        }
        assert!(target("vda:1:/etc/").is_ok());
        assert!(target("vda:vg0/root:/home").is_ok());
        for bad in ["vda:1:/etc/../..", "vda:1://etc", "vda:1:/a\0", "vda:-1:/"] {
            assert!(target(bad).is_err(), "{bad}");
        }
        assert_eq!(
            enc("vda:1:/a b&c=d/ü"),
            "vda%3A1%3A%2Fa%20b%26c%3Dd%2F%C3%BC"
        );
        let t = target("vda:vg0/root:/etc").expect("target");
        assert_eq!(root_of(&t), "vda:vg0/root:");
        let page = crumbs("snap1", &t).into_string();
        assert!(
            page.contains("path=vda%3Avg0%2Froot%3A%2Fetc\">etc</a>"),
            "{page}"
        );
    }
}
