//! Shared fixtures: one test body runs on the local filesystem and on the lab's Ceph RGW.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use futures::TryStreamExt;
use std::time::Duration;
use virtkeep_repo::*;

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Fs,
    S3,
}

pub struct Fx {
    pub loc: Location,
    _tmp: Option<tempfile::TempDir>,
    /// The node's side: where the key file of an unencrypted repository lives.
    keys: tempfile::TempDir,
}

pub const CS: u64 = 64 << 10;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn fx(kind: Kind) -> Fx {
    match kind {
        Kind::Fs => {
            let t = tempfile::tempdir().unwrap();
            Fx {
                loc: Location::Local {
                    path: t.path().join("repo"),
                    fsync: false,
                },
                _tmp: Some(t),
                keys: tempfile::tempdir().unwrap(),
            }
        }
        Kind::S3 => {
            let lab = virtkeep_lab::lab();
            Fx {
                loc: Location::S3 {
                    bucket: lab.s3_bucket.clone(),
                    prefix: format!("vkt-repo-tests/{}", uuid::Uuid::new_v4().simple()),
                    options: S3Options {
                        endpoint: Some(lab.s3_endpoint.clone()),
                        region: Some(lab.s3_region.clone()),
                        access_key: Some(lab.s3_access_key.clone()),
                        secret_key: Some(lab.s3_secret_key.clone()),
                        allow_http: true,
                        instance_metadata: false,
                    },
                },
                _tmp: None,
                keys: tempfile::tempdir().unwrap(),
            }
        }
    }
}

impl Fx {
    /// The key file that authenticates an unencrypted repository (kept on the "node").
    pub fn key(&self) -> std::path::PathBuf {
        self.keys.path().join("auth.key")
    }
    /// Opens an unencrypted repository with its key file.
    pub async fn open_plain(&self) -> Repository {
        Repository::open(self.loc.clone(), Some(KeySource::KeyFile(self.key())))
            .await
            .unwrap()
    }
    /// Remove everything under the test prefix (S3; the temp dir handles fs).
    pub async fn cleanup(&self) {
        if let Location::S3 { .. } = &self.loc {
            let be = self.loc.backend().unwrap();
            let objs: Vec<ObjectInfo> = be.list("").try_collect().await.unwrap();
            for o in objs {
                be.delete(&o.key).await.unwrap();
            }
        }
    }
    pub async fn all_objects(&self) -> Vec<(String, u64)> {
        let be = self.loc.backend().unwrap();
        let mut v: Vec<(String, u64)> = be
            .list("")
            .map_ok(|o| (o.key, o.size))
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    }
}

pub async fn new_repo(fx: &Fx, enc: Option<KeySource>, min_grace: Duration) -> Repository {
    let auth_key_file = enc.is_none().then(|| fx.key());
    Repository::init(
        fx.loc.clone(),
        InitOptions {
            chunk_size: CS,
            zstd_level: 1,
            encryption: enc,
            min_gc_grace: min_grace,
            auth_key_file,
            format_version: FORMAT_VERSION,
            object_lock: None,
        },
    )
    .await
    .unwrap()
}

/// A repository as virtkeep wrote it before format v2 (the v1 writer is kept for this):
/// unencrypted ones have only a CRC on their metadata.
pub async fn new_repo_v1(fx: &Fx, enc: Option<KeySource>, min_grace: Duration) -> Repository {
    Repository::init(
        fx.loc.clone(),
        InitOptions {
            chunk_size: CS,
            zstd_level: 1,
            encryption: enc,
            min_gc_grace: min_grace,
            auth_key_file: None,
            format_version: 1,
            object_lock: None,
        },
    )
    .await
    .unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn meta(vm: &str, parent: Option<String>) -> BackupMeta {
    BackupMeta {
        host: "hv1".into(),
        vm: vm.into(),
        mode: if parent.is_some() {
            BackupMode::Incremental
        } else {
            BackupMode::Full
        },
        reason: "test".into(),
        parent,
        domain_xml: format!("<domain><name>{vm}</name></domain>"),
        time: None,
    }
}

pub fn spec(name: &str, size: u64) -> DiskSpec {
    DiskSpec {
        name: name.into(),
        size,
        backend: virtkeep_repo::Storage::File,
        format: "raw".into(),
        target: name.into(),
        source: format!("/var/lib/libvirt/images/{name}.img"),
    }
}

/// Full backup of one disk via write_chunk.
pub async fn backup_full(repo: &Repository, vm: &str, data: &[u8]) -> Manifest {
    let w = repo.begin_backup(meta(vm, None)).await.unwrap();
    let d = w.disk(spec("vda", data.len() as u64), None).await.unwrap();
    for (i, c) in data.chunks(CS as usize).enumerate() {
        d.write_chunk(i as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    d.finish().await.unwrap();
    w.finish(serde_json::json!({"test": true})).await.unwrap()
}

pub async fn restore(repo: &Repository, id: &str, disk: &str) -> Vec<u8> {
    let r = repo.disk_reader(id, disk).await.unwrap();
    let mut out = vec![0xAAu8; r.size() as usize];
    let mut pos = 0u64;
    let mut s = Box::pin(r.extents());
    while let Some(e) = s.try_next().await.unwrap() {
        match e {
            Extent::Data { offset, bytes } => {
                assert_eq!(offset, pos, "extents must be contiguous");
                out[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
                pos += bytes.len() as u64;
            }
            Extent::Zero { offset, len } => {
                assert_eq!(offset, pos);
                out[offset as usize..(offset + len) as usize].fill(0);
                pos += len;
            }
        }
    }
    assert_eq!(pos, r.size());
    out
}

#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn fs() {
                super::$name(super::common::Kind::Fs)
            }
            #[test]
            fn s3() {
                super::$name(super::common::Kind::S3)
            }
        }
    )*};
}
