//! The read side: a minimal model of a libvirt domain, covering what backup and
//! restore need. Everything else in the XML is ignored here (and kept verbatim by the
//! rewriter).

use std::fmt;

use crate::error::{XmlError, invalid};
use crate::xml::Doc;

/// A libvirt domain, as far as backup and restore are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`, exactly as written (unescaped).
    pub name: String,
    /// `<uuid>`, trimmed.
    pub uuid: Option<String>,
    /// The `type` attribute of `<domain>`: `qemu`, `kvm`, `xen`, …
    pub kind: String,
    /// The `id` attribute: present only in the XML of a running domain.
    pub id: Option<i64>,
    /// `<os><type>`: `hvm`, `xen` (Xen PV), `linux` (old Xen PV), `exe`, …
    pub os_type: Option<String>,
    /// `<os><nvram>` path, when the domain has UEFI variables in a file.
    pub nvram: Option<String>,
    /// The `<os>` elements that name a file of the host QEMU loads into the guest's
    /// memory (direct kernel boot and tables), in document order: `kernel`, `initrd`,
    /// `dtb`, `acpi/table` (only the element names: their paths are the XML's).
    pub host_boot_files: Vec<&'static str>,
    /// Every `<disk>` under `<devices>`, in document order.
    pub disks: Vec<Disk>,
    /// Every `<interface>` under `<devices>`, in document order.
    pub interfaces: Vec<Interface>,
    /// A `<channel>` whose target is `org.qemu.guest_agent.0` is present.
    pub has_guest_agent_channel: bool,
}

impl Domain {
    /// The domain is a Xen guest (`<domain type='xen'>`).
    pub fn is_xen(&self) -> bool {
        self.kind == "xen"
    }

    /// The disk with this target (`vda`, `xvda`, …).
    pub fn disk(&self, target: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.target == target)
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `<mac address=…>`.
    pub mac: Option<String>,
    /// The `type` attribute: `network`, `bridge`, `direct`, `user`, …
    pub kind: String,
}

/// `device=` of a `<disk>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskDevice {
    /// `disk` (the default).
    Disk,
    /// `cdrom`.
    Cdrom,
    /// `floppy`.
    Floppy,
    /// `lun` (SCSI pass-through).
    Lun,
}

impl DiskDevice {
    /// The libvirt spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
            DiskDevice::Floppy => "floppy",
            DiskDevice::Lun => "lun",
        }
    }
}

impl fmt::Display for DiskDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// What the guest sees.
    pub device: DiskDevice,
    /// `<target dev=…>`: `vda`, `sda`, `hdc`, `xvda`, …
    pub target: String,
    /// `<target bus=…>`: `virtio`, `scsi`, `sata`, `ide`, `xen`, …
    pub bus: Option<String>,
    /// `<driver name=…>`: `qemu` (KVM), `phy`, `file`, `tap`, `tap2`, `qdisk` (Xen).
    pub driver_name: Option<String>,
    /// `<driver type=…>`: `qcow2`, `raw`, … (`aio` for Xen tap means raw).
    pub format: Option<String>,
    /// Where the data lives.
    pub source: DiskSource,
    /// `<readonly/>` present.
    pub readonly: bool,
    /// `<shareable/>` present.
    pub shareable: bool,
    /// Paths (file, device or network name) of the `<backingStore>` chain, top first.
    pub backing_chain: Vec<String>,
    /// `<alias name=…>` (live XML only).
    pub alias: Option<String>,
}

/// Where a disk's data lives (`<disk type=…>` plus `<source>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `type='file'`.
    File {
        /// `<source file=…>`.
        path: String,
    },
    /// `type='block'`.
    Block {
        /// `<source dev=…>`.
        dev: String,
    },
    /// `type='network'`.
    Network {
        /// `rbd`, `nbd`, `iscsi`, `gluster`, …
        protocol: String,
        /// `name=`: for RBD `pool/image` (or `pool/namespace/image`).
        name: Option<String>,
        /// `<host>` elements.
        hosts: Vec<NetHost>,
        /// `<auth>` inside `<source>` or (older placement) in `<disk>`.
        auth: Option<DiskAuth>,
    },
    /// `type='volume'`: a volume of a libvirt storage pool.
    Volume {
        /// `pool=`.
        pool: String,
        /// `volume=`.
        volume: String,
    },
    /// No source: an empty CD-ROM or floppy drive.
    Empty,
    /// Any other disk type (`dir`, `nvme`, `vhostuser`, `vhostvdpa`): kept, not handled.
    Other {
        /// The `type` attribute.
        kind: String,
    },
}

/// A `<host>` of a network disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHost {
    /// `name=` (address or host name); `None` for e.g. a unix-socket transport.
    pub name: Option<String>,
    /// `port=`, kept as text.
    pub port: Option<String>,
}

/// `<auth>` of a network disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskAuth {
    /// `username=` (for Ceph without the `client.` prefix).
    pub username: String,
    /// `<secret type=…>`: `ceph`, `iscsi`.
    pub secret_type: Option<String>,
    /// `<secret uuid=…>`.
    pub secret_uuid: Option<String>,
    /// `<secret usage=…>`.
    pub secret_usage: Option<String>,
}

/// The storage backend of a disk, which decides the snapshot/export method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A qcow2 file.
    QcowFile,
    /// A raw file (no driver type, `raw`, or Xen's `aio`).
    RawFile,
    /// A block device that does not look like an LVM LV.
    Block,
    /// An LVM logical volume, by its path (`/dev/VG/LV` or `/dev/mapper/VG-LV`).
    /// This is a guess from the path: confirm it against `lvs` before relying on it.
    Lvm {
        /// Volume group.
        vg: String,
        /// Logical volume.
        lv: String,
    },
    /// A Ceph RBD image.
    Rbd {
        /// Pool.
        pool: String,
        /// Image (with a namespace prefix `ns/` when the name had one).
        image: String,
    },
    /// Anything else (other file formats, other network protocols, pool volumes, …).
    Other,
}

/// Why a disk is not backed up by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A CD-ROM drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
    /// Marked `<readonly/>`.
    Readonly,
    /// Marked `<shareable/>`: other domains may write it, no consistent snapshot.
    Shareable,
    /// No source (empty drive).
    Empty,
    /// A disk type this crate does not handle (`dir`, `nvme`, `vhostuser`, …).
    UnsupportedSource(String),
}

impl SkipReason {
    /// Human-readable reason, e.g. for `vm list` and backup logs.
    pub fn text(&self) -> String {
        match self {
            SkipReason::Cdrom => "CD-ROM drive (skipped by default)".to_owned(),
            SkipReason::Floppy => "floppy drive (skipped by default)".to_owned(),
            SkipReason::Readonly => "read-only disk (skipped by default)".to_owned(),
            SkipReason::Shareable => {
                "shareable disk: other domains may write it, so no consistent snapshot (skipped by default)"
                    .to_owned()
            }
            SkipReason::Empty => "no medium / no source (nothing to back up)".to_owned(),
            SkipReason::UnsupportedSource(t) => format!("disk type '{t}' is not supported"),
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl Disk {
    /// Classify the storage backend.
    pub fn backend(&self) -> Backend {
        match &self.source {
            DiskSource::File { .. } => match self.format.as_deref() {
                Some("qcow2") => Backend::QcowFile,
                None | Some("raw") | Some("aio") => Backend::RawFile,
                Some(_) => Backend::Other,
            },
            DiskSource::Block { dev } => match lvm_from_path(dev) {
                Some((vg, lv)) => Backend::Lvm { vg, lv },
                None => Backend::Block,
            },
            DiskSource::Network {
                protocol,
                name: Some(name),
                ..
            } if protocol == "rbd" => match split_rbd_name(name) {
                Some((pool, image)) if check_rbd_image(&pool, &image).is_ok() => {
                    Backend::Rbd { pool, image }
                }
                // Unusable names: see `rbd_name_problem`.
                _ => Backend::Other,
            },
            _ => Backend::Other,
        }
    }

    /// For an RBD disk whose `name=` virtkeep refuses to pass to `rbd` (see
    /// [`check_rbd_image`]): why. Such a disk is [`Backend::Other`].
    pub fn rbd_name_problem(&self) -> Option<String> {
        let DiskSource::Network { protocol, name, .. } = &self.source else {
            return None;
        };
        if protocol != "rbd" {
            return None;
        }
        let name = name.as_deref().unwrap_or("");
        match split_rbd_name(name) {
            Some((pool, image)) => check_rbd_image(&pool, &image).err(),
            None => Some(format!("RBD name {name:?} is not POOL/IMAGE")),
        }
    }

    /// Whether the disk is backed up by default; the reason when it is not.
    pub fn is_backup_candidate(&self) -> Result<(), SkipReason> {
        match self.device {
            DiskDevice::Cdrom => return Err(SkipReason::Cdrom),
            DiskDevice::Floppy => return Err(SkipReason::Floppy),
            DiskDevice::Disk | DiskDevice::Lun => {}
        }
        if matches!(self.source, DiskSource::Empty) {
            return Err(SkipReason::Empty);
        }
        if let DiskSource::Other { kind } = &self.source {
            return Err(SkipReason::UnsupportedSource(kind.clone()));
        }
        if self.readonly {
            return Err(SkipReason::Readonly);
        }
        if self.shareable {
            return Err(SkipReason::Shareable);
        }
        Ok(())
    }

    /// The path, device or network name of the source, for messages.
    pub fn source_display(&self) -> String {
        match &self.source {
            DiskSource::File { path } => path.clone(),
            DiskSource::Block { dev } => dev.clone(),
            DiskSource::Network { protocol, name, .. } => {
                format!("{protocol}:{}", name.as_deref().unwrap_or(""))
            }
            DiskSource::Volume { pool, volume } => format!("{pool}/{volume}"),
            DiskSource::Empty => String::new(),
            DiskSource::Other { kind } => format!("({kind})"),
        }
    }
}

/// Longest pool, namespace, image or snapshot name virtkeep accepts.
pub const RBD_NAME_MAX: usize = 255;

/// Check one component of an RBD name (`what`: pool, namespace, image, snapshot): 1 to
/// [`RBD_NAME_MAX`] bytes of `[A-Za-z0-9._-]`, not starting with `-` or `.`. Names come
/// from domain XML and command output, so nothing else reaches an `rbd` command line.
pub fn check_rbd_name(what: &str, name: &str) -> Result<(), String> {
    let chars_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > RBD_NAME_MAX {
        Err(format!(
            "RBD {what} name {name:?} must be 1 to {RBD_NAME_MAX} bytes long"
        ))
    } else if !chars_ok || name.starts_with(['-', '.']) {
        Err(format!(
            "RBD {what} name {name:?} must be made of [A-Za-z0-9._-] and not start with '-' or '.'"
        ))
    } else {
        Ok(())
    }
}

/// Check a pool and an image name (`image` or `namespace/image`) with
/// [`check_rbd_name`].
pub fn check_rbd_image(pool: &str, image: &str) -> Result<(), String> {
    check_rbd_name("pool", pool)?;
    match image.split_once('/') {
        Some((ns, img)) => {
            check_rbd_name("namespace", ns)?;
            check_rbd_name("image", img)
        }
        None => check_rbd_name("image", image),
    }
}

/// Split an RBD `name=` (`pool/image`, `pool/ns/image`, optionally `@snap`) into pool
/// and image. The snapshot suffix is dropped. The names are not checked: see
/// [`check_rbd_image`] ([`Disk::backend`] does).
pub fn split_rbd_name(name: &str) -> Option<(String, String)> {
    let name = name.split('@').next().unwrap_or(name);
    let (pool, image) = name.split_once('/')?;
    if pool.is_empty() || image.is_empty() {
        return None;
    }
    Some((pool.to_owned(), image.to_owned()))
}

/// Directories under /dev that hold three-component device paths but are not VGs.
const NOT_VG_DIRS: &[&str] = &[
    "disk",
    "mapper",
    "md",
    "zvol",
    "drbd",
    "bus",
    "block",
    "char",
    "cpu",
    "dri",
    "input",
    "net",
    "pts",
    "shm",
    "snd",
    "usb",
    "vfio",
    "hugepages",
    "mqueue",
    "fd",
    "bsg",
    "cciss",
    "ida",
    "rd",
    "etherd",
    "nvme-fabrics",
    "vhost-vdpa",
    "loop",
    "sg",
    "raw",
    "serial",
];

/// Guess VG and LV from a device path: `/dev/VG/LV` or `/dev/mapper/VG-LV` (where a
/// `-` inside a name is written `--`). Returns `None` for anything else.
pub fn lvm_from_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/dev/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["mapper", dm] => split_dm_name(dm),
        [vg, lv] if !NOT_VG_DIRS.contains(vg) && valid_lvm_name(vg) && valid_lvm_name(lv) => {
            Some(((*vg).to_owned(), (*lv).to_owned()))
        }
        _ => None,
    }
}

fn valid_lvm_name(n: &str) -> bool {
    !n.is_empty()
        && n != "."
        && n != ".."
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'))
}

/// Split a device-mapper name `VG-LV` at the single `-`, unescaping `--` to `-`.
fn split_dm_name(dm: &str) -> Option<(String, String)> {
    let b = dm.as_bytes();
    let mut i = 0;
    let mut split = None;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            split = Some(i);
            break;
        }
        i += 1;
    }
    let at = split?;
    let raw_lv = &dm[at + 1..];
    // In a device-mapper name every '-' of the LV name is doubled; a single one left
    // means an LVM-internal device (`-real`, `-cow`, `-tpool`) or no LV at all.
    if raw_lv.replace("--", "").contains('-') {
        return None;
    }
    let vg = dm[..at].replace("--", "-");
    let lv = raw_lv.replace("--", "-");
    (valid_lvm_name(&vg) && valid_lvm_name(&lv)).then_some((vg, lv))
}

/// Parse a domain XML document (`virsh dumpxml` output).
pub fn parse_domain(xml: &str) -> Result<Domain, XmlError> {
    let doc = Doc::parse(xml)?;
    let root = doc.root();
    if root.name != "domain" {
        return Err(XmlError::NotADomain {
            found: root.name.clone(),
        });
    }
    let kind = root.attr("type").unwrap_or_default().to_owned();
    let id = match root.attr("id") {
        Some(v) => Some(v.trim().parse::<i64>().map_err(|_| {
            invalid(
                xml,
                root.start_tag.start,
                "<domain> id",
                format!("not a number: {v:?}"),
            )
        })?),
        None => None,
    };
    let name = doc
        .child(0, "name")
        .map(|n| doc.elem(n).text.clone())
        .ok_or(XmlError::Missing { what: "<name>" })?;
    let uuid = doc
        .child(0, "uuid")
        .map(|u| doc.elem(u).text.trim().to_owned());
    let os = doc.child(0, "os");
    let os_type = os
        .and_then(|o| doc.child(o, "type"))
        .map(|t| doc.elem(t).text.trim().to_owned());
    let nvram = os.and_then(|o| doc.child(o, "nvram")).and_then(|n| {
        let e = doc.elem(n);
        let t = e.text.trim();
        if !t.is_empty() {
            Some(t.to_owned())
        } else {
            // libvirt ≥ 8.5 also allows <nvram type='file'><source file=…/></nvram>
            doc.child(n, "source")
                .and_then(|s| doc.elem(s).attr("file"))
                .map(str::to_owned)
        }
    });
    let host_boot_files = os.map(|o| host_boot_files(&doc, o)).unwrap_or_default();

    let mut disks = Vec::new();
    let mut interfaces = Vec::new();
    let mut has_guest_agent_channel = false;
    for devices in doc.children_named(0, "devices") {
        for &c in &doc.elem(devices).children {
            let e = doc.elem(c);
            match e.name.as_str() {
                "disk" => disks.push(parse_disk(&doc, c)?),
                "interface" => interfaces.push(Interface {
                    mac: doc
                        .child(c, "mac")
                        .and_then(|m| doc.elem(m).attr("address"))
                        .map(str::to_owned),
                    kind: e.attr("type").unwrap_or_default().to_owned(),
                }),
                "channel"
                    if doc
                        .children_named(c, "target")
                        .any(|t| doc.elem(t).attr("name") == Some("org.qemu.guest_agent.0")) =>
                {
                    has_guest_agent_channel = true;
                }
                _ => {}
            }
        }
    }
    Ok(Domain {
        name,
        uuid,
        kind,
        id,
        os_type,
        nvram,
        host_boot_files,
        disks,
        interfaces,
        has_guest_agent_channel,
    })
}

/// The children of `<os>` (`os`) that name a host file QEMU loads into the guest (see
/// [`Domain::host_boot_files`]); an element with no text names none.
fn host_boot_files(doc: &Doc<'_>, os: usize) -> Vec<&'static str> {
    let named = |id: usize| !doc.elem(id).text.trim().is_empty();
    let mut found = Vec::new();
    for &c in &doc.elem(os).children {
        let what = match doc.elem(c).name.as_str() {
            "kernel" => "kernel",
            "initrd" => "initrd",
            "dtb" => "dtb",
            "acpi" if doc.children_named(c, "table").any(named) => "acpi/table",
            _ => continue,
        };
        if what == "acpi/table" || named(c) {
            found.push(what);
        }
    }
    found
}

fn parse_disk(doc: &Doc<'_>, id: usize) -> Result<Disk, XmlError> {
    let e = doc.elem(id);
    let at = e.start_tag.start;
    let device = match e.attr("device").unwrap_or("disk") {
        "disk" => DiskDevice::Disk,
        "cdrom" => DiskDevice::Cdrom,
        "floppy" => DiskDevice::Floppy,
        "lun" => DiskDevice::Lun,
        other => {
            return Err(invalid(
                doc.src,
                at,
                "<disk> device",
                format!("unknown device kind {other:?}"),
            ));
        }
    };
    let target_el = doc.child(id, "target").map(|t| doc.elem(t));
    let target = target_el
        .and_then(|t| t.attr("dev"))
        .ok_or_else(|| invalid(doc.src, at, "<disk>", "no <target dev=…>"))?
        .to_owned();
    let bus = target_el.and_then(|t| t.attr("bus")).map(str::to_owned);
    let driver = doc.child(id, "driver").map(|d| doc.elem(d));
    let driver_name = driver.and_then(|d| d.attr("name")).map(str::to_owned);
    let format = driver.and_then(|d| d.attr("type")).map(str::to_owned);
    let source_id = doc.child(id, "source");
    let source = read_source(doc, id, e.attr("type"), source_id);
    let mut backing_chain = Vec::new();
    let mut bs = doc.child(id, "backingStore");
    while let Some(b) = bs {
        let Some(s) = doc.child(b, "source") else {
            break;
        };
        let s = doc.elem(s);
        match s.attr("file").or(s.attr("dev")).or(s.attr("name")) {
            Some(p) => backing_chain.push(p.to_owned()),
            None => break,
        }
        bs = doc.child(b, "backingStore");
    }
    Ok(Disk {
        device,
        target,
        bus,
        driver_name,
        format,
        source,
        readonly: doc.child(id, "readonly").is_some(),
        shareable: doc.child(id, "shareable").is_some(),
        backing_chain,
        alias: doc
            .child(id, "alias")
            .and_then(|a| doc.elem(a).attr("name"))
            .map(str::to_owned),
    })
}

fn read_source(
    doc: &Doc<'_>,
    disk: usize,
    kind: Option<&str>,
    source_id: Option<usize>,
) -> DiskSource {
    let src = source_id.map(|s| doc.elem(s));
    let get = |a: &str| src.and_then(|s| s.attr(a)).map(str::to_owned);
    // Without type=, libvirt defaults to 'file'; infer from the source attributes.
    let kind = match kind {
        Some(k) => k,
        None if get("dev").is_some() => "block",
        None if get("protocol").is_some() => "network",
        None if get("pool").is_some() => "volume",
        None => "file",
    };
    match kind {
        "file" => get("file").map_or(DiskSource::Empty, |path| DiskSource::File { path }),
        "block" => get("dev").map_or(DiskSource::Empty, |dev| DiskSource::Block { dev }),
        "network" => {
            let Some(s) = source_id else {
                return DiskSource::Empty;
            };
            let hosts = doc
                .children_named(s, "host")
                .map(|h| {
                    let h = doc.elem(h);
                    NetHost {
                        name: h.attr("name").map(str::to_owned),
                        port: h.attr("port").map(str::to_owned),
                    }
                })
                .collect();
            let auth = doc
                .child(s, "auth")
                .or_else(|| doc.child(disk, "auth"))
                .map(|a| {
                    let secret = doc.child(a, "secret").map(|x| doc.elem(x));
                    let sget = |n: &str| secret.and_then(|x| x.attr(n)).map(str::to_owned);
                    DiskAuth {
                        username: doc.elem(a).attr("username").unwrap_or_default().to_owned(),
                        secret_type: sget("type"),
                        secret_uuid: sget("uuid"),
                        secret_usage: sget("usage"),
                    }
                });
            DiskSource::Network {
                protocol: get("protocol").unwrap_or_default(),
                name: get("name"),
                hosts,
                auth,
            }
        }
        "volume" => match (get("pool"), get("volume")) {
            (Some(pool), Some(volume)) => DiskSource::Volume { pool, volume },
            _ => DiskSource::Empty,
        },
        other => DiskSource::Other {
            kind: other.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_boot_files_are_found_in_os() {
        let xml = |os: &str| {
            format!(
                "<domain type='kvm'><name>v</name><os><type>hvm</type>{os}</os><devices/></domain>"
            )
        };
        let files = |os: &str| parse_domain(&xml(os)).expect("parse").host_boot_files;
        assert!(files("<boot dev='hd'/>").is_empty());
        assert!(files("<kernel> </kernel><initrd/><cmdline>x</cmdline>").is_empty());
        assert_eq!(
            files("<kernel>/boot/vmlinuz</kernel><initrd>/etc/shadow</initrd><cmdline>x</cmdline>"),
            ["kernel", "initrd"]
        );
        assert_eq!(files("<dtb>/x.dtb</dtb>"), ["dtb"]);
        assert_eq!(
            files("<acpi><table type='slic'>/etc/slic.bin</table></acpi>"),
            ["acpi/table"]
        );
        let none = "<domain type='kvm'><name>v</name><devices/></domain>";
        assert!(
            parse_domain(none)
                .expect("parse")
                .host_boot_files
                .is_empty()
        );
    }

    #[test]
    fn lvm_paths() {
        assert_eq!(
            lvm_from_path("/dev/vg0/guest-root"),
            Some(("vg0".into(), "guest-root".into()))
        );
        assert_eq!(
            lvm_from_path("/dev/mapper/vg--data-lv--one"),
            Some(("vg-data".into(), "lv-one".into()))
        );
        assert_eq!(
            lvm_from_path("/dev/mapper/vg0-root"),
            Some(("vg0".into(), "root".into()))
        );
        assert_eq!(lvm_from_path("/dev/mapper/mpatha"), None);
        assert_eq!(lvm_from_path("/dev/mapper/vg0-root-real"), None);
        assert_eq!(lvm_from_path("/dev/mapper/vg0-"), None);
        assert_eq!(lvm_from_path("/dev/sdb"), None);
        assert_eq!(lvm_from_path("/dev/disk/by-id/wwn-0x5000"), None);
        assert_eq!(lvm_from_path("/dev/zvol/tank/vm"), None);
        assert_eq!(lvm_from_path("/dev/md/raid1"), None);
        assert_eq!(lvm_from_path("/var/lib/x.img"), None);
    }

    #[test]
    fn rbd_names() {
        assert_eq!(
            split_rbd_name("rbd/img"),
            Some(("rbd".into(), "img".into()))
        );
        assert_eq!(
            split_rbd_name("pool/ns/img@snap"),
            Some(("pool".into(), "ns/img".into()))
        );
        assert_eq!(split_rbd_name("img"), None);
        assert_eq!(check_rbd_image("rbd", "vm-100-disk-0"), Ok(()));
        assert_eq!(check_rbd_image("rbd", "ns/img_1.x"), Ok(()));
        for (pool, image) in [
            ("-c", "img"),
            ("rbd", "--keyring=/tmp/k"),
            ("rbd", "ns/-x"),
            ("-rbd", "ns/x"),
            (".rbd", "x"),
            ("rbd", "a b"),
            ("rbd", "a@b"),
            ("rbd", "a/b/c"),
            ("rbd", ""),
            ("rbd", "$(reboot)"),
        ] {
            assert!(check_rbd_image(pool, image).is_err(), "{pool}/{image}");
        }
        let long = "a".repeat(RBD_NAME_MAX + 1);
        assert!(check_rbd_image("rbd", &long).is_err());
        assert!(check_rbd_image("rbd", &long[1..]).is_ok());
        assert!(check_rbd_name("snapshot", "virtkeep-20260101T000000Z-ab").is_ok());
    }
}
