//! `files find`: names matching a glob under a directory of a guest filesystem.

use std::io::{Read, Seek};

use serde::Serialize;

use crate::error::FilesError;
use crate::ext4::ExtFs;
use crate::fs::{EntryKind, GuestFs, MAX_DIR_ENTRIES, MAX_PATH, check_path, join, show};

/// Most entries one walk visits before it stops (and says so).
pub const MAX_FIND_VISITS: u64 = 1_000_000;
/// Most matches one walk returns.
pub const MAX_FIND_MATCHES: usize = 100_000;
/// Longest pattern accepted (the matcher is O(pattern × name)).
pub const MAX_PATTERN: usize = 1024;

/// One match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundEntry {
    /// Absolute path in the filesystem (invalid UTF-8 replaced).
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// What a walk found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FindResult {
    pub matches: Vec<FoundEntry>,
    /// True when the walk stopped at [`MAX_FIND_VISITS`] entries or [`MAX_FIND_MATCHES`].
    pub truncated: bool,
}

/// Whether `name` matches the shell glob `pat`: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`
/// (or `[^a]`), `\x` for a literal `x`. A `[` without its `]` is a literal.
pub fn glob_match(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it now covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match class(&p[pi..], n[ni]) {
                Some((true, len)) => Some(len),
                Some((false, _)) => None,
                None => (n[ni] == '[').then_some(1),
            },
            Some('\\') if pi + 1 < p.len() => (p[pi + 1] == n[ni]).then_some(2),
            Some(&c) => (c == n[ni]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A bracket class at the start of `p`: whether `c` is in it and the class's length;
/// `None` when `p` holds no closing `]`.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let a = *p.get(i)?;
        if a == ']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&b| b != ']') {
            hit |= (a..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= a == c;
            i += 1;
        }
    }
}

/// Entries under `root` of the ext2/3/4 filesystem at `start..start+len` of `r` whose
/// name matches `pattern` (synchronous: run it on a blocking thread).
pub fn find_ext4<R: Read + Seek + 'static>(
    r: R,
    start: u64,
    len: u64,
    root: &str,
    pattern: &str,
) -> Result<FindResult, FilesError> {
    check_path(root)?;
    let mut fs = ExtFs::open(r, start, len)?;
    find_fs(&mut fs, root, pattern)
}

/// Entries under `root` of `fs` whose name matches `pattern`, in depth-first name
/// order (synchronous: run it on a blocking thread). Bounded: [`MAX_FIND_VISITS`]
/// entries, paths of [`MAX_PATH`] bytes.
pub fn find_fs(fs: &mut dyn GuestFs, root: &str, pattern: &str) -> Result<FindResult, FilesError> {
    if pattern.len() > MAX_PATTERN {
        return Err(FilesError::InvalidPath(root.chars().take(200).collect()));
    }
    check_path(root)?;
    let mut out = FindResult {
        matches: Vec::new(),
        truncated: false,
    };
    let mut visits = 0u64;
    let mut stack = vec![root.as_bytes().to_vec()];
    while let Some(dir) = stack.pop() {
        let (entries, more) = fs.read_dir(&dir, MAX_DIR_ENTRIES)?;
        out.truncated |= more;
        let mut subdirs = Vec::new();
        let mut found = Vec::new();
        let mut stop = false;
        for e in entries {
            visits += 1;
            if visits > MAX_FIND_VISITS || out.matches.len() + found.len() >= MAX_FIND_MATCHES {
                stop = true;
                break;
            }
            let path = join(&dir, &e.name);
            if glob_match(pattern, &String::from_utf8_lossy(&e.name)) {
                found.push(FoundEntry {
                    path: show(&path),
                    kind: e.node.kind,
                    size: e.node.size,
                    mtime: e.node.mtime,
                });
            }
            // Path length bounds the depth, so a directory that loops ends too.
            if e.node.kind == EntryKind::Dir && path.len() < MAX_PATH {
                subdirs.push(path);
            }
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        out.matches.extend(found);
        if stop {
            out.truncated = true;
            break;
        }
        subdirs.sort_by(|a, b| b.cmp(a));
        stack.extend(subdirs);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("*", "anything", true),
            ("*.conf", "a.conf", true),
            ("*.conf", "a.conf.bak", false),
            ("host?ame", "hostname", true),
            ("h*n*e", "hostname", true),
            ("[hx]ost*", "host", true),
            ("[!h]ost", "host", false),
            ("[^h]ost", "cost", true),
            ("[a-c]at", "bat", true),
            ("[a-c]at", "dat", false),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("[", "[", true),
            ("[]]", "]", true),
            ("ünï*", "ünï cödé.txt", true),
            ("", "", true),
            ("", "a", false),
            ("a*", "", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p:?} {n:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(p in "[*?\\[\\]!^a-c\\\\-]{0,12}", n in "[a-c\\[\\]*-]{0,12}") {
            let _ = glob_match(&p, &n);
        }

        #[test]
        fn literal_names_match_themselves(n in "[a-z0-9._ ]{0,20}") {
            prop_assert!(glob_match(&n, &n));
            let star = format!("*{n}");
            prop_assert!(glob_match(&star, &n));
        }
    }
}
