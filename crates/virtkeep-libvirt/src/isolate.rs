//! A domain XML made safe to boot beside its source, for boot verification and live
//! restore: after [`crate::rewrite_domain`] has given it a new name, UUID, MACs and
//! qcow2 overlays, [`isolate_for_boot`] puts the overlays over NBD exports, takes its
//! NICs off the network, logs its serial port to a file, makes any reset or crash end
//! it, and (for boot verification) takes away everything of the host the XML would
//! hand it ([`HOST_DEVICES`], host inputs and memory files, NIC backends, a random
//! source other than `/dev/urandom`, security labels, firmware files).
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
    /// File the first serial port is written to; with it the domain gets nothing of
    /// the host (see [`strip_host_access`]: every other chardev and every device in
    /// [`HOST_DEVICES`] goes, each NIC is rebuilt isolated). `None` keeps them all.
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
    /// libvirt); only with `serial_log`, which removes every channel of the source (a
    /// unix channel may name a socket path of the running source VM).
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
        strip_domain(&doc, &mut edits);
        for &block in &blocks {
            strip_host_access(&doc, &mut edits, block, iso.links_up);
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
        if !iso.links_up && iso.serial_log.is_none() {
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
            let verify = iso.serial_log.is_some();
            if let Some(b) = target.and_then(|t| iso.nbd_backing.get(t)) {
                nbd_base(&doc, &mut edits, disk, b)?;
                found += 1;
                if verify {
                    no_host_source_parts(&doc, &mut edits, disk);
                }
            } else if verify {
                // Not an overlay: a disk of the host (a CD-ROM's ISO, a device).
                edits.replace(doc.removal_span(disk), "");
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

/// Devices a verification domain loses: each hands the guest something of the host (a
/// directory, device, socket, file, port or display) or of the source VM (its
/// chardevs), and a boot needs none of them. Serial port 0 comes back logged to a file.
pub const HOST_DEVICES: &[&str] = &[
    "serial",
    "console",
    "parallel",
    "channel",
    "hostdev",
    "filesystem",
    "redirdev",
    "redirfilter",
    "smartcard",
    "tpm",
    "shmem",
    "sound",
    "audio",
    "graphics",
    "vsock",
    "lease",
    "pstore",
];

/// The devices of `block` lose what they would take from the host: [`HOST_DEVICES`]
/// go, and so do host inputs and memory devices backed by host files; an RNG reads
/// `/dev/urandom`; video loses 3D acceleration (a host render node); every NIC is
/// rebuilt isolated ([`isolated_nic`]).
fn strip_host_access(doc: &Doc<'_>, edits: &mut Edits, block: usize, links_up: bool) {
    for &c in &doc.elem(block).children {
        let e = doc.elem(c);
        let remove = match e.name.as_str() {
            n if HOST_DEVICES.contains(&n) => true,
            "input" => {
                matches!(e.attr("type"), Some("passthrough" | "evdev"))
                    || doc.child(c, "source").is_some()
            }
            "memory" => {
                !matches!(e.attr("model"), Some("dimm" | "virtio-mem"))
                    || doc
                        .child(c, "source")
                        .is_some_and(|s| doc.child(s, "path").is_some())
            }
            "rng" => {
                urandom_rng(doc, edits, c);
                false
            }
            "video" => {
                no_host_video(doc, edits, c);
                false
            }
            "interface" => {
                edits.replace(e.span(), isolated_nic(doc, c, links_up));
                false
            }
            _ => false,
        };
        if remove {
            edits.replace(doc.removal_span(c), "");
        }
    }
}

/// Every `<backend>` of the RNG `rng` other than QEMU's own source or `/dev/urandom`,
/// `/dev/random` (a host device, an EGD socket or file) reads `/dev/urandom` instead.
fn urandom_rng(doc: &Doc<'_>, edits: &mut Edits, rng: usize) {
    for b in doc.children_named(rng, "backend") {
        let e = doc.elem(b);
        let safe = match e.attr("model") {
            Some("builtin") => true,
            Some("random") => matches!(e.text.trim(), "" | "/dev/urandom" | "/dev/random"),
            _ => false,
        };
        if !safe {
            edits.replace(e.span(), "<backend model='random'>/dev/urandom</backend>");
        }
    }
}

/// The video device `video` loses 3D acceleration (it names a host render node and
/// needs a host display) and a vhost-user backend (a host process).
fn no_host_video(doc: &Doc<'_>, edits: &mut Edits, video: usize) {
    for m in doc.children_named(video, "model") {
        for a in doc.children_named(m, "acceleration") {
            edits.replace(doc.removal_span(a), "");
        }
    }
    for d in doc.children_named(video, "driver") {
        if doc.elem(d).attr("name") == Some("vhostuser") {
            edits.replace(doc.removal_span(d), "");
        }
    }
}

/// The NIC `nic` rebuilt from what the guest sees (MAC, model, PCI address, boot order,
/// MTU, ACPI index, a vhost/qemu driver) with its link down unless `links_up`. A
/// `network` or `bridge` NIC keeps its source (and VLAN and virtual port); any other
/// type (`direct` macvtap on a host device, `hostdev`, `vhostuser` and `vdpa` host
/// backends, `ethernet` with a host tap, script or addresses, `user` with host ports,
/// sockets) becomes `ethernet`: a tap libvirt makes, on no bridge. Everything else
/// (ROM file, backend device paths, scripts, host-side IPs and routes, port forwards,
/// filters, bandwidth) is left out.
fn isolated_nic(doc: &Doc<'_>, nic: usize, links_up: bool) -> String {
    let e = doc.elem(nic);
    let keep_source = matches!(e.attr("type"), Some("network" | "bridge"));
    let kind = match e.attr("type") {
        Some(k) if keep_source => k,
        _ => "ethernet",
    };
    let i = child_indent(doc, nic);
    let mut out = format!("<interface type='{kind}'>");
    for &c in &e.children {
        let ce = doc.elem(c);
        let keep = match ce.name.as_str() {
            "mac" | "model" | "address" | "boot" | "mtu" | "acpi" => true,
            "source" | "vlan" | "virtualport" => keep_source,
            "link" => links_up,
            "driver" => matches!(ce.attr("name"), None | Some("vhost" | "qemu")),
            _ => false,
        };
        if keep {
            out.push_str(&format!("\n{i}{}", &doc.src[ce.span()]));
        }
    }
    if !links_up {
        out.push_str(&format!("\n{i}<link state='down'/>"));
    }
    let close = doc.indent_of(nic).unwrap_or("");
    out.push_str(&format!("\n{close}</interface>"));
    out
}

/// Outside `<devices>`: security labels go (a static DAC label could run QEMU as root,
/// `type='none'` unconfined), so do `fw_cfg` entries (`<sysinfo type='fwcfg'>`: host
/// files handed to the guest) and the firmware `<loader>` (a host file; UEFI backups,
/// with an NVRAM store, are refused before this): the host's defaults apply.
fn strip_domain(doc: &Doc<'_>, edits: &mut Edits) {
    for &c in &doc.root().children {
        let e = doc.elem(c);
        let host = match e.name.as_str() {
            "seclabel" => true,
            "sysinfo" => e.attr("type") == Some("fwcfg"),
            "os" => {
                for l in doc.children_named(c, "loader") {
                    edits.replace(doc.removal_span(l), "");
                }
                false
            }
            _ => false,
        };
        if host {
            edits.replace(doc.removal_span(c), "");
        }
    }
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

/// The overlay `disk`'s `<source>` loses what the backup's XML said about the host
/// (`<seclabel>`: e.g. no relabelling; `<reservations>`: a host helper's socket).
fn no_host_source_parts(doc: &Doc<'_>, edits: &mut Edits, disk: usize) {
    for s in doc.children_named(disk, "source") {
        for &c in &doc.elem(s).children {
            if matches!(doc.elem(c).name.as_str(), "seclabel" | "reservations") {
                edits.replace(doc.removal_span(c), "");
            }
        }
    }
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
        // Without it no channel is left; live restore (no serial log) keeps the VM whole.
        let out = isolate_for_boot(&xml, &iso()).expect("isolate");
        assert!(!out.contains("<channel"), "{out}");
        let mut i = iso();
        i.serial_log = None;
        let out = isolate_for_boot(&xml, &i).expect("isolate");
        assert!(out.contains("web.agent"), "{out}");
    }

    /// Hostile devices, each naming something of the host under `/host/`: what a
    /// verification domain must not get. (element, what must be left instead).
    const HOSTILE: &[(&str, &str)] = &[
        (
            "<filesystem type='mount' accessmode='passthrough'><source dir='/host/share'/><target dir='share'/></filesystem>",
            "",
        ),
        (
            "<filesystem type='mount'><driver type='virtiofs'/><binary path='/host/virtiofsd'/><source socket='/host/vfs.sock'/><target dir='fs'/></filesystem>",
            "",
        ),
        (
            "<redirdev bus='usb' type='tcp'><source mode='connect' host='/host/redir' service='4000'/></redirdev>",
            "",
        ),
        (
            "<redirfilter><usbdev class='0x08' vendor='0x1234' product='0xbeef' version='2.0' allow='yes'/></redirfilter>",
            "",
        ),
        (
            "<smartcard mode='host-certificates'><certificate>/host/cert1</certificate><database>/host/db</database></smartcard>",
            "",
        ),
        (
            "<smartcard mode='passthrough' type='unix'><source mode='connect' path='/host/ccid.sock'/></smartcard>",
            "",
        ),
        (
            "<input type='evdev'><source dev='/host/input/event0' grab='all'/></input>",
            "",
        ),
        (
            "<input type='passthrough' bus='virtio'><source evdev='/host/input/event1'/></input>",
            "",
        ),
        (
            "<tpm model='tpm-tis'><backend type='passthrough'><device path='/host/tpm0'/></backend></tpm>",
            "",
        ),
        (
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='/host/swtpm'/></backend></tpm>",
            "",
        ),
        (
            "<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/host/swtpm.sock'/></backend></tpm>",
            "",
        ),
        (
            "<shmem name='/host/shm'><model type='ivshmem-doorbell'/><server path='/host/ivshmem.sock'/></shmem>",
            "",
        ),
        (
            "<rng model='virtio'><backend model='random'>/host/hwrng</backend></rng>",
            "<backend model='random'>/dev/urandom</backend>",
        ),
        (
            "<rng model='virtio'><backend model='egd' type='unix'><source mode='connect' path='/host/egd.sock'/></backend></rng>",
            "<backend model='random'>/dev/urandom</backend>",
        ),
        (
            "<sound model='ich9'><audio id='1'/></sound>\n    <audio id='1' type='file' path='/host/audio.wav'/>",
            "",
        ),
        (
            "<audio id='2' type='oss'><input dev='/host/dsp'/><output dev='/host/dsp'/></audio>",
            "",
        ),
        (
            "<parallel type='file'><source path='/host/parallel.log'/><target port='0'/></parallel>",
            "",
        ),
        (
            "<parallel type='dev'><source path='/host/parport0'/></parallel>",
            "",
        ),
        (
            "<graphics type='vnc' port='5900' listen='0.0.0.0' passwd='/host/pw'><listen type='address' address='0.0.0.0'/></graphics>",
            "",
        ),
        (
            "<graphics type='spice'><listen type='socket' socket='/host/spice.sock'/><gl enable='yes' rendernode='/host/dri/renderD128'/></graphics>",
            "",
        ),
        (
            "<graphics type='sdl' display=':0' xauth='/host/.Xauthority'/>",
            "",
        ),
        (
            "<video><model type='virtio' heads='1'><acceleration accel3d='yes' rendernode='/host/dri/renderD129'/></model></video>",
            "<model type='virtio' heads='1'></model>",
        ),
        (
            "<video><driver name='vhostuser'/><model type='virtio'/></video>",
            "<video><model type='virtio'/></video>",
        ),
        (
            "<channel type='unix'><source mode='bind' path='/host/chan.sock'/><target type='virtio' name='x'/></channel>",
            "",
        ),
        (
            "<vsock model='virtio'><cid auto='no' address='3'/><source path='/host/vsock'/></vsock>",
            "",
        ),
        (
            "<memory model='nvdimm'><source><path>/host/nvdimm</path></source><target><size unit='MiB'>512</size></target></memory>",
            "",
        ),
        (
            "<memory model='virtio-pmem'><source><path>/host/pmem</path></source><target><size unit='MiB'>512</size></target></memory>",
            "",
        ),
        (
            "<lease><lockspace>s</lockspace><key>k</key><target path='/host/lease'/></lease>",
            "",
        ),
        (
            "<pstore backend='acpi-erst'><path>/host/pstore</path><size unit='KiB'>8</size></pstore>",
            "",
        ),
        (
            "<interface type='direct'><mac address='52:54:00:00:00:02'/><source dev='/host/eth0' mode='bridge'/><model type='virtio'/></interface>",
            "<interface type='ethernet'>\n      <mac address='52:54:00:00:00:02'/>\n      <model type='virtio'/>\n      <link state='down'/>\n    </interface>",
        ),
        (
            "<interface type='hostdev' managed='yes'><driver name='vfio'/><source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source><mac address='52:54:00:00:00:03'/><rom file='/host/rom'/></interface>",
            "<interface type='ethernet'>\n      <mac address='52:54:00:00:00:03'/>\n      <link state='down'/>",
        ),
        (
            "<interface type='vhostuser'><mac address='52:54:00:00:00:04'/><source type='unix' path='/host/vhu.sock' mode='client'/><model type='virtio'/></interface>",
            "<interface type='ethernet'>",
        ),
        (
            "<interface type='vdpa'><source dev='/host/vhost-vdpa-0'/></interface>",
            "<interface type='ethernet'>",
        ),
        (
            "<interface type='ethernet'><target dev='/host/tap0' managed='no'/><script path='/host/ifup'/><downscript path='/host/ifdown'/><ip address='192.0.2.1' prefix='24'/><route family='ipv4' address='198.51.100.0' prefix='24' gateway='192.0.2.2'/><backend tap='/host/tun' vhost='/host/vhost-net'/></interface>",
            "<interface type='ethernet'>",
        ),
        (
            "<interface type='user'><backend type='passt' logFile='/host/passt.log'/><source dev='/host/eth1'/><portForward proto='tcp'><range start='2222' to='22'/></portForward></interface>",
            "<interface type='ethernet'>",
        ),
        (
            "<interface type='server'><source address='/host/listen' port='5558'/></interface>",
            "<interface type='ethernet'>",
        ),
        (
            "<interface type='bridge'><source bridge='br0'/><rom file='/host/pxe.rom'/><script path='/host/br-up'/><model type='e1000'/></interface>",
            "<interface type='bridge'>\n      <source bridge='br0'/>\n      <model type='e1000'/>\n      <link state='down'/>",
        ),
    ];

    /// Each hostile device goes or is neutralised: no host path is left, what the
    /// guest keeps is there, and the XML is still a domain; all of them at once too
    /// (and in a second `<devices>` block).
    #[test]
    fn a_verification_domain_gets_nothing_of_the_host() {
        let check = |xml: &str, keep: &str| {
            let out = isolate_for_boot(xml, &iso()).expect("isolate");
            assert!(!out.contains("/host/"), "a host path left in\n{out}");
            assert!(out.contains(keep), "{keep} missing in\n{out}");
            crate::parse_domain(&out).expect("still a domain");
            out
        };
        let mut all = String::new();
        for (dev, keep) in HOSTILE {
            check(&XML.replace("<!-- kept -->", dev), keep);
            all.push_str(dev);
            all.push_str("\n    ");
        }
        let out = check(&XML.replace("<!-- kept -->", &all), "");
        // Serial port 0 is the log; every NIC (1 of XML, 8 hostile) is down.
        assert_eq!(out.matches("<serial").count(), 1, "{out}");
        assert_eq!(out.matches("<link state='down'/>").count(), 9, "{out}");
        let second = XML.replace(
            "  </devices>\n</domain>",
            &format!("  </devices>\n  <devices>\n    {all}\n  </devices>\n</domain>"),
        );
        check(&second, "");
    }

    /// Only the overlays stay disks, without the labels or reservation helpers their
    /// sources named; live restore keeps every disk as it is.
    #[test]
    fn only_the_overlays_stay_disks() {
        let xml = XML.replace(
            "<source file='/run/virtkeep/jobs/j/vda.qcow2'/>",
            "<source file='/run/virtkeep/jobs/j/vda.qcow2'><seclabel model='dac' relabel='no'/><reservations managed='no'><source type='unix' path='/host/pr.sock' mode='client'/></reservations></source>",
        )
        .replace(
            "<!-- kept -->",
            "<disk type='file' device='cdrom'><source file='/host/evil.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>\n    <disk type='block'><source dev='/host/sdb'/><target dev='vdb'/></disk>",
        );
        let out = isolate_for_boot(&xml, &iso()).expect("isolate");
        assert!(
            !out.contains("/host/") && !out.contains("seclabel"),
            "{out}"
        );
        assert_eq!(out.matches("<disk").count(), 1, "{out}");
        assert!(out.contains("name='vda'"), "{out}");
        let mut live = iso();
        live.serial_log = None;
        let out = isolate_for_boot(&xml, &live).expect("isolate");
        assert_eq!(out.matches("<disk").count(), 3, "{out}");
    }

    /// Outside `<devices>`: security labels (a static DAC label would run QEMU as root),
    /// `fw_cfg` files and a firmware loader go; live restore keeps them.
    #[test]
    fn labels_firmware_and_fw_cfg_files_go() {
        let xml = XML.replace(
            "  <on_reboot>",
            "  <os><type>hvm</type><loader readonly='yes' type='rom'>/host/bios.bin</loader><boot dev='hd'/></os>\n  <sysinfo type='fwcfg'><entry name='opt/x' file='/host/secret'/></sysinfo>\n  <sysinfo type='smbios'><system><entry name='serial'>42</entry></system></sysinfo>\n  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n  <seclabel type='none' model='apparmor'/>\n  <on_reboot>",
        );
        let out = isolate_for_boot(&xml, &iso()).expect("isolate");
        assert!(
            !out.contains("/host/") && !out.contains("seclabel"),
            "{out}"
        );
        assert!(
            out.contains("<boot dev='hd'/>") && out.contains("smbios"),
            "{out}"
        );
        crate::parse_domain(&out).expect("still a domain");
        let mut live = iso();
        live.serial_log = None;
        let out = isolate_for_boot(&xml, &live).expect("isolate");
        assert!(
            out.contains("/host/secret") && out.contains("seclabel"),
            "{out}"
        );
    }
}
