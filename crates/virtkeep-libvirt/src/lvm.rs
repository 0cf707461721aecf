//! LVM: builders for `lvs`/`vgs`/`lvcreate`/`lvremove`/`lvrename`/`lvchange`, the
//! `thin_delta` script, and the parsers and checks of what they print.
//!
//! Every LVM command runs with `LC_ALL=C` (stable messages) and
//! `LVM_SUPPRESS_FD_WARNINGS=1` (sshd's inherited descriptors make LVM print
//! warnings). Names go after `--` or attached to their option (`--name=X`), so a name
//! that starts with `-` is never read as an option. Reporting uses `--reportformat
//! json`, which needs LVM ≥ [`MIN_LVM_VERSION`].

use serde::Deserialize;
use virtkeep_ssh::RemoteCommand;

use crate::error::ParseError;
use crate::support::{json, unexpected};

/// The LV tag of a thin snapshot kept as the base of the next incremental.
pub const BASE_TAG: &str = "virtkeep_base";

fn lvm(program: &str) -> RemoteCommand {
    RemoteCommand::new(program)
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
}

/// Fields requested by [`lvs_json`].
pub const LVS_FIELDS: &str =
    "lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags,lv_uuid";
/// Fields requested by [`vgs_json`].
pub const VGS_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size";

/// `lvs --reportformat json --units b --nosuffix -o FIELDS [-- VG]` (see
/// [`parse_lvs_json`]).
pub fn lvs_json(vg: Option<&str>) -> RemoteCommand {
    let c = lvm("lvs")
        .args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o"])
        .arg(LVS_FIELDS);
    match vg {
        Some(v) => c.args(["--", v]),
        None => c,
    }
}

/// `vgs --reportformat json --units b --nosuffix -o FIELDS` (see [`parse_vgs_json`]).
pub fn vgs_json() -> RemoteCommand {
    lvm("vgs")
        .args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o"])
        .arg(VGS_FIELDS)
}

/// `lvm version` (see [`parse_lvm_version`]).
pub fn version() -> RemoteCommand {
    lvm("lvm").arg("version")
}

/// Snapshot of `VG/LV` named `snap`. `cow_size = Some(bytes)`: classic snapshot with
/// that much copy-on-write space (`-L {bytes}b`); `None`: thin snapshot, activated
/// (`-kn`, thin snapshots skip activation by default).
pub fn lvcreate_snapshot(vg: &str, lv: &str, snap: &str, cow_size: Option<u64>) -> RemoteCommand {
    let c = lvm("lvcreate").arg("-s").arg(format!("--name={snap}"));
    let c = match cow_size {
        Some(b) => c.arg(format!("--size={b}b")),
        None => c.arg("-kn"),
    };
    c.args(["--", &format!("{vg}/{lv}")])
}

/// `lvremove -f -- VG/LV`.
pub fn lvremove(vg: &str, lv: &str) -> RemoteCommand {
    lvm("lvremove").args(["-f", "--", &format!("{vg}/{lv}")])
}

/// `lvcreate --yes -Wy -Zy --name=NAME --size={bytes}b -- VG`: a new (thick) LV. Only
/// its first KiB is zeroed: a sparse restore into it must write zeros for the holes too.
pub fn lvcreate(vg: &str, name: &str, size: u64) -> RemoteCommand {
    lvm("lvcreate")
        .args(["--yes", "-Wy", "-Zy"])
        .arg(format!("--name={name}"))
        .arg(format!("--size={size}b"))
        .args(["--", vg])
}

/// `lvcreate --yes --name=NAME --virtualsize={bytes}b --thinpool=POOL -- VG`: a new
/// thin LV (reads zeros where nothing was written).
pub fn lvcreate_thin(vg: &str, name: &str, size: u64, pool: &str) -> RemoteCommand {
    lvm("lvcreate")
        .arg("--yes")
        .arg(format!("--name={name}"))
        .arg(format!("--virtualsize={size}b"))
        .arg(format!("--thinpool={pool}"))
        .args(["--", vg])
}

/// `lvrename -- VG OLD NEW`.
pub fn lvrename(vg: &str, old: &str, new: &str) -> RemoteCommand {
    lvm("lvrename").args(["--", vg, old, new])
}

/// `lvchange --addtag|--deltag virtkeep_base -- VG/LV`: marks (or unmarks) a thin
/// snapshot as the kept base of the next incremental ([`BASE_TAG`]).
pub fn set_base_tag(vg: &str, lv: &str, on: bool) -> RemoteCommand {
    lvm("lvchange")
        .arg(if on { "--addtag" } else { "--deltag" })
        .arg(BASE_TAG)
        .args(["--", &format!("{vg}/{lv}")])
}

/// Succeeds when `thin_delta` (thin-provisioning-tools) is installed.
pub fn has_thin_delta() -> RemoteCommand {
    RemoteCommand::raw_trusted(
        "command -v thin_delta >/dev/null 2>&1 || test -x /usr/sbin/thin_delta",
    )
}

/// `thin_delta` between two thin LVs `a` and `b` of `vg/pool`, through a metadata
/// snapshot of the live pool (released again, also when thin_delta fails); prints its
/// XML (see [`parse_thin_delta`]). A pool has one metadata snapshot: one holder at a
/// time, by a host-side lock per pool (`flock`, released by the kernel when a killed
/// holder's shell dies), so two incrementals on one pool never release each other's.
pub fn thin_delta(vg: &str, pool: &str, a: &str, b: &str) -> RemoteCommand {
    const SCRIPT: &str = r#"set -e
vg=$1 pool=$2 a=$3 b=$4
ida=$(lvs --noheadings -o thin_id "$vg/$a" | tr -d ' ')
idb=$(lvs --noheadings -o thin_id "$vg/$b" | tr -d ' ')
dm=$(printf %s "$vg" | sed 's/-/--/g')-$(printf %s "$pool" | sed 's/-/--/g')
mkdir -p -m 0700 /run/virtkeep/locks
exec 9>"/run/virtkeep/locks/thin-metadata-$dm"
flock -w 240 9 || { echo "another job kept the metadata snapshot of pool $vg/$pool for 240 s" >&2; exit 1; }
# holding the lock: a reserved snapshot now can only be a killed holder's
dmsetup message "$dm-tpool" 0 release_metadata_snap 2>/dev/null || true
dmsetup message "$dm-tpool" 0 reserve_metadata_snap
trap 'dmsetup message "$dm-tpool" 0 release_metadata_snap' EXIT
thin_delta -m --snap1 "$ida" --snap2 "$idb" "/dev/mapper/${dm}_tmeta""#;
    crate::sh::script(SCRIPT, [vg, pool, a, b])
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
}

// ───────────────────────────── output ─────────────────────────────

/// One LV from [`lvs_json`].
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
    /// The LV's UUID (random, given by `lvcreate`): which LV this is, not only its name.
    pub uuid: Option<String>,
}

impl LvInfo {
    fn attr_at(&self, i: usize) -> Option<char> {
        self.attr.chars().nth(i)
    }
    /// A (classic or thin) snapshot: `attr[0]` is `s`/`S`, or a thin LV with an origin.
    pub fn is_snapshot(&self) -> bool {
        matches!(self.attr_at(0), Some('s' | 'S')) || (self.is_thin() && self.origin.is_some())
    }
    /// A thin volume (`attr[0]` is `V`).
    pub fn is_thin(&self) -> bool {
        self.attr_at(0) == Some('V')
    }
    /// A thin pool (`attr[0]` is `t`).
    pub fn is_thin_pool(&self) -> bool {
        self.attr_at(0) == Some('t')
    }
    /// Active (`attr[4]` is `a`).
    pub fn is_active(&self) -> bool {
        self.attr_at(4) == Some('a')
    }
    /// Open by someone, e.g. a running VM (`attr[5]` is `o`).
    pub fn is_open(&self) -> bool {
        self.attr_at(5) == Some('o')
    }
    /// An invalid (overflowed) snapshot (`attr[4]` is `I`).
    pub fn is_invalid_snapshot(&self) -> bool {
        self.attr_at(4) == Some('I')
    }
}

/// One VG from [`vgs_json`].
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
    #[serde(default)]
    lv_uuid: String,
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
                uuid: non_empty(r.lv_uuid),
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

// ───────────────────────────── checks ─────────────────────────────

/// LVM's limit on LV (and VG) names.
pub const LVM_NAME_MAX: usize = 127;

/// Device-mapper's limit on a device name (`DM_NAME_LEN` 128 with the NUL).
pub const DM_NAME_MAX: usize = 127;

/// The oldest LVM with JSON reporting (`--reportformat json`).
pub const MIN_LVM_VERSION: &str = "2.02.158";

/// A valid new LV name: LVM's character set, not `.`/`..`, no leading `-`, none of the
/// names and infixes LVM reserves for itself.
pub fn valid_new_lv_name(name: &str) -> bool {
    const RESERVED_INFIXES: &[&str] = &[
        "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mimage", "_mlog", "_pmspare",
        "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_imeta", "_iorig",
    ];
    !name.is_empty()
        && name.len() <= LVM_NAME_MAX
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && !name.starts_with("snapshot")
        && !name.starts_with("pvmove")
        && name.chars().all(name_char)
        && !RESERVED_INFIXES.iter().any(|r| name.contains(r))
}

/// `2.03.16` from `lvm version` output (`  LVM version:     2.03.16(2) (2022-05-18)`).
pub fn parse_lvm_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("LVM version:"))?;
    let v = line.split(':').nth(1)?.trim();
    let v: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// `a.b.c` is at least [`MIN_LVM_VERSION`].
pub fn lvm_version_has_json(version: &str) -> bool {
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(MIN_LVM_VERSION)
}

/// `Err(reason)` for an LV that is not a usable snapshot.
pub fn snapshot_state(info: &LvInfo) -> std::result::Result<(), String> {
    if info.is_invalid_snapshot() {
        return Err("overflowed (LVM marked it invalid)".into());
    }
    if !info.is_thin() && info.data_percent.is_some_and(|p| p >= 100.0) {
        return Err("is full (copy-on-write space used up)".into());
    }
    if info.attr.chars().nth(8) == Some('F') {
        return Err("failed (its thin pool failed)".into());
    }
    Ok(())
}

/// Changed byte ranges from `thin_delta -m` XML: `different`, `left_only` and
/// `right_only` runs of data blocks (`data_block_size` is in 512-byte sectors).
pub fn parse_thin_delta(xml: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    fn attr(tag: &str, name: &str) -> Option<u64> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let end = tag[at..].find('"')?;
        tag[at..at + end].parse().ok()
    }
    let mut block = None;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<superblock") {
            let sectors = attr(line, "data_block_size")
                .filter(|s| *s > 0)
                .ok_or("no data_block_size in the superblock")?;
            block = Some(sectors * 512);
        } else if ["<different", "<left_only", "<right_only"]
            .iter()
            .any(|t| line.starts_with(t))
        {
            let block = block.ok_or("a range before the superblock")?;
            let (Some(begin), Some(len)) = (attr(line, "begin"), attr(line, "length")) else {
                return Err(format!("a range without begin/length: {line}"));
            };
            let (off, n) = (begin * block, len * block);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += n,
                _ => out.push((off, n)),
            }
        } else if line.starts_with("<same")
            || line.starts_with("<diff")
            || line.starts_with("</")
            || line.is_empty()
        {
        } else {
            return Err(format!("unexpected line: {line}"));
        }
    }
    if block.is_none() {
        return Err("no superblock".into());
    }
    Ok(out)
}

/// A character LVM allows in VG and LV names.
pub fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')
}

/// Length of a name in a device-mapper name (where `-` is written `--`).
pub fn dm_len(s: &str) -> usize {
    s.len() + s.matches('-').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lv_names() {
        assert!(valid_new_lv_name("vm1-disk_0.img+x"));
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a b",
            "snapshot1",
            "pvmove0",
            "x_tmeta",
            "é",
            &"x".repeat(128),
        ] {
            assert!(!valid_new_lv_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn versions() {
        let out = "  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n  Driver version:  4.48.0\n";
        assert_eq!(parse_lvm_version(out).as_deref(), Some("2.03.16"));
        assert_eq!(parse_lvm_version("nothing"), None);
        assert!(lvm_version_has_json("2.03.16"));
        assert!(lvm_version_has_json("2.02.158"));
        assert!(!lvm_version_has_json("2.02.130"));
        assert!(!lvm_version_has_json("2.02.98"));
    }

    #[test]
    fn snapshot_states() {
        let lv = |attr: &str, pct: Option<f64>| LvInfo {
            name: "s".into(),
            vg: "vg0".into(),
            size: 1,
            attr: attr.into(),
            pool_lv: None,
            origin: Some("o".into()),
            data_percent: pct,
            path: None,
            uuid: None,
            tags: Vec::new(),
        };
        assert!(snapshot_state(&lv("swi-a-s---", Some(12.0))).is_ok());
        assert!(snapshot_state(&lv("swi-I-s---", Some(100.0))).is_err());
        assert!(snapshot_state(&lv("swi-a-s---", Some(100.0))).is_err());
        assert!(snapshot_state(&lv("Vwi-a-tz--", Some(100.0))).is_ok());
        assert!(snapshot_state(&lv("Vwi-a-tzF-", None)).is_err());
    }

    #[test]
    fn thin_delta_ranges() {
        let xml = r#"<superblock uuid="" time="12" transaction="45" data_block_size="128" nr_data_blocks="0">
  <diff left="9" right="10">
    <same begin="0" length="16"/>
    <right_only begin="16" length="1"/>
    <different begin="17" length="2"/>
    <left_only begin="80" length="1"/>
  </diff>
</superblock>
"#;
        const B: u64 = 64 * 1024;
        assert_eq!(
            parse_thin_delta(xml),
            Ok(vec![(16 * B, 3 * B), (80 * B, B)])
        );
        assert_eq!(
            parse_thin_delta("<superblock data_block_size=\"128\">\n</superblock>"),
            Ok(vec![])
        );
        assert!(parse_thin_delta("").is_err());
        assert!(parse_thin_delta("<different begin=\"1\" length=\"1\"/>").is_err());
        assert!(parse_thin_delta("<superblock data_block_size=\"0\">").is_err());
        assert!(parse_thin_delta("<superblock data_block_size=\"8\">\n<bogus/>").is_err());
    }
}
