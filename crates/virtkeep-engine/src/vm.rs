//! Looking up a domain on a host and reading its definition and state.
//!
//! After the first lookup by name, a domain is always addressed by its UUID: names may
//! hold any character, UUIDs never surprise a command line or a log.

use virtkeep_libvirt::{Domain, parse_domain, virsh};

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
    /// From `virsh domstate` output: what virtkeep does with the domain, by state.
    fn parse(s: &str) -> DomainState {
        use virtkeep_libvirt::virsh::DomainState as S;
        match virtkeep_libvirt::virsh::parse_domstate(s) {
            Ok(S::Running | S::InShutdown) => DomainState::Running,
            Ok(S::Other(o)) if o == "blocked" => DomainState::Running,
            Ok(S::Paused | S::PmSuspended) => DomainState::Paused,
            Ok(S::ShutOff | S::Crashed) => DomainState::ShutOff,
            _ => DomainState::Other,
        }
    }

    /// Whether a QEMU process holds the disks (and so snapshots go through libvirt).
    pub fn is_active(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Paused)
    }
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Whether `virsh` can only read `s` as a name. It tries an id first (an integer:
/// whitespace, a sign, digits), then a UUID (hex digits, `-` and spaces); a string with
/// any other character is neither, so its `domuuid` answer needs no check by name
/// (which saves a round trip on every backup).
fn only_a_name(s: &str) -> bool {
    s.chars()
        .any(|c| !(c.is_ascii_hexdigit() || c.is_ascii_whitespace() || c == '-' || c == '+'))
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
    /// The domain's checkpoints when it was loaded. Empty also when they could not be
    /// listed: whoever misses one here asks the host again (`cbt::checkpoints`).
    pub checkpoints: Vec<String>,
}

fn unexpected_describe(dom: &str) -> Error {
    Error::new(
        crate::ErrorKind::Remote,
        format!("unexpected output from virsh for domain {dom}"),
    )
}

impl Vm {
    pub async fn find(host: &Host, name: &str) -> Result<Vm> {
        let uuid = Self::find_uuid(host, name).await?;
        Self::load(host, &uuid).await
    }

    /// The UUID of the domain named `name`; a UUID is accepted when no domain has that
    /// name.
    ///
    /// `virsh domuuid X` reads X as an id first, then as a name: a domain *named* `14`
    /// would resolve to whatever runs with id 14. So the answer is
    /// checked by asking that UUID's name, and on a mismatch the domains are searched by
    /// name.
    pub async fn find_uuid(host: &Host, name: &str) -> Result<String> {
        let out = host.exec(&host.virsh().domuuid(name)).await?;
        if out.status == 0 {
            let uuid = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if only_a_name(name) && is_uuid(&uuid) {
                return Ok(uuid);
            }
            if Self::name_of(host, &uuid).await?.as_deref() == Some(name) {
                return Ok(uuid);
            }
            // An id matched: look for the domain that has this name.
            if let Some(found) = Self::search_by_name(host, name).await? {
                return Ok(found);
            }
        } else if is_uuid(name) && Self::name_of(host, name).await?.is_some() {
            // `virsh domuuid` takes no UUID; a UUID names the domain it belongs to.
            return Ok(name.to_ascii_lowercase());
        }
        Err(Self::not_found(host, name))
    }

    /// The UUID of the domain *named* `name` (never one whose id or UUID reads like it),
    /// or `None` when the host has no such domain.
    pub async fn uuid_by_name(host: &Host, name: &str) -> Result<Option<String>> {
        let out = host.exec(&host.virsh().domuuid(name)).await?;
        if out.status != 0 {
            return Ok(None);
        }
        let uuid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if Self::name_of(host, &uuid).await?.as_deref() == Some(name) {
            return Ok(Some(uuid));
        }
        Self::search_by_name(host, name).await
    }

    fn not_found(host: &Host, name: &str) -> Error {
        Error::domain(format!("no domain named {name:?} on host {}", host.name)).hint(format!(
            "`virtkeep vm list {}` shows the domains on that host",
            host.name
        ))
    }

    /// The name of the domain with this UUID, `None` when there is none (any more).
    async fn name_of(host: &Host, uuid: &str) -> Result<Option<String>> {
        let out = host.exec(&host.virsh().domname(uuid)).await?;
        if out.status != 0 {
            return Ok(None);
        }
        // virsh ends the name with a newline and an empty line.
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(Some(text.trim_end_matches('\n').to_string()))
    }

    /// The UUID of the domain whose name is exactly `name`, looked at one by one.
    async fn search_by_name(host: &Host, name: &str) -> Result<Option<String>> {
        let uuids = host.run_string(&host.virsh().list_all_uuids()).await?;
        for uuid in uuids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if Self::name_of(host, uuid).await?.as_deref() == Some(name) {
                return Ok(Some(uuid.to_string()));
            }
        }
        Ok(None)
    }

    pub async fn load(host: &Host, uuid: &str) -> Result<Vm> {
        let Some(canonical) = virsh::DomainUuid::parse(uuid) else {
            return Self::load_by_reference(host, uuid).await;
        };
        // One virsh process for the four answers (this runs before every backup).
        let mark = uuid::Uuid::new_v4().as_u128();
        let out = host
            .run_string(&host.virsh().describe_uuid(&canonical, mark))
            .await?;
        let d = virsh::parse_described(&out, mark).ok_or_else(|| unexpected_describe(uuid))?;
        Self::from_answers(uuid, d.xml, d.inactive_xml, d.state, d.checkpoints)
    }

    /// [`Vm::load`] of what is not a canonical UUID (libvirt always prints one; this
    /// keeps any other answer away from a virsh script): three virsh processes.
    async fn load_by_reference(host: &Host, dom: &str) -> Result<Vm> {
        let out = host.run_string(&host.virsh().describe(dom)).await?;
        let (xml, inactive_xml, state) =
            virsh::parse_describe(&out).ok_or_else(|| unexpected_describe(dom))?;
        Self::from_answers(dom, xml, inactive_xml, state, Vec::new())
    }

    fn from_answers(
        uuid: &str,
        xml: &str,
        inactive_xml: &str,
        state: &str,
        checkpoints: Vec<String>,
    ) -> Result<Vm> {
        let domain = parse_domain(xml)?;
        Ok(Vm {
            uuid: uuid.to_string(),
            name: domain.name.clone(),
            state: DomainState::parse(state),
            xml: xml.to_string(),
            domain,
            inactive_xml: inactive_xml.to_string(),
            checkpoints,
        })
    }

    pub async fn reload(&mut self, host: &Host) -> Result<()> {
        *self = Self::load(host, &self.uuid).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_skip_the_check_by_name() {
        for name in ["vm1", "web-01", "vkt-bench-1", "a.b", "x"] {
            assert!(only_a_name(name), "{name}");
        }
        // What virsh may read as an id or a UUID keeps the check.
        for name in [
            "14",
            "+14",
            " 14",
            "cafe",
            "deadbeef-0000",
            "5e3a1c4e-8a47-4b1e-9a3e-0123456789ab",
            "5e3a1c4e8a474b1e9a3e0123456789ab",
            "",
        ] {
            assert!(!only_a_name(name), "{name}");
        }
    }

    #[test]
    fn states_from_domstate() {
        for (out, want) in [
            ("running\n\n", DomainState::Running),
            ("in shutdown\n", DomainState::Running),
            ("blocked\n", DomainState::Running),
            ("paused\n", DomainState::Paused),
            ("pmsuspended\n", DomainState::Paused),
            ("shut off\n\n", DomainState::ShutOff),
            ("crashed\n", DomainState::ShutOff),
            ("idle\n", DomainState::Other),
            ("", DomainState::Other),
        ] {
            assert_eq!(DomainState::parse(out), want, "{out:?}");
        }
    }
}
