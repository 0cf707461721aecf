//! The names of virtkeep's qcow2 overlays and the host's record of the overlays kept
//! under running VMs (`/run/virtkeep/kept/UUID`). Shared by the file and kept-overlay
//! strategies and by healing, which is why it imports neither.

use virtkeep_libvirt::coreutils;

use crate::error::Result;
use crate::host::{HOST_STATE_DIR, Host, OVERLAY_MARKER};

/// The base image an overlay path of ours belongs to, when the path is one of ours.
pub fn overlay_base(path: &str) -> Option<&str> {
    let idx = path.rfind(OVERLAY_MARKER)?;
    let tail = &path[idx + OVERLAY_MARKER.len()..];
    if tail.is_empty() || tail.contains('/') {
        return None;
    }
    Some(&path[..idx])
}

/// The VM's own image under a (kept) overlay path.
pub fn base_of(path: &str) -> &str {
    overlay_base(path).unwrap_or(path)
}

/// The overlay job `job_id` puts on `base`.
pub fn overlay_path(base: &str, job_id: &str) -> String {
    format!("{base}{OVERLAY_MARKER}{job_id}")
}

fn kept_path(uuid: &str) -> String {
    format!("{HOST_STATE_DIR}/kept/{uuid}")
}

/// The (target, overlay) pairs kept for this VM.
pub async fn read_kept(host: &Host, uuid: &str) -> Result<Vec<(String, String)>> {
    let out = host.exec(&coreutils::cat(&kept_path(uuid))).await?;
    if out.status != 0 {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect())
}

pub async fn write_kept(host: &Host, uuid: &str, entries: &[(String, String)]) -> Result<()> {
    host.run(&coreutils::mkdir_p_mode(
        &format!("{HOST_STATE_DIR}/kept"),
        0o700,
    ))
    .await?;
    let text: String = entries.iter().map(|(t, p)| format!("{t}\t{p}\n")).collect();
    host.upload(&kept_path(uuid), text.as_bytes()).await
}

pub async fn clear_kept(host: &Host, uuid: &str) -> Result<()> {
    host.run(&coreutils::rm_f(&kept_path(uuid))).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_are_recognised() {
        assert_eq!(
            overlay_base("/img/a.qcow2.virtkeep-20260101T000000Z-ab12"),
            Some("/img/a.qcow2")
        );
        assert_eq!(overlay_base("/img/a.qcow2"), None);
        assert_eq!(overlay_base("/img/a.qcow2.virtkeep-"), None);
        assert_eq!(overlay_base("/img.virtkeep-x/a.qcow2"), None);
        assert_eq!(
            overlay_path(base_of("/img/a.qcow2.virtkeep-1"), "2"),
            "/img/a.qcow2.virtkeep-2"
        );
    }
}
