//! The restore side: rewrite a saved domain XML by splicing the original text.
//!
//! The document is read once with quick-xml into an element tree that records the
//! byte span of every tag and attribute value. The rewrite is a list of edits on
//! those spans; every byte outside them (comments, unknown elements, namespaces,
//! attribute order and quoting, whitespace) is copied unchanged. An empty
//! [`Rewrite`] therefore returns the input byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use crate::domain::{DiskAuth, NetHost};
use crate::error::XmlError;
use crate::xml::{Doc, Elem, escape_attr, escape_text};

/// What to change in a domain XML for a restore. `Rewrite::default()` changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// New `<name>`.
    pub name: Option<String>,
    /// New `<uuid>` (any form the `uuid` crate parses; written hyphenated, lowercase).
    /// Inserted after `<name>` when the document has none.
    pub new_uuid: Option<String>,
    /// Give every `<interface>` a fresh, unique, locally administered MAC
    /// `52:54:00:xx:xx:xx`, different from every MAC in the document.
    pub regenerate_macs: bool,
    /// Remove these disks (by target dev) entirely.
    pub remove_disks: Vec<String>,
    /// New storage for these disks (by target dev).
    pub disk_sources: BTreeMap<String, NewSource>,
    /// Remove `<backingStore>` from every disk in `disk_sources` (restored disks are
    /// flattened).
    pub drop_backing_store: bool,
    /// New `<os><nvram>` path (the UEFI variable store of the restored domain).
    pub nvram: Option<String>,
    /// New `<devices><emulator>` text (the target host's QEMU), where the domain has one.
    pub emulator: Option<String>,
    /// Serial ports, consoles, parallel ports and channels written to a file
    /// (`type='file'`, or a `<log file>`) become `pty` without the log: a domain
    /// restored under a new name would otherwise write into the original's files.
    pub file_chardevs_to_pty: bool,
}

/// New storage for a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewSource {
    /// `type='file'`, `<source file=…>`, `<driver type=format>`.
    File {
        /// Image path.
        path: String,
        /// `qcow2`, `raw`, …
        format: String,
    },
    /// `type='block'`, `<source dev=…>`, `<driver type='raw'>`.
    Block {
        /// Device path.
        dev: String,
    },
    /// `type='network'`, `<source protocol='rbd' name='pool/image'>`, raw.
    Rbd {
        /// Pool.
        pool: String,
        /// Image (may carry a `namespace/` prefix).
        image: String,
        /// Monitors. Empty: keep the disk's existing `<host>`s when it already is an
        /// RBD disk (none otherwise: librbd then uses its ceph.conf).
        hosts: Vec<NetHost>,
        /// Credentials. `None`: keep the disk's existing `<auth>` when it already is
        /// an RBD disk (none otherwise).
        auth: Option<DiskAuth>,
    },
}

impl NewSource {
    fn disk_type(&self) -> &'static str {
        match self {
            NewSource::File { .. } => "file",
            NewSource::Block { .. } => "block",
            NewSource::Rbd { .. } => "network",
        }
    }

    fn format(&self) -> &str {
        match self {
            NewSource::File { format, .. } => format,
            NewSource::Block { .. } | NewSource::Rbd { .. } => "raw",
        }
    }
}

/// One splice: replace `span` of the input with `text` (an insertion when empty).
#[derive(Debug)]
struct Edit {
    span: Range<usize>,
    text: String,
}

#[derive(Default)]
pub(crate) struct Edits(Vec<Edit>);

impl Edits {
    pub(crate) fn replace(&mut self, span: Range<usize>, text: impl Into<String>) {
        self.0.push(Edit {
            span,
            text: text.into(),
        });
    }

    pub(crate) fn insert(&mut self, at: usize, text: impl Into<String>) {
        self.replace(at..at, text);
    }

    /// Set attribute `name` of `e` to `value`: replace the value in place (keeping
    /// the quote style), or add ` name='value'` after the last attribute.
    pub(crate) fn set_attr(
        &mut self,
        src: &str,
        e: &Elem,
        name: &str,
        value: &str,
    ) -> Result<(), XmlError> {
        match e.attr_full(name) {
            Some(a) if a.value == value => {}
            Some(a) => self.replace(a.value_span.clone(), escape_attr(value)?),
            None => self.add_attr(src, e, name, value)?,
        }
        Ok(())
    }

    fn add_attr(&mut self, _src: &str, e: &Elem, name: &str, value: &str) -> Result<(), XmlError> {
        let at = match e.attrs.last() {
            Some(last) => last.value_span.end + 1, // past the closing quote
            None => e.start_tag.start + 1 + e.name.len(),
        };
        self.insert(at, format!(" {name}='{}'", escape_attr(value)?));
        Ok(())
    }

    pub(crate) fn apply(mut self, src: &str) -> Result<String, XmlError> {
        // Stable: insertions at one point keep the order they were made in.
        self.0.sort_by_key(|e| (e.span.start, e.span.end));
        let mut out = String::with_capacity(src.len() + 256);
        let mut at = 0;
        for e in &self.0 {
            if e.span.start < at {
                return Err(XmlError::Rewrite(format!(
                    "internal error: overlapping edits at byte {}",
                    e.span.start
                )));
            }
            out.push_str(&src[at..e.span.start]);
            out.push_str(&e.text);
            at = e.span.end;
        }
        out.push_str(&src[at..]);
        Ok(out)
    }
}

/// Apply `rw` to the domain XML `xml`, changing only what it asks for.
pub fn rewrite_domain(xml: &str, rw: &Rewrite) -> Result<String, XmlError> {
    let doc = Doc::parse(xml)?;
    if doc.root().name != "domain" {
        return Err(XmlError::NotADomain {
            found: doc.root().name.clone(),
        });
    }
    let mut edits = Edits::default();

    let name_id = doc.child(0, "name");
    if let Some(new) = &rw.name {
        if new.is_empty() {
            return Err(XmlError::Rewrite("the new name is empty".into()));
        }
        if new.contains('/') {
            return Err(XmlError::Rewrite(format!(
                "libvirt refuses domain names with '/': {new:?}"
            )));
        }
        let id = name_id.ok_or(XmlError::Missing { what: "<name>" })?;
        set_text(&doc, &mut edits, id, new)?;
    }

    if let Some(u) = &rw.new_uuid {
        let parsed = uuid::Uuid::parse_str(u.trim())
            .map_err(|e| XmlError::Rewrite(format!("invalid UUID {u:?}: {e}")))?;
        let u = parsed.hyphenated().to_string();
        match doc.child(0, "uuid") {
            Some(id) => set_text(&doc, &mut edits, id, &u)?,
            None => {
                let name_id = name_id.ok_or(XmlError::Missing { what: "<name>" })?;
                let indent = doc.indent_of(name_id).unwrap_or("");
                let end = doc.elem(name_id).span().end;
                edits.insert(end, format!("\n{indent}<uuid>{u}</uuid>"));
            }
        }
    }

    if let Some(path) = &rw.nvram {
        let nv = doc
            .child(0, "os")
            .and_then(|o| doc.child(o, "nvram"))
            .ok_or(XmlError::Rewrite(
                "a new nvram path was given but the domain has no <os><nvram>".into(),
            ))?;
        match doc.child(nv, "source") {
            Some(s) if doc.elem(nv).text.trim().is_empty() => {
                edits.set_attr(doc.src, doc.elem(s), "file", path)?
            }
            _ => set_text(&doc, &mut edits, nv, path)?,
        }
    }

    let devices: Vec<usize> = doc.children_named(0, "devices").collect();

    if rw.regenerate_macs {
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut macs = Vec::new();
        for &d in &devices {
            for i in doc.children_named(d, "interface") {
                for m in doc.children_named(i, "mac") {
                    if let Some(a) = doc.elem(m).attr("address") {
                        used.insert(a.to_ascii_lowercase());
                    }
                    macs.push(m);
                }
            }
        }
        for m in macs {
            let mac = loop {
                let b: [u8; 3] = rand::random();
                let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]);
                if used.insert(mac.clone()) {
                    break mac;
                }
            };
            edits.set_attr(doc.src, doc.elem(m), "address", &mac)?;
        }
    }

    for &d in &devices {
        if let Some(em) = &rw.emulator {
            for e in doc.children_named(d, "emulator") {
                set_text(&doc, &mut edits, e, em)?;
            }
        }
        if rw.file_chardevs_to_pty {
            file_chardevs_to_pty(&doc, &mut edits, d)?;
        }
    }

    // Disks by target.
    let mut by_target: BTreeMap<String, usize> = BTreeMap::new();
    for &d in &devices {
        for disk in doc.children_named(d, "disk") {
            if let Some(t) = doc
                .child(disk, "target")
                .and_then(|t| doc.elem(t).attr("dev"))
            {
                by_target.insert(t.to_owned(), disk);
            }
        }
    }
    for t in &rw.remove_disks {
        if rw.disk_sources.contains_key(t) {
            return Err(XmlError::Rewrite(format!(
                "disk {t:?} is both removed and given a new source"
            )));
        }
    }
    let mut removed = BTreeSet::new();
    for t in &rw.remove_disks {
        let id = *by_target
            .get(t)
            .ok_or_else(|| XmlError::Rewrite(format!("no disk with target {t:?} to remove")))?;
        if removed.insert(id) {
            edits.replace(doc.removal_span(id), "");
        }
    }
    for (t, new) in &rw.disk_sources {
        let id = *by_target
            .get(t)
            .ok_or_else(|| XmlError::Rewrite(format!("no disk with target {t:?} to retarget")))?;
        rewrite_disk(&doc, &mut edits, id, new, rw.drop_backing_store)?;
    }

    edits.apply(xml)
}

/// Every chardev under `devices` of `type='file'` becomes `pty` (its `<source>` goes);
/// every `<log>` of a chardev goes.
fn file_chardevs_to_pty(doc: &Doc<'_>, edits: &mut Edits, devices: usize) -> Result<(), XmlError> {
    for name in ["serial", "console", "parallel", "channel"] {
        for c in doc.children_named(devices, name) {
            let e = doc.elem(c);
            let file = e.attr("type") == Some("file");
            if file {
                edits.set_attr(doc.src, e, "type", "pty")?;
            }
            for child in doc.elem(c).children.clone() {
                let n = doc.elem(child).name.as_str();
                if n == "log" || (file && n == "source") {
                    edits.replace(doc.removal_span(child), "");
                }
            }
        }
    }
    Ok(())
}

/// The `<devices><emulator>` of a domain's XML, trimmed.
pub fn emulator_of(xml: &str) -> Result<Option<String>, XmlError> {
    let doc = Doc::parse(xml)?;
    Ok(doc
        .children_named(0, "devices")
        .flat_map(|d| doc.children_named(d, "emulator").collect::<Vec<_>>())
        .map(|e| doc.elem(e).text.trim().to_string())
        .find(|t| !t.is_empty()))
}

/// The `<os><type arch=…>` of a domain's XML, when it names one.
pub fn arch_of(xml: &str) -> Result<Option<String>, XmlError> {
    let doc = Doc::parse(xml)?;
    Ok(doc
        .child(0, "os")
        .and_then(|os| doc.child(os, "type"))
        .and_then(|t| doc.elem(t).attr("arch"))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty()))
}

/// Every namespace URI a domain's XML declares (`xmlns` and `xmlns:*` attributes on any
/// element), decoded as libvirt's parser decodes them: a check for a namespace must not
/// be a substring test on the raw text, which character references get around.
pub fn namespace_uris(xml: &str) -> Result<Vec<String>, XmlError> {
    let doc = Doc::parse(xml)?;
    Ok(doc
        .elems
        .iter()
        .flat_map(|e| e.attrs.iter())
        .filter(|a| a.name == "xmlns" || a.name.starts_with("xmlns:"))
        .map(|a| a.value.clone())
        .collect())
}

/// The `<disk>` element with target `target` of a domain's XML, as written there (for
/// `virsh blockcopy --xml`, which reads only its source and driver).
pub fn disk_element(xml: &str, target: &str) -> Result<String, XmlError> {
    let doc = Doc::parse(xml)?;
    for d in doc.children_named(0, "devices") {
        for disk in doc.children_named(d, "disk") {
            let t = doc
                .child(disk, "target")
                .and_then(|t| doc.elem(t).attr("dev"));
            if t == Some(target) {
                return Ok(xml[doc.elem(disk).span()].to_string());
            }
        }
    }
    Err(XmlError::Rewrite(format!("no disk with target {target:?}")))
}

/// Replace the text content of element `id` (expanding `<x/>` to `<x>…</x>`).
pub(crate) fn set_text(
    doc: &Doc<'_>,
    edits: &mut Edits,
    id: usize,
    value: &str,
) -> Result<(), XmlError> {
    let e = doc.elem(id);
    if e.text == value && e.children.is_empty() {
        return Ok(());
    }
    if !e.children.is_empty() {
        return Err(XmlError::Rewrite(format!(
            "<{}> has child elements, cannot set its text",
            e.name
        )));
    }
    let esc = escape_text(value)?;
    match &e.end_tag {
        Some(end) => edits.replace(e.start_tag.end..end.start, esc),
        None => {
            let tag = &doc.src[e.start_tag.clone()];
            let open = tag.trim_end_matches('>').trim_end_matches('/').trim_end();
            edits.replace(e.start_tag.clone(), format!("{open}>{esc}</{}>", e.name));
        }
    }
    Ok(())
}

/// Indentation for a new child of `parent`: that of its first child element, or the
/// parent's own plus two spaces.
pub(crate) fn child_indent(doc: &Doc<'_>, parent: usize) -> String {
    if let Some(&c) = doc.elem(parent).children.first()
        && let Some(i) = doc.indent_of(c)
    {
        return i.to_owned();
    }
    format!("{}  ", doc.indent_of(parent).unwrap_or(""))
}

fn rewrite_disk(
    doc: &Doc<'_>,
    edits: &mut Edits,
    disk: usize,
    new: &NewSource,
    drop_backing: bool,
) -> Result<(), XmlError> {
    let src = doc.src;
    let d = doc.elem(disk);
    if d.is_empty_tag() {
        return Err(XmlError::Rewrite(
            "a <disk/> without content cannot be retargeted".into(),
        ));
    }
    let indent = child_indent(doc, disk);
    edits.set_attr(src, d, "type", new.disk_type())?;

    // Driver: format, and Xen's 'phy' cannot open an image format.
    let format = new.format();
    let driver = doc.child(disk, "driver");
    match driver {
        Some(dr) => {
            let e = doc.elem(dr);
            let dname = e.attr("name").unwrap_or("");
            let tap = matches!(dname, "tap" | "tap2");
            if !(tap && format == "raw" && e.attr("type") == Some("aio")) {
                edits.set_attr(src, e, "type", format)?;
            }
            if format != "raw" && matches!(dname, "phy" | "file") {
                edits.set_attr(src, e, "name", "qemu")?;
            }
        }
        None if format != "raw" => {
            edits.insert(
                d.start_tag.end,
                format!(
                    "\n{indent}<driver name='qemu' type='{}'/>",
                    escape_attr(format)?
                ),
            );
        }
        None => {}
    }
    // Where a new <source> goes when the disk has none.
    let insert_at = driver.map_or(d.start_tag.end, |dr| doc.elem(dr).span().end);

    let source = doc.child(disk, "source");
    let disk_auth = doc.child(disk, "auth");
    let old_is_rbd = source.is_some_and(|s| doc.elem(s).attr("protocol") == Some("rbd"));
    let old_is_path = source.is_some_and(|s| {
        doc.elem(s).attr("protocol").is_none() && doc.elem(s).attr("pool").is_none()
    });

    match new {
        NewSource::File { path, .. } | NewSource::Block { dev: path } => {
            let (attr, other) = if matches!(new, NewSource::File { .. }) {
                ("file", "dev")
            } else {
                ("dev", "file")
            };
            match source {
                Some(s) if old_is_path => {
                    let e = doc.elem(s);
                    if e.attr_full(attr).is_some() {
                        edits.set_attr(src, e, attr, path)?;
                    } else if let Some(a) = e.attr_full(other) {
                        edits.replace(a.name_span.clone(), attr);
                        edits.replace(a.value_span.clone(), escape_attr(path)?);
                    } else {
                        edits.add_attr(src, e, attr, path)?;
                    }
                }
                Some(s) => {
                    edits.replace(
                        doc.elem(s).span(),
                        format!("<source {attr}='{}'/>", escape_attr(path)?),
                    );
                    if let Some(a) = disk_auth {
                        edits.replace(doc.removal_span(a), "");
                    }
                }
                None => edits.insert(
                    insert_at,
                    format!("\n{indent}<source {attr}='{}'/>", escape_attr(path)?),
                ),
            }
        }
        NewSource::Rbd {
            pool,
            image,
            hosts,
            auth,
        } => {
            let name = format!("{pool}/{image}");
            match source {
                Some(s) if old_is_rbd => {
                    let e = doc.elem(s);
                    edits.set_attr(src, e, "name", &name)?;
                    let sindent = child_indent(doc, s);
                    let old_hosts: Vec<usize> = doc.children_named(s, "host").collect();
                    if !hosts.is_empty() {
                        let text: String = hosts
                            .iter()
                            .map(|h| Ok(format!("\n{sindent}{}", host_xml(h)?)))
                            .collect::<Result<_, XmlError>>()?;
                        match old_hosts.first() {
                            Some(&first) => {
                                edits.replace(doc.removal_span(first), text);
                                for &h in &old_hosts[1..] {
                                    edits.replace(doc.removal_span(h), "");
                                }
                            }
                            None => rbd_insert_children(doc, edits, s, &text)?,
                        }
                    }
                    if let Some(a) = auth {
                        let new_auth = auth_xml(a, &sindent)?;
                        match doc.child(s, "auth").or(disk_auth) {
                            Some(old) => {
                                let ind = doc.indent_of(old).unwrap_or("").to_owned();
                                edits.replace(doc.elem(old).span(), auth_xml(a, &ind)?);
                            }
                            None => rbd_insert_children(
                                doc,
                                edits,
                                s,
                                &format!("\n{sindent}{new_auth}"),
                            )?,
                        }
                    }
                }
                other => {
                    let sindent_base = match other {
                        Some(s) => doc.indent_of(s).unwrap_or("").to_owned(),
                        None => indent.clone(),
                    };
                    let inner = format!("{sindent_base}  ");
                    let mut children = String::new();
                    for h in hosts {
                        children.push_str(&format!("\n{inner}{}", host_xml(h)?));
                    }
                    if let Some(a) = auth {
                        children.push_str(&format!("\n{inner}{}", auth_xml(a, &inner)?));
                    }
                    let open = format!("<source protocol='rbd' name='{}'", escape_attr(&name)?);
                    let xml = if children.is_empty() {
                        format!("{open}/>")
                    } else {
                        format!("{open}>{children}\n{sindent_base}</source>")
                    };
                    match other {
                        Some(s) => edits.replace(doc.elem(s).span(), xml),
                        None => edits.insert(insert_at, format!("\n{indent}{xml}")),
                    }
                    if let Some(a) = disk_auth {
                        edits.replace(doc.removal_span(a), "");
                    }
                }
            }
        }
    }

    if drop_backing {
        for b in doc.children_named(disk, "backingStore") {
            edits.replace(doc.removal_span(b), "");
        }
    }
    Ok(())
}

/// Insert text (starting with a newline and indentation) as the last children of
/// `<source>`, expanding an empty-element tag if needed.
fn rbd_insert_children(
    doc: &Doc<'_>,
    edits: &mut Edits,
    s: usize,
    text: &str,
) -> Result<(), XmlError> {
    let e = doc.elem(s);
    match &e.end_tag {
        Some(end) => {
            // Before the whitespace that precedes </source>.
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
            let close_indent = doc.indent_of(s).unwrap_or("");
            edits.replace(
                e.start_tag.clone(),
                format!("{open}>{text}\n{close_indent}</source>"),
            );
        }
    }
    Ok(())
}

fn host_xml(h: &NetHost) -> Result<String, XmlError> {
    let mut s = String::from("<host");
    if let Some(n) = &h.name {
        s.push_str(&format!(" name='{}'", escape_attr(n)?));
    }
    if let Some(p) = &h.port {
        s.push_str(&format!(" port='{}'", escape_attr(p)?));
    }
    s.push_str("/>");
    Ok(s)
}

fn auth_xml(a: &DiskAuth, indent: &str) -> Result<String, XmlError> {
    let mut secret = String::from("<secret");
    for (k, v) in [
        ("type", &a.secret_type),
        ("uuid", &a.secret_uuid),
        ("usage", &a.secret_usage),
    ] {
        if let Some(v) = v {
            secret.push_str(&format!(" {k}='{}'", escape_attr(v)?));
        }
    }
    secret.push_str("/>");
    Ok(format!(
        "<auth username='{}'>\n{indent}  {secret}\n{indent}</auth>",
        escape_attr(&a.username)?
    ))
}
