//! Our own host-key trust store over OpenSSH `known_hosts` files.
//!
//! Supported: plain and `[host]:port` names, comma-separated patterns with `*`/`?`
//! wildcards and `!` negation, hashed `|1|salt|hash` names, comments and blank lines,
//! several keys per host (of any algorithm), and `@revoked` (always a refusal).
//! `@cert-authority` lines are ignored: host certificates are not accepted.
//! Malformed lines are skipped with a warning, as OpenSSH does.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};
use sha1::Sha1;

use crate::error::SshError;
pub use crate::error::host_pattern;

/// The verdict for one presented host key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyStatus {
    /// The key is pinned for this host.
    Trusted,
    /// Nothing is pinned for this host.
    Unknown,
    /// Keys are pinned for this host, but not this one; `known` lists their
    /// fingerprints (`SHA256:…`).
    Changed { known: Vec<String> },
    /// The key is marked `@revoked`.
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Clone, Debug)]
struct Entry {
    marker: Marker,
    hosts: String,
    key: PublicKey,
}

/// A parsed known_hosts file.
#[derive(Clone, Debug, Default)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
    skipped: Vec<usize>,
}

/// The `SHA256:…` fingerprint of a key, as printed by `ssh-keygen -lf`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `algorithm base64` of a key, without comment.
pub fn openssh_key(key: &PublicKey) -> Result<String, SshError> {
    let full = key
        .to_openssh()
        .map_err(|e| SshError::Protocol(format!("cannot encode public key: {e}")))?;
    Ok(full
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

impl KnownHosts {
    /// Load a known_hosts file. A missing file is an empty trust store (every key is
    /// then `Unknown`); an unreadable one is an error.
    pub fn load(path: impl AsRef<Path>) -> Result<KnownHosts, SshError> {
        let path = path.as_ref();
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(SshError::KnownHosts {
                    path: path.to_owned(),
                    detail: e.to_string(),
                });
            }
        };
        let mut kh = KnownHosts::parse(&text);
        kh.path = path.to_owned();
        for line in &kh.skipped {
            tracing::warn!(path = %path.display(), line, "skipping malformed known_hosts line");
        }
        Ok(kh)
    }

    /// Parse known_hosts text.
    pub fn parse(text: &str) -> KnownHosts {
        let mut kh = KnownHosts::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Some(e) => kh.entries.push(e),
                None => kh.skipped.push(i + 1),
            }
        }
        kh
    }

    /// The file this was loaded from (empty when parsed from text).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 1-based numbers of lines that could not be parsed and were ignored.
    pub fn skipped_lines(&self) -> &[usize] {
        &self.skipped
    }

    /// Check the key `host`:`port` presented.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> HostKeyStatus {
        let name = host_pattern(host, port);
        let mut known = Vec::new();
        let mut trusted = false;
        for e in self.entries.iter().filter(|e| hosts_match(&e.hosts, &name)) {
            let same = e.key.key_data() == key.key_data();
            match e.marker {
                Marker::Revoked if same => return HostKeyStatus::Revoked,
                Marker::Revoked | Marker::CertAuthority => {}
                Marker::None if same => trusted = true,
                Marker::None => known.push(fingerprint(&e.key)),
            }
        }
        if trusted {
            HostKeyStatus::Trusted
        } else if known.is_empty() {
            HostKeyStatus::Unknown
        } else {
            HostKeyStatus::Changed { known }
        }
    }

    /// The (non-revoked) keys pinned for `host`:`port`.
    pub fn keys_for(&self, host: &str, port: u16) -> Vec<&PublicKey> {
        let name = host_pattern(host, port);
        self.entries
            .iter()
            .filter(|e| e.marker == Marker::None && hosts_match(&e.hosts, &name))
            .map(|e| &e.key)
            .collect()
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let algorithm = fields.next()?;
    let data = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{algorithm} {data}")).ok()?;
    Some(Entry {
        marker,
        hosts: first.to_owned(),
        key,
    })
}

/// OpenSSH `match_hostname` semantics over a comma-separated pattern list: a matching
/// negated pattern excludes the host outright, otherwise any positive match counts.
fn hosts_match(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for pat in patterns.split(',') {
        if let Some(neg) = pat.strip_prefix('!') {
            if glob_match(&neg.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
                return false;
            }
        } else if glob_match(&pat.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
            matched = true;
        }
    }
    matched
}

fn hashed_match(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        data_encoding::BASE64.decode(salt.as_bytes()),
        data_encoding::BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// `*` and `?` wildcards.
fn glob_match(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = s.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Pin `key` for `host`:`port` in the known_hosts file at `path`.
///
/// Creates missing parent directories with mode 0700. The file is replaced atomically
/// (existing content plus the new line is written to a temporary file in the same
/// directory with mode 0600, synced, then renamed over the original), so readers never
/// see a partial line. Pinning a key that is already trusted is a no-op.
pub fn pin(path: impl AsRef<Path>, host: &str, port: u16, key: &PublicKey) -> Result<(), SshError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = path.as_ref();
    let kh_err = |detail: String| SshError::KnownHosts {
        path: path.to_owned(),
        detail,
    };
    let existing = KnownHosts::load(path)?;
    if existing.check(host, port, key) == HostKeyStatus::Trusted {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| kh_err(format!("cannot create directory {}: {e}", dir.display())))?;
    let mut content = match fs::read(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(kh_err(e.to_string())),
    };
    if !content.is_empty() && !content.ends_with(b"\n") {
        content.push(b'\n');
    }
    let line = format!("{} {}\n", host_pattern(host, port), openssh_key(key)?);
    content.extend_from_slice(line.as_bytes());

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "known_hosts".to_owned());
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        kh_err(format!("cannot write: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys generated with ssh-keygen for these tests only; fingerprints from `ssh-keygen -lf`.
    const ED1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBHQSbfBUkimtUyGTT3IGGVby8/w0oumNdm4MSDsBiAE";
    const ED1_FP: &str = "SHA256:OcFh11XpuDqRmY4oSiGaNTDw0XjKFpho18b0wG8dIY8";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwGVwSoNbVfGYr4SAPNZU6rzh3998qx4qlZ59E5DO7K";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFZDRBt3BGf0V65IvLCGW0gLfnWwfx1VRqHmcnViAb7CRoX1FMlJa/Ec7aoNAKOVmmwRX2hL0Ao6Sgc7zMlBn3M=";
    const ECDSA_FP: &str = "SHA256:lDhbFdTCi8ZQlCouDlP4HU1UN35C1sOxZ6ARXsJekRw";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQC2toleDWn9QXXaKCY7rUZA7D8lybcxpMYY+CB1yKPKSBvVksEbkX/rvw01DmObf0eD+TSEOC12D7IiDDGDWyZnLJc0h9s59x/RlBT2JiP84krmJbvvmBcfjf4MlZsXmdUdRwPUhwSQS4ysc3296n9Lc53enKPoLB3dav5LI/AQDHU4bXUB/xuGDR7BRGSKtZM7RDOdpaWWqBDzBFQuXCOz0Zp4Z0kMCQf44JkiSN9vah4JfIPYskNW8wXr5GzXhCTaOm8OOxh/QEInurk9/ZKMYcl5p1kAWNZ2Z/iS7yoOXXu8dZMVplbt3r4wFY590SHDJlLwok1D3VPBctXu6HtinXmvOITPPGHkqbUA7+bM4uHGsmN/QCUk7DpvbcbPjS8gwqnc1fjdEp2SX+F28xTkXFg30oInc95oT0ltXSlLIN9GYkmtHOoY42x+BsqaIcz9QlU2aF1NWA1989pb7EDwyLDy9DHoW6JV9eyBIWeYqMKcneuNdcLp+r0gTsFrdCU=";
    const RSA_FP: &str = "SHA256:lUVWPqQOwEnNhOtbeMQ2et4PZbuMcEN1ix6glb9XmvU";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).expect("test key")
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        assert_eq!(fingerprint(&key(ED1)), ED1_FP);
        assert_eq!(fingerprint(&key(ECDSA)), ECDSA_FP);
        assert_eq!(fingerprint(&key(RSA)), RSA_FP);
        assert_eq!(openssh_key(&key(RSA)).expect("encode"), RSA);
    }

    #[test]
    fn several_algorithms_per_host() {
        let text = format!("[hv]:2222 {ED1}\n[hv]:2222 {ECDSA}\n[hv]:2222 {RSA}\n");
        let kh = KnownHosts::parse(&text);
        for k in [ED1, ECDSA, RSA] {
            assert_eq!(kh.check("hv", 2222, &key(k)), HostKeyStatus::Trusted);
        }
        assert_eq!(kh.keys_for("hv", 2222).len(), 3);
        match kh.check("hv", 2222, &key(ED2)) {
            HostKeyStatus::Changed { known } => {
                assert_eq!(
                    known,
                    vec![ED1_FP.to_owned(), ECDSA_FP.to_owned(), RSA_FP.to_owned()]
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("*.example.com", "a.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(glob_match("h?st", "host"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    #[test]
    fn plain_port_pattern_negation() {
        let text = format!(
            "# comment\n\n[10.0.0.1]:2222 {ED1}\nhv1,hv2 {ED1} c\n*.lab,!bad.lab {ED2}\nbroken line\n"
        );
        let kh = KnownHosts::parse(&text);
        assert_eq!(kh.skipped_lines(), &[6]);
        assert_eq!(
            kh.check("10.0.0.1", 2222, &key(ED1)),
            HostKeyStatus::Trusted
        );
        assert_eq!(kh.check("10.0.0.1", 22, &key(ED1)), HostKeyStatus::Unknown);
        assert_eq!(kh.check("hv2", 22, &key(ED1)), HostKeyStatus::Trusted);
        assert_eq!(kh.check("x.lab", 22, &key(ED2)), HostKeyStatus::Trusted);
        assert_eq!(kh.check("bad.lab", 22, &key(ED2)), HostKeyStatus::Unknown);
        assert_eq!(
            kh.check("hv1", 22, &key(ED2)),
            HostKeyStatus::Changed {
                known: vec![fingerprint(&key(ED1))]
            }
        );
    }

    #[test]
    fn hashed_names() {
        // `ssh-keygen -H` style entry for "[127.0.0.1]:2222", salt = 20 zero bytes.
        let salt = [0u8; 20];
        let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt).expect("hmac");
        mac.update(b"[127.0.0.1]:2222");
        let hash = mac.finalize().into_bytes();
        let line = format!(
            "|1|{}|{} {ED1}",
            data_encoding::BASE64.encode(&salt),
            data_encoding::BASE64.encode(&hash)
        );
        let kh = KnownHosts::parse(&line);
        assert_eq!(
            kh.check("127.0.0.1", 2222, &key(ED1)),
            HostKeyStatus::Trusted
        );
        assert_eq!(
            kh.check("127.0.0.1", 2223, &key(ED1)),
            HostKeyStatus::Unknown
        );
    }

    #[test]
    fn revoked_wins() {
        let text = format!("hv {ED1}\n@revoked * {ED1}\n@cert-authority * {ED2}\n");
        let kh = KnownHosts::parse(&text);
        assert_eq!(kh.check("hv", 22, &key(ED1)), HostKeyStatus::Revoked);
        assert_eq!(kh.keys_for("hv", 22).len(), 1);
        assert_eq!(kh.check("other", 22, &key(ED2)), HostKeyStatus::Unknown);
    }

    #[test]
    fn pin_creates_and_appends() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/dir/known_hosts");
        pin(&path, "127.0.0.1", 2222, &key(ED1)).expect("pin");
        pin(&path, "127.0.0.1", 2222, &key(ED1)).expect("pin again is a no-op");
        pin(&path, "hv", 22, &key(ED2)).expect("pin 2");
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("[127.0.0.1]:2222 {ED1}\nhv {ED2}\n"));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let kh = KnownHosts::load(&path).expect("load");
        assert_eq!(kh.check("hv", 22, &key(ED2)), HostKeyStatus::Trusted);
    }
}
