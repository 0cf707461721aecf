//! `files get`: copy a file or a directory tree out of a guest filesystem of a backup
//! into a local directory.
//!
//! Names come from the guest and are untrusted: a component that is empty, `.`, `..`,
//! or holds `/` or NUL is skipped, so every path written is the destination joined with
//! checked components. Nothing is followed through a symlink this copy made: files are
//! created with `O_EXCL` (which does not follow a symlink at the path), an existing
//! entry is only reused as a directory when it is a real directory, and replaced only
//! with `--overwrite`. Set-user-ID and set-group-ID bits are dropped: the copy belongs to
//! whoever runs virtkeep (often root), not to the guest's owner.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::FilesError;
use crate::ext4::ExtFs;
use crate::fs::{EntryKind, FsNode, GuestFs, MAX_PATH, check_path, join, read_full, show};
use crate::walk::{DEFAULT_GET_TIMEOUT, TimedFs};

/// Most entries one `files get` copies unless told otherwise.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// A run of zeros this long, aligned, is left as a hole in the copy.
const HOLE: usize = 4096;
/// Bytes read per call and most written per `pwrite`: few, large writes (one per 4 KiB
/// block made `files get` slower than a whole-disk restore).
const BUF: usize = 4 << 20;
static ZEROS: [u8; HOLE] = [0; HOLE];

/// How `files get` copies.
#[derive(Debug, Clone, Copy)]
pub struct GetOptions {
    /// Replace existing files and symlinks, and write into existing directories.
    pub overwrite: bool,
    /// Fail after this many entries (files, directories, links).
    pub max_entries: u64,
    /// Fail with [`FilesError::TimedOut`] when the copy takes longer.
    pub timeout: Duration,
}

impl Default for GetOptions {
    fn default() -> Self {
        GetOptions {
            overwrite: false,
            max_entries: DEFAULT_MAX_ENTRIES,
            timeout: DEFAULT_GET_TIMEOUT,
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

struct Copier<'a> {
    fs: &'a mut dyn GuestFs,
    opts: GetOptions,
    sum: GetSummary,
    /// Inode → the first local path it was copied to (files with more than one link).
    links: HashMap<u64, PathBuf>,
    /// Directory inodes entered: a corrupt tree that loops is cut.
    dirs_seen: HashSet<u64>,
    /// Directories entered above the current one: the copy recurses, and a corrupt
    /// tree whose directories get new inode numbers at each level must not exhaust the
    /// stack (seen: a damaged FAT image overflowed it).
    depth: usize,
    entries: u64,
    buf: Vec<u8>,
}

/// Deepest directory level copied; deeper ones are skipped and reported.
pub const MAX_DEPTH: usize = 128;

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
    check_path(path)?;
    let mut fs = ExtFs::open(r, start, len)?;
    get_fs(&mut fs, path, to, opts)
}

/// Copy `path` of `fs` into directory `to` (created if missing) as `to/NAME`; `/`
/// copies the root's entries into `to`, within `opts.timeout`. Synchronous: run it on
/// a blocking thread.
pub fn get_fs(
    fs: &mut dyn GuestFs,
    path: &str,
    to: &Path,
    opts: GetOptions,
) -> Result<GetSummary, FilesError> {
    check_path(path)?;
    let mut timed = TimedFs::new(fs, opts.timeout, "files get");
    let fs: &mut dyn GuestFs = &mut timed;
    let node = fs.stat(path.as_bytes())?;
    std::fs::create_dir_all(to).map_err(|e| local_err(to, e))?;
    let comps: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let dest = match comps.last() {
        None => to.to_path_buf(),
        Some(name) => to.join(
            safe_name(name.as_bytes())
                .ok_or_else(|| FilesError::InvalidPath(path.chars().take(200).collect()))?,
        ),
    };
    let mut c = Copier {
        fs,
        opts,
        sum: GetSummary::default(),
        links: HashMap::new(),
        dirs_seen: HashSet::new(),
        depth: 0,
        entries: 0,
        buf: vec![0u8; BUF],
    };
    // The root goes into `to` itself, which may exist: that is the point of `--to`.
    let merge_root = comps.is_empty();
    c.copy(path.as_bytes(), &dest, &node, merge_root)?;
    c.sum.to = dest.display().to_string();
    Ok(c.sum)
}

impl Copier<'_> {
    fn copy(
        &mut self,
        src: &[u8],
        dest: &Path,
        node: &FsNode,
        merge: bool,
    ) -> Result<(), FilesError> {
        self.entries += 1;
        if self.entries > self.opts.max_entries {
            return Err(FilesError::TooManyEntries(self.opts.max_entries));
        }
        if dest.as_os_str().len() > MAX_PATH || src.len() > MAX_PATH {
            self.skip(src, "path too long");
            return Ok(());
        }
        match node.kind {
            EntryKind::Dir => self.copy_dir(src, dest, node, merge),
            EntryKind::Symlink => self.copy_symlink(src, dest),
            EntryKind::File => self.copy_file_or_link(src, dest, node),
            other => {
                self.skip(src, &format!("{other:?} not copied"));
                Ok(())
            }
        }
    }

    fn skip(&mut self, src: &[u8], why: &str) {
        self.sum.skipped.push(format!("{}: {why}", show(src)));
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
        src: &[u8],
        dest: &Path,
        node: &FsNode,
        merge: bool,
    ) -> Result<(), FilesError> {
        if node.ino != 0 && !self.dirs_seen.insert(node.ino) {
            self.skip(src, "directory loop");
            return Ok(());
        }
        if self.depth >= MAX_DEPTH {
            self.skip(src, "more than 128 directory levels deep");
            return Ok(());
        }
        if !self.prepare(dest, true, merge)? {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .map_err(|e| local_err(dest, e))?;
        }
        self.sum.dirs += 1;
        let left = self.opts.max_entries.saturating_sub(self.entries);
        let max = usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX);
        let (entries, _) = self.fs.read_dir(src, max)?;
        self.depth += 1;
        for e in entries {
            let child = join(src, &e.name);
            let Some(local) = safe_name(&e.name) else {
                self.skip(&child, "unsafe name");
                continue;
            };
            if let Some(why) = &e.error {
                self.skip(&child, &format!("unreadable: {why}"));
                continue;
            }
            self.copy(&child, &dest.join(local), &e.node, false)?;
        }
        self.depth -= 1;
        // Mode and time last: writing the entries above changed the time, and a
        // read-only mode would have stopped them.
        let d = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dest)
            .map_err(|e| local_err(dest, e))?;
        set_meta(&d, dest, node, 0o1777)
    }

    fn copy_symlink(&mut self, src: &[u8], dest: &Path) -> Result<(), FilesError> {
        let t = self.fs.read_link(src)?;
        if t.is_empty() || t.contains(&0) {
            self.skip(src, "invalid symlink target");
            return Ok(());
        }
        self.prepare(dest, false, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(&t), dest).map_err(|e| local_err(dest, e))?;
        self.sum.symlinks += 1;
        Ok(())
    }

    fn copy_file_or_link(
        &mut self,
        src: &[u8],
        dest: &Path,
        node: &FsNode,
    ) -> Result<(), FilesError> {
        let linked = node.ino != 0 && node.nlink > 1;
        if let Some(first) = self.links.get(&node.ino).filter(|_| linked) {
            let first = first.clone();
            self.prepare(dest, false, false)?;
            std::fs::hard_link(&first, dest).map_err(|e| local_err(dest, e))?;
            self.sum.hard_links += 1;
            return Ok(());
        }
        self.prepare(dest, false, false)?;
        self.write_file(src, dest, node)?;
        if linked {
            self.links.insert(node.ino, dest.to_path_buf());
        }
        Ok(())
    }

    /// Writes the file's bytes, leaving aligned zero runs (holes included) unwritten.
    fn write_file(&mut self, src: &[u8], dest: &Path, node: &FsNode) -> Result<(), FilesError> {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| local_err(dest, e))?;
        let mut pos = 0u64;
        loop {
            let n = read_full(self.fs, src, pos, &mut self.buf)?;
            write_data(&out, &self.buf[..n], pos).map_err(|e| local_err(dest, e))?;
            pos += n as u64;
            if n < BUF {
                break;
            }
        }
        out.set_len(pos).map_err(|e| local_err(dest, e))?;
        self.sum.files += 1;
        self.sum.bytes += pos;
        set_meta(&out, dest, node, 0o777)
    }
}

/// Writes the blocks of `data` (file offset `at`) that hold a non-zero byte, each run
/// of them with one `pwrite`; aligned all-zero blocks are skipped and stay holes.
fn write_data(out: &std::fs::File, data: &[u8], at: u64) -> std::io::Result<()> {
    let mut run: Option<usize> = None;
    for (i, block) in data.chunks(HOLE).enumerate() {
        let zero = block == &ZEROS[..block.len()];
        match (zero, run) {
            (false, None) => run = Some(i * HOLE),
            (true, Some(start)) => {
                out.write_all_at(&data[start..i * HOLE], at + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        out.write_all_at(&data[start..], at + start as u64)?;
    }
    Ok(())
}

/// Sets the permission bits (`mode & keep`) and modification time of `f` (open at
/// `dest`) from `node`.
fn set_meta(f: &std::fs::File, dest: &Path, node: &FsNode, keep: u16) -> Result<(), FilesError> {
    let secs = node.mtime;
    let mtime = if secs >= 0 {
        SystemTime::UNIX_EPOCH
            + Duration::new(secs.unsigned_abs(), node.mtime_nsec.min(999_999_999))
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    f.set_modified(mtime).map_err(|e| local_err(dest, e))?;
    let perms = std::fs::Permissions::from_mode(u32::from(node.mode & keep));
    f.set_permissions(perms).map_err(|e| local_err(dest, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_runs_and_leaves_zero_blocks_as_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = std::fs::File::create(&p).expect("create");
        // data, 64 zero blocks, data (odd length), written at a block offset.
        let mut data = vec![7u8; 3 * HOLE];
        data.extend(vec![0u8; 64 * HOLE]);
        data.extend(vec![9u8; HOLE + 5]);
        let at = 16 * HOLE as u64;
        write_data(&f, &data, at).expect("write");
        f.set_len(at + data.len() as u64).expect("set_len");
        let got = std::fs::read(&p).expect("read");
        assert_eq!(&got[at as usize..], &data[..]);
        assert!(got[..at as usize].iter().all(|&b| b == 0));
        // 4 + 2 data blocks at most, not the 84 the file spans (512-byte units).
        let blocks = std::fs::metadata(&p).expect("stat").blocks();
        assert!(blocks <= 6 * 8 + 8, "{blocks} blocks: holes were written");
    }

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
