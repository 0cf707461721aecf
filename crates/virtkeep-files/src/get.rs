//! `files get`: copy a file or a directory tree out of an ext2/3/4 filesystem of a
//! backup into a local directory.
//!
//! Names come from the guest and are untrusted: a component that is empty, `.`, `..`,
//! or holds `/` or NUL is skipped, so every path written is the destination joined with
//! checked components. Nothing is followed through a symlink this copy made: files are
//! created with `O_EXCL` (which does not follow a symlink at the path), an existing
//! entry is only reused as a directory when it is a real directory, and replaced only
//! with `--overwrite`. Set-user-ID and set-group-ID bits are dropped: the copy belongs to
//! whoever runs virtkeep (often root), not to the guest's owner.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use ext4_view::{Ext4, Metadata};
use serde::Serialize;

use crate::error::FilesError;
use crate::ext4::{EntryKind, MAX_PATH, PartReader, fs_err, kind};
use crate::ext4raw::RawExt;

/// Most entries one `files get` copies unless told otherwise.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// A run of zeros this long, aligned, is left as a hole in the copy.
const HOLE: usize = 4096;
const BUF: usize = 1 << 20;

/// How `files get` copies.
#[derive(Debug, Clone, Copy)]
pub struct GetOptions {
    /// Replace existing files and symlinks, and write into existing directories.
    pub overwrite: bool,
    /// Fail after this many entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for GetOptions {
    fn default() -> Self {
        GetOptions {
            overwrite: false,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What a copy wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GetSummary {
    /// The local path of the copied file or directory.
    pub to: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    /// File bytes copied (holes included).
    pub bytes: u64,
    /// Entries not copied (unsafe names, device files, unreadable link data), with why.
    pub skipped: Vec<String>,
}

/// One reader shared by `ext4-view` and [`RawExt`] (both on this thread).
struct Shared<R>(Rc<RefCell<R>>);

impl<R: Read> Read for Shared<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<R: Seek> Seek for Shared<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.borrow_mut().seek(pos)
    }
}

struct Copier<R> {
    fs: Ext4,
    raw: Option<RawExt<Shared<R>>>,
    opts: GetOptions,
    sum: GetSummary,
    /// Inode → the first local path it was copied to (files with more than one link).
    links: HashMap<u32, PathBuf>,
    /// Directory inodes entered: a corrupt tree that loops is cut.
    dirs_seen: HashSet<u32>,
    entries: u64,
}

fn local_err(path: &Path, e: std::io::Error) -> FilesError {
    FilesError::Local {
        path: path.display().to_string(),
        source: e,
    }
}

/// A name from the guest that is safe as one local path component.
fn safe_name(name: &[u8]) -> Option<&OsStr> {
    let bad = name.is_empty()
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0);
    (!bad).then(|| OsStr::from_bytes(name))
}

/// Copy `path` of the ext2/3/4 filesystem at `start..start+len` of `r` into directory
/// `to` (created if missing) as `to/NAME`; `/` copies the root's entries into `to`.
/// Synchronous: run it on a blocking thread.
pub fn get_ext4<R: Read + Seek + 'static>(
    r: R,
    start: u64,
    len: u64,
    path: &str,
    to: &Path,
    opts: GetOptions,
) -> Result<GetSummary, FilesError> {
    if path.len() > MAX_PATH || !path.starts_with('/') || path.contains('\0') {
        return Err(FilesError::InvalidPath(path.chars().take(200).collect()));
    }
    let shared = Rc::new(RefCell::new(r));
    let reader = PartReader::new(Shared(shared.clone()), start, len);
    let fs = Ext4::load(Box::new(reader)).map_err(|e| fs_err("/", e))?;
    let raw = RawExt::open(Shared(shared), start, len).ok();
    let meta = fs.symlink_metadata(path).map_err(|e| fs_err(path, e))?;
    std::fs::create_dir_all(to).map_err(|e| local_err(to, e))?;
    let mut c = Copier {
        fs,
        raw,
        opts,
        sum: GetSummary::default(),
        links: HashMap::new(),
        dirs_seen: HashSet::new(),
        entries: 0,
    };
    let ino = c.resolve_ino(path);
    let comps: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let dest = match comps.last() {
        None => to.to_path_buf(),
        Some(name) => to.join(
            safe_name(name.as_bytes())
                .ok_or_else(|| FilesError::InvalidPath(path.chars().take(200).collect()))?,
        ),
    };
    let src = ext4_view::PathBuf::try_from(path).map_err(|e| fs_err(path, e))?;
    // The root goes into `to` itself, which may exist: that is the point of `--to`.
    let merge_root = comps.is_empty();
    c.copy(&src, &dest, &meta, ino, merge_root)?;
    c.sum.to = dest.display().to_string();
    Ok(c.sum)
}

impl<R: Read + Seek> Copier<R> {
    /// The inode of `path` through the raw reader, when it can tell.
    fn resolve_ino(&mut self, path: &str) -> Option<u32> {
        let raw = self.raw.as_mut()?;
        let mut ino = 2; // the root directory
        for comp in path.split('/').filter(|s| !s.is_empty()) {
            let entries = raw.dir_entries(ino).ok()?;
            ino = entries
                .into_iter()
                .find(|(n, _)| n == comp.as_bytes())
                .map(|(_, i)| i)?;
        }
        Some(ino)
    }

    fn copy(
        &mut self,
        src: &ext4_view::PathBuf,
        dest: &Path,
        meta: &Metadata,
        ino: Option<u32>,
        merge: bool,
    ) -> Result<(), FilesError> {
        self.entries += 1;
        if self.entries > self.opts.max_entries {
            return Err(FilesError::TooManyEntries(self.opts.max_entries));
        }
        if dest.as_os_str().len() > MAX_PATH {
            self.skip(src, "path too long");
            return Ok(());
        }
        match kind(meta.file_type()) {
            EntryKind::Dir => self.copy_dir(src, dest, meta, ino, merge),
            EntryKind::Symlink => self.copy_symlink(src, dest),
            EntryKind::File => self.copy_file_or_link(src, dest, meta, ino),
            other => {
                self.skip(src, &format!("{other:?} not copied"));
                Ok(())
            }
        }
    }

    fn skip(&mut self, src: &ext4_view::PathBuf, why: &str) {
        self.sum.skipped.push(format!("{}: {why}", src.display()));
    }

    /// Makes room for a new entry at `dest`; true when a real directory is there to reuse.
    fn prepare(&self, dest: &Path, want_dir: bool, merge: bool) -> Result<bool, FilesError> {
        let m = match std::fs::symlink_metadata(dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(local_err(dest, e)),
            Ok(m) => m,
        };
        if want_dir && m.is_dir() && (merge || self.opts.overwrite) {
            return Ok(true);
        }
        if !self.opts.overwrite {
            return Err(FilesError::Exists(dest.display().to_string()));
        }
        if m.is_dir() {
            return Err(FilesError::Exists(format!(
                "{} (a directory; not replaced by a file)",
                dest.display()
            )));
        }
        // A file or a symlink: removed, never followed.
        std::fs::remove_file(dest).map_err(|e| local_err(dest, e))?;
        Ok(false)
    }

    fn copy_dir(
        &mut self,
        src: &ext4_view::PathBuf,
        dest: &Path,
        meta: &Metadata,
        ino: Option<u32>,
        merge: bool,
    ) -> Result<(), FilesError> {
        if let Some(i) = ino
            && !self.dirs_seen.insert(i)
        {
            self.skip(src, "directory loop");
            return Ok(());
        }
        if !self.prepare(dest, true, merge)? {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .map_err(|e| local_err(dest, e))?;
        }
        self.sum.dirs += 1;
        let inodes: HashMap<Vec<u8>, u32> = match (ino, self.raw.as_mut()) {
            (Some(i), Some(raw)) => raw.dir_entries(i).unwrap_or_default(),
            _ => Vec::new(),
        }
        .into_iter()
        .collect();
        let fs = self.fs.clone();
        let show = src.display().to_string();
        for e in fs.read_dir(src).map_err(|e| fs_err(&show, e))? {
            let e = e.map_err(|e| fs_err(&show, e))?;
            let name = e.file_name();
            let name = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            let child = e.path();
            let Some(local) = safe_name(name) else {
                self.skip(&child, "unsafe name");
                continue;
            };
            let m = e
                .metadata()
                .map_err(|err| fs_err(&child.display().to_string(), err))?;
            self.copy(
                &child,
                &dest.join(local),
                &m,
                inodes.get(name).copied(),
                false,
            )?;
        }
        // Mode and time last: writing the entries above changed the time, and a
        // read-only mode would have stopped them.
        let d = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dest)
            .map_err(|e| local_err(dest, e))?;
        set_meta(&d, dest, meta, 0o1777)
    }

    fn copy_symlink(&mut self, src: &ext4_view::PathBuf, dest: &Path) -> Result<(), FilesError> {
        let target = self
            .fs
            .read_link(src)
            .map_err(|e| fs_err(&src.display().to_string(), e))?;
        let t = target.as_ref();
        if t.is_empty() || t.contains(&0) {
            self.skip(src, "invalid symlink target");
            return Ok(());
        }
        self.prepare(dest, false, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(t), dest).map_err(|e| local_err(dest, e))?;
        self.sum.symlinks += 1;
        Ok(())
    }

    fn copy_file_or_link(
        &mut self,
        src: &ext4_view::PathBuf,
        dest: &Path,
        meta: &Metadata,
        ino: Option<u32>,
    ) -> Result<(), FilesError> {
        let linked = match (ino, self.raw.as_mut()) {
            (Some(i), Some(raw)) => raw.links(i).map(|n| n > 1).unwrap_or(false),
            _ => false,
        };
        if let Some(first) = ino.filter(|_| linked).and_then(|i| self.links.get(&i)) {
            let first = first.clone();
            self.prepare(dest, false, false)?;
            std::fs::hard_link(&first, dest).map_err(|e| local_err(dest, e))?;
            self.sum.hard_links += 1;
            return Ok(());
        }
        self.prepare(dest, false, false)?;
        self.write_file(src, dest, meta)?;
        if let Some(i) = ino.filter(|_| linked) {
            self.links.insert(i, dest.to_path_buf());
        }
        Ok(())
    }

    /// Writes the file's bytes, leaving aligned zero runs (holes included) unwritten.
    fn write_file(
        &mut self,
        src: &ext4_view::PathBuf,
        dest: &Path,
        meta: &Metadata,
    ) -> Result<(), FilesError> {
        let show = || src.display().to_string();
        let mut f = self.fs.open(src).map_err(|e| fs_err(&show(), e))?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| local_err(dest, e))?;
        let mut buf = vec![0u8; BUF];
        let mut pos = 0u64;
        loop {
            let mut n = 0;
            while n < BUF {
                let k = f
                    .read_bytes(&mut buf[n..])
                    .map_err(|e| fs_err(&show(), e))?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            for (i, block) in buf[..n].chunks(HOLE).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let at = pos + (i * HOLE) as u64;
                    out.write_all_at(block, at)
                        .map_err(|e| local_err(dest, e))?;
                }
            }
            pos += n as u64;
            if n < BUF {
                break;
            }
        }
        out.set_len(pos).map_err(|e| local_err(dest, e))?;
        self.sum.files += 1;
        self.sum.bytes += pos;
        set_meta(&out, dest, meta, 0o777)
    }
}

/// Sets the permission bits (`mode & keep`) and modification time of `f` (open at
/// `dest`) from `meta`.
fn set_meta(f: &std::fs::File, dest: &Path, meta: &Metadata, keep: u16) -> Result<(), FilesError> {
    let t = meta.modified();
    let secs = t.seconds();
    let mtime = if secs >= 0 {
        SystemTime::UNIX_EPOCH
            + Duration::new(secs.unsigned_abs(), t.nanoseconds().min(999_999_999))
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    f.set_modified(mtime).map_err(|e| local_err(dest, e))?;
    let perms = std::fs::Permissions::from_mode(u32::from(meta.mode() & keep));
    f.set_permissions(perms).map_err(|e| local_err(dest, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(safe_name(bad).is_none(), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b"\xff\xfe", "ünï cödé".as_bytes()] {
            assert!(safe_name(good).is_some(), "{good:?}");
        }
    }
}
