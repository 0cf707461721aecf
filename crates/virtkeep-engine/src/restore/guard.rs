//! Where a restore may write: the repository only suggests destinations (a manifest is
//! untrusted input), so every destination is checked here before anything is written:
//! canonical absolute paths with no symlink on the host, LVM and RBD names from a safe
//! character set, no two disks on one destination, nothing a running domain uses.

use std::collections::BTreeMap;

use virtkeep_libvirt::DiskSource;
use virtkeep_ssh::RemoteCommand;

use super::Dest;
use crate::error::{Error, ErrorKind, Result};
use crate::host::Host;

/// Longest destination path virtkeep writes to (Linux `PATH_MAX`).
const PATH_MAX: usize = 4096;
/// Longest path component (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest RBD pool or image name virtkeep creates.
const RBD_NAME_MAX: usize = 255;

fn refused(what: String) -> Error {
    Error::new(ErrorKind::Repository, what).hint(
        "the backup's stored location is not used as is; choose the destination with --storage file:DIR, lvm:VG or rbd:POOL, and --name NEW",
    )
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

/// The lexical checks of one destination (no host access).
pub fn check_names(dest: &Dest) -> Result<()> {
    match dest {
        Dest::File(path) => check_path(path),
        Dest::Rbd(pool, image) => {
            check_rbd_name("pool", pool)?;
            check_rbd_name("image", image)
        }
        Dest::Lv(lv) => {
            check_vg_name(&lv.vg)?;
            if crate::lvm::valid_new_lv_name(&lv.name) {
                Ok(())
            } else {
                Err(refused(format!("LV name {:?} is not allowed", lv.name)))
            }
        }
    }
}

/// A key naming the destination, equal for two disks that would share it.
pub fn key(dest: &Dest) -> String {
    match dest {
        Dest::File(p) => format!("file {p}"),
        Dest::Rbd(pool, image) => format!("rbd {pool}/{image}"),
        Dest::Lv(lv) => format!("lv {}/{}", lv.vg, lv.name),
    }
}

/// Two disks of one restore never share a destination.
pub fn check_distinct<'a>(dests: impl Iterator<Item = (&'a str, &'a Dest)>) -> Result<()> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (target, dest) in dests {
        if let Some(other) = seen.insert(key(dest), target) {
            return Err(Error::conflict(format!(
                "disks {other} and {target} would both be restored to {}",
                key(dest)
            ))
            .hint("restore under a new name (--name NEW): each disk then gets a name of its own (NEW-TARGET)"));
        }
    }
    Ok(())
}

/// What the host says about a file destination: whether it exists (as a regular file);
/// refuses a path whose parents or leaf are symlinks, or that is not a regular file.
pub async fn check_file_on_host(host: &Host, path: &str) -> Result<bool> {
    // `realpath -m` resolves every symlink along the path, existing or not: a canonical
    // path it changes goes through a symlink somewhere.
    const SCRIPT: &str = r#"r=$(realpath -m -- "$1") || exit 3
printf '%s\n' "$r"
if [ -L "$1" ]; then echo symlink; elif [ -f "$1" ]; then echo file; elif [ -e "$1" ]; then echo other; else echo missing; fi"#;
    let out = host
        .run_string(
            &RemoteCommand::new("sh")
                .arg("-c")
                .arg(SCRIPT)
                .arg("sh")
                .arg(path),
        )
        .await?;
    let mut lines = out.lines();
    let (resolved, kind) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    if resolved != path || kind == "symlink" {
        return Err(refused(format!(
            "destination {path} on host {} goes through a symlink (it resolves to {resolved})",
            host.name
        )));
    }
    match kind {
        "file" => Ok(true),
        "missing" => Ok(false),
        _ => Err(Error::conflict(format!(
            "destination {path} on host {} exists and is not a regular file",
            host.name
        ))),
    }
}

/// What the running domains of a host use: canonical file and block paths, RBD names.
pub struct InUse {
    /// (resolved path or `pool/image`, domain name)
    used: Vec<(String, String)>,
}

impl InUse {
    /// Reads every active domain's live definition (one `virsh` per domain) and
    /// resolves its file and block sources (and the bases of virtkeep overlays).
    pub async fn load(host: &Host) -> Result<InUse> {
        let list = host
            .run_string(&host.virsh().command("list").arg("--uuid"))
            .await?;
        let mut paths = Vec::new();
        let mut used = Vec::new();
        for uuid in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let vm = match crate::vm::Vm::load(host, uuid).await {
                Ok(vm) => vm,
                // Gone between the listing and now: it uses nothing.
                Err(_) if host.exec(&host.virsh().domuuid(uuid)).await?.status != 0 => continue,
                Err(e) => return Err(e),
            };
            for d in &vm.domain.disks {
                match &d.source {
                    DiskSource::File { path } => {
                        paths.push((path.clone(), vm.name.clone()));
                        if let Some(base) = crate::heal::overlay_base(path) {
                            paths.push((base.to_string(), vm.name.clone()));
                        }
                    }
                    DiskSource::Block { dev } => paths.push((dev.clone(), vm.name.clone())),
                    DiskSource::Network {
                        name: Some(name), ..
                    } => used.push((name.clone(), vm.name.clone())),
                    _ => {}
                }
            }
        }
        let resolved = resolve_all(host, paths.iter().map(|(p, _)| p.as_str())).await?;
        for ((raw, vm), res) in paths.into_iter().zip(resolved) {
            used.push((res, vm.clone()));
            used.push((raw, vm));
        }
        Ok(InUse { used })
    }

    /// Refuses a destination that a running domain uses.
    pub async fn check(&self, host: &Host, target: &str, dest: &Dest) -> Result<()> {
        let names = match dest {
            Dest::File(p) => vec![p.clone()],
            Dest::Rbd(pool, image) => vec![format!("{pool}/{image}")],
            Dest::Lv(lv) => {
                let path = crate::lvm::lv_path(&lv.vg, &lv.name);
                let mut v = resolve_all(host, std::iter::once(path.as_str())).await?;
                v.push(path);
                v
            }
        };
        let hit = self.used.iter().find(|(u, _)| names.contains(u));
        match hit {
            None => Ok(()),
            Some((_, vm)) => Err(Error::conflict(format!(
                "disk {target} would be restored to {}, which running domain {vm:?} uses on host {}",
                key(dest),
                host.name
            ))
            .hint("shut that domain down first, or restore elsewhere (--name NEW, --storage …); --force does not override this")),
        }
    }
}

/// `realpath -m` of each path, in order (one round trip).
async fn resolve_all<'a>(host: &Host, paths: impl Iterator<Item = &'a str>) -> Result<Vec<String>> {
    let paths: Vec<&str> = paths.collect();
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = RemoteCommand::new("realpath").arg("-m").arg("-z").arg("--");
    for p in &paths {
        cmd = cmd.arg(*p);
    }
    let out = host.run_string(&cmd).await?;
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
