//! The running-domain guard of a restore: a destination that any running domain of the
//! host uses (by its resolved path or RBD name, the bases of virtkeep overlays included)
//! is refused, with or without `--force`.

use virtkeep_libvirt::DiskSource;

use super::destination::Destination;
use super::guard::resolve_all;
use crate::error::{Error, Result};
use crate::host::Host;

/// What the running domains of a host use: canonical file and block paths, RBD names.
pub struct InUse {
    /// (resolved path or `pool/image`, domain name)
    used: Vec<(String, String)>,
}

impl InUse {
    /// Reads every active domain's live definition (one `virsh` per domain) and
    /// resolves its file and block sources (and the bases of virtkeep overlays).
    pub async fn load(host: &Host) -> Result<InUse> {
        let list = host.run_string(&host.virsh().list_active_uuids()).await?;
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
                        if let Some(base) = crate::backup::overlay::overlay_base(path) {
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
    pub async fn check(&self, host: &Host, target: &str, dest: &dyn Destination) -> Result<()> {
        let names = dest.in_use_names(host).await?;
        let hit = self.used.iter().find(|(u, _)| names.contains(u));
        match hit {
            None => Ok(()),
            Some((_, vm)) => Err(Error::conflict(format!(
                "disk {target} would be restored to {}, which running domain {vm:?} uses on host {}",
                dest.key(),
                host.name
            ))
            .hint("shut that domain down first, or restore elsewhere (--name NEW, --storage …); --force does not override this")),
        }
    }
}
