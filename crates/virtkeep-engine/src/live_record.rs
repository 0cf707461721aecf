//! The record a live restore (`live_restore.rs`) keeps in its job directory for a
//! resume after its node died (`live_resume.rs`): written before the domain starts,
//! read back bounded and checked line by line (the host's files are untrusted; the
//! resume then checks it against the repository, a new plan and the domain).

use std::collections::BTreeSet;

use virtkeep_libvirt::coreutils;

use crate::error::{Error, Result};
use crate::host::Host;

/// In the job directory: the job's [`JobRecord`], written before the domain starts.
pub const RESUME_FILE: &str = "resume";
/// The record's first line.
const HEADER: &str = "virtkeep live restore record v1";
/// At most this many bytes of a record are read, lines of at most [`LINE_MAX`]
/// characters and at most [`DISKS_MAX`] disks taken: the host's files are untrusted.
const RECORD_MAX: u64 = 64 * 1024;
const LINE_MAX: usize = 4096;
const DISKS_MAX: usize = 64;

/// The command that resumes `job` on `host`, for messages.
pub fn resume_command(job: &str, host: &str) -> String {
    format!("virtkeep restore --resume {job} --to {host}")
}

/// What a resume needs of a live restore, recorded in its job directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub backup: String,
    /// The repository's id (`Repository::id`).
    pub repository: String,
    /// The new domain.
    pub name: String,
    /// `--storage` as [`crate::restore::Storage::spec`] writes it; empty for each
    /// disk's own place.
    pub storage: String,
    pub disks: Vec<RecordedDisk>,
}

/// One disk of a [`JobRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedDisk {
    pub target: String,
    pub format: String,
    /// The destination as the result reports it.
    pub path: String,
    pub overlay: String,
}

impl JobRecord {
    /// The record's text: a header, then one `key<TAB>value` line each and one
    /// `disk<TAB>target<TAB>format<TAB>path<TAB>overlay` line per disk.
    pub fn text(&self) -> Result<String> {
        let mut out = vec![HEADER.to_string()];
        for (k, v) in [
            ("backup", &self.backup),
            ("repository", &self.repository),
            ("name", &self.name),
            ("storage", &self.storage),
        ] {
            out.push(format!("{k}\t{v}"));
        }
        for d in &self.disks {
            let fields = [&d.target, &d.format, &d.path, &d.overlay];
            out.push(format!("disk\t{}", fields.map(|f| f.as_str()).join("\t")));
        }
        let text = out.join("\n") + "\n";
        match JobRecord::parse(&text) {
            Ok(back) if &back == self => Ok(text),
            _ => Err(Error::domain(
                "a name of this live restore cannot be recorded for a resume (a tab, a control character or a very long path)",
            )),
        }
    }

    /// Writes the record into the job directory `dir`.
    pub async fn write(&self, host: &Host, dir: &str) -> Result<()> {
        let text = self.text()?;
        host.upload(&format!("{dir}/{RESUME_FILE}"), text.as_bytes())
            .await
    }

    /// Reads the record of the job directory `dir` (bounded, every line checked).
    pub async fn read(host: &Host, dir: &str) -> Result<JobRecord> {
        let path = format!("{dir}/{RESUME_FILE}");
        let out = host
            .exec(&coreutils::head_bytes(&path, RECORD_MAX + 1))
            .await?;
        let bad = |why: &str| Error::domain(format!("{path}: {why}; nothing was done"));
        if out.status != 0 {
            return Err(bad("no record to resume from (the job was made by a virtkeep without resume, or killed before its plan)")
                .hint("keep the guest as it is, or destroy and undefine it and remove its disks and the job directory"));
        }
        if out.stdout.len() as u64 > RECORD_MAX {
            return Err(bad("larger than a record"));
        }
        let text = std::str::from_utf8(&out.stdout).map_err(|_| bad("not UTF-8"))?;
        JobRecord::parse(text).map_err(|e| bad(&e))
    }

    /// Parses and checks a record's text: the header, known keys once each, no control
    /// characters, 1 to 64 disks with distinct targets.
    pub fn parse(text: &str) -> std::result::Result<JobRecord, String> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err("not a live restore record of this version".into());
        }
        let mut keys = std::collections::BTreeMap::new();
        let mut disks = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if line.len() > LINE_MAX {
                return Err("a line is too long".into());
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.iter().any(|v| v.chars().any(char::is_control)) {
                return Err("a control character in a line".into());
            }
            match f.as_slice() {
                ["disk", t, fmt, p, o] if [t, fmt, p, o].iter().all(|v| !v.is_empty()) => {
                    disks.push(RecordedDisk {
                        target: t.to_string(),
                        format: fmt.to_string(),
                        path: p.to_string(),
                        overlay: o.to_string(),
                    });
                }
                [k @ ("backup" | "repository" | "name" | "storage"), v] => {
                    if keys.insert(*k, v.to_string()).is_some() {
                        return Err(format!("{k} recorded twice"));
                    }
                }
                _ => {
                    let head: String = line.chars().take(60).collect();
                    return Err(format!(
                        "unexpected line {:?}",
                        head.escape_debug().to_string()
                    ));
                }
            }
        }
        let targets: BTreeSet<&str> = disks.iter().map(|d| d.target.as_str()).collect();
        if disks.is_empty() || disks.len() > DISKS_MAX || targets.len() != disks.len() {
            return Err(format!("{} disks, or one twice", disks.len()));
        }
        let mut get = |k: &str| match keys.remove(k) {
            Some(v) if !v.is_empty() || k == "storage" => Ok(v),
            _ => Err(format!("no {k}")),
        };
        Ok(JobRecord {
            backup: get("backup")?,
            repository: get("repository")?,
            name: get("name")?,
            storage: get("storage")?,
            disks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        JobRecord {
            backup: "b1".into(),
            repository: "r1".into(),
            name: "new".into(),
            storage: String::new(),
            disks: vec![RecordedDisk {
                target: "vda".into(),
                format: "raw".into(),
                path: "/pool/new-vda.img".into(),
                overlay: "/pool/.new-vda.img.vkrestore-live-1".into(),
            }],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let rec = record();
        let text = rec.text().expect("text");
        assert_eq!(JobRecord::parse(&text), Ok(rec));
    }

    #[test]
    fn a_record_that_is_not_one_is_refused() {
        let good = record().text().expect("text");
        let mut two = record();
        two.disks.push(two.disks[0].clone());
        let long = format!("{good}name\t{}\n", "x".repeat(LINE_MAX));
        for bad in [
            String::new(),
            good.replacen(HEADER, "virtkeep live restore record v9", 1),
            good.replace("name\tnew\n", ""),
            good.replace("name\tnew", "name\tne\u{1b}w"),
            good.replace("backup\tb1", "backup\t"),
            format!("{good}name\tother\n"),
            format!("{good}path\t/etc\n"),
            good.replace("\traw\t", "\t\t"),
            format!("{HEADER}\nbackup\tb\nrepository\tr\nname\tn\nstorage\t\n"),
            long,
        ] {
            assert!(JobRecord::parse(&bad).is_err(), "{bad:?}");
        }
        assert!(two.text().is_err());
        let mut tab = record();
        tab.name = "a\tb".into();
        assert!(tab.text().is_err());
    }
}
