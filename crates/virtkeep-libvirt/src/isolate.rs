//! A domain XML made safe to boot beside its source, for boot verification and live
//! restore: after [`crate::rewrite_domain`] has given it a new name, UUID, MACs and
//! qcow2 overlays, [`isolate_for_boot`] puts the overlays over NBD exports, takes its
//! NICs off the network, logs its serial port to a file, makes any reset or crash end
//! it, and removes devices it would take from the host (PCI/USB passthrough).
//!
//! Like the rewrite, the edits are splices on the original text: nothing else changes.

use std::collections::BTreeMap;

use crate::error::XmlError;
use crate::rewrite::{Edits, child_indent, set_text};
use crate::xml::{Doc, escape_attr};

/// An NBD export on a unix socket of the host, the read-only base of a disk's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdBacking {
    /// The unix socket QEMU connects to.
    pub socket: String,
    /// The export name.
    pub export: String,
}

/// What [`isolate_for_boot`] does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// File the first serial port is written to (every other serial port and console
    /// is removed, and so are host devices: PCI/USB passthrough); `None` keeps them.
    pub serial_log: Option<String>,
    /// The NBD base of each overlay disk, by target dev. Reads or writes that fail on
    /// these disks pause the guest (`error_policy`/`rerror_policy = stop`).
    pub nbd_backing: BTreeMap<String, NbdBacking>,
    /// Keep the NICs' links up (live restore); down otherwise.
    pub links_up: bool,
    /// `on_reboot`/`on_crash`/`on_poweroff` all `destroy`: a guest that resets or
    /// crashes stops, which boot verification sees.
    pub stop_on_reset: bool,
    /// Add a guest-agent channel (`org.qemu.guest_agent.0`, its socket chosen by
    /// libvirt) after removing every channel of the source (with `serial_log`: a unix
    /// channel may name a socket path of the running source VM).
    pub agent_channel: bool,
}

/// The guest agent's channel: libvirt picks the socket path (per domain), so it never
/// meets the source VM's.
const AGENT_CHANNEL: &str = "<channel type='unix'>\n{i}  <target type='virtio' name='org.qemu.guest_agent.0'/>\n{i}</channel>";

/// Apply `iso` to `xml` (see the module documentation).
pub fn isolate_for_boot(xml: &str, iso: &Isolation) -> Result<String, XmlError> {
    let doc = Doc::parse(xml)?;
    if doc.root().name != "domain" {
        return Err(XmlError::NotADomain {
            found: doc.root().name.clone(),
        });
    }
    let mut edits = Edits::default();
    if iso.stop_on_reset {
        lifecycle_destroy(&doc, &mut edits)?;
    }
    // libvirt reads the devices of every <devices> element: a passthrough device or
    // a NIC in a second one must be handled like those of the first.
    let blocks: Vec<usize> = doc.children_named(0, "devices").collect();
    let devices = *blocks
        .first()
        .ok_or(XmlError::Missing { what: "<devices>" })?;
    if let Some(log) = &iso.serial_log {
        let mut removed = vec!["serial", "console", "hostdev"];
        if iso.agent_channel {
            removed.push("channel");
        }
        for &block in &blocks {
            for name in &removed {
                for id in doc.children_named(block, name) {
                    edits.replace(doc.removal_span(id), "");
                }
            }
        }
        let indent = child_indent(&doc, devices);
        let mut added = format!(
            "\n{indent}<serial type='file'>\n{indent}  <source path='{}'/>\n{indent}  <target port='0'/>\n{indent}</serial>",
            escape_attr(log)?
        );
        if iso.agent_channel {
            added.push_str(&format!("\n{indent}"));
            added.push_str(&AGENT_CHANNEL.replace("{i}", &indent));
        }
        append_child(&doc, &mut edits, devices, &added);
    }
    let mut found = 0;
    for &block in &blocks {
        if !iso.links_up {
            for nic in doc.children_named(block, "interface") {
                for l in doc.children_named(nic, "link") {
                    edits.replace(doc.removal_span(l), "");
                }
                let i = child_indent(&doc, nic);
                append_child(&doc, &mut edits, nic, &format!("\n{i}<link state='down'/>"));
            }
        }
        for disk in doc.children_named(block, "disk") {
            let target = doc
                .child(disk, "target")
                .and_then(|t| doc.elem(t).attr("dev"));
            if let Some(b) = target.and_then(|t| iso.nbd_backing.get(t)) {
                nbd_base(&doc, &mut edits, disk, b)?;
                found += 1;
            }
        }
    }
    if found != iso.nbd_backing.len() {
        return Err(XmlError::Rewrite(
            "a disk to put over NBD is not in the domain".into(),
        ));
    }
    edits.apply(xml)
}

/// `on_poweroff`, `on_reboot`, `on_crash` = `destroy` (set, or added after `<name>`).
fn lifecycle_destroy(doc: &Doc<'_>, edits: &mut Edits) -> Result<(), XmlError> {
    let name = doc
        .child(0, "name")
        .ok_or(XmlError::Missing { what: "<name>" })?;
    let indent = doc.indent_of(name).unwrap_or("");
    for what in ["on_poweroff", "on_reboot", "on_crash"] {
        match doc.child(0, what) {
            Some(id) => set_text(doc, edits, id, "destroy")?,
            None => edits.insert(
                doc.elem(name).span().end,
                format!("\n{indent}<{what}>destroy</{what}>"),
            ),
        }
    }
    Ok(())
}

/// The overlay disk `disk` gets `b` as its backing store, and stops the guest on I/O
/// errors instead of passing them on.
fn nbd_base(doc: &Doc<'_>, edits: &mut Edits, disk: usize, b: &NbdBacking) -> Result<(), XmlError> {
    for old in doc.children_named(disk, "backingStore") {
        edits.replace(doc.removal_span(old), "");
    }
    let driver = doc
        .child(disk, "driver")
        .ok_or(XmlError::Missing { what: "<driver>" })?;
    let d = doc.elem(driver);
    edits.set_attr(doc.src, d, "error_policy", "stop")?;
    edits.set_attr(doc.src, d, "rerror_policy", "stop")?;
    // The overlay may sit on a filesystem without O_DIRECT (the job directory is on a
    // tmpfs under /run): QEMU refuses to open it with cache=none/directsync, and
    // io=native needs those. An LV disk is usually backed up with both.
    if matches!(d.attr("cache"), Some("none" | "directsync")) {
        edits.set_attr(doc.src, d, "cache", "writeback")?;
    }
    if d.attr("io") == Some("native") {
        edits.set_attr(doc.src, d, "io", "threads")?;
    }
    let i = child_indent(doc, disk);
    let text = format!(
        "\n{i}<backingStore type='network'>\n{i}  <format type='raw'/>\n{i}  <source protocol='nbd' name='{}'>\n{i}    <host transport='unix' socket='{}'/>\n{i}  </source>\n{i}  <backingStore/>\n{i}</backingStore>",
        escape_attr(&b.export)?,
        escape_attr(&b.socket)?
    );
    append_child(doc, edits, disk, &text);
    Ok(())
}

/// Insert `text` (starting with a newline and indentation) as the last child of `id`,
/// expanding an empty-element tag if needed.
fn append_child(doc: &Doc<'_>, edits: &mut Edits, id: usize, text: &str) {
    let e = doc.elem(id);
    match &e.end_tag {
        Some(end) => {
            let before = &doc.src[..end.start];
            let at = before
                .trim_end_matches([' ', '\t', '\n', '\r'])
                .len()
                .max(e.start_tag.end);
            edits.insert(at, text.to_owned());
        }
        None => {
            let tag = &doc.src[e.start_tag.clone()];
            let open = tag.trim_end_matches('>').trim_end_matches('/').trim_end();
            let close_indent = doc.indent_of(id).unwrap_or("");
            edits.replace(
                e.start_tag.clone(),
                format!("{open}>{text}\n{close_indent}</{}>", e.name),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>
  <name>web</name>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/run/virtkeep/jobs/j/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:00:00:01'/>
      <source network='default'/>
      <link state='up'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'/>
    <hostdev mode='subsystem' type='pci'/>
    <!-- kept -->
  </devices>
</domain>
";

    fn iso() -> Isolation {
        Isolation {
            serial_log: Some("/run/virtkeep/jobs/j/serial.log".into()),
            nbd_backing: [(
                "vda".to_string(),
                NbdBacking {
                    socket: "/run/virtkeep/jobs/j/nbd.sock".into(),
                    export: "vda".into(),
                },
            )]
            .into(),
            links_up: false,
            stop_on_reset: true,
            agent_channel: false,
        }
    }

    #[test]
    fn isolates_every_part() {
        let out = isolate_for_boot(XML, &iso()).expect("isolate");
        let d = crate::parse_domain(&out).expect("still a domain");
        assert_eq!(d.name, "web");
        for want in [
            "<on_reboot>destroy</on_reboot>",
            "<on_crash>destroy</on_crash>",
            "<on_poweroff>destroy</on_poweroff>",
            "error_policy='stop' rerror_policy='stop'",
            "<source protocol='nbd' name='vda'>",
            "<host transport='unix' socket='/run/virtkeep/jobs/j/nbd.sock'/>",
            "<link state='down'/>",
            "<source path='/run/virtkeep/jobs/j/serial.log'/>",
            "<!-- kept -->",
        ] {
            assert!(out.contains(want), "{want} missing in\n{out}");
        }
        for gone in ["state='up'", "type='pty'", "<hostdev", "restart"] {
            assert!(!out.contains(gone), "{gone} left in\n{out}");
        }
        assert_eq!(out.matches("<serial").count(), 1, "{out}");
    }

    #[test]
    fn an_overlay_is_not_opened_with_o_direct() {
        let xml = XML.replace(
            "<driver name='qemu' type='qcow2'/>",
            "<driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>",
        );
        let iso = Isolation {
            serial_log: None,
            nbd_backing: BTreeMap::from([(
                "vda".to_string(),
                NbdBacking {
                    socket: "/run/virtkeep/jobs/j/nbd.sock".into(),
                    export: "vda".into(),
                },
            )]),
            links_up: true,
            stop_on_reset: false,
            agent_channel: false,
        };
        let out = isolate_for_boot(&xml, &iso).expect("isolate");
        assert!(
            out.contains("cache='writeback'") && out.contains("io='threads'"),
            "{out}"
        );
        assert!(
            !out.contains("'none'") && !out.contains("'native'"),
            "{out}"
        );
        assert!(out.contains("discard='unmap'"), "{out}");
    }

    #[test]
    fn refuses_a_missing_disk_and_escapes_values() {
        let mut i = iso();
        i.nbd_backing.insert(
            "vdz".into(),
            NbdBacking {
                socket: "/s".into(),
                export: "vdz".into(),
            },
        );
        assert!(isolate_for_boot(XML, &i).is_err());
        let mut i = iso();
        i.serial_log = Some("/tmp/a'b".into());
        let out = isolate_for_boot(XML, &i).expect("isolate");
        assert!(out.contains("/tmp/a&apos;b"), "{out}");
        let mut i = iso();
        i.links_up = true;
        i.stop_on_reset = false;
        let out = isolate_for_boot(XML, &i).expect("isolate");
        assert!(
            out.contains("state='up'") && out.contains("restart"),
            "{out}"
        );
    }

    /// libvirt takes the devices of every <devices> block: a NIC, a passthrough
    /// device or a disk in a second block is isolated too.
    #[test]
    fn every_devices_block_is_isolated() {
        let xml = XML.replace(
            "  </devices>\n</domain>",
            "  </devices>\n  <devices>\n    <hostdev mode='subsystem' type='usb'/>\n    <interface type='bridge'><source bridge='br0'/></interface>\n    <serial type='tcp'/>\n  </devices>\n</domain>",
        );
        let out = isolate_for_boot(&xml, &iso()).expect("isolate");
        assert!(!out.contains("<hostdev"), "{out}");
        assert!(!out.contains("type='tcp'"), "{out}");
        assert_eq!(out.matches("<link state='down'/>").count(), 2, "{out}");
        assert_eq!(out.matches("<serial").count(), 1, "{out}");
    }

    #[test]
    fn the_agent_channel_replaces_the_sources_channels() {
        let xml = XML.replace(
            "<console type='pty'/>",
            "<console type='pty'/>\n    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.agent'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        );
        let mut i = iso();
        i.agent_channel = true;
        let out = isolate_for_boot(&xml, &i).expect("isolate");
        assert!(!out.contains("web.agent"), "{out}");
        assert_eq!(out.matches("<channel type='unix'>").count(), 1, "{out}");
        assert!(out.contains("name='org.qemu.guest_agent.0'"), "{out}");
        crate::parse_domain(&out).expect("still a domain");
        // Without it the source's channels stay (live restore keeps the VM whole).
        let out = isolate_for_boot(&xml, &iso()).expect("isolate");
        assert!(out.contains("web.agent"), "{out}");
    }
}
