//! `repo upgrade`: format v1 → v2. Encrypted repositories get a config whose wrapped
//! master key and MAC bind the cipher and KDF parameters; unencrypted ones get a key
//! file on the node and every manifest and index re-written with a MAC. Chunks are
//! not touched.

use std::path::PathBuf;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;

use crate::backend::ObjectInfo;
use crate::crypto;
use crate::error::{RepoError, Result};
use crate::format::{Codec, MAGIC_META_AUTH};
use crate::repo::{FORMAT_VERSION, Keys, Repository, make_codec, read_key_blocking};

/// What [`Repository::upgrade`] did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UpgradeReport {
    /// Format before.
    pub from_version: u32,
    /// Format after.
    pub to_version: u32,
    /// Whether `config` was rewritten.
    pub config_rewritten: bool,
    /// Unencrypted: manifests and indexes given a MAC now.
    pub objects_authenticated: u64,
    /// Unencrypted: manifests and indexes that already had a valid one.
    pub objects_already_authenticated: u64,
    /// Objects that could not be read (left as they are; `verify` names them).
    pub failed: Vec<UpgradeFailure>,
    /// Unencrypted: the key file that authenticates the repository from now on.
    pub key_file: Option<PathBuf>,
}

/// A manifest or index the upgrade could not read.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpgradeFailure {
    /// Object key.
    pub object: String,
    /// Why.
    pub error: String,
}

/// `snapshots/<id>/manifest` or `snapshots/<id>/<disk>.fidx`.
fn is_meta_key(key: &str) -> bool {
    let mut parts = key.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("snapshots"), Some(_), Some(leaf), None) if leaf == "manifest" || leaf.ends_with(".fidx")
    )
}

impl Repository {
    /// Upgrade to [`FORMAT_VERSION`]. Unencrypted: `auth_key_file` (created when it does
    /// not exist; default: the key file the repository was opened with) authenticates
    /// the metadata from now on, and format v1 blobs are re-written with a MAC — also
    /// those an interrupted upgrade left (running it again finishes it). Refused while
    /// a backup runs. The open `Repository` keeps its old view: open it again.
    pub async fn upgrade(&self, auth_key_file: Option<PathBuf>) -> Result<UpgradeReport> {
        let now = self.storage_now().await?;
        if let Some((lease, _)) = self.live_leases(now).await?.into_iter().next() {
            return Err(RepoError::InvalidArgument(format!(
                "a backup is running (lease {lease}); upgrade when none runs"
            )));
        }
        let mut cfg = self.inner.config.clone();
        let mut report = UpgradeReport {
            from_version: cfg.version,
            to_version: FORMAT_VERSION,
            ..UpgradeReport::default()
        };
        if let Some(master) = self.inner.keys.master {
            if cfg.version < FORMAT_VERSION {
                let kek =
                    self.inner.keys.kek.ok_or_else(|| {
                        RepoError::Task("the key-encryption key is not held".into())
                    })?;
                let kdf = cfg
                    .encryption
                    .as_ref()
                    .map(|e| e.kdf.clone())
                    .ok_or_else(|| RepoError::Task("no encryption section".into()))?;
                cfg.version = FORMAT_VERSION;
                cfg.set_wrapped(&kek, &master, kdf)?;
                self.write_config(&cfg).await?;
                report.config_rewritten = true;
            }
            return Ok(report);
        }
        let path = auth_key_file
            .or_else(|| self.inner.keys.key_file.clone())
            .ok_or_else(|| {
                RepoError::InvalidArgument(
                    "an unencrypted repository needs a key file to authenticate its metadata"
                        .into(),
                )
            })?;
        if cfg.version < FORMAT_VERSION {
            self.refuse_downgraded().await?;
        }
        let key = read_key_blocking(path.clone(), true).await?;
        if cfg.version < FORMAT_VERSION {
            cfg.version = FORMAT_VERSION;
            cfg.set_auth(&key);
            self.write_config(&cfg).await?;
            report.config_rewritten = true;
        } else if cfg.auth.as_ref().map(|a| a.fingerprint.clone())
            != Some(crypto::fingerprint(&key))
        {
            return Err(RepoError::WrongKey {
                location: self.inner.location.to_string(),
                hint: format!("key file {} is not this repository's", path.display()),
            });
        }
        report.key_file = Some(path);
        let old = make_codec(&cfg, &Keys::default())?;
        let new = make_codec(
            &cfg,
            &Keys {
                auth_key: Some(key),
                ..Keys::default()
            },
        )?;
        self.authenticate_metadata(&old, &new, &mut report).await?;
        Ok(report)
    }

    /// A v1 config next to authenticated (v2) metadata was lowered from v2 outside
    /// virtkeep (to get unauthenticated objects accepted): upgrading would bless them.
    async fn refuse_downgraded(&self) -> Result<()> {
        let be = &self.inner.backend;
        let objects: Vec<ObjectInfo> = be.list("snapshots/").try_collect().await?;
        for o in objects.iter().filter(|o| is_meta_key(&o.key)) {
            if let Some(blob) = be.get(&o.key).await?
                && blob.len() >= 8
                && blob[..8] == *MAGIC_META_AUTH
            {
                return Err(RepoError::corrupt(
                    "config",
                    format!(
                        "the config says format v1, but {} is authenticated (v2): the \
                         config was changed outside virtkeep; restore it from a copy \
                         instead of upgrading",
                        o.key
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Re-writes every v1 manifest and index with a MAC.
    async fn authenticate_metadata(
        &self,
        old: &Codec,
        new: &Codec,
        report: &mut UpgradeReport,
    ) -> Result<()> {
        let be = &self.inner.backend;
        let objects: Vec<ObjectInfo> = be.list("snapshots/").try_collect().await?;
        for o in objects.iter().filter(|o| is_meta_key(&o.key)) {
            let Some(blob) = be.get(&o.key).await? else {
                continue; // forgotten meanwhile
            };
            let mut fail = |e: RepoError| {
                report.failed.push(UpgradeFailure {
                    object: o.key.clone(),
                    error: e.to_string(),
                })
            };
            if !Codec::is_plain_meta(&blob) {
                match new.decode_meta(&o.key, blob) {
                    Ok(_) => report.objects_already_authenticated += 1,
                    Err(e) => fail(e),
                }
                continue;
            }
            match old.decode_meta(&o.key, blob) {
                Ok(payload) => {
                    let blob = new.encode_meta(&o.key, &payload)?;
                    be.put(&o.key, Bytes::from(blob)).await?;
                    report.objects_authenticated += 1;
                }
                Err(e) => fail(e),
            }
        }
        Ok(())
    }
}
