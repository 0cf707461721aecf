//! Keys: passphrase (argon2id) or key file → key-encryption key → wrapped master key;
//! subkeys derived from the master key with BLAKE3 `derive_key`.

use std::path::PathBuf;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::error::{RepoError, Result};

/// Where the key that unlocks an encrypted repository comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A passphrase, stretched with argon2id (parameters and salt in the config).
    Passphrase(String),
    /// A key file holding 32 random bytes (created by `init` when it does not exist).
    KeyFile(PathBuf),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeySource::KeyFile(p) => write!(f, "KeyFile({})", p.display()),
        }
    }
}

/// Key derivation parameters stored in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Kdf {
    /// argon2id v0x13.
    Argon2id {
        m_kib: u32,
        t: u32,
        p: u32,
        /// hex, 16 bytes
        salt: String,
    },
    /// The key file's 32 bytes are the key-encryption key.
    KeyFile {
        /// hex, first 8 bytes of `derive_key("virtkeep key fingerprint v1", kek)`
        fingerprint: String,
    },
}

/// The encryption section of the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// Always `aes-256-gcm`.
    pub cipher: String,
    /// How to derive the key-encryption key.
    pub kdf: Kdf,
    /// hex(nonce 12 || AES-256-GCM(kek, master key 32) || tag 16).
    pub wrapped_key: String,
}

#[derive(Serialize, Deserialize)]
struct KeyFileJson {
    format: String,
    version: u32,
    key: String,
}

const KEYFILE_FORMAT: &str = "virtkeep-keyfile";
pub(crate) const ARGON_M_KIB: u32 = 64 * 1024;
pub(crate) const ARGON_T: u32 = 3;
pub(crate) const ARGON_P: u32 = 1;

pub(crate) fn random<const N: usize>() -> Result<[u8; N]> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| RepoError::Task("system random generator failed".into()))?;
    Ok(b)
}

pub(crate) fn fingerprint(kek: &[u8; 32]) -> String {
    hex::encode(&blake3::derive_key("virtkeep key fingerprint v1", kek)[..8])
}

pub(crate) fn read_key_file(path: &PathBuf, create: bool) -> Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(b) => {
            let obj = path.display().to_string();
            let j: KeyFileJson =
                serde_json::from_slice(&b).map_err(|e| RepoError::json(obj.clone(), e))?;
            if j.format != KEYFILE_FORMAT || j.version != 1 {
                return Err(RepoError::UnsupportedFormat {
                    object: obj,
                    reason: format!("{} v{}", j.format, j.version),
                });
            }
            let k =
                hex::decode(&j.key).map_err(|e| RepoError::corrupt(obj.clone(), e.to_string()))?;
            k.try_into()
                .map_err(|_| RepoError::corrupt(obj, "key is not 32 bytes"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let key = random::<32>()?;
            let j = KeyFileJson {
                format: KEYFILE_FORMAT.into(),
                version: 1,
                key: hex::encode(key),
            };
            let data = serde_json::to_vec_pretty(&j).map_err(|e| RepoError::json("key file", e))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            use std::io::Write;
            let mut f = opts.open(path).map_err(|e| RepoError::io(path, e))?;
            f.write_all(&data)
                .and_then(|()| f.sync_all())
                .map_err(|e| RepoError::io(path, e))?;
            Ok(key)
        }
        Err(e) => Err(RepoError::io(path, e)),
    }
}

/// Derive the key-encryption key for a new wrapping (fresh salt) — used by init and
/// change_passphrase.
pub(crate) fn new_kek(src: &KeySource) -> Result<([u8; 32], Kdf)> {
    match src {
        KeySource::Passphrase(p) => {
            if p.is_empty() {
                return Err(RepoError::InvalidArgument("empty passphrase".into()));
            }
            let salt = random::<16>()?;
            let kdf = Kdf::Argon2id {
                m_kib: ARGON_M_KIB,
                t: ARGON_T,
                p: ARGON_P,
                salt: hex::encode(salt),
            };
            Ok((argon(p, &kdf)?, kdf))
        }
        KeySource::KeyFile(path) => {
            let k = read_key_file(path, true)?;
            Ok((
                k,
                Kdf::KeyFile {
                    fingerprint: fingerprint(&k),
                },
            ))
        }
    }
}

/// Bounds on the argon2id parameters `open` accepts from a config. The config is not
/// authenticated before the key is derived, so these keep a crafted one from making
/// `open` run for hours or allocate without limit: at most 1 GiB and 10 passes
/// (virtkeep writes 64 MiB, 3 passes, 1 lane).
pub(crate) const ARGON_M_KIB_MAX: u32 = 1024 * 1024;
pub(crate) const ARGON_T_MAX: u32 = 10;
pub(crate) const ARGON_P_MAX: u32 = 16;

/// Refuses argon2id parameters outside the bounds above, before any work is done.
pub(crate) fn check_kdf_bounds(kdf: &Kdf) -> Result<()> {
    let Kdf::Argon2id { m_kib, t, p, salt } = kdf else {
        return Ok(());
    };
    let bad = |what: &str, v: String, range: String| {
        RepoError::corrupt(
            "config",
            format!(
                "key derivation parameter {what} = {v} is outside {range}: the config was \
                 changed outside virtkeep (restore it from a copy)"
            ),
        )
    };
    if !(1..=ARGON_P_MAX).contains(p) {
        return Err(bad("p", p.to_string(), format!("1..={ARGON_P_MAX}")));
    }
    if !(1..=ARGON_T_MAX).contains(t) {
        return Err(bad("t", t.to_string(), format!("1..={ARGON_T_MAX}")));
    }
    let m_min = 8 * p;
    if !(m_min..=ARGON_M_KIB_MAX).contains(m_kib) {
        return Err(bad(
            "m_kib",
            m_kib.to_string(),
            format!("{m_min}..={ARGON_M_KIB_MAX}"),
        ));
    }
    if !(16..=128).contains(&salt.len()) {
        return Err(bad(
            "salt length",
            salt.len().to_string(),
            "16..=128 hex digits".into(),
        ));
    }
    Ok(())
}

fn argon(pass: &str, kdf: &Kdf) -> Result<[u8; 32]> {
    check_kdf_bounds(kdf)?;
    let Kdf::Argon2id { m_kib, t, p, salt } = kdf else {
        return Err(RepoError::Task("not an argon2 kdf".into()));
    };
    let salt =
        hex::decode(salt).map_err(|e| RepoError::corrupt("config kdf salt", e.to_string()))?;
    let params = argon2::Params::new(*m_kib, *t, *p, Some(32))
        .map_err(|e| RepoError::corrupt("config kdf parameters", e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(pass.as_bytes(), &salt, &mut out)
        .map_err(|e| RepoError::corrupt("config kdf parameters", e.to_string()))?;
    Ok(out)
}

/// What the wrapped master key and the v2 config MAC bind besides the repository id:
/// the cipher and every key derivation parameter, so a config whose parameters were
/// edited is refused (format v2).
pub(crate) fn kdf_binding(enc: &EncryptionConfig) -> String {
    let kdf = match &enc.kdf {
        Kdf::Argon2id { m_kib, t, p, salt } => format!("argon2id\0{m_kib}\0{t}\0{p}\0{salt}"),
        Kdf::KeyFile { fingerprint } => format!("key-file\0{fingerprint}"),
    };
    format!("{}\0{kdf}", enc.cipher)
}

/// AAD of the wrapped master key: v1 binds the repository id, v2 also the cipher and
/// KDF parameters ([`kdf_binding`]).
fn wrap_aad(repo_id: &str, binding: Option<&str>) -> Vec<u8> {
    match binding {
        None => format!("virtkeep wrapped master key v1\0{repo_id}").into_bytes(),
        Some(b) => format!("virtkeep wrapped master key v2\0{repo_id}\0{b}").into_bytes(),
    }
}

/// Wrap the master key (`binding`: `Some(kdf_binding)` for format v2).
pub(crate) fn wrap(
    kek: &[u8; 32],
    master: &[u8; 32],
    repo_id: &str,
    binding: Option<&str>,
) -> Result<String> {
    let key = aead_key(kek)?;
    let nonce = random::<12>()?;
    let mut buf = master.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(wrap_aad(repo_id, binding)),
        &mut buf,
    )
    .map_err(|_| RepoError::Task("AES-GCM seal failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(hex::encode(out))
}

/// Unwrap the master key with `src` (format `version` of the config); returns the
/// master key and the key-encryption key. A failure is [`RepoError::WrongKey`].
pub(crate) fn unwrap_master(
    src: &KeySource,
    enc: &EncryptionConfig,
    repo_id: &str,
    location: &str,
    version: u32,
) -> Result<([u8; 32], [u8; 32])> {
    if enc.cipher != "aes-256-gcm" {
        return Err(RepoError::corrupt(
            "config",
            format!(
                "cipher {:?} is not aes-256-gcm: the config was changed outside virtkeep \
                 (restore it from a copy, `virtkeep repo key export` writes one)",
                enc.cipher
            ),
        ));
    }
    let binding = (version >= 2).then(|| kdf_binding(enc));
    let wrong = |hint: String| RepoError::WrongKey {
        location: location.into(),
        hint,
    };
    let kek = match (src, &enc.kdf) {
        (KeySource::Passphrase(p), kdf @ Kdf::Argon2id { .. }) => argon(p, kdf)?,
        (KeySource::KeyFile(path), Kdf::KeyFile { fingerprint: fp }) => {
            let k = read_key_file(path, false)?;
            if fingerprint(&k) != *fp {
                return Err(wrong(format!(
                    "key file {} has fingerprint {}, the repository expects {fp}",
                    path.display(),
                    fingerprint(&k)
                )));
            }
            k
        }
        (KeySource::Passphrase(_), Kdf::KeyFile { .. }) => {
            return Err(wrong(
                "this repository is unlocked with a key file, not a passphrase".into(),
            ));
        }
        (KeySource::KeyFile(_), Kdf::Argon2id { .. }) => {
            return Err(wrong(
                "this repository is unlocked with a passphrase, not a key file".into(),
            ));
        }
    };
    let raw = hex::decode(&enc.wrapped_key)
        .map_err(|e| RepoError::corrupt("config wrapped_key", e.to_string()))?;
    if raw.len() != 12 + 32 + 16 {
        return Err(RepoError::corrupt("config wrapped_key", "bad length"));
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&raw[..12]);
    let mut buf = raw[12..].to_vec();
    let key = aead_key(&kek)?;
    let pt = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(repo_id, binding.as_deref())),
            &mut buf,
        )
        .map_err(|_| {
            wrong(match (src, &enc.kdf) {
                (KeySource::Passphrase(_), Kdf::Argon2id { m_kib, t, p, .. }) => format!(
                    "the passphrase does not unlock the repository key; check it (and the \
                     variable it comes from). If it is right, the key derivation parameters \
                     in the repository's config (argon2id m_kib={m_kib} t={t} p={p}) or its \
                     cipher were changed outside virtkeep: restore the config from a copy"
                ),
                (KeySource::Passphrase(_), _) => "the passphrase does not unlock the \
                     repository key"
                    .into(),
                (KeySource::KeyFile(p), _) => format!(
                    "key file {} does not unlock the repository key (or the config's key \
                     derivation parameters or cipher were changed outside virtkeep)",
                    p.display()
                ),
            })
        })?;
    let master = pt
        .try_into()
        .map_err(|_| RepoError::corrupt("config wrapped_key", "bad master key length"))?;
    Ok((master, kek))
}

pub(crate) fn aead_key(k: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, k)
        .map(LessSafeKey::new)
        .map_err(|_| RepoError::Task("AES key setup failed".into()))
}

/// Subkeys derived from the master key.
pub(crate) struct Subkeys {
    pub id_key: [u8; 32],
    pub enc_key: [u8; 32],
    pub mac_key: [u8; 32],
}

pub(crate) fn subkeys(master: &[u8; 32]) -> Subkeys {
    Subkeys {
        id_key: blake3::derive_key("virtkeep 2026 chunk id key v1", master),
        enc_key: blake3::derive_key("virtkeep 2026 encryption key v1", master),
        mac_key: blake3::derive_key("virtkeep 2026 config mac key v1", master),
    }
}
