//! Parsers for the output of the commands built in [`crate::cmd`].

use std::fmt;

use serde::Deserialize;

use crate::error::{ParseError, XmlError};
use crate::xml::Doc;

fn unexpected(what: &'static str, detail: impl Into<String>) -> ParseError {
    ParseError::Unexpected {
        what,
        detail: detail.into(),
    }
}

fn json<'a, T: Deserialize<'a>>(what: &'static str, text: &'a str) -> Result<T, ParseError> {
    serde_json::from_str(text).map_err(|source| ParseError::Json { what, source })
}

// ───────────────────────────── virsh ─────────────────────────────

/// Names from `virsh list --all --name` (also `checkpoint-list --name`,
/// `snapshot-list --name`, `pool-list --name`): one per line, blank lines dropped.
/// Names are kept exactly (no trimming of inner or edge spaces); a trailing `\r` is
/// removed.
pub fn parse_virsh_list_names(stdout: &str) -> Vec<String> {
    stdout
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// State from `virsh domstate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// `running`.
    Running,
    /// `paused`.
    Paused,
    /// `shut off`.
    ShutOff,
    /// `in shutdown`.
    InShutdown,
    /// `crashed`.
    Crashed,
    /// `pmsuspended`.
    PmSuspended,
    /// `idle` (Xen).
    Idle,
    /// Anything else, as printed.
    Other(String),
}

impl DomainState {
    /// The domain has a QEMU (or Xen) process: live snapshot methods apply.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            DomainState::Running
                | DomainState::Paused
                | DomainState::InShutdown
                | DomainState::PmSuspended
                | DomainState::Idle
        )
    }
}

/// Parse `virsh domstate` output (first non-empty line).
pub fn parse_domstate(stdout: &str) -> Result<DomainState, ParseError> {
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| unexpected("virsh domstate", "empty output"))?;
    Ok(match line {
        "running" => DomainState::Running,
        "paused" => DomainState::Paused,
        "shut off" => DomainState::ShutOff,
        "in shutdown" => DomainState::InShutdown,
        "crashed" => DomainState::Crashed,
        "pmsuspended" => DomainState::PmSuspended,
        "idle" => DomainState::Idle,
        other => DomainState::Other(other.to_owned()),
    })
}

/// A `major.minor.micro` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl Version {
    /// A version.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Version {
        Version {
            major,
            minor,
            micro,
        }
    }

    /// Parse `9.0.0`, `7.2`, `10.0.2` (trailing non-digits in a part are ignored,
    /// e.g. `7.2.0-rc1`).
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.trim().split('.').map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = it.next()??;
        let minor = it.next().flatten().unwrap_or(0);
        let micro = it.next().flatten().unwrap_or(0);
        Some(Version::new(major, minor, micro))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `virsh version --daemon` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirshVersion {
    /// `Compiled against library: libvirt X`.
    pub compiled_library: Option<Version>,
    /// `Using library: libvirt X` (the client side).
    pub library: Option<Version>,
    /// `Using API: QEMU X`: driver name and version.
    pub api: Option<(String, Version)>,
    /// `Running hypervisor: QEMU X` (absent on some drivers).
    pub hypervisor: Option<(String, Version)>,
    /// `Running against daemon: X`.
    pub daemon: Option<Version>,
}

/// Parse `virsh version [--daemon]`.
pub fn parse_virsh_version(stdout: &str) -> Result<VirshVersion, ParseError> {
    let mut v = VirshVersion::default();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let named = || {
            let (name, ver) = value.rsplit_once(' ')?;
            Some((name.trim().to_owned(), Version::parse(ver)?))
        };
        let last = || value.rsplit(' ').next().and_then(Version::parse);
        match key.trim() {
            "Compiled against library" => v.compiled_library = last(),
            "Using library" => v.library = last(),
            "Using API" => v.api = named(),
            "Running hypervisor" => v.hypervisor = named(),
            "Running against daemon" => v.daemon = last(),
            _ => {}
        }
    }
    if v.library.is_none() && v.daemon.is_none() {
        return Err(unexpected(
            "virsh version",
            format!("no library version in {:?}", truncate(stdout)),
        ));
    }
    Ok(v)
}

/// Whether `virsh domcapabilities` reports the backup/checkpoint API
/// (`<features><backup supported='yes'/>`, libvirt ≥ 6.0 with a QEMU that has
/// incremental backup). An absent element means no.
pub fn parse_domcapabilities_backup_supported(xml: &str) -> Result<bool, ParseError> {
    let what = "virsh domcapabilities";
    let doc = Doc::parse(xml).map_err(|source| ParseError::Xml { what, source })?;
    if doc.root().name != "domainCapabilities" {
        return Err(ParseError::Xml {
            what,
            source: XmlError::NotADomain {
                found: doc.root().name.clone(),
            },
        });
    }
    Ok(doc
        .child(0, "features")
        .and_then(|f| doc.child(f, "backup"))
        .is_some_and(|b| doc.elem(b).attr("supported") == Some("yes")))
}

// ───────────────────────────── qemu-img ─────────────────────────────

/// A persistent dirty bitmap of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmap {
    /// Bitmap name (libvirt names it after the checkpoint).
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// `auto`, `in-use`, `inconsistent`.
    #[serde(default)]
    pub flags: Vec<String>,
}

impl DirtyBitmap {
    /// `inconsistent` or left `in-use` without a running QEMU: unusable.
    pub fn is_inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "inconsistent")
    }
}

/// `qemu-img info --output=json` for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `qcow2`, `raw`, …
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Allocated bytes on the host (absent for some protocols).
    pub actual_size: Option<u64>,
    /// Backing file as written in the image.
    pub backing_filename: Option<String>,
    /// Backing file resolved to a full path.
    pub full_backing_filename: Option<String>,
    /// Format of the backing file, when recorded.
    pub backing_format: Option<String>,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 persistent dirty bitmaps.
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

#[derive(Deserialize)]
struct RawImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
    #[serde(rename = "cluster-size")]
    cluster_size: Option<u64>,
    #[serde(rename = "format-specific")]
    format_specific: Option<RawFormatSpecific>,
}

#[derive(Deserialize)]
struct RawFormatSpecific {
    #[serde(default)]
    data: Option<RawFormatData>,
}

#[derive(Deserialize)]
struct RawFormatData {
    #[serde(default)]
    bitmaps: Vec<DirtyBitmap>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrChain {
    One(RawImageInfo),
    Chain(Vec<RawImageInfo>),
}

/// Parse `qemu-img info --output=json` (with `--backing-chain` the first, top image
/// is returned).
pub fn parse_qemu_img_info(json_text: &str) -> Result<ImageInfo, ParseError> {
    let what = "qemu-img info";
    let raw = match json::<OneOrChain>(what, json_text)? {
        OneOrChain::One(r) => r,
        OneOrChain::Chain(v) => v
            .into_iter()
            .next()
            .ok_or_else(|| unexpected(what, "empty backing chain"))?,
    };
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_filename: raw.backing_filename,
        full_backing_filename: raw.full_backing_filename,
        backing_format: raw.backing_format,
        cluster_size: raw.cluster_size,
        dirty_bitmaps: raw
            .format_specific
            .and_then(|f| f.data)
            .map(|d| d.bitmaps)
            .unwrap_or_default(),
    })
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Backing-chain depth the data comes from.
    #[serde(default)]
    pub depth: u64,
    /// Reads as zeros.
    pub zero: bool,
    /// Has data (as opposed to a hole).
    pub data: bool,
    /// Host offset, for raw-ish layouts.
    #[serde(default)]
    pub offset: Option<u64>,
}

/// Parse `qemu-img map --output=json`.
pub fn parse_qemu_img_map(json_text: &str) -> Result<Vec<MapExtent>, ParseError> {
    json("qemu-img map", json_text)
}

// ───────────────────────────── LVM ─────────────────────────────

/// One LV from [`crate::cmd::lvs_json`].
#[derive(Debug, Clone, PartialEq)]
pub struct LvInfo {
    /// LV name.
    pub name: String,
    /// VG name.
    pub vg: String,
    /// Size in bytes.
    pub size: u64,
    /// `lv_attr`, e.g. `-wi-ao----`.
    pub attr: String,
    /// Thin pool, for thin LVs.
    pub pool_lv: Option<String>,
    /// Origin, for snapshots.
    pub origin: Option<String>,
    /// Data use in percent (snapshots, thin pools and thin LVs).
    pub data_percent: Option<f64>,
    /// `/dev/VG/LV` (empty for hidden LVs).
    pub path: Option<String>,
    /// LV tags (`lvchange --addtag`).
    pub tags: Vec<String>,
}

impl LvInfo {
    fn attr_at(&self, i: usize) -> Option<char> {
        self.attr.chars().nth(i)
    }
    /// A (classic or thin) snapshot: attr[0] is `s`/`S`, or a thin LV with an origin.
    pub fn is_snapshot(&self) -> bool {
        matches!(self.attr_at(0), Some('s' | 'S')) || (self.is_thin() && self.origin.is_some())
    }
    /// A thin volume (attr[0] `V`).
    pub fn is_thin(&self) -> bool {
        self.attr_at(0) == Some('V')
    }
    /// A thin pool (attr[0] `t`).
    pub fn is_thin_pool(&self) -> bool {
        self.attr_at(0) == Some('t')
    }
    /// Active (attr[4] `a`).
    pub fn is_active(&self) -> bool {
        self.attr_at(4) == Some('a')
    }
    /// Open by someone, e.g. a running VM (attr[5] `o`).
    pub fn is_open(&self) -> bool {
        self.attr_at(5) == Some('o')
    }
    /// An invalid (overflowed) snapshot (attr[4] `I`).
    pub fn is_invalid_snapshot(&self) -> bool {
        self.attr_at(4) == Some('I')
    }
}

/// One VG from [`crate::cmd::vgs_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgInfo {
    /// VG name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Free bytes.
    pub free: u64,
    /// Extent size in bytes.
    pub extent_size: u64,
}

#[derive(Deserialize)]
struct LvmReport<T> {
    report: Vec<LvmReportPart<T>>,
}

#[derive(Deserialize)]
struct LvmReportPart<T> {
    #[serde(default = "Vec::new", alias = "lv", alias = "vg")]
    rows: Vec<T>,
}

#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    lv_size: String,
    #[serde(default)]
    lv_attr: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    lv_path: String,
    #[serde(default)]
    lv_tags: String,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
    vg_extent_size: String,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn bytes(what: &'static str, field: &str, s: &str) -> Result<u64, ParseError> {
    // `--units b --nosuffix` prints plain integers; tolerate a trailing "B".
    let t = s.trim().trim_end_matches(['B', 'b']);
    t.parse::<u64>()
        .map_err(|_| unexpected(what, format!("{field} is not a byte count: {s:?}")))
}

/// Parse `lvs --reportformat json --units b --nosuffix -o …` (lvm2's
/// `{"report":[{"lv":[{…}]}]}`).
pub fn parse_lvs_json(json_text: &str) -> Result<Vec<LvInfo>, ParseError> {
    let what = "lvs";
    let rep: LvmReport<RawLv> = json(what, json_text)?;
    let mut out = Vec::new();
    for part in rep.report {
        for r in part.rows {
            let data_percent = match r.data_percent.trim() {
                "" => None,
                p => Some(p.parse::<f64>().map_err(|_| {
                    unexpected(what, format!("data_percent is not a number: {p:?}"))
                })?),
            };
            out.push(LvInfo {
                size: bytes(what, "lv_size", &r.lv_size)?,
                name: r.lv_name,
                vg: r.vg_name,
                attr: r.lv_attr,
                pool_lv: non_empty(r.pool_lv),
                origin: non_empty(r.origin),
                data_percent,
                path: non_empty(r.lv_path),
                tags: r
                    .lv_tags
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Parse `vgs --reportformat json --units b --nosuffix -o …`.
pub fn parse_vgs_json(json_text: &str) -> Result<Vec<VgInfo>, ParseError> {
    let what = "vgs";
    let rep: LvmReport<RawVg> = json(what, json_text)?;
    let mut out = Vec::new();
    for part in rep.report {
        for r in part.rows {
            out.push(VgInfo {
                size: bytes(what, "vg_size", &r.vg_size)?,
                free: bytes(what, "vg_free", &r.vg_free)?,
                extent_size: bytes(what, "vg_extent_size", &r.vg_extent_size)?,
                name: r.vg_name,
            });
        }
    }
    Ok(out)
}

// ───────────────────────────── rbd ─────────────────────────────

/// The parent of a cloned RBD image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdParent {
    /// Pool.
    pub pool: String,
    /// Image.
    pub image: String,
    /// Snapshot.
    pub snapshot: String,
}

/// `rbd info --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdImageInfo {
    /// Image name.
    pub name: String,
    /// Image id (format 2).
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    #[serde(default)]
    pub object_size: u64,
    /// log2 of the object size.
    #[serde(default)]
    pub order: u32,
    /// Image format (1 or 2).
    #[serde(default)]
    pub format: u32,
    /// Features, e.g. `layering`, `exclusive-lock`, `object-map`, `fast-diff`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Number of snapshots.
    #[serde(default)]
    pub snapshot_count: u64,
    /// Parent, for a clone.
    #[serde(default)]
    pub parent: Option<RbdParent>,
}

impl RbdImageInfo {
    /// `fast-diff` is enabled: `export-diff` needs no full scan.
    pub fn has_fast_diff(&self) -> bool {
        self.features.iter().any(|f| f == "fast-diff")
    }
}

/// Parse `rbd info --format json`.
pub fn parse_rbd_info_json(json_text: &str) -> Result<RbdImageInfo, ParseError> {
    json("rbd info", json_text)
}

/// One snapshot from `rbd snap ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSnap {
    /// Snapshot id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Image size at the snapshot, bytes.
    pub size: u64,
    /// Protected (for cloning).
    pub protected: bool,
    /// Creation time as printed by rbd.
    pub timestamp: Option<String>,
}

#[derive(Deserialize)]
struct RawRbdSnap {
    id: u64,
    name: String,
    size: u64,
    #[serde(default)]
    protected: Option<serde_json::Value>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// Parse `rbd snap ls --format json` (`protected` is the string `"true"`/`"false"`).
pub fn parse_rbd_snap_ls_json(json_text: &str) -> Result<Vec<RbdSnap>, ParseError> {
    let raw: Vec<RawRbdSnap> = json("rbd snap ls", json_text)?;
    Ok(raw
        .into_iter()
        .map(|r| RbdSnap {
            id: r.id,
            name: r.name,
            size: r.size,
            protected: match r.protected {
                Some(serde_json::Value::Bool(b)) => b,
                Some(serde_json::Value::String(s)) => s == "true",
                _ => false,
            },
            timestamp: r.timestamp,
        })
        .collect())
}

// ───────────────────────────── files ─────────────────────────────

/// Parse `df -B1 --output=avail PATH`: the free byte count.
pub fn parse_df_avail(stdout: &str) -> Result<u64, ParseError> {
    let what = "df";
    let line = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .nth(1)
        .ok_or_else(|| unexpected(what, format!("no value in {:?}", truncate(stdout))))?;
    line.parse::<u64>()
        .map_err(|_| unexpected(what, format!("not a byte count: {line:?}")))
}

/// `stat` output in [`crate::cmd::STAT_FORMAT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatInfo {
    /// Size in bytes (0 for block devices: use `blockdev --getsize64`).
    pub size: u64,
    /// Owner name.
    pub user: String,
    /// Group name.
    pub group: String,
    /// Permission bits.
    pub mode: u32,
    /// `regular file`, `block special file`, `directory`, …
    pub file_type: String,
}

/// Parse the output of [`crate::cmd::stat`].
pub fn parse_stat(stdout: &str) -> Result<StatInfo, ParseError> {
    let what = "stat";
    let line = stdout.lines().next().unwrap_or("");
    let f: Vec<&str> = line.split('\t').collect();
    let [size, user, group, mode, file_type] = f.as_slice() else {
        return Err(unexpected(what, format!("expected 5 fields in {line:?}")));
    };
    Ok(StatInfo {
        size: size
            .parse()
            .map_err(|_| unexpected(what, format!("bad size {size:?}")))?,
        user: (*user).to_owned(),
        group: (*group).to_owned(),
        mode: u32::from_str_radix(mode, 8)
            .map_err(|_| unexpected(what, format!("bad mode {mode:?}")))?,
        file_type: (*file_type).to_owned(),
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}
