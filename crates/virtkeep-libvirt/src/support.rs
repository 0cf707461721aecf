//! What the per-tool modules share: argument hardening, output-parsing helpers, and
//! the one byte formatter of virtkeep.

use serde::Deserialize;

use crate::error::ParseError;

/// Escape a value for a comma-separated option list (virsh `--diskspec`, QEMU
/// `--image-opts`): `,` becomes `,,`.
pub fn escape_commas(value: &str) -> String {
    value.replace(',', ",,")
}

/// A path for tools without `--` (qemu-img, qemu-nbd, blockdev, find): absolute paths
/// as they are, anything else prefixed with `./` so it cannot be read as an option or
/// a `protocol:` name.
pub fn safe_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("./{path}")
    }
}

/// Bytes in binary units for people: `512 B`, `16.0 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn unexpected(what: &'static str, detail: impl Into<String>) -> ParseError {
    ParseError::Unexpected {
        what,
        detail: detail.into(),
    }
}

pub(crate) fn json<'a, T: Deserialize<'a>>(
    what: &'static str,
    text: &'a str,
) -> Result<T, ParseError> {
    serde_json::from_str(text).map_err(|source| ParseError::Json { what, source })
}

pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(24 << 20), "24.0 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(4 << 20), "4.0 MiB");
        assert_eq!(human_bytes(3 << 50), "3072.0 TiB");
    }
}
