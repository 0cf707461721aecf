//! Guest LVM2, read in-process: the physical volume's label and header, its text
//! metadata, and linear logical volumes mapped onto the PV. No device-mapper.
//!
//! All of it is written by the guest: sizes are bounded, checksums checked, the text
//! parser is strict (nesting ≤ 16, ≤ 100 000 values, ≤ 1 MiB), and an LV that is not a
//! plain linear mapping onto this PV (striped, mirrored, thin, on another PV) is skipped
//! with a warning.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use serde::Serialize;

const SECTOR: u64 = 512;
/// Largest metadata text read.
pub const MAX_METADATA: u64 = 1 << 20;
const MAX_DEPTH: usize = 16;
const MAX_VALUES: usize = 100_000;
const MAX_LVS: usize = 1024;
const MAX_SEGMENTS: u64 = 1024;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const LVM_CRC_INIT: u32 = 0xf597_a6cf;

/// Why a PV could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error("reading the physical volume failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("LVM metadata: {0}")]
    Bad(String),
}

fn bad(s: impl Into<String>) -> LvmError {
    LvmError::Bad(s.into())
}

/// A piece of an LV: `len` bytes at `lv_offset` of the LV are at `pv_offset` of the PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LvExtent {
    pub lv_offset: u64,
    pub len: u64,
    pub pv_offset: u64,
}

/// A linear logical volume on one PV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogicalVolume {
    pub vg: String,
    pub name: String,
    pub size: u64,
    #[serde(skip)]
    pub extents: Vec<LvExtent>,
}

/// The LVs of the PV at `start..start+len` of `r`, and what was skipped.
pub fn read_pv<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
) -> Result<(Vec<LogicalVolume>, Vec<String>), LvmError> {
    let text = metadata_text(r, start, len)?;
    let (uuid, text) = text;
    let top = parse(&text)?;
    volumes(&top, &uuid, len)
}

/// LVM's CRC: CRC-32 (IEEE) from `LVM_CRC_INIT`, without the final inversion.
fn lvm_crc(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!LVM_CRC_INIT);
    h.update(data);
    !h.finalize()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

fn read_at<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    off: u64,
    buf: &mut [u8],
) -> Result<(), LvmError> {
    if off.checked_add(buf.len() as u64).is_none_or(|e| e > len) {
        return Err(bad("an offset beyond the physical volume"));
    }
    r.seek(SeekFrom::Start(start + off))?;
    r.read_exact(buf)?;
    Ok(())
}

/// The PV's UUID (32 characters, no dashes) and its current metadata text.
fn metadata_text<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
) -> Result<(String, String), LvmError> {
    let mut head = [0u8; 4 * SECTOR as usize];
    read_at(r, start, len, 0, &mut head)?;
    let (sector, label) = head
        .chunks_exact(SECTOR as usize)
        .enumerate()
        .find(|(_, s)| &s[..8] == b"LABELONE" && &s[24..32] == b"LVM2 001")
        .ok_or_else(|| bad("no LVM2 label in the first four sectors"))?;
    if u64_at(label, 8) != sector as u64 || u32_at(label, 16) != lvm_crc(&label[20..]) {
        return Err(bad("label checksum or position"));
    }
    let off = u32_at(label, 20) as usize;
    if !(32..=SECTOR as usize - 40 - 16).contains(&off) {
        return Err(bad("pv header offset"));
    }
    let pvh = &label[off..];
    let uuid = String::from_utf8_lossy(&pvh[..32]).into_owned();
    // Data areas, then metadata areas, each list ended by a zero entry.
    let mut areas: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    let mut o = 40;
    for list in &mut areas {
        loop {
            if o + 16 > pvh.len() {
                return Err(bad("pv header area lists"));
            }
            let (a, s) = (u64_at(pvh, o), u64_at(pvh, o + 8));
            o += 16;
            if a == 0 {
                break;
            }
            list.push((a, s));
        }
    }
    let &(mda, mda_size) = areas[1]
        .first()
        .ok_or_else(|| bad("the PV holds no metadata area"))?;
    Ok((uuid, read_mda(r, start, len, mda, mda_size)?))
}

fn read_mda<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    mda: u64,
    mda_size: u64,
) -> Result<String, LvmError> {
    let mut h = [0u8; SECTOR as usize];
    read_at(r, start, len, mda, &mut h)?;
    if &h[4..20] != MDA_MAGIC || u32_at(&h, 0) != lvm_crc(&h[4..]) || u32_at(&h, 20) != 1 {
        return Err(bad("metadata area header (magic, checksum or version)"));
    }
    let (off, size, crc) = (u64_at(&h, 40), u64_at(&h, 48), u32_at(&h, 56));
    if size == 0 || size > MAX_METADATA || off < SECTOR || off >= mda_size || size > mda_size {
        return Err(bad("metadata text location"));
    }
    let mut text = vec![0u8; size as usize];
    // The text is a ring after the header: it may wrap to the area's second sector.
    let first = size.min(mda_size - off);
    read_at(r, start, len, mda + off, &mut text[..first as usize])?;
    if first < size {
        read_at(r, start, len, mda + SECTOR, &mut text[first as usize..])?;
    }
    if lvm_crc(&text) != crc {
        return Err(bad("metadata text checksum"));
    }
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    String::from_utf8(text[..end].to_vec()).map_err(|_| bad("metadata text is not UTF-8"))
}

/// A value of LVM's text format.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Result<u64, LvmError> {
        match self.get(key) {
            Some(Value::Int(i)) if *i >= 0 => Ok(*i as u64),
            _ => Err(bad(format!("missing or bad number {key:?}"))),
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    values: usize,
}

/// Parses LVM2 text metadata into its top-level section.
pub(crate) fn parse(text: &str) -> Result<Value, LvmError> {
    if text.len() as u64 > MAX_METADATA {
        return Err(bad("metadata text too large"));
    }
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        values: 0,
    };
    let items = p.items(0)?;
    if p.i < p.s.len() {
        return Err(bad(format!("unexpected '}}' at byte {}", p.i)));
    }
    Ok(Value::Section(items))
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while let Some(&c) = self.s.get(self.i) {
            if c == b'#' {
                while self.s.get(self.i).is_some_and(|&c| c != b'\n') {
                    self.i += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn ident(&mut self) -> Result<String, LvmError> {
        let st = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"_.+-".contains(c))
        {
            self.i += 1;
        }
        if st == self.i || self.i - st > 256 {
            return Err(bad(format!("expected a name at byte {st}")));
        }
        Ok(String::from_utf8_lossy(&self.s[st..self.i]).into_owned())
    }

    /// `key = value` and `name { … }` items until `}` or the end.
    fn items(&mut self, depth: usize) -> Result<Vec<(String, Value)>, LvmError> {
        if depth > MAX_DEPTH {
            return Err(bad("sections nested too deep"));
        }
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.s.get(self.i) {
                None | Some(b'}') => return Ok(out),
                _ => {}
            }
            let key = self.ident()?;
            self.skip_ws();
            let v = match self.s.get(self.i) {
                Some(b'=') => {
                    self.i += 1;
                    self.value()?
                }
                Some(b'{') => {
                    self.i += 1;
                    let items = self.items(depth + 1)?;
                    if self.s.get(self.i) != Some(&b'}') {
                        return Err(bad(format!("section {key:?} not closed")));
                    }
                    self.i += 1;
                    Value::Section(items)
                }
                _ => return Err(bad(format!("expected '=' or '{{' after {key:?}"))),
            };
            self.values += 1;
            if self.values > MAX_VALUES {
                return Err(bad("too many values"));
            }
            out.push((key, v));
        }
    }

    fn value(&mut self) -> Result<Value, LvmError> {
        self.skip_ws();
        match self.s.get(self.i) {
            Some(b'"') => self.string(),
            Some(b'[') => {
                self.i += 1;
                let mut list = Vec::new();
                loop {
                    self.skip_ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::List(list));
                    }
                    if !list.is_empty() {
                        if self.s.get(self.i) != Some(&b',') {
                            return Err(bad(format!("expected ',' at byte {}", self.i)));
                        }
                        self.i += 1;
                    }
                    let v = self.value()?;
                    if matches!(v, Value::List(_)) {
                        return Err(bad("nested list"));
                    }
                    self.values += 1;
                    if self.values > MAX_VALUES {
                        return Err(bad("too many values"));
                    }
                    list.push(v);
                }
            }
            _ => {
                let st = self.i;
                if self.s.get(self.i) == Some(&b'-') {
                    self.i += 1;
                }
                while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[st..self.i])
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
                    .map(Value::Int)
                    .ok_or_else(|| bad(format!("expected a value at byte {st}")))
            }
        }
    }

    fn string(&mut self) -> Result<Value, LvmError> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err(bad("string not closed")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()));
                }
                Some(b'\\') => {
                    let c = *self
                        .s
                        .get(self.i + 1)
                        .ok_or_else(|| bad("string not closed"))?;
                    out.push(c);
                    self.i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

/// The linear LVs of the VG in `top` that lie on the PV `uuid` of `pv_len` bytes.
pub(crate) fn volumes(
    top: &Value,
    uuid: &str,
    pv_len: u64,
) -> Result<(Vec<LogicalVolume>, Vec<String>), LvmError> {
    let Value::Section(items) = top else {
        return Err(bad("no volume group"));
    };
    let (vg_name, vg) = items
        .iter()
        .find(|(_, v)| matches!(v, Value::Section(_)))
        .ok_or_else(|| bad("no volume group section"))?;
    let extent = vg
        .int("extent_size")?
        .checked_mul(SECTOR)
        .filter(|&e| e > 0)
        .ok_or_else(|| bad("extent_size"))?;
    let mut pvs: HashMap<&str, u64> = HashMap::new();
    if let Some(Value::Section(list)) = vg.get("physical_volumes") {
        for (name, pv) in list {
            let id: String = pv
                .str("id")
                .unwrap_or("")
                .chars()
                .filter(|&c| c != '-')
                .collect();
            if id == uuid {
                let pe_start = pv
                    .int("pe_start")?
                    .checked_mul(SECTOR)
                    .ok_or_else(|| bad("pe_start"))?;
                pvs.insert(name, pe_start);
            }
        }
    }
    let mut lvs = Vec::new();
    let mut warnings = Vec::new();
    if let Some(Value::Section(list)) = vg.get("logical_volumes") {
        for (name, lv) in list.iter().take(MAX_LVS) {
            match linear(lv, extent, &pvs, pv_len) {
                Ok((size, extents)) => lvs.push(LogicalVolume {
                    vg: vg_name.clone(),
                    name: name.clone(),
                    size,
                    extents,
                }),
                Err(e) => warnings.push(format!("{vg_name}/{name} skipped: {e}")),
            }
        }
    }
    Ok((lvs, warnings))
}

/// The size and pieces of one LV, if every segment is linear on this PV.
fn linear(
    lv: &Value,
    extent: u64,
    pvs: &HashMap<&str, u64>,
    pv_len: u64,
) -> Result<(u64, Vec<LvExtent>), LvmError> {
    let count = lv.int("segment_count")?;
    if count == 0 || count > MAX_SEGMENTS {
        return Err(bad("segment_count"));
    }
    let mut extents = Vec::new();
    let mut next = 0u64;
    for n in 1..=count {
        let seg = lv
            .get(&format!("segment{n}"))
            .ok_or_else(|| bad(format!("segment{n} missing")))?;
        if seg.str("type") != Some("striped") || seg.int("stripe_count")? != 1 {
            return Err(bad("not a linear LV"));
        }
        let (first, len) = (seg.int("start_extent")?, seg.int("extent_count")?);
        let Some(Value::List(stripes)) = seg.get("stripes") else {
            return Err(bad("stripes"));
        };
        let (pv, pe) = match stripes.as_slice() {
            [Value::Str(pv), Value::Int(pe)] if *pe >= 0 => (pv.as_str(), *pe as u64),
            _ => return Err(bad("stripes")),
        };
        let pe_start = *pvs
            .get(pv)
            .ok_or_else(|| bad(format!("on another PV ({pv})")))?;
        let ov = || bad("extent arithmetic overflows");
        let lv_offset = first.checked_mul(extent).ok_or_else(ov)?;
        let bytes = len.checked_mul(extent).ok_or_else(ov)?;
        let pv_offset = pe
            .checked_mul(extent)
            .and_then(|o| o.checked_add(pe_start))
            .ok_or_else(ov)?;
        if first != next || len == 0 || pv_offset.checked_add(bytes).is_none_or(|e| e > pv_len) {
            return Err(bad(format!("segment{n} out of order or beyond the PV")));
        }
        next = first + len;
        extents.push(LvExtent {
            lv_offset,
            len: bytes,
            pv_offset,
        });
    }
    let size = next.checked_mul(extent).ok_or_else(|| bad("size"))?;
    Ok((size, extents))
}

/// `Read + Seek` over a list of pieces of `inner`: an LV, or a partition as one piece.
#[derive(Debug)]
pub struct Mapped<R> {
    inner: R,
    /// Disk offset the pieces' `pv_offset` count from.
    base: u64,
    extents: Vec<LvExtent>,
    size: u64,
    pos: u64,
}

impl<R> Mapped<R> {
    /// `len` bytes at `start` of `inner`.
    pub fn range(inner: R, start: u64, len: u64) -> Self {
        let e = LvExtent {
            lv_offset: 0,
            len,
            pv_offset: 0,
        };
        Mapped {
            inner,
            base: start,
            extents: vec![e],
            size: len,
            pos: 0,
        }
    }

    /// `lv` on the PV that starts at `pv_start` of `inner`.
    pub fn lv(inner: R, pv_start: u64, lv: &LogicalVolume) -> Self {
        Mapped {
            inner,
            base: pv_start,
            extents: lv.extents.clone(),
            size: lv.size,
            pos: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The same pieces over another reader.
    pub fn with<S>(self, inner: S) -> Mapped<S> {
        Mapped {
            inner,
            base: self.base,
            extents: self.extents,
            size: self.size,
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for Mapped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let pos = self.pos;
        let Some(e) = self
            .extents
            .iter()
            .find(|e| pos >= e.lv_offset && pos - e.lv_offset < e.len)
        else {
            return Ok(0);
        };
        let within = pos - e.lv_offset;
        let n = (buf.len() as u64).min(e.len - within) as usize;
        self.inner
            .seek(SeekFrom::Start(self.base + e.pv_offset + within))?;
        let n = self.inner.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R> Seek for Mapped<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Shaped like `vgcfgbackup` output of a VG made by pvcreate/vgcreate/lvcreate/lvextend.
    const META: &str = r#"vg0 {
id = "abc"
seqno = 4
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192
physical_volumes {
pv0 {
id = "AAAAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAAAA"
device = "/dev/vda2"
pe_start = 2048
pe_count = 100
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
segment2 {
start_extent = 2
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 5]
}
}
thin {
segment_count = 1
segment1 { start_extent = 0 extent_count = 1 type = "thin" }
}
}
}
contents = "Text Format Volume Group"
version = 1
"#;

    #[test]
    fn linear_lvs_map_to_the_pv() {
        let top = parse(META).expect("parse");
        let (lvs, warnings) = volumes(&top, &"A".repeat(32), 1 << 30).expect("volumes");
        assert_eq!(lvs.len(), 1);
        let mib4 = 4 << 20;
        assert_eq!(
            (lvs[0].vg.as_str(), lvs[0].name.as_str(), lvs[0].size),
            ("vg0", "root", 3 * mib4)
        );
        assert_eq!(
            lvs[0].extents,
            [
                LvExtent {
                    lv_offset: 0,
                    len: 2 * mib4,
                    pv_offset: 1 << 20
                },
                LvExtent {
                    lv_offset: 2 * mib4,
                    len: mib4,
                    pv_offset: (1 << 20) + 5 * mib4
                },
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // Another PV's UUID: nothing on this one.
        let (lvs, _) = volumes(&top, &"B".repeat(32), 1 << 30).expect("volumes");
        assert!(lvs.is_empty());
        // A PV too small for its segments.
        let (lvs, w) = volumes(&top, &"A".repeat(32), 8 << 20).expect("volumes");
        assert!(lvs.is_empty() && w[0].contains("beyond"), "{w:?}");
    }

    #[test]
    fn mapped_reads_follow_the_pieces() {
        let disk: Vec<u8> = (0..100u8).collect();
        let lv = LogicalVolume {
            vg: "v".into(),
            name: "l".into(),
            size: 6,
            extents: vec![
                LvExtent {
                    lv_offset: 0,
                    len: 3,
                    pv_offset: 10,
                },
                LvExtent {
                    lv_offset: 3,
                    len: 3,
                    pv_offset: 50,
                },
            ],
        };
        let mut m = Mapped::lv(std::io::Cursor::new(disk), 5, &lv);
        let mut out = Vec::new();
        m.read_to_end(&mut out).expect("read");
        assert_eq!(out, [15, 16, 17, 55, 56, 57]);
    }

    #[test]
    fn malformed_text_is_an_error() {
        for t in [
            "a {",
            "a = ",
            "a = [1 2]",
            "a = \"x",
            "}",
            "a { b = [[1]] }",
            "= 1",
        ] {
            assert!(parse(t).is_err(), "{t:?}");
        }
        let deep = "a {".repeat(40) + &"}".repeat(40);
        assert!(parse(&deep).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(t in "[a-z0-9 ={}\\[\\],\"#\n-]{0,200}") {
            if let Ok(top) = parse(&t) {
                let _ = volumes(&top, "x", 1 << 30);
            }
        }

        #[test]
        fn mutated_metadata_never_panics(i in 0usize..META.len(), c in any::<u8>()) {
            let mut b = META.as_bytes().to_vec();
            b[i] = c;
            let t = String::from_utf8_lossy(&b);
            if let Ok(top) = parse(&t) {
                let _ = volumes(&top, &"A".repeat(32), 1 << 30);
            }
        }

        #[test]
        fn arbitrary_pv_never_panics(img in proptest::collection::vec(any::<u8>(), 0..8192), s in 0usize..4) {
            let mut img = img;
            if img.len() >= (s + 1) * 512 {
                img[s * 512..s * 512 + 8].copy_from_slice(b"LABELONE");
            }
            let len = img.len() as u64;
            let _ = read_pv(&mut std::io::Cursor::new(img), 0, len);
        }
    }
}
