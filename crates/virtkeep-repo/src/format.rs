//! Byte formats: magic numbers, chunk and metadata blobs, the fixed index.
//!
//! WARNING: the magic values are part of the on-disk format (docs/format.md). They are the
//! first 8 bytes of `blake3(<string>)`; never change a string, add a new `v2` instead.

use std::cell::RefCell;
use std::sync::LazyLock;

use bytes::Bytes;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag};

use crate::error::{RepoError, Result};

fn magic(s: &str) -> [u8; 8] {
    let h = blake3::hash(s.as_bytes());
    let mut m = [0u8; 8];
    m.copy_from_slice(&h.as_bytes()[..8]);
    m
}

/// Chunk blob, stored raw, not encrypted.
pub static MAGIC_CHUNK_PLAIN: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep chunk plain v1"));
/// Chunk blob, zstd, not encrypted.
pub static MAGIC_CHUNK_ZSTD: LazyLock<[u8; 8]> = LazyLock::new(|| magic("virtkeep chunk zstd v1"));
/// Chunk blob, raw, AES-256-GCM.
pub static MAGIC_CHUNK_ENC: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep chunk encrypted v1"));
/// Chunk blob, zstd then AES-256-GCM.
pub static MAGIC_CHUNK_ENC_ZSTD: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep chunk encrypted zstd v1"));
/// Metadata blob (index, manifest), not encrypted.
pub static MAGIC_META_PLAIN: LazyLock<[u8; 8]> = LazyLock::new(|| magic("virtkeep meta plain v1"));
/// Metadata blob, not encrypted, authenticated with the node's key (format v2).
pub static MAGIC_META_AUTH: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep meta authenticated v2"));
/// Metadata blob, AES-256-GCM.
pub static MAGIC_META_ENC: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep meta encrypted v1"));
/// Fixed index payload.
pub static MAGIC_FIXED_INDEX: LazyLock<[u8; 8]> =
    LazyLock::new(|| magic("virtkeep fixed index v1"));

/// The reserved digest of an all-zero chunk (never stored).
pub const ZERO_DIGEST: [u8; 32] = [0u8; 32];

/// Chunk digest (32 bytes, keyed BLAKE3).
pub type Digest = [u8; 32];

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HDR: usize = 12; // magic + crc32
const MAC_LEN: usize = 32;

/// True when every byte is zero.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut it = data.chunks_exact(64);
    for c in &mut it {
        let mut acc = 0u8;
        for b in c {
            acc |= *b;
        }
        if acc != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|b| *b == 0)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn compress(level: i32, data: &[u8]) -> Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            let comp = zstd::bulk::Compressor::new(level)
                .map_err(|e| RepoError::InvalidArgument(format!("zstd level {level}: {e}")))?;
            *c = Some((level, comp));
        }
        match c.as_mut() {
            Some((_, comp)) => comp
                .compress(data)
                .map_err(|e| RepoError::Task(format!("zstd compression failed: {e}"))),
            None => Err(RepoError::Task("zstd compressor missing".into())),
        }
    })
}

/// Hashing, compression and encryption of chunks and metadata blobs for one repository.
pub struct Codec {
    pub(crate) id_key: [u8; 32],
    pub(crate) aead: Option<LessSafeKey>,
    pub(crate) zstd_level: i32,
    pub(crate) chunk_size: usize,
    /// Unencrypted format v2: the key that authenticates metadata blobs (derived from the
    /// node's key file). `None` in encrypted repositories (GCM authenticates) and in
    /// unencrypted v1 ones (CRC only).
    pub(crate) meta_mac: Option<[u8; 32]>,
}

/// The metadata MAC key derived from an unencrypted repository's authentication key.
pub(crate) fn meta_mac_key(auth_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("virtkeep 2026 meta mac key v2", auth_key)
}

/// keyed-BLAKE3(mac key, magic || len(object key) u32 LE || object key || payload): the
/// object key binds a blob to its backup id and disk, so it cannot be moved.
fn meta_mac(key: &[u8; 32], magic: &[u8; 8], object: &str, payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(magic);
    h.update(&(object.len() as u32).to_le_bytes());
    h.update(object.as_bytes());
    h.update(payload);
    h.finalize()
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("encrypted", &self.aead.is_some())
            .field("zstd_level", &self.zstd_level)
            .field("chunk_size", &self.chunk_size)
            .field("authenticated", &self.meta_mac.is_some())
            .finish()
    }
}

fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    use ring::rand::SecureRandom;
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| RepoError::Task("system random generator failed".into()))?;
    Ok(n)
}

/// Chunk object key for a digest: `chunks/<first 3 hex>/<64 hex>`.
pub fn chunk_key(d: &Digest) -> String {
    let h = hex::encode(d);
    format!("chunks/{}/{}", &h[..3], h)
}

impl Codec {
    /// The chunk digest: keyed BLAKE3 of the plaintext.
    pub fn digest(&self, data: &[u8]) -> Digest {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    fn seal(&self, magic: &[u8; 8], aad_tail: &[u8], payload: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(HDR + NONCE_LEN + TAG_LEN + payload.len());
        out.extend_from_slice(magic);
        out.extend_from_slice(&[0u8; 4]);
        if let Some(key) = &self.aead {
            let nonce = random_nonce()?;
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&[0u8; TAG_LEN]);
            out.extend_from_slice(payload);
            let mut aad = Vec::with_capacity(8 + aad_tail.len());
            aad.extend_from_slice(magic);
            aad.extend_from_slice(aad_tail);
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    &mut out[HDR + NONCE_LEN + TAG_LEN..],
                )
                .map_err(|_| RepoError::Task("AES-GCM seal failed".into()))?;
            out[HDR + NONCE_LEN..HDR + NONCE_LEN + TAG_LEN].copy_from_slice(tag.as_ref());
        } else {
            out.extend_from_slice(payload);
        }
        let crc = crc32fast::hash(&out[HDR..]);
        out[8..12].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Returns (payload, encrypted?) after checking CRC and (when encrypted) the tag.
    fn open<'a>(
        &self,
        blob: &'a mut [u8],
        aad_tail: &[u8],
        object: &dyn Fn(String) -> RepoError,
    ) -> Result<([u8; 8], &'a [u8])> {
        if blob.len() < HDR {
            return Err(object("truncated header".into()));
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&blob[..8]);
        let crc = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]);
        if crc32fast::hash(&blob[HDR..]) != crc {
            return Err(object("CRC mismatch".into()));
        }
        let encrypted =
            magic == *MAGIC_CHUNK_ENC || magic == *MAGIC_CHUNK_ENC_ZSTD || magic == *MAGIC_META_ENC;
        match (&self.aead, encrypted) {
            (Some(key), true) => {
                if blob.len() < HDR + NONCE_LEN + TAG_LEN {
                    return Err(object("truncated encryption header".into()));
                }
                let (head, ct) = blob.split_at_mut(HDR + NONCE_LEN + TAG_LEN);
                let mut nonce = [0u8; NONCE_LEN];
                nonce.copy_from_slice(&head[HDR..HDR + NONCE_LEN]);
                let tag = Tag::try_from(&head[HDR + NONCE_LEN..])
                    .map_err(|_| object("bad tag length".into()))?;
                let mut aad = Vec::with_capacity(8 + aad_tail.len());
                aad.extend_from_slice(&magic);
                aad.extend_from_slice(aad_tail);
                key.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    tag,
                    ct,
                    0..,
                )
                .map_err(|_| object("authentication failed (tampered or wrong key)".into()))?;
                Ok((magic, &*ct))
            }
            (None, false) => Ok((magic, &blob[HDR..])),
            (Some(_), false) => Err(object(
                "stored unencrypted in an encrypted repository (refused)".into(),
            )),
            (None, true) => Err(object("encrypted blob in an unencrypted repository".into())),
        }
    }

    /// Encode a (non-zero) chunk: compress when it saves ≥ 3 %, encrypt when keyed.
    pub fn encode_chunk(&self, digest: &Digest, data: &[u8]) -> Result<Vec<u8>> {
        let compressed = if self.zstd_level != 0 {
            let c = compress(self.zstd_level, data)?;
            ((c.len() as u64) * 100 <= (data.len() as u64) * 97).then_some(c)
        } else {
            None
        };
        let enc = self.aead.is_some();
        let (magic, payload): (&[u8; 8], &[u8]) = match (&compressed, enc) {
            (Some(c), false) => (&MAGIC_CHUNK_ZSTD, c),
            (Some(c), true) => (&MAGIC_CHUNK_ENC_ZSTD, c),
            (None, false) => (&MAGIC_CHUNK_PLAIN, data),
            (None, true) => (&MAGIC_CHUNK_ENC, data),
        };
        self.seal(magic, digest, payload)
    }

    /// Decode a chunk blob and check that its content matches `digest`.
    pub fn decode_chunk(&self, digest: &Digest, blob: Bytes) -> Result<Bytes> {
        let dhex = hex::encode(digest);
        let err = |reason: String| RepoError::ChunkCorrupt {
            digest: dhex.clone(),
            reason,
        };
        let mut buf = Vec::from(blob);
        let (magic, payload) = self.open(&mut buf, digest, &err)?;
        let data: Vec<u8> = if magic == *MAGIC_CHUNK_ZSTD || magic == *MAGIC_CHUNK_ENC_ZSTD {
            zstd::bulk::decompress(payload, self.chunk_size)
                .map_err(|e| err(format!("zstd: {e}")))?
        } else if magic == *MAGIC_CHUNK_PLAIN || magic == *MAGIC_CHUNK_ENC {
            if payload.len() > self.chunk_size {
                return Err(err("larger than the chunk size".into()));
            }
            payload.to_vec()
        } else {
            return Err(err(format!("unknown magic {}", hex::encode(magic))));
        };
        if self.digest(&data) != *digest {
            return Err(err("digest mismatch".into()));
        }
        Ok(Bytes::from(data))
    }

    /// Wrap a metadata payload (index, manifest), authenticated with its object key:
    /// AES-GCM when encrypted, a keyed MAC in unencrypted format v2, a CRC only in v1.
    pub fn encode_meta(&self, key: &str, payload: &[u8]) -> Result<Vec<u8>> {
        if self.aead.is_none()
            && let Some(mk) = &self.meta_mac
        {
            let magic = &*MAGIC_META_AUTH;
            let mut out = Vec::with_capacity(HDR + MAC_LEN + payload.len());
            out.extend_from_slice(magic);
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(meta_mac(mk, magic, key, payload).as_bytes());
            out.extend_from_slice(payload);
            let crc = crc32fast::hash(&out[HDR..]);
            out[8..12].copy_from_slice(&crc.to_le_bytes());
            return Ok(out);
        }
        let magic = if self.aead.is_some() {
            &MAGIC_META_ENC
        } else {
            &MAGIC_META_PLAIN
        };
        self.seal(magic, key.as_bytes(), payload)
    }

    /// Unwrap a metadata blob stored under `key`. In an unencrypted v2 repository only an
    /// authenticated blob whose MAC (over its object key) checks is accepted.
    pub fn decode_meta(&self, key: &str, blob: Bytes) -> Result<Vec<u8>> {
        let err = |reason: String| RepoError::corrupt(key, reason);
        if blob.len() >= HDR && blob[..8] == *MAGIC_META_AUTH {
            return self.open_authenticated(key, &blob);
        }
        let mut buf = Vec::from(blob);
        let (magic, payload) = self.open(&mut buf, key.as_bytes(), &err)?;
        if magic != *MAGIC_META_ENC && magic != *MAGIC_META_PLAIN {
            return Err(RepoError::UnsupportedFormat {
                object: key.into(),
                reason: format!("unknown magic {}", hex::encode(magic)),
            });
        }
        if magic == *MAGIC_META_PLAIN && self.meta_mac.is_some() {
            return Err(err(
                "authentication failed: the object is not authenticated (a \
                            format v1 blob in a v2 repository: written outside virtkeep, or \
                            left by an interrupted `virtkeep repo upgrade`, which converts it)"
                    .into(),
            ));
        }
        Ok(payload.to_vec())
    }

    fn open_authenticated(&self, key: &str, blob: &[u8]) -> Result<Vec<u8>> {
        let err = |reason: &str| RepoError::corrupt(key, reason);
        let crc = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]);
        if crc32fast::hash(&blob[HDR..]) != crc {
            return Err(err("CRC mismatch"));
        }
        if blob.len() < HDR + MAC_LEN {
            return Err(err("truncated authentication header"));
        }
        let Some(mk) = self.meta_mac.as_ref().filter(|_| self.aead.is_none()) else {
            return Err(err(
                "an authenticated (format v2) blob in a repository whose config does not \
                 authenticate metadata: refused",
            ));
        };
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&blob[HDR..HDR + MAC_LEN]);
        let payload = &blob[HDR + MAC_LEN..];
        // blake3::Hash compares in constant time.
        if meta_mac(mk, &MAGIC_META_AUTH, key, payload) != blake3::Hash::from(mac) {
            return Err(err(
                "authentication failed (modified outside virtkeep, moved from another \
                 object, or the key file is not this repository's)",
            ));
        }
        Ok(payload.to_vec())
    }

    /// Whether `blob` is a format v1 unencrypted metadata blob (CRC only).
    pub(crate) fn is_plain_meta(blob: &[u8]) -> bool {
        blob.len() >= HDR && blob[..8] == *MAGIC_META_PLAIN
    }
}

// ---------------------------------------------------------------------------------------

const INDEX_HEADER: usize = 64;

/// A fixed-size chunk index for one disk: chunk `i` covers bytes
/// `[i*chunk_size, min((i+1)*chunk_size, size))`; [`ZERO_DIGEST`] marks an all-zero chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// One digest per chunk.
    pub digests: Vec<Digest>,
    /// The backup this index was loaded from (set by `Repository::fixed_index`).
    pub snapshot: Option<String>,
}

impl FixedIndex {
    /// An index of `size` bytes where every chunk is zero.
    pub fn new_zero(chunk_size: u64, size: u64) -> Result<Self> {
        if chunk_size == 0 {
            return Err(RepoError::InvalidArgument("chunk size 0".into()));
        }
        let n = size.div_ceil(chunk_size);
        let n = usize::try_from(n)
            .map_err(|_| RepoError::InvalidArgument(format!("disk too large: {size}")))?;
        Ok(FixedIndex {
            chunk_size,
            size,
            digests: vec![ZERO_DIGEST; n],
            snapshot: None,
        })
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> u64 {
        let start = i * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// Whether chunk `i` is all zeros.
    pub fn is_zero(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.digests.get(i))
            .is_some_and(|d| *d == ZERO_DIGEST)
    }

    /// Serialize (payload only; the repository wraps it in a meta blob).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER + self.digests.len() * 32);
        out.extend_from_slice(&*MAGIC_FIXED_INDEX);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.resize(INDEX_HEADER, 0);
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        out
    }

    /// Parse a payload written by [`FixedIndex::encode`].
    pub fn decode(object: &str, b: &[u8]) -> Result<Self> {
        let err = |r: &str| RepoError::corrupt(object, r);
        if b.len() < INDEX_HEADER {
            return Err(err("truncated index header"));
        }
        if b[..8] != *MAGIC_FIXED_INDEX {
            return Err(RepoError::UnsupportedFormat {
                object: object.into(),
                reason: format!("index magic {}", hex::encode(&b[..8])),
            });
        }
        let rd = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let (chunk_size, size, count) = (rd(8), rd(16), rd(24));
        if chunk_size == 0 || size.div_ceil(chunk_size) != count {
            return Err(err("inconsistent chunk size / disk size / chunk count"));
        }
        let body = &b[INDEX_HEADER..];
        if (body.len() as u64) != count.saturating_mul(32) {
            return Err(err("digest array length does not match chunk count"));
        }
        let digests = body
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(FixedIndex {
            chunk_size,
            size,
            digests,
            snapshot: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(enc: bool) -> Codec {
        let aead = enc.then(|| {
            LessSafeKey::new(
                ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7u8; 32]).expect("key"),
            )
        });
        Codec {
            id_key: [3u8; 32],
            aead,
            zstd_level: 1,
            chunk_size: 1 << 16,
            meta_mac: None,
        }
    }

    fn authenticated() -> Codec {
        Codec {
            meta_mac: Some(meta_mac_key(&[5u8; 32])),
            ..codec(false)
        }
    }

    #[test]
    fn magics_are_frozen() {
        // docs/format.md lists these; changing one breaks every existing repository.
        assert_eq!(hex::encode(*MAGIC_CHUNK_PLAIN), "40811b44e6cb947a");
        assert_eq!(hex::encode(*MAGIC_CHUNK_ZSTD), "d147407066a87582");
        assert_eq!(hex::encode(*MAGIC_CHUNK_ENC), "318b32f02511d857");
        assert_eq!(hex::encode(*MAGIC_CHUNK_ENC_ZSTD), "ba258e9ba1fc403b");
        assert_eq!(hex::encode(*MAGIC_META_PLAIN), "4e95bd086bab0a51");
        assert_eq!(hex::encode(*MAGIC_META_ENC), "dce7b3de57abde81");
        assert_eq!(hex::encode(*MAGIC_FIXED_INDEX), "a4a2953b094d5056");
        assert_eq!(hex::encode(*MAGIC_META_AUTH), MAGIC_META_AUTH_HEX);
    }

    const MAGIC_META_AUTH_HEX: &str = "0d6d7c412d8e0d96";

    #[test]
    fn authenticated_meta_bound_to_key_and_checked() {
        let c = authenticated();
        let b = c.encode_meta("snapshots/a/manifest", b"{}").expect("enc");
        assert_eq!(b[..8], *MAGIC_META_AUTH);
        let dec = |k: &str, b: Vec<u8>| c.decode_meta(k, Bytes::from(b));
        assert_eq!(dec("snapshots/a/manifest", b.clone()).expect("dec"), b"{}");
        // moved to another backup
        assert!(dec("snapshots/b/manifest", b.clone()).is_err());
        // payload edited and the CRC recomputed
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] = b'x';
        let crc = crc32fast::hash(&bad[HDR..]);
        bad[8..12].copy_from_slice(&crc.to_le_bytes());
        let e = dec("snapshots/a/manifest", bad).expect_err("tampered");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        // a v1 (CRC only) blob is refused, and an authenticated one without the key
        let v1 = codec(false)
            .encode_meta("snapshots/a/manifest", b"{}")
            .expect("v1");
        assert!(dec("snapshots/a/manifest", v1.clone()).is_err());
        assert!(
            codec(false)
                .decode_meta("snapshots/a/manifest", Bytes::from(b))
                .is_err()
        );
        // another key
        let other = Codec {
            meta_mac: Some(meta_mac_key(&[6u8; 32])),
            ..codec(false)
        };
        let b = c.encode_meta("k", b"x").expect("enc");
        assert!(other.decode_meta("k", Bytes::from(b)).is_err());
        assert_eq!(
            codec(false)
                .decode_meta("snapshots/a/manifest", Bytes::from(v1))
                .expect("v1"),
            b"{}"
        );
    }

    #[test]
    fn print_magics() {
        for (n, m) in [
            ("chunk plain", *MAGIC_CHUNK_PLAIN),
            ("chunk zstd", *MAGIC_CHUNK_ZSTD),
            ("chunk enc", *MAGIC_CHUNK_ENC),
            ("chunk enc zstd", *MAGIC_CHUNK_ENC_ZSTD),
            ("meta plain", *MAGIC_META_PLAIN),
            ("meta enc", *MAGIC_META_ENC),
            ("meta auth", *MAGIC_META_AUTH),
            ("fixed index", *MAGIC_FIXED_INDEX),
        ] {
            println!("{n}: {}", hex::encode(m));
        }
    }

    #[test]
    fn chunk_roundtrip_and_tamper() {
        for enc in [false, true] {
            let c = codec(enc);
            for data in [
                vec![5u8; 60000],
                (0..60000u32)
                    .map(|i| i.wrapping_mul(2654435761) as u8 ^ (i >> 7) as u8)
                    .collect(),
            ] {
                let d = c.digest(&data);
                let blob = c.encode_chunk(&d, &data).expect("encode");
                let back = c
                    .decode_chunk(&d, Bytes::from(blob.clone()))
                    .expect("decode");
                assert_eq!(&back[..], &data[..]);
                let mut bad = blob.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(matches!(
                    c.decode_chunk(&d, Bytes::from(bad)),
                    Err(RepoError::ChunkCorrupt { .. })
                ));
                // a valid blob under the wrong name
                let other = c.digest(b"other");
                assert!(c.decode_chunk(&other, Bytes::from(blob)).is_err());
            }
        }
    }

    #[test]
    fn meta_bound_to_key() {
        let c = codec(true);
        let b = c.encode_meta("snapshots/a/manifest", b"{}").expect("enc");
        assert_eq!(
            c.decode_meta("snapshots/a/manifest", Bytes::from(b.clone()))
                .expect("dec"),
            b"{}"
        );
        assert!(
            c.decode_meta("snapshots/b/manifest", Bytes::from(b))
                .is_err()
        );
    }

    #[test]
    fn index_roundtrip() {
        let mut ix = FixedIndex::new_zero(4096, 10000).expect("ix");
        ix.digests[1] = [9u8; 32];
        let b = ix.encode();
        assert_eq!(FixedIndex::decode("x", &b).expect("dec"), ix);
        assert_eq!(ix.chunk_len(2), 10000 - 8192);
        assert!(FixedIndex::decode("x", &b[..b.len() - 1]).is_err());
    }

    #[test]
    fn zero_detect() {
        assert!(is_all_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_all_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }
}
