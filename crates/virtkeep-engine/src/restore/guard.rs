//! The lexical rules of what a restore may write to: the repository only suggests
//! destinations (a manifest is untrusted input), so the names virtkeep makes from it are
//! kept to safe characters and checked here (canonical absolute paths, LVM and RBD names
//! from a safe character set) before anything is written. The checks that ask the host
//! are each destination's own (its `check`).
//!
//! This module imports nothing of the restore (every part of it uses this one).

use virtkeep_libvirt::coreutils;

use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;

/// Longest destination path virtkeep writes to (Linux `PATH_MAX`).
const PATH_MAX: usize = 4096;
/// Longest path component (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest RBD pool or image name virtkeep creates.
const RBD_NAME_MAX: usize = 255;

/// A destination refused because of what the backup suggested.
pub fn refused(what: String) -> Error {
    Error::new(ErrorKind::Repository, what).hint(
        "the backup's stored location is not used as is; choose the destination with --storage file:DIR, lvm:VG or rbd:POOL, and --name NEW",
    )
}

/// Keeps a file-name component to characters that need no care anywhere.
pub fn safe_component(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_start_matches('.').to_string()
}

/// A file destination must be absolute and canonical: no `.`/`..`, no empty component,
/// no control character, bounded lengths.
pub fn check_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(refused(format!("destination {path:?} {why}")));
    if !path.starts_with('/') || path == "/" {
        return bad("is not an absolute file path");
    }
    if path.len() > PATH_MAX {
        return bad("is too long");
    }
    if path.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    for c in path[1..].split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return bad("is not canonical (empty, `.` or `..` component)");
        }
        if c.len() > NAME_MAX {
            return bad("has a component longer than 255 bytes");
        }
    }
    Ok(())
}

/// An RBD pool or image name: `[A-Za-z0-9._-]`, not starting with `-` or `.`.
pub fn check_rbd_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= RBD_NAME_MAX
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(refused(format!("RBD {what} name {name:?} is not allowed")))
    }
}

/// A volume group name: LVM's character set, not `.`/`..`, no leading `-`.
pub fn check_vg_name(vg: &str) -> Result<()> {
    let ok = !vg.is_empty()
        && vg.len() <= crate::lvm::LVM_NAME_MAX
        && vg != "."
        && vg != ".."
        && !vg.starts_with('-')
        && vg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(refused(format!("volume group name {vg:?} is not allowed")))
    }
}

/// `realpath -m` of each path, in order (one round trip).
pub async fn resolve_all<'a>(
    host: &Host,
    paths: impl Iterator<Item = &'a str>,
) -> Result<Vec<String>> {
    let paths: Vec<&str> = paths.collect();
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let out = host
        .run_string(&coreutils::realpath_all(paths.iter().copied()))
        .await?;
    let res: Vec<String> = out
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if res.len() != paths.len() {
        return Err(Error::new(
            ErrorKind::Remote,
            format!("realpath answered {} paths for {}", res.len(), paths.len()),
        ));
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["/a", "/var/lib/libvirt/images/vm.qcow2", "/a b/ü.img"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/", "rel/a", "/a/../b", "/a/./b", "/a//b", "/a/", "/a/\nb", "/..",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(256))).is_err());
    }

    #[test]
    fn names() {
        assert!(check_rbd_name("image", "vm-1.disk_0").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", "a;b", &"a".repeat(256)] {
            assert!(check_rbd_name("image", bad).is_err(), "{bad:?}");
        }
        assert!(check_vg_name("vg0").is_ok());
        for bad in ["", "-vg", "..", "v/g", "v g"] {
            assert!(check_vg_name(bad).is_err(), "{bad:?}");
        }
    }
}
