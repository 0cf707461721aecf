//! Looking up a domain on a host and reading its definition and state.
//!
//! After the first lookup by name, a domain is always addressed by its UUID: names may
//! hold any character, UUIDs never surprise a command line or a log.

use virtkeep_libvirt::{Domain, parse_domain};

use crate::error::{Error, Result};
use crate::host::Host;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    Other,
}

impl DomainState {
    fn parse(s: &str) -> DomainState {
        match s.trim() {
            "running" | "in shutdown" | "blocked" => DomainState::Running,
            "paused" | "pmsuspended" => DomainState::Paused,
            "shut off" | "crashed" => DomainState::ShutOff,
            _ => DomainState::Other,
        }
    }

    /// Whether a QEMU process holds the disks (and so snapshots go through libvirt).
    pub fn is_active(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Paused)
    }
}

/// A domain as found on the host: its UUID, live and persistent XML, and state.
#[derive(Debug, Clone)]
pub struct Vm {
    pub uuid: String,
    pub name: String,
    pub state: DomainState,
    /// The live definition (equal to the persistent one while shut off).
    pub xml: String,
    pub domain: Domain,
    /// The persistent definition, what `virsh define` restores.
    pub inactive_xml: String,
}

impl Vm {
    pub async fn find(host: &Host, name: &str) -> Result<Vm> {
        let uuid = Self::find_uuid(host, name).await?;
        Self::load(host, &uuid).await
    }

    /// The UUID of the domain named `name` (or with that UUID).
    pub async fn find_uuid(host: &Host, name: &str) -> Result<String> {
        let out = host.exec(&host.virsh().domuuid(name)).await?;
        if out.status != 0 {
            return Err(
                Error::domain(format!("no domain named {name:?} on host {}", host.name)).hint(
                    format!(
                        "`virtkeep vm list {}` shows the domains on that host",
                        host.name
                    ),
                ),
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub async fn load(host: &Host, uuid: &str) -> Result<Vm> {
        // One round trip for the three answers, separated by NUL (which XML cannot hold).
        let nul = || virtkeep_ssh::RemoteCommand::new("printf").arg("\\0");
        let cmd = host
            .virsh()
            .dumpxml(uuid, false)
            .and_then(nul())
            .and_then(host.virsh().dumpxml(uuid, true))
            .and_then(nul())
            .and_then(host.virsh().domstate(uuid));
        let out = host.run_string(&cmd).await?;
        let mut parts = out.split('\0');
        let (Some(xml), Some(inactive_xml), Some(state), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(crate::Error::new(
                crate::ErrorKind::Remote,
                format!("unexpected output from virsh for domain {uuid}"),
            ));
        };
        let (xml, inactive_xml) = (xml.to_string(), inactive_xml.to_string());
        let state = DomainState::parse(state);
        let domain = parse_domain(&xml)?;
        Ok(Vm {
            uuid: uuid.to_string(),
            name: domain.name.clone(),
            state,
            xml,
            domain,
            inactive_xml,
        })
    }

    pub async fn reload(&mut self, host: &Host) -> Result<()> {
        *self = Self::load(host, &self.uuid).await?;
        Ok(())
    }
}
