//! The temporaries of a restore: every disk is written under a temporary name beside its
//! destination, recorded on the host as one `KIND\tTEMP\tDEST` line (the record
//! `virtkeep cleanup` reads back through the restore's `stage` module).
//!
//! This module imports nothing of the restore but its lexical rules (`guard`).

use serde::Deserialize;
use serde::de::IntoDeserializer;

use super::guard::NAME_MAX;

/// Marks a temporary of a restore: `.{file}{MARKER}{job}` for files,
/// `{name}{MARKER}{job}` for LVs and RBD images.
pub const TEMP_MARKER: &str = ".vkrestore-";

/// The backend of a temporary, as the host's record names it (`file`, `lv`, `rbd`:
/// the on-host strings restores have always written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    /// `temp`/`dest` are `VG/NAME`.
    Lv,
    /// `temp`/`dest` are `POOL/IMAGE`.
    Rbd,
}

impl Kind {
    /// The record's string (the serde names, read back by [`Kind::parse`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Lv => "lv",
            Kind::Rbd => "rbd",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::deserialize(IntoDeserializer::<serde::de::value::Error>::into_deserializer(s)).ok()
    }
}

/// One disk written under a temporary name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub kind: Kind,
    pub temp: String,
    pub dest: String,
}

impl Staged {
    /// The record's line (see [`parse_record`]).
    pub fn line(&self) -> String {
        format!("{}\t{}\t{}\n", self.kind.as_str(), self.temp, self.dest)
    }
}

/// The temporaries of a host's record; only names of ours are kept (only they are ever
/// removed or renamed).
pub fn parse_record(text: &str) -> Vec<Staged> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (kind, temp, dest) = (Kind::parse(f.next()?)?, f.next()?, f.next()?);
            temp.contains(TEMP_MARKER).then(|| Staged {
                kind,
                temp: temp.to_string(),
                dest: dest.to_string(),
            })
        })
        .collect()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The temporary file beside `dest` (hidden, within `NAME_MAX`).
pub fn temp_file(dest: &str, job: &str) -> String {
    let (dir, file) = dest.rsplit_once('/').unwrap_or(("", dest));
    let room = NAME_MAX - 1 - TEMP_MARKER.len() - job.len();
    format!("{dir}/.{}{TEMP_MARKER}{job}", truncate(file, room))
}

/// The temporary LV or RBD image name for `name`, within `max` bytes.
pub fn temp_name(name: &str, job: &str, max: usize) -> String {
    let room = max.saturating_sub(TEMP_MARKER.len() + job.len());
    format!("{}{TEMP_MARKER}{job}", truncate(name, room))
}

/// `VG/NAME` or `POOL/IMAGE` of a record.
pub fn split(spec: &str) -> (&str, &str) {
    spec.split_once('/').unwrap_or(("", spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(
            temp_file("/img/vm.qcow2", "ab12cd34"),
            "/img/.vm.qcow2.vkrestore-ab12cd34"
        );
        let long = format!("/img/{}", "é".repeat(127));
        let t = temp_file(&long, "ab12cd34");
        assert!(t.rsplit('/').next().expect("file").len() <= 255, "{t}");
        assert_eq!(
            temp_name("vm-vda", "ab12cd34", 127),
            "vm-vda.vkrestore-ab12cd34"
        );
        assert!(temp_name(&"x".repeat(200), "ab12cd34", 127).len() <= 127);
    }

    #[test]
    fn records_keep_only_our_temporaries() {
        let text = "file\t/img/.a.vkrestore-1\t/img/a\nfile\t/etc/passwd\t/x\nlv\tvg/b.vkrestore-1\tvg/b\nbogus\n";
        let s = parse_record(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].kind, Kind::Lv);
        assert_eq!(parse_record(&s[1].line()), vec![s[1].clone()]);
        for k in [Kind::File, Kind::Lv, Kind::Rbd] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("lvm"), None);
    }
}
