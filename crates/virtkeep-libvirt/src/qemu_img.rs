//! `qemu-img`: builders and the parsers of their JSON output.
//!
//! Paths that are not absolute get a `./` prefix ([`safe_path`]): a leading `-` would
//! be an option, `proto:` a protocol.

use serde::Deserialize;
use virtkeep_ssh::RemoteCommand;

use crate::error::ParseError;
use crate::support::{json, safe_path, unexpected};

/// `qemu-img info --output=json [-f FMT] [-U] PATH`. Give the format whenever it is
/// known: probing a raw image lets a guest that wrote a qcow2 header into its disk
/// redirect the read.
pub fn info_json(path: &str, format: Option<&str>, force_share: bool) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["info", "--output=json"]);
    if let Some(f) = format {
        c = c.arg("-f").arg(f);
    }
    if force_share {
        c = c.arg("-U");
    }
    c.arg(safe_path(path))
}

/// `qemu-img create -f qcow2 PATH SIZE` (sparse; `size` in bytes), or with
/// `backing = Some((file, fmt))` an overlay `-b FILE -F FMT` of the given size.
pub fn create_qcow2(path: &str, size: u64, backing: Option<(&str, &str)>) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["create", "-q", "-f", "qcow2"]);
    if let Some((file, fmt)) = backing {
        c = c.arg("-b").arg(safe_path(file)).arg("-F").arg(fmt);
    }
    c.arg(safe_path(path)).arg(size.to_string())
}

/// `qemu-img create -q -f qcow2 -b BACKING -F FMT PATH`: an overlay as large as its
/// backing file (the stopped-VM snapshot).
pub fn create_overlay(path: &str, backing: &str, backing_format: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(safe_path(backing))
        .arg("-F")
        .arg(backing_format)
        .arg(safe_path(path))
}

/// `qemu-img create -q -f qcow2 -u -b nbd+unix:///EXPORT?socket=SOCKET -F raw PATH SIZE`:
/// an overlay over an NBD export, created without opening the export (`-u`). `None`
/// when the export name or socket path would not survive the URI unescaped.
pub fn create_nbd_overlay(
    path: &str,
    size: u64,
    socket: &str,
    export: &str,
) -> Option<RemoteCommand> {
    let plain = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(&c))
    };
    if !plain(export, &[]) || !socket.starts_with('/') || !plain(socket, &['/']) {
        return None;
    }
    let backing = format!("nbd+unix:///{export}?socket={socket}");
    Some(create_new(path, |tmp| {
        [
            "create", "-q", "-f", "qcow2", "-u", "-b", &backing, "-F", "raw", tmp,
        ]
        .map(String::from)
        .into_iter()
        .chain([size.to_string()])
        .collect()
    }))
}

/// The cluster size of the overlays [`create_nbd_overlay`] makes (`qemu-img`'s default).
pub const OVERLAY_CLUSTER: u64 = 64 << 10;
/// Longest range of one `write -z` of [`zero_clusters`]: `qemu-io` refuses more than
/// 2 GiB − 512 bytes in one request.
pub const MAX_ZERO_WRITE: u64 = 1 << 30;
/// Longest total length of the `write -z` commands of one `qemu-io` invocation.
const MAX_ZERO_SCRIPT: usize = 64 << 10;

/// `qemu-io -c 'write -z OFF LEN'… json:{"driver":"qcow2","file":{…PATH},"backing":null}`,
/// as few invocations as the command-line bound allows: marks each `(offset, len)` of the
/// qcow2 (v3) image at `path` as zero clusters, its backing file not opened (an NBD
/// overlay's server need not be up). Ranges longer than [`MAX_ZERO_WRITE`] are split;
/// give them cluster-aligned ([`OVERLAY_CLUSTER`]) and inside the image, or qcow2
/// would have to read the backing file for the rest of a cluster (and fails without it).
pub fn zero_clusters(path: &str, ranges: &[(u64, u64)]) -> Vec<RemoteCommand> {
    let image = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": path},
        "backing": null,
    });
    let image = format!("json:{image}");
    let mut out = Vec::new();
    let mut batch: Vec<String> = Vec::new();
    let mut len = 0;
    let pieces = ranges.iter().flat_map(|&(off, n)| {
        (0..n.div_ceil(MAX_ZERO_WRITE)).map(move |i| {
            let at = i * MAX_ZERO_WRITE;
            (off + at, (n - at).min(MAX_ZERO_WRITE))
        })
    });
    for (off, n) in pieces.filter(|&(_, n)| n > 0) {
        let cmd = format!("write -z {off} {n}");
        if len + cmd.len() > MAX_ZERO_SCRIPT && !batch.is_empty() {
            out.push(zero_invocation(&image, std::mem::take(&mut batch)));
            len = 0;
        }
        len += cmd.len();
        batch.push(cmd);
    }
    if !batch.is_empty() {
        out.push(zero_invocation(&image, batch));
    }
    out
}

fn zero_invocation(image: &str, cmds: Vec<String>) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-io");
    for cmd in cmds {
        c = c.arg("-c").arg(cmd);
    }
    c.arg(image)
}

/// `qemu-img create -q -f FORMAT PATH SIZE` (`raw` sparse) where nothing is at `PATH`:
/// fails, changing nothing, when anything is (see [`create_new`]).
pub fn create_new_image(path: &str, format: &str, size: u64) -> RemoteCommand {
    create_new(path, |tmp| {
        ["create", "-q", "-f", format, tmp]
            .map(String::from)
            .into_iter()
            .chain([size.to_string()])
            .collect()
    })
}

/// `qemu-img ARGS…` creating a new image at `path`, exclusively: the image is made at a
/// fresh random name in its directory (`.vknew-<16 hex>`), then hard-linked to `path` (`ln -T`: link(2) fails when
/// anything is at `path`, a dangling symlink included, and never follows one), and the
/// random name is removed. A file that appeared at `path` after the caller looked is
/// therefore never written over. `args` gets the temporary path. Only a kill during
/// `qemu-img` itself can leave a `.vknew-*` file behind (no cleanup sweeps them: such a
/// file is never referred to and may be removed by hand).
fn create_new(path: &str, args: impl FnOnce(&str) -> Vec<String>) -> RemoteCommand {
    const SCRIPT: &str =
        r#"t=$1; p=$2; shift 2; qemu-img "$@" && ln -T -- "$t" "$p"; r=$?; rm -f -- "$t"; exit $r"#;
    let path = safe_path(path);
    // A hidden name in the same directory (same filesystem, so `ln -T` links it) whose
    // length does not depend on the destination's: a file name near NAME_MAX still
    // gets a temporary.
    let dir = path.rsplit_once('/').map_or(".", |(d, _)| d);
    let tmp = format!("{dir}/.vknew-{:016x}", rand::random::<u64>());
    let words = args(&tmp);
    crate::sh::script(
        SCRIPT,
        [tmp.as_str(), path.as_str()]
            .into_iter()
            .chain(words.iter().map(String::as_str)),
    )
}

/// `qemu-img create -q -f raw PATH SIZE` (a sparse file).
pub fn create_raw(path: &str, size: u64) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(safe_path(path))
        .arg(size.to_string())
}

/// `qemu-img map --output=json [-f FMT] [-U] PATH`.
pub fn map_json(path: &str, format: Option<&str>, force_share: bool) -> RemoteCommand {
    let mut c = RemoteCommand::new("qemu-img").args(["map", "--output=json"]);
    if let Some(f) = format {
        c = c.arg("-f").arg(f);
    }
    if force_share {
        c = c.arg("-U");
    }
    c.arg(safe_path(path))
}

/// `qemu-img commit -q -f qcow2 OVERLAY` (merge a stopped VM's overlay into its base).
pub fn commit(overlay: &str) -> RemoteCommand {
    RemoteCommand::new("qemu-img")
        .args(["commit", "-q", "-f", "qcow2"])
        .arg(safe_path(overlay))
}

// ───────────────────────────── output ─────────────────────────────

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_clusters_splits_long_ranges_and_batches_by_length() {
        let cmds = zero_clusters("/d/a b.qcow2", &[(0, 3 * MAX_ZERO_WRITE), (1 << 40, 0)]);
        assert_eq!(cmds.len(), 1);
        let line = cmds[0].to_string();
        assert_eq!(line.matches("write -z").count(), 3, "{line}");
        assert!(line.contains(&format!(
            "write -z {} {}",
            2 * MAX_ZERO_WRITE,
            MAX_ZERO_WRITE
        )));
        assert!(line.contains(r#""backing":null"#), "{line}");
        let many: Vec<(u64, u64)> = (0..10_000).map(|i| (i << 20, 1 << 16)).collect();
        let cmds = zero_clusters("/d/x.qcow2", &many);
        assert!(cmds.len() > 1);
        let total: usize = cmds
            .iter()
            .map(|c| c.to_string().matches("write -z").count())
            .sum();
        assert_eq!(total, 10_000);
        assert!(
            cmds.iter()
                .all(|c| c.to_string().len() < 2 * MAX_ZERO_SCRIPT)
        );
    }
}
